"""Time two models under onnxruntime as a user would run them: the latency a rewrite gained.

:func:`benchmark` builds one session per model the way onnxruntime is deployed by default
(graph optimisations ``ORT_ENABLE_ALL``, ``threads`` intra-op threads, one inter-op thread, the
chosen provider), and a second session of the original. After an untimed first run of each,
it times rounds: every round runs each session ``runs_per_round`` times in a row (about
:data:`ROUND_SECONDS`), in an order that rotates by one each round, so no session always follows
the same one. All three run on the same inputs (validation's first trial, or inputs synthesised
the same way).

The figure of a session is the lower quartile (:data:`QUANTILE`) of its rounds' mean times per
run. On a shared machine, other work only ever adds time, in bursts as long as a scheduler's time
slice: with many short rounds, the fast quarter of them is the model's own cost, and a quartile,
unlike the minimum, does not rest on one lucky round. (On two cores loaded by other work, rounds
of 10 to 300 runs gave ratios that moved by up to 30% between repeats of the same benchmark,
whatever the statistic; 150 rounds of about a millisecond, within 1.5%.) The
original's figure is the mean of its two sessions', and the *noise* is how far apart they are,
``|a - a'| / mean``: the same model, timed the same way, differs by that much here and now
(1 to 3% between two sessions of a small transformer). The candidate is
*slower* when::

    candidate / original > 1 + max(noise, NOISE_FLOOR)

Time is bounded. Runs doubled in number until they took a twentieth of ``budget`` give the
cost of a run of each session; rounds then fill what is left of the budget, at most
:data:`MAX_ROUNDS`. A model too slow for that gets one run per round and at least
:data:`MIN_ROUNDS` rounds: beyond building the sessions, a large model costs about
``3 * (2 + MIN_ROUNDS)`` runs of it.

With several threads, the sessions' thread pools do not spin waiting for work between runs
(``session.intra_op.allow_spinning=0``): a pool spinning after its run would compete with the
next session's. The fused kernels onnxruntime makes of both models
(:func:`converter.equivalence.kernels.fused_kernels`) are reported beside the times: a rewrite
that costs the runtime a ``Gelu`` kernel runs more, smaller kernels.
"""

from __future__ import annotations

__all__ = [
    "MAX_ROUNDS",
    "MIN_ROUNDS",
    "NOISE_FLOOR",
    "QUANTILE",
    "ROUND_SECONDS",
    "BenchmarkOptions",
    "BenchmarkResult",
    "Timing",
    "benchmark",
    "benchmark_models",
    "describe_feeds",
    "measure",
    "options_of",
]

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from converter.equivalence.inputs import TrialInputs, trial_inputs
from converter.equivalence.kernels import fused_kernels, lost_kernels
from converter.equivalence.runtime import (
    ModelLike,
    load_side,
    model_source,
    one_line,
    ort_reason,
    ort_value,
)
from converter.errors import InputError

logger = logging.getLogger(__name__)

#: Each round runs a model for about this long (or once, if one run takes longer).
ROUND_SECONDS = 1e-3
#: The fewest rounds (a slow model), and the most (a fast one).
MIN_ROUNDS, MAX_ROUNDS = 3, 1000
#: A session's figure: this percentile of its rounds.
QUANTILE = 25
#: The smallest slowdown worth a warning, however quiet the machine.
NOISE_FLOOR = 0.02
_CALIBRATION = 20  # a twentieth of the budget estimates the cost of a run
_MAX_RUNS_PER_ROUND = 10_000
_CPU = "CPUExecutionProvider"
_FOLDER_KEY = "session.model_external_initializers_file_folder_path"

