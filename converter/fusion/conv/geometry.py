"""The geometry of re-parameterising convolutions: what a merge is decided from, no weights.

A :class:`ConvGeometry` is an ONNX ``Conv`` without its weights (pure Python, no graph types).
Along one spatial axis, with stride ``s``, dilation ``d``, kernel ``k`` and pads ``pb`` (begin),
``pe`` (end), the output of an input of length ``L`` has length::

    len(y)  = floor((L + pb + pe - d*(k-1) - 1) / s) + 1

Every merge is planned here first (``plan_*``: the merged geometry, or a
:class:`~converter.fusion.core.declined.Declined` with a readable reason); the weights are
multiplied after, by :mod:`converter.fusion.conv.algebra`.

Parallel convs of one input summed (:func:`plan_add`) are one conv when strides agree, dilations
agree on every axis where both kernels are wider than 1, and the outputs have the same size for
every input size, i.e. ``M = pb + pe - d*(k-1)`` is equal; the merged conv has pads ``max(pb)``,
``max(pe)``, kernel ``K = (max(pb) + max(pe) - M) / d + 1`` and groups the gcd of the counts.

Sequential convs (:func:`plan_compose`, ``second(first(x))``, no non-linearity between) compose
into a conv of stride ``s1*s2``, pads ``pb1 + s1*pb2`` and ``pe1 + s1*pe2``, taps at
``j2*d2*s1 + j1*d1`` (dilation ``D`` = gcd of the tap steps of the axes wider than 1, kernel
``(k2-1)*d2*s1/D + (k1-1)*d1/D + 1``) and groups ``gcd(G1, G2)``. This is exact where the first
output zero-extended by the second conv's padding equals the first conv evaluated past its
output; that holds when the second conv is unpadded, or when the first bias is zero and the first
conv's window past each padded border lies wholly in the input's zeros:
``(k1-1)*d1 <= pb1 + s1 - 1`` at the begin, ``(k1-1)*d1 <= pe1`` at the end (a 1x1 unpadded
first conv always qualifies). Otherwise the merge is refused.

Cost: multiply-adds per output position, ``O * I/groups * prod(k)``; a chain counts each conv
at its own positions, ``prod(strides)`` of the later convs as many per final output position
(:func:`chain_macs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from converter.fusion.core.declined import Declined

__all__ = [
    "ConvGeometry",
    "as_ints",
    "kernel_str",
    "chain_macs",
    "plan_add",
    "plan_compose",
    "resolve_auto_pad",
]


def as_ints(values: Sequence[int] | None, rank: int, default: int, name: str) -> tuple[int, ...]:
    if values is None:
        return (default,) * rank
    out = tuple(int(v) for v in values)
    if len(out) != rank:
        raise ValueError(f"{name} {list(out)} needs {rank} values")
    return out


def kernel_str(kernel: Sequence[int]) -> str:
    return "x".join(str(k) for k in kernel)


@dataclass(frozen=True)
class ConvGeometry:
    """The shape of a Conv without its weights: what a merge can be decided from.

    ``pads`` are in ONNX order: all begins, then all ends. ``in_channels`` is the full input
    channel count (the weight holds ``in_channels / groups`` per output channel).
    """

    out_channels: int
    in_channels: int
    kernel_shape: tuple[int, ...]
    groups: int = 1
    strides: tuple[int, ...] | None = None
    dilations: tuple[int, ...] | None = None
    pads: tuple[int, ...] | None = None
    has_bias: bool = False

    def __post_init__(self) -> None:
        rank = len(self.kernel_shape)
        object.__setattr__(self, "kernel_shape", as_ints(self.kernel_shape, rank, 1, "kernel"))
        object.__setattr__(self, "strides", as_ints(self.strides, rank, 1, "strides"))
        object.__setattr__(self, "dilations", as_ints(self.dilations, rank, 1, "dilations"))
        object.__setattr__(self, "pads", as_ints(self.pads, 2 * rank, 0, "pads"))
        g = self.groups
        if rank < 1 or min(self.kernel_shape + self.strides + self.dilations) < 1:
            raise ValueError(f"invalid conv geometry {self}")
        if min(self.pads) < 0 or g < 1 or self.out_channels % g or self.in_channels % g:
            raise ValueError(f"invalid conv geometry {self}")

    @property
    def rank(self) -> int:
        """Number of spatial axes (1 for Conv1d, 2 for Conv2d, ...)."""
        return len(self.kernel_shape)

    @property
    def macs_per_position(self) -> int:
        """Multiply-adds per output position: ``O * I/groups * prod(kernel)``."""
        return self.out_channels * self.in_channels // self.groups * math.prod(self.kernel_shape)

    @property
    def params(self) -> int:
        """Weight elements plus bias elements."""
        return self.macs_per_position + (self.out_channels if self.has_bias else 0)

    def output_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Output spatial size for an input of spatial size ``spatial``."""
        r = self.rank
        return tuple(
            (
                n
                + self.pads[i]
                + self.pads[r + i]
                - self.dilations[i] * (self.kernel_shape[i] - 1)
                - 1
            )
            // self.strides[i]
            + 1
            for i, n in enumerate(spatial)
        )

    def describe(self) -> str:
        """A short label for reasons: ``3x3 conv 16->32 (groups 1, strides 1x1, pads [1, 1, 1, 1])``."""
        extra = f", dilations {kernel_str(self.dilations)}" if max(self.dilations) > 1 else ""
        return (
            f"{kernel_str(self.kernel_shape)} conv {self.in_channels}->{self.out_channels} (groups "
            f"{self.groups}, strides {kernel_str(self.strides)}{extra}, pads {list(self.pads)})"
        )


