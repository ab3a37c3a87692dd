"""Tests of the rewrites that see past shape ops and beyond the last axis, on hand-built graphs.

Steps folded across views of a linear op's output (:mod:`converter.fusion.linear.absorb`), a Reshape
sandwich around a branch (:mod:`converter.fusion.linear.branches`), left MatMuls, stacked sums, the
no-op steps, and shape inference for models without ``value_info``. Each test checks the number
of fusions, the structure, onnxruntime equivalence at explicit tolerances and the full checker;
refusals assert their reason.
"""

from __future__ import annotations

import numpy as np
import onnx
from builders import assert_equivalent, check, fuse_with_report, init, make_model, op_types, rng
from onnx import TensorProto, helper

import converter

F = TensorProto.FLOAT
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _io(x_shape, y_shape, names=("x", "y")):
    return (
        [helper.make_tensor_value_info(names[0], F, x_shape)],
        [helper.make_tensor_value_info(names[1], F, y_shape)],
    )


def _feed(shape, seed=0):
    return {"x": rng(seed).uniform(-1, 1, shape).astype(np.float32)}


def _shape(name: str, dims) -> onnx.TensorProto:
    return init(name, np.array(dims, np.int64))


def test_batchnorm_over_tokens_folds_into_the_linear_layer():
    """``bn(linear(x).flatten(0, 1)).reshape(B, T, C)``: LeViT's Linear + BatchNorm1d."""
    r = rng(1)
    c = 6
    bn = [r.uniform(0.5, 2, c), r.standard_normal(c), r.standard_normal(c), r.uniform(0.5, 2, c)]
    inits = [
        init("W", r.standard_normal((4, c)).astype(np.float32)),
        _shape("flat", [-1, c]),
        _shape("back", [2, 3, c]),
        *(init(n, a.astype(np.float32)) for n, a in zip(("g", "b", "m", "v"), bn, strict=True)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
        helper.make_node("Reshape", ["h", "flat"], ["f"], name="flatten"),
        helper.make_node("BatchNormalization", ["f", "g", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Reshape", ["n", "back"], ["y"], name="unflatten"),
    ]
    model = make_model(nodes, *_io([2, 3, 4], [2, 3, c]), inits)
    fused, report = fuse_with_report(model)
    (record,) = report.fusions
    assert record.note == "BatchNormalization folded into fc through Reshape"
    assert op_types(fused) == ["MatMul", "Add", "Reshape", "Reshape"]
    assert_equivalent(model, fused, _feed((2, 3, 4)), **TOL)
    check(fused)


def _qkv_model(scale_value: float = 0.25) -> onnx.ModelProto:
    """A fused qkv projection, split in three; q and k scaled after Reshape -> Transpose."""
    r = rng(2)
    d, h = 8, 2
    inits = [
        init("W", r.standard_normal((d, 3 * d)).astype(np.float32)),
        init("b", r.standard_normal(3 * d).astype(np.float32)),
        init("s", np.array(scale_value, np.float32)),
        _shape("heads", [2, 3, h, d // h]),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="c_attn"),
        helper.make_node("Add", ["m", "b"], ["qkv"], name="c_attn_bias"),
        helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=2, num_outputs=3, name="split"),
    ]
    outs = []
    for name in ("q", "k", "v"):
        nodes.append(helper.make_node("Reshape", [name, "heads"], [f"{name}r"], name=f"{name}_r"))
        nodes.append(helper.make_node("Transpose", [f"{name}r"], [f"{name}t"], perm=[0, 2, 1, 3]))
        last = f"{name}t"
        if name != "v":
            nodes.append(helper.make_node("Mul", [last, "s"], [f"{name}s"], name=f"{name}_scale"))
            last = f"{name}s"
        outs.append(last)
    nodes.append(helper.make_node("Concat", outs, ["y"], axis=1, name="cat"))
    return make_model(nodes, *_io([2, 3, d], [2, 3 * h, 3, d // h]), inits, opset=18)


def test_attention_scales_fold_into_only_their_columns_of_a_fused_qkv():
    model = _qkv_model()
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 2  # q's scale, then k's, each into its slice of columns
    assert all("through Split, Reshape, Transpose" in r.note for r in report.fusions)
    assert "Mul" not in op_types(fused)
    assert_equivalent(model, fused, _feed((2, 3, 8)), **TOL)
    check(fused)


def test_channel_layer_scale_after_a_permute_back():
    """``fc(x.permute(0,2,3,1)).permute(0,3,1,2) * gamma.reshape(1,-1,1,1)`` (ConvNeXt)."""
    r = rng(3)
    c = 5
    inits = [
        init("W", r.standard_normal((c, c)).astype(np.float32)),
        init("b", r.standard_normal(c).astype(np.float32)),
        init("gamma", r.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1], name="to_last"),
        helper.make_node("MatMul", ["xt", "W"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "b"], ["h"], name="fc_bias"),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 3, 1, 2], name="to_first"),
        helper.make_node("Mul", ["ht", "gamma"], ["y"], name="layer_scale"),
    ]
    model = make_model(nodes, *_io([2, c, 3, 4], [2, c, 3, 4]), inits)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) == ["Transpose", "MatMul", "Add", "Transpose"]
    assert fused.graph.node[-1].output == ["y"]  # the graph output keeps its name
    assert_equivalent(model, fused, _feed((2, c, 3, 4)), **TOL)
    check(fused)


def test_a_per_feature_scale_after_the_features_were_split_is_refused_with_the_reason():
    r = rng(4)
    inits = [
        init("W", r.standard_normal((4, 8)).astype(np.float32)),
        _shape("heads", [2, 3, 2, 4]),
        init("s", r.uniform(0.5, 2, (1, 1, 2, 4)).astype(np.float32)),  # varies on two axes
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="fc"),
        helper.make_node("Reshape", ["m", "heads"], ["r"], name="split_heads"),
        helper.make_node("Mul", ["r", "s"], ["y"], name="scale"),
    ]
    model = make_model(nodes, *_io([2, 3, 4], [2, 3, 2, 4]), inits)
    fused, report = fuse_with_report(model)
    assert report.fusions == []
    (declined,) = [d for d in report.declined if "scale" in d.nodes]
    assert declined.reason.startswith("Mul by a constant of shape [1, 1, 2, 4] varies along")
    assert "axis" in declined.reason
    assert fused.graph.node == model.graph.node


def test_conv1d_style_base_in_a_reshape_sandwich_merges_with_its_adapter():
    """GPT-2's Conv1D as exporters write it: Reshape(x, [-1, C]) -> Gemm -> Reshape(B, T, D),
    beside a LoRA adapter on the 3-D ``x``."""
    r = rng(5)
    c, d = 6, 9
    inits = [
        init("W", r.standard_normal((c, d)).astype(np.float32)),
        init("b", r.standard_normal(d).astype(np.float32)),
        init("A", r.standard_normal((c, 2)).astype(np.float32)),
        init("B", r.standard_normal((2, d)).astype(np.float32)),
        init("s", np.array(2.0, np.float32)),
        _shape("flat", [-1, c]),
        _shape("back", [2, 3, d]),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["xf"], name="flatten"),
        helper.make_node("Gemm", ["xf", "W", "b"], ["g"], name="c_attn"),
        helper.make_node("Reshape", ["g", "back"], ["base"], name="unflatten"),
        helper.make_node("MatMul", ["x", "A"], ["a"], name="lora_A"),
        helper.make_node("MatMul", ["a", "B"], ["ab"], name="lora_B"),
        helper.make_node("Mul", ["ab", "s"], ["lora"], name="scaling"),
        helper.make_node("Add", ["base", "lora"], ["y"], name="sum"),
    ]
    model = make_model(nodes, *_io([2, 3, c], [2, 3, d]), inits)
    fused, report = fuse_with_report(model)
    (record,) = report.fusions
    assert record.note == "LoRA lora_A/scaling merged into c_attn"
    assert op_types(fused) == ["MatMul", "Add"]  # on the 3-D input: no Reshape left
    assert len(fused.graph.initializer) == 2  # the Reshapes' shapes went with them
    assert_equivalent(model, fused, _feed((2, 3, c)), **TOL)
    check(fused)


def test_left_matmuls_merge_on_the_token_axis():
    """``W2 @ (W1 @ x + b1) + b2`` with ``x`` of ``(B, N, C)``: token mixing, weights on the left."""
    r = rng(6)
    n = 5
    inits = [
        init("W1", r.standard_normal((n, n)).astype(np.float32)),
        init("b1", r.standard_normal((n, 1)).astype(np.float32)),
        init("W2", r.standard_normal((4, n)).astype(np.float32)),
        init("b2", r.standard_normal((4, 1)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["W1", "x"], ["m1"], name="mix1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="bias1"),
        helper.make_node("MatMul", ["W2", "h"], ["m2"], name="mix2"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="bias2"),
    ]
    model = make_model(nodes, *_io([2, n, 3], [2, 4, 3]), inits)
    fused, report = fuse_with_report(model)
    assert [r.widths for r in report.fusions] == [[n, n, 4]]
    assert op_types(fused) == ["MatMul", "Add"]
    assert fused.graph.node[0].input[1] == "x"  # the weight stays on the left
    assert_equivalent(model, fused, _feed((2, n, 3)), **TOL)
    check(fused)


def test_a_stacked_sum_of_branches_merges():
    """``torch.stack([a(x), b(x), x]).sum(0)`` as exporters write it."""
    r = rng(7)
    d = 4
    inits = [
        init("Wa", r.standard_normal((d, d)).astype(np.float32)),
        init("Wb", r.standard_normal((d, d)).astype(np.float32)),
        _shape("zero", [0]),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "Wa"], ["a"], name="a"),
        helper.make_node("MatMul", ["x", "Wb"], ["b"], name="b"),
        *(
            helper.make_node("Unsqueeze", [v, "zero"], [f"{v}u"], name=f"u{v}")
            for v in ("a", "b", "x")
        ),
        helper.make_node("Concat", ["au", "bu", "xu"], ["stack"], axis=0, name="stack"),
        helper.make_node("ReduceSum", ["stack", "zero"], ["y"], keepdims=0, name="sum"),
    ]
    model = make_model(nodes, *_io([3, d], [3, d]), inits)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) == ["Gemm"]
    assert [t.name for t in fused.graph.initializer] == [f"{report.fusions[0].new_nodes[0]}.weight"]
    assert_equivalent(model, fused, _feed((3, d)), **TOL)
    check(fused)


