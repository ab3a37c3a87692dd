"""FuseLinearChainsPass: merge chains of linear ops into one op each, in place.

In every graph (the main graph and every ``If``/``Loop``/``Scan`` body), two phases:

1. parallel branches (:mod:`converter.branches`): ``Add(A(x), B(x))`` of linear chains of one
   input (a LoRA adapter, a residual) becomes one op, ``W = Wa + Wb``, ``b = ba + bb``;
2. chains (:mod:`converter.chains`, elementwise steps of :mod:`converter.steps` included): each
   segment the cost model chose is composed in float64 (:func:`algebra.compose_all`:
   ``W = W1 @ W2 @ ...``, ``b = (b1 @ W2 + b2) @ W3 + ...``).

Each result is rounded once to the model's dtype and emitted in the form the ops came in:

- 2-D input (any Gemm in the segment, or a rank-2 input): ``Gemm(x, W_t, b, transB=1)`` with the
  weight in torch's ``(out, in)`` layout, keeping the first op's ``transA``;
- N-D input: ``MatMul(x, W)`` with an ``(in, out)`` weight, then ``Add(., b)`` if there is a bias.

The merged op takes over the chain's output value (same name, type and shape), so everything
downstream, graph outputs included, is untouched. Weights the chain alone used are removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from converter import algebra, branches, chains, training
from converter.progress import ProgressCallback, no_progress
from converter.recognize import LinearOp
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


def _shape_list(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape]


def _tensor_size(value: ir.Value) -> int:
    if value.const_value is not None:
        return _tensor_size_of(value.const_value)
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return _tensor_size_of(producer.attributes["value"].as_tensor())
    if producer is not None and producer.op_type == "Transpose" and producer.inputs:
        return _tensor_size(producer.inputs[0])
    shape = value.shape
    return int(np.prod(shape.numpy())) if shape is not None and shape.is_static() else 0


def _tensor_size_of(tensor: ir.TensorProtocol) -> int:
    return int(np.prod(tensor.shape.numpy()))


def _model_totals(model: ir.Model) -> tuple[int, int, int]:
    """(linear ops, MACs per row, weight parameters) over all graphs, from shapes alone."""
    ops = macs = params = 0
    for graph, _ in iter_graphs(model.graph):
        params += sum(_tensor_size(v) for v in graph.initializers.values())
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Constant" and "value" in node.attributes:
                params += _tensor_size_of(node.attributes["value"].as_tensor())
            if node.op_type in ("Gemm", "MatMul"):
                ops += 1
                if len(node.inputs) > 1 and node.inputs[1] is not None:
                    macs += _tensor_size(node.inputs[1])
    return ops, macs, params


class _Names:
    """Unique node and value names across the whole model (ONNX names are global in a model)."""

    def __init__(self, model: ir.Model) -> None:
        self.used: set[str] = set()
        for graph, _ in iter_graphs(model.graph):
            self.used.update(v.name for v in graph.inputs if v.name)
            self.used.update(graph.initializers)
            for node in graph:
                self.used.update(v.name for v in node.outputs if v.name)
                if node.name:
                    self.used.add(node.name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _ticking(ops: list[LinearOp], tick: Callable[[], None]) -> Iterator[algebra.AffineMap]:
    """Each op's float64 map, built only when the fold reaches it; ``tick`` after each."""
    for op in ops:
        yield op.affine
        tick()


def _fused_name(ops: list[LinearOp]) -> str:
    names = [n for op in ops for n in op.names[:1]]
    if len(names) > 4:
        names = [names[0], f"...{len(names) - 2} more...", names[-1]]
    return "fused(" + "+".join(names) + ")"


def _emit_gemm(ops: list[LinearOp]) -> bool:
    shape = ops[0].input.shape
    return any(op.is_gemm for op in ops) or (shape is not None and len(shape) == 2)


def _initializer(graph: ir.Graph, names: _Names, base: str, array: np.ndarray) -> ir.Value:
    name = names.fresh(base)
    value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _remove_if_unused(value: ir.Value | None) -> None:
    """Drop an initializer, Constant node or weight Transpose that nothing uses any more."""
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    producer = value.producer()
    if value.is_initializer() and value.graph is not None and value.name:
        value.graph.initializers.pop(value.name, None)
    elif producer is not None and producer.graph is not None:
        if producer.op_type == "Constant":
            producer.graph.remove(producer, safe=True)
        elif producer.op_type == "Transpose":
            source = producer.inputs[0]  # safe removal detaches the node's inputs
            producer.graph.remove(producer, safe=True)
            _remove_if_unused(source)


@dataclass
class _Rewrite:
    """What one merge replaces: linear ops (and any joining node) from ``x`` to ``out``."""

    ops: list[LinearOp]
    joins: list[ir.Node]
    x: ir.Value
    out: ir.Value
    widths: list[int]
    macs_before: int

    @classmethod
    def segment(cls, ops: list[LinearOp]) -> _Rewrite:
        widths = [ops[0].in_features] + [op.out_features for op in ops]
        return cls(ops, [], ops[0].input, ops[-1].output, widths, sum(op.macs for op in ops))

    @classmethod
    def parallel(cls, p: branches.Parallel) -> _Rewrite:
        widths = [p.left[0].in_features, p.left[-1].out_features]
        macs = sum(op.macs for op in p.ops) + widths[-1]
        return cls(p.ops, [p.add], p.x, p.add.outputs[0], widths, macs)

    @property
    def names(self) -> list[str]:
        return [n for op in self.ops for n in op.names] + [n.name or n.op_type for n in self.joins]

    @property
    def old_nodes(self) -> list[ir.Node]:
        return [n for op in self.ops for n in op.nodes] + self.joins


