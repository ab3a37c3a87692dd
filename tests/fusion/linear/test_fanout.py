"""Constant steps folded into every reader (``converter.fusion.linear.fanout``), issue 21.

An IA3 scale or a learned per-feature scale read by q, k and v (or gate and up) folds into all of
them and disappears; a step some other node also reads stays; a norm's weight onnxruntime fuses
is never folded. Each rewrite test checks the fusions, the structure, onnxruntime equivalence and
the checker.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import assert_equivalent, check, feeds, fuse_with_report, init, op_types, rng
from onnx import TensorProto, helper

from converter.equivalence.kernels import fused_kernels, lost_kernels

FLOAT = TensorProto.FLOAT
ATOL, RTOL = 1e-5, 1e-4
IN, OUT = 16, 8


def _model(nodes: list, inits: list) -> onnx.ModelProto:
    """``x [2, 5, IN] -> nodes -> y [2, 5, OUT]`` at opset 17."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [2, 5, IN])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 5, OUT])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _qkv(steps: str = "scale", *, biases=(True, False, False), extra_reader: bool = False):
    """``h = x * s (+ t)`` read by three projections, joined by ``q * k + v`` (not a sum)."""
    r = rng(21)
    inits = [init("s", r.uniform(0.5, 1.5, IN).astype(np.float32))]
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"], name="ia3")]
    h = "xs"
    if steps == "shift":  # a shift alone
        inits = [init("t", (r.standard_normal(IN) * 0.5).astype(np.float32))]
        nodes = [helper.make_node("Add", ["x", "t"], ["xs"], name="shift")]
    if steps == "scale_shift":
        inits.append(init("t", (r.standard_normal(IN) * 0.5).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["xs", "t"], ["xst"], name="shift"))
        h = "xst"
    for name, bias in zip("qkv", biases, strict=True):
        inits.append(init(f"W{name}", (r.standard_normal((IN, OUT)) / 4).astype(np.float32)))
        out = name if not bias else f"{name}0"
        nodes.append(helper.make_node("MatMul", [h, f"W{name}"], [out], name=f"{name}_proj"))
        if bias:
            inits.append(init(f"b{name}", r.standard_normal(OUT).astype(np.float32)))
            nodes.append(helper.make_node("Add", [out, f"b{name}"], [name], name=f"{name}_bias"))
    joined = "y1" if extra_reader else "y"
    nodes += [
        helper.make_node("Mul", ["q", "k"], ["qk"], name="qk"),
        helper.make_node("Add", ["qk", "v"], [joined], name="join"),
    ]
    if extra_reader:  # Relu(h) summed over the features, added to every output
        inits.append(init("last", np.array([-1], np.int64)))
        nodes += [
            helper.make_node("Relu", [h], ["other"], name="other"),
            helper.make_node("ReduceSum", ["other", "last"], ["os"], keepdims=1, name="sum"),
            helper.make_node("Add", ["y1", "os"], ["y"], name="join2"),
        ]
    return onnx.shape_inference.infer_shapes(_model(nodes, inits))


@pytest.mark.parametrize("steps", ["scale", "scale_shift"])
def test_a_scale_read_by_q_k_v_folds_into_all_three(steps):
    model = _qkv(steps, biases=(True, True, True))
    check(model)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert "steps folded into all 3 readers" in report.fusions[0].note
    assert "Mul" in op_types(fused)  # the q * k join stays
    readers = [n for n in fused.graph.node if n.op_type == "MatMul"]
    assert len(readers) == 3 and all(n.input[0] == "x" for n in readers)  # x, not x * s
    assert [n.name for n in fused.graph.node if n.name in ("ia3", "shift")] == []
    assert {i.name for i in fused.graph.initializer}.isdisjoint({"s", "t"})
    check(fused)
    assert_equivalent(model, fused, feeds((2, 5, IN)), atol=ATOL, rtol=RTOL)
    again, report2 = fuse_with_report(fused)
    assert report2.fusions == [] and op_types(again) == op_types(fused)


def test_the_cost_model_counts_the_bias_each_reader_gains():
    """A shift folded into three readers without a bias gives each one ``(OUT,)`` bias: more
    than the shift it replaces when ``3 * OUT > IN``; refused under cost, made under always."""
    model = _qkv("shift", biases=(False, False, False))
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    reasons = [d.reason for d in report.declined if "shift" in d.nodes]
    assert any(r.startswith("cost model:") for r in reasons), reasons
    fused, report = fuse_with_report(model, policy="always")
    assert len(report.fusions) == 1
    check(fused)
    assert_equivalent(model, fused, feeds((2, 5, IN)), atol=ATOL, rtol=RTOL)


def test_a_step_another_node_reads_stays_for_it():
    model = _qkv(extra_reader=True)
    check(model)
    fused, report = fuse_with_report(model)
    assert not any("readers of their output" in (r.note or "") for r in report.fusions)
    assert "ia3" in [n.name for n in fused.graph.node]
    reasons = [d.reason for d in report.declined if "ia3" in d.nodes]
    assert "fan-out: intermediate 'xs' feeds 4 nodes" in reasons
    assert_equivalent(model, fused, feeds((2, 5, IN)), atol=ATOL, rtol=RTOL)


def test_a_layer_norm_weight_read_by_q_k_v_is_kept_for_the_runtime():
    """The gamma and beta of a LayerNorm decomposition onnxruntime fuses stay: folding them into
    the projections would cost the runtime its LayerNormalization kernel."""
    r = rng(3)
    inits = [
        init("two", np.array(2.0, np.float32)),
        init("eps", np.array(1e-5, np.float32)),
        init("gamma", r.uniform(0.5, 1.5, IN).astype(np.float32)),
        init("beta", (r.standard_normal(IN) * 0.5).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], name="mean"),
        helper.make_node("Sub", ["x", "mu"], ["xc"], name="center"),
        helper.make_node("Pow", ["xc", "two"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], name="var"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
        helper.make_node("Div", ["xc", "sd"], ["n"], name="normalise"),
        helper.make_node("Mul", ["n", "gamma"], ["ng"], name="weight"),
        helper.make_node("Add", ["ng", "beta"], ["h"], name="bias"),
    ]
    for name in "qkv":
        inits.append(init(f"W{name}", (r.standard_normal((IN, OUT)) / 4).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", ["h", f"W{name}"], [name], name=f"{name}_proj"))
    nodes += [
        helper.make_node("Mul", ["q", "k"], ["qk"], name="qk"),
        helper.make_node("Add", ["qk", "v"], ["y"], name="join"),
    ]
    model = _model(nodes, inits)
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    before, after = fused_kernels(model), fused_kernels(fused)
    assert lost_kernels(before, after) == [] and after.get("LayerNormalization") == 1
