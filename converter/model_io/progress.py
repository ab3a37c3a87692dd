"""A progress line on stderr for long runs: the stage, a count where known, and elapsed time.

The library reports progress by calling a ``ProgressCallback(stage, done, total)``; only the CLI
builds a :class:`ProgressLine`, and only when stderr is a terminal. Nothing is shown for runs that
finish within ``delay`` seconds, so quick runs stay quiet.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressCallback", "ProgressLine", "no_progress"]

ProgressCallback = Callable[[str, "int | None", "int | None"], None]


def no_progress(stage: str, done: int | None = None, total: int | None = None) -> None:
    """The default callback: report nothing."""


class ProgressLine:
    """Redraws one stderr line (``stage [done/total] 12.3s``) a few times a second from a thread."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool = True,
        delay: float = 2.0,
        width: int = 24,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled, self.delay, self.width = enabled, delay, width
        self.stage, self.done, self.total = "starting", None, None
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._drawn = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __call__(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        self.stage, self.done, self.total = stage, done, total

    def __enter__(self) -> ProgressLine:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def render(self) -> str:
        """The line as it is drawn now."""
        elapsed = time.monotonic() - self.start
        bar = ""
        if self.total:
            filled = int(self.width * min(self.done or 0, self.total) / self.total)
            bar = f" [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"
        return f"onnx-fuse: {self.stage}{bar} {elapsed:.1f}s"

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            if time.monotonic() - self.start >= self.delay:
                self.stream.write("\r\033[K" + self.render())
                self.stream.flush()
                self._drawn = True
