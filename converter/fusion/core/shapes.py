"""Shapes for decisions, never guessed: ONNX shape inference, on demand, and ranks carried back.

Which axis of a value holds a linear op's features after a ``Reshape`` or ``Transpose``, whether
a constant varies only along that axis, how wide a scale is: all are proved from shapes. Exports
without ``value_info`` (torch's legacy exporter writes none) get them from ONNX shape inference,
run at most once per run and only when a decision asks for a shape the model does not record
(:meth:`Shapes.request`): a model whose decisions need no shape pays nothing. Inference runs on a
copy of the graph in which every initializer larger than a few values is a typed graph input
(weights are never copied), and its results are set on the values only for the run: the undo
puts every recorded type and shape back, so the written model carries no ``value_info`` it did
not have.

A value whose shape is not recorded may still have a known rank (:meth:`Shapes.rank`): carried
back through the linear ops and elementwise steps that produced it. Ranks are remembered for the
run, and forgotten when inference sets new shapes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import onnx
import onnx_ir as ir

from converter.fusion.core.constants import Constant, Constants
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import is_onnx

__all__ = ["Shapes"]

logger = logging.getLogger(__name__)

_LINEAR = frozenset({"Gemm", "MatMul", "Einsum", "Conv"})
_SMALL = 64  # initializers up to this many elements stay (Reshape targets, axes: data matters)
_SAME_RANK = frozenset({"Relu", "Neg", "Identity", "Tanh", "Sigmoid", "BatchNormalization", "Cast"})
# ONNX-ML ops, whose output shapes ONNX shape inference does not always give: by their
# definition (onnxruntime's kernels), a Scaler keeps its input's shape, an ArrayFeatureExtractor
# its input's rank (2 for a 1-D input: one row), a regressor writes [N, targets], a classifier
# labels [N] and scores [N, classes].
_ML_SAME_RANK = frozenset({"Scaler", "ArrayFeatureExtractor"})
_ML_AT_LEAST_2 = frozenset({"ArrayFeatureExtractor"})
_ML_RANKS = {"LinearRegressor": (2,), "LinearClassifier": (1, 2)}
_STEPS = ("Add", "Sub", "Mul", "Div")


class Shapes:
    """One run's shapes: inference on demand (within :meth:`on_demand`), and the ranks known."""

    def __init__(self, model: ir.Model, constants: Constants) -> None:
        self._model = model
        self._constants = constants
        self._enabled = False
        self._undo: list[Callable[[], None]] = []
        self._ranks: dict[ir.Value, int] = {}

    @contextlib.contextmanager
    def on_demand(self) -> Iterator[None]:
        """Within this block, :meth:`request` infers the model's shapes once; undone at the end."""
        self._enabled = True
        try:
            yield
        finally:
            self._enabled = False
            for undo in self._undo:
                undo()
            if self._undo:
                self._ranks.clear()
            self._undo.clear()

    def request(self) -> bool:
        """A decision needs a shape the model does not record: infer shapes now if not done yet
        in this run. True when new shapes were just set (the caller asks again)."""
        if not self._enabled or self._undo:
            return False
        if not any(n.op_type in _LINEAR for n in self._model.graph):
            return False
        self._undo.append(_infer(self._model))
        self._ranks.clear()
        self._constants.forget_refusals()  # a Shape of a value now shaped is a constant
        return True

    def rank(self, value: ir.Value) -> int | None:
        """The rank of ``value`` (see :meth:`_rank`), asking for inferred shapes if unknown."""
        rank = self._rank(value)
        if rank is None and self.request():
            rank = self._rank(value)
        return rank

    def _rank(self, value: ir.Value) -> int | None:
        """The rank of ``value``: from its shape, or else carried back through the linear ops and
        elementwise steps that produced it (a Gemm gives 2; ``x @ W`` and a step keep ``x``'s
        rank, a step's constant may raise it). None when nothing says.

        Deciding from the rank a chain's *input* has, rather than from whatever shapes happen to
        be recorded on its intermediates, makes a decision the same before and after a merge.
        """
        pending: list[ir.Value] = []
        rank: int | None = None
        current: ir.Value | None = value
        while current is not None:
            if current.shape is not None:
                rank = len(current.shape)
                break
            if current in self._ranks:
                rank = self._ranks[current]
                break
            pending.append(current)
            current, rank = self._rank_source(current)
            if rank is not None:
                break
        for v in reversed(pending):  # each value's rank is its source's, or more (a broadcast)
            rank = self._raised(v, rank)
            if rank is not None:  # a known rank never changes; an unknown one may become known
                self._ranks[v] = rank  # when a merge replaces what produced it
        return rank

    def _rank_source(self, value: ir.Value) -> tuple[ir.Value | None, int | None]:
        """The value whose rank ``value`` has (or a fixed rank), from its producer."""
        node = value.producer()
        if node is not None and node.domain == "ai.onnx.ml":
            return _ml_rank_source(node, value)
        if not is_onnx(node) or not node.inputs or node.inputs[0] is None:
            return None, None
        if node.op_type == "Gemm":
            return None, 2
        if node.op_type == "MatMul" and len(node.inputs) == 2 and node.inputs[1] is not None:
            for w_at, x_at in ((1, 0), (0, 1)):  # x @ W, or W @ x (a left MatMul)
                w = self._constants.resolve(node.inputs[w_at])
                if isinstance(w, Constant) and len(w.shape) == 2:
                    return node.inputs[x_at], None
            return None, None
        if node.op_type in _SAME_RANK:
            return node.inputs[0], None
        if node.op_type in _STEPS and len(node.inputs) == 2:
            resolve = self._constants.resolve
            data = [v for v in node.inputs if v is not None and isinstance(resolve(v), Declined)]
            return (data[0], None) if len(data) == 1 else (None, None)
        return None, None

    def _raised(self, value: ir.Value, rank: int | None) -> int | None:
        """``rank`` raised by the constant operand of the binary step producing ``value`` (or to
        the 2 an ArrayFeatureExtractor gives a 1-D input)."""
        node = value.producer()
        if rank is not None and node is not None and node.domain == "ai.onnx.ml":
            return max(rank, 2) if node.op_type in _ML_AT_LEAST_2 else rank
        if rank is None or node is None or node.op_type not in _STEPS:
            return rank
        consts = [self._constants.resolve(v) for v in node.inputs]
        return max([rank] + [len(c.shape) for c in consts if isinstance(c, Constant)])


