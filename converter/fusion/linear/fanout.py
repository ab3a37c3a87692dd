"""Constant steps folded into every reader: one ``Mul`` by a vector read by q, k and v.

A run of constant steps (``Mul``/``Add``/``Sub``/``Div`` by a per-feature or scalar constant,
inference BatchNormalization, ...) whose output several linear ops read (an IA3 scale or a
learned scale before the q, k and v projections, or before gate and up; the weight of a norm no
runtime fuses) ends every chain through it: a chain may not swallow an intermediate that others
read. But when *every* reader is a constant-weight linear op of the same features, the steps fold
into each of them::

    W_i' = diag(s) @ W_i,    b_i' = t @ W_i + b_i        for y = x * s + t

and disappear. Olive's ``fuse_ln_linear`` does this in PyTorch before export; here it is one
merge (:class:`FanOutFold`) that rewrites every reader at once, so the graph never holds a
half-folded state: each reader becomes one op reading the steps' input, and the steps go with
their last reader. The cost model counts every reader: a shift folded into readers without a
bias adds one bias per reader (``--policy always`` merges anyway). A step that is part of a
pattern onnxruntime fuses (an RMSNorm's or LayerNorm's weight) is not a step at all here
(:mod:`converter.fusion.core.runtime_patterns`), so it is never folded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from converter.fusion.core.computed import distinct_sources
from converter.fusion.core.constants import Constant, remove_if_unused
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import shape_list
from converter.fusion.core.merge import Finder, Merge, Round, Written
from converter.fusion.core.writing import replace
from converter.fusion.linear import algebra
from converter.fusion.linear.chains import analyse, find_chains, widths
from converter.fusion.linear.linear_op import LinearOp
from converter.fusion.linear.rewrite import Decision, LinearMerge, new_nodes
from converter.report import FusionRecord

__all__ = ["FanOutFold", "FoldsIntoReaders"]


class FoldsIntoReaders(Finder):
    """Every run of steps whose output only constant-weight linear ops read, two or more."""

    def find(self, round: Round) -> list[Merge | Declined]:
        return _find(round.shared(analyse).runs)

    def pending(self, round: Round, written: list[ir.Node]) -> bool:
        """A merged op reads a value several nodes read (a merge may have given a reader the
        bias that makes folding a shift into it pay): then the graph as it is now is looked at
        again (the round's analysis is of the graph before its merges)."""
        near = any(
            len({u.node for u in v.uses()}) > 1
            for n in written
            for v in n.inputs[:1]
            if v is not None and v.producer() is not None
        )
        if not near:
            return False
        runs, _ = find_chains(round.ctx, round.graph, round.label, min_length=1)
        return any(isinstance(f, FanOutFold) for f in _find(runs))


def _find(runs: list[list[LinearOp]]) -> list[Merge | Declined]:
    """Every fold of a run of steps into all the readers of its output, among ``runs``."""
    starting = {id(run[0].input): [] for run in runs}
    for run in runs:
        starting[id(run[0].input)].append(run[0])
    found: list[Merge | Declined] = []
    for run in runs:
        if not all(op.elementwise for op in run):
            continue
        merge = _fan_out(run, starting.get(id(run[-1].output), []))
        if merge is not None:
            found.append(merge)
    return found


def _fan_out(steps: list[LinearOp], readers: list[LinearOp]) -> Merge | Declined | None:
    """The fold of ``steps`` into ``readers`` (the ops starting a run at their output), why not,
    or None when this is not a fan-out of linear readers at all."""
    out = steps[-1].output
    users = [u.node for u in out.uses()]
    if out.is_graph_output() or len(users) < 2:
        return None
    matrix = [op for op in readers if op.is_matrix]
    if len(matrix) != len(users) or {op.nodes[0] for op in matrix} != set(users):
        return None  # something else reads it too: the steps stay for it
    names = [n for op in steps for n in op.names]
    for op in matrix:
        reason = _reader_reason(steps[-1], op)
        if reason is not None:
            return Declined(names + op.names, f"steps not folded into every reader: {reason}")
    return FanOutFold.of(steps, matrix)


def _reader_reason(last: LinearOp, reader: LinearOp) -> str | None:
    if reader.kept or reader.through:
        return f"'{reader.names[0]}' has nodes that other nodes read too"
    if reader.own_form is not None:
        return f"'{reader.names[0]}' is an ONNX-ML op, written back as itself only by a chain"
    if reader.axis != -1 or reader.input_perm is not None or reader.trans_a:
        return f"'{reader.names[0]}' does not map the last axis of its input as x @ W"
    if reader.dtype != last.dtype:
        return f"dtypes differ ({last.dtype.name} then {reader.dtype.name})"
    if reader.in_features != last.out_features:
        return f"widths do not match ({last.out_features} into {reader.in_features})"
    return None


@dataclass
class _Plan:
    decisions: list[Decision]
    params_before: int
    params_after: int


@dataclass
class _Maps:
    """The composed map of each reader; ``weight``/``bias`` are what the dtype check reads."""

    maps: list[algebra.AffineMap]

    @property
    def weight(self) -> np.ndarray:
        return np.concatenate([m.weight.reshape(-1) for m in self.maps])

    @property
    def bias(self) -> np.ndarray | None:
        biases = [m.bias.reshape(-1) for m in self.maps if m.bias is not None]
        return np.concatenate(biases) if biases else None


@dataclass(eq=False)
class FanOutFold(Merge):
    """``steps`` folded into each of ``readers``: one merge per reader, made together."""

    steps: list[LinearOp]
    readers: list[LinearOp]
    parts: list[LinearMerge]

    left_as_is = "steps left as they were"

    @classmethod
    def of(cls, steps: list[LinearOp], readers: list[LinearOp]) -> FanOutFold:
        return cls(steps, readers, [_part(steps, reader) for reader in readers])

    @functools.cached_property
    def names(self) -> list[str]:
        return [n for op in self.steps + self.readers for n in op.names]

    @property
    def old_nodes(self) -> list[ir.Node]:
        return [n for op in self.steps + self.readers for n in op.nodes]

    @property
    def constants(self) -> list[Constant]:
        return [c for op in self.steps + self.readers for c in op.constants]

    @property
    def dtype(self) -> ir.DataType:
        return self.steps[0].dtype

    def alive(self, graph: ir.Graph) -> bool:
        if not all(n.graph is graph for n in self.old_nodes):
            return False
        out = self.steps[-1].output
        return all(r.input is out for r in self.readers) and len(set(out.uses())) == len(
            self.readers
        )

    def decide(self, round: Round) -> _Plan | Declined:
        decisions = []
        for part in self.parts:
            decision = part.decide(round)
            if isinstance(decision, Declined):
                return Declined(self.names, decision.reason)
            decisions.append(decision)
        before = sum(c.stored for c in distinct_sources(self.constants))
        after = sum(d.params_after for d in decisions)
        if round.ctx.policy == "cost" and after > before:
            return Declined(
                self.names,
                f"cost model: folding the steps into {len(self.readers)} readers would hold "
                f"{after} parameters, more than the {before} they replace (--policy always "
                f"merges anyway)",
            )
        return _Plan(decisions, before, after)

    def compute(self, plan: _Plan) -> _Maps:
        return _Maps([part.make_affine() for part in self.parts])

    def write(self, round: Round, plan: _Plan, computed: _Maps) -> Written:
        """Each reader replaced by one op reading the steps' input; then the steps removed."""
        ctx, graph, x = round.ctx, round.graph, self.steps[0].input
        written: list[ir.Node] = []
        for part, decision, affine in zip(self.parts, plan.decisions, computed.maps, strict=True):
            reader = part.ops[-1]
            w, b = part.weights(ctx, graph, decision, affine)
            nodes = new_nodes(ctx, part, decision, x, w, b)
            replace(graph, list(reader.nodes), nodes, reader.output, reader.weights)
            written.extend(nodes)
        step_nodes = [n for op in self.steps for n in op.nodes]
        for node in reversed(step_nodes):
            graph.remove(node, safe=True)
        for value in (c.value for op in self.steps for c in op.constants):
            remove_if_unused(value)
        return Written(written, written[0], self._record(round, plan, written, x))

    def _record(
        self, round: Round, plan: _Plan, written: list[ir.Node], x: ir.Value
    ) -> FusionRecord:
        first = self.parts[0]
        return FusionRecord(
            nodes=self.names,
            op_types=[n.op_type for n in self.old_nodes],
            new_nodes=[n.name or n.op_type for n in written],
            graph=round.label,
            # Each reader's output keeps its values; the record names the last (the engine
            # tracks the last written node's output), the note says there are others.
            output=self.readers[-1].output.name or "",
            widths=first.widths,
            input_shape=shape_list(x),
            output_shape=shape_list(self.readers[-1].output),
            macs_before=sum(p.macs_before for p in self.parts),
            macs_after=sum(p.widths[0] * p.widths[-1] for p in self.parts),
            params_before=plan.params_before,
            params_after=plan.params_after,
            note=f"steps folded into all {len(self.readers)} readers of their output ("
            + ", ".join(f"'{r.output.name}'" for r in self.readers)
            + ")",
        )


def _part(steps: list[LinearOp], reader: LinearOp) -> LinearMerge:
    ops = [*steps, reader]

    def make() -> algebra.AffineMap:
        return algebra.compose_all(op.affine for op in ops)

    return LinearMerge(ops, [], widths(ops), sum(op.macs for op in ops), make)
