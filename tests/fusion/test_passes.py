"""Rewrite tests: every op form through ``converter.fuse``, and every reason a chain is left alone.

Each rewrite test checks the number of fusions, the resulting structure, onnxruntime equivalence
with explicit tolerances, and ``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import (
    assert_equivalent,
    assert_same_graph,
    check,
    feeds,
    fuse_with_report,
    gemm_node,
    init,
    linear_chain,
    make_model,
    op_types,
    rng,
)
from onnx import TensorProto, helper

import converter
from converter.fusion.passes import FuseLinearChainsPass

FLOAT = TensorProto.FLOAT


# --- Gemm: every attribute combination -------------------------------------------------------

C_SHAPES = {"none": None, "scalar": (), "vector": (5,), "row": (1, 5), "matrix": (4, 5)}


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "alpha", "beta", "c_shape"),
    list(itertools.product((0, 1), (0, 1), (1.0, 0.5), (1.0, 2.0), C_SHAPES)),
)
def test_gemm_attribute_combinations(trans_a, trans_b, alpha, beta, c_shape):
    """First Gemm takes every attribute form; the second is torch's Gemm(transB=1)."""
    r = rng(1)
    m, k, n, out = 4, 3, 5, 6
    w1 = r.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [init("W1", w1), init("W2", r.standard_normal((out, n)).astype(np.float32))]
    inits.append(init("b2", r.standard_normal(out).astype(np.float32)))
    c_name = None
    if C_SHAPES[c_shape] is not None:
        c_name = "C1"
        inits.append(init("C1", np.asarray(r.standard_normal(C_SHAPES[c_shape]), np.float32)))
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    nodes = [
        gemm_node("g1", "x", "W1", c_name, "h", **attrs),
        gemm_node("g2", "h", "W2", "b2", "y", transB=1),
    ]
    x_shape = [k, m] if trans_a else [m, k]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", FLOAT, [m, out])],
        inits,
    )
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) == ["Gemm"]
    gemm = fused.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in gemm.attribute} == (
        {"transB": 1, "transA": 1} if trans_a else {"transB": 1}
    )
    assert_equivalent(model, fused, feeds(x_shape), atol=1e-5, rtol=1e-4)
    check(fused)


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17, 21])
def test_gemm_opset_versions(opset):
    """Every Gemm opset; a bias-free 2-D MatMul chain never gains a zero C."""
    model = linear_chain([6, 8, 3], form="matmul", bias=False, opset=opset)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    # Before opset 11 Gemm needs C: without a bias the merge is a bare MatMul, adding nothing.
    assert op_types(fused) == (["MatMul"] if opset < 11 else ["Gemm"])
    assert report.params_after == 6 * 3
    assert_equivalent(model, fused, feeds((4, 6)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_transa_in_the_middle_is_declined_with_reason():
    r = rng(2)
    inits = [init("W1", r.standard_normal((4, 4)).astype(np.float32))]
    inits.append(init("W2", r.standard_normal((4, 4)).astype(np.float32)))
    nodes = [gemm_node("g1", "x", "W1", None, "h"), gemm_node("g2", "h", "W2", None, "y", transA=1)]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", FLOAT, [4, 4])],
        inits,
    )
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == ["Gemm", "Gemm"]
    assert "transA=1 on 'g2'" in report.declined[0].reason


# --- MatMul (+Add): any rank, bias either side -------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_matmul_add_chains_of_any_rank(rank):
    model = linear_chain([8, 16, 12, 4], form="matmul", rank=max(rank, 2))
    if rank == 1:  # a vector input: MatMul of (in,) @ (in, out)
        model.graph.input[0].type.tensor_type.shape.ClearField("dim")
        model.graph.input[0].type.tensor_type.shape.dim.add().dim_value = 8
        model.graph.output[0].type.tensor_type.shape.ClearField("dim")
        model.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 4
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert report.fusions[0].widths == [8, 16, 12, 4]
    expected = ["Gemm"] if rank == 2 else ["MatMul", "Add"]
    assert op_types(fused) == expected
    shape = {1: (8,), 2: (3, 8), 3: (2, 3, 8), 4: (2, 3, 5, 8)}[rank]
    assert_equivalent(model, fused, feeds(shape), atol=1e-5, rtol=1e-4)
    check(fused)


@pytest.mark.parametrize("bias_shape", [(), (1,), (6,), (1, 6), (1, 1, 6)])
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_bias_forms(bias_shape, bias_first):
    r = rng(3)
    inits = [
        init("W1", r.standard_normal((5, 6)).astype(np.float32)),
        init("b1", np.asarray(r.standard_normal(bias_shape), np.float32)),
        init("W2", r.standard_normal((6, 2)).astype(np.float32)),
    ]
    add_inputs = ["b1", "m"] if bias_first else ["m", "b1"]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m"], name="mm1"),
        helper.make_node("Add", add_inputs, ["h"], name="add1"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["b", "s", 5])],
        [helper.make_tensor_value_info("y", FLOAT, ["b", "s", 2])],
        inits,
    )
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert report.fusions[0].nodes == ["mm1", "add1", "mm2"]
    assert op_types(fused) == ["MatMul", "Add"]
    assert_equivalent(model, fused, feeds((2, 3, 5)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_add_bias_along_another_axis_ends_the_op():
    """A bias of shape (3, 1) broadcasts along rows, not features: not an affine map per row."""
    r = rng(4)
    inits = [
        init("W1", r.standard_normal((5, 6)).astype(np.float32)),
        init("b1", r.standard_normal((3, 1)).astype(np.float32)),
        init("W2", r.standard_normal((6, 2)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m"], name="mm1"),
        helper.make_node("Add", ["m", "b1"], ["h"], name="add1"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, [3, 5])],
        [helper.make_tensor_value_info("y", FLOAT, [3, 2])],
        inits,
    )
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == ["MatMul", "Add", "MatMul"]


def test_constant_node_weights_are_constant():
    r = rng(5)
    nodes = [
        helper.make_node(
            "Constant", [], ["W1"], value=init("W1", r.standard_normal((3, 4)).astype(np.float32))
        ),
        helper.make_node(
            "Constant", [], ["W2"], value=init("W2", r.standard_normal((4, 2)).astype(np.float32))
        ),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", FLOAT, ["n", 2])],
    )
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) == ["Gemm"]  # the dead Constant nodes are gone too
    assert_equivalent(model, fused, feeds((7, 3)), atol=1e-5, rtol=1e-4)
    check(fused)


# --- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [(np.float32, 1e-5, 1e-4), (np.float16, 2.5e-3, 1e-3), (np.float64, 1e-12, 1e-10)],
)
def test_dtypes_round_once(dtype, atol, rtol):
    model = linear_chain([16, 32, 32, 8], dtype=dtype)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and op_types(fused) == ["Gemm"]
    assert fused.graph.initializer[0].data_type == model.graph.initializer[0].data_type
    x = feeds((4, 16), dtype=dtype)
    # The fused model is compared with the float64 chain: it must be at least as close as the
    # original, up to one rounding of the output.
    assert_equivalent(model, fused, x, atol=atol * 4, rtol=rtol * 4)
    check(fused)


def test_bfloat16_weights_match_float64_algebra():
    """onnxruntime has no bfloat16 Gemm on CPU: check the stored weights against the algebra."""
    model = linear_chain([8, 8, 4], bias=True, dtype=ml_dtypes.bfloat16)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and op_types(fused) == ["Gemm"]
    arrays = {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer
    }
    expected_w = arrays["W1"] @ arrays["W0"]
    out = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    (weight,) = [v for k, v in out.items() if k.endswith(".weight")]
    assert weight.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(weight.astype(np.float64), expected_w, rtol=2**-8, atol=1e-6)
    check(fused)


def test_integer_weights_are_declined():
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"),
    ]
    inits = [init("W1", np.ones((3, 3), np.int32)), init("W2", np.ones((3, 3), np.int32))]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.INT32, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 3])],
        inits,
    )
    _, report = fuse_with_report(model)
    assert report.fusions == []
    assert [d.nodes for d in report.declined] == [["mm1", "mm2"], ["mm1", "mm2"]]
    assert report.declined[0].reason == "weight dtype int32 is not a float type"


