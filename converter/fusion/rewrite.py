"""Rewriting one merge into the graph: new initializers, the merged op, and clean-up.

:func:`emit` replaces a :class:`Rewrite` (a segment of a chain, or two parallel branches and the
``Add`` joining them) by one op computing a given :class:`~converter.fusion.algebra.AffineMap`, rounded
once to the model's dtype, in the form the ops came in:

- 2-D input (any Gemm among the ops, or a rank-2 input): ``Gemm(x, W_t, b, transB=1)`` with the
  weight in torch's ``(out, in)`` layout, keeping the first op's ``transA``;
- N-D input: ``MatMul(x, W)`` with an ``(in, out)`` weight, then ``Add(., b)`` if there is a bias.

The merged op takes over the old output value (same name, type and shape), so everything
downstream, graph outputs included, is untouched. Weights only the replaced ops used are removed.
It declines (returns a :class:`~converter.report.Declined`) a result the dtype cannot store, or,
under the cost policy, one holding more parameters than the ops it replaces.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from converter.fusion import algebra, branches, chains
from converter.fusion.recognize import LinearOp
from converter.report import Declined, FusionRecord

__all__ = ["Names", "Rewrite", "emit", "tensor_size"]


def _shape_list(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape]


def tensor_size(value: ir.Value) -> int:
    if value.const_value is not None:
        return tensor_size_of(value.const_value)
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return tensor_size_of(producer.attributes["value"].as_tensor())
    if producer is not None and producer.op_type == "Transpose" and producer.inputs:
        return tensor_size(producer.inputs[0])
    shape = value.shape
    return int(np.prod(shape.numpy())) if shape is not None and shape.is_static() else 0


def tensor_size_of(tensor: ir.TensorProtocol) -> int:
    return int(np.prod(tensor.shape.numpy()))


class Names:
    """Unique node and value names across the whole model (ONNX names are global in a model)."""

    def __init__(self, graphs: Iterable[ir.Graph]) -> None:
        """Collect the names already used in ``graphs`` (the model's graph and all subgraphs)."""
        self.used: set[str] = set()
        for graph in graphs:
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


def _fused_name(ops: list[LinearOp]) -> str:
    names = [n for op in ops for n in op.names[:1]]
    if len(names) > 4:
        names = [names[0], f"...{len(names) - 2} more...", names[-1]]
    return "fused(" + "+".join(names) + ")"


def _emit_gemm(ops: list[LinearOp]) -> bool:
    shape = ops[0].input.shape
    return any(op.is_gemm for op in ops) or (shape is not None and len(shape) == 2)


def _initializer(graph: ir.Graph, names: Names, base: str, array: np.ndarray) -> ir.Value:
    name = names.fresh(base)
    value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _remove_if_unused(value: ir.Value | None) -> None:
    """Drop an initializer, Constant node, or weight Transpose/Identity that nothing uses any more."""
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    producer = value.producer()
    if value.is_initializer() and value.graph is not None and value.name:
        value.graph.initializers.pop(value.name, None)
    elif producer is not None and producer.graph is not None:
        if producer.op_type == "Constant":
            producer.graph.remove(producer, safe=True)
        elif producer.op_type in ("Transpose", "Identity"):
            source = producer.inputs[0]  # safe removal detaches the node's inputs
            producer.graph.remove(producer, safe=True)
            _remove_if_unused(source)


@dataclass
class Rewrite:
    """What one merge replaces: linear ops (and any joining node) from ``x`` to ``out``."""

    ops: list[LinearOp]
    joins: list[ir.Node]
    x: ir.Value
    out: ir.Value
    widths: list[int]
    macs_before: int

    @classmethod
    def segment(cls, ops: list[LinearOp]) -> Rewrite:
        widths = chains.widths(ops)
        return cls(ops, [], ops[0].input, ops[-1].output, widths, sum(op.macs for op in ops))

    @classmethod
    def parallel(cls, p: branches.Parallel) -> Rewrite:
        widths = [p.left[0].in_features, p.left[-1].out_features]
        macs = sum(op.macs for op in p.ops) + widths[-1]
        return cls(p.ops, [p.add], p.x, p.add.outputs[0], widths, macs)

    @property
    def names(self) -> list[str]:
        return [n for op in self.ops for n in op.names] + [n.name or n.op_type for n in self.joins]

    @property
    def old_nodes(self) -> list[ir.Node]:
        return [n for op in self.ops for n in op.nodes] + self.joins


def emit(
    graph: ir.Graph,
    rewrite: Rewrite,
    affine: algebra.AffineMap,
    names: Names,
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
    params_before = sum(tensor_size(w) for w in weights)
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
