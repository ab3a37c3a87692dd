"""Prove with onnxruntime that a rewritten model computes what the original computes.

:func:`check_equivalence` runs both models on the same inputs -- several seeded synthetic trials
(see :mod:`converter.inputs`) or real inputs from an ``.npz`` file -- and compares every output,
plus any intermediate values named in ``extra_outputs`` (exposed as graph outputs on copies).

Comparison rule, per element, in float64 (``e`` from the original, ``a`` from the candidate)::

    |a - e| <= atol + rtol * |e|        NaN == NaN, +Inf == +Inf, -Inf == -Inf

Integer, bool and string outputs must match exactly. Nothing is broadcast: an output missing,
extra, reordered, or with another shape or dtype is a failure with that reason.

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

Float64 reference. Merging ``y = (x @ W1) @ W2`` into ``x @ (W1 @ W2)`` reassociates sums, so on
wide layers the candidate can differ from the original by more than a fixed tolerance while
being *closer* to the exact result. When a floating-point output fails the rule above, a float64
copy of the original is run (float initializers, ``Constant`` values and ``Cast``/``dtype``
targets turned into float64, float inputs cast to float64); the output is accepted when the
candidate's max abs error against that reference is at most ``2x`` the original's own. Both
errors are reported. The reference is built once, only when needed; if onnxruntime cannot build
or run it (an op without a float64 kernel, say) the report says why and nothing is rescued.

Statistics per output and trial: max / mean / median / p99 of the absolute error and of the
relative error ``|a - e| / max(|e|, atol)`` (``atol`` replaced by the smallest normal float64
when zero), the fraction of the tolerance used, and the index of the worst element (the one
closest to, or furthest beyond, its tolerance). Statistics are ``nan`` when nothing could be
compared (a missing output, a shape mismatch, a string output).

Runtime: onnxruntime CPU provider, graph optimisations disabled (``ORT_DISABLE_ALL``), one
thread; one session per model, reused across trials. A model given as a path is loaded by
onnxruntime from that path when it needs no change; otherwise the model is serialised to bytes
(external data stays where it is) or, above ~1.8 GB of in-memory weights, saved with external
data into a temporary folder.
"""

from __future__ import annotations

__all__ = [
    "EquivalenceReport",
    "OutputStats",
    "check_equivalence",
    "compare_arrays",
    "default_tolerance",
]

