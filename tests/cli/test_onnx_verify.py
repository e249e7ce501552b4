"""``--verify`` on ONNX models: a tolerance that follows the weights' precision (float16 inside
float32 inputs and outputs), random inputs made in their own dtype, inputs too large to make
refused before allocating, a run past the time or memory limit stopped, running out of memory
reported in one line, and a folded model failing when nothing was folded not called a bnfold
bug. A wrong fold is still caught.

Every command-line run checks the exit status, that an error is one line on stderr, and what is
(or is not) on disk afterwards.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli import main
from bnfold.onnx import files as onnx_files
from bnfold.onnx import model as onnx_model
from bnfold.onnx import run as onnx_run
from tests.helpers.cli import one_line_error
from tests.helpers.cli_models import (
    conv_bn,
    graph_model,
    vi,
    weight,
)
from tests.helpers.onnx_models import peak_growth


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
        numpy_helper.from_array(weight((c, 3, 3, 3), 1, np_inner), "w"),
        numpy_helper.from_array((weight((c, c, 3, 3), 4) * 0.3).astype(np_inner), "w2"),
    ]
    bn_in = ["s", "b", "mu", "var"]
    return graph_model(
        [
            helper.make_node("Cast", ["x"], ["xh"], name="cast_in", to=inner),
            helper.make_node("Conv", ["xh", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c1", *bn_in], ["y1"], name="bn1"),
            helper.make_node("Relu", ["y1"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c2", *bn_in], ["y2"], name="bn2"),
            helper.make_node("Cast", ["y2"], ["y"], name="cast_out", to=outer),
        ],
        [vi("x", [2, 3, 16, 16], outer)],
        [vi("y", [2, c, 16, 16], outer)],
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


def test_verify_refuses_inputs_too_large_to_check(tmp_path, capsys):
    """An input declared [2, 3, 4096, 4096] (384 MiB of float32): --verify made it through a
    float64 array twice that size (up to 4 GiB was allowed; +3 GiB and 9 s, or MemoryError)."""
    model = conv_bn()
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
    one_line_error(capsys, "'x'", "too large to verify", "without --verify")
    assert growth < 64 * 2**20, f"{growth / 2**20:.0f} MiB"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_random_inputs_are_made_in_their_own_dtype():
    """No float64 draw first: a float16 input cost five times its size."""
    import tracemalloc

    inputs = [
        vi("h", [4, 2048, 1024], TensorProto.FLOAT16),
        vi("i", [4, 2048, 1024], TensorProto.INT8),
        vi("b", [4, 2048, 1024], TensorProto.BOOL),
    ]
    model = graph_model([], inputs, inputs, [])
    tracemalloc.start()
    try:
        arrays = onnx_run.sample_inputs(ir.serde.deserialize_model(model))
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
    onnx.save(conv_bn(), str(src))

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(onnx_run, "_run", no_memory)
    assert main([str(src), "-o", str(tmp_path / "out.onnx"), "--verify"]) == 1
    one_line_error(capsys, "out of memory", "without --verify")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def _loop_forever() -> onnx.ModelProto:
    """255 bytes: a Loop of 2**62 iterations doubling a value."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("Add", ["v_in", "v_in"], ["v_out"]),
        ],
        "body",
        [vi("i", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL), vi("v_in", [1])],
        [vi("c_out", [], TensorProto.BOOL), vi("v_out", [1])],
    )
    return graph_model(
        [helper.make_node("Loop", ["n", "t", "x"], ["y"], body=body)],
        [vi("x", [1])],
        [vi("y", [1])],
        [
            numpy_helper.from_array(np.array(2**62, np.int64), "n"),
            numpy_helper.from_array(np.array(True), "t"),
        ],
    )


def _expand_to(n: int) -> onnx.ModelProto:
    """Expand a 1-element input to ``n`` elements, then ReduceSum: ~120 bytes asking for 4n."""
    return graph_model(
        [
            helper.make_node("Expand", ["x", "shape"], ["e"]),
            helper.make_node("ReduceSum", ["e"], ["y"], keepdims=0),
        ],
        [vi("x", [1])],
        [vi("y", [])],
        [numpy_helper.from_array(np.array([n], np.int64), "shape")],
    )


def test_verify_stops_a_run_past_the_time_limit(tmp_path, capsys, monkeypatch):
    """--verify ran a Loop of 2**62 iterations for ever; now each run is stopped after
    VERIFY_TIME_LIMIT seconds (onnxruntime's terminate flag), one line, exit 1."""
    import time

    monkeypatch.setattr(onnx_run, "VERIFY_TIME_LIMIT", 1.0)
    src = tmp_path / "loop.onnx"
    onnx.save(_loop_forever(), str(src))
    start = time.monotonic()
    assert main([str(src), "--verify", "-o", str(tmp_path / "out.onnx")]) == 1
    assert time.monotonic() - start < 30
    one_line_error(capsys, "cannot verify", "1 s", "time limit")
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(bnfold.VerificationError, match="cannot verify"):
        bnfold.verify(_loop_forever(), _loop_forever(), None)


def test_verify_stops_a_run_past_the_memory_limit(tmp_path, capsys, monkeypatch):
    """A 121-byte model expanding to 2**29 floats took 2.3 GB in --verify. Intermediate values
    come from an arena of at most VERIFY_MEMORY_LIMIT bytes: one line, exit 1 (here 64 MiB and
    a 128 MiB Expand, so that the test is cheap even if the cap did not hold)."""
    monkeypatch.setattr(onnx_run, "VERIFY_MEMORY_LIMIT", 64 * 2**20)
    src = tmp_path / "big.onnx"
    onnx.save(_expand_to(2**25), str(src))
    assert main([str(src), "--verify"]) == 1
    err = one_line_error(capsys, "cannot verify", "memory limit", "0.0625 GiB")
    assert "bnfold bug" not in err
    # within the limit the same kind of model verifies
    onnx.save(_expand_to(2**20), str(src))
    assert main([str(src), "--verify"]) == 0


def test_folded_model_failing_when_nothing_was_folded_is_not_called_a_bnfold_bug():
    """'onnxruntime runs the original model but not the folded one ... bnfold bug' was said
    when no BatchNorm had been folded (the two models the same)."""
    model = onnx_model.as_ir_model(conv_bn())
    folded = bnfold.fold(model)
    error = RuntimeError("out of something")
    same = onnx_run._folded_failed(model, model, error)
    assert str(same).startswith("cannot verify") and "bug" not in str(same)
    assert "folded no BatchNorm" in str(same)
    assert "bnfold bug" in str(onnx_run._folded_failed(model, folded, error))
