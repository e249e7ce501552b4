"""Affine chains in ATen graphs: per-channel arithmetic by constants after a layer
(``conv(x) * scale + shift``, ``(fc(x) - mean) / std``, scalars, ``neg``, ``rsub``, alpha) folded
into the layer's weight and bias, alone or interleaved with BatchNorm, in an ExportedProgram as
exported and decomposed and in the GraphModule of ``ep.module()``.

Exporting is the slow part, so the folds and the kept cases each live in one model of cases
(one output per case), exported once per form. Every fold is compared with the original program
on fresh random inputs (non-trivial constants), the arithmetic nodes it folded are gone, the
input program is left as it was, and ``analyze`` reports what ``fold`` did. Kept cases must
give exactly the original outputs, with the rule and reason in the report.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import ExportedProgram

import bnfold
from bnfold.core import rules
from tests.helpers.check import (
    REL_TOL,
    assert_same_outputs,
    assert_snapshot_equal,
    rel_err,
    snapshot,
    torch_outputs,
)
from tests.helpers.forms import check_entries, export
from tests.helpers.support import randomize_all

ARITH = {"mul", "div", "add", "sub", "rsub", "neg"}
FORMS = ["exported", "decomposed", "module"]
C = 4  # conv output channels
F_IN, F_OUT = 6, 5  # linear features


def rnd(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Non-trivial constants: away from 0 and 1, both signs."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (sign * torch.empty(shape).uniform_(0.5, 2.0, generator=g)).to(dtype)


def param(*shape: int, seed: int) -> nn.Parameter:
    return nn.Parameter(rnd(*shape, seed=seed))


INPUTS = {
    "2d": (2, 3, 8, 8),
    "1d": (2, 3, 10),
    "3d": (2, 3, 4, 5, 5),
    "vec": (4, F_IN),
    "seq": (2, 3, F_IN),
}


def inputs(seed: int) -> dict[str, torch.Tensor]:
    return {k: rnd(*shape, seed=seed + i) for i, (k, shape) in enumerate(INPUTS.items())}


def op(node: fx.Node) -> str:
    schema = getattr(node.target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else ""


def arith_count(graph: fx.Graph) -> int:
    return sum(op(n) in ARITH for n in graph.nodes if n.op == "call_function")


def graph_of(model: ExportedProgram | fx.GraphModule) -> fx.Graph:
    return model.graph if isinstance(model, ExportedProgram) else model.graph


# --------------------------------------------------------------------------------------------
# Cases: each module reads one input and returns one output


class Case(nn.Module):
    """A case: its input (a key of INPUTS) and its arithmetic nodes that fold (``folds``)."""

    reads = "2d"
    folds = 0


class ConvMulAdd(Case):
    """Parameter [C,1,1] scale, buffer [1,C,1,1] shift."""

    folds = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.scale = param(C, 1, 1, seed=1)
        self.register_buffer("shift", rnd(1, C, 1, 1, seed=2))

    def forward(self, x):
        return self.conv(x) * self.scale + self.shift


class LinearStandardise(Case):
    """(fc(x) - mean) / std, per-feature buffers [F]."""

    reads, folds = "vec", 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(F_IN, F_OUT)
        self.register_buffer("mean", rnd(F_OUT, seed=3))
        self.register_buffer("std", rnd(F_OUT, seed=4).abs())

    def forward(self, x):
        return (self.fc(x) - self.mean) / self.std


class ConvScalars(Case):
    """Scalars, a constant tensor attribute (a lifted constant), conv without bias."""

    folds = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, bias=False)
        self.c = rnd(C, 1, 1, seed=5)  # a plain tensor attribute: a constant of the program

    def forward(self, x):
        return self.conv(x).mul(2.5).add(0.5) - self.c


class ConvScaleOnly(Case):
    """A scale alone on a conv without bias: the conv gets no bias."""

    folds = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, bias=False)
        self.s = param(C, 1, 1, seed=6)

    def forward(self, x):
        return -(self.conv(x) / self.s)


class Rsub(Case):
    """Constant first: ``b - y`` (rsub as exported), with alpha both ways."""

    folds = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.b = param(C, 1, 1, seed=7)

    def forward(self, x):
        y = 1.5 - self.conv(x)
        y = torch.sub(self.b, y, alpha=0.5)
        return torch.sub(y, self.b, alpha=2.0)


class AddAlpha(Case):
    folds = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.b = param(1, C, 1, 1, seed=8)

    def forward(self, x):
        return torch.add(self.b, torch.add(self.conv(x), self.b, alpha=-3), alpha=0.25)


class Conv1dChain(Case):
    reads, folds = "1d", 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, C, 3)
        self.s, self.t = param(C, 1, seed=9), param(C, 1, seed=10)

    def forward(self, x):
        return self.t + self.s * self.conv(x)


class Conv3dChain(Case):
    reads, folds = "3d", 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, C, 2)
        self.s, self.t = param(1, C, 1, 1, 1, seed=11), param(C, 1, 1, 1, seed=12)

    def forward(self, x):
        return self.conv(x) * self.s - self.t


class ConvTransposeGrouped(Case):
    folds = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
        self.s, self.t = param(6, 1, 1, seed=13), param(6, 1, 1, seed=14)
        self.pre = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(torch.relu(self.pre(x))) * self.s + self.t


class Linear3d(Case):
    """A Linear on a 3-D input (decomposed: view -> addmm -> view -> the chain)."""

    reads, folds = "seq", 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(F_IN, F_OUT)
        self.s, self.t = param(F_OUT, seed=15), param(F_OUT, seed=16)

    def forward(self, x):
        return self.fc(x) * self.s + self.t


class Addmm(Case):
    reads, folds = "vec", 2

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = param(F_IN, F_OUT, seed=17), param(F_OUT, seed=18)
        self.s = param(F_OUT, seed=19)

    def forward(self, x):
        return torch.addmm(self.b, x, self.w) * self.s / 3.0


class MatMulParam(Case):
    """``x @ W`` with a parameter W (matmul as exported, mm decomposed): mm has no bias, the
    chain's shift makes it addmm."""

    reads, folds = "vec", 2

    def __init__(self) -> None:
        super().__init__()
        self.w = param(F_IN, F_OUT, seed=20)
        self.s, self.t = param(F_OUT, seed=21), param(F_OUT, seed=22)

    def forward(self, x):
        return (x @ self.w) * self.s + self.t


