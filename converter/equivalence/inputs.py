"""Synthesise model inputs for equivalence trials, or load and check real ones.

Trial ``i`` with seed ``s`` draws every value from ``numpy.random.default_rng([s, i])``, so a
report's seed reproduces its inputs exactly.

Sizes. Dynamic dimensions get a value from size set A (even trials) or B (odd trials), so the
second trial uses different sizes and a broadcast or transpose mistake cannot hide behind a
square or repeated size:

========================================  ==========================  ==========================
dimension                                 set A                       set B
========================================  ==========================  ==========================
batch-like (see below)                    2                           3
unnamed, not at axis 0                    3                           4
named symbols, in order of first use      5, 7, 11, 13, 17, 19, 23,   6, 9, 10, 12, 14, 15, 18,
                                          then +2 each                then +2 each
========================================  ==========================  ==========================

A dimension is *batch-like* when it is unnamed at axis 0, or its symbol is ``N``, ``B``, ``bs``
or contains ``batch``. Dimensions that share a symbol share a value. ``input_shapes`` fixes an
input's whole shape and binds its symbols, so other inputs using the same symbol follow it.

Values, by element type:

* floating point: uniform in [-1, 1); every third trial (``i % 3 == 2``) uses [-8, 8) to
  exercise large magnitudes. Complex inputs get such real and imaginary parts.
* integer: uniform in [0, 8), never a cast of floats. An input used as the indices of a
  ``Gather`` or ``GatherElements`` stays below the data's size along ``axis`` when it is known.
* bool: random, with both values present whenever the tensor has two or more elements.
* string: words from a small fixed vocabulary.

Real inputs (an ``.npz`` file or a mapping) must name exactly the model's inputs, with the
model's element type, rank and fixed dimensions, and consistent sizes for shared symbols;
anything else is an :class:`~converter.errors.InputError` naming the input and what the
model expects.
"""

from __future__ import annotations

__all__ = [
    "TrialInputs",
    "check_inputs",
    "describe_input",
    "load_inputs_npz",
    "model_inputs",
    "synthesize_inputs",
    "trial_inputs",
]

import dataclasses
import itertools
import logging
import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from converter.errors import InputError

logger = logging.getLogger(__name__)

_BATCH_SIZES = (2, 3)
_UNNAMED_SIZES = (3, 4)
_NAMED_SIZES = ((5, 7, 11, 13, 17, 19, 23), (6, 9, 10, 12, 14, 15, 18))
_LARGE_SCALE = 8.0
_INT_HIGH = 8
_BATCH_NAME = re.compile(r"^(n|b|bs)$|batch", re.IGNORECASE)
_INDEXING_OPS = frozenset({"Gather", "GatherElements"})
_WORDS = ("alpha", "beta", "gamma", "delta", "", "onnx", "fuse", "x y")


