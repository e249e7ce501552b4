"""ONNX model files: reading (and refusing damaged files), atomic writing, random inputs and
onnxruntime checks (`bnfold.onnx.files`), onnx_ir models with memory-mapped external data, and
``--verify`` / ``bnfold.verify`` refusing inputs too large to make.

Every refusal is checked to be a one-line :class:`ModelFileError`; every failed write to leave
the directory exactly as it was.
"""

from __future__ import annotations

import gc
import os
import resource

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli import main
from bnfold.core.compare import DISCRETE_MISMATCH_TOLERANCE, CheckResult, array_error
from bnfold.errors import (
    InvalidArgumentError,
    ModelFileError,
    UnsupportedModelError,
    VerificationError,
)
from bnfold.onnx import files as onnx_files
from bnfold.onnx import run as onnx_run
from tests.helpers.cli import listing
from tests.helpers.onnx_models import Graph, conv_model, initializer, run

IR_VERSION = 10  # onnx 1.23 writes IR 14 by default, newer than onnxruntime 1.31 reads


def _conv_model(
    channels: int = 16,
    seed: int = 0,
    kernel: int = 3,
    ir_version: int = IR_VERSION,
    opset: int = 17,
    x_shape: tuple = ("N", 3, "H", "W"),
) -> onnx.ModelProto:
    """Conv (random weights, weight > 1 KiB) + Relu, with a symbolic batch and image size."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, 3, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def _write(model: onnx.ModelProto, path, external: bool = False) -> str:
    path = str(path)
    if external:
        onnx.save(
            model,
            path,
            save_as_external_data=True,
            location=os.path.basename(path) + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save(model, path)
    return path


def _assert_one_line_error(excinfo, *words: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_inline(tmp_path):
    src = _write(_conv_model(), tmp_path / "in.onnx")
    loaded = onnx_files.load(src)
    assert loaded.external_files == frozenset()
    assert loaded.path == tmp_path / "in.onnx"
    assert not onnx_files.needs_external_data(loaded)
    out = tmp_path / "out.onnx"
    assert onnx_files.output_files(out, False) == [out]
    onnx_files.save(loaded.model, out, external_data=False)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(src, {"x": x})[0], run(out, {"x": x})[0])
    assert onnx_files.load(out).external_files == frozenset()


def test_round_trip_external_data(tmp_path):
    src = _write(_conv_model(), tmp_path / "in.onnx")
    loaded = onnx_files.load(src)
    out = tmp_path / "out.onnx"
    data = tmp_path / "out.onnx.data"
    assert onnx_files.output_files(out, True) == [out, data]
    onnx_files.save(loaded.model, out, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx", "out.onnx.data"]
    assert data.stat().st_size == 16 * 3 * 3 * 3 * 4  # only w is above 1 KiB
    umask = os.umask(0)
    os.umask(umask)
    assert data.stat().st_mode & 0o777 == out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert out.stat().st_size < 1024
    proto = onnx.load(str(out), load_external_data=False)
    (w,) = [t for t in proto.graph.initializer if t.name == "w"]
    assert {e.key: e.value for e in w.external_data}["location"] == "out.onnx.data"
    again = onnx_files.load(out)
    assert again.external_files == frozenset({data.resolve()})
    assert onnx_files.needs_external_data(again)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(src, {"x": x})[0], run(out, {"x": x})[0])
    # and back to one self-contained file
    inline = tmp_path / "inline.onnx"
    onnx_files.save(again.model, inline, external_data=False)
    assert onnx_files.load(inline).external_files == frozenset()
    np.testing.assert_array_equal(run(src, {"x": x})[0], run(inline, {"x": x})[0])


def test_external_data_loaded_from_another_directory_and_relative_path(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    _write(_conv_model(), tmp_path / "models" / "m.onnx", external=True)
    monkeypatch.chdir(tmp_path / "models")
    loaded = onnx_files.load("m.onnx")
    monkeypatch.chdir(tmp_path)  # external tensors keep finding their data
    result = onnx_files.check(loaded.model, loaded.model)
    assert result.passed and result.max_abs == 0.0


def test_external_attribute_tensors_are_written_where_the_output_is(tmp_path):
    """A Constant's value stored externally (onnx can do that) is carried into the output."""
    model = _conv_model(x_shape=("N", 3, 6, 6))
    bias = np.linspace(-1, 1, 16 * 4 * 4, dtype=np.float32).reshape(1, 16, 4, 4)
    model.graph.node.append(
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(bias, "k"))
    )
    model.graph.node.append(helper.make_node("Add", ["y", "k"], ["z"]))
    model.graph.output[0].name = "z"
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    onnx.save(
        model,
        str(tmp_path / "in" / "m.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
        convert_attribute=True,
    )
    loaded = onnx_files.load(tmp_path / "in" / "m.onnx")
    assert loaded.external_files == frozenset({(tmp_path / "in" / "weights.bin").resolve()})
    for external in (False, True):
        out = tmp_path / "out" / f"m{int(external)}.onnx"
        onnx_files.save(loaded.model, out, external_data=external)
        assert onnx_files.check(tmp_path / "in" / "m.onnx", onnx_files.load(out).model).passed
    assert sorted(os.listdir(tmp_path / "in")) == ["m.onnx", "weights.bin"]
    x = np.ones((2, 3, 6, 6), np.float32)
    np.testing.assert_array_equal(
        run(tmp_path / "in" / "m.onnx", {"x": x})[0],
        run(tmp_path / "out" / "m0.onnx", {"x": x})[0],
    )


def test_too_large_for_protobuf_switches_to_external_data(tmp_path, monkeypatch):
    loaded = onnx_files.load(_write(_conv_model(), tmp_path / "in.onnx"))
    monkeypatch.setattr(onnx_files, "MAX_INLINE_BYTES", 1000)
    assert onnx_files.needs_external_data(loaded)
    onnx_files.save(loaded.model, tmp_path / "out.onnx", external_data=False)
    assert (tmp_path / "out.onnx.data").stat().st_size > 1024


def test_load_does_not_read_external_tensors(tmp_path):
    """A 1 GiB weight (a sparse file: nothing on disk) is neither read nor mapped by load."""
    model = _conv_model()
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[2**28])
    big.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(2**30))):
        big.external_data.add(key=key, value=value)
    model.graph.initializer.append(big)
    path = _write(model, tmp_path / "m.onnx")
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(2**30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded = onnx_files.load(path)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 * 1024
    tensor = loaded.model.graph.initializers["big"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    assert tensor.raw is None  # not even memory-mapped yet
    assert tensor.nbytes == 2**30
    assert loaded.external_files == frozenset({(tmp_path / "big.bin").resolve()})
    assert onnx_files.needs_external_data(loaded)


# ---------------------------------------------------------------------------------------------
# Refusals


def _refused(path, *words: str) -> str:
    with pytest.raises(ModelFileError) as excinfo:
        onnx_files.load(path)
    return _assert_one_line_error(excinfo, *words)


def test_refuses_missing_directory_and_empty(tmp_path):
    _refused(tmp_path / "nope.onnx", "no such file")
    _refused(tmp_path, "directory")
    (tmp_path / "empty.onnx").write_bytes(b"")
    _refused(tmp_path / "empty.onnx", "empty")


@pytest.mark.parametrize("seed", range(8))
def test_refuses_random_bytes(tmp_path, seed):
    path = tmp_path / "junk.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(64 + 200 * seed))
    _refused(path)


def test_refuses_other_protobuf_messages(tmp_path):
    path = tmp_path / "tensor.onnx"
    path.write_bytes(numpy_helper.from_array(np.ones(4, np.float32), "t").SerializeToString())
    _refused(path)
    path.write_bytes(_conv_model().graph.SerializeToString())  # a graph without its model
    _refused(path)
    path.write_bytes(helper.make_opsetid("", 17).SerializeToString())
    _refused(path, "no graph")


def test_refuses_every_truncation(tmp_path):
    """Cut at every offset, inline weights or external: each cut is refused in one line."""
    _write(_conv_model(), tmp_path / "ext.onnx", external=True)
    contents = [
        _conv_model(channels=2).SerializeToString(),
        (tmp_path / "ext.onnx").read_bytes(),
    ]
    path = tmp_path / "cut.onnx"
    for content in contents:
        for length in range(len(content)):
            path.write_bytes(content[:length])
            with pytest.raises(ModelFileError) as excinfo:
                onnx_files.load(path)
            assert "\n" not in str(excinfo.value)


def test_refuses_structural_damage(tmp_path):
    path = tmp_path / "m.onnx"
    model = _conv_model()
    model.ir_version = 2
    _refused(_write(model, path), "IR version")
    model = _conv_model()
    del model.opset_import[:]
    _refused(_write(model, path), "opset", "truncated")
    model = _conv_model()
    del model.graph.initializer[0]  # w
    _refused(_write(model, path), "'conv'", "'w'", "truncated")
    model = _conv_model()
    model.graph.output[0].name = "nowhere"
    _refused(_write(model, path), "'nowhere'")


def test_subgraphs_see_outer_scope_but_not_undefined_names(tmp_path):
    def model_with_branch(name: str) -> onnx.ModelProto:
        model = _conv_model()
        branch = helper.make_graph(
            [helper.make_node("Identity", [name], ["z"])],
            "branch",
            [],
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        )
        cond = numpy_helper.from_array(np.array(True), "cond")
        model.graph.initializer.append(cond)
        model.graph.node.append(
            helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch)
        )
        model.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, None))
        return model

    onnx_files.load(_write(model_with_branch("y"), tmp_path / "ok.onnx"))
    _refused(_write(model_with_branch("ghost"), tmp_path / "bad.onnx"), "'ghost'")