class ThroughViews(Case):
    """Links across a permute (channels last) and an operand reshaped by a view."""

    folds = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.s, self.t = param(C, seed=23), param(C, seed=24)

    def forward(self, x):
        y = self.conv(x) * self.s.view(1, -1, 1, 1)
        y = y.permute(0, 2, 3, 1) + self.t  # channels on the last axis now
        return (y * 2.0).permute(0, 3, 1, 2)


class LongChain(Case):
    folds = 9

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.a, self.b = param(C, 1, 1, seed=25), param(1, C, 1, 1, seed=26)
        self.register_buffer("c", rnd(C, 1, 1, seed=27))
        self.d = rnd(C, 1, 1, seed=28)

    def forward(self, x):
        y = (self.conv(x) * self.a + self.b) / self.c
        y = self.d - (-y) * 0.5
        return torch.sub(y, self.b, alpha=1.5).mul(self.a) + 1.0


class BnThenChain(Case):
    """conv -> bn -> add: the add folds once the BatchNorm has (a second pass)."""

    folds = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)
        self.t = param(C, 1, 1, seed=29)

    def forward(self, x):
        return self.bn(self.conv(x)) * 0.5 + self.t


class ChainThenBn(Case):
    """conv -> mul -> bn: the mul folds with the BatchNorm, in its entry."""

    folds = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)
        self.s = param(C, 1, 1, seed=30)

    def forward(self, x):
        return self.bn(self.conv(x) * self.s)


