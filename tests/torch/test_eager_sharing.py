"""Layers and tensors reached more than one way: a BatchNorm also held in a plain list, a module
registered under two names (and aliased at every level of a deep model: walked once; under the
torch.export fallback: folded, or too many names refused), a producer also called inside another
layer or inside a torch.nn leaf module, calls with tensors other than the module's own
(``functional_call``, parameters swapped by hand), and producer tensors reached through plain
attributes that share memory. A fold another reader would see is refused.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.core import rules
from tests.helpers.check import assert_close
from tests.helpers.support import randn, randomize_all
from tests.helpers.torch_models import ConvBN


class ListPipeline(ConvBN):
    """Also holds its layers in a plain list, outside the module slots."""

    def __init__(self) -> None:
        super().__init__(padding=0)
        self.pipeline = [self.conv, self.bn]

    def forward(self, x):
        for layer in self.pipeline:
            x = layer(x)
        return x


@pytest.mark.parametrize("inplace", [False, True])
def test_batchnorm_referenced_outside_module_slots(inplace):
    model = randomize_all(ListPipeline())
    reference = copy.deepcopy(model)
    folded, report = bnfold.fold(model, inplace=inplace, return_report=True)
    assert report.entry("bn").folded
    assert folded.pipeline[1] is folded.bn and type(folded.bn) is nn.Identity
    assert_close(reference, folded, randn(2, 3, 6, 6))


class SameConvTwoNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.stem = self.body[0]  # an alias, called once

    def forward(self, x):
        return self.body(x) * x.shape[-1]


def test_module_registered_under_two_names_but_called_once_folds():
    model = randomize_all(SameConvTwoNames())
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("body.1").folded
    assert folded.stem is folded.body[0]
    assert_close(model, folded, randn(2, 3, 6, 6))


class BNThenProject(nn.BatchNorm2d):
    def __init__(self, n: int, proj: nn.Module) -> None:
        super().__init__(n)
        self.proj = proj

    def forward(self, x):
        return self.proj(super().forward(x))


class HiddenProducerCall(nn.Module):
    """`shared` is called at the top level and, unseen by the trace, inside bnp's forward."""

    def __init__(self, shared_first: bool) -> None:
        super().__init__()
        shared = nn.Conv2d(4, 4, 1)
        if shared_first:
            self.shared = shared
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bnp = BNThenProject(4, shared)
        self.bn3 = nn.BatchNorm2d(4)
        if not shared_first:
            self.shared = shared

    def forward(self, x):
        return self.bnp(self.conv1(x)) + self.bn3(self.shared(x))


