"""Every tensor of a model, wherever it sits, in an ``onnx.ModelProto`` or an ``onnx_ir.Model``.

Graph initializers, sparse initializers (proto only), tensors in node attributes
(``Constant.value``, ``TENSOR`` and ``TENSORS`` attributes), subgraphs, training graphs (proto
only) and model-local functions. Nothing is read: the walkers yield the tensor objects, which
for external data are references to files.
"""

from __future__ import annotations

__all__ = ["ir_tensors", "proto_tensors", "tensor_attrs"]

from collections.abc import Iterator

import onnx
import onnx_ir as ir

# --------------------------------------------------------------------------- protobuf


def proto_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: graphs, subgraphs, training graphs, functions."""
    yield from _proto_graph_tensors(model.graph)
    for info in model.training_info:
        yield from _proto_graph_tensors(info.initialization)
        yield from _proto_graph_tensors(info.algorithm)
    for function in model.functions:
        for node in function.node:
            yield from _proto_node_tensors(node)


def _proto_graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _proto_node_tensors(node)


def _proto_node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for s in [*sparse, *attr.sparse_tensors]:
            yield from (s.values, s.indices)
        if attr.HasField("g"):
            yield from _proto_graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _proto_graph_tensors(graph)


# --------------------------------------------------------------------------- onnx_ir


def _graph_likes(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    """The main graph, its subgraphs, and every model-local function with its subgraphs."""
    yield from model.graphs()
    for function in model.functions.values():
        yield function
        yield from function.subgraphs()


def tensor_attrs(model: ir.Model) -> Iterator[tuple[ir.Node, str, ir.Attr]]:
    """Every (node, name, attribute) holding a TENSOR or TENSORS value, functions included."""
    tensor_types = (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS)
    for graph in _graph_likes(model):
        for node in graph:
            for name, attr in node.attributes.items():
                if not attr.is_ref() and attr.type in tensor_types and attr.value is not None:
                    yield node, name, attr


def ir_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor of ``model``: initializers and attribute tensors, functions included."""
    for graph in _graph_likes(model):
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                if value.const_value is not None:
                    yield value.const_value
    for _, _, attr in tensor_attrs(model):
        yield from (attr.value,) if attr.type == ir.AttributeType.TENSOR else attr.value
