"""The algebra of merging affine maps: pure numpy, no graph types.

Every linear op onnx-fuse understands is normalised into an :class:`AffineMap`
``y = x @ W + b`` acting on the last axis of ``x``, with ``W`` of shape ``(in, out)``
held in float64. Two maps compose as::

    (x @ W1 + b1) @ W2 + b2 = x @ (W1 @ W2) + (b1 @ W2 + b2)

which in torch's ``(out, in)`` weight layout is the familiar
``W = W2_t @ W1_t`` and ``b = b1 @ W2_t.T + b2``.

Gemm normalisation (``Y = alpha * op(A) @ op(B) + beta * C``)::

    W = alpha * op(B)          op(B) = B.T if transB else B
    b = beta * C               C broadcast to (N,) or, for a per-row C, (M, N)

MatMul+Add normalisation: ``W`` is the MatMul's constant right operand and ``b`` the Add's
constant, which must broadcast along the last axis only.

The cost model picks, for a chain of widths ``d0 -> d1 -> ... -> dk``, the partition into merged
segments that minimises total multiply-adds per row, ``sum(d_i * d_j)`` over segments ``[i, j)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from converter.fusion.core.policy import Policy, check_policy

__all__ = [
    "AffineMap",
    "compose",
    "compose_all",
    "add_maps",
    "identity_map",
    "gemm_affine",
    "matmul_affine",
    "scale_affine",
    "shift_affine",
    "plan_segments",
    "segments_macs",
    "repeated_row",
]


@dataclass(frozen=True)
class AffineMap:
    """``y = x @ weight + bias`` along the last axis of ``x``.

    ``weight`` is ``(in_features, out_features)`` float64. ``bias`` is None, ``(out,)``, or
    ``(rows, out)`` for a Gemm whose ``C`` differs per row (valid only for that row count).
    """

    weight: np.ndarray
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.weight.ndim != 2:
            raise ValueError(f"weight must be 2-D, got shape {self.weight.shape}")
        if self.bias is not None and (
            self.bias.ndim not in (1, 2) or self.bias.shape[-1] != self.weight.shape[1]
        ):
            raise ValueError(
                f"bias of shape {self.bias.shape} does not match {self.weight.shape[1]} outputs"
            )

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def per_row_bias(self) -> bool:
        """True when the bias differs per row (a Gemm ``C`` of shape ``(M, N)`` with M > 1)."""
        return self.bias is not None and self.bias.ndim == 2 and self.bias.shape[0] > 1

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Evaluate the map on ``x`` in float64."""
        y = np.asarray(x, dtype=np.float64) @ self.weight
        return y if self.bias is None else y + self.bias


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def compose(first: AffineMap, second: AffineMap) -> AffineMap:
    """Return the map ``second(first(x))``: ``W = W1 @ W2``, ``b = b1 @ W2 + b2``."""
    if first.out_features != second.in_features:
        raise ValueError(
            f"cannot compose maps of widths {first.in_features}->{first.out_features} and "
            f"{second.in_features}->{second.out_features}"
        )
    weight = first.weight @ second.weight
    bias = None if first.bias is None else first.bias @ second.weight
    if second.bias is not None:
        bias = second.bias if bias is None else bias + second.bias
    return AffineMap(weight, bias)


def add_maps(first: AffineMap, second: AffineMap) -> AffineMap:
    """The map ``first(x) + second(x)``: ``W = W1 + W2``, ``b = b1 + b2`` (parallel branches)."""
    if first.weight.shape != second.weight.shape:
        raise ValueError(
            f"cannot add maps of shapes {first.weight.shape} and {second.weight.shape}"
        )
    if first.bias is None or second.bias is None:
        bias = first.bias if second.bias is None else second.bias
    else:
        bias = first.bias + second.bias
    return AffineMap(first.weight + second.weight, bias)


def identity_map(width: int) -> AffineMap:
    """``y = x``: the skip side of a residual connection."""
    return AffineMap(np.eye(width))