def test_float16_overflow_is_declined_and_left_as_is():
    w = np.full((4, 4), 200, np.float16)  # each layer fits; the product (160000) does not
    nodes = [gemm_node("g1", "x", "W1", None, "h"), gemm_node("g2", "h", "W2", None, "y")]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])],
        [init("W1", w), init("W2", w)],
    )
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == ["Gemm", "Gemm"]
    assert "overflows float16 (max 65504)" in report.declined[0].reason


# --- safety preconditions: each refusal carries its reason -------------------------------------


def test_fan_out_intermediate_is_left_intact():
    model = linear_chain([4, 6, 3])
    model.graph.node.append(helper.make_node("Relu", ["h0"], ["z"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("z", FLOAT, ["batch", 6]))
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == ["Gemm", "Gemm", "Relu"]
    (declined,) = report.declined
    assert declined.nodes == ["fc0", "fc1"]
    assert declined.reason == "fan-out: intermediate 'h0' feeds 2 nodes"


def test_graph_output_in_the_middle_is_left_intact():
    model = linear_chain([4, 6, 6, 3])
    model.graph.output.append(helper.make_tensor_value_info("h0", FLOAT, ["batch", 6]))
    fused, report = fuse_with_report(model)
    # fc1+fc2 still merge; the link fc0 -> fc1 is refused because h0 is an output.
    assert len(report.fusions) == 1 and report.fusions[0].nodes == ["fc1", "fc2"]
    assert op_types(fused) == ["Gemm", "Gemm"]
    assert report.declined[0].reason == "intermediate 'h0' is a graph output"
    assert [o.name for o in fused.graph.output] == ["y", "h0"]
    assert_equivalent(model, fused, feeds((3, 4)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_initializer_listed_as_graph_input_is_not_constant():
    model = linear_chain([4, 6, 3])
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    model.graph.input.append(helper.make_tensor_value_info("W1", FLOAT, list(w1.dims)))
    _, report = fuse_with_report(model)
    assert report.fusions == []
    assert report.declined[0].reason == (
        "weight 'W1' is a graph input (it can be overridden at run time)"
    )


def test_weight_from_graph_input_is_not_constant():
    model = linear_chain([4, 6, 3])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "W0"))
    model.graph.input.append(helper.make_tensor_value_info("W0", FLOAT, [6, 4]))
    _, report = fuse_with_report(model)
    assert report.fusions == []
    assert "weight 'W0' is a graph input" in report.declined[0].reason


def test_a_weight_read_twice_inside_one_chain_merges_and_goes():
    model = linear_chain([4, 4, 4, 4])  # W0, W1, W2 all 4x4
    model.graph.node[2].input[1] = "W0"  # fc2 reuses fc0's weight
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and report.fusions[0].nodes == ["fc0", "fc1", "fc2"]
    assert "W0" not in {t.name for t in fused.graph.initializer}
    check(fused)
    assert_equivalent(model, fused, feeds((3, 4)))


def test_cost_model_keeps_low_rank_pair_and_policy_always_merges_it():
    model = linear_chain([256, 16, 256])
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == ["Gemm", "Gemm"]
    assert report.declined[0].reason.startswith("cost model: merging widths 256->16->256")
    fused_always, report_always = fuse_with_report(model, policy="always")
    assert len(report_always.fusions) == 1 and op_types(fused_always) == ["Gemm"]
    assert_equivalent(model, fused_always, feeds((2, 256)), atol=1e-5, rtol=1e-4)
    check(fused_always)


def test_cost_model_splits_a_chain_where_it_pays():
    """64->64->8->64->64: merge (0,1,2) and (3,4) would... the DP picks [0,2) and [2,4)."""
    model = linear_chain([64, 64, 8, 64, 64])
    fused, report = fuse_with_report(model)
    assert [r.widths for r in report.fusions] == [[64, 64, 8], [8, 64, 64]]
    assert op_types(fused) == ["Gemm", "Gemm"]
    assert any("cost model" in d.reason for d in report.declined)
    assert_equivalent(model, fused, feeds((3, 64)), atol=1e-5, rtol=1e-4)
    check(fused)


# --- structure and bookkeeping ----------------------------------------------------------------


def test_fused_node_names_doc_string_and_unused_weights_removed():
    model = linear_chain([8, 8, 8])
    fused, report = fuse_with_report(model)
    (node,) = fused.graph.node
    assert node.name == "fused(fc0+fc1)"
    assert node.doc_string == "onnx-fuse merged: fc0, fc1"
    assert sorted(t.name for t in fused.graph.initializer) == [
        "fused(fc0+fc1).bias",
        "fused(fc0+fc1).weight",
    ]
    assert fused.graph.output[0].name == "y"
    assert report.params_before == 2 * 64 + 16 and report.params_after == 72
    assert report.macs_before == 128 and report.macs_after == 64
    assert report.linear_ops_before == 2 and report.linear_ops_after == 1


def test_everything_else_is_preserved():
    model = linear_chain([4, 6, 3])
    model.doc_string = "model doc"
    model.graph.doc_string = "graph doc"
    onnx.helper.set_model_props(model, {"author": "me"})
    model.graph.value_info.append(helper.make_tensor_value_info("h0", FLOAT, ["batch", 6]))
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("z", FLOAT, ["batch", 3]))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    fused, _ = fuse_with_report(model)
    assert fused.doc_string == "model doc" and fused.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in fused.metadata_props} == {"author": "me"}
    assert [o.name for o in fused.graph.output] == ["y", "z"]
    assert [i.name for i in fused.graph.input] == ["x"]
    assert {(o.domain, o.version) for o in fused.opset_import} == {("", 17), ("com.example", 1)}
    assert op_types(fused) == ["Gemm", "Relu"]


