"""ONNX traps found in review: external Constant tensors resolved against the current directory,
sparse tensors, over-long file names, named pipes, --verify on models computing in another
precision than their inputs and outputs, the mode of an overwritten output, and output files
that are the input model or its data files.

Every CLI run checks the exit status, that an error is one line on stderr, and what is (or is
not) on disk afterwards.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data, load_external_data_for_tensor

import bnfold
from bnfold.cli import main
from bnfold.onnx import files as onnx_files
from tests.helpers.cli import listing, refused_before_any_work
from tests.helpers.onnx_models import peak_growth

IR_VERSION = 8  # onnxruntime 1.31 reads IR 8..10
C = 8


def _bn_inits(c: int, dtype=np.float32, seed: int = 0) -> list[TensorProto]:
    rng = np.random.default_rng(seed)
    return [
        numpy_helper.from_array((rng.random(c) * 2 + 0.5).astype(dtype), "bn.scale"),
        numpy_helper.from_array(rng.standard_normal(c).astype(dtype), "bn.bias"),
        numpy_helper.from_array(rng.standard_normal(c).astype(dtype), "bn.mean"),
        numpy_helper.from_array((rng.random(c) + 0.5).astype(dtype), "bn.var"),
    ]


def _bn(x: str, y: str) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization", [x, "bn.scale", "bn.bias", "bn.mean", "bn.var"], [y], name="bn"
    )


def _weight(shape, seed: int = 1, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.5).astype(dtype)


def _model(nodes, inputs, outputs, inits, sparse=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits, sparse_initializer=list(sparse))
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION
    )


def _vi(name: str, shape, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _conv_bn(c: int = C, seed: int = 1) -> onnx.ModelProto:
    """x -> Conv (initializer weight "w", > 1 KiB) -> BatchNormalization -> y."""
    return _model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("c", "y")],
        [_vi("x", [2, 3, 8, 8])],
        [_vi("y", [2, c, 6, 6])],
        [numpy_helper.from_array(_weight((c, 3, 3, 3), seed), "w"), *_bn_inits(c)],
    )


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("bnfold: error:"), err
    assert err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    return err


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ---------------------------------------------------------------------------------------------
# 1. A Constant node's external tensor in a ModelProto without its data


def _constant_weight_model(seed: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(_weight((C, 3, 3, 3), seed), "w_value")
    return _model(
        [
            helper.make_node("Constant", [], ["w"], name="w_const", value=w),
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            _bn("c", "y"),
        ],
        [_vi("x", [2, 3, 8, 8])],
        [_vi("y", [2, C, 6, 6])],
        _bn_inits(C),
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


# ---------------------------------------------------------------------------------------------
# 2. Sparse tensors: an initializer and a Constant's sparse_value


def _sparse(name: str, shape) -> onnx.SparseTensorProto:
    values = numpy_helper.from_array(np.array([1.5, 2.5], np.float32), name)
    indices = numpy_helper.from_array(np.array([3, 17], np.int64), "")
    return helper.make_sparse_tensor(values, indices, shape)


def _sparse_initializer_model() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            _bn("c", "y"),
            helper.make_node("Add", ["y", "sp"], ["z"], name="add"),
        ],
        [_vi("x", [2, 3, 8, 8])],
        [_vi("z", [2, C, 6, 6])],
        [numpy_helper.from_array(_weight((C, 3, 3, 3)), "w"), *_bn_inits(C)],
        sparse=[_sparse("sp", [2, C, 6, 6])],
    )


def _sparse_constant_model() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            _bn("c", "y"),
            helper.make_node(
                "Constant", [], ["sp"], name="sp", sparse_value=_sparse("v", [2, C, 6, 6])
            ),
            helper.make_node("Add", ["y", "sp"], ["z"], name="add"),
        ],
        [_vi("x", [2, 3, 8, 8])],
        [_vi("z", [2, C, 6, 6])],
        [numpy_helper.from_array(_weight((C, 3, 3, 3)), "w"), *_bn_inits(C)],
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
    _one_line_error(capsys, "sparse")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# 3. File names too long for the file system


def test_overlong_file_names_are_one_line_errors(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn(), str(src))
    listing = sorted(os.listdir(tmp_path))

    long_input = tmp_path / ("b" * 295 + ".onnx")  # 300 bytes
    assert main([str(long_input), "-o", str(tmp_path / "x.onnx")]) == 1
    _one_line_error(capsys)
    long_output = tmp_path / ("a" * 255 + ".onnx")  # 260 bytes
    assert main([str(src), "-o", str(long_output)]) == 1
    _one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == listing

    # 240 bytes fits, and so must the temporary names bnfold writes first
    ok = tmp_path / ("d" * 235 + ".onnx")
    assert len(ok.name) == 240
    assert main([str(src), "-o", str(ok)]) == 0
    assert capsys.readouterr().err == ""
    assert sorted(os.listdir(tmp_path)) == sorted([*listing, ok.name])
    assert onnx_files.check(src, onnx_files.load(ok).model).passed


# ---------------------------------------------------------------------------------------------
# 4. A named pipe as the model


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
    _one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == [name]


# ---------------------------------------------------------------------------------------------
# 5. --verify on models computing in a lower precision than their inputs and outputs


def _cast_edges_model(inner: int, outer: int) -> onnx.ModelProto:
    """x (outer) -> Cast(inner) -> Conv -> BN -> Relu -> Conv -> BN -> Cast(outer) -> y."""
    np_inner = helper.tensor_dtype_to_np_dtype(inner)
    c = 16
    rng = np.random.default_rng(1)
    stats = [
        numpy_helper.from_array((rng.random(c) * 4 + 0.5).astype(np_inner), "s"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np_inner), "b"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np_inner), "mu"),
        numpy_helper.from_array((rng.random(c) * 0.2 + 0.01).astype(np_inner), "var"),
    ]
    weights = [
        numpy_helper.from_array(_weight((c, 3, 3, 3), 1, np_inner), "w"),
        numpy_helper.from_array((_weight((c, c, 3, 3), 4) * 0.3).astype(np_inner), "w2"),
    ]
    bn_in = ["s", "b", "mu", "var"]
    return _model(
        [
            helper.make_node("Cast", ["x"], ["xh"], name="cast_in", to=inner),
            helper.make_node("Conv", ["xh", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c1", *bn_in], ["y1"], name="bn1"),
            helper.make_node("Relu", ["y1"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c2", *bn_in], ["y2"], name="bn2"),
            helper.make_node("Cast", ["y2"], ["y"], name="cast_out", to=outer),
        ],
        [_vi("x", [2, 3, 16, 16], outer)],
        [_vi("y", [2, c, 16, 16], outer)],
        weights + stats,
    )


@pytest.mark.parametrize(
    "inner, outer",
    [(TensorProto.FLOAT16, TensorProto.FLOAT), (TensorProto.FLOAT, TensorProto.DOUBLE)],
    ids=["fp16-inside-fp32-io", "fp32-inside-fp64-io"],
)
def test_verify_tolerance_follows_the_weights_precision(tmp_path, capsys, inner, outer):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_cast_edges_model(inner, outer), str(src))
    assert main([str(src), "-o", str(out), "--verify"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "verified in onnxruntime" in captured.out
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "out.onnx"]
    folded = onnx.load(str(out))
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]

    # A wrong fold (one folded weight 10% off) is still caught.
    (conv2,) = [n for n in folded.graph.node if n.name == "conv2"]
    for t in folded.graph.initializer:
        if t.name == conv2.input[1]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.1, t.name))
    wrong = onnx_files.check(src, ir.serde.deserialize_model(folded))
    assert not wrong.passed, wrong.summary()
    right = onnx_files.check(src, onnx_files.load(out).model)
    assert right.passed, right.summary()


# ---------------------------------------------------------------------------------------------
# 6. The mode of the written files


def _save_external(model: onnx.ModelProto, path) -> None:
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        location=os.path.basename(path) + ".data",
        size_threshold=0,
    )


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_overwritten_output_keeps_its_mode_and_new_output_gets_umask(tmp_path, capsys, external):
    src = tmp_path / "m.onnx"
    if external:
        _save_external(_conv_bn(c=16), src)  # a weight over 1 KiB: a data file is written
    else:
        onnx.save(_conv_bn(), str(src))
    out = tmp_path / "out.onnx"
    existing = [out, tmp_path / "out.onnx.data"] if external else [out]
    for path in existing:
        path.write_bytes(b"old")
        os.chmod(path, 0o600)
    assert main([str(src), "-o", str(out)]) == 0
    for path in existing:
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert path.read_bytes() != b"old"
    assert onnx_files.check(src, onnx_files.load(out).model).passed

    new = tmp_path / "new.onnx"
    assert main([str(src), "-o", str(new)]) == 0
    created = [new, tmp_path / "new.onnx.data"] if external else [new]
    expected_files = sorted(p.name for p in [src, *existing, *created])
    if external:
        expected_files = sorted([*expected_files, "m.onnx.data"])
    assert sorted(os.listdir(tmp_path)) == expected_files
    for path in created:
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), path
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# 7. Files the fuzzer (tests/fuzz/files.py) made bnfold fail on with an internal error, too much
#    memory or more than one line of stderr


def _gemm_bn() -> onnx.ModelProto:
    """x -> Gemm "fc" (w, c) -> BatchNormalization "bn" -> y."""
    return _model(
        [helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="fc"), _bn("g", "y")],
        [_vi("x", [2, 5])],
        [_vi("y", [2, C])],
        [
            numpy_helper.from_array(_weight((5, C)), "w"),
            numpy_helper.from_array(_weight((C,), 2), "c"),
            *_bn_inits(C),
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
    "bn-epsilon-int": (_conv_bn, "bn", helper.make_attribute("epsilon", 3)),
    "bn-epsilon-string": (_conv_bn, "bn", helper.make_attribute("epsilon", "1e-5")),
    "bn-epsilon-floats": (_conv_bn, "bn", helper.make_attribute("epsilon", [1e-5, 1e-3])),
    "bn-epsilon-graph": (_conv_bn, "bn", helper.make_attribute("epsilon", _GRAPH)),
    "bn-epsilon-undefined": (_conv_bn, "bn", onnx.AttributeProto(name="epsilon", f=0.5)),
    "bn-training_mode-float": (_conv_bn, "bn", helper.make_attribute("training_mode", 1.0)),
    "conv-group-ints": (_conv_bn, "conv", helper.make_attribute("group", [1])),
    "conv-group-string": (_conv_bn, "conv", helper.make_attribute("group", "1")),
    "gemm-transB-float": (_gemm_bn, "fc", helper.make_attribute("transB", 0.0)),
    "gemm-beta-int": (_gemm_bn, "fc", helper.make_attribute("beta", 1)),
    # An attribute referring to a function's attribute has no value outside a function.
    "bn-epsilon-ref": (
        _conv_bn,
        "bn",
        onnx.AttributeProto(name="epsilon", ref_attr_name="eps", type=onnx.AttributeProto.FLOAT),
    ),
    "conv-group-ref": (
        _conv_bn,
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
    _one_line_error(capsys, repr(node), repr(attr.name), "invalid")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.parametrize("make", [_conv_bn, _gemm_bn], ids=["conv", "gemm"])
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
    _one_line_error(capsys, repr(producer.name), "weight")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.parametrize("byte", [b"\xdc", b"\x00"], ids=["not-utf8", "nul"])
def test_external_location_that_is_no_file_name_is_one_line_error(tmp_path, capsys, byte):
    """An external-data location of bytes that are not UTF-8 (protobuf hands over bytes) or that
    hold a NUL (os.path.realpath raises ValueError) made an internal error."""
    src = tmp_path / "m.onnx"
    _save_external(_conv_bn(), src)
    data = src.read_bytes()
    assert data.count(b"m.onnx.data") >= 1
    src.write_bytes(data.replace(b"m.onnx.data", b"m.onnx" + byte + b"data"))
    assert main([str(src), "-o", str(tmp_path / "out.onnx")]) == 1
    _one_line_error(capsys, "data file", "damaged")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


def test_verify_refuses_inputs_too_large_to_check(tmp_path, capsys):
    """An input declared [2, 3, 4096, 4096] (384 MiB of float32): --verify made it through a
    float64 array twice that size (up to 4 GiB was allowed; +3 GiB and 9 s, or MemoryError)."""
    model = _conv_bn()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 4096
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 4096
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 4094
    model.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 4094
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    status, growth = peak_growth(
        lambda: main([str(src), "-o", str(tmp_path / "o.onnx"), "--verify"])
    )
    assert status == 1
    _one_line_error(capsys, "'x'", "too large to verify", "without --verify")
    assert growth < 64 * 2**20, f"{growth / 2**20:.0f} MiB"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_random_inputs_are_made_in_their_own_dtype():
    """No float64 draw first: a float16 input cost five times its size."""
    import tracemalloc

    inputs = [
        _vi("h", [4, 2048, 1024], TensorProto.FLOAT16),
        _vi("i", [4, 2048, 1024], TensorProto.INT8),
        _vi("b", [4, 2048, 1024], TensorProto.BOOL),
    ]
    model = _model([], inputs, inputs, [])
    tracemalloc.start()
    try:
        arrays = onnx_files.sample_inputs(ir.serde.deserialize_model(model))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    total = sum(a.nbytes for a in arrays.values())
    assert total == 4 * 2**23
    assert peak < total + 8 * 2**20, f"{peak / 2**20:.0f} MiB for {total / 2**20:.0f} MiB"
    assert {k: a.dtype.name for k, a in arrays.items()} == {
        "h": "float16",
        "i": "int8",
        "b": "bool",
    }
    h = arrays["h"].astype(np.float32)
    assert abs(float(h.mean())) < 0.01 and abs(float(h.std()) - 1) < 0.01


def test_running_out_of_memory_in_verify_is_one_line_error(tmp_path, capsys, monkeypatch):
    """A MemoryError while the models run or are compared was an internal error (exit 3)."""
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn(), str(src))

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(onnx_files, "_run", no_memory)
    assert main([str(src), "-o", str(tmp_path / "out.onnx"), "--verify"]) == 1
    _one_line_error(capsys, "out of memory", "without --verify")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def _attribute_not_utf8(path) -> None:
    """A Conv with a string attribute whose bytes are not UTF-8 (a custom tag, say)."""
    model = _set_attribute(_conv_bn(), "conv", helper.make_attribute("tag", "xyzzy"))
    onnx.save(model, str(path))
    path.write_bytes(path.read_bytes().replace(b"xyzzy", b"xy\xffzy"))


def _unknown_external_key(path) -> None:
    model = _conv_bn()
    _save_external(model, path)
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


# ---------------------------------------------------------------------------------------------
# 8. Output files that are the input model or its data files


def _save_data_in(model: onnx.ModelProto, path, location: str) -> None:
    """Save ``model`` at ``path`` with every tensor in the data file ``location``."""
    onnx.save(model, str(path), save_as_external_data=True, location=location, size_threshold=0)


@pytest.mark.parametrize("how", ["named", "symlink", "hardlink"])
def test_output_data_file_that_is_the_input_model_is_refused(tmp_path, capsys, how):
    """`bnfold m.onnx.data -o m.onnx` (the weights in w.bin) wrote the output's data file over
    the input model; a link to the input under the data file's name is the same file."""
    if how == "named":
        src, out = tmp_path / "m.onnx.data", tmp_path / "m.onnx"
    else:
        src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    _save_data_in(_conv_bn(), src, "w.bin")
    if how == "symlink":
        (tmp_path / "out.onnx.data").symlink_to(src.name)
    elif how == "hardlink":
        os.link(src, tmp_path / "out.onnx.data")
    before = listing(tmp_path)
    assert main([str(src), "-o", str(out)]) == 1
    refused_before_any_work(capsys, "it is the input model")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("how", ["named", "symlink"])
