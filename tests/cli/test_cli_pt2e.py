"""`bnfold MODEL.pt2 [--qat exact|bias]`: archives of pt2e-quantized programs (torchao's
``convert_pt2e``) from the shell.

The program is a real QAT flow's (:mod:`tests.helpers.qat`): ``conv -> quantize -> dequantize
-> div -> add -> batch_norm``, calling ``quantized_decomposed`` ops that torch registers only
on request. The command line reads such archives without torchao (checked in a process where
importing it fails), runs them for ``--verify`` (the quantize and dequantize ops are on the
allowlist, no other op of their namespace), and takes ``--qat`` for ``.pt2`` files only.

Speed: torchao is imported by the one fixture that runs the flow (the flow's first run in a
process takes seconds: torchao exports its pattern graphs), the two tests using it come first
(pytest-xdist hands consecutive tests to one worker), and the process without torchao starts as
soon as the archive is written, running while the in-process test does.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - defines the ops the modules below call
from torch import fx, nn

from bnfold import cli
from bnfold.cli import main
from bnfold.core import rules
from bnfold.torch.aten import safe_ops
from tests.helpers.cli import listing, one_line_error, refused_before_any_work
from tests.helpers.cli_models import conv_bn

QD = torch.ops.quantized_decomposed
KIND = "conv2d"
SEED = 3


@pytest.fixture(scope="module")
def converted() -> tuple[fx.GraphModule, torch.Tensor]:
    """A QAT flow's converted graph (ConvOutputQuantizer: the chain stays for bnfold) and an
    example input."""
    from tests.helpers import qat as flows  # torchao: only where a flow runs

    x = flows.random_inputs(flows.input_shape(KIND), 1, SEED)[0]
    model = flows.build(flows.ConvBN, KIND, seed=SEED)
    return flows.qat_convert(model, (x,), flows.ConvOutputQuantizer(), seed=SEED), x


def _save(gm: fx.GraphModule, x: torch.Tensor, path) -> torch.export.ExportedProgram:
    ep = torch.export.export(gm, (x,))
    torch.export.save(ep, str(path))
    return ep


# The command line in a process of its own in which torchao cannot be imported; after the run it
# prints which torchao modules it holds and whether torch's quantized ops were registered.
_WITHOUT_TORCHAO = """
import json, sys
sys.modules["torchao"] = None  # as if torchao were not installed: importing it fails
from bnfold.cli import main
status = main(sys.argv[1:])
held = [m for m, v in sys.modules.items() if m.split(".")[0] == "torchao" and v is not None]
ops = "torch.ao.quantization.fx._decomposed" in sys.modules
print("child: " + json.dumps({"torchao": held, "quantized_ops": ops}))
sys.exit(status)
"""


@dataclass
class ProgramFile:
    path: str
    program: torch.export.ExportedProgram
    before: bytes  # the archive's bytes as written
    child: subprocess.Popen  # bnfold PATH -o OUT --verify --report, without torchao
    out: Path


@pytest.fixture(scope="module")
def program_file(tmp_path_factory, converted) -> Iterator[ProgramFile]:
    """The converted program as an archive, and the command line already running on it in a
    process without torchao (:func:`test_exact_fold_verified_and_written_without_torchao` waits
    for it)."""
    gm, x = converted
    directory = tmp_path_factory.mktemp("pt2e")
    path, out = directory / "qat.pt2", directory / "folded.pt2"
    program = _save(gm, x, path)
    argv = [str(path), "-o", str(out), "--verify", "--report"]
    child = subprocess.Popen(
        [sys.executable, "-c", _WITHOUT_TORCHAO, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield ProgramFile(str(path), program, path.read_bytes(), child, out)
    finally:
        if child.poll() is None:  # a test failed before waiting for it
            child.kill()
        child.communicate()


def _conv_output_quantize(gm: fx.GraphModule) -> fx.Node:
    (q,) = [
        n
        for n in gm.graph.nodes
        if n.target == QD.quantize_per_tensor.default
        and getattr(n.args[0], "target", None) == torch.ops.aten.conv2d.default
    ]
    return q


@pytest.fixture(scope="module")
def wide_file(tmp_path_factory, converted) -> tuple[str, torch.export.ExportedProgram, float]:
    """The converted graph with its conv output quantized 64 times coarser (as a wider
    calibration would): the range has room for the BatchNorm's shift, so ``--qat bias`` folds
    into the bias. Also the (widened) output step."""
    gm, x = converted
    gm = copy.deepcopy(gm)
    q = _conv_output_quantize(gm)
    for n in [q, *q.users]:  # the quantize and its dequantize
        n.args = (n.args[0], n.args[1] * 64.0, *n.args[2:])
    gm.recompile()
    path = tmp_path_factory.mktemp("pt2e") / "wide.pt2"
    return str(path), _save(gm, x, path), float(q.args[1])


def _inputs(ep: torch.export.ExportedProgram, seed: int) -> list[torch.Tensor]:
    """Inputs shaped like the example, at three scales."""
    (x,) = ep.example_inputs[0]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g) * scale for scale in (0.5, 1.0, 3.0)]


def _max_rel(a: torch.export.ExportedProgram, b: torch.export.ExportedProgram) -> float:
    worst = 0.0
    with torch.no_grad():
        for x in _inputs(a, 11):
            expected, actual = a.module()(x), b.module()(x)
            worst = max(worst, float((expected - actual).abs().max() / expected.abs().max()))
    return worst


def _bn_row(text: str) -> str:
    (row,) = [line for line in text.splitlines() if line.startswith("bn ")]
    return row


def _batch_norms(ep: torch.export.ExportedProgram) -> int:
    return sum("batch_norm" in str(n.target) for n in ep.graph.nodes)


def test_qat_bias_folds_into_the_bias_or_says_why_not(tmp_path, program_file, wide_file, capsys):
    # As calibrated, the conv's output range leaves no room for the BatchNorm's shift: the chain
    # is folded exactly, and the report says why not into the bias.
    out = tmp_path / "bias.pt2"
    argv = [program_file.path, "-o", str(out), "--qat", "bias", "--verify", "--report"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    row = _bn_row(text)
    assert "folded" in row and "became one per-channel add after" in row
    assert re.search(r"not folded into the bias: \S", row), row
    assert "verified on random inputs" in text
    assert _max_rel(program_file.program, torch.export.load(str(out))) <= 1e-5

    # Calibrated wider, the range has room: folded into the bias, within the bound it claims.
    path, original, step = wide_file
    out.unlink()
    assert main([path, "-o", str(out), "--qat", "bias", "--report"]) == 0
    row = _bn_row(capsys.readouterr().out)
    bound = re.search(r"bias before the output quantize: at most ([\d.]+) output steps", row)
    assert bound, row
    folded = torch.export.load(str(out))
    assert _batch_norms(folded) == 0
    with torch.no_grad():
        for x in _inputs(original, 12):
            moved = (original.module()(x) - folded.module()(x)).abs().max()
            assert float(moved) / step <= float(bound.group(1)) + 1e-3

    # --verify holds the fold to the float tolerance, which a moved rounding need not meet:
    # the error says so, and nothing is written; the default folds exactly, and verifies.
    out.unlink()
    assert main([path, "-o", str(out), "--qat", "bias", "--verify"]) == 1
    err = one_line_error(capsys, "verification failed", "--qat bias", "--qat exact folds exactly")
    assert err.rstrip().endswith(f"{out} not written")
    assert not out.exists()
    assert main([path, "-o", str(out), "--verify"]) == 0
    assert _max_rel(original, torch.export.load(str(out))) <= 1e-5


def test_exact_fold_verified_and_written_without_torchao(program_file):
    """The run started by the fixture: read, folded, verified and written in a process that
    cannot import torchao; the written archive computes what the original does."""
    child, out = program_file.child, program_file.out
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    report, _, status = stdout.rpartition("child: ")
    assert json.loads(status) == {"torchao": [], "quantized_ops": True}
    assert "1 of 1 BatchNorm folded, 0 kept" in report
    row = _bn_row(report)  # folded into the conv, and the chain's note after it
    assert re.search(r"folded\s+conv \(Conv2d\): QAT tail \(div -> add -> batch_norm", row), row
    assert "became one per-channel add after" in row and "bias" not in row
    assert "verified on random inputs" in report and f"wrote {out}" in report
    assert Path(program_file.path).read_bytes() == program_file.before

    folded = torch.export.load(str(out))
    assert _batch_norms(program_file.program) == 1 and _batch_norms(folded) == 0
    assert _max_rel(program_file.program, folded) <= 1e-5


def test_qat_option_is_for_pt2_files_only(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn(), str(model))
    out = tmp_path / "out.onnx"
    before = listing(tmp_path)
    for mode in ("bias", "exact"):  # given at all, it is refused before anything is read
        assert main([str(model), "-o", str(out), "--qat", mode, "--verify"]) == 1
        refused_before_any_work(capsys, "--qat applies to torch.export archives only")
    assert listing(tmp_path) == before
    assert main([str(model), "--qat", "nope"]) == 2
    one_line_error(capsys, "--qat", "invalid choice")
    (option,) = [a for a in cli._file_parser()._actions if "--qat" in a.option_strings]
    assert tuple(option.choices) == rules.QAT_MODES  # the parser's choices are the fold's modes


# ---------------------------------------------------------------------------------------------
# What --verify runs from a file: the listed quantize and dequantize overloads, nothing else of
# their namespace


class EveryListedOverload(nn.Module):
    """Every overload of quantize/dequantize per tensor and per channel, on one input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.05))
        self.register_buffer("zero", torch.tensor(3))
        self.register_buffer("low", torch.tensor(-128))
        self.register_buffer("high", torch.tensor(127))
        self.register_buffer("scales", torch.tensor([0.05, 0.1, 0.02]))
        self.register_buffer("zeros", torch.tensor([0, 2, -1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i8 = torch.int8
        s, z, lo, hi = self.scale, self.zero, self.low, self.high
        a = QD.dequantize_per_tensor(
            QD.quantize_per_tensor(x, 0.05, 3, -128, 127, i8), 0.05, 3, -128, 127, i8
        )
        b = QD.dequantize_per_tensor.tensor(
            QD.quantize_per_tensor.tensor(x, s, z, -128, 127, i8), s, z, -128, 127, i8
        )
        c = QD.dequantize_per_tensor.tensor2(
            QD.quantize_per_tensor.tensor2(x, s, z, lo, hi, i8), s, z, lo, hi, i8
        )
        q = QD.quantize_per_channel(x, self.scales, self.zeros, 1, -128, 127, i8)
        d = QD.dequantize_per_channel(q, self.scales, self.zeros, 1, -128, 127, i8)
        return a + b + c + d


class ChoosesQparams(nn.Module):
    """Calls choose_qparams, an op of the namespace that is not on the list."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = QD.choose_qparams.tensor(x, -128, 127, 1e-5, torch.int8)
        return x * scale + zero_point


def _exported(tmp_path, module: nn.Module, name: str) -> tuple[str, set[str]]:
    """The archive of ``module``, and the quantized_decomposed ops its program calls."""
    path = tmp_path / name
    ep = torch.export.export(module.eval(), (torch.randn(2, 3, 4),))
    torch.export.save(ep, str(path))
    calls = {
        f"{t.namespace}.{t._opname}.{t._overloadname}"
        for t in (n.target for n in ep.graph.nodes)
        if getattr(t, "namespace", "") == "quantized_decomposed"
    }
    return str(path), calls


def test_every_listed_overload_runs(tmp_path, capsys):
    path, calls = _exported(tmp_path, EveryListedOverload(), "listed.pt2")
    assert calls == safe_ops.PURE_QUANTIZED_OPS
    assert main([path, "--verify"]) == 0
    assert "verified on random inputs" in capsys.readouterr().out


def test_other_ops_of_the_namespace_are_not_run(tmp_path, capsys):
    path, calls = _exported(tmp_path, ChoosesQparams(), "choose.pt2")
    assert calls == {"quantized_decomposed.choose_qparams.tensor"}
    assert main([path, "--verify"]) == 1
    one_line_error(capsys, "quantized_decomposed.choose_qparams.tensor", "not on the list")
    assert main([path]) == 0  # folding never runs the program