class ChainBnChain(Case):
    """conv -> mul -> sub -> bn -> add: links on both sides of the BatchNorm."""

    folds = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)
        self.s, self.t = param(C, 1, 1, seed=31), param(C, 1, 1, seed=32)

    def forward(self, x):
        return self.bn(self.conv(x) * self.s - self.t) + self.t


class LinkValueReadTwice(Case):
    """``y = conv(x) * s`` is also read by a cat: the mul folds (the conv now computes y, for
    both readers); the add after it cannot (the conv's output has two readers), and arithmetic
    on a value read elsewhere is the model's own computation: no entry."""

    folds = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.s, self.t = param(C, 1, 1, seed=33), param(C, 1, 1, seed=34)

    def forward(self, x):
        y = self.conv(x) * self.s
        return torch.cat([y + self.t, y])


class SharedWeight(Case):
    """Two convs read one weight: the one with the chain folds into a copy."""

    folds = 1

    def __init__(self) -> None:
        super().__init__()
        self.w = param(C, 3, 3, 3, seed=35)
        self.s = param(C, 1, 1, seed=36)

    def forward(self, x):
        return torch.cat([F.conv2d(x, self.w) * self.s, F.conv2d(x * 2, self.w)])


class MmBias(Case):
    """``x @ W + b``: what a Linear decomposes to; folding gains nothing (no entry)."""

    reads = "vec"

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = param(F_IN, F_OUT, seed=37), param(F_OUT, seed=38)

    def forward(self, x):
        return x @ self.w + self.b


A, B = "affine", "batchnorm"
FOLDED, KEPT = "folded", "skipped"

# name -> (case, its entries: (kind, "folded", target under the case; "" for the case itself,
# which names a functional producer) or (kind, "skipped", rule))
FOLD_CASES: dict[str, tuple[type[Case], list[tuple[str, str, str]]]] = {
    "conv-mul-add": (ConvMulAdd, [(A, FOLDED, "conv")]),
    "linear-standardise": (LinearStandardise, [(A, FOLDED, "fc")]),
    "conv-scalars": (ConvScalars, [(A, FOLDED, "conv")]),
    "conv-scale-only": (ConvScaleOnly, [(A, FOLDED, "conv")]),
    "rsub": (Rsub, [(A, FOLDED, "conv")]),
    "add-alpha": (AddAlpha, [(A, FOLDED, "conv")]),
    "conv1d": (Conv1dChain, [(A, FOLDED, "conv")]),
    "conv3d": (Conv3dChain, [(A, FOLDED, "conv")]),
    "conv-transpose-grouped": (ConvTransposeGrouped, [(A, FOLDED, "conv")]),
    "linear-3d": (Linear3d, [(A, FOLDED, "fc")]),
    "addmm": (Addmm, [(A, FOLDED, "")]),
    "matmul-param": (MatMulParam, [(A, FOLDED, "")]),
    "through-views": (ThroughViews, [(A, FOLDED, "conv")]),
    "long-chain": (LongChain, [(A, FOLDED, "conv")]),
    "bn-then-chain": (BnThenChain, [(B, FOLDED, "conv"), (A, FOLDED, "conv")]),
    "chain-then-bn": (ChainThenBn, [(B, FOLDED, "conv")]),
    "chain-bn-chain": (ChainBnChain, [(B, FOLDED, "conv"), (A, FOLDED, "conv")]),
    "link-value-read-twice": (LinkValueReadTwice, [(A, FOLDED, "conv")]),
    "shared-weight": (SharedWeight, [(A, FOLDED, "")]),
    "mm-bias": (MmBias, []),
}


class OtherAxis(Case):
    """The operand varies along the width, not the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.s = param(1, 1, 1, 6, seed=40)

    def forward(self, x):
        return self.conv(x) * self.s


class RankGrows(Case):
    """A [1, 1, F] operand makes the Linear's 2-D output 3-D."""

    reads = "vec"

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(F_IN, F_OUT)
        self.s = param(1, 1, F_OUT, seed=41)

    def forward(self, x):
        return self.fc(x) + self.s