Timer = Callable[[], float]


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
    """How to time: ``threads`` intra-op threads, onnxruntime ``provider``, about ``budget``
    seconds of timed runs (see the module docstring)."""

    threads: int = 1
    provider: str = _CPU
    budget: float = 2.0

    def check(self) -> None:
        """Raise :class:`InputError` for a thread count, budget or provider that cannot be."""
        if not isinstance(self.threads, int) or self.threads < 1:
            raise InputError(f"benchmark threads must be at least 1, got {self.threads!r}")
        if not self.budget > 0:
            raise InputError(f"benchmark budget must be positive, got {self.budget!r} s")
        available = ort.get_available_providers()
        if self.provider not in available:
            raise InputError(
                f"benchmark provider '{self.provider}' is not available in this onnxruntime "
                f"(available: {', '.join(available)})"
            )


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    """Latency of the original and the candidate under onnxruntime, and what it means.

    Attributes:
        original_ms: The original's time per run (the mean of its two sessions' figures).
        candidate_ms: The candidate's time per run.
        ratio: ``candidate_ms / original_ms``: below 1 is faster.
        noise: How far apart the original's two sessions are, a share of ``original_ms``.
        slower: ``ratio > 1 + max(noise, NOISE_FLOOR)``: slower beyond the noise.
        threads: Intra-op threads of every session.
        provider: The onnxruntime execution provider.
        rounds: Timed rounds; ``runs_per_round``: consecutive runs per session in each.
        kernels_before: The fused kernels onnxruntime makes of the original (``{"Gelu": 12}``),
            ``None`` if they could not be counted; ``kernels_after`` the same of the candidate.
        inputs: What the models were fed (validation's first trial, say).
    """

    original_ms: float
    candidate_ms: float
    ratio: float
    noise: float
    slower: bool
    threads: int
    provider: str
    rounds: int
    runs_per_round: int
    kernels_before: dict[str, int] | None = dataclasses.field(default=None, hash=False)
    kernels_after: dict[str, int] | None = dataclasses.field(default=None, hash=False)
    inputs: str = ""

    @property
    def lost_kernels(self) -> list[str]:
        """Fused kernels the candidate has fewer of: ``["Gelu 12 -> 0"]``."""
        if self.kernels_before is None or self.kernels_after is None:
            return []
        return lost_kernels(self.kernels_before, self.kernels_after)

    @property
    def runtime(self) -> str:
        """``"onnxruntime CPU (1 thread)"``."""
        provider = self.provider.removesuffix("ExecutionProvider")
        return f"onnxruntime {provider} ({self.threads} thread{'s' * (self.threads > 1)})"

    def to_dict(self) -> dict[str, Any]:
        """Every field, and the lost kernels; JSON-serialisable."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("kernels_before", "kernels_after"):
            data[key] = None if data[key] is None else dict(data[key])
        data["lost_kernels"] = self.lost_kernels
        return data

    def summary_lines(self, *, verbose: bool = False) -> list[str]:
        """``latency under onnxruntime CPU (1 thread): 12.4 ms -> 10.9 ms (0.88x)``; the fused
        kernels when they differ (always with ``verbose``); with ``verbose`` how it was timed."""
        lines = [
            f"latency under {self.runtime}: {_ms(self.original_ms)} -> "
            f"{_ms(self.candidate_ms)} ({self.ratio:.2f}x)"
        ]
        before, after = self.kernels_before, self.kernels_after
        if before is not None and after is not None and (before != after or verbose):
            counts = [
                f"{op} {before.get(op, 0)} -> {after.get(op, 0)}" for op in {**before, **after}
            ]
            lines.append(f"fused kernels under onnxruntime: {', '.join(counts) or 'none'}")
        if verbose:
            lines.append(
                f"benchmark: {self.rounds} interleaved rounds of {self.runs_per_round} run(s) "
                f"per model, noise {self.noise:.1%} (the original against a second session of "
                f"itself), inputs: {self.inputs or 'given'}"
            )
        return lines

    def warnings(self, candidate: str = "the candidate") -> list[str]:
        """One line per finding the user should weigh: slower beyond noise, a lost kernel."""
        found = []
        if self.slower:
            found.append(
                f"benchmark: {candidate} is slower than the original under {self.runtime}: "
                f"{self.ratio:.2f}x its latency, beyond the noise of this measurement "
                f"({max(self.noise, NOISE_FLOOR):.1%})"
            )
        if lost := self.lost_kernels:
            found.append(
                f"benchmark: onnxruntime makes fewer fused kernels of {candidate}: {', '.join(lost)}"
            )
        return found


@dataclasses.dataclass(frozen=True)
class Timing:
    """What :func:`measure` found: seconds per run of each callable, and how it was timed."""

    seconds: tuple[float, ...]
    rounds: int
    runs_per_round: int


def benchmark(
    original: ModelLike,
    candidate: ModelLike,
    feeds: Mapping[str, np.ndarray],
    options: BenchmarkOptions | None = None,
    *,
    inputs: str = "",
    timer: Timer = time.perf_counter,
) -> BenchmarkResult:
    """Time ``original`` against ``candidate`` on ``feeds`` (see the module docstring).

    Raises:
        InputError: Bad options, or onnxruntime cannot build or run a session of a model
            with this provider (the message names the model and onnxruntime's reason).
    """
    options = options or BenchmarkOptions()
    options.check()
    with tempfile.TemporaryDirectory(prefix="onnx-fuse-benchmark-") as workdir:
        sources = {
            "original": model_source(original, workdir, "original"),
            "candidate": model_source(candidate, workdir, "candidate"),
        }
        runs = [
            _run_of(label, sources[label], feeds, options)
            for label in ("original", "original", "candidate")
        ]
        timing = measure(runs, budget=options.budget, timer=timer)
        del runs  # the sessions: memory for the kernel counts' sessions
        before, after = (_kernels(label, sources[label], workdir) for label in sources)
    first, second, fused = timing.seconds
    original_s = (first + second) / 2
    ratio = fused / original_s if original_s > 0 else 1.0
    noise = abs(first - second) / original_s if original_s > 0 else 0.0
    result = BenchmarkResult(
        original_ms=original_s * 1e3,
        candidate_ms=fused * 1e3,
        ratio=ratio,
        noise=noise,
        slower=ratio > 1 + max(noise, NOISE_FLOOR),
        threads=options.threads,
        provider=options.provider,
        rounds=timing.rounds,
        runs_per_round=timing.runs_per_round,
        kernels_before=before,
        kernels_after=after,
        inputs=inputs,
    )
    logger.info("%s", "; ".join(result.summary_lines(verbose=True)))
    return result


def benchmark_models(
    original: ModelLike,
    candidate: ModelLike,
    options: BenchmarkOptions | None = None,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> BenchmarkResult:
    """:func:`benchmark` on the inputs validation would feed first: the real ``inputs``, or
    its first synthetic trial (``seed``, ``input_shapes``), made by the same code."""
    interface = load_side(original, "original").interface
    feeds = trial_inputs(interface, inputs, input_shapes, 1, seed)[0]
    return benchmark(original, candidate, feeds.values, options, inputs=describe_feeds(feeds))


def describe_feeds(feeds: TrialInputs) -> str:
    """``"uniform[-1,1], sizes A (batch=2)"``: what the benchmarked models were fed."""
    dims = ", ".join(f"{k}={v}" for k, v in feeds.dims.items())
    return feeds.description + (f" ({dims})" if dims else "")


def options_of(benchmark: BenchmarkOptions | bool | None) -> BenchmarkOptions | None:
    """The options a ``benchmark=`` argument asks for (``True``: the defaults), checked."""
    if benchmark is None or benchmark is False:
        return None
    options = BenchmarkOptions() if benchmark is True else benchmark
    if not isinstance(options, BenchmarkOptions):
        raise InputError(f"benchmark must be a bool or BenchmarkOptions, not {benchmark!r}")
    options.check()
    return options


def measure(
    runs: Sequence[Callable[[], object]], *, budget: float, timer: Timer = time.perf_counter
) -> Timing:
    """Time each of ``runs`` in interleaved rounds within about ``budget`` seconds; return
    each one's figure, in seconds per run (see the module docstring)."""
    start = timer()
    for run in runs:  # the first run allocates and plans: never timed
        run()
    costs = [_cost(run, budget / (_CALIBRATION * len(runs)), timer) for run in runs]
    budget -= timer() - start
    per_round = max(1, min(_MAX_RUNS_PER_ROUND, int(ROUND_SECONDS / max(max(costs), 1e-9))))
    rounds = int(budget / (per_round * sum(costs))) if sum(costs) > 0 else MAX_ROUNDS
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, rounds))
    samples: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        for k in range(len(runs)):
            i = (k + r) % len(runs)
            samples[i].append(_time(runs[i], per_round, timer) / per_round)
    return Timing(tuple(_figure(s) for s in samples), rounds, per_round)


