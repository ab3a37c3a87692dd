"""The two models under comparison, each loaded only as far as the check needs it.

A model given as a path is read as its own protobuf (external data not loaded) after the same
checks :func:`converter.model_io.files.load_model` makes before it deserialises. That proto is
enough for almost everything validation does: the graph outputs and the names of its values,
the onnxruntime session (built from the proto, or the file itself), and the *interface*: the
graph inputs and the ``Gather``/``GatherElements`` nodes that read them, which is what choosing
and checking trial inputs needs (:mod:`converter.equivalence.inputs`). The whole ``onnx_ir``
model -- seconds on a graph of many thousand nodes -- is built only when the float64 reference
asks for it. A model given in memory is used as it is (an ``onnx_ir`` copy; its tensors are
shared, never modified).
"""

from __future__ import annotations

__all__ = [
    "ModelLike",
    "OnDisk",
    "Side",
    "all_nodes",
    "expose",
    "load_side",
]

import dataclasses
import os
from collections.abc import Iterator, Sequence

import onnx
import onnx_ir as ir

from converter.errors import InputError
from converter.model_io import files as io
from converter.model_io.tensors import ir_tensors


@dataclasses.dataclass(frozen=True)
class OnDisk:
    """A model already in memory that is also saved at ``path`` (as ``fuse_file`` writes it):
    validation runs the file and reads the model as it is, without loading it again. The model
    is handed over: validation may add graph outputs to it."""

    model: ir.Model
    path: str


ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model | OnDisk

_INDEXING_OPS = frozenset({"Gather", "GatherElements"})
_DEFAULT_DOMAINS = ("", "ai.onnx")


class Side:
    """One model under comparison: its label, file, graph outputs and the outputs added to it.

    :attr:`model` is the whole ``onnx_ir`` model (built from :attr:`proto` on first use, with
    the added outputs); :attr:`interface` is enough for the graph inputs and their uses.
    """

    def __init__(
        self,
        label: str,
        model: ir.Model | None,
        path: str | None,
        outputs: list[str],
        *,
        proto: onnx.ModelProto | None = None,
    ) -> None:
        if model is None and proto is None:
            raise ValueError("a Side needs a model or its proto")
        self.label, self.path, self.outputs = label, path, outputs
        self.proto = proto  # the file's own proto, when the model was read from a path
        self.exposed: list[str] = []
        self._model = model
        self._outputs_added = 0  # how many of ``exposed`` the onnx_ir model has as outputs
        self._interface: ir.Model | None = None

    @property
    def loaded(self) -> bool:
        """Whether the whole ``onnx_ir`` model exists (given, or built already)."""
        return self._model is not None

    @property
    def model(self) -> ir.Model:
        """The whole ``onnx_ir`` model, with the exposed values as graph outputs (added on
        first use: a model run from its file needs them only in the file's proto)."""
        if self._model is None:
            assert self.proto is not None and self.path is not None
            self._model = _deserialize(self.proto, self.path)
        if self._outputs_added < len(self.exposed):
            _add_outputs(self._model, self.exposed[self._outputs_added :])
            self._outputs_added = len(self.exposed)
        return self._model

    @property
    def interface(self) -> ir.Model:
        """The model if it exists, else a small model of the graph inputs and their
        indexing uses (see the module docstring)."""
        if self._model is not None:
            return self._model
        if self._interface is None:
            assert self.proto is not None
            self._interface = _interface_model(self.proto)
        return self._interface

    def first_produced(self, names: set[str]) -> str | None:
        """The value of ``names`` produced first in the main graph's (topological) node order;
        graph inputs and initializers (no producing node) come after, by name."""
        if not names:
            return None
        if self._model is not None:
            produced = (v.name for node in self._model.graph for v in node.outputs)
        else:
            assert self.proto is not None
            produced = (name for node in self.proto.graph.node for name in node.output)
        return next((name for name in produced if name in names), None) or min(names)


def load_side(model: ModelLike, role: str) -> Side:
    """Wrap ``model`` without ever mutating the caller's object (an :class:`OnDisk` is handed
    over, not copied; a path is read as its checked proto, see the module docstring)."""
    if isinstance(model, OnDisk):
        outputs = [v.name for v in model.model.graph.outputs]
        return Side(f"{role} model {model.path}", model.model, os.fspath(model.path), outputs)
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        proto = io.load_proto(path)
        outputs = [v.name for v in proto.graph.output]
        return Side(f"{role} model {path}", None, path, outputs, proto=proto)
    if isinstance(model, onnx.ModelProto):
        copy = ir.serde.deserialize_model(model)  # wraps the proto's tensors, copies nothing
    elif isinstance(model, ir.Model):
        copy = model.clone()  # tensors are shared, never modified
    else:
        raise TypeError(
            f"{role} must be a path, an onnx.ModelProto or an onnx_ir.Model, "
            f"not {type(model).__name__}"
        )
    return Side(f"{role} model", copy, None, [v.name for v in copy.graph.outputs])