class OneChannelWidened(Case):
    """A one-channel conv times a [1, C, 1, 1] operand: C channels out of one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3)
        self.s = param(1, C, 1, 1, seed=42)

    def forward(self, x):
        return self.conv(x) * self.s


class Promotes(Case):
    """A float64 buffer times a float32 conv output: the result is float64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.register_buffer("s", rnd(C, 1, 1, seed=43, dtype=torch.float64))

    def forward(self, x):
        return self.conv(x) * self.s


class InputOperand(Case):
    """The shift is an input of the program."""

    reads = "all"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)

    def forward(self, xs):
        return self.conv(xs["2d"]) + xs["shift"]


class ProducerReadTwice(Case):
    """The conv's output is read by the chain and a cat: no fold, and no entry (as above)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3)
        self.s = param(C, 1, 1, seed=44)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y * self.s, y])


KEEP_CASES: dict[str, tuple[type[Case], list[tuple[str, str, str]]]] = {
    "other-axis": (OtherAxis, [(A, KEPT, rules.CHANNEL_AXIS)]),
    "rank-grows": (RankGrows, [(A, KEPT, rules.CHANNEL_AXIS)]),
    "one-channel-widened": (OneChannelWidened, [(A, KEPT, rules.CHANNEL_AXIS)]),
    "promotes": (Promotes, [(A, KEPT, rules.VALID_VALUES)]),
    "input-operand": (InputOperand, [(A, KEPT, rules.CONSTANT_PARAMS)]),
    "producer-read-twice": (ProducerReadTwice, []),
}
REASONS = {  # a piece of each kept case's reason
    "other-axis": "varies along axis 3, but the channels of cases.other_axis.conv are on axis 1",
    "rank-grows": "from shape [4, 5] to [1, 4, 5]",
    "one-channel-widened": "from shape [2, 1, 6, 6] to [2, 4, 6, 6]",
    "promotes": "computes in float64 on the float32 output of cases.promotes.conv",
    "input-operand": "graph input",
}


# --------------------------------------------------------------------------------------------
# Folding a model of cases


def key(case: str) -> str:
    return re.sub(r"[^0-9A-Za-z]", "_", case)


def path(case: str, sub: str = "") -> str:
    return f"cases.{key(case)}" + (f".{sub}" if sub else "")


class Cases(nn.Module):
    """Every case of a table, one output each."""

    def __init__(self, table: dict) -> None:
        super().__init__()
        self.cases = nn.ModuleDict({key(n): cls() for n, (cls, _) in table.items()})

    def forward(self, xs: dict[str, torch.Tensor]):
        return tuple(m(xs) if m.reads == "all" else m(xs[m.reads]) for m in self.cases.values())


def case_inputs(seed: int) -> tuple[dict[str, torch.Tensor]]:
    xs = inputs(seed)
    xs["shift"] = rnd(C, 1, 1, seed=seed + 50)
    return (xs,)


TABLES = {"folds": FOLD_CASES, "keeps": KEEP_CASES}


@functools.cache
def model_of(table: str) -> Cases:
    return randomize_all(Cases(TABLES[table]), seed=7)


@functools.cache
def program(table: str, decomposed: bool) -> ExportedProgram:
    return export(model_of(table), case_inputs(0), decomposed)


def target_of(table: str, form: str) -> ExportedProgram | fx.GraphModule:
    ep = program(table, form == "decomposed")
    return ep.module() if form == "module" else ep


def case_of(node: fx.Node) -> str | None:
    """The case whose forward computes ``node`` (its innermost module)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [p for p, _ in stack.values()]
    return paths[-1] if paths else None


