"""What a fusion run did and did not do: records a user can read and a report that holds them.

A :class:`FusionRecord` describes one merged segment; a :class:`Declined` record says why a
chain (or part of one) was left as it was, in the spirit of onnxscript's
``MatchResult.fail(reason)`` (defined with the fusion code that returns it,
:mod:`converter.fusion.core.declined`). :class:`FusionReport` gathers both with the model totals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from converter.equivalence.timing import BenchmarkResult
from converter.fusion.core.declined import Declined

__all__ = ["FusionRecord", "Declined", "FusionReport", "NOT_SORTED_NOTE"]

#: What a report says about an input whose nodes had to be sorted (:mod:`converter.fusion.core.order`).
NOT_SORTED_NOTE = "input nodes were not in topological order; sorted"


@dataclass
class FusionRecord:
    """One merged segment: which nodes became which, and what it saved (multiply-adds per row).

    The last three fields are validation's diagnostic of this fusion, filled in by
    :func:`converter.fuse_file`: ``max_error`` is the largest absolute difference at the fusion's
    ``output`` between the original and the fused model (in the first trial, or a failing one;
    the trial that used most of its tolerance), ``tolerance_used`` the same as a share of that value's tolerance (over 1 is
    worth a look, never a failure by itself: only graph outputs decide), and ``error_note`` says
    why they are ``None`` when the value could not be measured (a later merge removed it, it
    lies in a subgraph, validation was skipped).
    """

    nodes: list[str]
    op_types: list[str]
    new_nodes: list[str]
    graph: str
    output: str | None
    widths: list[int]
    input_shape: list[int | str | None] | None
    output_shape: list[int | str | None] | None
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    max_error: float | None = None
    note: str | None = None
    merged_into: str | None = None
    tolerance_used: float | None = None
    error_note: str | None = None

    @property
    def macs_saved(self) -> int:
        return self.macs_before - self.macs_after

    def to_dict(self) -> dict[str, Any]:
        # Shallow copies of the lists: the fields hold only str, int, float and None
        # (dataclasses.asdict's deep copy took 70 us a record).
        d = {f.name: _copy(getattr(self, f.name)) for f in _RECORD_FIELDS}
        d["macs_saved"] = self.macs_saved
        return d


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


_RECORD_FIELDS = dataclasses.fields(FusionRecord)


@dataclass
class FusionReport:
    """The outcome of one run: fusions, declined chains, model totals, validation, timing, and
    (``benchmark``) the latency under onnxruntime before -> after when it was asked for."""

    fusions: list[FusionRecord] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)
    linear_ops_before: int = 0
    linear_ops_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    source: str | None = None
    destination: str | None = None
    validation: dict[str, Any] | None = None
    validated: bool | None = None
    seconds: float | None = None
    first_divergence: int | None = None  # index in ``fusions`` of the first diverged output
    # Patterns rewritten so that a runtime fuses them (dynamo's GELU order...), one line each.
    runtime_rewrites: list[str] = field(default_factory=list)
    benchmark: BenchmarkResult | None = None  # latency before -> after, when asked for
    # The graphs whose nodes the input listed out of topological order (sorted before fusing).
    sorted_graphs: list[str] = field(default_factory=list)

    @property
    def diverged(self) -> FusionRecord | None:
        """When validation failed, the fusion whose output first differed (graph order)."""
        return None if self.first_divergence is None else self.fusions[self.first_divergence]

    @property
    def modified(self) -> bool:
        """Whether the model was changed: rewritten, or its nodes had to be sorted."""
        return bool(self.rewritten or self.sorted_graphs)

    @property
    def rewritten(self) -> bool:
        """Whether what the model computes was rewritten (so validation has something to
        prove): a merge, or a pattern written the way runtimes fuse it."""
        return bool(self.fusions or self.runtime_rewrites)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: totals, one record per fusion, one per declined chain."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["fusions"] = [r.to_dict() for r in self.fusions]
        d["declined"] = [r.to_dict() for r in self.declined]
        d["benchmark"] = None if self.benchmark is None else self.benchmark.to_dict()
        return d

    def summary_lines(self, *, verbose: bool = False) -> list[str]:
        """The short human summary the CLI prints; ``verbose`` adds every record and reason."""
        lines = [
            f"merged {len(self.fusions)} chain(s)"
            + (f": {self.source} -> {self.destination}" if self.destination else ""),
            f"  linear ops      {self.linear_ops_before} -> {self.linear_ops_after}",
            f"  MACs per row    {self.macs_before:,} -> {self.macs_after:,}"
            "  (multiply-adds per row of the last axis)",
            f"  weight params   {self.params_before:,} -> {self.params_after:,}",
        ]
        if self.validated is None:
            lines.append("  validation      skipped")
        else:
            lines.append(
                f"  validation      {'passed' if self.validated else 'FAILED'}"
                + _computed_in(self.validation, verbose=verbose)
            )
        if self.seconds is not None:
            lines.append(f"  wall time       {self.seconds:.2f} s")
        if self.benchmark is not None:
            lines.extend(f"  {line}" for line in self.benchmark.summary_lines(verbose=verbose))
        if self.sorted_graphs:
            lines.append(f"  note            {NOT_SORTED_NOTE} ({', '.join(self.sorted_graphs)})")
        if self.diverged is not None:
            lines.append(f"  first diverged  {_describe(self.diverged)}{_error(self.diverged)}")
        if self.runtime_rewrites:
            lines.append(
                f"  for the runtime {len(self.runtime_rewrites)} pattern(s) (GELU, RMSNorm) "
                "written in the order onnxruntime fuses into one kernel"
            )
        if verbose:
            lines.extend(f"  {line}" for line in self.runtime_rewrites)
            for r in self.fusions:
                lines.append(
                    f"  merged {_describe(r)} (widths {'->'.join(map(str, r.widths))}, "
                    f"MACs/row {r.macs_before} -> {r.macs_after}{_error(r)})"
                )
                if r.note:  # how the merge was seen (a LoRA sum, a step across views, a conv...)
                    lines.append(f"    {r.note}")
            lines.extend(f"  {d}" for d in self.declined)
        elif self.declined and self.fusions:
            lines.append(f"  {self.declined_chains()} chain(s) not merged (--verbose says why)")
        if not self.fusions:
            lines.append(f"  nothing merged: {self.why_nothing_merged()}")
        return lines

    def declined_chains(self) -> int:
        """How many chains the declined records are about: records sharing a node are one chain
        (a chain whose every weight is a graph input is declined once per weight)."""
        groups: list[set[str]] = []
        for record in self.declined:
            names = {f"{record.graph}/{n}" for n in record.nodes} or {id(record)}
            touching = [g for g in groups if g & names]
            merged = names.union(*touching)
            groups = [g for g in groups if not g & names] + [merged]
        return len(groups)

    def why_nothing_merged(self) -> str:
        """One line: why a run merged nothing."""
        if self.linear_ops_before == 0:
            return "the model has no linear op (Gemm, MatMul, or Conv with a constant weight)"
        if not self.declined:
            return (
                "no two linear ops with constant weights follow each other "
                "(a non-linear op or a non-constant weight separates them)"
            )
        chains = self.declined_chains()
        reasons = {r.reason.split(":")[0] for r in self.declined}
        if reasons == {"cost model"}:
            return f"{chains} chain(s), all declined by the cost model: see --verbose"
        return f"{chains} chain(s) declined, e.g. {self.declined[0].reason} (see --verbose)"

    def __str__(self) -> str:
        return "\n".join(self.summary_lines(verbose=True))


def _computed_in(validation: dict[str, Any] | None, *, verbose: bool) -> str:
    """How validation ran when not in the models' own types: ``" (bfloat16 computed in
    float32)"``, and with ``verbose`` why (see :mod:`converter.equivalence.widen`)."""
    widened = (validation or {}).get("widened")
    if not widened:
        return ""
    return f" ({widened if verbose else widened.split(':')[0]})"


def _describe(record: FusionRecord) -> str:
    return f"[{', '.join(record.nodes)}] -> {', '.join(record.new_nodes)}"


def _error(record: FusionRecord) -> str:
    """The validation diagnostic of one fusion, for the summary ("" if validation did not run)."""
    if record.max_error is not None:
        used = "" if record.tolerance_used is None else f", {record.tolerance_used:.2g}x tolerance"
        return f", max error at '{record.output}' {record.max_error:.3g}{used}"
    return f", error {record.error_note}" if record.error_note else ""
