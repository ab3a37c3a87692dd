"""Two Reshapes that cancel between linear ops: ``Reshape(-1, w) of Reshape(..., w) of v``.

jax2onnx writes a Flax ``nnx.Linear`` on a rank-3 input as ``Reshape(x, (-1, d)) -> Gemm ->
Reshape(y, Concat(Shape(x)[:2], (w,)))``; two such layers in a row put a ``Reshape`` back to
``(B, T, w)`` and a ``Reshape`` to ``(-1, w)`` between their Gemms. When ``v`` is 2-D with ``w``
features and the first Reshape keeps ``w`` as its last axis, the second gives ``v`` back: rows
stay rows. :func:`cancelling_pair` finds such a pair before a linear op, which then reads ``v``
through it (the pair becomes the op's first nodes, and goes with it).

The ``Shape`` that reads the first Reshape's output (to rebuild the next layer's output shape)
reads only its shape, which is the Reshape's target when that target is made of dims of shapes
and positive constants (never a -1): :func:`reread_shapes` makes those readers read the target
itself when the pair goes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from converter.fusion.core.context import Context
from converter.fusion.core.graph import is_onnx, sole_consumer
from converter.fusion.linear.views import static_dims

__all__ = ["cancelling_pair", "reread_shapes"]


def cancelling_pair(ctx: Context, value: ir.Value) -> tuple[ir.Node, ir.Node] | None:
    """The Reshapes ``(first, second)`` computing ``value`` from a 2-D ``v`` they give back
    unchanged, when nothing but ``Shape`` nodes reads what is between them; or None."""
    second = value.producer()
    if not is_onnx(second, "Reshape") or second.inputs[0] is None:
        return None
    first = second.inputs[0].producer()
    if not is_onnx(first, "Reshape") or first.inputs[0] is None:
        return None
    middle, v = first.outputs[0], first.inputs[0]
    dims_v, dims_mid, dims_out = (static_dims(ctx, x) for x in (v, middle, value))
    if dims_v is None or dims_mid is None or dims_out is None:
        return None
    width = dims_v[-1]
    if len(dims_v) != 2 or len(dims_out) != 2 or width is None:
        return None
    if dims_mid[-1] != width or dims_out[-1] != width:
        return None
    target = ctx.constants.array(second.inputs[1]) if len(second.inputs) > 1 else None
    if not isinstance(target, np.ndarray) or [int(t) for t in target.reshape(-1)][-1] != width:
        return None
    readers = {u.node for u in middle.uses()}
    shapes = {n for n in readers if _shape_of_all(n)}
    if middle.is_graph_output() or readers - shapes != {second}:
        return None
    if any(n.outputs[0].is_graph_output() for n in shapes):
        return None
    if shapes and not _exact_target(ctx, first):
        return None
    if sole_consumer(value) is None:
        return None
    return first, second


def _shape_of_all(node: ir.Node) -> bool:
    """``node`` is a ``Shape`` of the whole shape (no start or end)."""
    attrs = node.attributes
    return is_onnx(node, "Shape") and "start" not in attrs and "end" not in attrs


def _exact_target(ctx: Context, reshape: ir.Node) -> bool:
    """The Reshape's output shape is its target: a Concat of positive constants and of dims read
    from shapes (Shape, then Slice/Gather/Cast/Squeeze/Unsqueeze), so never a -1 to infer."""
    if len(reshape.inputs) < 2 or reshape.inputs[1] is None:
        return False
    target = reshape.inputs[1]
    concat = target.producer()
    parts = list(concat.inputs) if is_onnx(concat, "Concat") else [target]
    return all(_positive_constant(ctx, p) or _dims_of_a_shape(p) for p in parts)


def _positive_constant(ctx: Context, value: ir.Value | None) -> bool:
    array = ctx.constants.array(value)
    return isinstance(array, np.ndarray) and bool(np.all(array > 0))


def _dims_of_a_shape(value: ir.Value | None) -> bool:
    for _ in range(6):
        node = None if value is None else value.producer()
        if is_onnx(node, "Shape"):
            return True
        if not is_onnx(node) or node.op_type not in (
            "Slice",
            "Gather",
            "Cast",
            "Squeeze",
            "Unsqueeze",
        ):
            return False
        value = node.inputs[0]
    return False


def reread_shapes(nodes: list[ir.Node]) -> None:
    """Before ``nodes`` go: each ``Shape`` of a Reshape among them reads that Reshape's target
    instead (:func:`cancelling_pair` proved them equal), and is removed."""
    for node in nodes:
        if not is_onnx(node, "Reshape"):
            continue
        for use in list(node.outputs[0].uses()):
            reader = use.node
            if not _shape_of_all(reader) or reader in nodes:
                continue
            target = node.inputs[1]
            assert target is not None and reader.graph is not None
            ir.convenience.replace_all_uses_with(reader.outputs[0], target)
            reader.graph.remove(reader, safe=True)
