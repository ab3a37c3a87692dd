"""The float64 reference: a copy of the original computing in float64, built and run on demand.

Merging ``y = (x @ W1) @ W2`` into ``x @ (W1 @ W2)`` reassociates sums, so on wide layers the
candidate can differ from the original by more than a fixed tolerance while being *closer* to
the exact result. When a floating-point output fails the comparison rule, a float64 copy of the
original is run (float initializers, ``Constant`` values and ``Cast``/``dtype`` targets turned
into float64, float inputs cast to float64) and :func:`converter.equivalence.compare.judge_with_reference`
decides with it. The reference is built once, only when needed. onnxruntime has no float64
kernel for some ops (``Conv`` among them); then onnx's own reference evaluator (numpy, slower,
every standard op) runs the float64 copy instead, and the note says so. If neither can run it,
:attr:`Reference.note` says why and nothing is rescued.
"""

from __future__ import annotations

__all__ = ["Reference", "BatchNormalization"]

import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
from onnx.reference.op_run import OpRun

from converter.equivalence.compare import dtype_kind
from converter.equivalence.runtime import Runner, Side, one_line, open_session
from converter.equivalence.widen import retyped

logger = logging.getLogger(__name__)


class Reference:
    """The float64 copy of the original, built on first use and reused across trials."""

    def __init__(self, side: Side, workdir: str) -> None:
        self._side, self._workdir = side, workdir
        self._runner: Runner | _Evaluator | None = None
        self._built = False
        self._last: tuple[int, dict[str, np.ndarray]] | None = None
        self.note = "not needed"

    def run(self, feeds: Mapping[str, np.ndarray], trial: int) -> dict[str, np.ndarray] | None:
        """Return the float64 outputs for ``feeds``, or ``None`` (and a note) if impossible."""
        if not self._built:
            self._built = True
            self._runner = self._build()
        if self._runner is None:
            return None
        if self._last is not None and self._last[0] == trial:  # a trial run again for its values
            return self._last[1]
        try:
            outputs = self._runner.run({k: _widen(v) for k, v in feeds.items()})
        except Exception as e:  # onnxruntime raises many types
            self.note = f"unavailable: it fails to run on trial {trial} ({one_line(e)})"
            return None
        if self.note.startswith("not needed"):
            self.note = "used" + self.note.removeprefix("not needed")
        self._last = (trial, outputs)
        return outputs

    def _build(self) -> Runner | _Evaluator | None:
        """onnxruntime's session of the float64 copy, or onnx's evaluator where onnxruntime
        lacks a float64 kernel, or None (with the note) when neither can run it."""
        try:
            model = _float64_model(self._side.model)
        except Exception as e:  # onnx_ir raises many types
            self.note = f"unavailable: the float64 copy cannot be made ({one_line(e)})"
            return None
        try:
            return open_session(Side("reference", model, None, []), self._workdir, "reference")
        except Exception as e:  # onnxruntime raises many types
            reason = one_line(e)
        try:
            evaluator = _Evaluator(model)
        except Exception as e:  # onnx's evaluator raises many types (an unknown op, say)
            self.note = (
                f"unavailable: onnxruntime cannot build it ({reason}), nor onnx's reference "
                f"evaluator ({one_line(e)})"
            )
            logger.info("float64 reference %s", self.note)
            return None
        self.note = (
            f"not needed (onnx's reference evaluator: onnxruntime cannot build it, {reason})"
        )
        return evaluator


class _Evaluator:
    """onnx's reference evaluator over the float64 copy, run like a :class:`Runner`."""

    def __init__(self, model: ir.Model) -> None:
        proto = ir.to_proto(model)
        self._evaluator = onnx.reference.ReferenceEvaluator(proto, new_ops=[BatchNormalization])
        self.output_names = [v.name for v in model.graph.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._evaluator.input_names
        outputs = self._evaluator.run(None, {k: v for k, v in feeds.items() if k in names})
        return {n: np.asarray(a) for n, a in zip(self.output_names, outputs, strict=True)}


class BatchNormalization(OpRun):  # the class name is the op type it replaces
    """Inference-mode BatchNormalization for onnx's reference evaluator (``new_ops``): onnx's
    own (1.23) computes opsets 9 to 14 as if in training mode."""

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=1e-5, momentum=None, training_mode=0):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        s = scale.reshape(shape) / np.sqrt(var.reshape(shape) + epsilon)
        return (((x - mean.reshape(shape)) * s + bias.reshape(shape)).astype(x.dtype),)


def _widen(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if dtype_kind(array.dtype) == "float" else array


def _float64_model(model: ir.Model) -> ir.Model:
    """A copy of ``model`` computing in float64 wherever it computed in another float type."""
    ref = retyped(model, ir.DataType.DOUBLE, lambda dtype: True)
    # onnxruntime sorts a main graph listed out of order; onnx's evaluator runs nodes as listed.
    ref.graph.sort()
    return ref
