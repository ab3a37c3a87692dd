"""The test architectures exported and fused once per pytest run, in a folder xdist workers share.

* :func:`exported`: a block or network of :mod:`archs.vision` / :mod:`archs.reparam` exported by
  one torch exporter (:func:`archs.export.export_onnx`);
* :func:`exported_lm`: a LoRA language model of :mod:`archs.language` (its token ids beside it);
* :func:`fused`: ``converter.fuse_file`` of an export (validation on; a language model's token ids
  as its inputs), and the facts of its report;
* :func:`kernels`: the fused kernels onnxruntime makes of a file (``equivalence.fused_kernels``).

Every file is written beside its final name and moved into place, so two workers racing on one
model both succeed (one export is wasted, none is half-read). An exporter that cannot express a
model leaves a ``.skip`` file with its reason, and every later request skips with it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import converter
from converter.equivalence.kernels import fused_kernels

from . import reparam, vision
from .export import export_onnx, kept_for_runtime

__all__ = ["EXPORTERS", "MODELS", "exported", "exported_lm", "fused", "kernels", "shared_dir"]

EXPORTERS = {"legacy": False, "dynamo": True}
# every block and network, by name (the names do not collide)
MODELS = {**vision.BLOCKS, **reparam.BLOCKS, **vision.NETWORKS, **reparam.NETWORKS}
_LM = "lm-"  # file prefix of the language models


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``archs-cache`` of this run: one folder for all xdist workers (their base temps' parent)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "archs-cache"
    path.mkdir(exist_ok=True)
    return path


def _once(path: Path, make: Callable[[Path], None]) -> Path:
    """``path``, made by ``make(partial)`` unless it exists; skip if an earlier attempt could not."""
    if path.exists():
        return path
    skip = path.with_suffix(".skip")
    if skip.exists():
        pytest.skip(skip.read_text())
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial{path.suffix}")
    make(partial)
    os.replace(partial, path)
    return path


def exported(cache_dir: Path, name: str, exporter: str) -> Path:
    """Model ``name`` of :data:`MODELS` exported by ``exporter`` ("legacy" or "dynamo")."""
    path = cache_dir / f"{name}-{exporter}.onnx"

    def make(partial: Path) -> None:
        case = MODELS[name]()
        try:
            export_onnx(case.module, case.args, partial, dynamo=EXPORTERS[exporter])
        except Exception as e:  # an exporter that cannot express the structure
            reason = f"{exporter} exporter cannot export {name}: {type(e).__name__}: {e}"[:500]
            path.with_suffix(".skip").write_text(reason)
            pytest.skip(reason)

    return _once(path, make)


def exported_lm(cache_dir: Path, name: str, exporter: str) -> Path:
    """LoRA language model ``name`` of ``archs.language.MODELS``; its token ids in ``.inputs.npz``."""
    from . import language  # transformers and peft: imported only by the tests that need them

    path = cache_dir / f"{_LM}{name}-{exporter}.onnx"

    def make(partial: Path) -> None:
        model = language.build(name)
        try:
            lm = language.export_lm(model, partial, dynamo=EXPORTERS[exporter])
        except language.ExporterCannot as e:
            path.with_suffix(".skip").write_text(str(e))
            pytest.skip(str(e))
        os.replace(lm.inputs_path, path.with_suffix(".inputs.npz"))

    return _once(path, make)


def fused(cache_dir: Path, src: Path) -> tuple[Path, dict]:
    """``converter.fuse_file(src, ...)`` (validation on), once: the fused path and report facts.

    The facts: ``validated`` (``True``, ``False``, or ``None`` when nothing changed), the number of
    ``fusions``, the ``declined`` reasons and the nodes ``kept`` for the runtime. A language model is validated on its token ids.
    """
    dst = src.with_suffix(".fused.onnx")
    inputs = src.with_suffix(".inputs.npz")

    def make(partial: Path) -> None:
        report = converter.fuse_file(
            src, partial, validate=True, force=True, inputs=inputs if inputs.exists() else None
        )
        facts = {
            "validated": report.validated,
            "fusions": len(report.fusions),
            "declined": [str(d) for d in report.declined],
            "kept": sorted(kept_for_runtime([d.to_dict() for d in report.declined])),
        }
        _once(dst.with_suffix(".json"), lambda p: p.write_text(json.dumps(facts)))

    _once(dst, make)
    return dst, json.loads(dst.with_suffix(".json").read_text())


def kernels(path: Path) -> dict[str, int]:
    """``fused_kernels(path)``, computed once per run (cached beside ``path``)."""
    cached = path.with_suffix(".kernels.json")
    _once(cached, lambda p: p.write_text(json.dumps(fused_kernels(path))))
    return json.loads(cached.read_text())
