"""The ONNX-ML linear ops (``ai.onnx.ml`` Scaler, LinearRegressor, LinearClassifier) in chains.

Each rewrite test checks the number of fusions, the resulting structure, onnxruntime equivalence
with explicit tolerances (labels exactly), and ``onnx.checker.check_model(full_check=True)``;
the negative ones assert the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import assert_equivalent, check, fuse_with_report, init, ml_scaler, op_types, rng
from onnx import TensorProto, helper

FLOAT = TensorProto.FLOAT
ML = "ai.onnx.ml"
F = 5  # raw features
K = 3  # PCA components
ATOL, RTOL = 1e-5, 1e-4


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "ml", list(inputs), list(outputs), list(inits))
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ML, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    check(model)
    return model


def _x(width: int = F, elem: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("X", elem, ["N", width])


def _feeds(n: int = 7, width: int = F, dtype=np.float32) -> dict[str, np.ndarray]:
    return {"X": rng(3).uniform(-2, 2, (n, width)).astype(dtype)}


def _scaler(x: str = "X", y: str = "scaled", width: int = F, seed: int = 0) -> onnx.NodeProto:
    return ml_scaler(x, y, width, seed)


def _pca(x: str = "scaled", y: str = "pcs", seed: int = 1):
    """PCA as skl2onnx writes it (whitened): ``Sub(mean) -> MatMul -> Div(Sqrt(var))``."""
    r = rng(seed)
    nodes = [
        helper.make_node("Sqrt", ["var"], ["std"], name="sqrt"),
        helper.make_node("Sub", [x, "mean"], ["centred"], name="sub"),
        helper.make_node("MatMul", ["centred", "components"], ["projected"], name="matmul"),
        helper.make_node("Div", ["projected", "std"], [y], name="div"),
    ]
    inits = [
        init("mean", r.standard_normal(F).astype(np.float32)),
        init("components", r.standard_normal((F, K)).astype(np.float32)),
        init("var", r.uniform(0.5, 3, K).astype(np.float32)),
    ]
    return nodes, inits


def _regressor(x: str, y: str, features: int, targets: int, **attrs) -> onnx.NodeProto:
    r = rng(4)
    return helper.make_node(
        "LinearRegressor",
        [x],
        [y],
        domain=ML,
        name="regressor",
        coefficients=r.standard_normal(targets * features).tolist(),
        intercepts=r.standard_normal(targets).tolist(),
        targets=targets,
        **attrs,
    )


def _classifier(x: str, rows: int, features: int, labels, **attrs) -> onnx.NodeProto:
    r = rng(5)
    key = "classlabels_strings" if isinstance(labels[0], str) else "classlabels_ints"
    return helper.make_node(
        "LinearClassifier",
        [x],
        ["label", "scores"],
        domain=ML,
        name="classifier",
        coefficients=r.standard_normal(rows * features).tolist(),
        intercepts=r.standard_normal(rows).tolist(),
        **{key: list(labels)},
        **attrs,
    )


def _reasons(report) -> list[str]:
    return [d.reason for d in report.declined]


def _ml_node(model: onnx.ModelProto) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.domain == ML]
    return node


def _attr(node: onnx.NodeProto, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_scaler_folds_into_the_matmul_after_it():
    r = rng(2)
    nodes = [
        _scaler(),
        helper.make_node("MatMul", ["scaled", "W"], ["h"], name="matmul"),
        helper.make_node("Add", ["h", "b"], ["Y"], name="add"),
    ]
    inits = [
        init("W", r.standard_normal((F, 4)).astype(np.float32)),
        init("b", r.standard_normal((1, 4)).astype(np.float32)),  # skl2onnx's [1, n] bias
    ]
    model = _model(nodes, [_x()], [helper.make_tensor_value_info("Y", FLOAT, ["N", 4])], inits)

    fused, report = fuse_with_report(model)

    assert [f.nodes for f in report.fusions] == [["scaler", "matmul", "add"]]
    assert op_types(fused) == ["Gemm"]
    assert_equivalent(model, fused, _feeds())
    check(fused)


def test_scaler_then_same_type_cast_still_chains():
    """skl_scaler_mlp: ``Scaler -> Cast(to=float) -> MatMul`` (the Scaler's type is not recorded)."""
    nodes = [
        _scaler(),
        helper.make_node("Cast", ["scaled"], ["cast"], name="cast", to=FLOAT),
        helper.make_node("MatMul", ["cast", "W"], ["Y"], name="matmul"),
    ]
    inits = [init("W", rng(2).standard_normal((F, 4)).astype(np.float32))]
    model = _model(nodes, [_x()], [helper.make_tensor_value_info("Y", FLOAT, ["N", 4])], inits)

    fused, report = fuse_with_report(model)

    assert [f.nodes for f in report.fusions] == [["scaler", "cast", "matmul"]]
    assert op_types(fused) == ["Gemm"]
    assert_equivalent(model, fused, _feeds())
    check(fused)


@pytest.mark.parametrize("targets", [1, 2])
def test_scaler_pca_and_regressor_become_one_gemm(targets):
    pca, inits = _pca()
    nodes = [_scaler(), *pca, _regressor("pcs", "Y", K, targets)]
    y = helper.make_tensor_value_info("Y", FLOAT, ["N", targets])
    model = _model(nodes, [_x()], [y], inits)

    fused, report = fuse_with_report(model)

    assert len(report.fusions) == 1
    assert report.fusions[0].nodes == ["scaler", "sub", "matmul", "div", "regressor"]
    assert op_types(fused) == ["Gemm"]
    assert [o.name for o in fused.graph.output] == ["Y"]
    assert_equivalent(model, fused, _feeds())
    check(fused)


def test_steps_after_a_plain_regressor_join_it():
    """A regressor without a post-transform on a 2-D input is only a map: a scale after it joins."""
    nodes = [
        _scaler(),
        _regressor("scaled", "r", F, 2),
        helper.make_node("Mul", ["r", "s"], ["Y"], name="mul"),
    ]
    inits = [init("s", np.asarray([0.5, -2.0], np.float32))]
    model = _model(nodes, [_x()], [helper.make_tensor_value_info("Y", FLOAT, ["N", 2])], inits)

    fused, report = fuse_with_report(model)

    assert [f.nodes for f in report.fusions] == [["scaler", "regressor", "mul"]]
    assert op_types(fused) == ["Gemm"]
    assert_equivalent(model, fused, _feeds())
    check(fused)


@pytest.mark.parametrize("post", ["LOGISTIC", "SOFTMAX"])
def test_regressor_with_a_post_transform_is_written_back_and_ends_the_chain(post):
    nodes = [
        _scaler(),
        _regressor("scaled", "r", F, 2, post_transform=post),
        helper.make_node("Mul", ["r", "s"], ["Y"], name="mul"),
    ]
    inits = [init("s", np.asarray([0.5, -2.0], np.float32))]
    model = _model(nodes, [_x()], [helper.make_tensor_value_info("Y", FLOAT, ["N", 2])], inits)

    fused, report = fuse_with_report(model)

    assert [f.nodes for f in report.fusions] == [["scaler", "regressor"]]
    assert op_types(fused) == ["LinearRegressor", "Mul"]
    node = _ml_node(fused)
    assert _attr(node, "post_transform") == post.encode()
    assert _attr(node, "targets") == 2
    assert len(_attr(node, "coefficients")) == 2 * F
    assert any(f"post_transform {post} is not affine" in r for r in _reasons(report))
    assert_equivalent(model, fused, _feeds())
    check(fused)


@pytest.mark.parametrize(
    ("labels", "post"),
    [([0, 1, 2], "SOFTMAX"), (["a", "b", "c"], "NONE"), ([4, 7, 9], "LOGISTIC")],
)
def test_pca_then_multiclass_classifier_is_one_classifier(labels, post):
    pca, inits = _pca()
    classifier = _classifier("pcs", 3, K, labels, multi_class=1, post_transform=post)
    nodes = [_scaler(), *pca, classifier]
    elem = TensorProto.STRING if isinstance(labels[0], str) else TensorProto.INT64
    outputs = [
        helper.make_tensor_value_info("label", elem, ["N"]),
        helper.make_tensor_value_info("scores", FLOAT, ["N", 3]),
    ]
    model = _model(nodes, [_x()], outputs, inits)

    fused, report = fuse_with_report(model)

    assert len(report.fusions) == 1
    assert report.fusions[0].nodes == ["scaler", "sub", "matmul", "div", "classifier"]
    assert op_types(fused) == ["LinearClassifier"]
    node = _ml_node(fused)
    assert list(node.input) == ["X"] and list(node.output) == ["label", "scores"]
    assert len(_attr(node, "coefficients")) == 3 * F and len(_attr(node, "intercepts")) == 3
    assert _attr(node, "multi_class") == 1
    assert _attr(node, "post_transform") == post.encode()
    assert not fused.graph.initializer  # mean, components and var folded away
    assert {(o.domain, o.version) for o in fused.opset_import} == {("", 17), (ML, 1)}
    assert_equivalent(model, fused, _feeds())
    check(fused)


@pytest.mark.parametrize("rows", [1, 2], ids=["one-score", "two-scores"])
@pytest.mark.parametrize("post", ["NONE", "LOGISTIC"])
def test_binary_classifier_in_either_form_absorbs_the_pca(rows, post):
    """A binary classifier holds one row of coefficients (onnxruntime adds the other score) or
    two (skl2onnx: ``w`` and ``-w``): either is a map to that many scores."""
    pca, inits = _pca()
    nodes = [_scaler(), *pca, _classifier("pcs", rows, K, [0, 1], post_transform=post)]
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("scores", FLOAT, ["N", 2]),
    ]
    model = _model(nodes, [_x()], outputs, inits)

    fused, report = fuse_with_report(model)

    assert len(report.fusions) == 1
    assert op_types(fused) == ["LinearClassifier"]
    node = _ml_node(fused)
    assert len(_attr(node, "coefficients")) == rows * F and len(_attr(node, "intercepts")) == rows
    assert_equivalent(model, fused, _feeds(n=32))
    check(fused)


