"""Patterns onnxruntime fuses into one kernel are kept whole, and written the way it finds them.

Every graph is ``x -> Linear -> <pattern> -> Linear -> y`` (or convs around it): the constant
inside the pattern would fold into the next linear op for free by op count, and must not. Each
test checks the fusions made, the structure, onnxruntime equivalence with explicit tolerances,
the checker, the reason reported, and what onnxruntime runs (``fused_kernels``).
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
    init,
    make_model,
    op_types,
    rng,
    run,
    xy_io,
)
from onnx import TensorProto, helper

import converter
from converter.equivalence.kernels import fused_kernels, lost_kernels

W = 8
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _scalar(name: str, value: float) -> TensorProto:
    return init(name, np.array(value, np.float32))


def _between_linears(nodes, inits, *, out="g", width=W, rank=2):
    """``x -> fc0 (4 -> width) -> h0 -> <nodes ending in out> -> fc1 (width -> 3) -> y``."""
    r = rng(3)
    inits = [
        init("W0", (r.standard_normal((4, width)) / 2).astype(np.float32)),
        init("b0", (r.standard_normal(width) * 0.1).astype(np.float32)),
        init("W1", (r.standard_normal((width, 3)) / 3).astype(np.float32)),
        init("b1", (r.standard_normal(3) * 0.1).astype(np.float32)),
        *inits,
    ]
    body = [
        helper.make_node("MatMul", ["x", "W0"], ["m0"], name="mm0"),
        helper.make_node("Add", ["m0", "b0"], ["h0"], name="add0"),
        *nodes,
        helper.make_node("MatMul", [out, "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["y"], name="add1"),
    ]
    lead = ["n"] + ["s"] * (rank - 2)
    return make_model(body, *xy_io([*lead, 4], [*lead, 3]), inits)


def _erf_gelu(order: str, x: str = "h0", out: str = "g") -> tuple[list, list]:
    """Exact GELU of ``x`` in the order one exporter writes it.

    ``torchscript``: ``(x * (1 + erf(x / s))) * 0.5``; ``head``: ``(x * 0.5) * (1 + erf)``;
    ``dynamo``: ``x * (0.5 * (1 + erf))``.
    """
    nodes = [
        helper.make_node("Div", [x, "sqrt2"], ["d"], name="div"),
        helper.make_node("Erf", ["d"], ["e"], name="erf"),
        helper.make_node("Add", ["e", "one"], ["a"], name="add_one"),
    ]
    if order == "torchscript":
        nodes += [
            helper.make_node("Mul", [x, "a"], ["xa"], name="mul_x"),
            helper.make_node("Mul", ["xa", "half"], [out], name="mul_half"),
        ]
    elif order == "head":
        nodes += [
            helper.make_node("Mul", [x, "half"], ["xh"], name="mul_half"),
            helper.make_node("Mul", ["xh", "a"], [out], name="mul_x"),
        ]
    else:
        nodes += [
            helper.make_node("Mul", ["half", "a"], ["ha"], name="mul_half"),
            helper.make_node("Mul", [x, "ha"], [out], name="mul_x"),
        ]
    inits = [_scalar("sqrt2", 1.4142135), _scalar("one", 1.0), _scalar("half", 0.5)]
    return nodes, inits


def _tanh_gelu(order: str = "last") -> tuple[list, list]:
    """GELU's tanh form: ``(x * (1 + tanh(c (x + k x^3)))) * 0.5`` (``last``), or dynamo's
    ``x * (0.5 * (1 + tanh(...)))`` (``dynamo``)."""
    nodes = [
        helper.make_node("Pow", ["h0", "three"], ["p"], name="pow"),
        helper.make_node("Mul", ["p", "k"], ["kp"], name="mul_k"),
        helper.make_node("Add", ["h0", "kp"], ["u"], name="add_u"),
        helper.make_node("Mul", ["u", "c"], ["cu"], name="mul_c"),
        helper.make_node("Tanh", ["cu"], ["t"], name="tanh"),
        helper.make_node("Add", ["t", "one"], ["a"], name="add_one"),
    ]
    if order == "last":
        nodes += [
            helper.make_node("Mul", ["h0", "a"], ["xa"], name="mul_x"),
            helper.make_node("Mul", ["xa", "half"], ["g"], name="mul_half"),
        ]
    else:
        nodes += [
            helper.make_node("Mul", ["half", "a"], ["ha"], name="mul_half"),
            helper.make_node("Mul", ["h0", "ha"], ["g"], name="mul_x"),
        ]
    inits = [
        _scalar("three", 3.0),
        _scalar("k", 0.044715),
        _scalar("c", 0.7978846),
        _scalar("one", 1.0),
        _scalar("half", 0.5),
    ]
    return nodes, inits


def _norm(kind: str, x: str = "h0", out: str = "g") -> tuple[list, list]:
    """A LayerNorm (``layer``: gamma and beta) or RMSNorm (``rms_div``: ``x / sqrt``;
    ``rms_reciprocal``: ``x * Reciprocal(sqrt)``, dynamo's spelling) of ``x`` on the last axis."""
    r = rng(5)
    inits = [
        _scalar("two", 2.0),
        _scalar("eps", 1e-5),
        init("gamma", (r.uniform(0.5, 1.5, W)).astype(np.float32)),
        init("beta", (r.standard_normal(W) * 0.5).astype(np.float32)),
    ]
    if kind == "layer":
        nodes = [
            helper.make_node("ReduceMean", [x], ["mu"], axes=[-1], name="mean"),
            helper.make_node("Sub", [x, "mu"], ["xc"], name="center"),
            helper.make_node("Pow", ["xc", "two"], ["sq"], name="square"),
            helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], name="var"),
            helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
            helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
            helper.make_node("Div", ["xc", "sd"], ["n"], name="normalise"),
            helper.make_node("Mul", ["n", "gamma"], ["ng"], name="weight"),
            helper.make_node("Add", ["ng", "beta"], [out], name="bias"),
        ]
        return nodes, inits
    nodes = [
        helper.make_node("Pow", [x, "two"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], name="mean"),
        helper.make_node("Add", ["ms", "eps"], ["me"], name="add_eps"),
        helper.make_node("Sqrt", ["me"], ["rt"], name="sqrt"),
    ]
    if kind == "rms_div":
        nodes.append(helper.make_node("Div", [x, "rt"], ["n"], name="normalise"))
    else:
        nodes += [
            helper.make_node("Reciprocal", ["rt"], ["inv"], name="rsqrt"),
            helper.make_node("Mul", [x, "inv"], ["n"], name="normalise"),
        ]
    nodes.append(helper.make_node("Mul", ["gamma", "n"], [out], name="weight"))
    return nodes, inits


