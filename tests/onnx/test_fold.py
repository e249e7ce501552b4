"""The ONNX frontend: fold BatchNormalization into Conv, ConvTranspose, Gemm and MatMul.

Every model here is tiny and built with ``onnx.helper`` (``onnx_models``); every BatchNorm has
non-trivial statistics and every weight non-trivial values. ``check_fold`` folds, checks the
report against what each case expects, the rewritten model's structure (full checker, opsets,
IR version, initializers, node names) and compares onnxruntime's outputs of the original and
the folded model: within 1e-5 (float32) / 1e-9 (float64) of max|output| when something was
folded, bit-exact when nothing was. The sections: every producer at every BatchNormalization
version, convolutions, Gemm, MatMul, what may stand between producer and BatchNorm, chains and
shared weights (one initializer as both operands too), training mode, constant parameters,
epsilon, invalid numbers and overflowing folds, data types, graph outputs, subgraphs and
functions, ``producers=``/``inplace``/onnx_ir models, names and metadata; the last section
exports small PyTorch models with both exporters.
"""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import helper

import bnfold
from bnfold.core import rules
from bnfold.demo import randomize_batchnorms
from tests.helpers.onnx_models import (
    BFLOAT16,
    BOOL,
    DOUBLE,
    FLOAT,
    FLOAT16,
    INT64,
    PRODUCER_TARGET,
    Graph,
    assert_bit_exact,
    bn_nodes,
    check_fold,
    check_skip,
    check_structure,
    conv_model,
    convert,
    export_torch,
    gemm_model,
    initializer,
    initializer_names,
    matmul_model,
    node_input,
    nodes_by_name,
    producer_model,
    random_feeds,
    rel_err,
    run,
    session,
)

FOLDED = {"bn": ("folded", "conv")}


def folded_into(target: str, bn: str = "bn") -> dict:
    return {bn: ("folded", target)}


# --------------------------------------------------------------------------------------------
# Every producer, with and without bias, at every BatchNormalization version


BN_OPSETS = [7, 9, 14, 15]
KINDS = ["conv", "conv_transpose", "gemm", "matmul"]
TARGET_TYPE = {
    ("conv", True): "Conv",
    ("conv", False): "Conv",
    ("conv_transpose", True): "ConvTranspose",
    ("conv_transpose", False): "ConvTranspose",
    ("gemm", True): "Gemm",
    ("gemm", False): "Gemm",
    ("matmul", True): "MatMul+Add",
    ("matmul", False): "MatMul",
}


@pytest.mark.parametrize("opset", BN_OPSETS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", KINDS)
def test_producer_matrix(kind, bias, opset):
    if kind == "gemm" and not bias and opset < 11:
        pytest.skip("Gemm's C is a required input before opset 11: no bias-less Gemm exists")
    model = producer_model(kind, bias, opset)
    target = PRODUCER_TARGET[kind]
    r = check_fold(model, folded_into(target))
    assert r.report.entry("bn").target_type == TARGET_TYPE[kind, bias]
    # The producer's own bias (or the Add after a MatMul) now carries the BatchNorm's shift.
    if kind in ("conv", "conv_transpose", "gemm"):
        assert node_input(r.folded, target, 2) in initializer_names(r.folded)
    else:
        assert [n.op_type for n in r.folded.graph.node] == ["MatMul", "Add"]


def test_opset7_bn_runs_in_onnxruntime():
    """BatchNormalization-7 (spatial attribute, opset import 7) runs in onnxruntime, so the
    opset-7 cases of the matrix compare numbers too."""
    model = producer_model("conv", True, 7)
    assert model.opset_import[0].version == 7
    assert run(model, random_feeds(model))[0].shape == (2, 6, 7, 7)


# --------------------------------------------------------------------------------------------
# Convolutions of every shape


CONV_CASES = {
    "1d": dict(dims=1),
    "1d-strides-dilations-pads": dict(dims=1, size=11, strides=[2], dilations=[2], pads=[2, 1]),
    "1d-depthwise": dict(dims=1, cin=4, cout=4, group=4),
    "2d-groups2": dict(cin=4, cout=6, group=2),
    "2d-groups3": dict(cin=6, cout=9, group=3),
    "2d-depthwise": dict(cin=4, cout=4, group=4),
    "2d-depthwise-multiplier": dict(cin=3, cout=6, group=3),
    "2d-pads-strides-dilations": dict(size=9, pads=[1, 2, 0, 1], strides=[2, 1], dilations=[1, 2]),
    "2d-same-upper": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "2d-same-lower": dict(auto_pad="SAME_LOWER", strides=[2, 1]),
    "2d-valid": dict(auto_pad="VALID", strides=[1, 2]),
    "2d-kernel1": dict(kernel=1),
    "2d-kernel_shape": dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "2d-batch1": dict(batch=1),
    "3d": dict(dims=3, size=5),
    "3d-groups-strides-pads": dict(
        dims=3, size=5, cin=4, cout=6, group=2, strides=[1, 2, 2], pads=[1, 0, 1, 0, 1, 1]
    ),
    "3d-depthwise-same-upper": dict(
        dims=3, size=5, cin=3, cout=3, group=3, auto_pad="SAME_UPPER", strides=[2, 1, 2]
    ),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_variants(case, bias):
    check_fold(conv_model(bias=bias, seed=3, **CONV_CASES[case]), FOLDED)


CONV_TRANSPOSE_CASES = {
    "1d": dict(dims=1),
    "1d-group3-strides-output_padding": dict(
        dims=1, cin=6, cout=9, group=3, strides=[2], output_padding=[1]
    ),
    "2d": dict(),
    "2d-group2": dict(cin=4, cout=6, group=2),
    "2d-group3": dict(cin=6, cout=6, group=3),
    "2d-group2-strides-output_padding-pads": dict(
        cin=4, cout=8, group=2, strides=[2, 3], output_padding=[1, 2], pads=[1, 0, 1, 1]
    ),
    "2d-group3-dilations": dict(cin=6, cout=9, group=3, dilations=[2, 1]),
    "2d-depthwise": dict(cin=4, cout=4, group=4),
    "2d-same-upper": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "2d-output_shape": dict(strides=[2, 2], output_shape=[16, 15]),
    "3d-group2": dict(
        dims=3, size=4, cin=4, cout=6, group=2, strides=[2, 1, 2], output_padding=[1, 0, 1]
    ),
    "3d-group3": dict(dims=3, size=3, cin=3, cout=6, group=3),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(CONV_TRANSPOSE_CASES))
def test_conv_transpose_variants(case, bias):
    model = conv_model(transpose=True, bias=bias, seed=4, **CONV_TRANSPOSE_CASES[case])
    check_fold(model, FOLDED)


# --------------------------------------------------------------------------------------------
# Gemm


C_SHAPES = {"N": (4,), "1xN": (1, 4), "1": (1,), "1x1": (1, 1), "scalar": (), "absent": None}
ALPHA_BETA = {"default": (None, None), "alpha1.5-beta0.5": (1.5, 0.5), "alpha0.7-beta0": (0.7, 0.0)}


@pytest.mark.parametrize("ab", list(ALPHA_BETA))
@pytest.mark.parametrize("c", list(C_SHAPES))
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_variants(trans_a, trans_b, c, ab):
    alpha, beta = ALPHA_BETA[ab]
    model = gemm_model(
        trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, c_shape=C_SHAPES[c], seed=5
    )
    r = check_fold(model, folded_into("gemm"))
    gemm = nodes_by_name(r.folded)["gemm"]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs.get("transA", 0) == trans_a and attrs.get("transB", 0) == trans_b
    assert attrs.get("alpha", 1.0) == pytest.approx(alpha or 1.0)
    assert len(gemm.input) == 3 and gemm.input[2]


@pytest.mark.parametrize("c_shape", [(3, 4), (3, 1)], ids=["MxN", "Mx1"])
def test_gemm_bias_per_row_refused(c_shape):
    """A C with one value per row (M, N) or (M, 1) is not a per-channel bias: kept, exactly."""
    r = check_skip(gemm_model(c_shape=c_shape, seed=6), {rules.CHANNEL_AXIS, rules.VALID_VALUES})
    assert "shape" in r.report.entry("bn").reason


def test_gemm_bias_per_row_rule():
    report = bnfold.analyze(gemm_model(c_shape=(3, 4), seed=6))
    assert report.entry("bn").rule == rules.CHANNEL_AXIS


# --------------------------------------------------------------------------------------------
# MatMul


MATMUL_FOLDS = {
    "2d": dict(),
    "2d-add-after": dict(add="after"),
    "2d-add-before": dict(add="before"),
    "2d-add-1xN": dict(add="after", bias_shape=(1, 4)),
    "2d-add-scalar": dict(add="before", bias_shape=(1,)),
    "2d-transposed-weight": dict(transposed_weight=True),
    "2d-transposed-weight-add": dict(transposed_weight=True, add="before"),
    "3d-transpose021": dict(x_shape=(2, 3, 5), perm=[0, 2, 1]),
    "3d-add-transpose021": dict(x_shape=(2, 3, 5), perm=[0, 2, 1], add="after"),
    "3d-add-before-transpose021": dict(x_shape=(2, 3, 5), perm=[0, 2, 1], add="before"),
    "3d-transposed-weight-add-transpose021": dict(
        x_shape=(2, 3, 5), perm=[0, 2, 1], add="after", transposed_weight=True
    ),
    "3d-transpose120": dict(x_shape=(2, 3, 5), perm=[1, 2, 0]),
    "4d-transpose0312": dict(x_shape=(2, 3, 2, 5), perm=[0, 3, 1, 2], add="after"),
}


@pytest.mark.parametrize("case", list(MATMUL_FOLDS))
def test_matmul_folds(case):
    r = check_fold(matmul_model(seed=7, **MATMUL_FOLDS[case]), folded_into("mm"))
    ops = [n.op_type for n in r.folded.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Add") == 1


MATMUL_REFUSED = {
    "3d-direct": (dict(x_shape=(2, 3, 5)), rules.CHANNEL_AXIS),
    "3d-add-direct": (dict(x_shape=(2, 3, 5), add="after"), rules.CHANNEL_AXIS),
    "3d-transpose210": (dict(x_shape=(2, 3, 5), perm=[2, 1, 0]), rules.CHANNEL_AXIS),
    "3d-transpose102": (dict(x_shape=(2, 3, 5), perm=[1, 0, 2]), rules.CHANNEL_AXIS),
    "2d-add-MxN": (dict(add="after", bias_shape=(3, 4)), rules.CHANNEL_AXIS),
    "3d-transposed-weight-direct": (
        dict(x_shape=(2, 3, 5), transposed_weight=True),
        rules.CHANNEL_AXIS,
    ),
}


@pytest.mark.parametrize("case", list(MATMUL_REFUSED))
def test_matmul_refused(case):
    kw, rule = MATMUL_REFUSED[case]
    check_skip(matmul_model(seed=8, **kw), rule)


def test_matmul_constant_on_the_left_refused():
    """MatMul(W, x): the BatchNorm's channels are x's columns, not W's: kept."""
    g = Graph(seed=9)
    x = g.input("x", [5, 4])
    y = g.node("MatMul", [g.weight("w", [3, 5]), x], name="mm")
    g.output(g.bn(y, 4))
    check_skip(g.model(), {rules.CONSTANT_PARAMS, rules.NO_PRODUCER, rules.CHANNEL_AXIS})


def test_matmul_batched_weight_refused():
    g = Graph(seed=9)
    x = g.input("x", [2, 3, 5])
    y = g.node("MatMul", [x, g.weight("w", [2, 5, 3])], name="mm")
    g.output(g.bn(y, 3))
    check_skip(g.model(), {rules.NO_PRODUCER, rules.CHANNEL_AXIS})


# --------------------------------------------------------------------------------------------
# What may stand between the producer and the BatchNorm


def _conv_then(ops, *, dims=1, batch=2, size=6, opset=15, c=4, bn_channels=None, seed=10):
    """x -> Conv ("conv", ``dims``-D, ``c`` channels) -> each (op, kwargs) -> BN -> output;
    an op's "axes" kwarg becomes an attribute before opset 13 and a constant input after."""
    g = Graph(seed=seed)
    x = g.input("x", [batch, 3] + [size] * dims)
    kernel = [3] * dims
    y = g.node("Conv", [x, g.weight("w", [c, 3, *kernel]), g.init("b", g.uniform(c))], name="conv")
    for op, kw in ops:
        kw = dict(kw)
        inputs = [y]
        if "axes" in kw and opset >= 13:
            inputs.append(g.init(f"{op.lower()}_axes", np.array(kw.pop("axes")), INT64))
        if "shape" in kw:
            inputs.append(g.init("shape", np.array(kw.pop("shape")), INT64))
        if "const" in kw:
            k = g.init("k", kw.pop("const"))
            inputs = [k, y] if kw.pop("first", False) else [y, k]
        y = g.node(op, inputs, name=op.lower(), **kw)
    g.output(g.bn(y, bn_channels or c))
    return g.model(opset=opset)


@pytest.mark.parametrize("opset", [11, 15])
@pytest.mark.parametrize(
    "ops",
    [
        [("Unsqueeze", dict(axes=[2]))],
        [("Unsqueeze", dict(axes=[-1]))],
        [("Unsqueeze", dict(axes=[3, 2]))],
        [("Unsqueeze", dict(axes=[2])), ("Squeeze", dict(axes=[2]))],
        [("Identity", {}), ("Unsqueeze", dict(axes=[2])), ("Identity", {})],
    ],
    ids=["unsqueeze2", "unsqueeze-1", "unsqueeze32", "unsqueeze-squeeze", "identities"],
)
def test_conv1d_through_layout_ops(ops, opset):
    check_fold(_conv_then(ops, opset=opset), FOLDED)


@pytest.mark.parametrize("opset", [11, 15])
def test_conv2d_squeeze_folds(opset):
    g = Graph(seed=11)
    x = g.input("x", [2, 3, 1, 8])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 1, 3])], name="conv")
    axes = {"axes": [2]} if opset < 13 else {}
    inputs = [y] if opset < 13 else [y, g.init("axes", np.array([2]), INT64)]
    y = g.node("Squeeze", inputs, name="squeeze", **axes)
    g.output(g.bn(y, 4))
    check_fold(g.model(opset=opset), FOLDED)


