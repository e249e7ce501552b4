"""The command line: `bnfold demo`, errors as one line and a non-zero status, and what `-o` may
name (for ONNX models and .pt2 archives alike)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bnfold.cli import main
from tests.helpers.cli import listing, refused_before_any_work


def test_demo_folds_and_verifies(capsys):
    assert main(["demo", "--batch", "2", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "16 of 16 BatchNorms folded" in out
    assert "BatchNorm modules: 16 before, 0 after" in out
    assert "verified: outputs match" in out
    assert "ConvTranspose2d" in out and "Linear" in out


def test_usage_error_is_one_line(capsys):
    assert main(["--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnfold: error:") and err.count("\n") == 1


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert "bnfold" in capsys.readouterr().out
    assert main(["--help"]) == 0


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "bnfold", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("bnfold ")


def test_demo_runs_with_batch_one(capsys):
    assert main(["demo", "--batch", "1", "--size", "16"]) == 0
    assert "verified: outputs match" in capsys.readouterr().out


def test_demo_arguments_are_validated_as_usage_errors(capsys):
    for argv in (["--batch", "0"], ["--size", "-3"], ["--seed", "9" * 20], ["--batch", "x"]):
        assert main(["demo", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bnfold: error: argument") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Output targets: what -o may name, for both formats


@pytest.fixture(scope="module")
def model_bytes() -> dict[str, bytes]:
    """A Conv + BatchNorm network as an ONNX model and as a torch.export archive."""
    import io

    import numpy as np
    import onnx
    import torch
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    stats = [rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(1, 2, 4)]
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    inits += [
        numpy_helper.from_array(a.astype(np.float32), n) for n, a in zip("sbmv", stats, strict=True)
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 4, 4])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 6, 6),)), buffer)
    return {"onnx": proto.SerializeToString(), "pt2": buffer.getvalue()}


def _input(tmp_path: Path, model_bytes: dict[str, bytes], fmt: str) -> Path:
    src = tmp_path / f"in.{fmt}"
    src.write_bytes(model_bytes[fmt])
    return src


def _special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    else:  # the null device's numbers, made in a temporary directory: never the real one
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device needs root")


@pytest.mark.parametrize("kind", ["fifo", "char-device"])
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("via", ["named", "symlink"])
def test_output_that_is_not_a_regular_file_is_refused_before_any_work(
    tmp_path, capsys, model_bytes, fmt, kind, via
):
    src = _input(tmp_path, model_bytes, fmt)
    special = tmp_path / f"special.{fmt}"
    _special(special, kind)
    out = special
    if via == "symlink":
        out = tmp_path / f"link.{fmt}"
        out.symlink_to(special.name)
    before = listing(tmp_path)
    assert main([str(src), "-o", str(out)]) == 1
    refused_before_any_work(capsys, "not a regular file")
    assert listing(tmp_path) == before  # the pipe or device is still one, nothing added


@pytest.mark.parametrize(
    "fmt, name", [("onnx", "out.pt2"), ("onnx", "out.PT2"), ("pt2", "out.onnx")]
)
def test_output_suffix_of_the_other_format_is_refused(tmp_path, capsys, model_bytes, fmt, name):
    src = _input(tmp_path, model_bytes, fmt)
    before = listing(tmp_path)
    assert main([str(src), "-o", str(tmp_path / name)]) == 1
    refused_before_any_work(capsys, "does not convert between formats")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_symlink_to_a_name_of_the_other_format_is_refused(tmp_path, capsys, model_bytes, fmt):
    src = _input(tmp_path, model_bytes, fmt)
    other = "pt2" if fmt == "onnx" else "onnx"
    (tmp_path / "out").symlink_to(f"target.{other}")
    before = listing(tmp_path)
    assert main([str(src), "-o", str(tmp_path / "out")]) == 1
    refused_before_any_work(capsys, f"target.{other}")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_output_without_a_known_suffix_is_written(tmp_path, capsys, model_bytes, fmt):
    src = _input(tmp_path, model_bytes, fmt)
    out = tmp_path / "folded.bin"
    assert main([str(src), "-o", str(out)]) == 0
    assert "1 of 1 BatchNorm folded" in capsys.readouterr().out
    assert out.read_bytes().startswith(b"PK\x03\x04" if fmt == "pt2" else b"\x08")


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_pt2_output_linked_to_the_input(tmp_path, capsys, model_bytes, how):
    """A symbolic link to the input is a write over the input (the link is followed, as for
    any output); a hard link is another name, replaced while the input keeps its content."""
    src = _input(tmp_path, model_bytes, "pt2")
    out = tmp_path / "out.pt2"
    if how == "symlink":
        out.symlink_to(src.name)
    else:
        os.link(src, out)
    assert main([str(src), "-o", str(out)]) == 0
    assert "1 of 1 BatchNorm folded" in capsys.readouterr().out
    if how == "symlink":
        assert out.is_symlink() and src.read_bytes() != model_bytes["pt2"]
    else:
        assert src.read_bytes() == model_bytes["pt2"] and out.read_bytes() != src.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["in.pt2", "out.pt2"]
