"""One layout rule per op type for the regions (:mod:`converter.fusion.linear.regions`).

Each rule in :data:`RULES` checks that a node acts on rows alone (its axes from the split on,
constants varying only along them; see :mod:`converter.fusion.linear.region_layout`) and gives its
output's layout, or says why not. The table is keyed as
:func:`~converter.fusion.core.graph.op_key` names ops; the ONNX-ML ones are in
:mod:`converter.fusion.linear.region_ml`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant, axes_of
from converter.fusion.core.dtypes import dtype_name
from converter.fusion.linear.algebra import repeated_row
from converter.fusion.linear.region_layout import (
    Layout,
    Rule,
    normalized,
    on_axes,
    one_data,
    probe_shape,
    split_axis,
)
from converter.fusion.linear.region_ml import ML_RULES

if TYPE_CHECKING:
    from converter.fusion.linear.regions import _Region

__all__ = ["ELEMENTWISE", "RULES"]

ELEMENTWISE = frozenset({"Add", "Div", "Identity", "Mul", "Neg", "Sub"})

#: Why a rule that needs the number of rows refuses a region whose input leaves it open.
_UNCOUNTED = "the model does not fix the number of rows (a dynamic axis)"


# ---------------------------------------------------------------- layout rules, one per op


def _reshape(region: _Region, node: ir.Node) -> Layout | str:
    found = one_data(region, node)
    if isinstance(found, str):
        return found
    index, layout = found
    if region.dynamic:
        return f"has a target for a number of rows, and {_UNCOUNTED}"
    shape = region.shape(node)
    if index != 0 or not region.ctx.constants.is_constant(node.inputs[1]):
        return "has a target that is not constant"
    if shape is None or math.prod(shape) != math.prod(layout.shape):
        return "changes the number of elements"
    out = Layout(shape, split_axis(shape, region.rows))
    region.targets[node] = np.asarray(_in_probe(region, out), np.int64)
    return out


def _in_probe(region: _Region, layout: Layout) -> tuple[int, ...]:
    """``layout``'s shape when the region runs on its probe (``n + 1`` rows of ``x``)."""
    width = math.prod(layout.shape) // region.rows
    return probe_shape(layout, region.layouts[region.x].shape[-1] + 1, width)


def _row_of(region: _Region, constant: Constant, out: Layout) -> np.ndarray | None:
    """The one row a constant shaped like ``out`` holds in every row (float64), or None."""
    row = repeated_row(constant.array(), math.prod(out.shape[: out.split]))
    if row is None:
        return None
    row = row.reshape(constant.shape[out.split :])
    return row.astype(np.float64) if row.dtype.kind == "f" else row


def _transpose(region: _Region, node: ir.Node) -> Layout | str:
    found = one_data(region, node)
    if isinstance(found, str):
        return found
    _, layout = found
    perm = node.attributes.get_ints("perm", None)
    rank = len(layout.shape)
    perm = list(perm) if perm is not None else list(range(rank))[::-1]
    if perm[: layout.split] != list(range(layout.split)):
        return f"moves the rows (perm {perm})"
    return Layout(tuple(layout.shape[p] for p in perm), layout.split)


def _slice(region: _Region, node: ir.Node) -> Layout | str:
    rank = len(region.layouts[node.inputs[0]].shape) if node.inputs[0] in region.layouts else 0
    starts = region.ctx.constants.array(node.inputs[1]) if len(node.inputs) > 1 else None
    if not isinstance(starts, np.ndarray):
        return "has starts that are not constant"
    axes: list[int] | None = list(range(len(starts)))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        given = region.ctx.constants.array(node.inputs[3])
        axes = [int(a) for a in given] if isinstance(given, np.ndarray) else None
    return on_axes(region, node, axes, rank)


def _gather(region: _Region, node: ir.Node) -> Layout | str:
    if node.inputs[0] not in region.layouts:
        return "gathers from a constant"
    rank = len(region.layouts[node.inputs[0]].shape)
    return on_axes(region, node, [node.attributes.get_int("axis", 0)], rank)


