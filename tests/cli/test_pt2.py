"""`bnfold MODEL.pt2 -o OUT.pt2 [--verify] [--report]`: fold torch.export archives from the shell.

Every run checks the exit status, that errors are one line, and what is (or is not) on disk
afterwards: a failed run writes nothing and never touches the input.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.core import rules
from bnfold.torch import export as torch_export
from bnfold.torch import pt2 as torch_pt2
from tests.helpers.check import check_report
from tests.helpers.cli import one_line_error
from tests.helpers.support import randomize_all


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


# What Net folds into what, and why bn3 stays.
FOLDS = {
    "bn1": ("folded", "conv"),
    "bn2": ("folded", "up"),
    "bn3": ("skipped", rules.NO_PRODUCER),
    "bn4": ("folded", "fc"),
}


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
    one_line_error(capsys)


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
    one_line_error(capsys)
    assert not out.exists()


def test_truncated_archive_gives_one_line_error(tmp_path, program_file, capsys):
    data = open(program_file, "rb").read()
    out = tmp_path / "out.pt2"
    for cut in (len(data) // 3, len(data) - 100):
        path = tmp_path / f"cut{cut}.pt2"
        path.write_bytes(data[:cut])
        assert main([str(path), "-o", str(out)]) == 1
        one_line_error(capsys)
        assert not out.exists()


def test_a_directory_is_not_a_model(tmp_path, capsys):
    assert main([str(tmp_path), "-o", str(tmp_path / "o.pt2")]) == 1
    one_line_error(capsys)


def test_missing_output_directory_is_an_error(tmp_path, program_file, capsys):
    assert main([program_file, "-o", str(tmp_path / "no" / "such" / "dir.pt2")]) == 1
    one_line_error(capsys)
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
    err = one_line_error(capsys)
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
    assert "No space left on device" in one_line_error(capsys)
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
    folded, report = bnfold.fold(ep, return_report=True)
    check_report(report, FOLDS)
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
    assert "decoder, model" in one_line_error(capsys)
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
    assert "refusing to inflate" in one_line_error(capsys)
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
    err = one_line_error(capsys)
    assert "a file name is needed" in err
    assert "folded" not in capsys.readouterr().out
    assert _files(tmp_path) == set()


def test_newline_in_a_file_name_keeps_the_error_on_one_line(tmp_path, capsys):
    path = tmp_path / "bad\nname.pt2"
    path.write_bytes(b"not a zip")
    assert main([str(path)]) == 1
    one_line_error(capsys)


# --- Archives that would make torch run code or allocate far more than their size -----------
#
# Each bad archive is a real torch.export.save archive with members changed. A pickle in them
# creates the file PWNED in the working directory when unpickled: it stands for any code.

PWNED = "bnfold-test-pwned"


class _Pwn:
    """Unpickled, creates PWNED in the working directory."""

    def __reduce__(self) -> tuple:
        return (open, (PWNED, "w"))


def _raw_pickle() -> bytes:
    return pickle.dumps(_Pwn())


def _torch_pickle() -> bytes:
    buf = io.BytesIO()
    torch.save(_Pwn(), buf)
    return buf.getvalue()


def _members(path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _pack(path, members, compression: int = zipfile.ZIP_STORED) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compression  # and no directory flag, even for "name/"
            z.writestr(info, data)
    return str(path)


def _index(members, suffix: str) -> int:
    return next(i for i, (name, _) in enumerate(members) if name.endswith(suffix))


def _edit_json(members, suffix: str, edit) -> None:
    i = _index(members, suffix)
    value = json.loads(members[i][1])
    edit(value)
    members[i] = (members[i][0], json.dumps(value).encode())


def _top(members) -> str:
    return members[0][0].split("/")[0]


def _run_refused(tmp_path, monkeypatch, path: str, capsys, *extra: str) -> str:
    """Run bnfold on ``path`` (from tmp_path, where a pickle would drop PWNED): one error line,
    exit 1, nothing written, no code run."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.pt2"
    assert main([path, "-o", str(out), "--verify", *extra]) == 1
    err = one_line_error(capsys)
    assert not (tmp_path / PWNED).exists()
    assert not out.exists()
    return err


