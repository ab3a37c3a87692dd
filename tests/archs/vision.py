"""Small torch modules with the structures of issues 10 and 18, and whole networks built of them.

Each structure is a module a few thousand parameters big with an example input of a handful of
tokens, so one export plus one onnxruntime run takes well under a second. :data:`BLOCKS` maps a
name to a builder returning a :class:`Case` (module, example args); :data:`NETWORKS` the same for
the benchmarks' whole networks: an MLP-only classifier (ResMLP), a hybrid conv/attention net with
Linear+BN (LeViT), a ViT with layer scale and two averaged heads (DeiT-III-like, exact and tanh
GELU), ConvNeXt (with its written-out channels-first LayerNorm), EfficientFormer (pooling and
attention blocks, BatchNorm in both MLPs) and MLP-Mixer. Every builder calls
:func:`export.randomise`, so BatchNorm statistics, affines and layer scales are never the identity.

Issue 18's blocks put a GELU between two linear layers the way each architecture does (exact
``nn.GELU()`` unless named ``_tanh``): the exporters write it as a pattern onnxruntime fuses into
one kernel (or, for ``torch.export`` at opset 18, one it does not), and a fold of its constants
into a neighbouring layer can cost the runtime that kernel.

Shapes: tokens are ``(B, N, C) = (2, 8, 16)``, images ``(2, 3, 16, 16)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from .export import randomise

__all__ = [
    "BLOCKS",
    "NETWORKS",
    "Case",
    "seeded",
    "ClassAttentionBlock",
    "LeViTAttention",
    "LeViTMlp",
    "LinearBN",
    "ResMLP",
    "LeViT",
    "DeiTDistilled",
    "ViTBlock",
    "LayerNorm2d",
    "ConvNeXtBlock",
    "ConvNeXt",
    "TokenMlpBN",
    "TokenMlpBlock",
    "Meta3D",
    "Meta4D",
    "EfficientFormer",
    "MixerBlock",
    "Mixer",
]

B, N, C = 2, 8, 16


@dataclasses.dataclass
class Case:
    """A module in eval mode and the example arguments to export and run it with."""

    module: nn.Module
    args: tuple[torch.Tensor, ...]


def _tokens(seed: int = 0, shape: tuple[int, ...] = (B, N, C)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _image(seed: int = 0, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(B, channels, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- building blocks


class LinearBN(nn.Module):
    """LeViT's ``Linear_BN``: ``bn(linear(x).flatten(0, 1)).reshape_as(...)`` over tokens."""

    def __init__(self, cin: int, cout: int, bias: bool = False) -> None:
        super().__init__()
        self.c = nn.Linear(cin, cout, bias=bias)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class LeViTAttention(nn.Module):
    """LeViT attention: ``qkv`` and ``proj`` are :class:`LinearBN`, Hardswish before ``proj``."""

    def __init__(self, dim: int = C, key_dim: int = 4, heads: int = 2, ratio: int = 2) -> None:
        super().__init__()
        self.heads, self.key_dim, self.d = heads, key_dim, ratio * key_dim
        self.scale = key_dim**-0.5
        self.qkv = LinearBN(dim, heads * (2 * key_dim + self.d))
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(heads * self.d, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.d)
        return self.proj(y)


