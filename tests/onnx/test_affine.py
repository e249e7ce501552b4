"""Affine chains in ONNX: Mul/Div by constants and Add/Sub of constants after a layer (what
tf2onnx and other converters leave of a BatchNorm), folded into the layer like a BatchNorm.

Every fold goes through ``check_fold``: input untouched, ``analyze`` agreeing with ``fold``,
the report, outputs compared in onnxruntime on fresh inputs, ``onnx.checker``'s full check and
the structure (nothing removed but what the report names, no dead initializer).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import bnfold
from bnfold.core import rules
from tests.helpers.onnx_models import (
    FLOAT16,
    Graph,
    check_fold,
    random_feeds,
    rel_err,
    run,
)

CHANNEL_AXIS, VALID = rules.CHANNEL_AXIS, rules.VALID_VALUES


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def scale(g: Graph, c: int, shape) -> str:
    """A per-channel constant with values of both signs, away from 0."""
    return g.init("k", g.uniform(c, signed=True).reshape(shape))


# --------------------------------------------------------------------------------------------
# What converters write


def test_dense_mul_add_as_tf2onnx_writes_it():
    """Keras Dense + BatchNormalization, TensorFlow's optimizer on: MatMul, then the Dense bias
    Add, then Mul/Add by [16] constants."""
    g = Graph(seed=1)
    x = g.input("x", [3, 20])
    y = g.node("MatMul", [x, g.weight("w", [20, 16])], name="matmul")
    y = g.node("Add", [y, g.init("b", g.randn(16))], name="bias")
    y = g.node("Mul", [y, scale(g, 16, [16])], name="mul")
    g.output(g.node("Add", [y, g.init("t", g.randn(16))], name="add"))
    r = check_fold(g.model(), {"bias -> mul -> add": ("folded", "matmul")})
    assert ops(r.folded) == ["MatMul", "Add"]  # the bias Add stays, with the new constant
    entry = r.report.entries[0]
    assert entry.kind == "affine" and entry.bn_type == "Add -> Mul -> Add"
    assert r.report.summary() == "0 of 0 BatchNorms folded, 0 kept; 1 of 1 affine chain folded"


def test_dense_on_3d_input():
    """MatMul on the last axis of a 3-D activation, constants of shape [16]."""
    g = Graph(seed=2)
    x = g.input("x", [2, 5, 20])
    y = g.node("MatMul", [x, g.weight("w", [20, 16])], name="matmul")
    y = g.node("Mul", [y, scale(g, 16, [16])], name="mul")
    g.output(g.node("Add", [y, g.init("t", g.randn(16))], name="add"))
    r = check_fold(g.model(), {"mul -> add": ("folded", "matmul")})
    assert ops(r.folded) == ["MatMul", "Add"]


def test_dense_on_3d_input_with_a_per_step_constant_is_kept():
    """A [5, 1] constant varies along the time axis of (2, 5, 16), not along the features."""
    g = Graph(seed=3)
    x = g.input("x", [2, 5, 20])
    y = g.node("MatMul", [x, g.weight("w", [20, 16])], name="matmul")
    g.output(g.node("Mul", [y, g.init("k", g.uniform(5).reshape(5, 1))], name="mul"))
    r = check_fold(g.model(), {"mul": ("skipped", CHANNEL_AXIS)})
    assert "varies along axis 1" in r.report.entries[0].reason


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_mul_add(group):
    """ConvTranspose (weight [4, 6/group, 3, 3]: output channels on axis 1, per group) then
    Mul/Add of [1, 6, 1, 1] constants."""
    g = Graph(seed=4)
    x = g.input("x", [2, 4, 5, 5])
    w = g.weight("w", [4, 6 // group, 3, 3])
    y = g.node("ConvTranspose", [x, w], name="convt", group=group)
    y = g.node("Mul", [y, scale(g, 6, [1, 6, 1, 1])], name="mul")
    g.output(g.node("Add", [y, g.init("t", g.randn(1, 6, 1, 1))], name="add"))
    r = check_fold(g.model(), {"mul -> add": ("folded", "convt")})
    assert ops(r.folded) == ["ConvTranspose"]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_mul_add_without_the_optimizer(dims):
    """TensorFlow's optimizer off: every BatchNorm is Conv -> Mul([1,C,1..]) -> Add."""
    g = Graph(seed=5 + dims)
    x = g.input("x", [2, 3] + [5] * dims)
    y = g.node("Conv", [x, g.weight("w", [4, 3] + [3] * dims), g.init("b", g.randn(4))])
    shape = [1, 4] + [1] * dims
    y = g.node("Mul", [y, scale(g, 4, shape)], name="mul")
    g.output(g.node("Add", [y, g.init("t", g.randn(*shape))], name="add"))
    r = check_fold(g.model(), {"mul -> add": ("folded", "conv")})
    assert ops(r.folded) == ["Conv"]


