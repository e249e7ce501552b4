"""The copy a fold works on, and the folded model afterwards: ``__deepcopy__`` overrides whose copy
is not the model (kept, with the reason), copies that still call the original's layers, models
that cannot be copied (folded in place only), plain attributes that survive, models built or
folded under inference mode, expanded buffers; and the folded model exported, scripted,
pickled, traced with torch.fx and folded again.
"""

from __future__ import annotations

import copy
import threading
import weakref

import pytest
import torch
from torch import nn

import bnfold
from bnfold.torch.eager.module import FoldedBatchNorm
from tests.helpers.check import assert_close, check_report
from tests.helpers.support import randn, randomize_all
from tests.helpers.torch_models import ConvBN


def test_folded_model_exports_scripts_and_pickles_without_batchnorm():
    """Deployment paths after an eager fold: torch.export, TorchScript, torch.save."""
    import io

    from bnfold.demo import DemoNet
    from tests.helpers.support import BatchNormAct2d

    torch.manual_seed(0)
    model = DemoNet(width=8)
    model.bn_up = BatchNormAct2d(8)  # a BatchNorm with its own forward, folded to its rest
    model = randomize_all(model)
    x = (randn(2, 3, 16, 16),)
    folded, report = bnfold.fold(model, x, return_report=True)
    assert len(report.folded) == 16 and not report.skipped, report
    assert isinstance(folded.bn_fc, FoldedBatchNorm)
    ep = torch.export.export(folded, x)
    assert not [n for n in ep.graph.nodes if "batch_norm" in str(n.target)]
    fresh = (randn(2, 3, 16, 16, seed=1),)  # the exported program is specialised to batch 2
    assert bnfold.verify(model, ep.module(), fresh)[1] <= 1e-5
    assert bnfold.verify(model, torch.jit.script(folded), fresh)[1] <= 1e-5
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    assert bnfold.verify(model, torch.load(buffer, weights_only=False), fresh)[1] <= 1e-5


class NamedLikeGraphModule2d(nn.BatchNorm2d):
    """Plain attributes whose names a GraphModule uses for properties."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.code = "bn-7"
        self.graph = "none"

    def forward(self, x):
        return torch.relu(super().forward(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_plain_attributes_survive_a_custom_forward_fold_and_a_deepcopy(inplace):
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), NamedLikeGraphModule2d(4)))
    reference = copy.deepcopy(model)
    folded, report = bnfold.fold(model, (randn(2, 3, 6, 6),), inplace=inplace, return_report=True)
    check_report(report, {"1": ("folded", "0")})  # the BatchNorm part, its ReLU kept
    copied = copy.deepcopy(folded)
    for m in (folded[1], copied[1]):
        assert isinstance(m, FoldedBatchNorm) and type(m.rest) is not nn.Identity
        assert m.num_features == 4 and m.code == "bn-7" and m.graph == "none"
    assert_close(reference, copied, randn(1, 3, 6, 6, seed=1))


def test_folded_models_trace_with_fx_and_fold_again():
    model = randomize_all(
        nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.BatchNorm1d(5))
    )
    x = randn(4, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert [e.action for e in report] == ["folded", "skipped"]
    traced = torch.fx.symbolic_trace(folded)
    assert_close(model, traced, x)
    again, report2 = bnfold.fold(folded, (x,), return_report=True)
    assert [e.action for e in report2] == ["skipped"] and not report2.notes
    assert_close(model, again, x)


def test_models_built_under_inference_mode_and_expanded_buffers_fold():
    with torch.inference_mode():
        model = randomize_all(ConvBN())
    folded, report = bnfold.fold(model, return_report=True)
    check_report(report, {"bn": ("folded", "conv")})
    assert type(folded.bn) is nn.Identity
    assert_close(model, folded, randn(2, 3, 6, 6))
    model = randomize_all(ConvBN())
    model.register_buffer("grid", torch.zeros(1, 8, 1, 1).expand(1, 8, 6, 6))
    folded, report = bnfold.fold(model, (randn(2, 3, 6, 6),), return_report=True)
    check_report(report, {"bn": ("folded", "conv")})
    assert folded.grid.shape == (1, 8, 6, 6) and torch.equal(folded.grid, model.grid)
    assert_close(model, folded, randn(2, 3, 6, 6, seed=1))


class ConvBNConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


@pytest.mark.parametrize("inplace", [False, True])
def test_fold_under_inference_mode_gives_a_model_usable_outside_it(inplace):
    model = randomize_all(ConvBNConv().eval())
    reference = copy.deepcopy(model)
    x = randn(2, 3, 8, 8)
    with torch.inference_mode():
        folded, report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    check_report(report, {"bn": ("folded", "conv")})
    assert type(folded.bn) is nn.Identity and (folded is model) == inplace
    assert not any(t.is_inference() for t in folded.parameters())
    xg = x.clone().requires_grad_()
    out = folded(xg)  # a normal call, with autograd: no inference tensor may be saved
    out.sum().backward()
    assert xg.grad is not None
    with torch.no_grad():
        assert torch.allclose(out, reference(x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        assert torch.allclose(folded(x), reference(x), rtol=1e-5, atol=1e-5)
    assert_close(reference, folded, randn(3, 3, 8, 8, seed=1))


class NormWithoutMemo(nn.Module):
    """Holds a BatchNorm; its __deepcopy__ copies its attributes without deepcopy's memo."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(x)

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        new.__dict__ = copy.deepcopy(self.__dict__)
        return new