@pytest.mark.parametrize(
    "ops, dims, batch, bn_channels",
    [
        ([("Squeeze", dict(axes=[0]))], 2, 1, 4),  # (C, H, W): BN normalises H
        ([("Unsqueeze", dict(axes=[0]))], 1, 2, 2),  # (1, N, C, L): BN normalises N
        ([("Transpose", dict(perm=[0, 2, 1, 3]))], 2, 2, 4),
        ([("Transpose", dict(perm=[2, 1, 0]))], 1, 6, 4),  # (L, C, N): channels on axis 1!
    ],
    ids=["squeeze-batch", "unsqueeze0", "transpose-channels-away", "transpose-lcn"],
)
def test_conv_layout_channel_axis(ops, dims, batch, bn_channels):
    model = _conv_then(ops, dims=dims, batch=batch, bn_channels=bn_channels)
    if ops[0][1].get("perm") == [2, 1, 0]:
        check_fold(model, FOLDED)  # channels stay on axis 1: exact
    else:
        check_skip(model, rules.CHANNEL_AXIS)


def test_conv_squeeze_without_axes_refused():
    g = Graph(seed=12)
    x = g.input("x", [1, 3, 1, 8])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 1, 3])], name="conv")
    y = g.node("Squeeze", [y], name="squeeze")  # (4, 6): BN normalises the length axis
    g.output(g.bn(y, 6))
    check_skip(g.model(), rules.CHANNEL_AXIS)


def test_conv_transpose_keeping_channels_folds():
    check_fold(_conv_then([("Transpose", dict(perm=[0, 1, 3, 2]))], dims=2), FOLDED)


def test_conv_reshape_refused():
    # a Reshape is followed only where it keeps the channels on the last axis
    model = _conv_then([("Reshape", dict(shape=[2, 4, 2, 2]))])
    r = check_skip(model, rules.CHANNEL_AXIS)
    assert "channels are not its last axis" in r.report.entries[0].reason


def test_conv_relu_refused():
    check_skip(_conv_then([("Relu", {})]), rules.NO_PRODUCER)


def test_bn_of_graph_input_refused():
    g = Graph(seed=13)
    g.output(g.bn(g.input("x", [2, 4, 3]), 4))
    check_skip(g.model(), rules.NO_PRODUCER)


@pytest.mark.parametrize(
    "shape, first", [((4, 1), False), ((1, 4, 1), True), ((1,), False), ((), True)]
)
def test_conv_add_constant_folds(shape, first):
    const = np.random.default_rng(0).uniform(0.5, 2, int(np.prod(shape))).reshape(shape)
    model = _conv_then([("Add", dict(const=const, first=first))])
    r = check_fold(model, FOLDED, may_remove={"add"})
    assert [n.op_type for n in r.folded.graph.node] == ["Conv"]
    assert r.report.entry("bn").target_type == "Conv+Add"


def test_conv_add_not_per_channel_refused():
    const = np.random.default_rng(0).uniform(0.5, 2, (4, 4)).astype(np.float32)
    check_skip(_conv_then([("Add", dict(const=const))]), rules.CHANNEL_AXIS)


def test_conv_add_of_input_refused():
    g = Graph(seed=14)
    x = g.input("x", [2, 3, 6])
    x2 = g.input("x2", [2, 4, 4])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    y = g.node("Add", [y, x2], name="add")
    g.output(g.bn(y, 4))
    check_skip(g.model(), rules.NO_PRODUCER)


def test_gemm_add_constant_folds():
    g = Graph(seed=15)
    x = g.input("x", [3, 5])
    y = g.node("Gemm", [x, g.weight("w", [5, 4]), g.init("c", g.uniform(4))], name="gemm")
    y = g.node("Add", [y, g.init("k", g.uniform(4))], name="add")
    g.output(g.bn(y, 4))
    r = check_fold(g.model(), folded_into("gemm"), may_remove={"add"})
    assert [n.op_type for n in r.folded.graph.node] == ["Gemm"]


# --------------------------------------------------------------------------------------------
# Chains, sharing, several consumers