def test_channels_last_chain_after_a_transpose():
    """tf2onnx's NHWC wrapping: Conv -> Transpose(0, 2, 3, 1) -> Mul([C]) -> Add([C]); the
    channels are on the last axis after the Transpose."""
    g = Graph(seed=9)
    x = g.input("x", [2, 5, 5, 3])
    t = g.node("Transpose", [x], name="to_nchw", perm=[0, 3, 1, 2])
    y = g.node("Conv", [t, g.weight("w", [4, 3, 3, 3])], name="conv")
    y = g.node("Transpose", [y], name="to_nhwc", perm=[0, 2, 3, 1])
    y = g.node("Mul", [y, scale(g, 4, [4])], name="mul")
    g.output(g.node("Add", [y, g.init("t", g.randn(4))], name="add"))
    r = check_fold(g.model(), {"mul -> add": ("folded", "conv")})
    assert ops(r.folded) == ["Transpose", "Conv", "Transpose"]


def test_depthwise_weight_computed_by_reshape_and_transpose():
    """tf-keras through tf2onnx: a depthwise weight stored as [3, 3, 8, 1] and made OIHW by
    Reshape -> Transpose is materialised as a new initializer and folded into."""
    g = Graph(seed=10)
    x = g.input("x", [2, 8, 6, 6])
    stored = g.init("dw", g.randn(3, 3, 8, 1, scale=0.5))
    shape = g.init("shape", np.array([3, 3, 1, 8], np.int64), TensorProto.INT64)
    w = g.node("Reshape", [stored, shape], name="reshape")
    w = g.node("Transpose", [w], name="transpose", perm=[3, 2, 0, 1])
    y = g.node("Conv", [x, w], name="conv", group=8, pads=[1, 1, 1, 1])
    g.output(g.bn(y, 8))
    r = check_fold(g.model(), {"bn": ("folded", "conv")}, may_remove={"reshape", "transpose"})
    assert ops(r.folded) == ["Conv"]
    weight = r.folded.graph.node[0].input[1]
    assert weight in {t.name for t in r.folded.graph.initializer}
    # the stored tensor is gone with what computed from it
    assert "dw" not in {t.name for t in r.folded.graph.initializer}


def test_computed_weight_read_by_another_layer_stays_for_it():
    g = Graph(seed=11)
    x = g.input("x", [2, 4, 6, 6])
    stored = g.init("w", g.randn(3, 3, 4, 4, scale=0.3))
    w = g.node("Transpose", [stored], name="transpose", perm=[3, 2, 0, 1])
    w = g.node("Identity", [w], name="copy")
    w = g.node("Neg", [w], name="negate")  # computed, not a layout op: evaluated
    first = g.node("Conv", [x, w], name="conv1")
    g.output(g.bn(first, 4, name="bn1"))
    g.output(g.node("Conv", [x, w], name="conv2"))
    r = check_fold(g.model(), {"bn1": ("folded", "conv1")})
    kept = {n.name: n for n in r.folded.graph.node}
    assert {"transpose", "copy", "negate", "conv2"} <= set(kept)
    assert kept["conv1"].input[1] != kept["conv2"].input[1]


def test_computed_weight_the_evaluator_cannot_compute_is_kept():
    g = Graph(seed=12)
    x = g.input("x", [2, 4, 6, 6])
    w = g.node("Sin", [g.init("w", g.randn(4, 4, 3, 3))], name="sin")
    y = g.node("Conv", [x, w], name="conv")
    g.output(g.node("Mul", [y, scale(g, 4, [1, 4, 1, 1])], name="mul"))
    r = check_fold(g.model(), {"mul": ("skipped", rules.CONSTANT_PARAMS)})
    assert "Sin" in r.report.entries[0].reason


