"""What counts as a linear op: ``ir.Node -> LinearOp | Declined-reason | None``.

A *linear op* is an affine map along the last axis with constant weights:

- ``Gemm(A, B, C)`` with ``B`` (and ``C`` if present) constant, any ``transA``/``transB``/
  ``alpha``/``beta``; ``W = alpha * op(B)``, ``b = beta * C``.
- ``MatMul(x, W)`` with a constant 2-D right operand, optionally followed by ``Add`` of a
  constant bias (on either side) that broadcasts along the last axis only.

A weight is constant only if it is an initializer that is *not* also a graph input (a caller could
override those at run time) or the output of a ``Constant`` node. A weight that other nodes also
use is not taken: merging would keep the old copy alive and add a new one.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from converter.fusion import algebra
from converter.model_io import training

__all__ = [
    "LinearOp",
    "Decline",
    "recognize",
    "constant_tensor",
    "shared_with_others",
    "broadcasts_along_last_axis",
    "is_onnx",
    "FLOAT_TYPES",
]

logger = logging.getLogger(__name__)

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


@dataclass(frozen=True)
class Decline:
    """A Gemm/MatMul that cannot take part in a merge, and why (in words a user can act on)."""

    node: ir.Node
    reason: str


@dataclass
class LinearOp:
    """One recognised linear op: its nodes, data input/output, widths, and its map.

    The float64 map is built only when asked for (``affine``), so that recognising every op of a
    multi-gigabyte model reads shapes, not weights.
    """

    nodes: tuple[ir.Node, ...]
    input: ir.Value
    output: ir.Value
    in_features: int
    out_features: int
    dtype: ir.DataType
    weights: tuple[ir.Value, ...]
    make_affine: Callable[[], algebra.AffineMap]
    trans_a: int = 0
    elementwise: bool = False

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

    @property
    def names(self) -> list[str]:
        return [n.name or f"<{n.op_type}>" for n in self.nodes]


def is_onnx(node: ir.Node | None, op_type: str | None = None) -> bool:
    """``node`` is a standard ONNX op (default domain), of ``op_type`` if given."""
    return (
        node is not None
        and node.domain in ("", "ai.onnx")
        and (op_type is None or node.op_type == op_type)
    )


def _label(value: ir.Value) -> str:
    return value.name or "<unnamed>"


def constant_tensor(value: ir.Value | None) -> tuple[np.ndarray | None, str | None]:
    """The constant array behind ``value``, or ``(None, reason)`` if it is not a usable constant."""
    if value is None:
        return None, "input is missing"
    if value.is_graph_input():
        return None, f"weight '{_label(value)}' is a graph input (it can be overridden at run time)"
    if value.meta.get(training.TRAINED):
        return None, f"weight '{_label(value)}' is trained by the model's training_info"
    producer = value.producer()
    if value.const_value is None and _is_identity(producer):
        # torch's exporter deduplicates equal initializers and hands them out through Identity.
        assert producer is not None
        return constant_tensor(producer.inputs[0] if producer.inputs else None)
    if value.const_value is None and _is_transposed_matrix(producer):
        assert producer is not None
        array, reason = constant_tensor(producer.inputs[0])
        if reason is None and array is not None and array.ndim == 2:
            return array.T, None
        return None, reason or f"weight '{_label(value)}' is not constant"
    if value.const_value is None and not is_onnx(producer, "Constant"):
        return None, f"weight '{_label(value)}' is not constant"
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError as e:
        return None, f"weight '{_label(value)}' is a malformed Constant: {e}"
    if tensor is None:
        return None, f"weight '{_label(value)}' is not constant"
    return tensor.numpy(), None


def _is_identity(node: ir.Node | None) -> bool:
    return is_onnx(node, "Identity")


def _is_transposed_matrix(node: ir.Node | None) -> bool:
    """``Transpose(W, perm=[1, 0])``: exporters without constant folding write weights this way."""
    if not is_onnx(node, "Transpose"):
        return False
    perm = node.attributes.get_ints("perm", None)
    return perm is None or list(perm) == [1, 0]


def shared_with_others(value: ir.Value, node: ir.Node) -> str | None:
    """Reason the weight ``value`` is shared beyond ``node``, or None if ``node`` is its only user."""
    others = [u.node for u in value.uses() if u.node is not node]
    if others:
        return (
            f"weight '{_label(value)}' is shared with node '{others[0].name or others[0].op_type}'"
        )
    return None


def _weights(node: ir.Node, indices: tuple[int, ...]) -> tuple[list[np.ndarray | None], str | None]:
    """The constant arrays at ``indices`` (None where the optional input is absent), or a reason."""
    arrays: list[np.ndarray | None] = []
    for i in indices:
        value = node.inputs[i] if i < len(node.inputs) else None
        if value is None:
            arrays.append(None)
            continue
        array, reason = constant_tensor(value)
        reason = reason or shared_with_others(value, node)
        if reason:
            return [None] * len(indices), reason
        arrays.append(array)
    return arrays, None


def _float_type(value: ir.Value, array: np.ndarray) -> ir.DataType | None:
    dtype = value.dtype or ir.DataType.from_numpy(array.dtype)
    return dtype if dtype in FLOAT_TYPES else None


def _recognize_gemm(node: ir.Node) -> LinearOp | Decline:
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return Decline(node, "Gemm is missing an input")
    (b, c), reason = _weights(node, (1, 2))
    if reason:
        return Decline(node, reason)
    assert b is not None
    dtype = _float_type(node.inputs[1], b)
    if dtype is None:
        return Decline(node, f"weight dtype {b.dtype} is not a float type")
    if b.ndim != 2:
        return Decline(node, f"Gemm weight has rank {b.ndim}, expected 2")
    attrs = node.attributes
    trans_b = attrs.get_int("transB", 0)
    in_features, out_features = b.shape[::-1] if trans_b else b.shape
    reason = _gemm_bias_reason(c, out_features)
    if reason:
        return Decline(node, reason)
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    weights = tuple(v for v in node.inputs[1:3] if v is not None)
    return LinearOp(
        (node,),
        node.inputs[0],
        node.outputs[0],
        int(in_features),
        int(out_features),
        dtype,
        weights,
        _unmapping(
            lambda: algebra.gemm_affine(b, c, trans_b=trans_b, alpha=alpha, beta=beta), weights
        ),
        trans_a=attrs.get_int("transA", 0),
    )


def _unmapping(
    make: Callable[[], algebra.AffineMap], weights: tuple[ir.Value, ...]
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
            for value in weights:
                _drop_mapped_pages(value.const_value)

    return make_and_unmap


def _drop_mapped_pages(tensor: ir.TensorProtocol | None) -> None:
    raw = getattr(tensor, "raw", None) if isinstance(tensor, ir.ExternalTensor) else None
    if raw is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = (tensor.offset or 0) // mmap.PAGESIZE * mmap.PAGESIZE
    stop = min((tensor.offset or 0) + tensor.nbytes, len(raw))
    if stop > start:
        raw.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _gemm_bias_reason(c: np.ndarray | None, out_features: int) -> str | None:
    """Why Gemm's ``C`` cannot be normalised to ``(N,)`` or ``(M, N)``, or None if it can."""
    if c is None or c.ndim == 0:
        return None
    if c.ndim > 2 or c.shape[-1] not in (1, out_features):
        return f"Gemm bias C of shape {list(c.shape)} does not broadcast to (M, {out_features})"
    return None