import ctypes
import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from converter import io
from converter.errors import InputError, OriginalModelError
from converter.inputs import (
    TrialInputs,
    check_inputs,
    describe_input,
    load_inputs_npz,
    model_inputs,
    synthesize_inputs,
)

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model
Tolerance = float | Mapping[str, float] | None

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
_IN_MEMORY_LIMIT = io.EXTERNAL_DATA_THRESHOLD_BYTES
_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_PROVIDERS = ["CPUExecutionProvider"]
_NO_NUMPY_TYPES = frozenset(
    f"tensor({t})"
    for t in ("bfloat16", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz")
)
_DTYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")
_MAX_MESSAGE = 500
_NAN = float("nan")


# --------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class OutputStats:
    """How one output (or exposed intermediate value) compared in one trial.

    Error statistics are ``nan`` when nothing could be compared; the reference errors are
    ``None`` unless the float64 reference was run for this output.
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

    def to_dict(self) -> dict[str, Any]:
        """Return every field; JSON-serialisable (``json.dumps`` writes nan/inf as NaN/Infinity)."""
        data = dataclasses.asdict(self)
        for key in ("shape", "worst_index"):
            data[key] = None if data[key] is None else list(data[key])
        return data

    def __str__(self) -> str:
        label = f"{self.name} (intermediate)" if self.intermediate else self.name
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
    """

    passed: bool
    outputs: tuple[OutputStats, ...]
    results: tuple[OutputStats, ...]
    trials: tuple[dict[str, Any], ...]
    seed: int
    reference: str = "not needed"
    failures: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the whole report as JSON-serialisable data."""
        return {
            "passed": self.passed,
            "seed": self.seed,
            "trials": [dict(t) for t in self.trials],
            "reference": self.reference,
            "failures": list(self.failures),
            "outputs": [s.to_dict() for s in self.outputs],
            "results": [s.to_dict() for s in self.results],
        }

    def __str__(self) -> str:
        lines = [
            f"equivalence {'PASS' if self.passed else 'FAIL'} (outputs: {len(self.outputs)}, "
            f"trials: {len(self.trials)}, seed: {self.seed}, float64 reference: {self.reference})"
        ]
        for trial in self.trials:
            dims = ", ".join(f"{k}={v}" for k, v in trial["dims"].items())
            lines.append(
                f"trial {trial['index']}: {trial['description']}" + (f" ({dims})" if dims else "")
            )
            lines.extend(f"  {s}" for s in self.results if s.trial == trial["index"])
        lines.extend(f"FAIL: {failure}" for failure in self.failures)
        return "\n".join(lines)


# --------------------------------------------------------------------------- comparison


def default_tolerance(dtype: ir.DataType | np.dtype | type) -> tuple[float, float]:
    """Return the default ``(atol, rtol)`` for outputs of ``dtype`` (table in the module doc).

    Integer, bool and string types get ``(0.0, 0.0)``: they are compared exactly.
    """
    dt = dtype if isinstance(dtype, ir.DataType) else _ir_dtype(np.dtype(dtype))
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
) -> OutputStats:
    """Compare one candidate array with the original's under the module's rule.

    ``atol``/``rtol`` of ``None`` take :func:`default_tolerance`; they are ignored (exact
    comparison) for integer, bool and string arrays.
    """
    expected, actual = np.asarray(expected), np.asarray(actual)
    kind = _kind(expected.dtype)
    default = default_tolerance(expected.dtype)
    exact = kind in ("exact", "string")
    atol = 0.0 if exact else (default[0] if atol is None else float(atol))
    rtol = 0.0 if exact else (default[1] if rtol is None else float(rtol))
    base = OutputStats(
        name,
        trial,
        False,
        intermediate,
        shape=tuple(expected.shape),
        dtype=_dtype_name(expected.dtype),
        atol=atol,
        rtol=rtol,
        size=int(expected.size),
    )
    problem = _layout_problem(expected, actual)
    if problem:
        return dataclasses.replace(base, reason=problem)
    if kind == "string":
        return _compare_strings(base, expected, actual)
    return _compare_numbers(base, expected, actual, exact=exact)


def _layout_problem(expected: np.ndarray, actual: np.ndarray) -> str:
    """Say why two arrays cannot be compared element by element, or return ``""``."""
    if _dtype_name(expected.dtype) != _dtype_name(actual.dtype):
        return (
            f"dtype differs: original {_dtype_name(expected.dtype)}, "
            f"candidate {_dtype_name(actual.dtype)}"
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


def _compare_numbers(
    base: OutputStats, expected: np.ndarray, actual: np.ndarray, *, exact: bool
) -> OutputStats:
    """Apply ``|a - e| <= atol + rtol * |e|`` (``a == e`` if ``exact``), collect statistics."""
    abs_err = _abs_error(expected, actual)
    magnitude = np.abs(_as_float64(expected))
    with np.errstate(invalid="ignore", over="ignore"):
        bound = np.where(np.isfinite(magnitude), base.atol + base.rtol * magnitude, 0.0)
        floor = base.atol if base.atol > 0 else np.finfo(np.float64).tiny
        rel_err = _safe_ratio(abs_err, np.maximum(magnitude, floor))
        used = _safe_ratio(abs_err, bound)
    violated = expected != actual if exact else abs_err > bound  # int64 beyond 2**53 too
    if exact:
        used = np.where(violated, np.inf, 0.0)
    mismatches = int(violated.sum())
    stats = dataclasses.replace(
        base,
        passed=mismatches == 0,
        mismatches=mismatches,
        **_summary("abs", abs_err),
        **_summary("rel", rel_err),
        tolerance_used=float(used.max()) if used.size else 0.0,
    )
    if not used.size:
        return stats
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(used)), used.shape))
    stats = dataclasses.replace(
        stats,
        worst_index=index,
        worst_expected=_scalar(expected[index]),
        worst_actual=_scalar(actual[index]),
    )
    if mismatches:
        reason = (
            f"{mismatches} of {base.size} elements beyond tolerance; worst at {list(index)}: "
            f"expected {_fmt(stats.worst_expected)}, got {_fmt(stats.worst_actual)}"
        )
        stats = dataclasses.replace(stats, reason=reason)
    return stats


def _abs_error(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``|a - e|`` in float64 with NaN == NaN and same-sign Inf == Inf; other NaNs become Inf."""
    e, a = _as_float64(expected), _as_float64(actual)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a - e)
    same = (np.isnan(e) & np.isnan(a)) | (np.isinf(e) & (a == e))
    err[same] = 0.0
    err[np.isnan(err)] = np.inf
    return err


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``n / d`` with ``0 / anything = 0`` and ``x / 0 = inf``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = numerator / denominator
    ratio[numerator == 0] = 0.0
    ratio[np.isnan(ratio)] = np.inf
    return ratio


