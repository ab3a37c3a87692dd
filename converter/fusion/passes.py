"""FuseLinearChainsPass: merge chains and branch sums of linear ops into one op each, in place.

The pass runs the engine (:mod:`converter.fusion.engine`) on every graph of the model, the main
graph and every ``If``/``Loop``/``Scan`` body, and returns a :class:`FusionPassResult`: an
onnx-ir ``PassResult`` whose ``modified`` is computed (a merge was made) and which carries the
:class:`~converter.report.FusionReport` saying what was merged and why the rest was not.

The algebra (:mod:`converter.fusion.algebra`): a chain composes as ``W = W1 @ W2 @ ...``,
``b = (b1 @ W2 + b2) @ W3 + ...``; a sum of branches of one input as ``W = sum s_k W_k``,
``b = sum s_k b_k``; Gemm normalises to ``W = alpha * op(B)``, ``b = beta * C``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator

import onnx_ir as ir

from converter.fusion import algebra, invariants, order, shapes
from converter.fusion.constants import Constant, is_onnx, parameter_count, recorded_size, resolve
from converter.fusion.engine import Context, fuse_graph
from converter.fusion.rewrite import Names
from converter.fusion.runtime_patterns import rewrite_for_runtime
from converter.gcpause import paused_collection
from converter.model_io import training
from converter.model_io.progress import ProgressCallback, no_progress
from converter.report import Declined, FusionReport

__all__ = ["FuseLinearChainsPass", "FusionPassResult", "fuse_model", "iter_graphs"]

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


def _onnx_opset(model: ir.Model) -> int:
    """The model's ai.onnx opset as onnxruntime reads it (0 if none is imported): ``""`` and
    ``"ai.onnx"`` name one domain, and of two imports of it the later one counts."""
    versions = [v for domain, v in model.opset_imports.items() if domain in ("", "ai.onnx")]
    return versions[-1] if versions else 0


def _model_totals(graphs: list[tuple[ir.Graph, str]]) -> tuple[int, int, int]:
    """(linear ops, MACs per row, weight parameters) over ``graphs``, from shapes alone."""
    ops = macs = params = 0
    for graph, _ in graphs:
        params += sum(_initializer_size(v) for v in graph.initializers.values())
        for node in graph:
            if not is_onnx(node):
                continue
            if node.op_type == "Constant":
                params += parameter_count(node.outputs[0])
            if node.op_type in ("Gemm", "MatMul"):
                ops += 1
                if len(node.inputs) > 1 and node.inputs[1] is not None:
                    macs += parameter_count(node.inputs[1])
            elif node.op_type == "Einsum" and any(
                isinstance(resolve(v), Constant) for v in node.inputs
            ):
                ops += 1
                macs += sum(
                    parameter_count(v) for v in node.inputs if isinstance(resolve(v), Constant)
                )
            elif node.op_type == "Conv" and isinstance(resolve(node.inputs[1]), Constant):
                ops += 1  # counted as a linear op; its MACs are per output position, not per row
    return ops, macs, params


def _initializer_size(value: ir.Value) -> int:
    """Elements of an initializer, from the shape onnx-ir recorded (nothing read or resolved)."""
    size = recorded_size(value)
    if size is not None:
        return size
    tensor = value.const_value
    return parameter_count(value) if tensor is None else tensor.size


@paused_collection()
def fuse_model(
    model: ir.Model,
    *,
    policy: algebra.Policy = "cost",
    progress: ProgressCallback = no_progress,
) -> FusionReport:
    """Merge every chain and branch sum of linear ops in ``model`` in place; return what was done
    and why the rest was not. ``progress(stage, done, total)`` is called as graphs are fused.

    Graphs whose nodes are out of topological order are sorted first (the report lists them);
    one with no such order is refused (:func:`converter.fusion.order.sort_model`).

    Raises:
        InputError: a graph with a cycle, or a node or graph output reading an undefined value.
        EngineError: a rewrite broke an invariant (a bug in onnx-fuse).
    """
    if policy not in ("cost", "always"):
        raise ValueError(f"unknown policy {policy!r}; expected 'cost' or 'always'")
    start = time.perf_counter()
    report = FusionReport()
    # Before anything reads the graph: the engine and its invariants read nodes in order.
    report.sorted_graphs = order.sort_model(model)
    # Merges never add or remove a subgraph (they replace linear ops and their joins only).
    graphs = list(iter_graphs(model.graph))
    report.linear_ops_before, report.macs_before, report.params_before = _model_totals(graphs)
    opset = _onnx_opset(model)
    if opset < _MIN_OPSET:
        reason = f"ai.onnx opset {opset} is older than {_MIN_OPSET}; nothing merged"
        report.declined.append(Declined([], reason, "model"))
    else:
        training.mark_trained(model)
        with shapes.on_demand(model):
            _fuse_graphs(model, graphs, opset, policy, progress, report)
        invariants.check_model(model)
    report.linear_ops_after, report.macs_after, report.params_after = _model_totals(graphs)
    report.seconds = time.perf_counter() - start
    logger.info(
        "merged %d time(s); %d not merged; linear ops %d -> %d",
        len(report.fusions),
        len(report.declined),
        report.linear_ops_before,
        report.linear_ops_after,
    )
    return report


def _fuse_graphs(
    model: ir.Model,
    graphs: list[tuple[ir.Graph, str]],
    opset: int,
    policy: algebra.Policy,
    progress: ProgressCallback,
    report: FusionReport,
) -> None:
    """Fuse every graph; again while a merge let go of a constant another graph also reads
    (that graph's decisions may change), keeping each graph's latest reasons."""
    ctx = Context(model, opset, policy, Names(g for g, _ in graphs), progress)
    for graph, label in graphs:  # first, so that no fold sees an order the runtime misses
        lines = rewrite_for_runtime(graph, ctx.names.fresh)
        report.runtime_rewrites.extend(f"{label}: {line}" for line in lines)
    declined: dict[int, list[Declined]] = {}
    for _ in range(len(graphs) + 1):
        ctx.released_elsewhere = False
        for n, (graph, label) in enumerate(graphs):
            progress("analysing", n, len(graphs))
            fusions, declined[n] = fuse_graph(ctx, graph, label)
            report.fusions.extend(fusions)
        if not ctx.released_elsewhere:
            break
    report.declined.extend(d for n in sorted(declined) for d in declined[n])


@dataclasses.dataclass
class FusionPassResult(ir.passes.PassResult):
    """An onnx-ir ``PassResult`` that also carries the run's :class:`FusionReport`."""

    report: FusionReport = dataclasses.field(default_factory=FusionReport)


class FuseLinearChainsPass(ir.passes.InPlacePass):
    """Merge chains of Gemm / MatMul+Add with constant weights into one op each (in place).

    Works on any ``onnx_ir.Model``, including what ``torch.onnx.export(..., dynamo=True).model``
    returns. The result is a :class:`FusionPassResult` (``result.report``); the report of the last
    call is also kept in ``self.report``. ``modified`` is also true when nothing merged but the
    input's nodes had to be put in topological order.
    """

    def __init__(self, policy: algebra.Policy = "cost") -> None:
        super().__init__()
        self.policy = policy
        self.report: FusionReport | None = None

    def call(self, model: ir.Model) -> FusionPassResult:
        self.report = fuse_model(model, policy=self.policy)
        return FusionPassResult(model, self.report.modified, self.report)
