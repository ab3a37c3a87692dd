"""The rough edges a new user hit (issue 13), one test each: each failed before the fix."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import gemm_node, init, linear_chain, make_model, op_types, rng
from onnx import TensorProto, helper

from converter.cli import main
from converter.model_io import files

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


@pytest.fixture
def two_layer(tmp_path: Path) -> Path:
    src = tmp_path / "two_layer.onnx"
    shutil.copy(MODELS / "two_layer.onnx", src)
    return src


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnx-fuse: error:"), err
    return err[0]


# ---------------------------------------------------------------- destinations


def test_force_only_replaces_regular_files(two_layer, tmp_path, capsys):
    # A FIFO stands for /dev/null and other special files: a test that failed on /dev/null
    # itself would replace the machine's /dev/null with a model.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert main([str(two_layer), "-o", str(fifo), "--force"]) == 2
    assert "not a regular file" in _one_error_line(capsys)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "two_layer.onnx"]


def test_dash_as_output_is_refused_not_written_as_a_file(two_layer, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(two_layer), "-o", "-"]) == 2
    assert "stdout" in _one_error_line(capsys)
    assert not (tmp_path / "-").exists()


# ---------------------------------------------------------------- check


def test_check_names_differing_inputs_first_and_matches_by_position(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(linear_chain([4, 6, 3], seed=1), a)
    renamed = linear_chain([4, 6, 3], seed=1)
    renamed.graph.input[0].name = "input_0"
    renamed.graph.node[0].input[0] = "input_0"
    onnx.save(renamed, b)
    assert main(["check", str(a), str(b)]) == 2
    line = _one_error_line(capsys)
    assert "input names differ: " in line and "['x']" in line and "['input_0']" in line
    assert "--match-inputs position" in line
    assert main(["check", str(a), str(b), "--match-inputs", "position", "-q"]) == 0


def test_strict_requires_bit_exact_outputs(tmp_path, capsys):
    src = tmp_path / "four_layer.onnx"
    shutil.copy(MODELS / "four_layer.onnx", src)
    out = tmp_path / "o.onnx"
    assert main([str(src), "-o", str(out), "-q"]) == 0  # within tolerance, not bit-exact
    assert main(["check", str(src), str(out), "--strict"]) == 1
    assert "not bit-exact (--strict)" in capsys.readouterr().out
    assert main(["check", str(src), str(src), "--strict", "-q"]) == 0
    assert main([str(src), "-o", str(tmp_path / "strict.onnx"), "--strict"]) == 1
    assert "not bit-exact" in capsys.readouterr().err
    assert not (tmp_path / "strict.onnx").exists()


def test_inputs_file_that_is_not_an_npz_says_so(two_layer, tmp_path, capsys):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((2, 16), np.float32))
    for bad in (npy, two_layer):
        assert main([str(two_layer), "-o", str(tmp_path / "o.onnx"), "--inputs", str(bad)]) == 2
        line = _one_error_line(capsys)
        assert "not an .npz file" in line and "allow_pickle" not in line
        assert main(["check", str(two_layer), str(two_layer), "--inputs", str(bad)]) == 2
        assert "not an .npz file" in _one_error_line(capsys)


# ---------------------------------------------------------------- summaries


def _initializers_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """What ``torch.onnx.export(..., keep_initializers_as_inputs=True)`` writes."""
    for tensor in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        )
    return model


def test_initializers_as_inputs_count_one_chain_once(tmp_path, capsys):
    src = tmp_path / "kiai.onnx"
    onnx.save(_initializers_as_inputs(onnx.load(MODELS / "two_layer.onnx")), src)
    assert main([str(src), "-o", str(tmp_path / "o.onnx")]) == 0
    text = capsys.readouterr().out
    assert "1 chain(s) declined" in text and "is a graph input" in text
    assert "2 chain(s)" not in text


def test_partial_merge_never_names_a_node_merged_and_not_merged(tmp_path):
    from builders import fuse_with_report

    _, report = fuse_with_report(linear_chain([8, 8, 8, 2, 8]))
    merged = {n for r in report.fusions for n in r.nodes}
    declined = {n for d in report.declined for n in d.nodes}
    assert merged == {"fc0", "fc1", "fc2"}
    assert not merged & declined, f"named both merged and not merged: {merged & declined}"


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("relu_mlp", "no two linear ops with constant weights follow each other"),
        ("low_rank", "1 chain(s), all declined by the cost model: see --verbose"),
    ],
)
def test_nothing_to_merge_says_why_and_copies_the_file_byte_for_byte(
    tmp_path, capsys, model, reason
):
    out = tmp_path / "o.onnx"
    assert main([str(MODELS / f"{model}.onnx"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"nothing merged: {reason}" in text
    assert out.read_bytes() == (MODELS / f"{model}.onnx").read_bytes()


def test_summary_says_macs_per_row(two_layer, tmp_path, capsys):
    assert main([str(two_layer), "-o", str(tmp_path / "o.onnx")]) == 0
    text = capsys.readouterr().out
    assert "MACs per row    768 -> 128" in text and "per row of the last axis" in text
    assert "per sample" not in text


# ---------------------------------------------------------------- determinism


def _training_dropout_model() -> onnx.ModelProto:
    """Two Linear layers then Dropout left in training mode (a torch export before .eval())."""
    r = rng(5)
    nodes = [
        gemm_node("fc0", "x", "W0", "b0", "h", transB=1),
        gemm_node("fc1", "h", "W1", "b1", "d", transB=1),
        helper.make_node("Dropout", ["d", "ratio", "training"], ["y"], name="node_dropout"),
    ]
    inits = [
        init("W0", r.standard_normal((6, 4)).astype(np.float32)),
        init("b0", r.standard_normal(6).astype(np.float32)),
        init("W1", r.standard_normal((3, 6)).astype(np.float32)),
        init("b1", r.standard_normal(3).astype(np.float32)),
        init("ratio", np.array(0.5, np.float32)),
        init("training", np.array(True)),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    return make_model(nodes, [x], [y], inits)


def test_training_mode_dropout_is_named_and_nothing_is_written(tmp_path, capsys):
    src = tmp_path / "train.onnx"
    onnx.save(_training_dropout_model(), src)
    assert main([str(src), "-o", str(tmp_path / "o.onnx")]) == 2
    line = _one_error_line(capsys)
    assert "not deterministic: Dropout 'node_dropout' runs in training mode" in line
    assert "export after model.eval()" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.onnx"]


def test_a_random_op_onnxruntime_cannot_run_is_the_originals_fault_not_ours(tmp_path, capsys):
    """A chain that merges beside a ``RandomUniformLike`` of opset 22, which onnxruntime 1.32
    has no kernel for: the determinism check cannot run the original, and says so (exit 2;
    exit 3 before issue 19, the session error escaping as an internal error)."""
    r = rng(6)
    nodes = [
        gemm_node("fc0", "x", "W0", None, "h", transB=1),
        gemm_node("fc1", "h", "W1", None, "g", transB=1),
        helper.make_node("RandomUniformLike", ["g"], ["u"], name="noise"),
        helper.make_node("Add", ["g", "u"], ["y"], name="add"),
    ]
    inits = [init(f"W{i}", r.standard_normal((4, 4)).astype(np.float32)) for i in range(2)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    src = tmp_path / "noise.onnx"
    onnx.save(make_model(nodes, [x], [y], inits, opset=22), src)

    assert main([str(src), "-o", str(tmp_path / "o.onnx")]) == 2

    line = _one_error_line(capsys)
    assert line.startswith(
        f"onnx-fuse: error: onnxruntime cannot load the original model {src}: "
    ), line
    assert "NOT_IMPLEMENTED" in line and "RandomUniformLike(22)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.onnx"]


# ---------------------------------------------------------------- interrupts


_SCRIPT = """
import os, signal, sys
from converter.cli import main
from converter.model_io import files
save = files._save
def interrupted_save(model, path, data_name, **options):
    save(model, path, data_name, **options)  # the partial output exists now
    {action}
