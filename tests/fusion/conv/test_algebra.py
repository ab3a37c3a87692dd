"""Tests for ``converter.fusion.conv.algebra`` and ``.geometry`` against torch's convolutions in float64.

Every merged conv is run with torch (asymmetric ONNX pads applied with ``F.pad``) and compared
with the unmerged computation, itself written with torch ops on the original arrays
(``F.conv*d``, ``F.batch_norm``), never through the module under test.
"""

from __future__ import annotations

import ast
import importlib
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import converter.fusion.conv.algebra as conv_algebra
import converter.fusion.conv.geometry as conv_geometry
from converter.fusion.conv.algebra import (
    ConvMap,
    add_convs,
    affine_in,
    compose,
    identity_conv,
    pad_kernel,
    scale_out,
    to_groups,
)
from converter.fusion.conv.geometry import (
    ConvGeometry,
    chain_macs,
    plan_add,
    plan_compose,
    resolve_auto_pad,
)
from converter.fusion.core.declined import Declined
from converter.fusion.core.steps import bn_affine

RTOL = 1e-10
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny convs: a second intra-op thread only waits on a shared machine (8 ms vs 15 us a call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(conv: ConvMap, x: np.ndarray) -> np.ndarray:
    """torch's conv of ``x`` with ``conv``'s arrays and attributes (ONNX pads via ``F.pad``)."""
    r = conv.rank
    pad = [p for i in reversed(range(r)) for p in (conv.pads[i], conv.pads[r + i])]
    bias = None if conv.bias is None else torch.from_numpy(conv.bias)
    y = CONV[r](
        F.pad(torch.from_numpy(x), pad),
        torch.from_numpy(conv.weight),
        bias,
        stride=conv.strides,
        dilation=conv.dilations,
        groups=conv.groups,
    )
    return y.numpy()


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * scale)


