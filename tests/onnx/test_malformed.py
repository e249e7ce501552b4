"""Models that are invalid or damaged: an attribute of the wrong type, an operand of a rank its
operator refuses, a weight whose raw data does not fit its dims, nodes without the inputs or
outputs their operator requires, a tensor type onnx_ir cannot write back, a subgraph given by
attribute reference outside a function, a Gemm C that fits no output. Each is an
``UnsupportedModelError`` (one line; the command line's exit status 1) raised before anything
changes, or a BatchNorm kept with the reason.

Tiny models built with ``onnx_models.Graph`` (non-trivial BatchNorm statistics), folded by
``check_fold`` where the full checker accepts them (onnxruntime's outputs of the original and the
folded model compared, optimizations off), or folded and compared in onnxruntime by hand.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import bnfold
from bnfold.cli import main
from bnfold.core import rules
from tests.helpers.onnx_models import (
    BOOL,
    Graph,
    bn_nodes,
    conv_model,
    gemm_model,
    random_feeds,
    run,
)


def test_truncated_weight_raw_data_skipped():
    model = conv_model(seed=18)
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.raw_data = w.raw_data[:-8]
    before = model.SerializeToString()
    report = bnfold.analyze(model)
    folded, folded_report = bnfold.fold(model, return_report=True)
    assert model.SerializeToString() == before
    assert report.to_list() == folded_report.to_list()
    e = report.entry("bn")
    assert e.action == "skipped" and e.rule == rules.VALID_VALUES, e
    assert e.reason.strip()
    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization"]
    new_w = next(t for t in folded.graph.initializer if t.name == "w")
    assert new_w.raw_data == w.raw_data


def _two_conv_bns(seed: int = 21) -> onnx.ModelProto:
    g = Graph(seed=seed)
    x = g.input("x", [2, 3, 6, 6])
    y = g.bn(g.node("Conv", [x, g.weight("w1", [4, 3, 3, 3])], name="conv1"), 4, name="bn1")
    z = g.node("Conv", [y, g.weight("w2", [4, 4, 1, 1])], name="conv2")
    g.output(g.bn(z, 4, name="bn2"))
    return g.model()


def test_invalid_attribute_refused_before_anything_changes():
    """A wrong-typed attribute on a node bnfold reads (here the second BatchNorm's epsilon) is an
    invalid model: UnsupportedModelError naming it, raised before the first BatchNorm is folded
    (it was a TypeError from onnx_ir, after an ``inplace=True`` fold had changed the model)."""
    model = _two_conv_bns()
    (bn2,) = [n for n in model.graph.node if n.name == "bn2"]
    del bn2.attribute[:]
    bn2.attribute.append(onnx.helper.make_attribute("epsilon", "1e-5"))
    with pytest.raises(bnfold.UnsupportedModelError, match="'epsilon' is of type STRING"):
        bnfold.analyze(model)
    im = ir.serde.deserialize_model(model)
    with pytest.raises(bnfold.UnsupportedModelError, match="bn2"):
        bnfold.fold(im, inplace=True)
    assert [n.op_type for n in im.graph].count("BatchNormalization") == 2


@pytest.mark.parametrize("c_shape", [(7,), (1, 7)])
def test_gemm_c_of_another_length_is_kept(c_shape):
    """A Gemm C that fits neither one value nor one per output channel is kept with a reason
    (np.broadcast_to raised ValueError)."""
    model = gemm_model(n=4)
    c = next(t for t in model.graph.initializer if t.name == "c")
    c.CopyFrom(onnx.numpy_helper.from_array(np.ones(c_shape, np.float32), "c"))
    folded, report = bnfold.fold(model, return_report=True)
    entry = report.entry("bn")
    assert entry.rule == rules.VALID_VALUES and "C has shape" in entry.reason, entry
    assert len(bn_nodes(folded)) == 1


def _with_operand(op: str, w_shape: list[int], param: str = "", p_shape=()) -> onnx.ModelProto:
    """``op`` -> BatchNorm with a weight of ``w_shape``, or BatchNorm parameter ``param``
    (scale, bias, mean, var) of ``p_shape``."""
    x_shape = {"Gemm": [2, 4], "MatMul": [2, 3, 4]}.get(op, [2, 4, 5, 5])
    g = Graph(seed=35)
    x = g.input("x", x_shape)
    y = g.node(op, [x, g.weight("w", w_shape)], name="p")
    params = g.bn_params(4)
    if param:
        i = ["scale", "bias", "mean", "var"].index(param)
        params[i] = g.init(f"bad.{param}", np.ones(p_shape))
    g.output(g.bn(y, 4, params=params))
    return g.model(infer=False)


_INVALID_OPERANDS = {
    "gemm-b-1d": ("Gemm", [4], "", ()),
    "gemm-b-0d": ("Gemm", [], "", ()),
    "gemm-b-3d": ("Gemm", [4, 4, 4], "", ()),
    "conv-w-2d": ("Conv", [4, 4], "", ()),
    "conv-transpose-w-1d": ("ConvTranspose", [4], "", ()),
    "matmul-w-0d": ("MatMul", [], "", ()),
    "bn-scale-0d": ("Conv", [4, 4, 1, 1], "scale", ()),
    "bn-mean-2d": ("Conv", [4, 4, 1, 1], "mean", (4, 1)),
    "bn-var-0d": ("Conv", [4, 4, 1, 1], "var", ()),
}


@pytest.mark.parametrize("case", list(_INVALID_OPERANDS))
def test_operand_of_a_rank_the_operator_refuses(case, tmp_path, capsys):
    """A Gemm with a 1-D or 0-D B raised IndexError (the command line: internal error, exit 3),
    and a 1-D B folded into a model onnxruntime refuses anyway; a 0-D BatchNorm scale folded.
    Every such operand is now UnsupportedModelError, from fold, analyze and the command line."""
    op, w_shape, param, p_shape = _INVALID_OPERANDS[case]
    model = _with_operand(op, w_shape, param, p_shape)
    with pytest.raises(Exception, match="ONNXRuntimeError"):
        run(model, random_feeds(model))  # the model is invalid indeed
    for call in (bnfold.fold, bnfold.analyze):
        with pytest.raises(bnfold.UnsupportedModelError, match=r"-D, but .* takes") as e:
            call(model)
        assert "\n" not in str(e.value)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main([str(path), "-o", str(tmp_path / "out.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bnfold: error:") and err.count("\n") == 1 and "-D, but" in err, err
    assert not (tmp_path / "out.onnx").exists()


def test_computed_zero_d_batch_norm_parameter_refused():
    """A BatchNorm scale computed as a 0-d constant (not stored, so not checked up front) is
    not taken as one value for every channel: only an Expand over a run-time shape is."""
    model = _with_operand("Conv", [4, 4, 1, 1])
    scale = next(n for n in model.graph.node if n.op_type == "BatchNormalization").input[1]
    value = onnx.numpy_helper.from_array(np.array(1.5, np.float32))
    k = onnx.helper.make_node("Constant", [], ["k"], name="k", value=value)
    square = onnx.helper.make_node("Mul", ["k", "k"], [scale + "_0d"], name="square")
    model.graph.node.insert(0, square)
    model.graph.node.insert(0, k)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.input[1] = scale + "_0d"
    folded, report = bnfold.fold(model, return_report=True)
    entry = report.entry("bn")
    assert entry.rule == rules.VALID_VALUES and "scale has shape []" in entry.reason, entry
    assert len(bn_nodes(folded)) == 1


@pytest.mark.parametrize("op", ["Identity", "Transpose"])
def test_layout_node_without_inputs_before_a_weight_is_refused(op):
    """Transpose/Identity with no input in front of a MatMul weight: IndexError (the CLI's exit
    status 3). Every node bnfold reads is checked against its operator's required inputs."""
    g = Graph(seed=47)
    x = g.input("x", [2, 3])
    wt = g.node(op, [], name="wt")
    g.output(g.node("MatMul", [x, wt], name="mm"), shape=[2, 4])
    model = g.model(infer=False)
    before = model.SerializeToString()
    for call in (bnfold.fold, bnfold.analyze):
        with pytest.raises(bnfold.UnsupportedModelError, match="lacks its required input 0"):
            call(model)
    assert model.SerializeToString() == before


def test_batch_norm_without_output_is_refused():
    g = Graph(seed=48)
    x = g.input("x", [1, 3, 5, 5])
    conv = g.node("Conv", [x, g.weight("w", [3, 3, 3, 3])], name="conv")
    g.bn(conv, 3, outputs=[])
    g.output(conv, shape=[1, 3, 3, 3])
    with pytest.raises(bnfold.UnsupportedModelError, match="has no output"):
        bnfold.fold(g.model(infer=False))


def test_unknown_tensor_type_in_a_model_proto_is_a_bnfold_error():
    """An unused initializer of data_type 99 that is also a graph input: onnx_ir read it lazily
    and fold() raised onnx_ir's SerdeError when writing the result back."""
    g = Graph(seed=49)
    x = g.input("x", [4])
    g.output(g.node("Relu", [x], name="relu"), shape=[4])
    model = g.model(infer=False)
    junk = onnx.numpy_helper.from_array(np.zeros(4, np.float32), "junk")
    junk.data_type = 99
    model.graph.initializer.append(junk)
    model.graph.input.append(onnx.helper.make_tensor_value_info("junk", 1, [4]))
    for call in (bnfold.fold, bnfold.analyze):
        with pytest.raises(bnfold.UnsupportedModelError, match="unknown element type 99") as e:
            call(model)
        assert "\n" not in str(e.value)


def _if_branch_given_by_reference() -> onnx.ModelProto:
    """An If whose then-branch is an attribute reference (``ref_attr_name``), which only a
    node inside a function may have: the model is invalid."""
    c = 3
    outer = Graph(seed=31)
    x = outer.input("x", [1, c, 5, 5])
    cond = outer.input("cond", [], BOOL)
    then = Graph(seed=32, name="then")
    then.output(then.node("Identity", [x], name="identity"), shape=[1, c, 5, 5])
    other = Graph(seed=33, name="else")
    other.output(other.node("Identity", [x], name="identity2"), shape=[1, c, 5, 5])
    out = outer.node("If", [cond], name="if", then_branch=then.graph(), else_branch=other.graph())
    outer.output(out)
    model = outer.model(opset=17)
    attr = next(a for a in model.graph.node[-1].attribute if a.name == "then_branch")
    attr.ref_attr_name = "BatchNormalization"
    return model


def test_a_subgraph_given_by_attribute_reference_outside_a_function_is_refused(tmp_path, capsys):
    model = _if_branch_given_by_reference()
    with pytest.raises(bnfold.UnsupportedModelError, match="not in a function"):
        bnfold.fold(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert main([str(path), "-o", str(tmp_path / "out.onnx")]) == 1
    assert "not in a function" in capsys.readouterr().err
