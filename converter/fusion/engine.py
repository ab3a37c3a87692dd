"""The engine: match on the live graph, decide, compute, write; repeat to a fixpoint.

Each graph (the main graph and every ``If``/``Loop``/``Scan`` body) is fused in *rounds*. A round
analyses the graph as it is now (recognise every linear op and step, link them into maximal
chains, find the trees of sums over branches of one input) and then merges:

1. convolutions: folds, summed branches, compositions (:mod:`converter.fusion.conv.merge`);
2. every branch sum it found (:mod:`converter.fusion.linear.branches`);
3. every constant step that folds into a linear op across views of its output
   (:mod:`converter.fusion.linear.absorb`);
4. if none of these merged anything (they change which chains exist, so the round ends after
   them), every segment the cost model chose in every chain (:mod:`converter.fusion.linear.chains`);
   a chain read through a channels-last ``Transpose`` of a 1x1 Conv starts with that Conv
   (:mod:`converter.fusion.conv.to_linear`), so a Conv+BN folded in step 1 of an earlier round
   then goes into the linear ops as one more op of the chain.

Rounds repeat until one merges nothing but chain segments (see :func:`_round` for why no later
round could find more; tests and ``--debug`` run one more round to check it). The reasons reported
for what was *not* merged are that last round's, with every node a merge replaced named by the
merged op, so they describe the final graph (never a node that a later merge took). A planned
merge reads its input and output from the live nodes and is skipped if an earlier merge of the
round took one of its nodes (:meth:`Rewrite.alive`); it is matched again in the next round. Every
merge removes at least one recognised op or sum node, so the rounds end.

After every merge the nodes it removed and added are checked (:func:`invariants.check_rewrite`);
with ``check_every_rewrite`` (tests, ``--debug``) the whole model is, and the whole model always
is at the end. A broken invariant is an :class:`~converter.errors.EngineError` (exit 3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx_ir as ir

from converter.errors import EngineError
from converter.fusion.conv.merge import merge_convs
from converter.fusion.conv.to_linear import prefix_pointwise_convs
from converter.fusion.core import invariants
from converter.fusion.core.constants import other_users
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import single_reader
from converter.fusion.linear import chains
from converter.fusion.linear.absorb import Absorb, find_absorbs, remove_step
from converter.fusion.linear.algebra import AffineMap
from converter.fusion.linear.branches import find_sums
from converter.fusion.linear.ops import LinearOp, recognize
from converter.fusion.linear.rewrite import (
    Decision,
    Rewrite,
    decide,
    emits_gemm,
    overflow,
    write,
)
from converter.fusion.linear.views import VIEW_OPS
from converter.report import FusionRecord

__all__ = ["fuse_graph"]

logger = logging.getLogger(__name__)


def fuse_graph(
    ctx: Context, graph: ir.Graph, label: str
) -> tuple[list[FusionRecord], list[Declined]]:
    """Merge everything mergeable in ``graph`` (not its subgraphs), to a fixpoint."""
    fusions: list[FusionRecord] = []
    limit = sum(1 for _ in graph) + 2  # each productive round removes at least one node's worth
    for _ in range(limit):
        ctx.shared_released = False
        ctx.written = []
        again, chains_made, declined = _round(ctx, graph, label, fusions)
        if again or ctx.shared_released or _folds_waiting(ctx, ctx.written, label):
            continue
        if chains_made and ctx.check_every_rewrite:
            _assert_fixpoint(ctx, graph, label)
        return fusions, _renamed(declined, ctx.renamed)
    raise EngineError(f"internal error: fusing {label} did not reach a fixpoint; nothing written")


def _folds_waiting(ctx: Context, written: list[ir.Node], label: str) -> bool:
    """A merged segment now reaches a constant step through views (``MatMul -> Neg -> Transpose
    -> Mul``: the chain took the Neg, the Mul folds next): one more round folds it."""
    near = [n for n in written if _reaches_view(n)]  # cheap test first: most merges reach none
    ops = [op for n in near if isinstance(op := recognize(ctx, n), LinearOp)]
    return bool(ops) and bool(find_absorbs(ctx, ops, label)[0])


def _reaches_view(node: ir.Node) -> bool:
    """The merged op (``node``, or the bias ``Add`` after it) is read by a view."""
    out = node.outputs[0]
    reader = single_reader(out)
    if reader is not None and reader.op_type == "Add" and len(out.uses()) == 1:
        reader = single_reader(reader.outputs[0])  # MatMul + Add: the Add's reader
    return reader is not None and reader.op_type in VIEW_OPS


def _assert_fixpoint(ctx: Context, graph: ir.Graph, label: str) -> None:
    """A round after the chain merges finds nothing more (checked in tests and --debug)."""
    again, chains_made, _ = _round(ctx, graph, label, [])
    if again or chains_made:
        raise EngineError(
            f"internal error: fusing {label} missed {again + chains_made} merge(s) that a "
            "further round found; nothing written"
        )


def _renamed(declined: list[Declined], renamed: dict[str, str]) -> list[Declined]:
    """Reasons name the nodes as they are at the end: a merged node by its merged op's name."""
    for record in declined:
        names = [renamed.get(n, n) for n in record.nodes]
        record.nodes = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    return declined