def test_gemm_with_c_and_trans_b():
    g = Graph(seed=13)
    x = g.input("x", [3, 7])
    w, c = g.weight("w", [5, 7]), g.init("c", g.randn(5))
    y = g.node("Gemm", [x, w, c], name="gemm", transB=1, alpha=0.7, beta=1.3)
    y = g.node("Div", [y, scale(g, 5, [5])], name="div")
    g.output(g.node("Sub", [y, g.init("t", g.randn(5))], name="sub"))
    r = check_fold(g.model(), {"div -> sub": ("folded", "gemm")})
    assert ops(r.folded) == ["Gemm"]


def test_scalar_mul_after_matmul_needs_no_add():
    """Attention's ``q * d**-0.5``: a scalar folds into the weight, nothing is added."""
    g = Graph(seed=14)
    x = g.input("x", [2, 6, 8])
    y = g.node("MatMul", [x, g.weight("wq", [8, 8])], name="q")
    g.output(g.node("Mul", [y, g.init("scale", np.array(8**-0.5))], name="mul"))
    r = check_fold(g.model(), {"mul": ("folded", "q")})
    assert ops(r.folded) == ["MatMul"]


def test_every_op_in_both_orders_with_neg():
    """``-((c1 - (y * a) / d) + e)``: sub with the constant first, neg, scalars and vectors."""
    g = Graph(seed=15)
    x = g.input("x", [2, 3, 6, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3]), g.init("b", g.randn(4))], name="conv")
    y = g.node("Mul", [scale(g, 4, [4, 1, 1]), y], name="mul")  # constant first
    y = g.node("Div", [y, g.init("d", np.array(1.7))], name="div")
    y = g.node("Sub", [g.init("c1", g.randn(4, 1, 1)), y], name="sub")
    y = g.node("Neg", [y], name="neg")
    g.output(g.node("Add", [g.init("e", g.randn(1, 4, 1, 1)), y], name="add"))
    r = check_fold(g.model(), {"mul -> div -> sub -> neg -> add": ("folded", "conv")})
    assert ops(r.folded) == ["Conv"]


def test_interleaved_with_batch_norms():
    """Conv -> Mul -> BN -> Add -> BN -> Sub: the Mul folds with the first BatchNorm, the Add
    with the second, the Sub on its own, in three passes."""
    g = Graph(seed=16)
    x = g.input("x", [2, 3, 6, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    y = g.node("Mul", [y, scale(g, 4, [1, 4, 1, 1])], name="mul")
    y = g.bn(y, 4, name="bn1")
    y = g.node("Add", [y, g.init("t", g.randn(4, 1, 1))], name="add")
    y = g.bn(y, 4, name="bn2")
    g.output(g.node("Sub", [y, g.init("u", g.randn(4, 1, 1))], name="sub"))
    expected = {
        "bn1": ("folded", "conv"),
        "bn2": ("folded", "conv"),
        "sub": ("folded", "conv"),
    }
    r = check_fold(g.model(), expected, may_remove={"mul", "add"})
    assert ops(r.folded) == ["Conv"]
    bn1 = r.report.entry("bn1")
    assert bn1.target_type == "Conv+Mul" and r.report.entry("bn2").target_type == "Conv+Add"


def test_chain_through_unsqueeze_and_squeeze():
    g = Graph(seed=17)
    x = g.input("x", [2, 3, 6])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3])], name="conv")
    axes = g.init("axes", np.array([3], np.int64), TensorProto.INT64)
    y = g.node("Unsqueeze", [y, axes], name="unsqueeze")  # (2, 4, 4, 1)
    y = g.node("Mul", [y, scale(g, 4, [4, 1, 1])], name="mul")
    y = g.node("Squeeze", [y, axes], name="squeeze")
    g.output(g.node("Add", [y, g.init("t", g.randn(4, 1))], name="add"))
    r = check_fold(g.model(), {"mul -> add": ("folded", "conv")})
    assert ops(r.folded) == ["Conv", "Unsqueeze", "Squeeze"]


