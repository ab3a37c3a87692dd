"""Not merged, because: one :class:`Declined`, the reason a user reads, from end to end.

Whatever in :mod:`converter.fusion` looks at a merge and does not make it answers with a
``Declined`` (returned, never raised): a value that is not a usable constant, a node that looks
like a linear op and is not one, a conv merge that is not exact, a chain the cost model splits, a
merged value the dtype cannot hold. A finder says it of the nodes a user recognises (the chain a
refused node stops, ``Declined.about``); the engine files it under the graph it fused, and the
report holds it as it is (``converter.report.Declined`` is this class). A recogniser's ``None``
means only "not this kind of node at all" (a Relu is not a Gemm): nothing was declined.

Pure Python: the numpy algebra modules use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Declined"]


@dataclass
class Declined:
    """Something that was not merged (the ``nodes``, by name, in ``graph``), and why in words."""

    nodes: list[str]
    reason: str
    graph: str = ""

    @classmethod
    def because(cls, reason: str) -> Declined:
        """A reason not yet said of any node: a recogniser's or an algebra's answer."""
        return cls([], reason)

    def about(self, nodes: list[str], graph: str = "") -> Declined:
        """The same reason, said of ``nodes`` (and filed under ``graph``, if given)."""
        return Declined(list(nodes), self.reason, graph or self.graph)

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes), "reason": self.reason, "graph": self.graph}

    def __str__(self) -> str:
        return f"not merged [{', '.join(self.nodes)}] in {self.graph}: {self.reason}"
