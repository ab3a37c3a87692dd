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

from converter.fusion.conv.algebra import bn_affine
from converter.fusion.core.constants import Constant, remove_if_unused
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import is_onnx, single_reader
from converter.fusion.core.runtime_patterns import kept_for_runtime
from converter.fusion.linear import algebra
from converter.fusion.linear.ops import LinearOp
from converter.fusion.linear.views import VIEW_OPS, Features, follow

__all__ = ["Absorb", "find_absorbs", "STEP_TYPES"]

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
        if op.elementwise or op.axis != -1:
            continue
        rank = ctx.shapes.rank(op.output) or ctx.shapes.rank(op.input)
        if rank is None:
            continue
        start = Features(rank - 1, rank, 0, op.out_features)
        for views, step, data, f in _paths(ctx, op.output, start):
            result = _step_map(ctx, step, data, f)
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
    others = [v for v in node.inputs if v is not data]
    return len(node.inputs) == 2 and len(others) == 1 and ctx.constants.is_constant(others[0])


def _step_map(ctx: Context, node: ir.Node, data: ir.Value, f: Features):
    """``(scale, shift)`` of the step on the features, or why it does not fold."""
    ones = np.ones(f.width)
    if node.op_type == "Neg":
        return -ones, None
    if node.op_type == "BatchNormalization":
        return _batch_norm(ctx, node, f)
    kept = kept_for_runtime(ctx, node)
    if kept:
        return Declined.because(kept)
    index = 0 if node.inputs[0] is data else 1
    const = ctx.constants.usable(node.inputs[1 - index], (node,), f.width)
    if isinstance(const, Declined):
        return const
    vector = _along(const, f)
    if vector is None:
        return Declined.because(
            f"{node.op_type} by a constant of shape {list(const.shape)} varies along another "
            f"axis than the one holding the features (axis {f.axis} of rank {f.rank})",
        )
    op = node.op_type
    if op == "Mul":
        return ones * vector, None
    if op == "Div":
        if index == 1 or not np.all(vector != 0):
            return Declined.because(
                "Div by a constant that holds a zero, or of a constant by the data"
            )
        return ones / vector, None
    if op == "Add":
        return ones, ones * vector
    return (ones, -ones * vector) if index == 0 else (-ones, ones * vector)  # Sub


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
    params = [ctx.constants.usable(v, (node,), 1 << 62) for v in node.inputs[1:]]
    if any(isinstance(p, Declined) for p in params):
        return next(p for p in params if isinstance(p, Declined))
    if any(p.size != f.width for p in params):
        return Declined.because("BatchNormalization's parameters do not match the features' width")
    gamma, beta, mean, var = (np.asarray(p.array()).reshape(-1) for p in params)
    return bn_affine(gamma, beta, mean, var, node.attributes.get_float("epsilon", 1e-5))


def remove_step(absorb: Absorb) -> None:
    """Take the folded step out: its readers read its data input instead."""
    step, data = absorb.step, absorb.data
    out = step.outputs[0]
    constants = [v for v in step.inputs if v is not None and v is not data]
    ir.convenience.replace_all_uses_with(out, data, replace_graph_outputs=True)
    if data.is_graph_output():  # the step wrote a graph output: its data now does, by that name
        name, out.name = out.name, None
        data.name, data.type, data.shape = name, out.type or data.type, out.shape or data.shape
    assert step.graph is not None
    step.graph.remove(step, safe=True)
    for value in constants:
        remove_if_unused(value)
