"""Values computed only from constants: constants too, evaluated node by node when asked.

PEFT's adapters reach an export as the *computation* of their delta weight rather than the
weight: ``MatMul(B, A)`` scaled, LoHa's Hadamard product of two low-rank products, LoKr's
``kron``, HRA's Householder products, FourierFT's ``ScatterND`` + inverse ``DFT``, VBLoRA's
``TopK``/``Softmax``/``Gather`` over a vector bank, DoRA's ``ReduceL2`` column norms. Every such
value is a constant: an ONNX op of the default domain with no subgraph and no randomness, whose
inputs are all constant, computes the same array on every run.

:func:`computed_constant` answers for the output of such a node. It reads no weight when the
value's shape and type are recorded (an export records them): the array is evaluated on demand,
when a merge computes, by onnx's reference evaluator (:mod:`onnx.reference`), one node at a time
at the model's opset: a maintained implementation of every standard op, not one written here.
Where the op allows (arithmetic, products, reductions and views of floats), the evaluation runs
in float64, so that a merge rounds once; other ops (``TopK``, comparisons, ...) run in the
model's types, as a runtime would. A small value (inputs of at most :data:`EAGER_ELEMENTS`
elements) whose shape is not recorded is evaluated at once to learn it.

What cannot be answered is a :class:`~converter.fusion.core.declined.Declined` with the reason:
more elements than :data:`MAX_ELEMENTS` (the bound on what one evaluation may build), an op the
evaluator cannot compute, a shape that differs from the one the model records. A failure found
only when a merge asks for the array (a lazily evaluated weight) raises :class:`NotComputable`,
which the engine turns into that merge's reason.

The nodes that computed a constant are removed once nothing reads them
(:func:`converter.fusion.core.constants.remove_if_unused`); nothing here writes a folded value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from converter.fusion.core.declined import Declined
from converter.fusion.core.dtypes import FLOAT_TYPES
from converter.fusion.core.graph import is_onnx, label

if TYPE_CHECKING:
    from converter.fusion.core.constants import Constant

__all__ = [
    "EAGER_ELEMENTS",
    "MAX_ELEMENTS",
    "NotComputable",
    "computable",
    "computed_constant",
    "distinct_sources",
    "node_proto",
    "run_node",
]

#: The most elements one evaluated constant (and each input it reads) may hold: 64 Mi
#: (512 MB in float64), four 4096 x 4096 deltas.
MAX_ELEMENTS = 1 << 26

#: Inputs of at most this many elements in all are evaluated at once when the output's shape is
#: not recorded (shape arithmetic, vectors, small factors).
EAGER_ELEMENTS = 1 << 16

# Never constant, though all their inputs may be: their outputs differ from run to run.
_RANDOM = frozenset(
    {
        "Bernoulli",
        "Dropout",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)

# Handled by the resolver itself (their data is the constant) or not tensors at all.
_NOT_COMPUTED = frozenset({"Constant", "Optional", "OptionalGetElement", "OptionalHasElement"})

# Ops whose float results only gain precision when evaluated in float64: arithmetic, products,
# reductions, and ops that move elements without looking at their values.
_WIDENS = frozenset(
    {
        "Abs", "Add", "Concat", "DFT", "Div", "Einsum", "Exp", "Expand", "Flatten", "Gather",
        "GatherElements", "GatherND", "Gemm", "Identity", "Log", "MatMul", "Mul", "Neg", "Pad",
        "Pow", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare", "Reshape", "ScatterElements", "ScatterND",
        "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tile", "Transpose",
        "Trilu", "Unsqueeze", "Where", "Cos", "Sin", "Tanh", "Sigmoid", "Erf",
    }
)  # fmt: skip


class NotComputable(Exception):
    """A lazily evaluated constant could not be computed when a merge asked for its array."""


def computable(node: ir.Node | None) -> bool:
    """``node`` computes the same outputs on every run from the same inputs, so constant inputs
    make constant outputs: a default-domain op without subgraphs or randomness."""
    if node is None or not is_onnx(node) or node.op_type in _RANDOM | _NOT_COMPUTED:
        return False
    return not any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for a in node.attributes.values()
    ) and not any(a.is_ref() for a in node.attributes.values())


def computed_constant(
    value: ir.Value, node: ir.Node, inputs: Sequence[Constant | None], opset: int
) -> Constant | Declined:
    """The constant ``value`` (an output of ``node``, whose inputs are the constants ``inputs``,
    None where an optional input is absent), or why it cannot be one."""
    from converter.fusion.core.constants import Constant

    name = label(value)
    too_big = next((c for c in inputs if c is not None and c.size > MAX_ELEMENTS), None)
    if too_big is not None:
        return _over_bound(name, too_big.size)
    index = list(node.outputs).index(value)
    evaluate = _evaluator(node, inputs, index, opset)
    stored = sum(c.stored for c in distinct_sources(inputs))
    recorded = _recorded(value) or _inferred(node, inputs, index, opset)
    if recorded is not None and math.prod(recorded[0]) > MAX_ELEMENTS:
        return _over_bound(name, math.prod(recorded[0]))
    if recorded is not None and math.prod(recorded[0]) > EAGER_ELEMENTS:
        shape, dtype = recorded  # a weight: evaluated when a merge computes
        return Constant((value,), shape, dtype, _checked(evaluate, shape, name), stored, node)
    if recorded is None and sum(c.size for c in inputs if c is not None) > EAGER_ELEMENTS:
        return Declined.because(
            f"weight '{name}' is computed from constants ({node.op_type}), but its shape is "
            f"not recorded and its inputs are too large to evaluate just to learn it"
        )
    try:  # small: evaluated now, so that no later read can fail
        array = _checked(evaluate, recorded[0], name)() if recorded else evaluate()[0]
    except NotComputable as e:
        return Declined.because(str(e))
    dtype = recorded[1] if recorded else _dtype_of(array, node, inputs)
    if dtype is None:
        return Declined.because(f"weight '{name}' is computed as {array.dtype}, not a tensor type")
    return Constant((value,), tuple(array.shape), dtype, lambda: array, stored, node)


def _over_bound(name: str, size: int) -> Declined:
    return Declined.because(
        f"weight '{name}' is computed from constants, but {size} elements is over the "
        f"{MAX_ELEMENTS}-element bound of one evaluation"
    )


def _recorded(value: ir.Value) -> tuple[tuple[int, ...], ir.DataType] | None:
    """The static shape and the dtype the model records for ``value``, or None."""
    if value.dtype is None or value.shape is None or not value.shape.is_static():
        return None
    return tuple(int(d) for d in value.shape), value.dtype


def _inferred(
    node: ir.Node, inputs: Sequence[Constant | None], index: int, opset: int
) -> tuple[tuple[int, ...], ir.DataType] | None:
    """The static shape and dtype onnx's shape inference gives output ``index`` of ``node`` from
    its inputs' shapes (no data read: ops whose output shape depends on input values, such as
    Reshape, are not answered), or None."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        types = {
            f"in{i}": onnx.helper.make_tensor_type_proto(int(c.dtype), list(c.shape))
            for i, c in enumerate(inputs)
            if c is not None
        }
        found = onnx.shape_inference.infer_node_outputs(schema, node_proto(node), types)
    except Exception:  # no schema, or inference refuses: the shape is simply unknown
        return None
    tensor = found.get(f"out{index}")
    if tensor is None or not tensor.tensor_type.HasField("shape"):
        return None
    dims = tensor.tensor_type.shape.dim
    if not all(d.HasField("dim_value") for d in dims) or not tensor.tensor_type.elem_type:
        return None
    return tuple(d.dim_value for d in dims), ir.DataType(tensor.tensor_type.elem_type)