def test_chain_inside_an_if_branch():
    outer = Graph(seed=18)
    x = outer.input("x", [2, 3, 5, 5])
    cond = outer.input("cond", [], TensorProto.BOOL)
    then = Graph(seed=19, name="then")
    y = then.node("Conv", [x, then.weight("w", [4, 3, 3, 3])], name="conv", pads=[1, 1, 1, 1])
    y = then.node("Mul", [y, scale(then, 4, [1, 4, 1, 1])], name="mul")
    then.output(then.node("Add", [y, then.init("t", then.randn(4, 1, 1))], name="add"))
    other = Graph(seed=20, name="else")
    other.output(
        other.node("Conv", [x, other.weight("w2", [4, 3, 3, 3])], name="conv2", pads=[1] * 4)
    )
    out = outer.node("If", [cond], name="if", then_branch=then.graph(), else_branch=other.graph())
    outer.output(out, shape=[2, 4, 5, 5])
    feeds = [
        {
            "x": np.random.default_rng(s).standard_normal((2, 3, 5, 5)).astype(np.float32),
            "cond": np.array(bool(s)),
        }
        for s in (0, 1)
    ]
    r = check_fold(outer.model(opset=17), {"mul -> add": ("folded", "conv")}, feeds=feeds)
    branch = next(a.g for a in r.folded.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["Conv"]


def test_graph_output_name_is_kept():
    g = Graph(seed=21)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    y = g.node("Mul", [y, scale(g, 4, [1, 4, 1, 1])], name="mul")
    g.output(g.node("Add", [y, g.init("t", g.randn(1, 4, 1, 1))], name="add", outputs=["out"]))
    r = check_fold(g.model(), {"mul -> add": ("folded", "conv")})
    assert [o.name for o in r.folded.graph.output] == ["out"]
    assert r.folded.graph.node[0].output == ["out"]


def test_shared_weight_gets_a_copy():
    g = Graph(seed=22)
    x = g.input("x", [2, 3, 5, 5])
    w = g.weight("w", [4, 3, 3, 3])
    for i in (1, 2):
        y = g.node("Conv", [x, w], name=f"conv{i}")
        g.output(g.node("Mul", [y, scale(g, 4, [1, 4, 1, 1])], name=f"mul{i}"))
    r = check_fold(g.model(), {"mul1": ("folded", "conv1"), "mul2": ("folded", "conv2")})
    convs = [n for n in r.folded.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]


# --------------------------------------------------------------------------------------------
# What is kept, and why


def test_constant_along_another_axis_is_kept():
    g = Graph(seed=23)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    g.output(g.node("Mul", [y, g.init("k", g.uniform(3).reshape(1, 1, 1, 3))], name="mul"))
    r = check_fold(g.model(), {"mul": ("skipped", CHANNEL_AXIS)})
    assert "varies along axis 3" in r.report.entries[0].reason


def test_constant_of_higher_rank_is_kept():
    g = Graph(seed=24)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    g.output(g.node("Add", [y, g.init("k", g.randn(1, 1, 4, 1, 1))], name="add"))
    r = check_fold(g.model(), {"add": ("skipped", CHANNEL_AXIS)})
    assert "higher rank" in r.report.entries[0].reason


def test_constant_widening_a_single_channel_is_kept():
    """One output channel times a [1, 3, 1, 1] constant: the output becomes 3 channels."""
    g = Graph(seed=25)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [1, 3, 3, 3])], name="conv")
    g.output(g.node("Mul", [y, scale(g, 3, [1, 3, 1, 1])], name="mul"))
    r = check_fold(g.model(), {"mul": ("skipped", CHANNEL_AXIS)})
    assert "3 values for the 1 channels" in r.report.entries[0].reason


def test_producer_output_read_elsewhere_is_neither_folded_nor_reported():
    """Arithmetic on a value other nodes read is the model's own computation (a swish's
    ``x * 1.0`` next to ``x * sigmoid(x)``), not a BatchNorm left behind: no entry."""
    g = Graph(seed=26)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    g.output(g.node("Relu", [y], name="relu"))
    g.output(g.node("Mul", [y, scale(g, 4, [1, 4, 1, 1])], name="mul"))
    check_fold(g.model(), {}, numbers="exact")


def test_link_read_elsewhere_ends_the_chain_there():
    """Conv -> Mul -> [Relu, Add]: the Mul folds (its value is the conv's after the fold), the
    Add then reads a conv whose output the Relu reads too, and stays (unreported)."""
    g = Graph(seed=27)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    y = g.node("Mul", [y, scale(g, 4, [1, 4, 1, 1])], name="mul")
    g.output(g.node("Relu", [y], name="relu"))
    g.output(g.node("Add", [y, g.init("t", g.randn(1, 4, 1, 1))], name="add"))
    r = check_fold(g.model(), {"mul": ("folded", "conv")})
    assert ops(r.folded) == ["Conv", "Relu", "Add"]


