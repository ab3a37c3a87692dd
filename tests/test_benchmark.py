"""``--benchmark`` and ``benchmark=``: the latency before -> after in the summary, the report and
the API results, on the inputs validation used; the warnings; refused options (issue 18).

Timing runs for real (with a budget of a tenth of a second) or, where a verdict is tested, from a
fake measurement; no test asserts a speed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import linear_chain
from onnx import TensorProto, helper, numpy_helper

import converter
from converter.cli import main
from converter.equivalence import inputs, timing
from converter.equivalence.timing import BenchmarkOptions, BenchmarkResult, Timing

MODELS = Path(__file__).resolve().parent.parent / "models"
LATENCY = re.compile(
    r"^  latency under onnxruntime CPU \((\d+) threads?\): [\d.]+ ms -> [\d.]+ ms \((\d+\.\d\d)x\)$",
    re.M,
)


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Real timing within a tenth of a second; ``quick.feeds`` holds what each benchmark fed."""
    real, fed = timing.measure, []
    real_benchmark = timing.benchmark

    def measure(runs, *, budget, timer=None):
        return real(runs, budget=min(budget, 0.1))

    def benchmark(original, candidate, feeds, options=None, **kwargs):
        fed.append({k: np.asarray(v).copy() for k, v in feeds.items()})
        return real_benchmark(original, candidate, feeds, options, **kwargs)

    monkeypatch.setattr(timing, "measure", measure)
    monkeypatch.setattr(timing, "benchmark", benchmark)
    return fed


@pytest.fixture
def four_layer(tmp_path) -> Path:
    src = tmp_path / "four_layer.onnx"
    shutil.copy(MODELS / "four_layer.onnx", src)
    return src


def _slower(monkeypatch) -> None:
    """A measurement in which the candidate takes 1.5x the original's time, without noise."""
    monkeypatch.setattr(timing, "measure", lambda runs, **_: Timing((1e-3, 1e-3, 1.5e-3), 30, 4))


# --------------------------------------------------------------------------- the command