def test_state_pickled_as_torch_2_8_saved_it_loads_when_it_is_plain_tensors(
    tmp_path, program_file, capsys
):
    # torch 2.8 and 2.9 wrote data/weights/model.pt and data/constants/model.pt (torch.save).
    serde = pytest.importorskip("torch._export.serde.serialize")
    artifact = serde.serialize(torch_pt2.load(program_file).program)
    members = [
        (name, data)
        for name, data in _members(program_file)
        if "/data/weights/" not in name and "/data/constants/" not in name
    ]
    top = _top(members)
    members.append((f"{top}/data/weights/model.pt", artifact.state_dict))
    members.append((f"{top}/data/constants/model.pt", artifact.constants))
    path, out = _pack(tmp_path / "in.pt2", members), tmp_path / "out.pt2"
    assert main([path, "-o", str(out), "--verify"]) == 0
    assert "verified on random inputs" in capsys.readouterr().out


@pytest.mark.parametrize("payload", [_raw_pickle, _torch_pickle], ids=["pickle", "torch-save"])
def test_pickled_sample_inputs_are_dropped_not_unpickled(
    tmp_path, monkeypatch, program_file, payload, capsys
):
    members = _members(program_file)
    i = _index(members, "data/sample_inputs/model.pt")
    members[i] = (members[i][0], payload())
    path = _pack(tmp_path / "in.pt2", members)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.pt2"
    assert main([path, "-o", str(out), "--verify"]) == 0  # random inputs from the input specs
    assert "verified on random inputs" in capsys.readouterr().out
    assert not (tmp_path / PWNED).exists()
    assert torch_pt2.load(path).program.example_inputs is None
    assert torch_pt2.load(str(out)).program.module() is not None


def test_sample_inputs_found_whatever_the_case_of_their_name(tmp_path, monkeypatch, program_file):
    # torch's zip reader looks names up ignoring case: the check must see what torch reads.
    members = _members(program_file)
    i = _index(members, "data/sample_inputs/model.pt")
    members[i] = (
        members[i][0].replace("sample_inputs/model", "Sample_Inputs/MODEL"),
        _raw_pickle(),
    )
    path = _pack(tmp_path / "in.pt2", members)
    monkeypatch.chdir(tmp_path)
    assert main([path, "--verify"]) == 0
    assert not (tmp_path / PWNED).exists()


def test_members_whose_names_differ_only_in_case_are_refused(
    tmp_path, monkeypatch, program_file, capsys
):
    members = _members(program_file)
    members.append((f"{_top(members)}/data/Sample_Inputs/model.pt", _raw_pickle()))
    path = _pack(tmp_path / "in.pt2", members)
    assert "two members named" in _run_refused(tmp_path, monkeypatch, path, capsys)


def test_weight_stored_as_a_pickle_is_refused(tmp_path, monkeypatch, program_file, capsys):
    members = _members(program_file)
    files = []

    def use_pickle(config):
        meta = config["config"]["bn1.running_mean"]
        meta["use_pickle"] = True
        files.append(meta["path_name"])

    _edit_json(members, "model_weights_config.json", use_pickle)
    i = _index(members, f"data/weights/{files[0]}")
    members[i] = (members[i][0], _torch_pickle())
    path = _pack(tmp_path / "in.pt2", members)
    err = _run_refused(tmp_path, monkeypatch, path, capsys)
    assert "bn1.running_mean as a Python pickle" in err and "does not unpickle" in err


@pytest.mark.parametrize("kind", ["weights", "constants"])
def test_state_pickled_as_torch_2_8_saved_it_is_refused_when_it_runs_code(
    tmp_path, monkeypatch, program_file, kind, capsys
):
    members = _members(program_file)
    members.append((f"{_top(members)}/data/{kind}/model.pt", _torch_pickle()))
    path = _pack(tmp_path / "in.pt2", members)
    assert "does not unpickle" in _run_refused(tmp_path, monkeypatch, path, capsys)


