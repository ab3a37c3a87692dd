"""Parallel branches: ``Add(A(x), B(x))`` where A and B are chains of linear ops on the same input.

A sum of affine maps of one input is one affine map::

    (x @ Wa + ba) + (x @ Wb + bb) = x @ (Wa + Wb) + (ba + bb)

This is how a LoRA adapter sits beside its base layer (``base(x) + scale * B(A(x))``), and, with
an empty branch (the identity), a residual connection around a linear chain::

    x + (x @ W + b) = x @ (I + W) + b

Both branch results must feed only the ``Add`` and not be graph outputs. Under the cost policy the
merge is made only where the merged op costs no more multiply-adds per row than the branches
(each at its own best segmentation) plus the ``Add``: a LoRA adapter always merges; two
low-rank branches of a wide layer may not.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from converter.fusion import algebra, chains
from converter.fusion.recognize import LinearOp, constant_tensor, is_onnx
from converter.report import Declined

__all__ = ["Parallel", "find_parallel"]


@dataclass
class Parallel:
    """``add`` sums the chains ``left`` and ``right`` of the input ``x`` (``right`` may be empty)."""

    add: ir.Node
    left: list[LinearOp]
    right: list[LinearOp]
    x: ir.Value

    @property
    def ops(self) -> list[LinearOp]:
        return self.left + self.right

    @property
    def names(self) -> list[str]:
        return [n for op in self.ops for n in op.names] + [self.add.name or "<Add>"]

    def affine(self) -> algebra.AffineMap:
        """The sum of both branches as one map, in float64."""
        width = self.left[0].in_features
        left = algebra.compose_all(op.affine for op in self.left)
        if not self.right:
            return algebra.add_maps(left, algebra.identity_map(width))
        return algebra.add_maps(left, algebra.compose_all(op.affine for op in self.right))


def _best_macs(chain: list[LinearOp]) -> int:
    """Multiply-adds per row of ``chain`` at the cost model's best segmentation."""
    dims = chains.widths(chain)
    alone = [op.macs for op in chain]
    return algebra.segments_macs(
        dims, algebra.plan_segments(dims, "cost", alone=alone), alone=alone
    )


def _feeds_only(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(u.node is node for u in value.uses())


def _match(add: ir.Node, by_output: dict[ir.Value, list[LinearOp]]) -> Parallel | None:
    """The two branches ``add`` sums, when both are linear chains of one input."""
    if not is_onnx(add, "Add") or len(add.inputs) != 2:
        return None
    p, q = add.inputs
    if p is None or q is None or p is q or constant_tensor(p)[1] is None:
        return None
    left, right = by_output.get(p), by_output.get(q)
    if left is None and right is not None:
        left, right, p, q = right, left, q, p
    if left is None or not _feeds_only(p, add):
        return None
    x = left[0].input
    if right is None:
        if q is not x or left[0].in_features != left[-1].out_features:
            return None  # not a residual around this chain
        right = []
    elif right[0].input is not x or not _feeds_only(q, add):
        return None
    ops = left + right
    if all(op.elementwise for op in ops):
        return None  # only scales and shifts: as a matrix it would cost d*d, not d
    if any(op.trans_a for op in ops) or len({op.dtype for op in ops}) != 1:
        return None
    if right and right[-1].out_features != left[-1].out_features:
        return None
    return Parallel(add, left, right, x)


def find_parallel(
    runs: list[list[LinearOp]], policy: algebra.Policy, label: str
) -> tuple[list[Parallel], list[Declined]]:
    """Every ``Add`` of two linear branches of one input, among the chains ``runs`` (from
    :func:`converter.fusion.chains.find_chains`, chains of one op included), that is worth merging."""
    by_output = {run[-1].output: run for run in runs}
    adds = dict.fromkeys(u.node for run in runs for u in run[-1].output.uses())
    found, declined = [], []
    for add in adds:
        parallel = _match(add, by_output)
        if parallel is None:
            continue
        width_in, width_out = parallel.left[0].in_features, parallel.left[-1].out_features
        before = _best_macs(parallel.left) + (_best_macs(parallel.right) if parallel.right else 0)
        before += width_out  # the Add itself
        merged = width_in * width_out
        if policy == "cost" and merged > before:
            declined.append(
                Declined(
                    parallel.names,
                    f"cost model: merging the parallel branches would take multiply-adds per row "
                    f"from {before} to {merged} (--policy always merges anyway)",
                    label,
                )
            )
            continue
        found.append(parallel)
    return found, declined