def resolve_auto_pad(
    auto_pad: str,
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    input_spatial: Sequence[int] | None = None,
) -> tuple[int, ...] | Declined:
    """Explicit ONNX pads for ``auto_pad`` ``VALID``, ``SAME_UPPER`` or ``SAME_LOWER``.

    SAME pads ``(ceil(L/s) - 1)*s + (k-1)*d + 1 - L`` in total, the odd one at the end (UPPER) or
    the begin (LOWER); with stride 1 that is ``(k-1)*d`` for every input size, otherwise it
    depends on ``L`` and needs ``input_spatial``. ``NOTSET`` is not resolved here (use ``pads``).
    """
    rank = len(kernel_shape)
    strides = as_ints(strides, rank, 1, "strides")
    dilations = as_ints(dilations, rank, 1, "dilations")
    if auto_pad == "VALID":
        return (0,) * (2 * rank)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"unknown auto_pad {auto_pad!r}")
    if input_spatial is None and max(strides) > 1:
        return Declined.because(
            f"auto_pad {auto_pad} with strides {kernel_str(strides)} pads by an amount that depends "
            "on the input size, which is not known"
        )
    begins, ends = [], []
    for i, (k, s, d) in enumerate(zip(kernel_shape, strides, dilations, strict=True)):
        n = 0 if input_spatial is None else int(input_spatial[i])
        total = (k - 1) * d if s == 1 else max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return tuple(begins + ends)