def _with_tensor(tmp_path, tensor: TensorProto) -> str:
    model = _conv_model()
    model.graph.initializer.append(tensor)
    return _write(model, tmp_path / "m.onnx")


def _external(name: str, dims: list[int], location: str, length: int | None = None, offset=0):
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="offset", value=str(offset))
    if length is not None:
        tensor.external_data.add(key="length", value=str(length))
    return tensor


def test_refuses_inline_data_that_does_not_fit_the_shape(tmp_path):
    absurd = TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[2**40, 2**40])
    absurd.raw_data = b"\0" * 16  # a header promising 4 * 2**80 bytes: refused, not allocated
    _refused(_with_tensor(tmp_path, absurd), "'t'", "truncated")
    short = numpy_helper.from_array(np.ones((4, 4), np.float32), "t")
    short.raw_data = short.raw_data[:-4]
    _refused(_with_tensor(tmp_path, short), "60 bytes", "64")
    typed = helper.make_tensor("t", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    del typed.float_data[-1]
    _refused(_with_tensor(tmp_path, typed), "2 values")
    negative = TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[-1])
    _refused(_with_tensor(tmp_path, negative), "negative")
    unknown = TensorProto(name="t", data_type=999, dims=[1], raw_data=b"\0")
    _refused(_with_tensor(tmp_path, unknown), "element type 999")
    # and the same checks inside a Constant node's attribute
    model = _conv_model()
    model.graph.node.append(
        helper.make_node("Constant", [], ["k"], value=TensorProto(name="k", dims=[5], data_type=1))
    )
    _refused(_write(model, tmp_path / "c.onnx"), "Constant node", "0 values")