def _round(
    ctx: Context, graph: ir.Graph, label: str, fusions: list[FusionRecord]
) -> tuple[int, int, list[Declined]]:
    """One analysis of the live graph, then its branch sums, or else its chain segments.

    Returns (merges that need another round, segments merged, reasons). A round whose merges
    were chain segments only ends the fixpoint: the cost model chose every segment of each
    maximal chain at once, and a merged segment takes the place and the output value of the ops
    it replaces, so no chain, link or branch sum that a further round could find was not already
    in this one -- unless a merge let go of a constant other nodes share
    (``ctx.shared_released``): those nodes may now own it alone, so :func:`fuse_graph` runs
    another round. A segment led by a 1x1 Conv is not maximal that way: its new Transpose reads
    the Conv's input, which another 1x1 Conv may compute (two the conv cost model kept apart),
    so it counts with the merges that need another round.
    """
    runs, declined = chains.find_chains(ctx, graph, label, min_length=1)
    made = merge_convs(ctx, graph, label, fusions, declined)
    if made:
        return made, 0, declined
    sums, sum_declined = find_sums(ctx, runs, label)
    declined.extend(sum_declined)
    made = 0
    for found in sums:
        made += _apply(ctx, graph, label, Rewrite.branch_sum(found), fusions, declined)
    if made:
        return made, 0, declined
    absorbs, absorb_declined = find_absorbs(ctx, [op for run in runs for op in run], label)
    declined.extend(absorb_declined)
    for absorb in absorbs:
        made += _apply_absorb(ctx, graph, label, absorb, fusions)
    if made:
        return made, 0, declined
    runs, conv_declined = prefix_pointwise_convs(ctx, runs, label)
    declined.extend(conv_declined)
    planned: list[list[LinearOp]] = []
    for run in runs:
        if len(run) < 2:
            continue
        plan, split_reasons = chains.plan_chain(run, ctx.policy, label)
        declined.extend(split_reasons)
        planned.extend(run[i:j] for i, j in plan.segments)
    tick = _ticker(ctx, sum(len(ops) for ops in planned))
    conv_led = 0
    for ops in planned:
        done = _apply(ctx, graph, label, Rewrite.segment(ops, tick), fusions, declined)
        conv_led += done if ops[0].input_perm is not None else 0
        made += done
    return conv_led, made - conv_led, declined


