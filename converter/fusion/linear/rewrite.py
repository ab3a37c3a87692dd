"""One merge of linear ops, in the engine's three steps: decide (shapes), compute (float64), write.

A :class:`LinearMerge` is what one merge of linear ops replaces: a segment of a chain
(:class:`~converter.fusion.linear.chains.Segment`), a tree of sums over branches of one input
(:class:`~converter.fusion.linear.branches.SumMerge`), or one op and a step folded into it across
views (:class:`~converter.fusion.linear.absorb.Fold`). Its input ``x`` and its output are read
from the live nodes when the merge is made, so an earlier merge that rewired them is seen, and a
merge whose nodes another merge took is not made at all (:meth:`LinearMerge.alive`).

1. :meth:`~LinearMerge.decide` refuses, from shapes alone, a merge whose result would hold more
   parameters than the constants it frees (``policy="cost"``), or that the target form cannot
   express;
2. :meth:`~LinearMerge.compute` composes the map in float64 (``W = W1 @ W2 @ ...``,
   ``b = (b1 @ W2 + b2) @ W3 + ...``; for sums ``W = sum s_k W_k``); the engine refuses it if
   the dtype cannot store it;
3. :meth:`~LinearMerge.write` rounds it once to the model's dtype and emits it in the form the
   ops came in:

   - 2-D input (any Gemm among the ops, or a rank-2 input): ``Gemm(x, W_t, b, transB=1)`` with the
     weight in torch's ``(out, in)`` layout, keeping the first op's ``transA``;
   - N-D input: ``MatMul(x, W)`` with an ``(in, out)`` weight, then ``Add(., b)`` if there is a bias;
   - a left MatMul (``W @ x``): ``MatMul(W, x)``, the bias a column;
   - a segment led by a 1x1 Conv moved past a channels-last Transpose
     (:mod:`converter.fusion.conv_to_linear`): ``Transpose(x, perm)``, then that ``MatMul`` (+ ``Add``);
   - a segment ending in an ONNX-ML ``LinearClassifier``, or a ``LinearRegressor`` with a
     post-transform or on an input not known to be 2-D (:mod:`converter.fusion.linear.ml`): that
     op again, ``coefficients = W.T`` and ``intercepts = b`` (its :attr:`LinearOp.own_form`),
     taking over all of its outputs.

   The merged op takes over the old output value, and constants only the replaced ops read are
   removed (:mod:`converter.fusion.core.writing`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import (
    Constant,
    other_users,
    remove_if_unused,
    shape_of_static,
)
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.dtypes import round_to_dtype
from converter.fusion.core.graph import is_onnx, op_key, shape_list
from converter.fusion.core.merge import Merge, Round, Written
from converter.fusion.core.writing import fused_name, initializer, replace
from converter.fusion.linear import algebra
from converter.fusion.linear.linear_op import LinearOp, OwnForm
from converter.fusion.linear.region_members import ELEMENTWISE_LIKE, SHAPE_OPS
from converter.fusion.linear.reshape_pairs import reread_shapes
from converter.fusion.linear.views import VIEW_OPS
from converter.report import FusionRecord

__all__ = ["Decision", "LinearMerge", "emits_gemm", "new_nodes", "own_form"]


@dataclass
class Decision:
    """A merge :meth:`LinearMerge.decide` accepted: the form to write and the sizes, from shapes."""

    as_gemm: bool
    has_bias: bool
    params_before: int
    params_after: int
    freed: list[Constant] = field(default_factory=list)
    # The last op written back as its own type (an ONNX-ML regressor or classifier), or None.
    own_form: OwnForm | None = None


@dataclass(eq=False)
class LinearMerge(Merge):
    """What one merge of linear ops replaces: the ops, and the joining nodes of a sum (root last)."""

    ops: list[LinearOp]
    joins: list[ir.Node]
    widths: list[int]
    macs_before: int
    make_affine: Callable[[], algebra.AffineMap]
    note: str | None = None
    # Where the merged op's input is read (node, input index), when not the first op's input.
    x_at: tuple[ir.Node, int] | None = None
    # Nodes of ops composed into the merge that other nodes still read: left in place, and
    # removed by the merge that takes their last reader.
    kept: tuple[ir.Node, ...] = ()
    # The write gave the output a shape the model did not record (later decisions may differ).
    shaped: bool = False

    left_as_is = "chain left as it was"

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
        return self.joins[-1].outputs[0] if self.joins else self.ops[-1].output

    @functools.cached_property
    def names(self) -> list[str]:
        return [n for op in self.ops for n in op.names] + [n.name or n.op_type for n in self.joins]

    @functools.cached_property
    def all_kept(self) -> tuple[ir.Node, ...]:
        """The kept nodes of the merge and of its ops (each once, in order; fixed when the
        merge is planned)."""
        found = dict.fromkeys((*self.kept, *(n for op in self.ops for n in op.kept)))
        return tuple(found)

    @property
    def kept_nodes(self) -> tuple[ir.Node, ...]:
        return self.all_kept

    @property
    def old_nodes(self) -> list[ir.Node]:
        kept = set(self.all_kept)
        return [n for op in self.ops for n in op.nodes if n not in kept] + self.joins

    @property
    def constants(self) -> list[Constant]:
        return [c for op in self.ops for c in op.constants]

    @property
    def dtype(self) -> ir.DataType:
        return self.ops[0].dtype

    def alive(self, graph: ir.Graph) -> bool:
        """Every node is still in ``graph`` and every op reads ``x`` or a value made inside."""
        old = [*self.old_nodes, *self.all_kept]
        if not all(n.graph is graph for n in old):
            return False
        inside = {v for n in old for v in n.outputs}
        x = self.x
        return x not in inside and all(op.input is x or op.input in inside for op in self.ops)

    def decide(self, round: Round) -> Decision | Declined:
        """Accept or refuse the merge from shapes alone (no weight is read)."""
        ops = self.ops
        own = own_form(round.ctx, self)
        if isinstance(own, Declined):
            return own
        has_bias = any(op.has_bias for op in ops) or own is not None
        as_gemm = own is None and emits_gemm(round.ctx, self, has_bias)
        per_row = [op for op in ops if op.per_row_bias]
        if per_row and not as_gemm:
            return Declined(self.names, "a per-row Gemm bias cannot be emitted as MatMul+Add")
        width_in, width_out = self.widths[0], self.widths[-1]
        bias_size = 0
        if has_bias:
            rows = max((op.constants[-1].shape[0] for op in per_row), default=1)
            bias_size = rows * width_out
        removed = {v for n in self.old_nodes for v in n.outputs}
        kept_reading = [n for n in self.all_kept if any(v in removed for v in n.inputs)]
        if kept_reading:  # a node left for other readers would lose its input
            return Declined(
                self.names,
                f"'{kept_reading[0].name}' is read by other nodes too, and reads a value the "
                "merge removes",
            )
        freed = _freed(self)
        # what the file holds for them: constants, and the weights ONNX-ML ops hold as attributes
        params_before = sum(c.stored for c in freed) + sum(op.attribute_params for op in ops)
        params_after = width_in * width_out + bias_size
        if round.ctx.policy == "cost" and params_after > params_before:
            return Declined(
                self.names,
                f"cost model: the merged weight and bias would hold {params_after} parameters, "
                f"more than the {params_before} they replace (--policy always merges anyway)",
            )
        return Decision(as_gemm, has_bias, params_before, params_after, freed, own)

    def compute(self, plan: Decision) -> algebra.AffineMap:
        """The one float64 composition of this merge."""
        return self.make_affine()

    def write(self, round: Round, plan: Decision, computed: algebra.AffineMap) -> Written:
        """Replace the nodes by one op computing ``computed`` rounded once to the model's dtype;
        the new nodes in graph order (a ``Transpose`` of the input first when
        :attr:`input_perm` is set; the last computes the merged output)."""
        ctx, graph = round.ctx, round.graph
        old_nodes, old_out, x = self.old_nodes, self.out, self.x
        self.shaped = _shape_from_input(old_out, x, self) and any(
            op_key(u.node) in _READS_SHAPES for u in old_out.uses()
        )
        if plan.own_form is None:
            w_value, b_value = self.weights(ctx, graph, plan, computed)
            base = _base(w_value, ctx)
        else:
            base = ctx.names.fresh(fused_name([n for op in self.ops for n in op.names[:1]]))
        lead: list[ir.Node] = []
        if self.input_perm is not None:
            lead = [_transposed(ctx, x, self.input_perm, base)]
            x = lead[0].outputs[0]
        if plan.own_form is None:
            op_nodes = new_nodes(ctx, self, plan, x, w_value, b_value)
            for node in op_nodes[:-1]:  # MatMul before the bias Add: the output's shape (b is 1-D)
                node.outputs[0].type, node.outputs[0].shape = old_out.type, old_out.shape
        else:
            op_nodes = [plan.own_form.make(x, computed, base, _doc(self))]
        joined = [v for n in self.joins for v in n.inputs if ctx.constants.is_constant(v)]
        record = FusionRecord(
            nodes=self.names,
            op_types=[n.op_type for n in old_nodes],
            new_nodes=[n.name or n.op_type for n in op_nodes + lead],  # the merged op first
            graph=round.label,
            output=old_out.name or "",
            widths=self.widths,
            input_shape=shape_list(x),
            output_shape=shape_list(old_out),
            macs_before=self.macs_before,
            macs_after=self.widths[0] * self.widths[-1],
            params_before=plan.params_before,
            params_after=plan.params_after,
            note=self.note,
        )
        # the constants the ops read, then those of the joins (a stacked sum's axes)
        constants = [c.value for c in self.constants] + joined
        # an op written as itself takes over all of its outputs (a classifier's labels too)
        old_outs = list(old_nodes[-1].outputs) if plan.own_form else [old_out]
        reread_shapes([n for op in self.ops for n in op.through])
        _shapes_from_inputs(self.ops)
        read = [v for n in old_nodes for v in n.inputs if ctx.constants.is_constant(v)]
        replace(graph, old_nodes, lead + op_nodes, old_outs, constants)
        for value in dict.fromkeys(read):  # computed constants (a region's indices) go too
            remove_if_unused(value)
        _drop_unread(graph, self.all_kept)
        return Written(lead + op_nodes, op_nodes[0], record)

    def weights(
        self, ctx: Context, graph: ir.Graph, plan: Decision, affine: algebra.AffineMap
    ) -> tuple[ir.Value, ir.Value | None]:
        """The merged weight (``(out, in)`` for Gemm and a left MatMul) and bias, as initializers."""
        np_dtype = self.dtype.numpy()
        base = ctx.names.fresh(fused_name([n for op in self.ops for n in op.names[:1]]))
        left = self.ops[0].axis == -2
        w = affine.weight.T if plan.as_gemm or left else affine.weight
        weight = initializer(ctx, graph, f"{base}.weight", round_to_dtype(w, np_dtype), typed=True)
        # A bias of zeros (an adapter's torch.zeros_like) is none, where the form allows it.
        zero = affine.bias is not None and not np.any(affine.bias)
        if affine.bias is None or (zero and (not plan.as_gemm or ctx.opset >= 11)):
            return weight, None
        b = affine.bias.reshape(-1, 1) if left else affine.bias
        bias = initializer(ctx, graph, f"{base}.bias", round_to_dtype(b, np_dtype), typed=True)
        return weight, bias


#: Readers whose decisions a newly shaped value may change (views, reshapes of rows, steps).
_READS_SHAPES = VIEW_OPS | SHAPE_OPS | ELEMENTWISE_LIKE


def _shape_from_input(out: ir.Value, x: ir.Value, merge: LinearMerge) -> bool:
    """An output the model does not shape gets ``x``'s leading dims and the merged width (a
    map of the last axis keeps the rows), so later decisions read it without inferring shapes
    again (shapes are inferred once a run). True when it did."""
    if out.shape is not None or x.shape is None or len(x.shape) == 0 or x.type is None:
        return False
    first = merge.ops[0]
    if first.axis != -1 or first.trans_a or merge.input_perm is not None or merge.ops[-1].own_form:
        return False
    out.shape = ir.Shape([*x.shape[:-1], merge.widths[-1]])
    out.type = out.type or x.type
    return True


def _shapes_from_inputs(ops: list[LinearOp]) -> None:
    """A ``Shape``/``Size`` of a step's output (whose shape the model leaves symbolic) reads the
    value the steps before it started from instead: each step keeps its data's shape, and that
    value stays (:func:`~converter.fusion.linear.chains.intermediate_reason` allowed the link)."""
    made = {op.output: op for op in ops}
    for op in ops:
        if not op.elementwise:
            continue
        readers = [u.node for u in op.output.uses() if u.node.op_type in ("Shape", "Size")]
        source = op.input
        while source in made and made[source].elementwise:
            source = made[source].input
        if source in made:  # made by an op of the merge, so removed with it: nothing to read
            continue
        for reader in readers:
            if is_onnx(reader) and shape_of_static(reader) is None:
                reader.replace_input_with(0, source)


def _drop_unread(graph: ir.Graph, kept: tuple[ir.Node, ...]) -> None:
    """Remove the kept nodes nothing reads any more (readers first), and their constants."""
    removed = True
    while removed:  # kept nodes of several ops need not come in graph order
        removed = False
        for node in reversed(kept):
            if node.graph is graph and not any(
                v.uses() or v.is_graph_output() for v in node.outputs
            ):
                inputs = list(node.inputs)
                graph.remove(node, safe=True)
                removed = True
                for value in inputs:
                    remove_if_unused(value)


def _freed(merge: LinearMerge) -> list[Constant]:
    """The constants the merge replaces (each once): those no node outside the merge reads,
    and the small shared ones (a bias or a scale no wider than an op) it takes its own copy of,
    so that exporters' deduplication of equal constants does not count against a merge."""
    owners = set(merge.old_nodes)
    for node in reversed(merge.all_kept):  # kept nodes only the merge reads go with it
        if all(
            not v.is_graph_output() and {u.node for u in v.uses()} <= owners for v in node.outputs
        ):
            owners.add(node)
    small = max(merge.widths)
    seen: dict[int, Constant] = {}
    for op in merge.ops:
        for constant in op.constants:
            root = constant.chain[-1]
            if id(root) in seen:
                continue
            if constant.size <= small or not other_users(constant, owners):
                seen[id(root)] = constant
    return list(seen.values())


