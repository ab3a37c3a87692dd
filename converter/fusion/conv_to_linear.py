"""A 1x1 Conv moved past a channels-last Transpose into the linear op after it.

A Conv whose kernel is 1 in every spatial axis, at stride 1, without pads and in one group (its
dilations do not matter) maps the channels (axis 1) at every position alike::

    y[:, o, ...] = sum_c Wc[o, c] x[:, c, ...] + bc[o]

A ``Transpose`` that puts axis 1 last (``perm[-1] == 1``, the other axes in any order) turns it
into a map on the last axis of the transposed input::

    Transpose(Conv(x), perm) = Transpose(x, perm) @ Wc[:, :, 1, ...].T + bc

So ``Conv1x1 -> Transpose(perm) -> L``, with ``L`` a linear op on the last axis (ConvNeXt-style
channels-last MLPs, Conformer's pointwise conv before a Linear), is a chain whose first op is
``[Wc2d.T, bc]`` read through ``Transpose(x, perm)``. :func:`pointwise_before` finds that op (a
:class:`~converter.fusion.linear.ops.LinearOp` holding the Conv and the Transpose, with
``input_perm = perm``); the engine gives it to the chain finder as the ``lead`` of every chain
(:class:`converter.fusion.linear.chains.Segments`), which then decides and writes it like any
chain (the cost model over the widths ``C_in -> C_mid -> C_out``, the parameter rule of
:meth:`converter.fusion.linear.rewrite.LinearMerge.decide`), composing once in float64::

    W = Wc2d.T @ W_L,    b = bc @ W_L + b_L

and writes ``Transpose(x, perm) -> MatMul(W) [-> Add(b)]``, taking over ``L``'s output value.

A Conv -> Transpose -> linear op that cannot be so merged is reported with the reason: a kernel,
stride, padding or group that is not pointwise, a perm that does not put the channels last, an
intermediate with another reader or that is a graph output, different dtypes or widths.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from converter.fusion.conv.geometry import ConvGeometry
from converter.fusion.conv.match import ConvOp, recognize_conv
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import is_onnx
from converter.fusion.linear import algebra, chains
from converter.fusion.linear.linear_op import LinearOp

__all__ = ["pointwise_before", "pointwise_reason"]


def _name(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


def pointwise_before(ctx: Context, op: LinearOp) -> LinearOp | Declined | None:
    """The 1x1 Conv before ``op`` (through a channels-last Transpose) as the linear op that
    leads ``op``'s chain, why the Conv there is not one, or None (no Conv there)."""
    transpose = op.input.producer()
    if not is_onnx(transpose, "Transpose") or not transpose.inputs:
        return None
    conv_out = transpose.inputs[0]
    conv = None if conv_out is None else conv_out.producer()
    if conv_out is None or not is_onnx(conv, "Conv"):
        return None
    names = [_name(conv), _name(transpose), *op.names]
    found = recognize_conv(ctx, conv)
    if not isinstance(found, ConvOp):
        return found.about(names) if isinstance(found, Declined) else None
    perm = _perm(transpose, found.geometry.rank + 2)
    reason = (
        pointwise_reason(found.geometry)
        or _perm_reason(perm, found.geometry.rank + 2)
        or chains.intermediate_reason(conv_out)
    )
    if reason is None:
        first = _as_linear(found, transpose, tuple(perm))
        reason = chains.link_reason(first, op)
        if reason is None:
            return first
    return Declined(names, reason)


def pointwise_reason(g: ConvGeometry) -> str | None:
    """Why a conv of geometry ``g`` is not a map of the channels alone, or None if it is."""
    problems = []
    if any(k != 1 for k in g.kernel_shape):
        problems.append("kernel " + "x".join(map(str, g.kernel_shape)))
    if any(s != 1 for s in g.strides):
        problems.append(f"strides {list(g.strides)}")
    if any(g.pads):
        problems.append(f"pads {list(g.pads)}")
    if g.groups != 1:
        problems.append(f"group {g.groups}")
    if not problems:
        return None
    return (
        f"the Conv before the channels-last linear op is not pointwise ({', '.join(problems)}): "
        "only a 1x1 Conv at stride 1, without pads, in one group moves past the Transpose"
    )


def _perm(transpose: ir.Node, rank: int) -> list[int]:
    """The Transpose's perm (ONNX's default reverses the axes)."""
    perm = transpose.attributes.get_ints("perm", None)
    return list(perm) if perm is not None else list(range(rank))[::-1]


def _perm_reason(perm: list[int], rank: int) -> str | None:
    if sorted(perm) != list(range(rank)):
        return f"Transpose perm {perm} is not a permutation of the Conv output's {rank} axes"
    if perm[-1] != 1:
        return f"Transpose perm {perm} does not put the Conv's channels (axis 1) last"
    return None


def _as_linear(conv: ConvOp, transpose: ir.Node, perm: tuple[int, ...]) -> LinearOp:
    """The pointwise ``conv`` read through ``Transpose(x, perm)``: ``W = Wc2d.T``, ``b = bc``."""
    g = conv.geometry
    weight, bias = conv.weight, conv.bias

    def make() -> algebra.AffineMap:
        w = np.asarray(weight.array(), dtype=np.float64).reshape(g.out_channels, g.in_channels)
        return algebra.matmul_affine(w.T, None if bias is None else bias.array().reshape(-1))

    return LinearOp(
        (conv.node, transpose),
        0,
        g.in_channels,
        g.out_channels,
        conv.dtype,
        tuple(conv.constants),
        make,
        has_bias=bias is not None,
        input_perm=perm,
    )
