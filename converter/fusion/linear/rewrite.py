"""One merge, in three steps taken once each: decide (from shapes), compute (float64), write.

A :class:`Rewrite` is what one merge replaces: a segment of a chain, or a tree of sums over
branches of one input (:class:`~converter.fusion.linear.branches.BranchSum`). Its input ``x`` and its
output are read from the live nodes when the merge is made, so an earlier merge that rewired them
is seen, and a rewrite whose nodes another merge took is not made at all (:meth:`Rewrite.alive`).

1. :func:`decide` refuses, from shapes alone, a merge whose result would hold more parameters
   than the constants it frees (``policy="cost"``), or that the target form cannot express;
2. the map is composed in float64 (``W = W1 @ W2 @ ...``, ``b = (b1 @ W2 + b2) @ W3 + ...``;
   for sums ``W = sum s_k W_k``) and refused if the dtype cannot store it;
3. :func:`write` rounds it once to the model's dtype and emits it in the form the ops came in:

   - 2-D input (any Gemm among the ops, or a rank-2 input): ``Gemm(x, W_t, b, transB=1)`` with the
     weight in torch's ``(out, in)`` layout, keeping the first op's ``transA``;
   - N-D input: ``MatMul(x, W)`` with an ``(in, out)`` weight, then ``Add(., b)`` if there is a bias;
   - a segment led by a 1x1 Conv moved past a channels-last Transpose
     (:mod:`converter.fusion.conv.to_linear`): ``Transpose(x, perm)``, then that ``MatMul`` (+ ``Add``).

   The merged op takes over the old output value (same name, type and shape), so everything
   downstream, graph outputs included, is untouched; constants only the replaced ops read are
   removed (:func:`converter.fusion.core.constants.remove_if_unused`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant, other_users, remove_if_unused
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import shape_list
from converter.fusion.linear import algebra, chains
from converter.fusion.linear.branches import BranchSum
from converter.fusion.linear.ops import LinearOp
from converter.report import FusionRecord

__all__ = ["Rewrite", "Decision", "decide", "emits_gemm", "write"]


@dataclass
class Rewrite:
    """What one merge replaces: linear ops, and the joining nodes of a sum (root last)."""

    ops: list[LinearOp]
    joins: list[ir.Node]
    widths: list[int]
    macs_before: int
    make_affine: Callable[[], algebra.AffineMap]
    note: str | None = None
    # Where the merged op's input is read (node, input index), when not the first op's input.
    x_at: tuple[ir.Node, int] | None = None

    @classmethod
    def segment(cls, ops: list[LinearOp], tick: Callable[[], None] = lambda: None) -> Rewrite:
        def maps() -> Iterator[algebra.AffineMap]:
            for op in ops:  # one float64 map at a time, built when the fold reaches it
                yield op.affine
                tick()

        def make() -> algebra.AffineMap:
            return algebra.compose_all(maps())

        note = None
        if ops[0].input_perm is not None:
            note = (
                f"1x1 Conv '{ops[0].names[0]}' moved past the Transpose "
                f"(perm {list(ops[0].input_perm)}) into the channels-last linear op"
            )
        return cls(ops, [], chains.widths(ops), sum(op.macs for op in ops), make, note)

    @classmethod
    def branch_sum(cls, found: BranchSum) -> Rewrite:
        widths = [found.width_in, found.width_out]
        macs = sum(op.macs for op in found.ops) + (len(found.terms) - 1) * found.width_out
        wraps = [n for t in found.terms for n in t.wrap]
        rewrite = cls(found.ops, wraps + found.joins, widths, macs, found.affine, found.note())
        rewrite.x_at = found.x_at
        return rewrite

    @property
    def x(self) -> ir.Value:
        """The input the merged op reads (live: after any earlier merge rewired it)."""
        if self.x_at is not None:
            node, index = self.x_at
            value = node.inputs[index]
            assert value is not None
            return value
        return self.ops[0].input

    @property
    def input_perm(self) -> tuple[int, ...] | None:
        """The merged op reads ``Transpose(x, perm)`` (a 1x1 Conv led the segment), or None."""
        return self.ops[0].input_perm

    @property
    def out(self) -> ir.Value:
        return (self.joins[-1] if self.joins else self.ops[-1].nodes[-1]).outputs[0]

    @functools.cached_property
    def names(self) -> list[str]:
        return [n for op in self.ops for n in op.names] + [n.name or n.op_type for n in self.joins]

    @property
    def old_nodes(self) -> list[ir.Node]:
        return [n for op in self.ops for n in op.nodes] + self.joins

    def alive(self, graph: ir.Graph) -> bool:
        """Every node is still in ``graph`` and every op reads ``x`` or a value made inside."""
        old = self.old_nodes
        if not all(n.graph is graph for n in old):
            return False
        inside = {v for n in old for v in n.outputs}
        x = self.x
        return x not in inside and all(op.input is x or op.input in inside for op in self.ops)


@dataclass
class Decision:
    """A merge :func:`decide` accepted: the form to write and the sizes, known from shapes."""

    as_gemm: bool
    has_bias: bool
    params_before: int
    params_after: int
    freed: list[Constant] = field(default_factory=list)


def _freed(rewrite: Rewrite) -> list[Constant]:
    """The constants the merge replaces (each once): those no node outside the rewrite reads,
    and the small shared ones (a bias or a scale no wider than an op) it takes its own copy of,
    so that exporters' deduplication of equal constants does not count against a merge."""
    owners = set(rewrite.old_nodes)
    small = max(rewrite.widths)
    seen: dict[int, Constant] = {}
    for op in rewrite.ops:
        for constant in op.constants:
            root = constant.chain[-1]
            if id(root) in seen:
                continue
            if constant.size <= small or not other_users(constant, owners):
                seen[id(root)] = constant
    return list(seen.values())


