"""Reading the graph: which op a node is, what it is called, who reads a value, every subgraph.

Small questions every part asks of the live graph, answered from the nodes and uses as they are
now (nothing cached: a merge changes them).
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir

__all__ = [
    "feeds_only",
    "is_onnx",
    "iter_graphs",
    "label",
    "node_name",
    "op_key",
    "shape_list",
    "single_reader",
    "sole_consumer",
]


def is_onnx(node: ir.Node | None, op_type: str | None = None) -> bool:
    """``node`` is a standard ONNX op (default domain), of ``op_type`` if given."""
    return (
        node is not None
        and node.domain in ("", "ai.onnx")
        and (op_type is None or node.op_type == op_type)
    )


def op_key(node: ir.Node) -> str:
    """How op tables name ``node``'s op: its type for a standard ONNX op (``"Gemm"``), else
    prefixed by its domain (``"ai.onnx.ml.Scaler"``), so a custom op of the same name is not it."""
    return node.op_type if is_onnx(node) else f"{node.domain}.{node.op_type}"


def label(value: ir.Value | None) -> str:
    """A value's name for messages."""
    return "<missing>" if value is None else value.name or "<unnamed>"


def node_name(node: ir.Node) -> str:
    """A node's name for messages and records: its name, or ``<OpType>`` when it has none."""
    return node.name or f"<{node.op_type}>"


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


def single_reader(value: ir.Value) -> ir.Node | None:
    """The one node that reads ``value``'s elements (``Shape`` reads only its shape), if any."""
    if value.is_graph_output():
        return None
    found = None
    for use in value.uses():  # stop at the second reader: a graph input may have thousands
        node = use.node
        if node is found or (node.op_type == "Shape" and is_onnx(node)):
            continue
        if found is not None:
            return None
        found = node
    return found


def sole_consumer(value: ir.Value) -> ir.Node | None:
    """The one node that reads ``value`` (once), if it is not also a graph output."""
    if value.is_graph_output():
        return None
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 else None


def feeds_only(value: ir.Value, nodes: set[ir.Node]) -> bool:
    """``value`` is read by ``nodes`` alone and is not a graph output."""
    return not value.is_graph_output() and all(u.node in nodes for u in value.uses())


def shape_list(value: ir.Value) -> list[int | str | None] | None:
    """``value``'s shape as a list for a record (symbolic dims by name), or None if unknown."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape]
