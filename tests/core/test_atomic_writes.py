"""bnfold.core.files: one file or a model and its data file, written atomically (no framework):
no partial or temporary file after a failure, the targets as they were, modes kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bnfold.core.files import write_atomically, write_pair_atomically
from bnfold.errors import InvalidArgumentError, ModelFileError
from tests.helpers.cli import listing


def _pair(model: bytes, data: bytes):
    """A writer of the two files, as an ONNX writer would leave them in the directory."""

    def write(tmp: Path) -> tuple[Path, Path]:
        (tmp / "m.onnx").write_bytes(model)
        (tmp / "m.onnx.data").write_bytes(data)
        return tmp / "m.onnx", tmp / "m.onnx.data"

    return write


def _targets(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "m.onnx", tmp_path / "m.onnx.data"


def _normal_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_pair_written_with_normal_modes_and_nothing_else(tmp_path):
    model, data = _targets(tmp_path)
    write_pair_atomically(model, data, _pair(b"model", b"weights"))
    assert model.read_bytes() == b"model" and data.read_bytes() == b"weights"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert model.stat().st_mode & 0o7777 == data.stat().st_mode & 0o7777 == _normal_mode()


def test_replaced_pair_keeps_the_old_files_modes(tmp_path):
    model, data = _targets(tmp_path)
    model.write_bytes(b"old model")
    data.write_bytes(b"old weights")
    model.chmod(0o600)
    data.chmod(0o640)
    write_pair_atomically(model, data, _pair(b"model", b"weights"))
    assert (model.read_bytes(), data.read_bytes()) == (b"model", b"weights")
    assert (model.stat().st_mode & 0o7777, data.stat().st_mode & 0o7777) == (0o600, 0o640)


def test_empty_data_file_is_not_written_and_an_old_one_is_left(tmp_path):
    model, data = _targets(tmp_path)
    data.write_bytes(b"someone's weights")
    write_pair_atomically(model, data, _pair(b"model", b""))
    assert model.read_bytes() == b"model" and data.read_bytes() == b"someone's weights"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


def test_hook_runs_before_the_old_data_file_is_replaced(tmp_path):
    model, data = _targets(tmp_path)
    data.write_bytes(b"old weights")
    seen = []
    write_pair_atomically(
        model, data, _pair(b"model", b"weights"), lambda: seen.append(data.read_bytes())
    )
    assert seen == [b"old weights"] and data.read_bytes() == b"weights"
    write_pair_atomically(model, data, _pair(b"model", b""), lambda: seen.append("again"))
    assert seen == [b"old weights"]  # no data file written, none replaced


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("no_hard_links", [False, True])
def test_failed_model_rename_puts_the_old_data_file_back(
    tmp_path, monkeypatch, existing, no_hard_links
):
    model, data = _targets(tmp_path)
    if existing:
        model.write_bytes(b"old model")
        data.write_bytes(b"old weights")
    before = listing(tmp_path)
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        if os.fspath(dst) == os.fspath(model):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, **kwargs)

    def no_link(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "replace", replace)
    if no_hard_links:  # the old data file is moved aside instead, and moved back
        monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(ModelFileError) as excinfo:
        write_pair_atomically(model, data, _pair(b"model", b"weights"))
    monkeypatch.undo()
    assert str(excinfo.value) == f"cannot write {model}: No space left on device"
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "error, message",
    [
        (RuntimeError("boom"), "cannot write {}: RuntimeError: boom"),
        (OSError(5, "Input/output error"), "cannot write {}: Input/output error"),
    ],
)
def test_failed_write_leaves_the_directory_as_it_was(tmp_path, error, message):
    model, data = _targets(tmp_path)
    model.write_bytes(b"old model")
    before = listing(tmp_path)

    def write(tmp: Path) -> tuple[Path, Path]:
        (tmp / "m.onnx.data").write_bytes(b"half")
        raise error

    with pytest.raises(ModelFileError) as excinfo:
        write_pair_atomically(model, data, write)
    assert str(excinfo.value) == message.format(model)
    assert listing(tmp_path) == before


def test_bnfold_errors_and_interrupts_pass_through(tmp_path):
    model, data = _targets(tmp_path)
    for error in (InvalidArgumentError("as it is"), KeyboardInterrupt()):

        def write(tmp: Path, error=error) -> tuple[Path, Path]:
            raise error

        with pytest.raises(type(error)) as excinfo:
            write_pair_atomically(model, data, write)
        assert excinfo.value is error
    assert os.listdir(tmp_path) == []


def test_no_temporary_directory_is_a_one_line_error(tmp_path, monkeypatch):
    import tempfile

    def refuse(**kwargs):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    model, data = _targets(tmp_path)
    with pytest.raises(ModelFileError) as excinfo:
        write_pair_atomically(model, data, _pair(b"m", b"d"))
    assert str(excinfo.value) == f"cannot write to {tmp_path}: Permission denied"


def test_single_file_failure_leaves_no_partial_file(tmp_path):
    out = tmp_path / "out.pt2"
    out.write_bytes(b"previous")

    def write(f):
        f.write(b"half an archive")
        raise OSError(28, "No space left on device")

    with pytest.raises(ModelFileError, match="No space left on device"):
        write_atomically(out, write)
    assert os.listdir(tmp_path) == ["out.pt2"] and out.read_bytes() == b"previous"


@pytest.mark.parametrize("hold_back", [False, True])
def test_held_back_errors_are_raised_after_the_writer_returns(tmp_path, hold_back):
    """A writer that cannot survive a failed write (torch's zip writer) is told it succeeded
    and runs to its end; the failure (here: the file size limit) is raised after it."""
    import resource

    out = tmp_path / "out.pt2"
    out.write_bytes(b"previous")
    reached = []

    def write(f):
        for i in range(64):
            f.write(b"x" * 2**16)  # 4 MiB in all, past the limit below
            reached.append(i)
        f.seek(0)
        reached.append(f.tell())

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limits[1]))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(ModelFileError, match="File too large"):
            write_atomically(out, write, hold_back_errors=hold_back)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert reached == ([*range(64), 0] if hold_back else list(range(16)))
    assert os.listdir(tmp_path) == ["out.pt2"] and out.read_bytes() == b"previous"
