"""Tests of converter.equivalence.validate: onnxruntime equivalence checks, tolerances, reference, reports."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.equivalence import compare, reference, runtime, validate
from converter.equivalence.validate import (
    EquivalenceReport,
    OutputStats,
    check_equivalence,
    default_tolerance,
)
from converter.errors import InputError, OriginalModelError

F, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64


def _model(nodes, inputs, outputs, initializers=None, opset=17) -> onnx.ModelProto:
    """``inputs``/``outputs``: ``(name, elem_type, shape)``; ``initializers``: name -> array."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
        [numpy_helper.from_array(a, n) for n, a in (initializers or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _affine(w: np.ndarray, b: np.ndarray, elem=F) -> onnx.ModelProto:
    """``y = x @ w + b`` with ``x: [batch, in]``."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y"]),
    ]
    return _model(
        nodes,
        [("x", elem, ["batch", w.shape[0]])],
        [("y", elem, ["batch", w.shape[1]])],
        {"w": w, "b": b},
    )


def _two_layers(shift_h: bool = False) -> onnx.ModelProto:
    """``h = x @ w1 + b1; y = h @ w2 + b2``; ``shift_h`` adds 1 to ``h``, compensated in ``y``."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((4, 5)).astype(np.float32)
    w2 = rng.standard_normal((5, 3)).astype(np.float32)
    b1 = rng.standard_normal(5).astype(np.float32) + np.float32(shift_h)
    b2 = rng.standard_normal(3).astype(np.float32) - shift_h * w2.sum(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["y"]),
    ]
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    return _model(nodes, [("x", F, ["batch", 4])], [("y", F, ["batch", 3])], inits)


def _unary(*ops: str, elem=F, shape=("batch", 6)) -> onnx.ModelProto:
    """``y = op_n(...op_1(x))``."""
    names = ["x", *[f"t{i}" for i in range(len(ops) - 1)], "y"]
    nodes = [
        helper.make_node(op, [a], [b]) for op, a, b in zip(ops, names, names[1:], strict=False)
    ]
    return _model(nodes, [("x", elem, list(shape))], [("y", elem, list(shape))])


@pytest.fixture(scope="module")
def linear():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    return w, b


# --------------------------------------------------------------------------- basics


def test_identical_models_pass_with_three_seeded_trials(linear):
    model = _affine(*linear)
    report = check_equivalence(model, model)
    assert isinstance(report, EquivalenceReport) and report.passed
    assert [t["index"] for t in report.trials] == [0, 1, 2] and report.seed == 0
    assert [t["dims"]["batch"] for t in report.trials] == [2, 3, 2]
    assert len(report.results) == 3 and len(report.outputs) == 1
    stats = report.outputs[0]
    assert isinstance(stats, OutputStats) and stats.max_abs_error == 0.0
    assert (stats.atol, stats.rtol, stats.dtype) == (1e-5, 1e-4, "float32")
    text = str(report)
    assert "PASS y" in text and "seed: 0" in text and "trials: 3" in text


def test_report_to_dict_is_json_and_carries_the_statistics(linear):
    data = json.loads(json.dumps(check_equivalence(_affine(*linear), _affine(*linear)).to_dict()))
    assert data["passed"] is True and len(data["results"]) == 3
    keys = {"max_abs_error", "mean_abs_error", "median_abs_error", "p99_abs_error"}
    keys |= {"max_rel_error", "mean_rel_error", "median_rel_error", "p99_rel_error"}
    assert keys | {"worst_index", "atol", "rtol", "shape", "dtype"} <= set(data["outputs"][0])
    assert data["trials"][1]["inputs"]["x"] == {"shape": [3, 4], "dtype": "float32"}


@pytest.mark.parametrize("form", ["path", "proto", "ir"])
def test_accepts_paths_protos_and_ir_models_without_mutating_them(tmp_path, form):
    original, candidate = _two_layers(), _two_layers()

    def as_form(model: onnx.ModelProto, name: str):
        if form == "path":
            onnx.save(model, tmp_path / name)
            return tmp_path / name
        return ir.serde.deserialize_model(model) if form == "ir" else model

    a, b = as_form(original, "a.onnx"), as_form(candidate, "b.onnx")
    report = check_equivalence(a, b, extra_outputs=["h"])
    assert report.passed, str(report)
    if form == "ir":
        assert [v.name for v in a.graph.outputs] == ["y"] == [v.name for v in b.graph.outputs]
    elif form == "proto":
        assert [o.name for o in a.graph.output] == ["y"]
    else:
        assert [o.name for o in onnx.load(a).graph.output] == ["y"]


def test_sessions_are_created_once_per_model(linear, monkeypatch):
    created = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        created.append(kwargs.get("providers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime.ort, "InferenceSession", counting)
    check_equivalence(_affine(*linear), _affine(*linear), trials=5)
    assert created == [["CPUExecutionProvider"]] * 2


def test_comparison_names_stay_importable_from_validate():
    for name in ("OutputStats", "compare_arrays", "default_tolerance"):
        assert getattr(validate, name) is getattr(compare, name), name


# --------------------------------------------------------------------------- failures


def test_a_wrong_bias_is_caught_and_the_output_named(linear):
    w, b = linear
    report = check_equivalence(_affine(w, b), _affine(w, b + np.float32(0.01)))
    assert not report.passed
    stats = report.outputs[0]
    assert not stats.passed and stats.mismatches == stats.size > 0
    assert "beyond tolerance" in stats.reason
    assert stats.candidate_reference_error == pytest.approx(0.01, rel=1e-3)
    assert "FAIL y" in str(report)


def test_shape_mismatch_is_reported_not_broadcast():
    original = _model(
        [helper.make_node("Add", ["x", "zero"], ["y"])],
        [("x", F, ["batch", 3])],
        [("y", F, ["batch", 3])],
        {"zero": np.zeros((1, 3), np.float32)},
    )
    candidate = _model(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[0], keepdims=1)],
        [("x", F, ["batch", 3])],
        [("y", F, [1, 3])],
    )
    report = check_equivalence(original, candidate)
    assert not report.passed
    assert report.results[0].reason == "shape differs: original [2, 3], candidate [1, 3]"


def test_output_names_and_order_are_checked():
    original = _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])],
        [("x", F, ["batch", 3])],
        [("y", F, ["batch", 3]), ("z", F, ["batch", 3])],
    )
    swapped = _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])],
        [("x", F, ["batch", 3])],
        [("z", F, ["batch", 3]), ("y", F, ["batch", 3])],
    )
    renamed = _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["w"])],
        [("x", F, ["batch", 3])],
        [("y", F, ["batch", 3]), ("w", F, ["batch", 3])],
    )
    report = check_equivalence(original, swapped)
    assert not report.passed and "another order" in report.failures[0]
    report = check_equivalence(original, renamed)
    assert not report.passed and "outputs the original does not: w" in report.failures[0]
    assert report.outputs[1].reason == "missing from the candidate"


