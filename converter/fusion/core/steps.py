"""Constant steps, recognised in one place: ``Mul``/``Div``/``Add``/``Sub`` by a constant and
inference ``BatchNormalization``, and the steps a runtime fuses, kept.

A step is a map ``y = x * s + t`` along whichever axis its constant varies on; the parts decide
which axis that must be (a chain's last axis, :mod:`converter.fusion.linear.steps`; the features
after views of a linear op's output, :mod:`converter.fusion.linear.absorb`; a conv's channels,
:mod:`converter.fusion.conv.match`). Here is what they share: which node is a step at all (a
binary op with exactly one constant operand, :func:`constant_step`), that a step inside a pattern
onnxruntime fuses into one kernel is kept where it is (:func:`kept_for_runtime`, said as a
:class:`~converter.fusion.core.declined.Declined`), and what the step is as a map, on the vector
``c`` of its constant along that axis::

    Mul(x, c)  s = c       Div(x, c)  s = 1 / c       (Div(c, x) is not affine)
    Add(x, c)  t = c       Sub(x, c)  t = -c          Sub(c, x)  s = -1, t = c
    BatchNormalization(x, gamma, beta, mean, var)  s = gamma / sqrt(var + eps),  t = beta - mean * s
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import is_onnx
from converter.fusion.core.runtime_patterns import kept_for_runtime

__all__ = ["BINARY_STEPS", "ConstantStep", "batch_norm_params", "bn_affine", "constant_step"]

BINARY_STEPS = frozenset({"Mul", "Div", "Add", "Sub"})


@dataclass(frozen=True)
class ConstantStep:
    """A binary step: ``node``'s input ``data_index`` is the data, the other the constant."""

    node: ir.Node
    data_index: int

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def data(self) -> ir.Value:
        value = self.node.inputs[self.data_index]
        assert value is not None
        return value

    @property
    def operand(self) -> ir.Value:
        value = self.node.inputs[1 - self.data_index]
        assert value is not None
        return value

    @property
    def is_affine(self) -> bool:
        """Every step but ``c / x``."""
        return not (self.op_type == "Div" and self.data_index == 1)

    @property
    def has_shift(self) -> bool:
        return self.op_type in ("Add", "Sub")

    def constant(self, ctx: Context, small: int) -> Constant | Declined:
        """The constant operand, usable by a merge of this node (shared only if ``small``)."""
        return ctx.constants.usable(self.operand, (self.node,), small)

    def scale_shift(self, c: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(s, t)`` of ``y = x * s + t`` for the constant's float64 vector ``c`` (None: 1, 0)."""
        if self.op_type == "Mul":
            return c, None
        if self.op_type == "Div":
            return 1.0 / c, None
        if self.op_type == "Add":
            return None, c
        if self.data_index == 0:  # Sub(x, c)
            return None, -c
        return np.full(c.shape, -1.0), c  # Sub(c, x)


def constant_step(ctx: Context, node: ir.Node) -> ConstantStep | Declined | None:
    """``node`` as a binary step, why it must stay where it is (a runtime fuses it), or None
    (not a step: another op, or not exactly one constant operand; both constant is folding)."""
    if not is_onnx(node) or node.op_type not in BINARY_STEPS:
        return None
    if len(node.inputs) != 2 or None in node.inputs or len(node.outputs) != 1:
        return None
    left, right = (ctx.constants.is_constant(v) for v in node.inputs)
    if left == right:
        return None
    kept = kept_for_runtime(ctx, node)
    return Declined.because(kept) if kept else ConstantStep(node, 1 if left else 0)


def batch_norm_params(ctx: Context, node: ir.Node) -> list[Constant] | Declined:
    """BatchNormalization's ``scale, B, mean, var``, each usable by a merge of ``node`` (all
    per-channel: small, so a shared one is copied), or why one is not."""
    params: list[Constant] = []
    for value in node.inputs[1:]:
        found = ctx.constants.usable(value, (node,), 1 << 62)
        if isinstance(found, Declined):
            return found
        params.append(found)
    return params


def bn_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as ``y = x * s + t``: ``s = gamma / sqrt(var + eps)``,
    ``t = beta - mean * s`` (float64, per channel)."""
    s = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
    return s, np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * s