def test_division_by_zero_is_kept():
    g = Graph(seed=28)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    d = g.init("d", np.array([1.0, 0.0, 2.0, 3.0]).reshape(1, 4, 1, 1))
    g.output(g.node("Div", [y, d], name="div"))
    r = check_fold(g.model(), {"div": ("skipped", VALID)}, numbers="none")
    assert "divides by 0 at channel 1" in r.report.entries[0].reason


@pytest.mark.parametrize(
    "case", ["constant-divided", "two-activations", "matmul-bias", "relu-first", "integer"]
)
def test_what_is_not_a_candidate_gets_no_entry(case):
    g = Graph(seed=29)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    if case == "constant-divided":  # a / y is not affine in y
        g.output(g.node("Div", [g.init("a", g.randn(1, 4, 1, 1)), y], name="div"))
    elif case == "two-activations":
        g.output(g.node("Mul", [y, y], name="mul"))
    elif case == "matmul-bias":  # MatMul + Add is a Linear: the fold would gain nothing
        z = g.node("MatMul", [y, g.weight("m", [3, 6])], name="matmul")
        g.output(g.node("Add", [z, g.init("b", g.randn(6))], name="bias"))
    elif case == "relu-first":
        g.output(g.node("Mul", [g.node("Relu", [y]), scale(g, 4, [1, 4, 1, 1])], name="mul"))
    else:  # shape arithmetic on integers
        shape = g.node("Shape", [y], name="shape")
        double = g.node("Mul", [shape, g.init("two", np.array(2, np.int64), TensorProto.INT64)])
        two = g.init("two_", np.array(2, np.int64), TensorProto.INT64)
        g.output(g.node("Reshape", [y, g.node("Div", [double, two], name="half")]))
    r = check_fold(g.model(), {}, numbers="exact")
    assert ops(r.folded) == ops(r.model)


def test_old_opset_broadcast_attribute_is_not_read():
    """Before opset 7, Mul broadcast a [4] constant along ``axis=1``: no link."""
    g = Graph(seed=30)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    g.output(g.node("Mul", [y, scale(g, 4, [4])], name="mul", broadcast=1, axis=1))
    model = g.model(opset=6, ir_version=3, infer=False)
    report = bnfold.analyze(model)
    assert report.entries == []


def test_float16_chain_folds_and_a_large_shift_is_refused():
    g = Graph(dtype=FLOAT16, seed=31)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    y = g.node("Mul", [y, scale(g, 4, [1, 4, 1, 1])], name="mul")
    g.output(g.node("Add", [y, g.init("t", g.randn(1, 4, 1, 1))], name="add"))
    check_fold(g.model(), {"mul -> add": ("folded", "conv")})

    g = Graph(dtype=FLOAT16, seed=32)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    y = g.node("Add", [y, g.init("t", np.full((1, 4, 1, 1), 40000.0))], name="add")
    g.output(g.node("Mul", [y, g.init("k", np.full((1, 4, 1, 1), 0.5))], name="mul"))
    r = check_fold(g.model(), {"add -> mul": ("skipped", VALID)}, numbers="exact")
    assert "near the float16 limit" in r.report.entries[0].reason


# --------------------------------------------------------------------------------------------
# The knob


def test_affine_false_leaves_arithmetic_alone():
    g = Graph(seed=33)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    y = g.node("Mul", [y, scale(g, 4, [1, 4, 1, 1])], name="mul")
    y = g.bn(y, 4, name="bn1")
    y = g.node("Conv", [y, g.weight("w2", [4, 4, 1, 1])], name="conv2")
    y = g.node("Add", [y, g.init("t", g.randn(4, 1, 1))], name="add")
    g.output(g.bn(y, 4, name="bn2"))
    model = g.model()
    expected = {
        "bn1": ("skipped", rules.NO_PRODUCER),
        "bn2": ("folded", "conv2"),  # a constant Add right after the layer is its bias
    }
    r = check_fold(model, expected, affine=False, may_remove={"add"})
    assert ops(r.folded) == ["Conv", "Mul", "BatchNormalization", "Conv"]
    r = check_fold(
        model, {"bn1": ("folded", "conv"), "bn2": ("folded", "conv2")}, may_remove={"add", "mul"}
    )
    assert ops(r.folded) == ["Conv", "Conv"]


