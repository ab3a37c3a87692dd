"""The engine: rounds of finders on the live graph, every planned merge made one way, to a fixpoint.

Each graph (the main graph and every ``If``/``Loop``/``Scan`` body) is fused in *rounds*. A round
runs the finders of :data:`FINDERS` in order on the graph as it is then (they share one analysis
of it, :class:`~converter.fusion.core.merge.Round`), and :func:`apply` makes every merge each
finder plans, whatever its kind: still alive, decided from shapes, computed once in float64,
refused if the dtype cannot hold it, written once, its invariants checked. A finder whose merges
change what the later finders see ends the round (every kind but a chain segment does; see
:attr:`~converter.fusion.linear.chains.Segment.reanalyse`). The finders, in order:

1. the links refused between linear ops (reasons only: :mod:`converter.fusion.linear.chains`);
2. convolutions: folds, summed branches, compositions (:mod:`converter.fusion.conv.merge`);
3. branch sums over linear chains of one input (:mod:`converter.fusion.linear.branches`);
4. constant steps folded into a linear op across views of its output
   (:mod:`converter.fusion.linear.absorb`), and into the one it reaches through views of its
   input (:mod:`converter.fusion.linear.fold_before`: a LayerNorm's gamma and beta too);
5. every segment the cost model chose in every chain (:mod:`converter.fusion.linear.chains`), a
   chain read through a channels-last ``Transpose`` of a 1x1 Conv led by that Conv
   (:mod:`converter.fusion.conv_to_linear`), so a Conv+BN folded in an earlier round then goes
   into the linear ops as one more op of the chain.

Adding a kind of merge is adding a finder to the list. Rounds repeat until one merges only what
leaves the graph settled (tests and ``--debug`` run one more round to check it), unless a merge
let go of a constant other nodes share (they may own it alone now) or a finder sees something
new next to the merged ops (:meth:`~converter.fusion.core.merge.Finder.pending`). The reasons
reported for what was *not* merged are that last round's, with every node a merge replaced named
by the merged op, so they describe the final graph (never a node a later merge took). A planned
merge reads its input and output from the live nodes and is skipped if an earlier merge of the
round took one of its nodes; it is found again in the next round. Every merge removes at least
one recognised op or sum node, so the rounds end.

After every merge the nodes it removed and added are checked (:func:`invariants.check_rewrite`);
with ``check_every_rewrite`` (tests, ``--debug``) the whole model is, and the whole model always
is at the end. A broken invariant is an :class:`~converter.errors.EngineError` (exit 3).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx_ir as ir

from converter.errors import EngineError
from converter.fusion import conv_to_linear
from converter.fusion.conv import merge as conv_merge
from converter.fusion.core import invariants
from converter.fusion.core.computed import NotComputable
from converter.fusion.core.constants import other_users
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.dtypes import overflow
from converter.fusion.core.merge import Computed, Finder, Merge, Round
from converter.fusion.linear import absorb, branches, chains, fanout, fold_before
from converter.report import FusionRecord

__all__ = ["FINDERS", "apply", "fuse_graph"]

logger = logging.getLogger(__name__)

#: Every kind of merge, in the order a round tries them.
FINDERS: tuple[Finder, ...] = (
    chains.RefusedLinks(),
    conv_merge.ConvFolds(),
    conv_merge.ConvSums(),
    conv_merge.ConvCompositions(),
    branches.BranchSums(),
    absorb.FoldsAcrossViews(),
    fold_before.FoldsBeforeViews(),
    fanout.FoldsIntoReaders(),
    chains.Segments(lead=conv_to_linear.pointwise_before),
)


def fuse_graph(
    ctx: Context, graph: ir.Graph, label: str, finders: Sequence[Finder] = FINDERS
) -> tuple[list[FusionRecord], list[Declined]]:
    """Merge everything mergeable in ``graph`` (not its subgraphs), to a fixpoint."""
    fusions: list[FusionRecord] = []
    limit = sum(1 for _ in graph) + 2  # each productive round removes at least one node's worth
    for _ in range(limit):
        ctx.shared_released = False
        ctx.written = []
        again, settled, declined = _round(Round(ctx, graph, label), finders, fusions)
        if again or ctx.shared_released or _pending(Round(ctx, graph, label), finders):
            continue
        if settled and ctx.check_every_rewrite:
            _assert_fixpoint(Round(ctx, graph, label), finders)
        return fusions, _renamed(declined, ctx.renamed)
    raise EngineError(f"internal error: fusing {label} did not reach a fixpoint; nothing written")


def _round(
    round: Round, finders: Sequence[Finder], fusions: list[FusionRecord]
) -> tuple[int, int, list[Declined]]:
    """One round: each finder in turn, its merges made, until one merges anything.

    Returns (merges after which the graph is analysed again, merges that leave it settled, the
    reasons for what was not merged, each filed under the round's graph).
    """
    declined: list[Declined] = []
    made: list[Merge] = []
    for finder in finders:
        for found in list(finder.find(round)):  # all found before anything is merged
            result = found if isinstance(found, Declined) else apply(round, found)
            if isinstance(result, Declined):
                declined.append(result if result.graph else result.about(result.nodes, round.label))
            elif result is not None:
                fusions.append(result)
                made.append(found)
        if made:
            break
    again = sum(1 for merge in made if merge.reanalyse)
    return again, len(made) - again, declined


def apply(round: Round, merge: Merge) -> FusionRecord | Declined | None:
    """Make ``merge`` if it is still possible and worth it: its record, why not, or None when an
    earlier merge of the round took part of it (it is found again next round)."""
    if not merge.alive(round.graph):
        return None
    plan = merge.decide(round)
    if isinstance(plan, Declined):
        return plan
    try:
        computed = merge.compute(plan)  # the one float64 computation of this merge
    except NotComputable as e:  # a weight computed from constants that the evaluator cannot
        return Declined(merge.names, f"{e}; {merge.left_as_is}")
    if isinstance(computed, Declined):
        return computed
    too_big = overflow((computed.weight, computed.bias), merge.dtype.numpy())
    if too_big is not None:
        return Declined(merge.names, f"{too_big.reason}; {merge.left_as_is}")
    return _write(round, merge, plan, computed)


def _write(round: Round, merge: Merge, plan: object, computed: Computed) -> FusionRecord:
    """Write one accepted merge, keep the records and names current, and check the graph."""
    ctx, graph, old_nodes = round.ctx, round.graph, merge.old_nodes
    _note_released(ctx, graph, merge)
    consumed = [ctx.records.pop(v) for n in old_nodes for v in n.outputs if v in ctx.records]
    refolded = merge.refolds or any(v in ctx.refolded for n in old_nodes for v in n.outputs)
    written = merge.write(round, plan, computed)
    gone = [n for n in merge.kept_nodes if n.graph is not graph]  # their last reader merged
    consumed += [ctx.records.pop(v) for n in gone for v in n.outputs if v in ctx.records]
    record, new_out = written.record, written.nodes[-1].outputs[0]
    if refolded:  # the output's name carries a folded step: nothing to compare it with
        record.output = None
        ctx.refolded.update(v for n in written.nodes for v in n.outputs)  # one or many readers
    for earlier in consumed:  # their output value is gone: name the merge that took it
        earlier.merged_into = record.new_nodes[0]
        earlier.output = None
    if record.output is not None:
        ctx.records[new_out] = record
    ctx.written.append(written.op)
    ctx.renamed.update((name, record.new_nodes[0]) for name in merge.renames)
    invariants.check_rewrite(graph, round.label, old_nodes, written.nodes)
    if ctx.check_every_rewrite:
        invariants.check_model(ctx.model)
    ctx.merged += 1
    logger.debug("merged %s (%s)", record.nodes, record.note)
    return record


def _note_released(ctx: Context, graph: ir.Graph, merge: Merge) -> None:
    """The merge drops a use of a constant other nodes also read: those may own it alone now,
    so their decisions may change (in another graph too: a subgraph, or the graph around one)."""
    owners = set(merge.old_nodes)
    others = [u for c in merge.constants for u in other_users(c, owners)]
    if others:
        ctx.shared_released = True
        ctx.released_elsewhere |= any(u.graph is not graph for u in others)


def _pending(round: Round, finders: Sequence[Finder]) -> bool:
    """A finder sees something new next to the merged ops of a round that settled."""
    return any(finder.pending(round, round.ctx.written) for finder in finders)


def _assert_fixpoint(round: Round, finders: Sequence[Finder]) -> None:
    """A round after the chain merges finds nothing more (checked in tests and --debug)."""
    again, settled, _ = _round(round, finders, [])
    if again or settled:
        raise EngineError(
            f"internal error: fusing {round.label} missed {again + settled} merge(s) that a "
            "further round found; nothing written"
        )


def _renamed(declined: list[Declined], renamed: dict[str, str]) -> list[Declined]:
    """Reasons name the nodes as they are at the end: a merged node by its merged op's name."""
    for record in declined:
        names = [renamed.get(n, n) for n in record.nodes]
        record.nodes = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    return declined
