"""Elementwise affine steps that can join a chain: a table, one entry per op (:data:`STEPS`).

Each step acts on the last axis with a constant ``c`` that broadcasts along it (a scalar, ``(d,)``
or ``(1, ..., 1, d)``, never raising the rank), so it is an affine map with a diagonal weight::

    Mul(x, c)  ->  W = diag(c)            Add(x, c)  ->  W = I,        b = c
    Sub(x, c)  ->  W = I,  b = -c         Sub(c, x)  ->  W = -I,       b = c
    Div(x, c)  ->  W = diag(1 / c)        (c nonzero)
    Neg(x)     ->  W = -I                 Identity(x), Dropout(x) in inference  ->  W = I
    Cast(x) to the type x already has  ->  W = I
    ai.onnx.ml Scaler(x; offset, scale)  ->  W = diag(scale),  b = -offset * scale

    BatchNormalization(x, scale, B, mean, var) on a 2-D input (channels are the last axis):
        s = scale / sqrt(var + epsilon),  W = diag(s),  b = B - mean * s

A step alone is never rewritten (as a matrix it would cost ``d*d`` multiply-adds instead of
``d``); it is merged only into a segment that holds a Gemm or MatMul, which it never makes more
expensive. A step that looks affine but cannot be used says why (a
:class:`~converter.fusion.core.declined.Declined`), and the reason is reported when it sits next
to a linear op. Which node is a constant step, and what it is as a map, is
:mod:`converter.fusion.core.steps`' answer; this module says when it acts on the last axis.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.dtypes import FLOAT_TYPES
from converter.fusion.core.graph import op_key
from converter.fusion.core.steps import (
    BINARY_STEPS,
    ConstantStep,
    batch_norm_params,
    bn_affine,
    constant_step,
)
from converter.fusion.linear import algebra
from converter.fusion.linear.linear_op import (
    UNIFORM_ELEMENTS,
    LinearOp,
    ProducerOf,
    Recognise,
    data_dtype,
    data_width,
    declined,
    last_axis_vector,
)
from converter.fusion.linear.ml import ML_STEPS

__all__ = ["STEPS", "STEP_OPS", "recognize_step"]


def _step(
    node: ir.Node, index: int, width: int, dtype: ir.DataType, consts, make, *, bias=False
) -> LinearOp:
    return LinearOp(
        (node,), index, width, width, dtype, tuple(consts), make, elementwise=True, has_bias=bias
    )


def recognize_step(
    ctx: Context, node: ir.Node, producer_of: ProducerOf
) -> LinearOp | Declined | None:
    """The step ``node`` computes as a :class:`LinearOp` (``elementwise=True``), a
    :class:`Declined` when it is a constant step that cannot join a chain, or None.

    ``producer_of`` gives the op already recognised that produced a value, whose width and dtype
    stand in for a shape and type the model does not record.
    """
    entry = STEPS.get(op_key(node)) if node.outputs else None
    return None if entry is None else entry(ctx, node, producer_of)


def _binary(ctx: Context, node: ir.Node, producer_of: ProducerOf) -> LinearOp | Declined | None:
    """``Mul``/``Div``/``Add``/``Sub`` by a constant along the last axis (``W = diag(s)``,
    ``b = t``): the constant a scalar or ``(1, ..., 1, d)``, never raising the data's rank."""
    step = constant_step(ctx, node)
    if isinstance(step, Declined):
        return declined(node, step.reason)
    if step is None or not step.is_affine:
        return None
    data = step.data
    # The data's own width, never the constant's: x[N, 1] * c[d] broadcasts x up to d columns.
    width = data_width(ctx, data, producer_of)
    if width is None:
        return None
    c = step.constant(ctx, max(width, UNIFORM_ELEMENTS))  # a copy of a row is small
    if isinstance(c, Declined):
        return declined(node, c.reason)
    dtype = data_dtype(data, producer_of) or c.dtype
    if dtype not in FLOAT_TYPES:
        return None
    vector = last_axis_vector(ctx, c, data, width)
    if vector is None:
        return declined(
            node,
            f"{node.op_type} by a constant of shape {list(c.shape)} varies along another axis "
            f"than the features (width {width})",
        )
    c = vector
    if node.op_type == "Div" and not np.all(c.array() != 0):
        return declined(node, "Div by a constant that holds a zero")
    make = _elementwise_maker(step, c, width)
    return _step(node, step.data_index, width, dtype, (c,), make, bias=step.has_shift)


