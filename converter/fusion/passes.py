"""FuseLinearChainsPass: merge chains of linear ops into one op each, in place.

In every graph (the main graph and every ``If``/``Loop``/``Scan`` body), two phases:

1. parallel branches (:mod:`converter.fusion.branches`): ``Add(A(x), B(x))`` of linear chains of one
   input (a LoRA adapter, a residual) becomes one op, ``W = Wa + Wb``, ``b = ba + bb``;
2. chains (:mod:`converter.fusion.chains`, elementwise steps of :mod:`converter.fusion.steps` included): each
   segment the cost model chose is composed in float64 (:func:`algebra.compose_all`:
   ``W = W1 @ W2 @ ...``, ``b = (b1 @ W2 + b2) @ W3 + ...``).

Each result is written into the graph by :func:`converter.fusion.rewrite.emit`: rounded once to the
model's dtype, as ``Gemm(transB=1)`` for 2-D inputs or ``MatMul`` + ``Add`` for N-D inputs, taking
over the old output value so that everything downstream is untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import onnx_ir as ir

from converter.fusion import algebra, branches, chains, rewrite
from converter.fusion.recognize import LinearOp, is_onnx
from converter.model_io import training
from converter.model_io.progress import ProgressCallback, no_progress
from converter.report import Declined, FusionRecord, FusionReport

__all__ = ["FuseLinearChainsPass", "fuse_model", "iter_graphs"]

logger = logging.getLogger(__name__)

_MIN_OPSET = 7


def iter_graphs(graph: ir.Graph, label: str = "main graph") -> Iterator[tuple[ir.Graph, str]]:
    """``graph`` and, recursively, every subgraph held in a node attribute, with readable labels."""
    yield graph, label
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                subgraphs = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                subgraphs = list(attr.value)
            else:
                continue
            for i, sub in enumerate(subgraphs):
                suffix = f"[{i}]" if len(subgraphs) > 1 else ""
                yield from iter_graphs(sub, f"{node.name or node.op_type}.{attr.name}{suffix}")


def _model_totals(model: ir.Model) -> tuple[int, int, int]:
    """(linear ops, MACs per row, weight parameters) over all graphs, from shapes alone."""
    ops = macs = params = 0
    for graph, _ in iter_graphs(model.graph):
        params += sum(rewrite.tensor_size(v) for v in graph.initializers.values())
        for node in graph:
            if not is_onnx(node):
                continue
            if node.op_type == "Constant" and "value" in node.attributes:
                params += rewrite.tensor_size_of(node.attributes["value"].as_tensor())
            if node.op_type in ("Gemm", "MatMul"):
                ops += 1
                if len(node.inputs) > 1 and node.inputs[1] is not None:
                    macs += rewrite.tensor_size(node.inputs[1])
    return ops, macs, params


def _ticking(ops: list[LinearOp], tick: Callable[[], None]) -> Iterator[algebra.AffineMap]:
    """Each op's float64 map, built only when the fold reaches it; ``tick`` after each."""
    for op in ops:
        yield op.affine
        tick()


def _merge_segment(
    graph: ir.Graph,
    ops: list[LinearOp],
    names: rewrite.Names,
    opset: int,
    label: str,
    policy: algebra.Policy,
    tick: Callable[[], None] = lambda: None,
) -> FusionRecord | Declined:
    """Rewrite one segment of a chain as a single op (see :func:`converter.fusion.rewrite.emit`)."""
    affine = algebra.compose_all(_ticking(ops, tick))  # one float64 map at a time
    return rewrite.emit(graph, rewrite.Rewrite.segment(ops), affine, names, opset, label, policy)


