"""Column picks and scalers in regions (``converter.fusion.linear.region_ml``), issue 22.

scikit-learn's ``ColumnTransformer`` reaches an skl2onnx export as one ``ArrayFeatureExtractor``
per transformer, its scaler (``Scaler``, or MinMax's ``Cast -> Mul -> Add``) and a ``Concat`` of
the blocks: one affine map of ``X``'s last axis, which composes with the regressor, classifier or
layer after it. Each rewrite test checks the fusions, the structure, onnxruntime equivalence with
explicit tolerances and the full checker; the negative ones assert the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import assert_equivalent, check, fuse_with_report, init, ml_scaler, op_types, rng
from onnx import TensorProto, helper

from converter.fusion.core.context import Context
from converter.fusion.linear.regions import find_regions

FLOAT = TensorProto.FLOAT
ML = "ai.onnx.ml"
F = 12  # raw columns
ATOL, RTOL = 1e-5, 1e-4
# Permuted, overlapping and repeated picks of the columns (column 3 in two blocks, 7 twice; 6 and
# 9 in none), 12 in all: the merged weight is no larger than the layer's after them.
PICKS = ([3, 0, 2, 1], [7, 5, 7, 3, 4], [11, 8, 10])


def _model(nodes, inits=(), x_shape=("N", F), y_width: int = 1, y_rank: int = 2):
    x = helper.make_tensor_value_info("X", FLOAT, None if x_shape is None else list(x_shape))
    lead = ["N"] if y_rank == 2 else ["N", *x_shape[1:-1]]
    y = helper.make_tensor_value_info("Y", FLOAT, [*lead, y_width])
    graph = helper.make_graph(list(nodes), "columns", [x], [y], list(inits))
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ML, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    check(model)
    return model


def _feeds(shape=(9, F)) -> dict[str, np.ndarray]:
    return {"X": rng(3).uniform(-3, 3, shape).astype(np.float32)}


def _pick(i: int, columns, x: str = "X") -> tuple[onnx.NodeProto, onnx.TensorProto]:
    node = helper.make_node(
        "ArrayFeatureExtractor", [x, f"cols{i}"], [f"picked{i}"], domain=ML, name=f"pick{i}"
    )
    return node, init(f"cols{i}", np.array(columns, np.int64))


def _scaler(x: str, y: str, width: int, seed: int, name: str = "scaler") -> onnx.NodeProto:
    return ml_scaler(x, y, width, seed, name=name, smallest=0.2)


def _min_max(x: str, y: str, width: int, seed: int) -> tuple[list, list]:
    """MinMaxScaler as skl2onnx writes it: ``Cast(to=FLOAT) -> Mul -> Add``."""
    r = rng(seed)
    nodes = [
        helper.make_node("Cast", [x], [f"{y}_cast"], to=FLOAT, name="cast"),
        helper.make_node("Mul", [f"{y}_cast", "mm_scale"], [f"{y}_mul"], name="mul"),
        helper.make_node("Add", [f"{y}_mul", "mm_shift"], [y], name="add"),
    ]
    inits = [
        init("mm_scale", r.uniform(0.1, 1, width).astype(np.float32)),
        init("mm_shift", r.standard_normal(width).astype(np.float32)),
    ]
    return nodes, inits


def _column_transformer() -> tuple[list, list, int]:
    """Three blocks of :data:`PICKS` (Scaler, MinMax, Scaler) joined: the transformed width."""
    nodes, inits = [], []
    blocks = []
    for i, columns in enumerate(PICKS):
        node, cols = _pick(i, columns)
        nodes.append(node)
        inits.append(cols)
        if i == 1:
            more, more_inits = _min_max(f"picked{i}", f"block{i}", len(columns), 10 + i)
            nodes += more
            inits += more_inits
        else:
            nodes.append(_scaler(f"picked{i}", f"block{i}", len(columns), 10 + i, f"scaler{i}"))
        blocks.append(f"block{i}")
    nodes.append(helper.make_node("Concat", blocks, ["joined"], axis=1, name="join"))
    return nodes, inits, sum(len(c) for c in PICKS)


def _regressor(x: str, features: int, targets: int = 1, **attrs) -> onnx.NodeProto:
    r = rng(4)
    return helper.make_node(
        "LinearRegressor",
        [x],
        ["Y"],
        domain=ML,
        name="regressor",
        coefficients=r.standard_normal(targets * features).tolist(),
        intercepts=r.standard_normal(targets).tolist(),
        targets=targets,
        **attrs,
    )


def _reasons(report, node: str) -> list[str]:
    return [d.reason for d in report.declined if node in d.nodes]


def test_a_column_transformer_before_a_regressor_is_one_op_on_the_input():
    nodes, inits, width = _column_transformer()
    model = _model([*nodes, _regressor("joined", width, targets=2)], inits, y_width=2)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert report.fusions[0].nodes[-1] == "regressor"
    assert op_types(fused) in (["Gemm"], ["LinearRegressor"])
    assert fused.graph.node[0].input[0] == "X"
    check(fused)
    assert_equivalent(model, fused, _feeds())
    assert_equivalent(model, fused, _feeds((1, F)))  # one row: the batch is not fixed
    again, report2 = fuse_with_report(fused)
    assert report2.fusions == [] and op_types(again) == op_types(fused)


def test_the_map_is_read_exactly_from_the_probe():
    """Column ``j`` of the map holds ``scale_j`` in the row of the column it picks (twice for a
    column picked twice); the bias is ``-offset * scale``, or MinMax's shift."""
    nodes, inits, width = _column_transformer()
    proto = _model([*nodes, _regressor("joined", width)], inits)
    model = ir.serde.deserialize_model(proto)
    (region,), declined = find_regions(Context(model), model.graph)
    assert declined == []
    assert region.names[-1] == "join" and region.region
    assert (region.in_features, region.out_features) == (F, width)
    weight, bias = np.zeros((F, width)), np.zeros(width)
    arrays = {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer
    }
    scalers = {n.name: n for n in proto.graph.node if n.op_type == "Scaler"}
    j = 0
    for i, columns in enumerate(PICKS):
        if i == 1:
            scale, shift = arrays["mm_scale"], arrays["mm_shift"]
        else:
            attrs = {
                a.name: np.array(a.floats, np.float32) for a in scalers[f"scaler{i}"].attribute
            }
            scale = attrs["scale"].astype(np.float64)
            shift = -attrs["offset"].astype(np.float64) * scale
        for k, column in enumerate(columns):
            weight[column, j + k] = scale[k]
        bias[j : j + len(columns)] = shift
        j += len(columns)
    affine = region.affine
    np.testing.assert_allclose(affine.weight, weight, rtol=1e-15, atol=0)
    np.testing.assert_allclose(affine.bias, bias, rtol=1e-15, atol=1e-15)


