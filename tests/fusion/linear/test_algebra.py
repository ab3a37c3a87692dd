"""Property tests for ``converter.fusion.linear.algebra``: merged maps, Gemm normalisation, cost model.

References are computed independently with numpy, following the ONNX definitions directly
(``Gemm: Y = alpha * A @ op(B) + beta * C``), never through :meth:`AffineMap.apply`.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converter.fusion.linear.algebra import (
    AffineMap,
    compose,
    compose_all,
    gemm_affine,
    matmul_affine,
    plan_segments,
    scale_affine,
    segments_macs,
    shift_affine,
)

DTYPES = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16]
C_KINDS = ["absent", "scalar", "(1,)", "(N,)", "(1,N)", "(1,1)", "(M,1)", "(M,N)"]
RTOL = 1e-9

seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 6)
# ONNX stores alpha and beta as float32 attributes.
coefficients = st.floats(-3.0, 3.0, allow_nan=False, width=32)


def _c_shape(kind: str, m: int, n: int) -> tuple[int, ...] | None:
    return {
        "absent": None,
        "scalar": (),
        "(1,)": (1,),
        "(N,)": (n,),
        "(1,N)": (1, n),
        "(1,1)": (1, 1),
        "(M,1)": (m, 1),
        "(M,N)": (m, n),
    }[kind]


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _assert_close(actual: np.ndarray, expected: np.ndarray, magnitude: np.ndarray) -> None:
    """``|actual - expected| <= RTOL * magnitude`` elementwise, with ``magnitude`` the sum of |terms|.

    A plain relative test breaks down under cancellation; bounding the error by the magnitude of
    the terms that were summed is the standard floating-point error bound.
    """
    assert actual.shape == expected.shape
    bound = RTOL * magnitude + 1e-300
    assert np.all(np.abs(actual - expected) <= bound), np.max(np.abs(actual - expected) / bound)


# --- merged chains equal step-by-step evaluation ---------------------------------------------


@st.composite
def gemm_chains(draw):
    """A chain of Gemms: rows M, widths, per-layer (B, C, transB, alpha, beta), and a dtype."""
    dtype = draw(st.sampled_from(DTYPES))
    m = draw(dims)
    widths = draw(st.lists(dims, min_size=2, max_size=5))
    rng = np.random.default_rng(draw(seeds))
    layers = []
    for n_in, n_out in itertools.pairwise(widths):
        trans_b = draw(st.sampled_from([0, 1]))
        b = _random(rng, (n_out, n_in) if trans_b else (n_in, n_out), dtype)
        shape = _c_shape(draw(st.sampled_from(C_KINDS)), m, n_out)
        c = None if shape is None else _random(rng, shape, dtype)
        alpha, beta = draw(coefficients), draw(coefficients)
        layers.append({"b": b, "c": c, "trans_b": trans_b, "alpha": alpha, "beta": beta})
    x = _random(rng, (m, widths[0]), dtype)
    return x, layers


def _gemm_reference(x: np.ndarray, layer: dict, absolute: bool = False) -> np.ndarray:
    """ONNX Gemm in float64: ``alpha * x @ op(B) + beta * C`` (C broadcast unidirectionally).

    With ``absolute`` every operand is replaced by its absolute value, which gives the magnitude
    of the terms summed, used as the scale of the error bound.
    """
    f = np.abs if absolute else (lambda a: a)
    b = np.asarray(layer["b"], dtype=np.float64)
    op_b = b.T if layer["trans_b"] else b
    y = f(layer["alpha"]) * f(x) @ f(op_b)
    if layer["c"] is not None:
        y = y + f(layer["beta"]) * f(np.asarray(layer["c"], dtype=np.float64))
    return y


@settings(deadline=None, max_examples=150)
@given(gemm_chains())
def test_merged_gemm_chain_equals_step_by_step(chain):
    x, layers = chain
    merged = compose_all(
        [
            gemm_affine(
                la["b"],
                la["c"],
                trans_b=la["trans_b"],
                alpha=la["alpha"],
                beta=la["beta"],
            )
            for la in layers
        ]
    )
    expected = magnitude = np.asarray(x, dtype=np.float64)
    for layer in layers:
        expected = _gemm_reference(expected, layer)
        magnitude = _gemm_reference(magnitude, layer, absolute=True)
    assert merged.in_features == x.shape[1]
    assert merged.weight.dtype == np.float64
    _assert_close(merged.apply(x), expected, magnitude)


@settings(deadline=None, max_examples=60)
@given(
    seed=seeds,
    batch=st.lists(st.integers(1, 3), max_size=2),
    widths=st.lists(dims, min_size=2, max_size=4),
    kinds=st.lists(st.sampled_from(["matmul", "matmul+add", "mul", "add"]), min_size=3, max_size=3),
)
def test_merged_matmul_mul_add_chain_equals_step_by_step(seed, batch, widths, kinds):
    """MatMul (+Add), Mul and Add on N-D input; each op is evaluated with numpy broadcasting."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*batch, widths[0]))
    maps, expected, magnitude = [], x, np.abs(x)
    for n_in, n_out in itertools.pairwise(widths):
        for kind in kinds:
            if kind.startswith("matmul"):
                w = rng.standard_normal((n_in, n_out))
                bias = rng.standard_normal((n_out,)) if kind == "matmul+add" else None
                maps.append(matmul_affine(w, bias))
                expected, magnitude = expected @ w, magnitude @ np.abs(w)
                n_in = n_out
            else:
                v = rng.standard_normal(() if rng.random() < 0.5 else (n_in,))
                maps.append((scale_affine if kind == "mul" else shift_affine)(v, n_in))
                bias = None
                expected = expected * v if kind == "mul" else expected + v
                magnitude = magnitude * np.abs(v) if kind == "mul" else magnitude + np.abs(v)
            if bias is not None:
                expected, magnitude = expected + bias, magnitude + np.abs(bias)
        if n_in != n_out:  # the op list held no MatMul: close the layer with one
            w = rng.standard_normal((n_in, n_out))
            maps.append(matmul_affine(w))
            expected, magnitude = expected @ w, magnitude @ np.abs(w)
    _assert_close(compose_all(maps).apply(x), expected, magnitude)


