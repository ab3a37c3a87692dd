"""Which nodes a region holds (:mod:`converter.fusion.linear.regions`): the search back from its end.

A region ends at an op that selects, moves or mixes features (:data:`SHAPE_OPS`) and holds the
nodes its output is computed by, back to one input ``x``: shape ops, products by constant blocks
that are not of whole rows (those are the op table's layers), whole-row layers a ``Concat`` joins
(AdaMSS's subspaces), and elementwise ops by constants (``Neg``, ``Mul``, a same-type ``Cast``,
an ONNX-ML ``Scaler``). An elementwise op of a whole row is a *step*, left to the chains, unless
what it reads is made by the region's shape ops: ``rotate_half``'s ``-x[..., h:]``, or a
``ColumnTransformer``'s scaler after its column pick.

The rows are the leading axes of the end's output, when its shape is known; when not (an ONNX-ML
op's output has none), the membership is decided without them and the region checks its rows when
it reads its layouts.
"""

from __future__ import annotations

import onnx_ir as ir

from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.dtypes import FLOAT_TYPES
from converter.fusion.core.graph import is_onnx, op_key
from converter.fusion.linear.region_layout import output_shape, static_shape
from converter.fusion.linear.region_ml import CONSTANT_INPUTS, ML_ELEMENTWISE, ML_MIXES
from converter.fusion.linear.region_rules import ELEMENTWISE

__all__ = [
    "ELEMENTWISE_LIKE",
    "MAX_REGION_NODES",
    "MIXES",
    "SHAPE_OPS",
    "Members",
    "members",
    "structural",
    "unshaped_candidate",
]

#: The most nodes one region may hold (a bound on each backward search).
MAX_REGION_NODES = 64

SHAPE_OPS = frozenset(
    {
        "Concat", "Einsum", "Gather", "MatMul", "ReduceMean", "ReduceSum", "Reshape",
        "ScatterElements", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze", *ML_MIXES,
    }
)  # fmt: skip
#: A region holds one of these at least: ops that select, move or mix features.
MIXES = frozenset(
    {"Concat", "Einsum", "Gather", "MatMul", "ScatterElements", "Slice", "Split", *ML_MIXES}
)
#: Ops elementwise by constants (or of two values of the region: ``Add``, ``Sub``).
ELEMENTWISE_LIKE = ELEMENTWISE | {"Cast"} | ML_ELEMENTWISE

#: A region's nodes (a set) and its one input, or None.
Members = tuple[set[ir.Node], ir.Value] | None

#: A node reading more values than this (a Concat of a wide model's branches) never asks for
#: the model's shapes to be inferred: no region joins so many.
_MOST_JOINED = 8


def members(ctx: Context, end: ir.Node, steps: bool = True) -> Members:
    """The structural nodes ``end`` is computed by, back to one input, and that input; None
    if they do not read exactly one value that is neither constant nor theirs. Without
    ``steps``, of the elementwise ops of whole rows only a ``Neg`` of a shape op's output is
    taken (the smaller region, when the larger one is not a map of rows)."""
    found = output_shape(ctx, end)
    if found is not None and len(found) < 2:
        return None
    rows = None if found is None else found[:-1]
    inside = {end}
    stack = [end]
    sources: set[ir.Value] = set()
    layers: set[ir.Node] = set()  # whole-row layers joined by a Concat (AdaMSS's subspaces)
    while stack:
        node = stack.pop()
        if _computed_inputs(node) > MAX_REGION_NODES + 1:
            return None  # each value it reads is a node of the region or its one input
        joins = node.op_type == "Concat" or node in layers
        for i, value in enumerate(node.inputs):
            if value is None or ctx.constants.is_constant(value):
                continue
            if CONSTANT_INPUTS.get(op_key(node)) == i:
                continue  # its rule reads it as a constant, and says why not
            if value.dtype is not None and value.dtype not in FLOAT_TYPES:
                return None  # a shape or an index computed at run time
            producer = value.producer()
            if producer in inside:
                continue
            known = producer is not None and producer.graph is end.graph
            layer = known and joins and _row_layer(ctx, producer, rows)
            if layer:
                layers.add(producer)
            if known and (layer or structural(ctx, producer, rows, steps)):
                if len(inside) >= MAX_REGION_NODES:
                    return None
                inside.add(producer)
                stack.append(producer)
            else:
                sources.add(value)
    if len(sources) != 1 or not _computes(inside):
        return None
    return inside, next(iter(sources))


