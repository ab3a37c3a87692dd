"""The channel axis of a convolution followed through the views other producers write around it.

tf2onnx writes a Keras ``Conv1D`` as ``Unsqueeze -> Conv -> Squeeze`` with its BatchNormalization
as ``Mul``/``Add`` by ``(1, C, 1)`` constants after the Squeeze, and a ``Rescaling`` or
``Normalization`` before a ``Conv2D`` on the NHWC input, before the ``Transpose`` to NCHW. A
channel affine on the far side of such views is still one per channel of the conv: its
constant must vary only along the axis the channels are at there.

:func:`after` follows a conv's output through ``Transpose``/``Squeeze``/``Unsqueeze`` nodes (each
value read by the next alone), :func:`before` its input back through them; each returns the
views, the value at their far end and where the channels are in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from converter.fusion.core.constants import Constants, axes_of
from converter.fusion.core.graph import is_onnx, sole_consumer

__all__ = ["ChannelAxis", "VIEW_OPS", "after", "before"]

VIEW_OPS = frozenset({"Transpose", "Squeeze", "Unsqueeze"})
_MOST = 4  # views followed on one side


@dataclass(frozen=True)
class ChannelAxis:
    """The channels are axis ``axis`` of a tensor of rank ``rank``."""

    rank: int
    axis: int


def _normalized(axes: list[int] | None, rank: int) -> list[int] | None:
    if axes is None or any(not -rank <= a < rank for a in axes):
        return None
    return sorted(a % rank for a in axes)


def _forward(constants: Constants, node: ir.Node, at: ChannelAxis) -> ChannelAxis | None:
    """Where the channels are in ``node``'s output, given its input's; None if it moves them
    away (squeezes them, or is not a view)."""
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        perm = list(perm) if perm is not None else list(range(at.rank))[::-1]
        return ChannelAxis(at.rank, perm.index(at.axis)) if len(perm) == at.rank else None
    if node.op_type == "Squeeze":
        axes = _normalized(axes_of(constants, node), at.rank)
        if axes is None or at.axis in axes:
            return None
        return ChannelAxis(at.rank - len(axes), at.axis - sum(a < at.axis for a in axes))
    if node.op_type == "Unsqueeze":
        given = axes_of(constants, node)
        axes = None if given is None else _normalized(given, at.rank + len(given))
        if axes is None:
            return None
        axis = at.axis
        for a in axes:  # inserted in increasing order of output position
            if a <= axis:
                axis += 1
        return ChannelAxis(at.rank + len(axes), axis)
    return None


def _backward(constants: Constants, node: ir.Node, at: ChannelAxis) -> ChannelAxis | None:
    """Where the channels are in ``node``'s input, given its output's; None if they came from
    nowhere there (an inserted axis) or the node is not a view."""
    rank = _input_rank(constants, node, at.rank)
    for axis in range(rank or 0):
        if _forward(constants, node, ChannelAxis(rank, axis)) == at:
            return ChannelAxis(rank, axis)
    return None


def _rank_change(constants: Constants, node: ir.Node) -> int:
    axes = axes_of(constants, node) or []
    return {"Squeeze": -len(axes), "Unsqueeze": len(axes)}.get(node.op_type, 0)


def _input_rank(constants: Constants, node: ir.Node, out_rank: int) -> int | None:
    if node.op_type == "Squeeze" and axes_of(constants, node) is None:
        return None
    return out_rank - _rank_change(constants, node)


def after(
    constants: Constants, value: ir.Value, at: ChannelAxis
) -> tuple[list[ir.Node], ir.Value, ChannelAxis]:
    """The views ``value`` goes through (each read alone by the next), the last view's output
    and where the channels are in it."""
    views: list[ir.Node] = []
    while len(views) < _MOST:
        node = sole_consumer(value)
        if node is None or not is_onnx(node) or node.op_type not in VIEW_OPS:
            break
        moved = _forward(constants, node, at)
        if moved is None:
            break
        views.append(node)
        value, at = node.outputs[0], moved
    return views, value, at


def before(
    constants: Constants, value: ir.Value, at: ChannelAxis
) -> tuple[list[ir.Node], ir.Value, ChannelAxis]:
    """The views ``value`` was computed by (each output read by the next alone), the first
    view's input and where the channels are in it."""
    views: list[ir.Node] = []
    while len(views) < _MOST:
        node = value.producer()
        if node is None or not is_onnx(node) or node.op_type not in VIEW_OPS:
            break
        if views and sole_consumer(value) is not views[0]:
            break
        if not node.inputs or node.inputs[0] is None:
            break
        moved = _backward(constants, node, at)
        if moved is None:
            break
        views.insert(0, node)
        value, at = node.inputs[0], moved
    return views, value, at