def test_a_candidate_that_fails_to_run_is_a_failure_not_an_exception():
    candidate = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [("x", F, ["batch", 6])],
        [("y", F, ["batch", 6])],
        {"shape": np.array([5, -1], np.int64)},
    )
    report = check_equivalence(_unary("Identity"), candidate)
    assert not report.passed
    assert any("candidate fails to run on trial 0" in f for f in report.failures)
    assert "Reshape" in report.failures[0]


def test_different_inputs_are_a_failure():
    report = check_equivalence(_unary("Relu"), _unary("Relu", elem=F16))
    assert not report.passed and report.failures[0].startswith("inputs differ")
    assert "x: float16" in report.failures[0]
    assert check_equivalence(_unary("Relu"), _unary("Relu", shape=("N", 6))).passed  # dim names


# --------------------------------------------------------------------------- the original


def _reshape_to(size: int) -> onnx.ModelProto:
    return _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="fixed_reshape")],
        [("x", F, ["n"])],
        [("y", F, [size])],
        {"shape": np.array([size], np.int64)},
    )


def test_an_original_that_fails_on_synthesised_inputs_raises():
    model = _reshape_to(6)
    with pytest.raises(OriginalModelError) as e:
        check_equivalence(model, model)
    message = str(e.value)
    assert "\n" not in message
    for word in ("fixed_reshape", "synthesised", "--input-shape NAME:D1,D2", "--inputs FILE.npz"):
        assert word in message
    assert check_equivalence(model, model, input_shapes={"x": [6]}).passed