def _computed_inputs(node: ir.Node) -> int:
    """How many distinct values ``node`` reads that are not stored constants (a cheap bound:
    a Concat of 10,000 chains is no region, and asking of each whether it is constant costs)."""
    return len(
        {
            v
            for v in node.inputs
            if v is not None and v.const_value is None and not v.is_initializer()
        }
    )


def unshaped_candidate(node: ir.Node) -> bool:
    """``node`` could end or hold a region, and its output's shape is not recorded."""
    return (
        op_key(node) in MIXES
        and len(node.inputs) <= _MOST_JOINED
        and static_shape(node.outputs[0]) is None
    )


def structural(
    ctx: Context, node: ir.Node, rows: tuple[int, ...] | None, steps: bool = True
) -> bool:
    """``node`` may be inside a region whose rows are ``rows`` (None: not known): a shape op
    other than a product of whole rows by a matrix (an op of the op table), or an elementwise op
    on a value that is not a whole row, or on one the region's shape ops make (without
    ``steps``: a ``Neg`` of a shape op's output only)."""
    key = op_key(node)
    if (key not in SHAPE_OPS and key not in ELEMENTWISE_LIKE) or not _one_output(node):
        return False
    if key in ("MatMul", "Einsum"):  # by a constant, and not of whole rows
        data = [v for v in node.inputs if v is not None and not ctx.constants.is_constant(v)]
        out = output_shape(ctx, node)
        if len(data) != 1 or static_shape(data[0]) is None or rows is None or out is None:
            return False
        return not (_is_row(data[0], rows) and out[:-1] == rows)
    if key in SHAPE_OPS:
        return True
    if rows is not None and not _is_row(node.outputs[0], rows):
        return True
    if not steps:
        source = node.inputs[0].producer() if key == "Neg" and node.inputs[0] else None
        return source is not None and op_key(source) in SHAPE_OPS and structural(ctx, source, rows)
    return _reads_shape_ops(ctx, node, rows)


def _reads_shape_ops(ctx: Context, node: ir.Node, rows: tuple[int, ...] | None) -> bool:
    """Every value ``node`` reads that is not constant is made by structural shape ops, through
    elementwise ops only (a bounded search back)."""
    stack, seen = [node], {node}
    while stack:
        data = [v for v in stack.pop().inputs if v is not None and not ctx.constants.is_constant(v)]
        if not data:
            return False
        for value in data:
            producer = value.producer()
            if producer is None or producer.graph is not node.graph:
                return False
            key = op_key(producer)
            if key in SHAPE_OPS:
                if not structural(ctx, producer, rows):
                    return False
            elif key not in ELEMENTWISE_LIKE or len(seen) >= MAX_REGION_NODES:
                return False
            elif producer not in seen:
                seen.add(producer)
                stack.append(producer)
    return True


def _row_layer(ctx: Context, node: ir.Node, rows: tuple[int, ...] | None) -> bool:
    """``node`` is a ``MatMul`` of whole rows by a constant 2-D weight (a layer of the op table,
    taken into a region only as one of the branches a Concat joins)."""
    if rows is None or not is_onnx(node, "MatMul") or len(node.inputs) != 2:
        return False
    if node.inputs[0] is None:
        return False
    weight = ctx.constants.resolve(node.inputs[1])
    return (
        isinstance(weight, Constant)
        and len(weight.shape) == 2
        and _is_row(node.inputs[0], rows)
        and _is_row(node.outputs[0], rows)
    )


def _one_output(node: ir.Node) -> bool:
    """``node`` gives one value that is read: its only output, or the first output of a Split
    whose other parts nothing reads (PVeRA keeps the first half of its hidden vector)."""
    if len(node.outputs) == 1:
        return True
    rest = node.outputs[1:]
    return node.op_type == "Split" and not any(v.uses() or v.is_graph_output() for v in rest)


def _computes(nodes: set[ir.Node]) -> bool:
    """``nodes`` select, move or mix features, or sum over blocks: views alone (Reshapes that
    cancel) are left to the folds across views, and a reduction of a whole row is a norm's
    statistic."""
    ops = {op_key(n) for n in nodes}
    return bool(ops & MIXES) or ("Reshape" in ops and bool(ops & {"ReduceSum", "ReduceMean"}))


def _is_row(value: ir.Value, rows: tuple[int, ...]) -> bool:
    shape = static_shape(value)
    return shape is not None and shape[:-1] == rows
