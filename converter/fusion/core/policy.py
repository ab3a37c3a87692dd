"""What ``--policy`` may say: ``cost`` (merge where it does not cost more) or ``always``."""

from __future__ import annotations

from typing import Literal

__all__ = ["POLICIES", "Policy", "check_policy"]

Policy = Literal["cost", "always"]
POLICIES: tuple[Policy, ...] = ("cost", "always")


def check_policy(policy: str) -> None:
    """Raise ``ValueError`` for a policy that is neither ``cost`` nor ``always``."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected 'cost' or 'always'")