@pytest.mark.parametrize(
    "file, expected",
    [
        ("opaque_obj_0", "not a tensor"),
        ("custom_obj_0", "not a tensor"),
        ("tensor_0", "as a Python pickle"),
    ],
    ids=["opaque-object", "script-object", "pickled-tensor"],
)
def test_constants_read_by_unpickling_are_refused(
    tmp_path, monkeypatch, program_file, file, expected, capsys
):
    members = _members(program_file)

    def add(config):
        config.setdefault("config", {})["evil"] = {
            "path_name": file,
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }

    _edit_json(members, "model_constants_config.json", add)
    members.append((f"{_top(members)}/data/constants/{file}", _raw_pickle()))
    path = _pack(tmp_path / "in.pt2", members)
    err = _run_refused(tmp_path, monkeypatch, path, capsys)
    assert "evil" in err and expected in err and "does not unpickle" in err


def test_weight_declaring_more_bytes_than_stored_is_refused(
    tmp_path, monkeypatch, program_file, capsys
):
    # torch fills an empty weight member with zeros of the declared size: 256 MiB here.
    members = _members(program_file)
    files = []

    def grow(config):
        meta = config["config"]["bn1.running_var"]
        meta["tensor_meta"]["sizes"] = [{"as_int": 2**26}]
        files.append(meta["path_name"])

    _edit_json(members, "model_weights_config.json", grow)
    i = _index(members, f"data/weights/{files[0]}")
    members[i] = (members[i][0], b"")
    path = _pack(tmp_path / "in.pt2", members)
    err = _run_refused(tmp_path, monkeypatch, path, capsys)
    assert f"declares {2**28} bytes" in err and "stores 0" in err


def test_weight_without_elements_over_stored_bytes_is_refused(
    tmp_path, monkeypatch, program_file, capsys
):
    # torch.export.save stores such a tensor as an empty member and fails to write this one back.
    members = _members(program_file)

    def empty(config):
        config["config"]["bn1.bias"]["tensor_meta"]["sizes"] = [{"as_int": 0}]

    _edit_json(members, "model_weights_config.json", empty)
    path = _pack(tmp_path / "in.pt2", members)
    assert "bn1.bias has no elements" in _run_refused(tmp_path, monkeypatch, path, capsys)


@pytest.mark.parametrize(
    "edit",
    [
        {"dtype": 2},
        {"sizes": [{"as_int": 4}, {"as_int": 2}], "strides": [{"as_int": 2}, {"as_int": 1}]},
    ],
    ids=["dtype", "shape"],
)
def test_weight_stored_unlike_the_program_declares_is_refused(
    tmp_path, monkeypatch, program_file, edit, capsys
):
    # The program then runs (or is written) with a tensor its graph does not expect.
    members = _members(program_file)
    _edit_json(
        members,
        "model_weights_config.json",
        lambda config: config["config"]["bn1.running_var"]["tensor_meta"].update(edit),
    )
    path = _pack(tmp_path / "in.pt2", members)
    err = _run_refused(tmp_path, monkeypatch, path, capsys)
    assert "bn1.running_var is stored as" in err and "the program declares torch.float32 [8]" in err


def test_directory_entry_under_extra_is_not_an_extra_file(tmp_path, program_file):
    # torch lists it as an extra file named "", which torch.export.save cannot write.
    members = _members(program_file)
    members.append((f"{_top(members)}/extra/", b""))
    path, out = _pack(tmp_path / "in.pt2", members), tmp_path / "out.pt2"
    assert main([path, "-o", str(out)]) == 0
    assert torch_pt2.load(str(out)).extra_files == {}


