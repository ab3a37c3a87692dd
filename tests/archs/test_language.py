"""LoRA language models (issue 12) exported by both torch exporters, and what onnx-fuse makes of them.

For each model of ``archs.language.MODELS`` and each exporter, the LoRA model and its
``merge_and_unload()`` are exported and must match torch under onnxruntime; their linear-op
counts (Gemm, and MatMul with a constant operand) are checked against the architecture:

| model | adapters | merge_and_unload() | LoRA export |
|---|---|---|---|
| bert (2 layers: q, k, v, o, ffn in, ffn out) | q, v: 4 | 12 | 12 + 2 * 4 = 20 |
| gpt2 (2 layers: c_attn, c_proj, c_fc, c_proj; lm_head) | c_attn: 2 | 9 | 9 + 2 * 2 = 13 |
| llama (2 layers: q, k, v, o, gate, up, down; lm_head) | q, v, down: 6 | 15 | 15 + 2 * 6 = 27 |

Then ``onnx-fuse MODEL --inputs inputs.npz -o OUT`` must exit 0 with the fused model at
``merge_and_unload()``'s linear-op count, and with no free fold left: none that
``archs.free_folds`` (a verbatim copy of the shared tool) finds, and no scalar scale after a
projection through a qkv ``Split`` or a float ``Cast`` (``archs.scales``). Every model and
exporter reaches both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("filelock")

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from filelock import FileLock  # a dependency of transformers (huggingface_hub)

from archs import language
from archs.export import kept_for_runtime, unexplained_folds
from archs.free_folds import free_folds
from archs.scales import projection_scales
from converter import cli
from converter.equivalence.runtime import Runner
from converter.equivalence.widen import float32_copy
from converter.fusion.linear import algebra

EXPORTERS = {"legacy": False, "dynamo": True}
ADAPTERS = {"bert": 4, "gpt2": 2, "llama": 6}
MERGED_LINEAR_OPS = {"bert": 12, "gpt2": 9, "llama": 15}
ATOL = 1e-4


def _cases() -> list:
    """Every model x exporter."""
    return [
        pytest.param(name, exporter, id=f"{name}-{exporter}")
        for name in language.MODELS
        for exporter in EXPORTERS
    ]


CASES = _cases()


def _export_case(directory: Path, name: str, exporter: str) -> None:
    """Build ``name``, export it and its merge_and_unload(), save torch's outputs beside them."""
    lora = language.build(name)
    merged = language.merged(lora)
    dynamo = EXPORTERS[exporter]
    try:
        a = language.export_lm(lora, directory / "lora.onnx", dynamo=dynamo)
    except language.ExporterCannot as e:
        (directory / "skip.txt").write_text(str(e))
        return
    b = language.export_lm(merged, directory / "merged.onnx", dynamo=dynamo)
    expected = language.run_torch(lora, a.inputs)
    np.savez(directory / "torch.npz", lora=expected, merged=language.run_torch(merged, b.inputs))


class _Case:
    """One model and exporter, read back: the two exports, their inputs and torch's outputs."""

    def __init__(self, directory: Path) -> None:
        if (directory / "skip.txt").exists():
            pytest.skip((directory / "skip.txt").read_text())
        self.lora, self.merged = (self._exported(directory / f) for f in ("lora", "merged"))
        with np.load(directory / "torch.npz") as outputs:
            self.expected, self.expected_merged = outputs["lora"], outputs["merged"]

    @staticmethod
    def _exported(stem: Path) -> language.Exported:
        inputs_path = stem.with_suffix(".inputs.npz")
        with np.load(inputs_path) as inputs:
            return language.Exported(stem.with_suffix(".onnx"), inputs_path, dict(inputs))


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory) -> Path:
    """A folder all xdist workers of this run share, so each model is exported once per run."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        return tmp_path_factory.mktemp("archs")
    directory = tmp_path_factory.getbasetemp().parent / f"archs-{run}"
    directory.mkdir(exist_ok=True)
    return directory


def _once(directory: Path, done: str, make) -> None:
    """Run ``make(directory)`` unless a worker already did (``done`` or ``skip.txt`` exists)."""
    directory.mkdir(exist_ok=True)
    with FileLock(directory / "lock"):
        if not (directory / done).exists() and not (directory / "skip.txt").exists():
            make(directory)


@pytest.fixture(scope="module")
def case(shared_dir):
    """``case(name, exporter)``: the pair exported once per run, read back once per worker."""
    cases: dict = {}

    def get(name: str, exporter: str) -> _Case:
        if (name, exporter) not in cases:
            directory = shared_dir / f"{name}-{exporter}"
            _once(directory, "torch.npz", lambda d: _export_case(d, name, exporter))
            cases[name, exporter] = _Case(directory)
        return cases[name, exporter]

    return get


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_exports_match_torch(case, name, exporter, record_property):
    c = case(name, exporter)
    for exported, expected in ((c.lora, c.expected), (c.merged, c.expected_merged)):
        onnx.checker.check_model(onnx.load(exported.path), full_check=True)
        np.testing.assert_allclose(
            language.run_onnx(exported.path, exported.inputs), expected, atol=ATOL, rtol=0
        )
    # merging changes the function only by rounding: the two torch models agree too
    np.testing.assert_allclose(c.expected_merged, c.expected, atol=ATOL, rtol=0)
    lora_ops = language.count_linear_ops(onnx.load(c.lora.path))
    merged_ops = language.count_linear_ops(onnx.load(c.merged.path))
    record_property("linear_ops", f"{lora_ops} -> merge_and_unload {merged_ops}")
    assert merged_ops == MERGED_LINEAR_OPS[name]
    assert lora_ops == merged_ops + 2 * ADAPTERS[name]


def _fuse(directory: Path) -> None:
    """Today's ``onnx-fuse lora.onnx --inputs ... -o fused.onnx``; the exit code to ``fused.code``."""
    argv = [str(directory / "lora.onnx"), "--inputs", str(directory / "lora.inputs.npz")]
    argv += ["--report", str(directory / "fused.json")]
    code = cli.main([*argv, "-o", str(directory / "fused.onnx"), "-q"])
    (directory / "fused.code").write_text(str(code))


