"""onnx-fuse: merge chains of linear layers in ONNX models, proven equivalent by onnxruntime.

    y = (x @ W1.T + b1) @ W2.T + b2 = x @ (W2 @ W1).T + (b1 @ W2.T + b2)

Public API: :func:`fuse` (in memory), :func:`fuse_file` (the CLI's job), :func:`export`
(torch export then fuse), :class:`FuseLinearChainsPass` (an onnx-ir pass) and
:func:`check_equivalence` (compare any two models); ``benchmark=`` (``True`` or a
:class:`BenchmarkOptions`) on ``fuse_file`` and ``check_equivalence`` times both models under
onnxruntime into a :class:`BenchmarkResult`.
"""

from __future__ import annotations

__all__ = [
    "__version__",
    "fuse",
    "fuse_file",
    "export",
    "FuseLinearChainsPass",
    "FusionReport",
    "FusionRecord",
    "Declined",
    "check_equivalence",
    "EquivalenceReport",
    "BenchmarkOptions",
    "BenchmarkResult",
    "ConverterError",
    "InputError",
    "UnsafeModelError",
    "OriginalModelError",
    "ValidationError",
    "EngineError",
]

__version__ = "0.1.0"

from converter.api import export, fuse, fuse_file
from converter.equivalence.timing import BenchmarkOptions, BenchmarkResult
from converter.equivalence.validate import EquivalenceReport, check_equivalence
from converter.errors import (
    ConverterError,
    EngineError,
    InputError,
    OriginalModelError,
    UnsafeModelError,
    ValidationError,
)
from converter.fusion.passes import FuseLinearChainsPass
from converter.report import Declined, FusionRecord, FusionReport
