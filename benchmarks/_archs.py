"""Shared by ``real_shapes.py``, ``reparam.py`` and ``runtime.py``: export, fuse, count and time.

The networks come from ``tests/archs`` (the test architectures of issues 10, 11 and 18; the LoRA
language models of issue 12 through :func:`export_and_fuse_lm`). Each is exported with both
torch exporters, fused with ``converter.fuse_file`` (validation on), counted (constant-weight
linear ops, Convs, free folds, BatchNormalization) and timed under onnxruntime with one thread:
after a warm-up, rounds interleave the models in a rotating order, each round times ``inner``
consecutive runs per model, and a model's time is the minimum over five blocks of rounds of the
median over the block's rounds of the mean run time (as ``bench_fusion.py``).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]  # the checkout and its test architectures

from archs.export import count_linear, count_ops, export_onnx, free_folds  # noqa: E402

import converter  # noqa: E402

__all__ = [
    "EXPORTERS",
    "Measured",
    "export_and_fuse",
    "export_and_fuse_lm",
    "measure",
    "print_table",
    "time_models",
]

EXPORTERS = {"legacy": False, "dynamo": True}
_BLOCKS = 5


@dataclasses.dataclass
class Measured:
    """Counts of one exported (or fused) file."""

    path: Path
    linear: int
    convs: int
    folds: int
    batchnorm: int
    where: list[str]


def measure(path: Path) -> Measured:
    """Constant-weight linear ops, Convs, free folds and BatchNormalization left in ``path``."""
    folds, bn, where = free_folds(path)
    return Measured(path, count_linear(path), count_ops(path)["Conv"], folds, bn, where)


def export_and_fuse(case, name: str, exporter: str, workdir: Path):
    """Export ``case`` with ``exporter``, fuse it; return ``(original, fused or None, status)``."""
    src = workdir / f"{name}-{exporter}.onnx"
    export_onnx(case.module, case.args, src, dynamo=EXPORTERS[exporter])
    return _fuse(src, workdir / f"{name}-{exporter}.fused.onnx")


def export_and_fuse_lm(name: str, exporter: str, workdir: Path):
    """A LoRA language model of ``archs.language`` exported and fused on its token ids.

    Returns ``(original, fused or None, status, feeds)``; ``feeds`` are the token ids (and mask)
    it was exported with, by input name. Needs the test extra (transformers, peft).
    """
    from archs import language

    src = workdir / f"{name}-{exporter}.onnx"
    lm = language.export_lm(language.build(name), src, dynamo=EXPORTERS[exporter])
    return (*_fuse(src, workdir / f"{name}-{exporter}.fused.onnx", lm.inputs_path), lm.inputs)


def _fuse(src: Path, dst: Path, inputs: Path | None = None):
    try:
        report = converter.fuse_file(src, dst, validate=True, force=True, inputs=inputs)
    except converter.ConverterError as e:
        return measure(src), None, f"error: {type(e).__name__}"
    status = {None: "unchanged", True: "passed", False: "FAILED"}[report.validated]
    return measure(src), measure(dst), f"{status} ({len(report.fusions)} merges)"


def time_models(
    paths: list[Path], feed: np.ndarray | Mapping[str, np.ndarray], rounds: int, inner: int
) -> list[float]:
    """Median seconds per run of each model, 1 thread, rounds interleaved in a rotating order.

    ``feed`` is the array for each model's first input, or arrays by input name. A path may
    appear twice: each occurrence is a session of its own (the original timed against itself).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = [
        ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths
    ]
    feeds = [_feeds(s, feed) for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(inner):
            s.run(None, f)
    samples: list[list[float]] = [[] for _ in paths]
    for r in range(rounds):
        for k in range(len(paths)):
            i = (k + r) % len(paths)
            start = time.perf_counter()
            for _ in range(inner):
                sessions[i].run(None, feeds[i])
            samples[i].append((time.perf_counter() - start) / inner)
    # the minimum over blocks of rounds of the median: a burst from another process on the
    # shared machine spoils a block, not the figure
    size = max(1, rounds // _BLOCKS)
    return [
        min(statistics.median(s[b : b + size]) for b in range(0, len(s), size)) for s in samples
    ]


def _feeds(session: ort.InferenceSession, feed) -> dict[str, np.ndarray]:
    if isinstance(feed, np.ndarray):
        return {session.get_inputs()[0].name: feed}
    return {i.name: feed[i.name] for i in session.get_inputs()}


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A plain text table, columns padded to the widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
