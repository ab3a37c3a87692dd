"""Trees of sums: ``Add``/``Sub``/``Sum`` of values none of which is constant, and their leaves.

A sum of branches (LoRA beside its base layer, RepVGG's three convs and identity) is written as
a tree of binary ``Add``/``Sub`` (or one ``Sum``); its *joins* are the tree's nodes, its *leaves*
the summed values, each with a sign (a ``Sub``'s second input is negated). A join inside a larger
tree has one reader, itself a join. Linear branch sums and conv branch sums both read them here.
"""

from __future__ import annotations

import onnx_ir as ir

from converter.fusion.core.context import Context
from converter.fusion.core.graph import is_onnx

__all__ = ["JOIN_OPS", "is_join", "is_inner", "tree_leaves"]

JOIN_OPS = frozenset({"Add", "Sub", "Sum"})


def is_join(ctx: Context, node: ir.Node | None) -> bool:
    """An ``Add``/``Sub``/``Sum`` of values none of which is constant (those are biases/steps)."""
    if not is_onnx(node) or node.op_type not in JOIN_OPS or len(node.outputs) != 1:
        return False
    arity_ok = len(node.inputs) >= 1 if node.op_type == "Sum" else len(node.inputs) == 2
    if not arity_ok or None in node.inputs:
        return False
    return not any(ctx.constants.is_constant(v) for v in node.inputs)


def is_inner(ctx: Context, value: ir.Value) -> bool:
    """``value`` is computed by a join whose only consumer is one join: part of a larger tree."""
    if value.is_graph_output():
        return False
    users = {u.node for u in value.uses()}
    return len(users) == 1 and is_join(ctx, next(iter(users))) and is_join(ctx, value.producer())


def tree_leaves(ctx: Context, root: ir.Node) -> tuple[list[ir.Node], list[tuple[float, ir.Value]]]:
    """The joins of the ``Add``/``Sub``/``Sum`` tree under ``root`` (root last) and its signed
    leaves (a ``Sub``'s second input negated)."""
    joins: list[ir.Node] = []
    leaves: list[tuple[float, ir.Value]] = []

    def walk(node: ir.Node, sign: float) -> None:
        for i, value in enumerate(node.inputs):
            assert value is not None
            s = -sign if node.op_type == "Sub" and i == 1 else sign
            producer = value.producer()
            if is_join(ctx, producer) and is_inner(ctx, value):
                assert producer is not None
                walk(producer, s)
            else:
                leaves.append((s, value))
        joins.append(node)

    walk(root, 1.0)
    return joins, leaves
