"""Shapes for decisions, never guessed: ONNX shape inference where the model has none.

Which axis of a value holds a linear op's features after a ``Reshape`` or ``Transpose``, whether
a constant varies only along that axis, how wide a scale is: all are proved from shapes. Exports
without ``value_info`` (torch's legacy exporter writes none) get them from ONNX shape inference
(:class:`onnx_ir.passes.common.ShapeInferencePass`, which leaves large weights out of the proto it
infers on). The shapes serve the run only: :func:`infer_missing` returns an undo that puts every
value's recorded type and shape back as the model had them, so the written model carries no
``value_info`` it did not have.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

__all__ = ["infer_missing", "needs_inference"]

logger = logging.getLogger(__name__)

_LINEAR = frozenset({"Gemm", "MatMul", "Conv"})


def needs_inference(model: ir.Model) -> bool:
    """Some node output of the main graph has no shape, and there is a linear op to fuse."""
    nodes = list(model.graph)
    if not any(n.op_type in _LINEAR for n in nodes):
        return False
    return any(v.shape is None for n in nodes for v in n.outputs if v.name)


def infer_missing(model: ir.Model) -> Callable[[], None]:
    """Fill in shapes by inference; return a function that restores what was recorded before."""
    saved: dict[str, tuple[ir.TypeProtocol | None, ir.Shape | None]] = {}
    for graph in model.graphs():
        for node in graph:
            for value in node.outputs:
                if value.name:
                    saved[value.name] = (value.type, value.shape)
    orders = [(graph, list(graph.initializers)) for graph in model.graphs()]
    try:
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    except Exception as e:  # inference is a help, never a requirement
        logger.info("shape inference failed (%s); deciding from the shapes recorded", e)
    for graph, order in orders:  # the pass re-registers large initializers at the end
        _reorder(graph, order)

    def restore() -> None:
        for graph in model.graphs():
            for node in graph:
                for value in node.outputs:
                    if value.name in saved and not value.is_graph_output():
                        value.type, value.shape = saved[value.name]

    return restore


def _reorder(graph: ir.Graph, order: list[str]) -> None:
    """Put ``graph``'s initializers back in ``order`` (any others after them, as they are)."""
    if list(graph.initializers)[: len(order)] == order:
        return
    values = dict(graph.initializers)
    graph.initializers.clear()
    for name in [*order, *(n for n in values if n not in set(order))]:
        if name in values:
            graph.initializers.add(values[name])
