"""The few exception types onnx-fuse raises, and the exit code each maps to.

Every message names the file, node or tensor concerned and what the user can do about it;
the CLI prints the message on one line and exits with ``exit_code``.
"""

from __future__ import annotations

__all__ = [
    "ConverterError",
    "InputError",
    "UnsafeModelError",
    "ValidationError",
    "OriginalModelError",
    "EngineError",
]


class ConverterError(Exception):
    """Base class of every error onnx-fuse raises on purpose."""

    exit_code: int = 2


class InputError(ConverterError):
    """Bad usage or unreadable input: a missing, empty or corrupt file, a bad option value."""

    exit_code = 2


class UnsafeModelError(InputError):
    """A model refers to external data that would be unsafe to read (path escape, link, bad range)."""


class OriginalModelError(InputError):
    """The *original* model cannot run on the inputs given or synthesised, so nothing can be proven."""


class ValidationError(ConverterError):
    """The rewritten model's outputs differ from the original's beyond tolerance."""

    exit_code = 1


class EngineError(ConverterError):
    """The fusion engine produced an inconsistent model (a bug in onnx-fuse); nothing is written."""

    exit_code = 3