def test_chained_bn_both_folded():
    g = Graph(seed=16)
    x = g.input("x", [2, 3, 6, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    y = g.bn(y, 4, name="bn1")
    y = g.node("Relu", [g.bn(y, 4, name="bn2")], name="relu")
    g.output(y)
    r = check_fold(g.model(), {"bn1": ("folded", "conv"), "bn2": ("folded", "conv")})
    assert [n.op_type for n in r.folded.graph.node] == ["Conv", "Relu"]


@pytest.mark.parametrize("kind", ["gemm", "matmul", "conv_transpose"])
def test_chained_bn_other_producers(kind):
    g = Graph(seed=17)
    if kind == "conv_transpose":
        x = g.input("x", [2, 4, 5, 5])
        y = g.node("ConvTranspose", [x, g.weight("w", [4, 3, 3, 3])], name="p", group=2)
        c = 6
    else:
        x = g.input("x", [3, 5])
        y = g.node("Gemm" if kind == "gemm" else "MatMul", [x, g.weight("w", [5, 4])], name="p")
        c = 4
    y = g.bn(g.bn(y, c, name="bn1"), c, name="bn2")
    g.output(y)
    check_fold(g.model(), {"bn1": ("folded", "p"), "bn2": ("folded", "p")})


def test_chain_through_relu_only_first_folded():
    g = Graph(seed=18)
    x = g.input("x", [2, 3, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    y = g.node("Relu", [g.bn(y, 4, name="bn1")], name="relu")
    g.output(g.bn(y, 4, name="bn2"))
    check_fold(g.model(), {"bn1": ("folded", "conv"), "bn2": ("skipped", rules.NO_PRODUCER)})


def _two_convs(share_bias=False, second_bn=True, share_bn_params=False, seed=19):
    g = Graph(seed=seed)
    x1 = g.input("x1", [2, 3, 6, 6])
    x2 = g.input("x2", [2, 3, 5, 5])
    w = g.weight("w", [4, 3, 3, 3])
    b1 = g.init("b1", g.uniform(4, True))
    b2 = b1 if share_bias else g.init("b2", g.uniform(4, True))
    params = g.bn_params(4, "bn1")
    y1 = g.node("Conv", [x1, w, b1], name="conv1")
    y2 = g.node("Conv", [x2, w, b2], name="conv2")
    g.output(g.bn(y1, 4, name="bn1", params=params))
    if second_bn:
        g.output(g.bn(y2, 4, name="bn2", params=params if share_bn_params else None))
    else:
        g.output(y2)
    return g.model()


@pytest.mark.parametrize(
    "share_bias, share_bn_params", [(False, False), (True, False), (True, True)]
)
def test_shared_weight_both_folded(share_bias, share_bn_params):
    model = _two_convs(share_bias=share_bias, share_bn_params=share_bn_params)
    r = check_fold(model, {"bn1": ("folded", "conv1"), "bn2": ("folded", "conv2")})
    f = r.folded
    w1, w2 = node_input(f, "conv1", 1), node_input(f, "conv2", 1)
    b1, b2 = node_input(f, "conv1", 2), node_input(f, "conv2", 2)
    assert len({w1, w2, b1, b2}) == 4, (w1, w2, b1, b2)
    names = initializer_names(f)
    assert {w1, w2, b1, b2} <= set(names)
    if not share_bn_params:
        assert not np.array_equal(initializer(f, w1), initializer(f, w2))


def test_shared_weight_with_unfolded_conv_untouched():
    model = _two_convs(second_bn=False)
    r = check_fold(model, {"bn1": ("folded", "conv1")})
    f = r.folded
    assert node_input(f, "conv2", 1) == "w" and node_input(f, "conv2", 2) == "b2"
    assert node_input(f, "conv1", 1) != "w"
    np.testing.assert_array_equal(initializer(f, "w"), initializer(model, "w"))
    np.testing.assert_array_equal(initializer(f, "b2"), initializer(model, "b2"))


def test_shared_bias_with_unfolded_conv_untouched():
    model = _two_convs(second_bn=False, share_bias=True)
    r = check_fold(model, {"bn1": ("folded", "conv1")})
    f = r.folded
    assert node_input(f, "conv2", 2) == "b1"
    np.testing.assert_array_equal(initializer(f, "b1"), initializer(model, "b1"))
    np.testing.assert_array_equal(initializer(f, "w"), initializer(model, "w"))


def test_weight_that_is_also_a_graph_output():
    g = Graph(seed=20)
    x = g.input("x", [2, 3, 6])
    w = g.weight("w", [4, 3, 3])
    y = g.node("Conv", [x, w], name="conv")
    # (shape inference gives up on a graph whose output is an initializer: shapes by hand)
    g.output(g.bn(y, 4), shape=[2, 4, 4])
    g.output(w, shape=[4, 3, 3])
    r = check_fold(g.model(), FOLDED)
    np.testing.assert_array_equal(r.after[0][1], initializer(r.model, "w"))


def test_weight_also_read_by_shape():
    """A Shape of the weight reads no data: the fold may scale the weight where it is."""
    g = Graph(seed=21)
    x = g.input("x", [2, 3, 6])
    w = g.weight("w", [4, 3, 3])
    y = g.node("Conv", [x, w], name="conv")
    g.output(g.bn(y, 4))
    g.output(g.node("Shape", [w], name="shape"), INT64)
    check_fold(g.model(), FOLDED)


def test_weight_from_constant_node():
    g = Graph(seed=22)
    x = g.input("x", [2, 3, 6])
    w = g.constant("w", g.randn(4, 3, 3))
    y = g.node("Conv", [x, w], name="conv")
    g.output(g.bn(y, 4))
    r = check_fold(g.model(), FOLDED)
    assert "Constant" not in [n.op_type for n in r.folded.graph.node]


def test_constant_weight_shared_by_two_convs():
    g = Graph(seed=23)
    x = g.input("x", [2, 3, 6])
    w = g.constant("w", g.randn(4, 3, 3))
    g.output(g.bn(g.node("Conv", [x, w], name="conv1"), 4, name="bn1"))
    g.output(g.node("Conv", [x, w], name="conv2"))
    check_fold(g.model(), {"bn1": ("folded", "conv1")})


@pytest.mark.parametrize("other", ["relu", "graph-output", "identity-twice", "add-twice"])
def test_multi_consumer_refused(other):
    g = Graph(seed=24)
    x = g.input("x", [2, 3, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3]), g.init("b", g.uniform(4))], name="conv")
    if other == "relu":
        g.output(g.node("Relu", [y], name="relu"))
    elif other == "graph-output":
        g.output(y)
    elif other == "identity-twice":
        y = g.node("Identity", [y], name="identity")
        g.output(g.node("Relu", [y], name="relu"))
    else:
        y = g.node("Add", [y, g.init("k", g.uniform(4).reshape(4, 1))], name="add")
        g.output(g.node("Relu", [y], name="relu"))
    g.output(g.bn(y, 4))
    if other == "add-twice":
        # the Add is a chain of its own (its output has two readers): it folds into the bias,
        # and the BatchNorm then reads the conv, whose output the Relu reads too
        expected = {"add": ("folded", "conv"), "bn": ("skipped", rules.SINGLE_CONSUMER)}
        check_fold(g.model(), expected)
        check_skip(g.model(), rules.SINGLE_CONSUMER, affine=False)
        return
    check_skip(g.model(), rules.SINGLE_CONSUMER)


def test_matmul_used_twice_refused():
    g = Graph(seed=25)
    x = g.input("x", [3, 5])
    y = g.node("MatMul", [x, g.weight("w", [5, 4])], name="mm")
    g.output(g.node("Relu", [y], name="relu"))
    g.output(g.bn(y, 4))
    check_skip(g.model(), rules.SINGLE_CONSUMER)


def test_bn_output_feeding_another_node():
    g = Graph(seed=26)
    x = g.input("x", [2, 3, 6])
    y = g.bn(g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv"), 4)
    g.output(g.node("Relu", [y], name="relu"))
    g.output(g.node("Sigmoid", [y], name="sigmoid"))
    check_fold(g.model(), FOLDED)


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Gemm-transB"])
def test_same_weight_as_both_operands(op):
    """MatMul(W, W) / Gemm(A=W, B=W) -> BN: the folded weight is a new tensor; W, which is
    also the activation, keeps its values (scaling it in place gave a relative error of 0.37)."""
    c = 4
    g = Graph(seed=11)
    x = g.input("x", [c, c])
    w = g.weight("w", [c, c])
    attrs = {"transB": 1} if op == "Gemm-transB" else {}
    y = g.node(op.split("-")[0], [w, w], name="mm", **attrs)
    g.output(g.node("Add", [g.bn(y, c), x], name="add"))
    model = g.model()
    r = check_fold(model, {"bn": ("folded", "mm")})
    np.testing.assert_array_equal(initializer(r.folded, "w"), initializer(model, "w"))
    assert node_input(r.folded, "mm", 0) == "w"
    assert node_input(r.folded, "mm", 1) != "w"


# --------------------------------------------------------------------------------------------
# Training-mode BatchNorms


def _training_bn(opset: int, n_extra: int, attrs: dict, outputs_used: bool):
    g = Graph(seed=27)
    x = g.input("x", [2, 3, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    outs = ["y"] + [f"stat{i}" for i in range(n_extra)]
    g.bn(y, 4, outputs=outs, **attrs)
    g.output("y")
    if outputs_used:
        for o in outs[1:]:
            g.output(o, shape=[4])
    return g.model(opset=opset)


@pytest.mark.parametrize(
    "opset, n_extra, attrs, used",
    [
        (15, 2, dict(training_mode=1), True),
        (15, 2, dict(training_mode=1), False),
        (14, 2, dict(training_mode=1), True),
        (9, 4, {}, True),
        (9, 4, {}, False),
        (7, 4, {}, True),
    ],
    ids=["15-used", "15-unused", "14-used", "9-used", "9-unused", "7-used"],
)
def test_training_mode_refused(opset, n_extra, attrs, used):
    check_skip(_training_bn(opset, n_extra, attrs, used), rules.INFERENCE_MODE)


def test_bn7_spatial0_refused():
    g = Graph(seed=28)
    x = g.input("x", [3, 5])
    y = g.node("Gemm", [x, g.weight("w", [5, 4]), g.init("c", g.uniform(4))], name="gemm")
    g.output(g.bn(y, 4, spatial=0))
    check_skip(g.model(opset=7), rules.STANDARD_FORWARD)


# --------------------------------------------------------------------------------------------
# Constant parameters


def _conv_bn_graph(seed=29):
    g = Graph(seed=seed)
    x = g.input("x", [2, 3, 6])
    return g, x


def test_bn_scale_graph_input_refused():
    g, x = _conv_bn_graph()
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    _, b, m, v = g.bn_params(4)
    g.output(g.bn(y, 4, params=[g.input("scale", [4]), b, m, v]))
    check_skip(g.model(), rules.CONSTANT_PARAMS)


def test_bn_mean_computed_from_input_refused():
    g, x = _conv_bn_graph()
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    s, b, m, v = g.bn_params(4)
    mean = g.node("Add", [m, g.input("shift", [4])], name="mean")
    g.output(g.bn(y, 4, params=[s, b, mean, v]))
    check_skip(g.model(), rules.CONSTANT_PARAMS)


def test_bn_mean_reduced_from_activation_refused():
    g, x = _conv_bn_graph()
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    s, b, _, v = g.bn_params(4)
    mean = g.node("ReduceMean", [x], name="mean", axes=[0, 2], keepdims=0)  # (3,) != 4
    mean = g.node("Pad", [mean, g.init("pads", np.array([0, 1]), INT64)], name="pad")
    g.output(g.bn(y, 4, params=[s, b, mean, v]))
    check_skip(g.model(opset=15), rules.CONSTANT_PARAMS)


def test_weight_graph_input_refused():
    g, x = _conv_bn_graph()
    y = g.node("Conv", [x, g.input("w", [4, 3, 3])], name="conv")
    g.output(g.bn(y, 4))
    check_skip(g.model(), rules.CONSTANT_PARAMS)


def test_bias_graph_input_refused():
    g, x = _conv_bn_graph()
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3]), g.input("b", [4])], name="conv")
    g.output(g.bn(y, 4))
    check_skip(g.model(), rules.CONSTANT_PARAMS)


@pytest.mark.parametrize("which", ["weight", "bias", "scale", "var"])
def test_overridable_initializer_refused(which):
    """IR >= 4: an initializer that is also a graph input is a default, not a constant."""
    g, x = _conv_bn_graph()
    w, b = g.weight("w", [4, 3, 3]), g.init("b", g.uniform(4))
    y = g.node("Conv", [x, w, b], name="conv")
    params = g.bn_params(4)
    g.output(g.bn(y, 4, params=params))
    name = {"weight": w, "bias": b, "scale": params[0], "var": params[3]}[which]
    model = g.model()
    t = next(t for t in model.graph.initializer if t.name == name)
    model.graph.input.append(helper.make_tensor_value_info(name, FLOAT, list(t.dims)))
    r = check_skip(model, rules.CONSTANT_PARAMS)
    assert name in r.report.entry("bn").reason


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opset", [7, 8])
def test_ir3_initializers_as_inputs(kind, opset):
    if kind == "gemm":
        model = producer_model(kind, True, opset)
    else:
        model = producer_model(kind, False, opset)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.ir_version = 3
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(m, full_check=True)
    r = check_fold(m, folded_into(PRODUCER_TARGET[kind]))
    inputs = [i.name for i in r.folded.graph.input]
    assert set(initializer_names(r.folded)) <= set(inputs)
    assert len(inputs) == len(set(inputs))
    assert inputs[0] == "x"


# --------------------------------------------------------------------------------------------
# Constants that are not plain initializers


def test_bn_params_via_identity_and_constant():
    g, x = _conv_bn_graph(30)
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    s, b, m, v = g.bn_params(4)
    s = g.node("Identity", [s], name="scale_identity")
    m = g.constant("mean_const", g.uniform(4, True))
    v = g.node("Constant", [], name="var_const", value_floats=list(g.uniform(4)))
    g.output(g.bn(y, 4, params=[s, b, m, v]))
    r = check_fold(g.model(), FOLDED)
    assert [n.op_type for n in r.folded.graph.node] == ["Conv"]


def test_conv_bias_from_constant_subgraph():
    """What the dynamo exporter writes for a bias-less conv: folded, the subgraph removed."""
    g, x = _conv_bn_graph(31)
    w = g.weight("w", [4, 3, 3])
    zero = g.constant("zero", np.array(0.0))
    cast = g.node("CastLike", [zero, x], name="castlike")
    shape = g.node("Shape", [w], name="shape", start=0, end=1)
    bias = g.node("Expand", [cast, shape], name="expand")
    y = g.node("Conv", [x, w, bias], name="conv")
    g.output(g.bn(y, 4))
    r = check_fold(g.model(opset=18), FOLDED)
    assert [n.op_type for n in r.folded.graph.node] == ["Conv"]
    assert set(initializer_names(r.folded)) == {"w", node_input(r.folded, "conv", 2)}


def test_constant_subgraph_shared_between_two_convs():
    g, x = _conv_bn_graph(32)
    w1, w2 = g.weight("w1", [4, 3, 3]), g.weight("w2", [4, 3, 3])
    zero = g.constant("zero", np.array(0.0))
    cast = g.node("CastLike", [zero, x], name="castlike")
    b1 = g.node("Expand", [cast, g.node("Shape", [w1], name="shape1", start=0, end=1)])
    b2 = g.node("Expand", [cast, g.node("Shape", [w2], name="shape2", start=0, end=1)])
    g.output(g.bn(g.node("Conv", [x, w1, b1], name="conv1"), 4, name="bn1"))
    g.output(g.node("Conv", [x, w2, b2], name="conv2"))
    r = check_fold(g.model(opset=18), {"bn1": ("folded", "conv1")})
    names = set(nodes_by_name(r.folded))
    assert {"zero", "castlike", "shape2", "expand_1"} <= names
    assert "shape1" not in names and "expand" not in names


# --------------------------------------------------------------------------------------------
# Epsilon and invalid numbers


@pytest.mark.parametrize("opset", [7, 9, 15])
def test_default_epsilon_honoured(opset):
    """No epsilon attribute: 1e-5 is used. Tiny variances make eps matter far beyond the
    tolerance (checked: folding with eps = 0 would be off by more than 1e-2)."""
    g, x = _conv_bn_graph(33)
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    s, b, m, _ = g.bn_params(4)
    var = g.rng.uniform(2e-6, 2e-5, 4)
    g.output(g.bn(y, 4, params=[s, b, m, g.init("var", var)], epsilon=None))
    model = g.model(opset=opset)
    assert not any(a.name == "epsilon" for a in model.graph.node[1].attribute)
    check_fold(model, FOLDED)
    assert np.sqrt((var + 1e-5) / var).min() > 1.01


@pytest.mark.parametrize("eps", [10.0, 0.0, 1e-3])
def test_epsilon_values(eps):
    check_fold(conv_model(bn_kw=dict(epsilon=eps), seed=34), FOLDED)


def _poisoned(what: str):
    g, x = _conv_bn_graph(35)
    w = g.randn(4, 3, 3)
    b = g.uniform(4)
    s, beta, m, v = g.uniform(4, True), g.uniform(4, True), g.uniform(4, True), g.uniform(4)
    eps = 1e-5
    if what == "nan-mean":
        m[1] = np.nan
    elif what == "negative-var":
        v[2] = -1.0
    elif what == "var-plus-eps-zero":
        v[3] = -np.float32(eps)
        assert np.float32(v[3]) + np.float32(eps) == 0
    elif what == "inf-weight":
        w[1, 0, 0] = np.inf
    elif what == "nan-weight":
        w[2, 1, 1] = np.nan
    elif what == "inf-gamma":
        s[0] = np.inf
    elif what == "inf-beta":
        beta[3] = -np.inf
    elif what == "nan-bias":
        b[2] = np.nan
    elif what == "negative-eps":
        eps = -0.1
    y = g.node("Conv", [x, g.init("w", w), g.init("b", b)], name="conv")
    params = [g.init(n, a) for n, a in zip(["s", "beta", "m", "v"], [s, beta, m, v], strict=True)]
    g.output(g.bn(y, 4, params=params, epsilon=eps))
    return g.model()


POISONS = [
    "nan-mean",
    "negative-var",
    "var-plus-eps-zero",
    "inf-weight",
    "nan-weight",
    "inf-gamma",
    "inf-beta",
    "nan-bias",
    "negative-eps",
]


@pytest.mark.parametrize("what", POISONS)
def test_invalid_values_refused(what):
    with np.errstate(all="ignore"):
        check_skip(_poisoned(what), rules.VALID_VALUES)


# --------------------------------------------------------------------------------------------
# Folds whose numbers overflow: refused (valid-values), without numpy's warnings


def _stats(g: Graph, *values) -> list[str]:
    return [g.init(n, np.array(a)) for n, a in zip("sbmv", values, strict=True)]


def _overflow_cases():
    g = Graph(seed=24)  # float32 weights of 1e30 scaled by 1e10: the float32 product overflows
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.init("w", np.full((4, 3, 1, 1), 1e30))], name="conv")
    params = _stats(g, [1e10] * 4, [0] * 4, [0] * 4, [1] * 4)
    g.output(g.bn(y, 4, params=params))
    yield "weight-product", g.model()

    g = Graph(seed=25)  # a float64 BatchNorm scale of 1e300 does not fit the float32 weight
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 1, 1])], name="conv")
    params = [g.init("s", np.full(4, 1e300), DOUBLE), g.init("b", np.zeros(4), DOUBLE)]
    params += [g.init(n, np.full(4, v)) for n, v in (("m", 0.0), ("v", 1.0))]
    g.output(g.bn(y, 4, params=params))
    yield "float64-scale", g.model(infer=False)

    g = Graph(BFLOAT16, seed=26)  # a signalling NaN of bfloat16 warned as it became float64
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 1, 1])], name="conv")
    nan = np.full(4, 0x7F81, np.uint16).view(ml_dtypes.bfloat16)
    g.output(g.bn(y, 4, params=_stats(g, [1] * 4, [0] * 4, nan, [1] * 4)))
    yield "bfloat16-nan", g.model(infer=False)

    model = gemm_model(dtype=DOUBLE)  # float64: s * C overflows, the weights do not
    for t in model.graph.initializer:
        if t.name in ("c", "bn.scale"):
            value = 1e10 if t.name == "c" else 1e300
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(4, value), t.name))
    yield "gemm-bias", model

    model = conv_model()  # complex statistics: numpy dropped the imaginary part, with a warning
    for t in model.graph.initializer:
        if t.name == "bn.mean":
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(6, 1 + 2j, np.complex64), t.name))
    yield "complex-mean", model


