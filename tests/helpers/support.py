"""Test helpers shared by the eager and torch.export frontend tests: BatchNorm-like modules found
in the wild, non-trivial statistics for them, seeded inputs, output comparisons and report
checks. (The small models the frontend tests share are in ``models``.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.demo import randomize_batchnorms

REL_TOL = 1e-5  # float32 folds: max|a - b| / max|a|


class FrozenBatchNorm2d(nn.Module):
    """Detection-library FrozenBatchNorm2d: statistics and affine parameters are buffers."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm + dropout + activation in one module, as several model libraries have it."""

    def __init__(self, num_features: int, act: nn.Module | None = None, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected a 4-D input")
        factor = 0.0 if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )
        return self.act(self.drop(x))


def randomize_frozen(model: nn.Module, seed: int) -> None:
    """Non-trivial statistics for every FrozenBatchNorm2d (randomize_batchnorms knows only
    torch's BatchNorms)."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "FrozenBatchNorm2d":
                n = m.weight.numel()
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.empty(n).uniform_(0.2, 2.0, generator=g))


def randomize_all(model: nn.Module, seed: int = 0, make_input=None) -> nn.Module:
    """Non-trivial statistics for every BatchNorm, FrozenBatchNorm2d included; then eval()."""
    randomize_batchnorms(model, make_input, seed=seed)
    randomize_frozen(model, seed)
    return model.eval()


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --------------------------------------------------------------------------------------------
# Comparing outputs and state


def rel_err(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """max|a - b| / max|a| over every output, each of the same shape and dtype."""
    assert len(expected) == len(actual)
    worst = 0.0
    for a, b in zip(expected, actual, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        a64, b64 = a.double(), b.double()
        scale = float(a64.abs().max())
        assert scale > 0 and torch.isfinite(a64).all()
        worst = max(worst, float((a64 - b64).abs().max()) / scale)
    return worst


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square of a - b, in float64."""
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def assert_same_outputs(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


def assert_snapshot_equal(before: dict, after: dict) -> None:
    """Two snapshots (dicts of comparable values, with the tensors under ``"tensors"``) agree:
    every value equal, every tensor of the same dtype, shape and values (NaN where NaN was)."""
    assert before.keys() == after.keys()
    for key in before:
        if key != "tensors":
            assert before[key] == after[key], key
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        w = after["tensors"][k]
        assert v.dtype == w.dtype and v.shape == w.shape, k
        assert torch.equal(v.nan_to_num(), w.nan_to_num()) and torch.equal(v.isnan(), w.isnan()), k


# --------------------------------------------------------------------------------------------
# Reports


def check_report(report: bnfold.FoldReport, expected: dict[str, tuple[str, object]]) -> None:
    """``expected``: bn name -> ("folded", producer name) or ("skipped", rule id or set of them)
    or ("any", producer name) when folding and keeping are both right."""
    assert isinstance(report, bnfold.FoldReport)
    entries = {e.bn: e for e in report}
    assert len(entries) == len(report.entries), str(report)  # names are unique
    assert set(entries) == set(expected), str(report)
    try:
        check_report_entries(report, expected)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{report}") from None


def check_report_entries(
    report: bnfold.FoldReport, expected: dict[str, tuple[str, object]]
) -> None:
    """The entries named in ``expected`` (as for ``check_report``); other entries may exist."""
    for bn, (action, what) in expected.items():
        try:
            e = report.entry(bn)
        except KeyError as err:
            raise AssertionError(str(err)) from None
        assert isinstance(e.bn_type, str) and e.bn_type, e
        if action == "any":  # either is right; a fold must be into ``what``
            action, what = ("folded", what) if e.folded else ("skipped", {e.rule})
        assert e.action == action, e
        if action == "folded":
            assert e.folded and e.target == what and e.rule is None and e.reason == "", e
        else:
            allowed = what if isinstance(what, (set, frozenset)) else {what}
            assert not e.folded and e.rule in allowed, e
            assert isinstance(e.reason, str) and e.reason.strip(), e


# --------------------------------------------------------------------------------------------
# Invalid values for a ``models.Net`` (producer -> bn)

POISONS = [
    "nan-running-var",
    "inf-gamma",
    "var-plus-eps-negative",
    "var-plus-eps-zero",
    "nan-conv-weight",
    "inf-beta",
    "nan-conv-bias",
]


def poison(model: nn.Module, what: str) -> None:
    """Put the invalid value ``what`` (one of POISONS) into a Net's BatchNorm or producer."""
    with torch.no_grad():
        if what == "nan-running-var":
            model.bn.running_var[1] = float("nan")
        elif what == "inf-gamma":
            model.bn.weight[0] = float("inf")
        elif what == "var-plus-eps-negative":
            model.bn.running_var[2] = -1.0
        elif what == "var-plus-eps-zero":
            model.bn.running_var[3] = -model.bn.eps
            assert float(model.bn.running_var[3] + model.bn.eps) == 0.0
        elif what == "nan-conv-weight":
            model.producer.weight[3, 0, 0, 0] = float("nan")
        elif what == "inf-beta":
            model.bn.bias[4] = float("-inf")
        elif what == "nan-conv-bias":
            model.producer.bias[5] = float("nan")
        else:
            raise AssertionError(what)