def broadcasts_along_last_axis(c: np.ndarray, data: ir.Value, width: int) -> bool:
    """``c`` is a scalar or ``(1, ..., 1, width)`` and does not raise ``data``'s rank (a bias or
    scale per feature, not a broadcast along another axis or up a rank)."""
    if c.size not in (1, width) or any(d != 1 for d in c.shape[:-1]):
        return False
    rank = None if data.shape is None else len(data.shape)
    return c.ndim <= 1 if rank is None else c.ndim <= max(rank, 1)


def _bias_add(matmul: ir.Node, out_features: int) -> tuple[ir.Node, np.ndarray, ir.Value] | None:
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
    array, reason = constant_tensor(other)
    if reason or shared_with_others(other, add):
        return None
    assert array is not None
    # MatMul(x, W) with a 2-D W has x's rank, so x stands for the Add's data.
    if not broadcasts_along_last_axis(array, matmul.inputs[0], out_features):
        return None
    return add, array, other


def _recognize_matmul(node: ir.Node) -> LinearOp | Decline:
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return Decline(node, "MatMul is missing an input")
    (w,), reason = _weights(node, (1,))
    if reason:
        left, _ = constant_tensor(node.inputs[0])
        if left is not None:
            return Decline(node, "the constant is the left operand (x @ W needs W on the right)")
        return Decline(node, reason)
    assert w is not None
    if w.ndim != 2:
        return Decline(node, f"MatMul weight has rank {w.ndim}, expected 2")
    dtype = _float_type(node.inputs[1], w)
    if dtype is None:
        return Decline(node, f"weight dtype {w.dtype} is not a float type")
    nodes: tuple[ir.Node, ...] = (node,)
    weights: tuple[ir.Value, ...] = (node.inputs[1],)
    bias = None
    found = _bias_add(node, w.shape[1])
    if found is not None:
        add, bias, bias_value = found
        nodes, weights = (node, add), (*weights, bias_value)
    return LinearOp(
        nodes,
        node.inputs[0],
        nodes[-1].outputs[0],
        int(w.shape[0]),
        int(w.shape[1]),
        dtype,
        weights,
        _unmapping(lambda: algebra.matmul_affine(w, bias), weights),
    )


def recognize(node: ir.Node) -> LinearOp | Decline | None:
    """Classify ``node``: a :class:`LinearOp`, a :class:`Decline` with the reason, or None.

    None means the node is not a Gemm/MatMul at all, so it is simply not part of any chain.
    """
    if not is_onnx(node):
        return None
    if node.op_type == "Gemm":
        return _recognize_gemm(node)
    if node.op_type == "MatMul":
        return _recognize_matmul(node)
    return None
