"""State a program writes, which is not a constant to fold: weights and statistics updated in
place through a view (a select, a slice, ``_unsafe_view``, ``unsafe_split``), through a buffer
sharing their memory, or in a copy made in forward (pruning a clone), and statistics made by
``torch.tensor`` in forward then written. Such a BatchNorm is kept (``constant-params``); the
folded program computes, call after call, exactly what the original computes, and written state
that shares memory keeps sharing it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.core import rules
from tests.helpers.check import REL_TOL, rel_err, torch_outputs
from tests.helpers.forms import export, program_forms
from tests.helpers.forms import graph_bn_count as n_bn
from tests.helpers.support import randn, randomize_all

aten = torch.ops.aten


class WeightUpdatedThroughView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(4, 3, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(F.conv2d(x, self.w))
        self.w[0].mul_(2.0)  # a stateful update through a select
        return y


class StatisticsUpdatedThroughView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        self.bn.running_mean[0:2].add_(1.0)  # through a slice
        return y


@pytest.mark.parametrize("cls", [WeightUpdatedThroughView, StatisticsUpdatedThroughView])
@pytest.mark.parametrize("as_module", [False, True], ids=["program", "graph-module"])
def test_state_written_through_a_view_is_not_constant(cls, as_module):
    def program():
        torch.manual_seed(0)
        return export(randomize_all(cls(), 1), (randn(2, 3, 8, 8),))

    original = program().module()
    target = program()
    target = target.module() if as_module else target
    folded, report = bnfold.fold(target, return_report=True)
    assert report.entry("bn").rule == rules.CONSTANT_PARAMS
    run = folded if as_module else folded.module()
    with torch.no_grad():
        for call in range(3):  # the state changes from call to call
            x = randn(2, 3, 8, 8, seed=call)
            torch.testing.assert_close(run(x), original(x), rtol=0, atol=0)


class BufferViewOfWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(8, 3, 3, 3))
        self.register_buffer("v", self.w[0:4])  # a second buffer that is a view of w
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.v.mul_(2.0)  # writes into w
        return self.bn(F.conv2d(x, self.w))


def test_weight_written_through_a_buffer_sharing_its_memory_is_not_folded():
    def program():
        torch.manual_seed(0)
        return export(randomize_all(BufferViewOfWeight(), 12), (randn(2, 3, 8, 8),))

    original, target = program().module(), program()
    folded, report = bnfold.fold(target, return_report=True)
    assert report.entry("bn").rule == rules.CONSTANT_PARAMS
    run = folded.module()
    with torch.no_grad():
        for call in range(3):
            torch.testing.assert_close(
                run(randn(2, 3, 8, 8, seed=call)),
                original(randn(2, 3, 8, 8, seed=call)),
                rtol=0,
                atol=0,
            )


class AliasedWeightBuffer(nn.Module):
    """c1's weight is also a buffer (same memory) that forward scales in place."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.register_buffer("w_alias", self.c1.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.c2(self.bn1(self.c1(x))))
        self.w_alias.mul_(1.5)
        return y


def test_written_state_sharing_memory_keeps_sharing_it_after_the_fold():
    def fresh():
        torch.manual_seed(0)
        return randomize_all(AliasedWeightBuffer(), 21)

    x = randn(2, 3, 8, 8, seed=22)
    with torch.no_grad():
        eager = fresh()
        reference = [eager(x.clone()) for _ in range(3)]  # the write changes every call
    folded, report = bnfold.fold(export(fresh(), (x,)), return_report=True)
    assert report.entry("bn1").rule == rules.CONSTANT_PARAMS and report.entry("bn2").folded
    sd = folded.state_dict
    assert sd["c1.weight"].untyped_storage().data_ptr() == (
        sd["w_alias"].untyped_storage().data_ptr()
    )
    folded_gm, report_gm = bnfold.fold(export(fresh(), (x,)).module(), return_report=True)
    assert [(e.bn, e.action, e.rule) for e in report_gm] == [
        (e.bn, e.action, e.rule) for e in report
    ]
    for run in (folded.module(), folded_gm):
        with torch.no_grad():
            for expected in reference:
                assert rel_err([expected], [run(x.clone())]) <= REL_TOL


