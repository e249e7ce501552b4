"""``bnfold.verify`` on eager models: it looks inside dataclasses, compares complex, integer and NaN
outputs, and refuses outputs holding no tensor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import bnfold
from tests.helpers.support import randn, randomize_all
from tests.helpers.torch_models import ConvBN


@dataclass
class Out:
    y: torch.Tensor
    label: str = "y"


class ReturnsDataclass(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)

    def forward(self, x):
        return Out(self.bn(self.conv(x)))


def test_verify_looks_inside_dataclasses():
    model = randomize_all(ReturnsDataclass())
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.conv.weight.mul_(3)
    _, rel = bnfold.verify(model, wrong, randn(2, 3, 6, 6))
    assert rel > 0.1
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("bn").folded, report
    assert bnfold.verify(model, folded, randn(2, 3, 6, 6))[1] <= 1e-5


def test_verify_refuses_outputs_without_tensors():
    class Nothing(nn.Module):
        def forward(self, x):
            return "done"

    with pytest.raises(bnfold.UnsupportedModelError, match="no tensor"):
        bnfold.verify(Nothing(), Nothing(), randn(2))


def test_verify_compares_complex_integer_and_nan_outputs():
    class Mixed(nn.Module):
        def __init__(self, shift: float) -> None:
            super().__init__()
            self.shift = shift

        def forward(self, x):
            y = x + self.shift
            return torch.fft.fft(y), y.argmax(-1), y.log()

    x = randn(3, 8)
    assert bnfold.verify(Mixed(0.0), Mixed(0.0), x) == (0.0, 0.0)  # NaN logs agree with NaN
    err, rel = bnfold.verify(Mixed(0.0), Mixed(1e-3), x)
    assert 0 < err < 1 and rel < 1