def _summary(kind: str, errors: np.ndarray) -> dict[str, float]:
    if not errors.size:
        return {f"{s}_{kind}_error": 0.0 for s in ("max", "mean", "median", "p99")}
    return {
        f"max_{kind}_error": float(errors.max()),
        f"mean_{kind}_error": float(errors.mean()),
        f"median_{kind}_error": float(np.median(errors)),
        f"p99_{kind}_error": float(np.quantile(errors, 0.99, method="higher")),
    }


def _max_abs_error(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(_abs_error(expected, actual).max()) if expected.size else 0.0


def _judge_with_reference(
    stats: OutputStats, reference: np.ndarray, expected: np.ndarray, actual: np.ndarray
) -> OutputStats:
    """Accept a float output beyond tolerance if it is within 2x the original's own error."""
    if reference.shape != expected.shape:
        return stats
    fused_error = _max_abs_error(reference, actual)
    original_error = _max_abs_error(reference, expected)
    stats = dataclasses.replace(
        stats, candidate_reference_error=fused_error, original_reference_error=original_error
    )
    accepted = math.isfinite(original_error) and fused_error <= _REFERENCE_FACTOR * original_error
    if not accepted:
        return dataclasses.replace(
            stats,
            reason=f"{stats.reason}; more than {_REFERENCE_FACTOR:g}x the original's "
            "error against the float64 reference",
        )
    return dataclasses.replace(
        stats,
        passed=True,
        accepted_by_reference=True,
        reason=f"{stats.reason}; accepted: fused error {fused_error:.3g} <= "
        f"{_REFERENCE_FACTOR:g} x original error {original_error:.3g} (float64 reference)",
    )


def _needs_reference(stats: OutputStats, expected: np.ndarray) -> bool:
    return not stats.passed and stats.mismatches > 0 and _kind(expected.dtype) == "float"


# --------------------------------------------------------------------------- dtypes


def _ir_dtype(dtype: np.dtype) -> ir.DataType | None:
    try:
        return ir.DataType.from_numpy(dtype)
    except TypeError:
        return None


def _kind(dtype: np.dtype) -> str:
    """``"float"``, ``"complex"``, ``"string"`` or ``"exact"`` (integers, bool)."""
    if dtype.kind in "OUS":
        return "string"
    if dtype.kind == "c":
        return "complex"
    dt = _ir_dtype(dtype)
    return "float" if dt is not None and dt.is_floating_point() else "exact"


def _dtype_name(dtype: np.dtype) -> str:
    return "string" if dtype.kind in "OUS" else dtype.name


def _as_float64(array: np.ndarray) -> np.ndarray:
    return array.astype(np.complex128 if array.dtype.kind == "c" else np.float64)


def _scalar(value: Any) -> Any:
    """A JSON-friendly Python scalar for one element."""
    kind = _kind(np.asarray(value).dtype)
    if kind == "float":
        return float(value)
    if kind == "complex":
        return str(complex(value))
    return value.item() if hasattr(value, "item") else value


def _fmt(value: Any) -> str:
    return f"{value:.7g}" if isinstance(value, float) else repr(value)


def _is_float(dtype: ir.DataType | None) -> bool:
    return dtype is not None and dtype.is_floating_point()


# --------------------------------------------------------------------------- models


@dataclasses.dataclass
class _Side:
    """One model under comparison: its IR copy and, while unchanged, the file it came from."""

    label: str
    model: ir.Model
    path: str | None
    outputs: list[str]


def _load(model: ModelLike, role: str) -> _Side:
    """Wrap ``model`` without ever mutating the caller's object."""
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        loaded = io.load_model(path)
        return _Side(f"{role} model {path}", loaded, path, [v.name for v in loaded.graph.outputs])
    if isinstance(model, onnx.ModelProto):
        copy = ir.serde.deserialize_model(model)  # wraps the proto's tensors, copies nothing
    elif isinstance(model, ir.Model):
        copy = model.clone()  # tensors are shared, never modified
    else:
        raise TypeError(
            f"{role} must be a path, an onnx.ModelProto or an onnx_ir.Model, "
            f"not {type(model).__name__}"
        )
    return _Side(f"{role} model", copy, None, [v.name for v in copy.graph.outputs])


def _expose(side: _Side, names: Sequence[str]) -> list[str]:
    """Add the named values as graph outputs; return the names the model does not have."""
    values = ir.convenience.create_value_mapping(side.model.graph, include_subgraphs=False)
    missing = []
    for name in names:
        value = values.get(name)
        if value is None:
            missing.append(name)
        elif not value.is_graph_output():
            side.model.graph.outputs.append(value)
            side.path = None
    return missing


def _all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    for graph in model.graphs():
        yield from (v.const_value for v in graph.initializers.values() if v.const_value is not None)
    for node in _all_nodes(model):
        for attr in node.attributes.values():
            if not attr.is_ref() and attr.type == ir.AttributeType.TENSOR:
                yield attr.as_tensor()


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from model.graph.all_nodes()
    for function in model.functions.values():
        yield from function.all_nodes()


def _float64_model(model: ir.Model) -> ir.Model:
    """A copy of ``model`` computing in float64 wherever it computed in another float type."""
    ref = model.clone()
    for graph in ref.graphs():
        _retype_values(graph)
        for value in graph.initializers.values():
            if value.const_value is not None and _is_float(value.const_value.dtype):
                value.const_value = _float64_tensor(value.const_value)
    for node in _all_nodes(ref):
        _retype_attributes(node)
    return ref


def _retype_values(graph: ir.Graph) -> None:
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
    values.extend(output for node in graph for output in node.outputs)
    for value in values:
        if isinstance(value.type, ir.TensorType) and _is_float(value.dtype):
            value.type = ir.TensorType(ir.DataType.DOUBLE)  # a new object: types may be shared


def _float64_tensor(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    return ir.LazyTensor(
        lambda: ir.tensor(tensor.numpy().astype(np.float64), name=tensor.name),
        dtype=ir.DataType.DOUBLE,
        shape=tensor.shape,
        name=tensor.name,
    )


def _retype_attributes(node: ir.Node) -> None:
    """Turn float tensor attributes and float dtype attributes (``Cast.to``...) into float64."""
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        for key in ("value_float", "value_floats"):
            if key in node.attributes:
                array = np.asarray(node.attributes.pop(key).value, dtype=np.float64)
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))
    for key, attr in list(node.attributes.items()):
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.TENSOR and _is_float(attr.as_tensor().dtype):
            node.attributes[key] = ir.AttrTensor(key, _float64_tensor(attr.as_tensor()))
        elif key in _DTYPE_ATTRIBUTES and _is_float_dtype_attr(attr):
            node.attributes[key] = ir.AttrInt64(key, ir.DataType.DOUBLE)