@pytest.mark.parametrize("flagged", [False, True], ids=["slash", "dos-attribute"])
def test_directory_entry_holding_data_is_refused(
    tmp_path, monkeypatch, program_file, flagged, capsys
):
    # torch's reader hands out uninitialized memory as its data: a different result each run.
    path = tmp_path / "in.pt2"
    members = _members(program_file)
    _pack(path, members)
    name = f"{_top(members)}/extra/" + ("notes.txt" if flagged else "")
    with zipfile.ZipFile(path, "a") as z:
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0x10 if flagged else 0
        z.writestr(info, b"hello")
    assert "directory entry" in _run_refused(tmp_path, monkeypatch, str(path), capsys)


def test_deflated_extra_file_bomb_is_refused(tmp_path, monkeypatch, program_file, capsys):
    path = tmp_path / "in.pt2"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in _members(program_file):
            z.writestr(name, data)
        info = zipfile.ZipInfo(f"{_top(_members(program_file))}/extra/note.txt")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w") as f:
            chunk = b"\0" * 2**20
            for _ in range(64):  # 64 MiB of zeros in about 64 KiB
                f.write(chunk)
    assert path.stat().st_size < 2**20
    assert "refusing to inflate" in _run_refused(tmp_path, monkeypatch, str(path), capsys)


def test_an_archive_repacked_with_compression_still_loads(tmp_path, program_file, capsys):
    path = _pack(tmp_path / "deflated.pt2", _members(program_file), zipfile.ZIP_DEFLATED)
    assert main([path, "--verify"]) == 0


def _expr_payload(program) -> None:
    text = json.dumps(program)
    symbol = re.search(r"Symbol\('s\d+'[^)]*\)", text).group(0)
    evil = f"__import__('builtins').open('{PWNED}', 'w') and {symbol}"
    program.clear()
    program.update(json.loads(text.replace(json.dumps(symbol)[1:-1], json.dumps(evil)[1:-1], 1)))


def _guard_payload(program) -> None:
    program["guards_code"] = [f"__import__('builtins').open('{PWNED}', 'w') is not None"]


_EVIL_NAME = f'x") if 0 else open("{PWNED}", "w") or ("'


def _name_payload(program) -> None:
    for spec in program["graph_module"]["signature"]["input_specs"]:
        if spec.get("buffer", {}).get("buffer_name") == "bn1.running_mean":
            spec["buffer"]["buffer_name"] = _EVIL_NAME


def _argument_names_payload(program) -> None:
    signature = program["graph_module"]["module_call_graph"][0]["signature"]
    signature["forward_arg_names"] = [f"x:open('{PWNED}', 'w')"]


@pytest.mark.parametrize(
    "edit, what",
    [
        (_expr_payload, "a symbolic size"),
        (_guard_payload, "a shape guard"),
        (_name_payload, "a name"),
        (_argument_names_payload, "a name (forward_arg_names)"),
    ],
    ids=["sympy-expression", "guard", "state-name", "argument-name"],
)
def test_program_strings_torch_runs_as_code_are_refused(
    tmp_path, monkeypatch, program_file, edit, what, capsys
):
    # torch parses symbolic sizes with sympy (an eval), exec's guards in .module(), and pastes
    # state names into the Python code torch.fx generates: each ran the payload before.
    members = _members(program_file)
    _edit_json(members, "models/model.json", edit)
    if edit is _name_payload:

        def rename(config):
            config["config"][_EVIL_NAME] = config["config"].pop("bn1.running_mean")

        _edit_json(members, "model_weights_config.json", rename)
    path = _pack(tmp_path / "in.pt2", members)
    err = _run_refused(tmp_path, monkeypatch, path, capsys)
    assert what in err and "run it as Python code" in err