def fuse_model(
    model: ir.Model,
    *,
    policy: algebra.Policy = "cost",
    progress: ProgressCallback = no_progress,
) -> FusionReport:
    """Merge every chain of linear ops in ``model`` in place and return what was done and why not.

    ``progress(stage, done, total)`` is called as graphs are analysed and segments merged.
    """
    if policy not in ("cost", "always"):
        raise ValueError(f"unknown policy {policy!r}; expected 'cost' or 'always'")
    start = time.perf_counter()
    report = FusionReport()
    report.linear_ops_before, report.macs_before, report.params_before = _model_totals(model)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < _MIN_OPSET:
        report.declined.append(
            Declined(
                [], f"ai.onnx opset {opset} is older than {_MIN_OPSET}; nothing merged", "model"
            )
        )
    else:
        names = rewrite.Names(graph for graph, _ in iter_graphs(model.graph))
        training.mark_trained(model)
        _merge_parallel_branches(model, policy, names, opset, report)
        segments = _plan(model, policy, report, progress)
        _merge_all(segments, names, opset, policy, report, progress)
    report.linear_ops_after, report.macs_after, report.params_after = _model_totals(model)
    report.seconds = time.perf_counter() - start
    logger.info(
        "merged %d chain(s); %d not merged; linear ops %d -> %d",
        len(report.fusions),
        len(report.declined),
        report.linear_ops_before,
        report.linear_ops_after,
    )
    return report


def _merge_parallel_branches(
    model: ir.Model, policy: algebra.Policy, names: rewrite.Names, opset: int, report: FusionReport
) -> None:
    """Merge every ``Add`` of two linear branches of one input (LoRA, residual) into one op,
    before chains are looked for: the merged op can then join the chain around it."""
    for graph, label in list(iter_graphs(model.graph)):
        found, _ = chains.find_chains(graph, label, min_length=1)
        parallels, declined = branches.find_parallel(found, policy, label)
        report.declined.extend(declined)
        for parallel in parallels:
            merge = rewrite.Rewrite.parallel(parallel)
            result = rewrite.emit(graph, merge, parallel.affine(), names, opset, label, policy)
            (report.declined if isinstance(result, Declined) else report.fusions).append(result)


_Segment = tuple[ir.Graph, str, list[LinearOp]]


def _plan(
    model: ir.Model, policy: algebra.Policy, report: FusionReport, progress: ProgressCallback
) -> list[_Segment]:
    """Find and plan every chain in every graph; segments are disjoint, so merging one leaves
    the others' nodes and values as they were."""
    graphs = list(iter_graphs(model.graph))
    segments: list[_Segment] = []
    for n, (graph, label) in enumerate(graphs):
        progress("analysing", n, len(graphs))
        found, declined = chains.find_chains(graph, label)
        report.declined.extend(declined)
        for chain in found:
            plan, split_reasons = chains.plan_chain(chain, policy, label)
            report.declined.extend(split_reasons)
            segments.extend((graph, label, chain[i:j]) for i, j in plan.segments)
    return segments


def _merge_all(
    segments: list[_Segment],
    names: rewrite.Names,
    opset: int,
    policy: algebra.Policy,
    report: FusionReport,
    progress: ProgressCallback,
) -> None:
    """Merge the planned segments, counting composed ops for the progress line."""
    total, done = sum(len(ops) for _, _, ops in segments), 0

    def tick() -> None:
        nonlocal done
        done += 1
        progress("merging", done, total)

    for graph, label, ops in segments:
        result = _merge_segment(graph, ops, names, opset, label, policy, tick)
        if isinstance(result, Declined):
            report.declined.append(result)
            logger.debug("%s", result)
        else:
            report.fusions.append(result)
            logger.debug("merged %s", result.nodes)


class FuseLinearChainsPass(ir.passes.InPlacePass):
    """Merge chains of Gemm / MatMul+Add with constant weights into one op each (in place).

    Works on any ``onnx_ir.Model``, including what ``torch.onnx.export(..., dynamo=True).model``
    returns. The report of the last call is kept in ``self.report``.
    """

    def __init__(self, policy: algebra.Policy = "cost") -> None:
        super().__init__()
        self.policy = policy
        self.report: FusionReport | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = fuse_model(model, policy=self.policy)
        return ir.passes.PassResult(model, modified=self.report.modified)