def _is_float_dtype_attr(attr: ir.Attr) -> bool:
    if attr.type != ir.AttributeType.INT:
        return False
    try:
        return _is_float(ir.DataType(attr.as_int()))
    except ValueError:
        return False


# --------------------------------------------------------------------------- onnxruntime


def _session_options(folder: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    # Fatal only: run errors reach the user through our one-line message, not ORT's own log.
    options.log_severity_level = 4
    if folder is not None:
        options.add_session_config_entry(_FOLDER_KEY, folder)
    return options


def _serialise(model: ir.Model, workdir: str, stem: str) -> tuple[bytes | str, str | None]:
    """Bytes plus the folder of any external data, or a saved file when too big for bytes."""
    tensors = {id(t): t for t in _all_tensors(model)}.values()
    external = [t for t in tensors if isinstance(t, ir.ExternalTensor)]
    folders = {os.path.abspath(t.base_dir) for t in external}
    in_memory = sum(t.nbytes for t in tensors if not isinstance(t, ir.ExternalTensor))
    if in_memory < _IN_MEMORY_LIMIT and len(folders) <= 1:
        return ir.to_proto(model).SerializeToString(), (folders.pop() if folders else None)
    path = os.path.join(workdir, f"{stem}.onnx")
    logger.info("saving the %s copy with external data to %s", stem, path)
    ir.save(model, path, external_data=f"{stem}.onnx.data")
    return path, None


def _open_session(side: _Side, workdir: str, stem: str) -> _Runner:
    """Create the onnxruntime session for ``side`` (from its file when it is unchanged)."""
    if side.path is not None:
        return _Runner(ort.InferenceSession(side.path, _session_options(), providers=_PROVIDERS))
    source, folder = _serialise(side.model, workdir, stem)
    return _Runner(ort.InferenceSession(source, _session_options(folder), providers=_PROVIDERS))


class _Runner:
    """One onnxruntime session, created once and run for every trial."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._raw_outputs = any(o.type in _NO_NUMPY_TYPES for o in session.get_outputs())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on ``feeds`` and return output name -> array."""
        ort_feeds = {name: _ort_input(feeds[name], self._raw_outputs) for name in self.input_names}
        if self._raw_outputs:
            values = self.session.run_with_ort_values(self.output_names, ort_feeds)
            arrays = [_ortvalue_to_numpy(v) for v in values]
        else:
            arrays = self.session.run(self.output_names, ort_feeds)
        return dict(zip(self.output_names, arrays, strict=True))


def _ort_input(array: np.ndarray, as_ortvalue: bool) -> Any:
    """Numpy arrays pass as they are; types numpy lacks (bfloat16, float8) go as raw OrtValues."""
    dtype = _ir_dtype(array.dtype)
    if array.dtype.kind == "V" and dtype is not None:
        raw = np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, int(dtype))
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)) if as_ortvalue else array