def test_refuses_bad_external_data(tmp_path):
    (tmp_path / "t.bin").write_bytes(b"\0" * 64)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.bin"
    outside.write_bytes(b"\0" * 64)
    cases = [
        (_external("t", [4], "/etc/passwd"), "absolute"),
        (_external("t", [4], "../x.bin"), "outside the model's directory"),
        (_external("t", [4], "sub/../../x.bin"), "outside the model's directory"),
        (_external("t", [4], "missing.bin"), "does not exist"),
        (_external("t", [32], "t.bin"), "holds only 64"),  # short data file
        (_external("t", [4], "t.bin", offset=56), "truncated"),
        (_external("t", [4], "t.bin", length=12), "needs 16"),
        (_external("t", [2**40, 2**40], "t.bin", length=2**82), "holds only 64"),
        (_external("t", [4], "t.bin", offset=-8), "negative external data offset -8"),
    ]
    for tensor, words in cases:
        _refused(_with_tensor(tmp_path, tensor), "'t'", words)
    bad_offset = _external("t", [4], "t.bin")
    bad_offset.external_data[1].value = "zero"
    _refused(_with_tensor(tmp_path, bad_offset), "not a number")
    os.symlink(outside, tmp_path / "link.bin")
    _refused(_with_tensor(tmp_path, _external("t", [4], "link.bin")), "symbolic link")
    # a symbolic link inside the directory is fine
    os.symlink(tmp_path / "t.bin", tmp_path / "inside.bin")
    loaded = onnx_files.load(_with_tensor(tmp_path, _external("t", [4], "inside.bin")))
    assert loaded.external_files == frozenset({(tmp_path / "t.bin").resolve()})


