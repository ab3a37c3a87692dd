"""Tests of converter.equivalence.compare: the comparison rule, default tolerances and statistics."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from converter.equivalence.compare import compare_arrays, default_tolerance


def test_dtype_and_shape_mismatches_in_compare_arrays():
    assert "dtype differs" in compare_arrays(np.ones(3, np.float32), np.ones(3)).reason
    stats = compare_arrays(np.ones((2, 3)), np.ones((1, 3)))
    assert not stats.passed and "shape differs" in stats.reason


def test_default_tolerances_per_dtype():
    assert default_tolerance(np.float32) == (1e-5, 1e-4)
    assert default_tolerance(np.float16) == (2.5e-3, 1e-3)
    assert default_tolerance(ml_dtypes.bfloat16) == (2e-2, 1e-2)
    assert default_tolerance(ir.DataType.DOUBLE) == (1e-8, 1e-7)
    assert default_tolerance(np.int64) == (0.0, 0.0)


def test_the_rule_is_atol_plus_rtol_times_expected():
    expected = np.array([0.0, 10.0, -10.0])
    ok = compare_arrays(
        expected, expected + np.array([1e-3, 1e-3 + 1e-2, -1e-3 - 1e-2]), atol=1e-3, rtol=1e-3
    )
    assert ok.passed and ok.tolerance_used == pytest.approx(1.0)
    bad = compare_arrays(expected, expected + np.array([0, 0.0115, 0]), atol=1e-3, rtol=1e-3)
    assert not bad.passed and bad.mismatches == 1 and bad.worst_index == (1,)
    assert bad.worst_expected == 10.0 and bad.max_rel_error == pytest.approx(0.00115)


def test_nan_equals_nan_and_same_sign_infinities_are_equal():
    values = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert compare_arrays(values, values.copy()).passed
    for wrong in (
        [0.0, np.inf, -np.inf, 1.0],
        [np.nan, -np.inf, -np.inf, 1.0],
        [np.nan, 1e30, -np.inf, 1.0],
    ):
        stats = compare_arrays(values, np.array(wrong, np.float32))
        assert not stats.passed and stats.mismatches == 1 and stats.max_abs_error == np.inf


def test_integer_outputs_are_exact_whatever_the_tolerance():
    assert compare_arrays(np.array([1, 2]), np.array([1, 2]), atol=5.0).passed
    stats = compare_arrays(np.array([1, 2]), np.array([1, 3]), atol=5.0)
    assert not stats.passed and stats.atol == 0.0
    assert not compare_arrays(np.array([True]), np.array([False])).passed
    big = np.array([2**60], np.int64)
    assert not compare_arrays(big, big + 1).passed  # equal once converted to float64
    assert not compare_arrays(np.array(["a"], object), np.array(["b"], object)).passed