@pytest.mark.parametrize(
    "name, model", list(_overflow_cases()), ids=[n for n, _ in _overflow_cases()]
)
def test_overflowing_folds_are_refused_without_warnings(name, model):
    """Overflows and odd numbers bnfold refuses (valid-values) print no RuntimeWarning: the
    command line's stderr carried numpy's 'overflow encountered in multiply / cast' and
    'invalid value encountered in cast' on success."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("bn").rule == rules.VALID_VALUES, report.entry("bn")
    assert len(bn_nodes(folded)) == 1


# --------------------------------------------------------------------------------------------
# Data types


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_float16_model(kind, seed):
    model = producer_model(kind, True, 15, dtype=FLOAT16, seed=seed)
    r = check_fold(model, folded_into(PRODUCER_TARGET[kind]), seeds=range(seed, seed + 40, 10))
    assert {t.data_type for t in r.folded.graph.initializer} == {FLOAT16}


def test_float16_activations_float32_statistics():
    """BatchNormalization-15 lets mean/var (and scale/bias) be float32 on float16 data."""
    g = Graph(FLOAT16, seed=36)
    x = g.input("x", [2, 3, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3]), g.init("b", g.uniform(4))], name="conv")
    g.output(g.bn(y, 4, params=g.bn_params(4, stats_dtype=FLOAT)))
    r = check_fold(g.model(), FOLDED, seeds=range(4))
    assert {t.data_type for t in r.folded.graph.initializer} == {FLOAT16}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # see below
@pytest.mark.parametrize("where", ["weight", "bias"])
def test_float16_overflow_refused(where):
    g = Graph(FLOAT16, seed=37)
    x = g.input("x", [2, 3, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3]), g.init("b", g.uniform(4))], name="conv")
    if where == "weight":  # s = 6e4 / sqrt(1e-4) = 6e6: every weight overflows
        s, b, m, v = [6e4] * 4, [0.5] * 4, [0.5] * 4, [1e-4] * 4
    else:  # s = -2: weights fine, but t = beta - mean*s = 1.2e5 overflows
        s, b, m, v = [-2.0] * 4, [0.5] * 4, [6e4] * 4, [1.0] * 4
    params = [g.init(n, np.array(a)) for n, a in zip("sbmv", [s, b, m, v], strict=True)]
    g.output(g.bn(y, 4, params=params))
    r = check_skip(g.model(), rules.VALID_VALUES)
    assert "overflow" in r.report.entry("bn").reason


def test_float16_overflow_refused_quietly():
    g = Graph(FLOAT16, seed=37)
    x = g.input("x", [2, 3, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    params = [
        g.init(n, np.array(a))
        for n, a in zip("sbmv", [[6e4] * 4, [0.5] * 4, [0.5] * 4, [1e-4] * 4], strict=True)
    ]
    g.output(g.bn(y, 4, params=params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = bnfold.fold(g.model(), return_report=True)
    assert report.entry("bn").rule == rules.VALID_VALUES


@pytest.mark.parametrize(
    "kind", ["gemm", "gemm-transB", "matmul", "matmul-add", "matmul-3d-transpose"]
)
def test_float64_model(kind):
    if kind.startswith("gemm"):
        model = gemm_model(dtype=DOUBLE, trans_b=int(kind.endswith("B")), alpha=1.3, seed=38)
        target = "gemm"
    elif kind == "matmul-3d-transpose":
        model = matmul_model((2, 3, 5), perm=[0, 2, 1], add="after", dtype=DOUBLE, seed=38)
        target = "mm"
    else:
        model = matmul_model(add="after" if kind == "matmul-add" else None, dtype=DOUBLE, seed=38)
        target = "mm"
    r = check_fold(model, folded_into(target))
    assert r.before[0][0].dtype == np.float64
    assert {t.data_type for t in r.folded.graph.initializer} == {DOUBLE}


@pytest.mark.parametrize("kind", ["conv", "conv_transpose"])
def test_float64_convolutions(kind):
    """onnxruntime has no float64 Conv on the CPU: check the rewrite, then run both models
    converted to float32 (the fold's float64 numbers survive that to ~1e-7)."""
    model = producer_model(kind, True, 15, dtype=DOUBLE)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        session(model)
    r = check_fold(model, FOLDED, numbers="none")
    assert {t.data_type for t in r.folded.graph.initializer} == {DOUBLE}
    a, b = convert(model, DOUBLE, FLOAT), convert(r.folded, DOUBLE, FLOAT)
    feeds = random_feeds(a)
    assert rel_err(run(a, feeds), run(b, feeds)) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_rewrite(kind):
    """bfloat16 models fold (weights rounded once more to bfloat16); onnxruntime has no CPU
    bfloat16 kernels for these producers, so the numbers are compared on both models
    converted to float32: a bfloat16 rounding of each folded weight, no more."""
    model = producer_model(kind, True, 22, dtype=BFLOAT16)
    r = check_fold(model, folded_into(PRODUCER_TARGET[kind]), numbers="none")
    assert {t.data_type for t in r.folded.graph.initializer} == {BFLOAT16}
    a, b = convert(model, BFLOAT16, FLOAT), convert(r.folded, BFLOAT16, FLOAT)
    feeds = random_feeds(a)
    assert rel_err(run(a, feeds), run(b, feeds)) < 2e-2


def test_bfloat16_in_onnxruntime():
    model = producer_model("conv", True, 22, dtype=BFLOAT16)
    try:
        session(model)
    except Exception as e:  # noqa: BLE001
        pytest.skip(
            f"onnxruntime {__import__('onnxruntime').__version__} has no bfloat16 Conv on the "
            f"CPU ({str(e).splitlines()[0][:120]}); test_bfloat16_rewrite checks the numbers "
            "through float32"
        )
    check_fold(model, FOLDED)


# --------------------------------------------------------------------------------------------
# Graph outputs, subgraphs, functions


def test_bn_output_name_kept_as_graph_output():
    g, x = _conv_bn_graph(39)
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    g.output(g.bn(y, 4, outputs=["logits"]))
    r = check_fold(g.model(), FOLDED)
    assert [o.name for o in r.folded.graph.output] == ["logits"]
    producers = {o for n in r.folded.graph.node for o in n.output}
    assert "logits" in producers


def test_bn_output_graph_output_through_identity():
    model = _conv_then([("Identity", {})])
    r = check_fold(model, FOLDED)
    assert r.folded.graph.output[0].name == model.graph.output[0].name


def _if_model(share_outer_weight: bool):
    outer = Graph(seed=40)
    x = outer.input("x", [2, 3, 6])
    cond = outer.input("cond", [], BOOL)
    w_outer = outer.weight("w_outer", [4, 3, 3])
    params_outer = outer.bn_params(4, "bn_then")

    then = Graph(seed=41, name="then")
    y = then.node("Conv", [x, w_outer], name="conv_then")
    then.output(then.bn(y, 4, name="bn_then", params=params_outer, outputs=["then_out"]))

    other = Graph(seed=42, name="else")
    w_else = other.weight("w_else", [4, 3, 3])
    y = other.node("Conv", [x, w_else, other.init("b_else", other.uniform(4))], name="conv_else")
    other.output(other.bn(y, 4, name="bn_else", outputs=["else_out"]))
    for sub in (then, other):
        sub.outputs[0].type.tensor_type.shape.dim.extend(
            [onnx.TensorShapeProto.Dimension(dim_value=d) for d in (2, 4, 4)]
        )

    out = outer.node("If", [cond], name="if", then_branch=then.graph(), else_branch=other.graph())
    outer.output(out)
    if share_outer_weight:
        outer.output(outer.node("Conv", [x, w_outer], name="conv_main"))
    return outer.model()


@pytest.mark.parametrize("share", [False, True], ids=["own-weights", "outer-weight-shared"])
def test_bn_inside_if_branches(share):
    model = _if_model(share)
    feeds = []
    for c in (True, False):
        f = random_feeds(model, seed=int(c))
        f["cond"] = np.array(c)
        feeds.append(f)
    r = check_fold(
        model,
        {"bn_then": ("folded", "conv_then"), "bn_else": ("folded", "conv_else")},
        feeds=feeds,
    )
    if share:
        np.testing.assert_array_equal(
            initializer(r.folded, "w_outer"), initializer(model, "w_outer")
        )
        assert node_input(r.folded, "conv_main", 1) == "w_outer"


def _function_model():
    body = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="f_conv"),
        helper.make_node(
            "BatchNormalization", ["y", "s", "b", "m", "v"], ["z"], name="f_bn", epsilon=1e-5
        ),
    ]
    fn = helper.make_function(
        "local",
        "ConvBn",
        ["x", "w", "s", "b", "m", "v"],
        ["z"],
        body,
        opset_imports=[helper.make_opsetid("", 15)],
    )
    g = Graph(seed=43)
    x = g.input("x", [2, 3, 6])
    w = g.weight("w", [4, 3, 3])
    z = g.node("ConvBn", [x, w, *g.bn_params(4, "fbn")], name="call", domain="local")
    y = g.node("Conv", [z, g.weight("w2", [5, 4, 3])], name="conv")
    g.output(g.bn(y, 5))
    return g.model(functions=[fn], extra_opsets=[("local", 1)])


