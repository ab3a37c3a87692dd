"""Two Reshapes that cancel between linear layers (``converter.fusion.linear.reshape_pairs``).

jax2onnx's ``nnx.Linear`` on a rank-3 input: ``Reshape(-1, d) -> Gemm -> Reshape(Concat(Shape(x)
[:2], w))``, and the next layer's ``Reshape(-1, w)`` and ``Shape`` of that. The two Gemms merge;
the ``Shape`` then reads the first Reshape's target. Each test checks the fusions, the structure,
onnxruntime equivalence (at two batch sizes: the batch is symbolic) and the checker.
"""

from __future__ import annotations

import numpy as np
import onnx
from builders import assert_equivalent, check, feeds, fuse_with_report, init, op_types, rng
from onnx import TensorProto, helper

FLOAT = TensorProto.FLOAT
TOL = {"atol": 1e-5, "rtol": 1e-4}
T, D, H, OUT = 5, 6, 8, 4


def _layer(i: int, x: str, d: int, w: int, r, *, exact: bool = True) -> tuple[list, list, str]:
    """``Reshape(x, (-1, d)) -> Gemm -> Reshape(y, Concat(Shape(x)[:2], (w,)))``."""
    out = f"out{i}"
    inits = [
        init(f"flat{i}", np.array([-1, d], np.int64)),
        init(f"W{i}", (r.standard_normal((d, w)) / 2).astype(np.float32)),
        init(f"b{i}", r.standard_normal(w).astype(np.float32)),
        init(f"zero{i}", np.array([0], np.int64)),
        init(f"two{i}", np.array([2], np.int64)),
        init(f"w{i}", np.array([w if exact else -1], np.int64)),
    ]
    nodes = [
        helper.make_node("Reshape", [x, f"flat{i}"], [f"x2d{i}"], name=f"flatten{i}"),
        helper.make_node("Gemm", [f"x2d{i}", f"W{i}", f"b{i}"], [f"g{i}"], name=f"gemm{i}"),
        helper.make_node("Shape", [x], [f"shape{i}"], name=f"shape{i}"),
        helper.make_node(
            "Slice", [f"shape{i}", f"zero{i}", f"two{i}"], [f"lead{i}"], name=f"lead{i}"
        ),
        helper.make_node(
            "Concat", [f"lead{i}", f"w{i}"], [f"target{i}"], axis=0, name=f"target{i}"
        ),
        helper.make_node("Reshape", [f"g{i}", f"target{i}"], [out], name=f"unflatten{i}"),
    ]
    return nodes, inits, out


def _model(exact: bool = True) -> onnx.ModelProto:
    r = rng(7)
    n1, i1, h = _layer(1, "x", D, H, r, exact=exact)
    n2, i2, _ = _layer(2, h, H, OUT, r)
    n2[-1].output[0] = "y"
    graph = helper.make_graph(
        n1 + n2,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, ["B", T, D])],
        [helper.make_tensor_value_info("y", FLOAT, ["B", T, OUT])],
        i1 + i2,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def test_two_rank3_linear_layers_merge_through_the_reshapes_between_them():
    model = _model()
    check(model)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert report.fusions[0].nodes == ["gemm1", "unflatten1", "flatten2", "gemm2"]
    assert op_types(fused).count("Gemm") == 1 and "shape2" not in [n.name for n in fused.graph.node]
    check(fused)
    for batch in (2, 3):
        assert_equivalent(model, fused, feeds((batch, T, D)), **TOL)


def test_a_target_with_a_minus_one_keeps_the_shape_reader_and_the_layers():
    """``Concat(Shape(x)[:2], (-1,))``: the shape a Shape reads is not the target, so the pair
    is not read through (the Shape would see -1)."""
    model = _model(exact=False)
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    for batch in (2, 3):
        assert_equivalent(model, fused, feeds((batch, T, D)), **TOL)
