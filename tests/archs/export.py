"""Export torch modules with both exporters, randomise their affine parameters, count what is left.

* :func:`export_onnx` wraps ``torch.onnx.export`` for the legacy TorchScript exporter (opset 17)
  and the ``torch.export`` exporter (opset 18, its default optimisation, saved with
  ``ONNXProgram.save``), in eval mode under a fixed seed.
* :func:`randomise` gives every BatchNorm statistic, norm affine and layer scale a non-trivial
  random value: the defaults (mean 0, var 1, weight 1, bias 0, scale 1e-5) hide folding mistakes.
* :func:`count_ops` and :func:`free_folds` measure an exported or fused file; the latter is the
  heuristic of ``tests/archs/free_folds.py`` (vendored from the shared tools folder).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch

__all__ = [
    "DYNAMO_OPSET",
    "LEGACY_OPSET",
    "count_linear",
    "count_ops",
    "export_onnx",
    "free_folds",
    "kept_for_runtime",
    "unexplained_folds",
    "randomise",
]

LEGACY_OPSET = 17
DYNAMO_OPSET = 18
_FREE_FOLDS = Path(__file__).with_name("free_folds.py")
_NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)


def export_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: str | os.PathLike,
    *,
    dynamo: bool,
    input_names: Sequence[str] = ("x",),
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    seed: int = 0,
) -> Path:
    """Export ``module`` (put in eval mode) on ``args`` to ``path`` with one exporter; return the path.

    ``dynamo=False``: TorchScript exporter, opset 17, constant folding on (its default).
    ``dynamo=True``: ``torch.export`` exporter, opset 18, with its default ``optimize=True``.
    ``dynamic_axes`` (``{"x": {0: "batch"}}``) is given to either exporter; static otherwise.
    """
    path = Path(path)
    module.eval()
    torch.manual_seed(seed)
    common = {"input_names": list(input_names), "dynamic_axes": dynamic_axes}
    with torch.no_grad(), warnings.catch_warnings():
        # torch's notices about its own exporters (legacy deprecated, pytree renames, ...)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        if not dynamo:
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=LEGACY_OPSET, **common
            )
            return path
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=DYNAMO_OPSET, verbose=False, **common
        )
    program.save(str(path), external_data=False)
    return path


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every norm statistic/affine and every other parameter of ``module`` a random value.

    BatchNorm: ``running_mean ~ N(0, 0.5)``, ``running_var ~ U(0.5, 2)``, ``weight ~ U(0.5, 1.5)``
    with random signs kept positive, ``bias ~ N(0, 0.5)``. Other parameters that are not weights of
    a ``Linear``/``Conv`` (layer scales, ``Affine`` alpha/beta, positional embeddings, tokens) get
    ``N(1, 0.3)`` when torch initialised them to a constant, so a scale is never 1 and a shift
    never 0. Returns ``module`` (changed in place) for chaining.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                c = sub.num_features
                sub.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                sub.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            if isinstance(sub, _NORMS) and getattr(sub, "weight", None) is not None:
                sub.weight.copy_(torch.rand(sub.weight.shape, generator=g) + 0.5)
                sub.bias.copy_(torch.randn(sub.bias.shape, generator=g) * 0.5)
            for name, p in sub.named_parameters(recurse=False):
                if isinstance(sub, _NORMS) and name in ("weight", "bias"):
                    continue
                if _is_constant(p):  # a layer scale, an affine, a zero bias: break the symmetry
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return module


def _is_constant(p: torch.Tensor) -> bool:
    return p.numel() > 0 and bool((p == p.reshape(-1)[0]).all())


def count_ops(model: str | os.PathLike | onnx.ModelProto) -> collections.Counter:
    """``Counter`` of op types in the main graph of ``model`` (a path or a proto)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    return collections.Counter(node.op_type for node in model.graph.node)


def count_linear(model: str | os.PathLike | onnx.ModelProto) -> int:
    """Linear ops with a constant weight in the main graph: ``Gemm``, ``MatMul``, ``Conv``.

    A weight is constant when it is an initializer, a ``Constant`` output, or an ``Identity`` of
    either; ``MatMul`` counts when either operand is (``MatMul(W, x)`` mixes tokens).
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    const = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in const):
            const.add(node.output[0])
    count = 0
    for node in model.graph.node:
        if node.op_type in ("Gemm", "Conv"):
            count += node.input[1] in const
        elif node.op_type == "MatMul":
            count += any(name in const for name in node.input)
    return count


def _free_folds_module():
    spec = importlib.util.spec_from_file_location("_archs_free_folds", _FREE_FOLDS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_folds(model: str | os.PathLike | onnx.ModelProto) -> tuple[int, int, list[str]]:
    """``(free folds, BatchNormalization nodes, where each fold is)`` left in ``model``."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    where: list[str] = []
    n = _free_folds_module().free_folds(model, where)
    bn = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    return n, bn, where


def kept_for_runtime(declined: list[dict]) -> set[str]:
    """The nodes a report's declined records (``to_dict()`` form) keep for the runtime."""
    return {n for d in declined if d["reason"].startswith("kept:") for n in d["nodes"]}


def unexplained_folds(where: list[str], kept: set[str]) -> list[str]:
    """The free folds (``free_folds``' lines, ``"Mul NODE before LINEAR"``) whose step is not
    among ``kept`` (nodes the report keeps for the runtime, :func:`kept_for_runtime`). The
    tool's heuristic lists, for one, an RMSNorm's weight reached through a ``Cast`` (LLaMA,
    TorchScript) or through ``Div(1, Sqrt)``: folding it costs onnxruntime its
    SimplifiedLayerNormalization."""
    return [line for line in where if line.split()[1] not in kept]