def test_bn_inside_local_function_reported():
    model = _function_model()
    r = check_fold(model, {"bn": ("folded", "conv"), "ConvBn/f_bn": ("skipped", "module-boundary")})
    assert "function" in r.report.entry("ConvBn/f_bn").reason
    assert [n.op_type for n in r.folded.graph.node] == ["ConvBn", "Conv"]


def test_bn_inside_local_function_only_is_exact():
    model = _function_model()
    r = bnfold.analyze(model, producers=["linear"])
    assert r.entry("ConvBn/f_bn").rule == rules.MODULE_BOUNDARY
    assert r.entry("bn").rule == rules.NOT_SELECTED
    check_fold(
        model,
        {"bn": ("skipped", rules.NOT_SELECTED), "ConvBn/f_bn": ("skipped", rules.MODULE_BOUNDARY)},
        producers=["linear"],
    )


# --------------------------------------------------------------------------------------------
# producers=, inplace, onnx_ir models


def _three_producers():
    g = Graph(seed=44)
    x = g.input("x", [2, 3, 6])
    g.output(g.bn(g.node("Conv", [x, g.weight("wc", [4, 3, 3])], name="conv"), 4, name="bn_c"))
    y = g.node("ConvTranspose", [x, g.weight("wt", [3, 2, 3])], name="convt")
    g.output(g.bn(y, 2, name="bn_t"))
    xl = g.input("xl", [3, 5])
    g.output(g.bn(g.node("Gemm", [xl, g.weight("wl", [5, 4])], name="gemm"), 4, name="bn_l"))
    xm = g.input("xm", [3, 5])
    g.output(g.bn(g.node("MatMul", [xm, g.weight("wm", [5, 2])], name="mm"), 2, name="bn_m"))
    return g.model()


