"""Prove with onnxruntime that a rewritten model computes what the original computes.

:func:`check_equivalence` runs both models on the same inputs -- several seeded synthetic trials
(see :mod:`converter.equivalence.inputs`) or real inputs from an ``.npz`` file -- and compares
every graph output. The verdict rests on the graph outputs alone: what a user of the model sees.

Each output is compared by the rule of :mod:`converter.equivalence.compare` (``|a - e| <= atol +
rtol * |e|``, per-dtype default tolerances, integers and bools exactly, error statistics); a float
output with elements beyond tolerance is judged again against the float64 evaluation of the
original graph (:mod:`converter.equivalence.reference`), which is built and run only then. A
model file is read only as far as needed (:mod:`converter.equivalence.sides`); the models run as
:mod:`converter.equivalence.runtime` describes (one session per model, both built at the same
time, reused by every trial). An output missing, extra or reordered, or inputs that differ, are
failures with that reason. The report keeps every output in every trial and, per output, the
worst trial.

Intermediate values named in ``extra_outputs`` (a fusion's output, say) are diagnostics: exposed as
graph outputs on private copies, compared by the same rule where they exist in both models
(small ones measured together, :func:`~converter.equivalence.compare.compare_many`), reported
(worst trial per value) and never a reason to fail. They are fetched in the first trial, and again
in any later trial whose outputs fail (that trial is run a second time with them): every value
onnxruntime hands back costs each run, and 10,000 fusion outputs cost more than the graph. A
value the candidate no longer has is reported as not measured. When an output fails, the report names the first
intermediate value, in the original graph's order, that was also beyond tolerance in a failing
trial (judged against the float64 reference when it ran): where the models first diverged.
"""

from __future__ import annotations

# OutputStats, compare_arrays and default_tolerance live in converter.equivalence.compare; re-exported here.
__all__ = [
    "EquivalenceReport",
    "OutputStats",
    "check_equivalence",
    "compare_arrays",
    "default_tolerance",
]

import concurrent.futures
import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from converter.equivalence import timing
from converter.equivalence.compare import (
    OutputStats,
    compare_arrays,
    compare_many,
    default_tolerance,
    dtype_name,
    judge_with_reference,
    needs_reference,
)
from converter.equivalence.inputs import TrialInputs, describe_input, model_inputs, trial_inputs
from converter.equivalence.reference import Reference
from converter.equivalence.runtime import (
    ModelLike,
    OnDisk,
    Runner,
    Side,
    expose,
    load_side,
    one_line,
    open_session,
    ort_reason,
)
from converter.equivalence.timing import BenchmarkOptions, BenchmarkResult
from converter.equivalence.widen import narrow_float_types, open_float32
from converter.errors import InputError, OriginalModelError
from converter.gcpause import paused_collection

logger = logging.getLogger(__name__)

Tolerance = float | Mapping[str, float] | None