def _ortvalue_to_numpy(value: ort.OrtValue) -> np.ndarray:
    """Copy an output out of onnxruntime, also for 8/16-bit types numpy does not have."""
    if value.data_type() not in _NO_NUMPY_TYPES:
        return value.numpy()
    dtype = np.dtype(ir.DataType(value.element_type()).numpy())
    count = value.tensor_size_in_bytes()
    raw = np.frombuffer((ctypes.c_uint8 * count).from_address(value.data_ptr()), np.uint8)
    return raw.copy().view(dtype).reshape(value.shape())


class _Reference:
    """The float64 copy of the original, built on first use and reused across trials."""

    def __init__(self, side: _Side, workdir: str) -> None:
        self._side, self._workdir = side, workdir
        self._runner: _Runner | None = None
        self._built = False
        self.note = "not needed"

    def run(self, feeds: Mapping[str, np.ndarray], trial: int) -> dict[str, np.ndarray] | None:
        """Return the float64 outputs for ``feeds``, or ``None`` (and a note) if impossible."""
        if not self._built:
            self._built = True
            try:
                model = _float64_model(self._side.model)
                self._runner = _open_session(
                    _Side("reference", model, None, []), self._workdir, "reference"
                )
            except Exception as e:  # onnxruntime and onnx_ir raise many types
                self.note = f"unavailable: onnxruntime cannot build it ({_one_line(e)})"
                logger.info("float64 reference %s", self.note)
        if self._runner is None:
            return None
        try:
            outputs = self._runner.run({k: _widen(v) for k, v in feeds.items()})
        except Exception as e:  # onnxruntime raises many types
            self.note = f"unavailable: it fails to run on trial {trial} ({_one_line(e)})"
            return None
        if self.note == "not needed":
            self.note = "used"
        return outputs


