"""What counts as a linear op: ``ir.Node -> LinearOp | Declined | None``.

A *linear op* is an affine map along the last axis with constant weights:

- ``Gemm(A, B, C)`` with ``B`` (and ``C`` if present) constant, any ``transA``/``transB``/
  ``alpha``/``beta``; ``W = alpha * op(B)``, ``b = beta * C``.
- ``MatMul(x, W)`` with a constant 2-D right operand, optionally followed by ``Add`` of a
  constant bias (on either side) that broadcasts along the last axis only.

What is constant is :mod:`converter.fusion.core.constants`' answer. A weight that other nodes also read
stays where it is for them; the merge then cannot free it, so a *large* shared weight (bigger than
the op's output width: a weight matrix, say a tied embedding) is refused, since merging would keep
the old copy alive beside the new one. A small shared constant (a bias, a scale, a BatchNorm
statistic, which exporters deduplicate into one initializer) is simply read: the merge writes its
own copy of what it needs.
"""

from __future__ import annotations

import functools
import logging
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import is_onnx
from converter.fusion.linear import algebra

__all__ = [
    "LinearOp",
    "declined",
    "recognize",
    "broadcasts_along_last_axis",
    "FLOAT_TYPES",
]

logger = logging.getLogger(__name__)

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


def declined(node: ir.Node, reason: str) -> Declined:
    """``node`` cannot take part in a merge, and why (in words a user can act on)."""
    return Declined([node.name or f"<{node.op_type}>"], reason)


@dataclass
class LinearOp:
    """One recognised linear op: its nodes, widths, constants, and its map.

    ``input`` and ``output`` are read from the live nodes (``nodes[0].inputs[input_index]``,
    ``nodes[-1].outputs[0]``), so an op found before another merge rewired its input still names
    the value it reads now. The float64 map is built only when asked for (``affine``), so that
    recognising every op of a multi-gigabyte model reads shapes, not weights.
    """

    nodes: tuple[ir.Node, ...]
    input_index: int
    in_features: int
    out_features: int
    dtype: ir.DataType
    constants: tuple[Constant, ...]
    make_affine: Callable[[], algebra.AffineMap]
    trans_a: int = 0
    elementwise: bool = False
    has_bias: bool = False
    per_row_bias: bool = False
    # The axis of the data the map acts on: -1 (x @ W), or -2 for a left MatMul (W @ x).
    axis: int = -1
    # The op reads ``Transpose(input, perm)``: a 1x1 Conv moved past the channels-last
    # Transpose after it (:mod:`converter.fusion.conv.to_linear`); None for every other op.
    input_perm: tuple[int, ...] | None = None

    @property
    def input(self) -> ir.Value:
        value = self.nodes[0].inputs[self.input_index]
        assert value is not None
        return value

    @property
    def output(self) -> ir.Value:
        return self.nodes[-1].outputs[0]

    @property
    def weights(self) -> tuple[ir.Value, ...]:
        return tuple(c.value for c in self.constants)

    @property
    def macs(self) -> int:
        """Multiply-adds per row when the op runs alone (a diagonal step costs its width)."""
        return self.out_features if self.elementwise else self.in_features * self.out_features

    @property
    def affine(self) -> algebra.AffineMap:
        """The op as ``y = x @ W + b`` in float64 (computed on each call; not cached)."""
        return self.make_affine()

    @property
    def is_gemm(self) -> bool:
        return self.nodes[0].op_type == "Gemm"

    @functools.cached_property
    def names(self) -> list[str]:
        return [n.name or f"<{n.op_type}>" for n in self.nodes]

    def alive(self, graph: ir.Graph) -> bool:
        """All of the op's nodes are still in ``graph`` (no other merge took them)."""
        return all(n.graph is graph for n in self.nodes)


def _float_type(dtype: ir.DataType | None) -> ir.DataType | None:
    return dtype if dtype in FLOAT_TYPES else None


def _dtype_name(dtype: ir.DataType) -> str:
    try:
        return np.dtype(dtype.numpy()).name
    except TypeError:
        return dtype.name.lower()