def test_neg_identity_dropout_and_sum_join_what_they_sit_in():
    r = rng(8)
    d = 4
    inits = [init(n, r.standard_normal((d, d)).astype(np.float32)) for n in ("W1", "W2", "W3")]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Neg", ["h"], ["n"], name="neg"),
        helper.make_node("Identity", ["n"], ["i"], name="identity"),
        helper.make_node("Dropout", ["i"], ["dr"], name="dropout"),
        helper.make_node("MatMul", ["dr", "W2"], ["a"], name="fc2"),
        helper.make_node("MatMul", ["dr", "W3"], ["b"], name="fc3"),
        helper.make_node("Sum", ["a", "b", "dr"], ["y"], name="sum"),
    ]
    model = make_model(nodes, *_io([3, d], [3, d]), inits)
    fused, report = fuse_with_report(model)
    assert op_types(fused) == ["Gemm"]
    assert len(report.fusions) == 2  # the Sum of three branches, then the chain before it
    assert_equivalent(model, fused, _feed((3, d)), **TOL)
    check(fused)


def test_shapes_inferred_for_decisions_are_not_written():
    """A legacy-style export without value_info: ``Mul(0.5) -> MatMul`` needs the Mul's width,
    which only shape inference knows; the output gains no value_info."""
    r = rng(9)
    inits = [
        init("half", np.array(0.5, np.float32)),
        init("W", r.standard_normal((4, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"], name="act"),
        helper.make_node("Mul", ["t", "half"], ["h"], name="half"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="fc"),
    ]
    model = make_model(nodes, *_io(["n", 4], ["n", 3]), inits)
    assert not model.graph.value_info
    fused, report = fuse_with_report(model)
    assert [r.nodes for r in report.fusions] == [["half", "fc"]]
    initializers = {t.name for t in fused.graph.initializer}
    assert {v.name for v in fused.graph.value_info} <= initializers  # no inferred shape kept
    assert_equivalent(model, fused, _feed((3, 4)), **TOL)
    check(fused)


def test_steps_in_a_subgraph_without_types_take_them_from_the_op_before():
    """Inside an ``If`` branch nothing records types or shapes: ``MatMul -> Identity -> Add`` still
    joins one chain, the Identity and Add taking the MatMul's width and dtype."""
    r = rng(10)
    inits = [
        init("W", r.standard_normal((4, 3)).astype(np.float32)),
        init("V", r.standard_normal((4, 3)).astype(np.float32)),
        init("b", r.standard_normal(3).astype(np.float32)),
    ]
    branch = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"], name="fc"),
            helper.make_node("Identity", ["m"], ["i"], name="identity"),
            helper.make_node("Add", ["b", "i"], ["t"], name="bias"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t", F, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["z"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", F, None)],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "V"], ["z"], name="outer"),
        helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other, name="if"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", F, [2, 4]),
        helper.make_tensor_value_info("c", TensorProto.BOOL, []),
    ]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", F, [2, 3])], inits)
    fused, report = fuse_with_report(model)
    assert {r.graph for r in report.fusions} == {"if.then_branch"}
    assert report.declined == []
    then = next(a.g for a in fused.graph.node[1].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Gemm"]  # MatMul, Identity and Add are one op
    feeds = {**_feed((2, 4)), "c": np.array(True)}
    assert_equivalent(model, fused, feeds, **TOL)
    check(fused)


def test_einsum_products_with_a_constant_matrix_chain_like_matmuls():
    """``torch.einsum("bsi,oi->bso", x, W)`` (torch's layout), a bias, ``"bsi,ij->bsj"`` and
    ``"ij,bsj->bsi"`` (the weight first): one map; an Einsum that moves an axis says why."""
    r = rng(11)
    inits = [
        init("W1", r.standard_normal((5, 4)).astype(np.float32)),  # (out, in)
        init("b1", r.standard_normal(5).astype(np.float32)),
        init("W2", r.standard_normal((5, 3)).astype(np.float32)),  # (in, out)
        init("W3", r.standard_normal((3, 3)).astype(np.float32)),
        init("W4", r.standard_normal((3, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Einsum", ["x", "W1"], ["e1"], equation="bsi,oi->bso", name="e1"),
        helper.make_node("Add", ["e1", "b1"], ["h"], name="bias"),
        helper.make_node("Einsum", ["h", "W2"], ["e2"], equation="bsi,ij->bsj", name="e2"),
        helper.make_node("Einsum", ["W3", "e2"], ["e3"], equation="ij,bsj->bsi", name="e3"),
        helper.make_node("Einsum", ["e3", "W4"], ["y"], equation="bsi,ij->bjs", name="e4"),
    ]
    model = make_model(nodes, *_io([2, 3, 4], [2, 3, 3]), inits, opset=17)
    fused, report = fuse_with_report(model)
    (record,) = report.fusions
    assert record.nodes == ["e1", "bias", "e2", "e3"] and record.widths == [4, 5, 3, 3]
    assert op_types(fused) == ["MatMul", "Add", "Einsum"]
    (declined,) = [d for d in report.declined if "e4" in d.nodes]
    assert declined.reason == "Einsum 'bsi,ij->bjs' is not a product x @ W on the last axis"
    assert_equivalent(model, fused, _feed((2, 3, 4)), **TOL)
    check(fused)


def test_a_merge_over_a_folded_step_is_not_measured_at_its_output(tmp_path):
    """``L2(L1(t)) -> Transpose -> Mul(gamma)``: gamma folds into L2 first, then L1 + L2 merge
    and take over L2's output name, which holds ``gamma * L2`` now: comparing it with the
    original's ``L2`` there would report a large error that is no error (both records say so)."""
    r = rng(3)
    inits = [
        init("W1", r.standard_normal((4, 4)).astype(np.float32)),
        init("W2", r.standard_normal((4, 4)).astype(np.float32)),
        init("b2", r.standard_normal(4).astype(np.float32)),
        init("gamma", np.full((1, 4, 1, 1), 1e-3, np.float32)),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="permute", perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t", "W1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "W2"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "b2"], ["lin"], name="fc2.add"),
        helper.make_node("Transpose", ["lin"], ["back"], name="unpermute", perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["back", "gamma"], ["y"], name="layer_scale"),
    ]
    model = make_model(nodes, *_io([1, 4, 3, 3], [1, 4, 3, 3]), inits)
    onnx.save(model, tmp_path / "in.onnx")
    report = converter.fuse_file(tmp_path / "in.onnx", tmp_path / "out.onnx", validate=True)
    fused = onnx.load(tmp_path / "out.onnx")
    assert report.validated and len(report.fusions) == 2
    assert op_types(fused) == ["Transpose", "MatMul", "Add", "Transpose"]
    assert [(f.output, f.merged_into, f.max_error) for f in report.fusions] == [
        (None, None, None)
    ] * 2
    assert {f.error_note for f in report.fusions} == {
        "not measured: a step was folded into the op's values"
    }
    assert_equivalent(model, fused, _feed((1, 4, 3, 3)), **TOL)
    check(fused)
