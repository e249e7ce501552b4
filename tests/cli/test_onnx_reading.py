"""Model files the command line must refuse to read, or read without complaint: a Constant's
external tensor not loaded (whatever the current directory holds), sparse tensors, a named pipe
(refused without blocking), malformed attributes, producers without their weight, external-data
locations that are no file name, layout nodes without inputs; and the libraries' own complaints
while reading (logging, warnings) kept off stderr.

Every command-line run checks the exit status, that an error is one line on stderr, and what is
(or is not) on disk afterwards.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data, load_external_data_for_tensor

import bnfold
from bnfold.cli import main
from tests.helpers.cli import one_line_error
from tests.helpers.cli_models import (
    C,
    bn_inits,
    bn_node,
    conv_bn,
    graph_model,
    save_external,
    vi,
    weight,
)


def _constant_weight_model(seed: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(weight((C, 3, 3, 3), seed), "w_value")
    return graph_model(
        [
            helper.make_node("Constant", [], ["w"], name="w_const", value=w),
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            bn_node("c", "y"),
        ],
        [vi("x", [2, 3, 8, 8])],
        [vi("y", [2, C, 6, 6])],
        bn_inits(C),
    )


def _save_all_external(model: onnx.ModelProto, path) -> None:
    convert_model_to_external_data(
        model,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
        convert_attribute=True,
    )
    onnx.save(model, str(path))


@pytest.mark.parametrize("decoy", [True, False], ids=["decoy-in-cwd", "nothing-in-cwd"])
def test_unloaded_external_constant_is_refused_whatever_the_cwd(tmp_path, monkeypatch, decoy):
    (tmp_path / "model").mkdir()
    (tmp_path / "other").mkdir()
    _save_all_external(_constant_weight_model(seed=1), tmp_path / "model" / "model.onnx")
    if decoy:  # another model's data file of the same (common) name in the current directory
        _save_all_external(_constant_weight_model(seed=2), tmp_path / "other" / "model.onnx")
    proto = onnx.load(str(tmp_path / "model" / "model.onnx"), load_external_data=False)
    for t in proto.graph.initializer:  # the initializers are loaded, the Constant is not
        load_external_data_for_tensor(t, str(tmp_path / "model"))
        t.data_location = TensorProto.DEFAULT
        del t.external_data[:]
    (const,) = [n for n in proto.graph.node if n.op_type == "Constant"]
    assert const.attribute[0].t.data_location == TensorProto.EXTERNAL
    before = proto.SerializeToString()
    monkeypatch.chdir(tmp_path / "other")
    for api in (bnfold.fold, bnfold.analyze):
        with pytest.raises(bnfold.UnsupportedModelError) as excinfo:
            api(proto)
        message = str(excinfo.value)
        assert message and "\n" not in message
        assert "external" in message, message
    assert proto.SerializeToString() == before


def _sparse(name: str, shape) -> onnx.SparseTensorProto:
    values = numpy_helper.from_array(np.array([1.5, 2.5], np.float32), name)
    indices = numpy_helper.from_array(np.array([3, 17], np.int64), "")
    return helper.make_sparse_tensor(values, indices, shape)


def _sparse_initializer_model() -> onnx.ModelProto:
    return graph_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            bn_node("c", "y"),
            helper.make_node("Add", ["y", "sp"], ["z"], name="add"),
        ],
        [vi("x", [2, 3, 8, 8])],
        [vi("z", [2, C, 6, 6])],
        [numpy_helper.from_array(weight((C, 3, 3, 3)), "w"), *bn_inits(C)],
        sparse=[_sparse("sp", [2, C, 6, 6])],
    )


def _sparse_constant_model() -> onnx.ModelProto:
    return graph_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            bn_node("c", "y"),
            helper.make_node(
                "Constant", [], ["sp"], name="sp", sparse_value=_sparse("v", [2, C, 6, 6])
            ),
            helper.make_node("Add", ["y", "sp"], ["z"], name="add"),
        ],
        [vi("x", [2, 3, 8, 8])],
        [vi("z", [2, C, 6, 6])],
        [numpy_helper.from_array(weight((C, 3, 3, 3)), "w"), *bn_inits(C)],
    )


@pytest.mark.parametrize(
    "make", [_sparse_initializer_model, _sparse_constant_model], ids=["initializer", "constant"]
)
def test_sparse_tensors_are_refused(tmp_path, capsys, make):
    model = make()
    onnx.checker.check_model(model)  # valid ONNX
    with pytest.raises(bnfold.UnsupportedModelError) as excinfo:
        bnfold.fold(model)
    assert "\n" not in str(excinfo.value) and "sparse" in str(excinfo.value)

    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()
    assert main([str(path), "-o", str(tmp_path / "out.onnx"), "--verify"]) == 1
    one_line_error(capsys, "sparse")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", ["m.onnx", "m.pt2", "model"])
def test_named_pipe_is_refused_without_blocking(tmp_path, capsys, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(main([str(fifo), "-o", str(tmp_path / "out.onnx")])),
        daemon=True,
    )
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # unblock the reader (an open for writing, then EOF) and fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(timeout=10)
        pytest.fail("bnfold blocked reading a named pipe")
    assert result == [1]
    one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == [name]


def _gemm_bn() -> onnx.ModelProto:
    """x -> Gemm "fc" (w, c) -> BatchNormalization "bn" -> y."""
    return graph_model(
        [helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="fc"), bn_node("g", "y")],
        [vi("x", [2, 5])],
        [vi("y", [2, C])],
        [
            numpy_helper.from_array(weight((5, C)), "w"),
            numpy_helper.from_array(weight((C,), 2), "c"),
            *bn_inits(C),
        ],
    )


def _set_attribute(model: onnx.ModelProto, node: str, attr: onnx.AttributeProto):
    (n,) = [n for n in model.graph.node if n.name == node]
    kept = [a for a in n.attribute if a.name != attr.name]
    del n.attribute[:]
    n.attribute.extend([*kept, attr])
    return model


def _opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    model.opset_import[0].version = version
    return model


_GRAPH = helper.make_graph([], "empty", [], [])


_BAD_ATTRIBUTES = {
    "bn-epsilon-int": (conv_bn, "bn", helper.make_attribute("epsilon", 3)),
    "bn-epsilon-string": (conv_bn, "bn", helper.make_attribute("epsilon", "1e-5")),
    "bn-epsilon-floats": (conv_bn, "bn", helper.make_attribute("epsilon", [1e-5, 1e-3])),
    "bn-epsilon-graph": (conv_bn, "bn", helper.make_attribute("epsilon", _GRAPH)),
    "bn-epsilon-undefined": (conv_bn, "bn", onnx.AttributeProto(name="epsilon", f=0.5)),
    "bn-training_mode-float": (conv_bn, "bn", helper.make_attribute("training_mode", 1.0)),
    "conv-group-ints": (conv_bn, "conv", helper.make_attribute("group", [1])),
    "conv-group-string": (conv_bn, "conv", helper.make_attribute("group", "1")),
    "gemm-transB-float": (_gemm_bn, "fc", helper.make_attribute("transB", 0.0)),
    "gemm-beta-int": (_gemm_bn, "fc", helper.make_attribute("beta", 1)),
    # An attribute referring to a function's attribute has no value outside a function.
    "bn-epsilon-ref": (
        conv_bn,
        "bn",
        onnx.AttributeProto(name="epsilon", ref_attr_name="eps", type=onnx.AttributeProto.FLOAT),
    ),
    "conv-group-ref": (
        conv_bn,
        "conv",
        onnx.AttributeProto(name="group", ref_attr_name="g", type=onnx.AttributeProto.INT),
    ),
}


@pytest.mark.parametrize("case", list(_BAD_ATTRIBUTES))
def test_malformed_attribute_is_one_line_error(tmp_path, capsys, case):
    """onnxruntime refuses such a model; bnfold said 'internal error: TypeError' (exit 3)."""
    make, node, attr = _BAD_ATTRIBUTES[case]
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_set_attribute(_opset(make(), 17), node, attr), str(src))
    assert main([str(src), "-o", str(out), "--report"]) == 1
    one_line_error(capsys, repr(node), repr(attr.name), "invalid")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.parametrize("make", [conv_bn, _gemm_bn], ids=["conv", "gemm"])
@pytest.mark.parametrize("how", ["dropped", "empty-name"])
def test_producer_without_weight_is_one_line_error(tmp_path, capsys, make, how):
    """A Conv or Gemm without its weight input hit an assert in the fold (exit 3)."""
    model = make()
    producer = model.graph.node[0]
    if how == "dropped":
        del producer.input[1:]
    else:
        producer.input[1] = ""
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    assert main([str(src), "-o", str(tmp_path / "out.onnx")]) == 1
    one_line_error(capsys, repr(producer.name), "weight")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.parametrize("byte", [b"\xdc", b"\x00"], ids=["not-utf8", "nul"])
def test_external_location_that_is_no_file_name_is_one_line_error(tmp_path, capsys, byte):
    """An external-data location of bytes that are not UTF-8 (protobuf hands over bytes) or that
    hold a NUL (os.path.realpath raises ValueError) made an internal error."""
    src = tmp_path / "m.onnx"
    save_external(conv_bn(), src)
    data = src.read_bytes()
    assert data.count(b"m.onnx.data") >= 1
    src.write_bytes(data.replace(b"m.onnx.data", b"m.onnx" + byte + b"data"))
    assert main([str(src), "-o", str(tmp_path / "out.onnx")]) == 1
    one_line_error(capsys, "data file", "damaged")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


def _attribute_not_utf8(path) -> None:
    """A Conv with a string attribute whose bytes are not UTF-8 (a custom tag, say)."""
    model = _set_attribute(conv_bn(), "conv", helper.make_attribute("tag", "xyzzy"))
    onnx.save(model, str(path))
    path.write_bytes(path.read_bytes().replace(b"xyzzy", b"xy\xffzy"))


def _unknown_external_key(path) -> None:
    model = conv_bn()
    save_external(model, path)
    saved = onnx.load(str(path), load_external_data=False)
    for t in saved.graph.initializer:
        entry = t.external_data.add()
        entry.key, entry.value = "checksum_v2", "0"
    onnx.save(saved, str(path))


@pytest.mark.parametrize("make", [_attribute_not_utf8, _unknown_external_key])
def test_library_complaints_stay_off_stderr(tmp_path, capsys, caplog, make):
    """onnx_ir logs 'Attribute ... contains invalid UTF-8 bytes' and onnx warns about unknown
    external-data keys while a model is read: on stderr they came before bnfold's one line (or
    on a success). The model is readable, so it folds."""
    import logging
    import warnings

    src = tmp_path / "m.onnx"
    make(src)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        assert main([str(src), "-o", str(tmp_path / "out.onnx")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "1 of 1 BatchNorm folded" in captured.out
    assert not [r for r in caplog.records if r.name.startswith("onnx")], caplog.records
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("op", ["Identity", "Transpose"])
def test_layout_node_without_inputs_is_exit_1(tmp_path, capsys, op):
    """An Identity/Transpose with no input in front of a MatMul weight: IndexError, exit 3."""
    model = graph_model(
        [
            helper.make_node(op, [], ["wt"], name="wt"),
            helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm"),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 4])],
        [],
    )
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    names = sorted(os.listdir(tmp_path))
    assert main([str(src), "-o", str(tmp_path / "out.onnx")]) == 1
    one_line_error(capsys, "lacks its required input 0", op)
    assert sorted(os.listdir(tmp_path)) == names