class LeViTMlp(nn.Module):
    """LeViT MLP: ``LinearBN -> Hardswish -> LinearBN``."""

    def __init__(self, dim: int = C, hidden: int = 2 * C) -> None:
        super().__init__()
        self.net = nn.Sequential(LinearBN(dim, hidden), nn.Hardswish(), LinearBN(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Residual(nn.Module):
    """``x + m(x)``."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class LayerScaleProj(nn.Module):
    """``x + gamma * proj(gelu(x))``: layer scale after a projection, per-feature ``gamma``."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.proj(nn.functional.gelu(x))


class ClassAttention(nn.Module):
    """CaiT class attention: the class token (row 0) attends to all tokens; ``q`` from row 0."""

    def __init__(self, dim: int = C, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.q(x[:, 0]).unsqueeze(1).reshape(b, 1, h, c // h).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, 1, c))


class ClassAttentionBlock(nn.Module):
    """CaiT ``LayerScale_Block_CA``: ``cls + gamma1 * attn(norm(cat(cls, x)))``, then the MLP."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ClassAttention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gamma1 = nn.Parameter(1e-5 * torch.ones(dim))
        self.gamma2 = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, tokens = x[:, :1], x[:, 1:]
        u = torch.cat([cls, tokens], dim=1)
        cls = cls + self.gamma1 * self.attn(self.norm1(u))
        cls = cls + self.gamma2 * self.mlp(self.norm2(cls))
        return torch.cat([cls, tokens], dim=1)


class Affine(nn.Module):
    """ResMLP's ``Affine``: ``alpha * x + beta``, per feature."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta


class AffineLinear(nn.Module):
    """``fc(alpha * x + beta)`` then a ReLU, so only the affine and the Linear can merge."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.affine, self.fc = Affine(dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.affine(torch.relu(x))))


class TokenMixing(nn.Module):
    """MLP-Mixer token mixing, two maps on the token axis: ``fc_b(fc_a(x.T)).T`` (T = transpose(1,2))."""

    def __init__(self, tokens: int = N) -> None:
        super().__init__()
        self.fc_a, self.fc_b = nn.Linear(tokens, tokens), nn.Linear(tokens, tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc_b(self.fc_a(torch.relu(x).transpose(1, 2))).transpose(1, 2))


class TokenMixingLeft(nn.Module):
    """Token mixing written with the weight on the left: ``W2 @ (W1 @ x + b1) + b2``, ``x`` of ``(B, N, C)``."""

    def __init__(self, tokens: int = N) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(tokens, tokens) / tokens**0.5)
        self.w2 = nn.Parameter(torch.randn(tokens, tokens) / tokens**0.5)
        self.b1 = nn.Parameter(torch.randn(tokens, 1))
        self.b2 = nn.Parameter(torch.randn(tokens, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.w2 @ (self.w1 @ torch.relu(x) + self.b1) + self.b2)


class ResMLPTokenBlock(nn.Module):
    """ResMLP cross-patch sublayer: ``x + ls * fc(aff(x).T).T`` (per-channel ``ls``, token ``fc``)."""

    def __init__(self, dim: int = C, tokens: int = N) -> None:
        super().__init__()
        self.aff, self.fc = Affine(dim), nn.Linear(tokens, tokens)
        self.ls = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls * self.fc(self.aff(x).transpose(1, 2)).transpose(1, 2)


class ChannelsLastMlp(nn.Module):
    """ConvNeXt-style: ``fc(x.permute(0,2,3,1)).permute(0,3,1,2) * gamma.reshape(1,-1,1,1)``.

    With ``conv1x1`` a 1x1 ``Conv2d`` comes first (a linear map on channels too).
    """

    def __init__(self, channels: int = 8, conv1x1: bool = False) -> None:
        super().__init__()
        self.pre = nn.Conv2d(channels, channels, 1) if conv1x1 else nn.Identity()
        self.fc = nn.Linear(channels, channels)
        self.gamma = nn.Parameter(1e-6 * torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.pre(torch.relu(x)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + y * self.gamma.reshape(1, -1, 1, 1)


class GeluLinear(nn.Module):
    """``fc2(gelu(fc1(x)))``: the legacy exporter's GELU ends in ``Mul(0.5)``, a scale for ``fc2``."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class NegLinear(nn.Module):
    """``fc2(-fc1(x))``."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(-self.fc1(x))


class IdentityDropout(nn.Module):
    """``fc2(dropout(identity(fc1(x))))`` in eval mode."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.identity, self.dropout = nn.Identity(), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.identity(self.fc1(x))))


class StackSum(nn.Module):
    """``torch.stack([a(x), b(x), c(x)]).sum(0)``."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.a(x), self.b(x), self.c(x)]).sum(0)


class ThreeBranches(nn.Module):
    """``a(x) + b(x) + x`` (three branches of one input, one of them the identity)."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + x


class ScaledBranches(nn.Module):
    """``a(x) + 0.5 * b(x) - c(x) + x``: scaled and subtracted branches."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + 0.5 * self.b(x) - self.c(x) + x


class LinearBN1d(nn.Module):
    """``bn(fc(x))`` on a 2-D input ``(B, C)``, then a ReLU."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(dim, dim), nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.fc(x)))

    def tie_statistics(self) -> LinearBN1d:
        """Make ``bn.weight == running_var`` and ``bn.bias == running_mean`` (values, not tensors).

        The legacy exporter deduplicates initializers with equal values, so its graph then feeds
        BatchNormalization ``Identity(weight)`` as the variance and ``Identity(bias)`` as the mean.
        """
        with torch.no_grad():
            self.bn.weight.copy_(self.bn.running_var)
            self.bn.bias.copy_(self.bn.running_mean)
        return self


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first ``LayerNorm``, written out as its official code does.

    ``u = mean_c(x)``, ``s = mean_c((x - u)^2)``, ``w * (x - u) / sqrt(s + eps) + b`` with ``w, b``
    per channel: exported as ``ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div ->
    Mul(w) -> Add(b)`` over axis 1 (onnxruntime's ``LayerNormFusion`` wants the last axis).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: ``x + permute_back(gamma * fc2(gelu(fc1(norm(permute(dwconv7x7(x)))))))``.

    The depthwise 7x7 conv works channels-first; the permute to channels-last puts the
    ``LayerNorm``, the 4x ``Linear``, exact GELU, the ``Linear`` back and the per-channel layer scale
    ``gamma`` on the last axis, and a permute back feeds the residual.
    """

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.fc2(self.act(self.fc1(y)))
        return x + y.permute(0, 3, 1, 2)


class TokenMlpBN(nn.Module):
    """EfficientFormer's token MLP with BatchNorm: ``LinearBN -> GELU -> LinearBN`` over tokens."""

    def __init__(self, dim: int = C, hidden: int = 4 * C) -> None:
        super().__init__()
        self.fc1, self.act = LinearBN(dim, hidden, bias=True), nn.GELU()
        self.fc2 = LinearBN(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TokenMlpBlock(nn.Module):
    """The MLP sublayer of EfficientFormer's ``Meta3D``: ``x + ls * mlp(norm(x))``."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(dim), TokenMlpBN(dim, 4 * dim)
        self.ls = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls * self.mlp(self.norm(x))


class Meta4D(nn.Module):
    """EfficientFormer's ``Meta4D``: pooling mixer, then a 1x1-conv MLP with BatchNorm, layer scales.

    ``x + ls1 * (avgpool3x3(x) - x)``, then ``x + ls2 * bn(conv1x1(gelu(bn(conv1x1(x)))))``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.mlp = nn.Sequential(
            nn.Conv2d(dim, 4 * dim, 1), nn.BatchNorm2d(4 * dim), nn.GELU(),
            nn.Conv2d(4 * dim, dim, 1), nn.BatchNorm2d(dim),
        )  # fmt: skip
        self.ls1 = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))
        self.ls2 = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * (self.pool(x) - x)
        return x + self.ls2 * self.mlp(x)


class MixerBlock(nn.Module):
    """MLP-Mixer block: token MLP on the transposed tokens, channel MLP, both with exact GELU."""

    def __init__(self, dim: int = C, tokens: int = N) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens = nn.Sequential(
            nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens)
        )
        self.channels = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


# ----------------------------------------------------------------------------- whole networks


class ResMLPBlock(nn.Module):
    """ResMLP layer: token sublayer (Affine, token Linear, layer scale), channel MLP sublayer."""

    def __init__(self, dim: int, tokens: int) -> None:
        super().__init__()
        self.token = ResMLPTokenBlock(dim, tokens)
        self.aff = Affine(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ls = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token(x)
        return x + self.ls * self.mlp(self.aff(x))


class ResMLP(nn.Module):
    """MLP-only classifier: patch embedding Linear, 4 ResMLP blocks, Affine, mean pool, head."""

    def __init__(self, dim: int = 64, patch: int = 4, size: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.patch, tokens = patch, (size // patch) ** 2
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.blocks = nn.Sequential(*(ResMLPBlock(dim, tokens) for _ in range(4)))
        self.norm, self.head = Affine(dim), nn.Linear(dim, classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        p = self.patch
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = self.embed(x.reshape(b, (h // p) * (w // p), c * p * p))
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


class LeViT(nn.Module):
    """Hybrid: conv stem (Conv+BN, Hardswish), 2 blocks of LeViT attention + MLP, BN head."""

    def __init__(self, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, dim // 4, 3, 2, 1), nn.BatchNorm2d(dim // 4), nn.Hardswish(),
            nn.Conv2d(dim // 4, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2), nn.Hardswish(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.BatchNorm2d(dim),
        )  # fmt: skip
        blocks = []
        for _ in range(2):
            blocks += [Residual(LeViTAttention(dim, 16, 4, 2)), Residual(LeViTMlp(dim, 2 * dim))]
        self.blocks = nn.Sequential(*blocks)
        self.head_bn, self.head = nn.BatchNorm1d(dim), nn.Linear(dim, classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.stem(img).flatten(2).transpose(1, 2)
        x = self.blocks(x).mean(1)
        return self.head(self.head_bn(x))


class ViTBlock(nn.Module):
    """Pre-norm ViT block with layer scale on both sublayers (CaiT/DeiT-III style).

    ``approximate`` is ``nn.GELU``'s: ``"none"`` (exact, erf) or ``"tanh"``.
    """

    def __init__(self, dim: int, heads: int = 4, approximate: str = "none") -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate=approximate), nn.Linear(4 * dim, dim)
        )
        self.gamma1 = nn.Parameter(1e-5 * torch.ones(dim))
        self.gamma2 = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.gamma1 * self.proj(y.transpose(1, 2).reshape(b, n, c))
        return x + self.gamma2 * self.mlp(self.norm2(x))


class DeiTDistilled(nn.Module):
    """ViT with class and distillation tokens, layer scale, ``(head(t0) + head_dist(t1)) / 2``."""

    def __init__(
        self,
        dim: int = 64,
        patch: int = 4,
        size: int = 32,
        classes: int = 10,
        approximate: str = "none",
    ) -> None:
        super().__init__()
        tokens = (size // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 2, dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim, approximate=approximate) for _ in range(4)))
        self.norm = nn.LayerNorm(dim)
        self.head, self.head_dist = nn.Linear(dim, classes), nn.Linear(dim, classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.embed(img).flatten(2).transpose(1, 2)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), x], 1)
        x = self.norm(self.blocks(x + self.pos))
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


class ConvNeXt(nn.Module):
    """ConvNeXt: patchify stem + channels-first LayerNorm, 2 stages of 2 blocks, LN + head.

    Between the stages, ConvNeXt's downsampling: channels-first LayerNorm then a 2x2 stride-2 conv.
    """

    def __init__(self, dims: tuple[int, int] = (32, 64), classes: int = 10) -> None:
        super().__init__()
        a, b = dims
        self.stem = nn.Sequential(nn.Conv2d(3, a, 4, 4), LayerNorm2d(a))
        self.stages = nn.Sequential(
            ConvNeXtBlock(a), ConvNeXtBlock(a), LayerNorm2d(a), nn.Conv2d(a, b, 2, 2),
            ConvNeXtBlock(b), ConvNeXtBlock(b),
        )  # fmt: skip
        self.norm, self.head = nn.LayerNorm(b), nn.Linear(b, classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(img))
        return self.head(self.norm(x.mean((2, 3))))


class Meta3D(ViTBlock):
    """EfficientFormer's ``Meta3D``: a layer-scaled ViT block whose MLP is :class:`TokenMlpBN`."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__(dim, heads)
        self.mlp = TokenMlpBN(dim, 4 * dim)


class EfficientFormer(nn.Module):
    """EfficientFormer-L1-like: Conv+BN stem, 2 ``Meta4D`` blocks, flatten, 1 ``Meta3D``, head."""

    def __init__(self, dim: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2), nn.ReLU(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.ReLU(),
        )  # fmt: skip
        self.convs = nn.Sequential(Meta4D(dim), Meta4D(dim))
        self.attention = Meta3D(dim, heads=4)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.convs(self.stem(img)).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.attention(x)).mean(1))


class Mixer(nn.Module):
    """MLP-Mixer: patch embedding conv, 2 :class:`MixerBlock`, LayerNorm, mean pool, head."""

    def __init__(self, dim: int = 32, patch: int = 4, size: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        tokens = (size // patch) ** 2
        self.blocks = nn.Sequential(MixerBlock(dim, tokens), MixerBlock(dim, tokens))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.embed(img).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


# ----------------------------------------------------------------------------- registries


def _case(module: nn.Module, *args: torch.Tensor, seed: int = 0) -> Case:
    return Case(randomise(module, seed).eval(), args)


def seeded(build: Callable[[], Case], seed: int = 0) -> Callable[[], Case]:
    """``build`` run under torch's global RNG seeded with ``seed`` (restored afterwards).

    Modules draw their initial weights from the global RNG; seeding it makes every call of a
    registry entry return the same weights, so a module built twice (export, then reference)
    computes the same function.
    """

    def run() -> Case:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build()

    run.__doc__ = build.__doc__
    return run


_BLOCKS: dict[str, Callable[[], Case]] = {
    "linear_bn_tokens": lambda: _case(LinearBN(C, 2 * C), _tokens()),
    "levit_attention": lambda: _case(Residual(LeViTAttention()), _tokens()),
    "levit_mlp": lambda: _case(Residual(LeViTMlp()), _tokens()),
    "layer_scale": lambda: _case(LayerScaleProj(), _tokens()),
    "class_attention": lambda: _case(ClassAttentionBlock(), _tokens()),
    "affine_linear": lambda: _case(AffineLinear(), _tokens()),
    "token_mixing": lambda: _case(TokenMixing(), _tokens()),
    "token_mixing_left": lambda: _case(TokenMixingLeft(), _tokens()),
    "resmlp_token": lambda: _case(ResMLPTokenBlock(), _tokens()),
    "channels_last_mlp": lambda: _case(ChannelsLastMlp(), _image(channels=8, size=4)),
    "conv_channels_last_mlp": lambda: _case(
        ChannelsLastMlp(conv1x1=True), _image(channels=8, size=4)
    ),
    "gelu_linear": lambda: _case(GeluLinear(), _tokens()),
    "neg_linear": lambda: _case(NegLinear(), _tokens()),
    "identity_dropout": lambda: _case(IdentityDropout(), _tokens()),
    "stack_sum": lambda: _case(StackSum(), _tokens()),
    "three_branches": lambda: _case(ThreeBranches(), _tokens()),
    "scaled_branches": lambda: _case(ScaledBranches(), _tokens()),
    "linear_bn1d": lambda: _case(LinearBN1d(), _tokens(shape=(4, C))),
    "linear_bn1d_tied": lambda: Case(
        randomise(LinearBN1d()).tie_statistics().eval(), (_tokens(shape=(4, C)),)
    ),
    # issue 18: GELU (and norms) between the layers, as each architecture writes them
    "vit_block": lambda: _case(ViTBlock(C, heads=2), _tokens()),
    "vit_block_tanh": lambda: _case(ViTBlock(C, heads=2, approximate="tanh"), _tokens()),
    "convnext_block": lambda: _case(ConvNeXtBlock(), _image(channels=C, size=8)),
    "efficientformer_mlp": lambda: _case(TokenMlpBlock(), _tokens()),
    "efficientformer_meta4d": lambda: _case(Meta4D(8), _image(channels=8, size=8)),
    "mixer_block": lambda: _case(MixerBlock(), _tokens()),
}

_NETWORKS: dict[str, Callable[[], Case]] = {
    "resmlp": lambda: _case(ResMLP(), _image(size=32)),
    "levit": lambda: _case(LeViT(), _image(size=32)),
    "deit_distilled": lambda: _case(DeiTDistilled(), _image(size=32)),
    "deit_tanh": lambda: _case(DeiTDistilled(approximate="tanh"), _image(size=32)),
    "convnext": lambda: _case(ConvNeXt(), _image(size=32)),
    "efficientformer": lambda: _case(EfficientFormer(), _image(size=32)),
    "mixer": lambda: _case(Mixer(), _image(size=32)),
}

BLOCKS = {name: seeded(build) for name, build in _BLOCKS.items()}
NETWORKS = {name: seeded(build) for name, build in _NETWORKS.items()}
