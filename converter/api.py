"""The Python entry points export pipelines call: ``fuse``, ``fuse_file`` and ``export``.

``fuse`` rewrites a model in memory; ``fuse_file`` is the whole job the CLI does (load safely,
fuse, write to a temporary file beside the destination, prove equivalence with onnxruntime, and
only then move the result into place); ``export`` runs ``torch.onnx.export`` and then ``fuse_file``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnx_ir as ir

from converter import determinism
from converter.equivalence import timing
from converter.equivalence.compare import OutputStats
from converter.equivalence.runtime import OnDisk
from converter.equivalence.timing import BenchmarkOptions, BenchmarkResult
from converter.equivalence.validate import EquivalenceReport, check_equivalence
from converter.errors import InputError, OriginalModelError, ValidationError
from converter.fusion.core.policy import Policy
from converter.fusion.passes import fuse_model
from converter.gcpause import paused_collection
from converter.model_io import files as io
from converter.model_io import training
from converter.model_io.progress import ProgressCallback, no_progress
from converter.report import FusionRecord, FusionReport

__all__ = ["fuse", "fuse_file", "export", "check", "check_inputs_file"]

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", onnx.ModelProto, ir.Model)


@paused_collection()
def fuse(model: ModelT, *, policy: Policy = "cost") -> ModelT:
    """Merge chains of linear ops in ``model``.

    An ``onnx.ModelProto`` is not mutated: a new ModelProto is returned. An ``onnx_ir.Model`` is
    rewritten in place and returned (use :class:`~converter.FuseLinearChainsPass` for the report).
    """
    if isinstance(model, ir.Model):
        fuse_model(model, policy=policy)
        return model
    if isinstance(model, onnx.ModelProto):
        # onnx-ir wraps the proto's tensors rather than copying them, and serialising can write
        # back into them (a Constant's tensor gets its output's name): work on a copy.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        ir_model = ir.serde.deserialize_model(copy)
        training.stash(ir_model, copy)
        fuse_model(ir_model, policy=policy)
        return training.restore(ir_model, ir.serde.serialize_model(ir_model))
    raise TypeError(
        f"fuse() takes an onnx.ModelProto or an onnx_ir.Model, not {type(model).__name__}"
    )


@paused_collection()
def fuse_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    policy: Policy = "cost",
    validate: bool = True,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    atol: float | Mapping[str, float] | None = None,
    rtol: float | Mapping[str, float] | None = None,
    trials: int = 3,
    seed: int = 0,
    strict: bool = False,
    external_data: str | None = None,
    force: bool = False,
    keep_on_fail: bool = False,
    progress: ProgressCallback = no_progress,
    benchmark: BenchmarkOptions | bool = False,
) -> FusionReport:
    """Fuse the model at ``src`` and write it to ``dst``; return the :class:`FusionReport`.

    The output is written into a temporary folder beside ``dst`` and moved into place only when
    complete and (with ``validate``) proven equivalent by onnxruntime; the input is never touched.
    A model with nothing to merge is copied byte for byte, unless its nodes were out of
    topological order: then it is written sorted (not validated: it holds the input's own nodes).
    ``strict`` requires bit-exact outputs
    (no tolerance, no float64 acceptance).
    ``benchmark`` (``True``, or :class:`~converter.equivalence.timing.BenchmarkOptions` for
    threads and provider) times both models under onnxruntime on validation's first inputs (or,
    unvalidated, inputs synthesised the same way) into ``report.benchmark``; a slowdown beyond
    noise, or a fused kernel lost, is logged as a warning.
    Raises :class:`InputError` for unreadable input, a refused destination or an original model
    that disagrees with itself, and :class:`ValidationError` when outputs differ (nothing is
    written unless ``keep_on_fail``).
    """
    start = time.perf_counter()
    check_inputs_file(inputs)
    timed = timing.options_of(benchmark)  # an unavailable provider is refused before any work
    progress("loading", None, None)
    model = io.load_model(src)
    try:
        report = fuse_model(model, policy=policy, progress=progress)
    except InputError as e:  # a graph with no topological order: name the file too
        raise type(e)(f"{os.fspath(src)}: {e}") from None
    report.source, report.destination = os.fspath(src), os.fspath(dst)
    options = {"inputs": inputs, "input_shapes": input_shapes, "trials": trials}
    options.update(atol=0.0 if strict else atol, rtol=0.0 if strict else rtol)
    if validate and report.rewritten and determinism.random_nodes(model):
        # A model that may disagree with itself is run twice before anything is written.
        determinism.check_deterministic(src, seed=seed, **options)
    progress("writing", None, None)
    with _write(model, src, dst, report, external_data=external_data, force=force) as pending:
        # Nothing rewritten, nothing to prove: at most the input's own nodes in another order.
        if validate and report.rewritten:
            progress("validating", None, None)
            # The fused model is already in memory: validation runs its file without reloading it.
            candidate = OnDisk(model, pending.path)
            _validate_into(report, src, candidate, seed=seed, benchmark=timed, **options)
            _judge(report, src, dst, strict=strict, keep_on_fail=keep_on_fail, seed=seed, **options)
        pending.commit()
    if timed is not None:
        if not (validate and report.rewritten):  # else validation timed them, on its inputs
            report.benchmark = _benchmark(src, dst, timed, inputs, input_shapes, seed)
        _warn(report.benchmark, "the fused model")
    report.seconds = time.perf_counter() - start
    return report


def _benchmark(src, dst, options: BenchmarkOptions, inputs, input_shapes, seed: int):
    """Both files timed on inputs synthesised as validation would (or the real ones), or
    ``None`` and a warning when onnxruntime cannot run them."""
    try:
        return timing.benchmark_models(
            src, dst, options, inputs=inputs, input_shapes=input_shapes, seed=seed
        )
    except InputError as e:
        logger.warning("benchmark skipped: %s", e)
        return None


def _warn(result: BenchmarkResult | None, candidate: str) -> None:
    """A benchmark's findings (slower beyond noise, a fused kernel lost) as log warnings."""
    for line in result.warnings(candidate) if result is not None else []:
        logger.warning("%s", line)


