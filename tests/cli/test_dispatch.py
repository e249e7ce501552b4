"""The command line runs one flow for every file format, through the file frontend registered
for it (bnfold.core.frontend); --verify's random inputs follow one rule in every format."""

from __future__ import annotations

import sys
import types
from dataclasses import replace

import numpy as np
import pytest

from bnfold.cli import main
from bnfold.core import frontend
from bnfold.core.compare import CheckResult
from bnfold.core.report import FoldEntry, FoldReport


class _ToyFold:
    """A file frontend's FileFold that records the steps the command line takes."""

    verified_where = "in the toy runtime"

    def __init__(self, path: str, steps: list, result: CheckResult) -> None:
        self.steps, self.result = steps, result
        steps.append(("open_file", path))

    def check_output(self, output):
        self.steps.append(("check_output", output))

    def prepare(self, **options):
        self.steps.append(("prepare", options))
        return ["toy option applied"] if options.get("remove_initializer_inputs") else []

    def fold(self, producers, affine=True):
        self.steps.append(("fold", producers, affine))
        return FoldReport([FoldEntry("bn", "conv", "folded")], model="toy")

    def check(self, seed):
        self.steps.append(("check", seed))
        return self.result

    def save(self, output):
        self.steps.append(("save", output))


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """A .toy format, registered as any file frontend is; its steps and its model file."""
    steps: list = []
    state = {"result": CheckResult(0.0, 0.0, 1e-4, 0.0, False)}
    module = types.ModuleType("toy_files")
    module.open_file = lambda path: _ToyFold(path, steps, state["result"])
    monkeypatch.setitem(sys.modules, "toy_files", module)
    monkeypatch.setattr(frontend, "FILE_FRONTENDS", list(frontend.FILE_FRONTENDS))
    frontend.register_file_frontend(
        frontend.FileFrontend(
            format="toy",
            module="toy_files",
            suffix=".toy",
            magic=b"TOY!",
            description="a toy model (.toy)",
            plural="toy models",
        )
    )
    path = tmp_path / "model.bin"
    path.write_bytes(b"TOY! weights")  # found by content: no .toy suffix
    return steps, state, str(path)


def test_one_flow_for_a_registered_format(toy, tmp_path, capsys):
    steps, _, path = toy
    out = str(tmp_path / "out.toy")
    args = [path, "-o", out, "--verify", "--seed", "7", "--producers", "conv"]
    assert main(args) == 0
    assert steps == [
        ("open_file", path),
        ("check_output", out),
        ("prepare", {}),
        ("fold", ["conv"], True),
        ("check", 7),
        ("save", out),
    ]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bnfold: 1 of 1 BatchNorm folded, 0 kept in ")
    assert lines[1:] == [
        "bnfold: verified in the toy runtime: max abs err 0, max rel err 0 (tolerance 0.0001)",
        f"bnfold: wrote {out}",
    ]


def test_a_failed_check_writes_nothing(toy, tmp_path, capsys):
    steps, state, path = toy
    state["result"] = CheckResult(1.0, 0.5, 1e-4, 0.0, False)
    out = str(tmp_path / "out.toy")
    assert main([path, "-o", out, "--verify"]) == 1
    assert [s[0] for s in steps] == ["open_file", "check_output", "prepare", "fold", "check"]
    assert capsys.readouterr().err == (
        "bnfold: error: verification failed on random inputs: max abs err 1, max rel err 0.5 "
        f"(tolerance 0.0001); {out} not written\n"
    )


def test_output_named_like_another_format_is_refused_before_reading(toy, tmp_path, capsys):
    steps, _, path = toy
    assert main([path, "-o", str(tmp_path / "out.onnx")]) == 1
    assert steps == []
    assert "is named like an ONNX model (.onnx), but the result is a toy model (.toy)" in (
        capsys.readouterr().err
    )


def test_options_of_other_formats_are_refused_before_reading(toy, capsys):
    steps, _, path = toy
    assert main([path, "--remove-initializer-inputs"]) == 1
    assert steps == []
    assert capsys.readouterr().err == (
        "bnfold: error: --remove-initializer-inputs applies to ONNX models only\n"
    )


def _replace_toy(monkeypatch, **changes) -> None:
    """Register the toy format again with ``changes``."""
    monkeypatch.setattr(
        frontend,
        "FILE_FRONTENDS",
        [replace(f, **changes) if f.format == "toy" else f for f in frontend.FILE_FRONTENDS],
    )


