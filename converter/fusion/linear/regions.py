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
such constants, the sum of two such values, Einsum and MatMul by constant blocks.

**The map** is read by running the region (onnx's reference evaluator, node by node, float64) on
a probe: ``n`` unit rows and a zero row in place of ``x``'s rows, each Reshape's target given the
probe's row count in place of ``R``. Row ``i`` minus the zero row is ``W[i]``; the zero row is ``b``.

Nodes of the region that other nodes read too (the ``Reshape(x)`` the q and v adapters share after
the exporter's common-subexpression elimination) are the op's ``kept`` nodes: left in place by a
merge, and removed with their last reader.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from converter.fusion.core.computed import MAX_ELEMENTS, node_proto, run_node
from converter.fusion.core.constants import Constant, axes_of
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.dtypes import FLOAT_TYPES
from converter.fusion.core.graph import is_onnx, node_name
from converter.fusion.linear import algebra
from converter.fusion.linear.linear_op import LinearOp, unmapping

__all__ = ["MAX_REGION_NODES", "find_regions"]

#: The most nodes one region may hold (a bound on each backward search).
MAX_REGION_NODES = 64

_SHAPE_OPS = frozenset(
    {
        "Concat", "Einsum", "Gather", "MatMul", "ReduceMean", "ReduceSum", "Reshape", "Slice",
        "Split", "Squeeze", "Transpose", "Unsqueeze",
    }
)  # fmt: skip
_ELEMENTWISE = frozenset({"Add", "Div", "Identity", "Mul", "Neg", "Sub"})
# A region holds one of these at least: ops that select, move or mix features.
_MIXES = frozenset({"Concat", "Einsum", "Gather", "MatMul", "Slice", "Split"})


@dataclass(frozen=True)
class _Layout:
    """A value of the region: its static shape and its split (see the module docstring)."""

    shape: tuple[int, ...]
    split: int


# A node's layout rule: the output's layout, or why the node does not act on rows alone.
_Rule = Callable[["_Region", ir.Node], "_Layout | str"]


def find_regions(ctx: Context, graph: ir.Graph) -> tuple[list[LinearOp], list[Declined]]:
    """Every region of ``graph`` (in graph order), and why each region holding a constant block
    (an Einsum, MatMul or ReduceSum over blocks) was not one."""
    order = {node: i for i, node in enumerate(graph)}
    if any(n.op_type in _MIXES and _static(n.outputs[0]) is None for n in order):
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
        self.layouts: dict[ir.Value, _Layout] = {}
        self.targets: dict[ir.Node, np.ndarray] = {}  # each Reshape's target for the probe
        self.rows = 0
        self.index = 0  # where the first node reads x

    @classmethod
    def backward(cls, ctx: Context, end: ir.Node, order: dict[ir.Node, int]) -> _Region | None:
        """The structural nodes ``end`` is computed by, back to one input; None if not one."""
        rows_shape = _output_shape(ctx, end)
        if rows_shape is None or len(rows_shape) < 2:
            return None
        rows = rows_shape[:-1]
        members = {end}
        stack = [end]
        sources: set[ir.Value] = set()
        while stack:
            node = stack.pop()
            for value in node.inputs:
                if value is None or ctx.constants.is_constant(value):
                    continue
                if value.dtype is not None and value.dtype not in FLOAT_TYPES:
                    return None  # a shape or an index computed at run time
                producer = value.producer()
                if producer in members:
                    continue
                inside = producer is not None and producer.graph is end.graph
                if inside and _structural(ctx, producer, rows):
                    if len(members) >= MAX_REGION_NODES:
                        return None
                    members.add(producer)
                    stack.append(producer)
                else:
                    sources.add(value)
        if len(sources) != 1 or not _computes(members):
            return None
        (x,) = sources
        if _static(x) is None or _static(x)[:-1] != rows:
            return None
        return cls(ctx, sorted(members, key=order.__getitem__), x)

    @property
    def has_blocks(self) -> bool:
        """A constant block acts here (an Einsum or MatMul by a constant, a sum over blocks)."""
        return any(n.op_type in ("Einsum", "MatMul", "ReduceSum", "ReduceMean") for n in self.nodes)

    def op(self) -> LinearOp | str:
        """The region as a linear op, or why it is not one."""
        x = self.x
        if x.dtype not in FLOAT_TYPES or self.nodes[-1].outputs[0].dtype != x.dtype:
            return "the values are not all of one float type"
        shape = _static(x)
        assert shape is not None
        self.rows = math.prod(shape[:-1])
        if self.rows == 0:
            return "the input has no rows"
        first = self.nodes[0]
        if not any(v is x for v in first.inputs):
            return "the first node does not read the input"
        self.index = next(i for i, v in enumerate(first.inputs) if v is x)
        self.layouts[x] = _Layout(shape, _split(shape, self.rows))
        for node in self.nodes:
            found = self._layout(node)
            if isinstance(found, str):
                return (
                    f"not a map of each row's features: {node.op_type} '{node_name(node)}' {found}"
                )
            self.layouts[node.outputs[0]] = found
        return self._linear_op()

    def _layout(self, node: ir.Node) -> _Layout | str:
        shape = _output_shape(self.ctx, node)
        if shape is None:
            return "has an output whose shape is not recorded"
        rule = _RULES.get(node.op_type)
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

    def data(self, node: ir.Node) -> list[tuple[int, _Layout]]:
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
        has_bias = any(n.op_type in ("Add", "Sub") and len(self.data(n)) == 1 for n in self.nodes)

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
        arrays: dict[ir.Value, np.ndarray] = {x: rows.reshape(_probe_shape(layout, k, n))}
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
        array = np.asarray(self.ctx.constants.resolve(value).array())  # type: ignore[union-attr]
        return array.astype(np.float64) if array.dtype.kind == "f" else array


def _static(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is None or not value.shape.is_static():
        return None
    return tuple(int(d) for d in value.shape)


def _output_shape(ctx: Context, node: ir.Node) -> tuple[int, ...] | None:
    """The static shape of ``node``'s first output: recorded, or inferred by onnx for this node
    alone from its inputs' shapes and its constant inputs' values (the legacy exporter records
    no shape for a Slice whose ends it computes from a Shape)."""
    out = node.outputs[0]
    shape = _static(out)
    if shape is not None:
        return shape
    types, data = {}, {}
    for i, value in enumerate(node.inputs):
        if value is None:
            continue
        dims = _static(value)
        constant = ctx.constants.resolve(value)
        if isinstance(constant, Constant):
            dims = constant.shape
            if constant.size <= 64:
                data[f"in{i}"] = onnx.numpy_helper.from_array(
                    np.asarray(constant.array()), f"in{i}"
                )
        if dims is None or value.dtype is None:
            return None
        types[f"in{i}"] = onnx.helper.make_tensor_type_proto(int(value.dtype), list(dims))
    try:
        schema = onnx.defs.get_schema(node.op_type, ctx.opset, node.domain)
        found = onnx.shape_inference.infer_node_outputs(schema, node_proto(node), types, data)
    except Exception:  # no answer: the shape stays unknown
        return None
    tensor = found.get("out0")
    if tensor is None or not tensor.tensor_type.HasField("shape"):
        return None
    dims = tensor.tensor_type.shape.dim
    if not all(d.HasField("dim_value") for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def _split(shape: tuple[int, ...], rows: int) -> int:
    """The first axis of ``shape`` (1 or later) from which on the axes index inside a row."""
    width = math.prod(shape) // rows
    return next(j for j in range(1, len(shape) + 1) if width % math.prod(shape[j:]) == 0)


def _probe_shape(layout: _Layout, probe_rows: int, width: int) -> tuple[int, ...]:
    """``layout``'s shape with ``probe_rows`` rows of ``width`` in place of its rows."""
    j = layout.split
    inner = math.prod(layout.shape[j:])
    return (1,) * (j - 1) + (probe_rows * width // inner,) + layout.shape[j:]


def _structural(ctx: Context, node: ir.Node, rows: tuple[int, ...] | None = None) -> bool:
    """``node`` may be inside a region whose rows are ``rows`` (the leading axes of its own
    output when it ends the region): a shape op other than a product of whole rows by a matrix
    (an op of the op table), a Neg, or another elementwise op on a value that is not a whole
    row (on a row it is a step, for the chains)."""
    if not is_onnx(node) or not _one_output(node):
        return False
    if rows is None:
        shape = _output_shape(ctx, node)
        if shape is None:
            return False
        rows = shape[:-1]
    if node.op_type in _SHAPE_OPS:
        if node.op_type in ("MatMul", "Einsum"):  # by a constant, and not of whole rows
            data = [v for v in node.inputs if v is not None and not ctx.constants.is_constant(v)]
            if len(data) != 1 or _static(data[0]) is None:
                return False
            return not (_is_row(data[0], rows) and _is_row(node.outputs[0], rows))
        return True
    if node.op_type not in _ELEMENTWISE:
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
    shape = _static(value)
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


# ---------------------------------------------------------------- layout rules, one per op


def _normalized(axes: list[int] | None, rank: int) -> list[int] | None:
    if axes is None or any(not -rank <= a < rank for a in axes):
        return None
    return [a % rank for a in axes]


def _one_data(region: _Region, node: ir.Node) -> tuple[int, _Layout] | str:
    data = region.data(node)
    if len(data) != 1:
        return "reads more than one value of the region"
    return data[0]


def _reshape(region: _Region, node: ir.Node) -> _Layout | str:
    found = _one_data(region, node)
    if isinstance(found, str):
        return found
    index, layout = found
    shape = _static(node.outputs[0])
    if index != 0 or not region.ctx.constants.is_constant(node.inputs[1]):
        return "has a target that is not constant"
    if shape is None or math.prod(shape) != math.prod(layout.shape):
        return "changes the number of elements"
    split = _split(shape, region.rows)
    out = _Layout(shape, split)
    width = math.prod(shape) // region.rows
    probe_rows = region.layouts[region.x].shape[-1] + 1
    region.targets[node] = np.asarray(_probe_shape(out, probe_rows, width), np.int64)
    return out


def _transpose(region: _Region, node: ir.Node) -> _Layout | str:
    found = _one_data(region, node)
    if isinstance(found, str):
        return found
    _, layout = found
    perm = node.attributes.get_ints("perm", None)
    rank = len(layout.shape)
    perm = list(perm) if perm is not None else list(range(rank))[::-1]
    if perm[: layout.split] != list(range(layout.split)):
        return f"moves the rows (perm {perm})"
    return _Layout(tuple(layout.shape[p] for p in perm), layout.split)


def _on_axes(region: _Region, node: ir.Node, axes: list[int] | None, rank_of: int) -> _Layout | str:
    """A node acting on ``axes`` (of a tensor of rank ``rank_of``) of its one region input."""
    found = _one_data(region, node)
    if isinstance(found, str):
        return found
    _, layout = found
    normal = _normalized(axes, rank_of)
    if normal is None:
        return "has axes that are not constant"
    if any(a < layout.split for a in normal):
        return "acts across rows"
    shape = _output_shape(region.ctx, node)
    assert shape is not None
    return _Layout(shape, layout.split)


def _slice(region: _Region, node: ir.Node) -> _Layout | str:
    rank = len(region.layouts[node.inputs[0]].shape) if node.inputs[0] in region.layouts else 0
    starts = region.ctx.constants.array(node.inputs[1]) if len(node.inputs) > 1 else None
    if not isinstance(starts, np.ndarray):
        return "has starts that are not constant"
    axes: list[int] | None = list(range(len(starts)))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        given = region.ctx.constants.array(node.inputs[3])
        axes = [int(a) for a in given] if isinstance(given, np.ndarray) else None
    return _on_axes(region, node, axes, rank)


def _gather(region: _Region, node: ir.Node) -> _Layout | str:
    if node.inputs[0] not in region.layouts:
        return "gathers from a constant"
    rank = len(region.layouts[node.inputs[0]].shape)
    return _on_axes(region, node, [node.attributes.get_int("axis", 0)], rank)


def _split_first(region: _Region, node: ir.Node) -> _Layout | str:
    """The first part of a ``Split`` (the others unread)."""
    if node.inputs[0] not in region.layouts:
        return "splits a constant"
    rank = len(region.layouts[node.inputs[0]].shape)
    return _on_axes(region, node, [node.attributes.get_int("axis", 0)], rank)


def _reduce(region: _Region, node: ir.Node) -> _Layout | str:
    if node.inputs[0] not in region.layouts:
        return "reduces a constant"
    rank = len(region.layouts[node.inputs[0]].shape)
    return _on_axes(region, node, axes_of(region.ctx.constants, node), rank)


def _squeeze(region: _Region, node: ir.Node) -> _Layout | str:
    if node.inputs[0] not in region.layouts:
        return "squeezes a constant"
    rank = len(region.layouts[node.inputs[0]].shape)
    return _on_axes(region, node, axes_of(region.ctx.constants, node), rank)


def _unsqueeze(region: _Region, node: ir.Node) -> _Layout | str:
    out = _output_shape(region.ctx, node)
    assert out is not None
    return _on_axes(region, node, axes_of(region.ctx.constants, node), len(out))


def _concat(region: _Region, node: ir.Node) -> _Layout | str:
    data = region.data(node)
    if len(data) != len(node.inputs):
        return "joins a constant"
    splits = {layout.split for _, layout in data}
    rank = len(data[0][1].shape)
    axis = _normalized([node.attributes.get_int("axis", 0)], rank)
    if len(splits) != 1 or axis is None or axis[0] < data[0][1].split:
        return "joins across rows"
    shape = _output_shape(region.ctx, node)
    assert shape is not None
    return _Layout(shape, data[0][1].split)


def _elementwise(region: _Region, node: ir.Node) -> _Layout | str:
    data = region.data(node)
    shape = _output_shape(region.ctx, node)
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


def _product(region: _Region, node: ir.Node) -> _Layout | str:
    """``MatMul`` or ``Einsum`` of a value of the region by a constant (the other operand)."""
    found = _one_data(region, node)
    if isinstance(found, str):
        return found
    index, layout = found
    if len(node.inputs) != 2:
        return "does not have two operands"
    constant = region.ctx.constants.resolve(node.inputs[1 - index])
    if not isinstance(constant, Constant):
        return "multiplies two values of the region"
    shape = _output_shape(region.ctx, node)
    assert shape is not None
    reason = (
        _einsum_reason(node, index, layout)
        if node.op_type == "Einsum"
        else _matmul_reason(index, layout, constant.shape)
    )
    return reason or _Layout(shape, layout.split)


def _matmul_reason(index: int, layout: _Layout, weight: tuple[int, ...]) -> str | None:
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


def _einsum_reason(node: ir.Node, index: int, layout: _Layout) -> str | None:
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


_RULES: dict[str, _Rule] = {
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
    **dict.fromkeys(_ELEMENTWISE, _elementwise),
}