def test_external_data_path_resolved_as_the_os_does(tmp_path):
    """``d/up/../x.bin`` with ``d/up -> ..``: the OS follows the link before the ``..`` and
    opens a file outside the model's directory, while the collapsed path ``d/x.bin`` is inside;
    bnfold checked the collapsed one, passed, and failed later ("cannot write"). Refused up
    front now, and a link that stays inside reads the file the OS opens."""
    model_dir = tmp_path / "m"
    (model_dir / "d").mkdir(parents=True)
    (model_dir / "d" / "x.bin").write_bytes(b"\0" * 64)  # what the collapsed path names
    (tmp_path / "x.bin").write_bytes(b"\0" * 64)  # what the OS opens
    os.symlink("..", model_dir / "d" / "up")
    path = _with_tensor(model_dir, _external("t", [4], "d/up/../x.bin"))
    message = _refused(path, "'t'", "d/up/../x.bin", "symbolic link", "outside")
    assert str(tmp_path / "x.bin") in message
    # d/self -> . keeps "d/self/../x.bin" inside: it is m/x.bin, not the collapsed m/d/x.bin
    os.symlink(".", model_dir / "d" / "self")
    (model_dir / "x.bin").write_bytes(b"\0" * 64)
    loaded = onnx_files.load(_with_tensor(model_dir, _external("t", [4], "d/self/../x.bin")))
    assert loaded.external_files == frozenset({(model_dir / "x.bin").resolve()})


def test_refuses_sparse_initializers(tmp_path):
    model = _conv_model()
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(2, np.float32), "s"),
        numpy_helper.from_array(np.array([0, 3], np.int64), "s_idx"),
        [4],
    )
    model.graph.sparse_initializer.append(sparse)
    with pytest.raises(UnsupportedModelError) as excinfo:
        onnx_files.load(_write(model, tmp_path / "m.onnx"))
    _assert_one_line_error(excinfo, "sparse")


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _fail_at(monkeypatch, point: str, tmp_path) -> None:
    """Make save fail at ``point``."""

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    if point == "serialize":
        monkeypatch.setattr(ir.serde, "serialize_model", boom)
    elif point == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: boom())
    elif point in ("replace-data", "replace-model"):
        real_replace = os.replace
        name = "out.onnx.data" if point == "replace-data" else "out.onnx"

        def replace(src, dst, **kwargs):
            if os.fspath(dst) == os.fspath(tmp_path / name):
                raise OSError(28, "No space left on device")
            return real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize(
    "point, external",
    [
        ("serialize", False),
        ("serialize", True),
        ("fsync", False),
        ("fsync", True),
        ("replace-data", True),
        ("replace-model", False),
        ("replace-model", True),  # after the data file was replaced: it is put back
    ],
)
def test_failed_save_leaves_directory_as_it_was(tmp_path, monkeypatch, point, external, existing):
    src = _write(_conv_model(seed=1), tmp_path / "in.onnx", external=True)
    loaded = onnx_files.load(src)
    if existing:
        _write(_conv_model(seed=2), tmp_path / "out.onnx", external=True)
    before = listing(tmp_path)
    _fail_at(monkeypatch, point, tmp_path)
    with pytest.raises((ModelFileError, RuntimeError)) as excinfo:
        onnx_files.save(loaded.model, tmp_path / "out.onnx", external_data=external)
    monkeypatch.undo()
    assert "\n" not in str(excinfo.value)
    assert listing(tmp_path) == before
    if existing:  # the old output still loads and runs
        old = onnx_files.load(tmp_path / "out.onnx")
        assert onnx_files.check(tmp_path / "out.onnx", old.model).passed


def test_cannot_write_into_missing_directory(tmp_path):
    loaded = onnx_files.load(_write(_conv_model(), tmp_path / "in.onnx"))
    with pytest.raises(ModelFileError) as excinfo:
        onnx_files.save(loaded.model, tmp_path / "no" / "out.onnx", external_data=True)
    _assert_one_line_error(excinfo, "does not exist")


def test_refuses_to_replace_the_input_data_file(tmp_path):
    """in.onnx keeps its weights in out.onnx.data: writing out.onnx would destroy the input."""
    model = _conv_model()
    _write(model, tmp_path / "out.onnx", external=True)
    os.rename(tmp_path / "out.onnx", tmp_path / "in.onnx")
    loaded = onnx_files.load(tmp_path / "in.onnx")
    assert loaded.external_files == frozenset({(tmp_path / "out.onnx.data").resolve()})
    before = listing(tmp_path)
    for target in ("out.onnx", "out.onnx.data"):
        with pytest.raises(ModelFileError) as excinfo:
            onnx_files.save(
                loaded.model,
                tmp_path / target,
                external_data=True,
                reads_from=loaded.external_files,
            )
        _assert_one_line_error(excinfo, "input model", "choose another output file name")
    assert listing(tmp_path) == before
    # without external data nothing of the input's is replaced
    onnx_files.save(
        loaded.model, tmp_path / "out.onnx", external_data=False, reads_from=loaded.external_files
    )
    assert onnx_files.check(tmp_path / "in.onnx", onnx_files.load(tmp_path / "out.onnx").model)