# --- compose ----------------------------------------------------------------------------------


@st.composite
def affine_maps(draw, n_in: int, n_out: int):
    rng = np.random.default_rng(draw(seeds))
    bias = draw(st.sampled_from(["none", "(out,)", "(rows,out)"]))
    b = {"none": None, "(out,)": (n_out,), "(rows,out)": (3, n_out)}[bias]
    return AffineMap(
        rng.standard_normal((n_in, n_out)),
        None if b is None else rng.standard_normal(b),
    )


@settings(deadline=None, max_examples=80)
@given(st.data(), st.lists(dims, min_size=4, max_size=4))
def test_compose_is_associative(data, widths):
    a, b, c = (data.draw(affine_maps(i, o)) for i, o in itertools.pairwise(widths))
    left, right = compose(compose(a, b), c), compose(a, compose(b, c))
    assert (left.bias is None) == (right.bias is None)
    magnitude = np.abs(a.weight) @ np.abs(b.weight) @ np.abs(c.weight)
    _assert_close(left.weight, right.weight, magnitude)
    if left.bias is not None:
        assert left.bias.shape == right.bias.shape
        magnitude = sum(
            np.abs(m.bias) @ w
            for m, w in (
                (a, np.abs(b.weight) @ np.abs(c.weight)),
                (b, np.abs(c.weight)),
                (c, np.eye(c.out_features)),
            )
            if m.bias is not None
        )
        _assert_close(left.bias, right.bias, magnitude)


