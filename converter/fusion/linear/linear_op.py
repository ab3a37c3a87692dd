"""One recognised linear op: :class:`LinearOp`, what every entry of the op table returns.

A *linear op* is an affine map ``y = x @ W + b`` along one axis of its data input (the last;
the second-to-last for a left ``MatMul``) whose weights are constants, read through the run's
:class:`~converter.fusion.core.constants.Constants`. Its float64 map is built only when asked
for (:attr:`LinearOp.affine`), so recognising every op of a multi-gigabyte model reads shapes,
not weights; and building it gives the weights' memory-mapped pages back (:func:`unmapping`).
"""

from __future__ import annotations

import functools
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from converter.fusion.core.constants import Constant
from converter.fusion.core.context import Context
from converter.fusion.core.declined import Declined
from converter.fusion.linear import algebra

__all__ = [
    "LinearOp",
    "OwnForm",
    "ProducerOf",
    "Recognise",
    "UNIFORM_ELEMENTS",
    "broadcasts_along_last_axis",
    "data_dtype",
    "data_width",
    "declined",
    "last_axis_vector",
    "static_last_dim",
    "unmapping",
]


def declined(node: ir.Node, reason: str) -> Declined:
    """``node`` cannot take part in a merge, and why (in words a user can act on)."""
    return Declined([node.name or f"<{node.op_type}>"], reason)


@dataclass(frozen=True)
class OwnForm:
    """How a merge that ends in an op writes it back as its own type (an ONNX-ML
    ``LinearRegressor`` or ``LinearClassifier``, whose post-transform, labels and outputs a Gemm
    cannot carry): ``make(x, affine, name, doc)`` is that node reading ``x`` with the merged map
    (float64, ``(in, out)``) as its weights; it has as many outputs as the op it replaces.

    ``required`` is why no Gemm or MatMul can stand for it, or None when one can on a 2-D input
    (a regressor without a post-transform: ``[N, targets]`` floats either way); on an input not
    known to be 2-D it is written as itself all the same (a 1-D input still gives ``[1, targets]``).
    """

    make: Callable[[ir.Value, algebra.AffineMap, str, str], ir.Node]
    required: str | None = None


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
    # Transpose after it (:mod:`converter.fusion.conv_to_linear`); None for every other op.
    input_perm: tuple[int, ...] | None = None
    # Nodes of the op other nodes read too (a Reshape of the input two adapters share): a merge
    # leaves them in place, and the merge that takes their last reader removes them.
    kept: tuple[ir.Node, ...] = ()
    # A map of the last axis written through reshapes of it (:mod:`converter.fusion.linear.regions`):
    # merged only with a matrix op, and its cost per row is ``block_macs``.
    region: bool = False
    block_macs: int | None = None
    # Two Reshapes that cancel before the op (:mod:`converter.fusion.linear.reshape_pairs`): its
    # first nodes, read through; the Shape nodes reading between them are rewired when they go.
    through: tuple[ir.Node, ...] = ()
    # The output of the last node that carries the map (an ONNX-ML classifier's scores are its
    # second output; its first, the labels, is computed from them).
    output_index: int = 0
    # Why nothing after this op can join it (a post-transform, labels): it only ends a chain.
    ends_chain: str | None = None
    # How a merge ending in it writes it back as its own op type, or None (Gemm/MatMul).
    own_form: OwnForm | None = None
    # Weights the op holds as attributes rather than constants (ONNX-ML), for the cost model.
    attribute_params: int = 0

    @property
    def input(self) -> ir.Value:
        value = self.nodes[0].inputs[self.input_index]
        assert value is not None
        return value

    @property
    def output(self) -> ir.Value:
        return self.nodes[-1].outputs[self.output_index]

    @property
    def weights(self) -> tuple[ir.Value, ...]:
        return tuple(c.value for c in self.constants)

    @property
    def macs(self) -> int:
        """Multiply-adds per row when the op runs alone (a diagonal step costs its width)."""
        if self.block_macs is not None:
            return self.block_macs
        return self.out_features if self.elementwise else self.in_features * self.out_features

    @property
    def is_matrix(self) -> bool:
        """A Gemm, MatMul or Einsum of the op table: neither a step nor a region."""
        return not (self.elementwise or self.region)

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


def static_last_dim(ctx: Context, value: ir.Value) -> int | None:
    """``value``'s last dimension when the model (or shape inference, asked once) fixes it."""
    if value.shape is None:
        ctx.shapes.request()  # the model records none: infer shapes (once per run)
    shape = value.shape
    if shape is None or len(shape) == 0:
        return None
    last = shape[-1]
    return last if isinstance(last, int) and last > 0 else None


def data_width(ctx: Context, data: ir.Value, producer_of: ProducerOf) -> int | None:
    """The width of ``data``'s last axis: its static shape, else the recognised op producing it."""
    op = producer_of(data)
    return static_last_dim(ctx, data) or (op.out_features if op is not None else None)


def data_dtype(data: ir.Value, producer_of: ProducerOf) -> ir.DataType | None:
    """``data``'s element type: recorded, else the recognised op producing it."""
    op = producer_of(data)
    return data.dtype or (op.dtype if op is not None else None)


#: The op already recognised that produced a value (its width and dtype stand in for shapes and
#: types a model does not record, as in subgraphs), or None.
ProducerOf = Callable[[ir.Value], "LinearOp | None"]

#: An entry of an op table: how one op type maps an affine value, for a node of that type.
Recognise = Callable[[Context, ir.Node, ProducerOf], "LinearOp | Declined | None"]


def unmapping(
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


#: The most elements a constant may hold to be read as a per-feature vector by its values
#: (and so be copied rather than refused when other nodes read it too).
UNIFORM_ELEMENTS = 1 << 16


def last_axis_vector(
    ctx: Context, constant: Constant, data: ir.Value, width: int
) -> Constant | None:
    """``constant`` as a scalar or per-feature vector of ``data``'s last axis, or None.

    As written (:func:`broadcasts_along_last_axis`), or, for a small constant shaped like the
    data itself (``torch.zeros_like(y)`` added to an adapter's output: DeLoRA, RandLoRA) whose
    values repeat along every other axis and which does not broadcast ``data`` to a larger
    shape, as its one repeated row (read from its values)."""
    if broadcasts_along_last_axis(ctx, constant.shape, data, width):
        return constant
    shape = constant.shape
    if not shape or shape[-1] not in (1, width) or constant.size > UNIFORM_ELEMENTS:
        return None
    dims = data.shape.dims if data.shape is not None else None
    if dims is None or not all(isinstance(d, int) for d in dims) or len(shape) > len(dims):
        return None
    if any(c not in (1, d) for c, d in zip(shape[::-1], dims[::-1], strict=False)):
        return None  # it would broadcast the data to another shape
    row = algebra.repeated_row(constant.array(), constant.size // shape[-1])
    if row is None:
        return None
    return Constant(constant.chain, (shape[-1],), constant.dtype, lambda: row, constant.stored)