@pytest.mark.parametrize("op", ["_unsafe_view", "unsafe_split"])
def test_weight_written_through_an_unannotated_view_is_not_folded(op):
    class WritesThroughView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randn(4, 3, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(F.conv2d(x, self.w))
            if op == "_unsafe_view":
                aten._unsafe_view.default(self.w, [4, 27]).mul_(2.0)
            else:
                aten.unsafe_split.Tensor(self.w, 2)[0].mul_(2.0)
            return y

    def program():
        torch.manual_seed(0)
        return export(randomize_all(WritesThroughView(), 25), (randn(2, 3, 8, 8),))

    original = program().module()
    folded, report = bnfold.fold(program(), return_report=True)
    assert report.entry("bn").rule == rules.CONSTANT_PARAMS
    with torch.no_grad():
        for call in range(3):
            torch.testing.assert_close(
                folded.module()(randn(2, 3, 8, 8, seed=call)),
                original(randn(2, 3, 8, 8, seed=call)),
                rtol=0,
                atol=0,
            )


class PrunedCopy(nn.Module):
    """Structured pruning in forward: a copy of the weight, zeroed in place."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bn = nn.BatchNorm2d(4)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w.clone()
        if self.how == "slice-assign":
            w[2:4] = 0
        elif self.how == "select-mul":
            w[1].mul_(0.5)
        elif self.how == "view-of-view":
            w.view(4, 27)[:, :5].zero_()
        elif self.how == "transposed-copy":
            w = self.w.transpose(0, 1).clone().transpose(0, 1)
            w[0:2].fill_(0.25)
        return self.bn(F.conv2d(x, w))


@pytest.mark.parametrize("how", ["slice-assign", "select-mul", "view-of-view", "transposed-copy"])
def test_weight_copy_written_in_place_is_not_folded_into(how):
    """Folding rebuilt the clone on the folded weight and lost the write (rel 0.95)."""
    model = randomize_all(PrunedCopy(how), 40)
    x = (randn(2, 3, 8, 8, seed=41),)
    expected = torch_outputs(model, x)
    for form, target in program_forms(model, (randn(2, 3, 8, 8),)):
        folded, report = bnfold.fold(target, return_report=True)
        entry = report.entry("bn")
        # Decomposed, the write becomes slice_scatter & co., which no chain passes through.
        assert entry.rule == rules.CONSTANT_PARAMS, (form, entry)
        assert "written in place" in entry.reason or form.startswith("decomposed"), entry
        assert rel_err(expected, torch_outputs(folded, x)) <= REL_TOL, form


class TensorStatistics(nn.Module):
    """BatchNorm statistics made by torch.tensor in forward (lift_fresh_copy in the graph)."""

    def __init__(self, written: bool) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.written = written

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor([0.1, -0.7, 0.3, 1.2])
        var = torch.tensor([0.2, 2.5, 1.1, 0.4])
        if self.written:
            mean[1:3] = 0.5  # not a constant any more
        weight, bias = torch.tensor([1.5, -0.5, 0.8, 2.0]), torch.tensor([0.1, 0.2, -0.3, 0.0])
        return F.batch_norm(self.c(x), mean, var, weight, bias, False, 0.1, 1e-3)


@pytest.mark.parametrize("written", [False, True], ids=["constant", "written"])
def test_statistics_made_by_torch_tensor_in_forward(written):
    model = TensorStatistics(written).eval()
    x = (randn(2, 3, 8, 8, seed=48),)
    expected = torch_outputs(model, x)
    for form, target in program_forms(model, (randn(2, 3, 8, 8),)):
        folded, report = bnfold.fold(target, return_report=True)
        (entry,) = report.entries
        if written:
            assert entry.rule == rules.CONSTANT_PARAMS, (form, entry)
        else:
            assert entry.folded and n_bn(folded) == 0, (form, entry)
        assert rel_err(expected, torch_outputs(folded, x)) <= REL_TOL, form