def test_normalizer_after_a_classifier_is_not_affine():
    pca, inits = _pca()
    nodes = [
        _scaler(),
        *pca,
        _classifier("pcs", 3, K, [0, 1, 2], post_transform="SOFTMAX"),
        helper.make_node("Normalizer", ["scores"], ["P"], domain=ML, name="norm", norm="L1"),
    ]
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("P", FLOAT, ["N", 3]),
    ]
    model = _model(nodes, [_x()], outputs, inits)

    fused, report = fuse_with_report(model)

    assert len(report.fusions) == 1
    assert op_types(fused) == ["LinearClassifier", "Normalizer"]
    assert any(
        d.nodes[-1] == "norm" and d.reason.startswith("Normalizer (L1) divides each row")
        for d in report.declined
    )
    assert_equivalent(model, fused, _feeds())
    check(fused)


def test_nothing_after_a_classifier_joins_it():
    """The scores a classifier writes feed a Mul: the classifier takes the Scaler, not the Mul."""
    nodes = [
        _scaler(),
        _classifier("scaled", 3, F, [0, 1, 2]),
        helper.make_node("Mul", ["scores", "s"], ["S"], name="mul"),
    ]
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("S", FLOAT, ["N", 3]),
    ]
    inits = [init("s", np.asarray([0.5, 2.0, -1.0], np.float32))]
    model = _model(nodes, [_x()], outputs, inits)

    fused, report = fuse_with_report(model)

    assert [f.nodes for f in report.fusions] == [["scaler", "classifier"]]
    assert op_types(fused) == ["LinearClassifier", "Mul"]
    assert any(
        "LinearClassifier's labels and scores" in r and "nothing after it" in r
        for r in _reasons(report)
    )
    assert_equivalent(model, fused, _feeds())
    check(fused)


