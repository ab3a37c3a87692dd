"""The ONNX-ML linear operators (``ai.onnx.ml``): entries of the step and op tables.

scikit-learn pipelines exported by skl2onnx write their affine parts as ONNX-ML ops whose weights
are attributes (so always constant), each on an ``[N, F]`` float input::

    Scaler(x; offset, scale)      y = (x - offset) * scale         W = diag(scale),  b = -offset * scale
    LinearRegressor(x; coefficients, intercepts, targets)
                                  y = x @ C.T + intercepts         W = C.T,  b = intercepts
    LinearClassifier(x; coefficients, intercepts, classlabels_*, multi_class, post_transform)
                                  scores = x @ C.T + intercepts    W = C.T,  b = intercepts

with ``C`` the ``coefficients`` row-major as ``(targets, F)`` (``(classes, F)``, where onnxruntime
counts the classes by the intercepts; a binary classifier may hold one row or two, either is a
map to that many scores). The Scaler is a diagonal step (:data:`ML_STEPS`, in
:data:`~converter.fusion.linear.steps.STEPS`); the regressor and the linear part of the
classifier are matrix ops (:data:`ML_OPS`, in :data:`~converter.fusion.linear.ops.OPS`).

Whatever is affine before them composes into their map. A merge ending in one writes it back as
that op (:class:`~converter.fusion.linear.linear_op.OwnForm`): the merged ``W.T`` as its
``coefficients``, ``b`` as its ``intercepts``, every other attribute and every output kept, since
its post-transform and labels are computed from the scores as before. A regressor without a
post-transform on a 2-D input is only a map to ``[N, targets]`` floats, so a Gemm may stand for it
and ops after it may join. Nothing after a post-transform or a classifier joins it.

The ops read float, double or integer inputs and always write float, so only a float input makes
a same-type map; onnxruntime scales axis 1 of a 2-D input (a 1-D input is one row), so a Scaler
on another rank is not a map of the last axis. A ``Normalizer`` divides each row by its norm: not
affine. Each says so (a :class:`~converter.fusion.core.declined.Declined`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.dtypes import dtype_name, round_to_dtype
from converter.fusion.linear import algebra
from converter.fusion.linear.linear_op import (
    LinearOp,
    OwnForm,
    ProducerOf,
    Recognise,
    data_dtype,
    data_width,
    declined,
)

__all__ = ["ML_DOMAIN", "ML_OPS", "ML_STEPS", "attribute_floats"]

ML_DOMAIN = "ai.onnx.ml"
_WEIGHTS = ("coefficients", "intercepts")
_ML_FLOAT = frozenset({"Scaler", "Normalizer", "LinearRegressor"})
# Standard ops whose output has their first input's type (a step, a product, an activation).
_SAME_TYPE = frozenset(
    {"Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Neg", "Identity", "Relu", "Sigmoid", "Tanh"}
)
_TYPE_DEPTH = 16


def attribute_floats(node: ir.Node, name: str) -> np.ndarray:
    """A float-list attribute as a float64 array (empty when absent)."""
    values = node.attributes.get_floats(name, None)
    return np.asarray([] if values is None else list(values), dtype=np.float64)


def _float_input(ctx: Context, node: ir.Node, producer_of: ProducerOf) -> ir.Value | Declined:
    """``node``'s data input, when it is float (the type the op writes), or why not."""
    data = node.inputs[0] if node.inputs else None
    if data is None or ctx.constants.is_constant(data):
        return declined(node, f"{node.op_type} has no data input")
    dtype = data_dtype(data, producer_of)
    if dtype is None and ctx.shapes.request():
        dtype = data_dtype(data, producer_of)
    if dtype is None:
        dtype = _written_type(data)
    if dtype != ir.DataType.FLOAT:
        found = "of an unknown type" if dtype is None else f"of type {dtype_name(dtype)}"
        return declined(
            node,
            f"{node.op_type} reads an input {found} and always writes float32: only a float32 "
            "input makes it a map of one type",
        )
    return data


