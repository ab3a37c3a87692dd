"""Elementwise affine steps (scale, shift, BatchNormalization) merged into neighbouring linear ops.

Each rewrite test checks the number of fusions, the resulting structure, onnxruntime equivalence
with explicit tolerances, and ``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import (
    assert_equivalent,
    check,
    feeds,
    fuse_with_report,
    gemm_node,
    init,
    make_model,
    op_types,
    rng,
    run,
    xy_io,
)
from onnx import TensorProto, helper

FLOAT = TensorProto.FLOAT


def _two_gemms_around(step_nodes, step_inits, width=6):
    """x[n,4] -> fc0 (4->width) -> <steps on h0, ending in s> -> fc1 (width->3) -> y."""
    r = rng(1)
    inits = [
        init("W0", r.standard_normal((width, 4)).astype(np.float32)),
        init("b0", r.standard_normal(width).astype(np.float32)),
        init("W1", r.standard_normal((3, width)).astype(np.float32)),
        init("b1", r.standard_normal(3).astype(np.float32)),
        *step_inits,
    ]
    nodes = [
        gemm_node("fc0", "x", "W0", "b0", "h0", transB=1),
        *step_nodes,
        gemm_node("fc1", "s", "W1", "b1", "y", transB=1),
    ]
    return make_model(nodes, *xy_io(["n", 4], ["n", 3]), inits)


@pytest.mark.parametrize(
    ("op", "inputs", "const"),
    [
        ("Mul", ["h0", "c"], np.linspace(0.5, 2, 6)),
        ("Mul", ["c", "h0"], np.float32(0.125)),
        ("Add", ["c", "h0"], np.linspace(-1, 1, 6)),
        ("Sub", ["h0", "c"], np.linspace(-1, 1, 6)),
        ("Sub", ["c", "h0"], np.full(6, 0.3)),
        ("Div", ["h0", "c"], np.linspace(1, 3, 6)),
    ],
)
def test_scale_and_shift_between_linear_layers_merge(op, inputs, const):
    step = helper.make_node(op, inputs, ["s"], name="step")
    model = _two_gemms_around([step], [init("c", np.asarray(const, np.float32))])
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert report.fusions[0].nodes == ["fc0", "step", "fc1"]
    assert op_types(fused) == ["Gemm"]
    assert [t.name for t in fused.graph.initializer] == [
        "fused(fc0+step+fc1).weight",
        "fused(fc0+step+fc1).bias",
    ]
    assert_equivalent(model, fused, feeds((5, 4)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_batch_norm_between_linear_layers_merges():
    r = rng(2)
    bn_inits = [
        init("scale", r.uniform(0.5, 2, 6).astype(np.float32)),
        init("bias", r.standard_normal(6).astype(np.float32)),
        init("mean", r.standard_normal(6).astype(np.float32)),
        init("var", r.uniform(0.1, 2, 6).astype(np.float32)),
    ]
    bn = helper.make_node(
        "BatchNormalization", ["h0", "scale", "bias", "mean", "var"], ["s"], name="bn", epsilon=1e-3
    )
    model = _two_gemms_around([bn], bn_inits)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and report.fusions[0].nodes == ["fc0", "bn", "fc1"]
    assert op_types(fused) == ["Gemm"]
    assert len(fused.graph.initializer) == 2
    assert_equivalent(model, fused, feeds((5, 4)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_steps_before_a_matmul_chain_on_3d_input():
    """x * s + t then MatMul+Add on a (batch, seq, d) input: one MatMul + Add."""
    r = rng(3)
    inits = [
        init("s", r.uniform(0.5, 2, 4).astype(np.float32)),
        init("t", r.standard_normal(4).astype(np.float32)),
        init("W", r.standard_normal((4, 5)).astype(np.float32)),
        init("b", r.standard_normal(5).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
        helper.make_node("Add", ["xs", "t"], ["xt"], name="shift"),
        helper.make_node("MatMul", ["xt", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["y"], name="bias"),
    ]
    model = make_model(nodes, *xy_io(["b", "s", 4], ["b", "s", 5]), inits)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert report.fusions[0].nodes == ["scale", "shift", "mm", "bias"]
    assert op_types(fused) == ["MatMul", "Add"]
    assert_equivalent(model, fused, feeds((2, 3, 4)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_steps_alone_are_left_as_they_are():
    r = rng(4)
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
        helper.make_node("Add", ["xs", "t"], ["y"], name="shift"),
    ]
    inits = [init("s", r.standard_normal(4).astype(np.float32))]
    inits.append(init("t", r.standard_normal(4).astype(np.float32)))
    model = make_model(nodes, *xy_io(["n", 4], ["n", 4]), inits)
    fused, report = fuse_with_report(model, policy="always")
    assert report.fusions == [] and report.declined == []
    assert op_types(fused) == ["Mul", "Add"]


@pytest.mark.parametrize(
    ("op", "inputs", "const", "why"),
    [
        ("Div", ["c", "h0"], np.linspace(1, 2, 6), "c / x is not affine"),
        ("Div", ["h0", "c"], np.array([1, 0, 1, 1, 1, 1]), "division by zero"),
        ("Mul", ["h0", "c"], np.arange(1, 13).reshape(2, 6), "broadcasts along the rows"),
        ("Mul", ["h0", "h0"], None, "no constant"),
    ],
)
def test_what_is_not_a_step(op, inputs, const, why):
    step = helper.make_node(op, inputs, ["s"], name="step")
    inits = [] if const is None else [init("c", np.asarray(const, np.float32))]
    model = _two_gemms_around([step], inits)
    if why == "broadcasts along the rows":  # make the graph valid for a (2, 6) constant
        model = make_model(
            list(model.graph.node), *xy_io([2, 4], [2, 3]), list(model.graph.initializer)
        )
    fused, report = fuse_with_report(model)
    assert report.fusions == [], why
    assert op_types(fused) == ["Gemm", op, "Gemm"]


def test_scalar_times_a_width_one_input_is_not_taken_for_a_wide_step():
    """x[n, 1] * c[6] broadcasts x up to 6 columns: not a step on the data's width."""
    r = rng(5)
    inits = [
        init("c", r.standard_normal(6).astype(np.float32)),
        init("W", r.standard_normal((6, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "c"], ["xc"], name="spread"),
        helper.make_node("MatMul", ["xc", "W"], ["y"], name="mm"),
    ]
    model = make_model(nodes, *xy_io(["n", 1], ["n", 3]), inits)
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == ["Mul", "MatMul"]


def test_cost_model_puts_a_step_with_the_cheaper_neighbour():
    """256 -> 32, scale(32), 32 -> 256: the scale joins a layer; the low-rank pair stays."""
    r = rng(6)
    inits = [
        init("W0", (r.standard_normal((32, 256)) / 16).astype(np.float32)),
        init("s", r.uniform(0.5, 2, 32).astype(np.float32)),
        init("W1", (r.standard_normal((256, 32)) / 6).astype(np.float32)),
    ]
    nodes = [
        gemm_node("down", "x", "W0", None, "h", transB=1),
        helper.make_node("Mul", ["h", "s"], ["hs"], name="scale"),
        gemm_node("up", "hs", "W1", None, "y", transB=1),
    ]
    model = make_model(nodes, *xy_io(["n", 256], ["n", 256]), inits)
    fused, report = fuse_with_report(model)
    # Either neighbour costs the same (256*32 multiply-adds); the tie goes to the later one.
    assert [r.nodes for r in report.fusions] == [["scale", "up"]]
    assert op_types(fused) == ["Gemm", "Gemm"]
    assert any(d.reason.startswith("cost model") for d in report.declined)
    assert_equivalent(model, fused, feeds((3, 256)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_refused_links_between_two_steps_are_not_reported():
    """Two scales with a fan-out between them would never merge: no reason to report."""
    r = rng(7)
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
        helper.make_node("Add", ["xs", "t"], ["y"], name="shift"),
        helper.make_node("Relu", ["xs"], ["z"], name="relu"),
    ]
    inits = [init("s", r.standard_normal(4).astype(np.float32))]
    inits.append(init("t", r.standard_normal(4).astype(np.float32)))
    inputs, outputs = xy_io(["n", 4], ["n", 4])
    outputs.append(helper.make_tensor_value_info("z", FLOAT, ["n", 4]))
    model = make_model(nodes, inputs, outputs, inits)
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and report.declined == []
    assert op_types(fused) == ["Mul", "Add", "Relu"]


def test_batch_norm_with_parameters_behind_identity_nodes():
    """torch's legacy exporter deduplicates equal initializers and passes them through Identity
    (untyped values): BatchNorm1d's zero mean and unit variance often arrive that way."""
    r = rng(8)
    bn_inits = [
        init("ones", np.ones(6, np.float32)),
        init("zeros", np.zeros(6, np.float32)),
        init("bias", r.standard_normal(6).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Identity", ["ones"], ["scale"], name="id_scale"),
        helper.make_node("Identity", ["zeros"], ["mean"], name="id_mean"),
        helper.make_node("Identity", ["ones"], ["var"], name="id_var"),
        helper.make_node(
            "BatchNormalization", ["h0", "scale", "bias", "mean", "var"], ["s"], name="bn"
        ),
    ]
    model = _two_gemms_around(nodes, bn_inits)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and report.fusions[0].nodes == ["fc0", "bn", "fc1"]
    assert op_types(fused) == ["Gemm"]  # the Identity nodes and their sources are gone too
    assert len(fused.graph.initializer) == 2
    assert_equivalent(model, fused, feeds((5, 4)), atol=1e-5, rtol=1e-4)
    check(fused)


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_linear_batchnorm_linear_head_merges(tmp_path, dynamo):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    head = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4)
    )
    with torch.no_grad():  # non-trivial running statistics
        head[1].running_mean.uniform_(-1, 1)
        head[1].running_var.uniform_(0.5, 2)
    head.eval()
    x = torch.randn(5, 16)
    path = tmp_path / "head.onnx"
    if dynamo:
        torch.onnx.export(head, (x,), str(path), dynamo=True)
    else:
        torch.onnx.export(head, (x,), str(path), dynamo=False, input_names=["x"])
    model = onnx.load(path)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1 and op_types(fused) == ["Gemm"]
    (got,) = run(fused, {model.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, head(x).numpy(), atol=1e-5, rtol=1e-4)
    check(fused)
