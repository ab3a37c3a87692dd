"""Parallel branches: a tree of ``Add``/``Sub``/``Sum`` over linear chains of one input.

A signed sum of affine maps of one input is one affine map::

    sum_k s_k * (x @ W_k + b_k) = x @ (sum_k s_k * W_k) + sum_k s_k * b_k        (s_k = +1 or -1)

This is how a LoRA adapter sits beside its base layer (``base(x) + scale * B(A(x))``, the scale
being a step of the adapter's chain: ``W = W0 + s * A @ B``), and, with an empty chain (the
identity, ``W = I``), a residual connection around a linear chain (``x + L(x)``), three or more
branches (``a(x) + b(x) + x``), or ``torch.stack([...]).sum(0)`` written as ``Sum``.

Every chain result and every inner node of the tree must feed only the tree and not be a graph
output. Under the cost policy the merge is made only where the merged op costs no more
multiply-adds per row than the branches (each at its own best segmentation) plus the additions:
a LoRA adapter always merges; two low-rank branches of a wide layer may not.

The finder (:class:`Sums`) reads the round's chains (:func:`converter.fusion.linear.chains.analyse`)
and plans one :class:`~converter.fusion.linear.rewrite.LinearMerge` per sum worth merging.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from converter.fusion.core.constants import axes_of
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import feeds_only, is_onnx, single_reader
from converter.fusion.core.joins import is_inner, is_join, tree_leaves
from converter.fusion.core.merge import Finder, Merge, Round
from converter.fusion.core.policy import Policy
from converter.fusion.linear import algebra, chains
from converter.fusion.linear.linear_op import LinearOp
from converter.fusion.linear.rewrite import LinearMerge
from converter.fusion.linear.views import static_dims

__all__ = ["BranchSum", "BranchSums", "Term", "find_sums"]


@dataclass
class Term:
    """One summand: ``sign * chain(x)``; an empty chain is ``x`` itself."""

    sign: float
    chain: list[LinearOp]
    # Reshape(x) before the chain and Reshape after it, when the chain runs on x's rows
    # flattened to 2-D (GPT-2's Conv1D as exporters write it): removed with the chain.
    wrap: list[ir.Node] = field(default_factory=list)
    # The chain's first ops are a run other nodes read too (VeRA's ``x @ A``, one node for the
    # q and v adapters after the exporter's common-subexpression elimination): composed into
    # the merge, left in place for the others, removed with its last reader.
    shared: list[LinearOp] = field(default_factory=list)

    def x_at(self) -> tuple[ir.Node, int]:
        """Where this term reads the sum's input."""
        if self.wrap:
            return self.wrap[0], 0
        op = self.chain[0]
        return op.nodes[0], op.input_index


@dataclass
class BranchSum:
    """The tree ``joins`` (its root last) sums ``terms``, all chains of one input."""

    joins: list[ir.Node]
    terms: list[Term]
    width_in: int
    width_out: int

    @property
    def x_at(self) -> tuple[ir.Node, int]:
        return next(t for t in self.terms if t.chain).x_at()

    @property
    def ops(self) -> list[LinearOp]:
        return [op for term in self.terms for op in term.chain]

    @property
    def names(self) -> list[str]:
        wraps = [n.name or n.op_type for t in self.terms for n in t.wrap]
        ops = [n for op in self.ops for n in op.names]
        return ops + wraps + [j.name or j.op_type for j in self.joins]

    @property
    def macs_before(self) -> int:
        """Multiply-adds per row of the branches at their best segmentation, plus the sums."""
        chains_cost = sum(_best_macs(t.chain) for t in self.terms if t.chain)
        return chains_cost + (len(self.terms) - 1) * self.width_out

    def affine(self) -> algebra.AffineMap:
        """The signed sum of every branch as one map, in float64."""
        total: algebra.AffineMap | None = None
        for term in self.terms:
            if term.chain:
                m = algebra.compose_all(op.affine for op in term.chain)
            else:
                m = algebra.identity_map(self.width_in)
            if term.sign != 1:  # -1 for a Sub; the sum of a leaf's signs when it is read twice
                s = term.sign
                m = algebra.AffineMap(s * m.weight, None if m.bias is None else s * m.bias)
            total = m if total is None else algebra.add_maps(total, m)
        assert total is not None
        return total

    def note(self) -> str | None:
        """A readable name for well-known shapes of sum (a LoRA adapter, a residual)."""
        matrices = [t for t in self.terms if t.chain and not all(op.elementwise for op in t.chain)]
        low_rank = [t for t in matrices if _rank_of(t.chain) < min(self.width_in, self.width_out)]
        if len(self.terms) == 2 and len(matrices) == 2 and len(low_rank) == 1:
            base = next(t for t in matrices if t not in low_rank)
            adapter = low_rank[0]
            return (
                f"LoRA {'/'.join(adapter.chain[0].names[:1] + adapter.chain[-1].names[:1])} "
                f"merged into {base.chain[0].names[0]}"
            )
        if any(not t.chain for t in self.terms):
            return "residual connection merged into its branch"
        return None


