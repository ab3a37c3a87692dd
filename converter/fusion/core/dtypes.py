"""The float types a merge stores its values in: which they are, rounding once, overflow.

A merge computes in float64 and stores its result once in the model's dtype (float16, float32,
float64 or bfloat16): :func:`round_to_dtype` rounds each value once, and :func:`overflow`
refuses a result the dtype cannot hold (a merged value beyond its range, or not finite).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from converter.fusion.core.declined import Declined

__all__ = ["FLOAT_TYPES", "dtype_name", "overflow", "overflow_reason", "round_to_dtype"]

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


def dtype_name(dtype: ir.DataType) -> str:
    """numpy's name for ``dtype`` (``float32``), or onnx-ir's when numpy has none."""
    try:
        return np.dtype(dtype.numpy()).name
    except TypeError:
        return dtype.name.lower()


def round_to_dtype(a: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Round a float64 result once to the model's storage dtype (float16/32/64, bfloat16).

    ml_dtypes converts float64 to bfloat16 by way of float32, which rounds twice; so for
    bfloat16 we round the significand to its 8 bits in float64 first (ties to even), after which
    the cast is exact.
    """
    a = np.asarray(a, dtype=np.float64)
    if np.dtype(dtype) == ml_dtypes.bfloat16:
        mantissa, exponent = np.frexp(a)
        a = np.ldexp(np.rint(np.ldexp(mantissa, 8)), exponent - 8)
    return np.ascontiguousarray(a.astype(dtype))


def overflow_reason(a: np.ndarray, dtype: np.dtype | type) -> str | None:
    """Why ``a`` cannot be stored in ``dtype`` (non-finite, or beyond its range), or None if it can."""
    a = np.asarray(a, dtype=np.float64)
    # One reduction: the largest magnitude is NaN or inf exactly when some value is.
    peak = float(np.abs(a).max()) if a.size else 0.0
    if not math.isfinite(peak):
        return "merged values are not finite"
    dt = np.dtype(dtype)
    limit = _largest(dt)
    if peak > limit:
        return f"merged value {peak:.6g} overflows {dt.name} (max {limit:.6g})"
    return None


def overflow(arrays: Iterable[np.ndarray | None], dtype: np.dtype | type) -> Declined | None:
    """Why one of ``arrays`` (a merge's weight and bias; None skipped) cannot be stored in
    ``dtype`` (the first that cannot), or None if all can."""
    for array in arrays:
        reason = None if array is None else overflow_reason(array, dtype)
        if reason:
            return Declined.because(reason)
    return None


@functools.cache
def _largest(dt: np.dtype) -> float:
    """The largest finite value of the float dtype ``dt``."""
    return float(ml_dtypes.finfo(dt).max) if dt == ml_dtypes.bfloat16 else float(np.finfo(dt).max)