def _conv(rng, out_c, in_c, kernel, *, groups=1, bias=True, **attrs) -> ConvMap:
    weight = rng.standard_normal((out_c, in_c // groups, *kernel))
    b = rng.standard_normal(out_c) if bias else None
    return ConvMap(weight, b, groups, **attrs)


def _x(rng, channels, spatial) -> np.ndarray:
    return rng.standard_normal((2, channels, *spatial))


def _bn(rng, c):
    return (
        rng.uniform(0.5, 1.5, c),
        rng.standard_normal(c),
        rng.standard_normal(c),
        rng.uniform(0.5, 2.0, c),
    )


def _torch_bn(y: np.ndarray, stats, eps: float) -> np.ndarray:
    gamma, beta, mean, var = (torch.from_numpy(a) for a in stats)
    return F.batch_norm(torch.from_numpy(y), mean, var, gamma, beta, False, 0.0, eps).numpy()


# --- the module and its types ----------------------------------------------------------------


def _imports(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


@pytest.mark.parametrize(
    "module, package_imports",
    [
        (conv_algebra, {"converter.fusion.core.declined", "converter.fusion.conv.geometry"}),
        (conv_geometry, {"converter.fusion.core.declined"}),
    ],
)
def test_module_imports_only_numpy_and_the_standard_library(module, package_imports):
    # ... and, of the package, each other and the one pure-Python type they return, Declined,
    # which imports only the standard library itself.
    imported = _imports(module.__file__)
    from_package = {name for name in imported if name.startswith("converter")}
    assert from_package == package_imports
    top = {name.split(".")[0] for name in imported - from_package}
    assert top <= {"__future__", "math", "collections", "dataclasses", "numpy"}
    declined = importlib.import_module("converter.fusion.core.declined")
    assert {name.split(".")[0] for name in _imports(declined.__file__)} <= {
        "__future__",
        "dataclasses",
        "typing",
    }


@pytest.mark.parametrize("module", [conv_algebra, conv_geometry])
def test_every_public_name_imports(module):
    for name in module.__all__:
        assert getattr(module, name) is not None, name


@pytest.mark.parametrize(
    "kernel,groups,strides,dilations,pads",
    [
        ((3,), 1, (2,), (1,), (1, 0)),
        ((3, 1), 2, (1, 2), (2, 1), (2, 0, 1, 0)),
        ((2, 3, 1), 4, (1, 1, 2), (1, 1, 1), (0, 1, 0, 1, 1, 0)),
    ],
)
def test_conv_map_geometry_matches_torch_output_shape(kernel, groups, strides, dilations, pads):
    rng = np.random.default_rng(0)
    conv = _conv(rng, 8, 4, kernel, groups=groups, strides=strides, dilations=dilations, pads=pads)
    g = conv.geometry
    assert (g.rank, g.in_channels, g.out_channels, g.kernel_shape) == (
        len(kernel), 4, 8, kernel,
    )  # fmt: skip
    assert conv.macs_per_position == 8 * (4 // groups) * math.prod(kernel)
    assert conv.params == conv.weight.size + 8
    x = _x(rng, 4, (9,) * len(kernel))
    assert _run(conv, x).shape[2:] == g.output_shape(x.shape[2:])
    assert conv.weight.dtype == np.float64


def test_conv_map_rejects_inconsistent_arrays():
    with pytest.raises(ValueError, match="bias"):
        ConvMap(np.ones((4, 2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="pads"):
        ConvMap(np.ones((4, 2, 3)), pads=(1,))
    with pytest.raises(ValueError, match="invalid"):
        ConvMap(np.ones((4, 2, 3)), groups=3)


def test_bn_affine_is_inference_batch_norm():
    rng = np.random.default_rng(1)
    stats = _bn(rng, 5)
    x = rng.standard_normal((3, 5, 4))
    s, t = bn_affine(*stats, 1e-3)
    _close(x * s[:, None] + t[:, None], _torch_bn(x, stats, 1e-3))


@pytest.mark.parametrize(
    "auto_pad,kernel,strides,spatial,expected",
    [
        ("VALID", (3, 3), None, None, (0, 0, 0, 0)),
        ("SAME_UPPER", (3, 4), None, None, (1, 1, 1, 2)),
        ("SAME_LOWER", (3, 4), None, None, (1, 2, 1, 1)),
        ("SAME_UPPER", (3,), (2,), (8,), (0, 1)),
        ("SAME_LOWER", (3,), (2,), (7,), (1, 1)),
    ],
)
def test_resolve_auto_pad(auto_pad, kernel, strides, spatial, expected):
    pads = resolve_auto_pad(auto_pad, kernel, strides, None, spatial)
    assert pads == expected
    if auto_pad != "VALID" and spatial is not None:  # SAME: output = ceil(L / s)
        g = ConvGeometry(1, 1, kernel, strides=strides, pads=pads)
        assert g.output_shape(spatial) == tuple(
            -(-n // s) for n, s in zip(spatial, strides, strict=True)
        )


def test_resolve_auto_pad_refuses_a_strided_same_without_the_input_size():
    result = resolve_auto_pad("SAME_UPPER", (3, 3), (2, 2))
    assert isinstance(result, Declined)
    assert "depends on the input size" in result.reason


# --- channel affines -------------------------------------------------------------------------


@pytest.mark.parametrize("rank,groups", [(1, 1), (2, 2), (3, 1), (2, 4)])
def test_scale_out_is_batch_norm_after_the_conv(rank, groups):
    rng = np.random.default_rng(2)
    conv = _conv(rng, 4, 4, (3,) * rank, groups=groups, strides=(2,) * rank, pads=(1,) * 2 * rank)
    stats = _bn(rng, 4)
    x = _x(rng, 4, (6,) * rank)
    folded = scale_out(conv, *bn_affine(*stats, 1e-5))
    _close(_run(folded, x), _torch_bn(_run(conv, x), stats, 1e-5))


def test_scale_out_scalar_and_bias_free_conv():
    rng = np.random.default_rng(3)
    conv = _conv(rng, 3, 2, (3, 3), bias=False)
    x = _x(rng, 2, (5, 5))
    _close(_run(scale_out(conv, -2.0), x), -2.0 * _run(conv, x))
    shift = rng.standard_normal(3)
    _close(_run(scale_out(conv, None, shift), x), _run(conv, x) + shift[:, None, None])


@pytest.mark.parametrize("rank,groups", [(1, 1), (2, 2), (3, 1), (2, 6)])
def test_affine_in_folds_scale_and_shift_into_an_unpadded_conv(rank, groups):
    rng = np.random.default_rng(4)
    conv = _conv(rng, 6, 6, (3,) * rank, groups=groups, strides=(2,) * rank)
    s, t = bn_affine(*_bn(rng, 6), 1e-5)
    x = _x(rng, 6, (7,) * rank)
    folded = affine_in(conv, s, t)
    assert isinstance(folded, ConvMap)
    expand = (slice(None),) + (None,) * rank
    _close(_run(folded, x), _run(conv, x * s[expand] + t[expand]))


def test_affine_in_folds_a_scale_into_a_padded_conv():
    rng = np.random.default_rng(5)
    conv = _conv(rng, 4, 2, (3, 3), pads=(1, 1, 1, 1))
    s = rng.standard_normal(2)
    x = _x(rng, 2, (5, 5))
    folded = affine_in(conv, s, np.zeros(2))  # a zero shift is no shift
    assert isinstance(folded, ConvMap)
    _close(_run(folded, x), _run(conv, x * s[:, None, None]))


def test_affine_in_refuses_a_shift_before_a_padded_conv():
    rng = np.random.default_rng(6)
    conv = _conv(rng, 4, 2, (3, 3), pads=(1, 1, 1, 1))
    result = affine_in(conv, None, np.ones(2))
    assert isinstance(result, Declined)
    assert "padding contributes zeros, not the shift" in result.reason
    assert "[1, 1, 1, 1]" in result.reason


# --- kernels, identities, groups ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel,pads,big,big_pads,dilations,strides",
    [
        ((1, 3), (0, 1, 0, 1), (3, 3), (1, 1, 1, 1), (1, 1), (1, 1)),
        ((3, 1), (1, 0, 1, 0), (3, 3), (1, 1, 1, 1), (1, 1), (2, 2)),
        ((1, 1), (0, 0, 0, 0), (5, 5), (2, 2, 2, 2), (1, 1), (2, 1)),
        ((2, 2), (1, 1, 0, 0), (3, 3), (1, 1, 1, 1), (1, 1), (1, 1)),  # off-centre, exact
        ((3,), (2,), (5,), (4, 4), (2,), (1,)),
        ((1, 1, 3), (0, 0, 1, 0, 0, 1), (3, 3, 3), (1,) * 6, (1, 1, 1), (1, 2, 1)),
    ],
)
def test_pad_kernel_keeps_the_conv(kernel, pads, big, big_pads, dilations, strides):
    rng = np.random.default_rng(7)
    pads = pads if len(pads) == 2 * len(kernel) else pads * 2
    conv = _conv(rng, 3, 2, kernel, pads=pads, dilations=dilations, strides=strides)
    padded = pad_kernel(conv, big, big_pads)
    assert isinstance(padded, ConvMap) and padded.kernel_shape == big
    x = _x(rng, 2, (7,) * len(kernel))
    _close(_run(padded, x), _run(conv, x))


def test_pad_kernel_gives_a_one_wide_kernel_any_dilation():
    rng = np.random.default_rng(8)
    conv = _conv(rng, 3, 2, (1, 1))
    padded = pad_kernel(conv, (3, 3), (2, 2, 2, 2), dilations=(2, 2))
    assert isinstance(padded, ConvMap) and padded.dilations == (2, 2)
    x = _x(rng, 2, (6, 6))
    _close(_run(padded, x), _run(conv, x))


@pytest.mark.parametrize(
    "kernel,pads,big,big_pads,dilations,reason",
    [
        ((1, 3), (0, 0, 0, 0), (3, 3), (1, 1, 1, 1), None, "the size difference / 2 on each side"),
        ((1, 1), (1, 1, 1, 1), (3, 3), (1, 1, 1, 1), None, "along spatial axis 0 the pads must"),
        ((3, 3), (1, 1, 1, 1), (1, 1), (0, 0, 0, 0), None, "does not embed in a 1x1 kernel"),
        ((3, 3), (1, 1, 1, 1), (3, 3), (1, 1, 1, 1), (2, 1), "the dilations differ (1 vs 2)"),
    ],
)
def test_pad_kernel_refusals(kernel, pads, big, big_pads, dilations, reason):
    conv = _conv(np.random.default_rng(9), 2, 2, kernel, pads=pads)
    result = pad_kernel(conv, big, big_pads, dilations)
    assert isinstance(result, Declined)
    assert reason in result.reason


@pytest.mark.parametrize(
    "channels,kernel,groups,pads",
    [
        (4, (1, 1), None, None),
        (4, (3, 3), 1, None),
        (6, (3, 3), 2, None),
        (4, (2, 2), 4, (0, 1, 1, 0)),
        (3, (3,), 1, None),
        (2, (3, 1, 3), None, None),
    ],
)
def test_identity_conv_is_the_identity(channels, kernel, groups, pads):
    rng = np.random.default_rng(10)
    ident = identity_conv(channels, kernel, groups=groups, pads=pads)
    assert isinstance(ident, ConvMap)
    assert ident.groups == (channels if groups is None else groups)
    x = _x(rng, channels, (5,) * len(kernel))
    _close(_run(ident, x), x)


def test_identity_conv_with_batch_norm_statistics_is_the_batch_norm():
    rng = np.random.default_rng(11)
    stats = _bn(rng, 4)
    s, t = bn_affine(*stats, 1e-5)
    ident = identity_conv(4, (3, 3), groups=2, scale=s, shift=t, dilations=(2, 2))
    assert isinstance(ident, ConvMap) and ident.pads == (2, 2, 2, 2)
    x = _x(rng, 4, (6, 6))
    _close(_run(ident, x), _torch_bn(x, stats, 1e-5))


@pytest.mark.parametrize(
    "kernel,pads,reason",
    [
        ((2, 2), None, "a 2x2 kernel has no centre"),
        ((3, 3), (1, 0, 1, 0), "do not keep the size of a 3x3 identity along spatial axis 1"),
    ],
)
def test_identity_conv_refusals(kernel, pads, reason):
    result = identity_conv(4, kernel, pads=pads)
    assert isinstance(result, Declined)
    assert reason in result.reason


@pytest.mark.parametrize(
    "channels,old,new,rank", [(4, 4, 1, 2), (8, 4, 2, 2), (6, 6, 2, 1), (4, 2, 1, 3)]
)
def test_to_groups_keeps_the_conv(channels, old, new, rank):
    rng = np.random.default_rng(12)
    conv = _conv(rng, 2 * channels, channels, (3,) * rank, groups=old, pads=(1,) * 2 * rank)
    regrouped = to_groups(conv, new)
    assert isinstance(regrouped, ConvMap) and regrouped.groups == new
    assert regrouped.weight.shape == (2 * channels, channels // new, *conv.kernel_shape)
    x = _x(rng, channels, (4,) * rank)
    _close(_run(regrouped, x), _run(conv, x))


@pytest.mark.parametrize("old,new", [(3, 2), (2, 4)])
def test_to_groups_refuses_a_count_that_does_not_divide(old, new):
    conv = _conv(np.random.default_rng(13), 12, 12, (1, 1), groups=old)
    result = to_groups(conv, new)
    assert isinstance(result, Declined)
    assert f"with {old} groups is not expressible with {new} groups" in result.reason


# --- parallel branches -------------------------------------------------------------------------


def _check_sum(branches: list[ConvMap], x: np.ndarray) -> ConvMap:
    merged = add_convs(*branches)
    assert isinstance(merged, ConvMap), merged
    _close(_run(merged, x), sum(_run(b, x) for b in branches))
    assert merged.geometry == plan_add(*(b.geometry for b in branches))
    return merged


def test_repvgg_block_from_numpy_arrays_equals_torch_branches():
    """RepVGG: BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x) is one 3x3 conv with a bias."""
    rng = np.random.default_rng(14)
    c, eps = 4, 1e-5
    w3, w1 = rng.standard_normal((c, c, 3, 3)), rng.standard_normal((c, c, 1, 1))
    bn3, bn1, bn_id = _bn(rng, c), _bn(rng, c), _bn(rng, c)
    x = _x(rng, c, (6, 5))
    tx = torch.from_numpy(x)
    expected = (
        _torch_bn(F.conv2d(tx, torch.from_numpy(w3), padding=1).numpy(), bn3, eps)
        + _torch_bn(F.conv2d(tx, torch.from_numpy(w1)).numpy(), bn1, eps)
        + _torch_bn(x, bn_id, eps)
    )
    branches = [
        scale_out(ConvMap(w3, pads=(1, 1, 1, 1)), *bn_affine(*bn3, eps)),
        scale_out(ConvMap(w1), *bn_affine(*bn1, eps)),
    ]
    s, t = bn_affine(*bn_id, eps)
    branches.append(identity_conv(c, (1, 1), scale=s, shift=t))
    merged = add_convs(*branches)
    assert isinstance(merged, ConvMap)
    assert (merged.kernel_shape, merged.groups, merged.pads) == ((3, 3), 1, (1, 1, 1, 1))
    _close(_run(merged, x), expected)


def test_acnet_asymmetric_branches():
    rng = np.random.default_rng(15)
    x = _x(rng, 3, (6, 6))
    merged = _check_sum(
        [
            _conv(rng, 5, 3, (3, 3), pads=(1, 1, 1, 1), strides=(2, 2)),
            _conv(rng, 5, 3, (1, 3), pads=(0, 1, 0, 1), strides=(2, 2)),
            _conv(rng, 5, 3, (3, 1), pads=(1, 0, 1, 0), strides=(2, 2)),
        ],
        x,
    )
    assert merged.kernel_shape == (3, 3) and merged.strides == (2, 2)


@pytest.mark.parametrize("k", [2, 4])
def test_mobileone_depthwise_branches(k):
    rng = np.random.default_rng(16)
    c = 4
    branches = [_conv(rng, c, c, (3, 3), groups=c, pads=(1, 1, 1, 1)) for _ in range(k)]
    branches.append(_conv(rng, c, c, (1, 1), groups=c))
    branches.append(identity_conv(c, (1, 1), scale=rng.standard_normal(c), shift=1.0))
    merged = _check_sum(branches, _x(rng, c, (5, 5)))
    assert merged.groups == c and merged.kernel_shape == (3, 3)


def test_repmixer_and_positional_encoding_branches():
    """FastViT: ``x + ls * (BN(dw(x)) - BN(x))`` and ``x + dw(x)``, each one depthwise conv."""
    rng = np.random.default_rng(33)
    c, eps = 4, 1e-5
    dw = _conv(rng, c, c, (3, 3), groups=c, pads=(1, 1, 1, 1), bias=False)
    bn_mix, bn_norm, ls = _bn(rng, c), _bn(rng, c), rng.standard_normal(c)
    x = _x(rng, c, (5, 6))
    lsx = ls[:, None, None]
    expected = x + lsx * (_torch_bn(_run(dw, x), bn_mix, eps) - _torch_bn(x, bn_norm, eps))
    s, t = bn_affine(*bn_norm, eps)
    mixer = add_convs(
        identity_conv(c, (1, 1)),
        scale_out(scale_out(dw, *bn_affine(*bn_mix, eps)), ls),
        identity_conv(c, (1, 1), scale=-ls * s, shift=-ls * t),
    )
    assert isinstance(mixer, ConvMap) and mixer.groups == c
    _close(_run(mixer, x), expected)
    cpe = add_convs(identity_conv(c, (3, 3)), dw)
    assert isinstance(cpe, ConvMap) and cpe.groups == c and cpe.kernel_shape == (3, 3)
    _close(_run(cpe, x), x + _run(dw, x))


def test_plan_compose_counts_an_unseen_bias_as_nonzero():
    first = ConvGeometry(4, 4, (1, 1), has_bias=True)
    second = ConvGeometry(4, 4, (3, 3), pads=(1,) * 4)
    assert isinstance(plan_compose(first, second), Declined)
    assert isinstance(plan_compose(first, second, first_bias=np.zeros(4)), ConvGeometry)


def test_branches_with_different_groups_merge_at_the_gcd():
    rng = np.random.default_rng(17)
    branches = [
        _conv(rng, 6, 6, (3, 3), groups=2, pads=(1, 1, 1, 1)),
        _conv(rng, 6, 6, (1, 1), groups=3, bias=False),
        identity_conv(6, (3, 3), groups=6),
    ]
    merged = _check_sum(branches, _x(rng, 6, (4, 5)))
    assert merged.groups == 1


@pytest.mark.parametrize("rank", [1, 3])
def test_branches_in_one_and_three_dimensions(rank):
    rng = np.random.default_rng(18)
    branches = [
        _conv(rng, 3, 2, (3,) * rank, pads=(1,) * 2 * rank),
        _conv(rng, 3, 2, (1,) * rank, bias=False),
        _conv(rng, 3, 2, (5,) * rank, pads=(2,) * 2 * rank),
    ]
    merged = _check_sum(branches, _x(rng, 2, (6,) * rank))
    assert merged.kernel_shape == (5,) * rank


def test_dilated_branch_and_pointwise_branch():
    rng = np.random.default_rng(19)
    branches = [
        _conv(rng, 3, 2, (3, 3), pads=(2, 2, 2, 2), dilations=(2, 2)),
        _conv(rng, 3, 2, (1, 1)),
    ]
    merged = _check_sum(branches, _x(rng, 2, (7, 6)))
    assert merged.dilations == (2, 2) and merged.kernel_shape == (3, 3)


def test_off_centre_windows_merge_into_a_larger_kernel():
    rng = np.random.default_rng(20)
    branches = [
        _conv(rng, 3, 2, (3,), pads=(2, 0)),
        _conv(rng, 3, 2, (3,), pads=(0, 2)),
    ]
    merged = _check_sum(branches, _x(rng, 2, (8,)))
    assert merged.kernel_shape == (5,) and merged.pads == (2, 2)


@pytest.mark.parametrize(
    "a,b,reason",
    [
        (dict(strides=(2, 2)), dict(), "different strides"),
        (dict(dilations=(2, 2), pads=(2,) * 4), dict(pads=(1,) * 4), "different dilations"),
        (dict(kernel=(1, 1), pads=(1,) * 4), dict(), "outputs differ in size along spatial axis 0"),
        (dict(dilations=(2, 2), pads=(2, 1, 2, 3)), dict(dilations=(2, 2), pads=(1, 2, 3, 2)),
         "offset by 1 along spatial axis 0, not a multiple of the dilation 2"),
        (dict(out=5), dict(), "different shapes"),
    ],
)  # fmt: skip
def test_add_convs_refusals(a, b, reason):
    rng = np.random.default_rng(21)

    def make(spec):
        spec = dict(spec)
        out, kernel = spec.pop("out", 4), spec.pop("kernel", (3, 3))
        return _conv(rng, out, 2, kernel, **{"pads": (1,) * 4, **spec})

    result = add_convs(make(a), make(b))
    assert isinstance(result, Declined)
    assert reason in result.reason
    assert isinstance(plan_add(make(a).geometry, make(b).geometry), Declined)


# --- sequential convs --------------------------------------------------------------------------


def _check_compose(first: ConvMap, second: ConvMap, x: np.ndarray) -> ConvMap:
    composed = compose(first, second)
    assert isinstance(composed, ConvMap), composed
    _close(_run(composed, x), _run(second, _run(first, x)))
    assert composed.geometry == plan_compose(first.geometry, second.geometry, first_bias=first.bias)
    return composed


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_kxk_then_pointwise(rank):
    rng = np.random.default_rng(22)
    first = _conv(rng, 4, 3, (3,) * rank, strides=(2,) * rank, pads=(1,) * 2 * rank)
    second = _conv(rng, 5, 4, (1,) * rank)
    composed = _check_compose(first, second, _x(rng, 3, (6,) * rank))
    assert composed.kernel_shape == (3,) * rank and composed.strides == (2,) * rank


def test_pointwise_without_bias_then_padded_kxk():
    rng = np.random.default_rng(23)
    first = _conv(rng, 4, 3, (1, 1), bias=False)
    second = _conv(rng, 5, 4, (3, 3), pads=(1, 1, 1, 1), strides=(2, 1))
    _check_compose(first, second, _x(rng, 3, (7, 6)))


def test_pointwise_with_bias_then_unpadded_kxk():
    rng = np.random.default_rng(24)
    first = _conv(rng, 4, 3, (1, 1))
    second = _conv(rng, 5, 4, (3, 2))
    _check_compose(first, second, _x(rng, 3, (6, 6)))


def test_strided_pointwise_then_kxk_becomes_dilated():
    rng = np.random.default_rng(25)
    first = _conv(rng, 4, 3, (1, 1), strides=(2, 2), bias=False)
    second = _conv(rng, 5, 4, (3, 3), pads=(1, 1, 1, 1))
    composed = _check_compose(first, second, _x(rng, 3, (9, 8)))
    assert composed.dilations == (2, 2) and composed.kernel_shape == (3, 3)


def test_depthwise_then_pointwise_is_a_dense_conv():
    rng = np.random.default_rng(26)
    first = _conv(rng, 4, 4, (3, 3), groups=4, pads=(1, 1, 1, 1))
    second = _conv(rng, 6, 4, (1, 1))
    composed = _check_compose(first, second, _x(rng, 4, (5, 5)))
    assert composed.groups == 1 and composed.kernel_shape == (3, 3)


def test_grouped_convs_compose_at_the_gcd():
    rng = np.random.default_rng(27)
    first = _conv(rng, 8, 4, (3, 3), groups=2)
    second = _conv(rng, 8, 8, (3, 1), groups=4)
    composed = _check_compose(first, second, _x(rng, 4, (7, 7)))
    assert composed.groups == 2


def test_kxk_then_unpadded_kxk_with_strides_and_dilations():
    rng = np.random.default_rng(28)
    first = _conv(rng, 3, 2, (3, 2), strides=(2, 1), dilations=(1, 2), pads=(1, 0, 2, 1))
    second = _conv(rng, 4, 3, (2, 3), strides=(1, 2), dilations=(3, 1))
    composed = _check_compose(first, second, _x(rng, 2, (12, 11)))
    assert composed.strides == (2, 2)


def test_fully_padded_first_conv_composes_with_a_padded_second():
    """The first conv's window one step past its output sees only zeros: padding stays exact."""
    rng = np.random.default_rng(29)
    first = _conv(rng, 3, 2, (3,), pads=(2, 2), bias=False)
    second = _conv(rng, 4, 3, (3,), pads=(1, 1))
    _check_compose(first, second, _x(rng, 2, (6,)))


def _naive_compose_differs(first: ConvMap, second: ConvMap, x: np.ndarray) -> bool:
    """The composition computed regardless of the refusal differs from the real chain."""
    unpadded = ConvMap(second.weight, second.bias, second.groups, second.strides, second.dilations)
    naive = compose(first, unpadded)
    assert isinstance(naive, ConvMap)
    r = first.rank
    naive = ConvMap(
        naive.weight, naive.bias, naive.groups, naive.strides, naive.dilations,
        tuple(naive.pads[i] + first.strides[i % r] * second.pads[i] for i in range(2 * r)),
    )  # fmt: skip
    return not np.allclose(_run(naive, x), _run(second, _run(first, x)))


def test_compose_refuses_a_bias_pushed_into_padding():
    rng = np.random.default_rng(30)
    first = _conv(rng, 4, 3, (1, 1))
    second = _conv(rng, 5, 4, (3, 3), pads=(1, 1, 1, 1))
    result = compose(first, second)
    assert isinstance(result, Declined)
    assert "a bias pushed through zero padding becomes non-uniform at the borders" in result.reason
    assert _naive_compose_differs(first, second, _x(rng, 3, (5, 5)))


def test_compose_refuses_a_padded_second_conv_after_a_kxk():
    rng = np.random.default_rng(31)
    first = _conv(rng, 4, 3, (3, 3), pads=(1, 1, 1, 1), bias=False)
    second = _conv(rng, 5, 4, (3, 3), pads=(0, 1, 0, 1))
    result = compose(first, second)
    assert isinstance(result, Declined)
    assert "second conv pads with zeros along spatial axis 1" in result.reason
    assert _naive_compose_differs(first, second, _x(rng, 3, (5, 5)))


def test_compose_rejects_mismatched_channels():
    rng = np.random.default_rng(32)
    with pytest.raises(ValueError, match="cannot follow"):
        compose(_conv(rng, 4, 3, (1, 1)), _conv(rng, 5, 3, (1, 1)))


# --- cost --------------------------------------------------------------------------------------


def test_cost_of_an_expansion_then_depthwise_grows_when_merged():
    expand = ConvGeometry(64, 16, (1, 1))
    depthwise = ConvGeometry(64, 64, (3, 3), groups=64, pads=(1, 1, 1, 1))
    merged = plan_compose(expand, depthwise)
    assert isinstance(merged, ConvGeometry) and merged.groups == 1
    macs_before = chain_macs([expand, depthwise])
    params_before = expand.params + depthwise.params
    assert (macs_before, merged.macs_per_position) == (64 * 16 + 64 * 9, 64 * 16 * 9)
    assert (params_before, merged.params) == (64 * 16 + 64 * 9, 64 * 16 * 9)
    assert merged.macs_per_position > macs_before


def test_chain_macs_counts_earlier_convs_at_their_own_positions():
    first = ConvGeometry(8, 4, (3, 3), pads=(1,) * 4, has_bias=True)
    second = ConvGeometry(8, 8, (1, 1), strides=(2, 2))
    assert chain_macs([first, second]) == 8 * 4 * 9 * 4 + 8 * 8


def test_cost_of_repvgg_branches_shrinks_when_merged():
    c = 16
    branches = [
        ConvGeometry(c, c, (3, 3), pads=(1,) * 4, has_bias=True),
        ConvGeometry(c, c, (1, 1), has_bias=True),
        ConvGeometry(c, c, (1, 1), groups=c, has_bias=True),
    ]
    merged = plan_add(*branches)
    assert isinstance(merged, ConvGeometry)
    macs_before = sum(b.macs_per_position for b in branches)
    params_before = sum(b.params for b in branches)
    assert (macs_before, merged.macs_per_position) == (c * c * 9 + c * c + c, c * c * 9)
    assert (params_before, merged.params) == (c * c * 10 + c + 3 * c, c * c * 9 + c)


# --- properties --------------------------------------------------------------------------------


@st.composite
def _spec(draw, rank: int, strides: tuple[int, ...] | None = None) -> dict:
    """A random conv's attributes; ``strides`` fixed when given."""
    return dict(
        kernel=tuple(draw(st.integers(1, 3)) for _ in range(rank)),
        groups=draw(st.sampled_from([1, 2])),
        strides=strides or tuple(draw(st.integers(1, 2)) for _ in range(rank)),
        dilations=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
        pads=tuple(draw(st.integers(0, 2)) for _ in range(2 * rank)),
        bias=draw(st.booleans()),
    )


@st.composite
def _parallel_pair(draw) -> tuple[int, dict, dict]:
    """Two branches of one input; ``b``'s pads usually give the same output size as ``a``'s."""
    rank = draw(st.integers(1, 3))
    a = draw(_spec(rank))
    b = draw(_spec(rank, a["strides"]))
    if draw(st.integers(0, 3)):  # mostly: the same dilation and the same output size
        b["dilations"] = a["dilations"]
        begins, ends = [], []
        for i, (ka, kb, d) in enumerate(zip(a["kernel"], b["kernel"], a["dilations"], strict=True)):
            total = a["pads"][i] + a["pads"][rank + i] + d * (kb - ka)
            begins.append(draw(st.integers(0, max(total, 0))))
            ends.append(total - begins[-1])
        if min(ends) >= 0:
            b["pads"] = tuple(begins + ends)
    return rank, a, b


@st.composite
def _sequential_pair(draw) -> tuple[int, dict, dict]:
    """Two convs in a row; the second is often unpadded, the first often without a bias."""
    rank = draw(st.integers(1, 3))
    first, second = draw(_spec(rank)), draw(_spec(rank))
    if draw(st.booleans()):
        second["pads"] = (0,) * 2 * rank
    return rank, first, second


def _build(rng, channels: int, spec: dict) -> ConvMap:
    spec = dict(spec)
    return _conv(rng, channels, channels, spec.pop("kernel"), **spec)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_parallel_pair(), st.integers(0, 2**32 - 1))
def test_add_convs_is_the_sum_or_says_why(pair, seed):
    rank, spec_a, spec_b = pair
    rng = np.random.default_rng(seed)
    a, b = _build(rng, 4, spec_a), _build(rng, 4, spec_b)
    merged = add_convs(a, b)
    if isinstance(merged, Declined):
        assert re.search("outputs differ in size|different dilations|offset by", merged.reason)
        return
    x = _x(rng, 4, (7,) * rank)
    _close(_run(merged, x), _run(a, x) + _run(b, x))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_sequential_pair(), st.integers(0, 2**32 - 1))
def test_compose_is_the_chain_or_says_why(pair, seed):
    rank, spec_a, spec_b = pair
    rng = np.random.default_rng(seed)
    first, second = _build(rng, 4, spec_a), _build(rng, 4, spec_b)
    composed = compose(first, second)
    if isinstance(composed, Declined):
        assert any(second.pads), composed.reason  # an unpadded second conv always composes
        return
    x = _x(rng, 4, (13,) * rank)
    _close(_run(composed, x), _run(second, _run(first, x)))
