"""Models with training_info, local functions and custom-domain ops: fused, the rest untouched."""

from __future__ import annotations

import onnx
from builders import check, linear_chain, op_types
from onnx import helper

import converter
from converter.cli import main


def _model_with_extras() -> onnx.ModelProto:
    """fc0 -> fc1 -> fc2 -> MyFn (a local function in a custom domain); fc2's W2 is trained."""
    model = linear_chain([4, 6, 6, 3])
    info = onnx.TrainingInfoProto()
    info.algorithm.CopyFrom(
        helper.make_graph(
            [helper.make_node("Identity", ["W2"], ["W2_new"])],
            "step",
            [],
            [helper.make_tensor_value_info("W2_new", onnx.TensorProto.FLOAT, [3, 6])],
        )
    )
    info.update_binding.add(key="W2", value="W2_new")
    model.training_info.append(info)
    fn = helper.make_function(
        "custom.fn",
        "MyFn",
        ["a"],
        ["b"],
        [helper.make_node("Relu", ["a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    model.functions.append(fn)
    model.opset_import.append(helper.make_opsetid("custom.fn", 1))
    model.graph.node.append(helper.make_node("MyFn", ["y"], ["z"], domain="custom.fn", name="fn"))
    model.graph.output.append(
        helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["batch", 3])
    )
    return model


def test_training_info_functions_and_custom_ops_survive_fuse():
    model = _model_with_extras()
    fused = converter.fuse(model)
    # fc0+fc1 merge; fc2's weight is trained, so it stays, with the reason recorded below.
    assert op_types(fused) == ["Gemm", "Gemm", "MyFn"]
    assert list(fused.training_info) == list(model.training_info)
    assert list(fused.functions) == list(model.functions)
    assert "W2" in {t.name for t in fused.graph.initializer}
    check(fused)


def test_trained_weight_reason_and_file_round_trip(tmp_path, capsys):
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_model_with_extras(), src)
    assert main([str(src), "-o", str(dst), "--verbose"]) == 0
    assert "weight 'W2' is trained by the model's training_info" in capsys.readouterr().out
    written = onnx.load(dst)
    assert list(written.training_info) == list(_model_with_extras().training_info)
    assert op_types(written) == ["Gemm", "Gemm", "MyFn"]
