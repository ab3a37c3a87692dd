"""Does the original model agree with itself? Asked before a failed validation blames a merge.

A model exported while the torch module was still in training mode keeps ``Dropout`` active, and
a model with ``RandomNormal`` and friends draws new values on each run: its outputs differ from
run to run, so no rewrite of it can be proven equal. :func:`check_deterministic` runs the
original twice on the same inputs; when the two runs differ it raises :class:`InputError` naming
the random node and what to do ("not deterministic: Dropout 'node_dropout' runs in training
mode; export after model.eval()").
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from converter.equivalence.inputs import check_inputs, load_inputs_npz, synthesize_inputs
from converter.equivalence.runtime import Runner, Side, load_side, one_line, open_session
from converter.equivalence.widen import narrow_float_types, open_float32
from converter.errors import InputError, OriginalModelError
from converter.fusion.core.constants import Constants
from converter.fusion.core.declined import Declined

__all__ = ["check_deterministic", "random_nodes"]

logger = logging.getLogger(__name__)

_RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
)


def random_nodes(model: ir.Model) -> list[str]:
    """Why ``model`` may give different outputs on each run: one phrase per random node."""
    found = []
    for node in model.graph.all_nodes():
        label = f"{node.op_type} '{node.name or node.outputs[0].name}'"
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _RANDOM_OPS or node.op_type == "Bernoulli":
            found.append(f"{label} draws new random values on each run")
        elif node.op_type == "Dropout" and _training_mode(node):
            found.append(f"{label} runs in training mode; export after model.eval()")
    return found


def _training_mode(node: ir.Node) -> bool:
    """Dropout's ``training_mode`` input (opset 12+) is not a constant false."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return False
    value = Constants().array(node.inputs[2])
    return isinstance(value, Declined) or bool(np.any(value))


def check_deterministic(
    model_path: str | os.PathLike,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    **_ignored: object,
) -> None:
    """Run the model twice on the same inputs; raise :class:`InputError` if the runs differ
    (:class:`~converter.errors.OriginalModelError` if onnxruntime cannot run it at all)."""
    side = load_side(model_path, "original")
    if isinstance(inputs, (str, os.PathLike)):
        feeds = load_inputs_npz(inputs, side.model).values
    elif inputs is not None:
        feeds = check_inputs(side.model, inputs).values
    else:
        feeds = synthesize_inputs(side.model, seed=seed, input_shapes=input_shapes).values
    with tempfile.TemporaryDirectory(prefix="onnx-fuse-determinism-") as workdir:
        runner = _open(side, workdir)
        try:
            first, second = runner.run(feeds), runner.run(feeds)
        except Exception as e:  # onnxruntime raises many types: the original's fault, not ours
            raise OriginalModelError(
                f"onnxruntime cannot run the {side.label}: {one_line(e)}"
            ) from e
    differing = [name for name in first if not _same(first[name], second[name])]
    if not differing:
        return
    causes = random_nodes(side.model) or ["a node draws random values"]
    logger.info("outputs %s differ between two runs of %s", differing, model_path)
    raise InputError(
        f"{os.fspath(model_path)}: not deterministic: {causes[0]} (output '{differing[0]}' "
        "differs between two runs of the original model, so no rewrite of it can be validated)"
    )


def _open(side: Side, workdir: str) -> Runner:
    """The original's session, or its float32 copy's as validation runs it when onnxruntime
    cannot run the model in its own narrow float type (:mod:`converter.equivalence.widen`)."""
    try:
        return open_session(side, workdir, "original")
    except Exception as e:  # onnxruntime raises many types
        error: Exception = e
    if narrow_float_types(side.model):
        try:
            return open_float32(side, workdir, "original.float32")
        except Exception as e:  # onnxruntime raises many types
            error = e
    raise OriginalModelError(f"onnxruntime cannot load the {side.label}: {one_line(error)}")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))
