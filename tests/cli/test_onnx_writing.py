"""Output files of the command line: names too long for the file system (and the temporary names
written first), the mode of an overwritten output and of a new one, outputs or data files that
are the input model or its data files (refused before any work), data files that are not
regular files, and writing over the input itself (allowed, the input's data file untouched).

Every command-line run checks the exit status, that an error is one line on stderr, and what is
(or is not) on disk afterwards.
"""

from __future__ import annotations

import os

import onnx
import pytest

import bnfold
from bnfold.cli import main
from bnfold.onnx import files as onnx_files
from tests.helpers.cli import listing, one_line_error, refused_before_any_work
from tests.helpers.cli_models import (
    conv_bn,
    save_external,
)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_overlong_file_names_are_one_line_errors(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn(), str(src))
    names = sorted(os.listdir(tmp_path))

    long_input = tmp_path / ("b" * 295 + ".onnx")  # 300 bytes
    assert main([str(long_input), "-o", str(tmp_path / "x.onnx")]) == 1
    one_line_error(capsys)
    long_output = tmp_path / ("a" * 255 + ".onnx")  # 260 bytes
    assert main([str(src), "-o", str(long_output)]) == 1
    one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == names

    # 240 bytes fits, and so must the temporary names bnfold writes first
    ok = tmp_path / ("d" * 235 + ".onnx")
    assert len(ok.name) == 240
    assert main([str(src), "-o", str(ok)]) == 0
    assert capsys.readouterr().err == ""
    assert sorted(os.listdir(tmp_path)) == sorted([*names, ok.name])
    assert onnx_files.check(src, onnx_files.load(ok).model).passed


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_overwritten_output_keeps_its_mode_and_new_output_gets_umask(tmp_path, capsys, external):
    src = tmp_path / "m.onnx"
    if external:
        save_external(conv_bn(c=16), src)  # a weight over 1 KiB: a data file is written
    else:
        onnx.save(conv_bn(), str(src))
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
    _save_data_in(conv_bn(), src, "w.bin")
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
    _save_data_in(conv_bn(), src, "w.bin")
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
    _save_data_in(conv_bn(), src, "b.onnx.data")
    before = listing(tmp_path)
    assert main([str(src), "-o", str(tmp_path / "b.onnx"), "--verify"]) == 1
    refused_before_any_work(capsys, "reads its weights from that file")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink-to-fifo"])
def test_output_data_file_that_is_not_a_regular_file_is_refused(tmp_path, capsys, kind):
    src = tmp_path / "m.onnx"
    save_external(conv_bn(), src)
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
    _save_data_in(conv_bn(), original / "m.onnx.data", "w.bin")
    src = tmp_path / "m.onnx.data"
    _save_data_in(conv_bn(), src, "w.bin")
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
    _save_data_in(conv_bn(), src, "w.bin")
    loaded = onnx_files.load(src)
    before = listing(tmp_path)
    with pytest.raises(bnfold.ModelFileError, match="it is the input model"):
        onnx_files.save(
            loaded.model, tmp_path / "m.onnx", external_data=True, reads_from=loaded.external_files
        )
    assert listing(tmp_path) == before


def test_long_output_name_with_external_data_fits(tmp_path, capsys):
    """-o of 245 characters with external data: OUT.data (250) fits NAME_MAX, but onnx_ir's
    temporary name for it (a dot, the name, a dot and 8 characters) did not."""
    src = tmp_path / "m.onnx"
    save_external(conv_bn(c=16), src)  # the weight, 1728 bytes, goes to the data file
    out = tmp_path / ("e" * 240 + ".onnx")
    assert main([str(src), "-o", str(out), "--verify"]) == 0
    assert capsys.readouterr().err == ""
    data = out.with_name(out.name + ".data")
    assert data.stat().st_size > 1024
    assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", "m.onnx.data", out.name, data.name])
    assert onnx_files.check(src, onnx_files.load(out).model).passed