def test_scaler_on_a_double_input_says_why():
    """A Scaler writes float whatever it reads: on double data it is a cast as well."""
    nodes = [
        _scaler(),
        helper.make_node("MatMul", ["scaled", "W"], ["Y"], name="matmul"),
    ]
    inits = [init("W", rng(2).standard_normal((F, 4)).astype(np.float32))]
    x = _x(elem=TensorProto.DOUBLE)
    model = _model(nodes, [x], [helper.make_tensor_value_info("Y", FLOAT, ["N", 4])], inits)

    fused, report = fuse_with_report(model)

    assert report.fusions == []
    assert op_types(fused) == ["Scaler", "MatMul"]
    assert any(
        "Scaler reads an input of type float64 and always writes float32" in r
        for r in _reasons(report)
    )
    assert_equivalent(model, fused, _feeds(dtype=np.float64))
    check(fused)


def test_classifier_without_intercepts_says_why():
    node = helper.make_node(
        "LinearClassifier",
        ["scaled"],
        ["label", "scores"],
        domain=ML,
        name="classifier",
        coefficients=rng(5).standard_normal(3 * F).tolist(),
        classlabels_ints=[0, 1, 2],
    )
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("scores", FLOAT, ["N", "C"]),  # onnx infers 0 classes
    ]
    model = _model([_scaler(), node], [_x()], outputs)

    fused, report = fuse_with_report(model)

    assert report.fusions == []
    assert op_types(fused) == ["Scaler", "LinearClassifier"]
    assert any("onnxruntime counts its classes by them" in r for r in _reasons(report))
    check(fused)


def test_regressor_on_a_1d_input_is_written_back():
    """On an input not known to be 2-D (a 1-D one gives ``[1, targets]``, a MatMul ``[targets]``)
    the MatMul folds into the regressor, which stays a LinearRegressor."""
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["h"], name="matmul"),
        _regressor("h", "Y", 4, 2),
    ]
    inits = [init("W", rng(2).standard_normal((F, 4)).astype(np.float32))]
    x = helper.make_tensor_value_info("X", FLOAT, [F])
    model = _model(nodes, [x], [helper.make_tensor_value_info("Y", FLOAT, [1, 2])], inits)

    fused, report = fuse_with_report(model)

    assert [f.nodes for f in report.fusions] == [["matmul", "regressor"]]
    assert op_types(fused) == ["LinearRegressor"]
    assert len(_attr(_ml_node(fused), "coefficients")) == 2 * F
    feeds = {"X": rng(3).uniform(-2, 2, F).astype(np.float32)}
    assert_equivalent(model, fused, feeds)
    check(fused)
