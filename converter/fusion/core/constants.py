"""The one answer to "is this value constant, and what is its array": :class:`Constants`.

A value is constant when it is

- an initializer that is *not* also a graph input (older exporters list initializers as inputs,
  which lets a caller override them at run time),
- the output of a ``Constant`` node (``value``, ``value_float(s)``, ``value_int(s)``),
- ``Identity`` of a constant (torch's exporters deduplicate equal initializers and hand them out
  through ``Identity``), ``Transpose`` of one (exports without constant folding write weights as
  ``Transpose(W)``), ``Cast`` of one, ``Reshape`` of one by a constant shape, or ``Unsqueeze`` or
  ``Squeeze`` of one by constant axes (a per-channel vector shaped ``(C, 1, 1)`` for the
  ``Mul``/``Add`` after a ``Conv``),

and no training algorithm in ``training_info`` updates it (the run's ``trained`` values). Sparse
constants are not represented: onnx-ir cannot load them, so such a model is refused at load time
and never reaches this module.

:meth:`Constants.resolve` reads shapes, not weights: the array is built on demand by
:meth:`Constant.array`, so recognising every op of a multi-gigabyte model touches no weight. Each
value is resolved once per run: a :class:`Constants` belongs to one run (its
:class:`~converter.fusion.core.context.Context`) and its answers go with it. Recognition, the cost
model, size accounting and clean-up all ask it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from converter.fusion.core.computed import NotComputable, computable, computed_constant
from converter.fusion.core.declined import Declined
from converter.fusion.core.graph import is_onnx, label

__all__ = [
    "Constant",
    "Constants",
    "axes_of",
    "other_users",
    "parameter_count",
    "recorded_size",
    "remove_if_unused",
    "shape_of_static",
]


@dataclass(frozen=True)
class Constant:
    """A constant value: its shape and dtype, and its array on demand.

    ``chain`` is the value asked about followed by each value it was derived from (through
    ``Identity``/``Transpose``/``Cast``/``Reshape``/``Squeeze``/``Unsqueeze``), ending at the initializer or ``Constant``
    output that holds the data. Clean-up walks it; sharing checks look at the uses of all of it.
    """

    chain: tuple[ir.Value, ...]
    shape: tuple[int, ...]
    dtype: ir.DataType
    load: Callable[[], np.ndarray]
    # Elements the file holds for it: its size, or for a value computed from constants the sum
    # of its sources' (a LoRA product B @ A holds r * (m + n), not m * n). -1: its size.
    stored: int = -1
    # The node computing it from other constants (:mod:`converter.fusion.core.computed`).
    computed_by: ir.Node | None = None
    size: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", math.prod(self.shape))
        if self.stored < 0:
            object.__setattr__(self, "stored", self.size)

    @property
    def value(self) -> ir.Value:
        return self.chain[0]

    def array(self) -> np.ndarray:
        """The constant's array (a memory map for external data: reading it reads the file)."""
        return self.load()


_DERIVED = ("Identity", "Transpose", "Cast", "Reshape", "Squeeze", "Unsqueeze")