def emits_gemm(ctx: Context, rewrite: Rewrite, has_bias: bool) -> bool:
    """The merged op is a ``Gemm``: a last-axis map of a 2-D input (by rank, or, with the rank
    unknown, because a Gemm is among the ops), with a bias or at opset 11+ (where C is optional;
    a bias-free 2-D merge is a bare MatMul before that). Never after a Transpose of a conv's
    input (rank 3 or more)."""
    if rewrite.input_perm is not None:
        return False
    rank = ctx.shapes.rank(rewrite.x)
    two_d = rank == 2 if rank is not None else any(op.is_gemm for op in rewrite.ops)
    return two_d and rewrite.ops[0].axis == -1 and (has_bias or ctx.opset >= 11)


def decide(ctx: Context, rewrite: Rewrite, label: str) -> Decision | Declined:
    """Accept or refuse ``rewrite`` from shapes alone (no weight is read)."""
    ops = rewrite.ops
    has_bias = any(op.has_bias for op in ops)
    as_gemm = emits_gemm(ctx, rewrite, has_bias)
    per_row = [op for op in ops if op.per_row_bias]
    if per_row and not as_gemm:
        return Declined(rewrite.names, "a per-row Gemm bias cannot be emitted as MatMul+Add", label)
    width_in, width_out = rewrite.widths[0], rewrite.widths[-1]
    bias_size = 0
    if has_bias:
        rows = max((op.constants[-1].shape[0] for op in per_row), default=1)
        bias_size = rows * width_out
    freed = _freed(rewrite)
    params_before = sum(c.size for c in freed)
    params_after = width_in * width_out + bias_size
    if ctx.policy == "cost" and params_after > params_before:
        return Declined(
            rewrite.names,
            f"cost model: the merged weight and bias would hold {params_after} parameters, "
            f"more than the {params_before} they replace (--policy always merges anyway)",
            label,
        )
    return Decision(as_gemm, has_bias, params_before, params_after, freed)


def overflow(affine: algebra.AffineMap, dtype: np.dtype, names: list[str], label: str):
    """A :class:`Declined` when the merged map cannot be stored in ``dtype``, else None."""
    reason = algebra.arrays_overflow((affine.weight, affine.bias), dtype)
    return Declined(names, f"{reason}; chain left as it was", label) if reason else None


def _fused_name(ops: list[LinearOp]) -> str:
    names = [n for op in ops for n in op.names[:1]]
    if len(names) > 4:
        names = [names[0], f"...{len(names) - 2} more...", names[-1]]
    return "fused(" + "+".join(names) + ")"


