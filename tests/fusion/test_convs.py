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
from torch import nn

import converter
from converter.fusion.passes import fuse_model

RTOL, ATOL = 1e-4, 1e-5
DIM = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}


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
        kernel = tuple(max(b.conv.kernel_size[i] for b in self.branches) for i in range(first.weight.dim() - 2))
        w, b = map(sum, zip(*(branch.fold(kernel) for branch in self.branches), strict=True))
        if self.identity is not None:
            iw, ib = _fold(_Weight(_identity_kernel(first.out_channels, self.groups, kernel)), self.identity)
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