def _split_first(region: _Region, node: ir.Node) -> Layout | str:
    """The first part of a ``Split`` (the others unread)."""
    if node.inputs[0] not in region.layouts:
        return "splits a constant"
    rank = len(region.layouts[node.inputs[0]].shape)
    return on_axes(region, node, [node.attributes.get_int("axis", 0)], rank)


def _reduce(region: _Region, node: ir.Node) -> Layout | str:
    if node.inputs[0] not in region.layouts:
        return "reduces a constant"
    rank = len(region.layouts[node.inputs[0]].shape)
    return on_axes(region, node, axes_of(region.ctx.constants, node), rank)


def _squeeze(region: _Region, node: ir.Node) -> Layout | str:
    if node.inputs[0] not in region.layouts:
        return "squeezes a constant"
    rank = len(region.layouts[node.inputs[0]].shape)
    return on_axes(region, node, axes_of(region.ctx.constants, node), rank)


def _unsqueeze(region: _Region, node: ir.Node) -> Layout | str:
    out = region.shape(node)
    assert out is not None
    return on_axes(region, node, axes_of(region.ctx.constants, node), len(out))


def _concat(region: _Region, node: ir.Node) -> Layout | str:
    """A ``Concat`` of values of the region along a later axis, and of constants the same in
    every row (AdaMSS on a layer with a bias appends a column of ones: ``[x, 1] @ A``)."""
    data = region.data(node)
    if not data:
        return "joins constants only"
    splits = {layout.split for _, layout in data}
    split = data[0][1].split
    rank = len(data[0][1].shape)
    axis = normalized([node.attributes.get_int("axis", 0)], rank)
    if len(splits) != 1 or axis is None or axis[0] < split:
        return "joins across rows"
    shape = region.shape(node)
    assert shape is not None
    inside = {i for i, _ in data}
    for i, value in enumerate(node.inputs):
        if i in inside:
            continue
        found = _uniform_rows(region, value, split, shape, axis[0])
        if isinstance(found, str):
            return found
        region.tiled[node, i] = found
    return Layout(shape, split)


def _uniform_rows(
    region: _Region, value: ir.Value | None, split: int, out: tuple[int, ...], axis: int
) -> tuple[np.ndarray, tuple[int, ...]] | str:
    """A constant joined to rows: one row of it and its shape in the probe, or why not."""
    if region.dynamic:
        return f"joins a constant shaped like the rows, and {_UNCOUNTED}"
    constant = region.ctx.constants.resolve(value)
    if not isinstance(constant, Constant) or len(constant.shape) != len(out):
        return "joins a value that is neither of the region nor a constant of its rank"
    if constant.shape[:axis] != out[:axis]:
        return "joins a constant of another shape"
    layout = Layout(out, split)
    row = _row_of(region, constant, layout)
    if row is None:
        return "joins a constant that differs from row to row"
    return row, _in_probe(region, layout)[:split] + constant.shape[split:]


def _elementwise(region: _Region, node: ir.Node) -> Layout | str:
    data = region.data(node)
    shape = region.shape(node)
    assert shape is not None
    if len(data) == 2 and node.op_type in ("Add", "Sub"):
        (_, a), (_, b) = data
        return a if a == b else "adds values of two layouts"
    if len(data) != 1:
        return "multiplies two values of the region"
    index, layout = data[0]
    if node.op_type in ("Neg", "Identity"):
        return layout
    if node.op_type == "Div" and index != 0:
        return "divides by a value of the region"
    other = node.inputs[1 - index]
    constant = region.ctx.constants.resolve(other)
    if not isinstance(constant, Constant):
        return "reads a value that is neither constant nor of the region"
    if shape != layout.shape:
        return "broadcasts the value to another shape"
    offset = len(shape) - len(constant.shape)
    if any(d != 1 and offset + i < layout.split for i, d in enumerate(constant.shape)):
        return "has a constant that varies across rows"
    return layout


