"""In-place folds multiply each weight where it lies, and only where nothing else reads it.

``bnfold.fold(model, inplace=True)`` checks every fold first (one read of each weight bounds the
product), then scales the weights in their own memory. These tests pin what that must never
change: the same bits as the copying fold, no partial write when a fold is refused, and new
memory instead of an in-place write wherever another tensor shares the weight's storage; and a
BatchNorm that cannot be replaced in place (``__slots__``) is kept while the rest fold.
"""

from __future__ import annotations

import copy
import gc
import threading

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.core.algebra import CONV, ScaledWeight
from bnfold.core.gc_pause import gc_paused
from bnfold.errors import FoldRefused
from tests.helpers.check import assert_close, check_report
from tests.helpers.support import randn, randomize_all


def _net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.BatchNorm2d(8),
    )
    randomize_all(net, seed, signed=True)
    return net.to(dtype).eval()


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(7)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_inplace_fold_gives_the_bits_of_the_copying_fold(dtype):
    net = _net(1, dtype)
    copied, report = bnfold.fold(net, return_report=True)
    check_report(report, {"1": ("folded", "0"), "4": ("folded", "3")})
    inplace = copy.deepcopy(net)
    ptrs = [inplace[0].weight.data_ptr(), inplace[3].weight.data_ptr()]
    _, report = bnfold.fold(inplace, inplace=True, return_report=True)
    check_report(report, {"1": ("folded", "0"), "4": ("folded", "3")})
    for i in (0, 3):
        assert torch.equal(inplace[i].weight, copied[i].weight)
        assert torch.equal(inplace[i].bias, copied[i].bias)
    if dtype in (torch.float32, torch.float64):
        # Multiplied where it lies: no new memory for the weights.
        assert [inplace[0].weight.data_ptr(), inplace[3].weight.data_ptr()] == ptrs
    x = _x(dtype)
    with torch.no_grad():
        ref = net.double()(x.double())
        got = inplace(x).double()
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 3e-2, torch.bfloat16: 1e-1}
    assert float((got - ref).abs().max() / ref.abs().max()) < tol[dtype]


class _FlatWeights(nn.Module):
    """Convs whose weights are views of one flat tensor; ``reader``'s weight is a Parameter of
    its own over ``a``'s memory (what tying through ``.data`` or a flat buffer makes)."""

    def __init__(self) -> None:
        super().__init__()
        n = 4 * 3 * 3 * 3
        flat = torch.randn(2 * n)
        self.a = nn.Conv2d(3, 4, 3, bias=False)
        self.b = nn.Conv2d(3, 4, 3, bias=False)
        self.a.weight = nn.Parameter(flat[:n].view(4, 3, 3, 3))
        self.b.weight = nn.Parameter(flat[n:].view(4, 3, 3, 3))
        self.reader = nn.Conv2d(3, 4, 3)
        self.reader.weight = nn.Parameter(flat[:n].view(4, 3, 3, 3))
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x)) + self.reader(x)


