"""Chains of linear ops: find them, check the safety preconditions, merge the segments chosen.

A *chain* is a run of linear ops where each op's data input is the previous op's output, and
each intermediate result has exactly one consumer and is not a graph output (otherwise someone
else still needs the intermediate, and merging would have to keep both). Every link that is
*not* made, between ops that are otherwise linear, is declined with the reason
(:class:`RefusedLinks`), as is every split the cost model chooses (:class:`Segments`).

The analysis (:func:`analyse`: every linear op and step of the graph, linked into maximal
chains, one-op chains included) is made once a round and shared by the finders that read chains:
branch sums and folds across views start from it too. A chain's segments merge as
``W = W1 @ W2 @ ...``, ``b = (b1 @ W2 + b2) @ W3 + ...``; a chain may be led by an op another
part recognises before its first op (a 1x1 Conv read through a channels-last Transpose,
:mod:`converter.fusion.conv_to_linear`): the engine gives :class:`Segments` that ``lead``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import onnx_ir as ir

from converter.fusion.core.constants import shape_of_static
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import is_onnx, op_key
from converter.fusion.core.merge import Finder, Merge, Round
from converter.fusion.core.policy import Policy
from converter.fusion.linear import algebra
from converter.fusion.linear.linear_op import LinearOp
from converter.fusion.linear.ops import OPS, recognize
from converter.fusion.linear.region_members import SHAPE_OPS
from converter.fusion.linear.regions import find_regions
from converter.fusion.linear.reshape_pairs import cancelling_pair
from converter.fusion.linear.rewrite import LinearMerge
from converter.fusion.linear.steps import STEP_OPS, recognize_step

__all__ = [
    "ChainPlan",
    "Lead",
    "RefusedLinks",
    "Segment",
    "Segments",
    "analyse",
    "find_chains",
    "intermediate_reason",
    "link_reason",
    "plan_chain",
    "widths",
]

#: What may lead a chain from before its first op: the op found there, why not, or None.
Lead = Callable[[Context, LinearOp], "LinearOp | Declined | None"]

logger = logging.getLogger(__name__)


@dataclass
class ChainPlan:
    """A chain's ops and the segments ``[start, stop)`` of it that will be merged (length >= 2)."""

    ops: list[LinearOp]
    segments: list[tuple[int, int]]


def widths(ops: list[LinearOp]) -> list[int]:
    """The widths ``d0 -> d1 -> ... -> dk`` a run of ops maps through."""
    return [ops[0].in_features] + [op.out_features for op in ops]


