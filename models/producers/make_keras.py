"""Keras 3 models exported with tf2onnx: the Keras rows of issue 22's table.

Rebuild (from the repository root; a venv of its own, outside the checkout, never torch)::

    python3.11 -m venv /tmp/venv-tf
    /tmp/venv-tf/bin/pip install tensorflow-cpu==2.21.0 keras==3.15.1 tf2onnx==1.17.0 \
        onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6 protobuf==7.36.2
    /tmp/venv-tf/bin/python models/producers/make_keras.py

or, for the whole environment exactly as it was (``pip freeze`` of the one that built the files),
``/tmp/venv-tf/bin/pip install -r models/producers/requirements-keras.txt``.

Each model is built as a Keras user writes it (functional API, ``channels_last``), given random
weights and non-trivial BatchNorm statistics, gamma/beta and layer scales under a fixed seed, and
exported with ``tf2onnx.convert.from_keras`` at tf2onnx's default opset. The fixtures:

* ``keras_conv1d_bn``: Conv1D -> BatchNorm -> ReLU -> Conv1D -> BatchNorm -> ReLU ->
  GlobalAveragePooling1D -> Dense, on (batch, 16 steps, 8 channels).
* ``keras_rescaling_conv2d``: Rescaling(1/127.5, offset -1) -> Conv2D(valid) -> ReLU ->
  GlobalAveragePooling2D -> Dense, on (batch, 12, 12, 3) images.
* ``keras_normalization_conv2d``: Normalization (per-channel mean/variance adapted on data) ->
  Conv2D(valid) -> ReLU -> GlobalAveragePooling2D -> Dense.
* ``keras_normalization_conv2d_same``: the same with ``padding="same"``: the 1/std scale folds
  into the kernel, the mean's offset does not (zero padding sees it), so a hand-folded model keeps
  one constant Add/Sub on the input.
* ``keras_repvgg``: a RepVGG block, 3x3 Conv+BN + 1x1 Conv+BN + BN identity, summed, ReLU,
  16 channels on 8x8.
* ``keras_mlp_mixer``: patch embedding Conv2D(stride 4) on 16x16x3, two Mixer blocks of 24 channels (token MLP
  through Permute, channel MLP, each LayerNorm'ed, GELU (tanh form: see :func:`gelu`), layer-scaled and residual), LayerNorm,
  GlobalAveragePooling1D, Dense head.
"""

from __future__ import annotations

import os

from _common import fixed_hash_seed, save

fixed_hash_seed()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
from keras import layers  # noqa: E402

SEED = 22
BATCH = 4
ATOL = RTOL = 1e-4


def randomise(model: keras.Model, rng: np.random.Generator) -> None:
    """Non-trivial values for every bias, BatchNorm's statistics and gamma/beta, layer scale, norm.

    Keras initialises biases to zero and tf2onnx then drops the ``Add``: a trained model has one.
    """
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype("float32"))
        if isinstance(layer, layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c).astype("float32"),  # gamma
                    rng.normal(0, 0.3, c).astype("float32"),  # beta
                    rng.normal(0, 0.3, c).astype("float32"),  # moving mean
                    rng.uniform(0.5, 2.0, c).astype("float32"),  # moving variance
                ]
            )
        elif isinstance(layer, layers.LayerNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c).astype("float32"),
                    rng.normal(0, 0.3, c).astype("float32"),
                ]
            )
        elif isinstance(layer, LayerScale):
            c = layer.scale.shape[0]
            layer.set_weights([rng.uniform(0.05, 0.5, c).astype("float32")])


@keras.saving.register_keras_serializable(package="onnx_fuse_fixtures")
class LayerScale(layers.Layer):
    """CaiT's per-channel layer scale, as Keras users write it (no built-in layer)."""

    def __init__(self, init_value: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.init_value = init_value

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value),
            name="scale",
        )

    def call(self, x):
        return x * self.scale


