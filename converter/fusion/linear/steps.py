"""Elementwise affine steps that can join a chain: scales, shifts, BatchNormalization, no-ops.

Each step acts on the last axis with a constant ``c`` that broadcasts along it (a scalar, ``(d,)``
or ``(1, ..., 1, d)``, never raising the rank), so it is an affine map with a diagonal weight::

    Mul(x, c)  ->  W = diag(c)            Add(x, c)  ->  W = I,        b = c
    Sub(x, c)  ->  W = I,  b = -c         Sub(c, x)  ->  W = -I,       b = c
    Div(x, c)  ->  W = diag(1 / c)        (c nonzero)
    Neg(x)     ->  W = -I                 Identity(x), Dropout(x) in inference  ->  W = I
    Cast(x) to the type x already has  ->  W = I

    BatchNormalization(x, scale, B, mean, var) on a 2-D input (channels are the last axis):
        s = scale / sqrt(var + epsilon),  W = diag(s),  b = B - mean * s

A step alone is never rewritten (as a matrix it would cost ``d*d`` multiply-adds instead of
``d``); it is merged only into a segment that holds a Gemm or MatMul, which it never makes more
expensive. A step that looks affine but cannot be used says why (a :class:`~converter.fusion.core.declined.Declined`), and the
reason is reported when it sits next to a linear op.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from converter.fusion.conv.algebra import bn_affine
from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.runtime_patterns import kept_for_runtime
from converter.fusion.linear import algebra
from converter.fusion.linear.ops import (
    FLOAT_TYPES,
    LinearOp,
    broadcasts_along_last_axis,
    declined,
    is_onnx,
)

__all__ = ["STEP_OPS", "recognize_step"]

BINARY_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
STEP_OPS = BINARY_OPS | {"BatchNormalization", "Neg", "Identity", "Dropout", "Cast"}

# The op already recognised that produced a value (its width and dtype stand in for shapes and
# types a model does not record, as in subgraphs).
ProducerOf = Callable[[ir.Value], "LinearOp | None"]


def _static_last_dim(ctx: Context, value: ir.Value) -> int | None:
    if value.shape is None:
        ctx.shapes.request()  # the model records none: infer shapes (once per run)
    shape = value.shape
    if shape is None or len(shape) == 0:
        return None
    last = shape[-1]
    return last if isinstance(last, int) and last > 0 else None


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
    if not is_onnx(node) or node.op_type not in STEP_OPS or not node.outputs:
        return None
    if node.op_type == "BatchNormalization":
        return _batch_norm(ctx, node)
    if node.op_type in ("Neg", "Identity", "Dropout", "Cast"):
        return _unary(ctx, node, producer_of)
    if len(node.inputs) != 2 or None in node.inputs or len(node.outputs) != 1:
        return None
    left, right = node.inputs
    right_const = ctx.constants.is_constant(right)
    left_const = ctx.constants.is_constant(left)
    if right_const == left_const:
        return None  # not exactly one constant operand (both constant is constant folding)
    data_index = 0 if right_const else 1
    data, const = (left, right) if data_index == 0 else (right, left)
    if node.op_type == "Div" and data_index == 1:
        return None  # c / x is not affine
    kept = kept_for_runtime(ctx, node)
    if kept:
        return declined(node, kept)
    # The data's own width, never the constant's: x[N, 1] * c[d] broadcasts x up to d columns.
    width = _width(ctx, data, producer_of)
    if width is None:
        return None
    c = ctx.constants.usable(const, (node,), width)
    if isinstance(c, Declined):
        return declined(node, c.reason)
    dtype = _dtype(data, producer_of) or c.dtype
    if dtype not in FLOAT_TYPES:
        return None
    if not broadcasts_along_last_axis(ctx, c.shape, data, width):
        return declined(
            node,
            f"{node.op_type} by a constant of shape {list(c.shape)} varies along another axis "
            f"than the features (width {width})",
        )
    if node.op_type == "Div" and not np.all(c.array() != 0):
        return declined(node, "Div by a constant that holds a zero")
    make = _elementwise_maker(node.op_type, data_index, c, width)
    return _step(node, data_index, width, dtype, (c,), make, bias=node.op_type in ("Add", "Sub"))


def _elementwise_maker(
    op_type: str, data_index: int, const: Constant, width: int
) -> Callable[[], algebra.AffineMap]:
    """The map of ``op_type`` with the constant on the other side of the data."""
    c = const.array
    if op_type == "Mul":
        return lambda: algebra.scale_affine(c(), width)
    if op_type == "Div":
        return lambda: algebra.scale_affine(1.0 / c().astype(np.float64), width)
    if op_type == "Add":
        return lambda: algebra.shift_affine(c(), width)
    if data_index == 0:  # Sub(x, c)
        return lambda: algebra.shift_affine(-c().astype(np.float64), width)

    def negate_then_shift() -> algebra.AffineMap:  # Sub(c, x)
        return algebra.compose(
            algebra.scale_affine(np.float64(-1.0), width), algebra.shift_affine(c(), width)
        )

    return negate_then_shift


def _width(ctx: Context, data: ir.Value, producer_of: ProducerOf) -> int | None:
    op = producer_of(data)
    return _static_last_dim(ctx, data) or (op.out_features if op is not None else None)


def _dtype(data: ir.Value, producer_of: ProducerOf) -> ir.DataType | None:
    op = producer_of(data)
    return data.dtype or (op.dtype if op is not None else None)


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
    if node.op_type == "Cast" and not _same_type_cast(ctx, node, _dtype(data, producer_of)):
        return None
    width, dtype = _width(ctx, data, producer_of), _dtype(data, producer_of)
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


def _batch_norm(ctx: Context, node: ir.Node) -> LinearOp | Declined | None:
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
    params: list[Constant] = []
    for value in node.inputs[1:]:
        found = ctx.constants.usable(value, (node,), 1 << 62)  # all per-channel: small
        if isinstance(found, Declined):
            return declined(node, found.reason)
        params.append(found)
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