def _written_type(value: ir.Value) -> ir.DataType | None:
    """The element type ``value`` has by the ops that wrote it, when nothing records it (ONNX
    shape inference gives no type after an ONNX-ML op): an ONNX-ML op's float output, a
    ``Cast``'s target, or the input type an op of the same type keeps, a few ops back."""
    for _ in range(_TYPE_DEPTH):
        if value.dtype is not None:
            return value.dtype
        node = value.producer()
        if node is None:
            return None
        if node.domain == ML_DOMAIN:
            float_output = node.op_type in _ML_FLOAT or (
                node.op_type == "LinearClassifier" and value is node.outputs[-1]
            )
            return ir.DataType.FLOAT if float_output else None
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            to = node.attributes.get_int("to", None)
            return None if to is None else ir.DataType(to)
        if node.op_type not in _SAME_TYPE or not node.inputs or node.inputs[0] is None:
            return None
        value = node.inputs[0]
    return None


def _scaler(ctx: Context, node: ir.Node, producer_of: ProducerOf) -> LinearOp | Declined:
    """``Scaler``: ``y = (x - offset) * scale``, a diagonal step on a 1-D or 2-D float input."""
    data = _float_input(ctx, node, producer_of)
    if isinstance(data, Declined):
        return data
    scale, offset = attribute_floats(node, "scale"), attribute_floats(node, "offset")
    if scale.size == 0 or scale.size != offset.size:
        return declined(
            node,
            f"Scaler's scale ({scale.size} values) and offset ({offset.size}) are not of one "
            "length, as onnxruntime requires",
        )
    rank = ctx.shapes.rank(data)
    if rank not in (1, 2):
        where = "of unknown rank" if rank is None else f"of rank {rank}"
        return declined(
            node, f"Scaler on an input {where}: onnxruntime scales axis 1 of a 2-D input"
        )
    known = data_width(ctx, data, producer_of)
    width = known if scale.size == 1 else scale.size
    if width is None or (known is not None and known != width):
        return declined(node, f"Scaler's {scale.size} scales do not fit an input of width {known}")

    def make() -> algebra.AffineMap:
        s = np.broadcast_to(scale, (width,))
        return algebra.AffineMap(np.diag(s), -np.broadcast_to(offset, (width,)) * s)

    return LinearOp(
        (node,),
        0,
        width,
        width,
        ir.DataType.FLOAT,
        (),
        make,
        elementwise=True,
        has_bias=bool(np.any(offset)),
        attribute_params=scale.size + offset.size,
    )


def _normalizer(ctx: Context, node: ir.Node, producer_of: ProducerOf) -> Declined:
    """``Normalizer``: each row divided by its norm, never an affine map."""
    norm = node.attributes.get_string("norm", "MAX")
    return declined(node, f"Normalizer ({norm}) divides each row by its norm: not an affine map")


def _regressor(ctx: Context, node: ir.Node, producer_of: ProducerOf) -> LinearOp | Declined:
    """``LinearRegressor``: ``y = x @ C.T + intercepts`` on ``[N, F]``, then its post-transform."""
    targets = node.attributes.get_int("targets", 1)
    post = node.attributes.get_string("post_transform", "NONE")
    ends = None
    if post != "NONE":
        ends = (
            f"LinearRegressor's post_transform {post} is not affine: the regressor takes what "
            "is before it, nothing after it"
        )
    op = _linear_ml(ctx, node, producer_of, targets, ends)
    if isinstance(op, LinearOp) and ends is None and ctx.shapes.rank(op.input) != 2:
        op.ends_chain = "LinearRegressor on an input not known to be 2-D: nothing after it joins"
    return op