def _recognize_gemm(ctx: Context, node: ir.Node) -> LinearOp | Declined:
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return declined(node, "Gemm is missing an input")
    b = ctx.constants.resolve(node.inputs[1])
    if isinstance(b, Declined):
        return declined(node, b.reason)
    if len(b.shape) != 2:
        return declined(node, f"Gemm weight has rank {len(b.shape)}, expected 2")
    attrs = node.attributes
    trans_b = attrs.get_int("transB", 0)
    in_features, out_features = b.shape[::-1] if trans_b else b.shape
    found = _constants(ctx, node, (1, 2), out_features)
    if isinstance(found, Declined):
        return declined(node, found.reason)
    b, c = found
    assert b is not None
    dtype = _float_type(node.inputs[1].dtype or b.dtype)
    if dtype is None:
        return declined(node, f"weight dtype {_dtype_name(b.dtype)} is not a float type")
    reason = _gemm_bias_reason(c, out_features)
    if reason:
        return declined(node, reason)
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    constants = tuple(x for x in (b, c) if x is not None)

    def make() -> algebra.AffineMap:
        c_array = None if c is None else c.array()
        return algebra.gemm_affine(b.array(), c_array, trans_b=trans_b, alpha=alpha, beta=beta)

    return LinearOp(
        (node,),
        0,
        int(in_features),
        int(out_features),
        dtype,
        constants,
        _unmapping(make, constants),
        trans_a=attrs.get_int("transA", 0),
        has_bias=c is not None,
        per_row_bias=c is not None and len(c.shape) == 2 and c.shape[0] > 1,
    )


def _constants(
    ctx: Context, node: ir.Node, indices: tuple[int, ...], small: int
) -> list[Constant | None] | Declined:
    """The constants at ``indices`` (None where an optional input is absent), or a reason."""
    found: list[Constant | None] = []
    for i in indices:
        value = node.inputs[i] if i < len(node.inputs) else None
        if value is None:
            found.append(None)
            continue
        constant = ctx.constants.usable(value, (node,), small)
        if isinstance(constant, Declined):
            return constant
        found.append(constant)
    return found


def _unmapping(
    make: Callable[[], algebra.AffineMap], constants: tuple[Constant, ...]
) -> Callable[[], algebra.AffineMap]:
    """``make``, then drop from this process the pages of the weights' memory maps it touched.

    onnx_ir memory-maps external data; file-backed pages a process touched count in its RSS until
    unmapped, so converting 36 weights of 64 MB would leave 2.4 GB resident. ``make`` has copied
    them into float64 by then. ``MADV_DONTNEED`` on a read-only shared file mapping only unmaps the
    pages here (the page cache keeps them; a later read faults them back in).
    """

    def make_and_unmap() -> algebra.AffineMap:
        try:
            return make()
        finally:
            for constant in constants:
                _drop_mapped_pages(constant.chain[-1].const_value)

    return make_and_unmap


def _drop_mapped_pages(tensor: ir.TensorProtocol | None) -> None:
    if not _is_external(type(tensor)):
        return
    raw = getattr(tensor, "raw", None)
    if raw is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = (tensor.offset or 0) // mmap.PAGESIZE * mmap.PAGESIZE
    stop = min((tensor.offset or 0) + tensor.nbytes, len(raw))
    if stop > start:
        raw.madvise(mmap.MADV_DONTNEED, start, stop - start)


@functools.cache
def _is_external(kind: type) -> bool:
    """Tensors of this type read external data (per type: isinstance on them is slow)."""
    return issubclass(kind, ir.ExternalTensor)


def _gemm_bias_reason(c: Constant | None, out_features: int) -> str | None:
    """Why Gemm's ``C`` cannot be normalised to ``(N,)`` or ``(M, N)``, or None if it can."""
    if c is None or len(c.shape) == 0:
        return None
    if len(c.shape) > 2 or c.shape[-1] not in (1, out_features):
        return f"Gemm bias C of shape {list(c.shape)} does not broadcast to (M, {out_features})"
    return None


def broadcasts_along_last_axis(
    ctx: Context, shape: tuple[int, ...], data: ir.Value, width: int
) -> bool:
    """A constant of ``shape`` is a scalar or ``(1, ..., 1, width)`` and does not raise
    ``data``'s rank (a bias or scale per feature, not a broadcast along another axis)."""
    size = int(np.prod(shape, dtype=np.int64))
    if size not in (1, width) or any(d != 1 for d in shape[:-1]):
        return False
    rank = ctx.shapes.rank(data)
    return len(shape) <= 1 if rank is None else len(shape) <= max(rank, 1)