def arith_by_case(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_function" and op(n) in ARITH:
            where = case_of(n)
            counts[where] = counts.get(where, 0) + 1
    return counts


@dataclass
class Folded:
    target: ExportedProgram | fx.GraphModule
    folded: ExportedProgram | fx.GraphModule
    report: bnfold.FoldReport


@functools.cache
def folded(table: str, form: str, affine: bool = True) -> Folded:
    """Fold the table's model in ``form``: the input untouched (parameters and buffers bit for
    bit), ``analyze`` equal to ``fold``'s report, every entry well formed."""
    target = target_of(table, form)
    before = snapshot(target)
    report = bnfold.analyze(target, affine=affine)
    result, fold_report = bnfold.fold(target, return_report=True, affine=affine)
    assert_snapshot_equal(before, snapshot(target))
    assert fold_report.entries == report.entries
    check_entries(fold_report, form)
    return Folded(target, result, fold_report)


def entries_of(report: bnfold.FoldReport, case: str) -> list[bnfold.FoldEntry]:
    prefix = path(case)
    return [e for e in report if e.bn == prefix or e.bn.startswith((f"{prefix} ", f"{prefix}."))]


def outputs_by_case(model, table: str, seed: int) -> dict[str, list[torch.Tensor]]:
    got = torch_outputs(model, case_inputs(seed))
    return {name: [t] for name, t in zip(TABLES[table], got, strict=True)}


def check_table(table: str, form: str) -> None:
    """Every case: its entries, its outputs on fresh inputs (exact when nothing folded), its
    arithmetic nodes gone (as many as it folds)."""
    r = folded(table, form)
    want = outputs_by_case(r.target, table, 11)
    got = outputs_by_case(r.folded, table, 11)
    before, after = arith_by_case(graph_of(r.target)), arith_by_case(graph_of(r.folded))
    problems = []
    for name, (cls, expected) in TABLES[table].items():
        try:
            found = sorted(
                (
                    e.kind,
                    e.action,
                    e.target.removeprefix(path(name)).lstrip(".") if e.folded else e.rule,
                )
                for e in entries_of(r.report, name)
            )
            assert found == sorted(expected), found
            if any(action == FOLDED for _, action, _ in expected):
                assert rel_err(want[name], got[name]) <= REL_TOL
            else:
                assert_same_outputs(want[name], got[name])
            gone = before.get(path(name), 0) - after.get(path(name), 0)
            assert gone == cls.folds, f"{gone} arithmetic nodes gone, not {cls.folds}"
        except AssertionError as err:
            problems.append(f"{name}: {err}")
    assert not problems, "\n".join(problems) + f"\n{r.report}"


@pytest.mark.parametrize("form", FORMS)
def test_chains_fold_into_their_layers(form):
    check_table("folds", form)
    r = folded("folds", form)
    nodes = graph_of(r.folded).nodes
    if form == "decomposed":  # x @ W + shift: mm took the shift as a bias
        ops = [op(n) for n in nodes if case_of(n) == path("matmul-param")]
        assert ops.count("addmm") == 1 and "mm" not in ops, ops
    # the two convs of one weight: the folded one has its own copy, the other the original
    convs = [n for n in nodes if case_of(n) == path("shared-weight") and "conv" in op(n)]
    assert len({n.args[1] for n in convs}) == 2, convs


@pytest.mark.parametrize("form", FORMS)
def test_chains_that_cannot_fold_are_kept_with_the_reason(form):
    check_table("keeps", form)
    r = folded("keeps", form)
    for name, piece in REASONS.items():
        (e,) = entries_of(r.report, name)
        assert piece in e.reason, e


def test_bn_entries_name_the_links_they_fold():
    r = folded("folds", "exported")
    (chain_then_bn,) = entries_of(r.report, "chain-then-bn")
    assert chain_then_bn.target_type == "Conv2d+mul", chain_then_bn
    bn_entry = next(e for e in entries_of(r.report, "chain-bn-chain") if e.kind == B)
    assert bn_entry.target_type == "Conv2d+mul+sub", bn_entry
    # the ops of each chain, as exported
    types = {
        name: [e.bn_type for e in entries_of(r.report, name) if e.kind == A]
        for name in ("rsub", "long-chain", "link-value-read-twice")
    }
    assert types == {
        "rsub": ["rsub -> sub -> sub"],
        "long-chain": ["mul -> add -> div -> neg -> mul -> sub -> sub -> mul -> add"],
        "link-value-read-twice": ["mul"],
    }, types


def test_affine_false_leaves_all_arithmetic():
    """No affine entries, every arithmetic node stays, and a BatchNorm after arithmetic has no
    producer (the behaviour before affine chains)."""
    r = folded("folds", "exported", affine=False)
    assert not r.report.affines
    assert arith_count(graph_of(r.folded)) == arith_count(graph_of(r.target))
    assert {e.bn: (e.action, e.rule) for e in r.report} == {
        path("bn-then-chain", "bn"): (FOLDED, None),
        path("chain-then-bn", "bn"): (KEPT, rules.NO_PRODUCER),
        path("chain-bn-chain", "bn"): (KEPT, rules.NO_PRODUCER),
    }
    assert (
        rel_err(torch_outputs(r.target, case_inputs(3)), torch_outputs(r.folded, case_inputs(3)))
        <= REL_TOL
    )


# --------------------------------------------------------------------------------------------
# The report, files, dtypes, and graphs left alone


class Small(nn.Module):
    """A BatchNorm with a link before and after it, and a chain on a second conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)
        self.conv2 = nn.Conv2d(3, C, 3)
        self.s, self.t = param(C, 1, 1, seed=60), param(C, 1, 1, seed=61)

    def forward(self, x):
        return self.bn(self.conv(x) * self.s) + self.t, (self.conv2(x) - self.t) * self.s


def small_program(dtype: torch.dtype = torch.float32) -> tuple[ExportedProgram, tuple]:
    model = randomize_all(Small(), seed=62).to(dtype)
    x = (rnd(*INPUTS["2d"], seed=63, dtype=dtype),)
    return export(model, x), x


def test_report_names_kinds_and_summary():
    ep, _ = small_program()
    report = bnfold.analyze(ep)
    rows = [(e.kind, e.bn, e.bn_type, e.action, e.target, e.target_type) for e in report]
    assert rows == [
        (B, "bn", "BatchNorm2d", FOLDED, "conv", "Conv2d+mul"),
        (A, "sub -> mul_1", "sub -> mul", FOLDED, "conv2", "Conv2d"),
        (A, "add", "add", FOLDED, "conv", "Conv2d"),  # after the BatchNorm: a second pass
    ], rows
    assert [e.bn for e in report.batch_norms] == ["bn"]
    assert [e.bn for e in report.affines] == ["sub -> mul_1", "add"]
    assert report.summary() == "1 of 1 BatchNorm folded, 0 kept; 2 of 2 affine chains folded"
    assert "BatchNorm / affine chain" in str(report)


def test_folded_program_round_trips_through_save_and_load(tmp_path):
    ep, x = small_program()
    folded = bnfold.fold(ep)
    assert arith_count(folded.graph) == 0 and len(bnfold.analyze(folded)) == 0
    torch.export.save(folded, str(tmp_path / "folded.pt2"))
    loaded = torch.export.load(str(tmp_path / "folded.pt2"))
    fresh = (rnd(*INPUTS["2d"], seed=64),)
    want = torch_outputs(ep, fresh)
    assert rel_err(want, torch_outputs(loaded, fresh)) <= REL_TOL
    assert_same_outputs(torch_outputs(folded, fresh), torch_outputs(loaded, fresh))


def test_float64_folds_to_float64_rounding():
    ep, _ = small_program(torch.float64)
    folded = bnfold.fold(ep)
    assert arith_count(folded.graph) == 0
    fresh = (rnd(*INPUTS["2d"], seed=65, dtype=torch.float64),)
    assert rel_err(torch_outputs(ep, fresh), torch_outputs(folded, fresh)) <= 1e-13


class Half(nn.Module):
    """float16 Linears: a chain that folds, one whose shift is too close to the float16 limit,
    one promoted to float32 by a float32 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(F_IN, F_OUT) for _ in range(3))
        self.s, self.t = param(F_OUT, seed=66), param(F_OUT, seed=67)
        self.register_buffer("wide", rnd(F_OUT, seed=68))

    def forward(self, x):
        return self.a(x) * self.s + self.t, self.b(x) * 0.5 + 20000.0, self.c(x) * self.wide