@settings(deadline=None, max_examples=30)
@given(st.data(), dims, dims)
def test_compose_all_of_one_map_is_that_map(data, n_in, n_out):
    m = data.draw(affine_maps(n_in, n_out))
    result = compose_all([m])
    np.testing.assert_array_equal(result.weight, m.weight)
    if m.bias is None:
        assert result.bias is None
    else:
        np.testing.assert_array_equal(result.bias, m.bias)


def test_compose_width_mismatch_raises():
    with pytest.raises(ValueError, match="cannot compose maps of widths 2->3 and 4->5"):
        compose(AffineMap(np.ones((2, 3))), AffineMap(np.ones((4, 5))))
    with pytest.raises(ValueError, match="cannot compose"):
        compose_all(
            [
                AffineMap(np.ones((2, 3))),
                AffineMap(np.ones((3, 4))),
                AffineMap(np.ones((3, 4))),
            ]
        )


def test_compose_all_of_nothing_raises():
    with pytest.raises(ValueError, match="at least one map"):
        compose_all([])


# --- Gemm and MatMul normalisation ------------------------------------------------------------


@pytest.mark.parametrize("kind", C_KINDS)
def test_gemm_c_is_normalised_to_out_or_rows_out(kind):
    m, n = 3, 4
    shape = _c_shape(kind, m, n)
    c = None if shape is None else np.arange(1.0, 1.0 + np.prod(shape, dtype=int)).reshape(shape)
    g = gemm_affine(np.ones((2, n)), c, beta=2.0)
    per_row = kind in ("(M,1)", "(M,N)")
    assert g.per_row_bias == per_row
    if c is None:
        assert g.bias is None
    else:
        assert g.bias.shape == ((m, n) if per_row else (n,))
        np.testing.assert_array_equal(
            np.broadcast_to(g.bias, (m, n)), np.broadcast_to(2.0 * c, (m, n))
        )


@pytest.mark.parametrize(
    ("b_shape", "c_shape", "message"),
    [
        ((2, 3, 4), None, "Gemm B must be 2-D"),
        ((2, 4), (5,), None),
        ((2, 4), (3, 2), None),
        ((2, 4), (1, 1, 4), "rank 3"),
    ],
)
def test_gemm_rejects_bad_shapes(b_shape, c_shape, message):
    c = None if c_shape is None else np.ones(c_shape)
    with pytest.raises(ValueError, match=message):
        gemm_affine(np.ones(b_shape), c)


@pytest.mark.parametrize("bias_shape", [(), (1,), ("out",), (1, 1, "out")])
def test_matmul_accepts_bias_along_last_axis(bias_shape):
    rng = np.random.default_rng(0)
    n_in, n_out = 3, 5
    shape = tuple(n_out if d == "out" else d for d in bias_shape)
    w, bias, x = (
        rng.standard_normal((n_in, n_out)),
        rng.standard_normal(shape),
        rng.standard_normal((4, n_in)),
    )
    m = matmul_affine(w, bias)
    assert m.bias.shape == (n_out,)
    np.testing.assert_allclose(m.apply(x), (x @ w + bias).reshape(4, n_out), rtol=1e-12)


@pytest.mark.parametrize("bias_shape", [(2, "out"), ("out", 1), (1, 2, "out"), ("out", "out")])
def test_matmul_rejects_bias_across_other_axes(bias_shape):
    n_out = 5
    shape = tuple(n_out if d == "out" else d for d in bias_shape)
    with pytest.raises(ValueError, match="does not broadcast along the last axis"):
        matmul_affine(np.ones((3, n_out)), np.ones(shape))


def test_matmul_rejects_non_matrix_weight():
    with pytest.raises(ValueError, match="MatMul weight must be 2-D"):
        matmul_affine(np.ones((2, 3, 4)))


# --- cost model -------------------------------------------------------------------------------


