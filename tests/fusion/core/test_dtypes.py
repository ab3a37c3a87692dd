"""Tests for ``converter.fusion.core.dtypes``: rounding once to the model's dtype, overflow.

References are computed independently with numpy (round to nearest, ties to even, on the
significand), never through the function under test.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converter.fusion.core.declined import Declined
from converter.fusion.core.dtypes import (
    FLOAT_TYPES,
    dtype_name,
    overflow,
    overflow_reason,
    round_to_dtype,
)

DTYPES = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16]
seeds = st.integers(0, 2**32 - 1)


# --- rounding and overflow --------------------------------------------------------------------


MANTISSA_BITS = {np.float16: 11, np.float32: 24, np.float64: 53, ml_dtypes.bfloat16: 8}


def _round_nearest_even(x: np.ndarray, bits: int) -> np.ndarray:
    """Round float64 values in a dtype's normal range to ``bits`` significant bits, ties to even."""
    mantissa, exponent = np.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return np.ldexp(np.rint(np.ldexp(mantissa, bits)), exponent - bits)  # exact, rint ties to even


@settings(deadline=None, max_examples=80)
@given(st.sampled_from(DTYPES), seeds, st.integers(1, 20))
def test_round_to_dtype_matches_astype_of_float64(dtype, seed, size):
    a = np.random.default_rng(seed).standard_normal(size) * 100.0
    out = round_to_dtype(a, dtype)
    assert out.dtype == np.dtype(dtype)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, a.astype(dtype))


@settings(deadline=None, max_examples=80)
@given(st.sampled_from([np.float16, np.float32, np.float64]), seeds)
def test_round_to_dtype_rounds_once(dtype, seed):
    """Correct rounding of the float64 value (ties to even), not via an intermediate format."""
    rng = np.random.default_rng(seed)
    bits = MANTISSA_BITS[dtype]
    # exact ties, ties to the odd neighbour, and values just past a tie (double-rounding traps)
    crafted = [1 + 2.0**-bits, 1 + 3 * 2.0**-bits, 1 + 2.0**-bits * (1 + 2.0**-20)]
    a = np.concatenate([rng.uniform(1.0, 2.0, 50), crafted])
    a = (
        a * rng.choice([-1.0, 1.0], a.size) * 2.0 ** rng.integers(-14, 15, a.size)
    )  # float16 normals
    expected = _round_nearest_even(a, bits)
    np.testing.assert_array_equal(round_to_dtype(a, dtype).astype(np.float64), expected)


# Each value sits just above a bfloat16 rounding midpoint, by less than half a float32 ulp:
# rounding to float32 first lands exactly on the midpoint, and ties-to-even then rounds down.
BF16_DOUBLE_ROUNDING = np.array([1 + 2**-8 + 2**-30, 3 + 2**-7 + 2**-28, -(1 + 2**-8 + 2**-29)])


def test_round_to_dtype_rounds_once_for_bfloat16():
    expected = _round_nearest_even(BF16_DOUBLE_ROUNDING, MANTISSA_BITS[ml_dtypes.bfloat16])
    actual = round_to_dtype(BF16_DOUBLE_ROUNDING, ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(actual, expected)  # actual is [1, 3, -1], expected one ulp away


@settings(deadline=None, max_examples=50)
@given(st.sampled_from(DTYPES), seeds)
def test_overflow_reason_is_none_for_representable_values(dtype, seed):
    a = np.random.default_rng(seed).standard_normal((3, 4)) * 1000.0
    assert overflow_reason(a, dtype) is None
    assert overflow_reason(np.zeros((0, 4)), dtype) is None


def test_overflow_reason_names_float16_and_its_limit():
    assert overflow_reason(np.array([65504.0, -65504.0]), np.float16) is None
    reason = overflow_reason(np.array([[1.0, -70000.0]]), np.float16)
    assert reason is not None and "float16" in reason and "65504" in reason and "70000" in reason


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("dtype", DTYPES)
def test_overflow_reason_rejects_non_finite(value, dtype):
    assert overflow_reason(np.array([1.0, value]), dtype) == "merged values are not finite"


def test_overflow_reason_uses_bfloat16_limit():
    limit = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    assert overflow_reason(np.array([70000.0, 1e38, -limit]), ml_dtypes.bfloat16) is None
    reason = overflow_reason(np.array([1e39]), ml_dtypes.bfloat16)
    assert reason is not None and "bfloat16" in reason and "3.38953e+38" in reason
    assert "float32" in overflow_reason(np.array([1e39]), np.float32)


def test_overflow_names_the_first_array_that_does_not_fit_and_skips_none():
    fits, too_big = np.array([1.0, 2.0]), np.array([1e6])
    assert overflow((fits, None), np.float16) is None
    found = overflow((fits, None, too_big), np.float16)
    assert isinstance(found, Declined) and found.nodes == []
    assert found.reason == "merged value 1e+06 overflows float16 (max 65504)"


def test_float_types_and_their_names():
    assert {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
        ir.DataType.DOUBLE,
    } == FLOAT_TYPES
    assert dtype_name(ir.DataType.FLOAT16) == "float16"
    assert dtype_name(ir.DataType.BFLOAT16) == "bfloat16"
    assert dtype_name(ir.DataType.INT64) == "int64"
    assert dtype_name(ir.DataType.UNDEFINED) == "undefined"  # numpy has no name for it
