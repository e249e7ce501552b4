"""The built-in example: a small ResNet-style CNN with every kind of fold bnfold does.

``bnfold demo`` builds it, gives its BatchNorms realistic statistics (random affine parameters,
running statistics measured on data in training mode), folds it and prints what happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

import torch
from torch import nn

import bnfold


class _Block(nn.Module):
    """Residual bottleneck: 1x1 conv, depthwise 3x3, grouped 1x1, each followed by BN."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        hidden = channels * 2
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, channels, 1, groups=4, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity() if stride == 1 else nn.AvgPool2d(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.expand(x)))
        y = torch.relu(self.bn2(self.depthwise(y)))
        y = self.bn3(self.project(y))
        return torch.relu(y + self.shortcut(x))


class DemoNet(nn.Module):
    """ResNet-style CNN: Conv2d stem, residual blocks, a ConvTranspose2d decoder branch and a
    Linear + BatchNorm1d head. Returns ``(logits, segmentation)``."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.stage1 = nn.Sequential(_Block(width), _Block(width))
        self.down = nn.Conv2d(width, 2 * width, 3, 2, 1)
        self.bn_down = nn.BatchNorm2d(2 * width)
        self.stage2 = nn.Sequential(_Block(2 * width), _Block(2 * width))
        self.up = nn.ConvTranspose2d(2 * width, width, 4, 2, 1, groups=4)
        self.bn_up = nn.BatchNorm2d(width)
        self.seg = nn.Conv2d(width, 3, 1)
        self.fc1 = nn.Linear(2 * width, 128)
        self.bn_fc = nn.BatchNorm1d(128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.stage1(self.stem(x))
        z = self.stage2(torch.relu(self.bn_down(self.down(y))))
        seg = self.seg(torch.relu(self.bn_up(self.up(z))))
        h = torch.relu(self.bn_fc(self.fc1(z.mean((2, 3)))))
        return self.fc2(h), seg


def randomize_batchnorms(
    model: nn.Module, make_input: Callable[[], Any] | None = None, seed: int = 0, batches: int = 4
) -> nn.Module:
    """Give every BatchNorm of ``model`` non-trivial statistics, then put it in eval mode.

    Affine parameters are drawn at random; the running statistics are random too, or, when
    ``make_input`` is given, measured by running ``batches`` batches through the model in
    training mode (as training would). Default-initialised BatchNorm is the identity: a fold
    test on it proves nothing.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            if m.affine:
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.empty(n).uniform_(0.2, 2.0, generator=g))
        if make_input is not None:
            saved = {m: m.momentum for m in bns}
            model.train()
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
            for _ in range(batches):
                model(*make_input())
            for m, momentum in saved.items():
                m.momentum = momentum
    return model.eval()


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def run(out: TextIO, seed: int = 0, batch: int = 8, size: int = 64, repeats: int = 20) -> int:
    """Build, fold and check the demo network, printing a report to ``out``.

    Returns 0; raises :class:`bnfold.VerificationError` if the folded network's outputs differ.
    """
    torch.manual_seed(seed)
    model = DemoNet()
    gen = torch.Generator().manual_seed(seed + 1)

    def make_input(n: int = batch) -> tuple[torch.Tensor]:
        return (torch.randn(n, 3, size, size, generator=gen),)

    # Statistics are measured on batches of 8 whatever the timing batch: training-mode
    # BatchNorm needs more than one value per channel.
    randomize_batchnorms(model, lambda: make_input(8), seed=seed)
    example = make_input()

    t0 = time.perf_counter()
    folded, report = bnfold.fold(model, example, return_report=True)
    fold_ms = (time.perf_counter() - t0) * 1e3

    print(report, file=out)
    print(file=out)
    max_abs, max_rel = bnfold.verify(model, folded, make_input())
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n_left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        for m in (model, folded):  # warm up
            m(*example)
        before = _median_ms(lambda: model(*example), repeats)
        after = _median_ms(lambda: folded(*example), repeats)
    print(f"BatchNorm modules: {n_bn} before, {n_left} after", file=out)
    print(f"max error vs original: abs {max_abs:.3g}, rel {max_rel:.3g}", file=out)
    print(f"fold time: {fold_ms:.1f} ms (copying the model; inplace=True skips the copy)", file=out)
    print(
        f"eager latency, batch {batch} at {size}x{size}, median of {repeats}: "
        f"{before:.2f} ms before, {after:.2f} ms after ({before / after:.2f}x)",
        file=out,
    )
    if max_rel > 1e-5:
        raise bnfold.VerificationError(
            f"the folded demo network differs from the original (rel. error {max_rel:.3g} > 1e-5)"
        )
    print("verified: outputs match", file=out)
    return 0