def test_blocks_before_a_classifier_are_written_into_the_classifier():
    """A classifier's labels come from its scores: the merge is written as the classifier."""
    nodes, inits, width = _column_transformer()
    r = rng(6)
    classifier = helper.make_node(
        "LinearClassifier",
        ["joined"],
        ["label", "Y"],
        domain=ML,
        name="classifier",
        coefficients=r.standard_normal(3 * width).tolist(),
        intercepts=r.standard_normal(3).tolist(),
        classlabels_ints=[0, 1, 2],
        post_transform="SOFTMAX",
    )
    graph = helper.make_graph(
        [*nodes, classifier],
        "columns",
        [helper.make_tensor_value_info("X", FLOAT, ["N", F])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("Y", FLOAT, ["N", 3]),
        ],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ML, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    check(model)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) == ["LinearClassifier"]
    check(fused)
    assert_equivalent(model, fused, _feeds())


@pytest.mark.parametrize("form", ["Gemm", "MatMul"])
def test_blocks_joined_before_a_layer_merge_into_it(form):
    """Column picks, length-1 Scalers (one offset and scale for every column) and a Concat of the
    blocks before a Gemm or a MatMul + Add: one op."""
    r = rng(7)
    nodes, inits = [], []
    for i, columns in enumerate(PICKS):
        node, cols = _pick(i, columns)
        nodes += [
            node,
            helper.make_node(
                "Scaler",
                [f"picked{i}"],
                [f"block{i}"],
                domain=ML,
                name=f"scaler{i}",
                offset=[float(r.standard_normal())],
                scale=[float(r.uniform(0.5, 2))],
            ),
        ]
        inits.append(cols)
    width = sum(len(c) for c in PICKS)
    nodes.append(helper.make_node("Concat", ["block0", "block1", "block2"], ["joined"], axis=-1))
    inits += [
        init("W", r.standard_normal((width, 4) if form == "MatMul" else (4, width)).astype("f")),
        init("b", r.standard_normal(4).astype(np.float32)),
    ]
    if form == "Gemm":
        nodes.append(helper.make_node("Gemm", ["joined", "W", "b"], ["Y"], transB=1, name="fc"))
    else:
        nodes += [
            helper.make_node("MatMul", ["joined", "W"], ["h"], name="fc"),
            helper.make_node("Add", ["h", "b"], ["Y"], name="bias"),
        ]
    model = _model(nodes, inits, y_width=4)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) == ["Gemm"]
    assert fused.graph.node[0].input[0] == "X"
    check(fused)
    assert_equivalent(model, fused, _feeds())


