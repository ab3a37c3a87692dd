"""How each op type maps an affine value: a table, one entry per op (:data:`OPS`).

Every entry takes a node of its op type and answers with the :class:`LinearOp` it computes (its
map ``y = x @ W + b`` built on demand), a :class:`~converter.fusion.core.declined.Declined` with
the reason it cannot join a merge, or None when it is not a linear op at all (a product of two
activations). The matrix ops are here; the elementwise steps, their own table, in
:mod:`converter.fusion.linear.steps` (:data:`~converter.fusion.linear.steps.STEPS`)::

    Gemm(A, B, C)     W = alpha * op(B),  b = beta * C          (any transA/transB/alpha/beta)
    MatMul(x, W)      W, a constant 2-D right operand; + Add(., b) of a last-axis bias
    MatMul(W, x)      along x's second-to-last axis: weight W.T, bias a column (out, 1)
    Einsum(x, W)      "...i,ij->...j" (W as is) or "...i,ji->...j" (W.T, torch's layout)
    ai.onnx.ml LinearRegressor, LinearClassifier    W = C.T, b = intercepts
                      (:mod:`converter.fusion.linear.ml`: written back as themselves)

What is constant is the run's :class:`~converter.fusion.core.constants.Constants` answer. A weight
that other nodes also read stays where it is for them; the merge then cannot free it, so a
*large* shared weight (bigger than the op's output width: a weight matrix, say a tied embedding)
is refused, since merging would keep the old copy alive beside the new one. A small shared
constant (a bias, a scale, a BatchNorm statistic, which exporters deduplicate into one
initializer) is simply read: the merge writes its own copy of what it needs.

Adding an op type is adding an entry (and its test, ``tests/fusion/linear/test_ops.py``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.dtypes import FLOAT_TYPES, dtype_name
from converter.fusion.core.graph import is_onnx, op_key
from converter.fusion.linear import algebra
from converter.fusion.linear.linear_op import (
    UNIFORM_ELEMENTS,
    LinearOp,
    ProducerOf,
    Recognise,
    broadcasts_along_last_axis,
    declined,
    last_axis_vector,
    unmapping,
)
from converter.fusion.linear.ml import ML_OPS

__all__ = ["OPS", "recognize"]


def recognize(
    ctx: Context, node: ir.Node, producer_of: ProducerOf = lambda _: None
) -> LinearOp | Declined | None:
    """``node`` as a matrix op of :data:`OPS`: a :class:`LinearOp`, why not, or None (not a
    Gemm/MatMul/Einsum/ONNX-ML linear op at all, so simply not part of any chain)."""
    entry = OPS.get(op_key(node))
    return None if entry is None else entry(ctx, node, producer_of)


def _gemm(ctx: Context, node: ir.Node, producer_of: ProducerOf) -> LinearOp | Declined:
    """``Gemm(A, B, C)``: ``W = alpha * op(B)``, ``b = beta * C`` (``transA`` only says how the
    rows are laid out: such an op can only start a chain)."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return declined(node, "Gemm is missing an input")
    b = ctx.constants.resolve(node.inputs[1])
    if isinstance(b, Declined):
        return declined(node, b.reason)
    if len(b.shape) != 2:
        return declined(node, f"Gemm weight has rank {len(b.shape)}, expected 2")
    attrs = node.attributes
    trans_b = attrs.get_int("transB", 0)
    in_features, out_features = b.shape[::-1] if trans_b else b.shape
    found = _gemm_constants(ctx, node, out_features)
    if isinstance(found, Declined):
        return declined(node, found.reason)
    b, c = found
    dtype = _float_dtype(node, 1, b)
    if isinstance(dtype, Declined):
        return dtype
    reason = _gemm_bias_reason(c, out_features)
    if reason:
        return declined(node, reason)
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    constants = tuple(x for x in (b, c) if x is not None)

    def make() -> algebra.AffineMap:
        c_array = None if c is None else c.array()
        return algebra.gemm_affine(b.array(), c_array, trans_b=trans_b, alpha=alpha, beta=beta)

    return LinearOp(
        (node,),
        0,
        int(in_features),
        int(out_features),
        dtype,
        constants,
        unmapping(make, constants),
        trans_a=attrs.get_int("transA", 0),
        has_bias=c is not None,
        per_row_bias=c is not None and len(c.shape) == 2 and c.shape[0] > 1,
    )


