"""Maps of the last axis written through reshapes of it: one linear op each (:func:`find_regions`).

Adapters that act on blocks of features reach an export as several nodes between a projection's
input (or output) and the value it reads (or gives):

    OFT, BOFT      Reshape(x, (..., r, b)) -> Einsum("...rk,rkc->...rc", R) -> Reshape back
    GraLoRA        Reshape -> Einsum by blocks of A -> Reshape/Transpose/Reshape -> Einsum by B -> Reshape
    RoAd           Reshape(y, (-1, 2, h)) -> Gather/Neg/Unsqueeze/Concat -> Reshape back (rotations)
    MiSS           Reshape(x, (..., r, b)) -> ReduceSum over the blocks
    rotate_half    Slice/Neg/Concat of the last axis

Each is an affine map of the last axis, ``y = x @ W + b``, when every node acts on each *row* of
``x`` (an index of its leading axes ``L``) alone and the same way: such a *region* is a
:class:`~converter.fusion.linear.linear_op.LinearOp` like a Gemm, which chains, branch sums and
the cost model compose with the base layer beside it.

**Layout.** ``x`` has shape ``L + (n,)``: ``R = prod(L)`` rows of ``w = n`` features, rows
outermost in memory. Every value of the region keeps its rows outermost (``R`` rows of its own
width ``w``); for a value of shape ``S`` the axes from its *split* ``j`` on (the smallest
``j >= 1`` with ``prod(S[j:])`` dividing ``w``) index a position inside a row, and the axes before
it mix the row with an outer block of the row (``Reshape(y, (-1, 2, 32))`` of a 128-wide row).
A node keeps the layout when it only reads and writes axes from the split on, and constants vary
only along them: a Reshape (the flat order is kept), a Transpose fixing the axes before the split,
Slice/Gather/Concat/Unsqueeze/Squeeze/ReduceSum/ReduceMean on later axes, Neg, Mul/Div/Add/Sub by
such constants, the sum of two such values, Einsum and MatMul by constant blocks (one rule per op
type, in :mod:`converter.fusion.linear.region_rules`).

**The map** is read by running the region (onnx's reference evaluator, node by node, float64) on
a probe: ``n`` unit rows and a zero row in place of ``x``'s rows, each Reshape's target given the
probe's row count in place of ``R``. Row ``i`` minus the zero row is ``W[i]``; the zero row is ``b``.

Nodes of the region that other nodes read too (the ``Reshape(x)`` the q and v adapters share after
the exporter's common-subexpression elimination) are the op's ``kept`` nodes: left in place by a
merge, and removed with their last reader.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from converter.fusion.core.computed import MAX_ELEMENTS, run_node
from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.dtypes import FLOAT_TYPES
from converter.fusion.core.graph import is_onnx, node_name
from converter.fusion.linear import algebra
from converter.fusion.linear.linear_op import LinearOp, unmapping
from converter.fusion.linear.region_rules import (
    ELEMENTWISE,
    RULES,
    Layout,
    output_shape,
    probe_shape,
    split_axis,
    static_shape,
)

__all__ = ["MAX_REGION_NODES", "find_regions"]

#: The most nodes one region may hold (a bound on each backward search).
MAX_REGION_NODES = 64

_SHAPE_OPS = frozenset(
    {
        "Concat", "Einsum", "Gather", "MatMul", "ReduceMean", "ReduceSum", "Reshape",
        "ScatterElements", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze",
    }
)  # fmt: skip
# A region holds one of these at least: ops that select, move or mix features.
_MIXES = frozenset({"Concat", "Einsum", "Gather", "MatMul", "ScatterElements", "Slice", "Split"})


def find_regions(ctx: Context, graph: ir.Graph) -> tuple[list[LinearOp], list[Declined]]:
    """Every region of ``graph`` (in graph order), and why each region holding a constant block
    (an Einsum, MatMul or ReduceSum over blocks) was not one."""
    order = {node: i for i, node in enumerate(graph)}
    if any(_unshaped_candidate(n) for n in order):
        ctx.shapes.request()  # regions are read from shapes: infer them once, if not recorded
    taken: set[ir.Node] = set()
    found: list[LinearOp] = []
    declined: list[Declined] = []
    for node in reversed(list(graph)):  # the largest region first: later ends come first
        if node in taken or node.op_type not in _SHAPE_OPS or not _structural(ctx, node):
            continue
        region = _Region.backward(ctx, node, order)
        if region is None or any(n in taken for n in region.nodes):
            continue
        result = region.op()
        if isinstance(result, LinearOp):
            found.append(result)
            taken.update(n for n in result.nodes if n not in result.kept)
        elif region.has_blocks:
            declined.append(Declined([node_name(n) for n in region.nodes], result))
    found.reverse()
    return found, declined


class _Region:
    """The nodes between one input ``x`` and the output of ``end`` that act on rows alone."""

    def __init__(self, ctx: Context, nodes: list[ir.Node], x: ir.Value) -> None:
        self.ctx = ctx
        self.nodes = nodes
        self.x = x
        self.layouts: dict[ir.Value, Layout] = {}
        self.targets: dict[ir.Node, np.ndarray] = {}  # each Reshape's target for the probe
        # constants shaped like a value of the region, the same in every row: (row, probe shape)
        self.tiled: dict[tuple[ir.Node, int], tuple[np.ndarray, tuple[int, ...]]] = {}
        self.rows = 0
        self.index = 0  # where the first node reads x

    @classmethod
    def backward(cls, ctx: Context, end: ir.Node, order: dict[ir.Node, int]) -> _Region | None:
        """The structural nodes ``end`` is computed by, back to one input; None if not one."""
        rows_shape = output_shape(ctx, end)
        if rows_shape is None or len(rows_shape) < 2:
            return None
        rows = rows_shape[:-1]
        members = {end}
        stack = [end]
        sources: set[ir.Value] = set()
        layers: set[ir.Node] = set()  # whole-row layers joined by a Concat (AdaMSS's subspaces)
        while stack:
            node = stack.pop()
            joins = node.op_type == "Concat" or node in layers
            for value in node.inputs:
                if value is None or ctx.constants.is_constant(value):
                    continue
                if value.dtype is not None and value.dtype not in FLOAT_TYPES:
                    return None  # a shape or an index computed at run time
                producer = value.producer()
                if producer in members:
                    continue
                inside = producer is not None and producer.graph is end.graph
                layer = inside and joins and _row_layer(ctx, producer, rows)
                if layer:
                    layers.add(producer)
                if inside and (layer or _structural(ctx, producer, rows)):
                    if len(members) >= MAX_REGION_NODES:
                        return None
                    members.add(producer)
                    stack.append(producer)
                else:
                    sources.add(value)
        if len(sources) != 1 or not _computes(members):
            return None
        (x,) = sources
        if static_shape(x) is None or static_shape(x)[:-1] != rows:
            return None
        return cls(ctx, sorted(members, key=order.__getitem__), x)

    @property
    def has_blocks(self) -> bool:
        """A constant block acts here (an Einsum or MatMul by a constant, a sum over blocks)."""
        blocks = ("Einsum", "MatMul", "ReduceSum", "ReduceMean", "ScatterElements")
        return any(n.op_type in blocks for n in self.nodes)

    def op(self) -> LinearOp | str:
        """The region as a linear op, or why it is not one."""
        x = self.x
        if x.dtype not in FLOAT_TYPES or self.nodes[-1].outputs[0].dtype != x.dtype:
            return "the values are not all of one float type"
        shape = static_shape(x)
        assert shape is not None
        self.rows = math.prod(shape[:-1])
        if self.rows == 0:
            return "the input has no rows"
        first = self.nodes[0]
        if not any(v is x for v in first.inputs):
            return "the first node does not read the input"
        self.index = next(i for i, v in enumerate(first.inputs) if v is x)
        self.layouts[x] = Layout(shape, split_axis(shape, self.rows))
        for node in self.nodes:
            found = self._layout(node)
            if isinstance(found, str):
                return (
                    f"not a map of each row's features: {node.op_type} '{node_name(node)}' {found}"
                )
            self.layouts[node.outputs[0]] = found
        return self._linear_op()

    def _layout(self, node: ir.Node) -> Layout | str:
        shape = output_shape(self.ctx, node)
        if shape is None:
            return "has an output whose shape is not recorded"
        rule = RULES.get(node.op_type)
        if rule is None:
            return "is not a map of rows"
        found = rule(self, node)
        if isinstance(found, str):
            return found
        if found.shape != shape:
            return f"gives shape {list(found.shape)}, not the recorded {list(shape)}"
        if math.prod(shape) % self.rows:
            return "mixes rows"
        return found

    def data(self, node: ir.Node) -> list[tuple[int, Layout]]:
        """The inputs of ``node`` made inside the region (or ``x``), by index."""
        return [(i, self.layouts[v]) for i, v in enumerate(node.inputs) if v in self.layouts]

    def _linear_op(self) -> LinearOp | str:
        x, y = self.x, self.nodes[-1].outputs[0]
        n, m = self.layouts[x].shape[-1], self.layouts[y].shape[-1]
        widest = max(math.prod(layout.shape) // self.rows for layout in self.layouts.values())
        if (n + 1) * widest > MAX_ELEMENTS:
            return f"its probe ({n + 1} rows of up to {widest}) is over {MAX_ELEMENTS} elements"
        inside = set(self.nodes)
        kept = _kept(self.nodes, inside)
        constants = self._weights()
        has_bias = any(
            (n.op_type in ("Add", "Sub") and len(self.data(n)) == 1)
            or n.op_type == "ScatterElements"
            or (n.op_type == "Concat" and len(self.data(n)) < len(n.inputs))
            for n in self.nodes
        )

        def make() -> algebra.AffineMap:
            return self._probe(n, m, has_bias)

        return LinearOp(
            tuple(self.nodes),
            self.index,
            n,
            m,
            x.dtype,
            constants,
            unmapping(make, constants),
            has_bias=has_bias,
            kept=kept,
            region=True,
            block_macs=sum(c.size for c in constants) or max(n, m),
        )

    def _weights(self) -> tuple[Constant, ...]:
        """The float constants the region reads (its weights), each once."""
        seen: dict[int, Constant] = {}
        for node in self.nodes:
            for value in node.inputs:
                if value is None or value in self.layouts:
                    continue
                constant = self.ctx.constants.resolve(value)
                if isinstance(constant, Constant) and constant.dtype in FLOAT_TYPES:
                    seen.setdefault(id(constant.chain[-1]), constant)
        return tuple(seen.values())

    def _probe(self, n: int, m: int, has_bias: bool) -> algebra.AffineMap:
        """The map, read from the region run on ``n`` unit rows and a zero row."""
        k = n + 1
        layout = self.layouts[self.x]
        rows = np.vstack([np.eye(n), np.zeros((1, n))])
        # the input as it is now: an earlier merge may have put its own value in x's place
        x = self.nodes[0].inputs[self.index]
        arrays: dict[ir.Value, np.ndarray] = {x: rows.reshape(probe_shape(layout, k, n))}
        opset = self.ctx.opset
        for node in self.nodes:
            inputs = [self._input(node, i, v, arrays) for i, v in enumerate(node.inputs)]
            arrays[node.outputs[0]] = run_node(node, inputs, opset)[0]
        out = arrays[self.nodes[-1].outputs[0]].reshape(k, m)
        bias = out[n].copy() if has_bias else None
        return algebra.AffineMap(out[:n] - out[n], bias)

    def _input(
        self, node: ir.Node, index: int, value: ir.Value | None, arrays: dict
    ) -> np.ndarray | None:
        if value is None:
            return None
        if value in arrays:
            return arrays[value]
        if node.op_type == "Reshape" and index == 1:
            return self.targets[node]
        if (node, index) in self.tiled:  # a constant shaped like the rows: one row, repeated
            row, shape = self.tiled[node, index]
            return np.broadcast_to(row, shape).copy()
        array = np.asarray(self.ctx.constants.resolve(value).array())  # type: ignore[union-attr]
        return array.astype(np.float64) if array.dtype.kind == "f" else array


#: A node reading more values than this (a Concat of a wide model's branches) never asks for
#: the model's shapes to be inferred: no region joins so many.
_MOST_JOINED = 8


def _unshaped_candidate(node: ir.Node) -> bool:
    """``node`` could end or hold a region, and its output's shape is not recorded."""
    return (
        node.op_type in _MIXES
        and len(node.inputs) <= _MOST_JOINED
        and static_shape(node.outputs[0]) is None
    )