def _ticker(ctx: Context, total: int) -> Callable[[], None]:
    """Progress for the composition of ``total`` ops: ``merging done/total``, one op at a time."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        ctx.progress("merging", done, total)

    return tick


def _apply(
    ctx: Context,
    graph: ir.Graph,
    label: str,
    rewrite: Rewrite,
    fusions: list[FusionRecord],
    declined: list[Declined],
) -> int:
    """Make one merge if it is still possible and worth it; 1 if made, else 0."""
    if not rewrite.alive(graph):
        return 0  # an earlier merge of this round took part of it: matched again next round
    decision = decide(ctx, rewrite, label)
    if isinstance(decision, Declined):
        declined.append(decision)
        return 0
    affine = rewrite.make_affine()  # the one float64 composition of this merge
    refused = overflow(affine, rewrite.ops[0].dtype.numpy(), rewrite.names, label)
    if refused:
        declined.append(refused)
        return 0
    _write(ctx, graph, label, rewrite, decision, affine, fusions)
    return 1


def _apply_absorb(
    ctx: Context, graph: ir.Graph, label: str, absorb: Absorb, fusions: list[FusionRecord]
) -> int:
    """Fold one step into its linear op across views (never more work, never more weights)."""
    if not absorb.alive(graph):
        return 0
    op = absorb.op
    rewrite = Rewrite([op], [], [op.in_features, op.out_features], op.macs, absorb.affine)
    rewrite.note = absorb.note
    has_bias = op.has_bias or absorb.shift is not None
    decision = Decision(emits_gemm(ctx, rewrite, has_bias), has_bias, 0, 0)
    affine = rewrite.make_affine()
    if overflow(affine, op.dtype.numpy(), absorb.names, label):
        return 0

    def then(record: FusionRecord) -> None:  # the step goes; the op's name now holds new values
        remove_step(absorb)
        record.output = None
        record.nodes = absorb.names
        record.op_types = [n.op_type for n in (*op.nodes, *absorb.views, absorb.step)]
        record.macs_after = record.macs_before

    _write(ctx, graph, label, rewrite, decision, affine, fusions, [absorb.step], then)
    return 1


def _write(
    ctx: Context,
    graph: ir.Graph,
    label: str,
    rewrite: Rewrite,
    decision: Decision,
    affine: AffineMap,
    fusions: list[FusionRecord],
    also_removed: list[ir.Node] | None = None,
    then: Callable[[FusionRecord], None] | None = None,
) -> None:
    """Write one accepted merge, keep the records and names current, and check the graph."""
    old_nodes = rewrite.old_nodes + (also_removed or [])
    owners = set(old_nodes)
    others = [u for op in rewrite.ops for c in op.constants for u in other_users(c, owners)]
    if others:  # those other readers may own the constant alone now: look again
        ctx.shared_released = True
        ctx.released_elsewhere |= any(u.graph is not graph for u in others)
    consumed = [ctx.records.pop(v) for n in old_nodes for v in n.outputs if v in ctx.records]
    refolded = then is not None or any(v in ctx.refolded for n in old_nodes for v in n.outputs)
    record, new_nodes = write(ctx, graph, rewrite, decision, affine, label)
    if then is not None:
        then(record)
    if refolded:  # the output's name carries a folded step: nothing to compare it with
        record.output = None
        ctx.refolded.add(new_nodes[-1].outputs[0])
    for earlier in consumed:  # their output value is gone: name the merge that took it
        earlier.merged_into = record.new_nodes[0]
        earlier.output = None
    if record.output is not None:
        ctx.records[new_nodes[-1].outputs[0]] = record
    ctx.written.append(new_nodes[1 if rewrite.input_perm is not None else 0])  # the merged op
    replaced = [*rewrite.names, *(n.name or n.op_type for n in also_removed or [])]
    ctx.renamed.update((name, record.new_nodes[0]) for name in replaced)
    fusions.append(record)
    invariants.check_rewrite(graph, label, old_nodes, new_nodes)
    if ctx.check_every_rewrite:
        invariants.check_model(ctx.model)
    ctx.merged += 1
    logger.debug("merged %s", record.nodes)
