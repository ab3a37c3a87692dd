"""Training forms of structurally re-parameterised conv blocks (issues 11, 18), each with its deploy form.

Every block's ``reparameterize()`` returns a *new* module (the deploy form: one ``Conv2d`` with a
bias, then the block's activation) and leaves the training form as it was, so a test can compare
the two. The algebra, written here once:

* Conv + BN (inference): ``std = sqrt(var + eps)``, ``K' = K * (gamma / std)`` per output channel,
  ``b' = beta + (b - mean) * gamma / std``.
* A smaller kernel in a sum is zero-padded to the larger one, centred (1x1 -> 3x3, 1x3 -> 3x3).
* An identity branch is a centred delta kernel, per group: ``K[o, o % (cin / groups), c, c] = 1``;
  a lone BN on the input is that delta kernel through the Conv + BN rule.
* Summed branches: ``K = sum K_i``, ``b = sum b_i``; a scaled branch ``s * B`` scales both.

Issue 18 adds the blocks with a GELU between convs, as RepViT's channel mixer and FastViT's
``ConvMlp`` have it, and networks of them. Their deploy forms are what timm's ``reparameterize``
makes of them: FastViT keeps its layer scale as a ``Mul``.

:data:`BLOCKS` and :data:`NETWORKS` map names to builders of :class:`vision.Case` with randomised
BN statistics and layer scales. Images are ``(2, C, 8, 8)`` for blocks, ``(2, 3, 32, 32)`` for
networks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .export import randomise
from .vision import Case, Residual, seeded

__all__ = [
    "BLOCKS",
    "NETWORKS",
    "ACBlock",
    "BNLinear",
    "ConvBN",
    "ConvFFN",
    "MobileOneBlock",
    "MobileOneUnit",
    "mobileone_net",
    "RepCPE",
    "RepConv",
    "RepDW",
    "RepMixer",
    "RepMixerBlock",
    "RepVGGBlock",
    "RepViTBlock",
    "fastvit_net",
    "repvgg_net",
    "repvit_net",
]


def _fold_bn(kernel: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d):
    """``(K', b')`` of ``bn(conv(x))`` for a conv with ``kernel`` and ``bias`` (or none)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = torch.zeros_like(bn.running_mean) if bias is None else bias
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias + (b - bn.running_mean) * scale


