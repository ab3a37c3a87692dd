"""The protocol every kind of merge follows: finders plan merges, the engine makes them.

A *finder* (:class:`Finder`) looks at one graph as one round of the engine sees it (a
:class:`Round`) and returns what it found: planned merges (:class:`Merge`) and reasons
(:class:`~converter.fusion.core.declined.Declined`) for what it will not merge. The engine
(:mod:`converter.fusion.engine`) then makes every planned merge in the same steps, whatever its
kind:

1. ``alive``: its nodes are all still in the graph (an earlier merge of the round may have taken
   one: it is found again next round);
2. ``decide``, from shapes alone (no weight is read): the merged form, or why not (the cost
   model, a form the target op cannot express);
3. ``compute``, once, in float64: the merged weight and bias, or why not (a merge that is not
   exact); refused if the model's dtype cannot hold them;
4. ``write``, once: the new nodes take over the old output value; the engine keeps the records
   and the names, and checks the rewrite's invariants.

Finders that look at the graph the same way share one analysis per round
(:meth:`Round.shared`). Adding a kind of merge is a new finder in the engine's list and a
:class:`Merge` for it; the engine does not change.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.report import FusionRecord

__all__ = ["Computed", "Finder", "Merge", "Round", "Written"]

T = TypeVar("T")


@dataclass(eq=False)
class Round:
    """One graph as one round of the engine sees it: the run, the graph, its label, and the
    analyses its finders share (each made once per round, on the graph as it was then)."""

    ctx: Context
    graph: ir.Graph
    label: str
    _shared: dict[Callable[[Round], Any], Any] = field(default_factory=dict)

    def shared(self, analyse: Callable[[Round], T]) -> T:
        """``analyse(self)``, made once this round whichever finder asks first."""
        if analyse not in self._shared:
            self._shared[analyse] = analyse(self)
        return self._shared[analyse]


class Computed(Protocol):
    """What a merge computes: a weight and a bias (float64), as the dtype check reads them."""

    weight: np.ndarray
    bias: np.ndarray | None


@dataclass
class Written:
    """What a merge wrote: the new nodes in graph order, the merged op among them, its record."""

    nodes: list[ir.Node]
    op: ir.Node
    record: FusionRecord


class Merge(abc.ABC):
    """One planned merge of some kind: what it replaces, and its three steps.

    ``names`` name the nodes it is about (reasons and the record say them), ``old_nodes`` are
    every node it removes, ``constants`` the constants they read, ``dtype`` the type the merged
    values are stored in.
    """

    names: list[str]
    old_nodes: list[ir.Node]
    constants: Sequence[Constant]
    dtype: ir.DataType
    #: How the reason says the nodes stay when the merged values overflow the dtype.
    left_as_is: str = "left as they were"
    #: The merged op's output holds values the original does not hold under that name.
    refolds: bool = False

    @abc.abstractmethod
    def alive(self, graph: ir.Graph) -> bool:
        """All its nodes are still in ``graph`` and read what they read when it was found."""

    @abc.abstractmethod
    def decide(self, round: Round) -> Any:
        """From shapes alone: the plan to compute and write, or a :class:`Declined`."""

    @abc.abstractmethod
    def compute(self, plan: Any) -> Computed | Declined:
        """The merged values in float64, once."""

    @abc.abstractmethod
    def write(self, round: Round, plan: Any, computed: Computed) -> Written:
        """Put the merged op in place of ``old_nodes`` (rounded once to ``dtype``)."""

    @property
    def kept_nodes(self) -> Sequence[ir.Node]:
        """Nodes the merge composes but leaves for other readers; it removes those it took the
        last reader of."""
        return ()

    @property
    def renames(self) -> list[str]:
        """The names of the nodes the merged op stands for from now on (in later reasons)."""
        return self.names

    @property
    def reanalyse(self) -> bool:
        """After this merge the graph is analysed again before the fixpoint is known: most
        merges change what the next round sees (a merged sum joins a chain, a fold frees a
        conv for the next)."""
        return True


class Finder(abc.ABC):
    """Finds one kind of merge in a round: planned merges and reasons, in a stable order."""

    @abc.abstractmethod
    def find(self, round: Round) -> Iterable[Merge | Declined]:
        """Everything this finder sees in ``round`` (read before any of it is merged)."""

    def pending(self, round: Round, written: list[ir.Node]) -> bool:
        """After a round that merged only what leaves the graph settled: would this finder find
        something new next to the merged ops ``written``? (Then one more round runs.)"""
        return False