TARGETS = {"bn_c": ("conv", "conv"), "bn_t": ("convt", "conv_transpose")}
TARGETS |= {"bn_l": ("gemm", "linear"), "bn_m": ("mm", "linear")}


@pytest.mark.parametrize(
    "producers",
    [None, ["conv"], ["conv_transpose"], ["linear"], ("conv", "linear"), "conv_transpose", []],
    ids=repr,
)
def test_producers_selection(producers):
    selected = rules.selected_kinds(producers)
    expected = {
        bn: ("folded", target) if kind in selected else ("skipped", rules.NOT_SELECTED)
        for bn, (target, kind) in TARGETS.items()
    }
    check_fold(_three_producers(), expected, producers=producers)


def test_producers_unknown_kind_rejected():
    with pytest.raises(bnfold.InvalidArgumentError):
        bnfold.fold(_three_producers(), producers=["gemm"])
    with pytest.raises(ValueError):
        bnfold.analyze(_three_producers(), producers="bogus")


def test_inplace_proto():
    model = _three_producers()
    original = onnx.ModelProto()
    original.CopyFrom(model)
    result, report = bnfold.fold(model, inplace=True, return_report=True)
    assert result is model
    assert len(report.folded) == 4 and not bn_nodes(model)
    check_structure(original, model, report)
    feeds = random_feeds(original)
    assert rel_err(run(original, feeds), run(model, feeds)) < 1e-5


def test_onnx_ir_model_not_mutated():
    proto = _three_producers()
    model = ir.serde.deserialize_model(proto)
    before = ir.serde.serialize_model(model).SerializeToString()
    report = bnfold.analyze(model)
    assert ir.serde.serialize_model(model).SerializeToString() == before
    folded, report2 = bnfold.fold(model, return_report=True)
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert isinstance(folded, ir.Model) and folded is not model
    assert report.to_list() == report2.to_list() and len(report2.folded) == 4
    folded_proto = ir.serde.serialize_model(folded)
    check_structure(proto, folded_proto, report2)
    feeds = random_feeds(proto)
    assert rel_err(run(proto, feeds), run(folded_proto, feeds)) < 1e-5
    # The input still runs as before.
    assert_bit_exact(run(proto, feeds), run(ir.serde.serialize_model(model), feeds))


def test_onnx_ir_model_inplace():
    proto = _three_producers()
    model = ir.serde.deserialize_model(proto)
    result = bnfold.fold(model, inplace=True)
    assert result is model
    assert not [n for n in model.graph if n.op_type == "BatchNormalization"]
    folded = ir.serde.serialize_model(model)
    onnx.checker.check_model(folded, full_check=True)
    feeds = random_feeds(proto)
    assert rel_err(run(proto, feeds), run(folded, feeds)) < 1e-5


def test_not_a_model_rejected():
    with pytest.raises(bnfold.UnsupportedModelError):
        bnfold.fold(_three_producers().graph)


# --------------------------------------------------------------------------------------------
# Sharing, names, subgraphs, shapes, types and metadata


def test_tied_transposed_weight():
    """x @ W.T twice with the same W (tied weights, as PyTorch exports them), each MatMul
    followed by its own BatchNorm, and a third use of W.T without one."""
    g = Graph(seed=60)
    w = g.weight("w", [4, 5])
    wt = g.node("Transpose", [w], name="w_t", perm=[1, 0])
    for i in (1, 2):
        x = g.input(f"x{i}", [3, 5])
        g.output(g.bn(g.node("MatMul", [x, wt], name=f"mm{i}"), 4, name=f"bn{i}"))
    g.output(g.node("MatMul", [g.input("x3", [3, 5]), wt], name="mm3"))
    r = check_fold(g.model(), {"bn1": ("folded", "mm1"), "bn2": ("folded", "mm2")})
    assert node_input(r.folded, "mm3", 1) == "w_t_out"
    np.testing.assert_array_equal(initializer(r.folded, "w"), initializer(r.model, "w"))


def test_conv_weight_through_transpose():
    g = Graph(seed=61)
    x = g.input("x", [2, 3, 6])
    w = g.node("Transpose", [g.weight("w", [3, 4, 3])], name="w_t", perm=[1, 0, 2])
    g.output(g.bn(g.node("Conv", [x, w], name="conv"), 4))
    check_fold(g.model(), FOLDED)


def test_new_names_do_not_collide():
    """The names a fold would pick for the new bias and weight copy already exist."""
    g = Graph(seed=62)
    x = g.input("x", [2, 3, 6])
    w = g.weight("conv.weight", [4, 3, 3])
    taken = g.init("conv.bias", g.uniform(3).reshape(3, 1))
    y = g.node("Conv", [x, w], name="conv")
    g.output(g.bn(y, 4))
    g.output(g.node("Add", [x, taken], name="conv.weight_folded"))
    y2 = g.node("Conv", [x, w], name="conv2", outputs=["conv.weight_folded_1"])
    g.output(y2)
    z = g.node("Conv", [x, w], name="conv3")
    g.output(g.bn(z, 4, name="bn3"))
    model = g.model()
    r = check_fold(model, {"bn": ("folded", "conv"), "bn3": ("folded", "conv3")})
    np.testing.assert_array_equal(
        initializer(r.folded, "conv.bias"), initializer(model, "conv.bias")
    )
    np.testing.assert_array_equal(
        initializer(r.folded, "conv.weight"), initializer(model, "conv.weight")
    )


