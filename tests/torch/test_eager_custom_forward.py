"""BatchNorm subclasses whose forward does more than normalise, and BatchNorm lookalikes (a
FrozenBatchNorm2d whose forward clamps).

Their BatchNorm part is folded when the rest of the forward is kept exactly (and no statistics
are left behind); otherwise they are skipped with a reason. Every test compares outputs with
non-trivial statistics.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.core import rules
from tests.helpers.check import REL_TOL, assert_close, rel_err
from tests.helpers.support import BatchNormAct2d, randn, randomize_all


class EpsOverride2d(nn.BatchNorm2d):
    """Passes its own eps to batch_norm, not self.eps: the fold must use what forward uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 0.5
        )


class UsesOtherStats2d(nn.BatchNorm2d):
    """Normalises with a buffer of its own that is not running_mean: fold with what it uses."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.register_buffer("other_mean", torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.other_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class ComputedStats2d(nn.BatchNorm2d):
    """Its mean comes from the input in forward: not a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.detach().mean((0, 2, 3))
        return F.batch_norm(x, mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ScaledStats2d(nn.BatchNorm2d):
    """Its statistics are computed in forward (from its buffers): bnfold does not evaluate that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x,
            self.running_mean * 2,
            self.running_var + 1,
            self.weight,
            self.bias,
            False,
            0.0,
            self.eps,
        )


class Twice2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(super().forward(x))


class TorchBatchNorm2d(nn.BatchNorm2d):
    """Calls torch.batch_norm, whose arguments come in another order than F.batch_norm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.batch_norm(
            x, self.weight, self.bias, self.running_mean, self.running_var, False, 0.0, 1e-3, False
        )
        return torch.tanh(y)


class Net(nn.Module):
    def __init__(self, bn: nn.Module, channels: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = bn
        self.head = nn.Conv2d(channels, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)))