def test_float16_headroom_and_promotion():
    model = randomize_all(Half(), seed=69).half()
    for name in ("s", "t"):
        getattr(model, name).data = getattr(model, name).data.half()
    model.wide = model.wide.float()
    x = (rnd(*INPUTS["vec"], seed=70, dtype=torch.float16),)
    ep = export(model, x)
    folded, report = bnfold.fold(ep, return_report=True)
    found = {e.target: (e.action, e.rule) for e in report}
    assert found == {
        "a": (FOLDED, None),
        "b": (KEPT, rules.VALID_VALUES),  # shift 20000 > 65504 / 4
        "c": (KEPT, rules.VALID_VALUES),  # float16 * float32 computes in float32
    }, report
    assert "float16 limit" in report.entry("mul_1 -> add_1").reason
    assert "computes in float32" in report.entry("mul_2").reason
    fresh = (rnd(*INPUTS["vec"], seed=71, dtype=torch.float16),)
    want, got = torch_outputs(ep, fresh), torch_outputs(folded, fresh)
    assert rel_err(want[:1], got[:1]) <= 4e-3  # a few float16 roundings
    assert_same_outputs(want[1:], got[1:])


class Integers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randint(-3, 4, (F_IN, F_OUT)))
        self.register_buffer("b", torch.randint(-3, 4, (F_OUT,)))

    def forward(self, x):
        return (x @ self.w) * 3 + self.b


