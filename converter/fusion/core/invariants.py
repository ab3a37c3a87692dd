"""The invariants every rewrite keeps, checked rather than hoped for.

- every node input is ``None``, a graph input, an initializer, or the output of a node listed
  earlier, in this graph or an enclosing one (a subgraph may read its outer scopes);
- every graph output is produced in its graph (or is an input/initializer of it);
- every node lists the graph that holds it, and every value produced by a removed node is read by
  nobody.

:func:`check_model` walks a whole model (O(nodes)); :func:`check_rewrite` checks only what one
merge touched (O(its nodes)), cheap enough to run after every merge.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from converter.errors import EngineError

__all__ = ["check_model", "check_graph", "check_rewrite"]


def _fail(label: str, what: str) -> EngineError:
    return EngineError(
        f"internal error: the rewritten {label} is inconsistent ({what}); nothing was written. "
        "Please report this with the model (rerun with --debug for the traceback)."
    )


def check_model(model: ir.Model) -> None:
    """Raise :class:`EngineError` if any graph of ``model`` breaks an invariant."""
    check_graph(model.graph, "main graph", frozenset())


def check_graph(graph: ir.Graph, label: str, outer: frozenset[ir.Value]) -> None:
    """Check ``graph`` (and its subgraphs) given the values its outer scopes define."""
    defined = set(outer)
    defined.update(graph.inputs)
    defined.update(graph.initializers.values())
    for node in graph:
        if node.graph is not graph:
            raise _fail(label, f"node '{node.name}' does not know its graph")
        for value in node.inputs:
            if value is not None and value not in defined:
                raise _fail(
                    label,
                    f"node '{node.name or node.op_type}' reads '{value.name}', which is not "
                    "defined before it",
                )
        for attr in node.attributes.values():
            for sub in _subgraphs(attr):
                check_graph(sub, f"{label}/{node.name or node.op_type}", frozenset(defined))
        defined.update(node.outputs)
    for value in graph.outputs:
        if value not in defined:
            raise _fail(label, f"graph output '{value.name}' is not produced")


def _subgraphs(attr: ir.Attr) -> Iterable[ir.Graph]:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.value]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.value)
    return []


def check_rewrite(
    graph: ir.Graph, label: str, removed: Iterable[ir.Node], added: Iterable[ir.Node]
) -> None:
    """The nodes one merge removed are gone and unread; the nodes it added read live values."""
    for node in removed:
        if node.graph is not None:
            raise _fail(label, f"replaced node '{node.name}' is still in a graph")
        for value in node.outputs:
            if value.uses() or value.is_graph_output():
                raise _fail(label, f"value '{value.name}' of a replaced node is still read")
    for node in added:
        if node.graph is not graph:
            raise _fail(label, f"merged node '{node.name}' is not in the graph")
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            live = (
                value.is_graph_input()
                or value.is_initializer()
                or (producer is not None and producer.graph is not None)
            )
            if not live:
                raise _fail(
                    label, f"merged node '{node.name}' reads a removed value '{value.name}'"
                )