class NormRebuilt(NormWithoutMemo):
    """Its __deepcopy__ builds a new module and loads the state into it."""

    def __deepcopy__(self, memo):
        new = type(self)()
        new.load_state_dict(self.state_dict())
        return new.train(self.training)


class ConvThenHeldNorm(nn.Module):
    def __init__(self, holder: type) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = holder()

    def forward(self, x):
        return self.norm(self.conv(x))


@pytest.mark.parametrize("holder", [NormWithoutMemo, NormRebuilt])
def test_a_copy_that_is_not_the_model_folds_nothing_it_cannot_check(holder):
    model = randomize_all(ConvThenHeldNorm(holder).eval())
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("norm.bn")
    assert entry.action == "skipped" and "__deepcopy__" in entry.reason, entry
    assert_close(model, folded, x)
    # in place there is no copy to go wrong... but the check needs one: kept with the reason
    inplace_model = copy.deepcopy(model)
    _, report = bnfold.fold(inplace_model, (x,), inplace=True, return_report=True)
    entry = report.entry("norm.bn")
    assert entry.action == "skipped" and "__deepcopy__" in entry.reason, entry
    assert_close(model, inplace_model, x)


class CallsBack(nn.Module):
    """Reaches the model's conv through a weak reference, which copies do not follow."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self._owner = weakref.ref(owner)

    def forward(self, x):
        return self._owner().conv(x)


class StemByReference(ConvBN):
    def __init__(self, how: str) -> None:
        super().__init__()
        if how == "weakref":
            self.stem = CallsBack(self)
        else:
            self.stem_fn = lambda x: self.conv(x)
        self.how = how

    def forward(self, x):
        return self.bn(self.stem(x) if self.how == "weakref" else self.stem_fn(x))


@pytest.mark.parametrize("how", ["weakref", "closure"])
def test_a_copy_that_still_calls_the_original_layers_is_not_folded(how):
    model = randomize_all(StemByReference(how).eval())
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").action == "skipped"
    assert_close(model, folded, x)


class HoldsALock(ConvBN):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()  # deepcopy refuses it


def test_a_model_that_cannot_be_copied_still_folds_in_place():
    model = randomize_all(HoldsALock().eval())
    reference = randomize_all(ConvBN().eval())
    reference.load_state_dict(model.state_dict())
    x = randn(2, 3, 6, 6)
    report = bnfold.analyze(model, (x,))
    assert report.entry("bn").action == "folded"
    folded, report = bnfold.fold(model, (x,), inplace=True, return_report=True)
    check_report(report, {"bn": ("folded", "conv")})
    assert folded is model and type(model.bn) is nn.Identity
    assert_close(reference, folded, x)
    with pytest.raises(bnfold.UnsupportedModelError, match="inplace=True"):
        bnfold.fold(randomize_all(HoldsALock().eval()), (x,))