def test_nothing_to_fuse_is_unchanged():
    model = linear_chain([4, 6, 3])
    model.graph.node.insert(1, helper.make_node("Relu", ["h0"], ["r"], name="relu"))
    model.graph.node[2].input[0] = "r"
    fused, report = fuse_with_report(model)
    assert not report.modified and report.declined == []
    assert_same_graph(model, fused)


def test_fuse_api_does_not_mutate_its_proto_argument():
    model = linear_chain([4, 6, 3])
    before = model.SerializeToString()
    fused = converter.fuse(model)
    assert model.SerializeToString() == before
    assert isinstance(fused, onnx.ModelProto) and op_types(fused) == ["Gemm"]


def test_fuse_api_rewrites_ir_model_in_place():
    ir_model = ir.serde.deserialize_model(linear_chain([4, 6, 3]))
    assert converter.fuse(ir_model) is ir_model
    assert [n.op_type for n in ir_model.graph] == ["Gemm"]
    with pytest.raises(TypeError):
        converter.fuse("model.onnx")


def test_pass_reports_modified_and_keeps_report():
    ir_model = ir.serde.deserialize_model(linear_chain([4, 6, 3]))
    p = FuseLinearChainsPass()
    assert p(ir_model).modified is True
    assert p.report is not None and len(p.report.fusions) == 1
    assert p(ir_model).modified is False