class Constants:
    """One run's answers to "is this value constant, and what is it", each value asked once.

    The answers are kept for the run: merges never change a constant, they only make new values,
    and a value whose producer a merge removed is read by nobody. ``trained`` are the values the
    model's ``training_info`` updates (never constant).
    """

    def __init__(self, trained: Collection[ir.Value] = frozenset(), opset: int = 0) -> None:
        """``opset``: the model's ``ai.onnx`` opset, at which values computed from constants
        are evaluated; 0 (unknown) resolves none of them."""
        self.trained = trained
        self.opset = opset
        self._answers: dict[ir.Value, Constant | Declined] = {}
        self._varying: dict[ir.Value, bool] = {}

    def resolve(self, value: ir.Value | None) -> Constant | Declined:
        """The :class:`Constant` behind ``value``, or why it is not one."""
        if value is None:
            return Declined.because("input is missing")
        found = self._answers.get(value)
        if found is None:
            found = self._answers[value] = _resolve(self, value)
        return found

    def forget_refusals(self) -> None:
        """Ask again about every value found varying or refused: shapes were just inferred, and
        a ``Shape`` of a value whose shape is now fixed is a constant (the constants found stay)."""
        self._answers = {v: a for v, a in self._answers.items() if isinstance(a, Constant)}
        self._varying = {v: False for v, varies in self._varying.items() if not varies}

    def is_constant(self, value: ir.Value | None) -> bool:
        return isinstance(self.resolve(value), Constant)

    def array(self, value: ir.Value | None) -> np.ndarray | Declined:
        """The array of a constant ``value``, or why it is not one (or cannot be computed)."""
        found = self.resolve(value)
        if isinstance(found, Declined):
            return found
        try:
            return found.array()
        except NotComputable as e:
            return Declined.because(str(e))

    def resolve_sources(self, node: ir.Node) -> None:
        """Resolve what ``node`` computes from, sources first (without recursion), so that
        resolving a value at the end of a long computation from constants is never deep."""
        order: list[ir.Value] = []
        seen: set[ir.Value] = set()
        stack = [(v, False) for v in node.inputs if v is not None]
        while stack:
            v, expanded = stack.pop()
            if expanded:
                order.append(v)
                continue
            if v in seen or v in self._answers or self.varies(v):
                continue
            seen.add(v)
            stack.append((v, True))
            producer = v.producer()
            if (v.const_value is None and computable(producer)) or (
                producer is not None and producer.op_type in _DERIVED
            ):
                stack.extend((i, False) for i in producer.inputs if i is not None)
        for v in order:
            self.resolve(v)

    def varies(self, value: ir.Value) -> bool:
        """``value`` depends on something other than constants (a graph input, an op that is
        not :func:`~converter.fusion.core.computed.computable`): decided without recursion, so
        that a deep network costs no deep call stack, and once per value."""
        stack = [value]
        while stack:
            v = stack[-1]
            if v in self._varying:
                stack.pop()
                continue
            producer = v.producer()
            if v.const_value is not None or v.is_initializer():
                self._varying[v] = v.is_graph_input()
            elif shape_of_static(producer) is not None:
                self._varying[v] = False  # the Shape of a value whose shape the model fixes
            elif v.is_graph_input() or (
                not computable(producer) and not is_onnx(producer, "Constant")
            ):
                self._varying[v] = True
            else:
                pending = [i for i in producer.inputs if i is not None and i not in self._varying]
                if pending:
                    stack.extend(pending)
                    continue
                self._varying[v] = any(self._varying[i] for i in producer.inputs if i is not None)
            stack.pop()
        return self._varying[value]

    def usable(
        self, value: ir.Value | None, owners: Iterable[ir.Node], small: int, *, shared: bool = False
    ) -> Constant | Declined:
        """The constant behind ``value`` for a merge of the nodes ``owners``, or why not usable.

        A constant that nodes outside ``owners`` also read is usable only when it holds at most
        ``small`` elements (the op's width): the merge copies it, and the original stays for
        them. A large one (a weight matrix, say a tied embedding) is refused: merging would keep
        the old copy alive beside the new one. Unless ``shared``: a linear op's weight is read
        by each merge (VeRA's one frozen pair of matrices, read by every layer's adapter), which
        writes its own; the cost model counts only what a merge frees, so a merge that would
        keep both copies and grow the model is refused there.
        """
        found = self.resolve(value)
        if isinstance(found, Declined):
            return found
        others = other_users(found, set(owners))
        # A value computed from constants (VeRA's slices of one frozen pair shared by every
        # layer) is read by each merge, which writes its own weight; its sources go with the
        # last reader. The cost model counts only what a merge frees.
        if others and found.size > small and not shared and found.computed_by is None:
            other = others[0]
            return Declined.because(
                f"weight '{label(value)}' is shared with node '{other.name or other.op_type}' "
                f"(merging would keep both copies)"
            )
        return found


def _resolve(constants: Constants, value: ir.Value) -> Constant | Declined:
    if value.is_graph_input():
        return Declined.because(
            f"weight '{label(value)}' is a graph input (it can be overridden at run time)"
        )
    if value in constants.trained:
        return Declined.because(f"weight '{label(value)}' is trained by the model's training_info")
    producer = value.producer()
    dims = shape_of_static(producer)
    if value.const_value is None and dims is not None:
        return Constant((value,), dims.shape, ir.DataType.INT64, lambda: dims)
    if value.const_value is None and is_onnx(producer) and producer.op_type in _DERIVED:
        return _derived(constants, value, producer)
    if value.const_value is None and computable(producer) and constants.opset:
        return _computed(constants, value, producer)
    if value.const_value is None and not is_onnx(producer, "Constant"):
        return Declined.because(f"weight '{label(value)}' is not constant")
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError as e:
        return Declined.because(f"weight '{label(value)}' is a malformed Constant: {e}")
    shape = None if tensor is None or tensor.dtype is None else _static_shape(tensor)
    if shape is None:
        return Declined.because(f"weight '{label(value)}' is not constant")
    return Constant((value,), shape, tensor.dtype, tensor.numpy)