def _plan_add_pair(a: ConvGeometry, b: ConvGeometry) -> ConvGeometry | Declined:
    if (a.rank, a.in_channels, a.out_channels) != (b.rank, b.in_channels, b.out_channels):
        return Declined.because(
            f"the branches have different shapes: {a.describe()} and {b.describe()}"
        )
    if a.strides != b.strides:
        return Declined.because(
            f"the branches have different strides: {a.describe()} and {b.describe()}"
        )
    r = a.rank
    kernel, dilations, begins, ends = [], [], [], []
    for i in range(r):
        ka, kb = a.kernel_shape[i], b.kernel_shape[i]
        da, db = a.dilations[i], b.dilations[i]
        if ka > 1 and kb > 1 and da != db:
            return Declined.because(
                f"the branches have different dilations: {a.describe()} and {b.describe()}"
            )
        d = da if ka > 1 else db if kb > 1 else 1  # a 1-wide kernel has no dilation
        span_a = a.pads[i] + a.pads[r + i] - d * (ka - 1)
        if span_a != b.pads[i] + b.pads[r + i] - d * (kb - 1):
            return Declined.because(
                f"the branches' outputs differ in size along spatial axis {i}: {a.describe()} "
                f"and {b.describe()}"
            )
        if (a.pads[i] - b.pads[i]) % d:
            return Declined.because(
                f"the branches' windows are offset by {a.pads[i] - b.pads[i]} along spatial axis "
                f"{i}, not a multiple of the dilation {d}"
            )
        begins.append(max(a.pads[i], b.pads[i]))
        ends.append(max(a.pads[r + i], b.pads[r + i]))
        kernel.append((begins[-1] + ends[-1] - span_a) // d + 1)
        dilations.append(d)
    return ConvGeometry(
        out_channels=a.out_channels,
        in_channels=a.in_channels,
        kernel_shape=tuple(kernel),
        groups=math.gcd(a.groups, b.groups),
        strides=a.strides,
        dilations=tuple(dilations),
        pads=tuple(begins + ends),
        has_bias=a.has_bias or b.has_bias,
    )


def plan_add(*branches: ConvGeometry) -> ConvGeometry | Declined:
    """The geometry of the conv equal to the sum of parallel ``branches`` (same input), or why not.

    Strides must be equal, dilations equal where both kernels are wider than 1, and output sizes
    equal for every input size; the merged conv's pads are the largest begin and end pads, its
    kernel the smallest that holds every branch, its groups the gcd of the group counts.
    """
    if not branches:
        raise ValueError("plan_add needs at least one branch")
    merged = branches[0]
    for branch in branches[1:]:
        merged = _plan_add_pair(merged, branch)
        if isinstance(merged, Declined):
            return merged
    return merged


def _compose_padding_reason(
    first: ConvGeometry, second: ConvGeometry, first_bias: np.ndarray | None
) -> str | None:
    """Why ``second``'s zero padding is not what ``first`` would compute there, or None."""
    r = first.rank
    if not any(second.pads):
        return None
    unknown = first.has_bias and first_bias is None  # a bias whose values we were not shown
    if unknown or (first_bias is not None and np.any(first_bias)):
        return (
            f"the first conv's bias meets the second conv's zero padding (pads "
            f"{list(second.pads)}): a bias pushed through zero padding becomes non-uniform at "
            "the borders; exact only when the first bias is zero or the second conv has no padding"
        )
    for i in range(r):
        reach = (first.kernel_shape[i] - 1) * first.dilations[i]
        if (second.pads[i] and reach > first.pads[i] + first.strides[i] - 1) or (
            second.pads[r + i] and reach > first.pads[r + i]
        ):
            return (
                f"the second conv pads with zeros along spatial axis {i} where the first conv "
                f"({first.describe()}) would still read the input: only a second conv without "
                "padding, or a first conv whose window past the border sees only zeros, composes"
            )
    return None


def plan_compose(
    first: ConvGeometry, second: ConvGeometry, *, first_bias: np.ndarray | None = None
) -> ConvGeometry | Declined:
    """The geometry of the conv equal to ``second(first(x))``, or why there is none.

    Stride ``s1*s2``, pads ``pb1 + s1*pb2`` / ``pe1 + s1*pe2``, groups ``gcd(G1, G2)``, taps
    ``j2*d2*s1 + j1*d1`` (see the module docstring). ``first_bias`` (the values, when the first
    conv has a bias) decides whether a padded second conv composes; a first conv with
    ``has_bias`` and no ``first_bias`` given counts as having a nonzero bias.
    """
    if first.rank != second.rank or first.out_channels != second.in_channels:
        raise ValueError(f"{second.describe()} cannot follow {first.describe()}")
    reason = _compose_padding_reason(first, second, first_bias)
    if reason:
        return Declined.because(reason)
    kernel, dilations = [], []
    for i in range(first.rank):
        s1 = first.strides[i]
        reach1 = (first.kernel_shape[i] - 1) * first.dilations[i]
        reach2 = (second.kernel_shape[i] - 1) * second.dilations[i] * s1
        step = math.gcd(
            first.dilations[i] if reach1 else 0, second.dilations[i] * s1 if reach2 else 0
        )
        step = step or 1
        kernel.append((reach1 + reach2) // step + 1)
        dilations.append(step)
    r, s1 = first.rank, first.strides
    pads = tuple(first.pads[i] + s1[i % r] * second.pads[i] for i in range(2 * r))
    return ConvGeometry(
        out_channels=second.out_channels,
        in_channels=first.in_channels,
        kernel_shape=tuple(kernel),
        groups=math.gcd(first.groups, second.groups),
        strides=tuple(a * b for a, b in zip(s1, second.strides, strict=True)),
        dilations=tuple(dilations),
        pads=pads,
        has_bias=first.has_bias or second.has_bias,
    )


def chain_macs(chain: Sequence[ConvGeometry]) -> int:
    """Multiply-adds per output position of the last conv of a sequential ``chain``.

    Each conv runs at its own output positions, ``prod(strides)`` of every later conv as many
    (border effects of padding ignored: exact for stride 1 with size-preserving pads).
    """
    total, positions = 0, 1
    for conv in reversed(chain):
        total += conv.macs_per_position * positions
        positions *= math.prod(conv.strides)
    return total
