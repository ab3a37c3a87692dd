"""The ``onnx-fuse`` command as a user runs it: summaries, reports, exit codes, one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import assert_same_graph, linear_chain, op_types

from converter.cli import main
from converter.fusion.linear import algebra

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture
def two_layer(tmp_path: Path) -> Path:
    src = tmp_path / "two_layer.onnx"
    shutil.copy(MODELS / "two_layer.onnx", src)
    return src


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fuses_validates_and_summarises(two_layer, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    before = digest(two_layer)
    assert main([str(two_layer), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "merged 1 chain(s)" in text
    assert "linear ops      2 -> 1" in text
    assert "validation      passed" in text
    assert op_types(onnx.load(out)) == ["Gemm"]
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert digest(two_layer) == before


def test_report_json_has_one_record_per_fusion(two_layer, tmp_path):
    report_path = tmp_path / "report.json"
    code = main([str(two_layer), "-o", str(tmp_path / "o.onnx"), "--report", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    (record,) = report["fusions"]
    assert record["nodes"] == ["/0/Gemm", "/1/Gemm"]
    assert record["macs_saved"] == 16 * 32 + 32 * 8 - 16 * 8
    assert record["input_shape"] == ["batch", 16] and record["output_shape"] == ["batch", 8]
    assert record["max_error"] is not None and record["max_error"] < 1e-5
    assert report["validated"] is True and report["linear_ops_after"] == 1


def test_verbose_says_why_the_low_rank_pair_stays(tmp_path, capsys):
    code = main([str(MODELS / "low_rank.onnx"), "-o", str(tmp_path / "o.onnx"), "--verbose"])
    assert code == 0
    text = capsys.readouterr().out
    assert "merged 0 chain(s)" in text
    assert "cost model: merging widths 256->16->256" in text
    assert "validation      skipped" in text  # nothing merged: nothing to prove


def test_nothing_to_fuse_writes_an_equal_model(tmp_path):
    out = tmp_path / "o.onnx"
    assert main([str(MODELS / "relu_mlp.onnx"), "-o", str(out), "-q"]) == 0
    original, written = onnx.load(MODELS / "relu_mlp.onnx"), onnx.load(out)
    assert op_types(written) == op_types(original)
    assert_same_graph(original, written)


def test_default_output_name_and_policy_always(tmp_path):
    src = tmp_path / "low_rank.onnx"
    shutil.copy(MODELS / "low_rank.onnx", src)
    assert main([str(src), "--policy", "always", "-q"]) == 0
    assert op_types(onnx.load(tmp_path / "low_rank.fused.onnx")) == ["Gemm"]


def _wrong_bias(compose_all):
    """A broken merge: the right weight with the bias off by 0.5, for validation to catch."""

    def wrong_bias(maps):
        merged = compose_all(maps)
        return algebra.AffineMap(merged.weight, merged.bias + 0.5)

    return wrong_bias


def test_validation_failure_exits_1_and_writes_nothing(two_layer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(algebra, "compose_all", _wrong_bias(algebra.compose_all))
    out = tmp_path / "out.onnx"
    assert main([str(two_layer), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "validation failed" in err and "output '" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two_layer.onnx"]


def test_no_validate_skips_the_check(two_layer, tmp_path, capsys):
    assert main([str(two_layer), "-o", str(tmp_path / "o.onnx"), "--no-validate"]) == 0
    assert "validation      skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: [str(d / "missing.onnx"), "-o", str(d / "o.onnx")], "missing.onnx"),
        (lambda d: [str(MODELS / "two_layer.onnx"), "-o", str(d / "nodir" / "o.onnx")], "nodir"),
        (lambda d: [str(MODELS / "two_layer.onnx"), "--policy", "greedy"], "greedy"),
        (lambda d: [str(MODELS / "two_layer.onnx"), "--input-shape", "x=1"], "--input-shape"),
        (lambda d: [], "model"),
    ],
)
def test_bad_usage_and_input_exit_2_with_one_line(tmp_path, capsys, make_args, message):
    assert main(make_args(tmp_path)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-fuse: error:")
    assert message in lines[0]
    assert "Traceback" not in captured.err


def test_garbage_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    assert main([str(bad), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "bad.onnx" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_existing_output_needs_force(two_layer, tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    assert main([str(two_layer), "-o", str(out), "-q"]) == 2
    assert out.read_bytes() == b"keep me"
    assert main([str(two_layer), "-o", str(out), "-q", "--force"]) == 0
    assert op_types(onnx.load(out)) == ["Gemm"]


def test_check_subcommand(tmp_path, capsys):
    a = tmp_path / "a.onnx"
    b = tmp_path / "b.onnx"
    onnx.save(linear_chain([4, 6, 3], seed=1), a)
    onnx.save(linear_chain([4, 6, 3], seed=1), b)
    assert main(["check", str(a), str(b)]) == 0
    onnx.save(linear_chain([4, 6, 3], seed=2), b)
    report = tmp_path / "check.json"
    assert main(["check", str(a), str(b), "--report", str(report)]) == 1
    assert "y" in capsys.readouterr().out
    assert json.loads(report.read_text())["passed"] is False


def test_python_dash_m_runs_the_same_command(two_layer, tmp_path):
    out = tmp_path / "o.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "converter", str(two_layer), "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged 1 chain(s)" in proc.stdout
    assert out.exists()


def _bad_inputs(d: Path) -> dict[str, Path]:
    """Every kind of bad input the issue lists, as files in ``d``."""
    good = linear_chain([4, 6, 3])
    cases = {}
    cases["empty"] = d / "empty.onnx"
    cases["empty"].write_bytes(b"")
    cases["random"] = d / "random.onnx"
    cases["random"].write_bytes(np.random.default_rng(1).bytes(4096))
    cases["text"] = d / "text.onnx"
    cases["text"].write_text("this is not a model\n" * 20)
    cases["truncated"] = d / "truncated.onnx"
    cases["truncated"].write_bytes(good.SerializeToString()[:-37])
    cases["not_a_model"] = d / "tensor.onnx"
    cases["not_a_model"].write_bytes(onnx.numpy_helper.from_array(np.ones(8)).SerializeToString())
    old = linear_chain([4, 6, 3])
    old.opset_import[0].version = 1
    cases["old_opset"] = d / "old_opset.onnx"
    cases["old_opset"].write_bytes(old.SerializeToString())
    external = linear_chain([4, 6, 3])
    onnx.save(
        external, d / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0
    )
    (d / "ext.data").unlink()
    cases["missing_external_data"] = d / "ext.onnx"
    hostile = linear_chain([4, 6, 3])
    tensor = hostile.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/passwd")
    cases["path_traversal"] = d / "hostile.onnx"
    cases["path_traversal"].write_bytes(hostile.SerializeToString())
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "random",
        "text",
        "truncated",
        "not_a_model",
        "old_opset",
        "missing_external_data",
        "path_traversal",
    ],
)
def test_every_bad_input_exits_2_one_line_input_unchanged_nothing_left(tmp_path, capsys, case):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = _bad_inputs(src_dir)[case]
    before = {p.name: p.read_bytes() for p in src_dir.iterdir()}
    assert main([str(src), "-o", str(out_dir / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert src.name in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in src_dir.iterdir()} == before
    assert list(out_dir.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "converter", str(tmp_path / "missing.onnx"), "--debug"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_output_over_input_needs_force_and_stays_atomic(two_layer, capsys):
    before = two_layer.read_bytes()
    assert main([str(two_layer), "-o", str(two_layer)]) == 2
    assert "--force" in capsys.readouterr().err
    assert two_layer.read_bytes() == before
    assert main([str(two_layer), "-o", str(two_layer), "--force", "-q"]) == 0
    assert op_types(onnx.load(two_layer)) == ["Gemm"]
    assert sorted(p.name for p in two_layer.parent.iterdir()) == ["two_layer.onnx"]


def test_keep_on_fail_writes_the_differing_model(two_layer, tmp_path, monkeypatch):
    monkeypatch.setattr(algebra, "compose_all", _wrong_bias(algebra.compose_all))
    out = tmp_path / "out.onnx"
    assert main([str(two_layer), "-o", str(out), "--keep-on-fail", "-q"]) == 1
    assert op_types(onnx.load(out)) == ["Gemm"]


def test_report_in_a_missing_folder_is_refused_before_any_work(two_layer, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    args = [str(two_layer), "-o", str(out), "--report", str(tmp_path / "no" / "r.json")]
    assert main(args) == 2
    assert "report's folder does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("onnx-fuse 0.")