def _initializer(ctx: Context, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name = ctx.names.fresh(base)
    tensor = ir.Tensor(array, name=name)
    value = ir.Value(  # the tensor's frozen shape serves the value too (as onnx-ir's loader does)
        name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor
    )
    graph.register_initializer(value)
    return value


def _new_nodes(
    ctx: Context,
    rewrite: Rewrite,
    decision: Decision,
    x: ir.Value,
    weight: ir.Value,
    bias: ir.Value | None,
) -> list[ir.Node]:
    """The merged op reading ``x``: ``Gemm(transB=1)``, or ``MatMul`` then ``Add`` of the bias."""
    names = ctx.names
    base = _base(weight, names)
    doc = "onnx-fuse merged: " + ", ".join(rewrite.names)
    if rewrite.ops[0].axis == -2:  # W @ x (+ b as a column), as the ops came
        nodes = [ir.Node("", "MatMul", [weight, x], name=base, doc_string=doc)]
    elif decision.as_gemm:
        attrs = [ir.AttrInt64("transB", 1)]
        if rewrite.ops[0].trans_a:
            attrs.append(ir.AttrInt64("transA", 1))
        inputs = [x, weight] + ([bias] if bias is not None else [])
        return [ir.Node("", "Gemm", inputs, attrs, name=base, doc_string=doc)]
    else:
        nodes = [ir.Node("", "MatMul", [x, weight], name=base, doc_string=doc)]
    if bias is not None:
        nodes[0].outputs[0].name = names.fresh(f"{base}.matmul")
        add = ir.Node("", "Add", [nodes[0].outputs[0], bias], name=names.fresh(f"{base}.add"))
        add.doc_string = doc
        nodes.append(add)
    return nodes


def _base(weight: ir.Value, names) -> str:
    return weight.name.removesuffix(".weight") if weight.name else names.fresh("fused")


def _transposed(ctx: Context, x: ir.Value, perm: tuple[int, ...], base: str) -> ir.Node:
    names = ctx.names
    """``Transpose(x, perm)``, its output typed as ``x`` and shaped by ``perm`` when known."""
    node = ir.Node(
        "",
        "Transpose",
        [x],
        [ir.AttrInt64s("perm", list(perm))],
        name=names.fresh(f"{base}.transpose"),
        doc_string="onnx-fuse: the input of a 1x1 Conv merged into the linear op after it",
    )
    out = node.outputs[0]
    out.name = names.fresh(f"{base}.transposed")
    out.type = x.type
    if x.shape is not None and len(x.shape) == len(perm):
        out.shape = ir.Shape([x.shape[i] for i in perm])
    return node


def write(
    ctx: Context,
    graph: ir.Graph,
    rewrite: Rewrite,
    decision: Decision,
    affine: algebra.AffineMap,
    label: str,
) -> tuple[FusionRecord, list[ir.Node]]:
    """Replace ``rewrite``'s nodes by one op computing ``affine`` rounded once to the model's
    dtype; return the record and the new nodes in graph order (the last computes the merged
    output; a ``Transpose`` of the input comes first when :attr:`Rewrite.input_perm` is set)."""
    np_dtype = rewrite.ops[0].dtype.numpy()
    base = ctx.names.fresh(_fused_name(rewrite.ops))
    left = rewrite.ops[0].axis == -2
    w = affine.weight.T if decision.as_gemm or left else affine.weight
    w_value = _initializer(ctx, graph, f"{base}.weight", algebra.round_to_dtype(w, np_dtype))
    b_value = None
    if affine.bias is not None:
        b = affine.bias.reshape(-1, 1) if left else affine.bias
        b_value = _initializer(ctx, graph, f"{base}.bias", algebra.round_to_dtype(b, np_dtype))
    old_nodes, old_out, x = rewrite.old_nodes, rewrite.out, rewrite.x
    lead: list[ir.Node] = []
    if rewrite.input_perm is not None:
        lead = [_transposed(ctx, x, rewrite.input_perm, _base(w_value, ctx.names))]
        x = lead[0].outputs[0]
    op_nodes = _new_nodes(ctx, rewrite, decision, x, w_value, b_value)
    new_nodes = lead + op_nodes
    join_constants = [v for n in rewrite.joins for v in n.inputs if ctx.constants.is_constant(v)]
    new_out = new_nodes[-1].outputs[0]
    record = FusionRecord(
        nodes=rewrite.names,
        op_types=[n.op_type for n in old_nodes],
        new_nodes=[n.name or n.op_type for n in op_nodes + lead],  # the merged op first
        graph=label,
        output=old_out.name or "",
        widths=rewrite.widths,
        input_shape=shape_list(x),
        output_shape=shape_list(old_out),
        macs_before=rewrite.macs_before,
        macs_after=rewrite.widths[0] * rewrite.widths[-1],
        params_before=decision.params_before,
        params_after=decision.params_after,
        note=rewrite.note,
    )
    ir.convenience.replace_nodes_and_values(
        graph, old_nodes[-1], old_nodes, new_nodes, [old_out], [new_out]
    )
    for constant in (c for op in rewrite.ops for c in op.constants):
        remove_if_unused(constant.value)
    for value in join_constants:  # e.g. the axes of a stacked sum's Unsqueeze and ReduceSum
        remove_if_unused(value)
    return record, new_nodes