def test_save_in_place_over_the_input_with_external_data(tmp_path):
    """Fold-like change of one weight, written over the input model and its data file."""
    model = _conv_model()
    model.graph.initializer.append(  # a second external weight nothing changes or reads
        numpy_helper.from_array(np.arange(512, dtype=np.float32), "unused")
    )
    path = _write(model, tmp_path / "m.onnx", external=True)
    original = onnx_files.load(path)
    folded = onnx_files.load(path)
    w = folded.model.graph.initializers["w"]
    w.const_value = ir.Tensor(w.const_value.numpy() * 2, name="w")
    expected = onnx_files.check(original.model, folded.model)
    assert not expected.passed  # the doubled weight changes the outputs
    onnx_files.save(folded.model, path, external_data=True, reads_from=folded.external_files)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    again = onnx_files.load(path)
    np.testing.assert_array_equal(
        again.model.graph.initializers["w"].const_value.numpy(), w.const_value.numpy()
    )
    np.testing.assert_array_equal(
        again.model.graph.initializers["unused"].const_value.numpy(),
        np.arange(512, dtype=np.float32),
    )
    # the in-memory folded model still reads its untouched weights from the old data
    assert (
        onnx_files.check(again.model, folded.model).passed
        and onnx_files.check(again.model, folded.model).max_abs == 0.0
    )
    assert onnx_files.check(path, folded.model).passed


# ---------------------------------------------------------------------------------------------
# Random inputs


def _graph_model(inputs, outputs, nodes, initializers=(), ir_version=IR_VERSION, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return ir.serde.deserialize_model(
        helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
        )
    )


def test_sample_inputs_types_and_symbolic_dims():
    vi = helper.make_tensor_value_info
    model = _graph_model(
        [
            vi("a", TensorProto.FLOAT, ["batch", 3, "len"]),
            vi("b", TensorProto.FLOAT16, [None, "len", "batch", None]),
            vi("ids", TensorProto.INT64, ["batch", "len"]),
            vi("mask", TensorProto.BOOL, [4, "len"]),
            vi("bf", TensorProto.BFLOAT16, [2, 2]),
            vi("d", TensorProto.DOUBLE, []),
        ],
        [vi("o", TensorProto.FLOAT, None)],
        [helper.make_node("Identity", ["a"], ["o"])],
    )
    inputs = onnx_run.sample_inputs(model, seed=3)
    assert inputs["a"].shape == (2, 3, 16) and inputs["a"].dtype == np.float32
    # a symbol that leads some input is batch-like everywhere; an unnamed leading dim too
    assert inputs["b"].shape == (2, 16, 2, 16) and inputs["b"].dtype == np.float16
    assert inputs["ids"].shape == (2, 16) and inputs["ids"].dtype == np.int64
    assert inputs["ids"].min() >= 0 and inputs["ids"].max() < 10
    assert inputs["mask"].dtype == np.bool_ and inputs["mask"].shape == (4, 16)
    assert inputs["mask"].any() and not inputs["mask"].all()
    assert inputs["bf"].dtype.name == "bfloat16"
    assert inputs["d"].shape == () and inputs["d"].dtype == np.float64
    assert abs(float(inputs["a"].mean())) < 0.5 and 0.5 < float(inputs["a"].std()) < 1.5
    larger = onnx_run.sample_inputs(model, seed=3, dim_size=32)
    assert larger["a"].shape == (2, 3, 32) and larger["b"].shape == (2, 32, 2, 32)
    again = onnx_run.sample_inputs(model, seed=3)
    for name in inputs:
        np.testing.assert_array_equal(inputs[name], again[name])
    other = onnx_run.sample_inputs(model, seed=4)
    assert not np.array_equal(inputs["a"], other["a"])


def test_sample_inputs_never_feeds_initializers():
    """IR 3 lists every initializer as a graph input; IR 4+ may list some (with defaults)."""
    vi = helper.make_tensor_value_info
    for ir_version, opset in ((3, 8), (IR_VERSION, 17)):
        w = numpy_helper.from_array(np.ones((3,), np.float32), "w")
        model = _graph_model(
            [vi("x", TensorProto.FLOAT, ["n", 3]), vi("w", TensorProto.FLOAT, [3])],
            [vi("y", TensorProto.FLOAT, None)],
            [helper.make_node("Add", ["x", "w"], ["y"])],
            [w],
            ir_version=ir_version,
            opset=opset,
        )
        assert list(onnx_run.sample_inputs(model)) == ["x"]
        assert onnx_files.check(model, model).passed