def _kept(report, node: str) -> list[str]:
    return [d.reason for d in report.declined if node in d.nodes and d.reason.startswith("kept")]


def _assert_runtime_keeps(original: onnx.ModelProto, fused: onnx.ModelProto, kernel: str):
    before, after = fused_kernels(original), fused_kernels(fused)
    assert lost_kernels(before, after) == []
    assert after.get(kernel, 0) >= 1, after


@pytest.mark.parametrize("order", ["torchscript", "head"])
def test_gelu_half_is_kept_for_the_runtime(order):
    model = _between_linears(*_erf_gelu(order))
    fused, report = fuse_with_report(model)
    check(fused)
    assert report.fusions == [] and report.runtime_rewrites == []
    assert op_types(fused) == op_types(model)  # nothing folded: the 0.5 stays where it was
    if order == "torchscript":  # the 0.5 sits right before fc1: declined, with the reason
        assert _kept(report, "mul_half") == [
            "kept: part of GELU (erf form), which onnxruntime fuses into one kernel"
        ]
    assert fused_kernels(model) == {"Gelu": 1}
    _assert_runtime_keeps(model, fused, "Gelu")


def test_dynamo_gelu_is_reordered_so_the_runtime_fuses_it():
    model = _between_linears(*_erf_gelu("dynamo"))
    assert "Gelu" not in fused_kernels(model)  # onnxruntime does not match dynamo's order
    fused, report = fuse_with_report(model)
    check(fused)
    assert report.fusions == [] and report.modified
    assert report.runtime_rewrites == [
        "main graph: GELU at 'mul_x' reordered as x * (1 + erf(x / sqrt 2)) * 0.5"
    ]
    assert op_types(fused).count("Mul") == 2 and len(fused.graph.node) == len(model.graph.node)
    assert fused_kernels(fused).get("Gelu") == 1
    x = feeds((64, 4), seed=2)
    for a, b in zip(run(model, x), run(fused, x), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit: the 0.5 is exact either side
    again, second = fuse_with_report(fused)  # a second run finds nothing more
    assert second.runtime_rewrites == [] and second.fusions == []
    assert op_types(again) == op_types(fused)


def test_dynamo_gelu_with_a_shared_inner_product_is_left():
    nodes, inits = _erf_gelu("dynamo")
    nodes.append(helper.make_node("Add", ["g", "ha"], ["g2"], name="reads_inner"))
    model = _between_linears(nodes, inits, out="g2")
    fused, report = fuse_with_report(model)
    check(fused)
    assert report.runtime_rewrites == []
    assert op_types(fused) == op_types(model)


def test_tanh_gelu_half_is_kept():
    model = _between_linears(*_tanh_gelu())
    fused, report = fuse_with_report(model)
    check(fused)
    assert report.fusions == []
    assert _kept(report, "mul_half") == [
        "kept: part of GELU (tanh form), which onnxruntime fuses into one kernel"
    ]
    assert op_types(fused) == op_types(model)


def test_dynamo_tanh_gelu_is_reordered_so_the_runtime_fuses_it():
    model = _between_linears(*_tanh_gelu("dynamo"))
    assert "FastGelu" not in fused_kernels(model)
    fused, report = fuse_with_report(model)
    check(fused)
    assert report.fusions == []
    assert report.runtime_rewrites == [
        "main graph: GELU at 'mul_x' reordered as x * 0.5 * (1 + tanh(...))"
    ]
    assert fused_kernels(fused).get("FastGelu") == 1
    x = feeds((64, 4), seed=3)
    for a, b in zip(run(model, x), run(fused, x), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit
    _, second = fuse_with_report(fused)
    assert second.runtime_rewrites == [] and second.fusions == []


def test_quick_gelu_scale_is_kept():
    # x * sigmoid(1.702 x) on an intermediate that only the pattern reads: fc0 -> Mul(1.702) is
    # a link the chain would take if the scale were free.
    nodes = [
        helper.make_node("Mul", ["h0", "k"], ["kx"], name="mul_k"),
        helper.make_node("Sigmoid", ["kx"], ["s"], name="sigmoid"),
        helper.make_node("Mul", ["h0", "s"], ["g"], name="mul_x"),
    ]
    model = _between_linears(nodes, [_scalar("k", 1.702)])
    fused, report = fuse_with_report(model)
    check(fused)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    _assert_runtime_keeps(model, fused, "QuickGelu")


def test_layer_norm_weight_and_bias_are_kept():
    model = _between_linears(*_norm("layer"), rank=3)
    fused, report = fuse_with_report(model)
    check(fused)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    assert _kept(report, "bias") == [
        "kept: the bias of a LayerNorm decomposition, which onnxruntime fuses into one kernel "
        "with it"
    ]
    _assert_runtime_keeps(model, fused, "LayerNormalization")


def test_rms_norm_weight_is_kept():
    model = _between_linears(*_norm("rms_div"), rank=3)
    fused, report = fuse_with_report(model)
    check(fused)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    assert _kept(report, "weight") == [
        "kept: the weight of a LayerNorm/RMSNorm decomposition, which onnxruntime fuses into "
        "one kernel with it"
    ]
    _assert_runtime_keeps(model, fused, "SimplifiedLayerNormalization")


def test_rms_norm_reciprocal_is_written_as_div():
    model = _between_linears(*_norm("rms_reciprocal"), rank=3)
    assert "SimplifiedLayerNormalization" not in fused_kernels(model)
    fused, report = fuse_with_report(model)
    check(fused)
    assert report.fusions == []
    assert report.runtime_rewrites == [
        "main graph: RMSNorm's Reciprocal 'rsqrt' written as Div(1, Sqrt) 'rsqrt_1'"
    ]
    assert "Reciprocal" not in op_types(fused) and op_types(fused).count("Div") == 1
    assert fused_kernels(fused).get("SimplifiedLayerNormalization") == 1
    x = feeds((2, 5, 4), seed=4)
    for a, b in zip(run(model, x), run(fused, x), strict=True):
        np.testing.assert_array_equal(a, b)  # one correctly rounded division either way


def test_a_plain_scale_before_a_linear_still_folds():
    # The guard is not a blanket refusal: a Mul(0.5) that is no part of any pattern merges.
    nodes = [
        helper.make_node("Relu", ["h0"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "half"], ["g"], name="mul_half"),
    ]
    model = _between_linears(nodes, [_scalar("half", 0.5)])
    fused, report = fuse_with_report(model)
    check(fused)
    assert len(report.fusions) == 1 and "Mul" not in op_types(fused)
    assert_equivalent(model, fused, feeds((16, 4)), **TOL)


def test_a_scale_before_the_pattern_folds_and_the_pattern_survives():
    # fc0 -> Mul(s) -> GELU -> fc1: the scale goes into fc0 and the Gelu kernel stays.
    nodes, inits = _erf_gelu("torchscript", x="hs")
    nodes.insert(0, helper.make_node("Mul", ["h0", "s"], ["hs"], name="layer_scale"))
    inits.append(init("s", rng(7).uniform(0.5, 2, W).astype(np.float32)))
    model = _between_linears(nodes, inits)
    fused, report = fuse_with_report(model)
    check(fused)
    assert len(report.fusions) == 1 and "layer_scale" in report.fusions[0].nodes
    assert op_types(fused).count("Mul") == 2  # GELU's two
    assert_equivalent(model, fused, feeds((16, 4)), **TOL)
    _assert_runtime_keeps(model, fused, "Gelu")


def _conv_gelu_conv() -> onnx.ModelProto:
    """``x -> Conv 3x3 -> GELU (TorchScript order) -> Conv 1x1 -> y``: ConvFFN of RepViT/FastViT."""
    r = rng(9)
    inits = [
        init("K0", (r.standard_normal((W, 3, 3, 3)) / 4).astype(np.float32)),
        init("c0", (r.standard_normal(W) * 0.1).astype(np.float32)),
        init("K1", (r.standard_normal((4, W, 1, 1)) / 3).astype(np.float32)),
        init("c1", (r.standard_normal(4) * 0.1).astype(np.float32)),
    ]
    gelu, consts = _erf_gelu("torchscript")
    nodes = [
        helper.make_node("Conv", ["x", "K0", "c0"], ["h0"], pads=[1, 1, 1, 1], name="conv0"),
        *gelu,
        helper.make_node("Conv", ["g", "K1", "c1"], ["y"], name="conv1"),
    ]
    return make_model(nodes, *xy_io([1, 3, 6, 6], [1, 4, 6, 6]), inits + consts)


def test_gelu_half_before_a_conv_is_kept():
    model = _conv_gelu_conv()
    fused, report = fuse_with_report(model)
    check(fused)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    assert any(
        d.reason == "kept: part of GELU (erf form), which onnxruntime fuses into one kernel"
        for d in report.declined
    )
    _assert_runtime_keeps(model, fused, "Gelu")


def test_stacked_blocks_keep_every_pattern_and_reach_a_fixpoint():
    """Three MLP blocks, GELU in all three orders and a LayerNorm, composed; a second pass finds
    nothing; the fused model keeps every fused kernel and folds the free layer scales."""
    r = rng(11)
    nodes, inits, x = [], [], "x"
    for i, order in enumerate(["torchscript", "dynamo", "head"]):
        names = {n: f"{n}{i}" for n in ("W", "b", "V", "c", "s", "h", "g", "o", "sc", "m", "p")}
        inits += [
            init(names["W"], (r.standard_normal((W, W)) / 3).astype(np.float32)),
            init(names["b"], (r.standard_normal(W) * 0.1).astype(np.float32)),
            init(names["V"], (r.standard_normal((W, W)) / 3).astype(np.float32)),
            init(names["s"], r.uniform(0.5, 2, W).astype(np.float32)),
        ]
        gelu, consts = _erf_gelu(order, x=names["h"], out=names["g"])
        rename = {"d": f"d{i}", "e": f"e{i}", "a": f"a{i}", "xa": f"xa{i}", "xh": f"xh{i}"}
        rename["ha"] = f"ha{i}"
        for node in gelu:
            node.name = f"{node.name}{i}"
            node.input[:] = [rename.get(v, v) for v in node.input]
            node.output[:] = [rename.get(v, v) for v in node.output]
        nodes += [
            helper.make_node("MatMul", [x, names["W"]], [names["m"]], name=f"fc_in{i}"),
            helper.make_node("Add", [names["m"], names["b"]], [names["h"]], name=f"bias{i}"),
            *gelu,
            helper.make_node("MatMul", [names["g"], names["V"]], [names["p"]], name=f"fc_out{i}"),
            helper.make_node("Mul", [names["p"], names["s"]], [names["sc"]], name=f"scale{i}"),
        ]
        x = names["sc"]
    inits += consts  # GELU's scalars, shared by the three blocks
    norm, norm_inits = _norm("layer", x=x, out="y")
    model = make_model(nodes + norm, *xy_io(["n", 3, W], ["n", 3, W]), inits + norm_inits)
    fused, report = fuse_with_report(model)
    check(fused)
    # the three layer scales fold into fc_out (fc_out -> scale is a chain segment each)
    assert len(report.fusions) == 3
    assert not any(n.op_type == "Mul" and n.name.startswith("scale") for n in fused.graph.node)
    assert len(report.runtime_rewrites) == 1  # the dynamo block
    assert_equivalent(model, fused, feeds((2, 3, W)), **TOL)
    before, after = fused_kernels(model), fused_kernels(fused)
    assert lost_kernels(before, after) == []
    # onnxruntime also takes each GELU's bias Add into it (BiasGelu): count both kernels
    assert [after.get("Gelu", 0) + after.get("BiasGelu", 0), before.get("BiasGelu", 0)] == [3, 2]
    assert after["LayerNormalization"] == 1
    again, second = fuse_with_report(fused)
    assert second.fusions == [] and second.runtime_rewrites == []
    assert op_types(again) == op_types(fused)


def test_a_model_rewritten_only_for_the_runtime_is_validated_and_written(tmp_path):
    src, dst = tmp_path / "gelu.onnx", tmp_path / "gelu.fused.onnx"
    onnx.save(_between_linears(*_erf_gelu("dynamo")), src)
    report = converter.fuse_file(src, dst)
    assert report.fusions == [] and report.rewritten and report.validated is True
    assert dst.read_bytes() != src.read_bytes()  # not the byte copy of an unchanged model
    assert fused_kernels(onnx.load(dst)).get("Gelu") == 1


def test_a_bias_free_merge_between_transposes_to_a_graph_output_is_a_matmul():
    """``Transpose -> Transpose -> Gemm -> Gemm -> Transpose (a graph output) -> Transpose``
    (fuzz seed 8 #157's shape): a merged bias-free Gemm there would lose that output in
    onnxruntime 1.32 (its GemmTransposeFusion takes both Transposes into the Gemm), and the
    session would fail; written as a MatMul, it loads and runs."""
    r = rng(30)
    inits = [
        init("w1", r.standard_normal((3, 4)).astype(np.float32)),
        init("w2", r.standard_normal((5, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x1"], perm=[1, 0], name="t_first"),
        helper.make_node("Transpose", ["x1"], ["xt"], perm=[1, 0], name="t_in"),
        helper.make_node("Gemm", ["xt", "w1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Gemm", ["h", "w2"], ["g"], transB=1, name="fc2"),
        helper.make_node("Transpose", ["g"], ["gt"], perm=[1, 0], name="t_out"),
        helper.make_node("Transpose", ["gt"], ["y"], perm=[1, 0], name="t_back"),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 5]),
        helper.make_tensor_value_info("gt", TensorProto.FLOAT, [5, 6]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 4])]
    model = make_model(nodes, inputs, outputs, inits)
    fused, report = fuse_with_report(model)
    assert [f.nodes for f in report.fusions] == [["fc1", "fc2"]]
    assert op_types(fused) == ["Transpose", "Transpose", "MatMul", "Transpose", "Transpose"]
    fused_kernels(fused)  # builds the session with onnxruntime's optimisations: it loads
    assert_equivalent(model, fused, {"x": r.standard_normal((6, 4)).astype(np.float32)})
    check(fused)
