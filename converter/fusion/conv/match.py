"""What convolutions can merge with, read from the live graph: ``Conv`` ops, channel affines,
and the three shapes of merge :mod:`converter.fusion.conv.merge` makes.

A *conv op* is an ONNX ``Conv`` whose weight (and bias, if any) is constant
(:meth:`~converter.fusion.core.constants.Constants.usable`), in a float type, with ``auto_pad``
``NOTSET`` or resolvable to explicit pads (:func:`conv_algebra.resolve_auto_pad`: ``VALID``,
``SAME_*`` at stride 1, or at any stride when the input's spatial size is known).

A *channel affine* is ``y = x * s + t`` with ``s``, ``t`` per channel (axis 1) of an N-D tensor::

    BatchNormalization (inference)   s = gamma / sqrt(var + eps),  t = beta - mean * s
    Mul(x, c)  s = c       Div(x, c)  s = 1 / c       Neg(x)  s = -1
    Add(x, c)  t = c       Sub(x, c)  t = -c          Sub(c, x)  s = -1, t = c

with ``c`` a scalar or of a shape such as ``(1, C, 1, 1)`` or ``(C, 1, 1)`` (varying along axis 1
only, never raising the rank). A ``(C,)`` constant broadcasts along the *last* axis, so it is not
a channel affine on an N-D tensor.

Merges, each a :class:`ConvMerge` that names its nodes (the one computing the result last) and
where it reads its input ``x``:

- ``fold``: a conv then an affine (``scale_out``), or an affine then a conv (``affine_in``);
- ``sum``: a tree of ``Add``/``Sub``/``Sum`` whose leaves are convs of ``x``, ``x`` itself, or a
  channel affine of ``x`` (a scaled delta kernel), each feeding only the tree;
- ``compose``: a conv whose only consumer is another conv.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from converter.fusion.conv import algebra as ca
from converter.fusion.conv.geometry import ConvGeometry, resolve_auto_pad
from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.dtypes import FLOAT_TYPES
from converter.fusion.core.graph import is_onnx
from converter.fusion.core.steps import batch_norm_params, bn_affine, constant_step

__all__ = [
    "ConvOp",
    "ChannelAffine",
    "Term",
    "recognize_conv",
    "recognize_affine",
    "AFFINE_OPS",
]

AFFINE_OPS = frozenset({"BatchNormalization", "Mul", "Div", "Add", "Sub", "Neg"})


def _name(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


@dataclass
class ConvOp:
    """A Conv with constant weights: its node, geometry and constants (weights read on demand)."""

    node: ir.Node
    geometry: ConvGeometry
    weight: Constant
    bias: Constant | None
    dtype: ir.DataType

    @property
    def input(self) -> ir.Value | None:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def constants(self) -> list[Constant]:
        return [c for c in (self.weight, self.bias) if c is not None]

    def conv_map(self) -> ca.ConvMap:
        """The conv in float64 (reads the weight)."""
        g = self.geometry
        bias = None if self.bias is None else self.bias.array().reshape(-1)
        return ca.ConvMap(self.weight.array(), bias, g.groups, g.strides, g.dilations, g.pads)


@dataclass
class ChannelAffine:
    """``y = x * s + t`` per channel of the data input ``node.inputs[data_index]``."""

    node: ir.Node
    data_index: int
    constants: list[Constant]
    has_shift: bool
    vectors: Callable[[int], tuple[np.ndarray | None, np.ndarray | None]]
    # The nodes after ``node`` that the affine is made of (composed steps and a Transpose),
    # removed with it; it then reads the sum's input through a twin of that Transpose.
    more: list[ir.Node] = field(default_factory=list)

    @property
    def data(self) -> ir.Value | None:
        return self.node.inputs[self.data_index]

    def params(self, channels: int) -> int:
        """What the step holds: its constants, and at least a vector per channel it applies (a
        scalar shift becomes a bias of ``channels`` values: counted so, it never looks free)."""
        vectors = 1 + int(self.has_shift) if self.node.op_type != "Neg" else 0
        return max(sum(c.size for c in self.constants), vectors * channels)


def recognize_conv(ctx: Context, node: ir.Node) -> ConvOp | Declined | None:
    """``node`` as a :class:`ConvOp`, a reason why this Conv cannot merge, or None (not a Conv)."""
    if is_onnx(node, "ConvTranspose"):
        return Declined.because("ConvTranspose is not re-parameterised (only Conv is)")
    if not is_onnx(node, "Conv") or len(node.outputs) != 1:
        return None
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return Declined.because("Conv is missing an input")
    w = ctx.constants.resolve(node.inputs[1])
    if not isinstance(w, Constant):
        return w
    if len(w.shape) < 3:
        return Declined.because(f"Conv weight has rank {len(w.shape)}")
    out_channels = w.shape[0]
    weight = ctx.constants.usable(node.inputs[1], (node,), out_channels)
    if isinstance(weight, Declined):
        return weight
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = ctx.constants.usable(node.inputs[2], (node,), out_channels)
        if isinstance(bias, Declined):
            return bias
        if bias.size != out_channels:
            return Declined.because(
                f"Conv bias of shape {list(bias.shape)} does not match {out_channels} outputs"
            )
    dtype = node.inputs[1].dtype or weight.dtype
    if dtype not in FLOAT_TYPES or (node.inputs[0].dtype not in (None, dtype)):
        return Declined.because(f"Conv in {dtype.name.lower()} is not a float conv of one dtype")
    geometry = _geometry(node, weight.shape, bias is not None)
    if isinstance(geometry, Declined):
        return geometry
    return ConvOp(node, geometry, weight, bias, dtype)


def _geometry(node: ir.Node, shape: tuple[int, ...], has_bias: bool) -> ConvGeometry | Declined:
    """The conv's geometry from its attributes and weight shape, or why it has none we trust."""
    attrs = node.attributes
    rank = len(shape) - 2
    kernel = tuple(shape[2:])
    declared = attrs.get_ints("kernel_shape", None)
    if declared is not None and tuple(declared) != kernel:
        return Declined.because(
            f"Conv kernel_shape {list(declared)} differs from its weight's {list(kernel)}"
        )
    strides = tuple(attrs.get_ints("strides", None) or (1,) * rank)
    dilations = tuple(attrs.get_ints("dilations", None) or (1,) * rank)
    auto_pad = attrs.get_string("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad == "NOTSET":
        pads = tuple(attrs.get_ints("pads", None) or (0,) * (2 * rank))
    elif auto_pad in ("VALID", "SAME_UPPER", "SAME_LOWER"):
        resolved = resolve_auto_pad(auto_pad, kernel, strides, dilations, _spatial(node, rank))
        if isinstance(resolved, Declined):
            return resolved
        pads = resolved
    else:
        return Declined.because(f"Conv auto_pad {auto_pad!r} is not understood")
    groups = attrs.get_int("group", 1)
    try:
        return ConvGeometry(
            shape[0], shape[1] * groups, kernel, groups, strides, dilations, pads, has_bias
        )
    except ValueError as e:
        return Declined.because(f"Conv attributes are inconsistent: {e}")


def _spatial(node: ir.Node, rank: int) -> tuple[int, ...] | None:
    """The input's static spatial size, if known."""
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if shape is None or len(shape) != rank + 2:
        return None
    dims = list(shape)[2:]
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _per_channel(shape: tuple[int, ...], rank: int, channels: int, axis: int = 1) -> bool:
    """A constant of ``shape`` broadcasts along axis ``axis`` of a rank-``rank`` tensor only."""
    if len(shape) > rank:
        return False
    channel_at = axis - (rank - len(shape))  # the constant's dim aligned with the channels
    return all(d == 1 or (i == channel_at and d == channels) for i, d in enumerate(shape))


def recognize_affine(
    ctx: Context, node: ir.Node, rank: int, channels: int, axis: int = 1
) -> ChannelAffine | Declined | None:
    """``node`` as a channel affine on a rank-``rank`` tensor of ``channels`` channels at axis
    ``axis`` (1, or where views moved them), a reason why this constant step is not one, or
    None (not a constant step at all)."""
    if not is_onnx(node) or node.op_type not in AFFINE_OPS or not node.outputs:
        return None
    if node.op_type == "BatchNormalization":
        if axis != 1:
            return Declined.because(
                f"BatchNormalization normalises axis 1, but the channels are at axis {axis} here"
            )
        return _batch_norm(ctx, node, channels)
    if node.op_type == "Neg":
        if len(node.inputs) != 1 or node.inputs[0] is None:
            return None
        return ChannelAffine(node, 0, [], False, lambda n: (np.full(n, -1.0), None))
    step = constant_step(ctx, node)
    if step is None or isinstance(step, Declined):
        return step
    if not step.is_affine:
        return None  # c / x is not affine
    c = step.constant(ctx, channels)
    if isinstance(c, Declined):
        return c
    if not _per_channel(c.shape, rank, channels, axis):
        return Declined.because(
            f"{node.op_type} by a constant of shape {list(c.shape)} varies along other axes "
            f"than the channels (axis {axis} of {channels})"
        )
    if node.op_type == "Div" and not np.all(c.array() != 0):
        return Declined.because("Div by a constant that holds a zero")

    def vectors(n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return step.scale_shift(
            np.broadcast_to(c.array().astype(np.float64).reshape(-1), (n,)).copy()
        )

    return ChannelAffine(node, step.data_index, [c], step.has_shift, vectors)


def _batch_norm(ctx: Context, node: ir.Node, channels: int) -> ChannelAffine | Declined | None:
    if len(node.inputs) != 5 or None in node.inputs:
        return None
    if node.attributes.get_int("training_mode", 0) != 0 or any(
        v.uses() or v.is_graph_output() for v in node.outputs[1:]
    ):
        return Declined.because(
            "BatchNormalization runs in training mode (export after model.eval())"
        )
    if node.attributes.get_int("spatial", 1) != 1:
        return Declined.because("BatchNormalization with spatial=0 is not supported")
    params = batch_norm_params(ctx, node)
    if isinstance(params, Declined):
        return params
    if any(p.size != channels for p in params):
        return Declined.because(
            f"BatchNormalization parameters are not vectors of {channels} channels"
        )
    epsilon = node.attributes.get_float("epsilon", 1e-5)

    def vectors(n: int) -> tuple[np.ndarray, np.ndarray]:
        gamma, beta, mean, var = (p.array().reshape(-1) for p in params)
        return bn_affine(gamma, beta, mean, var, epsilon)

    return ChannelAffine(node, 0, params, True, vectors)


@dataclass
class Term:
    """One summand of a branch sum: ``sign * conv(x)``, ``sign * x`` or ``sign * affine(x)``."""

    sign: float
    conv: ConvOp | None = None
    affine: ChannelAffine | None = None

    @property
    def nodes(self) -> list[ir.Node]:
        if self.conv is not None:
            return [self.conv.node]
        return [self.affine.node, *self.affine.more] if self.affine is not None else []

    def reads(self) -> list[tuple[ir.Node, int]]:
        if self.conv is not None:
            return [(self.conv.node, 0)]
        if self.affine is None or self.affine.more:  # it reads what x is the Transpose of
            return []
        return [(self.affine.node, self.affine.data_index)]
