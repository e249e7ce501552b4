"""Small models for the Inductor pre-grad pass tests (``tests/torch/test_compile_pass.py``):
forms a dynamo graph holds (functional calls, ``addmm``/``mm``/``@``), the kept cases, and a
torch.compile-tutorial-style network whose conv/BatchNorm pairs cross module boundaries.

Every model gets non-trivial BatchNorm statistics from the test (``support.randomize_all``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MatmulBN(nn.Module):
    """``op(x, w)`` then BatchNorm1d, for ``op`` one of "addmm", "mm", "matmul" (torch.matmul)
    and "@" (the operator); ``addmm`` takes ``beta``/``alpha`` keywords."""

    def __init__(self, op: str, n_in: int = 6, n_out: int = 5, **kwargs: float) -> None:
        super().__init__()
        self.op = op
        self.kwargs = kwargs
        self.w = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.b = nn.Parameter(torch.randn(n_out))
        self.bn = nn.BatchNorm1d(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "addmm":
            y = torch.addmm(self.b, x, self.w, **self.kwargs)
        elif self.op == "mm":
            y = torch.mm(x, self.w)
        elif self.op == "matmul":
            y = torch.matmul(x, self.w)
        elif self.op == "@":
            y = x @ self.w
        else:
            raise AssertionError(self.op)
        return self.bn(y)


class FunctionalConvBN(nn.Module):
    """``F.conv2d`` and a BatchNorm written functionally in forward, their own tensors as
    parameters and buffers; ``style`` picks how the calls spell their arguments."""

    def __init__(self, style: str = "positional", c_in: int = 3, c_out: int = 5) -> None:
        super().__init__()
        self.style = style
        self.w = nn.Parameter(torch.randn(c_out, c_in, 3, 3) / 3)
        self.b = nn.Parameter(torch.randn(c_out))
        self.gamma = nn.Parameter(torch.empty(c_out).uniform_(0.5, 1.5))
        self.beta = nn.Parameter(torch.randn(c_out) * 0.2)
        self.register_buffer("mean", torch.randn(c_out) * 0.5)
        self.register_buffer("var", torch.empty(c_out).uniform_(0.2, 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "positional":
            y = F.conv2d(x, self.w, self.b, 2, 1)
            return F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)
        if self.style == "keywords":
            y = F.conv2d(x, self.w, bias=self.b, padding=1, dilation=2)
            return F.batch_norm(
                y, self.mean, self.var, weight=self.gamma, bias=self.beta, training=False, eps=1e-3
            )
        if self.style == "torch.batch_norm":
            y = torch.conv2d(x, self.w, self.b, padding=1)
            return torch.batch_norm(
                y, self.gamma, self.beta, self.mean, self.var, False, 0.1, 1e-3, False
            )
        if self.style == "computed-weight":  # the weight is an activation of the graph
            y = F.conv2d(x, self.w * 2 - 0.1, None, padding=1)
            return F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)
        if self.style == "gamma-computed-before":  # before the conv in graph order
            gamma = self.gamma * 1.5
            y = F.conv2d(x, self.w, self.b, padding=1)
            return F.batch_norm(y, self.mean, self.var, gamma, self.beta, False, 0.1, 1e-3)
        if self.style == "gamma-computed-after":  # between the conv and the BatchNorm
            y = F.conv2d(x, self.w, self.b, padding=1)
            return F.batch_norm(y, self.mean, self.var, self.gamma * 1.5, self.beta, False, 0.1)
        raise AssertionError(self.style)


class ConvBN(nn.Module):
    """Conv2d -> BatchNorm2d (train it to get a training-mode BatchNorm)."""

    def __init__(self, c_in: int = 3, c_out: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ReluThenBN(ConvBN):
    """The BatchNorm is fed by a relu: there is no layer to fold it into."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)))


class OutputUsedTwice(ConvBN):
    """The conv's output feeds the BatchNorm and a residual add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class SharedWeight(nn.Module):
    """One conv weight used by two convolutions, each followed by its own BatchNorm: folding
    both must leave each call with its own scaled copy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn1(self.conv(x))
        b = self.bn2(F.conv2d(x * 2, self.conv.weight, self.conv.bias, padding=1))
        return torch.cat([a, b], dim=1)


class WritesNearPair(ConvBN):
    """Conv2d -> BatchNorm2d with an in-place write (whose result nobody reads) somewhere near:
    ``mode`` says which and where. Writes between the two may change what the BatchNorm reads
    (its statistics, or the conv's output itself)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "counter-before":
            self.calls.add_(1)
        y = self.conv(x)
        if self.mode == "counter-between":
            self.calls.add_(1)
        elif self.mode == "statistics-write-between":
            self.bn.running_var.add_(0.5)
        elif self.mode == "relu_-on-output":
            y.relu_()
        elif self.mode == "relu-inplace-on-output":
            F.relu(y, inplace=True)
        elif self.mode == "setitem-on-output":
            y[:, 0] = 0.0
        elif self.mode == "iadd-on-output":
            y += 1.0
        out = self.bn(y)
        if self.mode == "statistics-write-after":
            self.bn.running_var.add_(0.5)
        return out


class WrappedBN(nn.Module):
    """A BatchNorm in its own small module, whose forward calls it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class TutorialNet(nn.Module):
    """Three conv/BatchNorm pairs, as in the torch.compile tutorials: one plain, one split across
    an ``nn.Sequential`` boundary (the conv outside, the BatchNorm the Sequential's first
    element), one whose BatchNorm is wrapped in its own module. Input (N, 3, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.block = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU())
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.wrapped = WrappedBN(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.block(self.conv2(x))
        x = torch.relu(self.wrapped(self.conv3(x)))
        return self.head(x.mean((2, 3)))