@dataclasses.dataclass(frozen=True)
class TrialInputs:
    """The inputs of one trial.

    Attributes:
        index: The trial number (0 for real inputs).
        description: How the values were made, e.g. ``"uniform[-1,1], sizes A"``.
        dims: The value given to each symbolic dimension.
        values: Input name -> array, in the model's input order.
    """

    index: int
    description: str
    dims: Mapping[str, int]
    values: Mapping[str, np.ndarray]

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-serialisable summary (shapes and dtypes, not the values)."""
        return {
            "index": self.index,
            "description": self.description,
            "dims": dict(self.dims),
            "inputs": {
                name: {"shape": list(array.shape), "dtype": _array_dtype_name(array)}
                for name, array in self.values.items()
            },
        }


def model_inputs(model: ir.Model) -> list[ir.Value]:
    """Return the graph inputs that must be fed (inputs that are not initializers)."""
    initializers = model.graph.initializers
    return [value for value in model.graph.inputs if value.name not in initializers]


def describe_input(value: ir.Value) -> str:
    """Describe what the model expects for an input, e.g. ``float32[batch,?,3]``."""
    dtype = _dtype_name(value.dtype) if value.dtype is not None else "?"
    if not isinstance(value.type, (ir.TensorType, type(None))):
        return str(value.type)
    if value.shape is None:
        return f"{dtype}[unknown rank]"
    dims = ",".join(
        str(d) if _fixed(d) else (getattr(d, "value", None) or "?") for d in value.shape
    )
    return f"{dtype}[{dims}]"


def synthesize_inputs(
    model: ir.Model,
    *,
    trial: int = 0,
    seed: int = 0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> TrialInputs:
    """Make seeded random inputs for trial ``trial``, following the module's rules.

    Raises:
        InputError: ``input_shapes`` names an unknown input or contradicts the model, or an
            input has unknown rank or a type that cannot be synthesised.
    """
    inputs = model_inputs(model)
    size_set = trial % 2
    scale = _LARGE_SCALE if trial % 3 == 2 else 1.0
    symbols, shapes = _plan_shapes(inputs, size_set, input_shapes or {})
    rng = np.random.default_rng([seed, trial])
    values = {
        value.name: _random_array(
            value, shapes[value.name], rng, scale, _index_bound(value, shapes, symbols)
        )
        for value in inputs
    }
    bound = "8" if scale == _LARGE_SCALE else "1"
    description = f"uniform[-{bound},{bound}], sizes {'AB'[size_set]}"
    logger.debug("trial %d: %s, dims %s", trial, description, symbols)
    return TrialInputs(index=trial, description=description, dims=symbols, values=values)


def load_inputs_npz(path: str | os.PathLike, model: ir.Model) -> TrialInputs:
    """Load real inputs from an ``.npz`` file and check them against the model's inputs.

    Raises:
        InputError: The file cannot be read, or an array is missing, unknown, or has the
            wrong element type, rank or size (the message names the input).
    """
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise InputError(
                f"inputs file {path} is not an .npz archive (write it with numpy.savez)"
            )
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read inputs file {path}: {e}") from e
    trial = check_inputs(model, arrays, source=os.fspath(path))
    name = os.path.basename(os.fspath(path))
    return dataclasses.replace(trial, description=f"real inputs from {name}")


def check_inputs(
    model: ir.Model, arrays: Mapping[str, object], *, source: str = "inputs"
) -> TrialInputs:
    """Check real input arrays against the model; return them as trial 0, in input order.

    Args:
        model: The model whose inputs are fed.
        arrays: Input name -> array-like.
        source: What to call the arrays in error messages (e.g. the ``.npz`` path).

    Raises:
        InputError: A name is missing or unknown, or an array has the wrong element type,
            rank, fixed dimension, or a size that contradicts a shared symbol.
    """
    expected = {value.name: value for value in model_inputs(model)}
    unknown = [name for name in arrays if name not in expected]
    if unknown:
        raise InputError(
            f"{source}: '{unknown[0]}' is not an input of the model "
            f"(model inputs: {', '.join(expected) or 'none'})"
        )
    values = {}
    for name, value in expected.items():
        if name not in arrays:
            raise InputError(
                f"{source}: no array for model input '{name}' "
                f"(the model expects {describe_input(value)})"
            )
        array = _coerce_dtype(source, value, np.asarray(arrays[name]))
        _check_shape(source, value, array.shape)
        values[name] = array
    _check_shared_symbols(source, list(expected.values()), values)
    return TrialInputs(0, "real inputs", _bound_symbols(model, values), values)


def _dtype_name(dtype: ir.DataType) -> str:
    if dtype == ir.DataType.STRING:
        return "string"
    try:
        return np.dtype(dtype.numpy()).name
    except TypeError:
        return dtype.name.lower()


def _array_dtype_name(array: np.ndarray) -> str:
    return "string" if array.dtype.kind in "OUS" else array.dtype.name


def _plan_shapes(
    inputs: Sequence[ir.Value], size_set: int, input_shapes: Mapping[str, Sequence[int]]
) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    """Choose a concrete shape for every input; return (symbol values, input shapes)."""
    by_name = {value.name: value for value in inputs}
    symbols: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in input_shapes.items():
        if name not in by_name:
            raise InputError(
                f"--input-shape names '{name}', which is not a model input "
                f"(model inputs: {', '.join(by_name) or 'none'})"
            )
        shapes[name] = _apply_override(by_name[name], dims, symbols)
    named_sizes = _named_sizes(size_set)
    for value in inputs:
        if value.name not in shapes:
            shapes[value.name] = _default_shape(value, size_set, symbols, named_sizes)
    return symbols, shapes


def _named_sizes(size_set: int) -> Iterator[int]:
    table = _NAMED_SIZES[size_set]
    return itertools.chain(table, itertools.count(table[-1] + 2, 2))


def _apply_override(
    value: ir.Value, dims: Sequence[int], symbols: dict[str, int]
) -> tuple[int, ...]:
    """Check a user-given shape against the model and bind the symbols it covers."""
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise InputError(f"--input-shape {value.name}: dimensions must be >= 0, got {shape}")
    if value.shape is None:
        return shape
    _check_shape("--input-shape", value, shape)
    for axis, (dim, size) in enumerate(zip(value.shape, shape, strict=True)):
        if _is_named(dim) and symbols.setdefault(dim.value, size) != size:
            raise InputError(
                f"--input-shape {value.name}: dim {axis} ('{dim.value}') is {size} but "
                f"another input gives '{dim.value}' = {symbols[dim.value]}"
            )
    return shape


_PLACEHOLDER_NAMES = frozenset({None, "", "?", "-1", "unk__", "None"})


def _fixed(dim: int | ir.SymbolicDim) -> bool:
    """A dimension the model fixes; exporters write -1 (and some 0) for "unknown"."""
    return isinstance(dim, int) and dim > 0


def _is_named(dim: int | ir.SymbolicDim) -> bool:
    # Some exporters (Paddle) write "?" for every unknown dim: a placeholder, not a shared name.
    return not isinstance(dim, int) and dim.value not in _PLACEHOLDER_NAMES


def _default_shape(
    value: ir.Value, size_set: int, symbols: dict[str, int], named_sizes: Iterator[int]
) -> tuple[int, ...]:
    """Give every dynamic dimension of ``value`` its documented default size."""
    if value.shape is None:
        raise InputError(
            f"input '{value.name}' has unknown rank; pass --input-shape {value.name}:D1,D2 "
            "or --inputs FILE.npz"
        )
    shape = []
    for axis, dim in enumerate(value.shape):
        if _fixed(dim):
            shape.append(dim)
        elif not _is_named(dim):
            shape.append(_BATCH_SIZES[size_set] if axis == 0 else _UNNAMED_SIZES[size_set])
        elif dim.value in symbols:
            shape.append(symbols[dim.value])
        else:
            batch = _BATCH_NAME.search(dim.value)
            symbols[dim.value] = _BATCH_SIZES[size_set] if batch else next(named_sizes)
            shape.append(symbols[dim.value])
    return tuple(shape)


def _index_bound(
    value: ir.Value, shapes: Mapping[str, tuple[int, ...]], symbols: Mapping[str, int]
) -> int | None:
    """Return the smallest table size among the Gathers that use ``value`` as indices."""
    bounds = []
    for node, index in value.uses():
        if node.op_type not in _INDEXING_OPS or node.domain not in ("", "ai.onnx") or index != 1:
            continue
        data = node.inputs[0]
        if data is None or data.shape is None or len(data.shape) == 0:
            continue
        axis = node.attributes.get_int("axis", 0) % len(data.shape)
        dim = shapes[data.name][axis] if data.name in shapes else data.shape[axis]
        if isinstance(dim, ir.SymbolicDim):
            dim = symbols.get(dim.value) if _is_named(dim) else None
        if isinstance(dim, int) and dim > 0:
            bounds.append(dim)
    return min(bounds) if bounds else None


def _random_array(
    value: ir.Value,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    scale: float,
    bound: int | None,
) -> np.ndarray:
    """Draw one input's values following the module's per-type rules."""
    dtype = value.dtype
    if not isinstance(value.type, ir.TensorType) or dtype is None:
        raise InputError(
            f"input '{value.name}' has type {value.type}, which cannot be synthesised; "
            "pass --inputs FILE.npz"
        )
    if dtype.is_floating_point():
        return rng.uniform(-scale, scale, shape).astype(dtype.numpy())
    if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
        parts = rng.uniform(-scale, scale, (2, *shape))
        return (parts[0] + 1j * parts[1]).astype(dtype.numpy())
    if dtype == ir.DataType.BOOL:
        array = rng.integers(0, 2, shape).astype(np.bool_)
        if array.size >= 2:
            array.flat[0], array.flat[1] = False, True
        return array
    if dtype == ir.DataType.STRING:
        return rng.choice(np.array(_WORDS, dtype=object), size=shape)
    if dtype.is_integer():
        high = _INT_HIGH if bound is None else max(1, min(_INT_HIGH, bound))
        return rng.integers(0, high, shape).astype(dtype.numpy())
    raise InputError(
        f"input '{value.name}' has element type {dtype.name}, which cannot be synthesised; "
        "pass --inputs FILE.npz"
    )


def _coerce_dtype(source: str, value: ir.Value, array: np.ndarray) -> np.ndarray:
    """Return ``array`` if its element type is the input's (viewing raw 8/16-bit types)."""
    expected = value.dtype
    if expected is None:
        return array
    if expected == ir.DataType.STRING and array.dtype.kind in "OUS":
        return array.astype(object)
    if expected != ir.DataType.STRING:
        wanted = np.dtype(expected.numpy())
        if array.dtype == wanted:
            return array
        if array.dtype.kind == "V" and array.dtype.itemsize == wanted.itemsize:
            return array.view(wanted)  # e.g. bfloat16 saved by numpy as raw 2-byte void
    raise InputError(
        f"{source}: input '{value.name}' has dtype {_array_dtype_name(array)} but the model "
        f"expects {describe_input(value)}"
    )


