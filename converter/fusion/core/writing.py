"""Writing a merge once: its new weights, its name, and the nodes it takes the place of.

Every kind of merge writes the same way: the merged values, rounded once to the model's dtype,
become initializers under fresh names; the new nodes go where the last replaced node was and
take over its output value (same name, type and shape), so everything downstream, graph outputs
included, is untouched; and the constants only the replaced nodes read are removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import remove_if_unused, shape_of_static
from converter.fusion.core.context import Context

__all__ = ["fused_name", "initializer", "replace", "take_out"]


def fused_name(names: list[str]) -> str:
    """``fused(a+b+c)``, or ``fused(a+...3 more...+e)`` for more than four names."""
    if len(names) > 4:
        names = [names[0], f"...{len(names) - 2} more...", names[-1]]
    return "fused(" + "+".join(names) + ")"


def initializer(
    ctx: Context, graph: ir.Graph, base: str, array: np.ndarray, *, typed: bool
) -> ir.Value:
    """A new initializer holding ``array`` under a fresh name from ``base``; ``typed`` gives the
    value the tensor's type and shape (as onnx-ir's loader does: the model then records them)."""
    name = ctx.names.fresh(base)
    tensor = ir.Tensor(array, name=name)
    if typed:  # the tensor's frozen shape serves the value too
        value = ir.Value(
            name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor
        )
    else:
        value = ir.Value(name=name, const_value=tensor)
    graph.register_initializer(value)
    return value


def replace(
    graph: ir.Graph,
    old_nodes: list[ir.Node],
    new_nodes: list[ir.Node],
    old_out: ir.Value | Sequence[ir.Value],
    constants: Iterable[ir.Value | None],
) -> None:
    """Put ``new_nodes`` (the last computes the result) in place of ``old_nodes``, taking over
    ``old_out`` (or several outputs, by the last new node's outputs in order); then drop each of
    ``constants``, and each constant the old nodes read, that nothing reads any more."""
    _fold_shape_readers(graph, old_nodes)
    old_outs = [old_out] if isinstance(old_out, ir.Value) else list(old_out)
    new_outs = list(new_nodes[-1].outputs[: len(old_outs)])
    # the constants the old nodes read (shapes, axes, indices) go too when unread
    read = list(dict.fromkeys(v for n in old_nodes for v in n.inputs if _stored(v)))
    ir.convenience.replace_nodes_and_values(
        graph, old_nodes[-1], old_nodes, new_nodes, old_outs, new_outs
    )
    for value in [*constants, *read]:
        remove_if_unused(value)


def _stored(value: ir.Value | None) -> bool:
    """``value`` is an initializer or a ``Constant``'s output, or computed by one node from such
    values alone (an ``Expand`` of a constant): never a value computed from the data."""
    if value is None:
        return False
    producer = value.producer()
    if value.is_initializer() or (producer is not None and producer.op_type == "Constant"):
        return True
    return (
        producer is not None
        and producer.op_type in ("Expand", "ConstantOfShape", "Tile", "Cast", "Reshape")
        and all(
            v is None
            or v.is_initializer()
            or (v.producer() is not None and v.producer().op_type == "Constant")
            for v in producer.inputs
        )
    )


def take_out(step: ir.Node, data: ir.Value) -> None:
    """Remove ``step`` (a step folded into an op across views): its readers read its ``data``
    input instead, a graph output it wrote keeps its name; constants only it read go too."""
    out = step.outputs[0]
    constants = [v for v in step.inputs if v is not None and v is not data]
    ir.convenience.replace_all_uses_with(out, data, replace_graph_outputs=True)
    if data.is_graph_output():  # the step wrote a graph output: its data now does, by that name
        name, out.name = out.name, None
        data.name, data.type, data.shape = name, out.type or data.type, out.shape or data.shape
    assert step.graph is not None
    step.graph.remove(step, safe=True)
    for value in constants:
        remove_if_unused(value)


def _fold_shape_readers(graph: ir.Graph, old_nodes: list[ir.Node]) -> None:
    """A ``Shape`` (or ``Size``) of a value that goes with ``old_nodes`` reads only its shape,
    which the model fixes: it becomes a ``Constant`` of that shape (its output value kept)."""
    removed = set(old_nodes)
    for node in old_nodes:
        for value in node.outputs:
            for use in list(value.uses()):
                reader = use.node
                dims = None if reader in removed else shape_of_static(reader)
                if dims is None or reader.graph is not graph:
                    continue
                constant = ir.Node(
                    "",
                    "Constant",
                    [],
                    [ir.AttrTensor("value", ir.Tensor(dims, name=reader.outputs[0].name))],
                    name=reader.name,
                    doc_string="onnx-fuse: the shape it read, which the model fixes",
                )
                ir.convenience.replace_nodes_and_values(
                    graph, reader, [reader], [constant], [reader.outputs[0]], [constant.outputs[0]]
                )
