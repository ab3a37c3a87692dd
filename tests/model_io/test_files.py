"""Tests for ``converter.model_io.files``: refusing bad and unsafe input, lazy loading, atomic output.

Every refusal is checked the same way: the right error type, a one-line message naming the
file, the input bytes unchanged and nothing left in the destination folder.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.errors import InputError, UnsafeModelError
from converter.model_io import files as cio
from converter.model_io.tensors import ir_tensors

RNG = np.random.default_rng(0)
IN, OUT = 64, 32  # W is 8 KiB: above ir.save's 256-byte threshold for external data
W = RNG.standard_normal((IN, OUT)).astype(np.float32)
B = RNG.standard_normal(OUT).astype(np.float32)
X = RNG.standard_normal((2, IN)).astype(np.float32)
EXPECTED = X @ W + B


# ------------------------------------------------------------------------------ builders


def _linear_graph(initializers: list[TensorProto], nodes: list | None = None) -> onnx.GraphProto:
    """``y = x @ W + B`` with the given tensors; extra nodes go first."""
    return helper.make_graph(
        [
            *(nodes or []),
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "B"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, OUT])],
        initializers,
    )


def _model(graph: onnx.GraphProto, opset: int = 17, **kw) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)


def _save_linear(folder: Path, *, external: bool, name: str = "model.onnx") -> Path:
    """A good model; with ``external`` its weights go to ``<name>.data``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = _model(
        _linear_graph([numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
    )
    path = folder / name
    onnx.save_model(
        model,
        path,
        save_as_external_data=external,
        location=f"{name}.data",
        size_threshold=0,
    )
    return path


def _external(
    name: str, array: np.ndarray, entries: dict[str, str] | list[tuple[str, str]]
) -> TensorProto:
    """A TensorProto marked external with the given (possibly hostile) entries."""
    tensor = numpy_helper.from_array(array, name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in entries.items() if isinstance(entries, dict) else entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _place(placement: str, tensor: TensorProto) -> onnx.ModelProto:
    """A model holding ``tensor`` as an initializer, a Constant, in a subgraph or a function."""
    b = numpy_helper.from_array(B, "B")
    if placement == "initializer":
        return _model(_linear_graph([tensor, b]))
    const = helper.make_node("Constant", [], ["W"], value=tensor)
    if placement == "constant":
        return _model(_linear_graph([b], [const]))
    if placement == "subgraph":
        branch = helper.make_graph(
            [const],
            "branch",
            [],
            [helper.make_tensor_value_info("W", TensorProto.FLOAT, [IN, OUT])],
        )
        cond = numpy_helper.from_array(np.array(True), "cond")
        node = helper.make_node("If", ["cond"], ["W"], then_branch=branch, else_branch=branch)
        return _model(_linear_graph([b, cond], [node]))
    assert placement == "function"
    func = helper.make_function("local", "MakeW", [], ["W"], [const], [helper.make_opsetid("", 17)])
    call = helper.make_node("MakeW", [], ["W"], domain="local")
    return helper.make_model(
        _linear_graph([b], [call]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[func],
    )


def _write_proto(folder: Path, proto: onnx.ModelProto, name: str = "model.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return path


def _digest(folder: Path) -> dict[str, str]:
    """Name -> sha256 of every regular file under ``folder`` (symlinks by their target text)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if p.is_dir() else "other"
    return out


def _assert_refused(call: Callable[[], object], error: type[Exception], name: str) -> str:
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert name in message
    return message


def _run(path: Path | str) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0]


@pytest.fixture
def no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything memory-maps a file (how onnx_ir reads external data)."""

    def refuse(*args, **kwargs):
        raise AssertionError("external data was read")

    monkeypatch.setattr(mmap, "mmap", refuse)


# ------------------------------------------------------------------------ bad input files


def _missing(d: Path) -> Path:
    return d / "model.onnx"


def _directory(d: Path) -> Path:
    (d / "model.onnx").mkdir()
    return d / "model.onnx"


def _empty(d: Path) -> Path:
    (d / "model.onnx").write_bytes(b"")
    return d / "model.onnx"


def _random(d: Path) -> Path:
    (d / "model.onnx").write_bytes(np.random.default_rng(1).bytes(4096))
    return d / "model.onnx"


def _text(d: Path) -> Path:
    (d / "model.onnx").write_text("ir_version: 8\nthis is not a model\n" * 20)
    return d / "model.onnx"


def _truncated(d: Path) -> Path:
    path = _save_linear(d, external=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _tensor_proto(d: Path) -> Path:
    (d / "model.onnx").write_bytes(numpy_helper.from_array(W, "W").SerializeToString())
    return d / "model.onnx"


def _graph_proto(d: Path) -> Path:
    (d / "model.onnx").write_bytes(
        _linear_graph([numpy_helper.from_array(W, "W")]).SerializeToString()
    )
    return d / "model.onnx"


def _no_opset(d: Path) -> Path:
    proto = _model(
        _linear_graph([numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
    )
    del proto.opset_import[:]
    return _write_proto(d, proto)


def _opset(version: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        graph = _linear_graph([numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
        return _write_proto(d, _model(graph, opset=version, ir_version=8))

    return build


def _ir_version_too_new(d: Path) -> Path:
    graph = _linear_graph([numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
    return _write_proto(d, _model(graph, ir_version=onnx.IR_VERSION + 1))


def _missing_data(d: Path) -> Path:
    path = _save_linear(d, external=True)
    (d / "model.onnx.data").unlink()
    return path


BAD_INPUTS = {
    "missing": (_missing, "no such file"),
    "directory": (_directory, "is a directory"),
    "empty": (_empty, "is empty"),
    "random_bytes": (_random, "not an ONNX model"),
    "text": (_text, "not an ONNX model"),
    "truncated": (_truncated, "not an ONNX model"),
    "tensor_proto": (_tensor_proto, "not an ONNX model"),
    "graph_proto": (_graph_proto, "no graph"),
    "no_opset": (_no_opset, "no ai.onnx opset"),
    "opset_too_old": (_opset(6), "opset 6"),
    "opset_too_new": (_opset(onnx.defs.onnx_opset_version() + 1), "opset"),
    "ir_version_too_new": (_ir_version_too_new, "IR version"),
    "missing_external_data": (_missing_data, "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_on_one_line(tmp_path: Path, case: str) -> None:
    build, reason = BAD_INPUTS[case]
    path = build(tmp_path)
    before = _digest(tmp_path)
    message = _assert_refused(lambda: cio.load_model(path), InputError, path.name)
    assert reason in message
    assert _digest(tmp_path) == before


# ---------------------------------------------------------------- unsafe external data


def _model_dir(tmp_path: Path) -> tuple[Path, Path]:
    """``tmp_path/model`` for the model, ``tmp_path/outside`` holding a tempting file."""
    (tmp_path / "model").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes(W.tobytes())
    return tmp_path / "model", tmp_path / "outside" / "secret.bin"


def _hostile_location(case: str, model_dir: Path, secret: Path) -> tuple[str, dict[str, str], str]:
    """Set up the files for ``case``; return (location, extra entries, expected reason)."""
    if case == "dotdot":
        return "../outside/secret.bin", {}, "'..'"
    if case == "absolute":
        return str(secret), {}, "absolute"
    if case == "symlink_out":
        (model_dir / "w.bin").symlink_to(secret)
        return "w.bin", {}, "outside the model folder"
    if case == "symlinked_parent":
        (model_dir / "sub").symlink_to(secret.parent, target_is_directory=True)
        return "sub/secret.bin", {}, "outside the model folder"
    if case == "hardlink":
        os.link(secret, model_dir / "w.bin")
        return "w.bin", {}, "hard links"
    if case == "fifo":
        os.mkfifo(model_dir / "w.bin")
        return "w.bin", {}, "not a regular file"
    if case == "directory":
        (model_dir / "w.bin").mkdir()
        return "w.bin", {}, "not a regular file"
    (model_dir / "w.bin").write_bytes(W.tobytes())
    size = str(W.nbytes)
    extra = {
        "empty_location": ({}, "empty"),
        "offset_beyond": ({"offset": str(W.nbytes + 1)}, "beyond the end"),
        "length_beyond": ({"offset": "4", "length": size}, "beyond the end"),
        "length_mismatch": ({"length": "8"}, "does not match"),
        "negative_offset": ({"offset": "-4"}, "non-negative integer"),
        "non_integer_length": ({"length": "48.0"}, "non-negative integer"),
        "unknown_key": ({"basepath": "/etc"}, "unknown external_data key"),
    }[case]
    return ("" if case == "empty_location" else "w.bin"), *extra


HOSTILE = [
    "dotdot", "absolute", "symlink_out", "symlinked_parent", "hardlink", "fifo", "directory",
    "empty_location", "offset_beyond", "length_beyond", "length_mismatch", "negative_offset",
    "non_integer_length", "unknown_key",
]  # fmt: skip


@pytest.mark.usefixtures("no_reads")
@pytest.mark.parametrize("case", HOSTILE)
def test_unsafe_external_data_is_refused(tmp_path: Path, case: str) -> None:
    model_dir, secret = _model_dir(tmp_path)
    location, extra, reason = _hostile_location(case, model_dir, secret)
    entries = {"location": location, **extra} if location else extra
    path = _write_proto(model_dir, _place("initializer", _external("W", W, entries)))
    before = _digest(tmp_path)
    message = _assert_refused(lambda: cio.load_model(path), UnsafeModelError, path.name)
    assert reason in message and "'W'" in message
    assert _digest(tmp_path) == before


@pytest.mark.usefixtures("no_reads")
@pytest.mark.parametrize("placement", ["initializer", "constant", "subgraph", "function"])
def test_every_tensor_is_checked_wherever_it_is(tmp_path: Path, placement: str) -> None:
    model_dir, _ = _model_dir(tmp_path)
    path = _write_proto(
        model_dir, _place(placement, _external("W", W, {"location": "../outside/secret.bin"}))
    )
    _assert_refused(lambda: cio.load_model(path), UnsafeModelError, "model.onnx")


def test_repeated_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(W.tobytes())
    entries = [("location", "w.bin"), ("location", "../w.bin")]
    path = _write_proto(tmp_path, _place("initializer", _external("W", W, entries)))
    message = _assert_refused(lambda: cio.load_model(path), UnsafeModelError, "model.onnx")
    assert "repeated" in message


def test_paths_resolve_against_the_model_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save_linear(tmp_path / "m", external=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.onnx.data").write_bytes(b"decoy")  # a cwd file of the same name
    model = cio.load_model(os.path.relpath(path))
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), W)


def test_check_external_data_on_ir_model(tmp_path: Path) -> None:
    model_dir, _ = _model_dir(tmp_path)
    proto = _place("initializer", _external("W", W, {"location": "../outside/secret.bin"}))
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(UnsafeModelError, match=r"'\.\.'"):
        cio.check_external_data(model, model_dir)
    good = cio.load_model(_save_linear(tmp_path / "good", external=True))
    assert cio.check_external_data(good, tmp_path / "good") == 2  # W and B
    inline = cio.load_model(_save_linear(tmp_path / "inline", external=False))
    assert cio.check_external_data(inline, tmp_path / "inline") == 0


# --------------------------------------------------------------------- good models


def test_external_data_loads_lazily(tmp_path: Path) -> None:
    path = _save_linear(tmp_path, external=True)
    model = cio.load_model(path)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert all(isinstance(t, ir.ExternalTensor) and t.raw is None for t in tensors)
    assert cio.model_size_bytes(model) == W.nbytes + B.nbytes
    assert all(t.raw is None for t in tensors)  # sizing read nothing
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), W)


@pytest.mark.parametrize("external_data", [None, "weights.bin"])
def test_round_trip_through_pending_output(tmp_path: Path, external_data: str | None) -> None:
    model = cio.load_model(_save_linear(tmp_path / "in", external=True))
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "fused.onnx"
    with cio.write_model(model, dst, external_data=external_data) as pending:
        assert not dst.exists()
        np.testing.assert_allclose(_run(pending.path), EXPECTED, rtol=1e-6, atol=1e-6)
        pending.commit()
    expected_files = ["fused.onnx"] + ([external_data] if external_data else [])
    assert sorted(os.listdir(tmp_path / "out")) == sorted(expected_files)
    np.testing.assert_allclose(_run(dst), EXPECTED, rtol=1e-6, atol=1e-6)
    reloaded = cio.load_model(dst)
    w = reloaded.graph.initializers["W"].const_value
    assert isinstance(w, ir.ExternalTensor) == (external_data is not None)
    np.testing.assert_array_equal(reloaded.graph.initializers["W"].const_value.numpy(), W)


def test_large_model_gets_external_data_automatically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = cio.load_model(_save_linear(tmp_path, external=False))
    monkeypatch.setattr(cio, "EXTERNAL_DATA_THRESHOLD_BYTES", 16)
    dst = tmp_path / "out.onnx"
    with cio.write_model(model, dst) as pending:
        assert pending.data_path is not None and pending.data_path.endswith("out.onnx.data")
        pending.commit()
    assert (tmp_path / "out.onnx.data").is_file()
    np.testing.assert_allclose(_run(dst), EXPECTED, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("placement", ["constant", "function"])
def test_external_attribute_tensors_are_written_with_the_output(
    tmp_path: Path, placement: str
) -> None:
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    (src_dir / "w.bin").write_bytes(W.tobytes())
    src = _write_proto(src_dir, _place(placement, _external("W", W, {"location": "w.bin"})))
    model = cio.load_model(src)
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "out.onnx"
    with cio.write_model(model, dst, external_data="out.data") as pending:
        pending.commit()
    np.testing.assert_allclose(_run(dst), EXPECTED, rtol=1e-6, atol=1e-6)
    # the input model still reads from its own file (the attribute swap was undone)
    assert any(isinstance(t, ir.ExternalTensor) for t in ir_tensors(model))


# -------------------------------------------------------------------- atomic writes


def test_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = cio.load_model(_save_linear(tmp_path / "in", external=True))
    out = tmp_path / "out"
    out.mkdir()

    def partial_save(model, path, **kwargs):
        Path(path).write_bytes(b"half a model")
        Path(path).with_name("out.data").write_bytes(b"half the data")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", partial_save)
    message = _assert_refused(
        lambda: cio.write_model(model, out / "m.onnx", external_data="out.data"),
        InputError,
        "m.onnx",
    )
    assert "No space left" in message
    assert os.listdir(out) == []


def test_exception_inside_with_discards(tmp_path: Path) -> None:
    model = cio.load_model(_save_linear(tmp_path / "in", external=True))
    (tmp_path / "out").mkdir()
    with (
        pytest.raises(RuntimeError),
        cio.write_model(model, tmp_path / "out" / "m.onnx") as pending,
    ):
        assert Path(pending.path).is_file()
        raise RuntimeError("validation failed")
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("existing", ["m.onnx", "m.data"])
def test_existing_output_needs_force(tmp_path: Path, existing: str) -> None:
    model = cio.load_model(_save_linear(tmp_path / "in", external=True))
    out = tmp_path / "out"
    out.mkdir()
    (out / existing).write_bytes(b"keep me")
    before = _digest(out)
    _assert_refused(
        lambda: cio.write_model(model, out / "m.onnx", external_data="m.data"), InputError, existing
    )
    assert _digest(out) == before
    cio.write_model(model, out / "m.onnx", external_data="m.data", force=True).commit()
    np.testing.assert_allclose(_run(out / "m.onnx"), EXPECTED, rtol=1e-6, atol=1e-6)


def test_symlink_destination_is_replaced_not_followed(tmp_path: Path) -> None:
    model = cio.load_model(_save_linear(tmp_path / "in", external=False))
    victim = tmp_path / "victim.onnx"
    victim.write_bytes(b"not yours")
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").symlink_to(victim)
    _assert_refused(lambda: cio.write_model(model, out / "m.onnx"), InputError, "symlink")
    cio.write_model(model, out / "m.onnx", force=True).commit()
    assert not (out / "m.onnx").is_symlink()
    assert victim.read_bytes() == b"not yours"
    np.testing.assert_allclose(_run(out / "m.onnx"), EXPECTED, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["", ".", "..", "../x.data", "sub/x.data", "a\\b", "m.onnx"])
def test_bad_external_data_name_is_refused(tmp_path: Path, name: str) -> None:
    model = cio.load_model(_save_linear(tmp_path / "in", external=False))
    (tmp_path / "out").mkdir()
    _assert_refused(
        lambda: cio.write_model(model, tmp_path / "out" / "m.onnx", external_data=name),
        InputError,
        "m.onnx",
    )
    assert os.listdir(tmp_path / "out") == []


def test_missing_output_folder_is_refused(tmp_path: Path) -> None:
    model = cio.load_model(_save_linear(tmp_path, external=False))
    _assert_refused(
        lambda: cio.write_model(model, tmp_path / "nope" / "m.onnx"), InputError, "nope"
    )


def test_output_over_input_needs_force_and_stays_correct(tmp_path: Path) -> None:
    src = _save_linear(tmp_path, external=True)
    data = tmp_path / "model.onnx.data"
    model = cio.load_model(src)
    old_w = model.graph.initializers["W"].const_value
    old_w.numpy()  # memory-map the input data file, as a rewrite pass would
    before = _digest(tmp_path)
    _assert_refused(
        lambda: cio.write_model(model, src, external_data="model.onnx.data", src=src),
        InputError,
        "input model",
    )
    assert _digest(tmp_path) == before

    # change one weight so the output's data file differs from the input's; B streams across
    model.graph.initializers["W"].const_value = ir.tensor(W * 2, name="W")
    inode = data.stat().st_ino
    pending = cio.write_model(model, src, external_data="model.onnx.data", force=True, src=src)
    now = _digest(tmp_path)
    assert {k: now[k] for k in before} == before  # input untouched until commit
    assert data.stat().st_ino == inode
    pending.commit()
    assert data.stat().st_ino != inode
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    reloaded = cio.load_model(src)
    np.testing.assert_array_equal(reloaded.graph.initializers["W"].const_value.numpy(), W * 2)
    np.testing.assert_array_equal(reloaded.graph.initializers["B"].const_value.numpy(), B)
    np.testing.assert_allclose(_run(src), X @ (W * 2) + B, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):  # the input's tensor read the replaced file: invalidated
        model.graph.initializers["B"].const_value.numpy()


# ---------------------------------------------------------------------------- helpers


def test_is_same_file(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_bytes(b"x")
    (tmp_path / "b").write_bytes(b"x")
    (tmp_path / "link").symlink_to(a)
    os.link(a, tmp_path / "hard")
    assert cio.is_same_file(a, tmp_path / "link")
    assert cio.is_same_file(a, tmp_path / "hard")
    assert cio.is_same_file(a, tmp_path / "sub" / ".." / "a")
    assert not cio.is_same_file(a, tmp_path / "b")
    assert cio.is_same_file(tmp_path / "none", tmp_path / "." / "none")
    assert not cio.is_same_file(a, tmp_path / "none")


def test_files_are_flushed_to_disk_only_when_they_replace_one(tmp_path: Path, monkeypatch) -> None:
    """A rename over an existing file must not lose it to a power cut: flush first. A new output
    replaces nothing, so it skips the (multi-second, on large models) flush."""
    flushed: list[str] = []
    monkeypatch.setattr(cio, "_fsync", flushed.append)
    model = cio.load_model(_save_linear(tmp_path / "in", external=True))
    out = tmp_path / "out"
    out.mkdir()
    cio.write_model(model, out / "m.onnx", external_data="m.data").commit()
    assert [Path(p).name for p in flushed] == ["out"]  # the folder, for the renames themselves
    flushed.clear()
    cio.write_model(model, out / "m.onnx", external_data="m.data", force=True).commit()
    assert sorted(Path(p).name for p in flushed) == ["m.data", "m.onnx", "out"]


def test_sparse_constants_are_refused_with_what_to_do(tmp_path: Path) -> None:
    values = numpy_helper.from_array(np.array([1.5, 2.0], np.float32), "v")
    indices = numpy_helper.from_array(np.array([1, 3], np.int64), "i")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    nodes = [
        helper.make_node("Constant", [], ["c"], sparse_value=sparse),
        helper.make_node("Add", ["x", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "sparse.onnx"
    onnx.save(model, path)
    with pytest.raises(InputError, match=r"holds sparse tensors .* densify them first"):
        cio.load_model(path)


@pytest.mark.parametrize(
    ("nodes", "inits", "message"),
    [
        (
            [
                ("Relu", ["x"], ["a"], "r1"),
                ("Tanh", ["x"], ["a"], "r2"),
                ("Neg", ["a"], ["y"], "n"),
            ],
            [],
            "main graph: value 'a' is defined twice, by node 'r1' and by node 'r2'",
        ),
        (
            [("Relu", ["x"], ["w"], "r1"), ("Add", ["w", "x"], ["y"], "add")],
            ["w"],
            "main graph: value 'w' is defined twice, by an initializer and by node 'r1'",
        ),
        (
            [("Relu", ["x"], ["x"], "r1"), ("Neg", ["x"], ["y"], "n")],
            [],
            "main graph: value 'x' is defined twice, by a graph input and by node 'r1'",
        ),
    ],
    ids=["two_nodes", "initializer_and_node", "input_and_node"],
)
def test_a_value_defined_twice_is_named(tmp_path: Path, nodes, inits, message) -> None:
    """onnx-ir cannot load a graph that is not in static single assignment form (onnxruntime
    refuses it too, "Duplicate definition"): the refusal names the value and both definitions."""
    graph = helper.make_graph(
        [helper.make_node(op, i, o, name=n) for op, i, o, n in nodes],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.ones(4, np.float32), name) for name in inits],
    )
    path = tmp_path / "twice.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(InputError) as info:
        cio.load_model(path)
    assert str(info.value) == f"{path}: {message}; an ONNX graph defines each value once"