@pytest.mark.parametrize("also", ["graph-output", "relu"])
def test_chain_first_output_used_elsewhere(also):
    g = Graph(seed=63)
    x = g.input("x", [2, 3, 6])
    y1 = g.bn(g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv"), 4, name="bn1")
    g.output(g.bn(y1, 4, name="bn2"))
    g.output(y1 if also == "graph-output" else g.node("Relu", [y1], name="relu"))
    check_fold(g.model(), {"bn1": ("folded", "conv"), "bn2": ("skipped", rules.SINGLE_CONSUMER)})


def test_bn_params_deduplicated_initializers():
    """TorchScript shares one initializer between equal tensors: scale and var the same, bias
    and mean the same, reached through Identity nodes."""
    g = Graph(seed=64)
    x = g.input("x", [2, 3, 6])
    a, b = g.init("a", g.uniform(4)), g.init("b", g.uniform(4, True))
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    var = g.node("Identity", [a], name="var_identity")
    g.output(g.bn(y, 4, params=[a, b, b, var]))
    y2 = g.node("Conv", [x, g.weight("w2", [4, 3, 3])], name="conv2")
    g.output(g.bn(y2, 4, name="bn2", params=[var, b, a, a]))
    check_fold(g.model(), {"bn": ("folded", "conv"), "bn2": ("folded", "conv2")})


def test_transpose_default_perm():
    """Transpose without perm reverses the axes: (N, C, L) -> (L, C, N), channels on axis 1."""
    model = _conv_then([("Transpose", {})], batch=5, bn_channels=4)
    check_fold(model, FOLDED)


def test_two_bns_on_one_conv_refused():
    g = Graph(seed=65)
    x = g.input("x", [2, 3, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    g.output(g.bn(y, 4, name="bn1"))
    g.output(g.bn(y, 4, name="bn2"))
    check_fold(
        g.model(),
        {"bn1": ("skipped", rules.SINGLE_CONSUMER), "bn2": ("skipped", rules.SINGLE_CONSUMER)},
    )


@pytest.mark.parametrize("opset", [11, 15])
def test_squeeze_axes_from_constant_node(opset):
    g = Graph(seed=66)
    x = g.input("x", [2, 3, 1, 8])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 1, 3])], name="conv")
    if opset >= 13:
        axes = g.constant("axes", np.array([2]), INT64)
        y = g.node("Squeeze", [y, axes], name="squeeze")
    else:
        y = g.node("Squeeze", [y], name="squeeze", axes=[2])
    g.output(g.bn(y, 4))
    check_fold(g.model(opset=opset), FOLDED)


def _branch_model(case: str):
    """Main-graph Conv "conv"; an If whose then-branch uses something of it."""
    outer = Graph(seed=67)
    x = outer.input("x", [2, 3, 6])
    cond = outer.input("cond", [], BOOL)
    w = outer.weight("w", [4, 3, 3])
    y = outer.node("Conv", [x, w], name="conv")
    then, other = Graph(seed=68, name="then"), Graph(seed=69, name="else")
    if case == "bn-in-branch":  # the producer is outside the branch
        then.bn(y, 4, outputs=["then_out"])
    elif case == "conv-output-in-branch":  # the producer's output has a second user
        then.node("Identity", [y], name="then_identity", outputs=["then_out"])
        outer.output(outer.bn(y, 4))
    else:  # "weight-in-branch": a bn-less Conv inside reads the main Conv's weight
        then.node("Conv", [x, w], name="then_conv", outputs=["then_out"])
        outer.output(outer.bn(y, 4))
    if case == "weight-in-branch":
        w_else = other.weight("w_else", [4, 3, 3])
        other.node("Conv", [x, w_else], name="else_conv", outputs=["else_out"])
    else:
        other.node("Neg", [y], name="else_neg", outputs=["else_out"])
    for sub, name in ((then, "then_out"), (other, "else_out")):
        sub.output(name, shape=[2, 4, 4])
    out = outer.node("If", [cond], name="if", then_branch=then.graph(), else_branch=other.graph())
    outer.output(out)
    model = outer.model()
    feeds = []
    for c in (True, False):
        f = random_feeds(model, seed=int(c))
        f["cond"] = np.array(c)
        feeds.append(f)
    return model, feeds


def test_bn_in_branch_of_outer_conv_refused():
    model, feeds = _branch_model("bn-in-branch")
    check_fold(model, {"bn": ("skipped", rules.NO_PRODUCER)}, feeds=feeds)


def test_conv_output_also_used_in_branch_refused():
    model, feeds = _branch_model("conv-output-in-branch")
    check_fold(model, {"bn": ("skipped", rules.SINGLE_CONSUMER)}, feeds=feeds)


def test_weight_also_used_in_branch():
    model, feeds = _branch_model("weight-in-branch")
    r = check_fold(model, FOLDED, feeds=feeds)
    assert nodes_by_name(r.folded)["conv"].input[1] != "w"
    np.testing.assert_array_equal(initializer(r.folded, "w"), initializer(model, "w"))


def test_model_with_value_info():
    """A model whose intermediate values carry inferred shapes stays consistent."""
    model = matmul_model((2, 3, 5), perm=[0, 2, 1], seed=70)
    model = onnx.shape_inference.infer_shapes(model)
    assert model.graph.value_info
    check_fold(model, folded_into("mm"))
    model = onnx.shape_inference.infer_shapes(_conv_then([("Identity", {})]))
    check_fold(model, FOLDED)


def test_ir3_shared_weight():
    m = _two_convs(second_bn=False)
    m.ir_version = 3
    m.opset_import[0].version = 8
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    r = check_fold(m, {"bn1": ("folded", "conv1")})
    assert node_input(r.folded, "conv2", 1) == "w"