def _rank_of(chain: list[LinearOp]) -> int:
    return min(chains.widths(chain))


def _best_macs(chain: list[LinearOp]) -> int:
    """Multiply-adds per row of ``chain`` at the cost model's best segmentation."""
    dims = chains.widths(chain)
    alone = [op.macs for op in chain]
    return algebra.segments_macs(
        dims, algebra.plan_segments(dims, "cost", alone=alone), alone=alone
    )


def _stack(
    ctx: Context, node: ir.Node
) -> tuple[list[ir.Node], list[tuple[float, ir.Value]]] | None:
    """``ReduceSum(Concat(Unsqueeze(v_i, a), axis=a), axes=[a], keepdims=0)``, which is how
    ``torch.stack([...]).sum(0)`` is exported: the sum of the ``v_i``. Its nodes and leaves."""
    if not is_onnx(node, "ReduceSum") or node.attributes.get_int("keepdims", 1) != 0:
        return None
    concat = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if not is_onnx(concat, "Concat") or not feeds_only(node.inputs[0], {node}):
        return None
    axis = concat.attributes.get_int("axis", 0)
    if axes_of(ctx.constants, node) != [axis] or axis < 0:
        return None
    joins: list[ir.Node] = []
    for value in concat.inputs:
        unsqueeze = value.producer() if value is not None else None
        if not is_onnx(unsqueeze, "Unsqueeze") or axes_of(ctx.constants, unsqueeze) != [axis]:
            return None
        if not feeds_only(value, {concat}):
            return None
        joins.append(unsqueeze)
    leaves = [(1.0, u.inputs[0]) for u in joins]
    return [*joins, concat, node], leaves


def _stack_root(ctx: Context, node: ir.Node) -> ir.Node | None:
    """The ``ReduceSum`` of a stacked sum that ``node`` (an ``Unsqueeze``) feeds, if any."""
    if not is_onnx(node, "Unsqueeze"):
        return None
    concat = single_reader(node.outputs[0])
    root = single_reader(concat.outputs[0]) if is_onnx(concat, "Concat") else None
    return root if root is not None and _stack(ctx, root) is not None else None


def _leaves(ctx: Context, root: ir.Node) -> tuple[list[ir.Node], list[tuple[float, ir.Value]]]:
    """The nodes of the sum under ``root`` (a stacked sum or a tree) and its signed leaves."""
    stacked = _stack(ctx, root)
    return stacked if stacked is not None else tree_leaves(ctx, root)


def _matches(
    ctx: Context, root: ir.Node, by_output: dict[ir.Value, list[LinearOp]]
) -> list[BranchSum]:
    """The branch sums rooted at ``root``, when every leaf is a chain of one input or the input:
    from the input the branches start at, then from before a run they share (RoAd's base
    projection, read by its scale and by its rotation), for the cost model to choose."""
    joins, leaves = _leaves(ctx, root)
    if len(leaves) < 2:
        return []
    leaves = _combined(leaves)
    direct = [_branch(ctx, v, by_output) for _, v in leaves]
    shared = [_through_shared(f, by_output) for f in direct]
    members = set(joins)
    sums: list[BranchSum] = []
    starts = [f[2] for f in direct + shared if f is not None]
    for x in dict.fromkeys(starts):  # the input every branch starts from (a leaf may be it)
        # each leaf from x directly, else through the run before it that others read too
        branches = [
            d if d is not None and d[2] is x else s for d, s in zip(direct, shared, strict=True)
        ]
        terms = _terms(leaves, branches, x, members)
        checked = None if terms is None else _checked(joins, terms, x)
        if checked is not None:
            sums.append(checked)
    return sums


