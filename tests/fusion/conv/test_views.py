"""Channel affines folded into a conv across the views other producers write (issue 22).

tf2onnx writes a Keras ``Conv1D`` as ``Unsqueeze -> Conv -> Squeeze`` and its BatchNorm as
``Mul``/``Add`` by ``(1, C, 1)`` constants after the Squeeze; ``Rescaling``/``Normalization``
before a ``Conv2D`` act on the NHWC input before the ``Transpose`` to NCHW. Each rewrite test
checks the fusions, the structure, onnxruntime equivalence and the checker.
"""

from __future__ import annotations

import numpy as np
import onnx
from builders import assert_equivalent, check, feeds, fuse_with_report, init, op_types, rng
from onnx import TensorProto, helper

FLOAT = TensorProto.FLOAT
TOL = {"atol": 1e-5, "rtol": 1e-4}
C_IN, C_OUT = 3, 4


def _model(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", FLOAT, y_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _conv1d(scale_shape=(1, C_OUT, 1)) -> onnx.ModelProto:
    """``x [N, C, W] -> Unsqueeze(2) -> Conv(1x3) -> Squeeze(2) -> * s + t`` (s, t of shape)."""
    r = rng(1)
    inits = [
        init("axis", np.array([2], np.int64)),
        init("W", r.standard_normal((C_OUT, C_IN, 1, 3)).astype(np.float32)),
        init("s", r.uniform(0.5, 1.5, scale_shape).astype(np.float32)),
        init("t", r.standard_normal((1, C_OUT, 1)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axis"], ["x4"], name="unsqueeze"),
        helper.make_node("Conv", ["x4", "W"], ["c"], kernel_shape=[1, 3], name="conv"),
        helper.make_node("Squeeze", ["c", "axis"], ["c3"], name="squeeze"),
        helper.make_node("Mul", ["c3", "s"], ["m"], name="bn_mul"),
        helper.make_node("Add", ["m", "t"], ["y"], name="bn_add"),
    ]
    return _model(nodes, inits, [2, C_IN, 9], [2, C_OUT, 7])


def test_a_batchnorm_as_mul_add_after_a_squeeze_folds_into_the_conv():
    model = _conv1d()
    check(model)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 2
    assert report.fusions[0].note == "Mul folded into the Conv before it through Squeeze"
    assert op_types(fused) == ["Unsqueeze", "Conv", "Squeeze"]
    check(fused)
    assert_equivalent(model, fused, feeds((2, C_IN, 9)), **TOL)


def test_a_scale_that_varies_along_the_width_is_not_a_channel_affine():
    model = _conv1d(scale_shape=(1, 1, 7))
    fused, report = fuse_with_report(model)
    assert not any("Mul folded" in (r.note or "") for r in report.fusions)
    reasons = [d.reason for d in report.declined if "bn_mul" in d.nodes]
    assert any("varies along other axes than the channels (axis 1 of 4)" in r for r in reasons)
    assert_equivalent(model, fused, feeds((2, C_IN, 9)), **TOL)


def _nhwc(pads: list[int], per_channel: bool, shift_first: bool = False) -> onnx.ModelProto:
    """``x [N, H, W, C] * s + t -> Transpose to NCHW -> Conv 3x3`` (Keras Rescaling), or with
    ``shift_first`` ``(x + t) * s`` (Keras Normalization's ``(x - mean) / std``)."""
    r = rng(2)
    shape = (1, 1, 1, C_IN) if per_channel else ()
    inits = [
        init("s", np.asarray(r.uniform(0.5, 1.5, shape), np.float32)),
        init("t", np.asarray(r.standard_normal(shape), np.float32)),
        init("W", r.standard_normal((C_OUT, C_IN, 3, 3)).astype(np.float32)),
        init("b", r.standard_normal(C_OUT).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["m"], name="scale"),
        helper.make_node("Add", ["m", "t"], ["a"], name="shift"),
    ]
    if shift_first:
        nodes = [
            helper.make_node("Add", ["x", "t"], ["m"], name="shift"),
            helper.make_node("Mul", ["m", "s"], ["a"], name="scale"),
        ]
    nodes += [
        helper.make_node("Transpose", ["a"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node(
            "Conv", ["nchw", "W", "b"], ["y"], kernel_shape=[3, 3], pads=pads, name="conv"
        ),
    ]
    out = 6 if not any(pads) else 8
    return _model(nodes, inits, [2, 8, 8, C_IN], [2, C_OUT, out, out])


def test_a_scale_and_shift_of_the_nhwc_input_fold_into_an_unpadded_conv():
    for per_channel in (False, True):
        model = _nhwc([0, 0, 0, 0], per_channel)
        check(model)
        fused, report = fuse_with_report(model)
        assert len(report.fusions) == 2
        assert all(
            "folded into the Conv after it through Transpose" in r.note for r in report.fusions
        )
        assert op_types(fused) == ["Transpose", "Conv"]
        check(fused)
        assert_equivalent(model, fused, feeds((2, 8, 8, C_IN)), **TOL)


def test_before_a_padded_conv_the_scale_folds_and_the_shift_says_why_not():
    model = _nhwc([1, 1, 1, 1], per_channel=True, shift_first=True)
    fused, report = fuse_with_report(model)
    assert [r.nodes for r in report.fusions] == [["conv", "to_nchw", "scale"]]
    assert op_types(fused) == ["Add", "Transpose", "Conv"]
    reasons = [d.reason for d in report.declined if "shift" in d.nodes]
    assert any("shifts the input of a Conv with pads [1, 1, 1, 1]" in r for r in reasons), reasons
    check(fused)
    assert_equivalent(model, fused, feeds((2, 8, 8, C_IN)), **TOL)


def test_branches_each_transposed_before_their_sum_merge_into_one_conv_then_the_transpose():
    """Flax's RepVGG block: ``T(conv3(x)) + T(conv1(x)) + T(bn(x))`` with one perm: one Conv,
    then one Transpose (the sum of the transposes is the transpose of the sum)."""
    r = rng(3)
    c = 4
    bn = [r.uniform(0.5, 2, c), r.standard_normal(c), r.standard_normal(c), r.uniform(0.5, 2, c)]
    inits = [
        init("W3", (r.standard_normal((c, c, 3, 3)) / 4).astype(np.float32)),
        init("W1", (r.standard_normal((c, c, 1, 1)) / 2).astype(np.float32)),
        *(init(n, a.astype(np.float32)) for n, a in zip(("g", "b", "m", "v"), bn, strict=True)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W3"], ["a"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("Conv", ["x", "W1"], ["b1"], name="conv1"),
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], name="bn"),
        *(
            helper.make_node("Transpose", [v], [f"t_{v}"], perm=[0, 2, 3, 1], name=f"to_nhwc_{v}")
            for v in ("a", "b1", "n")
        ),
        helper.make_node("Add", ["t_a", "t_b1"], ["s"], name="add1"),
        helper.make_node("Add", ["s", "t_n"], ["y"], name="add2"),
    ]
    model = _model(nodes, inits, [2, c, 6, 6], [2, 6, 6, c])
    check(model)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert report.fusions[0].note.endswith("then Transpose [0, 2, 3, 1]")
    assert op_types(fused) == ["Conv", "Transpose"]
    check(fused)
    assert_equivalent(model, fused, feeds((2, c, 6, 6)), **TOL)


def test_an_identity_batchnorm_on_the_nhwc_input_is_the_third_branch():
    """Keras's RepVGG block through tf2onnx: ``conv3(T(x)) + conv1(T(x)) + T(x * s + t)``, the
    identity BatchNorm as Mul + Add on the NHWC input beside the Transpose the convs read."""
    r = rng(4)
    c = 4
    inits = [
        init("W3", (r.standard_normal((c, c, 3, 3)) / 4).astype(np.float32)),
        init("W1", (r.standard_normal((c, c, 1, 1)) / 2).astype(np.float32)),
        init("s", r.uniform(0.5, 1.5, c).astype(np.float32)),
        init("t", r.standard_normal(c).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"], name="bn_mul"),
        helper.make_node("Add", ["xs", "t"], ["xst"], name="bn_add"),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Transpose", ["xst"], ["it"], perm=[0, 3, 1, 2], name="identity_nchw"),
        helper.make_node("Conv", ["xt", "W3"], ["a"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("Conv", ["xt", "W1"], ["b1"], name="conv1"),
        helper.make_node("Add", ["a", "b1"], ["s1"], name="add1"),
        helper.make_node("Add", ["s1", "it"], ["y"], name="add2"),
    ]
    model = _model(nodes, inits, [2, 6, 6, c], [2, c, 6, 6])
    check(model)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) == ["Transpose", "Conv"]
    check(fused)
    assert_equivalent(model, fused, feeds((2, 6, 6, c)), **TOL)