def test_affine_must_be_a_bool():
    g = Graph(seed=34)
    x = g.input("x", [2, 3])
    g.output(g.node("Relu", [x]))
    with pytest.raises(bnfold.InvalidArgumentError, match="affine must be True or False"):
        bnfold.fold(g.model(), affine="no")
    with pytest.raises(bnfold.InvalidArgumentError, match="affine must be True or False"):
        bnfold.analyze(g.model(), affine=1)


def test_report_table_names_both_kinds():
    g = Graph(seed=35)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    y = g.bn(y, 4)
    y = g.node("Conv", [y, g.weight("w2", [4, 4, 1, 1])], name="conv2")
    g.output(g.node("Mul", [y, g.init("k", g.uniform(3).reshape(1, 1, 1, 3))], name="mul"))
    _, report = bnfold.fold(g.model(), return_report=True)
    text = str(report)
    assert report.summary() == "1 of 1 BatchNorm folded, 0 kept; 0 of 1 affine chain folded"
    assert text.splitlines()[1].startswith("BatchNorm / affine chain")
    assert [e.kind for e in report] == ["batchnorm", "affine"]
    assert report.batch_norms == [report.entry("bn")] and report.affines == [report.entry("mul")]


def test_numbers_match_a_float64_reference():
    """A long chain of vectors folded into a float32 conv stays within float32 rounding of the
    float64 chain (the product of the constants is formed once, in float64)."""
    g = Graph(seed=36)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    for i in range(12):
        op = ("Mul", "Add", "Div", "Sub")[i % 4]
        y = g.node(op, [y, g.init(f"c{i}", g.uniform(4, signed=True).reshape(4, 1, 1))])
    g.output(y)
    model = g.model()
    folded = bnfold.fold(model)
    feeds = random_feeds(model, 0)
    assert ops(folded) == ["Conv"]
    assert rel_err(run(model, feeds), run(folded, feeds)) < 1e-5


def _dense_3d(g: Graph, x: str, features: int = 16) -> str:
    """tf2onnx's Dense on (N, 5, 20): Reshape to 2-D, MatMul, Reshape back to a shape computed
    from the input's (``Concat(Gather(Shape(x), [0, 1]), [16])``)."""
    flat = g.node("Reshape", [x, g.init("flat", np.array([-1, 20], np.int64), TensorProto.INT64)])
    y = g.node("MatMul", [flat, g.weight("w", [20, features])], name="matmul")
    lead = g.node(
        "Gather",
        [g.node("Shape", [x]), g.init("idx", np.array([0, 1], np.int64), TensorProto.INT64)],
    )
    tail = g.init("tail", np.array([features], np.int64), TensorProto.INT64)
    shape = g.node("Concat", [lead, tail], axis=0)
    return g.node("Reshape", [y, g.node("Cast", [shape], to=TensorProto.INT64)], name="unflat")


def test_dense_on_3d_input_as_tf2onnx_writes_it():
    g = Graph(seed=37)
    x = g.input("x", ["n", 5, 20])
    y = g.node("Mul", [_dense_3d(g, x), scale(g, 16, [16])], name="mul")
    g.output(g.node("Add", [y, g.init("t", g.randn(16))], name="add"))
    r = check_fold(g.model(), {"mul -> add": ("folded", "matmul")})
    assert ops(r.folded).count("Mul") == 0 and ops(r.folded).count("Add") == 1


def test_batch_norm_over_the_time_axis_of_a_dense_is_kept():
    """Keras BatchNormalization(axis=1) after a Dense on (N, 5, 16): constants [1, 5, 1] vary
    along the time axis; the Dense's channels are the last."""
    g = Graph(seed=38)
    x = g.input("x", ["n", 5, 20])
    y = g.node("Mul", [_dense_3d(g, x), g.init("k", g.uniform(5).reshape(1, 5, 1))], name="mul")
    g.output(g.node("Add", [y, g.init("t", g.randn(1, 5, 1))], name="add"))
    r = check_fold(g.model(), {"mul -> add": ("skipped", CHANNEL_AXIS)}, numbers="exact")
    assert "varies along axis 1" in r.report.entries[0].reason


