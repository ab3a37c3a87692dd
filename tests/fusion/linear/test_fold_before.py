"""Tests of steps folded into the linear op they reach through views of its input
(:mod:`converter.fusion.linear.fold_before`) and of TensorFlow's LayerNorm tail
(:mod:`converter.fusion.linear.norm_tail`), on graphs written as tf2onnx writes Keras layers.

Each test checks the number of fusions, the structure, onnxruntime equivalence at explicit
tolerances and the full checker; refusals assert their reason.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
from builders import assert_equivalent, check, fuse_with_report, init, make_model, op_types, rng
from onnx import TensorProto, helper

from converter.equivalence.kernels import fused_kernels, lost_kernels

F = TensorProto.FLOAT
TOL = {"atol": 1e-5, "rtol": 1e-4}
T, C, W = 5, 6, 4  # tokens, channels, the Dense's width


def _io(x_shape, y_shape):
    return (
        [helper.make_tensor_value_info("x", F, x_shape)],
        [helper.make_tensor_value_info("y", F, y_shape)],
    )


def _feed(shape, seed=0):
    return {"x": rng(seed).uniform(-1, 1, shape).astype(np.float32)}


def _ints(name: str, values) -> onnx.TensorProto:
    return init(name, np.array(values, np.int64))


def _tensordot(x: str, width: int, out: str, prefix: str = "dense") -> tuple[list, list]:
    """tf2onnx's Dense on a rank-3 input: ``Reshape(-1, C) -> MatMul``, then ``Reshape`` to
    ``Shape(x)[:-1] + (width,)`` (a Shape of the Dense's input, with a symbolic batch) and the
    bias ``Add``."""
    r = rng(7)
    inits = [
        init(f"{prefix}_w", r.standard_normal((C, width)).astype(np.float32)),
        init(f"{prefix}_b", r.standard_normal(width).astype(np.float32)),
        _ints(f"{prefix}_flat", [-1, C]),
        _ints(f"{prefix}_start", [0]),
        _ints(f"{prefix}_end", [-1]),
        _ints(f"{prefix}_width", [width]),
    ]
    p = prefix
    nodes = [
        helper.make_node("Shape", [x], [f"{p}_shape"], name=f"{p}/Shape"),
        helper.make_node(
            "Slice", [f"{p}_shape", f"{p}_start", f"{p}_end"], [f"{p}_lead"], name=f"{p}/lead"
        ),
        helper.make_node(
            "Concat", [f"{p}_lead", f"{p}_width"], [f"{p}_target"], axis=0, name=f"{p}/target"
        ),
        helper.make_node("Reshape", [x, f"{p}_flat"], [f"{p}_rows"], name=f"{p}/Reshape"),
        helper.make_node("MatMul", [f"{p}_rows", f"{p}_w"], [f"{p}_mm"], name=f"{p}/MatMul"),
        helper.make_node("Reshape", [f"{p}_mm", f"{p}_target"], [f"{p}_back"], name=f"{p}/back"),
        helper.make_node("Add", [f"{p}_back", f"{p}_b"], [out], name=f"{p}/BiasAdd"),
    ]
    return nodes, inits


def _tf_layer_norm(x: str, out: str, seed: int = 3) -> tuple[list, list]:
    """TensorFlow's ``batch_normalization`` on the last axis as tf2onnx writes it:
    ``inv = Reciprocal(Sqrt(var + eps)) * gamma``, ``x * inv + (Neg(mean) * inv + beta)``."""
    r = rng(seed)
    inits = [
        init("gamma", r.uniform(0.5, 1.5, C).astype(np.float32)),
        init("beta", (r.standard_normal(C) * 0.3).astype(np.float32)),
        init("eps", np.array(1e-6, np.float32)),
    ]
    mean = {"axes": [-1], "keepdims": 1}
    nodes = [
        helper.make_node("ReduceMean", [x], ["mean"], name="ln/mean", **mean),
        helper.make_node("Neg", ["mean"], ["neg"], name="ln/Neg"),
        helper.make_node("Sub", [x, "mean"], ["diff"], name="ln/diff"),
        helper.make_node("Mul", ["diff", "diff"], ["sq"], name="ln/sq"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="ln/variance", **mean),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="ln/add"),
        helper.make_node("Sqrt", ["var_eps"], ["root"], name="ln/Rsqrt"),
        helper.make_node("Reciprocal", ["root"], ["r"], name="ln/Rsqrt_inv"),
        helper.make_node("Mul", ["r", "gamma"], ["inv"], name="ln/mul"),
        helper.make_node("Mul", [x, "inv"], ["scaled"], name="ln/mul_2"),
        helper.make_node("Mul", ["neg", "inv"], ["moved"], name="ln/mul_1"),
        helper.make_node("Add", ["moved", "beta"], ["shift"], name="ln/add_1"),
        helper.make_node("Add", ["scaled", "shift"], [out], name="ln/add_2"),
    ]
    return nodes, inits


def _counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(op_types(model))


def test_layer_scale_and_shift_fold_into_a_tensordot_dense_whose_shape_is_read():
    """``Dense(x * s + t)`` on a rank-3 input with a symbolic batch: the Shape reading the
    steps' output reads their input instead, and both steps go into the MatMul."""
    r = rng(1)
    inits = [
        init("s", r.uniform(0.5, 1.5, (1, 1, C)).astype(np.float32)),
        init("t", r.standard_normal(C).astype(np.float32)),
    ]
    steps = [
        helper.make_node("Mul", ["x", "s"], ["scaled"], name="layer_scale"),
        helper.make_node("Add", ["scaled", "t"], ["shifted"], name="shift"),
    ]
    dense, dense_inits = _tensordot("shifted", W, "y")
    model = make_model(steps + dense, *_io(["N", T, C], ["N", T, W]), inits + dense_inits)
    fused, report = fuse_with_report(model)
    notes = [f.note or "" for f in report.fusions]  # the bias first: the op is then fused(...)
    assert notes[0] == "Add folded into dense/MatMul through Reshape"
    assert [n.split(" ")[0] for n in notes[1:]] == ["Add", "Mul"]
    assert all(n.endswith("through Reshape before it") for n in notes[1:])
    counts = _counts(fused)
    assert counts["Mul"] == 0 and counts["Reshape"] == 2 and counts["Shape"] == 1
    shape_node = next(n for n in fused.graph.node if n.op_type == "Shape")
    assert list(shape_node.input) == ["x"]
    for batch in (1, 3):
        assert_equivalent(model, fused, _feed((batch, T, C), batch), **TOL)
    check(fused)


def test_tf_layer_norm_gamma_and_beta_fold_into_the_next_dense():
    """Keras' LayerNorm then Dense: the gamma Mul and the beta Add leave the norm, their values
    are in the Dense's weight and bias; the normalisation itself stays as it was."""
    ln, ln_inits = _tf_layer_norm("x", "normed")
    dense, dense_inits = _tensordot("normed", W, "y")
    model = make_model(ln + dense, *_io(["N", T, C], ["N", T, W]), ln_inits + dense_inits)
    fused, report = fuse_with_report(model)
    folded = [f for f in report.fusions if f.note and "LayerNorm" in f.note]
    assert len(folded) == 1
    assert folded[0].note == (
        "a LayerNorm's gamma and beta folded into fused(dense/MatMul) through Reshape before it"
    )
    names = {n.name for n in fused.graph.node}
    assert "ln/mul" not in names and "ln/add_1" not in names  # the gamma Mul, the beta Add
    assert {"ln/mul_1", "ln/mul_2", "ln/add_2"} <= names
    before, after = _counts(model), _counts(fused)
    assert after["Mul"] == before["Mul"] - 1
    assert not any(i.name in ("gamma", "beta") for i in fused.graph.initializer)
    assert not lost_kernels(fused_kernels(model), fused_kernels(fused))
    for batch in (1, 4):
        assert_equivalent(model, fused, _feed((batch, T, C), batch), **TOL)
    check(fused)


def test_steps_fold_into_the_head_through_a_mean_over_tokens():
    """``Dense(mean(LayerNorm(x), axis=1))``: GlobalAveragePooling1D between the last norm and
    the head; the mean commutes with the per-channel map."""
    ln, ln_inits = _tf_layer_norm("x", "normed")
    r = rng(5)
    inits = [
        init("head_w", r.standard_normal((C, W)).astype(np.float32)),
        init("head_b", r.standard_normal(W).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["normed"], ["pooled"], axes=[1], keepdims=0, name="gap"),
        helper.make_node("MatMul", ["pooled", "head_w"], ["mm"], name="head"),
        helper.make_node("Add", ["mm", "head_b"], ["y"], name="head_bias"),
    ]
    model = make_model(ln + nodes, *_io(["N", T, C], ["N", W]), ln_inits + inits)
    fused, report = fuse_with_report(model)
    notes = [f.note for f in report.fusions]
    assert "a LayerNorm's gamma and beta folded into head through ReduceMean before it" in notes
    assert _counts(fused)["Gemm"] == 1
    assert_equivalent(model, fused, _feed((3, T, C)), **TOL)
    check(fused)


def _token_scale_model(permuted_is_output: bool = False) -> onnx.ModelProto:
    """``Dense_tokens(Transpose(x * s))``, ``s`` of shape ``(1, T, 1)`` (and the permuted value
    a graph output too, if asked)."""
    r = rng(2)
    inits = [
        init("s", r.uniform(0.5, 1.5, (1, T, 1)).astype(np.float32)),
        init("wt", r.standard_normal((T, W)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["scaled"], name="token_scale"),
        helper.make_node("Transpose", ["scaled"], ["permuted"], perm=[0, 2, 1], name="permute"),
        helper.make_node("MatMul", ["permuted", "wt"], ["y"], name="token_dense"),
    ]
    inputs, outputs = _io(["N", T, C], ["N", C, W])
    if permuted_is_output:
        outputs.append(helper.make_tensor_value_info("permuted", F, ["N", C, T]))
    return make_model(nodes, inputs, outputs, inits)


def test_a_step_along_the_tokens_folds_into_a_token_mixing_dense():
    """After the permute the tokens are the Dense's features, so ``s`` scales its weight's
    rows."""
    model = _token_scale_model()
    fused, report = fuse_with_report(model)
    assert [f.note for f in report.fusions] == [
        "Mul folded into token_dense through Transpose before it"
    ]
    assert op_types(fused) == ["Transpose", "MatMul"]
    assert_equivalent(model, fused, _feed((2, T, C)), **TOL)
    check(fused)


def test_a_channel_step_before_token_mixing_stays_with_the_reason():
    """A per-channel scale (or a LayerNorm's gamma) before the permute to the tokens varies
    along the axis the token Dense does not read: it stays, and says so."""
    ln, ln_inits = _tf_layer_norm("x", "normed")
    r = rng(4)
    nodes = [
        helper.make_node("Transpose", ["normed"], ["permuted"], perm=[0, 2, 1], name="permute"),
        helper.make_node("MatMul", ["permuted", "wt"], ["y"], name="token_dense"),
    ]
    inits = [init("wt", r.standard_normal((T, W)).astype(np.float32))]
    model = make_model(ln + nodes, *_io(["N", T, C], ["N", C, W]), ln_inits + inits)
    fused, report = fuse_with_report(model)
    assert not report.fusions
    reasons = [d.reason for d in report.declined if "ln/mul" in d.nodes]
    assert reasons == [
        "the LayerNorm's gamma and beta vary along its last axis, and the features the op "
        "reads lie along axis 1 of rank 3"
    ]
    assert_equivalent(model, fused, _feed((2, T, C)), **TOL)
    check(fused)


def test_a_step_whose_views_are_read_elsewhere_stays():
    """The permuted value is also a graph output: folding the step would change it."""
    model = _token_scale_model(permuted_is_output=True)
    fused, report = fuse_with_report(model)
    assert not report.fusions
    assert op_types(fused) == ["Mul", "Transpose", "MatMul"]
    assert_equivalent(model, fused, _feed((2, T, C)), **TOL)
    check(fused)


def test_a_mean_over_the_features_is_not_seen_through():
    """A mean over the channels mixes them: a per-channel step before it does not fold."""
    r = rng(8)
    inits = [
        init("s", r.uniform(0.5, 1.5, C).astype(np.float32)),
        init("w", r.standard_normal((T, W)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["scaled"], name="scale"),
        helper.make_node("ReduceMean", ["scaled"], ["m"], axes=[2], keepdims=0, name="mean"),
        helper.make_node("MatMul", ["m", "w"], ["y"], name="fc"),
    ]
    model = make_model(nodes, *_io([2, T, C], [2, W]), inits)
    fused, report = fuse_with_report(model)
    assert not report.fusions
    assert op_types(fused) == ["Mul", "ReduceMean", "MatMul"]
    check(fused)


def test_a_scalar_step_folds_through_a_flatten():
    """A scalar scale and shift fold through any regrouping (here ``Flatten`` into a Gemm)."""
    r = rng(9)
    inits = [
        init("s", np.array(1.7, np.float32)),
        init("t", np.array(-0.4, np.float32)),
        init("w", r.standard_normal((W, T * C)).astype(np.float32)),
        init("b", r.standard_normal(W).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["scaled"], name="scale"),
        helper.make_node("Sub", ["scaled", "t"], ["shifted"], name="shift"),
        helper.make_node("Flatten", ["shifted"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w", "b"], ["y"], transB=1, name="fc"),
    ]
    model = make_model(nodes, *_io([3, T, C], [3, W]), inits)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 2
    assert op_types(fused) == ["Flatten", "Gemm"]
    assert_equivalent(model, fused, _feed((3, T, C)), **TOL)
    check(fused)


def test_two_tf_dense_blocks_fuse_to_a_fixpoint():
    """LayerNorm -> Dense -> LayerNorm-free scale -> Dense: fusing the fused model again finds
    nothing, and the result equals the original."""
    ln, ln_inits = _tf_layer_norm("x", "normed")
    first, first_inits = _tensordot("normed", C, "h", prefix="d1")
    scale = helper.make_node("Mul", ["h", "s2"], ["h2"], name="scale2")
    second, second_inits = _tensordot("h2", W, "y", prefix="d2")
    inits = [init("s2", rng(11).uniform(0.5, 1.5, C).astype(np.float32))]
    nodes = ln + first + [helper.make_node("Relu", ["h"], ["h_act"], name="act")]
    scale.input[0] = "h_act"
    model = make_model(
        [*nodes, scale, *second],
        *_io(["N", T, C], ["N", T, W]),
        ln_inits + first_inits + inits + second_inits,
    )
    fused, _report = fuse_with_report(model)
    again, report_again = fuse_with_report(fused)
    assert not report_again.fusions
    counts = _counts(fused)
    assert counts["Mul"] == _counts(model)["Mul"] - 2  # the gamma and the scale before d2
    assert_equivalent(model, fused, _feed((2, T, C)), **TOL)
    check(fused)
    check(again)


def test_a_shape_of_a_chain_step_with_a_symbolic_batch_reads_the_chain_input():
    """``Gemm(x * s + t)`` with a ``Shape`` of the steps' output (a symbolic batch): the steps
    keep ``x``'s shape, so the Shape reads ``x`` and the chain merges into one Gemm."""
    r = rng(12)
    inits = [
        init("s", r.uniform(0.5, 1.5, C).astype(np.float32)),
        init("t", r.standard_normal(C).astype(np.float32)),
        init("w", r.standard_normal((W, C)).astype(np.float32)),
        init("b", r.standard_normal(W).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["scaled"], name="scale"),
        helper.make_node("Add", ["scaled", "t"], ["shifted"], name="shift"),
        helper.make_node("Shape", ["shifted"], ["shape"], name="shape"),
        helper.make_node("Gemm", ["shifted", "w", "b"], ["y"], transB=1, name="fc"),
    ]
    inputs, outputs = _io(["N", C], ["N", W])
    outputs.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [2]))
    model = make_model(nodes, inputs, outputs, inits)
    fused, report = fuse_with_report(model)
    assert [f.nodes for f in report.fusions] == [["scale", "shift", "fc"]]
    assert [(n.op_type, list(n.input)[:1]) for n in fused.graph.node] == [
        ("Shape", ["x"]),
        ("Gemm", ["x"]),
    ]
    for batch in (1, 5):
        assert_equivalent(model, fused, _feed((batch, C), batch), **TOL)
    check(fused)


def test_a_shape_after_a_matrix_op_still_splits_the_chain():
    """``Gemm2(Gemm1(x) * s)`` with a ``Shape`` of the scaled value: its shape is no kept
    value's (``Gemm1``'s output goes with the merge), so the link is refused, with the reason."""
    r = rng(13)
    inits = [
        init("w1", r.standard_normal((C, C)).astype(np.float32)),
        init("s", r.uniform(0.5, 1.5, C).astype(np.float32)),
        init("w2", r.standard_normal((W, C)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Mul", ["h", "s"], ["scaled"], name="scale"),
        helper.make_node("Shape", ["scaled"], ["shape"], name="shape"),
        helper.make_node("Gemm", ["scaled", "w2"], ["y"], transB=1, name="fc2"),
    ]
    inputs, outputs = _io(["N", C], ["N", W])
    outputs.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [2]))
    model = make_model(nodes, inputs, outputs, inits)
    fused, report = fuse_with_report(model)
    assert [f.nodes for f in report.fusions] == [["fc1", "scale"]]
    assert any(d.reason == "fan-out: intermediate 'scaled' feeds 2 nodes" for d in report.declined)
    assert_equivalent(model, fused, _feed((3, C)), **TOL)
    check(fused)
