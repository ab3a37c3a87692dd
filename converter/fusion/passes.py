"""FuseLinearChainsPass: merge chains and branch sums of linear ops into one op each, in place.

The pass runs the engine (:mod:`converter.fusion.engine`) on every graph of the model, the main
graph and every ``If``/``Loop``/``Scan`` body, and returns a :class:`FusionPassResult`: an
onnx-ir ``PassResult`` whose ``modified`` is computed (a merge was made) and which carries the
:class:`~converter.report.FusionReport` saying what was merged and why the rest was not.

The algebra (:mod:`converter.fusion.linear.algebra`): a chain composes as ``W = W1 @ W2 @ ...``,
``b = (b1 @ W2 + b2) @ W3 + ...``; a sum of branches of one input as ``W = sum s_k W_k``,
``b = sum s_k b_k``; Gemm normalises to ``W = alpha * op(B)``, ``b = beta * C``.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import onnx_ir as ir

from converter.fusion.core import invariants, order
from converter.fusion.core.constants import Constants, parameter_count, recorded_size
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import is_onnx, iter_graphs, op_key
from converter.fusion.core.policy import Policy, check_policy
from converter.fusion.core.runtime_patterns import rewrite_for_runtime
from converter.fusion.engine import fuse_graph
from converter.gcpause import paused_collection
from converter.model_io import training
from converter.model_io.progress import ProgressCallback, no_progress
from converter.report import FusionReport

__all__ = ["FuseLinearChainsPass", "FusionPassResult", "fuse_model", "iter_graphs"]

logger = logging.getLogger(__name__)

_MIN_OPSET = 7


def _model_totals(graphs: list[tuple[ir.Graph, str]]) -> tuple[int, int, int]:
    """(linear ops, MACs per row, weight parameters) over ``graphs``, from shapes alone.

    What the file holds: a weight the model's training_info updates counts like any other; an
    ONNX-ML regressor's or classifier's coefficients (attributes) count as its weight."""
    constants = Constants()
    ops = macs = params = 0
    for graph, _ in graphs:
        params += sum(_initializer_size(constants, v) for v in graph.initializers.values())
        for node in graph:
            if op_key(node) in _ML_LINEAR:
                weights = _ml_weights(node)
                ops, macs, params = ops + 1, macs + weights, params + weights
            if not is_onnx(node):
                continue
            if node.op_type == "Constant":
                params += parameter_count(constants, node.outputs[0])
            if node.op_type in ("Gemm", "MatMul"):
                ops += 1
                if len(node.inputs) > 1 and node.inputs[1] is not None:
                    macs += parameter_count(constants, node.inputs[1])
            elif node.op_type == "Einsum" and any(map(constants.is_constant, node.inputs)):
                ops += 1
                macs += sum(
                    parameter_count(constants, v) for v in node.inputs if constants.is_constant(v)
                )
            elif node.op_type == "Conv" and constants.is_constant(node.inputs[1]):
                ops += 1  # counted as a linear op; its MACs are per output position, not per row
    return ops, macs, params


_ML_LINEAR = frozenset({"ai.onnx.ml.LinearRegressor", "ai.onnx.ml.LinearClassifier"})


def _ml_weights(node: ir.Node) -> int:
    """The coefficients an ONNX-ML linear op holds (one multiply-add each per row)."""
    return len(node.attributes.get_floats("coefficients", None) or ())


def _initializer_size(constants: Constants, value: ir.Value) -> int:
    """Elements of an initializer, from the shape onnx-ir recorded (nothing read or resolved)."""
    size = recorded_size(value)
    if size is not None:
        return size
    tensor = value.const_value
    return parameter_count(constants, value) if tensor is None else tensor.size


@paused_collection()
def fuse_model(
    model: ir.Model,
    *,
    policy: Policy = "cost",
    progress: ProgressCallback = no_progress,
) -> FusionReport:
    """Merge every chain and branch sum of linear ops in ``model`` in place; return what was done
    and why the rest was not. ``progress(stage, done, total)`` is called as graphs are fused.

    Graphs whose nodes are out of topological order are sorted first (the report lists them);
    one with no such order is refused (:func:`converter.fusion.core.order.sort_model`).

    Raises:
        InputError: a graph with a cycle, or a node or graph output reading an undefined value.
        EngineError: a rewrite broke an invariant (a bug in onnx-fuse).
    """
    check_policy(policy)
    start = time.perf_counter()
    report = FusionReport()
    # Before anything reads the graph: the engine and its invariants read nodes in order.
    report.sorted_graphs = order.sort_model(model)
    # Merges never add or remove a subgraph (they replace linear ops and their joins only).
    graphs = list(iter_graphs(model.graph))
    report.linear_ops_before, report.macs_before, report.params_before = _model_totals(graphs)
    ctx = Context(model, policy, progress, trained=training.mark_trained(model))
    if ctx.opset < _MIN_OPSET:
        reason = f"ai.onnx opset {ctx.opset} is older than {_MIN_OPSET}; nothing merged"
        report.declined.append(Declined([], reason, "model"))
    else:
        with ctx.shapes.on_demand():
            _fuse_graphs(ctx, graphs, report)
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


def _fuse_graphs(ctx: Context, graphs: list[tuple[ir.Graph, str]], report: FusionReport) -> None:
    """Fuse every graph; again while a merge let go of a constant another graph also reads
    (that graph's decisions may change), keeping each graph's latest reasons."""
    for graph, label in graphs:  # first, so that no fold sees an order the runtime misses
        lines = rewrite_for_runtime(ctx, graph)
        report.runtime_rewrites.extend(f"{label}: {line}" for line in lines)
    declined: dict[int, list[Declined]] = {}
    for _ in range(len(graphs) + 1):
        ctx.released_elsewhere = False
        for n, (graph, label) in enumerate(graphs):
            ctx.progress("analysing", n, len(graphs))
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

    def __init__(self, policy: Policy = "cost") -> None:
        super().__init__()
        self.policy = policy
        self.report: FusionReport | None = None

    def call(self, model: ir.Model) -> FusionPassResult:
        self.report = fuse_model(model, policy=self.policy)
        return FusionPassResult(model, self.report.modified, self.report)
