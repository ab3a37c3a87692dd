"""Copies of a model computing in a wider float type: float64 for the reference, float32 to run.

:func:`retyped` is one rewrite with two uses. Every value, initializer, ``Constant`` value,
tensor attribute and ``Cast``/``dtype`` target of a float type the rule selects gets the target
type, in every graph, subgraph and function:

* the float64 reference (:mod:`converter.equivalence.reference`) turns every float type into
  float64;
* :func:`float32_copy` turns the float types narrower than float32 (bfloat16, float16, float8,
  float4) into float32, for a model onnxruntime's CPU provider cannot run in its own type: it
  has no bfloat16 kernel for ``Mul``, ``MatMul`` or ``Add``, so a bfloat16 export does not load.
  The copy keeps the model's interface: each such graph input is cast to float32 as it enters
  and each such graph output cast back to its own type as it leaves (onnxruntime has those
  ``Cast`` kernels), so the copy takes the same inputs, gives outputs of the same types, and is
  compared with the tolerances of those types.

Every value a narrower float type holds, float32 holds exactly: the float32 copy computes what
the model means, without rounding its intermediate results to the narrow type. Validation runs
both models this way (:mod:`converter.equivalence.validate`), so the rounding it cannot see is
the same for both, and the difference it measures is the rewrite's (a merged weight rounded
once to bfloat16, say).
"""

from __future__ import annotations

__all__ = ["NARROW_FLOATS", "float32_copy", "narrow_float_types", "open_float32", "retyped"]

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from converter.equivalence.runtime import Runner, Side, all_nodes, open_session

_DTYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")
_F = ir.DataType
#: The float types narrower than float32, which :func:`float32_copy` widens.
NARROW_FLOATS = frozenset(
    t
    for t in (
        "BFLOAT16",
        "FLOAT16",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
        "FLOAT8E8M0",
        "FLOAT4E2M1",
    )
    if hasattr(_F, t)
    for t in [getattr(_F, t)]
)

Rule = Callable[[ir.DataType], bool]


def narrow_float_types(model: ir.Model) -> list[str]:
    """The float types narrower than float32 in ``model`` (values, weights, tensor attributes,
    in every graph and function), by name: ``["bfloat16"]``. What :func:`float32_copy` widens."""
    found: set[ir.DataType] = set()
    for graph in model.graphs():
        values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
        values.extend(output for node in graph for output in node.outputs)
        found.update(v.dtype for v in values if v.dtype is not None)
    for node in all_nodes(model):
        for attr in node.attributes.values():
            if not attr.is_ref() and attr.type == ir.AttributeType.TENSOR:
                found.add(attr.as_tensor().dtype)
    return sorted(t.name.lower() for t in found & NARROW_FLOATS)


def open_float32(side: Side, workdir: str, stem: str) -> Runner:
    """The onnxruntime session of the float32 copy of ``side`` (its graph outputs, and the
    values exposed on it, keep their names and types)."""
    copy = Side(side.label, float32_copy(side.model), None, list(side.outputs))
    return open_session(copy, workdir, stem)


def float32_copy(model: ir.Model) -> ir.Model:
    """A copy of ``model`` computing in float32 where it computed in a narrower float type,
    with the model's own input and output types (see the module docstring)."""
    input_types = [v.dtype for v in model.graph.inputs]
    output_types = [v.dtype for v in model.graph.outputs]
    copy = retyped(model, _F.FLOAT, lambda dtype: dtype in NARROW_FLOATS)
    graph = copy.graph
    for index, dtype in enumerate(input_types):
        if dtype in NARROW_FLOATS and graph.inputs[index].name not in graph.initializers:
            _cast_input(graph, index, dtype)
    narrowed: dict[int, ir.Value] = {}  # a value listed twice as an output is cast once
    for index, dtype in enumerate(output_types):
        if dtype in NARROW_FLOATS:
            inner = graph.outputs[index]
            if id(inner) not in narrowed:
                narrowed[id(inner)] = _cast_output(graph, inner, dtype)
            graph.outputs[index] = narrowed[id(inner)]
    return copy


