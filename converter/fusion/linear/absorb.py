"""Constant steps folded into a linear op across views of its output.

``z = step(view(L(x)))`` where ``view`` is a run of shape ops (:mod:`converter.fusion.linear.views`) and
``step`` a constant ``Mul``/``Div``/``Add``/``Sub``/``Neg`` or an inference
``BatchNormalization`` that varies only along the axis holding ``L``'s features ``[a, b)``::

    step = y * s + t on those features   ->   W'[:, a:b] = W[:, a:b] * s,  b'[a:b] = b[a:b] * s + t

so ``z = view(L'(x))``: the step is removed, the views stay, and ``L'`` takes over ``L``'s output.
This is a BatchNorm over tokens after ``Linear -> Flatten``, a layer scale on channels after a
permute back to channels-first, and an attention scale after ``Reshape -> Transpose`` (after a
``Split`` of a fused qkv projection, only the q or k columns). A step directly after ``L`` is the
chain's business (:mod:`converter.fusion.linear.chains`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import is_onnx, single_reader
from converter.fusion.core.merge import Finder, Merge, Round, Written
from converter.fusion.core.steps import batch_norm_params, bn_affine, constant_step
from converter.fusion.core.writing import take_out
from converter.fusion.linear import algebra, chains
from converter.fusion.linear.linear_op import LinearOp
from converter.fusion.linear.ops import recognize
from converter.fusion.linear.rewrite import Decision, LinearMerge, emits_gemm
from converter.fusion.linear.views import VIEW_OPS, Features, follow

__all__ = [
    "STEP_TYPES",
    "Absorb",
    "Fold",
    "FoldsAcrossViews",
    "StepFold",
    "find_absorbs",
    "step_map",
]

STEP_TYPES = frozenset({"Mul", "Div", "Add", "Sub", "Neg", "BatchNormalization"})


@dataclass
class Absorb:
    """The step ``step`` (reading ``data``) folds into ``op`` across the nodes ``views``."""

    op: LinearOp
    views: list[ir.Node]
    step: ir.Node
    data: ir.Value
    features: Features
    scale: np.ndarray  # (width,) float64, on the features [start, stop)
    shift: np.ndarray | None

    @property
    def names(self) -> list[str]:
        return [*self.op.names, *(v.name or v.op_type for v in self.views), self.step.name or ""]

    @property
    def note(self) -> str:
        through = ", ".join(dict.fromkeys(v.op_type for v in self.views))
        return f"{self.step.op_type} folded into {self.op.names[0]} through {through}"

    def alive(self, graph: ir.Graph) -> bool:
        nodes = [*self.op.nodes, *self.views, self.step]
        return all(n.graph is graph for n in nodes) and self.data in self.step.inputs

    def affine(self) -> algebra.AffineMap:
        """``op`` then the step on its features, in float64."""
        base = self.op.affine
        f = self.features
        weight = base.weight.copy()
        weight[:, f.start : f.stop] *= self.scale
        bias = None if base.bias is None else base.bias.copy()
        if bias is not None:
            bias[..., f.start : f.stop] *= self.scale
        if self.shift is not None:
            if bias is None:
                bias = np.zeros(base.out_features)
            bias[..., f.start : f.stop] += self.shift
        return algebra.AffineMap(weight, bias)


def find_absorbs(
    ctx: Context, ops: list[LinearOp], label: str
) -> tuple[list[Absorb], list[Declined]]:
    """Every step that folds into a Gemm/MatMul of ``ops`` through at least one view."""
    found: list[Absorb] = []
    declined: list[Declined] = []
    for op in ops:
        if not op.is_matrix or op.axis != -1 or op.ends_chain:
            continue
        rank = ctx.shapes.rank(op.output) or ctx.shapes.rank(op.input)
        if rank is None:
            continue
        start = Features(rank - 1, rank, 0, op.out_features)
        for views, step, data, f in _paths(ctx, op.output, start):
            result = step_map(ctx, step, data, f)
            if isinstance(result, Declined):
                names = [*op.names, *(v.name or v.op_type for v in views), step.name or ""]
                declined.append(result.about(names, label))
                continue
            scale, shift = result
            found.append(Absorb(op, views, step, data, f, scale, shift))
    return found, declined


def _paths(ctx: Context, value: ir.Value, f: Features, views: tuple[ir.Node, ...] = ()):
    """(views, step, step's data input, features) for each path of views from ``value``."""
    reader = single_reader(value)
    if reader is None or not is_onnx(reader):
        return
    if reader.op_type in STEP_TYPES and views and _is_constant_step(ctx, reader, value):
        yield list(views), reader, value, f
        return
    if reader.op_type not in VIEW_OPS or reader.inputs[0] is not value or len(views) > 16:
        return
    for index, out in enumerate(reader.outputs):
        g = follow(ctx, reader, index, f, value)
        if g is not None:
            yield from _paths(ctx, out, g, (*views, reader))


def _is_constant_step(ctx: Context, node: ir.Node, data: ir.Value) -> bool:
    if node.op_type in ("Neg", "BatchNormalization"):
        return node.inputs[0] is data
    return constant_step(ctx, node) is not None  # (one the runtime fuses says so when mapped)


def step_map(ctx: Context, node: ir.Node, data: ir.Value, f: Features):
    """``(scale, shift)`` of the step on the features, or why it does not fold."""
    if node.op_type == "Neg":
        return -np.ones(f.width), None
    if node.op_type == "BatchNormalization":
        return _batch_norm(ctx, node, f)
    step = constant_step(ctx, node)
    assert step is not None  # a path ends only at a constant step
    if isinstance(step, Declined):
        return step
    const = step.constant(ctx, f.width)
    if isinstance(const, Declined):
        return const
    vector = _along(const, f)
    if vector is None:
        return Declined.because(
            f"{node.op_type} by a constant of shape {list(const.shape)} varies along another "
            f"axis than the one holding the features (axis {f.axis} of rank {f.rank})",
        )
    if step.op_type == "Div" and (not step.is_affine or not np.all(vector != 0)):
        return Declined.because("Div by a constant that holds a zero, or of a constant by the data")
    scale, shift = step.scale_shift(vector)
    return np.ones(f.width) if scale is None else scale, shift


def _along(const: Constant, f: Features) -> np.ndarray | None:
    """The constant as a vector on the features (a scalar broadcast), or None."""
    if const.size == 1:
        return np.full(f.width, float(np.asarray(const.array()).reshape(-1)[0]))
    if f.axis is None or f.rank is None:
        return None
    shape = const.shape
    if len(shape) > f.rank:
        return None
    aligned = (1,) * (f.rank - len(shape)) + tuple(shape)
    if aligned[f.axis] != f.width or any(d != 1 for i, d in enumerate(aligned) if i != f.axis):
        return None
    return np.asarray(const.array(), dtype=np.float64).reshape(-1)


def _batch_norm(ctx: Context, node: ir.Node, f: Features):
    if len(node.inputs) != 5 or node.attributes.get_int("training_mode", 0) or f.axis != 1:
        if f.axis is None:
            return Declined.because(
                "BatchNormalization after a view that regroups the features with other axes"
            )
        return Declined.because(
            "BatchNormalization's channel axis is not the one holding the features"
        )
    params = batch_norm_params(ctx, node)
    if isinstance(params, Declined):
        return params
    if any(p.size != f.width for p in params):
        return Declined.because("BatchNormalization's parameters do not match the features' width")
    gamma, beta, mean, var = (np.asarray(p.array()).reshape(-1) for p in params)
    return bn_affine(gamma, beta, mean, var, node.attributes.get_float("epsilon", 1e-5))


def remove_step(absorb: Absorb) -> None:
    """Take the folded step out: its readers read its data input instead."""
    take_out(absorb.step, absorb.data)


class StepFold(Merge):
    """A constant step folded into one linear op across views (of its output here, of its input
    in :mod:`converter.fusion.linear.fold_before`): the op rewritten with the step's values, the
    step taken out, the views left; never more work, never more weights. ``found`` is what the
    finder saw (its ``op``, ``shift``, ``names``, ``note``, ``alive`` and ``affine``)."""

    left_as_is = "step left as it was"
    refolds = True  # the record names no output: a value of the views holds the folded step

    def __init__(self, found) -> None:
        self.found = found
        op = found.op
        widths = [op.in_features, op.out_features]
        self._merge = LinearMerge([op], [], widths, op.macs, found.affine, found.note)

    @property
    def names(self) -> list[str]:
        return self.found.names

    @property
    def constants(self) -> list[Constant]:
        return list(self.found.op.constants)

    @property
    def dtype(self) -> ir.DataType:
        return self.found.op.dtype

    def alive(self, graph: ir.Graph) -> bool:
        return self.found.alive(graph)

    def decide(self, round: Round) -> Decision:
        has_bias = self.found.op.has_bias or self.found.shift is not None
        return Decision(emits_gemm(round.ctx, self._merge, has_bias), has_bias, 0, 0)

    def compute(self, plan: Decision) -> algebra.AffineMap:
        return self._merge.compute(plan)

    def _written(self, round: Round, plan: Decision, computed, nodes: list[ir.Node]) -> Written:
        """The op with the step's values in it written, recorded as the merge of ``nodes``
        (the caller takes the step out)."""
        written = self._merge.write(round, plan, computed)
        record = written.record
        record.output = None
        record.nodes = self.names
        record.op_types = [n.op_type for n in nodes]
        record.macs_after = record.macs_before
        return written


class Fold(StepFold):
    """One step folded into its linear op across views of its output: ``W' = W * s``,
    ``b' = b * s + t`` on the features."""

    found: Absorb

    @property
    def old_nodes(self) -> list[ir.Node]:
        return [*self.found.op.nodes, self.found.step]

    @property
    def renames(self) -> list[str]:
        step = self.found.step
        return [*self.found.op.names, step.name or step.op_type]

    def write(self, round: Round, plan: Decision, computed: algebra.AffineMap) -> Written:
        """The op with the step's values in it takes the op's place; the step goes."""
        found = self.found
        written = self._written(round, plan, computed, [*found.op.nodes, *found.views, found.step])
        remove_step(found)
        return written


class FoldsAcrossViews(Finder):
    """Every constant step that folds into a Gemm/MatMul of the round's chains through views."""

    def find(self, round: Round) -> list[Merge | Declined]:
        runs = round.shared(chains.analyse).runs
        ops = [
            op for run in runs for op in run if not (op.kept or op.through)
        ]  # a fold removes all its nodes
        absorbs, declined = find_absorbs(round.ctx, ops, round.label)
        return [*declined, *(Fold(absorb) for absorb in absorbs)]

    def pending(self, round: Round, written: list[ir.Node]) -> bool:
        """A merged segment now reaches a constant step through views (``MatMul -> Neg ->
        Transpose -> Mul``: the chain took the Neg, the Mul folds next): one more round."""
        near = [n for n in written if _reaches_view(n)]  # cheap test first: most reach none
        ops = [op for n in near if isinstance(op := recognize(round.ctx, n), LinearOp)]
        return bool(ops) and bool(find_absorbs(round.ctx, ops, round.label)[0])


def _reaches_view(node: ir.Node) -> bool:
    """The merged op (``node``, or the bias ``Add`` after it) is read by a view."""
    out = node.outputs[0]
    reader = single_reader(out)
    if reader is not None and reader.op_type == "Add" and len(out.uses()) == 1:
        reader = single_reader(reader.outputs[0])  # MatMul + Add: the Add's reader
    return reader is not None and reader.op_type in VIEW_OPS