def test_reshape_that_moves_the_channels_is_not_followed():
    g = Graph(seed=39)
    x = g.input("x", [4, 20])
    y = g.node("MatMul", [x, g.weight("w", [20, 16])], name="matmul")
    y = g.node("Reshape", [y, g.init("s", np.array([4, 8, 2], np.int64), TensorProto.INT64)])
    g.output(g.node("Mul", [y, g.init("k", g.uniform(2))], name="mul"))
    r = check_fold(g.model(), {"mul": ("skipped", CHANNEL_AXIS)}, numbers="exact")
    assert "may move the 16 channels off the last axis" in r.report.entries[0].reason


def test_attention_scores_scaled_by_a_constant_get_no_entry():
    """``MatMul(Q, K^T) / sqrt(d)`` multiplies two activations: not a layer to fold into."""
    g = Graph(seed=40)
    x = g.input("x", [2, 8, 16])
    q = g.node("MatMul", [x, g.weight("wq", [16, 16])], name="q_proj")
    k = g.node("MatMul", [x, g.weight("wk", [16, 16])], name="k_proj")
    scores = g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 2, 1])], name="scores")
    scores = g.node("Div", [scores, g.init("sqrt_d", np.array(4.0))], name="scale")
    g.output(g.node("Softmax", [scores], axis=-1))
    check_fold(g.model(opset=17), {}, numbers="exact")


def test_telling_links_apart_spends_no_fold_budget():
    """Every Add/Mul of a model is looked at to tell links apart; large computed constants that
    no layer reads (four 16 MiB masks) must not use up the 64 MiB the folds may evaluate."""
    g = Graph(seed=41)
    x = g.input("x", [2, 3, 8, 8])
    m = g.input("m", [2048, 2048])
    shape = g.init("mshape", np.array([2048, 2048], np.int64), TensorProto.INT64)
    for i in range(4):
        mask = g.node("Expand", [g.init(f"c{i}", np.array(float(i))), shape])
        g.output(g.node("Add", [m, mask], name=f"add{i}"))
    mean = g.node("Mul", [g.init("mean0", g.randn(4)), g.init("two", np.array(2.0))])
    params = [g.init("s", g.uniform(4)), g.init("b", g.randn(4)), mean, g.init("v", g.uniform(4))]
    g.output(g.bn(g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv"), 4, params=params))
    report = bnfold.analyze(g.model(opset=17))
    assert report.entry("bn").folded, str(report)


def test_a_mask_is_not_a_link():
    """A constant varying along several axes can never fold: no entry (as in ATen and
    StableHLO), and a link before it folds on its own."""
    g = Graph(seed=42)
    x = g.input("x", [2, 3, 5, 5])
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    y = g.node("Mul", [y, scale(g, 4, [1, 4, 1, 1])], name="mul")
    g.output(g.node("Mul", [y, g.init("mask", g.uniform(9).reshape(3, 3))], name="masked"))
    r = check_fold(g.model(), {"mul": ("folded", "conv")})
    assert ops(r.folded) == ["Conv", "Mul"]


def test_chain_after_a_folded_matmul_is_named_by_the_models_nodes():
    """MatMul -> BN -> Div: the first pass gives the MatMul a bias Add, which the Div's chain
    then passes; the entry names the Div only."""
    g = Graph(seed=43)
    x = g.input("x", [3, 6])
    y = g.bn(g.node("MatMul", [x, g.weight("w", [6, 4])], name="matmul"), 4)
    g.output(g.node("Div", [y, scale(g, 4, [4])], name="div"))
    r = check_fold(g.model(), {"bn": ("folded", "matmul"), "div": ("folded", "matmul")})
    assert ops(r.folded) == ["MatMul", "Add"]


def test_quantized_layer_is_left_alone():
    """QDQ: a Conv whose weight is a DequantizeLinear's output, then a Mul: no entry, no
    change (bnfold folds into float weights only)."""
    g = Graph(seed=44)
    x = g.input("x", [2, 3, 5, 5])
    q = "wq"
    g.inits.append(onnx.numpy_helper.from_array(g.rng.integers(-99, 99, (4, 3, 3, 3), np.int8), q))
    w = g.node("DequantizeLinear", [q, g.init("ws", np.array(0.01))], name="dq")
    y = g.node("Conv", [x, w], name="conv")
    g.output(g.node("Mul", [y, scale(g, 4, [1, 4, 1, 1])], name="mul"))
    r = check_fold(g.model(opset=17), {}, numbers="exact")
    assert ops(r.folded) == ops(r.model)