def _bias_add(
    ctx: Context, matmul: ir.Node, out_features: int, data_index: int = 0
) -> tuple[ir.Node, Constant] | None:
    """The ``Add`` after ``matmul`` that adds a constant last-axis bias, with the bias, if any."""
    out = matmul.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = next(iter(uses)).node
    if not is_onnx(add, "Add") or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is None or other is out:
        return None
    bias = ctx.constants.usable(other, (add,), out_features)
    # MatMul(x, W) with a 2-D W has x's rank, so x stands for the Add's data.
    if isinstance(bias, Declined) or not broadcasts_along_last_axis(
        ctx, bias.shape, matmul.inputs[data_index], out_features
    ):
        return None
    return add, bias


def _recognize_matmul(ctx: Context, node: ir.Node) -> LinearOp | Declined:
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return declined(node, "MatMul is missing an input")
    w = ctx.constants.resolve(node.inputs[1])
    if isinstance(w, Declined):
        if ctx.constants.is_constant(node.inputs[0]):
            return _recognize_left_matmul(ctx, node)
        return declined(node, w.reason)
    if len(w.shape) != 2:
        return declined(node, f"MatMul weight has rank {len(w.shape)}, expected 2")
    found = ctx.constants.usable(node.inputs[1], (node,), w.shape[1])
    if isinstance(found, Declined):
        return declined(node, found.reason)
    dtype = _float_type(node.inputs[1].dtype or w.dtype)
    if dtype is None:
        return declined(node, f"weight dtype {_dtype_name(w.dtype)} is not a float type")
    nodes: tuple[ir.Node, ...] = (node,)
    constants: tuple[Constant, ...] = (w,)
    bias = None
    found_bias = _bias_add(ctx, node, w.shape[1])
    if found_bias is not None:
        add, bias = found_bias
        nodes, constants = (node, add), (w, bias)

    def make() -> algebra.AffineMap:
        return algebra.matmul_affine(w.array(), None if bias is None else bias.array())

    return LinearOp(
        nodes,
        0,
        int(w.shape[0]),
        int(w.shape[1]),
        dtype,
        constants,
        _unmapping(make, constants),
        has_bias=bias is not None,
    )


def _recognize_left_matmul(ctx: Context, node: ir.Node) -> LinearOp | Declined:
    """``MatMul(W, x)``: a map along x's second-to-last axis (token mixing), ``y.T = x.T @ W.T``.

    Normalised like any op on the transposed view: ``weight = W.T`` (``(in, out)``), and a bias
    ``Add`` of a constant ``(out, 1)`` (or ``(1, ..., out, 1)``) that varies along that axis only.
    """
    w = ctx.constants.resolve(node.inputs[0])
    assert isinstance(w, Constant)
    x = node.inputs[1]
    assert x is not None
    rank = ctx.shapes.rank(x)
    if len(w.shape) != 2:
        return declined(node, f"left MatMul weight has rank {len(w.shape)}, expected 2")
    if rank is None or rank < 2:
        return declined(node, "the constant is the left operand and the data's rank is not known")
    found = ctx.constants.usable(node.inputs[0], (node,), w.shape[0])
    if isinstance(found, Declined):
        return declined(node, found.reason)
    dtype = _float_type(node.inputs[0].dtype or w.dtype)
    if dtype is None:
        return declined(node, f"weight dtype {_dtype_name(w.dtype)} is not a float type")
    nodes: tuple[ir.Node, ...] = (node,)
    constants: tuple[Constant, ...] = (w,)
    bias = _column_bias_add(ctx, node, int(w.shape[0]), rank)
    if bias is not None:
        nodes, constants = (node, bias[0]), (w, bias[1])
    column = None if bias is None else bias[1]

    def make() -> algebra.AffineMap:
        b = None if column is None else np.asarray(column.array()).reshape(-1)
        return algebra.matmul_affine(np.asarray(w.array()).T, b)

    op = LinearOp(
        nodes,
        1,
        int(w.shape[1]),
        int(w.shape[0]),
        dtype,
        constants,
        _unmapping(make, constants),
        has_bias=bias is not None,
    )
    op.axis = -2
    return op


