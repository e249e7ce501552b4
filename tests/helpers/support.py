"""Test helpers shared by the torch tests: BatchNorm-like modules found in the wild, non-trivial
statistics for every BatchNorm (``randomize_all``), seeded inputs, and invalid values for a
``torch_models.Net``. (The small models the frontend tests share are in ``torch_models``; the
fold checks, closeness and report checks in ``check``.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnfold.demo import randomize_batchnorms


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


def randomize_all(
    model: nn.Module, seed: int = 0, make_input=None, signed: bool = False
) -> nn.Module:
    """Non-trivial statistics for every BatchNorm, FrozenBatchNorm2d included (``signed``:
    each scale with a random sign too); then eval()."""
    randomize_batchnorms(model, make_input, seed=seed)
    randomize_frozen(model, seed)
    if signed:
        g = torch.Generator().manual_seed(seed + 2000)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                    sign = torch.randint(0, 2, m.weight.shape, generator=g) * 2 - 1
                    m.weight.mul_(sign.to(m.weight.dtype))
    return model.eval()


def randn(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --------------------------------------------------------------------------------------------
# Comparing outputs (the fold checks and closeness are in ``check``)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square of a - b, in float64."""
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


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