def _dtype_of(
    array: np.ndarray, node: ir.Node, inputs: Sequence[Constant | None]
) -> ir.DataType | None:
    """The type the op computes, when the model does not record it: a float evaluated in
    float64 has the type of the op's float inputs (or a Cast's ``to``), anything else its own."""
    if array.dtype == np.float64:
        if node.op_type == "Cast":
            return ir.DataType(node.attributes.get_int("to", ir.DataType.DOUBLE))
        floats = [c.dtype for c in inputs if c is not None and c.dtype in FLOAT_TYPES]
        if floats:
            return floats[0]
    try:
        return ir.DataType.from_numpy(array.dtype)
    except TypeError:
        return None


def distinct_sources(inputs: Sequence[Constant | None]) -> list[Constant]:
    """The constants, each source once (None skipped): what reading them all holds."""
    seen: dict[int, Constant] = {}
    for c in inputs:
        if c is not None:
            seen.setdefault(id(c.chain[-1]), c)
    return list(seen.values())


def _checked(
    evaluate: Callable[[], tuple[np.ndarray, bool]], shape: tuple[int, ...], name: str
) -> Callable[[], np.ndarray]:
    """``evaluate``'s array, refused (:class:`NotComputable`) unless of the recorded shape."""

    def load() -> np.ndarray:
        array, _ = evaluate()
        if tuple(array.shape) != shape:
            raise NotComputable(
                f"weight '{name}' is computed with shape {list(array.shape)}, not the "
                f"{list(shape)} the model records"
            )
        return array

    return load


