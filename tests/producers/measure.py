"""Load, run, fuse and count the fixtures of ``models/producers`` (issue 22's producers).

Needs onnx, onnxruntime, numpy and the converter only: the frameworks that made the fixtures are
not imported. Shared by ``tests/producers/test_fixtures.py`` and ``benchmarks/producers.py``.

* :func:`fixtures` reads ``models/producers/manifest.json``: per fixture its producer, the
  hand-folded linear-op count, the op counts a hand-folded model does not exceed, and why.
* :func:`count_linear` counts constant-weight ``Gemm``/``MatMul``/``Conv`` and ONNX-ML
  ``LinearRegressor``/``LinearClassifier`` (whose weights are attributes, always constant).
* :func:`fuse` runs ``converter.fuse_file`` (validation on) on one fixture and measures the result
  against the hand-folded target: linear ops, BatchNormalization and free folds left (the
  heuristic of ``tests/archs/free_folds.py``), op counts over the manifest's bounds, fused
  onnxruntime kernels lost, and the fused model's outputs against the framework's.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import converter
from converter.equivalence.kernels import fused_kernels, lost_kernels

__all__ = [
    "FIXTURES",
    "Fixture",
    "Fused",
    "count_linear",
    "count_ops",
    "fixtures",
    "fuse",
    "load_samples",
    "run",
    "tolerance",
]

FIXTURES = Path(__file__).resolve().parents[2] / "models" / "producers"
_FREE_FOLDS = Path(__file__).resolve().parents[1] / "archs" / "free_folds.py"
ML_LINEAR = ("LinearRegressor", "LinearClassifier")
# ONNX file vs the framework's own outputs (and the fused file vs the same): float32 throughout,
# except scikit-learn, which computes in float64 (its outputs reach ~10, hence the rtol).
TOLERANCES = {"keras": (1e-4, 1e-4), "flax": (1e-4, 1e-4), "sklearn": (1e-4, 1e-4)}


@dataclasses.dataclass(frozen=True)
class Fixture:
    name: str
    producer: str
    model: str
    hand_folded: int
    at_most: dict[str, int]
    why: str

    @property
    def path(self) -> Path:
        return FIXTURES / f"{self.name}.onnx"

    @property
    def samples(self) -> Path:
        return FIXTURES / f"{self.name}.npz"


@functools.cache
def fixtures() -> dict[str, Fixture]:
    entries = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
    return {
        name: Fixture(
            name, e["producer"], e["model"], e["hand_folded"], dict(e["at_most"]), e["why"]
        )
        for name, e in entries.items()
    }


def tolerance(fixture: Fixture) -> tuple[float, float]:
    """``(atol, rtol)`` for this fixture's float outputs; integer outputs (labels) are exact."""
    return TOLERANCES[fixture.producer]


def load_samples(fixture: Fixture) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The sample inputs and the framework's outputs on them, by ONNX input/output name."""
    with np.load(fixture.samples) as data:
        inputs = {k.removeprefix("input/"): data[k] for k in data.files if k.startswith("input/")}
        outputs = {
            k.removeprefix("output/"): data[k] for k in data.files if k.startswith("output/")
        }
    return inputs, outputs


def run(path: str | os.PathLike, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of the model at ``path`` under onnxruntime (CPU, one thread), by name."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, inputs), strict=True))


def mismatches(fixture: Fixture, actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]):
    """Words for each output of ``actual`` that differs from the framework's ``expected``."""
    atol, rtol = tolerance(fixture)
    found = []
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            found.append(f"{name}: missing")
        elif got.shape != want.shape:
            found.append(f"{name}: shape {got.shape} != {want.shape}")
        elif want.dtype.kind in "iub":
            if not np.array_equal(got, want):
                found.append(f"{name}: {int((got != want).sum())} labels differ")
        elif not np.allclose(got, want, atol=atol, rtol=rtol):
            err = float(np.max(np.abs(got.astype(np.float64) - want)))
            found.append(f"{name}: max abs error {err:.3g} (atol {atol}, rtol {rtol})")
    return found


def _proto(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(os.fspath(model), load_external_data=False)


def count_ops(model: str | os.PathLike | onnx.ModelProto) -> collections.Counter:
    """``Counter`` of op types (any domain, by op type alone) in the main graph."""
    return collections.Counter(node.op_type for node in _proto(model).graph.node)


def count_linear(model: str | os.PathLike | onnx.ModelProto) -> int:
    """Constant-weight Gemm/Conv, MatMul with a constant operand, LinearRegressor/Classifier."""
    model = _proto(model)
    const = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in const):
            const.add(node.output[0])
    count = 0
    for node in model.graph.node:
        if node.op_type in ("Gemm", "Conv"):
            count += len(node.input) > 1 and node.input[1] in const
        elif node.op_type == "MatMul":
            count += any(name in const for name in node.input)
        elif node.op_type in ML_LINEAR and node.domain == "ai.onnx.ml":
            count += 1
    return count