files._save = interrupted_save
sys.exit(main([{src!r}, "-o", {dst!r}]))
"""


def _run_interrupted(src: Path, dst: Path, action: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(_SCRIPT).format(action=action, src=str(src), dst=str(dst))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )


def test_sigterm_while_writing_cleans_up_and_exits_143(two_layer, tmp_path):
    proc = _run_interrupted(two_layer, tmp_path / "o.onnx", "os.kill(os.getpid(), signal.SIGTERM)")
    assert proc.returncode == 143, proc.stderr
    assert "terminated" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two_layer.onnx"]


def test_ctrl_c_while_writing_cleans_up_and_exits_130(two_layer, tmp_path):
    proc = _run_interrupted(two_layer, tmp_path / "o.onnx", "raise KeyboardInterrupt")
    assert proc.returncode == 130, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two_layer.onnx"]


def test_a_later_run_removes_what_a_killed_run_left(two_layer, tmp_path):
    proc = _run_interrupted(two_layer, tmp_path / "o.onnx", "os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.returncode == -signal.SIGKILL
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".onnx-fuse-")]
    assert (left / "o.onnx").exists()  # the partial output, as a hard kill leaves it
    live = tmp_path / f"{files._temp_prefix()}keep"  # this process's own folder: alive
    live.mkdir()
    assert main([str(two_layer), "-o", str(tmp_path / "o.onnx"), "-q"]) == 0
    assert not left.exists() and live.exists()
    assert op_types(onnx.load(tmp_path / "o.onnx")) == ["Gemm"]


def test_full_disk_leaves_nothing(two_layer, tmp_path, monkeypatch, capsys):
    def full(model, path, data_name, **options):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "_save", full)
    assert main([str(two_layer), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "No space left on device" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two_layer.onnx"]


# ---------------------------------------------------------------- export


def test_export_summary_names_the_destination_not_a_temporary_file(tmp_path):
    torch = pytest.importorskip("torch")
    import converter

    module = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)).eval()
    dst = tmp_path / "model.onnx"
    report = converter.export(module, (torch.randn(2, 4),), dst, dynamo=False)
    first = str(report).splitlines()[0]
    assert first == f"merged 1 chain(s): torch.onnx.export(Sequential) -> {dst}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_model_without_linear_ops_says_so(tmp_path, capsys):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src, out = tmp_path / "relu.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    assert main([str(src), "-o", str(out)]) == 0
    assert "nothing merged: the model has no linear op (Gemm, MatMul, or Conv with a" in (
        capsys.readouterr().out
    )
