"""forward's arguments and bnfold's: optional arguments and flags (traced both ways, other values
noted), example inputs given as a list, a dict or an object pytree cannot flatten (never written
into; writes into them are uses), example inputs the model rejects, and ``producers=`` (one kind
as a string; bytes, a dict or a number refused).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bnfold
from bnfold.core import rules
from tests.helpers.check import assert_close, check_report
from tests.helpers.support import randn, randomize_all
from tests.helpers.torch_models import ConvBN, OptionalMask


class OptionalResidual(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=1)

    def forward(self, x, residual=None):
        f = self.conv(x)
        if residual is None:
            residual = f  # the usual call uses the conv output twice
        return self.bn(f) + residual


@pytest.mark.parametrize("example", [None, "given"])
def test_optional_argument_left_at_none_is_traced_as_called(example):
    model = randomize_all(OptionalResidual())
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, None if example is None else (x,), return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER
    assert_close(model, folded, x)
    assert_close(model, folded, x, randn(2, 8, 6, 6, seed=1))


def test_optional_arguments_that_do_not_matter_still_fold():
    model = randomize_all(OptionalMask())
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("bn").folded
    assert_close(model, folded, x)
    assert_close(model, folded, x, randn(1, 8, 1, 1, seed=2))


def test_producers_accepts_one_kind_as_a_string():
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    report = bnfold.analyze(model, producers="linear")
    assert report.entry("1").rule == rules.NOT_SELECTED
    assert bnfold.analyze(model, producers="conv").entry("1").folded
    with pytest.raises(bnfold.InvalidArgumentError, match="unknown producer kinds"):
        bnfold.analyze(model, producers="convolution")


class TakesAList(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)

    def forward(self, xs: list):
        return [self.bn(self.conv(x)) for x in xs]


def test_a_list_example_input_is_one_argument():
    model = randomize_all(TakesAList())
    xs = [randn(1, 3, 6, 6), randn(1, 3, 6, 6, seed=1)]
    with pytest.raises(bnfold.TracingError):
        bnfold.fold(model)  # iterating over a proxy cannot be traced symbolically
    folded, report = bnfold.fold(model, xs, return_report=True)
    assert report.entry("bn").rule == rules.UNSHARED  # called once per list element
    assert bnfold.verify(model, folded, xs) == (0.0, 0.0)


class NormOnlyWithoutSkip(ConvBN):
    """With skip=None the conv output goes through the BatchNorm only; with a skip tensor it
    also leaves the model un-normalised."""

    def __init__(self) -> None:
        super().__init__(padding=1)

    def forward(self, x, skip=None):
        y = self.conv(x)
        if skip is None:
            return self.bn(y)
        return y + skip


def test_a_user_seen_in_one_trace_only_blocks_the_fold():
    model = randomize_all(NormOnlyWithoutSkip())
    x, skip = randn(2, 3, 6, 6), randn(2, 8, 6, 6, seed=1)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER
    assert_close(model, folded, x)
    assert_close(model, folded, x, skip)


def test_example_inputs_the_model_rejects_are_a_clear_error():
    model = randomize_all(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)))
    with pytest.raises(bnfold.InvalidArgumentError, match="example_inputs"):
        bnfold.fold(model, (randn(4, 7),))


class ReturnsFeatures(ConvBN):
    def __init__(self) -> None:
        super().__init__(out=4, padding=0)

    def forward(self, x, return_features: bool = False, mode: str = "plain"):
        f = self.conv(x)
        if mode == "relu":
            f = f.relu()
        y = self.bn(f)
        return (y, f) if return_features else y


def test_flags_are_traced_both_ways_and_other_values_are_noted():
    model = randomize_all(ReturnsFeatures())
    x = randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="mode='plain'"):
        folded, report = bnfold.fold(model, (x,), return_report=True)
    # return_features=True returns the conv output: traced, so the fold is refused
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER
    assert report.notes and "mode" in report.notes[0]
    for call in [(x,), (x, True), (x, False, "relu")]:
        assert_close(model, folded, *call)


class WritesIntoInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, v):
        v.mul_(2)
        return self.bn(self.fc(v))


@pytest.mark.parametrize("call", ["fold", "analyze"])
def test_the_callers_example_inputs_are_never_written_into(call):
    model = randomize_all(WritesIntoInput().eval())
    v = randn(3, 4)
    before = v.clone()
    getattr(bnfold, call)(model, (v,))  # Linear + BatchNorm1d: the rank is probed by a run
    assert torch.equal(v, before)


@pytest.mark.parametrize("producers", [b"conv", bytearray(b"conv"), {"conv": 1}, 5])
def test_producers_must_be_kinds_not_bytes_or_a_dict(producers):
    with pytest.raises(bnfold.InvalidArgumentError, match="producers must be"):
        bnfold.fold(randomize_all(ConvBN().eval()), producers=producers)


class WritesIntoBatch(ConvBN):
    def forward(self, batch):
        y = self.conv(batch["img"])
        batch["feat"] = y  # the features go back to the caller in its own dict
        return self.bn(y)


class ShiftsInput(ConvBN):
    def forward(self, batch):
        x = batch["img"]
        x.sub_(0.5)
        return self.bn(self.conv(x))


def test_dict_example_inputs_are_not_changed_and_writes_into_them_are_uses():
    model = randomize_all(ShiftsInput().eval())
    x = randn(2, 3, 6, 6)
    example = {"img": x.clone()}
    folded, report = bnfold.fold(model, example, return_report=True)
    assert torch.equal(example["img"], x) and list(example) == ["img"]
    check_report(report, {"bn": ("folded", "conv")})  # a write into the input is no use
    a, b = {"img": x.clone()}, {"img": x.clone()}
    with torch.no_grad():
        assert torch.allclose(model(a), folded(b), rtol=1e-5, atol=1e-5)

    model = randomize_all(WritesIntoBatch().eval())
    example = {"img": x.clone()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note on what was traced as fixed
        folded, report = bnfold.fold(model, example, return_report=True)
    assert list(example) == ["img"]
    entry = report.entry("bn")
    assert entry.action == "skipped" and "argument 'batch'" in entry.reason, entry
    a, b = {"img": x.clone()}, {"img": x.clone()}
    with torch.no_grad():
        out_a, out_b = model(a), folded(b)
    assert torch.allclose(out_a, out_b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(a["feat"], b["feat"], rtol=1e-5, atol=1e-5)


class Batch:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.n = 0
        self.feats: list = []


class TakesAnObject(ConvBN):
    def forward(self, b):
        b.n += 1
        b.x.mul_(2)
        y = self.conv(b.x)
        b.feats.append(y)
        return self.bn(y)


def test_example_inputs_pytree_cannot_flatten_are_copied_too():
    model = randomize_all(TakesAnObject().eval())
    batch = Batch(randn(2, 3, 6, 6))
    before = batch.x.clone()
    folded, report = bnfold.fold(model, batch, return_report=True)
    assert batch.n == 0 and batch.feats == [] and torch.equal(batch.x, before)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER  # y is kept in the argument
    with torch.no_grad():
        want, got = model(Batch(before.clone())), folded(Batch(before.clone()))
    assert torch.allclose(want, got, rtol=1e-5, atol=1e-6)