@functools.cache
def _free_folds_module():
    spec = importlib.util.spec_from_file_location("_producers_free_folds", _FREE_FOLDS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_folds(model: str | os.PathLike | onnx.ModelProto) -> list[str]:
    """Where each free fold left in ``model`` is (``tests/archs/free_folds.py``'s heuristic)."""
    where: list[str] = []
    _free_folds_module().free_folds(_proto(model), where)
    return where


@dataclasses.dataclass
class Fused:
    """One fixture fused by ``converter.fuse_file`` (validation on), measured against its target."""

    fixture: Fixture
    linear_before: int
    linear_after: int | None = None
    batchnorm_before: int = 0
    batchnorm_after: int | None = None
    folds: list[str] = dataclasses.field(default_factory=list)
    over_bounds: list[str] = dataclasses.field(default_factory=list)
    lost: list[str] = dataclasses.field(default_factory=list)
    modified: bool = False
    validated: bool | None = None
    fusions: int = 0
    declined: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    checker: str | None = None
    output_errors: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def kept_outputs(self) -> bool:
        """``fuse_file`` exited cleanly, the result passes the checker and equals the framework."""
        return self.error is None and self.checker is None and not self.output_errors

    @property
    def validation(self) -> str:
        if self.error is not None:
            return "error"
        if not self.modified:
            return "unchanged"
        return "validated" if self.validated else "not validated"

    @property
    def reached(self) -> bool:
        """The hand-folded target: its linear-op count, no BN or free fold, no kernel lost."""
        return (
            self.kept_outputs
            and self.linear_after == self.fixture.hand_folded
            and self.batchnorm_after == 0
            and not self.folds
            and not self.over_bounds
            and not self.lost
        )

    def left(self) -> list[str]:
        """What stands between the fused model and the hand-folded one, in words."""
        if self.error is not None:
            return [f"fuse_file failed: {self.error}"]
        words = []
        if self.linear_after != self.fixture.hand_folded:
            words.append(f"linear ops {self.linear_after}, hand-folded {self.fixture.hand_folded}")
        if self.batchnorm_after:
            words.append(f"{self.batchnorm_after} BatchNormalization left")
        words += [f"free fold left: {w}" for w in self.folds]
        if self.over_bounds:
            words.append("over the hand-folded bounds: " + ", ".join(self.over_bounds))
        words += [f"fused kernel lost: {k}" for k in self.lost]
        if self.checker:
            words.append(f"checker: {self.checker}")
        words += [f"output {e}" for e in self.output_errors]
        return words

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fixture"] = self.fixture.name
        d.update(reached=self.reached, validation=self.validation, left=self.left())
        return d


def fuse(fixture: Fixture, out_dir: str | os.PathLike | None = None) -> Fused:
    """Fuse ``fixture`` with the defaults (validation on) into ``out_dir`` and measure it."""
    src = fixture.path
    original = _proto(src)
    ops = count_ops(original)
    result = Fused(fixture, count_linear(original), batchnorm_before=ops["BatchNormalization"])
    with tempfile.TemporaryDirectory(prefix="onnx-fuse-producers-") as tmp:
        dst = Path(out_dir or tmp) / f"{fixture.name}.fused.onnx"
        try:
            report = converter.fuse_file(src, dst, force=True)
        except converter.ConverterError as e:
            result.error = f"{type(e).__name__}: {e}"[:500]
            return result
        result.seconds = report.seconds
        result.modified, result.validated = report.modified, report.validated
        result.fusions = len(report.fusions)
        result.declined = [str(d) for d in report.declined]
        fused = _proto(dst)
        try:
            onnx.checker.check_model(fused, full_check=True)
        except Exception as e:  # the checker's own error types vary between onnx versions
            result.checker = f"{type(e).__name__}: {e}"[:300]
        after = count_ops(fused)
        result.linear_after = count_linear(fused)
        result.batchnorm_after = after["BatchNormalization"]
        result.folds = free_folds(fused)
        result.over_bounds = [
            f"{op} {after[op]} > {bound}"
            for op, bound in fixture.at_most.items()
            if after[op] > bound
        ]
        result.lost = lost_kernels(fused_kernels(src), fused_kernels(dst))
        inputs, expected = load_samples(fixture)
        result.output_errors = mismatches(fixture, run(dst, inputs), expected)
    return result