def _check_shape(source: str, value: ir.Value, shape: tuple[int, ...]) -> None:
    if value.shape is None:
        return
    if len(shape) != len(value.shape):
        raise InputError(
            f"{source}: input '{value.name}' has rank {len(shape)} (shape {shape}) but the "
            f"model expects rank {len(value.shape)}: {describe_input(value)}"
        )
    for axis, (dim, size) in enumerate(zip(value.shape, shape, strict=True)):
        if _fixed(dim) and dim != size:
            raise InputError(
                f"{source}: input '{value.name}' has shape {shape} but the model expects "
                f"{describe_input(value)} (dim {axis} must be {dim})"
            )


def _check_shared_symbols(
    source: str, inputs: Sequence[ir.Value], values: Mapping[str, np.ndarray]
) -> None:
    """Check that dimensions sharing a symbol have the same size across all inputs."""
    seen: dict[str, tuple[int, str]] = {}
    for value in inputs:
        for dim, size in zip(value.shape or (), values[value.name].shape, strict=False):
            if not _is_named(dim):
                continue
            first = seen.setdefault(dim.value, (size, value.name))
            if first[0] != size:
                raise InputError(
                    f"{source}: input '{value.name}' has '{dim.value}' = {size} but input "
                    f"'{first[1]}' has '{dim.value}' = {first[0]} (the model expects them equal)"
                )


def _bound_symbols(model: ir.Model, values: Mapping[str, np.ndarray]) -> dict[str, int]:
    symbols: dict[str, int] = {}
    for value in model_inputs(model):
        for dim, size in zip(value.shape or (), values[value.name].shape, strict=False):
            if _is_named(dim):
                symbols.setdefault(dim.value, int(size))
    return symbols


def trial_inputs(
    model: ir.Model,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
    trials: int,
    seed: int,
) -> list[TrialInputs]:
    """Real inputs (a mapping or an ``.npz`` path) as one trial, or ``trials`` seeded
    synthetic ones (``input_shapes`` fixing the shapes it names)."""
    if inputs is not None and input_shapes:
        logger.warning("input_shapes ignored: real inputs are given")
    if isinstance(inputs, (str, os.PathLike)):
        return [load_inputs_npz(inputs, model)]
    if inputs is not None:
        return [check_inputs(model, inputs)]
    return [
        synthesize_inputs(model, trial=i, seed=seed, input_shapes=input_shapes)
        for i in range(trials)
    ]