@pytest.fixture(scope="module")
def fused(case, shared_dir):
    """``fused(name, exporter)``: (exit code, fused path) of today's CLI, run once per run."""

    def get(name: str, exporter: str) -> tuple[int, Path]:
        case(name, exporter)  # exported, or skipped with the exporter's reason
        directory = shared_dir / f"{name}-{exporter}"
        _once(directory, "fused.code", _fuse)
        return int((directory / "fused.code").read_text()), directory / "fused.onnx"

    return get


# the legacy LLaMA export merges today: no bias, one Constant scale per adapter, MatMul base
@pytest.mark.parametrize(("name", "exporter"), _cases())
def test_fuse_reaches_merge_and_unload(case, fused, name, exporter):
    c = case(name, exporter)
    code, out = fused(name, exporter)
    assert code == 0
    np.testing.assert_allclose(language.run_onnx(out, c.lora.inputs), c.expected, atol=ATOL, rtol=0)
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert language.count_linear_ops(model) == MERGED_LINEAR_OPS[name]


@pytest.mark.parametrize(("name", "exporter"), _cases())
def test_fuse_leaves_no_free_fold(fused, name, exporter):
    code, out = fused(name, exporter)
    assert code == 0
    model = onnx.load(out)
    # an adapter left unmerged hides the attention scale after its projection from both checks
    assert language.count_linear_ops(model) == MERGED_LINEAR_OPS[name]
    where: list[str] = []
    free_folds(model, where)
    report = json.loads((out.parent / "fused.json").read_text())
    assert unexplained_folds(where, kept_for_runtime(report["declined"])) == [], where
    assert projection_scales(model) == []


# --------------------------------------------- a bfloat16 LLaMA (issue 18)
# onnxruntime's CPU provider has no bfloat16 Mul or MatMul: validation runs float32 copies of
# both models (converter.equivalence.widen). The legacy exporter cannot export it in bfloat16
# ("ScalarType ComplexDouble is an unexpected tensor scalar type", its rotary embedding).


def _export_bfloat16(directory: Path) -> None:
    model = language.build("llama").to(torch.bfloat16)
    exported = language.export_lm(model, directory / "lora.onnx", dynamo=True)
    # what torch computes with the same bfloat16 weights, in float32
    np.save(directory / "torch.npy", language.run_torch(model.float(), exported.inputs))


@pytest.fixture(scope="module")
def llama_bfloat16(shared_dir) -> Path:
    directory = shared_dir / "llama-bfloat16-dynamo"
    _once(directory, "torch.npy", _export_bfloat16)
    return directory


def test_bfloat16_llama_is_validated_with_defaults(llama_bfloat16, tmp_path, capsys):
    out = tmp_path / "fused.onnx"
    assert cli.main([str(llama_bfloat16 / "lora.onnx"), "-o", str(out)]) == 0
    assert "validation      passed (bfloat16 computed in float32)" in capsys.readouterr().out
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert language.count_linear_ops(model) == MERGED_LINEAR_OPS["llama"]
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16]
    assert sum(t.dims == [128, 128] for t in weights) == 4  # q and o in each layer, still bf16
    # the fused model, run in float32, against torch with the same bfloat16 weights
    copy = ir.to_proto(float32_copy(ir.load(out)))
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    with np.load(llama_bfloat16 / "lora.inputs.npz") as inputs:
        (logits,) = Runner(session).run(dict(inputs)).values()
    expected = np.load(llama_bfloat16 / "torch.npy")
    # within about two bfloat16 steps at the logits' magnitude (< 1): one merged rounding
    np.testing.assert_allclose(logits.astype(np.float32), expected, atol=1e-2, rtol=0)


def test_a_wrong_merge_in_the_bfloat16_llama_is_caught(llama_bfloat16, tmp_path, monkeypatch):
    real = algebra.compose_all

    def wrong_weight(maps):  # LLaMA's projections have no bias
        merged = real(maps)
        return algebra.AffineMap(merged.weight * 1.5, merged.bias)

    monkeypatch.setattr(algebra, "compose_all", wrong_weight)
    out = tmp_path / "f.onnx"
    assert cli.main([str(llama_bfloat16 / "lora.onnx"), "-o", str(out), "-q"]) == 1
    assert not out.exists()