def _setup(bn: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the conv's own initialisation
    return randomize_all(Net(bn), seed)


def _inputs(seed: int) -> torch.Tensor:
    return torch.randn(4, 3, 7, 7, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("act", [nn.SiLU(), nn.ReLU(), nn.Hardtanh(-0.3, 0.4)])
@pytest.mark.parametrize("inplace", [False, True])
def test_batchnorm_act_is_folded_and_keeps_its_activation(act, inplace):
    model = _setup(BatchNormAct2d(6, act=copy.deepcopy(act)), seed=1)
    x = _inputs(2)
    with torch.no_grad():
        want = model(x)
    original_act = model.bn.act
    folded, report = bnfold.fold(model, inplace=inplace, return_report=True)
    assert report.entry("bn").folded and report.entry("bn").target == "conv"
    assert not isinstance(folded.bn, nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        assert rel_err([want], [folded(x)]) <= REL_TOL
    # the activation is still there (it changes the output), and copies do not share it
    assert any(type(m) is type(act) for m in folded.bn.modules())
    kept = [m for m in folded.bn.modules() if type(m) is type(act)][0]
    assert (kept is original_act) == inplace


@pytest.mark.parametrize("cls", [EpsOverride2d, UsesOtherStats2d, TorchBatchNorm2d])
def test_custom_forward_fold_uses_what_forward_passes_to_batch_norm(cls):
    model = _setup(cls(6), seed=3)
    x = _inputs(4)
    with torch.no_grad():
        want = model(x)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").folded
    with torch.no_grad():
        assert rel_err([want], [folded(x)]) <= REL_TOL


@pytest.mark.parametrize("cls", [ComputedStats2d, ScaledStats2d, Twice2d])
def test_custom_forward_that_is_not_one_batchnorm_is_skipped(cls):
    model = _setup(cls(6), seed=5)
    x = _inputs(6)
    with torch.no_grad():
        want = model(x)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("bn")
    assert not entry.folded and entry.rule == rules.STANDARD_FORWARD
    assert cls.__name__ in entry.reason
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, rtol=0, atol=0)


def test_batchnorm_act_without_rank_check_needs_example_inputs():
    """Its forward calls F.batch_norm directly (no nn rank check), so a Conv2d output could be
    unbatched as far as bnfold knows: without shapes it is kept, with them it is folded."""

    class NoCheck(BatchNormAct2d):
        def forward(self, x):
            return self.act(
                F.batch_norm(
                    x,
                    self.running_mean,
                    self.running_var,
                    self.weight,
                    self.bias,
                    False,
                    0.0,
                    self.eps,
                )
            )

    model = _setup(NoCheck(6), seed=7)
    assert bnfold.analyze(model).entry("bn").rule == rules.CHANNEL_AXIS
    x = _inputs(8)
    assert bnfold.analyze(model, (x,)).entry("bn").folded


def test_analyze_does_not_modify_a_custom_batchnorm():
    model = _setup(BatchNormAct2d(6), seed=9)
    before = copy.deepcopy(model.state_dict())
    bnfold.analyze(model)
    assert type(model.bn) is BatchNormAct2d
    assert "_check_input_dim" not in vars(model.bn)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class CountsCalls2d(nn.BatchNorm2d):
    """Updates a buffer on every call, training or not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.num_batches_tracked.add_(1)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def test_a_custom_forward_that_updates_a_buffer_keeps_doing_so_and_analysis_does_not():
    model = _setup(CountsCalls2d(6), seed=13)
    model.bn.num_batches_tracked.zero_()
    x = _inputs(14)
    report = bnfold.analyze(model, (x,))
    assert int(model.bn.num_batches_tracked) == 0  # reading forward did not run it
    assert report.entry("bn").folded
    with torch.no_grad():
        want = model(x)
    folded = bnfold.fold(model, (x,))
    with torch.no_grad():
        assert rel_err([want], [folded(x)]) <= REL_TOL
        folded(x)
    (counter,) = [b for n, b in folded.bn.named_buffers() if n.endswith("num_batches_tracked")]
    assert int(counter) == 3  # the fold kept the update: the counter came along, and counts


def test_folded_batchnorm_with_own_forward_leaves_no_statistics_behind():
    class BNSiLU2d(nn.BatchNorm2d):
        def forward(self, x):
            return F.silu(super().forward(x))

    model = randomize_all(nn.Sequential(nn.Conv2d(3, 8, 3), BNSiLU2d(8)))
    folded = bnfold.fold(model)
    assert set(folded.state_dict()) == {"0.weight", "0.bias"}
    assert_close(model, folded, randn(2, 3, 6, 6))


class ClampedFrozenBN(nn.Module):
    """FrozenBatchNorm2d with a wide clamp (an fp16 overflow guard): affine on small inputs."""

    def __init__(self, n: int, bound: float) -> None:
        super().__init__()
        self.eps, self.bound = 1e-5, bound
        g = torch.Generator().manual_seed(3)
        self.register_buffer("weight", torch.randn(n, generator=g))
        self.register_buffer("bias", torch.randn(n, generator=g))
        self.register_buffer("running_mean", torch.randn(n, generator=g))
        self.register_buffer("running_var", torch.rand(n, generator=g) * 2.9 + 0.1)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        b = self.bias - self.running_mean * scale
        y = x * scale.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
        return y.clamp(-self.bound, self.bound)


ClampedFrozenBN.__name__ = ClampedFrozenBN.__qualname__ = "FrozenBatchNorm2d"


@pytest.mark.parametrize(
    ("bound", "dtype"),
    # 1e200 in float64: beyond every probe value, only the recorded clamp shows it.
    [(1e3, torch.float32), (1e200, torch.float64)],
)
def test_frozen_batchnorm_lookalike_with_a_wide_clamp_is_not_folded(bound, dtype):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ClampedFrozenBN(4, bound)).eval().to(dtype)
    x = randn(1, 3, 8, 8).to(dtype)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("1")
    assert entry.action == "skipped", entry
    assert_close(model, folded, x)
    assert_close(
        model, folded, randn(2, 3, 8, 8, seed=1).to(dtype) * (1e4 if bound < 1e10 else 1e250)
    )
