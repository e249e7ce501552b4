"""`.pt2 --verify` runs a program from an untrusted file: only pure tensor ops, inputs checked
against the program and capped, and every failure a one-line error (exit 1), never exit 3.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.torch import pt2 as torch_pt2
from bnfold.torch.aten import safe_ops as torch_safe_ops
from tests.fuzz import files as ff
from tests.helpers.cli import listing, one_line_error
from tests.helpers.forms import export
from tests.helpers.support import randn, randomize_all


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.c(x))


def _export(
    model: nn.Module, inputs: tuple, decompose: bool = False, **kw
) -> torch.export.ExportedProgram:
    return export(randomize_all(model, 1), inputs, decompose, **kw)


def _save(ep: torch.export.ExportedProgram, path: Path) -> str:
    torch.export.save(ep, str(path))
    return str(path)


# --------------------------------------------------------------------------------------------
# A: only ops on the allowlist run


@pytest.mark.parametrize("kind", ["from_file_write", "from_file_create"])
def test_a_program_mapping_a_file_is_folded_but_never_run(tmp_path, kind, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.bin").write_bytes(b"precious data, 16B")
    target = outside / ("victim.bin" if kind == "from_file_write" else "created.bin")
    ep = _export(ConvBn(), (randn(2, 3, 8, 8),))
    ff.inject_side_effect(ep, kind, str(target))
    path = _save(ep, tmp_path / "evil.pt2")
    before = listing(outside)
    # folding (and writing the result) never runs the program
    assert main([path]) == 0
    assert main([path, "-o", str(tmp_path / "folded.pt2")]) == 0
    capsys.readouterr()
    out = tmp_path / "verified.pt2"
    assert main([path, "--verify", "-o", str(out)]) == 1
    err = one_line_error(capsys)
    assert "aten.from_file.default" in err and "cannot verify" in err
    assert listing(outside) == before and not out.exists()


@pytest.mark.parametrize(
    "kind, named",
    [
        ("print", "aten._print.default"),
        ("custom_op", "bnfold_fuzz.touch.default"),
        ("record_function", "profiler._record_function_enter.default"),
        ("random", "draws random numbers"),
        ("input_mutation", "writes into the caller's input x"),
        ("view_mutation", "writes into the caller's input x"),
    ],
)
def test_side_effecting_ops_are_refused_by_verify(tmp_path, kind, named, capsys):
    target = tmp_path / "created-by-the-program"
    ep = _export(ConvBn(), (randn(2, 3, 8, 8),))
    ff.inject_side_effect(ep, kind, str(target))
    path = _save(ep, tmp_path / "evil.pt2")
    assert main([path, "--verify"]) == 1
    err = one_line_error(capsys)
    assert named in err, err
    assert not target.exists()


class WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return self.b(self.c(x))


@pytest.mark.parametrize("decompose", [False, True])
def test_a_program_writing_into_its_input_is_refused(tmp_path, decompose, capsys):
    path = _save(_export(WritesItsInput(), (randn(2, 3, 8, 8),), decompose), tmp_path / "m.pt2")
    assert main([path, "--verify"]) == 1
    assert "writes into the caller's input x" in one_line_error(capsys)


def test_bnfold_verify_of_a_loaded_program_checks_the_allowlist(tmp_path):
    target = tmp_path / "created"
    ep = _export(ConvBn(), (randn(2, 3, 8, 8),))
    ff.inject_side_effect(ep, "custom_op", str(target))
    loaded = torch_pt2.load(_save(ep, tmp_path / "evil.pt2")).program
    folded = bnfold.fold(loaded)  # folding runs nothing
    for a, b in ((loaded, folded), (folded, loaded)):
        with pytest.raises(bnfold.VerificationError, match="bnfold_fuzz.touch"):
            bnfold.verify(a, b, (randn(2, 3, 8, 8, seed=1),))
    with pytest.raises(bnfold.VerificationError, match="bnfold_fuzz.touch"):
        torch_pt2.check(loaded, folded)
    assert not target.exists()


class Everyday(nn.Module):
    """The ops of ordinary CNNs: in-place ReLU, eval dropout, pools, cat, add, flatten, a
    buffer the program counts calls in, and a training-mode BatchNorm that writes its stats."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.up, self.b3 = nn.ConvTranspose2d(12, 4, 2, stride=2), nn.BatchNorm2d(4)
        self.head_bn = nn.BatchNorm2d(4)
        self.fc, self.b4 = nn.Linear(4, 5), nn.BatchNorm1d(5)
        self.act, self.drop = nn.ReLU(inplace=True), nn.Dropout(0.3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        y = self.act(self.b1(self.c1(x)))
        z = self.b2(self.c2(y)) + y
        y = torch.cat([nn.functional.max_pool2d(y, 2), nn.functional.avg_pool2d(z, 2)], 1)
        y = self.head_bn(self.act(self.b3(self.up(self.drop(y)))))
        return self.b4(self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.c(x))
        with torch.no_grad():
            y = y * 2
        return torch.cond(y.sum() > 0, lambda t: t.relu(), lambda t: t.sigmoid(), (y,))


@pytest.mark.parametrize("decompose", [False, True])
@pytest.mark.parametrize("name", ["everyday", "branchy", "dynamic"])
def test_ordinary_programs_still_verify(tmp_path, name, decompose, capsys):
    if name == "everyday":
        model = Everyday()
        model.head_bn.train()
        ep = _export(model, (randn(2, 3, 8, 8),), decompose)
    elif name == "branchy":
        ep = _export(Branchy(), (randn(2, 3, 8, 8),), decompose)
    else:
        batch = torch.export.Dim("batch", min=1, max=32)
        ep = _export(ConvBn(), (randn(2, 3, 8, 8),), decompose, dynamic_shapes=({0: batch},))
    torch_safe_ops.check_program(ep)
    assert main([_save(ep, tmp_path / "m.pt2"), "--verify"]) == 0, capsys.readouterr().err
    assert "verified on random inputs" in capsys.readouterr().out


def test_the_allowlist_names_real_pure_aten_ops():
    for name in torch_safe_ops.PURE_ATEN_OPS:
        assert isinstance(getattr(torch.ops.aten, name, None), torch._ops.OpOverloadPacket), name
    for name in ("from_file", "_print", "set_", "resize_", "randn", "bernoulli", "set"):
        assert name not in torch_safe_ops.PURE_ATEN_OPS


# --------------------------------------------------------------------------------------------
# B: sample inputs checked against the program, inputs capped at 128 MiB


def _with_sample_inputs(src: str, dst: Path, sample) -> str:
    members = ff._members(Path(src).read_bytes())
    i = ff._member_index(members, r"sample_inputs/model\.pt$")[0]
    buf = io.BytesIO()
    torch.save(sample, buf)
    members[i] = (members[i][0], buf.getvalue())
    dst.write_bytes(ff._pack(members))
    return str(dst)


# The peak resident memory of this process's own address space (VmHWM): ru_maxrss would
# include what the forking pytest worker held, which Linux carries over an exec.
_PEAK = """
import sys
from bnfold.cli import main
rc = main([sys.argv[1], "--verify"])
status = open("/proc/self/status").read().split("VmHWM:")[1].split()
print(rc, int(status[0]) * 1024)
"""


def test_expanded_sample_inputs_allocate_nothing(tmp_path):
    src = _save(_export(ConvBn(), (randn(2, 3, 8, 8),)), tmp_path / "m.pt2")
    huge = (torch.zeros(1).expand(16384, 16384),), {}  # 14 KB on disk, 1 GiB in memory
    path = _with_sample_inputs(src, tmp_path / "huge.pt2", huge)
    assert os.path.getsize(path) < 64 * 2**10
    run = subprocess.run([sys.executable, "-c", _PEAK, path], capture_output=True, text=True)
    rc, peak = (int(v) for v in run.stdout.split()[-2:])
    assert rc == 0, run.stderr  # the samples are ignored: inputs come from the input specs
    assert peak < 1 * 2**30  # 2.4 GB before


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.b = nn.Linear(4000, 8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.fc(x))


def test_inputs_beyond_128_mib_are_refused(tmp_path, capsys):
    x = torch.zeros(1).expand(20000, 4000)  # 305 MiB as the program declares it
    path = _save(_export(Wide(), (x,)), tmp_path / "wide.pt2")
    out = tmp_path / "out.pt2"
    assert main([path, "--verify", "-o", str(out)]) == 1
    err = one_line_error(capsys)
    assert "128 MiB" in err and "[20000, 4000]" in err and not out.exists()


# --------------------------------------------------------------------------------------------
# C: programs that cannot run on the inputs bnfold makes: one line, exit 1, nothing written


class Positions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.b = nn.Embedding(10, 6), nn.Linear(6, 6), nn.BatchNorm1d(6)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.b(self.fc(self.emb(pos.long())))


def test_a_program_failing_on_random_inputs_is_a_one_line_error(tmp_path, capsys):
    ep = _export(Positions(), (torch.tensor([1.0, 2.0, 3.0]),))
    ep.example_inputs = None  # random normal positions: negative indices
    path = _save(ep, tmp_path / "pos.pt2")
    out = tmp_path / "out.pt2"
    assert main([path, "--verify", "-o", str(out)]) == 1
    err = one_line_error(capsys)
    assert "cannot verify: the original program fails" in err and "IndexError" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "sample",
    [
        ((torch.randn(2, 3, 9, 9),), {}),  # wrong shape: a guard failure
        ((randn(2, 3, 8, 8), randn(2, 3, 8, 8)), {}),  # an extra argument
        ((torch.ones(2, 3, 8, 8, dtype=torch.int64),), {}),
        ((torch.empty(2, 3, 8, 8, device="meta"),), {}),
        ((randn(2, 3, 8, 8),), {"extra": randn(2, 3, 8, 8)}),
    ],
    ids=["wrong_shape", "extra_argument", "int64", "meta", "extra_keyword"],
)
def test_sample_inputs_unlike_the_program_are_ignored(tmp_path, sample, capsys):
    src = _save(_export(ConvBn(), (randn(2, 3, 8, 8),)), tmp_path / "m.pt2")
    path = _with_sample_inputs(src, tmp_path / "odd.pt2", sample)
    assert torch_pt2.load(path).program.example_inputs is None
    assert main([path, "--verify", "-o", str(tmp_path / "out.pt2")]) == 0, capsys.readouterr()
    assert "verified on random inputs" in capsys.readouterr().out