def test_keyword_input_name_that_is_code_is_refused(tmp_path, monkeypatch, capsys):
    # torch.fx pastes the keys of keyword inputs into the generated forward; without sample
    # inputs, --verify calls it with those keys.
    model = randomize_all(_Stateful(), seed=1).eval()
    ep = torch.export.export(model, (torch.randn(1, 3, 4, 4),), {"shift": torch.randn(1)})
    torch.export.save(ep, str(tmp_path / "kw.pt2"))
    members = _members(tmp_path / "kw.pt2")
    evil = f"shift'+str(open('{PWNED}', 'w'))+'"

    def rename(program):
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        quoted = json.dumps(json.dumps(["shift"]))[1:-1]
        signature["in_spec"] = signature["in_spec"].replace(
            quoted, json.dumps(json.dumps([evil]))[1:-1]
        )
        assert evil in json.dumps(json.loads(signature["in_spec"]))

    _edit_json(members, "models/model.json", rename)
    i = _index(members, "data/sample_inputs/model.pt")
    members[i] = (members[i][0], b"")
    path = _pack(tmp_path / "in.pt2", members)
    err = _run_refused(tmp_path, monkeypatch, path, capsys)
    assert "a name in the program's in_spec" in err


def test_archive_with_compiled_code_is_refused(tmp_path, monkeypatch, program_file, capsys):
    members = _members(program_file)
    members.append((f"{_top(members)}/data/aotinductor/model/model.so", b"\x7fELF"))
    path = _pack(tmp_path / "in.pt2", members)
    assert "AOTInductor" in _run_refused(tmp_path, monkeypatch, path, capsys)


def _old_layout(path, ep, **replace: bytes) -> str:
    """``ep`` in the layout torch < 2.8 wrote (members at the zip's root, pickled state)."""
    serde = pytest.importorskip("torch._export.serde.serialize")
    schema = pytest.importorskip("torch._export.serde.schema")
    artifact = serde.serialize(ep)
    members = {
        "version": ".".join(map(str, schema.SCHEMA_VERSION)).encode(),
        "serialized_exported_program.json": artifact.exported_program,
        "serialized_state_dict.pt": artifact.state_dict,
        "serialized_constants.pt": artifact.constants,
        "serialized_example_inputs.pt": artifact.example_inputs,
        "extra_files/labels.txt": b"cat",
    }
    members.update(replace)
    return _pack(path, list(members.items()))


def test_old_layout_archives_load_and_their_pickles_are_checked(
    tmp_path, monkeypatch, program_file, capsys
):
    ep = torch_pt2.load(program_file).program
    plain = _old_layout(tmp_path / "old.pt2", ep)
    out = tmp_path / "old-out.pt2"
    assert main([plain, "-o", str(out), "--verify"]) == 0
    assert torch_pt2.load(str(out)).extra_files == {"labels.txt": "cat"}

    inputs = _old_layout(
        tmp_path / "inputs.pt2", ep, **{"serialized_example_inputs.pt": _raw_pickle()}
    )
    monkeypatch.chdir(tmp_path)
    assert main([inputs, "--verify"]) == 0
    assert not (tmp_path / PWNED).exists()

    weights = _old_layout(
        tmp_path / "weights.pt2", ep, **{"serialized_state_dict.pt": _torch_pickle()}
    )
    capsys.readouterr()
    assert "does not unpickle" in _run_refused(tmp_path, monkeypatch, weights, capsys)


