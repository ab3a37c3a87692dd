"""The layout of a region's values, their shapes, and the checks the rules share (:mod:`regions`).

A value of a region is ``R`` rows of its own width, rows outermost in memory: its :class:`Layout`
is its static shape and its *split*, the first axis (1 or later) from which on the axes index
inside a row.

**Rows the model does not count.** An export with a dynamic batch (``X [N, 12]``, scikit-learn's
pipelines) fixes every axis of a row but not how many rows there are. Such a region is read with
:data:`STAND_IN` in place of each dynamic axis of its input, and every shape inside it is inferred
from there, node by node (:func:`infer_output`), not read from the model. The stand-in is larger
than one, so a dynamic axis always counts among the rows (``width % (STAND_IN * w) != 0``); the
rules refuse what depends on the number of rows (a Reshape's target, a constant shaped like the
rows), so the map read with the stand-in is the map for every number of rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from converter.fusion.core.computed import node_proto
from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context

if TYPE_CHECKING:
    from converter.fusion.linear.regions import _Region

__all__ = [
    "STAND_IN",
    "Layout",
    "Rule",
    "Typed",
    "infer_output",
    "normalized",
    "on_axes",
    "one_data",
    "output_shape",
    "probe_shape",
    "split_axis",
    "static_shape",
]

#: The size a region reads a dynamic axis of its input as (any size over one would do).
STAND_IN = 7

#: A value's static shape and element type, either unknown (None).
Typed = tuple["tuple[int, ...] | None", "ir.DataType | None"]

# A constant input of at most this many elements is given to onnx's inference by its values.
_INFERENCE_DATA = 64


@dataclass(frozen=True)
class Layout:
    """A value of the region: its static shape and its split (see the module docstring)."""

    shape: tuple[int, ...]
    split: int


# A node's layout rule: the output's layout, or why the node does not act on rows alone.
Rule = Callable[["_Region", ir.Node], "Layout | str"]


def static_shape(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is None or not value.shape.is_static():
        return None
    return tuple(int(d) for d in value.shape)


def output_shape(ctx: Context, node: ir.Node) -> tuple[int, ...] | None:
    """The static shape of ``node``'s first output: recorded, or inferred by onnx for this node
    alone from its inputs' shapes and its constant inputs' values (the legacy exporter records
    no shape for a Slice whose ends it computes from a Shape)."""
    shape = static_shape(node.outputs[0])
    if shape is not None:
        return shape
    return infer_output(ctx, node, lambda v: (static_shape(v), v.dtype))[0]


def infer_output(ctx: Context, node: ir.Node, known: Callable[[ir.Value], Typed]) -> Typed:
    """``node``'s first output's shape and type as onnx infers them for this node alone, from
    ``known`` shapes and types of its inputs that are not constants (a constant gives its own,
    and its values when small); either is None when onnx cannot say."""
    types, data = {}, {}
    for i, value in enumerate(node.inputs):
        if value is None:
            continue
        dims, dtype = known(value)
        constant = ctx.constants.resolve(value)
        if isinstance(constant, Constant):
            dims, dtype = constant.shape, constant.dtype
            if constant.size <= _INFERENCE_DATA:
                array = np.asarray(constant.array())
                data[f"in{i}"] = onnx.numpy_helper.from_array(array, f"in{i}")
        if dims is None or dtype is None:
            return None, None
        types[f"in{i}"] = onnx.helper.make_tensor_type_proto(int(dtype), list(dims))
    try:
        default = node.domain in ("", "ai.onnx")
        version = ctx.opset if default else ctx.model.opset_imports.get(node.domain, 1)
        schema = onnx.defs.get_schema(node.op_type, version, node.domain)
        found = onnx.shape_inference.infer_node_outputs(schema, node_proto(node), types, data)
    except Exception:  # no answer: the shape stays unknown
        return None, None
    tensor = found.get("out0")
    if tensor is None or not tensor.HasField("tensor_type"):
        return None, None
    elem = tensor.tensor_type.elem_type
    dtype = ir.DataType(elem) if elem else None
    if not tensor.tensor_type.HasField("shape"):
        return None, dtype
    dims = tensor.tensor_type.shape.dim
    if not all(d.HasField("dim_value") for d in dims):
        return None, dtype
    return tuple(d.dim_value for d in dims), dtype


def split_axis(shape: tuple[int, ...], rows: int) -> int:
    """The first axis of ``shape`` (1 or later) from which on the axes index inside a row."""
    width = math.prod(shape) // rows
    return next(j for j in range(1, len(shape) + 1) if width % math.prod(shape[j:]) == 0)


def probe_shape(layout: Layout, probe_rows: int, width: int) -> tuple[int, ...]:
    """``layout``'s shape with ``probe_rows`` rows of ``width`` in place of its rows."""
    j = layout.split
    inner = math.prod(layout.shape[j:])
    return (1,) * (j - 1) + (probe_rows * width // inner,) + layout.shape[j:]


# ------------------------------------------------------------- checks the rules share


def normalized(axes: list[int] | None, rank: int) -> list[int] | None:
    """``axes`` in ``0..rank-1`` (negative ones count from the end), or None if out of range."""
    if axes is None or any(not -rank <= a < rank for a in axes):
        return None
    return [a % rank for a in axes]


def one_data(region: _Region, node: ir.Node) -> tuple[int, Layout] | str:
    """The one input of ``node`` made inside the region (or its input), by index, or why not."""
    data = region.data(node)
    if len(data) != 1:
        return "reads more than one value of the region"
    return data[0]


def on_axes(region: _Region, node: ir.Node, axes: list[int] | None, rank_of: int) -> Layout | str:
    """A node acting on ``axes`` (of a tensor of rank ``rank_of``) of its one region input."""
    found = one_data(region, node)
    if isinstance(found, str):
        return found
    _, layout = found
    normal = normalized(axes, rank_of)
    if normal is None:
        return "has axes that are not constant"
    if any(a < layout.split for a in normal):
        return "acts across rows"
    return Layout(region.shape(node), layout.split)