def test_scalar_int_inputs_are_named_as_needing_a_real_value():
    nodes = [
        helper.make_node("Unsqueeze", ["n", "zero"], ["n1"]),
        helper.make_node("Concat", ["n1", "seven"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = {"zero": np.array([0], np.int64), "seven": np.array([7], np.int64)}
    model = _model(nodes, [("x", F, [6]), ("n", I64, [])], [("y", F, None)], inits)
    with pytest.raises(OriginalModelError, match="scalar int input 'n' needs a real value"):
        check_equivalence(model, model)


def test_an_original_that_fails_on_given_inputs_raises(tmp_path):
    model = _reshape_to(6)
    np.savez(tmp_path / "in.npz", x=np.ones(5, np.float32))
    with pytest.raises(OriginalModelError, match="given inputs"):
        check_equivalence(model, model, inputs=tmp_path / "in.npz")


# --------------------------------------------------------------------------- tolerances


def _add_constant(c: np.ndarray, elem) -> onnx.ModelProto:
    return _model(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        [("x", elem, ["batch", c.size])],
        [("y", elem, ["batch", c.size])],
        {"c": c},
    )


def test_float16_model_passes_a_tiny_perturbation_and_fails_a_larger_one():
    c = np.linspace(0.3, 0.7, 16).astype(np.float16)
    original = _add_constant(c, F16)
    tiny = check_equivalence(
        original, _add_constant((c + np.float16(1e-3)).astype(np.float16), F16)
    )
    assert tiny.passed, str(tiny)
    assert tiny.outputs[0].dtype == "float16" and tiny.outputs[0].atol == 2.5e-3
    assert tiny.outputs[0].max_abs_error > default_tolerance(np.float32)[0]  # too much for f32
    larger = check_equivalence(
        original, _add_constant((c + np.float16(0.05)).astype(np.float16), F16)
    )
    assert not larger.passed


def test_tolerance_overrides_global_and_per_output(linear):
    w, b = linear
    original, candidate = _affine(w, b), _affine(w, b + np.float32(0.01))
    assert check_equivalence(original, candidate, atol=0.02).passed
    assert check_equivalence(original, candidate, atol={"y": 0.02}).passed
    report = check_equivalence(original, candidate, atol=0.0, rtol=0.0)
    assert report.outputs[0].atol == 0.0 and not report.passed
    with pytest.raises(InputError, match="'nope'"):
        check_equivalence(original, candidate, atol={"nope": 1.0})
    with pytest.raises(InputError, match=">= 0"):
        check_equivalence(original, candidate, rtol=-1.0)


def test_nan_outputs_of_models_compare_equal():
    report = check_equivalence(_unary("Sqrt"), _unary("Identity", "Sqrt"))  # NaN for x < 0
    assert report.passed, str(report)
    assert not check_equivalence(_unary("Sqrt"), _unary("Abs", "Sqrt")).passed


def _to_bfloat16(scale: float) -> onnx.ModelProto:
    """``y = bfloat16(x * scale)``, plus ``z = x`` to feed and return a bfloat16 input."""
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"]),
        helper.make_node("Cast", ["xs"], ["y"], to=TensorProto.BFLOAT16),
        helper.make_node("Identity", ["b"], ["z"]),
    ]
    bf16 = TensorProto.BFLOAT16
    return _model(
        nodes,
        [("x", F, ["batch", 8]), ("b", bf16, ["batch"])],
        [("y", bf16, ["batch", 8]), ("z", bf16, ["batch"])],
        {"s": np.array(scale, np.float32)},
    )


def test_bfloat16_inputs_and_outputs_are_compared():
    report = check_equivalence(_to_bfloat16(1.0), _to_bfloat16(1.001))
    assert report.passed, str(report)
    assert report.outputs[0].dtype == "bfloat16" and report.outputs[0].atol == 2e-2
    assert not check_equivalence(_to_bfloat16(1.0), _to_bfloat16(1.1)).passed


# --------------------------------------------------------------------------- extra outputs


def test_intermediate_values_are_diagnostics_never_the_verdict():
    original, candidate = _two_layers(), _two_layers(shift_h=True)  # same y, different h
    report = check_equivalence(original, candidate, atol=1e-4, extra_outputs=["h"])
    assert report.passed, str(report)
    assert [s.name for s in report.outputs] == ["y"] and report.outputs[0].passed
    (h,) = report.intermediates
    assert h.intermediate and h.measured and not h.passed
    assert h.max_abs_error == pytest.approx(1.0, rel=1e-5)
    assert report.first_divergence is None  # no output failed
    assert "FAIL h (intermediate)" in str(report)
    assert [o.name for o in original.graph.output] == ["y"]


def test_extra_outputs_must_exist_in_the_original_and_are_not_measured_when_absent():
    with pytest.raises(InputError, match="extra output 'nope'"):
        check_equivalence(_two_layers(), _two_layers(), extra_outputs=["nope"])
    merged = _affine(np.eye(4, 3, dtype=np.float32), np.zeros(3, np.float32))  # no 'h'
    report = check_equivalence(_two_layers(), merged, extra_outputs=["h"])
    (h,) = report.intermediates
    assert not h.measured and h.trial == -1
    assert h.reason.startswith("not measured: the value no longer exists in the candidate")
    assert "NOT MEASURED h" in str(report)
    assert json.loads(json.dumps(report.to_dict()))["intermediates"][0]["measured"] is False


def test_first_divergence_names_the_first_intermediate_beyond_tolerance_in_graph_order():
    original = _two_layers()
    candidate = onnx.ModelProto()
    candidate.CopyFrom(original)
    b1 = next(t for t in candidate.graph.initializer if t.name == "b1")
    b1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(b1) + np.float32(0.5), "b1"))
    report = check_equivalence(original, candidate, extra_outputs=["m2", "h", "m1"])
    assert not report.passed and not report.outputs[0].passed
    by_name = {s.name: s for s in report.intermediates}
    assert by_name["m1"].passed and not by_name["h"].passed and not by_name["m2"].passed
    assert report.first_divergence == "h"  # before m2 in the graph, whatever the order given
    assert "first divergence: 'h'" in str(report)