def _name(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


def intermediate_reason(
    value: ir.Value, readers: tuple[ir.Node, ...] = (), *, shape_kept: bool = False
) -> str | None:
    """Why ``value`` cannot vanish inside a merge (a graph output, or read by several nodes;
    several of ``readers``, the nodes of the op reading it, count as one). ``shape_kept``: a
    value no merge of the chain removes has ``value``'s shape (see :func:`_shape_kept`)."""
    label = value.name or "<unnamed>"
    if value.is_graph_output():
        return f"intermediate '{label}' is a graph output"
    # A Shape reads only the shape: one the model fixes becomes a constant, and one a kept
    # value has too is read from that value (:mod:`converter.fusion.core.writing`).
    users = {u.node for u in value.uses() if not _reads_kept_shape(u.node, shape_kept)}
    if readers and users <= set(readers):
        return None
    if len(users) != 1:
        return f"fan-out: intermediate '{label}' feeds {len(users)} nodes"
    return None


def _reads_kept_shape(node: ir.Node, shape_kept: bool) -> bool:
    if shape_of_static(node) is not None:
        return True
    return shape_kept and (is_onnx(node, "Shape") or is_onnx(node, "Size"))


def _shape_kept(prev: LinearOp, by_output: dict[ir.Value, LinearOp]) -> bool:
    """``prev``'s output has the shape of its chain's input, which no merge of the chain
    removes: ``prev`` and every op before it are elementwise steps (their constants never
    broadcast the data up, :mod:`converter.fusion.linear.steps`)."""
    op: LinearOp | None = prev
    while op is not None:
        if not op.elementwise:
            return False
        op = by_output.get(op.input)
    return True


def link_reason(prev: LinearOp, op: LinearOp, *, shape_kept: bool = False) -> str | None:
    """Why ``op`` cannot be merged with ``prev`` (whose output is ``op``'s input), or None."""
    reason = intermediate_reason(prev.output, op.nodes, shape_kept=shape_kept)
    if reason:
        return reason
    if prev.ends_chain:
        return prev.ends_chain
    if op.trans_a:
        return f"transA=1 on '{op.names[0]}' transposes the rows, so it can only start a chain"
    if prev.axis != op.axis:
        return "the ops act on different axes (one is a MatMul with the weight on the left)"
    if prev.dtype != op.dtype:
        return f"dtypes differ ({prev.dtype.name} then {op.dtype.name})"
    if prev.out_features != op.in_features:
        return f"widths do not match ({prev.out_features} outputs into {op.in_features} inputs)"
    return None


def find_chains(
    ctx: Context, graph: ir.Graph, label: str, *, min_length: int = 2
) -> tuple[list[list[LinearOp]], list[Declined]]:
    """All maximal chains of ``min_length`` or more linear ops in ``graph`` (not its subgraphs).

    Returns the chains, each in order of application, and a record for every link refused between
    two linear ops, or between a linear op and a Gemm/MatMul that cannot be merged.
    """
    ops, refused, not_regions = _recognise_all(ctx, graph)
    successor, declined = _links(ops, label)
    declined.extend(d.about(d.nodes, label) for d in not_regions)
    declined.extend(_refused_neighbours(ctx, refused, ops, label))
    has_predecessor = {id(op) for op in successor.values()}
    chains = []
    for op in ops:
        if id(op) in has_predecessor:
            continue
        chain = [op]
        while id(chain[-1]) in successor:
            chain.append(successor[id(chain[-1])])
        if len(chain) >= min_length:
            chains.append(chain)
    return chains, declined


def _recognise_all(
    ctx: Context, graph: ir.Graph
) -> tuple[list[LinearOp], dict[ir.Node, Declined], list[Declined]]:
    """Every linear op, step and region of ``graph`` in graph order, every node refused, with
    why, and why each structure of constant blocks is not a region."""
    ops: list[LinearOp] = []
    refused: dict[ir.Node, Declined] = {}
    regions, not_regions = find_regions(ctx, graph)
    ends = {op.nodes[-1]: op for op in regions}
    absorbed: set[ir.Node] = {n for op in regions for n in op.nodes}
    producers: dict[ir.Value, LinearOp] = {}
    for node in graph:
        if node in ends:
            found: LinearOp | Declined | None = ends[node]
        elif node in absorbed:
            continue
        else:
            found = _through_pair(ctx, recognize(ctx, node, producers.get))
        if found is None and op_key(node) in STEP_OPS:
            found = recognize_step(ctx, node, producers.get)
        if isinstance(found, LinearOp) and ctx.constants.is_constant(found.input):
            continue  # computed from constants alone (DoRA's B(A(I))): a constant, not a layer
        if isinstance(found, LinearOp):
            producers[found.output] = found
            ops.append(found)
            absorbed.update(found.nodes[1:])
        elif isinstance(found, Declined):
            refused[node] = found
    return ops, refused, not_regions


def _through_pair(ctx: Context, found: LinearOp | Declined | None) -> LinearOp | Declined | None:
    """``found`` reading its input through two Reshapes that cancel, when it does (the pair
    becomes its first nodes)."""
    if not isinstance(found, LinearOp) or not found.is_matrix or found.input_perm is not None:
        return found
    pair = cancelling_pair(ctx, found.input)
    if pair is None:
        return found
    return dataclasses.replace(found, nodes=(*pair, *found.nodes), input_index=0, through=pair)


def _links(ops: list[LinearOp], label: str) -> tuple[dict[int, LinearOp], list[Declined]]:
    """Each op's successor in its chain (by the op's id), and why each refused link is."""
    by_output = {op.output: op for op in ops}
    declined: list[Declined] = []
    successor: dict[int, LinearOp] = {}
    for op in ops:
        prev = by_output.get(op.input)
        if prev is None:
            continue
        reason = link_reason(prev, op, shape_kept=_shape_kept(prev, by_output))
        if reason is None:
            successor[id(prev)] = op
        elif not (prev.elementwise and op.elementwise):  # two steps alone would not merge anyway
            declined.append(Declined(prev.names + op.names, reason, label))
    return successor, declined


def _refused_neighbours(
    ctx: Context, refused: dict[ir.Node, Declined], ops: list[LinearOp], label: str
) -> list[Declined]:
    """Records for nodes that could not join a neighbouring linear op: a Gemm/MatMul next to any
    linear op or step, or a constant step next to a Gemm/MatMul."""
    producers: dict[ir.Value, list[LinearOp | ir.Node]] = {op.output: [op] for op in ops}
    consumers: dict[ir.Value, list[LinearOp | ir.Node]] = {}
    for op in ops:
        consumers.setdefault(op.input, []).append(op)
    for node in refused:
        producers[node.outputs[0]] = [node]
        for value in node.inputs:
            if value is not None:
                consumers.setdefault(value, []).append(node)
    records = []
    for node, decline in refused.items():
        before = [p for v in node.inputs if v is not None for p in producers.get(v, [])]
        after = consumers.get(node.outputs[0], [])
        neighbours = [n for n in before + after if n is not node]
        if node.op_type in ("Gemm", "MatMul", "Einsum"):
            # A product of two activations (attention's q @ k) is not a linear op: no reason.
            wanted = neighbours if _has_constant_operand(ctx, node) else []
        elif op_key(node) in OPS:  # an ONNX-ML linear op: its weights are attributes
            wanted = neighbours
        else:  # a step matters only beside a matrix op
            wanted = [n for n in neighbours if isinstance(n, LinearOp) and not n.elementwise]
        if not wanted:
            continue
        names = [_names(n) for n in before if n is not node]
        later = [_names(n) for n in after if n is not node]
        flat = [x for group in names for x in group] + [_name(node)]
        flat += [x for group in later for x in group]
        records.append(decline.about(flat, label))
    return records


def _has_constant_operand(ctx: Context, node: ir.Node) -> bool:
    """An operand is, or could be meant as, a weight: a constant, an initializer, a graph input."""
    return any(
        ctx.constants.is_constant(v) or v.is_graph_input() or v.is_initializer()
        for v in node.inputs[:2]
        if v is not None
    )


def _names(item: LinearOp | ir.Node) -> list[str]:
    return item.names if isinstance(item, LinearOp) else [_name(item)]


def plan_chain(
    chain: list[LinearOp], policy: Policy, label: str
) -> tuple[ChainPlan, list[Declined]]:
    """Choose which segments of ``chain`` to merge, recording why any split was made.

    Only segments holding a Gemm, MatMul or Einsum are merged: elementwise steps and regions
    alone stay as they are (a region as a dense matrix would cost more than its blocks).
    """
    if not any(op.is_matrix for op in chain):
        return ChainPlan(chain, []), []
    dims = widths(chain)
    alone = [op.macs for op in chain]
    segments = algebra.plan_segments(dims, policy, alone=alone)
    declined = []
    for (i, j), (_, k) in itertools.pairwise(segments):
        if not any(op.is_matrix for op in chain[i:k]):
            continue
        separate = algebra.segments_macs(dims, [(i, j), (j, k)], alone=alone)
        merged = dims[i] * dims[k]
        declined.append(
            Declined(
                chain[j - 1].names + chain[j].names,
                f"cost model: merging widths {dims[i]}->{dims[j]}->{dims[k]} would take "
                f"multiply-adds per row from {separate} to {merged} (--policy always merges anyway)",
                label,
            )
        )
    merged_segments = [
        (i, j) for i, j in segments if j - i >= 2 and any(op.is_matrix for op in chain[i:j])
    ]
    return ChainPlan(chain, merged_segments), declined


@dataclass
class ChainAnalysis:
    """A round's chains (each in order of application, one-op chains included) and the reasons
    for every link refused between two linear ops or beside a Gemm/MatMul that cannot merge."""

    runs: list[list[LinearOp]]
    declined: list[Declined]


def analyse(round: Round) -> ChainAnalysis:
    """The chains of ``round``'s graph as it is now (share it: ``round.shared(analyse)``)."""
    runs, declined = find_chains(round.ctx, round.graph, round.label, min_length=1)
    return ChainAnalysis(runs, declined)


class RefusedLinks(Finder):
    """No merge, only reasons: every link refused between linear ops of the round's chains."""

    def find(self, round: Round) -> list[Declined]:
        return round.shared(analyse).declined


@dataclass(eq=False)
class Segment(LinearMerge):
    """A segment of a chain, merged into one op: ``W = W1 @ W2 @ ...``."""

    @classmethod
    def of(cls, ops: list[LinearOp], tick: Callable[[], None] = lambda: None) -> Segment:
        def maps() -> Iterator[algebra.AffineMap]:
            for op in ops:  # one float64 map at a time, built when the fold reaches it
                yield op.affine
                tick()

        def make() -> algebra.AffineMap:
            return algebra.compose_all(maps())

        note = None
        if ops[0].input_perm is not None:
            note = (
                f"1x1 Conv '{ops[0].names[0]}' moved past the Transpose "
                f"(perm {list(ops[0].input_perm)}) into the channels-last linear op"
            )
        return cls(ops, [], widths(ops), sum(op.macs for op in ops), make, note)

    @property
    def reanalyse(self) -> bool:
        """The cost model chose every segment of each maximal chain at once, and a merged
        segment takes the place and the output value of the ops it replaces, so no chain, link
        or branch sum a further round could find was not already in this one. A segment led by
        a 1x1 Conv is not maximal that way: its new Transpose reads the Conv's input, which
        another 1x1 Conv may compute (two the conv cost model kept apart). Nor is one whose
        write gave its output a shape the model did not record (a region may read it now)."""
        return self.input_perm is not None or self.shaped


class Segments(Finder):
    """Every segment the cost model chose in every chain of the round (led, where ``lead``
    finds one, by the op before the chain's first)."""

    def __init__(self, lead: Lead | None = None) -> None:
        self.lead = lead

    def find(self, round: Round) -> list[Merge | Declined]:
        found: list[Merge | Declined] = []
        runs = self._led(round, round.shared(analyse).runs, found)
        planned: list[list[LinearOp]] = []
        for run in runs:
            if len(run) < 2:
                continue
            plan, split_reasons = plan_chain(run, round.ctx.policy, round.label)
            found.extend(split_reasons)
            planned.extend(run[i:j] for i, j in plan.segments)
        tick = _ticker(round.ctx, sum(len(ops) for ops in planned))
        found.extend(Segment.of(ops, tick) for ops in planned)
        return found

    def pending(self, round: Round, written: list[ir.Node]) -> bool:
        """A merged op now reads a region (a map of rows through reshapes) that the cost model
        merges with it (it kept them apart while the op was two): one more round."""
        if not any(_after_region_op(n) for n in written):  # cheap test first
            return False
        for run in round.shared(analyse).runs:
            if len(run) < 2 or not any(op.region for op in run):
                continue
            plan, _ = plan_chain(run, round.ctx.policy, round.label)
            if any(op.region for i, j in plan.segments for op in run[i:j]):
                return True
        return False

    def _led(
        self, round: Round, runs: list[list[LinearOp]], found: list[Merge | Declined]
    ) -> list[list[LinearOp]]:
        """``runs``, each with the op ``lead`` finds before it in front (and its reasons)."""
        if self.lead is None:
            return runs
        led: list[list[LinearOp]] = []
        for run in runs:
            first = self.lead(round.ctx, run[0])
            if isinstance(first, LinearOp):
                led.append([first, *run])
                continue
            if first is not None:
                found.append(first)
            led.append(run)
        return led


def _after_region_op(node: ir.Node) -> bool:
    """``node`` (a merged op) reads a value a shape op makes (where a region may end), or it
    or the bias ``Add`` after it is read by one (where a region may start)."""
    data = [v for v in node.inputs if v is not None and v.producer() is not None]
    if any(op_key(v.producer()) in _REGION_ENDS for v in data):
        return True
    out = node.outputs[0]
    readers = [u.node for u in out.uses()]
    if len(readers) == 1 and readers[0].op_type == "Add":
        readers = [u.node for u in readers[0].outputs[0].uses()]
    return any(op_key(r) in _REGION_ENDS for r in readers)


#: Ops a region may end at or start with (its shape ops, and rotate_half's Neg).
_REGION_ENDS = SHAPE_OPS | {"Neg"}


def _ticker(ctx: Context, total: int) -> Callable[[], None]:
    """Progress for the composition of ``total`` ops: ``merging done/total``, one op at a time."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        ctx.progress("merging", done, total)

    return tick
