"""Several models at once: each file on its own, one row each, one report, the worst exit code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import gemm_node, init, linear_chain, make_model, op_types, rng
from onnx import TensorProto, helper

from converter import batch
from converter.cli import main
from converter.fusion.linear import algebra

MODELS = Path(__file__).resolve().parent.parent / "models"


def _random_output_model() -> onnx.ModelProto:
    """Two Linear layers plus noise from RandomNormal: outputs differ on every run."""
    r = rng(6)
    nodes = [
        gemm_node("fc0", "x", "W0", "b0", "h", transB=1),
        gemm_node("fc1", "h", "W1", "b1", "z", transB=1),
        helper.make_node("RandomNormalLike", ["z"], ["noise"], name="noise"),
        helper.make_node("Add", ["z", "noise"], ["y"], name="add_noise"),
    ]
    inits = [
        init("W0", r.standard_normal((6, 4)).astype(np.float32)),
        init("b0", r.standard_normal(6).astype(np.float32)),
        init("W1", r.standard_normal((5, 6)).astype(np.float32)),
        init("b1", r.standard_normal(5).astype(np.float32)),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])
    return make_model(nodes, [x], [y], inits)


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """good.onnx, unreadable.onnx, random.onnx (not deterministic), wrong.onnx (see below)."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(MODELS / "two_layer.onnx", folder / "good.onnx")
    (folder / "unreadable.onnx").write_bytes(rng(7).bytes(500))
    onnx.save(_random_output_model(), folder / "random.onnx")
    onnx.save(linear_chain([4, 6, 3]), folder / "wrong.onnx")
    return folder


def _wrong_when_three_wide(compose_all):
    """A broken merge for chains ending in 3 features only (wrong.onnx): validation catches it."""

    def compose(maps):
        merged = compose_all(maps)
        if merged.out_features != 3:
            return merged
        return algebra.AffineMap(merged.weight, merged.bias + 0.5)

    return compose


def test_a_folder_of_mixed_models(mixed, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(algebra, "compose_all", _wrong_when_three_wide(algebra.compose_all))
    out, report = tmp_path / "out", tmp_path / "batch.json"
    out.mkdir()
    sources = [str(p) for p in sorted(mixed.iterdir())]
    assert main([*sources, "-o", f"{out}/", "--report", str(report)]) == 2  # the worst
    text = capsys.readouterr().out.splitlines()
    rows = {Path(line.split()[0]).name: line for line in text[1:-1]}
    assert "ok" in rows["good.onnx"] and "2 -> 1" in rows["good.onnx"]
    assert "bad input" in rows["unreadable.onnx"] and "not an ONNX model" in rows["unreadable.onnx"]
    assert "not deterministic: RandomNormalLike 'noise'" in rows["random.onnx"]
    assert "validation failed" in rows["wrong.onnx"]
    assert text[-1].startswith("total: 4 file(s)") and "1 ok, 3 failed" in text[-1]
    assert [p.name for p in out.iterdir()] == ["good.onnx"]
    assert op_types(onnx.load(out / "good.onnx")) == ["Gemm"]
    data = json.loads(report.read_text())
    codes = {Path(f["source"]).name: f["exit_code"] for f in data["files"]}
    assert codes == {"good.onnx": 0, "random.onnx": 2, "unreadable.onnx": 2, "wrong.onnx": 1}
    assert data["exit_code"] == 2 and data["totals"]["ok"] == 1


def test_validation_failure_alone_exits_1(mixed, tmp_path, monkeypatch):
    monkeypatch.setattr(algebra, "compose_all", _wrong_when_three_wide(algebra.compose_all))
    out = tmp_path / "out"
    out.mkdir()
    sources = [str(mixed / "good.onnx"), str(mixed / "wrong.onnx")]
    assert main([*sources, "-o", str(out), "-q"]) == 1


def test_a_process_pool_gives_the_same_results(mixed, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    sources = sorted(mixed.iterdir())
    result = batch.fuse_files(sources, out, jobs=2)
    assert [Path(f.source).name for f in result.files] == [p.name for p in sources]
    codes = {Path(f.source).name: f.exit_code for f in result.files}
    assert codes == {"good.onnx": 0, "random.onnx": 2, "unreadable.onnx": 2, "wrong.onnx": 0}
    assert sorted(p.name for p in out.iterdir()) == ["good.onnx", "wrong.onnx"]


def test_two_sources_with_one_name_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        shutil.copy(MODELS / "two_layer.onnx", tmp_path / d / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    assert main([str(tmp_path / "a/m.onnx"), str(tmp_path / "b/m.onnx"), "-o", str(out)]) == 2
    assert "would both be written to" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_several_models_need_an_output_folder(tmp_path, capsys):
    two = str(MODELS / "two_layer.onnx")
    assert main([two, two, "-o", str(tmp_path / "file.onnx")]) == 2
    assert "-o must be an existing folder" in capsys.readouterr().err


def _many_chains(chains: int, seed: int) -> onnx.ModelProto:
    """``chains`` independent ``Gemm -> Gemm -> Relu`` joined by a Concat: seconds to validate."""
    r = rng(seed)
    nodes, inits, outs = [], [], []
    for i in range(chains):
        for k in range(2):
            w, b = f"W{i}_{k}", f"b{i}_{k}"
            inits += [init(w, r.standard_normal((4, 4)).astype(np.float32))]
            inits += [init(b, r.standard_normal(4).astype(np.float32))]
            nodes.append(
                gemm_node(
                    f"fc{i}_{k}",
                    "x" if k == 0 else f"h{i}",
                    w,
                    b,
                    f"h{i}" if k == 0 else f"g{i}",
                    transB=1,
                )
            )
        nodes.append(helper.make_node("Relu", [f"g{i}"], [f"r{i}"], name=f"act{i}"))
        outs.append(f"r{i}")
    nodes.append(helper.make_node("Concat", outs, ["y"], axis=1, name="concat"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4 * chains])
    return make_model(nodes, [x], [y], inits)


def test_sigterm_stops_the_pool_workers_and_leaves_nothing(tmp_path):
    """SIGTERM to the batch command while its workers write: each removes its temporary output,
    the command exits 143 and the output folder stays empty."""
    sources = tmp_path / "in"
    sources.mkdir()
    for name, seed in (("a.onnx", 1), ("b.onnx", 2)):
        onnx.save(_many_chains(3000, seed), sources / name)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("ONNX_FUSE_CHECK_EVERY_REWRITE", None)  # a whole-model check per merge: minutes here
    command = [sys.executable, "-m", "converter", *map(str, sorted(sources.iterdir()))]
    proc = subprocess.Popen(
        [*command, "-o", str(out), "--jobs", "2", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        while not any(p.name.startswith(".onnx-fuse-") for p in out.iterdir()):
            if proc.poll() is not None:  # a worker's temporary folder never appeared
                pytest.fail(f"finished before any worker wrote: {proc.communicate()}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    assert list(out.iterdir()) == []