def test_an_extra_output_that_is_already_an_output_is_not_duplicated():
    report = check_equivalence(_two_layers(), _two_layers(), extra_outputs=["y", "h"])
    assert [(s.name, s.intermediate) for s in report.outputs] == [("y", False)]
    assert [(s.name, s.intermediate) for s in report.intermediates] == [("h", True)]


# --------------------------------------------------------------------------- float64 reference


def _cancelling_pair(noise: float) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """``y = [x, x] @ [v + u; -v]`` with |v| >> |u| (large cancellation) and the merged
    ``y = x @ (fl(v + u) - v)``, exact as the float64 sum; ``noise`` spoils the merged weight."""
    n, k = 512, 4
    rng = np.random.default_rng(0)
    v = (rng.standard_normal((n, k)) * 1e3).astype(np.float32)
    u = rng.standard_normal((n, k)).astype(np.float32)
    stacked = np.concatenate([(v + u).astype(np.float32), -v])
    merged = (stacked[:n].astype(np.float64) + stacked[n:]) * (1 + noise)
    io = ([("x", F, ["batch", n])], [("y", F, ["batch", k])])
    original = _model(
        [
            helper.make_node("Concat", ["x", "x"], ["xx"], axis=-1),
            helper.make_node("MatMul", ["xx", "w"], ["y"]),
        ],
        *io,
        {"w": stacked},
    )
    candidate = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], *io, {"w": merged.astype(np.float32)}
    )
    return original, candidate


def test_float64_reference_accepts_a_more_accurate_reassociated_candidate():
    original, candidate = _cancelling_pair(noise=0.0)
    report = check_equivalence(original, candidate)
    assert report.passed, str(report)
    assert report.reference == "used"
    for stats in report.results:
        assert stats.mismatches > 0 and stats.accepted_by_reference  # beyond plain tolerance
        assert stats.candidate_reference_error < stats.original_reference_error
        assert 0 < stats.tolerance_used <= 1  # the share of the float64 allowance used
    assert "fused error" in str(report) and "original error" in str(report)