def test_float32_activations_float16_bn_params():
    """BatchNormalization-15: float16 scale, bias, mean and var on float32 data."""
    g = Graph(seed=71)
    x = g.input("x", [2, 3, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    g.output(g.bn(y, 4, params=g.bn_params(4, dtype=FLOAT16)))
    r = check_fold(g.model(), FOLDED)
    assert {t.data_type for t in r.folded.graph.initializer} == {FLOAT}


def test_unknown_rank_refused():
    """A MatMul on an input of unknown rank may have its channels anywhere: kept."""
    g = Graph(seed=72)
    x = g.node("Reshape", [g.input("x", [15]), g.input("shape", ["K"], INT64)], name="reshape")
    y = g.node("MatMul", [x, g.weight("w", [5, 4])], name="mm")
    g.output(g.bn(y, 4), shape=[3, 4])
    model = g.model(infer=False)
    x = np.random.default_rng(0).standard_normal(15).astype(np.float32)
    feeds = [{"x": x, "shape": np.array([3, 5])}]
    r = check_skip(model, rules.CHANNEL_AXIS, feeds=feeds)
    assert "rank" in r.report.entry("bn").reason


@pytest.mark.parametrize("kind", ["conv", "matmul-transpose", "gemm"])
def test_symbolic_dims_fold(kind):
    g = Graph(seed=73)
    if kind == "conv":
        x = g.input("x", ["N", 3, "L"])
        y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="p")
        c = 4
    elif kind == "gemm":
        x = g.input("x", ["N", 5])
        y = g.node("Gemm", [x, g.weight("w", [5, 4])], name="p")
        c = 4
    else:
        x = g.input("x", ["N", "L", 5])
        y = g.node("MatMul", [x, g.weight("w", [5, 4])], name="p")
        y = g.node("Transpose", [y], name="t", perm=[0, 2, 1])
        c = 4
    g.output(g.bn(y, c))
    model = g.model()
    feeds = [random_feeds(model, seed=0, dim=5), random_feeds(model, seed=1, dim=7)]
    check_fold(model, folded_into("p"), feeds=feeds)


def test_bn_params_from_constant_subgraph():
    """var = Reshape(Mul(v, v)), scale = Sqrt(s): computed from constants only; folded, and
    the subgraph goes."""
    g = Graph(seed=74)
    x = g.input("x", [2, 3, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    s, b, m, v = g.bn_params(4)
    v2 = g.node("Mul", [g.init("v1", g.uniform(4).reshape(2, 2)), g.constant("two", [[2.0]])])
    var = g.node("Reshape", [v2, g.init("shape", np.array([4]), INT64)], name="reshape")
    scale = g.node("Sqrt", [g.init("s2", g.uniform(4))], name="sqrt")
    g.output(g.bn(y, 4, params=[scale, b, m, var]))
    r = check_fold(g.model(), FOLDED)
    assert [n.op_type for n in r.folded.graph.node] == ["Conv"]


def test_conv_bias_subgraph_castlike_of_intermediate():
    g = Graph(seed=75)
    x = g.input("x", [2, 3, 6])
    h = g.node("Relu", [x], name="relu")
    w = g.weight("w", [4, 3, 3])
    cast = g.node("CastLike", [g.constant("zero", np.array(0.0)), h], name="castlike")
    bias = g.node("Expand", [cast, g.node("Shape", [w], name="shape", start=0, end=1)])
    g.output(g.bn(g.node("Conv", [h, w, bias], name="conv"), 4))
    r = check_fold(g.model(opset=18), FOLDED)
    assert [n.op_type for n in r.folded.graph.node] == ["Relu", "Conv"]


def test_unnamed_nodes():
    model = conv_model(seed=76)
    for n in model.graph.node:
        n.name = ""
    r = check_fold(model, {"bn_out": ("folded", "conv_out")})
    assert r.folded.graph.output[0].name == "bn_out"


@pytest.mark.parametrize("conv_bias", [True, False])
def test_conv_add_constant_without_conv_bias(conv_bias):
    g = Graph(seed=77)
    x = g.input("x", [2, 3, 6, 6])
    inputs = [x, g.weight("w", [4, 3, 3, 3])] + ([g.init("b", g.uniform(4))] if conv_bias else [])
    y = g.node("Conv", inputs, name="conv")
    y = g.node("Add", [g.init("k", g.uniform(4, True).reshape(1, 4, 1, 1)), y], name="add")
    g.output(g.bn(y, 4))
    r = check_fold(g.model(), FOLDED, may_remove={"add"})
    assert [n.op_type for n in r.folded.graph.node] == ["Conv"]


@pytest.mark.parametrize("kind", KINDS)
def test_recent_opset(kind):
    """Opset 21 (BatchNormalization-15 still), IR version 10."""
    model = producer_model(kind, True, 21)
    model.ir_version = 10
    check_fold(model, folded_into(PRODUCER_TARGET[kind]))


def test_bn_output_graph_output_and_used():
    g = Graph(seed=79)
    x = g.input("x", [2, 3, 6])
    y = g.bn(g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv"), 4)
    g.output(y)
    g.output(g.node("Relu", [y], name="relu"))
    r = check_fold(g.model(), FOLDED)
    assert nodes_by_name(r.folded)["relu"].input[0] == "bn_out"


def test_ir3_bn_in_if_branch():
    """IR 3 with a BatchNorm inside an If branch whose weight the other branch shares."""
    outer = Graph(seed=80)
    x = outer.input("x", [2, 3, 6])
    cond = outer.input("cond", [], BOOL)
    w = outer.weight("w", [4, 3, 3])
    then, other = Graph(seed=81, name="then"), Graph(seed=82, name="else")
    y = then.node("Conv", [x, w], name="conv_then")
    params = outer.bn_params(4, "bn_then")
    then.output(then.bn(y, 4, name="bn_then", params=params, outputs=["t"]), shape=[2, 4, 4])
    other.output(other.node("Conv", [x, w], name="conv_else", outputs=["e"]), shape=[2, 4, 4])
    outer.output(
        outer.node("If", [cond], name="if", then_branch=then.graph(), else_branch=other.graph())
    )
    model = outer.model(opset=8, ir_version=3, legacy_inputs=True)
    feeds = [dict(random_feeds(model, seed=c), cond=np.array(bool(c))) for c in (0, 1)]
    check_fold(model, {"bn_then": ("folded", "conv_then")}, feeds=feeds)


def test_opset6_bn_refused():
    """BatchNormalization-6 (is_test, consumed_inputs era) is not read; onnxruntime does not
    run it either, so only the model is compared."""
    model = producer_model("conv", True, 6)
    r = check_fold(model, {"bn": ("skipped", rules.STANDARD_FORWARD)}, numbers="none")
    assert [n.op_type for n in r.folded.graph.node] == ["Conv", "BatchNormalization"]
    for a, b in zip(model.graph.initializer, r.folded.graph.initializer, strict=True):
        assert a.SerializeToString() == b.SerializeToString()


def test_external_data_not_loaded_refused():
    model = conv_model(seed=83)
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="weights.bin")
    with pytest.raises(bnfold.UnsupportedModelError, match="external"):
        bnfold.fold(model)


@pytest.mark.parametrize("kind", ["conv_transpose", "gemm", "matmul"])
def test_shared_weight_other_producers(kind):
    """One weight, three layers: two followed by their own BatchNorm, one without."""
    g = Graph(seed=84)
    if kind == "conv_transpose":
        w = g.weight("w", [4, 3, 3])  # group=2: 6 output channels
        shape, op, c, attrs = [2, 4, 5], "ConvTranspose", 6, dict(group=2)
    else:
        w = g.weight("w", [4, 5] if kind == "gemm" else [5, 4])
        shape, op, c = [3, 5], "Gemm" if kind == "gemm" else "MatMul", 4
        attrs = dict(transB=1) if kind == "gemm" else {}
    for i in (1, 2, 3):
        y = g.node(op, [g.input(f"x{i}", shape), w], name=f"p{i}", **attrs)
        g.output(g.bn(y, c, name=f"bn{i}") if i < 3 else y)
    model = g.model()
    r = check_fold(model, {"bn1": ("folded", "p1"), "bn2": ("folded", "p2")})
    assert node_input(r.folded, "p3", 1) == "w"
    np.testing.assert_array_equal(initializer(r.folded, "w"), initializer(model, "w"))


def test_graph_output_doc_string_kept():
    model = conv_model(seed=85)
    model.graph.output[0].doc_string = "class scores"
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("bn").folded and not bn_nodes(folded)  # the output is rewritten
    assert folded.graph.output[0].doc_string == "class scores"


@pytest.mark.parametrize("as_output", [False, True], ids=["internal", "graph-output"])
def test_bn_output_used_inside_if_branches(as_output):
    """The BatchNorm's output is read by both branches of an If (outer-scope references)."""
    outer = Graph(seed=86)
    x, cond = outer.input("x", [2, 3, 6]), outer.input("cond", [], BOOL)
    y = outer.bn(outer.node("Conv", [x, outer.weight("w", [4, 3, 3])], name="conv"), 4)
    if as_output:
        outer.output(y)
    then, other = Graph(seed=87, name="then"), Graph(seed=88, name="else")
    then.output(then.node("Relu", [y], name="relu", outputs=["t"]), shape=[2, 4, 4])
    other.output(other.node("Neg", [y], name="neg", outputs=["e"]), shape=[2, 4, 4])
    outer.output(
        outer.node("If", [cond], name="if", then_branch=then.graph(), else_branch=other.graph())
    )
    model = outer.model()
    feeds = [dict(random_feeds(model, seed=c), cond=np.array(bool(c))) for c in (0, 1)]
    check_fold(model, FOLDED, feeds=feeds)


# --------------------------------------------------------------------------------------------
# Models exported from PyTorch (both exporters)


nn = torch.nn


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bdw = nn.BatchNorm2d(8)
        self.fc, self.bf = nn.Linear(8, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(y + self.b2(self.c2(y)))
        y = torch.relu(self.bdw(self.dw(y)))
        return self.bf(self.fc(y.mean((2, 3))))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn1 = nn.BatchNorm2d(6)
        self.up2 = nn.ConvTranspose2d(6, 9, 2, stride=2, groups=3, bias=False)
        self.bn2 = nn.BatchNorm2d(9)
        self.up3 = nn.ConvTranspose1d(9, 6, 3, groups=3)
        self.bn3 = nn.BatchNorm1d(6)

    def forward(self, x):
        y = torch.relu(self.bn1(self.up1(x)))
        y = self.bn2(self.up2(y))
        return self.bn3(self.up3(y.flatten(2)))


class Sequence(nn.Module):
    """Linear on (N, L, C) then transpose(1, 2) into BatchNorm1d: foldable. Linear on (N, C, L)
    straight into BatchNorm1d(C): the Linear acts on L, the BatchNorm on C: not foldable."""

    def __init__(self):
        super().__init__()
        self.proj, self.bn_ok = nn.Linear(5, 6), nn.BatchNorm1d(6)
        self.mix, self.bn_bad = nn.Linear(5, 7), nn.BatchNorm1d(4)

    def forward(self, x):  # x: (N, 4, 5)
        a = self.bn_ok(self.proj(x).transpose(1, 2))
        b = self.bn_bad(self.mix(x))
        return a, b


FOLDS = {  # BatchNorm module -> ("folded", producer module) or ("skipped", rule)
    SmallCNN: {
        "b1": ("folded", "c1"),
        "b2": ("folded", "c2"),
        "bdw": ("folded", "dw"),
        "bf": ("folded", "fc"),
    },
    Decoder: {"bn1": ("folded", "up1"), "bn2": ("folded", "up2"), "bn3": ("folded", "up3")},
    Sequence: {"bn_ok": ("folded", "proj"), "bn_bad": ("skipped", rules.CHANNEL_AXIS)},
}
INPUTS = {SmallCNN: (2, 3, 8, 8), Decoder: (2, 4, 3, 3), Sequence: (2, 4, 5)}


def _module_of(node: onnx.NodeProto, model: onnx.ModelProto) -> str:
    """The module whose parameter is ``node``'s input 1 (a BatchNorm's scale, a layer's
    weight), seen through Transpose and Identity nodes."""
    producers = {o: n for n in model.graph.node for o in n.output}
    name = node.input[1]
    while name in producers and producers[name].op_type in ("Transpose", "Identity"):
        name = producers[name].input[0]
    assert name.endswith(".weight"), name
    return name[: -len(".weight")]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("cls", [SmallCNN, Decoder, Sequence], ids=lambda c: c.__name__)
def test_torch_exported(cls, dynamo):
    torch.manual_seed(0)
    module = randomize_batchnorms(cls()).eval()
    x = torch.randn(*INPUTS[cls])
    model = export_torch(module, x, dynamo)
    report = bnfold.analyze(model)
    nodes = nodes_by_name(model)
    expected = {}
    for node in bn_nodes(model):
        action, what = FOLDS[cls][_module_of(node, model)]
        expected[node.name] = (action, report.entry(node.name).target)
        if action == "folded":  # into the right layer
            assert _module_of(nodes[report.entry(node.name).target], model) == what
        else:
            expected[node.name] = (action, what)
    assert len(expected) == len(FOLDS[cls])
    feeds = [{model.graph.input[0].name: x.numpy()}]
    feeds.append({model.graph.input[0].name: torch.randn(*INPUTS[cls]).numpy()})
    r = check_fold(model, expected, feeds=feeds, may_remove=_torch_may_remove(model))
    # The ONNX model computes what the module does.
    with torch.no_grad():
        want = module(x)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    assert rel_err([w.numpy() for w in want], r.after[0]) < 1e-5


def _torch_may_remove(model: onnx.ModelProto) -> set[str]:
    """The Add of a Linear's bias after its MatMul (x @ W.T + b) may merge into the fold."""
    return {
        n.name
        for n in model.graph.node
        if n.op_type == "Add" and any(i.endswith(".bias") for i in n.input)
    }


def test_torch_training_mode_export_refused():
    torch.manual_seed(0)
    module = randomize_batchnorms(SmallCNN()).train()
    x = torch.randn(*INPUTS[SmallCNN])
    model = export_torch(module, x, dynamo=False, training=torch.onnx.TrainingMode.TRAINING)
    bns = bn_nodes(model)
    assert len(bns) == 4
    check_fold(
        model,
        {n.name: ("skipped", rules.INFERENCE_MODE) for n in bns},
        feeds=[{model.graph.input[0].name: x.numpy()}],
    )
