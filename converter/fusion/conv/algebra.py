"""The kernel arithmetic of re-parameterising convolutions: pure numpy, float64, no graph types.

A :class:`ConvMap` is an ONNX ``Conv`` with constant weight and bias (cross-correlation, NCHW
and any spatial rank); with ``x~`` the input extended by zeros on both sides::

    y[o, p] = b[o] + sum_{c in group(o), j < k} W[o, c, j] * x~[c, p*s + j*d - pb]

Everything here is exact in real arithmetic; what is not is refused with a
:class:`~converter.fusion.core.declined.Declined` carrying a readable reason. Each merge's
geometry is planned first (:mod:`converter.fusion.conv.geometry`), the weights multiplied here.
Results stay float64: the engine rounds once to the model's dtype.

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

Parallel convs summed (``add_convs``): each embedded in the planned kernel, pads and groups,
``W = sum W_i``, ``b = sum b_i``. Sequential convs (``compose``)::

    y2[q] = b2 + sum_j2 W2[j2] y1~[q*s2 + j2*d2 - pb2]
          = b2' + sum_{j1, j2} W2[j2] W1[j1] x~[q*s1*s2 + j2*d2*s1 + j1*d1 - (pb1 + s1*pb2)]

with ``b2' = b2 + sum_{m, j2} W2[o, m, j2] b1[m]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from converter.fusion.conv.geometry import ConvGeometry, as_ints, kernel_str, plan_add, plan_compose
from converter.fusion.core.declined import Declined

__all__ = [
    "ConvMap",
    "scale_out",
    "affine_in",
    "pad_kernel",
    "identity_conv",
    "to_groups",
    "add_convs",
    "compose",
]


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
                f"a {kernel_str(conv.kernel_shape)} kernel with pads {list(conv.pads)} does not embed "
                f"in a {kernel_str(kernel_shape)} kernel with pads {list(pads)}: {why}"
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
    kernel_shape = as_ints(kernel_shape, r, 1, "kernel_shape")
    pads = as_ints(pads, 2 * r, 0, "pads")
    dilations = as_ints(dilations, r, 1, "dilations") if dilations is not None else conv.dilations
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
    kernel_shape = as_ints(kernel_shape, rank, 1, "kernel_shape")
    dilations = as_ints(dilations, rank, 1, "dilations")
    groups = channels if groups is None else int(groups)
    spans = [(k - 1) * d for k, d in zip(kernel_shape, dilations, strict=True)]
    if pads is None:
        if any(span % 2 for span in spans):
            return Declined.because(
                f"a {kernel_str(kernel_shape)} kernel has no centre for an identity"
            )
        pads = tuple(span // 2 for span in spans) * 2
    pads = as_ints(pads, 2 * rank, 0, "pads")
    for i, (span, d) in enumerate(zip(spans, dilations, strict=True)):
        if pads[i] % d or pads[i] + pads[rank + i] != span or min(pads[i], pads[rank + i]) < 0:
            return Declined.because(
                f"pads {list(pads)} do not keep the size of a {kernel_str(kernel_shape)} identity along "
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


def compose(first: ConvMap, second: ConvMap) -> ConvMap | Declined:
    """The conv equal to ``second(first(x))`` with nothing between them, or why there is none.

    Exact whenever :func:`plan_compose` agrees: ``kxk`` then ``1x1`` always; ``1x1`` then
    ``kxk`` when the first bias is zero or the second is unpadded; a depthwise then a pointwise
    conv give a dense ``kxk`` conv (``groups = gcd``; the cost model decides first from the geometries).
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