def _cast(region: _Region, node: ir.Node) -> Layout | str:
    """``Cast`` to the type its input already has (skl2onnx writes one after a column pick):
    the identity."""
    found = one_data(region, node)
    if isinstance(found, str):
        return found
    _, layout = found
    to = node.attributes.get_int("to", None)
    dtype = region.dtype(node.inputs[0])
    if to is None or dtype is None or ir.DataType(to) != dtype:
        source = "a value of an unknown type" if dtype is None else dtype_name(dtype)
        target = "an unknown type" if to is None else dtype_name(ir.DataType(to))
        return f"casts {source} to {target}"
    return layout


def _product(region: _Region, node: ir.Node) -> Layout | str:
    """``MatMul`` or ``Einsum`` of a value of the region by a constant (the other operand)."""
    found = one_data(region, node)
    if isinstance(found, str):
        return found
    index, layout = found
    if len(node.inputs) != 2:
        return "does not have two operands"
    constant = region.ctx.constants.resolve(node.inputs[1 - index])
    if not isinstance(constant, Constant):
        return "multiplies two values of the region"
    shape = region.shape(node)
    assert shape is not None
    reason = (
        _einsum_reason(node, index, layout)
        if node.op_type == "Einsum"
        else _matmul_reason(index, layout, constant.shape)
    )
    return reason or Layout(shape, layout.split)


def _matmul_reason(index: int, layout: Layout, weight: tuple[int, ...]) -> str | None:
    rank = len(layout.shape)
    if len(weight) < 2 or len(weight) > rank:
        return "has a weight of another rank"
    contracted = rank - 1 if index == 0 else rank - 2
    if contracted < layout.split:
        return "contracts across rows"
    batch = weight[:-2]
    offset = rank - len(weight)
    if any(d != 1 and offset + i < layout.split for i, d in enumerate(batch)):
        return "has a weight that varies across rows"
    return None


def _einsum_reason(node: ir.Node, index: int, layout: Layout) -> str | None:
    equation = node.attributes.get_string("equation", "").replace(" ", "")
    if "->" not in equation or equation.count(",") != 1:
        return "has an equation of another form"
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    data, weight = terms[index], terms[1 - index]
    split = layout.split
    if "..." in data:
        explicit = len(data) - 3
        if not data.startswith("...") or not out.startswith("...") or "..." in weight:
            return "has an ellipsis that is not the leading axes"
        return None if len(layout.shape) - explicit >= split else "contracts across rows"
    if len(data) != len(layout.shape) or len(set(data)) != len(data):
        return "has an equation of another form"
    leading = data[:split]
    if out[:split] != leading or any(c in weight for c in leading):
        return "acts across rows"
    return None


def _scatter(region: _Region, node: ir.Node) -> Layout | str:
    """``ScatterElements(target, indices, updates)`` along a later axis, the updates a value of
    the region and the target and indices constants the same in every row: a placement of the
    row's features (AdaMSS puts its subspaces' columns back in order)."""
    found = one_data(region, node)
    if isinstance(found, str):
        return found
    index, layout = found
    if index != 2:
        return "scatters into a value of the region"
    if region.dynamic:
        return f"has a target and indices shaped like the rows, and {_UNCOUNTED}"
    axis = node.attributes.get_int("axis", 0)
    normal = normalized([axis], len(layout.shape))
    if normal is None or normal[0] < layout.split:
        return "acts across rows"
    out = region.shape(node)
    assert out is not None
    placed = Layout(out, layout.split)
    for i in (0, 1):
        constant = region.ctx.constants.resolve(node.inputs[i])
        if not isinstance(constant, Constant) or constant.shape != out:
            return "has a target or indices not shaped like its output"
        row = _row_of(region, constant, placed)
        if row is None:
            return "has a target or indices that differ from row to row"
        region.tiled[node, i] = (row, _in_probe(region, placed))
    return placed


RULES: dict[str, Rule] = {
    "ScatterElements": _scatter,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Slice": _slice,
    "Gather": _gather,
    "Split": _split_first,
    "ReduceSum": _reduce,
    "ReduceMean": _reduce,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Einsum": _product,
    "MatMul": _product,
    **dict.fromkeys(ELEMENTWISE, _elementwise),
    "Cast": _cast,
    **ML_RULES,
}