def test_integer_graph_is_left_alone():
    ep = export(Integers(), (torch.randint(-5, 5, INPUTS["vec"]),))
    folded, report = bnfold.fold(ep, return_report=True)
    assert len(report) == 0 and str(folded.graph) == str(ep.graph)


def test_quantized_pt2e_graph_is_left_alone():
    pytest.importorskip("torchao")
    from tests.helpers import qat

    model = randomize_all(ConvMulAdd(), seed=72)
    x = rnd(*INPUTS["2d"], seed=73)
    calib = [rnd(*INPUTS["2d"], seed=74 + i) for i in range(2)]
    converted = qat.ptq_convert(model, (x,), qat.xnnpack_quantizer(), calib)
    assert {"conv2d", "mul", "add"} <= set(qat.op_names(converted))
    code = converted.code
    folded, report = bnfold.fold(converted, return_report=True)
    assert len(report) == 0 and folded.code == code
    assert_same_outputs(torch_outputs(converted, (x,)), torch_outputs(folded, (x,)))


class _Scale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.s


class _ThroughPreserved(nn.Module):
    """conv -> [inner: mul] -> add: the chain passes through a module whose call signature
    the program preserves."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.inner = _Scale(4)
        self.t = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.conv(x)) + self.t


def test_chain_through_a_preserved_module_is_kept():
    """Folding would remove the preserved module's only node (its call would be empty after
    torch.export.unflatten): module-boundary, as for a BatchNorm inside such a module."""
    model, x = _ThroughPreserved().eval(), torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,), preserve_module_call_signature=("inner",))
    folded, report = bnfold.fold(ep, return_report=True)
    assert [(e.kind, e.action, e.rule) for e in report] == [
        ("affine", "skipped", rules.MODULE_BOUNDARY)
    ], str(report)
    assert hasattr(torch.export.unflatten(folded), "inner")
    torch.testing.assert_close(folded.module()(x), ep.module()(x), rtol=0, atol=0)
