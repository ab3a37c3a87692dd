"""The comparison rule, its default tolerances and the statistics of one output (pure numpy).

Comparison rule, per element, in float64 (``e`` from the original, ``a`` from the candidate)::

    |a - e| <= atol + rtol * |e|        NaN == NaN, +Inf == +Inf, -Inf == -Inf

Integer, bool and string outputs must match exactly. Nothing is broadcast: an output with another
shape or dtype is a failure with that reason.

Default tolerances, by output dtype (:func:`default_tolerance`):

=====================  ========  ========
dtype                  atol      rtol
=====================  ========  ========
float64, complex128    1e-8      1e-7
float32, complex64     1e-5      1e-4
float16                2.5e-3    1e-3
bfloat16               2e-2      1e-2
float8 / float4 types  0.125     0.125
integer, bool, string  exact     exact
=====================  ========  ========

Float64 reference (:func:`judge_with_reference`). Merging reassociates sums, so on wide layers
a correct candidate can differ from the original by more than a fixed tolerance while being as
close to the exact result. When a floating-point output has elements beyond the rule above, the
original graph is evaluated in float64 (see :mod:`converter.equivalence.reference`) and each such
element is accepted when the candidate is no further from the float64 value ``r`` than twice the
original's largest error on that output::

    |a - r| <= 2 * max_j |e_j - r_j|

So an output passes where every element is within tolerance of the original *or* about as close
as the original to the float64 evaluation of the same graph. Both largest errors are reported.

``tolerance_used`` is the largest, over the elements, of the share of its allowance an element
uses under the criterion most favourable to it: ``|a - e| / (atol + rtol * |e|)``, or, when the
float64 reference was consulted, the smaller of that and ``|a - r| / (2 * max_j |e_j - r_j|)``.
An output compared element by element passes exactly when ``tolerance_used <= 1``. Exact
comparisons (integer, bool) use 0 (equal) or ``inf`` (different).

Statistics per output and trial: max / mean / median / p99 of the absolute error and of the
relative error ``|a - e| / max(|e|, atol)`` (``atol`` replaced by the smallest normal float64
when zero), ``tolerance_used``, and the index of the worst element (the one closest to, or
furthest beyond, its allowance). Statistics are ``nan`` when nothing could be compared (a missing
output, a shape mismatch, a string output); ``summary=False`` keeps only the max abs error,
``tolerance_used`` and ``mismatches`` (the rest ``nan``), for cheap diagnostics of many values;
:func:`compare_many` gives the same for many values at once, small float arrays measured together
in a few vectorised passes. Scalar (0-d), empty and size-1 outputs compare like any other.
"""

from __future__ import annotations

__all__ = [
    "OutputStats",
    "compare_arrays",
    "compare_many",
    "default_tolerance",
    "dtype_kind",
    "dtype_name",
    "ir_dtype",
    "judge_with_reference",
    "needs_reference",
]

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

_DEFAULT_TOLERANCES = {
    ir.DataType.DOUBLE: (1e-8, 1e-7),
    ir.DataType.COMPLEX128: (1e-8, 1e-7),
    ir.DataType.FLOAT: (1e-5, 1e-4),
    ir.DataType.COMPLEX64: (1e-5, 1e-4),
    ir.DataType.FLOAT16: (2.5e-3, 1e-3),
    ir.DataType.BFLOAT16: (2e-2, 1e-2),
}
_LOW_PRECISION_TOLERANCE = (0.125, 0.125)  # float8 and float4 types
_REFERENCE_FACTOR = 2.0
_P99 = 0.99
_NAN = float("nan")
# compare_many measures float arrays up to this many elements together, in batches of about
# _BATCH elements (float64 temporaries of a few tens of MB); larger arrays one by one.
_SMALL = 1 << 14
_BATCH = 1 << 20