def expose(side: Side, names: Sequence[str]) -> list[str]:
    """Add the named values as graph outputs; return the names the model does not have.

    :attr:`Side.exposed` lists them, for the onnxruntime session to add to the file's proto;
    :attr:`Side.model` (the float64 reference is built from it) gets them too.
    """
    if not names:
        return []
    known = _value_names(side)
    missing = [name for name in names if name not in known]
    graph_outputs = set(side.outputs)
    added = [name for name in dict.fromkeys(names) if name in known and name not in graph_outputs]
    side.exposed.extend(added)
    return missing


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of the main graph, its subgraphs and the model-local functions."""
    yield from model.graph.all_nodes()
    for function in model.functions.values():
        yield from function.all_nodes()


# --------------------------------------------------------------------------- helpers


def _deserialize(proto: onnx.ModelProto, path: str) -> ir.Model:
    """The ``onnx_ir`` model of a checked proto, external tensors read from the file's folder."""
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:  # onnx_ir raises a variety of types on malformed protos
        reason = " ".join(str(e).split())
        raise InputError(f"{path}: is not a valid ONNX model ({reason})") from None
    folder = os.path.dirname(os.path.abspath(path))
    for tensor in ir_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = folder
    return model


def _add_outputs(model: ir.Model, names: Sequence[str]) -> None:
    if not names:
        return
    values = ir.convenience.create_value_mapping(model.graph, include_subgraphs=False)
    for name in names:
        if not values[name].is_graph_output():
            model.graph.outputs.append(values[name])


def _value_names(side: Side) -> set[str]:
    """Every value name of the main graph: inputs, initializers, node outputs."""
    if side.loaded:
        graph = side.model.graph
        names = {v.name for v in graph.inputs} | set(graph.initializers)
        names.update(v.name for node in graph for v in node.outputs)
    else:
        assert side.proto is not None
        proto = side.proto.graph
        names = {v.name for v in proto.input} | {t.name for t in proto.initializer}
        names.update(name for node in proto.node for name in node.output)
    names.discard("")
    return names


def _interface_model(proto: onnx.ModelProto) -> ir.Model:
    """A model of the graph inputs to feed and the indexing nodes that read them as indices,
    each with its data value's shape: what :mod:`converter.equivalence.inputs` looks at."""
    graph = proto.graph
    initialized = {t.name for t in graph.initializer}
    initialized.update(s.values.name for s in graph.sparse_initializer)
    inputs = [
        ir.serde.deserialize_value_info_proto(info, None)
        for info in graph.input
        if info.name not in initialized
    ]
    by_name = {v.name: v for v in inputs}
    users = [
        node
        for node in _proto_nodes(graph)
        if node.op_type in _INDEXING_OPS
        and node.domain in _DEFAULT_DOMAINS
        and len(node.input) > 1
        and node.input[1] in by_name
    ]
    shapes = _shapes(proto, {node.input[0] for node in users})
    nodes = [
        ir.Node(
            node.domain,
            node.op_type,
            [ir.Value(name=node.input[0], shape=shapes.get(node.input[0])), by_name[node.input[1]]],
            [ir.AttrInt64("axis", a.i) for a in node.attribute if a.name == "axis"],
            num_outputs=1,
        )
        for node in users
    ]
    opsets = {op.domain: op.version for op in proto.opset_import}
    return ir.Model(
        ir.Graph(inputs, [], nodes=nodes, opset_imports=opsets, name=graph.name),
        ir_version=proto.ir_version,
    )


def _proto_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs."""
    for sub in _graphs(graph):
        yield from sub.node


def _shapes(proto: onnx.ModelProto, names: set[str]) -> dict[str, ir.Shape]:
    """The shapes ``onnx_ir`` gives ``names`` (subgraphs included): an initializer's dims, then
    the value infos of the graph that defines the value, the graph outputs' last."""
    shapes: dict[str, ir.Shape] = {}
    if not names:
        return shapes
    for graph in _graphs(proto.graph):
        defined = {t.name for t in graph.initializer} | {v.name for v in graph.input}
        defined.update(name for node in graph.node for name in node.output)
        for tensor in graph.initializer:
            if tensor.name in names:
                shapes[tensor.name] = ir.Shape(list(tensor.dims))
        for info in (*graph.input, *graph.value_info, *graph.output):
            if info.name in names and info.name in defined:
                shape = ir.serde.deserialize_value_info_proto(info, None).shape
                if shape is not None:
                    shapes[info.name] = shape
    return shapes


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)