def retyped(model: ir.Model, target: ir.DataType, rule: Rule) -> ir.Model:
    """A copy of ``model`` in which every float type ``rule`` selects is ``target``."""
    copy = model.clone()
    for graph in copy.graphs():
        _retype_values(graph, target, rule)
        for value in graph.initializers.values():
            if value.const_value is not None and rule(value.const_value.dtype):
                value.const_value = _retype_tensor(value.const_value, target)
    for node in all_nodes(copy):
        _retype_attributes(node, target, rule)
    return copy


def _retype_values(graph: ir.Graph, target: ir.DataType, rule: Rule) -> None:
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
    values.extend(output for node in graph for output in node.outputs)
    for value in values:
        if isinstance(value.type, ir.TensorType) and _selected(value.dtype, rule):
            value.type = ir.TensorType(target)  # a new object: types may be shared


def _retype_tensor(tensor: ir.TensorProtocol, target: ir.DataType) -> ir.TensorProtocol:
    dtype = np.dtype(target.numpy())
    return ir.LazyTensor(
        lambda: ir.tensor(tensor.numpy().astype(dtype), name=tensor.name),
        dtype=target,
        shape=tensor.shape,
        name=tensor.name,
    )


def _retype_attributes(node: ir.Node, target: ir.DataType, rule: Rule) -> None:
    """Turn selected float tensor attributes and dtype attributes (``Cast.to``...) into
    ``target``; a float32 ``Constant`` (``value_float(s)``) only when float32 is selected."""
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and rule(_F.FLOAT):
        for key in ("value_float", "value_floats"):
            if key in node.attributes:
                array = np.asarray(node.attributes.pop(key).value, dtype=target.numpy())
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))
    for key, attr in list(node.attributes.items()):
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.TENSOR and _selected(attr.as_tensor().dtype, rule):
            node.attributes[key] = ir.AttrTensor(key, _retype_tensor(attr.as_tensor(), target))
        elif key in _DTYPE_ATTRIBUTES and _selected_dtype_attr(attr, rule):
            node.attributes[key] = ir.AttrInt64(key, target)


def _selected_dtype_attr(attr: ir.Attr, rule: Rule) -> bool:
    if attr.type != ir.AttributeType.INT:
        return False
    try:
        return _selected(ir.DataType(attr.as_int()), rule)
    except ValueError:
        return False


def _selected(dtype: ir.DataType | None, rule: Rule) -> bool:
    return dtype is not None and dtype.is_floating_point() and rule(dtype)


def _cast_input(graph: ir.Graph, index: int, dtype: ir.DataType) -> None:
    """Feed input ``index`` in its own type and cast it to float32 before the graph reads it."""
    inner = graph.inputs[index]
    name, inner.name = inner.name, f"{inner.name}.as_float32"
    outer = ir.Value(name=name, type=ir.TensorType(dtype), shape=inner.shape)
    cast = ir.Node("", "Cast", [outer], [ir.AttrInt64("to", _F.FLOAT)], num_outputs=1)
    widened = cast.outputs[0]
    widened.type, widened.shape = ir.TensorType(_F.FLOAT), inner.shape
    inner.replace_all_uses_with(widened, replace_graph_outputs=True)
    widened.name = inner.name
    graph.inputs[index] = outer
    if graph.num_nodes():
        graph.insert_before(graph.node(0), cast)
    else:
        graph.append(cast)


def _cast_output(graph: ir.Graph, inner: ir.Value, dtype: ir.DataType) -> ir.Value:
    """The value ``inner`` cast back to its own type, under its own name, as it leaves."""
    name, inner.name = inner.name, f"{inner.name}.as_float32"
    cast = ir.Node("", "Cast", [inner], [ir.AttrInt64("to", dtype)], num_outputs=1)
    narrowed = cast.outputs[0]
    narrowed.type, narrowed.shape, narrowed.name = ir.TensorType(dtype), inner.shape, name
    graph.append(cast)
    return narrowed