def test_one_column_pick_and_its_scaler_fold_into_the_regressor():
    """A pick of columns alone is a region too: ``pick -> Scaler`` (a step) ``-> regressor``."""
    node, cols = _pick(0, PICKS[1])
    width = len(PICKS[1])
    nodes = [node, _scaler("picked0", "scaled", width, 1), _regressor("scaled", width)]
    model = _model(nodes, [cols])
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) in (["Gemm"], ["LinearRegressor"])
    check(fused)
    assert_equivalent(model, fused, _feeds())


def _blocks_into_a_layer(x_shape=("N", F), *, cast_to=FLOAT, indices_input=False, normalized=False):
    """``Concat(pick0 -> Cast, pick1) -> MatMul``, the second pick's indices maybe a graph input,
    the picks maybe of a ``Normalizer``'s output (which onnx infers no shape for)."""
    r = rng(8)
    x = "normalized" if normalized else "X"
    node0, cols0 = _pick(0, PICKS[0], x)
    node1, cols1 = _pick(1, PICKS[1], x)
    nodes = [helper.make_node("Normalizer", ["X"], [x], domain=ML, norm="L2")] if normalized else []
    nodes += [
        node0,
        node1,
        helper.make_node("Cast", ["picked0"], ["cast0"], to=cast_to, name="cast"),
    ]
    if cast_to != FLOAT:
        nodes.append(helper.make_node("Cast", ["cast0"], ["back0"], to=FLOAT, name="back"))
    nodes += [
        helper.make_node(
            "Concat", ["back0" if cast_to != FLOAT else "cast0", "picked1"], ["j"], axis=-1
        ),
        helper.make_node("MatMul", ["j", "W"], ["Y"], name="fc"),
    ]
    inits = [cols0, init("W", r.standard_normal((9, 3)).astype(np.float32))]
    rank = len(x_shape)
    model_inputs = []
    if indices_input:
        model_inputs.append(helper.make_tensor_value_info("cols1", TensorProto.INT64, [5]))
    else:
        inits.append(cols1)
    lead = ["N"] if rank == 2 else ["N", *x_shape[1:-1]]
    graph = helper.make_graph(
        nodes,
        "columns",
        [helper.make_tensor_value_info("X", FLOAT, list(x_shape)), *model_inputs],
        [helper.make_tensor_value_info("Y", FLOAT, [*lead, 3])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ML, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    check(model)
    return model


def test_picks_of_rows_of_rank_three_merge_into_the_layer():
    """``X [N, 3, 12]``: the picks act on the last axis of each row, whatever its leading axes.
    They read 9 of the 12 columns, so the merged weight is larger than the layer's: the cost
    model keeps them apart, ``--policy always`` merges."""
    model = _blocks_into_a_layer(("N", 3, F))
    kept, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(kept) == op_types(model)
    assert any(d.reason.startswith("cost model: ") for d in report.declined), report.declined
    fused, report = fuse_with_report(model, policy="always")
    assert len(report.fusions) == 1 and op_types(fused) == ["MatMul"]
    check(fused)
    assert_equivalent(model, fused, _feeds((2, 3, F)))


@pytest.mark.parametrize(
    ("kwargs", "node", "reason"),
    [
        (
            {"indices_input": True},
            "pick1",
            "not a map of each row's features: ArrayFeatureExtractor 'pick1' has column "
            "indices that are not constant",
        ),
        (
            {"normalized": True},
            "pick0",
            "the input 'normalized' has no recorded shape: its rows and width are unknown",
        ),
        (
            {"x_shape": ("N", "F")},
            "pick0",
            "the input 'X' has a last axis of unknown size",
        ),
        (
            {"cast_to": TensorProto.DOUBLE},
            "cast",
            "not a map of each row's features: Cast 'cast' casts float32 to float64",
        ),
    ],
)
def test_blocks_that_are_not_a_map_of_the_columns_say_why(kwargs, node, reason):
    model = _blocks_into_a_layer(**kwargs)
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    assert reason in _reasons(report, node), _reasons(report, node)
    feeds = _feeds()
    if kwargs.get("indices_input"):
        feeds["cols1"] = np.array(PICKS[1], np.int64)
    assert_equivalent(model, fused, feeds)


def test_a_scaler_by_column_of_a_value_of_rank_three_is_not_a_map_of_its_last_axis():
    """onnxruntime scales the flat data with axis 1's stride: refused, with the reason."""
    node, cols = _pick(0, [0, 2, 3])
    r = rng(9)
    nodes = [
        node,
        _scaler("picked0", "scaled", 3, 2),
        helper.make_node("Concat", ["scaled", "picked0"], ["j"], axis=-1, name="join"),
        helper.make_node("MatMul", ["j", "W"], ["Y"], name="fc"),
    ]
    inits = [cols, init("W", r.standard_normal((6, 2)).astype(np.float32))]
    model = _model(nodes, inits, x_shape=("N", 3, 4), y_width=2, y_rank=3)
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    expected = (
        "not a map of each row's features: Scaler 'scaler' scales a value of rank 3 by column: "
        "onnxruntime scales axis 1 of a 2-D input"
    )
    assert expected in _reasons(report, "pick0"), _reasons(report, "pick0")
    assert_equivalent(model, fused, _feeds((2, 3, 4)))


@pytest.mark.parametrize(
    ("columns", "reason"),
    [
        ([1, -1], "has column indices outside [0, 12) (onnxruntime refuses them)"),
        ([], "has no column indices (onnxruntime refuses an empty list)"),
    ],
)
def test_column_indices_onnxruntime_refuses_are_refused(columns, reason):
    node, cols = _pick(0, columns)
    node1, cols1 = _pick(1, PICKS[0])
    nodes = [
        node,
        node1,
        helper.make_node("Concat", ["picked0", "picked1"], ["j"], axis=-1, name="join"),
        _regressor("j", len(columns) + 4),
    ]
    model = _model(nodes, [cols, cols1])
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    full = f"not a map of each row's features: ArrayFeatureExtractor 'pick0' {reason}"
    assert full in _reasons(report, "pick0"), _reasons(report, "pick0")
