"""What stands between a producer and its BatchNorm, and the rank a fold is decided on: Identity
and dropout in eval mode (folded through; in training mode or used elsewhere, kept), layout ops
(transpose, permute, ``mT``: a Linear on (B, L, C) then BatchNorm1d over C folds with example
inputs; channels left on another axis are kept), and the rank checks a rank-decided fold leaves
in the folded model, which fail loudly on another rank.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnfold
from bnfold.core import rules
from bnfold.torch.eager.module import FoldedBatchNorm
from tests.helpers.check import assert_close
from tests.helpers.support import randn, randomize_all


def test_linear_bn1d_fold_decided_on_2d_refuses_3d_inputs_loudly():
    model = randomize_all(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)))
    folded = bnfold.fold(model, (randn(4, 8),))
    assert isinstance(folded[1], FoldedBatchNorm)
    assert_close(model, folded, randn(5, 8, seed=1))
    with torch.no_grad():
        model(randn(3, 8, 8, seed=2))  # the original accepts 3-D input too...
        with pytest.raises(AssertionError, match="2-D activations"):
            folded(randn(3, 8, 8, seed=2))  # ...where the fold would be wrong: it says so


def test_conv1d_bn1d_fold_decided_on_batched_refuses_unbatched_loudly():
    model = randomize_all(nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8)))
    folded, report = bnfold.fold(model, (randn(2, 3, 10),), return_report=True)
    assert report.entry("1").target == "0" and report.entry("1").folded, report
    assert isinstance(folded[1], FoldedBatchNorm) and folded[1].rank == 3
    assert_close(model, folded, randn(4, 3, 12, seed=1))
    with torch.no_grad():
        model(randn(3, 10, seed=2))  # unbatched (C, L) with L == 8 channels runs in the original
        with pytest.raises(AssertionError, match="3-D activations"):
            folded(randn(3, 10, seed=2))


def test_rank_checked_fold_of_a_batchnorm_with_its_own_forward_keeps_the_rest():
    class BNReLU1d(nn.BatchNorm1d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = randomize_all(nn.Sequential(nn.Linear(6, 5), BNReLU1d(5)))
    folded = bnfold.fold(model, (randn(4, 6),))
    assert isinstance(folded[1], FoldedBatchNorm) and type(folded[1].rest) is not nn.Identity
    assert_close(model, folded, randn(7, 6, seed=1))


class ThroughModule(nn.Module):
    """conv -> a module that passes its input through in eval -> bn."""

    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = middle
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.mid(self.conv(x)))


PASS_THROUGH = {
    "identity": nn.Identity,
    "dropout": lambda: nn.Dropout(0.5),
    "dropout-inplace": lambda: nn.Dropout(0.5, inplace=True),
    "dropout2d": lambda: nn.Dropout2d(0.3),
    "alpha-dropout": lambda: nn.AlphaDropout(0.2),
    "two": lambda: nn.Sequential(nn.Dropout(0.1), nn.Identity()),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("example", [None, "given"])
@pytest.mark.parametrize("middle", sorted(PASS_THROUGH))
def test_fold_through_identity_and_eval_dropout(middle, example, inplace):
    model = randomize_all(ThroughModule(PASS_THROUGH[middle]()))
    reference = copy.deepcopy(model)
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(
        model, None if example is None else (x,), inplace=inplace, return_report=True
    )
    assert report.entry("bn").folded and report.entry("bn").target == "conv", report
    assert type(folded.mid) is type(reference.mid)  # the identity in eval: it stays
    assert type(folded.bn) is nn.Identity
    assert_close(reference, folded, x)
    assert_close(reference, folded, randn(3, 3, 5, 7, seed=1))


def test_linear_dropout_bn1d_is_decided_by_the_example_rank_as_without_dropout():
    model = randomize_all(nn.Sequential(nn.Linear(8, 6), nn.Dropout(0.2), nn.BatchNorm1d(6)))
    report = bnfold.analyze(model)
    assert report.entry("2").rule == rules.CHANNEL_AXIS, report
    folded = bnfold.fold(model, (randn(4, 8),))
    assert isinstance(folded[2], FoldedBatchNorm) and isinstance(folded[1], nn.Dropout)
    assert_close(model, folded, randn(5, 8, seed=1))


def test_dropout_in_training_mode_inside_an_eval_model_is_kept():
    model = randomize_all(ThroughModule(nn.Dropout(0.5)))
    model.mid.train()
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("bn")
    assert entry.rule == rules.NO_PRODUCER and "training mode" in entry.reason, entry
    assert type(folded.bn) is nn.BatchNorm2d
    model.mid.eval()
    folded.mid.eval()  # dropout is random in training mode: compare without it
    assert_close(model, folded, x)


class IdentityUsedTwice(ThroughModule):
    def __init__(self) -> None:
        super().__init__(nn.Identity())

    def forward(self, x):
        y = self.mid(self.conv(x))
        return self.bn(y) + y


class IdentityCalledTwice(ThroughModule):
    def __init__(self) -> None:
        super().__init__(nn.Identity())

    def forward(self, x):
        return self.bn(self.mid(self.conv(x))) + self.mid(x).mean()


class IdentityWithHook(ThroughModule):
    def __init__(self) -> None:
        super().__init__(nn.Identity())
        self.mid.register_forward_hook(lambda m, args, out: out * 2)


class RunUsesIdentityOutput(ThroughModule):
    def __init__(self) -> None:
        super().__init__(nn.Dropout(0.5))

    def forward(self, x):
        y = self.mid(self.conv(x))
        out = self.bn(y)
        if isinstance(y, torch.Tensor):  # False on a torch.fx proxy
            out = out + y
        return out


@pytest.mark.parametrize(
    "cls, rule",
    [
        (IdentityUsedTwice, rules.SINGLE_CONSUMER),
        (IdentityCalledTwice, rules.NO_PRODUCER),
        (IdentityWithHook, rules.NO_PRODUCER),
        (RunUsesIdentityOutput, rules.SINGLE_CONSUMER),
    ],
)
def test_a_pass_through_module_that_is_not_only_between_them_is_kept(cls, rule):
    model = randomize_all(cls())
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rule, report.entry("bn")
    assert_close(model, folded, x)


class LinearTransposeBN(nn.Module):
    """Linear on (B, L, C), a layout op to (B, C, L), BatchNorm1d over C (Conformer style)."""

    def __init__(self, how: str, middle: nn.Module | None = None) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(4, 8)
        self.mid = middle if middle is not None else nn.Identity()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.mid(self.lin(x))
        if self.how == "method":
            y = y.transpose(1, 2)
        elif self.how == "keywords":
            y = y.transpose(dim0=-1, dim1=-2)
        elif self.how == "function":
            y = torch.transpose(y, 1, 2)
        elif self.how == "permute":
            y = y.permute(0, 2, 1)
        elif self.how == "mT":
            y = y.mT
        elif self.how == "twice":  # channels leave axis 1 and come back
            y = y.permute(2, 0, 1).transpose(0, 1)
        elif self.how == "elsewhere":  # (B, L, C) -> (L, B, C): channels stay last
            y = y.transpose(0, 1)
        return self.bn(y)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("how", ["method", "keywords", "function", "permute", "mT", "twice"])
def test_linear_transpose_bn1d_folds_with_example_inputs(how, inplace):
    model = randomize_all(LinearTransposeBN(how, nn.Dropout(0.1) if how == "permute" else None))
    reference = copy.deepcopy(model)
    x = randn(2, 5, 4)
    folded, report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    assert report.entry("bn").folded and report.entry("bn").target == "lin", report
    assert isinstance(folded.bn, FoldedBatchNorm) and folded.bn.rank == 3
    assert_close(reference, folded, x)
    assert_close(reference, folded, randn(3, 7, 4, seed=1))


def test_linear_transpose_bn1d_without_example_inputs_is_kept_with_the_hint():
    model = randomize_all(LinearTransposeBN("method"))
    folded, report = bnfold.fold(model, return_report=True)
    entry = report.entry("bn")
    assert entry.rule == rules.CHANNEL_AXIS and "example_inputs" in entry.reason, entry
    assert "transpose(1, 2)" in entry.reason
    assert_close(model, folded, randn(2, 5, 4))


def test_a_layout_op_that_leaves_the_channels_elsewhere_is_kept():
    model = LinearTransposeBN("elsewhere")
    model.bn = nn.BatchNorm1d(2)  # (B=2, L, C) -> (L, B, C): normalises B
    model = randomize_all(model)
    x = randn(2, 3, 4)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("bn")
    assert entry.rule == rules.CHANNEL_AXIS and "axis 2" in entry.reason, entry
    assert_close(model, folded, x)


class Conv1dTransposeBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):  # (B, C, L) -> (B, L, C): the BatchNorm normalises L
        return self.bn(self.conv(x).transpose(1, 2))


def test_conv1d_transposed_away_from_axis_1_is_kept():
    model = randomize_all(Conv1dTransposeBN())
    x = randn(2, 3, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.CHANNEL_AXIS, report.entry("bn")
    assert_close(model, folded, x)


class ConvChannelsLastAndBack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):  # (N, C, H, W) -> (N, H, W, C) -> (N, C, H, W)
        return self.bn(self.conv(x).permute(0, 2, 3, 1).permute(0, 3, 1, 2))


@pytest.mark.parametrize("inplace", [False, True])
def test_conv_channels_brought_back_to_axis_1_fold(inplace):
    model = randomize_all(ConvChannelsLastAndBack())
    reference = copy.deepcopy(model)
    x = randn(2, 3, 6, 6)
    assert bnfold.analyze(model).entry("bn").rule == rules.CHANNEL_AXIS
    folded, report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    assert report.entry("bn").folded, report
    assert_close(reference, folded, x)


class RunSkipsTheTranspose(LinearTransposeBN):
    def __init__(self) -> None:
        super().__init__("none")
        self.lin = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.lin(x)
        if not isinstance(y, torch.Tensor):  # only the torch.fx trace transposes
            y = y.transpose(1, 2)
        return self.bn(y)


class RunUsesTheTransposed(LinearTransposeBN):
    def __init__(self) -> None:
        super().__init__("none")

    def forward(self, x):
        y = self.lin(x).transpose(1, 2)
        out = self.bn(y)
        if isinstance(y, torch.Tensor):
            out = out + y
        return out


@pytest.mark.parametrize("cls", [RunSkipsTheTranspose, RunUsesTheTransposed])
def test_a_run_that_does_not_bear_out_the_traced_transpose_is_kept(cls):
    model = randomize_all(cls())
    x = randn(2, 5, 4)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER, report.entry("bn")
    assert_close(model, folded, x)


@pytest.mark.parametrize("how", ["method", "mT"])
def test_a_folded_transpose_model_given_another_rank_fails_loudly(how):
    model = randomize_all(LinearTransposeBN(how))
    folded = bnfold.fold(model, (randn(2, 5, 4),))
    for x in (randn(8, 4, seed=1), randn(2, 3, 5, 4, seed=2)):
        with torch.no_grad(), pytest.raises((AssertionError, RuntimeError, IndexError)):
            folded(x)
    if how == "mT":  # (8, 4) -> (8, 8) -> .mT: the original normalises the batch axis...
        with torch.no_grad():
            model(randn(8, 4, seed=1))
            with pytest.raises(AssertionError, match="3-D activations"):
                folded(randn(8, 4, seed=1))  # ...where the fold would be wrong: it says so
