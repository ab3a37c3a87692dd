"""The Python entry points export pipelines call: ``fuse``, ``fuse_file`` and ``export``.

``fuse`` rewrites a model in memory; ``fuse_file`` is the whole job the CLI does (load safely,
fuse, write to a temporary file beside the destination, prove equivalence with onnxruntime, and
only then move the result into place); ``export`` runs ``torch.onnx.export`` and then ``fuse_file``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnx_ir as ir

from converter.equivalence.validate import check_equivalence
from converter.errors import InputError, ValidationError
from converter.fusion.algebra import Policy
from converter.fusion.passes import fuse_model
from converter.model_io import files as io
from converter.model_io import training
from converter.model_io.progress import ProgressCallback, no_progress
from converter.report import FusionReport

__all__ = ["fuse", "fuse_file", "export"]

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", onnx.ModelProto, ir.Model)


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
    external_data: str | None = None,
    force: bool = False,
    keep_on_fail: bool = False,
    progress: ProgressCallback = no_progress,
) -> FusionReport:
    """Fuse the model at ``src`` and write it to ``dst``; return the :class:`FusionReport`.

    The output is written into a temporary folder beside ``dst`` and moved into place only when
    complete and (with ``validate``) proven equivalent by onnxruntime; the input is never touched.
    Raises :class:`InputError` for unreadable input or a refused destination and
    :class:`ValidationError` when outputs differ (nothing is written unless ``keep_on_fail``).
    """
    start = time.perf_counter()
    progress("loading", None, None)
    model = io.load_model(src)
    report = fuse_model(model, policy=policy, progress=progress)
    report.source, report.destination = os.fspath(src), os.fspath(dst)
    progress("writing", None, None)
    with io.write_model(model, dst, external_data=external_data, force=force, src=src) as pending:
        if validate and report.fusions:
            progress("validating", None, None)
            _validate_into(
                report,
                src,
                pending.path,
                inputs=inputs,
                input_shapes=input_shapes,
                atol=atol,
                rtol=rtol,
                trials=trials,
                seed=seed,
            )
            if not report.validated and not keep_on_fail:
                raise ValidationError(_failure_message(report, dst))
        pending.commit()
    report.seconds = time.perf_counter() - start
    return report


def _validate_into(report: FusionReport, src, candidate, **options: Any) -> None:
    """Run the equivalence check, store it in ``report`` and each fusion's own max error."""
    # Each fused chain's output keeps its name, so comparing it in both models measures that fusion.
    intermediates = sorted({r.output for r in report.fusions if r.graph == "main graph" and r.output})
    result = check_equivalence(src, candidate, extra_outputs=intermediates, **options)
    report.validation = result.to_dict()
    report.validated = bool(result.passed)
    errors = {s.name: s.max_abs_error for s in result.outputs}
    for record in report.fusions:
        record.max_error = errors.get(record.output)


def _failure_message(report: FusionReport, dst) -> str:
    failed = [o for o in (report.validation or {}).get("outputs", []) if not o.get("passed", True)]
    detail = "; ".join(
        f"output '{o.get('name')}' differs by up to {o.get('max_abs_error', float('nan')):.3g}"
        + (f" ({o['reason']})" if o.get("reason") else "")
        for o in failed[:3]
    )
    return f"validation failed, nothing written to {dst}: {detail or 'outputs differ'}"


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
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-fuse-export-") as tmp:
        raw = Path(tmp) / path.name
        torch.onnx.export(module, args, str(raw), dynamo=dynamo, **export_kwargs)
        return fuse_file(raw, path, policy=policy, validate=validate, force=force)