def _gemm_constants(
    ctx: Context, node: ir.Node, out_features: int
) -> tuple[Constant, Constant | None] | Declined:
    """Gemm's ``B`` and ``C`` (None when absent), each usable by a merge of it; or why not."""
    found: list[Constant | None] = []
    for i in (1, 2):
        value = node.inputs[i] if i < len(node.inputs) else None
        constant = (
            None
            if value is None
            else ctx.constants.usable(value, (node,), out_features, shared=i == 1)
        )
        if isinstance(constant, Declined):
            return constant
        found.append(constant)
    b, c = found
    assert b is not None
    return b, c


def _gemm_bias_reason(c: Constant | None, out_features: int) -> str | None:
    """Why Gemm's ``C`` cannot be normalised to ``(N,)`` or ``(M, N)``, or None if it can."""
    if c is None or len(c.shape) == 0:
        return None
    if len(c.shape) > 2 or c.shape[-1] not in (1, out_features):
        return f"Gemm bias C of shape {list(c.shape)} does not broadcast to (M, {out_features})"
    return None


def _float_dtype(node: ir.Node, index: int, weight: Constant) -> ir.DataType | Declined:
    """The weight's float dtype (the model's record of it, else the constant's), or why not."""
    dtype = node.inputs[index].dtype or weight.dtype
    if dtype in FLOAT_TYPES:
        return dtype
    return declined(node, f"weight dtype {dtype_name(weight.dtype)} is not a float type")


def _usable_weight(
    ctx: Context, node: ir.Node, index: int, weight: Constant, small: int
) -> ir.DataType | Declined:
    """The float dtype of ``node``'s weight at ``index``, when it is usable; or why not."""
    found = ctx.constants.usable(node.inputs[index], (node,), small, shared=True)
    if isinstance(found, Declined):
        return declined(node, found.reason)
    return _float_dtype(node, index, weight)