def test_a_format_taking_an_option_gets_it_and_its_lines_are_printed(
    toy, monkeypatch, capsys, tmp_path
):
    steps, _, path = toy
    _replace_toy(monkeypatch, options=("remove_initializer_inputs",))
    assert main([path, "--remove-initializer-inputs"]) == 0
    assert steps[1] == ("prepare", {"remove_initializer_inputs": True})
    assert capsys.readouterr().out.splitlines()[0] == "bnfold: toy option applied"
    # two formats take it now: refusing it for a third names both
    archive = tmp_path / "m.pt2"
    archive.write_bytes(b"PK\x03\x04")
    assert main([str(archive), "--remove-initializer-inputs"]) == 1
    assert capsys.readouterr().err == (
        "bnfold: error: --remove-initializer-inputs applies to ONNX models and toy models only\n"
    )


def test_a_frontend_whose_libraries_are_missing_says_what_to_install(toy, monkeypatch, capsys):
    _, _, path = toy
    monkeypatch.setitem(sys.modules, "toy_files", None)  # import toy_files raises ImportError
    assert main([path]) == 3  # nothing said what it needs: an internal error, as for .pt2
    assert "internal error: ModuleNotFoundError" in capsys.readouterr().err
    _replace_toy(monkeypatch, needs="toylib", extra="toy")
    assert main([path]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bnfold: error: reading toy models needs toylib (")
    assert err.endswith("): pip install 'bnfold[toy]'\n")


# ---------------------------------------------------------------------------------------------
# The random inputs of --verify: one rule for .pt2 programs and ONNX models


def _rule_holds(values: dict[str, np.ndarray]) -> None:
    """Floats standard normal, one-byte integers over their range, wider ones 0 or 1."""
    assert set(np.unique(values["ids"]).tolist()) == {0, 1}
    assert values["img"].min() == 0 and values["img"].max() == 255
    assert abs(float(values["x"].mean())) < 0.1 and abs(float(values["x"].std()) - 1) < 0.1
    assert 0.3 < values["mask"].mean() < 0.7


def test_onnx_random_inputs_follow_the_rule():
    pytest.importorskip("onnxruntime")
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from bnfold.onnx import run as onnx_run

    vi = helper.make_tensor_value_info
    inputs = [
        vi("x", TensorProto.FLOAT, [64, 64]),
        vi("ids", TensorProto.INT64, [64, 64]),
        vi("img", TensorProto.UINT8, [64, 64]),
        vi("mask", TensorProto.BOOL, [64, 64]),
    ]
    nodes = [helper.make_node("Identity", [v.name], [v.name + "_out"]) for v in inputs]
    outputs = [vi(v.name + "_out", v.type.tensor_type.elem_type, [64, 64]) for v in inputs]
    model = ir.serde.deserialize_model(
        helper.make_model(
            helper.make_graph(nodes, "g", inputs, outputs),
            opset_imports=[helper.make_opsetid("", 17)],
            ir_version=10,
        )
    )
    _rule_holds(onnx_run.sample_inputs(model, seed=5))


def test_pt2_random_inputs_follow_the_rule():
    torch = pytest.importorskip("torch")
    from torch import nn

    from bnfold.torch import pt2

    class Four(nn.Module):
        def forward(self, x, ids, img, mask):
            return x * 2, ids + 1, img // 2, ~mask

    examples = (
        torch.randn(64, 64),
        torch.zeros(64, 64, dtype=torch.int64),
        torch.zeros(64, 64, dtype=torch.uint8),
        torch.zeros(64, 64, dtype=torch.bool),
    )
    ep = torch.export.export(Four(), examples)
    ep.example_inputs = None  # inputs from the input specs, by the rule
    args, kwargs = pt2.sample_inputs(ep, seed=5)
    assert kwargs == {}
    values = dict(zip(["x", "ids", "img", "mask"], (a.numpy() for a in args), strict=True))
    assert [a.dtype for a in args] == [e.dtype for e in examples]
    _rule_holds(values)
    again, _ = pt2.sample_inputs(ep, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(args, again, strict=True))


def test_pt2_types_numpy_lacks_are_rounded_from_float32():
    torch = pytest.importorskip("torch")

    from bnfold.torch.pt2 import _random_values

    rng = np.random.default_rng(9)
    values = _random_values([1000], torch.bfloat16, torch.device("cpu"), rng)
    expected = torch.from_numpy(np.random.default_rng(9).standard_normal(1000, np.float32))
    assert values.dtype == torch.bfloat16 and torch.equal(values, expected.to(torch.bfloat16))
