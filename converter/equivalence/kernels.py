"""What onnxruntime runs: the fused kernels its graph optimiser makes of a model.

An op count is a proxy. onnxruntime rewrites a graph before running it (``GeluFusion`` turns
``Div -> Erf -> Add -> Mul -> Mul`` into one ``Gelu``, ``LayerNormFusion`` a decomposed norm
into one ``LayerNormalization``...), and a fold that removes one op from such a pattern can cost
the kernel: five elementwise passes instead of one. This module builds a CPU session with
extended optimisations, saves the graph onnxruntime would run
(``SessionOptions.optimized_model_filepath``) and counts its nodes, so that a rewrite can be
judged by what the runtime runs.
"""

from __future__ import annotations

import collections
import os
import tempfile

import onnx
import onnxruntime as ort

__all__ = ["FUSED_KERNELS", "lost_kernels", "runtime_graph_ops", "fused_kernels"]

# Contrib kernels that stand for a whole pattern of standard ops.
FUSED_KERNELS = (
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "QuickGelu",
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "RotaryEmbedding",
    "FusedConv",
    "FusedGemm",
    "FusedMatMul",
    "BiasSoftmax",
)
# A MatMul that absorbed a scale: a fold of that scale into the weight does as much.
_NOT_A_LOSS = frozenset({"FusedMatMul"})
# A kernel that also took in the Add before it is the same kernel and more: a Gelu that became a
# BiasGelu (a merged op's bias now next to it), a LayerNormalization that took in a residual Add.
_FAMILY = {
    "BiasGelu": "Gelu",
    "SkipLayerNormalization": "LayerNormalization",
    "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization",
}


def runtime_graph_ops(model: str | os.PathLike | onnx.ModelProto) -> collections.Counter:
    """``Counter`` of op types in the main graph onnxruntime (CPU, extended optimisations) runs."""
    with tempfile.TemporaryDirectory(prefix="onnx-fuse-ort-") as tmp:
        if isinstance(model, onnx.ModelProto):
            source = os.path.join(tmp, "model.onnx")
            onnx.save(model, source)
        else:
            source = os.fspath(model)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return collections.Counter(node.op_type for node in optimized.graph.node)


def fused_kernels(model: str | os.PathLike | onnx.ModelProto) -> dict[str, int]:
    """The fused kernels (:data:`FUSED_KERNELS`) onnxruntime makes of ``model``: ``{op: count}``."""
    ops = runtime_graph_ops(model)
    return {op: ops[op] for op in FUSED_KERNELS if ops[op]}


def lost_kernels(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """The fused kernels ``before`` has more of than ``after``: ``["Gelu 12 -> 0", ...]``.

    Kernels are counted by family (``Gelu`` with ``BiasGelu``, ``LayerNormalization`` with
    ``SkipLayerNormalization``...): one that took in the Add before it is not a loss."""
    a, b = _by_family(before), _by_family(after)
    return [f"{op} {count} -> {b.get(op, 0)}" for op, count in a.items() if b.get(op, 0) < count]


def _by_family(kernels: dict[str, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op, count in kernels.items():
        if op not in _NOT_A_LOSS:
            family = _FAMILY.get(op, op)
            counts[family] = counts.get(family, 0) + count
    return counts
