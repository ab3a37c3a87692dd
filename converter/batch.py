"""Fuse many model files at once: each independently, in a process pool, one result per file.

:func:`fuse_files` runs :func:`converter.api.fuse_file` on every source; one file's failure (bad
input, validation failure, even a bug) is recorded in its :class:`FileResult` and does not stop
the others. :class:`BatchReport` holds every result, the totals, and the exit code of the whole
run: the worst of the files' (3 internal error > 2 bad input > 1 validation failed > 0).

With ``jobs=1`` the files are fused in this process, one after the other; with more, in a pool of
``jobs`` worker processes (started by ``forkserver``, so that no thread or onnxruntime state of
the caller is inherited). A worker stopped by SIGTERM cleans up its temporary output like Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from converter import api
from converter.errors import ConverterError, InputError

__all__ = ["FileResult", "BatchReport", "fuse_files", "destinations", "Terminated"]

logger = logging.getLogger(__name__)

EXIT_INTERNAL = 3


class Terminated(BaseException):  # a signal, like KeyboardInterrupt
    """Raised in the main thread on SIGTERM so that cleanup runs as it does for Ctrl-C."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: turn the signal into :class:`Terminated`."""
    raise Terminated(f"signal {signum}")


@dataclasses.dataclass
class FileResult:
    """How one file went: its exit code, the error line if any, and its fusion report."""

    source: str
    destination: str
    exit_code: int
    error: str | None = None
    report: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return {0: "ok", 1: "validation failed", 2: "bad input"}.get(self.exit_code, "error")


@dataclasses.dataclass
class BatchReport:
    """Every file's result, in the order given, and the exit code of the whole run."""

    files: list[FileResult]

    @property
    def exit_code(self) -> int:
        return max((f.exit_code for f in self.files), default=0)

    def totals(self) -> dict[str, int]:
        """Files by outcome and, over the files fused, the summed model figures."""
        done = [f.report for f in self.files if f.report is not None]
        totals = {"files": len(self.files), "ok": sum(f.exit_code == 0 for f in self.files)}
        totals["failed"] = totals["files"] - totals["ok"]
        totals["chains_merged"] = sum(len(r["fusions"]) for r in done)
        for key in ("linear_ops", "macs", "params"):
            for when in ("before", "after"):
                totals[f"{key}_{when}"] = sum(r[f"{key}_{when}"] for r in done)
        return totals

    def to_dict(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "totals": self.totals(),
            "files": [dataclasses.asdict(f) for f in self.files],
        }


def destinations(sources: Sequence[str | os.PathLike], out_dir: str | None) -> list[str]:
    """``OUT_DIR/NAME`` for each source (or ``NAME.fused.onnx`` beside it); refuse collisions."""
    dsts = []
    for src in map(Path, sources):
        if out_dir is None:
            dsts.append(str(src.with_name(src.stem + ".fused.onnx")))
        else:
            dsts.append(str(Path(out_dir) / src.name))
    seen: dict[str, str] = {}
    for src, dst in zip(sources, dsts, strict=True):
        if dst in seen:
            raise InputError(f"{src} and {seen[dst]} would both be written to {dst}")
        seen[dst] = os.fspath(src)
    return dsts


def _fuse_one(src: str, dst: str, options: dict[str, Any]) -> FileResult:
    """Fuse one file; every outcome but an interrupt becomes a :class:`FileResult`."""
    start = time.perf_counter()
    result = FileResult(src, dst, 0)
    try:
        report = api.fuse_file(src, dst, **options)
        result.report = report.to_dict()
        result.exit_code = 0 if report.validated is not False else 1
    except ConverterError as e:
        result.exit_code, result.error = e.exit_code, " ".join(str(e).split())
    except Exception as e:  # a bug on one file must not stop the others
        logger.debug("internal error on %s", src, exc_info=True)
        result.exit_code = EXIT_INTERNAL
        result.error = f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"
    result.seconds = time.perf_counter() - start
    gc.collect()  # the model's graph is cyclic garbage now: free it before the next file
    return result


def _worker_init() -> None:
    signal.signal(signal.SIGTERM, raise_terminated)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us


def fuse_files(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None,
    *,
    jobs: int = 1,
    on_done: Callable[[FileResult], None] = lambda result: None,
    **options: Any,
) -> BatchReport:
    """Fuse every file of ``sources`` into ``out_dir`` (see the module docstring).

    ``options`` are :func:`converter.api.fuse_file`'s keyword arguments; ``on_done`` is called
    with each result as it completes (for a progress bar).
    """
    if jobs < 1:
        raise InputError(f"--jobs must be at least 1, got {jobs}")
    if out_dir is not None and not os.path.isdir(out_dir):
        raise InputError(f"{out_dir}: the output folder does not exist")
    out = None if out_dir is None else os.fspath(out_dir)
    pairs = list(zip(map(os.fspath, sources), destinations(sources, out), strict=True))
    if jobs == 1 or len(pairs) == 1:
        results = []
        for src, dst in pairs:
            results.append(_fuse_one(src, dst, options))
            on_done(results[-1])
        return BatchReport(results)
    return BatchReport(_in_pool(pairs, jobs, on_done, options))


def _in_pool(
    pairs: list[tuple[str, str]],
    jobs: int,
    on_done: Callable[[FileResult], None],
    options: dict[str, Any],
) -> list[FileResult]:
    context = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(min(jobs, len(pairs)), mp_context=context, initializer=_worker_init)
    try:
        futures = {
            pool.submit(_fuse_one, src, dst, options): i for i, (src, dst) in enumerate(pairs)
        }
        results: list[FileResult | None] = [None] * len(pairs)
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            on_done(future.result())
    except BaseException:
        # Interrupted: stop the workers (SIGTERM: each removes its temporary output), then re-raise.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [r for r in results if r is not None]
