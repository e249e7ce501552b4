"""`bnfold model.onnx -o out.onnx [--verify] [--report] [--producers]` end to end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from bnfold.cli import main
from bnfold.core import algebra
from tests.helpers.cli import listing, one_line_error
from tests.helpers.onnx_models import run


def _model() -> onnx.ModelProto:
    """Conv -> BN -> ReLU -> GlobalAveragePool -> Flatten -> Gemm -> BN, random statistics."""
    rng = np.random.default_rng(0)

    def stats(prefix: str, c: int) -> list[TensorProto]:
        values = {
            "s": rng.uniform(0.5, 2, c),
            "b": rng.normal(size=c),
            "m": rng.normal(size=c),
            "v": rng.uniform(0.5, 2, c),
        }
        return [nh.from_array(v.astype(np.float32), prefix + k) for k, v in values.items()]

    def bn(prefix: str, x: str, y: str) -> onnx.NodeProto:
        names = [prefix + k for k in "sbmv"]
        return h.make_node("BatchNormalization", [x, *names], [y], name=prefix)

    inits = [
        nh.from_array(rng.normal(size=(16, 3, 3, 3)).astype(np.float32), "conv.weight"),
        nh.from_array(rng.normal(size=(10, 16)).astype(np.float32), "fc.weight"),
        nh.from_array(rng.normal(size=10).astype(np.float32), "fc.bias"),
        *stats("bn1.", 16),
        *stats("bn2.", 10),
    ]
    nodes = [
        h.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn("bn1.", "c", "b1"),
        h.make_node("Relu", ["b1"], ["r"], name="relu"),
        h.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        h.make_node("Flatten", ["p"], ["f"], name="flatten"),
        h.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["g"], name="fc", transB=1),
        bn("bn2.", "g", "logits"),
    ]
    graph = h.make_graph(
        nodes,
        "cli",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [h.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=10)


@pytest.fixture
def model_file(tmp_path) -> str:
    path = tmp_path / "model.onnx"
    onnx.save(
        _model(),
        path,
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=256,
    )
    return str(path)


def test_fold_verify_report_with_external_data(tmp_path, model_file, capsys):
    before = listing(tmp_path)
    out = tmp_path / "folded.onnx"
    assert main([model_file, "-o", str(out), "--verify", "--report"]) == 0
    text = capsys.readouterr().out
    assert "2 of 2 BatchNorms folded" in text and "fc (Gemm)" in text
    assert "verified in onnxruntime" in text
    after = listing(tmp_path)
    assert {k: after[k] for k in before} == before  # the input and its data are untouched
    assert set(after) - set(before) == {"folded.onnx", "folded.onnx.data"}
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    x = np.random.default_rng(1).normal(size=(2, 3, 12, 12)).astype(np.float32)
    expected = run(model_file, {"x": x})[0]
    assert np.abs(run(out, {"x": x})[0] - expected).max() <= 1e-5 * np.abs(expected).max()


def test_without_output_nothing_is_written(tmp_path, model_file, capsys):
    before = listing(tmp_path)
    assert main([model_file]) == 0
    assert "2 of 2 BatchNorms folded" in capsys.readouterr().out
    assert listing(tmp_path) == before


def test_producers_option(tmp_path, model_file, capsys):
    assert main([model_file, "--producers", "linear", "--report"]) == 0
    text = capsys.readouterr().out
    assert "1 of 2 BatchNorms folded" in text and "[not-selected]" in text


def test_output_over_the_input_itself(tmp_path, model_file, capsys):
    x = np.random.default_rng(2).normal(size=(1, 3, 12, 12)).astype(np.float32)
    expected = run(model_file, {"x": x})[0]
    assert main([model_file, "-o", model_file]) == 0
    assert np.abs(run(model_file, {"x": x})[0] - expected).max() <= 1e-5 * np.abs(expected).max()
    assert not [n for n in onnx.load(model_file).graph.node if n.op_type == "BatchNormalization"]


def test_a_wrong_fold_fails_verification_and_writes_nothing(
    tmp_path, model_file, capsys, monkeypatch
):
    scale = algebra.scale_output_channels
    monkeypatch.setattr(
        algebra, "scale_output_channels", lambda w, s, layout: scale(w, s * 1.01, layout)
    )
    before = listing(tmp_path)
    assert main([model_file, "-o", str(tmp_path / "out.onnx"), "--verify"]) == 1
    assert "verification failed" in one_line_error(capsys)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("cut", [0.3, 0.9], ids=["third", "most"])
def test_truncated_model_is_a_one_line_error(tmp_path, cut, capsys):
    data = _model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * cut)])
    assert main([str(path), "-o", str(tmp_path / "out.onnx"), "--verify"]) == 1
    one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.onnx"]


def test_random_bytes_are_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert main([str(path), "-o", str(tmp_path / "out.onnx")]) == 1
    one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.onnx"]


def test_initializers_listed_as_inputs_fold_only_when_removed_from_the_inputs(tmp_path, capsys):
    """PyTorch's keep_initializers_as_inputs=True makes every weight an overridable input:
    nothing folds, unless --remove-initializer-inputs makes them constants first."""
    model = _model()
    for t in model.graph.initializer:
        model.graph.input.append(h.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    path = tmp_path / "kia.onnx"
    onnx.save(model, path)
    assert main([str(path), "--report"]) == 0
    text = capsys.readouterr().out
    assert "0 of 2 BatchNorms folded" in text and "also a graph input" in text
    out = tmp_path / "out.onnx"
    assert main([str(path), "-o", str(out), "--remove-initializer-inputs", "--verify"]) == 0
    text = capsys.readouterr().out
    assert (
        "removed 11 initializers from the graph inputs: conv.weight" in text
        and "2 of 2 BatchNorms folded" in text
    )
    assert [i.name for i in onnx.load(out).graph.input] == ["x"]


def test_a_tensor_failing_to_serialize_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """The inline write serializes one initializer at a time; a failure on any of them (say
    memory running out) is a file error, and nothing is written."""
    import onnx_ir as ir

    path = tmp_path / "inline.onnx"
    onnx.save(_model(), path)
    real, calls = ir.serde.serialize_tensor_into, []

    def flaky(proto, tensor):
        calls.append(tensor)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        return real(proto, tensor)

    monkeypatch.setattr(ir.serde, "serialize_tensor_into", flaky)
    assert main([str(path), "-o", str(tmp_path / "out.onnx")]) == 1
    assert "cannot be serialized" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inline.onnx"]


def _affine_model() -> onnx.ModelProto:
    """MatMul -> Mul([8]) -> Add([8]): what tf2onnx writes for Keras 3's Dense + BatchNorm."""
    rng = np.random.default_rng(5)
    inits = [
        nh.from_array(rng.normal(size=(6, 8)).astype(np.float32), "w"),
        nh.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "k"),
        nh.from_array(rng.normal(size=8).astype(np.float32), "t"),
    ]
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
        h.make_node("Mul", ["y", "k"], ["z"], name="mul"),
        h.make_node("Add", ["z", "t"], ["out"], name="add"),
    ]
    graph = h.make_graph(
        nodes,
        "dense",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
        [h.make_tensor_value_info("out", TensorProto.FLOAT, [4, 8])],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_affine_chains_fold_and_no_affine_leaves_them(tmp_path, capsys):
    path, out = tmp_path / "dense.onnx", tmp_path / "out.onnx"
    onnx.save(_affine_model(), path)
    assert main([str(path), "-o", str(out), "--verify", "--report"]) == 0
    text = capsys.readouterr().out
    assert "0 of 0 BatchNorms folded, 0 kept; 1 of 1 affine chain folded" in text
    row = next(line for line in text.splitlines() if line.startswith("mul -> add "))
    assert row.split() == ["mul", "->", "add", "Mul", "->", "Add", "folded", "matmul", "(MatMul)"]
    assert [n.op_type for n in onnx.load(out).graph.node] == ["MatMul", "Add"]
    assert main([str(path), "-o", str(out), "--no-affine"]) == 0
    assert "0 of 0 BatchNorms folded, 0 kept in" in capsys.readouterr().out
    assert onnx.load(out).graph.node == _affine_model().graph.node
