"""A 1x1 Conv moved past a channels-last Transpose into the linear op after it (conv_linear).

``Conv1x1(x) -> Transpose(perm, perm[-1] == 1) -> L`` becomes ``Transpose(x, perm) -> MatMul
[-> Add]`` with ``W = Wc2d.T @ W_L``, ``b = bc @ W_L + b_L``. Each merge test checks the number
of fusions, the op types left, onnxruntime equivalence (explicit tolerances) and the full
checker; each refusal asserts its reason and that the model is left as it was.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import (
    assert_equivalent,
    assert_same_graph,
    check,
    feeds,
    fuse_with_report,
    init,
    make_model,
    op_types,
)
from onnx import TensorProto, helper

RTOL, ATOL = 1e-4, 1e-5
FLOAT = TensorProto.FLOAT
MERGED_NOTE = "1x1 Conv 'conv' moved past the Transpose (perm {}) into the channels-last linear op"


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _conv(r, c_in, c_out, *, kernel=(1, 1), bias=True, x="x", y="h", name="conv", **attrs):
    """A Conv node and its initializers (weight ``(c_out, c_in / group, *kernel)``)."""
    group = attrs.get("group", 1)
    w = r.normal(size=(c_out, c_in // group, *kernel)) / np.sqrt(c_in)
    inits = [init(f"{name}.w", w.astype(np.float32))]
    inputs = [x, f"{name}.w"]
    if bias:
        inits.append(init(f"{name}.b", r.normal(size=c_out).astype(np.float32)))
        inputs.append(f"{name}.b")
    return [helper.make_node("Conv", inputs, [y], name=name, **attrs)], inits


def _transpose(perm, x="h", y="t", name="permute"):
    return [helper.make_node("Transpose", [x], [y], name=name, perm=list(perm))], []


def _linear(r, c_in, c_out, *, bias=True, x="t", y="y", name="fc"):
    """``MatMul(x, W)`` (+ ``Add(., b)``), as torch exports an N-D ``nn.Linear``."""
    inits = [init(f"{name}.w", (r.normal(size=(c_in, c_out)) / np.sqrt(c_in)).astype(np.float32))]
    out = f"{name}.mm" if bias else y
    nodes = [helper.make_node("MatMul", [x, f"{name}.w"], [out], name=f"{name}.matmul")]
    if bias:
        inits.append(init(f"{name}.b", r.normal(size=c_out).astype(np.float32)))
        nodes.append(helper.make_node("Add", [out, f"{name}.b"], [y], name=f"{name}.add"))
    return nodes, inits


def _model(parts, x_shape, y_shape, extra_outputs=()) -> onnx.ModelProto:
    nodes = [n for p in parts for n in p[0]]
    inits = [t for p in parts for t in p[1]]
    inputs = [helper.make_tensor_value_info("x", FLOAT, x_shape)]
    outputs = [helper.make_tensor_value_info("y", FLOAT, y_shape)]
    outputs += [helper.make_tensor_value_info(n, FLOAT, shape) for n, shape in extra_outputs]
    return make_model(nodes, inputs, outputs, inits)


def _fused(model, fusions: int, ops: list[str], policy="cost", x_shape=None):
    fused, report = fuse_with_report(model, policy)
    assert len(report.fusions) == fusions, report
    assert op_types(fused) == ops, report
    check(fused)
    assert_equivalent(model, fused, feeds(x_shape), atol=ATOL, rtol=RTOL)
    return fused, report


def _unchanged(model):
    fused, report = fuse_with_report(model)
    assert not report.fusions, report
    assert_same_graph(model, fused)
    return report


# --- Merges -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conv_bias", "fc_bias", "ops"),
    [
        (True, True, ["Transpose", "MatMul", "Add"]),
        (True, False, ["Transpose", "MatMul", "Add"]),  # the conv's bias goes through W_L
        (False, True, ["Transpose", "MatMul", "Add"]),
        (False, False, ["Transpose", "MatMul"]),
    ],
)
def test_conv1x1_then_channels_last_linear_merges(conv_bias, fc_bias, ops):
    r = _rng(0)
    model = _model(
        [
            _conv(r, 4, 6, bias=conv_bias),
            _transpose((0, 2, 3, 1)),
            _linear(r, 6, 5, bias=fc_bias),
        ],
        ["N", 4, 3, 5],
        ["N", 3, 5, 5],
    )
    fused, report = _fused(model, 1, ops, x_shape=[2, 4, 3, 5])
    (record,) = report.fusions
    fc = ["fc.matmul", "fc.add"] if fc_bias else ["fc.matmul"]
    assert record.nodes == ["conv", "permute", *fc]
    assert record.op_types == ["Conv", "Transpose", "MatMul", *(["Add"] if fc_bias else [])]
    assert record.note == MERGED_NOTE.format([0, 2, 3, 1])
    assert record.widths == [4, 6, 5]
    assert (record.macs_before, record.macs_after) == (4 * 6 + 6 * 5, 4 * 5)
    assert record.output == "y" and fused.graph.node[-1].output == ["y"]
    # The new Transpose reads x and its output is typed and shaped as x permuted.
    transpose = fused.graph.node[0]
    assert list(transpose.input) == ["x"]
    assert [a.ints for a in transpose.attribute] == [[0, 2, 3, 1]]
    (info,) = [v for v in fused.graph.value_info if v.name == transpose.output[0]]
    dims = [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]
    assert info.type.tensor_type.elem_type == FLOAT and dims == ["N", 3, 5, 4]
    # The replaced constants are gone; only the merged weight (and bias) remain.
    assert len(fused.graph.initializer) == len(ops) - 1


def test_conv1d_then_linear_merges():
    """Rank 3 (a Conformer-style pointwise Conv1d, then ``transpose(1, 2)`` and a Linear)."""
    r = _rng(1)
    model = _model(
        [_conv(r, 6, 8, kernel=(1,)), _transpose((0, 2, 1)), _linear(r, 8, 3)],
        [2, 6, 7],
        [2, 7, 3],
    )
    _, report = _fused(model, 1, ["Transpose", "MatMul", "Add"], x_shape=[2, 6, 7])
    assert report.fusions[0].note == MERGED_NOTE.format([0, 2, 1])


def test_other_axes_in_any_order_merge():
    """``perm (0, 3, 2, 1)``: the channels last, height and width swapped."""
    r = _rng(2)
    model = _model(
        [_conv(r, 4, 4), _transpose((0, 3, 2, 1)), _linear(r, 4, 6)], [2, 4, 3, 5], [2, 5, 3, 6]
    )
    fused, _ = _fused(model, 1, ["Transpose", "MatMul", "Add"], x_shape=[2, 4, 3, 5])
    assert [a.ints for a in fused.graph.node[0].attribute] == [[0, 3, 2, 1]]


@pytest.mark.parametrize(
    "attrs",
    [
        {"auto_pad": "VALID"},
        {"auto_pad": "SAME_UPPER"},  # a 1-wide kernel at stride 1 pads nothing
        {"dilations": [2, 3], "pads": [0, 0, 0, 0], "strides": [1, 1]},
    ],
)
def test_pointwise_conv_in_other_spellings_merges(attrs):
    r = _rng(3)
    model = _model(
        [_conv(r, 4, 4, **attrs), _transpose((0, 2, 3, 1)), _linear(r, 4, 4)],
        [1, 4, 3, 3],
        [1, 3, 3, 4],
    )
    _fused(model, 1, ["Transpose", "MatMul", "Add"], x_shape=[1, 4, 3, 3])


def test_conv_bn_then_linear_becomes_one_op():
    """Conv+BatchNorm folds first (a conv merge), then the folded 1x1 Conv goes into the Linear."""
    r = _rng(4)
    c = 6
    stats = [r.uniform(0.5, 1.5, c), r.normal(size=c), r.normal(size=c), r.uniform(0.5, 1.5, c)]
    names = ["bn.g", "bn.b", "bn.m", "bn.v"]
    bn = (
        [helper.make_node("BatchNormalization", ["h0", *names], ["h"], name="bn", epsilon=1e-3)],
        [init(n, a.astype(np.float32)) for n, a in zip(names, stats, strict=True)],
    )
    model = _model(
        [_conv(r, 4, c, y="h0"), bn, _transpose((0, 2, 3, 1)), _linear(r, c, 4)],
        [2, 4, 3, 3],
        [2, 3, 3, 4],
    )
    _, report = _fused(model, 2, ["Transpose", "MatMul", "Add"], x_shape=[2, 4, 3, 3])
    fold, merge = report.fusions
    assert fold.note == "BatchNormalization folded into the Conv before it"
    assert fold.merged_into == merge.new_nodes[0] and fold.output is None
    assert merge.op_types == ["Conv", "Transpose", "MatMul", "Add"]
    assert merge.note is not None and "moved past the Transpose" in merge.note


def test_chain_after_the_linear_joins_the_same_merge():
    """``Conv1x1 -> T -> L1 -> L2``: one chain led by the Conv, merged as one op."""
    r = _rng(5)
    model = _model(
        [
            _conv(r, 4, 6),
            _transpose((0, 2, 3, 1)),
            _linear(r, 6, 6, y="z", name="fc1"),
            _linear(r, 6, 3, x="z", name="fc2"),
        ],
        [2, 4, 3, 3],
        [2, 3, 3, 3],
    )
    _, report = _fused(model, 1, ["Transpose", "MatMul", "Add"], x_shape=[2, 4, 3, 3])
    assert report.fusions[0].widths == [4, 6, 6, 3]
    assert report.fusions[0].op_types == ["Conv", "Transpose", *["MatMul", "Add"] * 2]


def test_step_then_linear_after_the_transpose_joins():
    """``Conv1x1 -> T -> Mul(per channel) -> L``: the step folds into the conv across the
    Transpose, then the conv moves into the linear op."""
    r = _rng(6)
    scale = ([], [init("s", r.uniform(0.5, 2, 4).astype(np.float32))])
    mul = ([helper.make_node("Mul", ["t", "s"], ["ts"], name="scale")], [])
    model = _model(
        [_conv(r, 4, 4), _transpose((0, 2, 3, 1)), scale, mul, _linear(r, 4, 4, x="ts")],
        [2, 4, 3, 3],
        [2, 3, 3, 4],
    )
    _, report = _fused(model, 2, ["Transpose", "MatMul", "Add"], x_shape=[2, 4, 3, 3])
    assert report.fusions[0].note == "Mul folded into the Conv before it through Transpose"
    assert report.fusions[1].op_types == ["Conv", "Transpose", "MatMul", "Add"]


def test_channels_last_mlp_with_layer_scale_and_residual():
    """The arch block by hand: ``x + T(L(T(conv1x1(relu(x))))) * gamma`` -> one linear op."""
    r = _rng(7)
    c = 4
    gamma = ([], [init("gamma", r.uniform(0.5, 2, (1, c, 1, 1)).astype(np.float32))])
    tail = [
        helper.make_node("Transpose", ["y0"], ["back"], name="unpermute", perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["back", "gamma"], ["scaled"], name="layer_scale"),
        helper.make_node("Add", ["x", "scaled"], ["y"], name="residual"),
    ]
    model = _model(
        [
            ([helper.make_node("Relu", ["x"], ["rx"], name="relu")], []),
            _conv(r, c, c, x="rx"),
            _transpose((0, 2, 3, 1)),
            _linear(r, c, c, y="y0"),
            gamma,
            (tail, []),
        ],
        [2, c, 3, 5],
        [2, c, 3, 5],
    )
    ops = ["Relu", "Transpose", "MatMul", "Add", "Transpose", "Add"]
    _, report = _fused(model, 2, ops, x_shape=[2, c, 3, 5])
    assert [f.note.split(" ")[0] for f in report.fusions] == ["Mul", "1x1"]


def test_cost_model_refuses_a_wide_merge_that_always_makes():
    """Widths 64 -> 8 -> 64: merged would take 4096 multiply-adds per position instead of 1024."""
    r = _rng(8)
    model = _model(
        [_conv(r, 64, 8), _transpose((0, 2, 3, 1)), _linear(r, 8, 64)], [1, 64, 2, 2], [1, 2, 2, 64]
    )
    report = _unchanged(model)
    (declined,) = report.declined
    assert declined.nodes == ["conv", "permute", "fc.matmul", "fc.add"]
    assert declined.reason == (
        "cost model: merging widths 64->8->64 would take multiply-adds per row from 1024 to 4096 "
        "(--policy always merges anyway)"
    )
    _, report = _fused(model, 1, ["Transpose", "MatMul", "Add"], "always", x_shape=[1, 64, 2, 2])
    assert report.fusions[0].params_after == 64 * 64 + 64


# --- Refusals, with their reasons -----------------------------------------------------------------

NOT_POINTWISE = "the Conv before the channels-last linear op is not pointwise ({}): only a 1x1 "
NOT_POINTWISE += "Conv at stride 1, without pads, in one group moves past the Transpose"


@pytest.mark.parametrize(
    ("conv_attrs", "kernel", "x_hw", "t_hw", "problem"),
    [
        ({"strides": [2, 2]}, (1, 1), 4, 2, "strides [2, 2]"),
        ({"group": 2}, (1, 1), 3, 3, "group 2"),
        ({"pads": [1, 1, 1, 1]}, (3, 3), 3, 3, "kernel 3x3, pads [1, 1, 1, 1]"),
        ({}, (3, 3), 5, 3, "kernel 3x3"),
        ({"pads": [1, 1, 1, 1]}, (1, 1), 3, 5, "pads [1, 1, 1, 1]"),
        ({"strides": [2, 2], "group": 2}, (1, 1), 4, 2, "strides [2, 2], group 2"),
    ],
)
def test_conv_that_is_not_pointwise_is_refused(conv_attrs, kernel, x_hw, t_hw, problem):
    r = _rng(9)
    model = _model(
        [_conv(r, 4, 4, kernel=kernel, **conv_attrs), _transpose((0, 2, 3, 1)), _linear(r, 4, 4)],
        [1, 4, x_hw, x_hw],
        [1, t_hw, t_hw, 4],
    )
    report = _unchanged(model)
    (declined,) = report.declined
    assert declined.nodes == ["conv", "permute", "fc.matmul", "fc.add"]
    assert declined.reason == NOT_POINTWISE.format(problem)


def test_conv_output_read_twice_is_refused():
    r = _rng(10)
    other = ([helper.make_node("Relu", ["h"], ["other"], name="other")], [])
    model = _model(
        [_conv(r, 4, 4), _transpose((0, 2, 3, 1)), _linear(r, 4, 4), other],
        [1, 4, 3, 3],
        [1, 3, 3, 4],
        extra_outputs=[("other", [1, 4, 3, 3])],
    )
    (declined,) = _unchanged(model).declined
    assert declined.nodes == ["conv", "permute", "fc.matmul", "fc.add"]
    assert declined.reason == "fan-out: intermediate 'h' feeds 2 nodes"


def test_transpose_output_that_is_a_graph_output_is_refused():
    r = _rng(11)
    model = _model(
        [_conv(r, 4, 4), _transpose((0, 2, 3, 1)), _linear(r, 4, 4)],
        [1, 4, 3, 3],
        [1, 3, 3, 4],
        extra_outputs=[("t", [1, 3, 3, 4])],
    )
    (declined,) = _unchanged(model).declined
    assert declined.reason == "intermediate 't' is a graph output"


def test_conv_output_that_is_a_graph_output_is_refused():
    r = _rng(12)
    model = _model(
        [_conv(r, 4, 4), _transpose((0, 2, 3, 1)), _linear(r, 4, 4)],
        [1, 4, 3, 3],
        [1, 3, 3, 4],
        extra_outputs=[("h", [1, 4, 3, 3])],
    )
    (declined,) = _unchanged(model).declined
    assert declined.reason == "intermediate 'h' is a graph output"


def test_perm_that_keeps_channels_in_place_is_refused():
    """``perm (0, 1, 3, 2)`` puts the width last: the Linear maps the width, not the channels."""
    r = _rng(13)
    model = _model(
        [_conv(r, 4, 4), _transpose((0, 1, 3, 2)), _linear(r, 3, 3)], [1, 4, 3, 3], [1, 4, 3, 3]
    )
    (declined,) = _unchanged(model).declined
    assert (
        declined.reason
        == "Transpose perm [0, 1, 3, 2] does not put the Conv's channels (axis 1) last"
    )


def test_shared_conv_weight_is_refused():
    """The conv weight is also read by another Conv: merging would keep both copies."""
    r = _rng(14)
    other = ([helper.make_node("Conv", ["x", "conv.w"], ["other"], name="other")], [])
    model = _model(
        [_conv(r, 4, 4), _transpose((0, 2, 3, 1)), _linear(r, 4, 4), other],
        [1, 4, 3, 3],
        [1, 3, 3, 4],
        extra_outputs=[("other", [1, 4, 3, 3])],
    )
    (declined,) = _unchanged(model).declined
    assert declined.nodes == ["conv", "permute", "fc.matmul", "fc.add"]
    assert (
        declined.reason
        == "weight 'conv.w' is shared with node 'other' (merging would keep both copies)"
    )


def test_left_matmul_after_the_transpose_is_refused():
    """``W @ T(conv(x))`` maps the second-to-last axis, not the channels."""
    r = _rng(15)
    w = ([], [init("left.w", r.normal(size=(2, 3)).astype(np.float32))])
    left = ([helper.make_node("MatMul", ["left.w", "t"], ["y"], name="left")], [])
    model = _model([_conv(r, 4, 4), _transpose((0, 2, 3, 1)), w, left], [1, 4, 3, 3], [1, 3, 2, 4])
    (declined,) = _unchanged(model).declined
    assert declined.nodes == ["conv", "permute", "left"]
    assert declined.reason == (
        "the ops act on different axes (one is a MatMul with the weight on the left)"
    )


def test_two_pointwise_convs_the_conv_cost_model_kept_apart_both_join():
    """``8 -> 3 -> 6`` convs stay two (composed: 48 multiply-adds, apart: 42); the second joins
    the Linear ``6 -> 2``, then the first joins the merged op (a round after the first merge)."""
    r = _rng(16)
    model = _model(
        [
            _conv(r, 8, 3, y="h0", name="conv0"),
            _conv(r, 3, 6, x="h0"),
            _transpose((0, 2, 3, 1)),
            _linear(r, 6, 2),
        ],
        [2, 8, 3, 3],
        [2, 3, 3, 2],
    )
    _, report = _fused(model, 2, ["Transpose", "MatMul", "Add"], x_shape=[2, 8, 3, 3])
    first, second = report.fusions
    assert first.widths == [3, 6, 2] and first.note == MERGED_NOTE.format([0, 2, 3, 1])
    assert second.widths == [8, 3, 2] and second.nodes[0] == "conv0"
    assert first.merged_into == second.new_nodes[0]