class _Stateful(nn.Module):
    """Conv + BN with a buffer, a lifted tensor constant and a keyword input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 4).view(1, 4, 1, 1))

    def forward(self, x: torch.Tensor, *, shift: torch.Tensor) -> torch.Tensor:
        offset = torch.tensor([0.25, -0.5, 1.0, 0.0]).view(1, 4, 1, 1)  # a lifted constant
        return self.bn(self.conv(x)) * self.scale + offset + shift


@pytest.mark.parametrize("decompose", [False, True], ids=["exported", "decomposed"])
def test_ordinary_archives_keep_loading_with_their_example_inputs(tmp_path, decompose, capsys):
    model = randomize_all(_Stateful(), seed=5).eval()
    batch = torch.export.Dim("batch", min=1, max=32)
    ep = torch.export.export(
        model,
        (torch.randn(2, 3, 6, 6),),
        {"shift": torch.randn(1)},
        dynamic_shapes={"x": {0: batch}, "shift": None},
    )
    if decompose:
        ep = ep.run_decompositions()
    assert ep.constants  # the lifted constant is stored as a raw tensor, not a pickle
    src, out = tmp_path / "in.pt2", tmp_path / "out.pt2"
    torch.export.save(ep, str(src), extra_files={"notes.txt": "kept"})
    loaded = torch_pt2.load(str(src))
    assert loaded.program.example_inputs is not None  # --verify uses them
    assert loaded.extra_files == {"notes.txt": "kept"}
    assert main([str(src), "-o", str(out), "--verify"]) == 0
    assert "1 of 1 BatchNorm folded" in capsys.readouterr().out


def test_a_program_torch_cannot_write_back_is_a_one_line_error(
    tmp_path, program_file, monkeypatch, capsys
):
    # found by the file fuzzer: a damaged archive torch reads but whose program its serializer
    # rejects (SerializeError) ended as an internal error
    def cannot_serialize(*args, **kwargs):
        raise RuntimeError("as_int -> -1")

    monkeypatch.setattr(torch.export, "save", cannot_serialize)
    out = tmp_path / "out.pt2"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([str(program_file), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write this program" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_archive_needing_a_newer_zip_version_is_a_one_line_error(tmp_path, program_file, capsys):
    data = bytearray(open(program_file, "rb").read())
    end = data.rindex(b"PK\x05\x06")  # the end record says where the central directory is
    central = int.from_bytes(data[end + 16 : end + 20], "little")
    data[central + 6 : central + 8] = (128).to_bytes(2, "little")  # "needs zip version 12.8"
    path = tmp_path / "new_zip.pt2"
    path.write_bytes(bytes(data))
    assert main([str(path)]) == 1
    assert "not a torch.export archive" in one_line_error(capsys)


# --- Programs whose signature, metadata or expressions a crafted file changed -----------------


class TwoConvs(nn.Module):
    """(b(c(x)), c2(x)): a conv with a BatchNorm beside one without."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b(self.c(x)), self.c2(x)