# --- subgraphs --------------------------------------------------------------------------------


def _if_model() -> onnx.ModelProto:
    r = rng(6)
    branch_nodes = [
        gemm_node("then_fc0", "x", "W0", "b0", "t0", transB=1),
        gemm_node("then_fc1", "t0", "W1", "b1", "t_out", transB=1),
    ]
    then_graph = helper.make_graph(
        branch_nodes,
        "then",
        [],
        [helper.make_tensor_value_info("t_out", FLOAT, ["batch", 3])],
        [
            init("W0", r.standard_normal((5, 4)).astype(np.float32)),
            init("b0", r.standard_normal(5).astype(np.float32)),
            init("W1", r.standard_normal((3, 5)).astype(np.float32)),
            init("b1", r.standard_normal(3).astype(np.float32)),
        ],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "st", "en", "ax"], ["e_out"], name="slice")],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", FLOAT, ["batch", 3])],
        [
            init("st", np.array([0], np.int64)),
            init("en", np.array([3], np.int64)),
            init("ax", np.array([1], np.int64)),
        ],
    )
    node = helper.make_node(
        "If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph
    )
    return make_model(
        [node],
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", FLOAT, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 3])],
    )


def test_chain_inside_if_branch_is_fused():
    model = _if_model()
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert report.fusions[0].graph == "branch.then_branch"
    (then_graph,) = [
        helper.get_attribute_value(a)
        for a in fused.graph.node[0].attribute
        if a.name == "then_branch"
    ]
    assert [n.op_type for n in then_graph.node] == ["Gemm"]
    x = rng(7).uniform(-1, 1, (3, 4)).astype(np.float32)
    for cond in (True, False):
        assert_equivalent(model, fused, {"cond": np.array(cond), "x": x}, atol=1e-5, rtol=1e-4)
    check(fused)


def test_transposed_weights_without_constant_folding_are_constant():
    """torch's exporters without constant folding write MatMul(x, Transpose(W_out_in))."""
    r = rng(8)
    inits = [
        init("W1", r.standard_normal((6, 4)).astype(np.float32)),
        init("W2", r.standard_normal((3, 6)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Transpose", ["W1"], ["W1t"], name="t1", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W1t"], ["h"], name="mm1"),
        helper.make_node("Transpose", ["W2"], ["W2t"], name="t2"),
        helper.make_node("MatMul", ["h", "W2t"], ["y"], name="mm2"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["b", "s", 4])],
        [helper.make_tensor_value_info("y", FLOAT, ["b", "s", 3])],
        inits,
    )
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and report.fusions[0].widths == [4, 6, 3]
    assert op_types(fused) == ["MatMul"]  # both Transposes and both weights are gone
    assert [t.name for t in fused.graph.initializer] == ["fused(mm1+mm2).weight"]
    assert_equivalent(model, fused, feeds((2, 5, 4)), atol=1e-5, rtol=1e-4)
    check(fused)
