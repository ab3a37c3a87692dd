"""The affine tail of a normalisation that applies its scale inside (TensorFlow's form).

TensorFlow's ``batch_normalization`` (behind Keras' ``LayerNormalization``) multiplies the scale
into the inverse deviation before using it twice::

    inv = rsqrt(var + eps) * gamma
    y   = x * inv + (beta - mean * inv)

which tf2onnx writes as ``Mul(r, gamma) -> inv``, ``Mul(x, inv)``, ``Mul(Neg(mean), inv)``,
``Add(., beta)`` and the ``Add`` of the two. With ``gamma`` and ``beta`` constant along the last
axis (the axis normalised, of width ``C``) that is the normalised value then an affine map::

    y = (x * r + (-mean) * r) * gamma + beta

:func:`norm_tail` finds the map; :meth:`NormTail.take_out` removes it (both products read ``r``,
and the ``Add`` of ``beta`` is gone), so ``y`` then holds the normalised value, in the same shape
(``gamma`` and ``beta`` never broadcast ``x``). onnxruntime fuses no kernel of this form (its
LayerNorm fusion wants ``(x - mean)`` itself divided by the deviation), so nothing is lost to
it. The map folds into the linear op ``y`` reaches
(:mod:`converter.fusion.linear.fold_before`): the LayerNorm's gamma and beta go into the next
``Dense``, as they would in a model folded by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant, remove_if_unused
from converter.fusion.core.context import Context
from converter.fusion.core.graph import is_onnx

__all__ = ["NormTail", "norm_tail"]


@dataclass(eq=False)
class NormTail:
    """``out = n * gamma + beta`` hidden in a normalisation's nodes (see the module docstring)."""

    out: ir.Value
    inv: ir.Node  # Mul(r, gamma)
    products: tuple[ir.Node, ir.Node]  # Mul(x, inv), Mul(-mean, inv)
    shifted: ir.Node  # Add(Mul(-mean, inv), beta)
    gamma: Constant
    beta: Constant

    @property
    def nodes(self) -> list[ir.Node]:
        """The nodes the take-out removes."""
        return [self.inv, self.shifted]

    @property
    def name(self) -> str:
        return self.inv.name or "Mul"

    def alive(self, graph: ir.Graph) -> bool:
        nodes = [*self.nodes, *self.products, self.out.producer()]
        return all(n is not None and n.graph is graph for n in nodes)

    def vectors(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """``(gamma, beta)`` as float64 vectors of ``width`` (a scalar repeated)."""
        return tuple(  # type: ignore[return-value]
            np.broadcast_to(np.asarray(c.array(), np.float64).reshape(-1), (width,)).copy()
            for c in (self.gamma, self.beta)
        )

    def take_out(self) -> None:
        """Leave the normalised value in ``out``: the products read ``r``, the shift goes."""
        r = _other(self.inv, self.gamma.value)
        for product in self.products:
            product.replace_input_with(list(product.inputs).index(self.inv.outputs[0]), r)
            out = product.outputs[0]  # -mean * r has the statistics' shape now, not x's
            out.shape = _broadcast(*(v.shape for v in product.inputs if v is not None))
        shifted, sum_in = self.shifted, self.products[1].outputs[0]
        ir.convenience.replace_all_uses_with(shifted.outputs[0], sum_in)
        for node in (self.inv, shifted):
            inputs = list(node.inputs)
            assert node.graph is not None
            node.graph.remove(node, safe=True)
            for value in inputs:
                remove_if_unused(value)


def norm_tail(ctx: Context, out: ir.Value) -> NormTail | None:
    """The affine tail ending at ``out`` (the ``Add`` of ``x * inv`` and ``beta - mean * inv``),
    with ``gamma`` and ``beta`` scalars or vectors of the last axis, or None."""
    node = out.producer()
    if not _is(node, "Add") or any(_constant(ctx, v) for v in node.inputs):
        return None
    for scaled, shift in (node.inputs, node.inputs[::-1]):
        found = _tail(ctx, out, scaled, shift)
        if found is not None:
            return found
    return None


def _tail(ctx: Context, out: ir.Value, scaled: ir.Value, shift: ir.Value) -> NormTail | None:
    """``out = scaled + shift`` with ``scaled = x * inv`` and ``shift = (u * inv) + beta``."""
    shifted, product = shift.producer(), scaled.producer()
    if not (_is(shifted, "Add") and _is(product, "Mul")) or not _sole(shift, scaled):
        return None
    beta_value = next((v for v in shifted.inputs if _constant(ctx, v)), None)
    if beta_value is None:
        return None
    other = _other(shifted, beta_value).producer()
    if not _is(other, "Mul") or not _sole(other.outputs[0]):
        return None
    inv = _shared_operand(product, other)
    inv_node = None if inv is None else inv.producer()
    if not _is(inv_node, "Mul") or len(inv.uses()) != 2 or inv.is_graph_output():
        return None
    gamma_value = next((v for v in inv_node.inputs if _constant(ctx, v)), None)
    if gamma_value is None or _constant(ctx, _other(inv_node, gamma_value)):
        return None
    width = _last_dim(_other(product, inv))
    if width is None or _last_dim(out) != width:
        return None
    gamma = ctx.constants.usable(gamma_value, (inv_node,), width)
    beta = ctx.constants.usable(beta_value, (shifted,), width)
    if not all(isinstance(c, Constant) and _along_last(c, width, out) for c in (gamma, beta)):
        return None
    return NormTail(out, inv_node, (product, other), shifted, gamma, beta)  # type: ignore[arg-type]


def _is(node: ir.Node | None, op: str) -> bool:
    return (
        node is not None and is_onnx(node, op) and len(node.inputs) == 2 and None not in node.inputs
    )


def _constant(ctx: Context, value: ir.Value | None) -> bool:
    return value is not None and ctx.constants.is_constant(value)


def _sole(*values: ir.Value) -> bool:
    """Each value is read once, by one node, and is not a graph output."""
    return all(len(v.uses()) == 1 and not v.is_graph_output() for v in values)


def _other(node: ir.Node, value: ir.Value) -> ir.Value:
    """The operand of the binary ``node`` that is not ``value``."""
    a, b = node.inputs
    assert a is not None and b is not None
    return b if a is value else a


def _shared_operand(first: ir.Node, second: ir.Node) -> ir.Value | None:
    """The one value both binary nodes read (inv), read once by each, or None."""
    shared = [v for v in first.inputs if v in second.inputs]
    if len(shared) != 1 or list(first.inputs).count(shared[0]) != 1:
        return None
    return shared[0] if list(second.inputs).count(shared[0]) == 1 else None


def _broadcast(*shapes: ir.Shape | None) -> ir.Shape | None:
    """The shape numpy broadcasting gives, where every dim is known or equal; else None."""
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    dims = []
    for i in range(rank):
        found = {s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0} - {1}
        if len(found) > 1:
            return None
        dims.append(found.pop() if found else 1)
    return ir.Shape(dims)


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0:
        return None
    last = value.shape[-1]
    return last if isinstance(last, int) else None


def _along_last(constant: Constant, width: int, out: ir.Value) -> bool:
    """A scalar, or a vector of the last axis (``(C,)``, ``(1, ..., C)``) not raising the rank."""
    shape = tuple(constant.shape)
    rank = len(out.shape) if out.shape is not None else 0
    if len(shape) > rank:
        return False
    return constant.size == 1 or (shape[-1] == width and all(d == 1 for d in shape[:-1]))
