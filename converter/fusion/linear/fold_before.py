"""Constant steps folded into the linear op they reach through views: the input side.

``z = L(view(step(x)))`` where ``view`` is a run of nodes that keep ``L``'s input features on one
axis (``Reshape``/``Flatten``, ``Transpose``, ``Squeeze``/``Unsqueeze``, ``Identity``, a ``Cast``
to the type it has), or a ``ReduceMean`` over other axes (a mean over rows commutes with a map
of each row: ``mean(x * s + t) = mean(x) * s + t``), and ``step`` a constant ``Mul``/``Div``/
``Add``/``Sub``/``Neg`` (or an inference ``BatchNormalization``) that varies only along those
features, or the affine tail of a normalisation that applies its scale inside
(:mod:`converter.fusion.linear.norm_tail`)::

    step = x * s + t   ->   W' = diag(s) @ W,   b' = t @ W + b

so ``z = L'(view(x))``: the step is taken out and the views stay; ``L'``'s output holds what
``L``'s did. This is tf2onnx's ``Dense`` on a rank-3 input (``Reshape -> MatMul``: ``Tensordot``)
after a Keras LayerNorm, and ``GlobalAveragePooling1D`` (``ReduceMean`` over the tokens) between
the last LayerNorm and the head. A step directly before ``L`` is the chain's business
(:mod:`converter.fusion.linear.chains`); one after ``L``'s views is
:mod:`converter.fusion.linear.absorb`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant, axes_of
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import is_onnx, single_reader
from converter.fusion.core.merge import Finder, Merge, Round, Written
from converter.fusion.core.steps import constant_step
from converter.fusion.core.writing import take_out
from converter.fusion.linear import algebra, chains
from converter.fusion.linear.absorb import STEP_TYPES, StepFold, step_map
from converter.fusion.linear.linear_op import LinearOp
from converter.fusion.linear.norm_tail import NormTail, norm_tail
from converter.fusion.linear.rewrite import Decision
from converter.fusion.linear.views import VIEW_OPS, Features, follow, static_dims

__all__ = ["Before", "FoldBefore", "FoldsBeforeViews", "find_befores"]

#: The views a step is followed back through (a Split's other outputs would lose the step).
_BACK_VIEWS = VIEW_OPS - {"Split"}
_LONGEST = 16  # views followed back from an op, at most


@dataclass(eq=False)
class Before:
    """The step ``step`` (a node, or a normalisation's tail) folds into ``op`` across ``views``
    (in graph order); ``scale``/``shift`` are on ``op``'s input features ``[start, stop)``."""

    op: LinearOp
    views: list[ir.Node]
    step: ir.Node | NormTail
    data: ir.Value | None  # the step node's data input (None for a tail)
    features: Features
    scale: np.ndarray
    shift: np.ndarray | None

    @property
    def step_nodes(self) -> list[ir.Node]:
        return self.step.nodes if isinstance(self.step, NormTail) else [self.step]

    @property
    def names(self) -> list[str]:
        return [
            *(n.name or n.op_type for n in self.step_nodes),
            *_names(self.views),
            *self.op.names,
        ]

    @property
    def note(self) -> str:
        through = ", ".join(dict.fromkeys(v.op_type for v in self.views))
        tail = isinstance(self.step, NormTail)
        what = "a LayerNorm's gamma and beta" if tail else self.step.op_type
        return f"{what} folded into {self.op.names[0]} through {through} before it"

    def alive(self, graph: ir.Graph) -> bool:
        nodes = [*self.op.nodes, *self.views, *self.step_nodes]
        if not all(n.graph is graph for n in nodes):
            return False
        if isinstance(self.step, NormTail):
            return self.step.alive(graph)
        return self.data in self.step.inputs

    def affine(self) -> algebra.AffineMap:
        """The step then ``op``, in float64: ``W' = diag(s) W``, ``b' = t W + b``."""
        base, f = self.op.affine, self.features
        weight = base.weight.copy()
        weight[f.start : f.stop] *= self.scale[:, None]
        bias = None if base.bias is None else np.array(base.bias, np.float64)
        if self.shift is not None:
            moved = self.shift @ base.weight[f.start : f.stop]
            bias = moved if bias is None else bias + moved
        return algebra.AffineMap(weight, bias)

    def take_out(self) -> None:
        """Remove the step: what read it reads its data (the normalised value for a tail)."""
        if isinstance(self.step, NormTail):
            self.step.take_out()
            return
        assert self.data is not None
        take_out(self.step, self.data)


def find_befores(
    ctx: Context, ops: list[LinearOp], label: str
) -> tuple[list[Before], list[Declined]]:
    """Every step that folds into a Gemm/MatMul of ``ops`` from before at least one view."""
    found: list[Before] = []
    declined: list[Declined] = []
    for op in ops:
        if not op.is_matrix or op.axis != -1 or op.ends_chain or op.input_perm is not None:
            continue
        producer = op.input.producer()
        if producer is None or not _is_back_view(producer):
            continue  # (cheap test first: shapes are asked for only beside a view)
        dims = static_dims(ctx, op.input)
        if dims is None:
            continue
        result = _walk(ctx, op, Features(len(dims) - 1, len(dims), 0, op.in_features))
        if isinstance(result, Declined):
            declined.append(result.about(result.nodes, label))
        elif result is not None:
            found.append(result)
    return found, declined


def _walk(ctx: Context, op: LinearOp, f: Features) -> Before | Declined | None:
    """Back from ``op``'s input through views to a step, or None where nothing folds."""
    value, reader, views = op.input, op.nodes[0], []
    for _ in range(_LONGEST):
        if single_reader(value) is not reader:
            return None  # another node reads the value the step would no longer make
        node = value.producer()
        if node is None or not is_onnx(node):
            return None
        step = _step(ctx, node, value, f) if views else None
        if isinstance(step, Declined):
            return step.about([*step.nodes, *_names(views), *op.names])
        if step is not None:
            found, data, (scale, shift) = step
            return Before(op, views, found, data, f, np.asarray(scale, np.float64), shift)
        g = _back(ctx, node, f)
        if g is None:
            return None
        views.insert(0, node)
        value, reader, f = node.inputs[0], node, g
    return None


def _step(ctx: Context, node: ir.Node, out: ir.Value, f: Features):
    """``(step, its data input, (scale, shift) on f)`` for the step making ``out``, why it
    does not fold, or None (not a step)."""
    name = [node.name or node.op_type]
    tail = norm_tail(ctx, out) if node.op_type == "Add" else None
    if tail is not None:
        if f.axis is not None and f.axis != f.rank - 1:
            return Declined(
                [tail.name],
                "the LayerNorm's gamma and beta vary along its last axis, and the features "
                f"the op reads lie along axis {f.axis} of rank {f.rank}",
            )
        return tail, None, tail.vectors(f.width)
    if node.op_type in ("Neg", "BatchNormalization"):
        data = node.inputs[0]
    elif node.op_type in STEP_TYPES:
        binary = constant_step(ctx, node)
        if binary is None:
            return None
        if isinstance(binary, Declined):
            return binary.about(name)
        data = binary.data
    else:
        return None
    if data is None or not _keeps_shape(ctx, node, data):
        return None
    mapped = step_map(ctx, node, data, f)
    return mapped.about(name) if isinstance(mapped, Declined) else (node, data, mapped)


def _keeps_shape(ctx: Context, node: ir.Node, data: ir.Value) -> bool:
    """The step's output has its data's shape (its constant never broadcasts the data up), so
    a ``Shape`` of it reads the same from the data."""
    if node.op_type in ("Neg", "BatchNormalization"):
        return True
    dims = static_dims(ctx, data)
    other = next(v for v in node.inputs if v is not data)
    const = ctx.constants.resolve(other) if other is not None else None
    if dims is None or not isinstance(const, Constant) or len(const.shape) > len(dims):
        return False
    return all(c == 1 or c == d for c, d in zip(const.shape[::-1], dims[::-1], strict=False))


def _back(ctx: Context, node: ir.Node, f: Features) -> Features | None:
    """Where the features ``f`` of ``node``'s output lie in its input, or None."""
    data = node.inputs[0] if node.inputs else None
    dims = None if data is None else static_dims(ctx, data)
    if dims is None or len(node.outputs) != 1:
        return None
    if node.op_type == "ReduceMean":
        return _before_mean(ctx, node, f, len(dims))
    if node.op_type not in _BACK_VIEWS:
        return None
    if f.axis is not None:
        for axis in range(len(dims)):
            g = Features(axis, len(dims), f.start, f.stop)
            if follow(ctx, node, 0, g, data) == f:
                return g
    scalar = Features(None, None, f.start, f.stop)  # only a scalar step still folds
    return scalar if follow(ctx, node, 0, scalar, data) is not None else None


def _before_mean(ctx: Context, node: ir.Node, f: Features, rank: int) -> Features | None:
    """A ``ReduceMean`` over axes other than the features' (a mean of rows)."""
    axes = axes_of(ctx.constants, node)
    if not axes:
        return None  # over every axis (or none, with noop_with_empty_axes): not a mean of rows
    axes = sorted({a + rank if a < 0 else a for a in axes})
    if f.axis is None:
        return f
    if node.attributes.get_int("keepdims", 1):
        return None if f.axis in axes or f.rank != rank else Features(f.axis, rank, f.start, f.stop)
    kept = [i for i in range(rank) if i not in axes]
    return Features(kept[f.axis], rank, f.start, f.stop) if len(kept) == f.rank else None


def _names(nodes: list[ir.Node]) -> list[str]:
    return [n.name or n.op_type for n in nodes]


class FoldBefore(StepFold):
    """One step folded into the op it reaches through views of its input: ``W' = diag(s) W``,
    ``b' = t W + b``."""

    found: Before

    @property
    def old_nodes(self) -> list[ir.Node]:
        return [*self.found.step_nodes, *self.found.op.nodes]

    def write(self, round: Round, plan: Decision, computed: algebra.AffineMap) -> Written:
        """The op with the step's values in it takes the op's place; the step goes, and the
        values between them are renamed."""
        found = self.found
        nodes = [*found.step_nodes, *found.views, *found.op.nodes]
        written = self._written(round, plan, computed, nodes)
        found.take_out()
        _rename_unstepped(round.ctx, found)
        return written


def _rename_unstepped(ctx: Context, before: Before) -> None:
    """The values between the step and the op hold other values than the original's under
    those names now (the step is gone): fresh names, so that no record or comparison takes
    them for the original's (none is a graph output: each has one reader)."""
    values = [v for n in before.views for v in n.outputs]
    if isinstance(before.step, NormTail):
        values.insert(0, before.step.out)
    for value in values:
        value.name = ctx.names.fresh(f"{value.name or 'value'}.unstepped")


class FoldsBeforeViews(Finder):
    """Every constant step that folds into a Gemm/MatMul of the round's chains from before
    views of its input."""

    def find(self, round: Round) -> list[Merge | Declined]:
        runs = round.shared(chains.analyse).runs
        ops = [op for run in runs for op in run if not (op.kept or op.through)]
        befores, declined = find_befores(round.ctx, ops, round.label)
        return [*declined, *(FoldBefore(before) for before in befores)]

    def pending(self, round: Round, written: list[ir.Node]) -> bool:
        """A merged op now makes a step that reaches a Gemm/MatMul through views (a chain wrote
        ``MatMul -> Add`` whose ``Add`` is read by ``Transpose -> MatMul``): one more round."""
        if not any(_near_view(n) for n in written):  # cheap test first: most are near none
            return False
        return any(isinstance(found, FoldBefore) for found in self.find(round))


def _near_view(node: ir.Node) -> bool:
    """The merged op reads a view or a mean, or it (or the bias ``Add`` after it) is read by one."""
    data = node.inputs[0] if node.inputs else None
    producer = None if data is None else data.producer()
    if producer is not None and _is_back_view(producer):
        return True
    out = node.outputs[0]
    reader = single_reader(out)
    if reader is not None and reader.op_type == "Add" and len(out.uses()) == 1:
        reader = single_reader(reader.outputs[0])  # MatMul + Add: the Add's reader
    return reader is not None and _is_back_view(reader)


def _is_back_view(node: ir.Node) -> bool:
    return node.op_type in _BACK_VIEWS or node.op_type == "ReduceMean"
