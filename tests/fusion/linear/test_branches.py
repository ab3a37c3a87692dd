"""Parallel branches (LoRA adapters, residual connections) summed by an Add, merged into one op.

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


def _lora(d_in=32, d_out=24, rank=4, *, three_d=False, tail=None) -> onnx.ModelProto:
    """base(x) + 0.5 * B(A(x)), as PEFT computes a LoRA-adapted Linear; optionally followed
    by one more Linear (``tail`` outputs)."""
    r = rng(1)
    inits = [
        init("A", r.standard_normal((d_in, rank)).astype(np.float32)),
        init("B", r.standard_normal((rank, d_out)).astype(np.float32)),
        init("scaling", np.array(0.5, np.float32)),
    ]
    base_out = "base"
    if three_d:
        inits += [
            init("W", r.standard_normal((d_in, d_out)).astype(np.float32)),
            init("b", r.standard_normal(d_out).astype(np.float32)),
        ]
        base = [
            helper.make_node("MatMul", ["x", "W"], ["xw"], name="base_mm"),
            helper.make_node("Add", ["xw", "b"], [base_out], name="base_add"),
        ]
    else:
        inits += [
            init("W", r.standard_normal((d_out, d_in)).astype(np.float32)),
            init("b", r.standard_normal(d_out).astype(np.float32)),
        ]
        base = [gemm_node("base", "x", "W", "b", base_out, transB=1)]
    sum_out = "y" if tail is None else "h"
    nodes = [
        *base,
        helper.make_node("MatMul", ["x", "A"], ["xa"], name="lora_A"),
        helper.make_node("MatMul", ["xa", "B"], ["xab"], name="lora_B"),
        helper.make_node("Mul", ["xab", "scaling"], ["lora"], name="scale"),
        helper.make_node("Add", [base_out, "lora"], [sum_out], name="merge"),
    ]
    out_width = d_out
    if tail is not None:
        inits.append(init("T", r.standard_normal((tail, d_out)).astype(np.float32)))
        nodes.append(gemm_node("tail", "h", "T", None, "y", transB=1))
        out_width = tail
    lead = ["b", "s"] if three_d else ["n"]
    return make_model(nodes, *xy_io([*lead, d_in], [*lead, out_width]), inits)


def test_lora_adapter_merges_into_its_base_layer():
    model = _lora()
    fused, report = fuse_with_report(model)
    (record,) = report.fusions
    assert record.nodes == ["base", "lora_A", "lora_B", "scale", "merge"]
    assert op_types(fused) == ["Gemm"]
    assert record.macs_before == 32 * 24 + 32 * 4 + 4 * 24 + 24 + 24
    assert record.macs_after == 32 * 24
    assert report.params_after == 32 * 24 + 24
    assert_equivalent(model, fused, feeds((5, 32)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_lora_adapter_on_a_3d_matmul_base():
    model = _lora(three_d=True)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) == ["MatMul", "Add"]
    assert_equivalent(model, fused, feeds((2, 3, 32)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_merged_branches_then_join_the_chain_after_them():
    model = _lora(d_in=16, d_out=16, tail=16)
    fused, report = fuse_with_report(model)
    assert [len(r.nodes) for r in report.fusions] == [5, 2]  # branches, then (merged, tail)
    assert op_types(fused) == ["Gemm"]
    assert_equivalent(model, fused, feeds((4, 16)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_residual_connection_around_a_linear_layer():
    r = rng(2)
    nodes = [
        gemm_node("fc", "x", "W", "b", "h", transB=1),
        helper.make_node("Add", ["x", "h"], ["y"], name="residual"),
    ]
    inits = [
        init("W", r.standard_normal((8, 8)).astype(np.float32)),
        init("b", r.standard_normal(8).astype(np.float32)),
    ]
    model = make_model(nodes, *xy_io(["n", 8], ["n", 8]), inits)
    fused, report = fuse_with_report(model)
    assert [r.nodes for r in report.fusions] == [["fc", "residual"]]
    assert op_types(fused) == ["Gemm"]
    assert_equivalent(model, fused, feeds((3, 8)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_two_low_rank_branches_of_a_wide_layer_stay_apart():
    r = rng(3)
    names = ["A1", "B1", "A2", "B2"]
    shapes = [(256, 8), (8, 256), (256, 8), (8, 256)]
    inits = [
        init(n, r.standard_normal(s).astype(np.float32)) for n, s in zip(names, shapes, strict=True)
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "A1"], ["a1"], name="a1"),
        helper.make_node("MatMul", ["a1", "B1"], ["p"], name="b1"),
        helper.make_node("MatMul", ["x", "A2"], ["a2"], name="a2"),
        helper.make_node("MatMul", ["a2", "B2"], ["q"], name="b2"),
        helper.make_node("Add", ["p", "q"], ["y"], name="sum"),
    ]
    model = make_model(nodes, *xy_io(["n", 256], ["n", 256]), inits)
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    reasons = [d.reason for d in report.declined]
    assert any(reason.startswith("cost model: merging the parallel branches") for reason in reasons)
    fused_always, _ = fuse_with_report(model, policy="always")
    assert op_types(fused_always) == ["Gemm"]
    assert_equivalent(model, fused_always, feeds((2, 256)), atol=1e-4, rtol=1e-4)


def test_branch_result_used_elsewhere_is_left_intact():
    model = _lora()
    model.graph.output.append(helper.make_tensor_value_info("lora", FLOAT, ["n", 24]))
    fused, report = fuse_with_report(model)
    assert "Add" in op_types(fused)
    assert all("merge" not in r.nodes for r in report.fusions)
    assert_equivalent(model, fused, feeds((3, 32)), atol=1e-5, rtol=1e-4)
    check(fused)


def test_torch_lora_module_exports_and_merges(tmp_path):
    torch = pytest.importorskip("torch")

    class LoRALinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = torch.nn.Linear(32, 32)
            self.lora_a = torch.nn.Linear(32, 4, bias=False)
            self.lora_b = torch.nn.Linear(4, 32, bias=False)
            self.head = torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.head(self.base(x) + 0.25 * self.lora_b(self.lora_a(x)))

    torch.manual_seed(0)
    module = LoRALinear().eval()
    x = torch.randn(4, 32)
    path = tmp_path / "lora.onnx"
    torch.onnx.export(
        module, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}}
    )
    model = onnx.load(path)
    fused, report = fuse_with_report(model)
    assert op_types(fused) == ["Gemm"]
    # The adapter merges into its base layer; the head then joins that merged op.
    assert [len(r.nodes) for r in report.fusions] == [5, 2]
    with torch.no_grad():
        expected = module(x).numpy()
    (got,) = run(fused, {"x": x.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    check(fused)


@pytest.mark.parametrize("policy", ["cost", "always"])
def test_branches_of_scales_alone_are_not_made_a_matrix(policy):
    r = rng(4)
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
        helper.make_node("Add", ["x", "xs"], ["y"], name="residual"),
    ]
    model = make_model(
        nodes, *xy_io(["n", 8], ["n", 8]), [init("s", r.standard_normal(8).astype(np.float32))]
    )
    fused, report = fuse_with_report(model, policy=policy)
    assert report.fusions == [] and report.declined == []
    assert op_types(fused) == ["Mul", "Add"]