@pytest.mark.parametrize(
    "value_info, words",
    [
        (helper.make_tensor_value_info("s", TensorProto.STRING, [2]), "STRING"),
        (
            helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2]),
            "--verify",
        ),
        (helper.make_tensor_value_info("s", TensorProto.FLOAT, None), "unknown rank"),
        (helper.make_tensor_value_info("s", TensorProto.COMPLEX64, [2]), "COMPLEX64"),
    ],
)
def test_sample_inputs_refuses_what_it_cannot_make(value_info, words):
    model = _graph_model(
        [value_info],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
        [helper.make_node("Identity", ["s"], ["o"])],
    )
    with pytest.raises(UnsupportedModelError) as excinfo:
        onnx_run.sample_inputs(model)
    _assert_one_line_error(excinfo, "'s'", words)


# ---------------------------------------------------------------------------------------------
# Checks in onnxruntime


def _perturbed(model: onnx.ModelProto, name: str = "w", scale: float = 1.01) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, t in enumerate(copy.graph.initializer):
        if t.name == name:
            copy.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(t) * scale, name)
            )
    return copy


def test_check_passes_for_identical_and_fails_for_perturbed_models():
    model = _conv_model()
    original = ir.serde.deserialize_model(model)
    same = onnx_files.check(original, ir.serde.deserialize_model(model))
    assert isinstance(same, CheckResult)
    assert same.passed and same.max_abs == 0.0 and same.tolerance == 1e-4
    assert not same.discrete_outputs and "max rel err 0" in same.summary()
    changed = onnx_files.check(original, ir.serde.deserialize_model(_perturbed(model)))
    assert not changed.passed and changed.max_rel > 1e-3
    tiny = onnx_files.check(original, ir.serde.deserialize_model(_perturbed(model, scale=1.000001)))
    assert tiny.passed and 0 < tiny.max_rel < 1e-4


def test_check_retries_larger_sizes_for_large_kernels():
    """A 20x20 kernel does not fit the first 16x16 try; 32x32 does."""
    model = ir.serde.deserialize_model(_conv_model(channels=2, kernel=20))
    assert onnx_files.check(model, model).passed


def test_check_compares_integer_outputs_by_share_of_elements():
    model = _conv_model()
    model.graph.node.append(helper.make_node("ArgMax", ["y"], ["cls"], axis=1))
    model.graph.output.append(helper.make_tensor_value_info("cls", TensorProto.INT64, None))
    result = onnx_files.check(ir.serde.deserialize_model(model), ir.serde.deserialize_model(model))
    assert result.passed and result.discrete_outputs and "integer/bool" in result.summary()
    changed = onnx_files.check(
        ir.serde.deserialize_model(model), ir.serde.deserialize_model(_perturbed(model, "b", 3.0))
    )
    assert changed.discrete_mismatch > DISCRETE_MISMATCH_TOLERANCE and not changed.passed


def test_check_bfloat16_model():
    vi = helper.make_tensor_value_info
    model = _graph_model(
        [vi("x", TensorProto.BFLOAT16, ["n", 4])],
        [vi("y", TensorProto.BFLOAT16, None)],
        [
            helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Relu", ["f"], ["r"]),
            helper.make_node("Cast", ["r"], ["y"], to=TensorProto.BFLOAT16),
        ],
    )
    result = onnx_files.check(model, model)
    assert result.passed and result.tolerance == 5e-2


def test_check_raises_when_onnxruntime_cannot_run_the_original():
    vi = helper.make_tensor_value_info
    unknown_op = _graph_model(
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, None)],
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
    )
    unknown_op.opset_imports["com.example"] = 1
    with pytest.raises(VerificationError) as excinfo:
        onnx_files.check(unknown_op, unknown_op)
    _assert_one_line_error(excinfo, "could not run the original model")
    too_new = ir.serde.deserialize_model(_conv_model(ir_version=99))
    with pytest.raises(VerificationError) as excinfo:
        onnx_files.check(too_new, too_new)
    _assert_one_line_error(excinfo, "could not run the original model")
    tiny_input = ir.serde.deserialize_model(_conv_model(kernel=5, x_shape=(1, 3, 2, 2)))
    with pytest.raises(VerificationError) as excinfo:
        onnx_files.check(tiny_input, tiny_input)
    _assert_one_line_error(excinfo, "could not run the original model")


def test_check_raises_when_only_the_folded_model_fails():
    model = _conv_model()
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(VerificationError) as excinfo:
        onnx_files.check(ir.serde.deserialize_model(model), ir.serde.deserialize_model(broken))
    # No BatchNorm was folded: not called a bnfold bug (tests/cli/test_onnx_verify.py: the
    # other case)
    message = _assert_one_line_error(excinfo, "cannot verify", "failed on", "folded no BatchNorm")
    assert "bug" not in message