def test_float64_reference_leaves_the_callers_model_alone():
    original, candidate = _cancelling_pair(noise=0.0)
    model = ir.serde.deserialize_model(original)
    assert check_equivalence(model, candidate).reference == "used"
    assert model.graph.initializers["w"].const_value.dtype == ir.DataType.FLOAT
    assert model.graph.inputs[0].dtype == model.graph.outputs[0].dtype == ir.DataType.FLOAT


def test_float64_reference_does_not_rescue_a_wrong_candidate():
    original, candidate = _cancelling_pair(noise=0.01)
    report = check_equivalence(original, candidate)
    assert not report.passed
    stats = report.outputs[0]
    assert stats.candidate_reference_error > 2 * stats.original_reference_error
    assert stats.tolerance_used > 1 and "more than 2x" in stats.reason


def test_onnx_evaluator_is_the_reference_where_onnxruntime_has_no_float64_kernel():
    report = check_equivalence(_unary("Erf"), _unary("Erf", "Relu"))
    assert not report.passed  # a wrong candidate is not rescued by it
    assert report.reference.startswith("used (onnx's reference evaluator: onnxruntime cannot")
    assert "Erf" in report.reference


def _contrib_gelu(relu: bool = False) -> onnx.ModelProto:
    """onnxruntime's com.microsoft Gelu (float32 only, unknown to onnx's evaluator)."""
    nodes = [
        helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"),
        helper.make_node("Relu" if relu else "Identity", ["g"], ["y"]),
    ]
    model = _model(nodes, [("x", F, ["batch", 6])], [("y", F, ["batch", 6])])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_no_reference_when_neither_onnxruntime_nor_onnx_can_run_it_in_float64():
    report = check_equivalence(_contrib_gelu(), _contrib_gelu(relu=True))
    assert not report.passed
    assert report.reference.startswith("unavailable: onnxruntime cannot build it")
    assert "nor onnx's reference evaluator" in report.reference and "Gelu" in report.reference


def test_float64_reference_of_a_conv_model_runs_in_onnx_with_inference_batchnorm(tmp_path):
    """onnxruntime has no float64 Conv: onnx's evaluator computes it, BatchNormalization in
    inference mode (onnx 1.23's own computes opsets 9-14 as in training)."""
    rng = np.random.default_rng(3)
    inits = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "s": rng.uniform(0.5, 2, 4).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "m": rng.standard_normal(4).astype(np.float32),
        "v": rng.uniform(0.5, 2, 4).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
    ]
    model = _model(nodes, [("x", F, [2, 3, 5, 5])], [("y", F, [2, 4, 5, 5])], inits, opset=14)
    ref = reference.Reference(runtime.load_side(model, "original"), str(tmp_path))
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    (y64,) = ref.run({"x": x}, 0).values()
    (y32,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, y32, rtol=1e-5, atol=1e-5)
    assert ref.note.startswith("used (onnx's reference evaluator") and "Conv" in ref.note


def test_reference_not_built_when_every_output_passes(linear, monkeypatch):
    monkeypatch.setattr(reference, "_float64_model", lambda model: pytest.fail("built"))
    assert check_equivalence(_affine(*linear), _affine(*linear)).reference == "not needed"


# --------------------------------------------------------------------------- real inputs, big files


def test_real_inputs_run_one_trial(linear, tmp_path):
    model = _affine(*linear)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.savez(tmp_path / "in.npz", x=x)
    report = check_equivalence(model, model, inputs=tmp_path / "in.npz", trials=5)
    assert report.passed and len(report.trials) == 1 and report.results[0].shape == (3, 3)
    assert (
        check_equivalence(model, model, inputs={"x": x}).trials[0]["description"] == "real inputs"
    )
    with pytest.raises(InputError, match="'x'"):
        check_equivalence(model, model, inputs={"x": x.astype(np.float64)})


