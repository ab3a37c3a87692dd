"""One adapter type on one tiny model and one exporter: export it and its merge, fuse, measure.

Shared by ``tests/archs/test_adapters.py`` and ``benchmarks/adapters.py`` (issue 21):

* :func:`export_pair` builds ``archs.adapters.build(model, adapter)``, exports it and its
  ``merge_and_unload()`` with one torch exporter (``language.export_lm``) into a folder, and saves
  torch's outputs; an export torch cannot make is a :class:`language.ExporterCannot` with the
  exporter's first line (HRA's ``SerdeError``, BOFT's ``linalg_solve``, ...);
* :func:`fuse` runs ``onnx-fuse adapter.onnx --inputs ... -o fused.onnx --report ...`` (the CLI,
  validation on) and returns its exit code;
* :func:`measure` counts what a user compares: linear ops (``Gemm``, and ``MatMul``/``Einsum``
  with a constant operand), the bytes of weights, free folds, and fused kernels lost.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from archs import adapters, language
from archs.export import kept_for_runtime, unexplained_folds
from archs.free_folds import free_folds
from converter import cli
from converter.equivalence.kernels import fused_kernels, lost_kernels

__all__ = ["EXPORTERS", "Measured", "export_pair", "fuse", "linear_ops", "measure", "weight_bytes"]

EXPORTERS = {"legacy": False, "dynamo": True}


def export_pair(model: str, adapter: str, exporter: str, directory: Path) -> None:
    """``adapter.onnx`` and ``merged.onnx`` (with their ``.inputs.npz``) and ``torch.npz`` in
    ``directory``; raises :class:`language.ExporterCannot` when torch cannot export it."""
    directory.mkdir(parents=True, exist_ok=True)
    module = adapters.build(model, adapter)
    dynamo = EXPORTERS[exporter]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = language.export_lm(module, directory / "adapter.onnx", dynamo=dynamo)
    except language.ExporterCannot:
        raise
    except Exception as e:  # torch.export's and onnxscript's own errors: the exporter cannot
        first = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())[:160]  # no colours
        raise language.ExporterCannot(f"{type(e).__name__}: {first}") from e
    merged = adapters.merged(module)
    language.export_lm(merged, directory / "merged.onnx", dynamo=dynamo)
    np.savez(
        directory / "torch.npz",
        adapter=language.run_torch(module, exported.inputs),
        merged=language.run_torch(merged, exported.inputs),
    )


def fuse(directory: Path) -> int:
    """Today's ``onnx-fuse adapter.onnx --inputs adapter.inputs.npz -o fused.onnx``: exit code."""
    argv = [str(directory / "adapter.onnx"), "--inputs", str(directory / "adapter.inputs.npz")]
    argv += ["--report", str(directory / "fused.json"), "-o", str(directory / "fused.onnx")]
    return cli.main([*argv, "-q", "--force"])


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    inputs = {i.name for i in graph.input}
    names = {i.name for i in graph.initializer if i.name not in inputs}
    for node in graph.node:
        through = node.op_type in ("Identity", "Transpose", "Cast") and node.input[0] in names
        if node.op_type == "Constant" or through:
            names.update(node.output)
    return names


def linear_ops(model: onnx.ModelProto) -> int:
    """``Gemm`` nodes, and ``MatMul``/``Einsum`` nodes with a constant operand (the attention
    products of two activations do not count)."""
    constant = _constant_names(model.graph)
    return sum(
        node.op_type == "Gemm"
        or (node.op_type in ("MatMul", "Einsum") and any(i in constant for i in node.input))
        for node in model.graph.node
    )


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the data of the initializers and Constant nodes: what the model stores (their
    names aside: a merged weight's name is longer than an exporter's ``val_110``)."""
    tensors = list(model.graph.initializer)
    tensors += [
        a.t
        for n in model.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    return sum(numpy_helper.to_array(t).nbytes for t in tensors)


@dataclass
class Measured:
    """One fused adapter model against the ``merge_and_unload()`` export."""

    code: int
    ops: dict[str, int] = field(default_factory=dict)  # adapter, fused, merged
    weights: dict[str, int] = field(default_factory=dict)
    folds: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


def measure(directory: Path, code: int) -> Measured:
    """Counts of ``directory``'s three models (the fused one only when onnx-fuse made it)."""
    found = Measured(code)
    for kind in ("adapter", "fused", "merged"):
        path = directory / f"{kind}.onnx"
        if path.exists() and (kind != "fused" or code == 0):
            model = onnx.load(path)
            found.ops[kind] = linear_ops(model)
            found.weights[kind] = weight_bytes(model)
    if code == 0:
        fused = onnx.load(directory / "fused.onnx")
        where: list[str] = []
        free_folds(fused, where)
        report = json.loads((directory / "fused.json").read_text())
        found.folds = unexplained_folds(where, kept_for_runtime(report["declined"]))
        found.lost = lost_kernels(
            fused_kernels(directory / "adapter.onnx"), fused_kernels(directory / "fused.onnx")
        )
    return found
