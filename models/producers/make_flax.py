"""Flax NNX models exported with jax2onnx: the Flax rows of issue 22's table.

Rebuild (from the repository root; a venv of its own, outside the checkout, never torch; flax
0.12.12 needs Python 3.12 or newer)::

    python3.12 -m venv /tmp/venv-jax
    /tmp/venv-jax/bin/pip install jax==0.12.0.1 jaxlib==0.12.0.1 flax==0.12.12 \
        jax2onnx==0.17.1 onnx==1.23.2 onnx-ir==1.1.0 onnxruntime==1.32.0 numpy==2.5.5
    /tmp/venv-jax/bin/python models/producers/make_flax.py

or, for the whole environment exactly as it was (``pip freeze`` of the one that built the files),
``/tmp/venv-jax/bin/pip install -r models/producers/requirements-flax.txt``.

Each model is an ``nnx.Module`` as Flax users write it (NHWC convolutions, ``nnx.BatchNorm``
switched to its running averages by ``model.eval()``), with random weights and biases and
non-trivial BatchNorm statistics and scale/bias under a fixed seed, exported with
``jax2onnx.to_onnx`` at its default opset and a dynamic batch axis ``B``. The fixtures:

* ``flax_conv_branches``: a RepVGG-style block: 3x3 Conv+BN + 1x1 Conv+BN + BN identity, summed,
  ReLU, 16 channels on 8x8 (jax2onnx writes each branch as ``Transpose -> Conv -> BN ->
  Transpose`` back to NHWC before the sum, the identity as ``Transpose -> BN -> Transpose``).
* ``flax_linear_rank3``: ``nnx.Linear(16, 32) -> nnx.Linear(32, 8)`` on (B, 10, 16) tokens
  (``Reshape -> Gemm(transB=0) -> Reshape`` per layer).
"""

from __future__ import annotations

import os

from _common import fixed_hash_seed, save

fixed_hash_seed()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax2onnx import to_onnx  # noqa: E402

SEED = 22
BATCH = 4
ATOL = RTOL = 1e-4


class ConvBranches(nnx.Module):
    """RepVGG's training-time block: three branches summed, then ReLU."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv3 = nnx.Conv(channels, channels, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn3 = nnx.BatchNorm(channels, rngs=rngs)
        self.conv1 = nnx.Conv(channels, channels, (1, 1), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(channels, rngs=rngs)
        self.bn_id = nnx.BatchNorm(channels, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bn_id(x))


class TwoLinear(nnx.Module):
    """A projection then a head with nothing between them, on (batch, tokens, features)."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.down(self.up(x))


def randomise(model: nnx.Module, rng: np.random.Generator) -> None:
    """Non-trivial BatchNorm statistics, scale and bias; random Linear/Conv biases (init zero)."""

    def rand(shape, kind):
        if kind == "positive":
            return jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32)

    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.BatchNorm):
            c = module.mean[...].shape
            module.mean[...] = rand(c, "normal")
            module.var[...] = rand(c, "positive")
            module.scale[...] = rand(c, "positive")
            module.bias[...] = rand(c, "normal")
        elif isinstance(module, nnx.Linear | nnx.Conv) and module.bias is not None:
            module.bias[...] = rand(module.bias[...].shape, "normal")


def main() -> None:
    rng = np.random.default_rng(SEED)
    models = {
        "flax_conv_branches": (lambda: ConvBranches(16, nnx.Rngs(SEED)), (8, 8, 16)),
        "flax_linear_rank3": (lambda: TwoLinear(nnx.Rngs(SEED)), (10, 16)),
    }
    for name, (build, shape) in models.items():
        model = build()
        randomise(model, rng)
        model.eval()
        x = rng.normal(0, 1, (BATCH, *shape)).astype("float32")
        expected = np.asarray(jax.jit(model.__call__)(jnp.asarray(x)))
        proto = to_onnx(model, [("B", *shape)], input_names=["x"], model_name=name)
        output = proto.graph.output[0].name
        save(name, proto, {"x": x}, {output: expected}, atol=ATOL, rtol=RTOL)


if __name__ == "__main__":
    main()