def emits_gemm(ctx: Context, merge: LinearMerge, has_bias: bool) -> bool:
    """The merged op is a ``Gemm``: a last-axis map of a 2-D input (by rank, or, with the rank
    unknown, because a Gemm is among the ops), with a bias or at opset 11+ (where C is optional;
    a bias-free 2-D merge is a bare MatMul before that). Never after a Transpose of a conv's
    input (rank 3 or more), nor where onnxruntime would lose a graph output
    (:func:`_drops_output_in_runtime`)."""
    if merge.input_perm is not None:
        return False
    rank = ctx.shapes.rank(merge.x)
    two_d = rank == 2 if rank is not None else any(op.is_gemm for op in merge.ops)
    if not has_bias and _drops_output_in_runtime(merge):
        return False
    return two_d and merge.ops[0].axis == -1 and (has_bias or ctx.opset >= 11)


def _drops_output_in_runtime(merge: LinearMerge) -> bool:
    """A bias-free ``Gemm`` here would read a ``Transpose`` and be read by a ``Transpose`` that
    writes a graph output: onnxruntime 1.32's ``GemmTransposeFusion`` takes both into the Gemm
    and loses that output (the session fails at every optimisation level but none), so the
    merge is written as a ``MatMul``, which it leaves alone."""
    producer = merge.x.producer()
    if producer is None or producer.op_type != "Transpose":
        return False
    readers = [u.node for u in merge.out.uses()]
    return any(r.op_type == "Transpose" and r.outputs[0].is_graph_output() for r in readers)


