"""An ONNX model over 2 GiB (the protobuf limit) folds through the command line.

The model's data file is sparse, so making it costs no disk time; the folded copy is written
for real (about 2 GiB, a few seconds) and deleted at the end.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from bnfold.cli import main
from tests.helpers.onnx_models import run

BIG = 2**31 + 2**20  # bytes of the embedding table: just over 2 GiB
TABLE_OFFSET = 4096


def _external(name: str, dims: list[int], offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.onnx.data"), ("offset", offset), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    return t


def _big_model(directory) -> np.ndarray:
    """Conv + BatchNormalization, and a Gather from a 2 GiB table; returns the conv weight."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    with open(directory / "big.onnx.data", "wb") as f:
        f.write(w.tobytes())
        f.truncate(TABLE_OFFSET + BIG)  # sparse: zeros that take no disk space
    table = [_external("table", [BIG // 4 // 16, 16], TABLE_OFFSET, BIG)]
    stats = [
        nh.from_array(v.astype(np.float32), name)
        for name, v in (
            ("s", rng.normal(size=4)),
            ("b", rng.normal(size=4)),
            ("m", rng.normal(size=4)),
            ("v", rng.uniform(0.5, 2, size=4)),
        )
    ]
    graph = h.make_graph(
        [
            h.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            h.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
            h.make_node("Gather", ["table", "idx"], ["e"], name="emb"),
        ],
        "big",
        [
            h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
            h.make_tensor_value_info("idx", TensorProto.INT64, [2]),
        ],
        [
            h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6]),
            h.make_tensor_value_info("e", TensorProto.FLOAT, [2, 16]),
        ],
        [_external("w", [4, 3, 3, 3], 0, w.nbytes), *table, *stats],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 15)], ir_version=8)
    onnx.save(model, directory / "big.onnx")
    return w


def test_model_over_2gib_folds_and_keeps_its_data(tmp_path, capsys):
    if shutil.disk_usage(tmp_path).free < 6 * 2**30:
        pytest.skip("needs about 2.5 GiB of free disk for the folded copy")
    try:
        _big_model(tmp_path)
        src, out = tmp_path / "big.onnx", tmp_path / "folded.onnx"
        assert main([str(src), "-o", str(out)]) == 0
        assert "1 of 1 BatchNorm folded" in capsys.readouterr().out
        data = tmp_path / "folded.onnx.data"
        assert data.stat().st_size >= BIG and out.stat().st_size < 4096
        folded = onnx.load(out, load_external_data=False)
        assert [n.op_type for n in folded.graph.node] == ["Conv", "Gather"]
        rng = np.random.default_rng(1)
        x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
        idx = np.array([0, BIG // 64 - 1])
        before, after = run(src, {"x": x, "idx": idx}), run(out, {"x": x, "idx": idx})
        assert np.abs(before[0] - after[0]).max() <= 1e-5 * np.abs(before[0]).max()
        assert np.array_equal(before[1], after[1])
    finally:
        for f in tmp_path.iterdir():
            f.unlink()
