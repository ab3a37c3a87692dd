"""One :class:`Context` per run: the model, its opset, the names, the policy, and the run's caches.

Everything a recogniser, a finder or the engine needs about the run it is part of comes from
the Context it is handed: the constants (:class:`~converter.fusion.core.constants.Constants`,
each value resolved once), the shapes (:class:`~converter.fusion.core.shapes.Shapes`, inferred
on demand, ranks carried back), the names taken in the model, the policy, progress, whether every
rewrite is checked, and the engine's bookkeeping of the merges made so far. Nothing of a run is
kept in a module: a second run in the same process (a test suite, batch mode, a notebook) starts
from a Context of its own, and all of it goes when the run ends.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import onnx_ir as ir

from converter.fusion.core.constants import Constants
from converter.fusion.core.graph import iter_graphs
from converter.fusion.core.policy import Policy
from converter.fusion.core.shapes import Shapes
from converter.model_io.progress import ProgressCallback, no_progress
from converter.report import FusionRecord

__all__ = ["CHECK_ENV", "Context", "Names"]

logger = logging.getLogger(__name__)

#: Set (to anything) to check the whole model after every merge, as tests and ``--debug`` do.
CHECK_ENV = "ONNX_FUSE_CHECK_EVERY_REWRITE"


class Names:
    """Unique node and value names across the whole model (ONNX names are global in a model)."""

    def __init__(self, graphs: Iterable[ir.Graph]) -> None:
        """Collect the names already used in ``graphs`` (the model's graph and all subgraphs)."""
        self.used: set[str] = set()
        self._next: dict[str, int] = {}  # per base, the suffix to try next: O(1) amortised
        for graph in graphs:
            self.used.update(v.name for v in graph.inputs if v.name)
            self.used.update(graph.initializers)
            for node in graph:
                self.used.update(v.name for v in node.outputs if v.name)
                if node.name:
                    self.used.add(node.name)

    def fresh(self, base: str) -> str:
        """``base``, or ``base_N`` with the smallest N not taken since (unique in the model)."""
        name, i = base, self._next.get(base, 1)
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self._next[base] = i
        self.used.add(name)
        return name


def _checks_requested() -> bool:
    return bool(os.environ.get(CHECK_ENV)) or logger.isEnabledFor(logging.DEBUG)


@dataclass(eq=False)
class Context:
    """What every step of one run needs, and what the run has done so far."""

    model: ir.Model
    policy: Policy = "cost"
    progress: ProgressCallback = no_progress
    # Values the model's training_info updates: never constant, never merged away.
    trained: Collection[ir.Value] = frozenset()
    check_every_rewrite: bool = field(default_factory=_checks_requested)
    constants: Constants = field(init=False)
    shapes: Shapes = field(init=False)
    # --- the engine's bookkeeping --------------------------------------------------------------
    merged: int = 0
    # The record of each merged op's output value, so a later merge that consumes it can say so.
    records: dict[ir.Value, FusionRecord] = field(default_factory=dict)
    # Each replaced node's name -> the merged op's name, for reasons reported after the merge.
    renamed: dict[str, str] = field(default_factory=dict)
    # A merge dropped one use of a constant other nodes still read: their decisions may change.
    shared_released: bool = False
    # ... and some of those nodes are in another graph (a subgraph, or the graph around one).
    released_elsewhere: bool = False
    # The merged op of each merge written in the current round.
    written: list[ir.Node] = field(default_factory=list)
    # Output values whose name now holds a step folded across views: not the original's numbers
    # there, so a merge that takes one over cannot be measured at it either.
    refolded: set[ir.Value] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.constants = Constants(self.trained, self.opset)
        self.shapes = Shapes(self.model, self.constants)

    @functools.cached_property
    def opset(self) -> int:
        """The model's ``ai.onnx`` opset as onnxruntime reads it (0 if none is imported): ``""``
        and ``"ai.onnx"`` name one domain, and of two imports of it the later one counts."""
        versions = [v for d, v in self.model.opset_imports.items() if d in ("", "ai.onnx")]
        return versions[-1] if versions else 0

    @functools.cached_property
    def names(self) -> Names:
        """The names taken in the model, its subgraphs included; new ones are fresh."""
        return Names(g for g, _ in iter_graphs(self.model.graph))