def test_output_that_is_an_input_data_file_is_refused_before_any_work(tmp_path, capsys, how):
    src = tmp_path / "m.onnx"
    _save_data_in(_conv_bn(), src, "w.bin")
    out = tmp_path / "w.bin"
    if how == "symlink":
        out = tmp_path / "link.onnx"
        out.symlink_to("w.bin")
    before = listing(tmp_path)
    assert main([str(src), "-o", str(out)]) == 1
    refused_before_any_work(capsys, "weights are stored in that file")
    assert listing(tmp_path) == before


def test_output_whose_data_file_is_an_input_data_file_is_refused_before_any_work(tmp_path, capsys):
    src = tmp_path / "a.onnx"
    _save_data_in(_conv_bn(), src, "b.onnx.data")
    before = listing(tmp_path)
    assert main([str(src), "-o", str(tmp_path / "b.onnx"), "--verify"]) == 1
    refused_before_any_work(capsys, "reads its weights from that file")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink-to-fifo"])
def test_output_data_file_that_is_not_a_regular_file_is_refused(tmp_path, capsys, kind):
    src = tmp_path / "m.onnx"
    _save_external(_conv_bn(), src)
    data = tmp_path / "out.onnx.data"
    if kind == "directory":
        data.mkdir()
    elif kind == "fifo":
        os.mkfifo(data)
    else:
        os.mkfifo(tmp_path / "pipe")
        data.symlink_to("pipe")
    before = listing(tmp_path)
    assert main([str(src), "-o", str(tmp_path / "out.onnx")]) == 1
    refused_before_any_work(capsys, "the model's data file")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("how", ["named", "symlink"])