def test_models_with_external_data_and_big_copies_go_through_files(tmp_path, monkeypatch):
    original = _two_layers()
    onnx.save(
        _two_layers(),
        tmp_path / "a.onnx",
        save_as_external_data=True,
        location="a.data",
        size_threshold=0,
    )
    assert check_equivalence(
        tmp_path / "a.onnx", original, extra_outputs=["h"]
    ).passed  # bytes + folder
    monkeypatch.setattr(runtime, "_IN_MEMORY_LIMIT", 0)  # as if the weights were over 1.8 GB
    saved = []
    real_save = ir.save
    monkeypatch.setattr(
        runtime.ir, "save", lambda *a, **k: saved.append(a[1]) or real_save(*a, **k)
    )
    assert check_equivalence(tmp_path / "a.onnx", original, extra_outputs=["h"]).passed
    # The candidate (in memory, changed by extra_outputs) is saved; the original file gets the
    # extra output on its own proto and goes as bytes with its folder for the external data.
    assert [os.path.basename(p) for p in saved] == ["candidate.onnx"]


def test_float64_reference_converts_constants_and_casts():
    def model(constant: onnx.NodeProto) -> onnx.ModelProto:
        nodes = [
            constant,
            helper.make_node("Add", ["x", "c"], ["s"]),
            helper.make_node("Cast", ["s"], ["y"], to=F16),
        ]
        return _model(nodes, [("x", F, ["batch", 4])], [("y", F16, ["batch", 4])])

    original = model(helper.make_node("Constant", [], ["c"], value_float=0.5))
    tensor = numpy_helper.from_array(np.array(0.6, np.float32))
    candidate = model(helper.make_node("Constant", [], ["c"], value=tensor))
    report = check_equivalence(original, candidate)
    assert not report.passed and report.reference == "used", report.reference
    assert (
        report.outputs[0].original_reference_error
        < 1e-2
        < report.outputs[0].candidate_reference_error
    )


# --------------------------------------------------------------------------- shapes and dtypes


def _reductions(offset: float = 0.0) -> onnx.ModelProto:
    """0-d, size-1, empty, int64 and bool outputs of one float input ``x: [batch, 4]``."""
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),  # 0-d
        helper.make_node("Add", ["total", "offset"], ["scalar"]),
        helper.make_node("ReduceMax", ["x"], ["one"], keepdims=1),  # [1, 1]
        helper.make_node("Slice", ["x", "zero", "zero", "one_axis"], ["empty"]),  # [batch, 0]
        helper.make_node("ArgMax", ["x"], ["index"], axis=1, keepdims=0),  # int64 [batch]
        helper.make_node("Greater", ["x", "offset"], ["positive"]),  # bool [batch, 4]
    ]
    inits = {
        "offset": np.array(offset, np.float32),
        "zero": np.array([0], np.int64),
        "one_axis": np.array([1], np.int64),
    }
    outputs = [
        ("scalar", F, []),
        ("one", F, [1, 1]),
        ("empty", F, ["batch", 0]),
        ("index", I64, ["batch"]),
        ("positive", TensorProto.BOOL, ["batch", 4]),
    ]
    return _model(nodes, [("x", F, ["batch", 4])], outputs, inits)


def test_scalar_size_one_empty_int_and_bool_outputs_compare_like_any_other():
    report = check_equivalence(_reductions(), _reductions())
    assert report.passed, str(report)
    shapes = {s.name: (s.shape, s.dtype, s.size) for s in report.results if s.trial == 1}
    assert shapes == {
        "scalar": ((), "float32", 1),
        "one": ((1, 1), "float32", 1),
        "empty": ((3, 0), "float32", 0),
        "index": ((3,), "int64", 3),
        "positive": ((3, 4), "bool", 12),
    }
    assert json.loads(json.dumps(report.to_dict()))["outputs"][0]["shape"] == []


