"""Re-parameterisation of exported training-form conv blocks (issue 11), both torch exporters.

Each block below is a small torch module in its *training form* (parallel conv branches, each
with its own BatchNorm, statistics randomised) with a ``reparameterize()`` returning its *deploy
form*, written the way the blocks' authors write it (fold each BN into its conv, pad the small
kernels, add an identity kernel, sum). Each is exported with ``dynamo=True`` and with the
TorchScript exporter (``dynamo=False``, opset 17), fused with ``converter.fuse`` and checked:

- the fused model has as many Convs as the deploy form's export (the TorchScript export: the
  deploy form has no branches, so its Conv count does not depend on the exporter) and no
  BatchNormalization;
- its outputs equal the training form's under onnxruntime, and the torch module's, at explicit
  tolerances; ``onnx.checker.check_model(full_check=True)`` passes.

Negative tests assert the reasons: a shift before a padded conv, branches with different
strides, the cost model refusing a 1x1 expansion followed by a depthwise conv, ConvTranspose.
"""

from __future__ import annotations

import collections
import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from builders import (
    assert_equivalent,
    assert_same_graph,
    check,
    feeds,
    fuse_with_report,
    init,
    make_model,
    op_types,
    xy_io,
)
from onnx import helper
from torch import nn

import converter