def test_writing_over_the_input_itself_stays_allowed(tmp_path, capsys, how):
    """-o naming the input (or a link to it) is an in-place write, whatever the input's name;
    the input's data file w.bin is left as it was."""
    original = tmp_path / "original"
    original.mkdir()
    _save_data_in(_conv_bn(), original / "m.onnx.data", "w.bin")
    src = tmp_path / "m.onnx.data"
    _save_data_in(_conv_bn(), src, "w.bin")
    weights = (tmp_path / "w.bin").read_bytes()
    out = src
    if how == "symlink":
        out = tmp_path / "link.onnx"
        out.symlink_to(src.name)
    assert main([str(src), "-o", str(out)]) == 0
    assert "1 of 1 BatchNorm folded" in capsys.readouterr().out
    assert (tmp_path / "w.bin").read_bytes() == weights
    folded = onnx_files.load(src)
    assert not [n for n in folded.model.graph if n.op_type == "BatchNormalization"]
    assert onnx_files.check(original / "m.onnx.data", folded.model).passed


def test_save_refuses_a_data_file_that_is_the_input_model(tmp_path):
    """The library's save checks what the command line checks before the fold."""
    src = tmp_path / "m.onnx.data"
    _save_data_in(_conv_bn(), src, "w.bin")
    loaded = onnx_files.load(src)
    before = listing(tmp_path)
    with pytest.raises(bnfold.ModelFileError, match="it is the input model"):
        onnx_files.save(
            loaded.model, tmp_path / "m.onnx", external_data=True, reads_from=loaded.external_files
        )
    assert listing(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Malformed nodes, --verify's limits, long data file names


@pytest.mark.parametrize("op", ["Identity", "Transpose"])
def test_layout_node_without_inputs_is_exit_1(tmp_path, capsys, op):
    """An Identity/Transpose with no input in front of a MatMul weight: IndexError, exit 3."""
    model = _model(
        [
            helper.make_node(op, [], ["wt"], name="wt"),
            helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm"),
        ],
        [_vi("x", [2, 3])],
        [_vi("y", [2, 4])],
        [],
    )
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    listing = sorted(os.listdir(tmp_path))
    assert main([str(src), "-o", str(tmp_path / "out.onnx")]) == 1
    _one_line_error(capsys, "lacks its required input 0", op)
    assert sorted(os.listdir(tmp_path)) == listing


def _loop_forever() -> onnx.ModelProto:
    """255 bytes: a Loop of 2**62 iterations doubling a value."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("Add", ["v_in", "v_in"], ["v_out"]),
        ],
        "body",
        [_vi("i", [], TensorProto.INT64), _vi("c_in", [], TensorProto.BOOL), _vi("v_in", [1])],
        [_vi("c_out", [], TensorProto.BOOL), _vi("v_out", [1])],
    )
    return _model(
        [helper.make_node("Loop", ["n", "t", "x"], ["y"], body=body)],
        [_vi("x", [1])],
        [_vi("y", [1])],
        [
            numpy_helper.from_array(np.array(2**62, np.int64), "n"),
            numpy_helper.from_array(np.array(True), "t"),
        ],
    )


def _expand_to(n: int) -> onnx.ModelProto:
    """Expand a 1-element input to ``n`` elements, then ReduceSum: ~120 bytes asking for 4n."""
    return _model(
        [
            helper.make_node("Expand", ["x", "shape"], ["e"]),
            helper.make_node("ReduceSum", ["e"], ["y"], keepdims=0),
        ],
        [_vi("x", [1])],
        [_vi("y", [])],
        [numpy_helper.from_array(np.array([n], np.int64), "shape")],
    )


def test_verify_stops_a_run_past_the_time_limit(tmp_path, capsys, monkeypatch):
    """--verify ran a Loop of 2**62 iterations for ever; now each run is stopped after
    VERIFY_TIME_LIMIT seconds (onnxruntime's terminate flag), one line, exit 1."""
    import time

    monkeypatch.setattr(onnx_files, "VERIFY_TIME_LIMIT", 1.0)
    src = tmp_path / "loop.onnx"
    onnx.save(_loop_forever(), str(src))
    start = time.monotonic()
    assert main([str(src), "--verify", "-o", str(tmp_path / "out.onnx")]) == 1
    assert time.monotonic() - start < 30
    _one_line_error(capsys, "cannot verify", "1 s", "time limit")
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(bnfold.VerificationError, match="cannot verify"):
        bnfold.verify(_loop_forever(), _loop_forever(), None)


def test_verify_stops_a_run_past_the_memory_limit(tmp_path, capsys, monkeypatch):
    """A 121-byte model expanding to 2**29 floats took 2.3 GB in --verify. Intermediate values
    come from an arena of at most VERIFY_MEMORY_LIMIT bytes: one line, exit 1 (here 64 MiB and
    a 128 MiB Expand, so that the test is cheap even if the cap did not hold)."""
    monkeypatch.setattr(onnx_files, "VERIFY_MEMORY_LIMIT", 64 * 2**20)
    src = tmp_path / "big.onnx"
    onnx.save(_expand_to(2**25), str(src))
    assert main([str(src), "--verify"]) == 1
    err = _one_line_error(capsys, "cannot verify", "memory limit", "0.0625 GiB")
    assert "bnfold bug" not in err
    # within the limit the same kind of model verifies
    onnx.save(_expand_to(2**20), str(src))
    assert main([str(src), "--verify"]) == 0


def test_folded_model_failing_when_nothing_was_folded_is_not_called_a_bnfold_bug():
    """'onnxruntime runs the original model but not the folded one ... bnfold bug' was said
    when no BatchNorm had been folded (the two models the same)."""
    model = onnx_files.as_ir_model(_conv_bn())
    folded = bnfold.fold(model)
    error = RuntimeError("out of something")
    same = onnx_files._folded_failed(model, model, error)
    assert str(same).startswith("cannot verify") and "bug" not in str(same)
    assert "folded no BatchNorm" in str(same)
    assert "bnfold bug" in str(onnx_files._folded_failed(model, folded, error))


def test_long_output_name_with_external_data_fits(tmp_path, capsys):
    """-o of 245 characters with external data: OUT.data (250) fits NAME_MAX, but onnx_ir's
    temporary name for it (a dot, the name, a dot and 8 characters) did not."""
    src = tmp_path / "m.onnx"
    _save_external(_conv_bn(c=16), src)  # the weight, 1728 bytes, goes to the data file
    out = tmp_path / ("e" * 240 + ".onnx")
    assert main([str(src), "-o", str(out), "--verify"]) == 0
    assert capsys.readouterr().err == ""
    data = out.with_name(out.name + ".data")
    assert data.stat().st_size > 1024
    assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", "m.onnx.data", out.name, data.name])
    assert onnx_files.check(src, onnx_files.load(out).model).passed