def _evaluator(
    node: ir.Node, inputs: Sequence[Constant | None], index: int, opset: int
) -> Callable[[], tuple[np.ndarray, bool]]:
    """A function evaluating output ``index`` of ``node`` from its constant inputs:
    ``(array, widened)``, widened when the array is float64 standing for a narrower float."""
    proto = node_proto(node)
    widen = node.op_type in _WIDENS or _float_cast(node)

    def evaluate() -> tuple[np.ndarray, bool]:
        arrays = [None if c is None else _input_array(c, widen) for c in inputs]
        if _float_cast(node) and arrays[0] is not None and arrays[0].dtype == np.float64:
            return arrays[0], True  # a cast between floats: rounded once, by the merge
        feeds = {f"in{i}": a for i, a in enumerate(arrays) if a is not None}
        try:
            outputs = onnx.reference.ReferenceEvaluator(proto, opsets={"": opset}).run(None, feeds)
        except Exception as e:  # the evaluator's failure is the reason, whatever its kind
            raise NotComputable(
                f"weight '{label(node.outputs[index])}' is computed from constants by "
                f"{node.op_type}, which the evaluator cannot compute: {_one_line(e)}"
            ) from e
        array = np.asarray(outputs[index])
        return array, widen and array.dtype == np.float64

    return evaluate


def run_node(
    node: ir.Node,
    arrays: Sequence[np.ndarray | None],
    opset: int,
    domains: Mapping[str, int] | None = None,
) -> list[np.ndarray]:
    """``node`` evaluated on ``arrays`` (one per input, None where absent) by onnx's reference
    evaluator at ``opset`` (and, for an op of another domain, an ONNX-ML op, at that domain's
    version in ``domains``, else 1): its outputs. Raises :class:`NotComputable` when it cannot."""
    feeds = {f"in{i}": a for i, a in enumerate(arrays) if a is not None}
    opsets = {"": opset}
    if node.domain not in ("", "ai.onnx"):
        opsets[node.domain] = (domains or {}).get(node.domain, 1)
    try:
        evaluator = onnx.reference.ReferenceEvaluator(node_proto(node), opsets=opsets)
        return [np.asarray(a) for a in evaluator.run(None, feeds)]
    except Exception as e:  # the evaluator's failure is the reason, whatever its kind
        raise NotComputable(
            f"{node.op_type} '{node.name}' cannot be evaluated: {_one_line(e)}"
        ) from e


def _input_array(constant: Constant, widen: bool) -> np.ndarray:
    """A constant's array as an input of an evaluation: float64 when the op widens, in its own
    type otherwise (a float64 array standing for a float32 value is rounded back first)."""
    array = np.asarray(constant.array())
    if constant.dtype not in FLOAT_TYPES or constant.dtype == ir.DataType.DOUBLE:
        return array
    if widen:
        return array.astype(np.float64)
    return array.astype(constant.dtype.numpy())


def _float_cast(node: ir.Node) -> bool:
    """``node`` is a ``Cast`` to a float type (of a float, when evaluated widened)."""
    if node.op_type != "Cast":
        return False
    to = node.attributes.get_int("to", None)
    return to is not None and ir.DataType(to) in FLOAT_TYPES


def node_proto(node: ir.Node) -> onnx.NodeProto:
    """``node`` alone as a NodeProto, its inputs named ``in0``.. and outputs ``out0``.."""
    proto = ir.serde.serialize_node(node)
    del proto.input[:]
    proto.input.extend(f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs))
    del proto.output[:]
    proto.output.extend(f"out{i}" for i in range(len(node.outputs)))
    return proto


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