def test_always_merges_the_whole_chain():
    assert plan_segments([1024, 32, 1024], policy="always") == [(0, 2)]
    assert plan_segments([3, 5], policy="always") == [(0, 1)]


@pytest.mark.parametrize(
    ("widths", "segments"),
    [
        ([1024, 32, 1024], [(0, 1), (1, 2)]),  # low rank: 2 * 32K macs beat 1M merged
        ([512] * 5, [(0, 4)]),
        ([64, 128, 128, 64, 32], [(0, 4)]),
        ([4, 2, 4], [(0, 2)]),  # tie: 4*2 + 2*4 == 4*4, so fewer segments wins
        (
            [3, 1, 3, 3],
            [(0, 1), (1, 3)],
        ),  # 3*1 + 1*3 = 6 beats 15 unmerged and 9 merged
    ],
)
def test_cost_policy_examples(widths, segments):
    assert plan_segments(widths) == segments


def test_plan_segments_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one op"):
        plan_segments([4])
    with pytest.raises(ValueError, match="unknown policy 'never'"):
        plan_segments([4, 4], policy="never")


def _brute_force(widths: list[int]) -> tuple[int, int]:
    """(min macs, fewest segments among those) over all 2**(k-1) partitions of k ops."""
    k = len(widths) - 1
    costs = []
    for cuts in itertools.product([False, True], repeat=k - 1):
        bounds = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), k]
        macs = sum(widths[i] * widths[j] for i, j in itertools.pairwise(bounds))
        costs.append((macs, len(bounds) - 1))
    return min(costs)


@settings(deadline=None, max_examples=300)
@given(st.lists(st.sampled_from([1, 2, 3, 4, 6, 8, 16, 64, 1024]), min_size=2, max_size=8))
def test_cost_policy_equals_brute_force(widths):
    segments = plan_segments(widths)
    k = len(widths) - 1
    assert segments[0][0] == 0 and segments[-1][1] == k
    assert all(i < j for i, j in segments)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(segments))
    assert (segments_macs(widths, segments), len(segments)) == _brute_force(widths)
    assert segments_macs(widths, plan_segments(widths, "always")) == widths[0] * widths[-1]
    assert segments_macs(widths, [(i, i + 1) for i in range(k)]) == sum(
        a * b for a, b in itertools.pairwise(widths)
    )


def _plan_segments_quadratic(widths, alone=None):
    """The plain O(k^2) dynamic program the fast one must agree with, tie-breaks included."""
    k = len(widths) - 1
    best, split = [(0, 0)] * (k + 1), [0] * (k + 1)
    for j in range(1, k + 1):
        costs = (
            (
                best[i][0]
                + (alone[i] if j - i == 1 and alone is not None else widths[i] * widths[j]),
                best[i][1] + 1,
                i,
            )
            for i in range(j)
        )
        macs, count, i = min(costs)
        best[j], split[j] = (macs, count), i
    segments, j = [], k
    while j > 0:
        segments.append((split[j], j))
        j = split[j]
    return segments[::-1]


@given(
    st.lists(st.sampled_from([1, 2, 3, 4, 8, 16, 64, 1024]), min_size=2, max_size=24),
    st.booleans(),
)
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_plan_segments_equals_the_quadratic_program(widths, with_alone):
    alone = [w if i % 3 == 0 else widths[i] * widths[i + 1] for i, w in enumerate(widths[1:])]
    alone = alone if with_alone else None
    assert plan_segments(widths, alone=alone) == _plan_segments_quadratic(widths, alone)


def test_plan_segments_of_a_long_random_chain_equals_the_quadratic_program():
    r = np.random.default_rng(11)
    widths = [int(w) for w in r.choice([2, 3, 16, 17, 64, 300], size=601)]
    alone = [w if i % 5 == 0 else widths[i] * widths[i + 1] for i, w in enumerate(widths[1:])]
    assert plan_segments(widths, alone=alone) == _plan_segments_quadratic(widths, alone)
