"""Models onnxruntime's CPU provider cannot run in their own type (bfloat16) are validated as
float32 copies with their own interface, and the report says so (issue 18)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.cli import main
from converter.equivalence.runtime import Runner
from converter.equivalence.validate import check_equivalence
from converter.equivalence.widen import float32_copy, narrow_float_types
from converter.errors import OriginalModelError

BF16, F, I64 = TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.INT64


def _bf16(array: np.ndarray) -> onnx.TensorProto:
    """A bfloat16 initializer holding ``array`` rounded to bfloat16."""
    return numpy_helper.from_array(np.asarray(array, np.float32).astype(ml_dtypes.bfloat16))


def _bf16_model(bias_shift: float = 0.0) -> onnx.ModelProto:
    """``y = Cast<bf16>(Cast<f32>(x @ w + b) * 0.5) * c``, all in bfloat16 but the middle:
    a bfloat16 ``MatMul``, ``Add`` and ``Mul`` onnxruntime's CPU provider has no kernel for,
    a ``Cast`` to bfloat16 and a bfloat16 ``Constant``; ``z`` passes ``x`` through."""
    rng = np.random.default_rng(0)
    w, b = _bf16(rng.standard_normal((4, 3))), _bf16(rng.standard_normal(3) + bias_shift)
    w.name, b.name = "w", "b"
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["s"]),
        helper.make_node("Cast", ["s"], ["s32"], to=F),
        helper.make_node("Mul", ["s32", "half"], ["h32"]),
        helper.make_node("Cast", ["h32"], ["h"], to=BF16),
        helper.make_node("Constant", [], ["c"], value=_bf16(np.array([1.5, -2.0, 0.25]))),
        helper.make_node("Mul", ["h", "c"], ["y"]),
        helper.make_node("Identity", ["x"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", BF16, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", BF16, ["batch", 3]),
            helper.make_tensor_value_info("z", BF16, ["batch", 4]),
        ],
        [w, b, numpy_helper.from_array(np.array(0.5, np.float32), "half")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_onnxruntime_cannot_run_the_bfloat16_model_as_it_is():
    """The premise: without the float32 copy, this model does not load."""
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(_bf16_model().SerializeToString(), providers=["CPUExecutionProvider"])


def test_float32_copy_keeps_the_interface_and_computes_the_model_in_float32():
    proto = _bf16_model()
    model = ir.serde.deserialize_model(proto)
    assert narrow_float_types(model) == ["bfloat16"]
    copy = ir.to_proto(float32_copy(model))
    onnx.checker.check_model(copy, full_check=True)
    interface = [
        (v.name, v.type.tensor_type.elem_type) for v in (*copy.graph.input, *copy.graph.output)
    ]
    assert interface == [("x", BF16), ("y", BF16), ("z", BF16)]
    assert narrow_float_types(ir.serde.deserialize_model(copy)) == ["bfloat16"]  # the interface
    assert [t.data_type for t in copy.graph.initializer] == [F, F, F]
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).uniform(-1, 1, (2, 4)).astype(ml_dtypes.bfloat16)
    outputs = Runner(session).run({"x": x})  # bfloat16 in and out, as raw OrtValues
    y, z = outputs["y"], outputs["z"]
    weights = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in proto.graph.initializer}
    # float32 throughout, the Cast to bfloat16 in the middle included: rounded only as y leaves
    h = (x.astype(np.float32) @ weights["w"] + weights["b"]) * np.float32(0.5)
    expected = (h * np.array([1.5, -2.0, 0.25], np.float32)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(y.astype(np.float32), expected.astype(np.float32))
    np.testing.assert_array_equal(z.view(np.uint16), x.view(np.uint16))  # passed through exactly
    assert model.graph.initializers["w"].const_value.dtype == ir.DataType.BFLOAT16  # left alone


def test_a_bfloat16_model_is_validated_in_float32_and_the_report_says_so():
    report = check_equivalence(_bf16_model(), _bf16_model(), extra_outputs=["s"])
    assert report.passed, str(report)
    assert report.widened.startswith("bfloat16 computed in float32: onnxruntime cannot run")
    assert "Mul" in report.widened or "MatMul" in report.widened
    assert report.to_dict()["widened"] == report.widened
    assert "computed in float32" in str(report)
    assert {s.dtype for s in report.outputs} == {"bfloat16"} and report.outputs[0].atol == 2e-2
    (value,) = report.intermediates
    assert value.measured and value.max_abs_error == 0.0


def test_a_wrong_bfloat16_candidate_still_fails():
    report = check_equivalence(_bf16_model(), _bf16_model(bias_shift=0.5))
    assert not report.passed and report.widened
    assert not report.outputs[0].passed and "beyond tolerance" in report.outputs[0].reason


def test_a_model_in_its_own_types_says_nothing_of_float32():
    assert check_equivalence(_float_model(), _float_model()).widened == ""


def _float_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", F, ["batch", 4])],
        [helper.make_tensor_value_info("y", F, ["batch", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_a_bfloat16_model_nothing_can_run_names_both_reasons():
    model = _bf16_model()
    model.graph.node.append(helper.make_node("Frobnicate", ["y"], ["unused"], domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(OriginalModelError, match="nor its float32 copy") as error:
        check_equivalence(model, _bf16_model())
    assert "Frobnicate" in str(error.value) and "\n" not in str(error.value)


def test_fusing_a_model_nothing_can_run_exits_2_naming_no_validate(tmp_path, capsys):
    """Two bfloat16 MatMuls merge; a custom op nothing knows keeps even the float32 copy from
    loading: one line, exit 2, naming the way on (``--no-validate``), which then writes it."""
    rng = np.random.default_rng(2)
    w1, w2 = _bf16(rng.standard_normal((4, 6))), _bf16(rng.standard_normal((6, 3)))
    w1.name, w2.name = "w1", "w2"
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["m"]),
        helper.make_node("Frobnicate", ["m"], ["y"], domain="com.example"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", BF16, ["batch", 4])],
        [helper.make_tensor_value_info("y", BF16, ["batch", 3])],
        [w1, w2],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.example", 1)]
    src, out = tmp_path / "custom.onnx", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), src)
    assert main([str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "nor its float32 copy" in err and "--no-validate" in err
    assert not out.exists()
    assert main([str(src), "-o", str(out), "--no-validate", "-q"]) == 0 and out.exists()
