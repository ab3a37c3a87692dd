"""Values computed only from constants are constants (``converter.fusion.core.computed``), issue 21.

PEFT adapters reach an export as the computation of their delta weight. Each test builds one
such computation by hand with seeded non-trivial values, fuses it, and checks the count of
merges, the structure left, onnxruntime equivalence and the checker; the refusals check the
reason a user reads.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from builders import assert_equivalent, check, feeds, fuse_with_report, init, op_types, rng
from onnx import TensorProto, helper

from converter.fusion.core import computed
from converter.fusion.core.constants import Constant, Constants
from converter.fusion.core.declined import Declined

FLOAT = TensorProto.FLOAT
ATOL, RTOL = 1e-5, 1e-4
IN, OUT, RANK = 16, 12, 4


def _model(
    nodes, inits, x_shape=(3, IN), y_shape=(3, OUT), opset=17, infer=True
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", FLOAT, list(y_shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model) if infer else model


def _branch_sum(delta_nodes: list, delta_inits: list, delta: str = "dw", seed: int = 0):
    """``x @ W0 + x @ delta`` with ``delta`` (``(IN, OUT)``) computed by ``delta_nodes``."""
    r = np.random.default_rng(seed)
    inits = [init("W0", r.normal(size=(IN, OUT)).astype(np.float32)), *delta_inits]
    nodes = [
        *delta_nodes,
        helper.make_node("MatMul", ["x", "W0"], ["y0"], name="base"),
        helper.make_node("MatMul", ["x", delta], ["y1"], name="adapter"),
        helper.make_node("Add", ["y0", "y1"], ["y"], name="sum"),
    ]
    return _model(nodes, inits)


def _loha(seed: int = 0) -> onnx.ModelProto:
    """LoHa: ``dW = ((A1 @ B1) * (A2 @ B2) * s).T``, a Hadamard product of two low-rank products."""
    r = np.random.default_rng(seed)
    factors = {
        n: r.normal(size=(OUT, RANK) if n[0] == "A" else (RANK, IN))
        for n in ("A1", "B1", "A2", "B2")
    }
    inits = [init(n, a.astype(np.float32)) for n, a in factors.items()]
    inits.append(init("s", np.array(0.5, np.float32)))
    nodes = [
        helper.make_node("MatMul", ["A1", "B1"], ["p1"], name="p1"),
        helper.make_node("MatMul", ["A2", "B2"], ["p2"], name="p2"),
        helper.make_node("Mul", ["p1", "p2"], ["h"], name="hadamard"),
        helper.make_node("Mul", ["h", "s"], ["hs"], name="scale"),
        helper.make_node("Transpose", ["hs"], ["dw"], name="t", perm=[1, 0]),
    ]
    return _branch_sum(nodes, inits, seed=seed + 1)


def test_a_delta_computed_from_constants_merges_into_its_base_layer():
    model = _loha()
    check(model)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) == ["Gemm"]  # the computation of dW went with its last reader
    assert len(fused.graph.initializer) == 1
    check(fused)
    assert_equivalent(model, fused, feeds((3, IN)), atol=ATOL, rtol=RTOL)


def test_the_delta_is_evaluated_in_float64_and_rounded_once():
    model = _loha(seed=3)
    fused, _ = fuse_with_report(model)
    w = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    delta = ((w["A1"] @ w["B1"]) * (w["A2"] @ w["B2"]) * w["s"]).T
    expected = (w["W0"] + delta).astype(np.float32)
    merged = onnx.numpy_helper.to_array(fused.graph.initializer[0])
    merged = merged.T if fused.graph.node[0].op_type == "Gemm" and _trans_b(fused) else merged
    np.testing.assert_array_equal(merged, expected)


def _trans_b(model: onnx.ModelProto) -> bool:
    return any(a.name == "transB" and a.i == 1 for a in model.graph.node[0].attribute)


def test_ops_without_a_numpy_rewrite_here_are_evaluated_by_onnx_reference():
    """Kronecker product as LoKr writes it (``Einsum`` + ``Reshape``), and a ``Softmax``-weighted
    ``Gather`` over a bank as VBLoRA does, fold like any other constant."""
    r = np.random.default_rng(5)
    inits = [
        init("a", r.normal(size=(4, 3)).astype(np.float32)),
        init("b", r.normal(size=(4, 4)).astype(np.float32)),
        init("shape", np.array([IN, OUT], np.int64)),
        init("logits", r.normal(size=(3,)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Einsum", ["a", "b"], ["k4"], name="kron", equation="ij,kl->ikjl"),
        helper.make_node("Reshape", ["k4", "shape"], ["k"], name="kron_reshape"),
        helper.make_node("Softmax", ["logits"], ["p"], name="softmax", axis=0),
        helper.make_node("ReduceMax", ["p"], ["pm"], name="top", keepdims=0),
        helper.make_node("Mul", ["k", "pm"], ["dw"], name="weigh"),
    ]
    model = _branch_sum(nodes, inits)
    check(model)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and op_types(fused) == ["Gemm"]
    check(fused)
    assert_equivalent(model, fused, feeds((3, IN)), atol=ATOL, rtol=RTOL)


def _resolved(model: onnx.ModelProto, node_name: str, opset: int = 17):
    """What the resolver says of the first output of the node ``node_name``."""
    ir_model = ir.serde.deserialize_model(model)
    node = next(n for n in ir_model.graph if n.name == node_name)
    return Constants(opset=opset).resolve(node.outputs[0])


def test_a_random_op_is_never_constant():
    nodes = [helper.make_node("RandomNormalLike", ["W0"], ["dw"], name="noise", seed=1.0)]
    model = _branch_sum(nodes, [])
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    found = _resolved(model, "noise")
    assert isinstance(found, Declined) and found.reason == "weight 'dw' is not constant"


def test_a_computation_that_reads_an_input_is_not_constant():
    model = _model(
        [
            helper.make_node("Mul", ["x", "x"], ["xx"], name="sq"),
            helper.make_node("MatMul", ["x", "W0"], ["y"], name="mm"),
        ],
        [init("W0", np.ones((IN, OUT), np.float32))],
    )
    found = Constants(opset=17).resolve(ir.serde.deserialize_model(model).graph.node(0).outputs[0])
    assert isinstance(found, Declined) and found.reason == "weight 'xx' is not constant"


def test_the_size_bound_is_the_reason(monkeypatch):
    monkeypatch.setattr(computed, "MAX_ELEMENTS", 100)
    model = _loha()
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    found = _resolved(model, "hadamard")
    assert isinstance(found, Declined)
    assert found.reason == (
        "weight 'p1' is computed from constants, but 192 elements is over the 100-element "
        "bound of one evaluation"
    )


def test_an_op_the_evaluator_cannot_compute_is_the_reason(monkeypatch):
    """A lazily evaluated weight whose evaluation fails when the merge computes: the merge is
    declined with the evaluator's words and nothing changes."""
    monkeypatch.setattr(computed, "EAGER_ELEMENTS", 1)  # every weight evaluated lazily

    def failing(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(computed.onnx.reference.ReferenceEvaluator, "run", failing)
    model = _loha()
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    reasons = " ".join(d.reason for d in report.declined)
    assert "which the evaluator cannot compute: no kernel for this" in reasons


def test_a_shape_unrecorded_and_too_large_to_learn_is_the_reason(monkeypatch):
    monkeypatch.setattr(computed, "EAGER_ELEMENTS", 10)
    monkeypatch.setattr(computed, "_inferred", lambda *args: None)  # nor inferred
    model = _loha()
    del model.graph.value_info[:]  # no shapes recorded
    found = _resolved(model, "p1")
    assert isinstance(found, Declined)
    assert "its shape is not recorded and its inputs are too large" in found.reason


def test_a_shape_unrecorded_is_inferred_from_the_inputs_and_evaluated_when_asked(monkeypatch):
    """The legacy exporter records no shape for DoRA's ``B(A(EyeLike))``: onnx's shape inference
    of the one node gives it, and the value is evaluated only when a merge reads it."""
    monkeypatch.setattr(computed, "EAGER_ELEMENTS", 10)
    model = _loha()
    del model.graph.value_info[:]
    found = _resolved(model, "p1")
    assert isinstance(found, Constant) and found.shape == (OUT, IN)
    assert found.array().shape == (OUT, IN)


def test_small_values_without_recorded_shapes_are_evaluated_to_learn_them():
    model = _loha()
    del model.graph.value_info[:]
    found = _resolved(model, "scale")
    assert isinstance(found, Constant) and found.shape == (OUT, IN)
    assert found.stored == 4 * OUT * RANK // 2 + 4 * RANK * IN // 2 + 1  # the factors and the scale


def test_a_long_computation_resolves_without_a_deep_stack():
    """2,000 Adds of constants in a row: resolved bottom-up, no RecursionError."""
    nodes, prev = [], "c0"
    for i in range(2000):
        nodes.append(helper.make_node("Add", [prev, "one"], [f"c{i + 1}"], name=f"add{i}"))
        prev = f"c{i + 1}"
    nodes.append(helper.make_node("Mul", ["x", prev], ["y"], name="use"))
    inits = [init("c0", np.zeros(IN, np.float32)), init("one", np.ones(IN, np.float32))]
    model = _model(nodes, inits, y_shape=(3, IN))
    ir_model = ir.serde.deserialize_model(model)
    found = Constants(opset=17).resolve(ir_model.graph.node(1999).outputs[0])
    assert isinstance(found, Constant)
    np.testing.assert_array_equal(found.array(), np.full(IN, 2000.0))


def test_without_an_opset_nothing_is_computed():
    assert isinstance(_resolved(_loha(), "p1", opset=0), Declined)
    assert isinstance(_resolved(_loha(), "p1", opset=17), Constant)


def test_adapter_weights_fed_as_graph_inputs_are_never_merged():
    """onnxruntime's multi-LoRA adapters and Olive's extracted adapters feed A and B as graph
    inputs, swapped at run time: the delta ``A @ B`` is not a constant, and the reason says so."""
    r = rng(5)
    nodes = [
        helper.make_node("MatMul", ["A", "B"], ["dw"], name="delta"),
        helper.make_node("MatMul", ["x", "W0"], ["base"], name="base"),
        helper.make_node("MatMul", ["x", "dw"], ["lora"], name="lora"),
        helper.make_node("Add", ["base", "lora"], ["y"], name="join"),
    ]
    inits = [init("W0", r.standard_normal((IN, OUT)).astype(np.float32))]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", FLOAT, [3, IN]),
            helper.make_tensor_value_info("A", FLOAT, [IN, 2]),
            helper.make_tensor_value_info("B", FLOAT, [2, OUT]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, [3, OUT])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fused, report = fuse_with_report(onnx.shape_inference.infer_shapes(model))
    assert report.fusions == [] and op_types(fused) == op_types(model)
    assert any("is a graph input" in d.reason for d in report.declined), report.declined
