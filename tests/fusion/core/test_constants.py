"""The constant resolver (``converter.fusion.core.constants``): ``Squeeze``/``Unsqueeze`` of a constant.

A per-channel vector ``s`` of shape ``(C,)`` reaches the ``Mul``/``Add`` after a ``Conv`` as
``Unsqueeze(s, axes=[1, 2])`` (``(C, 1, 1)``) in graph-surgery scripts and exports without
constant folding: axes an input from opset 13, an attribute before. The resolver sees it as the
constant it is, so the conv fold takes it (issue 19: these reported "nothing to merge").
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import assert_equivalent, check, feeds, fuse_with_report, init, op_types, run
from onnx import TensorProto, helper

from converter.fusion.core.constants import Constant, Constants
from converter.fusion.core.declined import Declined

FLOAT = TensorProto.FLOAT
ATOL, RTOL = 1e-5, 1e-4
R = np.random.default_rng(19)


def _axes(node_name: str, axes: list[int], opset: int) -> tuple[list[str], dict, list]:
    """(extra inputs, attributes, initializers) giving a Squeeze/Unsqueeze its axes by opset."""
    if opset >= 13:
        name = f"{node_name}.axes"
        return [name], {}, [init(name, np.array(axes, np.int64))]
    return [], {"axes": axes}, []


def _conv_step(
    op: str, view: str, const_shape: tuple[int, ...], axes: list[int], opset: int
) -> onnx.ModelProto:
    """``Conv(x) -> op(., view(c, axes))`` on a ``[1, 3, 6, 6]`` image, 4 output channels."""
    extra, attrs, inits = _axes("view", axes, opset)
    c = R.uniform(0.5, 1.5, const_shape) if op in ("Mul", "Div") else R.normal(size=const_shape)
    inits += [
        init("conv.w", R.normal(size=(4, 3, 3, 3)).astype(np.float32)),
        init("conv.b", R.normal(size=4).astype(np.float32)),
        init("c", c.astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["h"], name="conv", pads=[1] * 4),
        helper.make_node(view, ["c", *extra], ["cv"], name="view", **attrs),
        helper.make_node(op, ["h", "cv"], ["y"], name="step"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 4, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    check(model)
    return model


CASES = [
    # (op, view, constant's shape, axes, opset)
    ("Mul", "Unsqueeze", (4,), [1, 2], 13),
    ("Add", "Unsqueeze", (4,), [1, 2], 13),
    ("Mul", "Unsqueeze", (4,), [1, 2], 11),
    ("Add", "Unsqueeze", (4,), [-1, -2], 11),
    ("Sub", "Unsqueeze", (4,), [0, 2, 3], 17),
    ("Div", "Unsqueeze", (4, 1), [2], 13),
    ("Mul", "Squeeze", (1, 1, 4, 1, 1), [0], 13),
    ("Add", "Squeeze", (4, 1, 1, 1), [-1], 11),
]


@pytest.mark.parametrize(("op", "view", "shape", "axes", "opset"), CASES)
def test_a_channel_constant_through_squeeze_or_unsqueeze_folds_into_the_conv(
    op, view, shape, axes, opset
) -> None:
    model = _conv_step(op, view, shape, axes, opset)

    fused, report = fuse_with_report(model)

    assert len(report.fusions) == 1, report
    assert report.fusions[0].note == f"{op} folded into the Conv before it"
    assert op_types(fused) == ["Conv"]  # the view and its axes went with the step
    assert {t.name for t in fused.graph.initializer}.isdisjoint({"c", "view.axes"})
    check(fused)
    assert_equivalent(model, fused, feeds((1, 3, 6, 6), seed=4), atol=ATOL, rtol=RTOL)


def test_squeeze_without_axes_drops_every_one() -> None:
    value = _resolved("Squeeze", (1, 4, 1), None, 13)
    assert isinstance(value, Constant) and value.shape == (4,)
    np.testing.assert_array_equal(value.array(), _source(value).reshape(4))


def test_unsqueeze_inserts_each_axis_where_it_ends_up() -> None:
    value = _resolved("Unsqueeze", (2, 3), [3, 0], 13)
    assert isinstance(value, Constant) and value.shape == (1, 2, 3, 1)
    np.testing.assert_array_equal(value.array(), _source(value).reshape(1, 2, 3, 1))


@pytest.mark.parametrize(
    ("view", "shape", "axes"),
    [
        ("Unsqueeze", (4,), [1, 1]),  # repeated
        ("Unsqueeze", (4,), [3]),  # out of range for the rank-2 result
        ("Squeeze", (4, 1), [0]),  # dimension 0 is 4, not 1
    ],
)
def test_malformed_axes_are_not_a_constant(view, shape, axes) -> None:
    found = _resolved(view, shape, axes, 13)
    assert isinstance(found, Declined)
    assert found.reason == "weight 'cv' is not constant"


def test_axes_that_are_not_constant_leave_the_step() -> None:
    """Axes computed at run time: the scale is not a constant, so the Mul is no channel step at
    all (not a declined one) and the model has nothing to merge."""
    model = _conv_step("Mul", "Unsqueeze", (4,), [1, 2], 13)
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("axes_in", TensorProto.INT64, [2]))
    graph.node[1].input[1] = "axes_in"
    graph.initializer.remove(next(t for t in graph.initializer if t.name == "view.axes"))
    check(model)

    fused, report = fuse_with_report(model)

    assert report.fusions == [] and report.declined == []
    assert op_types(fused) == ["Conv", "Unsqueeze", "Mul"]
    assert report.why_nothing_merged().startswith("no two linear ops with constant weights")
    x = feeds((1, 3, 6, 6), seed=4)["x"]
    np.testing.assert_array_equal(
        run(fused, {"x": x, "axes_in": np.array([1, 2])})[0],
        run(model, {"x": x, "axes_in": np.array([1, 2])})[0],
    )


def _resolved(view: str, shape: tuple[int, ...], axes: list[int] | None, opset: int):
    """``resolve`` of ``view(c, axes)`` for a random constant ``c`` of ``shape``."""
    extra, attrs, inits = ([], {}, []) if axes is None else _axes("view", axes, opset)
    inits.append(init("c", R.normal(size=shape).astype(np.float32)))
    graph = helper.make_graph(
        [helper.make_node(view, ["c", *extra], ["cv"], name="view", **attrs)],
        "g",
        [],
        [helper.make_tensor_value_info("cv", FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    ir_model = ir.serde.deserialize_model(model)
    return Constants().resolve(ir_model.graph.node(0).outputs[0])


def _source(value: Constant) -> np.ndarray:
    return value.chain[-1].const_value.numpy()
