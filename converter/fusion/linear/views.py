"""Seeing through shape ops: where a linear op's features lie after views of its output.

A *view* moves or regroups elements without changing them: ``Reshape``, ``Flatten``,
``Squeeze``, ``Unsqueeze``, ``Transpose``, ``Identity``, a ``Cast`` to the type it already has,
and one output of a ``Split``. Following a linear op's output through views, :func:`follow` keeps
a :class:`Features`: the axis along which the op's features ``[start, stop)`` now lie. The axis
mapping is proved from shapes, never guessed:

- ``Transpose(perm)``: the axis moves to ``perm.index(axis)``;
- ``Squeeze``/``Unsqueeze``: axes removed or added before it shift it (removing it ends the view);
- ``Reshape``/``Flatten``: the features keep their axis ``j`` of the output when the axis has the
  same extent and the product of the dimensions after it is the same (statically known): then
  every element keeps its feature index, ``(i // stride) % width``;
- ``Split``: along another axis nothing moves; along the features, output ``i`` holds the slice
  ``[start + offset_i, start + offset_i + size_i)``.

A step at the end of the views (a constant ``Mul``/``Div``/``Add``/``Sub``/``Neg``, or a
``BatchNormalization`` whose channel axis is the features' axis) that varies only along that axis
is a map on the op's features (a scalar on the slice), so it folds into the op's weight columns
and bias: ``W' = W * s``, ``b' = b * s + t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant, axes_of
from converter.fusion.core.context import Context
from converter.fusion.core.graph import is_onnx

__all__ = ["Features", "VIEW_OPS", "follow", "static_dims"]

VIEW_OPS = frozenset(
    {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast", "Split"}
)


@dataclass(frozen=True)
class Features:
    """The op's features ``[start, stop)`` lie along ``axis`` of a value of rank ``rank``.

    ``axis`` None: a view regrouped the features with other axes; every element still comes
    from the features ``[start, stop)``, so a scalar step still folds, a per-feature one not.
    """

    axis: int | None
    rank: int | None
    start: int
    stop: int

    @property
    def width(self) -> int:
        return self.stop - self.start


def static_dims(ctx: Context, value: ir.Value) -> list[int | None] | None:
    """The value's dimensions (None where symbolic), or None if its shape is unknown."""
    if value.shape is None and not ctx.shapes.request():
        return None
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def follow(
    ctx: Context, node: ir.Node, index: int, f: Features, value: ir.Value
) -> Features | None:
    """Where the features are in output ``index`` of the view ``node`` reading ``value``."""
    if not is_onnx(node):
        return None
    op = node.op_type
    if op == "Identity":
        return f
    if f.axis is None or f.rank is None:  # only a scalar can fold: any regrouping keeps it so
        if op == "Split":
            return None
        return (
            f
            if op != "Cast" or follow(ctx, node, index, Features(0, 1, f.start, f.stop), value)
            else None
        )
    if op == "Cast":
        out = node.outputs[0]
        if out.dtype is None:
            ctx.shapes.request()
        same = value.dtype is not None and out.dtype == value.dtype
        return f if same and node.attributes.get_int("saturate", 1) == 1 else None
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        perm = list(range(f.rank))[::-1] if perm is None else list(perm)
        return Features(perm.index(f.axis), f.rank, f.start, f.stop) if f.axis in perm else None
    if op in ("Squeeze", "Unsqueeze"):
        return _squeeze(ctx, node, f)
    if op in ("Reshape", "Flatten"):
        return _regroup(ctx, value, node.outputs[0], f) or Features(None, None, f.start, f.stop)
    if op == "Split":
        return _split(ctx, node, index, f, value)
    return None


def _squeeze(ctx: Context, node: ir.Node, f: Features) -> Features | None:
    axes = axes_of(ctx.constants, node)
    if axes is None:
        return None  # Squeeze without axes drops every 1: decided only from shapes, not here
    if node.op_type == "Squeeze":
        axes = [a + f.rank if a < 0 else a for a in axes]
        if f.axis in axes:
            return None
        return Features(f.axis - sum(a < f.axis for a in axes), f.rank - len(axes), f.start, f.stop)
    rank = f.rank + len(axes)
    axes = [a + rank if a < 0 else a for a in axes]
    kept = [i for i in range(rank) if i not in axes]
    return Features(kept[f.axis], rank, f.start, f.stop)


def _regroup(ctx: Context, value: ir.Value, out: ir.Value, f: Features) -> Features | None:
    """Reshape/Flatten: the features' axis in ``out``, proved from both shapes."""
    dims_in, dims_out = static_dims(ctx, value), static_dims(ctx, out)
    if dims_in is None or dims_out is None:
        return None
    after = dims_in[f.axis + 1 :]
    if dims_in[f.axis] is None or None in after:
        return None
    stride, extent = math.prod(after), dims_in[f.axis]
    for j in range(len(dims_out) - 1, -1, -1):
        tail = dims_out[j + 1 :]
        if None in tail:
            return None
        if math.prod(tail) == stride and dims_out[j] == extent:
            return Features(j, len(dims_out), f.start, f.stop)
        if math.prod(tail) > stride:
            return None
    return None


def _split(
    ctx: Context, node: ir.Node, index: int, f: Features, value: ir.Value
) -> Features | None:
    axis = node.attributes.get_int("axis", 0)
    axis = axis + f.rank if axis < 0 else axis
    if axis != f.axis:
        return f
    sizes = _split_sizes(ctx, node, value, f.axis)
    if sizes is None or f.start != 0 or sum(sizes) != f.stop:
        return None  # only a split of the op's whole feature axis is followed
    offset = sum(sizes[:index])
    return Features(f.axis, f.rank, offset, offset + sizes[index])


def _split_sizes(ctx: Context, node: ir.Node, value: ir.Value, axis: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        found = ctx.constants.resolve(node.inputs[1])
        if isinstance(found, Constant):
            return [int(s) for s in np.asarray(found.array()).reshape(-1)]
        return None
    attr = node.attributes.get_ints("split", None)
    if attr is not None:
        return list(attr)
    dims = static_dims(ctx, value)
    n = len(node.outputs)
    if dims is None or dims[axis] is None or dims[axis] % n:
        return None
    return [dims[axis] // n] * n
