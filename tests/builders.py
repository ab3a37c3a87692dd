"""Small ONNX model builders and checks shared by the rewrite tests (seeded, no torch)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from converter.fusion.passes import fuse_model

__all__ = [
    "rng",
    "init",
    "linear_chain",
    "gemm_node",
    "make_model",
    "run",
    "assert_equivalent",
    "op_types",
    "check",
    "assert_same_graph",
    "fuse_with_report",
    "xy_io",
    "feeds",
    "scrambled",
    "in_topological_order",
]

FLOAT = TensorProto.FLOAT


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def gemm_node(name: str, x: str, w: str, b: str | None, y: str, **attrs) -> onnx.NodeProto:
    inputs = [x, w] + ([b] if b else [])
    return helper.make_node("Gemm", inputs, [y], name=name, **attrs)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[TensorProto] = (),
    *,
    opset: int = 17,
    name: str = "g",
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 10
    onnx.checker.check_model(model, full_check=True)
    return model


def linear_chain(
    widths: Sequence[int],
    *,
    form: str = "gemm",
    rank: int = 2,
    dtype: type = np.float32,
    bias: bool = True,
    seed: int = 0,
    opset: int = 17,
) -> onnx.ModelProto:
    """``x -> Linear(w0,w1) -> ... -> y`` as torch exports it: Gemm(transB=1) or MatMul+Add."""
    r = rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], []
    prev = "x"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        out = "y" if i == len(widths) - 2 else f"h{i}"
        scale = 1 / np.sqrt(a)
        if form == "gemm":
            inits.append(init(f"W{i}", (r.standard_normal((b, a)) * scale).astype(dtype)))
            if bias:
                inits.append(init(f"b{i}", (r.standard_normal(b) * 0.1).astype(dtype)))
            nodes.append(
                gemm_node(f"fc{i}", prev, f"W{i}", f"b{i}" if bias else None, out, transB=1)
            )
        else:
            inits.append(init(f"W{i}", (r.standard_normal((a, b)) * scale).astype(dtype)))
            mm_out = f"m{i}" if bias else out
            nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [mm_out], name=f"mm{i}"))
            if bias:
                inits.append(init(f"b{i}", (r.standard_normal(b) * 0.1).astype(dtype)))
                nodes.append(helper.make_node("Add", [mm_out, f"b{i}"], [out], name=f"add{i}"))
        prev = out
    lead = ["batch"] + ["seq"] * (rank - 2)
    x = helper.make_tensor_value_info("x", elem, [*lead, widths[0]])
    y = helper.make_tensor_value_info("y", elem, [*lead, widths[-1]])
    return make_model(nodes, [x], [y], inits, opset=opset)


def xy_io(x_shape, y_shape, elem: int = FLOAT) -> tuple[list, list]:
    """Value infos for a graph with one input ``x`` and one output ``y``."""
    return (
        [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info("y", elem, y_shape)],
    )


def feeds(shape, seed: int = 0, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """A seeded input ``x`` uniform in [-1, 1) (signed, so sign mistakes show)."""
    return {"x": rng(seed).uniform(-1, 1, shape).astype(dtype)}


def ml_scaler(
    x: str, y: str, width: int, seed: int, *, name: str = "scaler", smallest: float = 0.5
) -> onnx.NodeProto:
    """An ``ai.onnx.ml`` ``Scaler`` (``y = (x - offset) * scale``) with seeded offsets and
    scales drawn from ``[smallest, 2)``."""
    r = rng(seed)
    return helper.make_node(
        "Scaler",
        [x],
        [y],
        domain="ai.onnx.ml",
        name=name,
        offset=r.standard_normal(width).tolist(),
        scale=r.uniform(smallest, 2, width).tolist(),
    )


def fuse_with_report(model: onnx.ModelProto, policy: str = "cost"):
    """``converter.fuse`` that also returns the :class:`FusionReport` (via the pass itself)."""
    ir_model = ir.serde.deserialize_model(model)
    report = fuse_model(ir_model, policy=policy)
    return ir.serde.serialize_model(ir_model), report


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_equivalent(
    original: onnx.ModelProto,
    fused: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """Both models give the same outputs (shape and values) under onnxruntime; integer, bool
    and string outputs (a classifier's labels) exactly."""
    for a, b in zip(run(original, feeds), run(fused, feeds), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype.kind in "biuOSU":
            np.testing.assert_array_equal(b, a)
        else:
            np.testing.assert_allclose(
                b.astype(np.float64), a.astype(np.float64), atol=atol, rtol=rtol
            )


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def assert_same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    """Same nodes, initializer values, inputs and outputs (serialisers may differ in value_info)."""
    assert [n.SerializeToString() for n in a.graph.node] == [
        n.SerializeToString() for n in b.graph.node
    ]
    arrays_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    arrays_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert arrays_a.keys() == arrays_b.keys()
    for name, array in arrays_a.items():
        np.testing.assert_array_equal(arrays_b[name], array)
    assert list(a.graph.input) == list(b.graph.input)
    assert list(a.graph.output) == list(b.graph.output)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else list(a.graphs))]


def scrambled(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """A copy of ``model`` with the nodes of every graph (subgraphs too) in a random order,
    topological or not, as graph-surgery scripts write them. A graph of two or more nodes that
    depend on each other is left out of order (a permutation that happens to be topological is
    drawn again)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _scramble(copy.graph, rng, frozenset())
    return copy


def _scramble(graph: onnx.GraphProto, rng: np.random.Generator, outer: frozenset[str]) -> None:
    nodes = list(graph.node)
    for _ in range(20):
        order = [nodes[i] for i in rng.permutation(len(nodes))]
        del graph.node[:]
        graph.node.extend(order)
        if not _in_order(graph, outer):
            break
    scope = outer | _defined(graph)
    for node in graph.node:
        for sub in _subgraphs(node):
            _scramble(sub, rng, scope)


def _defined(graph: onnx.GraphProto) -> frozenset[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    return frozenset(names | {o for n in graph.node for o in n.output if o})


def in_topological_order(model: onnx.ModelProto) -> bool:
    """Every node of every graph reads only values defined before it (or in an outer scope)."""
    return _in_order(model.graph, frozenset(), deep=True)


def _in_order(graph: onnx.GraphProto, outer: frozenset[str], *, deep: bool = False) -> bool:
    """``graph``'s nodes read only values defined before them; with ``deep``, its subgraphs'
    too. Values of outer scopes count as defined (whichever node of the scope defines them)."""
    local = _defined(graph)
    defined = (
        set(outer - local) | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    )
    for node in graph.node:
        reads = {i for i in node.input if i} | _outer_reads(node)
        if not reads <= defined:
            return False
        if deep and not all(_in_order(sub, frozenset(defined)) for sub in _subgraphs(node)):
            return False
        defined.update(node.output)
    return True


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    """The names ``node``'s subgraphs read from the scopes around them."""
    names: set[str] = set()
    for sub in _subgraphs(node):
        local = _defined(sub)  # whatever the order of its nodes
        for inner in sub.node:
            names |= ({i for i in inner.input if i} | _outer_reads(inner)) - local
        names |= {v.name for v in sub.output} - local
    return names