# --------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class EquivalenceReport:
    """The result of :func:`check_equivalence`.

    Attributes:
        passed: Every output passed in every trial and there is no model-level failure.
        outputs: One entry per output, the worst trial for it (a failing one if any).
        results: Every output in every trial.
        trials: What each trial fed (description, symbolic dims, input shapes and dtypes).
        seed: The seed the synthetic trials were drawn with.
        reference: ``"used"``, ``"not needed"`` or ``"unavailable: <why>"``.
        failures: Model-level failures (the candidate does not load or run, outputs or inputs
            differ in names or order).
        intermediates: Diagnostics, one per ``extra_outputs`` value: the worst trial, or a
            ``measured=False`` entry saying why it could not be compared. Never decide ``passed``.
        first_divergence: When an output failed, the first intermediate value (in the original
            graph's order) beyond its tolerance in a failing trial; else ``None``.
        benchmark: With ``benchmark=``, both models' latency under onnxruntime
            (:class:`~converter.equivalence.timing.BenchmarkResult`), or ``None``.
        widened: ``""`` when both models ran in their own types; else how and why they ran
            as float32 copies (``"bfloat16 computed in float32: onnxruntime cannot run ..."``,
            see :mod:`converter.equivalence.widen`).
    """

    passed: bool
    outputs: tuple[OutputStats, ...]
    results: tuple[OutputStats, ...]
    trials: tuple[dict[str, Any], ...]
    seed: int
    reference: str = "not needed"
    failures: tuple[str, ...] = ()
    intermediates: tuple[OutputStats, ...] = ()
    first_divergence: str | None = None
    widened: str = ""
    benchmark: BenchmarkResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the whole report as JSON-serialisable data."""
        return {
            "passed": self.passed,
            "seed": self.seed,
            "trials": [dict(t) for t in self.trials],
            "reference": self.reference,
            "widened": self.widened,
            "failures": list(self.failures),
            "outputs": [s.to_dict() for s in self.outputs],
            "results": [s.to_dict() for s in self.results],
            "first_divergence": self.first_divergence,
            "intermediates": [s.to_dict() for s in self.intermediates],
            "benchmark": None if self.benchmark is None else self.benchmark.to_dict(),
        }

    def __str__(self) -> str:
        lines = [
            f"equivalence {'PASS' if self.passed else 'FAIL'} (outputs: {len(self.outputs)}, "
            f"trials: {len(self.trials)}, seed: {self.seed}, float64 reference: {self.reference})"
        ]
        if self.widened:
            lines.append(f"computed in float32: {self.widened}")
        for trial in self.trials:
            dims = ", ".join(f"{k}={v}" for k, v in trial["dims"].items())
            lines.append(
                f"trial {trial['index']}: {trial['description']}" + (f" ({dims})" if dims else "")
            )
            lines.extend(f"  {s}" for s in self.results if s.trial == trial["index"])
        lines.extend(f"FAIL: {failure}" for failure in self.failures)
        if self.intermediates:
            lines.append("intermediate values (diagnostics, worst trial; they do not decide):")
            lines.extend(f"  {s}" for s in self.intermediates)
        if self.first_divergence is not None:
            lines.append(f"first divergence: '{self.first_divergence}'")
        if self.benchmark is not None:
            lines.extend(self.benchmark.summary_lines(verbose=True))
        return "\n".join(lines)


# --------------------------------------------------------------------------- the check


@paused_collection()
def check_equivalence(
    original: ModelLike,
    candidate: ModelLike,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    atol: Tolerance = None,
    rtol: Tolerance = None,
    trials: int = 3,
    seed: int = 0,
    extra_outputs: Sequence[str] = (),
    benchmark: BenchmarkOptions | bool | None = None,
) -> EquivalenceReport:
    """Run ``original`` and ``candidate`` on the same inputs and compare their outputs.

    Args:
        original: The reference model: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``
            (never modified).
        candidate: The model to check, in any of the same forms.
        inputs: Real inputs (name -> array, or an ``.npz`` path); then one trial is run.
        input_shapes: Input name -> shape for synthetic inputs; other dims get defaults.
        atol: ``None`` (per-dtype default), one float for every output, or output name -> float
            (outputs not named keep the default). Ignored for integer, bool and string outputs.
        rtol: Same as ``atol``.
        trials: Number of synthetic trials (see :mod:`converter.equivalence.inputs`).
        seed: Seed of the synthetic inputs.
        extra_outputs: Intermediate values of the original to compare as diagnostics where
            the candidate has them too (see the module docstring); they never decide the verdict.
        benchmark: ``True`` or :class:`~converter.equivalence.timing.BenchmarkOptions`: also
            time both models under onnxruntime on the first trial's inputs, unless the
            candidate failed to load or run (:attr:`EquivalenceReport.benchmark`; ``None``,
            and a logged warning, when onnxruntime cannot run them with the options' provider).

    Raises:
        InputError: Unreadable models or inputs, bad options (an unavailable benchmark
            provider), an unknown ``extra_outputs`` name.
        OriginalModelError: The original model does not load or run in onnxruntime.
    """
    timed = timing.options_of(benchmark)
    orig, cand = load_side(original, "original"), load_side(candidate, "candidate")
    intermediates = _checked_options(orig, extra_outputs, atol, rtol, trials)
    feeds = trial_inputs(orig.interface, inputs, input_shapes, trials, seed)
    failures = _interface_failures(orig, cand)
    absent = set(expose(cand, intermediates))
    measured = [n for n in intermediates if n not in absent]
    with tempfile.TemporaryDirectory(prefix="onnx-fuse-validate-") as workdir:
        original_runner, candidate_runner, widened = _open_both(orig, cand, workdir, failures)
        reference = Reference(orig, workdir)
        runners = _Runners(original_runner, candidate_runner, orig, set(intermediates))
        tolerances = (atol, rtol)
        runs = [
            _one_trial(runners, trial, trial is feeds[0], measured, tolerances, failures, reference,
                       synthesised=inputs is None)
            for trial in feeds
        ]  # fmt: skip
    diagnostics = _diagnostics(runs, intermediates, absent, orig)
    report = _make_report(runs, orig.outputs, feeds, seed, reference.note, failures)
    if timed is not None and not failures:
        diagnostics["benchmark"] = _benchmark(original, candidate, feeds[0], timed)
    return dataclasses.replace(report, widened=widened, **diagnostics)


def _checked_options(
    orig: Side, extra_outputs: Sequence[str], atol: Tolerance, rtol: Tolerance, trials: int
) -> list[str]:
    """The original's values to compare besides its outputs, exposed; the options checked."""
    if trials < 1:
        raise InputError(f"trials must be at least 1, got {trials}")
    graph_outputs = set(orig.outputs)
    intermediates = [n for n in dict.fromkeys(extra_outputs) if n and n not in graph_outputs]
    if missing := expose(orig, intermediates):
        raise InputError(f"extra output '{missing[0]}' is not a value of the {orig.label}")
    _check_tolerances(atol, "atol", orig.outputs + intermediates)
    _check_tolerances(rtol, "rtol", orig.outputs + intermediates)
    return intermediates


def _one_trial(
    runners: _Runners,
    trial: TrialInputs,
    first: bool,
    measured: list[str],
    tolerances: tuple[Tolerance, Tolerance],
    failures: list[str],
    reference: Reference,
    *,
    synthesised: bool,
) -> _TrialResult:
    """Run and compare one trial. Intermediate values are fetched in the first trial, and again
    in any trial whose outputs fail (to name the first divergence): each costs every run."""
    atol, rtol = tolerances
    full = first or not measured
    run = runners.run(trial, atol, rtol, failures, full=full, synthesised=synthesised)
    orig_outputs = runners.side.outputs
    result = _compare_trial(run, orig_outputs, measured if full else (), reference, trial.values)
    if result.failed and not full and not isinstance(run.actual, str):
        run = runners.run(trial, atol, rtol, failures, full=True, synthesised=synthesised)
        result = _compare_trial(run, orig_outputs, measured, reference, trial.values)
    return result


def _benchmark(
    original: ModelLike, candidate: ModelLike, feeds: TrialInputs, options: BenchmarkOptions
) -> BenchmarkResult | None:
    """Both models timed on ``feeds``, or ``None`` (and a warning) if onnxruntime cannot."""
    if isinstance(candidate, OnDisk):  # the file: validation added outputs to the model
        candidate = candidate.path
    try:
        inputs = timing.describe_feeds(feeds)
        return timing.benchmark(original, candidate, feeds.values, options, inputs=inputs)
    except InputError as e:
        logger.warning("benchmark skipped: %s", e)
        return None


@dataclasses.dataclass
class _Runners:
    """Both sessions, and which of their outputs are graph outputs (the rest: diagnostics)."""

    original: Runner
    candidate: Runner | None
    side: Side
    intermediates: set[str]

    def run(
        self,
        trial: TrialInputs,
        atol: Tolerance,
        rtol: Tolerance,
        failures: list[str],
        *,
        full: bool,
        synthesised: bool,
    ) -> _TrialRun:
        """One trial in both models: every output (``full``), or the graph outputs only."""
        names = None if full else self._graph_outputs(self.original)
        expected = _run_original(
            self.original, self.side, trial, synthesised=synthesised, names=names
        )
        names = None if full or self.candidate is None else self._graph_outputs(self.candidate)
        actual = _run_candidate(self.candidate, trial, failures, names=names)
        return _TrialRun(trial.index, expected, actual, atol, rtol)

    def _graph_outputs(self, runner: Runner) -> list[str]:
        return [n for n in runner.output_names if n not in self.intermediates]


@dataclasses.dataclass
class _TrialRun:
    index: int
    expected: dict[str, np.ndarray]
    actual: dict[str, np.ndarray] | str  # the reason when the candidate did not run
    atol: Tolerance
    rtol: Tolerance


@dataclasses.dataclass
class _TrialResult:
    outputs: list[OutputStats]  # the graph outputs: the verdict
    values: list[OutputStats]  # the intermediate values measured: diagnostics

    @property
    def failed(self) -> bool:
        return not all(s.passed for s in self.outputs)


def _check_tolerances(tolerance: Tolerance, flag: str, names: Sequence[str]) -> None:
    values = tolerance.items() if isinstance(tolerance, Mapping) else [("", tolerance)]
    for name, value in values:
        if name and name not in names:
            raise InputError(
                f"--{flag} names '{name}', which is not an output of the original model "
                f"(outputs: {', '.join(names)})"
            )
        if value is not None and not float(value) >= 0:
            raise InputError(f"--{flag} must be >= 0, got {value}")


def _tolerance_for(tolerance: Tolerance, name: str) -> float | None:
    if isinstance(tolerance, Mapping):
        return tolerance.get(name)
    return tolerance


def _interface_failures(orig: Side, cand: Side) -> list[str]:
    """Differences in the graph inputs and outputs, which callers would notice."""
    failures = []
    known = set(orig.outputs)
    extra = [n for n in cand.outputs if n not in known]
    if extra:
        failures.append(f"the candidate has outputs the original does not: {', '.join(extra)}")
    if set(cand.outputs) == set(orig.outputs) and cand.outputs != orig.outputs:
        failures.append(
            f"outputs are in another order: original {orig.outputs}, candidate {cand.outputs}"
        )
    wanted = [_input_signature(v) for v in model_inputs(orig.interface)]
    found = [_input_signature(v) for v in model_inputs(cand.interface)]
    if wanted != found:
        failures.append(f"inputs differ: original {wanted}, candidate {found}")
    return failures


def _input_signature(value: ir.Value) -> str:
    """Name and element type (dimension names may differ between equal models)."""
    return f"{value.name}: {describe_input(value).split('[')[0]}"


def _open_both(
    orig: Side, cand: Side, workdir: str, failures: list[str]
) -> tuple[Runner, Runner | None, str]:
    """Both sessions, and ``""`` or how they compute when not in the models' own types.

    An original onnxruntime cannot load, that holds float types narrower than float32 (a
    bfloat16 export: the CPU provider has no bfloat16 ``Mul``), is run as its float32 copy, and
    so is the candidate (:mod:`converter.equivalence.widen`)."""
    try:
        return (*_open_pair(orig, cand, workdir, failures), "")
    except OriginalModelError as error:
        narrow = narrow_float_types(orig.model)
        if not narrow:
            raise
        reason = ort_reason(error.__cause__)
    types = ", ".join(narrow)
    try:
        original = open_float32(orig, workdir, "original.float32")
    except Exception as e:  # onnxruntime raises many types
        raise OriginalModelError(
            f"onnxruntime cannot load the {orig.label} ({reason}), nor its float32 copy "
            f"({ort_reason(e)})"
        ) from e
    failures[:] = [f for f in failures if not f.startswith("onnxruntime cannot load")]
    candidate = _open_candidate(cand, workdir, failures, float32=True)
    note = (
        f"{types} computed in float32: onnxruntime cannot run the original model in {types} "
        f"({reason})"
    )
    logger.info("validation: %s", note)
    return original, candidate, note


def _open_pair(
    orig: Side, cand: Side, workdir: str, failures: list[str]
) -> tuple[Runner, Runner | None]:
    """Both sessions, built at the same time: onnxruntime lets go of the interpreter for much
    of the work, so on two cores the pair costs about as much as the larger one (3.7 -> 2.7 s
    for a graph of 30,000 nodes and its fused copy)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="onnx-fuse-session") as pool:
        original = pool.submit(_open_original, orig, workdir)
        candidate = _open_candidate(cand, workdir, failures)
        return original.result(), candidate  # the original's error, if any, is raised here


def _open_original(side: Side, workdir: str) -> Runner:
    try:
        return open_session(side, workdir, "original")
    except Exception as e:  # onnxruntime raises many types
        raise OriginalModelError(f"onnxruntime cannot load the {side.label}: {one_line(e)}") from e


def _open_candidate(
    side: Side, workdir: str, failures: list[str], *, float32: bool = False
) -> Runner | None:
    if any(f.startswith("inputs differ") for f in failures):
        return None
    try:
        if float32:
            return open_float32(side, workdir, "candidate.float32")
        return open_session(side, workdir, "candidate")
    except Exception as e:  # onnxruntime raises many types
        copy = " (its float32 copy)" if float32 else ""
        failures.append(f"onnxruntime cannot load the {side.label}{copy}: {one_line(e)}")
        return None


def _run_original(
    runner: Runner,
    side: Side,
    trial: TrialInputs,
    *,
    synthesised: bool,
    names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    try:
        return runner.run(trial.values, names)
    except Exception as e:  # onnxruntime raises many types
        raise OriginalModelError(_original_failure(side, trial, e, synthesised)) from e


def _original_failure(side: Side, trial: TrialInputs, error: Exception, synthesised: bool) -> str:
    """One line: what failed, on which inputs, what onnxruntime said, what the user can do."""
    if not synthesised:
        return f"the {side.label} fails to run on the given inputs: {one_line(error)}"
    dims = ", ".join(f"{k}={v}" for k, v in trial.dims.items())
    scalars = [v.name for v in model_inputs(side.interface) if _is_scalar_int(v)]
    hint = "".join(f"; scalar int input '{n}' needs a real value" for n in scalars)
    return (
        f"the {side.label} fails to run on synthesised inputs (trial {trial.index}: "
        f"{trial.description}{', ' + dims if dims else ''}): {one_line(error)}; "
        f"pass --input-shape NAME:D1,D2 or --inputs FILE.npz{hint}"
    )


def _is_scalar_int(value: ir.Value) -> bool:
    return value.shape is not None and len(value.shape) == 0 and _is_int(value.dtype)


def _is_int(dtype: ir.DataType | None) -> bool:
    return dtype is not None and dtype.is_integer()


def _run_candidate(
    runner: Runner | None,
    trial: TrialInputs,
    failures: list[str],
    names: Sequence[str] | None = None,
) -> dict[str, np.ndarray] | str:
    if runner is None:
        return "the candidate could not be run (see the failures)"
    try:
        return runner.run(trial.values, names)
    except Exception as e:  # onnxruntime raises many types
        reason = f"the candidate fails to run on trial {trial.index}: {one_line(e)}"
        failures.append(reason)
        return reason


def _compare_trial(
    run: _TrialRun,
    outputs: Sequence[str],
    measured: Sequence[str],
    reference: Reference,
    feeds: Mapping[str, np.ndarray],
) -> _TrialResult:
    """Compare one trial's outputs (asking the float64 reference about float failures) and,
    as diagnostics, its intermediate values (against the reference too if an output failed)."""
    stats = [_compare_output(run, name) for name in outputs]
    values = [] if isinstance(run.actual, str) else _compare_values(run, measured)
    doubtful = {s.name for s in stats if needs_reference(s, run.expected[s.name])}
    ref = reference.run(feeds, run.index) if doubtful else None
    result = _TrialResult(_judge(run, stats, ref, doubtful), values)
    if ref is not None and result.failed:
        result.values = _judge(run, values, ref, {s.name for s in values if not s.passed})
    return result


def _judge(
    run: _TrialRun,
    stats: list[OutputStats],
    ref: Mapping[str, np.ndarray] | None,
    names: set[str],
) -> list[OutputStats]:
    """Judge the float values ``names`` again against the float64 reference outputs ``ref``."""
    if ref is None:
        return stats
    return [
        judge_with_reference(s, ref[s.name], run.expected[s.name], run.actual[s.name])
        if s.name in names and s.name in ref and needs_reference(s, run.expected[s.name])
        else s
        for s in stats
    ]


def _compare_output(run: _TrialRun, name: str) -> OutputStats:
    expected = run.expected[name]
    if isinstance(run.actual, str) or name not in run.actual:
        reason = run.actual if isinstance(run.actual, str) else "missing from the candidate"
        return OutputStats(
            name,
            run.index,
            False,
            reason=reason,
            shape=tuple(expected.shape),
            dtype=dtype_name(expected.dtype),
        )
    return compare_arrays(
        expected,
        run.actual[name],
        atol=_tolerance_for(run.atol, name),
        rtol=_tolerance_for(run.rtol, name),
        name=name,
        trial=run.index,
    )


def _compare_values(run: _TrialRun, names: Sequence[str]) -> list[OutputStats]:
    """Intermediate values, by the same rule; only the cheap statistics, measured together."""
    actual = run.actual if isinstance(run.actual, dict) else {}
    return compare_many(
        (
            (
                name,
                run.expected[name],
                actual[name],
                _tolerance_for(run.atol, name),
                _tolerance_for(run.rtol, name),
            )
            for name in names
        ),
        trial=run.index,
    )


def _make_report(
    runs: Sequence[_TrialResult],
    names: Sequence[str],
    trials: Sequence[TrialInputs],
    seed: int,
    reference: str,
    failures: list[str],
) -> EquivalenceReport:
    results = [s for run in runs for s in run.outputs]
    outputs = tuple(_worst(stats) for stats in _by_name(results, names).values())
    passed = not failures and all(s.passed for s in results)
    for stats in outputs:
        logger.debug("%s", stats)
    logger.info("equivalence %s over %d trials", "passed" if passed else "failed", len(trials))
    return EquivalenceReport(
        passed=passed,
        outputs=outputs,
        results=tuple(results),
        trials=tuple(t.to_dict() for t in trials),
        seed=seed,
        reference=reference,
        failures=tuple(dict.fromkeys(failures)),
    )


def _diagnostics(
    runs: Sequence[_TrialResult], names: Sequence[str], absent: set[str], original: Side
) -> dict[str, Any]:
    """The intermediate values' worst trials (or why not measured) and the first divergence."""
    by_name = _by_name([s for run in runs for s in run.values], names)
    values = tuple(
        _worst(stats) if stats else _not_measured(name, name in absent)
        for name, stats in by_name.items()
    )
    diverged = {s.name for run in runs if run.failed for s in run.values if not s.passed}
    return {"intermediates": values, "first_divergence": original.first_produced(diverged)}


def _not_measured(name: str, absent: bool) -> OutputStats:
    reason = (
        "not measured: the value no longer exists in the candidate model (a rewrite removed it)"
        if absent
        else "not measured: the candidate did not run"
    )
    return OutputStats(name, -1, False, intermediate=True, reason=reason, measured=False)


def _by_name(stats: Sequence[OutputStats], names: Sequence[str]) -> dict[str, list[OutputStats]]:
    grouped: dict[str, list[OutputStats]] = {name: [] for name in names}
    for s in stats:
        grouped[s.name].append(s)
    return grouped


def _worst(stats: Sequence[OutputStats]) -> OutputStats:
    """The failing trial if any, else the one using the most of its tolerance."""

    def severity(s: OutputStats) -> tuple[bool, float]:
        used = s.tolerance_used
        return (not s.passed, math.inf if math.isnan(used) else used)

    return max(stats, key=severity)