def _widen(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if _kind(array.dtype) == "float" else array


def _one_line(error: object) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


# --------------------------------------------------------------------------- the check


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
        trials: Number of synthetic trials (see :mod:`converter.inputs`).
        seed: Seed of the synthetic inputs.
        extra_outputs: Intermediate values present in both models, compared like outputs and
            reported as intermediate.

    Raises:
        InputError: Unreadable models or inputs, bad options, an unknown ``extra_outputs`` name.
        OriginalModelError: The original model does not load or run in onnxruntime.
    """
    if trials < 1:
        raise InputError(f"trials must be at least 1, got {trials}")
    orig, cand = _load(original, "original"), _load(candidate, "candidate")
    intermediates = [n for n in dict.fromkeys(extra_outputs) if n and n not in orig.outputs]
    if missing := _expose(orig, intermediates):
        raise InputError(f"extra output '{missing[0]}' is not a value of the {orig.label}")
    names = orig.outputs + intermediates
    _check_tolerances(atol, "atol", names)
    _check_tolerances(rtol, "rtol", names)
    feeds = _trial_inputs(orig.model, inputs, input_shapes, trials, seed)
    failures = _interface_failures(orig, cand)
    absent = set(_expose(cand, intermediates))
    with tempfile.TemporaryDirectory(prefix="onnx-fuse-validate-") as workdir:
        original_runner = _open_original(orig, workdir)
        candidate_runner = _open_candidate(cand, workdir, failures)
        reference = _Reference(orig, workdir)
        results: list[OutputStats] = []
        for trial in feeds:
            expected = _run_original(original_runner, orig, trial, synthesised=inputs is None)
            actual = _run_candidate(candidate_runner, trial, failures)
            run = _TrialRun(trial.index, expected, actual, set(intermediates), absent)
            results.extend(_compare_trial(run, names, atol, rtol, reference, trial.values))
    return _make_report(results, names, feeds, seed, reference.note, failures)


@dataclasses.dataclass
class _TrialRun:
    index: int
    expected: dict[str, np.ndarray]
    actual: dict[str, np.ndarray] | str  # the reason when the candidate did not run
    intermediates: set[str]
    absent: set[str]


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


def _trial_inputs(
    model: ir.Model,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
    trials: int,
    seed: int,
) -> list[TrialInputs]:
    """Real inputs as one trial, or ``trials`` seeded synthetic ones."""
    if inputs is not None and input_shapes:
        logger.warning("input_shapes ignored: real inputs are given")
    if isinstance(inputs, (str, os.PathLike)):
        return [load_inputs_npz(inputs, model)]
    if inputs is not None:
        return [check_inputs(model, inputs)]
    return [
        synthesize_inputs(model, trial=i, seed=seed, input_shapes=input_shapes)
        for i in range(trials)
    ]


def _interface_failures(orig: _Side, cand: _Side) -> list[str]:
    """Differences in the graph inputs and outputs, which callers would notice."""
    failures = []
    extra = [n for n in cand.outputs if n not in orig.outputs]
    if extra:
        failures.append(f"the candidate has outputs the original does not: {', '.join(extra)}")
    if set(cand.outputs) == set(orig.outputs) and cand.outputs != orig.outputs:
        failures.append(
            f"outputs are in another order: original {orig.outputs}, candidate {cand.outputs}"
        )
    wanted = [_input_signature(v) for v in model_inputs(orig.model)]
    found = [_input_signature(v) for v in model_inputs(cand.model)]
    if wanted != found:
        failures.append(f"inputs differ: original {wanted}, candidate {found}")
    return failures


def _input_signature(value: ir.Value) -> str:
    """Name and element type (dimension names may differ between equal models)."""
    return f"{value.name}: {describe_input(value).split('[')[0]}"


def _open_original(side: _Side, workdir: str) -> _Runner:
    try:
        return _open_session(side, workdir, "original")
    except Exception as e:  # onnxruntime raises many types
        raise OriginalModelError(f"onnxruntime cannot load the {side.label}: {_one_line(e)}") from e


def _open_candidate(side: _Side, workdir: str, failures: list[str]) -> _Runner | None:
    if any(f.startswith("inputs differ") for f in failures):
        return None
    try:
        return _open_session(side, workdir, "candidate")
    except Exception as e:  # onnxruntime raises many types
        failures.append(f"onnxruntime cannot load the {side.label}: {_one_line(e)}")
        return None


def _run_original(
    runner: _Runner, side: _Side, trial: TrialInputs, *, synthesised: bool
) -> dict[str, np.ndarray]:
    try:
        return runner.run(trial.values)
    except Exception as e:  # onnxruntime raises many types
        raise OriginalModelError(_original_failure(side, trial, e, synthesised)) from e


def _original_failure(side: _Side, trial: TrialInputs, error: Exception, synthesised: bool) -> str:
    """One line: what failed, on which inputs, what onnxruntime said, what the user can do."""
    if not synthesised:
        return f"the {side.label} fails to run on the given inputs: {_one_line(error)}"
    dims = ", ".join(f"{k}={v}" for k, v in trial.dims.items())
    scalars = [v.name for v in model_inputs(side.model) if _is_scalar_int(v)]
    hint = "".join(f"; scalar int input '{n}' needs a real value" for n in scalars)
    return (
        f"the {side.label} fails to run on synthesised inputs (trial {trial.index}: "
        f"{trial.description}{', ' + dims if dims else ''}): {_one_line(error)}; "
        f"pass --input-shape NAME:D1,D2 or --inputs FILE.npz{hint}"
    )


def _is_scalar_int(value: ir.Value) -> bool:
    return value.shape is not None and len(value.shape) == 0 and _is_int(value.dtype)


def _is_int(dtype: ir.DataType | None) -> bool:
    return dtype is not None and dtype.is_integer()


def _run_candidate(
    runner: _Runner | None, trial: TrialInputs, failures: list[str]
) -> dict[str, np.ndarray] | str:
    if runner is None:
        return "the candidate could not be run (see the failures)"
    try:
        return runner.run(trial.values)
    except Exception as e:  # onnxruntime raises many types
        reason = f"the candidate fails to run on trial {trial.index}: {_one_line(e)}"
        failures.append(reason)
        return reason


def _compare_trial(
    run: _TrialRun,
    names: Sequence[str],
    atol: Tolerance,
    rtol: Tolerance,
    reference: _Reference,
    feeds: Mapping[str, np.ndarray],
) -> list[OutputStats]:
    """Compare every output of one trial, asking the float64 reference about float failures."""
    stats = [_compare_output(run, name, atol, rtol) for name in names]
    doubtful = [s.name for s in stats if _needs_reference(s, run.expected[s.name])]
    ref = reference.run(feeds, run.index) if doubtful else None
    if ref is None:
        return stats
    return [
        _judge_with_reference(s, ref[s.name], run.expected[s.name], run.actual[s.name])
        if s.name in doubtful
        else s
        for s in stats
    ]


def _compare_output(run: _TrialRun, name: str, atol: Tolerance, rtol: Tolerance) -> OutputStats:
    expected = run.expected[name]
    intermediate = name in run.intermediates
    if isinstance(run.actual, str) or name not in run.actual:
        reason = run.actual if isinstance(run.actual, str) else "missing from the candidate"
        if name in run.absent:
            reason = "not a value of the candidate model"
        return OutputStats(
            name,
            run.index,
            False,
            intermediate,
            reason=reason,
            shape=tuple(expected.shape),
            dtype=_dtype_name(expected.dtype),
        )
    return compare_arrays(
        expected,
        run.actual[name],
        atol=_tolerance_for(atol, name),
        rtol=_tolerance_for(rtol, name),
        name=name,
        trial=run.index,
        intermediate=intermediate,
    )


def _make_report(
    results: list[OutputStats],
    names: Sequence[str],
    trials: Sequence[TrialInputs],
    seed: int,
    reference: str,
    failures: list[str],
) -> EquivalenceReport:
    outputs = tuple(_worst([s for s in results if s.name == name]) for name in names)
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


def _worst(stats: Sequence[OutputStats]) -> OutputStats:
    """The failing trial if any, else the one using the most of its tolerance."""

    def severity(s: OutputStats) -> tuple[bool, float]:
        used = s.tolerance_used
        return (not s.passed, math.inf if math.isnan(used) else used)

    return max(stats, key=severity)
