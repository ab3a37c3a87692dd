"""Shapes for decisions, never guessed: ONNX shape inference, on demand, where a model has none.

Which axis of a value holds a linear op's features after a ``Reshape`` or ``Transpose``, whether
a constant varies only along that axis, how wide a scale is: all are proved from shapes. Exports
without ``value_info`` (torch's legacy exporter writes none) get them from ONNX shape inference,
run at most once per fusion and only when a decision asks for a shape the model does not record
(:func:`request`): a model whose decisions need no shape pays nothing. Inference runs on a copy of
the graph in which every initializer larger than a few values is a typed graph input (weights
are never copied), and its results are set on the values only for the run: the undo puts every
recorded type and shape back, so the written model carries no ``value_info`` it did not have.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator

import onnx
import onnx_ir as ir

__all__ = ["on_demand", "request", "when_inferred"]

logger = logging.getLogger(__name__)

_LINEAR = frozenset({"Gemm", "MatMul", "Einsum", "Conv"})
_SMALL = 64  # initializers up to this many elements stay (Reshape targets, axes: data matters)
_RUN: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "onnx_fuse_shape_inference", default=None
)
_LISTENERS: list[Callable[[], None]] = []


def when_inferred(listener: Callable[[], None]) -> None:
    """Call ``listener`` after inference set new shapes (caches of shape answers clear)."""
    _LISTENERS.append(listener)


def request() -> bool:
    """A decision needs a shape the model does not record: infer shapes now if not done yet in
    this run. True when new shapes were just set (the caller asks again)."""
    run = _RUN.get()
    return run() if run is not None else False


@contextlib.contextmanager
def on_demand(model: ir.Model) -> Iterator[None]:
    """Within this block, :func:`request` infers ``model``'s shapes once; undone at the end."""
    restore: list[Callable[[], None]] = []

    def run() -> bool:
        if restore or not any(n.op_type in _LINEAR for n in model.graph):
            return False
        restore.append(_infer(model))
        for listener in _LISTENERS:
            listener()
        return True

    token = _RUN.set(run)
    try:
        yield
    finally:
        _RUN.reset(token)
        for undo in restore:
            undo()
        if restore:
            for listener in _LISTENERS:
                listener()


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