RTOL, ATOL = 1e-4, 1e-5
DIM = {
    1: (nn.Conv1d, nn.BatchNorm1d),
    2: (nn.Conv2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.BatchNorm3d),
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (never 1 and 0), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return module.eval()


def _fold(conv: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv (then its BN) as one kernel and bias: the step every deploy form starts from."""
    w = conv.weight.detach().clone()
    b = torch.zeros(w.shape[0]) if conv.bias is None else conv.bias.detach().clone()
    if bn is None:
        return w, b
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return w * s.reshape(-1, *([1] * (w.dim() - 1))), bn.bias + (b - bn.running_mean) * s


def _identity_kernel(channels: int, groups: int, kernel: tuple[int, ...]) -> torch.Tensor:
    w = torch.zeros(channels, channels // groups, *kernel)
    centre = tuple(k // 2 for k in kernel)
    for c in range(channels):
        w[(c, c % (channels // groups), *centre)] = 1.0
    return w


def _pad_to(w: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    pad = []
    for k, big in zip(reversed(w.shape[2:]), reversed(kernel), strict=True):
        pad += [(big - k) // 2, (big - k) // 2]
    return F.pad(w, pad)


def _deploy_conv(like: nn.Module, w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    conv_type = type(like)
    conv = conv_type(
        like.in_channels,
        like.out_channels,
        tuple(w.shape[2:]),
        like.stride,
        tuple(k // 2 for k in w.shape[2:]),
        groups=like.groups,
    )
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    return conv


class ConvBN(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, groups=1, rank=2, padding=None, bias=False):
        super().__init__()
        conv_type, bn_type = DIM[rank]
        if padding is None:
            padding = tuple(k // 2 for k in kernel) if isinstance(kernel, tuple) else kernel // 2
        self.conv = conv_type(cin, cout, kernel, stride, padding, groups=groups, bias=bias)
        self.bn = bn_type(cout)

    def forward(self, x):
        return self.bn(self.conv(x))

    def fold(self, kernel: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = _fold(self.conv, self.bn)
        return _pad_to(w, kernel), b


class RepBlock(nn.Module):
    """Parallel ConvBN branches + an optional BatchNorm identity, summed, then an activation.

    RepVGG (3x3 + 1x1 + BN identity), ACNet (3x3 + 1x3 + 3x1), YOLO RepConv (3x3 + 1x1, SiLU),
    MobileOne's depthwise stage (k 3x3 + 1x1 + BN identity) and the Conv1d/Conv3d variants.
    """

    def __init__(self, c, kernels, groups=1, identity=True, rank=2, act=nn.ReLU):
        super().__init__()
        self.branches = nn.ModuleList(ConvBN(c, c, k, groups=groups, rank=rank) for k in kernels)
        self.identity = DIM[rank][1](c) if identity else None
        self.groups, self.act = groups, act()

    def forward(self, x):
        y = sum(branch(x) for branch in self.branches)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)

    def merged(self) -> nn.Module:
        first = self.branches[0].conv
        kernel = tuple(
            max(b.conv.kernel_size[i] for b in self.branches) for i in range(first.weight.dim() - 2)
        )
        w, b = map(sum, zip(*(branch.fold(kernel) for branch in self.branches), strict=True))
        if self.identity is not None:
            iw, ib = _fold(
                _Weight(_identity_kernel(first.out_channels, self.groups, kernel)), self.identity
            )
            w, b = w + iw, b + ib
        return _deploy_conv(first, w, b)

    def reparameterize(self) -> nn.Module:
        return nn.Sequential(self.merged(), self.act)


class _Weight(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight, self.bias = nn.Parameter(w), None


class MobileOne(nn.Module):
    """MobileOne block: depthwise stage (k 3x3 + 1x1 + BN skip), pointwise stage (k 1x1 + BN skip)."""

    def __init__(self, c, k):
        super().__init__()
        self.dw = RepBlock(c, [3] * k + [1], groups=c)
        self.pw = RepBlock(c, [1] * k)

    def forward(self, x):
        return self.pw(self.dw(x))

    def reparameterize(self) -> nn.Module:
        return nn.Sequential(self.dw.reparameterize(), self.pw.reparameterize())


class RepViTMixer(nn.Module):
    """RepViT's RepVGGDW: ``bn(dw3x3_bn(x) + dw1x1(x) + x)``, then a pointwise ConvBN."""

    def __init__(self, c):
        super().__init__()
        self.conv = ConvBN(c, c, 3, groups=c)
        self.conv1 = nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)
        self.pw = ConvBN(c, c, 1)

    def forward(self, x):
        return self.pw(torch.relu(self.bn(self.conv(x) + self.conv1(x) + x)))

    def reparameterize(self) -> nn.Module:
        c = self.conv1.in_channels
        w, b = self.conv.fold((3, 3))
        w1, b1 = _fold(self.conv1, None)
        w = w + _pad_to(w1, (3, 3)) + _identity_kernel(c, c, (3, 3))
        w, b = _fold(_Bias(w, b + b1), self.bn)
        pw = _deploy_conv(self.pw.conv, *_fold(self.pw.conv, self.pw.bn))
        return nn.Sequential(_deploy_conv(self.conv.conv, w, b), nn.ReLU(), pw)


class _Bias(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.weight, self.bias = nn.Parameter(w), nn.Parameter(b)


class RepMixer(nn.Module):
    """FastViT's RepMixer: ``x + ls * (mixer(x) - norm(x))``, depthwise ConvBN mixer, BN norm."""

    def __init__(self, c):
        super().__init__()
        self.mixer = ConvBN(c, c, 3, groups=c)
        self.norm = nn.BatchNorm2d(c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    def reparameterize(self) -> nn.Module:
        c = self.norm.num_features
        w, b = self.mixer.fold((3, 3))
        nw, nb = _fold(_Weight(_identity_kernel(c, c, (3, 3))), self.norm)
        ls = self.layer_scale.detach().reshape(-1)
        w = _identity_kernel(c, c, (3, 3)) + ls.reshape(-1, 1, 1, 1) * (w - nw)
        return _deploy_conv(self.mixer.conv, w, ls * (b - nb))


class CPE(nn.Module):
    """Conditional positional encoding: ``x + dw(x)`` (a depthwise 3x3 conv with bias)."""

    def __init__(self, c):
        super().__init__()
        self.pe = nn.Conv2d(c, c, 3, 1, 1, groups=c)

    def forward(self, x):
        return x + self.pe(x)

    def reparameterize(self) -> nn.Module:
        c = self.pe.in_channels
        w, b = _fold(self.pe, None)
        return _deploy_conv(self.pe, w + _identity_kernel(c, c, (3, 3)), b)


C = 8
BLOCKS = {
    "repvgg": (lambda: RepBlock(C, [3, 1]), (1, C, 9, 9)),
    "acnet": (lambda: RepBlock(C, [3, (1, 3), (3, 1)], identity=False), (1, C, 9, 8)),
    "mobileone_k2": (lambda: MobileOne(C, 2), (1, C, 8, 8)),
    "mobileone_k4": (lambda: MobileOne(C, 4), (1, C, 8, 8)),
    "repvit_dw": (lambda: RepViTMixer(C), (1, C, 8, 8)),
    "repmixer": (lambda: RepMixer(C), (1, C, 8, 8)),
    "cpe": (lambda: CPE(C), (1, C, 8, 8)),
    "yolo_repconv": (lambda: RepBlock(C, [3, 1], identity=False, act=nn.SiLU), (1, C, 8, 8)),
    "conv1d": (lambda: RepBlock(C, [5, 3, 1], rank=1), (1, C, 16)),
    "conv3d": (lambda: RepBlock(C, [3, 1], rank=3), (1, C, 5, 5, 5)),
}


def _export(module: nn.Module, x: torch.Tensor, path, dynamo: bool) -> onnx.ModelProto:
    if dynamo:
        torch.onnx.export(module, (x,), dynamo=True, verbose=False).save(path)
    else:
        torch.onnx.export(module, (x,), path, dynamo=False, opset_version=17)
    return onnx.load(path)


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@functools.cache
def _block(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    make, shape = BLOCKS[name]
    torch.manual_seed(sum(map(ord, name)))
    module = _randomise(make(), seed=len(name))
    return module, module.reparameterize().eval(), torch.randn(*shape)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_reaches_deploy_form(name, exporter, tmp_path):
    module, deploy, x = _block(name)
    with torch.no_grad():
        expected = module(x).numpy()
        np.testing.assert_allclose(deploy(x).numpy(), expected, rtol=RTOL, atol=ATOL)
    original = _export(module, x, tmp_path / "train.onnx", exporter == "dynamo")
    deployed = _export(deploy, x, tmp_path / "deploy.onnx", dynamo=False)
    fused = converter.fuse(original)
    before, after, target = _ops(original)["Conv"], _ops(fused)["Conv"], _ops(deployed)["Conv"]
    assert after == target, f"{name}/{exporter}: Convs {before} -> {after}, deploy form {target}"
    assert before >= after and len(fused.graph.node) < len(original.graph.node)
    assert _ops(fused)["BatchNormalization"] == 0
    onnx.checker.check_model(fused, full_check=True)
    got = _run(fused, x.numpy())
    np.testing.assert_allclose(got, _run(original, x.numpy()), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


# --- Hand-built graphs: each fold, composition and refusal on its own -------------------------

R = np.random.default_rng(11)


def _conv(name, x, y, w, b=None, **attrs) -> list:
    """A Conv node and its initializers."""
    inits = [init(f"{name}.w", w.astype(np.float32))]
    inputs = [x, f"{name}.w"]
    if b is not None:
        inits.append(init(f"{name}.b", b.astype(np.float32)))
        inputs.append(f"{name}.b")
    return [helper.make_node("Conv", inputs, [y], name=name, **attrs)], inits


def _model(parts, x_shape, y_shape) -> onnx.ModelProto:
    nodes = [n for p in parts for n in p[0]]
    inits = [t for p in parts for t in p[1]]
    return make_model(nodes, *xy_io(x_shape, y_shape), inits)


def _step(op: str, x: str, y: str, const: np.ndarray | None, *, const_first=False) -> tuple:
    if op == "BatchNormalization":
        c = const.shape[0]
        names = [f"{y}.{k}" for k in ("g", "b", "m", "v")]
        arrays = [
            R.uniform(0.5, 1.5, c),
            R.normal(size=c),
            R.normal(size=c),
            R.uniform(0.5, 1.5, c),
        ]
        node = helper.make_node(op, [x, *names], [y], name=y, epsilon=1e-3)
        return [node], [init(n, a.astype(np.float32)) for n, a in zip(names, arrays, strict=True)]
    if const is None:
        return [helper.make_node(op, [x], [y], name=y)], []
    inputs = [f"{y}.c", x] if const_first else [x, f"{y}.c"]
    return [helper.make_node(op, inputs, [y], name=y)], [init(f"{y}.c", const.astype(np.float32))]


def _check_fused(model, fusions, ops, policy="cost", atol=1e-5):
    fused, report = fuse_with_report(model, policy)
    assert len(report.fusions) == fusions, report
    assert op_types(fused) == ops, report
    check(fused)
    x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert_equivalent(model, fused, feeds(x_shape), atol=atol)
    return fused, report


STEPS = [
    ("BatchNormalization", np.ones(4), False),
    ("Mul", R.uniform(0.5, 2, (1, 4, 1, 1)), False),
    ("Mul", np.array(1.5), True),
    ("Div", R.uniform(0.5, 2, (4, 1, 1)), False),
    ("Add", R.normal(size=(1, 4, 1, 1)), True),
    ("Sub", R.normal(size=(4, 1, 1)), False),
    ("Sub", R.normal(size=(4, 1, 1)), True),
    ("Neg", None, False),
]


@pytest.mark.parametrize("op, const, const_first", STEPS)
def test_channel_affine_after_conv_folds(op, const, const_first):
    conv = _conv("conv", "x", "h", R.normal(size=(4, 3, 3, 3)), R.normal(size=4), pads=[1] * 4)
    model = _model(
        [conv, _step(op, "h", "y", const, const_first=const_first)], [1, 3, 6, 6], [1, 4, 6, 6]
    )
    _, report = _check_fused(model, 1, ["Conv"])
    assert report.fusions[0].note == f"{op} folded into the Conv before it"


@pytest.mark.parametrize(
    "op, const, pads",
    [
        ("Mul", R.uniform(0.5, 2, (1, 3, 1, 1)), [1] * 4),  # a scale folds before any conv
        ("Add", R.normal(size=(3, 1, 1)), [0] * 4),
        ("BatchNormalization", np.ones(3), [0] * 4),
    ],
)
def test_channel_affine_before_conv_folds(op, const, pads):
    out = 6 if any(pads) else 4
    conv = _conv("conv", "h", "y", R.normal(size=(4, 3, 3, 3)), None, pads=pads)
    model = _model([_step(op, "x", "h", const), conv], [1, 3, 6, 6], [1, 4, out, out])
    _, report = _check_fused(model, 1, ["Conv"])
    assert report.fusions[0].note == f"{op} folded into the Conv after it"


def test_shift_before_padded_conv_is_refused():
    conv = _conv("conv", "h", "y", R.normal(size=(4, 3, 3, 3)), None, pads=[1] * 4)
    model = _model(
        [_step("Add", "x", "h", R.normal(size=(1, 3, 1, 1))), conv], [1, 3, 6, 6], [1, 4, 6, 6]
    )
    fused, report = fuse_with_report(model)
    assert not report.fusions
    assert_same_graph(model, fused)
    (declined,) = report.declined
    assert declined.nodes == ["h", "conv"]
    assert "the padding contributes zeros, not the shift" in declined.reason


def test_branches_with_different_strides_are_refused():
    # A 1x1 conv at stride 2 and a 5x5 conv at stride 1 both give 4x4 from 8x8, but are not one conv.
    a = _conv("a", "x", "ha", R.normal(size=(4, 4, 1, 1)), strides=[2, 2])
    b = _conv("b", "x", "hb", R.normal(size=(4, 4, 5, 5)))
    join = ([helper.make_node("Add", ["ha", "hb"], ["y"], name="join")], [])
    fused, report = fuse_with_report(_model([a, b, join], [1, 4, 8, 8], [1, 4, 4, 4]))
    assert not report.fusions and op_types(fused) == ["Conv", "Conv", "Add"]
    (declined,) = report.declined
    assert declined.nodes == ["a", "b", "join"]
    assert declined.reason.startswith("the branches have different strides")


def test_cost_model_keeps_expansion_then_depthwise():
    expand = _conv("expand", "x", "h", R.normal(size=(16, 4, 1, 1)))
    dw = _conv(
        "dw", "h", "y", R.normal(size=(16, 1, 3, 3)), R.normal(size=16), pads=[1] * 4, group=16
    )
    model = _model([expand, dw], [1, 4, 6, 6], [1, 16, 6, 6])
    fused, report = fuse_with_report(model)
    assert not report.fusions and op_types(fused) == ["Conv", "Conv"]
    (declined,) = report.declined
    assert declined.nodes == ["expand", "dw"]
    assert "cost model: merging would take multiply-adds per output position from 208 to 576" in (
        declined.reason
    )
    fused, _ = _check_fused(model, 1, ["Conv"], policy="always")
    assert [a.i for a in fused.graph.node[0].attribute if a.name == "group"] == [1]


def test_kxk_then_1x1_composes():
    first = _conv("k3", "x", "h", R.normal(size=(8, 4, 3, 3)), R.normal(size=8), pads=[1] * 4)
    second = _conv("pw", "h", "y", R.normal(size=(4, 8, 1, 1)), R.normal(size=4))
    _, report = _check_fused(_model([first, second], [1, 4, 6, 6], [1, 4, 6, 6]), 1, ["Conv"])
    assert report.fusions[0].note == "sequential convs composed: 3x3 then 1x1"
    assert (report.fusions[0].macs_before, report.fusions[0].macs_after) == (320, 144)


def test_bias_then_padded_conv_is_refused():
    first = _conv("pw", "x", "h", R.normal(size=(4, 4, 1, 1)), R.normal(size=4))
    second = _conv("k3", "h", "y", R.normal(size=(4, 4, 3, 3)), None, pads=[1] * 4)
    fused, report = fuse_with_report(_model([first, second], [1, 4, 6, 6], [1, 4, 6, 6]), "always")
    assert not report.fusions and op_types(fused) == ["Conv", "Conv"]
    assert "a bias pushed through zero padding becomes non-uniform" in report.declined[0].reason


def test_conv_transpose_is_refused_with_reason():
    w = init("up.w", R.normal(size=(4, 4, 2, 2)).astype(np.float32))
    up = ([helper.make_node("ConvTranspose", ["x", "up.w"], ["h"], name="up", strides=[2, 2])], [w])
    model = _model(
        [up, _step("Mul", "h", "y", R.uniform(0.5, 2, (1, 4, 1, 1)))], [1, 4, 4, 4], [1, 4, 8, 8]
    )
    fused, report = fuse_with_report(model)
    assert not report.fusions
    assert_same_graph(model, fused)
    assert [(d.nodes, d.reason) for d in report.declined] == [
        (["up", "y"], "ConvTranspose is not re-parameterised (only Conv is)")
    ]


def test_auto_pad_same_conv_with_identity_merges():
    conv = _conv(
        "dw",
        "x",
        "h",
        R.normal(size=(4, 1, 3, 3)),
        R.normal(size=4),
        auto_pad="SAME_UPPER",
        group=4,
    )
    join = ([helper.make_node("Add", ["x", "h"], ["y"], name="join")], [])
    fused, _ = _check_fused(_model([conv, join], [1, 4, 5, 5], [1, 4, 5, 5]), 1, ["Conv"])
    attrs = {a.name: list(a.ints) or a.i for a in fused.graph.node[0].attribute}
    assert attrs["pads"] == [1, 1, 1, 1] and attrs["group"] == 4


def test_shared_conv_weight_is_refused():
    w = R.normal(size=(4, 4, 3, 3))
    a = _conv("a", "x", "h", w, pads=[1] * 4)
    b = ([helper.make_node("Conv", ["h2", "a.w"], ["y"], name="b", pads=[1] * 4)], [])
    mul = _step("Mul", "h", "h2", R.uniform(0.5, 2, (1, 4, 1, 1)))
    fused, report = fuse_with_report(_model([a, mul, b], [1, 4, 6, 6], [1, 4, 6, 6]))
    assert not report.fusions and op_types(fused) == ["Conv", "Mul", "Conv"]
    assert "weight 'a.w' is shared with node 'b'" in report.declined[0].reason


def test_nothing_to_merge_leaves_the_model_unchanged():
    a = _conv("a", "x", "h", R.normal(size=(4, 4, 3, 3)), R.normal(size=4), pads=[1] * 4)
    relu = ([helper.make_node("Relu", ["h"], ["r"], name="relu")], [])
    b = _conv("b", "r", "h2", R.normal(size=(4, 4, 3, 3)), R.normal(size=4), pads=[1] * 4)
    join = ([helper.make_node("Add", ["x", "h2"], ["y"], name="residual")], [])
    model = _model([a, relu, b, join], [1, 4, 6, 6], [1, 4, 6, 6])
    fused, report = fuse_with_report(model)
    assert not report.fusions and not report.declined
    assert_same_graph(model, fused)


def test_sum_node_over_grouped_branches_and_identity():
    """``Sum(grouped 3x3, depthwise 1x1, x)``: the depthwise and identity go block-diagonal."""
    a = _conv("g3", "x", "ha", R.normal(size=(4, 2, 3, 3)), R.normal(size=4), pads=[1] * 4, group=2)
    b = _conv("dw1", "x", "hb", R.normal(size=(4, 1, 1, 1)), R.normal(size=4), group=4)
    join = ([helper.make_node("Sum", ["ha", "hb", "x"], ["y"], name="sum")], [])
    fused, report = _check_fused(_model([a, b, join], [1, 4, 5, 5], [1, 4, 5, 5]), 1, ["Conv"])
    assert report.fusions[0].note == "parallel branches merged: 3x3 + depthwise 1x1 + identity"
    assert {a.name: a.i for a in fused.graph.node[0].attribute}["group"] == 2