def _merge_segment(
    graph: ir.Graph,
    ops: list[LinearOp],
    names: _Names,
    opset: int,
    label: str,
    policy: algebra.Policy,
    tick: Callable[[], None] = lambda: None,
) -> FusionRecord | Declined:
    """Rewrite one segment of a chain as a single op (see :func:`_emit`)."""
    affine = algebra.compose_all(_ticking(ops, tick))  # one float64 map at a time
    return _emit(graph, _Rewrite.segment(ops), affine, names, opset, label, policy)


def _emit(
    graph: ir.Graph,
    rewrite: _Rewrite,
    affine: algebra.AffineMap,
    names: _Names,
    opset: int,
    label: str,
    policy: algebra.Policy,
) -> FusionRecord | Declined:
    """Replace ``rewrite``'s nodes by one op computing ``affine``; decline if the result cannot be
    stored, or (``policy="cost"``) if it would hold more parameters than the ops it replaces."""
    ops = rewrite.ops
    all_names = rewrite.names
    np_dtype = ops[0].dtype.numpy()
    bias = affine.bias
    # Gemm before opset 11 requires C: a bias-free 2-D segment is emitted as a bare MatMul.
    as_gemm = _emit_gemm(ops) and (bias is not None or opset >= 11)
    if affine.per_row_bias and not as_gemm:
        return Declined(all_names, "a per-row Gemm bias cannot be emitted as MatMul+Add", label)
    weight = affine.weight.T if as_gemm else affine.weight
    for array in (weight, bias):
        reason = None if array is None else algebra.overflow_reason(array, np_dtype)
        if reason:
            return Declined(all_names, f"{reason}; chain left as it was", label)
    weights = [w for op in ops for w in op.weights]
    params_before = sum(_tensor_size(w) for w in weights)
    params_after = int(weight.size + (0 if bias is None else bias.size))
    if policy == "cost" and params_after > params_before:
        return Declined(
            all_names,
            f"cost model: the merged weight and bias would hold {params_after} parameters, "
            f"more than the {params_before} they replace (--policy always merges anyway)",
            label,
        )

    base = names.fresh(_fused_name(ops))
    w_value = _initializer(graph, names, f"{base}.weight", algebra.round_to_dtype(weight, np_dtype))
    b_value = None
    if bias is not None:
        b_value = _initializer(graph, names, f"{base}.bias", algebra.round_to_dtype(bias, np_dtype))
    doc = "onnx-fuse merged: " + ", ".join(all_names)
    x, old_out = rewrite.x, rewrite.out
    if as_gemm:
        attrs = {"transB": 1} | ({"transA": 1} if ops[0].trans_a else {})
        inputs = [x, w_value] + ([b_value] if b_value is not None else [])
        new_nodes = [ir.node("Gemm", inputs, attributes=attrs, name=base, doc_string=doc)]
    else:
        new_nodes = [ir.node("MatMul", [x, w_value], name=base, doc_string=doc)]
        if b_value is not None:
            new_nodes[0].outputs[0].name = names.fresh(f"{base}.matmul")
            new_nodes.append(
                ir.node(
                    "Add",
                    [new_nodes[0].outputs[0], b_value],
                    name=names.fresh(f"{base}.add"),
                    doc_string=doc,
                )
            )
    old_nodes = rewrite.old_nodes
    new_out = new_nodes[-1].outputs[0]
    ir.convenience.replace_nodes_and_values(
        graph, old_nodes[-1], old_nodes, new_nodes, [old_out], [new_out]
    )
    for w in weights:
        _remove_if_unused(w)

    widths = rewrite.widths
    return FusionRecord(
        nodes=all_names,
        op_types=[n.op_type for n in old_nodes],
        new_nodes=[n.name or n.op_type for n in new_nodes],
        graph=label,
        output=new_out.name or "",
        widths=widths,
        input_shape=_shape_list(x),
        output_shape=_shape_list(new_out),
        macs_before=rewrite.macs_before,
        macs_after=widths[0] * widths[-1],
        params_before=params_before,
        params_after=params_after,
    )


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
        names = _Names(model)
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
    model: ir.Model, policy: algebra.Policy, names: _Names, opset: int, report: FusionReport
) -> None:
    """Merge every ``Add`` of two linear branches of one input (LoRA, residual) into one op,
    before chains are looked for: the merged op can then join the chain around it."""
    for graph, label in list(iter_graphs(model.graph)):
        found, _ = chains.find_chains(graph, label, min_length=1)
        parallels, declined = branches.find_parallel(found, policy, label)
        report.declined.extend(declined)
        for parallel in parallels:
            rewrite = _Rewrite.parallel(parallel)
            result = _emit(graph, rewrite, parallel.affine(), names, opset, label, policy)
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
    names: _Names,
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