def test_check_from_path_with_external_data(tmp_path):
    path = _write(_conv_model(), tmp_path / "m.onnx", external=True)
    folded = onnx_files.load(path).model
    assert onnx_files.check(path, folded).passed
    assert onnx_files.check(tmp_path / "m.onnx", folded).max_abs == 0.0
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


def test_verify_with_model_proto_and_ir_model():
    model = _conv_model()
    assert onnx_run.verify(model, model, None) == (0.0, 0.0)
    max_abs, max_rel = onnx_run.verify(model, ir.serde.deserialize_model(_perturbed(model)))
    assert max_abs > 0 and 1e-4 < max_rel < 0.1
    x = {"x": np.ones((1, 3, 5, 5), np.float32)}
    assert onnx_run.verify(ir.serde.deserialize_model(model), model, x) == (0.0, 0.0)
    with pytest.raises(UnsupportedModelError):
        onnx_run.verify("model.onnx", model, x)


def test_verify_takes_arrays_in_input_order():
    model = _conv_model()
    perturbed = _perturbed(model)
    x = np.random.default_rng(0).normal(size=(1, 3, 5, 5)).astype(np.float32)
    by_name = onnx_run.verify(model, perturbed, {"x": x})
    assert by_name[1] > 0
    assert onnx_run.verify(model, perturbed, x) == by_name
    assert onnx_run.verify(model, perturbed, (x,)) == by_name
    with pytest.raises(InvalidArgumentError) as excinfo:
        onnx_run.verify(model, perturbed, (x, x))
    _assert_one_line_error(excinfo, "'x'")


def test_verify_refuses_a_model_proto_whose_data_it_cannot_find(tmp_path):
    path = _write(_conv_model(), tmp_path / "m.onnx", external=True)
    proto = onnx.load(path, load_external_data=False)
    with pytest.raises(UnsupportedModelError) as excinfo:
        onnx_run.verify(proto, proto)
    _assert_one_line_error(excinfo, "external data")
    assert onnx_run.verify(onnx.load(path), onnx_files.load(path).model) == (0.0, 0.0)


def test_array_error_semantics():
    a = np.array([1.0, 2.0, np.nan, np.inf], np.float32)
    assert array_error(a, a.copy()) == (0.0, 0.0)
    assert array_error(a, np.array([1.0, 2.5, np.nan, np.inf])) == (0.5, 0.25)
    assert array_error(a, np.array([1.0, 2.0, 0.0, np.inf]))[1] == float("inf")
    assert array_error(np.zeros(3), np.zeros(3)) == (0.0, 0.0)
    assert array_error(np.zeros(0), np.zeros(0)) == (0.0, 0.0)


def test_large_string_initializer_stays_inline_with_external_data(tmp_path):
    """ONNX keeps strings only inline; a 27 KiB list of class labels must not go to the data
    file (onnx_ir would try, and fail)."""
    model = _conv_model()
    labels = np.array([f"label{i:05d}".encode() * 3 for i in range(1000)], dtype=object)
    model.graph.initializer.append(numpy_helper.from_array(labels, "labels"))
    model.graph.node.append(helper.make_node("Identity", ["labels"], ["lab"], name="lab"))
    model.graph.output.append(
        helper.make_tensor_value_info("lab", TensorProto.STRING, [len(labels)])
    )
    src = _write(model, tmp_path / "m.onnx", external=True)
    out = tmp_path / "out.onnx"
    onnx_files.save(onnx_files.load(src).model, out, external_data=True)
    saved = onnx.load(out, load_external_data=False)
    (stored,) = [t for t in saved.graph.initializer if t.name == "labels"]
    assert stored.data_location == TensorProto.DEFAULT and len(stored.string_data) == 1000
    assert (tmp_path / "out.onnx.data").stat().st_size > 1024  # the weight went there
    assert onnx_files.check(src, onnx_files.load(out).model).passed


def test_inline_save_streams_initializers_and_leaves_the_model_as_it_was(tmp_path):
    """Initializers are written one message at a time after the rest of the model (protobuf
    merges them into the one graph); the file reads back the same and the model is unchanged."""
    model = _conv_model()
    model.graph.initializer.append(numpy_helper.from_array(np.arange(3, dtype=np.int64), "k"))
    loaded = onnx_files.load(_write(model, tmp_path / "m.onnx")).model
    names = list(loaded.graph.initializers)
    onnx_files.save(loaded, tmp_path / "out.onnx", external_data=False)
    assert list(loaded.graph.initializers) == names
    assert all(v.is_initializer() for v in loaded.graph.initializers.values())
    saved = onnx.load(tmp_path / "out.onnx")
    assert [t.name for t in saved.graph.initializer] == names
    for t in model.graph.initializer:
        (back,) = [s for s in saved.graph.initializer if s.name == t.name]
        assert np.array_equal(numpy_helper.to_array(back), numpy_helper.to_array(t))
    assert not saved.graph.value_info


