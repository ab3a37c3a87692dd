"""Elementwise affine steps that can join a chain: scale, shift and BatchNormalization.

Each step acts on the last axis with a constant ``c`` that broadcasts along it (a scalar, ``(d,)``
or ``(1, ..., 1, d)``, never raising the rank), so it is an affine map with a diagonal weight::

    Mul(x, c)  ->  W = diag(c)            Add(x, c)  ->  W = I,        b = c
    Sub(x, c)  ->  W = I,  b = -c         Sub(c, x)  ->  W = -I,       b = c
    Div(x, c)  ->  W = diag(1 / c)        (c nonzero)

    BatchNormalization(x, scale, B, mean, var) on a 2-D input (channels are the last axis):
        s = scale / sqrt(var + epsilon),  W = diag(s),  b = B - mean * s

A step alone is never rewritten (as a matrix it would cost ``d*d`` multiply-adds instead of
``d``); it is merged only into a segment that holds a Gemm or MatMul, which it never makes more
expensive.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from converter.fusion import algebra
from converter.fusion.recognize import (
    FLOAT_TYPES,
    LinearOp,
    broadcasts_along_last_axis,
    constant_tensor,
    is_onnx,
    shared_with_others,
)

__all__ = ["STEP_OPS", "recognize_step"]

STEP_OPS = frozenset({"Mul", "Add", "Sub", "Div", "BatchNormalization"})

WidthOf = Callable[[ir.Value], "int | None"]


def _static_last_dim(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) == 0:
        return None
    last = shape[-1]
    return last if isinstance(last, int) and last > 0 else None


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def recognize_step(node: ir.Node, width_of: WidthOf) -> LinearOp | None:
    """The step ``node`` computes as a :class:`LinearOp` (``elementwise=True``), or None.

    ``width_of`` gives the width of a value produced by an op already recognised, for steps whose
    input shape is unknown.
    """
    if not is_onnx(node) or len(node.outputs) != 1:
        return None
    if node.op_type == "BatchNormalization":
        return _batch_norm(node)
    if node.op_type not in STEP_OPS or len(node.inputs) != 2 or None in node.inputs:
        return None
    left, right = node.inputs
    data_index = 0 if constant_tensor(right)[1] is None else 1
    data, const = (left, right) if data_index == 0 else (right, left)
    c, reason = constant_tensor(const)
    if reason or c is None or constant_tensor(data)[1] is None or shared_with_others(const, node):
        return None  # not exactly one constant operand (both constant is constant folding)
    if node.op_type == "Div" and data_index == 1:
        return None  # c / x is not affine
    # The data's own width, never the constant's: x[N, 1] * c[d] broadcasts x up to d columns.
    width = _static_last_dim(data) or width_of(data)
    dtype = data.dtype or ir.DataType.from_numpy(c.dtype)
    if width is None or dtype not in FLOAT_TYPES or not broadcasts_along_last_axis(c, data, width):
        return None
    if node.op_type == "Div" and not np.all(c != 0):
        return None
    make = _elementwise_maker(node.op_type, data_index, c, width)
    return LinearOp(
        (node,), data, node.outputs[0], width, width, dtype, (const,), make, elementwise=True
    )


def _elementwise_maker(
    op_type: str, data_index: int, c: np.ndarray, width: int
) -> Callable[[], algebra.AffineMap]:
    """The map of ``op_type`` with the constant ``c`` on the other side of the data."""
    if op_type == "Mul":
        return lambda: algebra.scale_affine(c, width)
    if op_type == "Div":
        return lambda: algebra.scale_affine(1.0 / c.astype(np.float64), width)
    if op_type == "Add":
        return lambda: algebra.shift_affine(c, width)
    if data_index == 0:  # Sub(x, c)
        return lambda: algebra.shift_affine(-c.astype(np.float64), width)

    def negate_then_shift() -> algebra.AffineMap:  # Sub(c, x)
        return algebra.compose(
            algebra.scale_affine(np.float64(-1.0), width), algebra.shift_affine(c, width)
        )

    return negate_then_shift


def _batch_norm(node: ir.Node) -> LinearOp | None:
    """BatchNormalization in inference mode on a 2-D ``(N, C)`` input."""
    if len(node.inputs) != 5 or node.attributes.get_int("training_mode", 0) != 0:
        return None
    if node.attributes.get_int("spatial", 1) != 1:
        return None
    data = node.inputs[0]
    producer = data.producer() if data is not None else None
    if data is None or (_rank(data) != 2 and (producer is None or producer.op_type != "Gemm")):
        return None  # channels are axis 1: the last axis only for a 2-D input
    arrays = []
    for value in node.inputs[1:]:
        array, reason = constant_tensor(value)
        if reason or array is None or array.ndim != 1 or shared_with_others(value, node):
            return None
        arrays.append(array)
    # X and scale share a type unless the model says otherwise (opset 15 lets them differ).
    dtype = data.dtype or node.inputs[1].dtype or ir.DataType.from_numpy(arrays[0].dtype)
    scale, bias, mean, var = (a.astype(np.float64) for a in arrays)
    width = scale.size
    if dtype not in FLOAT_TYPES or any(a.size != width for a in arrays):
        return None
    epsilon = node.attributes.get_float("epsilon", 1e-5)

    def make() -> algebra.AffineMap:
        s = scale / np.sqrt(var + epsilon)
        return algebra.AffineMap(np.diag(s), bias - mean * s)

    weights = tuple(v for v in node.inputs[1:] if v is not None)
    return LinearOp(
        (node,), data, node.outputs[0], width, width, dtype, weights, make, elementwise=True
    )