def shape_of_static(node: ir.Node | None) -> np.ndarray | None:
    """What a ``Shape`` (with its ``start``/``end``) or ``Size`` node gives, when the model fixes
    its input's shape (every dim a number): the same on every run, so a constant; else None."""
    if not (is_onnx(node, "Shape") or is_onnx(node, "Size")) or not node.inputs:
        return None
    data = node.inputs[0]
    if data is None or data.shape is None or not data.shape.is_static():
        return None
    dims = np.array([int(d) for d in data.shape], np.int64)
    if node.op_type == "Size":
        return np.array(int(np.prod(dims)), np.int64)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", None)
    return dims[start:end].copy()


def _computed(constants: Constants, value: ir.Value, node: ir.Node) -> Constant | Declined:
    """``value`` computed by ``node`` from constants only, or why it is not a constant."""
    if constants.varies(value):
        return Declined.because(f"weight '{label(value)}' is not constant")
    constants.resolve_sources(node)
    inputs: list[Constant | None] = []
    for source in node.inputs:
        found = None if source is None else constants.resolve(source)
        if isinstance(found, Declined):
            return found
        inputs.append(found)
    return computed_constant(value, node, inputs, constants.opset)


def _static_shape(tensor: ir.TensorProtocol) -> tuple[int, ...] | None:
    """The tensor's dims, or None if any is symbolic."""
    if type(tensor) is ir.serde.TensorProtoTensor:  # read the proto's dims: no Shape is built
        return tuple(tensor.raw.dims)
    if not tensor.shape.is_static():
        return None
    return tuple(int(d) for d in tensor.shape)


def _derived(constants: Constants, value: ir.Value, node: ir.Node) -> Constant | Declined:
    """A constant computed from another by one of ``_DERIVED``."""
    if not node.inputs or node.inputs[0] is None or len(node.outputs) != 1:
        return Declined.because(f"weight '{label(value)}' is not constant")
    source = constants.resolve(node.inputs[0])
    if isinstance(source, Declined):
        return source
    derive = {
        "Identity": _identity,
        "Transpose": _transpose,
        "Cast": _cast,
        "Reshape": _reshape,
        "Squeeze": _squeeze,
        "Unsqueeze": _unsqueeze,
    }[node.op_type]
    found = derive(constants, node, source)
    if found is None:
        return Declined.because(f"weight '{label(value)}' is not constant")
    shape, dtype, load = found
    return Constant((value, *source.chain), shape, dtype, load, source.stored, source.computed_by)


_Derived = tuple[tuple[int, ...], ir.DataType, Callable[[], np.ndarray]] | None


def _identity(constants: Constants, node: ir.Node, source: Constant) -> _Derived:
    return source.shape, source.dtype, source.load


def _transpose(constants: Constants, node: ir.Node, source: Constant) -> _Derived:
    rank = len(source.shape)
    perm = node.attributes.get_ints("perm", None)
    perm = list(range(rank))[::-1] if perm is None else list(perm)
    if sorted(perm) != list(range(rank)):
        return None
    shape = tuple(source.shape[p] for p in perm)
    return shape, source.dtype, lambda: np.transpose(source.array(), perm)


def _cast(constants: Constants, node: ir.Node, source: Constant) -> _Derived:
    to = node.attributes.get_int("to", None)
    if to is None or node.attributes.get_int("saturate", 1) != 1:
        return None
    dtype = ir.DataType(to)
    try:
        np_dtype = dtype.numpy()
    except TypeError:
        return None
    return source.shape, dtype, lambda: source.array().astype(np_dtype)


def _reshape(constants: Constants, node: ir.Node, source: Constant) -> _Derived:
    if len(node.inputs) < 2:
        return None
    target = constants.resolve(node.inputs[1])
    if isinstance(target, Declined) or target.dtype != ir.DataType.INT64:
        return None
    dims = [int(d) for d in np.asarray(target.array()).reshape(-1)]
    if not node.attributes.get_int("allowzero", 0):
        dims = [
            source.shape[i] if d == 0 and i < len(source.shape) else d for i, d in enumerate(dims)
        ]
    try:
        shape = np.empty(source.shape, dtype=np.bool_).reshape(dims).shape
    except ValueError:
        return None
    return shape, source.dtype, lambda: np.reshape(source.array(), shape)