@pytest.mark.parametrize(
    "renamed, to", [("c2.weight", "c.weight"), ("b.bias", "c2.bias")], ids=["conv", "bn"]
)
def test_two_inputs_naming_one_state_key_fold_and_verify(tmp_path, renamed, to, capsys):
    # A crafted file gave two placeholders' specs the same state key (torch loads and runs it);
    # dropping the folded one's tensor took it from the other: SpecViolationError, exit 3.
    src = tmp_path / "two.pt2"
    ep = torch.export.export(randomize_all(TwoConvs(), seed=1).eval(), _inputs())
    torch.export.save(ep, str(src))
    members = _members(src)

    def share(program) -> None:
        for spec in program["graph_module"]["signature"]["input_specs"]:
            if spec.get("parameter", {}).get("parameter_name") == renamed:
                spec["parameter"]["parameter_name"] = to

    _edit_json(members, "models/model.json", share)
    path = _pack(tmp_path / "shared.pt2", members)
    out = tmp_path / "out.pt2"
    assert main([path, "-o", str(out), "--verify", "--report"]) == 0
    assert "b          BatchNorm2d  folded" in capsys.readouterr().out
    original = torch_pt2.load(path).program
    folded = bnfold.fold(original)
    assert to in folded.state_dict  # still read by the other placeholder
    x = _inputs(seed=5)[0]
    for a, b in zip(original.module()(x), torch.export.load(str(out)).module()(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_folded_program_torch_rejects_is_a_one_line_error(program_file, monkeypatch, capsys):
    from torch._export.verifier import SpecViolationError

    from bnfold.torch.aten import store as torch_graph_store

    def rejects(**kwargs):
        raise SpecViolationError("Parameter c.weight is not in the state dict.")

    monkeypatch.setattr(torch_graph_store, "ExportedProgram", rejects)
    with pytest.raises(bnfold.UnsupportedModelError, match="please report this bnfold bug"):
        bnfold.fold(torch_pt2.load(program_file).program)
    assert main([program_file]) == 1
    assert "torch's verifier rejects the folded program" in one_line_error(capsys)


class LinearOn3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l, self.b = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.l(x))


def test_shape_metadata_disagreeing_with_the_program_is_refused(tmp_path, capsys):
    # The Linear's output is (2, 4, 4): BatchNorm1d normalises axis 1, not the Linear's
    # channels. A file claiming it is 2-D made bnfold fold it (max rel err 1.06, exit 0).
    src = tmp_path / "lin3.pt2"
    ep = torch.export.export(randomize_all(LinearOn3d(), seed=2).eval(), (torch.randn(2, 4, 5),))
    torch.export.save(ep, str(src))
    assert main([str(src), "--report"]) == 0
    assert "channel-axis" in capsys.readouterr().out
    members = _members(src)

    def lie(program) -> None:
        value = program["graph_module"]["graph"]["tensor_values"]["linear"]
        value["sizes"] = [{"as_int": 8}, {"as_int": 4}]
        value["strides"] = [{"as_int": 4}, {"as_int": 1}]

    _edit_json(members, "models/model.json", lie)
    path = _pack(tmp_path / "lie.pt2", members)
    out = tmp_path / "out.pt2"
    assert main([path, "-o", str(out)]) == 1
    err = one_line_error(capsys)
    assert "node linear as torch.float32 [8, 4]" in err and "[2, 4, 4]" in err, err
    assert not out.exists()


def _set_first_expr(program, expr: str) -> None:
    text = json.dumps(program)
    found = re.search(r'"expr_str": "([^"]*)"', text)
    text = text[: found.start(1)] + expr + text[found.end(1) :]
    program.clear()
    program.update(json.loads(text))


@pytest.mark.parametrize(
    "expr, guard",
    [
        ("Pow(Integer(10), Integer(30000000))", None),
        (None, "L['x'].size()[0] <= 9**9**9**9"),
    ],
    ids=["sympy-power", "guard-power"],
)
def test_expressions_too_costly_to_evaluate_are_refused(tmp_path, program_file, expr, guard):
    # sympy computed Pow(10, 30000000) while torch read the file (a 15 KB file never finished
    # loading); --verify evaluated 9**9**9**9 in a guard. Run in a process of its own, so a
    # regression fails on the timeout rather than hanging the suite.
    members = _members(program_file)

    def edit(program) -> None:
        if expr is not None:
            _set_first_expr(program, expr)
        else:
            program["guards_code"] = [guard]

    _edit_json(members, "models/model.json", edit)
    path = _pack(tmp_path / "costly.pt2", members)
    code = "import sys; from bnfold.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "out.pt2"
    run = subprocess.run(
        [sys.executable, "-c", code, path, "-o", str(out), "--verify"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("\n") == 1, run.stderr
    assert "could take unbounded time or memory to evaluate" in run.stderr, run.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "text, bounded",
    [
        ("Pow(Symbol('s0', integer=True, positive=True), Integer(2))", True),
        ("Mul(Integer(-1), Pow(Symbol('s0', integer=True), Integer(-1)))", True),
        ("Float('1.0000000000000000', precision=53)", True),
        ("L['x'].size()[0] <= 64 and 2 <= L['x'].size()[0]", True),
        ("L['x'].size()[0] ** 2 <= 4096", True),
        ("Pow(Pow(Integer(10), Integer(60)), Integer(60))", False),  # nested powers
        ("PowByNatural(Integer(2), Symbol('s0'))", False),  # exponent not a literal
        ("10^300000000", False),  # sympy reads ^ as **
        ("Mul(Integer(99999999999999999999999999), Symbol('s0'))", False),  # literal > 2**64
        ("TruncToInt(Float('1e400000000', precision=53))", False),
        ("Float('1.0', precision=99999999)", False),
        ("L['x'].size()[0] <= 1 << 999999999999", False),
        ("L['x'].size()[0] <= round(5, -999999999999999999)", False),
        ("L['x'].size()[0] <= max('a' * 999999999999)", False),  # sequence repetition
        ("Add(" + ", ".join(["Integer(1)"] * 1000) + ")", False),  # over 10,000 characters
    ],
)
def test_expression_cost_bounds(text, bounded):
    assert torch_pt2._cost_is_bounded(text) is bounded