def test_benchmark_prints_the_latency_line_and_writes_it_in_the_report(
    four_layer, tmp_path, capsys
):
    report_path = tmp_path / "report.json"
    args = [
        str(four_layer),
        "-o",
        str(tmp_path / "o.onnx"),
        "--benchmark",
        "--report",
        str(report_path),
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    (match,) = LATENCY.finditer(captured.out)
    assert match.group(1) == "1" and captured.err == ""
    data = json.loads(report_path.read_text())["benchmark"]
    assert f"{data['ratio']:.2f}" == match.group(2)
    assert data["ratio"] == pytest.approx(data["candidate_ms"] / data["original_ms"])
    assert (data["threads"], data["provider"], data["slower"]) == (1, "CPUExecutionProvider", False)
    assert data["rounds"] >= timing.MIN_ROUNDS and data["noise"] >= 0
    assert data["kernels_before"] == data["kernels_after"] == {}
    assert data["inputs"] == "uniform[-1,1], sizes A (batch=2)"  # validation's first trial


def test_without_benchmark_nothing_is_timed(four_layer, tmp_path, capsys, quick):
    report_path = tmp_path / "report.json"
    assert (
        main([str(four_layer), "-o", str(tmp_path / "o.onnx"), "--report", str(report_path)]) == 0
    )
    assert "latency" not in capsys.readouterr().out and quick == []
    assert json.loads(report_path.read_text())["benchmark"] is None


def test_the_benchmark_feeds_what_validation_fed_first(four_layer, tmp_path, quick):
    assert (
        main([str(four_layer), "-o", str(tmp_path / "o.onnx"), "--benchmark", "--seed", "7", "-q"])
        == 0
    )
    (fed,) = quick
    expected = inputs.synthesize_inputs(ir.load(four_layer), trial=0, seed=7).values
    np.testing.assert_array_equal(fed["x"], expected["x"])


def test_unvalidated_benchmark_synthesises_inputs_the_same_way_with_the_given_shape(
    four_layer, tmp_path, quick, capsys
):
    args = [str(four_layer), "-o", str(tmp_path / "o.onnx"), "--no-validate", "--benchmark"]
    assert main([*args, "--input-shape", "x:5,64"]) == 0
    assert "validation      skipped" in capsys.readouterr().out
    (fed,) = quick
    expected = inputs.synthesize_inputs(ir.load(four_layer), input_shapes={"x": [5, 64]})
    assert fed["x"].shape == (5, 64)
    np.testing.assert_array_equal(fed["x"], expected.values["x"])


def test_benchmark_with_real_inputs_feeds_them(four_layer, tmp_path, quick):
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    args = [
        str(four_layer),
        "-o",
        str(tmp_path / "o.onnx"),
        "--benchmark",
        "--inputs",
        str(tmp_path / "x.npz"),
    ]
    assert main([*args, "-q"]) == 0
    np.testing.assert_array_equal(quick[0]["x"], x)


def _warnings(caplog) -> list[str]:
    """What the library logged at WARNING (the command prints it on stderr as one line)."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_slower_fused_model_is_one_warning_and_exit_0(
    four_layer, tmp_path, capsys, caplog, monkeypatch
):
    _slower(monkeypatch)
    assert main([str(four_layer), "-o", str(tmp_path / "o.onnx"), "--benchmark"]) == 0
    assert "(1.50x)" in capsys.readouterr().out
    (line,) = _warnings(caplog)
    assert line.startswith("benchmark: the fused model is slower than the original")
    assert "1.50x its latency" in line and "\n" not in line and (tmp_path / "o.onnx").exists()


def test_a_faster_fused_model_warns_nothing(four_layer, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(timing, "measure", lambda runs, **_: Timing((1e-3, 1e-3, 0.9e-3), 30, 4))
    assert main([str(four_layer), "-o", str(tmp_path / "o.onnx"), "--benchmark", "-q"]) == 0
    assert _warnings(caplog) == []


def test_a_model_onnxruntime_cannot_time_is_one_line_on_stderr_and_exit_0(tmp_path):
    """End to end, in a process of its own: a bfloat16 model (validated in float32) cannot be
    timed by onnxruntime's CPU provider; the fused model is written, the reason is one line."""
    rng = np.random.default_rng(0)
    bf16 = TensorProto.BFLOAT16
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(ml_dtypes.bfloat16), name)
        for name, shape in (("w1", (8, 16)), ("w2", (16, 4)))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", bf16, ["batch", 8])],
        [helper.make_tensor_value_info("y", bf16, ["batch", 4])],
        weights,
    )
    src, out = tmp_path / "bf16.onnx", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), src)
    command = [sys.executable, "-m", "converter", str(src), "-o", str(out), "--benchmark", "-q"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout == "" and out.exists()
    assert proc.stderr.startswith(
        "onnx-fuse: benchmark skipped: onnxruntime CPU cannot run the original model ("
    )
    assert len(proc.stderr.strip().splitlines()) == 1 and "MatMul" in proc.stderr


def test_threads_are_passed_and_printed(four_layer, tmp_path, capsys):
    args = [
        str(four_layer),
        "-o",
        str(tmp_path / "o.onnx"),
        "--benchmark",
        "--benchmark-threads",
        "2",
    ]
    assert main(args) == 0
    (match,) = LATENCY.finditer(capsys.readouterr().out)
    assert match.group(1) == "2"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--benchmark", "--benchmark-provider", "NoSuchExecutionProvider"], "available: "),
        (["--benchmark", "--benchmark-threads", "0"], "--benchmark-threads must be at least 1"),
        (["--benchmark-threads", "2"], "go with --benchmark"),
    ],
)
def test_bad_benchmark_options_exit_2_in_one_line_before_any_work(
    four_layer, tmp_path, capsys, extra, message
):
    out = tmp_path / "o.onnx"
    assert main([str(four_layer), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_check_benchmarks_the_two_models(four_layer, tmp_path, capsys):
    fused = tmp_path / "fused.onnx"
    converter.fuse_file(four_layer, fused)
    report_path = tmp_path / "check.json"
    assert (
        main(["check", str(four_layer), str(fused), "--benchmark", "--report", str(report_path)])
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(
        r"^latency under onnxruntime CPU \(1 thread\): .+ ms \(\d\.\d\dx\)$", out, re.M
    )
    assert "noise" in out and json.loads(report_path.read_text())["benchmark"]["rounds"] > 0


def test_check_refuses_an_unavailable_provider(four_layer, capsys):
    args = ["check", str(four_layer), str(four_layer), "--benchmark", "--benchmark-provider", "X"]
    assert main(args) == 2
    assert "benchmark provider 'X' is not available" in capsys.readouterr().err


def test_several_models_are_benchmarked_one_by_one_and_not_in_parallel(
    four_layer, tmp_path, capsys
):
    two = tmp_path / "two_layer.onnx"
    shutil.copy(MODELS / "two_layer.onnx", two)
    out = tmp_path / "out"
    out.mkdir()
    assert main([str(four_layer), str(two), "-o", str(out), "--benchmark", "--jobs", "2"]) == 2
    assert "--jobs 1" in capsys.readouterr().err and list(out.iterdir()) == []
    assert main([str(four_layer), str(two), "-o", str(out), "--benchmark"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "validated" in line]
    assert len(rows) == 2 and all(re.search(r"validated, latency \d\.\d\dx", r) for r in rows)


def test_a_benchmark_that_cannot_run_is_a_warning_not_a_failure(
    tmp_path, capsys, caplog, monkeypatch
):
    def cannot(*args, **kwargs):
        raise converter.InputError("onnxruntime CPU cannot run the original model (no kernel)")

    monkeypatch.setattr(timing, "benchmark", cannot)
    src = tmp_path / "m.onnx"
    onnx.save(linear_chain([8, 16, 4]), src)
    assert main([str(src), "-o", str(tmp_path / "o.onnx"), "--benchmark"]) == 0
    assert _warnings(caplog) == [
        "benchmark skipped: onnxruntime CPU cannot run the original model (no kernel)"
    ]
    assert "latency" not in capsys.readouterr().out and (tmp_path / "o.onnx").exists()


# --------------------------------------------------------------------------- the API


def test_fuse_file_puts_a_benchmark_result_on_the_report(four_layer, tmp_path):
    report = converter.fuse_file(
        four_layer, tmp_path / "o.onnx", benchmark=BenchmarkOptions(threads=1)
    )
    assert isinstance(report.benchmark, BenchmarkResult)
    assert report.benchmark.ratio == pytest.approx(
        report.benchmark.candidate_ms / report.benchmark.original_ms
    )
    assert report.to_dict()["benchmark"] == report.benchmark.to_dict()
    json.dumps(report.to_dict())
    assert any(
        line.startswith("  latency under onnxruntime CPU") for line in report.summary_lines()
    )
    assert any(line.startswith("  benchmark: ") for line in report.summary_lines(verbose=True))


def test_fuse_file_benchmarks_a_model_with_nothing_to_merge(tmp_path):
    report = converter.fuse_file(MODELS / "relu_mlp.onnx", tmp_path / "o.onnx", benchmark=True)
    assert not report.fusions and report.benchmark is not None and report.validated is None


def test_check_equivalence_puts_a_benchmark_result_on_its_report(four_layer, tmp_path):
    model = onnx.load(four_layer)
    report = converter.check_equivalence(model, four_layer, benchmark=True)
    assert report.passed and isinstance(report.benchmark, BenchmarkResult)
    assert report.to_dict()["benchmark"]["inputs"] == "uniform[-1,1], sizes A (batch=2)"
    assert converter.check_equivalence(model, four_layer).benchmark is None


def test_a_candidate_that_does_not_load_is_not_benchmarked(four_layer, tmp_path, quick):
    broken = linear_chain([64, 32])
    broken.graph.node[0].op_type = "Frobnicate"
    path = tmp_path / "broken.onnx"
    onnx.save(broken, path)
    report = converter.check_equivalence(four_layer, path, benchmark=True)
    assert not report.passed and report.benchmark is None and quick == []
