"""Build small Keras models and convert them with tf2onnx in one mode (run by test_tf2onnx.py).

usage: python convert_models.py MODE OUTDIR MODEL:BIAS [MODEL:BIAS ...]

MODE is ``k3_grappler``, ``k3_nograppler``, ``tfk_grappler`` or ``tfk_nograppler``: Keras 3
(``import keras``) or tf-keras (``import tf_keras``, with ``TF_USE_LEGACY_KERAS=1`` set here
before TensorFlow is imported), TensorFlow's grappler pass as tf2onnx runs it or not
(tf2onnx has no switch for it: every loader, ``from_keras`` included, calls
``tf2onnx.tf_loader.tf_optimize``, replaced here by the identity).

Every BatchNormalization gets seeded random statistics (moving_mean ~ N(0, 0.5),
moving_variance ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta ~ N(0, 0.5)). BIAS is ``init``: the
other layers' biases stay as Keras initializes them (zeros, which grappler removes, and then
moves the BatchNorm's scale into Conv2D/Conv3D filters and its shift into the bias), or
``random``: every layer bias is drawn from N(0, 0.5) too, as after training. For each model this
writes ``OUTDIR/MODEL-BIAS.onnx`` (``tf2onnx.convert.from_keras``, tf2onnx's default opset) and
``OUTDIR/MODEL-BIAS.npz`` (``x``: the inputs, ``y``: Keras's outputs in inference mode), or
``OUTDIR/MODEL-BIAS.error`` with the traceback when the model cannot be made.
This file runs in its own process: the test process never converts anything.
"""

from __future__ import annotations

import os
import sys
import traceback
import zlib
from pathlib import Path

MODE = sys.argv[1]
OUT = Path(sys.argv[2])
NAMES = sys.argv[3:]
LEGACY = MODE.startswith("tfk_")
GRAPPLER = MODE.endswith("_grappler")
if MODE not in ("k3_grappler", "k3_nograppler", "tfk_grappler", "tfk_nograppler"):
    sys.exit(f"unknown mode {MODE!r}")

if LEGACY:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported
else:
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
import tf2onnx.tf_loader  # noqa: E402

if LEGACY:
    import tf_keras as keras  # noqa: E402
else:
    import keras  # noqa: E402

if not GRAPPLER:
    tf2onnx.tf_loader.tf_optimize = lambda input_names, output_names, graph_def: graph_def

L = keras.layers


def _seq(shape, *layers):
    inp = keras.Input(shape=shape, name="x")
    y = inp
    for layer in layers:
        y = layer(y)
    return keras.Model(inp, y)


def _bn(**kw):
    return L.BatchNormalization(**kw)


MODELS = {
    "dense": lambda: _seq((20,), L.Dense(16), _bn()),
    "dense3d": lambda: _seq((5, 20), L.Dense(16), _bn()),
    "bn_axis1_dense3d": lambda: _seq((5, 16), L.Dense(16), _bn(axis=1)),
    "conv2d_relu": lambda: _seq((16, 16, 3), L.Conv2D(8, 3), _bn(), L.ReLU()),
    "conv2d_nobias": lambda: _seq((16, 16, 3), L.Conv2D(8, 3, use_bias=False), _bn()),
    "conv2d_transpose": lambda: _seq((8, 8, 3), L.Conv2DTranspose(8, 3, strides=2), _bn()),
    "depthwise_relu": lambda: _seq(
        (16, 16, 4), L.DepthwiseConv2D(3, depth_multiplier=2), _bn(), L.ReLU()
    ),
    "separable": lambda: _seq((16, 16, 4), L.SeparableConv2D(8, 3), _bn()),
    "conv1d": lambda: _seq((20, 4), L.Conv1D(8, 3), _bn()),
    "conv3d": lambda: _seq((6, 8, 8, 3), L.Conv3D(8, 3), _bn()),
}


def _randomize(model, rng, biases: bool):
    done = 0
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            values = []
            for w in layer.weights:
                name = w.name.split("/")[-1].split(":")[0]
                shape = tuple(w.shape)
                if "moving_mean" in name:
                    v = rng.normal(0, 0.5, shape)
                elif "moving_variance" in name:
                    v = rng.uniform(0.5, 2.0, shape)
                elif "gamma" in name:
                    v = rng.uniform(0.5, 1.5, shape)
                elif "beta" in name:
                    v = rng.normal(0, 0.5, shape)
                else:
                    raise ValueError(f"unexpected BatchNormalization weight {w.name!r}")
                values.append(v.astype(np.float32))
            layer.set_weights(values)
        elif biases and getattr(layer, "use_bias", False):
            bias = layer.bias
            bias.assign(rng.normal(0, 0.5, tuple(bias.shape)).astype(np.float32))
            done += 1
    if biases and not done:
        raise ValueError("random biases asked for a model without any")


def convert(item: str) -> None:
    name, bias = item.split(":")
    if bias not in ("init", "random"):
        raise ValueError(f"unknown bias {bias!r}")
    rng = np.random.default_rng(zlib.crc32(item.encode()))
    model = MODELS[name]()
    _randomize(model, rng, bias == "random")
    shape = tuple(model.inputs[0].shape[1:])
    x = rng.standard_normal((2, *shape)).astype(np.float32)
    y = np.asarray(model(x, training=False))
    spec = (tf.TensorSpec((None, *shape), tf.float32, name="x"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec)
    (OUT / f"{name}-{bias}.onnx").write_bytes(proto.SerializeToString())
    np.savez(OUT / f"{name}-{bias}.npz", x=x, y=y)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for item in NAMES:
        try:
            convert(item)
        except Exception:  # noqa: BLE001 - reported to the test, which fails that case only
            (OUT / f"{item.replace(':', '-')}.error").write_text(traceback.format_exc())
    return 0


if __name__ == "__main__":
    sys.exit(main())
