"""Maps of the last axis written through reshapes of it: one linear op each (:func:`find_regions`).

Adapters that act on blocks of features reach an export as several nodes between a projection's
input (or output) and the value it reads (or gives):

    OFT, BOFT      Reshape(x, (..., r, b)) -> Einsum("...rk,rkc->...rc", R) -> Reshape back
    GraLoRA        Reshape -> Einsum by blocks of A -> Reshape/Transpose/Reshape -> Einsum by B -> Reshape
    RoAd           Reshape(y, (-1, 2, h)) -> Gather/Neg/Unsqueeze/Concat -> Reshape back (rotations)
    MiSS           Reshape(x, (..., r, b)) -> ReduceSum over the blocks
    rotate_half    Slice/Neg/Concat of the last axis

and scikit-learn's ``ColumnTransformer`` (skl2onnx) as column picks, a scaler per block and a
``Concat`` of the blocks (``ArrayFeatureExtractor -> Scaler``, ``-> Cast -> Mul -> Add``).

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
such constants, the sum of two such values, Einsum and MatMul by constant blocks, a Cast to the
type it reads, the ONNX-ML ArrayFeatureExtractor and Scaler (one rule per op type, in
:mod:`converter.fusion.linear.region_rules` and :mod:`converter.fusion.linear.region_ml`; which
nodes a region holds: :mod:`converter.fusion.linear.region_members`). A dynamic leading axis is
read as a stand-in size (:mod:`converter.fusion.linear.region_layout`).

**The map** is read by running the region (onnx's reference evaluator, node by node, float64) on
a probe: ``n`` unit rows and a zero row in place of ``x``'s rows, each Reshape's target given the
probe's row count in place of ``R``, a Cast to the type it reads passed through (the probe is
float64). Row ``i`` minus the zero row is ``W[i]``; the zero row is ``b``.

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
from converter.fusion.core.graph import label, node_name, op_key
from converter.fusion.linear import algebra
from converter.fusion.linear.linear_op import LinearOp, unmapping
from converter.fusion.linear.region_layout import (
    STAND_IN,
    Layout,
    Typed,
    infer_output,
    output_shape,
    probe_shape,
    split_axis,
    static_shape,
)
from converter.fusion.linear.region_members import (
    MAX_REGION_NODES,
    SHAPE_OPS,
    members,
    structural,
    unshaped_candidate,
)
from converter.fusion.linear.region_ml import ML_MIXES, SHAPE_KEEPING, adds_offset
from converter.fusion.linear.region_rules import RULES

__all__ = ["MAX_REGION_NODES", "find_regions"]

# A region holding one of these says why it is not one: a constant block, a column pick.
_EXPLAINED = (
    frozenset({"Einsum", "MatMul", "ReduceSum", "ReduceMean", "ScatterElements"}) | ML_MIXES
)


def find_regions(ctx: Context, graph: ir.Graph) -> tuple[list[LinearOp], list[Declined]]:
    """Every region of ``graph`` (in graph order), and why each region holding a constant block
    (an Einsum, MatMul or ReduceSum over blocks) or a column pick was not one."""
    order = {node: i for i, node in enumerate(graph)}
    if any(unshaped_candidate(n) for n in order):
        ctx.shapes.request()  # regions are read from shapes: infer them once, if not recorded
    taken: set[ir.Node] = set()
    found: list[LinearOp] = []
    declined: list[Declined] = []
    for node in reversed(list(graph)):  # the largest region first: later ends come first
        if node in taken or op_key(node) not in SHAPE_OPS or not _ends(ctx, node):
            continue
        result = _ending_at(ctx, node, order, taken)
        if isinstance(result, LinearOp):
            found.append(result)
            taken.update(n for n in result.nodes if n not in result.kept)
        elif result is not None:
            declined.append(result)
    found.reverse()
    return found, declined


def _ending_at(
    ctx: Context, end: ir.Node, order: dict[ir.Node, int], taken: set[ir.Node]
) -> LinearOp | Declined | None:
    """The region ending at ``end``: the largest, else the one without the elementwise steps of
    whole rows (a larger region may reach back across rows where a smaller one does not); or why
    the largest is not one (when a constant block or a column pick acts in it), or None."""
    reason: Declined | None = None
    tried: set[ir.Node] | None = None
    for steps in (True, False):
        inside = members(ctx, end, steps)
        if inside is None or inside[0] == tried or any(n in taken for n in inside[0]):
            continue
        tried = inside[0]
        region = _Region(ctx, sorted(inside[0], key=order.__getitem__), inside[1])
        result = region.op()
        if isinstance(result, LinearOp):
            return result
        if reason is None and region.explains:
            reason = Declined([node_name(n) for n in region.nodes], result)
    return reason


def _ends(ctx: Context, node: ir.Node) -> bool:
    """``node`` may end a region (whose rows are its output's leading axes, if known)."""
    shape = output_shape(ctx, node)
    return structural(ctx, node, None if shape is None else shape[:-1])


class _Region:
    """The nodes between one input ``x`` and the output of the last that act on rows alone."""

    def __init__(self, ctx: Context, nodes: list[ir.Node], x: ir.Value) -> None:
        self.ctx = ctx
        self.nodes = nodes
        self.x = x
        self.layouts: dict[ir.Value, Layout] = {}
        self.dtypes: dict[ir.Value, ir.DataType | None] = {}
        self.shapes: dict[ir.Node, tuple[int, ...]] = {}  # each node's output, as the rules read it
        self.targets: dict[ir.Node, np.ndarray] = {}  # each Reshape's target for the probe
        # constants shaped like a value of the region, the same in every row: (row, probe shape)
        self.tiled: dict[tuple[ir.Node, int], tuple[np.ndarray, tuple[int, ...]]] = {}
        self.rows = 0
        self.index = 0  # where the first node reads x
        self.dynamic = False  # x has a dynamic leading axis, read as STAND_IN

    @property
    def explains(self) -> bool:
        """Not being a region is worth a reason: a constant block or a column pick acts here."""
        return any(op_key(n) in _EXPLAINED for n in self.nodes)

    def shape(self, node: ir.Node) -> tuple[int, ...]:
        """``node``'s output shape, as read for the region (checked before its rule runs)."""
        return self.shapes[node]

    def dtype(self, value: ir.Value | None) -> ir.DataType | None:
        """The element type of a value of the region (recorded, or inferred)."""
        return self.dtypes.get(value) if value is not None else None

    def op(self) -> LinearOp | str:
        """The region as a linear op, or why it is not one."""
        x = self.x
        shape = self._input_shape()
        if isinstance(shape, str):
            return shape
        if x.dtype not in FLOAT_TYPES:
            return "the values are not all of one float type"
        self.rows = math.prod(shape[:-1])
        if self.rows == 0:
            return "the input has no rows"
        first = self.nodes[0]
        if not any(v is x for v in first.inputs):
            return "the first node does not read the input"
        self.index = next(i for i, v in enumerate(first.inputs) if v is x)
        self.layouts[x] = Layout(shape, split_axis(shape, self.rows))
        self.dtypes[x] = x.dtype
        for node in self.nodes:
            found = self._layout(node)
            if isinstance(found, str):
                return (
                    f"not a map of each row's features: {node.op_type} '{node_name(node)}' {found}"
                )
            self.layouts[node.outputs[0]] = found
        y = self.nodes[-1].outputs[0]
        if self.dtypes[y] != x.dtype:
            return "the values are not all of one float type"
        if self.layouts[y].shape[:-1] != shape[:-1]:
            return "the output does not keep the input's rows (its leading axes)"
        return self._linear_op()

    def _input_shape(self) -> tuple[int, ...] | str:
        """``x``'s shape, each dynamic leading axis read as :data:`STAND_IN`, or why none."""
        x = self.x
        if x.shape is None:
            return f"the input '{label(x)}' has no recorded shape: its rows and width are unknown"
        dims = list(x.shape)
        if len(dims) < 2:
            return f"the input '{label(x)}' has {len(dims)} axes: no rows of features"
        if not isinstance(dims[-1], int) or dims[-1] <= 0:
            return f"the input '{label(x)}' has a last axis of unknown size"
        self.dynamic = not all(isinstance(d, int) for d in dims)
        return tuple(d if isinstance(d, int) else STAND_IN for d in dims)

    def _layout(self, node: ir.Node) -> Layout | str:
        shape, dtype = self._typed(node)
        if shape is None:
            return "has an output whose shape is neither recorded nor inferred"
        rule = RULES.get(op_key(node))
        if rule is None:
            return "is not a map of rows"
        self.shapes[node] = shape
        self.dtypes[node.outputs[0]] = dtype
        found = rule(self, node)
        if isinstance(found, str):
            return found
        if found.shape != shape:
            return f"gives shape {list(found.shape)}, not the recorded {list(shape)}"
        if math.prod(shape) % self.rows:
            return "mixes rows"
        return found

    def _typed(self, node: ir.Node) -> Typed:
        """``node``'s output shape and type: recorded (not when the rows are dynamic: then every
        shape is read from the stand-in), else inferred from the values before it."""
        out = node.outputs[0]
        shape = None if self.dynamic else output_shape(self.ctx, node)
        if shape is not None and out.dtype is not None:
            return shape, out.dtype
        inferred, dtype = infer_output(self.ctx, node, self._known)
        if inferred is None and op_key(node) in SHAPE_KEEPING and node.inputs[0] in self.layouts:
            inferred = self.layouts[node.inputs[0]].shape
        return (shape if shape is not None else inferred), out.dtype or dtype

    def _known(self, value: ir.Value) -> Typed:
        if value in self.layouts:
            return self.layouts[value].shape, self.dtypes.get(value)
        return static_shape(value), value.dtype  # a value the rule reads as a constant

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
            or adds_offset(n)
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
        opset, domains = self.ctx.opset, self.ctx.model.opset_imports
        for node in self.nodes:
            inputs = [self._input(node, i, v, arrays) for i, v in enumerate(node.inputs)]
            if op_key(node) == "Cast":  # to the type it reads (its rule): float64 stays float64
                arrays[node.outputs[0]] = inputs[0]
                continue
            arrays[node.outputs[0]] = run_node(node, inputs, opset, domains)[0]
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