def test_weights_sharing_memory_get_new_memory_and_keep_the_other_readers_exact():
    net = _FlatWeights()
    randomize_all(net, 3, signed=True)
    x = _x()
    with torch.no_grad():
        want = net(x)
    reader = net.reader.weight.detach().clone()
    folded, report = bnfold.fold(net, inplace=True, return_report=True)
    assert {e.bn: e.action for e in report.entries} == {"bn_a": "folded", "bn_b": "folded"}
    assert torch.equal(net.reader.weight, reader)  # a's memory was not written
    with torch.no_grad():
        got = folded(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


class _ViewBuffer(nn.Module):
    """A buffer of another module is a view of the folded conv's weight, read in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.side = nn.Module()
        self.side.register_buffer("w", self.conv.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + nn.functional.conv2d(x, self.side.w)


def test_a_buffer_viewing_the_weight_keeps_its_values():
    net = _ViewBuffer()
    randomize_all(net, 5, signed=True)
    x = _x()
    with torch.no_grad():
        want = net(x)
    side = net.side.w.clone()
    _, report = bnfold.fold(net, inplace=True, return_report=True)
    check_report(report, {"bn": ("folded", "conv")})
    assert torch.equal(net.side.w, side)
    with torch.no_grad():
        got = net(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_inference_tensors_fold_in_place_through_new_memory():
    with torch.inference_mode():
        net = _net(2)
    x = _x()
    with torch.inference_mode():
        want = net(x)
    bnfold.fold(net, inplace=True)
    with torch.inference_mode():
        got = net(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_refused_overflow_leaves_every_weight_untouched_in_place():
    net = _net(3)
    with torch.no_grad():
        net[1].running_var.fill_(1e-30)  # s ~ 1e15: folding overflows float32 with big weights
        net[1].eps = 0.0
        net[0].weight.mul_(1e30)
    before = [t.clone() for t in net.state_dict().values()]
    report = bnfold.analyze(net)
    _, inplace_report = bnfold.fold(net, inplace=True, return_report=True)
    assert inplace_report.entries[0].action == "skipped" == report.entries[0].action
    assert inplace_report.entries[0].rule == "valid-values"
    assert torch.equal(net[0].weight, before[0])
    assert isinstance(net[1], nn.BatchNorm2d)


def test_bound_that_cannot_prove_safety_falls_back_to_the_exact_check():
    # The largest weight (channel 0) meets a small factor, the largest factor (channel 1) a
    # small weight: max|w| * max|s| overflows float32, the product itself does not.
    w = torch.ones(2, 1, 1, 1)
    w[0] = 1e30
    s = np.array([1.0, 1e20])
    scaled = ScaledWeight(w, s, CONV)
    assert scaled._result is not None  # formed up front to see whether it overflows
    target = w.clone()
    scaled.write_into(target)
    assert torch.equal(target, scaled.value())
    assert target[1].item() == pytest.approx(1e20)
    with pytest.raises(FoldRefused, match="overflows"):
        ScaledWeight(w, np.array([1e10, 1.0]), CONV)


def test_write_into_another_tensor_copies_the_product():
    w = torch.randn(4, 2, 3, 3)
    s = np.linspace(0.5, 2.0, 4)
    scaled = ScaledWeight(w, s, CONV)
    target = torch.empty_like(w)
    scaled.write_into(target)
    assert torch.equal(target, scaled.value())
    assert torch.equal(target, w * torch.from_numpy(s).float().reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_pause_restores_the_collector_as_found(enabled):
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        with gc_paused():
            assert not gc.isenabled()
            with gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        bnfold.fold(_net(4))
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_gc_pause_across_threads_ends_enabled():
    assert gc.isenabled()
    inside = threading.Barrier(2)
    release = threading.Event()

    def hold() -> None:
        with gc_paused():
            inside.wait()
            release.wait()

    t = threading.Thread(target=hold)
    t.start()
    with gc_paused():
        inside.wait()
        release.set()
        t.join()
        assert not gc.isenabled()  # this block still runs
    assert gc.isenabled()


class SlotBN(nn.BatchNorm2d):
    """A BatchNorm subclass declaring __slots__: its objects cannot change class to Identity."""

    __slots__ = ("tag",)


class TwoStages(nn.Module):
    def __init__(self, second: nn.Module) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3), second

    def forward(self, x):
        return self.b2(self.c2(self.b1(self.c1(x))))


def test_in_place_fold_keeps_a_batchnorm_with_slots_and_folds_the_rest():
    model = randomize_all(TwoStages(SlotBN(4)).eval())
    model.b2.tag = "kept"
    reference = copy.deepcopy(model)
    x = randn(2, 3, 8, 8)
    folded, report = bnfold.fold(model, (x,), inplace=True, return_report=True)
    assert folded is model
    assert report.entry("b1").action == "folded"
    entry = report.entry("b2")
    assert entry.action == "skipped" and "__slots__" in entry.reason, entry
    assert type(model.b2) is SlotBN and model.b2.tag == "kept"
    assert_close(reference, model, x)
    assert_close(reference, model, randn(3, 3, 8, 8, seed=1))
