"""Put every graph of a model in topological order before anything reads it, or refuse it.

The ONNX specification asks for a graph's nodes in topological order, and ``onnx.checker``
rejects a graph that is not, but onnxruntime sorts a model's main graph when it loads it, so
graphs out of order run and are common: ``onnx.helper`` scripts append nodes as they think of
them, graph-surgery tools append and insert without sorting. The engine reads a graph in its
node order (where a chain starts, where a merged op goes, the invariants after each merge), so
:func:`sort_model` sorts the main graph and every subgraph first, with onnx-ir's stable sort
(:meth:`onnx_ir.Graph.sort`: nodes already in order keep their places, a subgraph's reads from
its outer scopes count as reads of the node that holds it). A model already in order is not
touched, so a model with nothing to merge can still be copied byte for byte.

A graph that has no topological order is the input's fault, not ours: it is refused with one
:class:`~converter.errors.InputError` line (exit 2) naming the node and the value, for a cycle
(a node that reads, through others, its own output), a node that reads a value nothing in its
scope defines, and a graph output that nothing produces. onnxruntime refuses all three too.
Model-local functions are left as they are: the engine never fuses inside them, and
onnxruntime does not sort them either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import onnx_ir as ir

from converter.errors import InputError

__all__ = ["sort_model"]

logger = logging.getLogger(__name__)

_CYCLE_HOPS_SHOWN = 4  # a long cycle is named by its first few reads


def sort_model(model: ir.Model) -> list[str]:
    """Sort every graph of ``model`` in place; return the labels of the graphs that were not in
    order (empty when the model already was, and then nothing was changed).

    Raises:
        InputError: a graph with a cycle, a node reading a value nothing defines, or a graph
            output nothing produces; the message names the node and the value.
    """
    if _first_misread(model.graph, "main graph", frozenset()) is None:
        return []  # the usual case: one walk, nothing changed
    before = [(graph, label, list(graph)) for graph, label in _graphs(model.graph, "main graph")]
    try:
        model.graph.sort()
    except ValueError:  # onnx-ir names no node: find the cycle ourselves
        raise InputError(_cycle_message(model.graph)) from None
    misread = _first_misread(model.graph, "main graph", frozenset())
    if misread is not None:
        raise InputError(misread)
    changed = [label for graph, label, nodes in before if list(graph) != nodes]
    logger.info("sorted the nodes of %s into topological order", ", ".join(changed))
    return changed


def _graphs(graph: ir.Graph, label: str) -> Iterator[tuple[ir.Graph, str]]:
    """``graph`` and every subgraph in it, each with a label unique in the model."""
    yield graph, label
    for index, node in enumerate(graph):
        for sub, attr in _subgraphs(node):
            yield from _graphs(sub, f"{label}/{_name(node, index)}.{attr}")


def _subgraphs(node: ir.Node) -> Iterator[tuple[ir.Graph, str]]:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.value, attr.name
        elif attr.type == ir.AttributeType.GRAPHS:
            for i, sub in enumerate(attr.value):
                yield sub, f"{attr.name}[{i}]"


def _name(node: ir.Node, index: int | None = None) -> str:
    """A node's name for messages; an anonymous one by its op type (and position)."""
    if node.name:
        return node.name
    return f"{node.op_type} node" + (f" #{index}" if index is not None else "")


def _first_misread(graph: ir.Graph, label: str, outer: frozenset[ir.Value]) -> str | None:
    """The first read of ``graph`` (subgraphs included) of a value not defined before it, in
    words, or None when every node reads only values defined earlier in its scopes."""
    defined = set(outer)
    defined.update(graph.inputs)
    defined.update(graph.initializers.values())
    for index, node in enumerate(graph):
        for value in node.inputs:
            if value is not None and value not in defined:
                return (
                    f"{label}: node '{_name(node, index)}' ({node.op_type}) reads "
                    f"'{value.name}', which no node, graph input or initializer in its scope "
                    "defines; the graph is not a valid ONNX graph"
                )
        for sub, attr in _subgraphs(node):
            sub_label = f"{label}/{_name(node, index)}.{attr}"
            found = _first_misread(sub, sub_label, frozenset(defined))
            if found is not None:
                return found
        defined.update(node.outputs)
    for value in graph.outputs:
        if value not in defined:
            return (
                f"{label}: graph output '{value.name}' is produced by no node, graph input "
                "or initializer; the graph is not a valid ONNX graph"
            )
    return None


def _cycle_message(graph: ir.Graph) -> str:
    """One line naming a cycle of some graph of the model: which node reads which value."""
    for sub, label in _graphs(graph, "main graph"):
        cycle = _cycle(sub)
        if not cycle:
            continue
        hops = [
            f"'{_name(node)}' reads '{value.name}' from '{_name(value.producer())}'"
            for node, value in cycle[:_CYCLE_HOPS_SHOWN]
        ]
        if len(cycle) > _CYCLE_HOPS_SHOWN:
            hops.append(f"... ({len(cycle)} nodes)")
        return f"{label}: the nodes form a cycle, so they have no topological order: " + ", ".join(
            hops
        )
    return f"the nodes cannot be put in topological order (onnx-ir finds a cycle in {graph.name!r})"


def _cycle(graph: ir.Graph) -> list[tuple[ir.Node, ir.Value]]:
    """A cycle among ``graph``'s nodes as (node, value it reads from the next node), or []."""
    deps = {node: _dependencies(node, graph) for node in graph}
    waiting = {node: len(d) for node, d in deps.items()}
    readers: dict[ir.Node, list[ir.Node]] = {node: [] for node in deps}
    for node, d in deps.items():
        for producer in d:
            readers[producer].append(node)
    ready = [node for node, count in waiting.items() if count == 0]
    while ready:
        for reader in readers[ready.pop()]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                ready.append(reader)
    # Every node left waits for another node left: following those, one comes back.
    left = {node for node, count in waiting.items() if count > 0}
    if not left:
        return []
    path: list[tuple[ir.Node, ir.Value]] = []
    seen: dict[ir.Node, int] = {}
    node = next(n for n in graph if n in left)
    while node not in seen:
        seen[node] = len(path)
        producer, value = next((p, v) for p, v in deps[node].items() if p in left)
        path.append((node, value))
        node = producer
    return path[seen[node] :]


def _dependencies(node: ir.Node, graph: ir.Graph) -> dict[ir.Node, ir.Value]:
    """The nodes of ``graph`` whose outputs ``node`` reads (in its subgraphs too), each with one
    value it reads from it."""
    deps: dict[ir.Node, ir.Value] = {}
    for value in _reads(node):
        producer = value.producer()
        if producer is not None and producer.graph is graph and producer is not node:
            deps.setdefault(producer, value)
        elif producer is node:
            deps.setdefault(node, value)  # a node that reads its own output: a cycle of one
    return deps


def _reads(node: ir.Node) -> Iterator[ir.Value]:
    """The values ``node`` reads, its subgraphs' reads included."""
    yield from (v for v in node.inputs if v is not None)
    for sub, _ in _subgraphs(node):
        for inner in sub:
            yield from _reads(inner)