def _column_bias_add(
    ctx: Context, node: ir.Node, out: int, rank: int
) -> tuple[ir.Node, Constant] | None:
    """The ``Add`` of a constant ``(out, 1)`` after a left MatMul, with the constant, if any."""
    value = node.outputs[0]
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    add = next(iter(uses)).node
    if not is_onnx(add, "Add") or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    bias = ctx.constants.usable(other, (add,), out)
    if isinstance(bias, Declined) or len(bias.shape) < 2 or len(bias.shape) > rank:
        return None
    if bias.shape[-1] != 1 or bias.shape[-2] != out or any(d != 1 for d in bias.shape[:-2]):
        return None
    return add, bias


def _recognize_einsum(ctx: Context, node: ir.Node) -> LinearOp | Declined | None:
    """``Einsum`` of the data and a constant matrix that is a plain ``x @ W`` on the last axis:
    ``"...i,ij->...j"`` (``W`` as is) or ``"...i,ji->...j"`` (``W.T``, torch's layout), the
    operands in either order and the leading indices kept in order. Anything else is not
    recognised, with the reason when an operand is a constant."""
    if len(node.inputs) != 2 or None in node.inputs or len(node.outputs) != 1:
        return None
    consts = [ctx.constants.is_constant(v) for v in node.inputs]
    if consts.count(True) != 1:
        return None
    w_at = consts.index(True)
    equation = (node.attributes.get_string("equation", "") or "").replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if not arrow or len(terms) != 2:
        return declined(node, f"Einsum '{equation}' has no explicit output: not read as x @ W")
    x_sub, w_sub = terms[1 - w_at], terms[w_at]
    contracted = x_sub[-1:] if x_sub else ""
    kept = w_sub.replace(contracted, "", 1) if len(w_sub) == 2 else ""
    plain = (
        len(w_sub) == 2
        and contracted in w_sub
        and len(kept) == 1
        and kept not in x_sub
        and out == x_sub[:-1] + kept
    )
    if not plain:
        return declined(node, f"Einsum '{equation}' is not a product x @ W on the last axis")
    w = ctx.constants.resolve(node.inputs[w_at])
    assert isinstance(w, Constant)
    transposed = w_sub[1] == contracted  # "oi": torch's (out, in) layout
    in_features, out_features = (w.shape[1], w.shape[0]) if transposed else w.shape
    found = ctx.constants.usable(node.inputs[w_at], (node,), out_features)
    if isinstance(found, Declined):
        return declined(node, found.reason)
    dtype = _float_type(node.inputs[w_at].dtype or w.dtype)
    if dtype is None:
        return declined(node, f"weight dtype {_dtype_name(w.dtype)} is not a float type")
    nodes: tuple[ir.Node, ...] = (node,)
    constants: tuple[Constant, ...] = (w,)
    bias = _bias_add(ctx, node, int(out_features), 1 - w_at)
    if bias is not None:
        nodes, constants = (node, bias[0]), (w, bias[1])
    b = None if bias is None else bias[1]

    def make() -> algebra.AffineMap:
        weight = np.asarray(w.array())
        return algebra.matmul_affine(
            weight.T if transposed else weight, None if b is None else b.array()
        )

    return LinearOp(
        nodes,
        1 - w_at,
        int(in_features),
        int(out_features),
        dtype,
        constants,
        _unmapping(make, constants),
        has_bias=b is not None,
    )


def recognize(ctx: Context, node: ir.Node) -> LinearOp | Declined | None:
    """Classify ``node``: a :class:`LinearOp`, a :class:`Declined` with the reason, or None.

    None means the node is not a Gemm/MatMul at all, so it is simply not part of any chain.
    """
    if not is_onnx(node):
        return None
    if node.op_type == "Gemm":
        return _recognize_gemm(ctx, node)
    if node.op_type == "MatMul":
        return _recognize_matmul(ctx, node)
    if node.op_type == "Einsum":
        return _recognize_einsum(ctx, node)
    return None