def _combined(leaves: list[tuple[float, ir.Value]]) -> list[tuple[float, ir.Value]]:
    """Each leaf once, its signs summed: ``L(x) + L(x)`` is ``2 * L(x)``, and GLoRA's
    ``base(x) + glora(x) - base(x)`` has the base with coefficient 0 (merged away with the sum)."""
    signs: dict[ir.Value, float] = {}
    for sign, value in leaves:
        signs[value] = signs.get(value, 0.0) + sign
    return [(sign, value) for value, sign in signs.items()]


def _through_shared(found, by_output: dict[ir.Value, list[LinearOp]]):
    """``found`` led by the run before it when that run's result other nodes read too: the
    branch then starts where that run does (its ops shared, kept for the other readers)."""
    if found is None or found[1]:
        return found
    run = found[0]
    prefix = by_output.get(run[0].input)
    if prefix is None or run[0].input.is_graph_output() or len(run[0].input.uses()) < 2:
        return found
    return [*prefix, *run], [], prefix[0].input, prefix


def _terms(leaves, found, x: ir.Value, members: set[ir.Node]) -> list[Term] | None:
    """Each leaf as a term of ``x``: ``x`` itself, or a branch starting at ``x``."""
    # a leaf may also feed another term's chain (DeFT's base(x), read by its own term and by
    # base(x) @ P @ Q, which composes the base as a shared run): that chain merges too
    chained = {n for f in found if f is not None for op in f[0] for n in op.nodes}
    terms: list[Term] = []
    for (sign, value), branch in zip(leaves, found, strict=True):
        if value is x:
            terms.append(Term(sign, []))
        elif branch is not None and branch[2] is x and feeds_only(value, members | chained):
            shared = branch[3] if len(branch) > 3 else []
            terms.append(Term(sign, branch[0], branch[1], list(shared)))
        else:
            return None
    return terms


def _branch(
    ctx: Context, value: ir.Value, by_output: dict[ir.Value, list[LinearOp]]
) -> tuple[list[LinearOp], list[ir.Node], ir.Value] | None:
    """(chain, wrapping Reshapes, input) of the branch ending in ``value``, if it is one."""
    run = by_output.get(value)
    if run is not None:
        return run, [], run[0].input
    after = value.producer()
    if not is_onnx(after, "Reshape") or after.inputs[0] is None:
        return None
    run = by_output.get(after.inputs[0])
    if run is None or not feeds_only(run[-1].output, {after}):
        return None
    before = run[0].input.producer()
    if not is_onnx(before, "Reshape") or before.inputs[0] is None:
        return None
    if not feeds_only(run[0].input, set(run[0].nodes)):
        return None
    x = before.inputs[0]
    if not _rows_flattened(ctx, x, run[0].input, value, run[-1].out_features):
        return None
    return run, [before, after], x


def _rows_flattened(ctx: Context, x: ir.Value, flat: ir.Value, out: ir.Value, width: int) -> bool:
    """``flat`` is ``x``'s rows as a matrix, and ``out`` has ``x``'s leading shape: the two
    Reshapes around a chain only regroup rows, so the chain can run on ``x`` itself."""
    dims_x, dims_flat, dims_out = (static_dims(ctx, v) for v in (x, flat, out))
    if dims_x is None or dims_flat is None or dims_out is None or len(dims_flat) != 2:
        return False
    if x.shape is None or out.shape is None or len(x.shape) != len(out.shape):
        return False
    if dims_flat[1] != dims_x[-1] or dims_flat[1] is None or dims_out[-1] != width:
        return False
    return all(a == b for a, b in zip(list(x.shape)[:-1], list(out.shape)[:-1], strict=True))


