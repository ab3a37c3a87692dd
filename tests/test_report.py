"""The summary the command prints: totals, and with --verbose every merge, its note and reasons."""

from __future__ import annotations

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