def test_a_scalar_output_beyond_tolerance_fails_and_int_bool_outputs_are_exact():
    report = check_equivalence(_reductions(), _reductions(offset=0.01))
    by_name = {s.name: s for s in report.outputs}
    assert not report.passed
    assert not by_name["scalar"].passed and by_name["scalar"].max_abs_error == pytest.approx(0.01)
    assert by_name["one"].passed and by_name["empty"].passed and by_name["index"].passed
    assert by_name["positive"].atol == by_name["positive"].rtol == 0.0  # bool: exact
    # Integer and bool outputs must be equal, whatever tolerance is asked for.
    ints = check_equivalence(_unary("Neg", elem=I64), _unary("Abs", "Neg", elem=I64), atol=100.0)
    assert ints.passed  # inputs are in [0, 8): Abs changes nothing
    ints = check_equivalence(_unary("Neg", elem=I64), _unary("Identity", elem=I64), atol=100.0)
    assert not ints.passed and "elements differ" in ints.outputs[0].reason
    bools = check_equivalence(
        _unary("Not", elem=TensorProto.BOOL), _unary("Identity", elem=TensorProto.BOOL), atol=1.0
    )
    assert not bools.passed and bools.outputs[0].mismatches == bools.outputs[0].size


def test_a_scalar_intermediate_value_is_measured():
    report = check_equivalence(_reductions(), _reductions(), extra_outputs=["total"])
    (total,) = report.intermediates
    assert total.measured and total.passed and total.shape == ()


def _spy_runs(monkeypatch) -> list[list[str] | None]:
    """Record the output names asked of every onnxruntime run (None: all of them)."""
    calls: list[list[str] | None] = []
    real = runtime.Runner.run

    def run(self, feeds, names=None):
        calls.append(None if names is None else list(names))
        return real(self, feeds, names)

    monkeypatch.setattr(runtime.Runner, "run", run)
    return calls


def test_intermediate_values_are_fetched_in_the_first_trial_only_when_outputs_pass(monkeypatch):
    calls = _spy_runs(monkeypatch)
    report = check_equivalence(_two_layers(), _two_layers(), extra_outputs=["h"])
    assert report.passed
    assert calls == [None, None, ["y"], ["y"], ["y"], ["y"]]  # (original, candidate) per trial
    (h,) = report.intermediates
    assert h.measured and h.passed and h.trial == 0


def test_a_later_trial_that_fails_is_run_again_for_its_intermediate_values(monkeypatch):
    """A candidate that clips ``h`` beyond what inputs in [-1, 1] reach fails only in the
    [-8, 8] trial; that trial is run again with ``h`` to name the first divergence."""
    original = _two_layers()
    inits = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    bound = float((np.abs(inits["w1"]).sum(0) + np.abs(inits["b1"])).max()) + 0.01
    candidate = onnx.ModelProto()
    candidate.CopyFrom(original)
    add = next(n for n in candidate.graph.node if n.output[0] == "h")
    add.output[0] = "h_raw"
    candidate.graph.initializer.extend(
        [numpy_helper.from_array(np.float32(v), n) for n, v in (("lo", -bound), ("hi", bound))]
    )
    candidate.graph.node.insert(2, helper.make_node("Clip", ["h_raw", "lo", "hi"], ["h"]))
    calls = _spy_runs(monkeypatch)
    report = check_equivalence(original, candidate, extra_outputs=["h"])
    assert [s.passed for s in report.outputs] == [False]
    assert {s.trial for s in report.outputs} == {2}  # the worst trial: the only failing one
    # trial 2 runs with the graph outputs, asks the float64 reference (the last None, once),
    # then runs again with every value
    assert calls == [None, None, ["y"], ["y"], ["y"], ["y"], None, None, None]
    (h,) = report.intermediates
    assert not h.passed and h.trial == 2
    assert report.first_divergence == "h"


def _unloadable() -> onnx.ModelProto:
    """A model onnx parses but onnxruntime refuses (an op of a domain it does not know)."""
    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example")
    model = _model([node], [("x", F, ["batch", 4])], [("y", F, ["batch", 4])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def test_an_original_onnxruntime_cannot_load_raises_while_the_candidate_loads():
    """The two sessions are built at once (two threads): the original's error still surfaces
    as OriginalModelError, in one line."""
    with pytest.raises(OriginalModelError, match="onnxruntime cannot load the original model"):
        check_equivalence(_unloadable(), _unary("Relu", shape=("batch", 4)))


def test_a_candidate_onnxruntime_cannot_load_is_a_failure():
    report = check_equivalence(_unary("Relu", shape=("batch", 4)), _unloadable())
    assert not report.passed
    assert any("onnxruntime cannot load the candidate model" in f for f in report.failures)