def conv1d_bn() -> tuple[keras.Model, tuple[int, ...]]:
    x = inp = keras.Input((16, 8))
    for filters in (16, 16):
        x = layers.Conv1D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inp, layers.Dense(4)(x)), (16, 8)


def rescaling_conv2d() -> tuple[keras.Model, tuple[int, ...]]:
    x = inp = keras.Input((12, 12, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(x)
    x = layers.Conv2D(16, 3, padding="valid")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(4)(x)), (12, 12, 3)


def normalization_conv2d(padding: str, rng: np.random.Generator):
    def build() -> tuple[keras.Model, tuple[int, ...]]:
        norm = layers.Normalization(axis=-1)
        sample = rng.normal([100.0, 120.0, 90.0], [50.0, 40.0, 60.0], (64, 12, 12, 3))
        norm.adapt(sample.astype("float32"))
        x = inp = keras.Input((12, 12, 3))
        x = norm(x)
        x = layers.Conv2D(16, 3, padding=padding)(x)
        x = layers.ReLU()(x)
        x = layers.GlobalAveragePooling2D()(x)
        return keras.Model(inp, layers.Dense(4)(x)), (12, 12, 3)

    return build


def repvgg() -> tuple[keras.Model, tuple[int, ...]]:
    x = inp = keras.Input((8, 8, 16))
    dense = layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same", use_bias=False)(x))
    pointwise = layers.BatchNormalization()(layers.Conv2D(16, 1, use_bias=False)(x))
    identity = layers.BatchNormalization()(x)
    y = layers.ReLU()(layers.Add()([dense, pointwise, identity]))
    return keras.Model(inp, y), (8, 8, 16)


def gelu(x):
    """GELU's tanh form: Keras' exact ``"gelu"`` lowers to TensorFlow's ``Erfc``, which tf2onnx
    1.17 cannot convert ("Tensorflow op [.../Gelu/Erfc: Erfc] is not supported")."""
    return keras.activations.gelu(x, approximate=True)


def mlp_mixer() -> tuple[keras.Model, tuple[int, ...]]:
    patches, channels, hidden = 16, 24, 32
    x = inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(channels, 4, strides=4)(x)  # patch embedding: (4, 4, channels)
    x = layers.Reshape((patches, channels))(x)
    for _ in range(2):
        y = layers.LayerNormalization(epsilon=1e-6)(x)
        y = layers.Permute((2, 1))(y)  # token mixing acts on the patch axis
        y = layers.Dense(hidden, activation=gelu)(y)
        y = layers.Dense(patches)(y)
        y = layers.Permute((2, 1))(y)
        x = layers.Add()([x, LayerScale()(y)])
        y = layers.LayerNormalization(epsilon=1e-6)(x)
        y = layers.Dense(hidden, activation=gelu)(y)
        y = layers.Dense(channels)(y)
        x = layers.Add()([x, LayerScale()(y)])
    x = layers.LayerNormalization(epsilon=1e-6)(x)
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inp, layers.Dense(10)(x)), (16, 16, 3)


def main() -> None:
    keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    models = {
        "keras_conv1d_bn": conv1d_bn,
        "keras_rescaling_conv2d": rescaling_conv2d,
        "keras_normalization_conv2d": normalization_conv2d("valid", rng),
        "keras_normalization_conv2d_same": normalization_conv2d("same", rng),
        "keras_repvgg": repvgg,
        "keras_mlp_mixer": mlp_mixer,
    }
    for name, build in models.items():
        model, shape = build()
        randomise(model, rng)
        if "rescaling" in name or "normalization" in name:
            x = rng.uniform(0, 255, (BATCH, *shape)).astype("float32")  # pixel values
        else:
            x = rng.normal(0, 1, (BATCH, *shape)).astype("float32")
        expected = model(x, training=False).numpy()
        spec = (tf.TensorSpec((None, *shape), tf.float32, name="x"),)
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, output_path=None)
        output = proto.graph.output[0].name
        save(name, proto, {"x": x}, {output: expected}, atol=ATOL, rtol=RTOL)


if __name__ == "__main__":
    main()