def _cost(run: Callable[[], object], least: float, timer: Timer) -> float:
    """Seconds per run of ``run``: runs doubled in number until they took ``least`` seconds
    (one run alone, right after another, is faster than runs in a row: caches are warm)."""
    times, spent = 1, _time(run, 1, timer)
    while spent < least and times < _MAX_RUNS_PER_ROUND:
        spent += _time(run, times, timer)
        times *= 2
    return spent / times


def _time(run: Callable[[], object], times: int, timer: Timer) -> float:
    start = timer()
    for _ in range(times):
        run()
    return timer() - start


def _figure(samples: Sequence[float]) -> float:
    """The lower quartile of the rounds (see the module docstring)."""
    return float(np.percentile(samples, QUANTILE))


def _run_of(
    label: str,
    source: tuple[bytes | str, str | None],
    feeds: Mapping[str, np.ndarray],
    options: BenchmarkOptions,
) -> Callable[[], object]:
    """One session of the model, and a call that runs it once on ``feeds``."""
    model, folder = source
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.intra_op_num_threads = options.threads
    session_options.inter_op_num_threads = 1
    session_options.log_severity_level = 3
    if options.threads > 1:
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if folder is not None:
        session_options.add_session_config_entry(_FOLDER_KEY, folder)
    providers = [options.provider] + ([_CPU] if options.provider != _CPU else [])
    try:
        session = ort.InferenceSession(model, session_options, providers=providers)
        names = [o.name for o in session.get_outputs()]
        values = {i.name: ort_value(np.asarray(feeds[i.name])) for i in session.get_inputs()}
        session.run_with_ort_values(names, values)
    except Exception as e:  # onnxruntime raises many types
        provider = options.provider.removesuffix("ExecutionProvider")
        raise InputError(
            f"onnxruntime {provider} cannot run the {label} model ({ort_reason(e)})"
        ) from e
    return lambda: session.run_with_ort_values(names, values)


def _kernels(
    label: str, source: tuple[bytes | str, str | None], workdir: str
) -> dict[str, int] | None:
    """The fused kernels onnxruntime makes of the model, or ``None`` if it cannot say."""
    model, _ = source
    if isinstance(model, bytes):
        path = os.path.join(workdir, f"{label}.kernels.onnx")
        with open(path, "wb") as f:
            f.write(model)
        model = path
    try:
        return fused_kernels(model)
    except Exception as e:  # onnxruntime raises many types; the counts are a bonus
        logger.info("fused kernels of the %s model not counted: %s", label, one_line(e))
        return None


def _ms(value: float) -> str:
    """``12.4 ms``, ``0.0456 ms``, ``1234 ms``."""
    return f"{value:.0f} ms" if value >= 100 else f"{value:.3g} ms"