@pytest.mark.parametrize("shared_first", [True, False])
def test_a_producer_also_called_inside_another_layer_is_not_folded(shared_first):
    model = randomize_all(HiddenProducerCall(shared_first))
    x = randn(2, 4, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert not report.entry("bn3").folded
    assert "bnp" in report.entry("bn3").reason
    assert_close(model, folded, randn(3, 4, 6, 6, seed=1))


class AttentionThenBN(nn.Module):
    """Runs MultiheadAttention, then its out_proj again, by hand, into a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, q):
        a, _ = self.mha(q, q, q)
        return a, self.bn(self.mha.out_proj(a.mean(1)))


class EncoderThenBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.enc(x)
        return y, self.bn(self.enc.linear2(torch.relu(self.enc.linear1(y.mean(1)))))


@pytest.mark.parametrize("cls", [AttentionThenBN, EncoderThenBN])
def test_a_producer_inside_a_torch_nn_leaf_module_is_not_folded_into(cls):
    model = randomize_all(cls().eval())
    x = randn(2, 5, 8)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("bn")
    assert entry.action == "skipped"
    if cls is AttentionThenBN:  # linear2 also runs inside the layer, on 3-D values
        assert entry.rule == rules.UNSHARED, entry
        assert "which bnfold does not trace" in entry.reason
    assert_close(model, folded, x)


class Twice(nn.Module):
    """Holds one child under two names, as models that alias a block do."""

    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.a = child
        self.b = child

    def forward(self, x):
        return self.a(x)


class ShapeDependentConvBN(ConvBN):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if x.shape[0] > 1 else -y  # torch.fx cannot trace this: torch.export


def _aliased(inner: nn.Module, depth: int) -> nn.Module:
    for _ in range(depth):
        inner = Twice(inner)
    return randomize_all(inner.eval())


def test_modules_aliased_at_every_level_are_walked_once(monkeypatch):
    depth = 16  # 65,536 paths to the conv: walking every path would take minutes
    model = _aliased(ConvBN(), depth)
    yielded = 0
    plain = nn.Module.named_modules

    def counting(self, *args, **kwargs):
        nonlocal yielded
        for item in plain(self, *args, **kwargs):
            yielded += 1
            yield item

    x = randn(2, 3, 6, 6)
    monkeypatch.setattr(nn.Module, "named_modules", counting)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    monkeypatch.undo()
    assert yielded < 2**depth // 8, yielded  # every path once would be 65,536 per walk
    assert report.folded and len(report.entries) == 1
    assert_close(model, folded, x)


def test_aliases_under_the_export_fallback_fold_or_are_a_clear_error():
    x = randn(2, 3, 6, 6)
    model = _aliased(ShapeDependentConvBN(), 4)  # 16 names: torch.export takes it
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.folded
    assert_close(model, folded, x)
    # torch.export would give the program an input per name: 2**30 of them
    with pytest.raises(bnfold.TracingError, match="names"):
        bnfold.fold(_aliased(ShapeDependentConvBN(), 30), (x,))


class FunctionalCallSwap(ConvBN):
    """Runs the conv with another weight through torch.func.functional_call."""

    def __init__(self) -> None:
        super().__init__()
        self.w2 = nn.Parameter(torch.randn(8, 3, 3, 3))

    def forward(self, x):
        y = torch.func.functional_call(self.conv, {"weight": self.w2}, (x,))
        return self.bn(y)


class SwapsByHand(ConvBN):
    """Assigns another Parameter to conv.weight for one call, then puts the old one back."""

    def __init__(self) -> None:
        super().__init__()
        self.w2 = nn.Parameter(torch.randn(8, 3, 3, 3))

    def forward(self, x):
        own = self.conv.weight
        self.conv.weight = self.w2
        y = self.conv(x)
        self.conv.weight = own
        return self.bn(y)


class SwapsStatistics(ConvBN):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("other_var", torch.rand(8) + 0.5)

    def forward(self, x):
        y = self.conv(x)
        return torch.func.functional_call(self.bn, {"running_var": self.other_var}, (y,))


@pytest.mark.parametrize("cls", [FunctionalCallSwap, SwapsByHand, SwapsStatistics])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_call_with_tensors_other_than_the_modules_own_is_not_folded(cls, inplace):
    model = randomize_all(cls().eval())
    reference = copy.deepcopy(model)
    x = randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch.export fallback's note
        folded, report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    entry = report.entry("bn")
    assert entry.action == "skipped", entry
    assert "not its own tensor" in entry.reason
    assert_close(reference, folded, x)


class WeightView(ConvBN):
    """A plain attribute viewing the conv's weight memory, used by forward."""

    def __init__(self) -> None:
        super().__init__()
        self.wview = self.conv.weight.detach()

    def forward(self, x):
        return self.bn(self.conv(x)), F.conv2d(x, self.wview)


class SharedPlainBias(nn.Module):
    """Two convs share one plain (unregistered) bias tensor; only c1 feeds the BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        b = torch.randn(4, generator=torch.Generator().manual_seed(5))
        del self.c1.bias, self.c2.bias
        self.c1.bias = b
        self.c2.bias = b

    def forward(self, x):
        return self.bn(self.c1(x)), self.c2(x)


class PlainTensors(ConvBN):
    """The conv's weight and bias are plain tensors, not parameters."""

    def __init__(self) -> None:
        super().__init__()
        w, b = self.conv.weight.detach().clone(), self.conv.bias.detach().clone()
        del self.conv.weight, self.conv.bias
        self.conv.weight, self.conv.bias = w, b


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    ("cls", "action"),
    [(WeightView, "folded"), (SharedPlainBias, "skipped"), (PlainTensors, "folded")],
)
def test_producer_tensors_reached_through_plain_attributes(cls, action, inplace):
    model = randomize_all(cls().eval())
    reference = copy.deepcopy(model)
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    entry = report.entry("bn")
    assert entry.action == action, entry
    if action == "skipped":
        assert entry.rule == rules.UNSHARED and "c2.bias" in entry.reason, entry
    assert_close(reference, folded, x)
    assert_close(reference, folded, randn(3, 3, 6, 6, seed=1))
