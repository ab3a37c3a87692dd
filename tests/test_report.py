"""The summary the command prints: totals, and with --verbose every merge, its note and reasons."""

from __future__ import annotations

from converter.equivalence.timing import BenchmarkResult
from converter.report import Declined, FusionRecord, FusionReport


def _record(note: str | None) -> FusionRecord:
    return FusionRecord(
        nodes=["conv", "t", "fc"],
        op_types=["Conv", "Transpose", "MatMul"],
        new_nodes=["fused"],
        graph="main graph",
        output="y",
        widths=[8, 8, 8],
        input_shape=None,
        output_shape=None,
        macs_before=128,
        macs_after=64,
        params_before=144,
        params_after=72,
        note=note,
    )


def test_verbose_prints_each_merge_with_its_note_and_each_reason():
    report = FusionReport(fusions=[_record("1x1 Conv 'conv' moved past the Transpose")])
    report.declined.append(Declined(["a", "b"], "cost model: no", "main graph"))
    lines = report.summary_lines(verbose=True)
    merged = next(i for i, line in enumerate(lines) if line.startswith("  merged [conv"))
    assert lines[merged + 1] == "    1x1 Conv 'conv' moved past the Transpose"
    assert "  not merged [a, b] in main graph: cost model: no" in lines
    assert not any("moved past" in line for line in report.summary_lines(verbose=False))


def test_a_merge_without_note_prints_one_line():
    lines = FusionReport(fusions=[_record(None)]).summary_lines(verbose=True)
    merged = [line for line in lines if line.startswith("  merged [")]
    assert len(merged) == 1 and not any(line.startswith("    ") for line in lines)


def test_record_to_dict_copies_lists_and_adds_macs_saved():
    record = _record(None)
    d = record.to_dict()
    assert d["macs_saved"] == 64 and d["nodes"] == ["conv", "t", "fc"]
    d["nodes"].append("x")
    assert record.nodes == ["conv", "t", "fc"]  # a copy, not the record's own list


def test_rewrites_for_the_runtime_count_as_a_change_and_are_listed():
    line = "main graph: GELU at 'g' reordered as x * (1 + erf(x / sqrt 2)) * 0.5"
    report = FusionReport(runtime_rewrites=[line])
    assert report.modified and report.to_dict()["runtime_rewrites"] == [line]
    quiet = report.summary_lines()
    assert (
        "  for the runtime 1 pattern(s) (GELU, RMSNorm) written in the order onnxruntime fuses "
        "into one kernel"
    ) in quiet
    assert f"  {line}" not in quiet and f"  {line}" in report.summary_lines(verbose=True)
    assert not FusionReport().modified


def test_validation_in_float32_is_said_and_verbose_says_why():
    why = "bfloat16 computed in float32: onnxruntime cannot run the original model in bfloat16 (no Mul)"
    report = FusionReport(fusions=[_record(None)], validated=True, validation={"widened": why})
    assert "  validation      passed (bfloat16 computed in float32)" in report.summary_lines()
    assert f"  validation      passed ({why})" in report.summary_lines(verbose=True)
    plain = FusionReport(fusions=[_record(None)], validated=True, validation={"widened": ""})
    assert "  validation      passed" in plain.summary_lines()


def test_a_benchmark_adds_its_lines_and_its_dict():
    result = BenchmarkResult(
        original_ms=2.0,
        candidate_ms=1.0,
        ratio=0.5,
        noise=0.01,
        slower=False,
        threads=4,
        provider="CPUExecutionProvider",
        rounds=9,
        runs_per_round=3,
        kernels_before={"Gelu": 2},
        kernels_after={"Gelu": 2},
    )
    report = FusionReport(fusions=[_record(None)], benchmark=result)
    lines = report.summary_lines()
    assert "  latency under onnxruntime CPU (4 threads): 2 ms -> 1 ms (0.50x)" in lines
    assert not any("fused kernels" in line for line in lines)  # the same: said only with -v
    verbose = report.summary_lines(verbose=True)
    assert "  fused kernels under onnxruntime: Gelu 2 -> 2" in verbose
    assert report.to_dict()["benchmark"]["kernels_after"] == {"Gelu": 2}
    assert FusionReport().to_dict()["benchmark"] is None