def new_nodes(
    ctx: Context,
    merge: LinearMerge,
    plan: Decision,
    x: ir.Value,
    weight: ir.Value,
    bias: ir.Value | None,
) -> list[ir.Node]:
    """The merged op reading ``x``: ``Gemm(transB=1)``, or ``MatMul`` then ``Add`` of the bias."""
    base = _base(weight, ctx)
    doc = _doc(merge)
    if merge.ops[0].axis == -2:  # W @ x (+ b as a column), as the ops came
        nodes = [ir.Node("", "MatMul", [weight, x], name=base, doc_string=doc)]
    elif plan.as_gemm:
        attrs = [ir.AttrInt64("transB", 1)]
        if merge.ops[0].trans_a:
            attrs.append(ir.AttrInt64("transA", 1))
        inputs = [x, weight] + ([bias] if bias is not None else [])
        return [ir.Node("", "Gemm", inputs, attrs, name=base, doc_string=doc)]
    else:
        nodes = [ir.Node("", "MatMul", [x, weight], name=base, doc_string=doc)]
    if bias is not None:
        nodes[0].outputs[0].name = ctx.names.fresh(f"{base}.matmul")
        add = ir.Node("", "Add", [nodes[0].outputs[0], bias], name=ctx.names.fresh(f"{base}.add"))
        add.doc_string = doc
        nodes.append(add)
    return nodes