def axes_of(constants: Constants, node: ir.Node) -> list[int] | None:
    """``axes`` of a Squeeze/Unsqueeze (or a reduction) as written: from its second input
    (Squeeze/Unsqueeze from opset 13) or its ``axes`` attribute (before); None when absent or
    not constant. onnxruntime loads only the form of the model's opset, so the form written is
    the opset's."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        found = constants.resolve(node.inputs[1])
        if isinstance(found, Declined) or found.dtype != ir.DataType.INT64:
            return None
        return [int(a) for a in np.asarray(found.array()).reshape(-1)]
    attr = node.attributes.get_ints("axes", None)
    return None if attr is None else list(attr)


def _normalized(axes: list[int], rank: int) -> list[int] | None:
    """``axes`` in ``0..rank-1`` (negative ones count from the end), or None if out of range or
    repeated."""
    found = sorted(a + rank if a < 0 else a for a in axes)
    if any(not 0 <= a < rank for a in found) or len(set(found)) != len(found):
        return None
    return found


def _unsqueeze(constants: Constants, node: ir.Node, source: Constant) -> _Derived:
    axes = axes_of(constants, node)
    axes = None if axes is None else _normalized(axes, len(source.shape) + len(axes))
    if axes is None:
        return None
    shape = list(source.shape)
    for axis in axes:  # ascending: each insertion is at its final position
        shape.insert(axis, 1)
    return tuple(shape), source.dtype, lambda: np.reshape(source.array(), shape)


def _squeeze(constants: Constants, node: ir.Node, source: Constant) -> _Derived:
    written = (len(node.inputs) > 1 and node.inputs[1] is not None) or "axes" in node.attributes
    if written:
        axes = axes_of(constants, node)
        axes = None if axes is None else _normalized(axes, len(source.shape))
    else:  # no axes: every dimension of size 1 goes
        axes = [i for i, d in enumerate(source.shape) if d == 1]
    if axes is None or any(source.shape[a] != 1 for a in axes):
        return None
    shape = tuple(d for i, d in enumerate(source.shape) if i not in axes)
    return shape, source.dtype, lambda: np.reshape(source.array(), shape)


def other_users(constant: Constant, owners: set[ir.Node]) -> list[ir.Node]:
    """Nodes outside ``owners`` (and outside the constant's own derivation) that read it."""
    chain = constant.chain
    if len(chain) == 1:  # the usual case, an initializer or a Constant read directly
        return [u.node for u in chain[0].uses() if u.node not in owners]
    derivation = {v.producer() for v in chain}
    users: list[ir.Node] = []
    for v in constant.chain:
        users.extend(u.node for u in v.uses() if u.node not in owners and u.node not in derivation)
    return users


def parameter_count(constants: Constants, value: ir.Value | None) -> int:
    """Elements held by ``value`` as a weight: its constant's size, or its static shape's."""
    size = recorded_size(value)
    if size is not None:
        return size  # a recorded static shape is the constant's (nothing resolved)
    found = constants.resolve(value)
    if isinstance(found, Constant):
        return found.size
    if value is None or value.shape is None or not value.shape.is_static():
        return 0
    return int(np.prod(value.shape.numpy(), dtype=np.int64))


def recorded_size(value: ir.Value | None) -> int | None:
    """Elements of the static shape onnx-ir recorded for ``value``, or None (nothing resolved)."""
    dims = value.shape.dims if value is not None and value.shape is not None else None
    if dims is None or not all(type(d) is int for d in dims):
        return None
    return math.prod(dims)


def remove_if_unused(value: ir.Value | None) -> None:
    """Drop an initializer, ``Constant`` node, or the node deriving a weight from another
    (``Identity``, ``Transpose``, ``Cast``, ``Reshape``, ``Squeeze``, ``Unsqueeze``), once nothing
    uses it any more; then its sources (and a shape or axes it read) likewise."""
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    producer = value.producer()
    if value.is_initializer() and value.graph is not None and value.name:
        value.graph.initializers.pop(value.name, None)
    elif producer is not None and producer.graph is not None and is_onnx(producer):
        if producer.op_type == "Constant":
            producer.graph.remove(producer, safe=True)
        elif _computes_only_unread(producer):
            sources = list(producer.inputs)  # safe removal detaches the node's inputs
            producer.graph.remove(producer, safe=True)
            for source in sources:
                remove_if_unused(source)


def _computes_only_unread(node: ir.Node) -> bool:
    """``node`` derives or computes values from others (and nothing else) and no output of it
    is read any more: removing it changes nothing."""
    derives = node.op_type in _DERIVED and len(node.outputs) == 1
    if not derives and not computable(node):
        return False
    return not any(v.uses() or v.is_graph_output() for v in node.outputs)
