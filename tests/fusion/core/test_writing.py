"""Writing a merge (``converter.fusion.core.writing``): what goes with the replaced nodes.

A ``Shape`` of a value a merge removes reads only that value's shape; when the model fixes it
(every dim a number), the Shape becomes a ``Constant`` of it and no longer blocks the merge
(issue 22: Keras's and Flax's exports read shapes of intermediates to rebuild others).
"""

from __future__ import annotations

import numpy as np
import onnx
from builders import assert_equivalent, check, feeds, fuse_with_report, init, op_types, rng
from onnx import TensorProto, helper

FLOAT = TensorProto.FLOAT


def _model(batch) -> onnx.ModelProto:
    """``y = (x @ W1) @ W2`` and ``s = Shape(x @ W1)``, a second graph output."""
    r = rng(9)
    inits = [
        init("W1", r.standard_normal((4, 6)).astype(np.float32)),
        init("W2", r.standard_normal((6, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="l1"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="l2"),
        helper.make_node("Shape", ["h"], ["s"], name="shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [batch, 5, 4])],
        [
            helper.make_tensor_value_info("y", FLOAT, [batch, 5, 3]),
            helper.make_tensor_value_info("s", TensorProto.INT64, [3]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def test_a_shape_of_a_merged_value_with_a_fixed_shape_becomes_a_constant():
    model = _model(2)
    fused, report = fuse_with_report(model)
    assert len(report.fusions) == 1
    assert op_types(fused) == ["MatMul", "Constant"]
    check(fused)
    assert_equivalent(model, fused, feeds((2, 5, 4)), atol=1e-5, rtol=1e-4)
    again, report2 = fuse_with_report(fused)
    assert report2.fusions == [] and again.SerializeToString() == fused.SerializeToString()


def test_a_shape_of_a_value_with_a_symbolic_dim_still_blocks_the_merge():
    model = _model("batch")
    fused, report = fuse_with_report(model)
    assert report.fusions == [] and op_types(fused) == op_types(model)
    reasons = [d.reason for d in report.declined]
    assert "fan-out: intermediate 'h' feeds 2 nodes" in reasons, reasons
