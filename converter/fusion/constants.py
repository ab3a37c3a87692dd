"""The one answer to "is this value constant, and what is its array".

A value is constant when it is

- an initializer that is *not* also a graph input (older exporters list initializers as inputs,
  which lets a caller override them at run time),
- the output of a ``Constant`` node (``value``, ``value_float(s)``, ``value_int(s)``),
- ``Identity`` of a constant (torch's exporters deduplicate equal initializers and hand them out
  through ``Identity``), ``Transpose`` of one (exports without constant folding write weights as
  ``Transpose(W)``), ``Cast`` of one, ``Reshape`` of one by a constant shape, or ``Unsqueeze`` or
  ``Squeeze`` of one by constant axes (a per-channel vector shaped ``(C, 1, 1)`` for the
  ``Mul``/``Add`` after a ``Conv``),

and no training algorithm in ``training_info`` updates it. Sparse constants are not represented:
onnx-ir cannot load them, so such a model is refused at load time and never reaches this module.

:func:`resolve` reads shapes, not weights: the array is built on demand by
:meth:`Constant.array`, so recognising every op of a multi-gigabyte model touches no weight.
Recognition, the cost model, size accounting and clean-up all ask this module.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from converter.model_io import training

__all__ = [
    "Constant",
    "NotConstant",
    "resolve",
    "axes_of",
    "constant_array",
    "is_onnx",
    "label",
    "other_users",
    "parameter_count",
    "recorded_size",
    "remove_if_unused",
]


def is_onnx(node: ir.Node | None, op_type: str | None = None) -> bool:
    """``node`` is a standard ONNX op (default domain), of ``op_type`` if given."""
    return (
        node is not None
        and node.domain in ("", "ai.onnx")
        and (op_type is None or node.op_type == op_type)
    )


def label(value: ir.Value | None) -> str:
    """A value's name for messages."""
    return "<missing>" if value is None else value.name or "<unnamed>"


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
    size: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", math.prod(self.shape))

    @property
    def value(self) -> ir.Value:
        return self.chain[0]

    def array(self) -> np.ndarray:
        """The constant's array (a memory map for external data: reading it reads the file)."""
        return self.load()


@dataclass(frozen=True)
class NotConstant:
    """Why a value is not a usable constant, in words a user can act on."""

    reason: str


_DERIVED = ("Identity", "Transpose", "Cast", "Reshape", "Squeeze", "Unsqueeze")


# Each value's answer, kept while the value lives (a weak key: it goes with the model).
_CACHE: weakref.WeakKeyDictionary[ir.Value, Constant | NotConstant] = weakref.WeakKeyDictionary()


def resolve(value: ir.Value | None) -> Constant | NotConstant:
    """The :class:`Constant` behind ``value``, or :class:`NotConstant` with the reason.

    The answer is remembered while the value lives: merges never change a constant, they only
    make new values, and a value whose producer a merge removed is read by nobody.
    """
    if value is None:
        return NotConstant("input is missing")
    cached = _CACHE.get(value)
    if cached is None:
        cached = _resolve(value)
        _CACHE[value] = cached
    if isinstance(cached, Constant) and training.any_trained():  # marked after the cache was made
        trained = next((v for v in cached.chain if training.is_trained(v)), None)
        if trained is not None:
            return NotConstant(f"weight '{label(trained)}' is trained by the model's training_info")
    return cached


def _resolve(value: ir.Value) -> Constant | NotConstant:
    if value.is_graph_input():
        return NotConstant(
            f"weight '{label(value)}' is a graph input (it can be overridden at run time)"
        )
    if training.is_trained(value):
        return NotConstant(f"weight '{label(value)}' is trained by the model's training_info")
    producer = value.producer()
    if value.const_value is None and is_onnx(producer) and producer.op_type in _DERIVED:
        return _derived(value, producer)
    if value.const_value is None and not is_onnx(producer, "Constant"):
        return NotConstant(f"weight '{label(value)}' is not constant")
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError as e:
        return NotConstant(f"weight '{label(value)}' is a malformed Constant: {e}")
    shape = None if tensor is None or tensor.dtype is None else _static_shape(tensor)
    if shape is None:
        return NotConstant(f"weight '{label(value)}' is not constant")
    return Constant((value,), shape, tensor.dtype, tensor.numpy)


def _static_shape(tensor: ir.TensorProtocol) -> tuple[int, ...] | None:
    """The tensor's dims, or None if any is symbolic."""
    if type(tensor) is ir.serde.TensorProtoTensor:  # read the proto's dims: no Shape is built
        return tuple(tensor.raw.dims)
    if not tensor.shape.is_static():
        return None
    return tuple(int(d) for d in tensor.shape)