# --------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class OutputStats:
    """How one output (or exposed intermediate value) compared in one trial.

    Error statistics are ``nan`` when nothing could be compared; the reference errors are
    ``None`` unless the float64 reference was run for this output. ``measured`` is ``False`` for
    an intermediate value that could not be compared at all (``reason`` says why, e.g. it no
    longer exists in the candidate); ``trial`` is then ``-1``.
    """

    name: str
    trial: int
    passed: bool
    intermediate: bool = False
    reason: str = ""
    shape: tuple[int, ...] | None = None
    dtype: str = ""
    atol: float = 0.0
    rtol: float = 0.0
    size: int = 0
    mismatches: int = 0
    max_abs_error: float = _NAN
    mean_abs_error: float = _NAN
    median_abs_error: float = _NAN
    p99_abs_error: float = _NAN
    max_rel_error: float = _NAN
    mean_rel_error: float = _NAN
    median_rel_error: float = _NAN
    p99_rel_error: float = _NAN
    tolerance_used: float = _NAN
    worst_index: tuple[int, ...] | None = None
    worst_expected: Any = None
    worst_actual: Any = None
    candidate_reference_error: float | None = None
    original_reference_error: float | None = None
    accepted_by_reference: bool = False
    measured: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return every field; JSON-serialisable (``json.dumps`` writes nan/inf as NaN/Infinity)."""
        # Every field is a scalar or a tuple of ints: no deep copy (asdict) needed, and reports
        # of many thousand values are built often enough for the difference to show.
        data = {f.name: getattr(self, f.name) for f in _FIELDS}
        for key in ("shape", "worst_index"):
            data[key] = None if data[key] is None else list(data[key])
        return data

    def __str__(self) -> str:
        label = f"{self.name} (intermediate)" if self.intermediate else self.name
        if not self.measured:
            return f"NOT MEASURED {label}: {self.reason}"
        shape = "?" if self.shape is None else list(self.shape)
        text = (
            f"{'PASS' if self.passed else 'FAIL'} {label} {shape} {self.dtype}: "
            f"max abs {self.max_abs_error:.3g}, max rel {self.max_rel_error:.3g}, "
            f"mean abs {self.mean_abs_error:.3g} (atol {self.atol:g}, rtol {self.rtol:g})"
        )
        if self.candidate_reference_error is not None:
            text += (
                f"; vs float64 reference: fused error {self.candidate_reference_error:.3g}, "
                f"original error {self.original_reference_error:.3g}"
            )
        return f"{text} -- {self.reason}" if self.reason else text


_FIELDS = dataclasses.fields(OutputStats)
_DEFAULTS = {f.name: f.default for f in _FIELDS}


def _new_stats(**fields: Any) -> OutputStats:
    """``OutputStats(**fields)`` without the frozen dataclass's ``__init__``, which sets its 29
    fields one ``object.__setattr__`` at a time: a tenth of the cost, for thousands of values."""
    stats = object.__new__(OutputStats)
    stats.__dict__.update(_DEFAULTS, **fields)
    return stats


# --------------------------------------------------------------------------- comparison


@functools.lru_cache(maxsize=64)
def _tolerance_of_dtype(dtype: np.dtype) -> tuple[float, float]:
    return default_tolerance(dtype)


def default_tolerance(dtype: ir.DataType | np.dtype | type) -> tuple[float, float]:
    """Return the default ``(atol, rtol)`` for outputs of ``dtype`` (table in the module doc).

    Integer, bool and string types get ``(0.0, 0.0)``: they are compared exactly.
    """
    dt = dtype if isinstance(dtype, ir.DataType) else ir_dtype(np.dtype(dtype))
    if dt in _DEFAULT_TOLERANCES:
        return _DEFAULT_TOLERANCES[dt]
    if dt is not None and dt.is_floating_point():
        return _LOW_PRECISION_TOLERANCE
    return (0.0, 0.0)


def compare_arrays(
    expected: np.ndarray,
    actual: np.ndarray,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "",
    trial: int = 0,
    intermediate: bool = False,
    summary: bool = True,
) -> OutputStats:
    """Compare one candidate array with the original's under the module's rule.

    ``atol``/``rtol`` of ``None`` take :func:`default_tolerance`; they are ignored (exact
    comparison) for integer, bool and string arrays. ``summary=False`` computes only the max
    abs error, ``tolerance_used`` and ``mismatches`` (a sixth of the time on small arrays).
    """
    expected, actual = np.asarray(expected), np.asarray(actual)
    kind = dtype_kind(expected.dtype)
    default = _tolerance_of_dtype(expected.dtype)
    exact = kind in ("exact", "string")
    atol = 0.0 if exact else (default[0] if atol is None else float(atol))
    rtol = 0.0 if exact else (default[1] if rtol is None else float(rtol))
    base = OutputStats(
        name,
        trial,
        False,
        intermediate,
        shape=tuple(expected.shape),
        dtype=dtype_name(expected.dtype),
        atol=atol,
        rtol=rtol,
        size=int(expected.size),
    )
    problem = _layout_problem(expected, actual)
    if problem:
        return dataclasses.replace(base, reason=problem)
    if kind == "string":
        return _compare_strings(base, expected, actual)
    if not summary:
        return _measure(base, expected, actual, exact=exact)
    return _compare_numbers(base, expected, actual, exact=exact)


Pair = tuple[str, np.ndarray, np.ndarray, float | None, float | None]


def compare_many(pairs: Iterable[Pair], *, trial: int = 0) -> list[OutputStats]:
    """``compare_arrays(expected, actual, atol=, rtol=, name=, trial=, intermediate=True,
    summary=False)`` for each ``(name, expected, actual, atol, rtol)``, in order.

    The results are the same as one call per pair; float arrays of the same dtype and layout
    up to ``_SMALL`` elements are measured together (one concatenation, one pass of the rule,
    per-array maxima and counts by ``reduceat``), so thousands of small values cost a few
    milliseconds instead of a few seconds.
    """
    pairs = list(pairs)
    results: list[OutputStats | None] = [None] * len(pairs)
    groups: dict[np.dtype, list[int]] = {}
    for i, (name, expected, actual, atol, rtol) in enumerate(pairs):
        if _batchable(expected, actual):
            groups.setdefault(expected.dtype, []).append(i)
        else:
            results[i] = compare_arrays(
                expected,
                actual,
                atol=atol,
                rtol=rtol,
                name=name,
                trial=trial,
                intermediate=True,
                summary=False,
            )
    for indices in groups.values():
        for batch in _batches(indices, [pairs[i][1].size for i in indices]):
            for i, stats in zip(
                batch, _measure_batch([pairs[i] for i in batch], trial), strict=True
            ):
                results[i] = stats
    return results  # type: ignore[return-value]  # every slot is filled


def _batchable(expected: Any, actual: Any) -> bool:
    """Plain numpy floats of one dtype and shape, small and not empty."""
    return (
        isinstance(expected, np.ndarray)
        and isinstance(actual, np.ndarray)
        and expected.dtype == actual.dtype
        and expected.dtype.kind == "f"
        and expected.shape == actual.shape
        and 0 < expected.size <= _SMALL
    )


def _batches(indices: Sequence[int], sizes: Sequence[int]) -> Iterable[list[int]]:
    batch: list[int] = []
    total = 0
    for index, size in zip(indices, sizes, strict=True):
        if batch and total + size > _BATCH:
            yield batch
            batch, total = [], 0
        batch.append(index)
        total += size
    if batch:
        yield batch


def _measure_batch(pairs: Sequence[Pair], trial: int) -> list[OutputStats]:
    """:func:`_measure` of many same-dtype float pairs, in one vectorised pass."""
    dtype = pairs[0][1].dtype
    default = _tolerance_of_dtype(dtype)
    atols = [default[0] if p[3] is None else float(p[3]) for p in pairs]
    rtols = [default[1] if p[4] is None else float(p[4]) for p in pairs]
    sizes = np.array([p[1].size for p in pairs])
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    expected = np.concatenate([p[1].ravel() for p in pairs])
    abs_err = _abs_error(expected, np.concatenate([p[2].ravel() for p in pairs]))
    magnitude = np.abs(expected.astype(np.float64))
    with np.errstate(invalid="ignore", over="ignore"):
        bound = (
            np.repeat(np.asarray(atols), sizes) + np.repeat(np.asarray(rtols), sizes) * magnitude
        )
    bound[~np.isfinite(magnitude)] = 0.0
    max_err = np.maximum.reduceat(abs_err, starts)
    used = np.maximum.reduceat(_safe_ratio(abs_err, bound), starts)
    mismatches = np.add.reduceat((abs_err > bound).astype(np.int64), starts)
    dtype_label = dtype_name(dtype)
    return [
        _new_stats(
            name=pair[0],
            trial=trial,
            passed=not count,
            intermediate=True,
            reason=f"{count} of {size} elements beyond tolerance" if count else "",
            shape=tuple(pair[1].shape),
            dtype=dtype_label,
            atol=atol,
            rtol=rtol,
            size=size,
            mismatches=count,
            max_abs_error=err,
            tolerance_used=share,
        )
        for pair, atol, rtol, size, count, err, share in zip(
            pairs,
            atols,
            rtols,
            sizes.tolist(),
            mismatches.tolist(),
            max_err.tolist(),
            used.tolist(),
            strict=True,
        )
    ]


def _layout_problem(expected: np.ndarray, actual: np.ndarray) -> str:
    """Say why two arrays cannot be compared element by element, or return ``""``."""
    if dtype_name(expected.dtype) != dtype_name(actual.dtype):
        return (
            f"dtype differs: original {dtype_name(expected.dtype)}, "
            f"candidate {dtype_name(actual.dtype)}"
        )
    if expected.shape != actual.shape:
        return f"shape differs: original {list(expected.shape)}, candidate {list(actual.shape)}"
    return ""


def _compare_strings(base: OutputStats, expected: np.ndarray, actual: np.ndarray) -> OutputStats:
    differs = expected.astype(str) != actual.astype(str)
    count = int(differs.sum())
    if not count:
        return dataclasses.replace(base, passed=True)
    index = np.unravel_index(int(np.argmax(differs)), differs.shape)
    return dataclasses.replace(
        base,
        mismatches=count,
        reason=f"{count} of {base.size} strings differ",
        worst_index=tuple(int(i) for i in index),
        worst_expected=str(expected[index]),
        worst_actual=str(actual[index]),
    )


def _measure(
    base: OutputStats, expected: np.ndarray, actual: np.ndarray, *, exact: bool
) -> OutputStats:
    """The rule with only max abs error, ``tolerance_used`` and the count beyond tolerance."""
    abs_err = _abs_error(expected, actual)
    if exact:
        violated = np.asarray(expected != actual)
        used = np.inf if violated.any() else 0.0
    else:
        bound = _allowance(base, expected)[1]
        violated = abs_err > bound
        used = float(_safe_ratio(abs_err, bound).max()) if abs_err.size else 0.0
    mismatches = int(violated.sum())
    return dataclasses.replace(
        base,
        passed=mismatches == 0,
        mismatches=mismatches,
        max_abs_error=float(abs_err.max()) if abs_err.size else 0.0,
        tolerance_used=used,
        reason=f"{mismatches} of {base.size} elements beyond tolerance" if mismatches else "",
    )


def _compare_numbers(
    base: OutputStats, expected: np.ndarray, actual: np.ndarray, *, exact: bool
) -> OutputStats:
    """Apply ``|a - e| <= atol + rtol * |e|`` (``a == e`` if ``exact``), collect statistics."""
    abs_err = _abs_error(expected, actual)
    magnitude, bound = _allowance(base, expected)
    with np.errstate(invalid="ignore", over="ignore"):
        floor = base.atol if base.atol > 0 else np.finfo(np.float64).tiny
        rel_err = _safe_ratio(abs_err, np.maximum(magnitude, floor))
        used = _safe_ratio(abs_err, bound)
    violated = np.asarray(expected != actual) if exact else abs_err > bound  # int64 > 2**53 too
    if exact:
        used = np.where(violated, np.inf, 0.0)
    mismatches = int(violated.sum())
    fields: dict[str, Any] = {
        "passed": mismatches == 0,
        "mismatches": mismatches,
        **_summary("abs", abs_err),
        **_summary("rel", rel_err),
        "tolerance_used": float(used.max()) if used.size else 0.0,
    }
    if used.size:
        index = tuple(int(i) for i in np.unravel_index(int(np.argmax(used)), used.shape))
        fields.update(
            worst_index=index,
            worst_expected=_scalar(expected[index]),
            worst_actual=_scalar(actual[index]),
        )
    if used.size and mismatches:
        fields["reason"] = (
            f"{mismatches} of {base.size} elements {'differ' if exact else 'beyond tolerance'}; "
            f"worst at {list(index)}: "
            f"expected {_fmt(fields['worst_expected'])}, got {_fmt(fields['worst_actual'])}"
        )
    return dataclasses.replace(base, **fields)


def _abs_error(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``|a - e|`` in float64 with NaN == NaN and same-sign Inf == Inf; other NaNs become Inf."""
    e, a = _as_float64(expected), _as_float64(actual)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.asarray(np.abs(a - e))  # an array even for 0-d inputs, so it can be indexed
    same = (np.isnan(e) & np.isnan(a)) | (np.isinf(e) & (a == e))
    err[same] = 0.0
    err[np.isnan(err)] = np.inf
    return err


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``n / d`` with ``0 / anything = 0`` and ``x / 0 = inf``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(numerator / denominator)  # an array even for 0-d inputs
    ratio[numerator == 0] = 0.0
    ratio[np.isnan(ratio)] = np.inf
    return ratio


