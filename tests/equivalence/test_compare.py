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


def test_compare_many_says_what_compare_arrays_says(monkeypatch):
    """Batched or not, each pair gets exactly the statistics of its own compare_arrays call."""
    from converter.equivalence import compare

    monkeypatch.setattr(compare, "_SMALL", 40)  # a "large" array below
    monkeypatch.setattr(compare, "_BATCH", 64)  # several batches per dtype
    rng = np.random.default_rng(7)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, 1.0, -2.0], np.float32)
    pairs = []
    for i, dtype in enumerate([np.float32] * 8 + [np.float16, np.float64] * 3):
        e = rng.uniform(-3, 3, rng.integers(1, 20)).astype(dtype)
        noise = rng.choice([0.0, 1e-7, 1e-3, 1.0], e.shape) * rng.uniform(-1, 1, e.shape)
        atol, rtol = [(None, None), (1e-3, None), (None, 0.0), (0.0, 1e-2)][i % 4]
        pairs.append((f"v{i}", e, (e + noise).astype(dtype), atol, rtol))
    pairs += [
        ("special", special, np.array([np.nan, np.inf, np.inf, np.nan, 1, -2], np.float32), 0, 0),
        ("same_special", special, special.copy(), None, None),
        ("scalar", np.array(1.5, np.float32), np.array(1.5001, np.float32), None, None),
        ("size_one", np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32), None, None),
        ("empty", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32), None, None),
        ("large", np.ones(41, np.float32), np.full(41, 1.5, np.float32), None, None),
        ("ints", np.arange(4), np.array([0, 1, 2, 4]), 5.0, None),
        ("bools", np.array([True, False]), np.array([True, False]), None, None),
        ("dtype", np.ones(3, np.float32), np.ones(3), None, None),
        ("shape", np.ones((2, 3), np.float32), np.ones((3, 2), np.float32), None, None),
        ("bf16", np.ones(3, ml_dtypes.bfloat16), np.ones(3, ml_dtypes.bfloat16), None, None),
        ("strings", np.array(["a", "b"], object), np.array(["a", "c"], object), None, None),
    ]
    batched = compare.compare_many(pairs, trial=2)
    one_by_one = [
        compare_arrays(
            e, a, atol=atol, rtol=rtol, name=n, trial=2, intermediate=True, summary=False
        )
        for n, e, a, atol, rtol in pairs
    ]
    assert [s.name for s in batched] == [p[0] for p in pairs]
    for got, want in zip(batched, one_by_one, strict=True):
        assert repr(got.to_dict()) == repr(want.to_dict()), want.name
    assert sum(not s.passed for s in batched) >= 8  # the failing cases are really exercised


def test_error_summaries_are_numpys_median_and_higher_p99():
    from converter.equivalence import compare

    rng = np.random.default_rng(11)
    for size in [*range(1, 40), 99, 100, 101, 199, 1000, 1001]:
        errors = np.abs(rng.standard_normal(size)) * rng.choice([1e-9, 1.0, 1e9])
        errors[rng.random(size) < 0.1] = np.inf
        errors[rng.random(size) < 0.1] = 0.0
        got = compare._summary("abs", errors.reshape(-1, 1) if size % 2 else errors)
        assert got == {
            "max_abs_error": float(errors.max()),
            "mean_abs_error": float(errors.mean()),
            "median_abs_error": float(np.median(errors)),
            "p99_abs_error": float(np.quantile(errors, 0.99, method="higher")),
        }, size
    scalar = compare._summary("rel", np.asarray(0.5))
    assert scalar == dict.fromkeys(
        ("max_rel_error", "mean_rel_error", "median_rel_error", "p99_rel_error"), 0.5
    )