def _row_layer(ctx: Context, node: ir.Node, rows: tuple[int, ...]) -> bool:
    """``node`` is a ``MatMul`` of whole rows by a constant 2-D weight (a layer of the op table,
    taken into a region only as one of the branches a Concat joins)."""
    if not is_onnx(node, "MatMul") or len(node.inputs) != 2 or node.inputs[0] is None:
        return False
    weight = ctx.constants.resolve(node.inputs[1])
    return (
        isinstance(weight, Constant)
        and len(weight.shape) == 2
        and _is_row(node.inputs[0], rows)
        and _is_row(node.outputs[0], rows)
    )


def _structural(ctx: Context, node: ir.Node, rows: tuple[int, ...] | None = None) -> bool:
    """``node`` may be inside a region whose rows are ``rows`` (the leading axes of its own
    output when it ends the region): a shape op other than a product of whole rows by a matrix
    (an op of the op table), a Neg, or another elementwise op on a value that is not a whole
    row (on a row it is a step, for the chains)."""
    if not is_onnx(node) or not _one_output(node):
        return False
    if rows is None:
        shape = output_shape(ctx, node)
        if shape is None:
            return False
        rows = shape[:-1]
    if node.op_type in _SHAPE_OPS:
        if node.op_type in ("MatMul", "Einsum"):  # by a constant, and not of whole rows
            data = [v for v in node.inputs if v is not None and not ctx.constants.is_constant(v)]
            if len(data) != 1 or static_shape(data[0]) is None:
                return False
            return not (_is_row(data[0], rows) and _is_row(node.outputs[0], rows))
        return True
    if node.op_type not in ELEMENTWISE:
        return False
    if not _is_row(node.outputs[0], rows):
        return True
    # a Neg of a row inside a region (rotate_half's -x[..., h:]); one of the region's input
    # itself is a step, for the chains
    source = node.inputs[0].producer() if node.op_type == "Neg" and node.inputs else None
    return source is not None and source.op_type in _SHAPE_OPS and _structural(ctx, source, rows)


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
    ops = {n.op_type for n in nodes}
    return bool(ops & _MIXES) or ("Reshape" in ops and bool(ops & {"ReduceSum", "ReduceMean"}))


def _is_row(value: ir.Value, rows: tuple[int, ...]) -> bool:
    shape = static_shape(value)
    return shape is not None and shape[:-1] == rows


def _kept(nodes: list[ir.Node], inside: set[ir.Node]) -> tuple[ir.Node, ...]:
    """Nodes other nodes read too (and the nodes they read): left in place by a merge."""
    kept: set[ir.Node] = set()
    for node in reversed(nodes[:-1]):
        read_outside = any(
            v.is_graph_output() or any(u.node not in inside for u in v.uses()) for v in node.outputs
        )
        feeds_kept = any(u.node in kept for v in node.outputs for u in v.uses())
        if read_outside or feeds_kept:
            kept.add(node)
    return tuple(n for n in nodes if n in kept)
