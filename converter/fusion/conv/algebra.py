"""The algebra of re-parameterising convolutions: pure numpy, float64, no graph types.

A :class:`ConvMap` is an ONNX ``Conv`` with constant weight and bias (cross-correlation, NCHW
and any spatial rank). Along one spatial axis, with stride ``s``, dilation ``d``, kernel ``k``
and pads ``pb`` (begin), ``pe`` (end), and ``x~`` the input extended by zeros on both sides::

    y[o, p] = b[o] + sum_{c in group(o), j < k} W[o, c, j] * x~[c, p*s + j*d - pb]
    len(y)  = floor((L + pb + pe - d*(k-1) - 1) / s) + 1

Everything here is exact in real arithmetic; what is not is refused with a :class:`Declined`
carrying a readable reason. Shapes are checked first (``plan_*`` decide from a
:class:`ConvGeometry` alone), weights are multiplied after. Results stay float64: the engine
rounds once to the model's dtype.

Channel affines (``s``, ``t`` per channel; BatchNormalization is ``s = gamma / sqrt(var + eps)``,
``t = beta - mean * s``)::

    scale_out:  s * conv(x) + t        W' = W * s[o],          b' = b * s + t
    affine_in:  conv(x * s + t)        W' = W * s[c],          b' = b + sum_{c,j} W[o,c,j] t[c]

The input shift folds only into an unpadded conv: the padding contributes zeros, not ``t``.

Embedding a kernel in a larger one (``pad_kernel``): a kernel placed ``off`` taps into the larger
kernel reads the same input when its begin pad grows by ``d * off`` and its end pad by
``d * (K - k - off)`` (centred: ``off = (K - k) / 2``). An identity is a delta kernel at the tap
``off = pb / d`` (a lone per-channel affine: a delta scaled by ``s`` with bias ``t``). A conv
with ``G`` groups is a conv with ``g`` groups when ``g`` divides ``G``: its weight becomes
block-diagonal inside each of the ``g`` groups (``to_groups``).

Parallel convs of one input summed (``add_convs``) are one conv when strides agree, dilations
agree on every axis where both kernels are wider than 1, and the outputs have the same size for
every input size, i.e. ``M = pb + pe - d*(k-1)`` is equal; the merged conv has pads
``max(pb)``, ``max(pe)``, kernel ``K = (max(pb) + max(pe) - M) / d + 1``, groups the gcd of the
group counts, ``W = sum W_i`` (each embedded) and ``b = sum b_i``.

Sequential convs (``compose``, ``second(first(x))``, no non-linearity between)::

    y2[q] = b2 + sum_j2 W2[j2] y1~[q*s2 + j2*d2 - pb2]
          = b2' + sum_{j1, j2} W2[j2] W1[j1] x~[q*s1*s2 + j2*d2*s1 + j1*d1 - (pb1 + s1*pb2)]

so the composed conv has stride ``s1*s2``, pads ``pb1 + s1*pb2`` and ``pe1 + s1*pe2``, taps at
``j2*d2*s1 + j1*d1`` (dilation ``D`` = gcd of the tap steps of the axes wider than 1, kernel
``(k2-1)*d2*s1/D + (k1-1)*d1/D + 1``), groups ``gcd(G1, G2)``, and
``b2' = b2 + sum_{m, j2} W2[o, m, j2] b1[m]``. This is exact where ``y1~`` (the first output
zero-extended by the second conv's padding) equals the first conv evaluated past its output;
that holds when the second conv is unpadded, or when the first bias is zero and the first conv's
window past each padded border lies wholly in the input's zeros:
``(k1-1)*d1 <= pb1 + s1 - 1`` at the begin, ``(k1-1)*d1 <= pe1`` at the end (a 1x1 unpadded
first conv always qualifies). Otherwise the merge is refused.

Cost: multiply-adds per output position, ``O * I/groups * prod(k)``; a chain counts each conv
at its own positions, ``prod(strides)`` of the later convs as many per final output position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from converter.fusion.core.declined import Declined

__all__ = [
    "ConvGeometry",
    "ConvMap",
    "MergeCost",
    "bn_affine",
    "resolve_auto_pad",
    "scale_out",
    "affine_in",
    "pad_kernel",
    "identity_conv",
    "to_groups",
    "plan_add",
    "add_convs",
    "plan_compose",
    "compose",
    "chain_macs",
    "add_cost",
    "compose_cost",
]


def _ints(values: Sequence[int] | None, rank: int, default: int, name: str) -> tuple[int, ...]:
    if values is None:
        return (default,) * rank
    out = tuple(int(v) for v in values)
    if len(out) != rank:
        raise ValueError(f"{name} {list(out)} needs {rank} values")
    return out


def _kstr(kernel: Sequence[int]) -> str:
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
        object.__setattr__(self, "kernel_shape", _ints(self.kernel_shape, rank, 1, "kernel"))
        object.__setattr__(self, "strides", _ints(self.strides, rank, 1, "strides"))
        object.__setattr__(self, "dilations", _ints(self.dilations, rank, 1, "dilations"))
        object.__setattr__(self, "pads", _ints(self.pads, 2 * rank, 0, "pads"))
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
        extra = f", dilations {_kstr(self.dilations)}" if max(self.dilations) > 1 else ""
        return (
            f"{_kstr(self.kernel_shape)} conv {self.in_channels}->{self.out_channels} (groups "
            f"{self.groups}, strides {_kstr(self.strides)}{extra}, pads {list(self.pads)})"
        )


@dataclass(frozen=True, eq=False)
class ConvMap:
    """An ONNX Conv with constant weights, in float64.

    ``weight`` is ``(O, I/groups, *kernel)``, ``bias`` ``(O,)`` or None; ``strides``,
    ``dilations`` default to 1 and ``pads`` (begins, then ends) to 0, as in ONNX.
    """

    weight: np.ndarray
    bias: np.ndarray | None = None
    groups: int = 1
    strides: tuple[int, ...] | None = None
    dilations: tuple[int, ...] | None = None
    pads: tuple[int, ...] | None = None
    geometry: ConvGeometry = field(init=False, repr=False)

    def __post_init__(self) -> None:
        weight = np.asarray(self.weight, dtype=np.float64)
        if weight.ndim < 3:
            raise ValueError(f"conv weight must be (O, I/groups, *kernel), got {weight.shape}")
        bias = None if self.bias is None else np.asarray(self.bias, dtype=np.float64)
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"bias of shape {bias.shape} does not match {weight.shape[0]} outputs")
        geometry = ConvGeometry(
            out_channels=weight.shape[0],
            in_channels=weight.shape[1] * int(self.groups),
            kernel_shape=tuple(weight.shape[2:]),
            groups=int(self.groups),
            strides=self.strides,
            dilations=self.dilations,
            pads=self.pads,
            has_bias=bias is not None,
        )
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "groups", geometry.groups)
        for name in ("strides", "dilations", "pads"):
            object.__setattr__(self, name, getattr(geometry, name))
        object.__setattr__(self, "geometry", geometry)

    @property
    def rank(self) -> int:
        return self.geometry.rank

    @property
    def in_channels(self) -> int:
        return self.geometry.in_channels

    @property
    def out_channels(self) -> int:
        return self.geometry.out_channels

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.geometry.kernel_shape

    @property
    def macs_per_position(self) -> int:
        return self.geometry.macs_per_position

    @property
    def params(self) -> int:
        return self.geometry.params

    def _with(self, weight: np.ndarray, bias: np.ndarray | None, **attrs) -> ConvMap:
        return replace(self, weight=weight, bias=bias, **attrs)


def bn_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as ``y = x * s + t``: ``s = gamma / sqrt(var + eps)``,
    ``t = beta - mean * s`` (float64, per channel)."""
    s = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
    return s, np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * s


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
    strides = _ints(strides, rank, 1, "strides")
    dilations = _ints(dilations, rank, 1, "dilations")
    if auto_pad == "VALID":
        return (0,) * (2 * rank)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"unknown auto_pad {auto_pad!r}")
    if input_spatial is None and max(strides) > 1:
        return Declined.because(
            f"auto_pad {auto_pad} with strides {_kstr(strides)} pads by an amount that depends "
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


def _channel_vector(value: np.ndarray | float, n: int, name: str) -> np.ndarray:
    """``value`` (a scalar, ``(n,)``, or ``(1, n, 1, ...)``) as a float64 ``(n,)`` vector."""
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    if v.size not in (1, n):
        raise ValueError(f"{name} of {v.size} values does not match {n} channels")
    return np.broadcast_to(v, (n,))


def _per_output(conv: ConvMap, v: np.ndarray) -> np.ndarray:
    """An input-channel vector laid out like the weight's first two axes: ``(O, I/groups)``."""
    g, cg = conv.groups, conv.weight.shape[1]
    return np.repeat(v.reshape(g, cg), conv.out_channels // g, axis=0)


def _spatial(a: np.ndarray, rank: int) -> np.ndarray:
    return a.reshape(a.shape + (1,) * rank)


def scale_out(
    conv: ConvMap, scale: np.ndarray | float | None = None, shift: np.ndarray | float | None = None
) -> ConvMap:
    """``conv(x) * scale + shift`` per output channel, e.g. a BatchNormalization after the conv.

    ``W' = W * s[o]``, ``b' = b * s + t``. Always exact.
    """
    n = conv.out_channels
    weight, bias = conv.weight, conv.bias
    if scale is not None:
        s = _channel_vector(scale, n, "scale")
        weight = weight * _spatial(s, conv.rank + 1)
        bias = None if bias is None else bias * s
    if shift is not None:
        t = _channel_vector(shift, n, "shift")
        bias = t.copy() if bias is None else bias + t
    return conv._with(weight, bias)


def affine_in(
    conv: ConvMap, scale: np.ndarray | float | None = None, shift: np.ndarray | float | None = None
) -> ConvMap | Declined:
    """``conv(x * scale + shift)`` per input channel, e.g. a BatchNormalization before the conv.

    ``W' = W * s[c]`` always folds. The shift adds ``sum_{c,j} W[o,c,j] * t[c]`` to the bias,
    which is exact only when the conv has no padding (the padding contributes zeros, not the
    shift); a nonzero shift before a padded conv is refused.
    """
    n = conv.in_channels
    t = None if shift is None else _channel_vector(shift, n, "shift")
    if t is not None and not np.any(t):
        t = None
    if t is not None and any(conv.pads):
        return Declined.because(
            f"a shift before a Conv with pads {list(conv.pads)} does not fold: the padding "
            "contributes zeros, not the shift"
        )
    bias = conv.bias
    if t is not None:
        spatial_sum = conv.weight.reshape((*conv.weight.shape[:2], -1)).sum(axis=2)
        shift_out = np.sum(spatial_sum * _per_output(conv, t), axis=1)
        bias = shift_out if bias is None else bias + shift_out
    weight = conv.weight
    if scale is not None:
        s = _per_output(conv, _channel_vector(scale, n, "scale"))
        weight = weight * _spatial(s, conv.rank)
    return conv._with(weight, bias)


def _embed_offsets(
    conv: ConvGeometry, kernel_shape: Sequence[int], pads: Sequence[int], dilations: Sequence[int]
) -> list[int] | Declined:
    """Per axis, the tap at which ``conv``'s kernel sits inside ``kernel_shape``, or why none does."""
    r = conv.rank
    offsets = []
    for i in range(r):
        k, big, d = conv.kernel_shape[i], kernel_shape[i], dilations[i]
        grow_b, grow_e = pads[i] - conv.pads[i], pads[r + i] - conv.pads[r + i]
        why = None
        if k > 1 and d != conv.dilations[i]:
            why = f"along spatial axis {i} the dilations differ ({conv.dilations[i]} vs {d})"
        elif (
            min(grow_b, grow_e) < 0 or grow_b % d or grow_e % d or (grow_b + grow_e) // d != big - k
        ):
            why = (
                f"along spatial axis {i} the pads must grow by the zeros added on each side "
                f"(dilation {d} x ({big} - {k}) in all, the size difference / 2 on each side "
                "when centred)"
            )
        if why:
            return Declined.because(
                f"a {_kstr(conv.kernel_shape)} kernel with pads {list(conv.pads)} does not embed "
                f"in a {_kstr(kernel_shape)} kernel with pads {list(pads)}: {why}"
            )
        offsets.append(grow_b // d)
    return offsets


def pad_kernel(
    conv: ConvMap,
    kernel_shape: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int] | None = None,
) -> ConvMap | Declined:
    """The same conv with its kernel zero-padded to ``kernel_shape`` and the given ONNX ``pads``.

    Along each axis the kernel is placed ``off`` taps in, where the begin pad grows by
    ``d * off`` and the end pad by ``d * (K - k - off)``: a centred 1x3 kernel with pads
    ``[0, 1, 0, 1]`` goes into a 3x3 kernel with pads ``[1, 1, 1, 1]``. ``dilations`` (default:
    the conv's) may differ from the conv's only on axes where its kernel is 1 wide.
    """
    r = conv.rank
    kernel_shape = _ints(kernel_shape, r, 1, "kernel_shape")
    pads = _ints(pads, 2 * r, 0, "pads")
    dilations = _ints(dilations, r, 1, "dilations") if dilations is not None else conv.dilations
    offsets = _embed_offsets(conv.geometry, kernel_shape, pads, dilations)
    if isinstance(offsets, Declined):
        return offsets
    weight = np.zeros(conv.weight.shape[:2] + kernel_shape)
    window = tuple(slice(o, o + k) for o, k in zip(offsets, conv.kernel_shape, strict=True))
    weight[(slice(None), slice(None), *window)] = conv.weight
    return conv._with(weight, conv.bias, pads=pads, dilations=dilations)


def identity_conv(
    channels: int,
    kernel_shape: Sequence[int],
    *,
    groups: int | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    scale: np.ndarray | float | None = None,
    shift: np.ndarray | float | None = None,
) -> ConvMap | Declined:
    """``y = x * scale + shift`` per channel (default ``y = x``) as a stride-1 delta-kernel conv.

    ``groups`` defaults to ``channels`` (depthwise, the smallest weight); any divisor of
    ``channels`` gives the delta in each group's block. ``pads`` default to the centre, which an
    even kernel does not have; given pads must keep the size: the delta sits at tap ``pb / d``
    and ``pb + pe = d * (k - 1)``. ``identity_conv(C, (1, 1))`` is the cheapest identity; pass it
    to :func:`add_convs` to merge a residual or BatchNorm branch.
    """
    rank = len(kernel_shape)
    kernel_shape = _ints(kernel_shape, rank, 1, "kernel_shape")
    dilations = _ints(dilations, rank, 1, "dilations")
    groups = channels if groups is None else int(groups)
    spans = [(k - 1) * d for k, d in zip(kernel_shape, dilations, strict=True)]
    if pads is None:
        if any(span % 2 for span in spans):
            return Declined.because(f"a {_kstr(kernel_shape)} kernel has no centre for an identity")
        pads = tuple(span // 2 for span in spans) * 2
    pads = _ints(pads, 2 * rank, 0, "pads")
    for i, (span, d) in enumerate(zip(spans, dilations, strict=True)):
        if pads[i] % d or pads[i] + pads[rank + i] != span or min(pads[i], pads[rank + i]) < 0:
            return Declined.because(
                f"pads {list(pads)} do not keep the size of a {_kstr(kernel_shape)} identity along "
                f"spatial axis {i} (begin a multiple of the dilation {d}, begin + end = {span})"
            )
    s = _channel_vector(1.0 if scale is None else scale, channels, "scale")
    cg = channels // groups
    weight = np.zeros((channels, cg, *kernel_shape))
    taps = tuple(p // d for p, d in zip(pads[:rank], dilations, strict=True))
    weight[(np.arange(channels), np.arange(channels) % cg, *taps)] = s
    bias = None if shift is None else _channel_vector(shift, channels, "shift").copy()
    return ConvMap(weight, bias, groups, None, dilations, pads)


def to_groups(conv: ConvMap, groups: int) -> ConvMap | Declined:
    """The same conv written with fewer groups (``groups`` must divide ``conv.groups``).

    Each old group's weight becomes a diagonal block inside the new group that contains it, e.g.
    a depthwise conv (``groups = C``) as a dense conv (``groups = 1``) with a diagonal weight.
    """
    old = conv.groups
    if groups == old:
        return conv
    if groups < 1 or old % groups:
        return Declined.because(
            f"a Conv with {old} groups is not expressible with {groups} groups "
            f"({groups} must divide {old})"
        )
    m, og, cg = old // groups, conv.out_channels // old, conv.weight.shape[1]
    blocks = conv.weight.reshape((groups, m, og, cg, *conv.kernel_shape))
    weight = np.zeros((groups, m, og, m, cg, *conv.kernel_shape))
    for i in range(m):
        weight[:, i, :, i] = blocks[:, i]
    weight = weight.reshape((conv.out_channels, m * cg, *conv.kernel_shape))
    return conv._with(weight, conv.bias, groups=groups)


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


def add_convs(*branches: ConvMap) -> ConvMap | Declined:
    """The conv equal to ``sum(branch(x) for branch in branches)``, or why there is none.

    Each branch is embedded into :func:`plan_add`'s kernel, pads and dilations
    (:func:`pad_kernel`) and group count (:func:`to_groups`); then ``W = sum W_i``,
    ``b = sum b_i`` (None when no branch has a bias).
    """
    plan = plan_add(*(b.geometry for b in branches))
    if isinstance(plan, Declined):
        return plan
    weight, bias = (
        np.zeros((plan.out_channels, plan.in_channels // plan.groups, *plan.kernel_shape)),
        None,
    )
    for branch in branches:
        embedded = pad_kernel(branch, plan.kernel_shape, plan.pads, plan.dilations)
        embedded = to_groups(embedded, plan.groups)
        assert isinstance(embedded, ConvMap), embedded  # plan_add checked both conditions
        weight += embedded.weight
        if branch.bias is not None:
            bias = branch.bias.copy() if bias is None else bias + branch.bias
    return ConvMap(weight, bias, plan.groups, plan.strides, plan.dilations, plan.pads)


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


def compose(first: ConvMap, second: ConvMap) -> ConvMap | Declined:
    """The conv equal to ``second(first(x))`` with nothing between them, or why there is none.

    Exact whenever :func:`plan_compose` agrees: ``kxk`` then ``1x1`` always; ``1x1`` then
    ``kxk`` when the first bias is zero or the second is unpadded; a depthwise then a pointwise
    conv give a dense ``kxk`` conv (``groups = gcd``; ask :func:`compose_cost` first).
    """
    plan = plan_compose(first.geometry, second.geometry, first_bias=first.bias)
    if isinstance(plan, Declined):
        return plan
    g = plan.groups
    a, b = to_groups(first, g), to_groups(second, g)
    assert isinstance(a, ConvMap) and isinstance(b, ConvMap)  # g divides both group counts
    mg, cg, og = a.weight.shape[0] // g, a.weight.shape[1], b.weight.shape[0] // g
    w1 = a.weight.reshape((g, mg, -1))  # (g, mid/g, I/g * prod(k1))
    w2 = b.weight.reshape((g, og, mg, *b.kernel_shape))
    weight = np.zeros((g, og, cg, *plan.kernel_shape))
    # Tap steps in units of the merged dilation D (1-wide kernels have a single tap, any step).
    step1 = [
        d // D if k > 1 else 1
        for d, k, D in zip(a.dilations, a.kernel_shape, plan.dilations, strict=True)
    ]
    step2 = [d * s // D for d, s, D in zip(b.dilations, a.strides, plan.dilations, strict=True)]
    for tap in np.ndindex(*b.kernel_shape):
        window = tuple(
            slice(t * st2, t * st2 + (k - 1) * st1 + 1, st1)
            for t, st2, k, st1 in zip(tap, step2, a.kernel_shape, step1, strict=True)
        )
        product = np.matmul(w2[(..., *tap)], w1).reshape((g, og, cg, *a.kernel_shape))
        weight[(slice(None), slice(None), slice(None), *window)] += product
    bias = b.bias
    if a.bias is not None:
        through = np.matmul(w2.reshape((g, og, mg, -1)).sum(axis=3), a.bias.reshape((g, mg, 1)))
        bias = through.reshape(-1) if bias is None else bias + through.reshape(-1)
    weight = weight.reshape((plan.out_channels, cg, *plan.kernel_shape))
    return ConvMap(weight, bias, g, plan.strides, plan.dilations, plan.pads)


@dataclass(frozen=True)
class MergeCost:
    """Multiply-adds per output position of the merged conv, and parameters, before and after."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int


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


def add_cost(branches: Sequence[ConvGeometry], merged: ConvGeometry) -> MergeCost:
    """Cost of the parallel ``branches`` against the ``merged`` conv of :func:`plan_add`."""
    return MergeCost(
        sum(b.macs_per_position for b in branches),
        merged.macs_per_position,
        sum(b.params for b in branches),
        merged.params,
    )


def compose_cost(chain: Sequence[ConvGeometry], merged: ConvGeometry) -> MergeCost:
    """Cost of a sequential ``chain`` against the ``merged`` conv of :func:`plan_compose`."""
    return MergeCost(
        chain_macs(chain), merged.macs_per_position, sum(c.params for c in chain), merged.params
    )
