"""Small ONNX models written with ``onnx.helper`` for the command-line tests: a Conv and a
BatchNorm (``conv_bn``), and the pieces to write others (value infos, BatchNorm parameters,
seeded weights), and saving a model with its tensors in an external data file."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # onnxruntime 1.31 reads IR 8..10
C = 8


def bn_inits(c: int, dtype=np.float32, seed: int = 0) -> list[TensorProto]:
    """Non-trivial parameters ``bn.scale``, ``bn.bias``, ``bn.mean``, ``bn.var``."""
    rng = np.random.default_rng(seed)
    return [
        numpy_helper.from_array((rng.random(c) * 2 + 0.5).astype(dtype), "bn.scale"),
        numpy_helper.from_array(rng.standard_normal(c).astype(dtype), "bn.bias"),
        numpy_helper.from_array(rng.standard_normal(c).astype(dtype), "bn.mean"),
        numpy_helper.from_array((rng.random(c) + 0.5).astype(dtype), "bn.var"),
    ]


def bn_node(x: str, y: str) -> onnx.NodeProto:
    """A BatchNormalization ``bn`` of ``x`` into ``y``, reading the ``bn_inits`` parameters."""
    return helper.make_node(
        "BatchNormalization", [x, "bn.scale", "bn.bias", "bn.mean", "bn.var"], [y], name="bn"
    )


def weight(shape, seed: int = 1, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.5).astype(dtype)


def graph_model(nodes, inputs, outputs, inits, sparse=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits, sparse_initializer=list(sparse))
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION
    )


def vi(name: str, shape, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def conv_bn(c: int = C, seed: int = 1) -> onnx.ModelProto:
    """x -> Conv (initializer weight "w", > 1 KiB) -> BatchNormalization -> y."""
    return graph_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")],
        [vi("x", [2, 3, 8, 8])],
        [vi("y", [2, c, 6, 6])],
        [numpy_helper.from_array(weight((c, 3, 3, 3), seed), "w"), *bn_inits(c)],
    )


def save_external(m: onnx.ModelProto, path) -> None:
    """Save ``m`` at ``path`` with every tensor in ``<name>.data`` beside it."""
    onnx.save(
        m,
        str(path),
        save_as_external_data=True,
        location=os.path.basename(path) + ".data",
        size_threshold=0,
    )
