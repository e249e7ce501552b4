"""`bnfold MODEL.pt2 -o OUT.pt2 [--verify] [--report]`: fold torch.export archives from the shell.

Every run checks the exit status, that errors are one line, and what is (or is not) on disk
afterwards: a failed run writes nothing and never touches the input.
"""

from __future__ import annotations

import os
import zipfile

import pytest
import torch
from support import randomize_all
from torch import nn

import bnfold
from bnfold import torch_export, torch_pt2
from bnfold.cli import main


class Net(nn.Module):
    """Conv + BN, grouped ConvTranspose + BN, Linear + BN1d, and a BN that cannot fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.bn2 = nn.BatchNorm2d(6)
        self.bn3 = nn.BatchNorm2d(6)  # after a ReLU: no producer
        self.fc = nn.Linear(6, 5)
        self.bn4 = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.up(self.bn1(self.conv(x))))
        y = self.bn3(torch.relu(y)).mean((2, 3))
        return self.bn4(self.fc(y))


def _inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return randomize_all(Net(), seed=3)


@pytest.fixture(scope="module")
def program_file(tmp_path_factory, model) -> str:
    path = tmp_path_factory.mktemp("pt2") / "net.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, _inputs(), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))
    return str(path)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("bnfold: error:"), err
    assert err.count("\n") == 1, err
    return err


def _files(directory) -> set[str]:
    return set(os.listdir(directory))


def test_fold_verify_report_and_write(tmp_path, program_file, model, capsys):
    out = tmp_path / "folded.pt2"
    before = open(program_file, "rb").read()
    assert main([program_file, "-o", str(out), "--verify", "--report"]) == 0
    text = capsys.readouterr().out
    assert "3 of 4 BatchNorms folded, 1 kept" in text
    assert "bn3" in text and "[no-producer]" in text
    assert "verified on random inputs" in text and f"wrote {out}" in text
    assert open(program_file, "rb").read() == before  # the input is untouched

    folded = torch.export.load(str(out))
    names = [str(n.target) for n in folded.graph.nodes if n.op == "call_function"]
    assert sum("batch_norm" in n for n in names) == 1
    assert not any(k.startswith(("bn1.", "bn2.", "bn4.")) for k in folded.state_dict)
    for batch in (1, 5):  # the dynamic batch dimension survived
        x = _inputs(batch, seed=9)
        with torch.no_grad():
            expected, actual = model(*x), folded.module()(*x)
        err = (expected - actual).abs().max() / expected.abs().max()
        assert err <= 1e-5


def test_without_output_nothing_is_written(tmp_path, program_file, capsys):
    listing = _files(os.path.dirname(program_file))
    assert main([program_file]) == 0
    assert "3 of 4 BatchNorms folded" in capsys.readouterr().out
    assert _files(os.path.dirname(program_file)) == listing


def test_output_may_replace_the_input_when_named(tmp_path, program_file, model, capsys):
    path = tmp_path / "same.pt2"
    path.write_bytes(open(program_file, "rb").read())
    assert main([str(path), "-o", str(path)]) == 0
    folded = torch.export.load(str(path))
    x = _inputs(3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(folded.module()(*x), model(*x), rtol=1e-5, atol=1e-5)
    assert _files(tmp_path) == {"same.pt2"}


def test_producers_option_limits_the_folds(tmp_path, program_file, capsys):
    assert main([program_file, "--producers", "linear", "--report"]) == 0
    text = capsys.readouterr().out
    assert "1 of 4 BatchNorms folded" in text and "[not-selected]" in text
    assert main([program_file, "--producers", "conv,nope"]) == 2
    _one_line_error(capsys)


@pytest.mark.parametrize(
    "content, name",
    [
        (None, "missing.pt2"),
        (b"", "empty.pt2"),
        (b"\x00\x01garbage" * 50, "random.pt2"),
        (b"PK\x03\x04" + b"\x00" * 200, "fake-zip.pt2"),
        (b"just some text\n", "notes.txt"),
        (b"\x08\x07\x12\x04", "model.onnx"),
    ],
    ids=["missing", "empty", "random", "fake-zip", "text", "onnx"],
)
def test_bad_input_files_give_one_line_errors(tmp_path, content, name, capsys):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out.pt2"
    assert main([str(path), "-o", str(out), "--verify"]) == 1
    _one_line_error(capsys)
    assert not out.exists()


def test_truncated_archive_gives_one_line_error(tmp_path, program_file, capsys):
    data = open(program_file, "rb").read()
    out = tmp_path / "out.pt2"
    for cut in (len(data) // 3, len(data) - 100):
        path = tmp_path / f"cut{cut}.pt2"
        path.write_bytes(data[:cut])
        assert main([str(path), "-o", str(out)]) == 1
        _one_line_error(capsys)
        assert not out.exists()


def test_a_directory_is_not_a_model(tmp_path, capsys):
    assert main([str(tmp_path), "-o", str(tmp_path / "o.pt2")]) == 1
    _one_line_error(capsys)


def test_missing_output_directory_is_an_error(tmp_path, program_file, capsys):
    assert main([program_file, "-o", str(tmp_path / "no" / "such" / "dir.pt2")]) == 1
    _one_line_error(capsys)
    assert _files(tmp_path) == set()


def test_failed_verification_writes_nothing(tmp_path, program_file, monkeypatch, capsys):
    real_fold = torch_export.fold

    def corrupting_fold(model, *args, **kwargs):
        folded, report = real_fold(model, *args, **kwargs)
        key = next(k for k in folded.state_dict if k.endswith("weight"))
        # A wrong fold, as a buggy tool would make. A new tensor: the folded program shares
        # the tensors it did not change with the original.
        folded.state_dict[key] = nn.Parameter(folded.state_dict[key].detach() * 1.01)
        return folded, report

    monkeypatch.setattr(torch_export, "fold", corrupting_fold)
    out = tmp_path / "out.pt2"
    out.write_bytes(b"previous result")
    assert main([program_file, "-o", str(out), "--verify"]) == 1
    err = _one_line_error(capsys)
    assert "verification failed" in err
    assert out.read_bytes() == b"previous result"
    assert _files(tmp_path) == {"out.pt2"}


def test_failure_while_writing_leaves_no_partial_file(tmp_path, program_file, monkeypatch, capsys):
    def failing_save(ep, f, extra_files=None):
        f.write(b"half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch_pt2, "save", failing_save)
    out = tmp_path / "out.pt2"
    out.write_bytes(b"previous result")
    assert main([program_file, "-o", str(out)]) == 1
    assert "No space left on device" in _one_line_error(capsys)
    assert out.read_bytes() == b"previous result"
    assert _files(tmp_path) == {"out.pt2"}


def test_written_file_has_normal_permissions(tmp_path, program_file, capsys):
    out = tmp_path / "out.pt2"
    assert main([program_file, "-o", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_random_inputs_from_specs_when_the_program_kept_no_examples(program_file):
    ep = torch_pt2.load(program_file).program
    ep.example_inputs = None
    args, kwargs = torch_pt2.sample_inputs(ep, seed=1)
    assert kwargs == {} and len(args) == 1
    assert args[0].shape[1:] == (3, 8, 8) and 1 <= args[0].shape[0] <= 64
    folded = bnfold.fold(ep)
    result = torch_pt2.check(ep, folded, seed=1)
    assert result.passed and result.max_rel <= 1e-5 and result.tolerance == 1e-4


def test_random_inputs_keep_integer_inputs(tmp_path):
    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 3)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(self.emb(idx).mean(1) * scale))

    model = randomize_all(Embed(), seed=0)
    idx = torch.randint(0, 10, (4, 6))
    ep = torch.export.export(model, (idx, torch.randn(4, 1)))
    args, _ = torch_pt2.sample_inputs(ep, seed=2)
    assert torch.equal(args[0], idx)  # indices kept, so they stay in range
    path = tmp_path / "embed.pt2"
    torch.export.save(ep, str(path))
    assert main([str(path), "-o", str(tmp_path / "f.pt2"), "--verify"]) == 0


def test_extra_files_travel_with_the_folded_program(tmp_path, model, capsys):
    src, out = tmp_path / "in.pt2", tmp_path / "out.pt2"
    ep = torch.export.export(model, _inputs())
    torch.export.save(ep, str(src), extra_files={"labels.json": '["cat", "dog"]'})
    assert main([str(src), "-o", str(out)]) == 0
    extra = {"labels.json": ""}
    torch.export.load(str(out), extra_files=extra)
    assert extra == {"labels.json": '["cat", "dog"]'}


def test_archive_with_several_programs_is_refused(tmp_path, model, capsys):
    package = pytest.importorskip("torch.export.pt2_archive._package")
    src, out = tmp_path / "two.pt2", tmp_path / "out.pt2"
    ep = torch.export.export(model, _inputs())
    package.package_pt2(str(src), exported_programs={"model": ep, "decoder": ep})
    assert main([str(src), "-o", str(out)]) == 1
    assert "decoder, model" in _one_line_error(capsys)
    assert not out.exists()


def test_archive_declaring_absurd_sizes_is_refused_before_inflating(tmp_path, program_file, capsys):
    data = bytearray(open(program_file, "rb").read())
    # Forge the first central-directory entry's uncompressed size to 3 GiB.
    with zipfile.ZipFile(program_file) as z:
        at = z.start_dir
    assert data[at : at + 4] == b"PK\x01\x02"
    data[at + 24 : at + 28] = (3 * 2**30).to_bytes(4, "little")
    path = tmp_path / "bomb.pt2"
    path.write_bytes(bytes(data))
    out = tmp_path / "out.pt2"
    assert main([str(path), "-o", str(out)]) == 1
    assert "refusing to inflate" in _one_line_error(capsys)
    assert not out.exists()


def test_symlinked_output_writes_through_the_link(tmp_path, program_file, capsys):
    real, link = tmp_path / "real.pt2", tmp_path / "link.pt2"
    real.write_bytes(b"old")
    link.symlink_to(real)
    assert main([program_file, "-o", str(link)]) == 0
    assert link.is_symlink() and real.read_bytes() != b"old"
    torch.export.load(str(real))
    assert _files(tmp_path) == {"real.pt2", "link.pt2"}


def test_output_that_names_a_directory_fails_before_any_work(tmp_path, program_file, capsys):
    assert main([program_file, "-o", str(tmp_path / "newdir") + os.sep]) == 1
    err = _one_line_error(capsys)
    assert "a file name is needed" in err
    assert "folded" not in capsys.readouterr().out
    assert _files(tmp_path) == set()


def test_newline_in_a_file_name_keeps_the_error_on_one_line(tmp_path, capsys):
    path = tmp_path / "bad\nname.pt2"
    path.write_bytes(b"not a zip")
    assert main([str(path)]) == 1
    _one_line_error(capsys)