def _ml_rank_source(node: ir.Node, value: ir.Value) -> tuple[ir.Value | None, int | None]:
    """The rank an ONNX-ML op's output ``value`` has by the op's definition, or its input."""
    if node.op_type in _ML_SAME_RANK and node.inputs and node.inputs[0] is not None:
        return node.inputs[0], None
    ranks = _ML_RANKS.get(node.op_type, ())
    index = list(node.outputs).index(value)
    return None, ranks[index] if index < len(ranks) else None


def _infer(model: ir.Model) -> Callable[[], None]:
    """Set inferred types and shapes on the main graph's unshaped values; return the undo."""
    values = {v.name: v for n in model.graph for v in n.outputs if v.name and v.shape is None}
    saved = {name: (v.type, v.shape) for name, v in values.items()}
    try:
        inferred = onnx.shape_inference.infer_shapes(
            _light_proto(model), check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as e:  # inference is a help, never a requirement
        logger.info("shape inference failed (%s); deciding from the shapes recorded", e)
        return lambda: None
    for info in inferred.graph.value_info:
        value = values.get(info.name)
        if value is not None and info.type.HasField("tensor_type"):
            ir.serde.deserialize_value_info_proto(info, value)

    def undo() -> None:  # by name: a merged op's output took over the name of the one it replaced
        for node in model.graph:
            for value in node.outputs:
                if value.name in saved and not value.is_graph_output():
                    value.type, value.shape = saved[value.name]

    return undo


def _light_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto whose large initializers are typed inputs (no weight copied)."""
    graph = model.graph
    order = list(graph.initializers.values())
    big = [v for v in order if _elements(v) > _SMALL]
    held = {v.name: v.const_value for v in big}
    extra = [v for v in big if not v.is_graph_input()]
    for value in big:
        graph.initializers.pop(value.name)
        value.type = value.type or ir.TensorType(value.const_value.dtype)
        value.shape = value.shape or value.const_value.shape
        value.const_value = None
    graph.inputs.extend(extra)
    try:
        return ir.serde.serialize_model(model)
    finally:
        for _ in extra:
            graph.inputs.pop()  # pop (not del) so each value stops counting as a graph input
        for value in big:
            value.const_value = held[value.name]
        graph.initializers.clear()
        for value in order:  # back in their order, as registered before
            graph.initializers.add(value)


def _elements(value: ir.Value) -> int:
    tensor = value.const_value
    return 0 if tensor is None else tensor.size