def test_matching_sample_inputs_are_kept(tmp_path):
    src = _save(_export(ConvBn(), (randn(2, 3, 8, 8),)), tmp_path / "m.pt2")
    assert torch_pt2.load(src).program.example_inputs is not None


# --------------------------------------------------------------------------------------------
# D: --verify's work is bounded: no loop without a bound, no value over 1 GiB, no more than
# 2 GiB of intermediate values at once (found on fake tensors before anything runs)


class Loops(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._higher_order_ops.while_loop import while_loop

        def cond(i, y):
            return i < 10**15  # ran forever under --verify

        def body(i, y):
            return i + 1, y * 1.0

        _, y = while_loop(cond, body, (torch.zeros((), dtype=torch.int64), x))
        return self.b(self.c(y))


def test_a_program_looping_without_bound_is_folded_but_not_run(tmp_path, capsys):
    path = _save(_export(Loops(), (randn(2, 3, 8, 8),)), tmp_path / "loop.pt2")
    assert main([path]) == 0
    assert "1 of 1 BatchNorm folded" in capsys.readouterr().out
    out = tmp_path / "out.pt2"
    assert main([path, "--verify", "-o", str(out)]) == 1
    err = one_line_error(capsys)
    assert "higher_order.while_loop" in err and "loops as long as" in err
    assert not out.exists()


class Allocates(nn.Module):
    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes = shapes
        self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        made = [torch.ones(s) for s in self.shapes]  # literal sizes: a byte in the file
        return self.b(self.c(x)) + sum(m.sum() for m in made)


@pytest.mark.parametrize(
    "shapes, expected",
    [
        ([(1024, 1024, 4096)], "16.00 GiB, and --verify runs programs whose values take at most"),
        ([(1024, 1024, 200)] * 3, "would take 2.34 GiB at once"),
    ],
    ids=["one-value", "alive-at-once"],
)
def test_a_program_allocating_beyond_the_budget_is_not_run(tmp_path, shapes, expected, capsys):
    # export runs on fake tensors: the 16 GiB are never made, here nor by bnfold
    path = _save(_export(Allocates(shapes), (randn(2, 3, 8, 8),)), tmp_path / "big.pt2")
    assert os.path.getsize(path) < 64 * 2**10
    out = tmp_path / "out.pt2"
    assert main([path, "--verify", "-o", str(out)]) == 1
    err = one_line_error(capsys)
    assert "cannot verify" in err and expected in err, err
    assert not out.exists()


def test_allocations_within_the_budget_still_verify(tmp_path, capsys):
    path = _save(_export(Allocates([(256, 1024, 256)]), (randn(2, 3, 8, 8),)), tmp_path / "ok.pt2")
    assert main([path, "--verify"]) == 0, capsys.readouterr()


def test_shapes_after_an_op_off_the_allowlist_are_unknown(tmp_path):
    # bnfold checks a file's shape metadata by running the graph on fake tensors, but not an
    # op off the allowlist (it might act even there): what depends on one is not trusted.
    from bnfold.torch.aten.ops import UNCHECKED_SHAPE

    ep = _export(ConvBn(), (randn(2, 3, 8, 8),))
    ff.inject_side_effect(ep, "from_file_write", str(tmp_path / "victim"))
    program = torch_pt2.load(_save(ep, tmp_path / "evil.pt2")).program
    unchecked = {n.name for n in program.graph.nodes if n.meta.get(UNCHECKED_SHAPE)}
    assert unchecked == {"from_file_default", "fill__scalar"}
    assert not (tmp_path / "victim").exists()