def _matmul(ctx: Context, node: ir.Node, producer_of: ProducerOf) -> LinearOp | Declined:
    """``MatMul(x, W)`` (+ ``Add`` of a last-axis bias), or a left MatMul ``MatMul(W, x)``."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return declined(node, "MatMul is missing an input")
    w = ctx.constants.resolve(node.inputs[1])
    if isinstance(w, Declined):
        if ctx.constants.is_constant(node.inputs[0]):
            return _left_matmul(ctx, node)
        return declined(node, w.reason)
    if len(w.shape) != 2:
        return declined(node, f"MatMul weight has rank {len(w.shape)}, expected 2")
    dtype = _usable_weight(ctx, node, 1, w, w.shape[1])
    if isinstance(dtype, Declined):
        return dtype
    nodes: tuple[ir.Node, ...] = (node,)
    constants: tuple[Constant, ...] = (w,)
    bias = None
    found_bias = _bias_add(ctx, node, w.shape[1])
    if found_bias is not None:
        add, bias = found_bias
        nodes, constants = (node, add), (w, bias)

    def make() -> algebra.AffineMap:
        return algebra.matmul_affine(w.array(), None if bias is None else bias.array())

    return LinearOp(
        nodes,
        0,
        int(w.shape[0]),
        int(w.shape[1]),
        dtype,
        constants,
        unmapping(make, constants),
        has_bias=bias is not None,
    )


def _bias_add(
    ctx: Context, matmul: ir.Node, out_features: int, data_index: int = 0
) -> tuple[ir.Node, Constant] | None:
    """The ``Add`` after ``matmul`` that adds a constant last-axis bias, with the bias, if any."""
    out = matmul.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = next(iter(uses)).node
    if not is_onnx(add, "Add") or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is None or other is out:
        return None
    bias = ctx.constants.usable(other, (add,), max(out_features, UNIFORM_ELEMENTS))
    if isinstance(bias, Declined):
        return None
    # MatMul(x, W) with a 2-D W has x's rank, so x stands for the Add's data, unless the
    # bias is read by its values (a zeros_like shaped as the output: then the output is).
    if broadcasts_along_last_axis(ctx, bias.shape, matmul.inputs[data_index], out_features):
        return add, bias
    vector = last_axis_vector(ctx, bias, out, out_features)
    return None if vector is None else (add, vector)


def _left_matmul(ctx: Context, node: ir.Node) -> LinearOp | Declined:
    """``MatMul(W, x)``: a map along x's second-to-last axis (token mixing), ``y.T = x.T @ W.T``.

    Normalised like any op on the transposed view: ``weight = W.T`` (``(in, out)``), and a bias
    ``Add`` of a constant ``(out, 1)`` (or ``(1, ..., out, 1)``) that varies along that axis only.
    """
    w = ctx.constants.resolve(node.inputs[0])
    assert isinstance(w, Constant)
    x = node.inputs[1]
    assert x is not None
    rank = ctx.shapes.rank(x)
    if len(w.shape) != 2:
        return declined(node, f"left MatMul weight has rank {len(w.shape)}, expected 2")
    if rank is None or rank < 2:
        return declined(node, "the constant is the left operand and the data's rank is not known")
    dtype = _usable_weight(ctx, node, 0, w, w.shape[0])
    if isinstance(dtype, Declined):
        return dtype
    bias = _column_bias_add(ctx, node, int(w.shape[0]), rank)
    nodes, constants = ((node,), (w,)) if bias is None else ((node, bias[0]), (w, bias[1]))
    column = None if bias is None else bias[1]

    def make() -> algebra.AffineMap:
        b = None if column is None else np.asarray(column.array()).reshape(-1)
        return algebra.matmul_affine(np.asarray(w.array()).T, b)

    op = LinearOp(
        nodes,
        1,
        int(w.shape[1]),
        int(w.shape[0]),
        dtype,
        constants,
        unmapping(make, constants),
        has_bias=bias is not None,
    )
    op.axis = -2
    return op


def _column_bias_add(
    ctx: Context, node: ir.Node, out: int, rank: int
) -> tuple[ir.Node, Constant] | None:
    """The ``Add`` of a constant ``(out, 1)`` after a left MatMul, with the constant, if any."""
    value = node.outputs[0]
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    add = next(iter(uses)).node
    if not is_onnx(add, "Add") or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    bias = ctx.constants.usable(other, (add,), out)
    if isinstance(bias, Declined) or len(bias.shape) < 2 or len(bias.shape) > rank:
        return None
    if bias.shape[-1] != 1 or bias.shape[-2] != out or any(d != 1 for d in bias.shape[:-2]):
        return None
    return add, bias


def _einsum(ctx: Context, node: ir.Node, producer_of: ProducerOf) -> LinearOp | Declined | None:
    """``Einsum`` of the data and a constant matrix that is a plain ``x @ W`` on the last axis:
    ``"...i,ij->...j"`` (``W`` as is) or ``"...i,ji->...j"`` (``W.T``, torch's layout), the
    operands in either order and the leading indices kept in order. Anything else is not
    recognised, with the reason when an operand is a constant."""
    if len(node.inputs) != 2 or None in node.inputs or len(node.outputs) != 1:
        return None
    consts = [ctx.constants.is_constant(v) for v in node.inputs]
    if consts.count(True) != 1:
        return None
    w_at = consts.index(True)
    transposed = _einsum_layout(node, w_at)
    if isinstance(transposed, Declined):
        return transposed
    w = ctx.constants.resolve(node.inputs[w_at])
    assert isinstance(w, Constant)
    in_features, out_features = (w.shape[1], w.shape[0]) if transposed else w.shape
    dtype = _usable_weight(ctx, node, w_at, w, out_features)
    if isinstance(dtype, Declined):
        return dtype
    bias = _bias_add(ctx, node, int(out_features), 1 - w_at)
    nodes, constants = ((node,), (w,)) if bias is None else ((node, bias[0]), (w, bias[1]))
    b = None if bias is None else bias[1]

    def make() -> algebra.AffineMap:
        weight = np.asarray(w.array())
        return algebra.matmul_affine(
            weight.T if transposed else weight, None if b is None else b.array()
        )

    return LinearOp(
        nodes,
        1 - w_at,
        int(in_features),
        int(out_features),
        dtype,
        constants,
        unmapping(make, constants),
        has_bias=b is not None,
    )


def _einsum_layout(node: ir.Node, w_at: int) -> bool | Declined:
    """Whether the equation reads the weight (operand ``w_at``) transposed (``"...i,ji"``,
    torch's ``(out, in)``), or why it is not a product ``x @ W`` on the last axis."""
    equation = (node.attributes.get_string("equation", "") or "").replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if not arrow or len(terms) != 2:
        return declined(node, f"Einsum '{equation}' has no explicit output: not read as x @ W")
    x_sub, w_sub = terms[1 - w_at], terms[w_at]
    contracted = x_sub[-1:] if x_sub else ""
    kept = w_sub.replace(contracted, "", 1) if len(w_sub) == 2 else ""
    plain = (
        len(w_sub) == 2
        and contracted in w_sub
        and len(kept) == 1
        and kept not in x_sub
        and out == x_sub[:-1] + kept
    )
    if not plain:
        return declined(node, f"Einsum '{equation}' is not a product x @ W on the last axis")
    return w_sub[1] == contracted  # "oi": torch's (out, in) layout


#: The matrix ops: how each maps an affine value.
OPS: dict[str, Recognise] = {"Gemm": _gemm, "MatMul": _matmul, "Einsum": _einsum, **ML_OPS}