def _classifier(ctx: Context, node: ir.Node, producer_of: ProducerOf) -> LinearOp | Declined:
    """``LinearClassifier``: ``scores = x @ C.T + intercepts``, its post-transform, then labels
    from the scores (the second output is the scores)."""
    classes = attribute_floats(node, "intercepts").size
    if classes == 0:
        return declined(
            node, "LinearClassifier without intercepts: onnxruntime counts its classes by them"
        )
    if len(node.outputs) != 2:
        return declined(node, "LinearClassifier does not have its two outputs (labels, scores)")
    post = node.attributes.get_string("post_transform", "NONE")
    ends = (
        f"LinearClassifier's labels and scores (post_transform {post}) are computed from the "
        "linear scores: it takes what is before it, nothing after it"
    )
    op = _linear_ml(ctx, node, producer_of, classes, ends)
    if isinstance(op, LinearOp):
        op.output_index = 1
    return op


def _linear_ml(
    ctx: Context, node: ir.Node, producer_of: ProducerOf, rows: int, ends: str | None
) -> LinearOp | Declined:
    """The map ``x @ C.T + intercepts`` of a regressor or classifier with ``rows`` outputs;
    ``ends`` says why nothing after it can join (then it is always written as itself)."""
    data = _float_input(ctx, node, producer_of)
    if isinstance(data, Declined):
        return data
    coefficients, intercepts = (
        attribute_floats(node, "coefficients"),
        attribute_floats(node, "intercepts"),
    )
    if rows < 1 or coefficients.size == 0 or coefficients.size % rows:
        return declined(
            node, f"{node.op_type}'s {coefficients.size} coefficients are not {rows} rows"
        )
    if intercepts.size not in (0, rows):
        return declined(node, f"{node.op_type} has {intercepts.size} intercepts for {rows} rows")
    features = coefficients.size // rows
    width = data_width(ctx, data, producer_of)
    if width is not None and width != features:
        return declined(node, f"{node.op_type} has {features} features, its input {width}")

    def make() -> algebra.AffineMap:
        weight = coefficients.reshape(rows, features).T.copy()
        return algebra.AffineMap(weight, intercepts.copy() if intercepts.size else None)

    return LinearOp(
        (node,),
        0,
        features,
        rows,
        ir.DataType.FLOAT,
        (),
        make,
        has_bias=intercepts.size > 0,
        ends_chain=ends,
        own_form=OwnForm(_written_back(node), required=ends),
        attribute_params=coefficients.size + intercepts.size,
    )


def _written_back(node: ir.Node):
    """How a merge ending in ``node`` writes it: the same op and attributes, reading the merged
    input, with ``coefficients = W.T`` (row-major) and ``intercepts = b`` (zeros if none)."""
    kept = [
        ir.Attr(a.name, a.type, a.value) for a in node.attributes.values() if a.name not in _WEIGHTS
    ]

    def make(x: ir.Value, affine: algebra.AffineMap, name: str, doc: str) -> ir.Node:
        rows = affine.weight.shape[1]
        bias = np.zeros(rows) if affine.bias is None else affine.bias.reshape(-1)
        weights = [
            ir.AttrFloat32s("coefficients", _float32_list(affine.weight.T)),
            ir.AttrFloat32s("intercepts", _float32_list(bias)),
        ]
        return ir.Node(
            node.domain,
            node.op_type,
            [x],
            [*weights, *kept],
            num_outputs=len(node.outputs),
            version=node.version,
            name=name,
            doc_string=doc,
        )

    return make


def _float32_list(array: np.ndarray) -> list[float]:
    """``array`` rounded once to float32, row-major, as the floats of an attribute."""
    return round_to_dtype(array, np.float32).reshape(-1).tolist()


#: The ONNX-ML steps (keyed as :func:`~converter.fusion.core.graph.op_key` names them).
ML_STEPS: dict[str, Recognise] = {
    f"{ML_DOMAIN}.Scaler": _scaler,
    f"{ML_DOMAIN}.Normalizer": _normalizer,
}

#: The ONNX-ML matrix ops.
ML_OPS: dict[str, Recognise] = {
    f"{ML_DOMAIN}.LinearRegressor": _regressor,
    f"{ML_DOMAIN}.LinearClassifier": _classifier,
}