def _summary(kind: str, errors: np.ndarray) -> dict[str, float]:
    """Max, mean, median and p99 (``np.quantile(method="higher")``) of ``errors``, which hold
    no NaN; the order statistics from one sort, a tenth of what ``np.median`` and
    ``np.quantile`` cost on the small arrays of a model with thousands of outputs."""
    if not errors.size:
        return {f"{s}_{kind}_error": 0.0 for s in ("max", "mean", "median", "p99")}
    ordered = np.sort(errors, axis=None)
    count, half = ordered.size, ordered.size // 2
    median = ordered[half] if count % 2 else (ordered[half - 1] + ordered[half]) / 2
    return {
        f"max_{kind}_error": float(ordered[-1]),
        f"mean_{kind}_error": float(errors.mean()),
        f"median_{kind}_error": float(median),
        f"p99_{kind}_error": float(ordered[math.ceil((count - 1) * _P99)]),
    }


def judge_with_reference(
    stats: OutputStats, reference: np.ndarray, expected: np.ndarray, actual: np.ndarray
) -> OutputStats:
    """Judge again, element by element, a float output that has elements beyond tolerance.

    An element passes when it is within tolerance of the original (``stats`` says which are
    not) or no further from the float64 ``reference`` than ``2 x`` the original's largest
    error on this output; ``tolerance_used`` becomes the share of the more favourable allowance
    (see the module docstring). ``mismatches`` keeps counting elements beyond plain tolerance.
    """
    if reference.shape != expected.shape:
        return stats
    fused = _abs_error(reference, actual)
    original_error = float(_abs_error(reference, expected).max()) if expected.size else 0.0
    stats = dataclasses.replace(
        stats,
        candidate_reference_error=float(fused.max()) if fused.size else 0.0,
        original_reference_error=original_error,
    )
    if not math.isfinite(original_error):
        return dataclasses.replace(
            stats, reason=f"{stats.reason}; the original is not finite against float64"
        )
    used = np.minimum(
        _plain_used(stats, expected, actual),
        _safe_ratio(fused, np.asarray(_REFERENCE_FACTOR * original_error)),
    )
    worst = float(used.max()) if used.size else 0.0
    verdict = (
        f"fused error {stats.candidate_reference_error:.3g} vs original error "
        f"{original_error:.3g} against the float64 reference"
    )
    if worst > 1.0:
        return dataclasses.replace(
            stats,
            tolerance_used=worst,
            reason=f"{stats.reason}; beyond tolerance and more than {_REFERENCE_FACTOR:g}x the "
            f"original's error from the float64 result ({verdict})",
        )
    return dataclasses.replace(
        stats,
        passed=True,
        accepted_by_reference=True,
        tolerance_used=worst,
        reason=f"{stats.reason}; accepted: as close to the float64 result as the original "
        f"({verdict})",
    )