def _write(model: ir.Model, src, dst, report: FusionReport, **options: Any) -> io.PendingOutput:
    """The rewritten model, or (nothing rewritten nor sorted, one file) the input copied byte
    for byte."""
    if not report.modified and options["external_data"] is None and not io.has_external_data(model):
        return io.write_copy(src, dst, force=options["force"])
    return io.write_model(model, dst, src=src, **options)


def check_inputs_file(inputs: object) -> None:
    """Refuse an ``inputs`` path that is not an ``.npz`` archive, in those words."""
    if not isinstance(inputs, (str, os.PathLike)):
        return
    path = os.fspath(inputs)
    if not os.path.isfile(path):
        raise InputError(f"inputs file {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"inputs file {path}: not an .npz file (write one array per input name with "
            "numpy.savez(path, NAME=array, ...))"
        )


def _strict_reason(reason: str | None) -> str:
    return "not bit-exact (--strict)" + (f"; {reason}" if reason else "")


def _require_bit_exact(report: FusionReport) -> None:
    """``strict``: an output passes only if equal bit for bit (no float64 acceptance)."""
    validation = report.validation or {}
    for output in validation.get("outputs", []):
        exact = output.get("passed") and not output.get("accepted_by_reference")
        if not output.get("intermediate") and not exact:
            output["passed"] = False
            output["reason"] = _strict_reason(output.get("reason"))
            report.validated = False
    validation["passed"] = bool(report.validated)


_MAIN_GRAPH = "main graph"


def _judge(
    report: FusionReport,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    strict: bool,
    keep_on_fail: bool,
    seed: int,
    **options: Any,
) -> None:
    """After validation: bit-exact if ``strict``; a failure checked against the original's own
    determinism, then raised (nothing written) unless ``keep_on_fail``."""
    if strict:
        _require_bit_exact(report)
    if not report.validated:
        determinism.check_deterministic(src, seed=seed, **options)
    if not report.validated and not keep_on_fail:
        raise ValidationError(_failure_message(report, dst))


def _validate_into(
    report: FusionReport, src, candidate, *, benchmark: BenchmarkOptions | None, **options: Any
) -> None:
    """Check equivalence on the graph outputs; record each fusion's own error as a diagnostic.

    Each fused chain's output keeps its name, so comparing that value in both models measures
    the fusion, where the value still exists: a later merge may have absorbed it.
    """
    outputs = [r.output for r in report.fusions if r.graph == _MAIN_GRAPH and r.output]
    try:
        result = check_equivalence(
            src, candidate, extra_outputs=outputs, benchmark=benchmark, **options
        )
    except OriginalModelError as e:  # nothing can run the original: say how to go on
        raise OriginalModelError(f"{e}; --no-validate writes the fused model unvalidated") from e
    # The intermediate values' facts live in each fusion record, not in this dict.
    report.validation = dataclasses.replace(result, intermediates=()).to_dict()
    del report.validation["intermediates"]
    report.validated = bool(result.passed)
    report.benchmark = result.benchmark
    stats = {s.name: s for s in (*result.outputs, *result.intermediates)}
    for index, record in enumerate(report.fusions):
        if record.graph != _MAIN_GRAPH:
            record.error_note = "not measured: the value is inside a subgraph"
            continue
        if not record.output and record.merged_into:  # a later merge took this one's output in
            record.error_note = (
                "not measured: the value no longer exists in the fused model "
                f"(merged on into '{record.merged_into}')"
            )
            continue
        if not record.output:  # a step folded across views: the old name now holds new values
            record.error_note = "not measured: a step was folded into the op's values"
            continue
        _record_diagnostic(record, stats[record.output])
        if report.first_divergence is None and record.output == result.first_divergence:
            report.first_divergence = index
    if report.first_divergence is None and not result.passed:
        # No surviving intermediate diverged: blame the fusion that writes a failing output.
        failing = {s.name for s in result.outputs if not s.passed}
        report.first_divergence = next(
            (i for i, r in enumerate(report.fusions) if r.output in failing), None
        )


def _record_diagnostic(record: FusionRecord, stats: OutputStats) -> None:
    if stats.measured and math.isfinite(stats.max_abs_error):
        record.max_error, record.tolerance_used = stats.max_abs_error, stats.tolerance_used
    else:
        record.error_note = stats.reason if not stats.measured else f"not measured: {stats.reason}"


def _failure_message(report: FusionReport, dst) -> str:
    """One line: what differs, and which fusion's output diverged first."""
    validation = report.validation or {}
    failed = [o for o in validation.get("outputs", []) if not o.get("passed", True)]
    details = [
        f"output '{o.get('name')}' differs by up to {o.get('max_abs_error', float('nan')):.3g}"
        + (f" ({o['reason']})" if o.get("reason") else "")
        for o in failed[:3]
    ]
    details += validation.get("failures", [])[:2]
    message = (
        f"validation failed, nothing written to {dst}: {'; '.join(details) or 'outputs differ'}"
    )
    if (record := report.diverged) is not None:
        message += (
            f"; first diverged: the fusion of [{', '.join(record.nodes)}] at its output "
            f"'{record.output}' (max error {record.max_error:.3g})"
        )
    return message


def export(
    module: Any,
    args: tuple[Any, ...],
    path: str | os.PathLike,
    *,
    dynamo: bool = True,
    policy: Policy = "cost",
    validate: bool = True,
    force: bool = False,
    **export_kwargs: Any,
) -> FusionReport:
    """``torch.onnx.export(module, args, ...)`` then :func:`fuse_file` into ``path``.

    Extra keyword arguments (``input_names``, ``dynamic_axes``, ``dynamic_shapes``, ``opset_version``
    ...) go to ``torch.onnx.export``. Requires the ``torch`` extra.
    """
    try:
        import torch
    except ImportError as e:
        raise InputError("converter.export needs torch: pip install 'onnx-fuse[torch]'") from e
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: output folder {path.parent} does not exist")
    tmp = io.make_temp_dir(str(path.parent))
    try:
        raw = Path(tmp) / path.name
        torch.onnx.export(module, args, str(raw), dynamo=dynamo, **export_kwargs)
        report = fuse_file(raw, path, policy=policy, validate=validate, force=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # The summary names what the user asked for, not the temporary file torch wrote.
    report.source = f"torch.onnx.export({type(module).__name__})"
    return report


@paused_collection()
def check(
    original: str | os.PathLike,
    candidate: str | os.PathLike,
    *,
    strict: bool = False,
    match_inputs: str = "name",
    **options: Any,
) -> EquivalenceReport:
    """``onnx-fuse check``: :func:`check_equivalence` of two model files, with the CLI's extras.

    Inputs named differently are refused first, naming both lists, unless ``match_inputs`` is
    ``"position"`` (the candidate's inputs are then renamed, in memory, to the original's, in
    order). ``strict`` requires bit-exact outputs. ``benchmark=`` (in ``options``) times both
    models too, as :func:`fuse_file` does.
    """
    check_inputs_file(options.get("inputs"))
    if match_inputs not in ("name", "position"):
        raise InputError(f"match_inputs must be 'name' or 'position', not {match_inputs!r}")
    cand = _matched_inputs(original, candidate, by_position=match_inputs == "position")
    if strict:
        options.update(atol=0.0, rtol=0.0)
    result = check_equivalence(original, cand, **options)
    _warn(result.benchmark, "the candidate")
    return _bit_exact(result) if strict else result


def _proto_input_names(proto: onnx.ModelProto) -> list[str]:
    """The graph inputs that are not also initializers (those are weights, not data)."""
    weights = {t.name for t in proto.graph.initializer}
    return [v.name for v in proto.graph.input if v.name not in weights]


def _matched_inputs(original, candidate, *, by_position: bool) -> str | os.PathLike | ir.Model:
    """``candidate``, or its model with inputs renamed to the original's (``by_position``)."""
    want = _proto_input_names(io.load_proto(original))  # names only: no onnx_ir model built
    have = _proto_input_names(io.load_proto(candidate))
    if want == have:
        return candidate
    if not by_position:
        raise InputError(
            f"input names differ: {os.fspath(original)} has {want}, {os.fspath(candidate)} has "
            f"{have}; pass --match-inputs position to feed them in order"
        )
    if len(want) != len(have):
        raise InputError(
            f"inputs differ in number: {os.fspath(original)} has {len(want)} {want}, "
            f"{os.fspath(candidate)} has {len(have)} {have}"
        )
    cand = io.load_model(candidate)
    values = [v for v in cand.graph.inputs if v.name not in cand.graph.initializers]
    for value, name in zip(values, want, strict=True):
        value.name = name
    return cand


def _bit_exact(result: EquivalenceReport) -> EquivalenceReport:
    """``result`` with every output that is not equal bit for bit marked as failed."""

    def exact(s: OutputStats) -> OutputStats:
        if s.passed and not s.accepted_by_reference:
            return s
        return dataclasses.replace(s, passed=False, reason=_strict_reason(s.reason))

    outputs = tuple(exact(s) for s in result.outputs)
    results = tuple(exact(s) for s in result.results)
    passed = result.passed and all(s.passed for s in results)
    return dataclasses.replace(result, outputs=outputs, results=results, passed=passed)