def compose_all(maps: Iterable[AffineMap]) -> AffineMap:
    """Compose ``maps`` in order of application (the first is applied first).

    ``maps`` may be a generator: each map is then built only when it is folded in, so a chain
    of k float64 maps needs memory for about three of them, not k.
    """
    it = iter(maps)
    result = next(it, None)
    if result is None:
        raise ValueError("compose_all needs at least one map")
    for m in it:
        result = compose(result, m)
    return result


def _normalise_bias(bias: np.ndarray | None, out_features: int) -> np.ndarray | None:
    """Broadcast a bias to ``(out,)`` or ``(rows, out)``, the two forms :class:`AffineMap` holds."""
    if bias is None:
        return None
    bias = _f64(bias)
    if bias.ndim > 2:
        raise ValueError(f"bias of rank {bias.ndim} is not supported")
    if bias.ndim == 2 and bias.shape[0] > 1:
        return np.broadcast_to(bias, (bias.shape[0], out_features)).copy()
    if bias.size == out_features:  # the usual (N,) or (1, N): no broadcast needed
        return bias.reshape(out_features).copy()
    return np.broadcast_to(bias.reshape(-1), (out_features,)).copy()


def gemm_affine(
    b: np.ndarray,
    c: np.ndarray | None = None,
    *,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> AffineMap:
    """Normalise a Gemm's constant operands: ``W = alpha * op(B)``, ``b = beta * C``.

    ``C`` may be absent, a scalar, ``(N,)``, ``(1, N)``, ``(M, 1)``, ``(M, N)``; it is broadcast
    unidirectionally to ``(M, N)`` as ONNX specifies. ``transA`` does not enter the map: it only
    says how the chain's input is laid out.
    """
    weight = _f64(b)
    if weight.ndim != 2:
        raise ValueError(f"Gemm B must be 2-D, got shape {weight.shape}")
    weight = weight.T if trans_b else weight
    if alpha != 1.0:
        weight = alpha * weight  # a float64 copy of the whole weight: only when needed
    bias = None if c is None else beta * _f64(c)
    return AffineMap(weight, _normalise_bias(bias, weight.shape[1]))


def matmul_affine(w: np.ndarray, bias: np.ndarray | None = None) -> AffineMap:
    """Normalise ``MatMul(x, W)`` (+ ``Add`` of a bias along the last axis): ``W`` is ``(in, out)``.

    ``bias`` must broadcast along the last axis only: a scalar, ``(out,)`` or ``(1, ..., 1, out)``.
    """
    weight = _f64(w)
    if weight.ndim != 2:
        raise ValueError(f"MatMul weight must be 2-D, got shape {weight.shape}")
    if bias is not None:
        bias = _f64(bias)
        if any(d != 1 for d in bias.shape[:-1]) or bias.size not in (1, weight.shape[1]):
            raise ValueError(f"bias of shape {bias.shape} does not broadcast along the last axis")
        bias = np.broadcast_to(bias.reshape(-1), (weight.shape[1],)).copy()
    return AffineMap(weight, bias)


def scale_affine(scale: np.ndarray, width: int) -> AffineMap:
    """``y = x * s`` along the last axis as a map: ``W = diag(s)`` (``s`` scalar or ``(width,)``)."""
    s = np.broadcast_to(_f64(scale).reshape(-1), (width,))
    return AffineMap(np.diag(s))


def shift_affine(shift: np.ndarray, width: int) -> AffineMap:
    """``y = x + t`` along the last axis as a map: ``W = I``, ``b = t``."""
    return AffineMap(np.eye(width), np.broadcast_to(_f64(shift).reshape(-1), (width,)).copy())


def plan_segments(
    widths: Sequence[int], policy: Policy = "cost", *, alone: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Partition a chain of ``len(widths) - 1`` ops into merged segments ``[start, stop)``.

    ``policy="always"`` merges the whole chain. ``policy="cost"`` minimises the total
    multiply-adds per row, ``sum(widths[i] * widths[j])`` over segments, with a dynamic program
    over split points (O(k log k), see :class:`_LowerEnvelope`); ties go to fewer segments, i.e.
    fewer ops, then to the earlier split. ``alone[i]`` is the
    cost of op ``i`` left as it is, when that is not ``widths[i] * widths[i + 1]`` (a diagonal
    scale costs its width).
    """
    k = len(widths) - 1
    if k < 1:
        raise ValueError("a chain needs at least one op (two widths)")
    check_policy(policy)
    if policy == "always":
        return [(0, k)]
    # One integer orders (macs, segments, split point) as the tuples would: ties prefer fewer
    # segments, then the earlier split. best[j] is that key for the ops [0, j).
    scale_count, scale_split = k + 1, k + 1
    best = [0] * (k + 1)
    split = [0] * (k + 1)
    hull = _LowerEnvelope(sorted(set(widths)))
    for j in range(1, k + 1):
        if j >= 2:  # a merged segment [i, j) costs widths[i] * widths[j]: a line in widths[j]
            i = j - 2
            hull.add(
                widths[i] * scale_count * scale_split,
                (best[i] + 1) * scale_split + i,
            )
        alone_cost = _segment_cost(widths, alone, j - 1, j)
        key = (best[j - 1] + alone_cost * scale_count + 1) * scale_split + (j - 1)
        if j >= 2:
            key = min(key, hull.query(widths[j]))
        best[j], split[j] = key // scale_split, key % scale_split
    segments = []
    j = k
    while j > 0:
        segments.append((split[j], j))
        j = split[j]
    return segments[::-1]


class _LowerEnvelope:
    """Minimum of lines ``a * x + b`` at given points ``xs`` (a Li Chao tree): O(log n) each.

    The cost model's dynamic program asks, for every op ``j``, the cheapest earlier split ``i``
    of ``best[i] + widths[i] * widths[j]``: a line in ``widths[j]`` per ``i``, so a chain of
    ``k`` ops is planned in O(k log k) instead of O(k^2).
    """

    def __init__(self, xs: Sequence[int]) -> None:
        self.xs = list(xs)
        self.lines: list[tuple[int, int] | None] = [None] * (4 * max(len(self.xs), 1))

    def add(self, a: int, b: int) -> None:
        line, node, lo, hi = (a, b), 1, 0, len(self.xs) - 1
        while True:
            current = self.lines[node]
            if current is None:
                self.lines[node] = line
                return
            mid = (lo + hi) // 2
            better_lo = _at(line, self.xs[lo]) < _at(current, self.xs[lo])
            better_mid = _at(line, self.xs[mid]) < _at(current, self.xs[mid])
            if better_mid:  # the node keeps the line that is lower at mid; the other goes down
                self.lines[node], line = line, current
            if lo == hi:
                return
            if better_lo != better_mid:  # they cross left of mid
                node, hi = 2 * node, mid
            else:
                node, lo = 2 * node + 1, mid + 1

    def query(self, x: int) -> int:
        node, lo, hi = 1, 0, len(self.xs) - 1
        best: int | None = None
        while True:
            line = self.lines[node]
            if line is not None:
                value = _at(line, x)
                best = value if best is None else min(best, value)
            if lo == hi:
                break
            mid = (lo + hi) // 2
            node, lo, hi = (2 * node, lo, mid) if x <= self.xs[mid] else (2 * node + 1, mid + 1, hi)
        assert best is not None
        return best


def _at(line: tuple[int, int], x: int) -> int:
    return line[0] * x + line[1]


def _segment_cost(widths: Sequence[int], alone: Sequence[int] | None, i: int, j: int) -> int:
    if j - i == 1 and alone is not None:
        return alone[i]
    return widths[i] * widths[j]


def segments_macs(
    widths: Sequence[int],
    segments: Sequence[tuple[int, int]],
    *,
    alone: Sequence[int] | None = None,
) -> int:
    """Multiply-adds per row of the chain when ``segments`` are each merged into one op."""
    return sum(_segment_cost(widths, alone, i, j) for i, j in segments)


def repeated_row(array: np.ndarray, leading: int) -> np.ndarray | None:
    """The one block ``array`` repeats along its first ``leading`` elements' worth of rows
    (``array.reshape(leading, -1)``'s rows all equal), as a copy; None when the rows differ."""
    rows = np.asarray(array).reshape(leading, -1)
    if not np.array_equal(rows, np.broadcast_to(rows[:1], rows.shape)):
        return None
    return rows[0].copy()