def _derived(value: ir.Value, node: ir.Node) -> Constant | NotConstant:
    """A constant computed from another by one of ``_DERIVED``."""
    if not node.inputs or node.inputs[0] is None or len(node.outputs) != 1:
        return NotConstant(f"weight '{label(value)}' is not constant")
    source = resolve(node.inputs[0])
    if isinstance(source, NotConstant):
        return source
    derive = {
        "Identity": _identity,
        "Transpose": _transpose,
        "Cast": _cast,
        "Reshape": _reshape,
        "Squeeze": _squeeze,
        "Unsqueeze": _unsqueeze,
    }[node.op_type]
    found = derive(node, source)
    if found is None:
        return NotConstant(f"weight '{label(value)}' is not constant")
    shape, dtype, load = found
    return Constant((value, *source.chain), shape, dtype, load)


_Derived = tuple[tuple[int, ...], ir.DataType, Callable[[], np.ndarray]] | None


def _identity(node: ir.Node, source: Constant) -> _Derived:
    return source.shape, source.dtype, source.load


def _transpose(node: ir.Node, source: Constant) -> _Derived:
    rank = len(source.shape)
    perm = node.attributes.get_ints("perm", None)
    perm = list(range(rank))[::-1] if perm is None else list(perm)
    if sorted(perm) != list(range(rank)):
        return None
    shape = tuple(source.shape[p] for p in perm)
    return shape, source.dtype, lambda: np.transpose(source.array(), perm)


def _cast(node: ir.Node, source: Constant) -> _Derived:
    to = node.attributes.get_int("to", None)
    if to is None or node.attributes.get_int("saturate", 1) != 1:
        return None
    dtype = ir.DataType(to)
    try:
        np_dtype = dtype.numpy()
    except TypeError:
        return None
    return source.shape, dtype, lambda: source.array().astype(np_dtype)


def _reshape(node: ir.Node, source: Constant) -> _Derived:
    if len(node.inputs) < 2:
        return None
    target = resolve(node.inputs[1])
    if isinstance(target, NotConstant) or target.dtype != ir.DataType.INT64:
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


def axes_of(node: ir.Node) -> list[int] | None:
    """``axes`` of a Squeeze/Unsqueeze (or a reduction) as written: from its second input
    (Squeeze/Unsqueeze from opset 13) or its ``axes`` attribute (before); None when absent or
    not constant. onnxruntime loads only the form of the model's opset, so the form written is
    the opset's."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        found = resolve(node.inputs[1])
        if isinstance(found, NotConstant) or found.dtype != ir.DataType.INT64:
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


def _unsqueeze(node: ir.Node, source: Constant) -> _Derived:
    axes = axes_of(node)
    axes = None if axes is None else _normalized(axes, len(source.shape) + len(axes))
    if axes is None:
        return None
    shape = list(source.shape)
    for axis in axes:  # ascending: each insertion is at its final position
        shape.insert(axis, 1)
    return tuple(shape), source.dtype, lambda: np.reshape(source.array(), shape)


def _squeeze(node: ir.Node, source: Constant) -> _Derived:
    written = (len(node.inputs) > 1 and node.inputs[1] is not None) or "axes" in node.attributes
    if written:
        axes = axes_of(node)
        axes = None if axes is None else _normalized(axes, len(source.shape))
    else:  # no axes: every dimension of size 1 goes
        axes = [i for i, d in enumerate(source.shape) if d == 1]
    if axes is None or any(source.shape[a] != 1 for a in axes):
        return None
    shape = tuple(d for i, d in enumerate(source.shape) if i not in axes)
    return shape, source.dtype, lambda: np.reshape(source.array(), shape)


def constant_array(value: ir.Value | None) -> tuple[np.ndarray | None, str | None]:
    """``(array, None)`` for a constant ``value``, else ``(None, reason)``."""
    found = resolve(value)
    if isinstance(found, NotConstant):
        return None, found.reason
    return found.array(), None


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


def parameter_count(value: ir.Value | None) -> int:
    """Elements held by ``value`` as a weight: its constant's size, or its static shape's."""
    size = recorded_size(value)
    if size is not None:
        return size  # a recorded static shape is the constant's (nothing resolved)
    found = resolve(value)
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
        elif producer.op_type in _DERIVED and len(producer.outputs) == 1:
            sources = list(producer.inputs)  # safe removal detaches the node's inputs
            producer.graph.remove(producer, safe=True)
            for source in sources:
                remove_if_unused(source)