def _elementwise_maker(
    step: ConstantStep, const: Constant, width: int
) -> Callable[[], algebra.AffineMap]:
    """The step as a map on the last axis: ``W = diag(s)``, ``b = t``."""

    def make() -> algebra.AffineMap:
        c = np.broadcast_to(np.asarray(const.array(), dtype=np.float64).reshape(-1), (width,))
        s, t = step.scale_shift(c)
        weight = np.diag(np.ones(width) if s is None else s)
        return algebra.AffineMap(weight, None if t is None else t.copy())

    return make


def _unary(ctx: Context, node: ir.Node, producer_of: ProducerOf) -> LinearOp | Declined | None:
    """``Neg`` (``W = -I``), ``Identity`` and inference ``Dropout`` (``W = I``)."""
    data = node.inputs[0] if node.inputs else None
    if data is None or ctx.constants.is_constant(data):
        return None
    if node.op_type == "Dropout":
        reason = _dropout_reason(ctx, node)
        if reason:
            return declined(node, reason)
    elif len(node.outputs) != 1:
        return None
    if node.op_type == "Cast" and not _same_type_cast(ctx, node, data_dtype(data, producer_of)):
        return None
    width, dtype = data_width(ctx, data, producer_of), data_dtype(data, producer_of)
    if width is None or dtype not in FLOAT_TYPES:
        return None
    sign = -1.0 if node.op_type == "Neg" else 1.0
    return _step(node, 0, width, dtype, (), lambda: algebra.scale_affine(sign, width))


def _same_type_cast(ctx: Context, node: ir.Node, dtype: ir.DataType | None) -> bool:
    """A ``Cast`` to the type its input already has (exporters write ``result.to(dtype)``)."""
    if dtype is None and ctx.shapes.request():
        dtype = node.inputs[0].dtype
    to = node.attributes.get_int("to", None)
    return dtype is not None and to is not None and ir.DataType(to) == dtype


def _dropout_reason(ctx: Context, node: ir.Node) -> str | None:
    """Why ``Dropout`` is not the identity here, or None when it is (inference mode)."""
    if len(node.outputs) > 1 and node.outputs[1].uses():
        return "Dropout's mask output is used"
    if len(node.inputs) >= 3 and node.inputs[2] is not None:
        mode = ctx.constants.resolve(node.inputs[2])
        if isinstance(mode, Declined) or bool(np.asarray(mode.array()).reshape(-1)[0]):
            return "Dropout runs in training mode (export after model.eval())"
    return None


def _batch_norm(ctx: Context, node: ir.Node, producer_of: ProducerOf) -> LinearOp | Declined | None:
    """BatchNormalization in inference mode on a 2-D ``(N, C)`` input."""
    if len(node.inputs) != 5 or None in node.inputs:
        return None
    if node.attributes.get_int("training_mode", 0) != 0 or len(node.outputs) != 1:
        return declined(node, "BatchNormalization runs in training mode")
    if node.attributes.get_int("spatial", 1) != 1:
        return declined(node, "BatchNormalization with spatial=0 is not supported")
    data = node.inputs[0]
    rank = ctx.shapes.rank(data)
    if rank != 2:
        where = "of unknown rank" if rank is None else f"of rank {rank}"
        return declined(
            node, f"BatchNormalization on an input {where}: channels (axis 1) are not its last axis"
        )
    params = batch_norm_params(ctx, node)
    if isinstance(params, Declined):
        return declined(node, params.reason)
    width = params[0].size
    if any(len(p.shape) != 1 or p.size != width for p in params):
        return declined(node, "BatchNormalization parameters are not vectors of one width")
    # X and scale share a type unless the model says otherwise (opset 15 lets them differ).
    dtype = data.dtype or node.inputs[1].dtype or params[0].dtype
    if dtype not in FLOAT_TYPES:
        return None
    epsilon = node.attributes.get_float("epsilon", 1e-5)

    def make() -> algebra.AffineMap:
        s, t = bn_affine(*(p.array() for p in params), epsilon)
        return algebra.AffineMap(np.diag(s), t)

    return _step(node, 0, width, dtype, params, make, bias=True)


#: The elementwise steps: how each maps an affine value along the last axis.
STEPS: dict[str, Recognise] = {
    **dict.fromkeys(BINARY_STEPS, _binary),
    "BatchNormalization": _batch_norm,
    **dict.fromkeys(("Neg", "Identity", "Dropout", "Cast"), _unary),
    **ML_STEPS,
}
STEP_OPS = frozenset(STEPS)
