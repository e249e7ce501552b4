"""Programs as users hand them over: with preserved module call signatures (folds do not cross
them), unflattened (the program folds, the unflattened module is refused with what to do), on
the meta device, computing nothing, with an input called ``input``; ``ep.module()`` folded in
place; a bad ``producers`` argument; control characters in names escaped in the report.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold
from bnfold.core import rules
from tests.helpers.check import REL_TOL, assert_close, check_report, rel_err
from tests.helpers.forms import export
from tests.helpers.forms import graph_bn_count as n_bn
from tests.helpers.support import randn, randomize_all

aten = torch.ops.aten


class ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


class BnOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x)


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = ConvOnly()
        self.bnm = BnOnly()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bnm(self.conv(x)).relu()


@pytest.mark.parametrize("preserved", ["conv", "bnm"])
def test_folds_do_not_cross_a_preserved_module_signature(preserved):
    model = randomize_all(Split(), 2)
    ep = export(model, (randn(2, 3, 8, 8),), preserve_module_call_signature=(preserved,))
    folded, report = bnfold.fold(ep, return_report=True)
    (entry,) = report.entries
    assert entry.rule == rules.MODULE_BOUNDARY and preserved in entry.reason
    unflat = torch.export.unflatten(folded)  # still possible, and swapping still means the same
    x = randn(2, 3, 8, 8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(unflat(x), model(x), rtol=1e-5, atol=1e-5)
        setattr(unflat, preserved, getattr(model, preserved))
        torch.testing.assert_close(unflat(x), model(x), rtol=1e-5, atol=1e-5)


def test_folds_inside_one_preserved_module_still_happen():
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.b(self.c(x))

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x).relu()

    model = randomize_all(Outer(), 3)
    ep = export(model, (randn(2, 3, 8, 8),), preserve_module_call_signature=("inner",))
    folded, report = bnfold.fold(ep, return_report=True)
    assert report.entry("inner.b").folded
    assert_close(model, torch.export.unflatten(folded), randn(2, 3, 8, 8, seed=4))


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.c(x)).relu()


def test_program_that_was_unflattened_folds():
    model = randomize_all(ConvBn(), 4)
    ep = export(model, (randn(2, 3, 8, 8),))
    torch.export.unflatten(ep)  # caches itself in ep.graph_module.meta
    for target in (ep, ep.module()):
        folded, report = bnfold.fold(target, return_report=True)
        check_report(report, {"b": ("folded", "c")})
        assert n_bn(folded) == 0
        assert_close(model, folded, randn(2, 3, 8, 8, seed=5))


def test_program_on_the_meta_device_is_a_clear_error():
    with torch.device("meta"):
        model = ConvBn().eval()
    ep = export(model, (torch.randn(2, 3, 8, 8, device="meta"),))
    for call in (lambda: bnfold.analyze(ep), lambda: bnfold.fold(ep)):
        with pytest.raises(bnfold.UnsupportedModelError, match="meta device"):
            call()


def test_in_place_fold_of_ep_module_leaves_the_program_and_model_alone():
    model = randomize_all(ConvBn(), 5)
    ep = export(model, (randn(2, 3, 8, 8),))
    x = randn(2, 3, 8, 8, seed=6)
    with torch.no_grad():
        expected = model(x)
    gm = ep.module()
    folded, report = bnfold.fold(gm, inplace=True, return_report=True)
    assert folded is gm and n_bn(gm) == 0
    check_report(report, {"b": ("folded", "c")})
    with torch.no_grad():
        assert rel_err([expected], [gm(x)]) <= REL_TOL
        # ep.module() shares its tensors with ep and model: none of them was written
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(ep.module()(x), expected, rtol=0, atol=0)


def test_unflattened_module_is_refused_with_what_to_do():
    ep = export(randomize_all(Split(), 19), (randn(2, 3, 8, 8),))
    unflat = torch.export.unflatten(ep)
    for call in (lambda: bnfold.analyze(unflat), lambda: bnfold.fold(unflat)):
        with pytest.raises(bnfold.UnsupportedModelError, match="fold the ExportedProgram first"):
            call()


@pytest.mark.parametrize("producers", [5, ["conv", 3], [["conv"]], "nope"])
def test_bad_producers_argument_is_an_invalid_argument(producers):
    ep = export(randomize_all(ConvBn(), 20), (randn(2, 3, 8, 8),))
    with pytest.raises(
        bnfold.InvalidArgumentError, match="unknown producer kinds|producers must be"
    ):
        bnfold.fold(ep, producers=producers)


def test_program_whose_input_is_called_input_keeps_its_signature():
    """fx renames a copied placeholder called "input" (a builtin); torch matches by name."""
    model = randomize_all(nn.Sequential(ConvOnly(), nn.BatchNorm2d(4), nn.ReLU()), 26)
    ep = export(model, (randn(2, 3, 8, 8),), preserve_module_call_signature=("0",))
    folded, report = bnfold.fold(ep, return_report=True)
    # the BatchNorm is outside the preserved module "0", its conv inside: kept
    check_report(report, {"1": ("skipped", rules.MODULE_BOUNDARY)})
    assert [p.name for p in folded.graph.nodes if p.op == "placeholder"][-1] == "input"
    again = folded.run_decompositions()
    assert_close(model, again, randn(2, 3, 8, 8, seed=27))


def test_report_escapes_control_characters_in_names():
    model = nn.Sequential()
    model.add_module("conv\nFAKE", nn.Conv2d(3, 4, 3))
    model.add_module("bn\x1bM", nn.BatchNorm2d(4))
    ep = export(randomize_all(model, 32), (randn(2, 3, 8, 8),))
    text = str(bnfold.analyze(ep))
    assert "\x1b" not in text and len(text.splitlines()) == 4
    assert "conv\\nFAKE" in text


def test_module_of_a_program_that_computes_nothing_is_a_graph_not_a_training_module():
    # found by the random-network fuzzer: ep.module() is in training mode, and a program with
    # no ATen op was taken for an eager module, which raised TrainingModeError
    class Identity(torch.nn.Module):
        def forward(self, x):
            return (x,)

    ep = torch.export.export(Identity().eval(), (torch.randn(2, 3),))
    gm = ep.module()
    assert gm.training
    folded, report = bnfold.fold(gm, return_report=True)
    assert len(report) == 0
    x = torch.randn(2, 3)
    torch.testing.assert_close(folded(x)[0], x, rtol=0, atol=0)