def test_external_ir_model_usable_after_fold(tmp_path):
    """After ``fold(ir_model)`` the input can still be saved with external data and verified
    against the result, without a garbage collection (a cache held numpy views of the mmapped
    data: BufferError)."""
    model = conv_model(cin=16, cout=32, size=6, batch=1, seed=15)
    path = tmp_path / "m.onnx"
    external = onnx.ModelProto()
    external.CopyFrom(model)  # save_model moves the tensors of what it saves out
    onnx.save_model(
        external, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    enabled = gc.isenabled()
    gc.disable()  # a collection would hide the bug
    try:
        im = ir.load(path)
        folded, report = bnfold.fold(im, return_report=True)
        assert [e.action for e in report] == ["folded"]
        ir.save(im, tmp_path / "copy.onnx", external_data="copy.onnx.data")
        max_abs, max_rel = bnfold.verify(im, folded, None)
        assert max_rel < 1e-5, (max_abs, max_rel)
        ir.save(folded, tmp_path / "folded.onnx", external_data="folded.onnx.data")
    finally:
        if enabled:
            gc.enable()
    copy = onnx.load(tmp_path / "copy.onnx")
    for name in ("w", "b", "bn.mean"):
        np.testing.assert_array_equal(initializer(copy, name), initializer(model, name))
    onnx.checker.check_model(onnx.load(tmp_path / "folded.onnx"), full_check=True)


@pytest.mark.parametrize("shape", [[1, 3, 2**20, 2**20], [2**62, 3, 5, 5]], ids=["hw", "batch"])
def test_verify_huge_declared_input_refused(shape, tmp_path, capsys):
    """No random inputs of terabytes: the CLI says so in one line and returns 1; the API
    raises VerificationError."""
    g = Graph(seed=16)
    x = g.input("x", shape)
    y = g.node("Conv", [x, g.weight("w", [4, 3, 3, 3])], name="conv")
    g.output(g.bn(y, 4))
    model = g.model()
    path = tmp_path / "huge.onnx"
    onnx.save(model, path)
    capsys.readouterr()
    assert main([str(path), "--verify"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("bnfold: error:") and "Memory" not in err, err
    folded = bnfold.fold(model)
    with pytest.raises(bnfold.VerificationError):
        bnfold.verify(model, folded, None)


# ---------------------------------------------------------------------------------------------
# External data: no empty data file, the location ".", offsets as onnxruntime reads them


def test_no_empty_data_file_when_no_tensor_goes_there(tmp_path):
    """A model with external data whose tensors are all under 1 KiB got a 0-byte OUT.data."""
    src = _write(_conv_model(channels=4), tmp_path / "in.onnx")  # w: 432 bytes
    onnx.save(
        onnx.load(src),
        src,
        save_as_external_data=True,
        location="in.onnx.data",
        size_threshold=0,
    )
    loaded = onnx_files.load(src)
    assert onnx_files.needs_external_data(loaded)
    out = tmp_path / "out.onnx"
    onnx_files.save(loaded.model, out, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "in.onnx.data", "out.onnx"]
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(src, {"x": x})[0], run(out, {"x": x})[0])


@pytest.mark.parametrize("location", [".", "./", "sub/.."])
def test_location_naming_the_model_directory(tmp_path, location):
    """The location "." was refused as "a symbolic link leads to ... outside the model's
    directory", with no link anywhere."""
    (tmp_path / "sub").mkdir()
    message = _refused(_with_tensor(tmp_path, _external("t", [4], location)), "'t'")
    assert "model's directory itself" in message
    assert "symbolic link" not in message


@pytest.mark.parametrize("text", [" 16", "+16", "1_6", "16 ", "\u0661\u0666", "0x10", ""])
def test_external_offset_and_length_are_plain_decimal_digits(tmp_path, text):
    """Python's int() took " 16", "+16", "1_6" and Arabic-Indic digits; onnxruntime does not."""
    (tmp_path / "t.bin").write_bytes(b"\0" * 64)
    for key in (1, 2):
        tensor = _external("t", [4], "t.bin", length=16)
        tensor.external_data[key].value = text
        _refused(_with_tensor(tmp_path, tensor), "'t'", "plain decimal digits")
    tensor = _external("t", [4], "t.bin", length=16, offset=16)
    onnx_files.load(_with_tensor(tmp_path, tensor))
