"""The ONNX-ML ops inside a region (:mod:`converter.fusion.linear.regions`): column picks and scalers.

skl2onnx writes a ``ColumnTransformer`` as one pick of columns per transformer, its scaler, and a
``Concat`` of the blocks::

    ArrayFeatureExtractor(x, indices)   y[..., j] = x[..., indices[j]]     a Gather on the last axis
    Scaler(x; offset, scale)            y = (x - offset) * scale           elementwise, the same in
                                                                           every row

Both act on each row alone, so the whole transformer is one affine map of ``x``'s last axis,
which composes with the ``LinearRegressor`` (or Gemm) after it. What onnxruntime does decides
what is proved here, not the reference evaluator the probe runs on (which is more lenient):

* onnxruntime flattens the indices, refuses an empty list and any index outside ``[0, width)``
  (the evaluator would wrap a negative one), and gives ``[1, k]`` for a 1-D input;
* it scales axis 1 of a 2-D input by column (of a higher rank it reads the flat data with axis
  1's stride: not a map of the last axis), or every element by one ``offset`` and ``scale``;
  ``offset`` and ``scale`` are of one length, the width or 1; it
  reads float, double or integers and always writes float32, so only a float32 input makes a map
  of one type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from converter.fusion.core.dtypes import dtype_name
from converter.fusion.linear.ml import ML_DOMAIN, attribute_floats
from converter.fusion.linear.region_layout import Layout, Rule, one_data

if TYPE_CHECKING:
    from converter.fusion.linear.regions import _Region

__all__ = [
    "CONSTANT_INPUTS",
    "ML_ELEMENTWISE",
    "ML_MIXES",
    "ML_RULES",
    "SHAPE_KEEPING",
    "adds_offset",
]

_EXTRACTOR = f"{ML_DOMAIN}.ArrayFeatureExtractor"
_SCALER = f"{ML_DOMAIN}.Scaler"

#: ONNX-ML ops that pick or move features (a region holds one of these, or another mixing op).
ML_MIXES = frozenset({_EXTRACTOR})
#: ONNX-ML ops elementwise by constants the same in every row.
ML_ELEMENTWISE = frozenset({_SCALER})
#: Ops whose output has their input's shape, which onnx's inference does not give.
SHAPE_KEEPING = frozenset({_SCALER})
#: The input of each op its rule reads as a constant, and refuses, with a reason, when not one.
CONSTANT_INPUTS = {_EXTRACTOR: 1}


def _feature_extractor(region: _Region, node: ir.Node) -> Layout | str:
    """``ArrayFeatureExtractor``: the columns ``indices`` (flattened) of the last axis."""
    found = one_data(region, node)
    if isinstance(found, str):
        return found
    index, layout = found
    if index != 0 or len(node.inputs) < 2:
        return "does not read its columns from a value of the region"
    indices = region.ctx.constants.array(node.inputs[1])
    if not isinstance(indices, np.ndarray):
        return "has column indices that are not constant"
    rank, width = len(layout.shape), layout.shape[-1]
    if rank < 2:
        return "picks columns of a 1-D value (onnxruntime gives one row of them)"
    if rank - 1 < layout.split:
        return "acts across rows"
    flat = indices.reshape(-1).astype(np.int64)
    if flat.size == 0:
        return "has no column indices (onnxruntime refuses an empty list)"
    if flat.min() < 0 or flat.max() >= width:
        return f"has column indices outside [0, {width}) (onnxruntime refuses them)"
    return Layout((*layout.shape[:-1], int(flat.size)), layout.split)


def _scaler(region: _Region, node: ir.Node) -> Layout | str:
    """``Scaler``: ``y = (x - offset) * scale`` on a float32 value: one constant for every element,
    or one per column of a 2-D value."""
    found = one_data(region, node)
    if isinstance(found, str):
        return found
    _, layout = found
    dtype = region.dtype(node.inputs[0])
    if dtype != ir.DataType.FLOAT:
        found_type = "of an unknown type" if dtype is None else f"of type {dtype_name(dtype)}"
        return (
            f"reads a value {found_type} and always writes float32: only a float32 input makes "
            "it a map of one type"
        )
    scale, offset = attribute_floats(node, "scale"), attribute_floats(node, "offset")
    width = layout.shape[-1]
    if scale.size == 0 or scale.size != offset.size:
        return (
            f"has {scale.size} scales and {offset.size} offsets: not of one length, as "
            "onnxruntime requires"
        )
    if scale.size == 1:  # the same for every element, of any rank
        return layout
    if len(layout.shape) != 2:
        return (
            f"scales a value of rank {len(layout.shape)} by column: onnxruntime scales axis 1 of "
            "a 2-D input"
        )
    if layout.split > 1:
        return "acts across rows"
    if scale.size != width:
        return f"has {scale.size} scales for {width} columns (onnxruntime takes {width} or 1)"
    return layout


def adds_offset(node: ir.Node) -> bool:
    """``node`` is a Scaler with an offset that is not zero (the region adds a constant)."""
    return f"{node.domain}.{node.op_type}" == _SCALER and bool(
        np.any(attribute_floats(node, "offset"))
    )


#: The ONNX-ML rules of :data:`~converter.fusion.linear.region_rules.RULES`.
ML_RULES: dict[str, Rule] = {_EXTRACTOR: _feature_extractor, _SCALER: _scaler}
