"""Verifying folded programs (``bnfold.verify`` and the ``.pt2`` check): each program gets its own
inputs and state (nothing shared is changed), discrete outputs are compared by share of
elements, complex outputs get their real parts' tolerance, and random inputs for a program
without examples vary 8-bit images over their range. A wrong fold is seen.
"""

from __future__ import annotations

import torch
from torch import nn

import bnfold
from bnfold.core import rules
from bnfold.torch import pt2 as torch_pt2
from tests.helpers.check import REL_TOL, check_report
from tests.helpers.forms import export
from tests.helpers.support import randn, randomize_all

aten = torch.ops.aten


class WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(0.5).mul_(2.0)
        return self.b(self.c(x))


def test_verification_gives_each_program_its_own_inputs():
    ep = export(randomize_all(WritesItsInput(), 13), (randn(2, 3, 8, 8),))
    folded, report = bnfold.fold(ep, return_report=True)
    check_report(report, {"b": ("folded", "c")})  # a fold to check, not a copy
    x = randn(2, 3, 8, 8, seed=14)
    before = x.clone()
    _, max_rel = bnfold.verify(ep, folded, (x,))
    assert max_rel <= REL_TOL and torch.equal(x, before)
    result = torch_pt2.check(ep, folded, seed=1)
    assert result.passed and result.max_rel <= REL_TOL


class CountsAndTrains(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.head = nn.BatchNorm2d(4)  # kept in training mode: updates its statistics
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.head(self.b(self.c(x)))


def test_verification_and_running_the_folded_program_change_no_shared_state():
    model = randomize_all(CountsAndTrains(), 15)
    model.head.train()
    ep = export(model, (randn(2, 3, 8, 8),))
    folded, report = bnfold.fold(ep, return_report=True)
    assert report.entry("b").folded and report.entry("head").rule == rules.INFERENCE_MODE
    state = {k: v.clone() for k, v in ep.state_dict.items()}
    eager = {k: v.clone() for k, v in model.state_dict().items()}
    torch_pt2.check(ep, folded)
    bnfold.verify(ep, folded, (randn(2, 3, 8, 8, seed=16),))
    with torch.no_grad():
        folded.module()(randn(2, 3, 8, 8, seed=17))  # the folded program's own state is its own
    for k, v in ep.state_dict.items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, eager[k], rtol=0, atol=0)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.c(x)).argmax(1)  # only a decision comes out


def test_verification_of_programs_with_only_discrete_outputs():
    ep = export(randomize_all(Classifier(), 18), (randn(2, 3, 8, 8),))
    folded, report = bnfold.fold(ep, return_report=True)
    check_report(report, {"b": ("folded", "c")})  # a fold to check, not a copy
    good = torch_pt2.check(ep, folded)
    assert good.passed and good.discrete_outputs and good.discrete_mismatch <= 0.01
    key = next(k for k in folded.state_dict if k.endswith("weight"))
    folded.state_dict[key] = nn.Parameter(-folded.state_dict[key].detach())  # a wrong fold
    bad = torch_pt2.check(ep, folded)
    assert not bad.passed and bad.discrete_mismatch > 0.1
    assert "integer/bool outputs differ" in bad.summary()


def test_verification_tolerance_covers_complex_outputs():
    class Spectrum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.fft.rfft2(self.b(self.c(x)))

    ep = export(randomize_all(Spectrum(), 28), (randn(2, 3, 8, 8),))
    folded, report = bnfold.fold(ep, return_report=True)
    check_report(report, {"b": ("folded", "c")})
    result = torch_pt2.check(ep, folded)
    assert result.tolerance == 1e-4 and result.passed


def test_random_inputs_of_a_program_without_examples_vary_8_bit_images():
    class FromBytes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, img):
            return self.b(self.c(img.float() / 255.0))

    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ep = export(randomize_all(FromBytes(), 31), (img,))
    ep.example_inputs = None
    (sample,), _ = torch_pt2.sample_inputs(ep, seed=3)
    assert sample.dtype == torch.uint8 and sample.unique().numel() > 50
    folded, report = bnfold.fold(ep, return_report=True)
    check_report(report, {"b": ("folded", "c")})  # a fold to check, not a copy
    assert torch_pt2.check(ep, folded).passed
    key = next(k for k in folded.state_dict if k.endswith("weight"))
    folded.state_dict[key] = nn.Parameter(folded.state_dict[key].detach() * 1.5)
    assert not torch_pt2.check(ep, folded).passed  # a wrong fold is seen