def _checked(joins: list[ir.Node], terms: list[Term], x: ir.Value) -> BranchSum | None:
    ops = [op for t in terms for op in t.chain]
    if all(op.elementwise for op in ops):
        return None  # only scales and shifts: as a matrix it would cost d*d, not d
    if any(op.trans_a for op in ops) or len({op.dtype for op in ops}) != 1:
        return None
    if len({op.axis for op in ops}) != 1:
        return None
    if x.dtype is not None and x.dtype != ops[0].dtype:
        return None
    width_in = next(t.chain[0].in_features for t in terms if t.chain)
    outs = {t.chain[-1].out_features if t.chain else width_in for t in terms}
    if len(outs) != 1:
        return None
    return BranchSum(joins, terms, width_in, outs.pop())


def _roots(ctx: Context, runs: list[list[LinearOp]]) -> list[ir.Node]:
    """Joins that read a chain's result and are not inside a larger tree, in a stable order."""
    roots: dict[ir.Node, None] = {}
    for run in runs:
        for use in run[-1].output.uses():
            node = use.node
            stacked = _stack_root(ctx, node)
            if stacked is not None:
                roots[stacked] = None
                continue
            while is_join(ctx, node) and is_inner(ctx, node.outputs[0]):
                node = next(iter(node.outputs[0].uses())).node
            if is_join(ctx, node):
                roots[node] = None
    return list(roots)


def _subtrees(ctx: Context, root: ir.Node) -> list[ir.Node]:
    """Inner joins under ``root``, tried when the whole tree is not one branch sum."""
    if _stack(ctx, root) is not None:
        return []
    joins, _ = _leaves(ctx, root)
    return joins[-2::-1]


def find_sums(
    ctx: Context, runs: list[list[LinearOp]], label: str
) -> tuple[list[BranchSum], list[Declined]]:
    """Every tree of sums over linear branches of one input among ``runs`` (chains from
    :func:`converter.fusion.linear.chains.find_chains`, one-op chains included) worth merging."""
    by_output = {run[-1].output: run for run in runs}
    found: list[BranchSum] = []
    declined: list[Declined] = []
    taken: set[ir.Node] = set()
    for root in _roots(ctx, runs):
        for candidate in [root, *_subtrees(ctx, root)]:
            if candidate in taken:
                continue
            sums = _matches(ctx, candidate, by_output)
            if not sums:
                continue
            taken.update(sums[0].joins)
            reasons = [_cost_reason(branch_sum, ctx.policy) for branch_sum in sums]
            if None in reasons:
                found.append(sums[reasons.index(None)])
            else:
                declined.append(Declined(sums[0].names, str(reasons[0]), label))
            break
    return found, declined


def _cost_reason(branch_sum: BranchSum, policy: Policy) -> str | None:
    before = branch_sum.macs_before
    merged = branch_sum.width_in * branch_sum.width_out
    if policy == "cost" and merged > before:
        return (
            f"cost model: merging the parallel branches would take multiply-adds per row "
            f"from {before} to {merged} (--policy always merges anyway)"
        )
    return None


class BranchSums(Finder):
    """Every tree of sums over linear branches of one input worth merging, as one op each."""

    def find(self, round: Round) -> list[Merge | Declined]:
        runs = round.shared(chains.analyse).runs
        sums, declined = find_sums(round.ctx, runs, round.label)
        return [*declined, *(_merge(found) for found in sums)]


def _merge(found: BranchSum) -> LinearMerge:
    """The sum as one merge: its ops, the Reshapes around flattened branches and the joins."""
    widths = [found.width_in, found.width_out]
    macs = sum(op.macs for op in found.ops) + (len(found.terms) - 1) * found.width_out
    wraps = [n for t in found.terms for n in t.wrap]
    kept = tuple(n for t in found.terms for op in t.shared for n in op.nodes)
    return LinearMerge(
        found.ops, wraps + found.joins, widths, macs, found.affine, found.note(), found.x_at, kept
    )