def _allowance(stats: OutputStats, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``|e|`` and the plain allowance ``atol + rtol * |e|`` per element (0 where ``e`` is inf)."""
    magnitude = np.asarray(np.abs(_as_float64(expected)))
    with np.errstate(invalid="ignore", over="ignore"):
        bound = np.where(np.isfinite(magnitude), stats.atol + stats.rtol * magnitude, 0.0)
    return magnitude, np.asarray(bound)


def _plain_used(stats: OutputStats, expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per element, the share of the plain allowance ``atol + rtol * |e|`` used."""
    return _safe_ratio(_abs_error(expected, actual), _allowance(stats, expected)[1])


def needs_reference(stats: OutputStats, expected: np.ndarray) -> bool:
    """A float output that failed on its elements (not its layout): worth a float64 reference."""
    return not stats.passed and stats.mismatches > 0 and dtype_kind(expected.dtype) == "float"


# --------------------------------------------------------------------------- dtypes


@functools.lru_cache(maxsize=64)
def ir_dtype(dtype: np.dtype) -> ir.DataType | None:
    """The ONNX type of a numpy dtype (ml_dtypes' bfloat16, float8 too), or ``None``."""
    try:
        return ir.DataType.from_numpy(dtype)
    except TypeError:
        return None


@functools.lru_cache(maxsize=64)
def dtype_kind(dtype: np.dtype) -> str:
    """``"float"``, ``"complex"``, ``"string"`` or ``"exact"`` (integers, bool)."""
    if dtype.kind in "OUS":
        return "string"
    if dtype.kind == "c":
        return "complex"
    dt = ir_dtype(dtype)
    return "float" if dt is not None and dt.is_floating_point() else "exact"


@functools.lru_cache(maxsize=64)
def dtype_name(dtype: np.dtype) -> str:
    """The dtype's name for reports; every string or object dtype is ``"string"``."""
    return "string" if dtype.kind in "OUS" else dtype.name


def _as_float64(array: np.ndarray) -> np.ndarray:
    return array.astype(np.complex128 if array.dtype.kind == "c" else np.float64)


def _scalar(value: Any) -> Any:
    """A JSON-friendly Python scalar for one element."""
    kind = dtype_kind(np.asarray(value).dtype)
    if kind == "float":
        return float(value)
    if kind == "complex":
        return str(complex(value))
    return value.item() if hasattr(value, "item") else value


def _fmt(value: Any) -> str:
    return f"{value:.7g}" if isinstance(value, float) else repr(value)