def _pad_to(kernel: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Zero-pad ``kernel`` (``O, I, h, w``) to ``(kh, kw)``, centred."""
    dh, dw = (kh - kernel.shape[2]) // 2, (kw - kernel.shape[3]) // 2
    return nn.functional.pad(kernel, (dw, kw - kernel.shape[3] - dw, dh, kh - kernel.shape[2] - dh))


def _identity_kernel(channels: int, groups: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """A centred delta kernel of size ``k`` mapping each channel to itself, for ``groups`` groups."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, k, k, dtype=like.dtype)
    for o in range(channels):
        kernel[o, o % per_group, k // 2, k // 2] = 1.0
    return kernel


class ConvBN(nn.Sequential):
    """``Conv2d(bias=False) -> BatchNorm2d``; ``fused()`` is ``(K, b)`` of the pair."""

    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        )

    def fused(self, kh: int | None = None, kw: int | None = None):
        conv, bn = self[0], self[1]
        kernel, bias = _fold_bn(conv.weight, conv.bias, bn)
        if kh is not None:
            kernel = _pad_to(kernel, kh, kw)
        return kernel, bias

    def reparameterize(self) -> nn.Conv2d:
        """One ``Conv2d`` with a bias; the pair must pad to keep size (``padding = k // 2``)."""
        conv = self[0]
        assert conv.padding == (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
        return _deploy_conv(*self.fused(), stride=conv.stride, groups=conv.groups)


def _bn_identity(bn: nn.BatchNorm2d, groups: int, k: int):
    """``(K, b)`` of a lone ``bn(x)`` branch as a ``k x k`` conv with ``groups`` groups."""
    identity = _identity_kernel(bn.num_features, groups, k, bn.weight)
    return _fold_bn(identity, None, bn)


def _deploy_conv(kernel: torch.Tensor, bias: torch.Tensor, *, stride=1, groups=1) -> nn.Conv2d:
    """A ``Conv2d`` holding ``kernel`` (``O, I/groups, kh, kw``) and ``bias``, padded to keep size."""
    cout, per_group, kh, kw = kernel.shape
    conv = nn.Conv2d(
        per_group * groups, cout, (kh, kw), stride, (kh // 2, kw // 2), groups=groups
    ).to(kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
    return conv


class RepVGGBlock(nn.Module):
    """RepVGG: ``act(bn3(conv3x3(x)) + bn1(conv1x1(x)) + bn_id(x))``; identity only when shapes allow.

    ``act`` is ReLU (RepVGG, YOLOv6 ``RepVGGBlock``) or SiLU (YOLOv7 ``RepConv``).
    """

    def __init__(self, cin, cout, stride=1, groups=1, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.groups = groups
        self.dense = ConvBN(cin, cout, 3, stride, 1, groups)
        self.one = ConvBN(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.one(x)
        return self.act(y if self.identity is None else y + self.identity(x))

    def reparameterize(self) -> nn.Module:
        k3, b3 = self.dense.fused()
        k1, b1 = self.one.fused(3, 3)
        kernel, bias = k3 + k1, b3 + b1
        if self.identity is not None:
            ki, bi = _bn_identity(self.identity, self.groups, 3)
            kernel, bias = kernel + ki, bias + bi
        return nn.Sequential(
            _deploy_conv(kernel, bias, stride=self.dense[0].stride, groups=self.groups), self.act
        )


class RepConv(RepVGGBlock):
    """YOLOv7 ``RepConv``: the RepVGG branches with a SiLU."""

    def __init__(self, cin, cout, stride=1) -> None:
        super().__init__(cin, cout, stride, act=nn.SiLU)


class ACBlock(nn.Module):
    """ACNet: ``relu(bn(conv3x3(x)) + bn(conv1x3(x)) + bn(conv3x1(x)))``."""

    def __init__(self, cin, cout, stride=1) -> None:
        super().__init__()
        self.square = ConvBN(cin, cout, 3, stride, 1)
        self.hor = ConvBN(cin, cout, (1, 3), stride, (0, 1))
        self.ver = ConvBN(cin, cout, (3, 1), stride, (1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.square(x) + self.hor(x) + self.ver(x))

    def reparameterize(self) -> nn.Module:
        parts = [self.square.fused(), self.hor.fused(3, 3), self.ver.fused(3, 3)]
        kernel, bias = sum(k for k, _ in parts), sum(b for _, b in parts)
        return nn.Sequential(_deploy_conv(kernel, bias, stride=self.square[0].stride), nn.ReLU())


class MobileOneBlock(nn.Module):
    """MobileOne: ``act(sum_k bn(conv_kxk(x)) + bn(conv1x1(x)) + bn(x))``.

    ``branches`` over-parameterised ``kernel x kernel`` conv branches, a 1x1 scale branch when
    ``kernel > 1`` and ``scale_branch``, a BN identity when shapes allow. ``act=None`` for none.
    """

    def __init__(
        self, cin, cout, kernel, stride=1, groups=1, branches=1, scale_branch=True, act=nn.ReLU
    ) -> None:
        super().__init__()
        self.kernel, self.groups, self.stride = kernel, groups, stride
        pad = kernel // 2
        self.convs = nn.ModuleList(
            ConvBN(cin, cout, kernel, stride, pad, groups) for _ in range(branches)
        )
        use_scale = scale_branch and kernel > 1
        self.scale = ConvBN(cin, cout, 1, stride, 0, groups) if use_scale else None
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sum(conv(x) for conv in self.convs)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.act(y)

    def fused(self):
        """``(K, b)`` of the whole sum as one ``kernel x kernel`` conv."""
        k = self.kernel
        parts = [conv.fused() for conv in self.convs]
        if self.scale is not None:
            parts.append(self.scale.fused(k, k))
        if self.skip is not None:
            parts.append(_bn_identity(self.skip, self.groups, k))
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def reparameterize(self) -> nn.Module:
        kernel, bias = self.fused()
        conv = _deploy_conv(kernel, bias, stride=self.stride, groups=self.groups)
        return nn.Sequential(conv, self.act)


class MobileOneUnit(nn.Module):
    """MobileOne's unit: a depthwise ``3x3`` block then a pointwise ``1x1`` block, ``k`` branches each."""

    def __init__(self, cin, cout, stride=1, branches=2) -> None:
        super().__init__()
        self.dw = MobileOneBlock(cin, cin, 3, stride, groups=cin, branches=branches)
        self.pw = MobileOneBlock(cin, cout, 1, 1, branches=branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))

    def reparameterize(self) -> nn.Module:
        return nn.Sequential(self.dw.reparameterize(), self.pw.reparameterize())


class RepDW(nn.Module):
    """RepViT's ``RepVGGDW``: ``bn(bn3(dw3x3(x)) + dw1x1(x) + x)`` (the 1x1 has a bias, no BN)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.conv = ConvBN(dim, dim, 3, 1, 1, groups=dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=dim)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)

    def reparameterize(self) -> nn.Module:
        k3, b3 = self.conv.fused()
        k1 = _pad_to(self.conv1.weight, 3, 3)
        kernel = k3 + k1 + _identity_kernel(self.dim, self.dim, 3, k3)
        kernel, bias = _fold_bn(kernel, b3 + self.conv1.bias, self.bn)
        return _deploy_conv(kernel, bias, groups=self.dim)


class RepMixer(nn.Module):
    """FastViT ``RepMixer``: ``x + ls * (mixer(x) - norm(x))``, both depthwise MobileOne blocks.

    ``norm`` is a lone BN (no conv branch), ``mixer`` one 3x3 branch, a 1x1 scale branch and a
    BN skip; no activation; ``ls`` is ``(dim, 1, 1)``.
    """

    def __init__(self, dim: int, kernel: int = 3) -> None:
        super().__init__()
        self.dim, self.kernel = dim, kernel
        common = {"groups": dim, "act": None}
        self.norm = MobileOneBlock(dim, dim, kernel, branches=0, scale_branch=False, **common)
        self.mixer = MobileOneBlock(dim, dim, kernel, branches=1, **common)
        self.layer_scale = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    def reparameterize(self) -> nn.Module:
        km, bm = self.mixer.fused()
        kn, bn = self.norm.fused()
        ls = self.layer_scale.reshape(-1)
        identity = _identity_kernel(self.dim, self.dim, self.kernel, km)
        kernel = identity + ls.reshape(-1, 1, 1, 1) * (km - kn)
        return _deploy_conv(kernel, ls * (bm - bn), groups=self.dim)


class RepCPE(nn.Module):
    """Conditional positional encoding (FastViT ``RepCPE``): ``x + dw(x)``, a depthwise conv with bias."""

    def __init__(self, dim: int, kernel: int = 3) -> None:
        super().__init__()
        self.dim, self.kernel = dim, kernel
        self.pe = nn.Conv2d(dim, dim, kernel, 1, kernel // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe(x)

    def reparameterize(self) -> nn.Module:
        identity = _identity_kernel(self.dim, self.dim, self.kernel, self.pe.weight)
        return _deploy_conv(self.pe.weight + identity, self.pe.bias, groups=self.dim)


def _deploy(module: nn.Module) -> nn.Module:
    """``module``'s deploy form: its ``reparameterize()``, or a copy of a module that has none."""
    reparameterize = getattr(module, "reparameterize", None)
    return reparameterize() if reparameterize is not None else copy.deepcopy(module)


class RepViTBlock(nn.Module):
    """RepViT block (stride 1): token mixer :class:`RepDW`, residual channel mixer with GELU.

    ``x = dw(x)``, then ``x + bn(conv1x1(gelu(bn(conv1x1(x)))))`` (2x hidden width).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token_mixer = RepDW(dim)
        self.channel_mixer = Residual(
            nn.Sequential(ConvBN(dim, 2 * dim, 1), nn.GELU(), ConvBN(2 * dim, dim, 1))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_mixer(self.token_mixer(x))

    def reparameterize(self) -> nn.Module:
        mlp = nn.Sequential(*(_deploy(m) for m in self.channel_mixer.m))
        return nn.Sequential(self.token_mixer.reparameterize(), Residual(mlp))


class ConvFFN(nn.Module):
    """FastViT's ``ConvMlp``: depthwise 7x7 conv + BN, 1x1 conv (4x), GELU, 1x1 conv."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = ConvBN(dim, dim, 7, 1, 3, groups=dim)
        self.fc1, self.act, self.fc2 = (
            nn.Conv2d(dim, 4 * dim, 1),
            nn.GELU(),
            nn.Conv2d(4 * dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))

    def reparameterize(self) -> nn.Module:
        deploy = copy.deepcopy(self)
        deploy.conv = self.conv.reparameterize()
        return deploy


class RepMixerBlock(nn.Module):
    """FastViT's ``RepMixerBlock``: ``x = repmixer(x)``, then ``x + ls * convffn(x)``.

    The deploy form re-parameterises the mixer and the FFN's conv + BN, and keeps the layer scale
    ``ls`` (``(dim, 1, 1)``) as timm does.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mixer, self.ffn = RepMixer(dim), ConvFFN(dim)
        self.layer_scale = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixer(x)
        return x + self.layer_scale * self.ffn(x)

    def reparameterize(self) -> nn.Module:
        deploy = copy.deepcopy(self)
        deploy.mixer, deploy.ffn = self.mixer.reparameterize(), self.ffn.reparameterize()
        return deploy


class BNLinear(nn.Sequential):
    """RepViT's classifier ``BN_Linear``: ``BatchNorm1d`` then ``Linear``; deploy folds the BN in.

    ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``: ``W' = W * s``, ``b' = b + W @ t``.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.BatchNorm1d(cin), nn.Linear(cin, cout))

    def reparameterize(self) -> nn.Linear:
        bn, fc = self[0], self[1]
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        t = bn.bias - bn.running_mean * s
        linear = nn.Linear(fc.in_features, fc.out_features).to(fc.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(fc.weight * s)
            linear.bias.copy_(fc.bias + fc.weight @ t)
        return linear


class RepStack(nn.Module):
    """Blocks in sequence, then global average pooling and a head (a Linear unless given)."""

    def __init__(
        self,
        blocks: list[nn.Module],
        channels: int,
        classes: int = 10,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, classes) if head is None else head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))

    def reparameterize(self) -> nn.Module:
        """Each block's and the head's deploy form (a module without one, a GELU, is copied)."""
        return RepStack([_deploy(b) for b in self.blocks], 0, head=_deploy(self.head))


def repvgg_net() -> RepStack:
    """RepVGG-A0-like: 6 RepVGG blocks 3->16->16->32->32->64->64, three with stride 2."""
    widths = [(3, 16, 2), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1)]
    return RepStack([RepVGGBlock(i, o, s) for i, o, s in widths], 64)


def mobileone_net(branches: int = 4) -> RepStack:
    """MobileOne-S0-like: a MobileOne 3x3 stem (stride 2) then 4 units (dw + pw), ``k`` branches."""
    stem = MobileOneBlock(3, 16, 3, 2, branches=1)
    units = [
        MobileOneUnit(16, 16, 1, branches),
        MobileOneUnit(16, 32, 2, branches),
        MobileOneUnit(32, 32, 1, branches),
        MobileOneUnit(32, 64, 2, branches),
    ]
    return RepStack([stem, *units], 64)


def repvit_net() -> RepStack:
    """RepViT-M0.9-like: stem ``ConvBN -> GELU -> ConvBN`` (stride 4), 2 blocks at 32 channels,
    a depthwise stride-2 ``ConvBN`` and a pointwise ``ConvBN`` to 64, 1 block, a ``BN_Linear`` head.
    """
    stem = [ConvBN(3, 16, 3, 2, 1), nn.GELU(), ConvBN(16, 32, 3, 2, 1)]
    blocks = [RepViTBlock(32), RepViTBlock(32), ConvBN(32, 32, 3, 2, 1, groups=32)]
    blocks += [ConvBN(32, 64, 1), RepViTBlock(64)]
    return RepStack([*stem, *blocks], 64, head=BNLinear(64, 10))


def fastvit_net() -> RepStack:
    """FastViT-T8-like: a MobileOne stem with GELU (3x3 stride 2, depthwise 3x3 stride 2, 1x1),
    2 ``RepMixerBlock``, a ``RepCPE``, 1 ``RepMixerBlock`` at 32 channels, a Linear head.
    """
    stem = [
        MobileOneBlock(3, 16, 3, 2, act=nn.GELU),
        MobileOneBlock(16, 16, 3, 2, groups=16, act=nn.GELU),
        MobileOneBlock(16, 32, 1, act=nn.GELU),
    ]
    blocks = [RepMixerBlock(32), RepMixerBlock(32), RepCPE(32), RepMixerBlock(32)]
    return RepStack([*stem, *blocks], 32)


def _image(channels: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, size, size, generator=g)


def _case(module: nn.Module, channels: int, size: int = 8) -> Case:
    return Case(randomise(module).eval(), (_image(channels, size),))


_BLOCKS: dict[str, Callable[[], Case]] = {
    "repvgg": lambda: _case(RepVGGBlock(8, 8), 8),
    "repvgg_stride2": lambda: _case(RepVGGBlock(8, 16, 2), 8),
    "repvgg_grouped": lambda: _case(RepVGGBlock(8, 8, groups=2), 8),
    "acnet": lambda: _case(ACBlock(8, 8), 8),
    "mobileone_k2": lambda: _case(MobileOneUnit(8, 8, branches=2), 8),
    "mobileone_k4": lambda: _case(MobileOneUnit(8, 16, branches=4), 8),
    "repvit_dw": lambda: _case(RepDW(8), 8),
    "repmixer": lambda: _case(RepMixer(8), 8),
    "cpe": lambda: _case(RepCPE(8), 8),
    "repconv_yolo": lambda: _case(RepConv(8, 8), 8),
    "repvit_block": lambda: _case(RepViTBlock(8), 8),
    "fastvit_block": lambda: _case(RepMixerBlock(8), 8),
}

_NETWORKS: dict[str, Callable[[], Case]] = {
    "repvgg_a0": lambda: _case(repvgg_net(), 3, 32),
    "mobileone_s0": lambda: _case(mobileone_net(4), 3, 32),
    "repvit_m09": lambda: _case(repvit_net(), 3, 32),
    "fastvit_t8": lambda: _case(fastvit_net(), 3, 32),
}

BLOCKS = {name: seeded(build) for name, build in _BLOCKS.items()}
NETWORKS = {name: seeded(build) for name, build in _NETWORKS.items()}