def own_form(ctx: Context, merge: LinearMerge) -> OwnForm | Declined | None:
    """How the merge writes its last op back as its own type (an ONNX-ML regressor or
    classifier), None when it is written as Gemm/MatMul, or why it cannot be made at all.

    An op that ends chains only ever ends a merge; one that must be written as itself cannot be
    the term of a sum. A regressor without a post-transform is a Gemm on a 2-D input, and itself
    on any other (a 1-D input gives ``[1, targets]``)."""
    *before, last = merge.ops
    inner = [op for op in before if op.ends_chain]
    if inner:
        return Declined(merge.names, inner[0].ends_chain)
    form = last.own_form
    if form is None or (form.required is None and ctx.shapes.rank(merge.x) == 2):
        return None
    if merge.joins:
        return Declined(
            merge.names, f"'{last.names[0]}' is written back as itself: it cannot end a sum"
        )
    return form


def _doc(merge: LinearMerge) -> str:
    return "onnx-fuse merged: " + ", ".join(merge.names)


def _base(weight: ir.Value, ctx: Context) -> str:
    return weight.name.removesuffix(".weight") if weight.name else ctx.names.fresh("fused")


def _transposed(ctx: Context, x: ir.Value, perm: tuple[int, ...], base: str) -> ir.Node:
    """``Transpose(x, perm)``, its output typed as ``x`` and shaped by ``perm`` when known."""
    node = ir.Node(
        "",
        "Transpose",
        [x],
        [ir.AttrInt64s("perm", list(perm))],
        name=ctx.names.fresh(f"{base}.transpose"),
        doc_string="onnx-fuse: the input of a 1x1 Conv merged into the linear op after it",
    )
    out = node.outputs[0]
    out.name = ctx.names.fresh(f"{base}.transposed")
    out.type = x.type
    if x.shape is not None and len(x.shape) == len(perm):
        out.shape = ir.Shape([x.shape[i] for i in perm])
    return node
