"""Where a producer's output goes besides its BatchNorm: stored on the model (a dict, an object, a
deque, a namespace, a tuple, nested containers, a global), returned inside an object bnfold
cannot look into, or used only when forward really runs and not while torch.fx traces. Each is a
use that keeps the BatchNorm (``single-consumer``), the model's holders are left as they were,
and the torch.export fallback (for models torch.fx cannot trace) sees the same uses.
"""

from __future__ import annotations

import collections
import types

import pytest
import torch
from torch import nn

import bnfold
from bnfold.core import rules
from tests.helpers.check import assert_close
from tests.helpers.support import randn, randomize_all
from tests.helpers.torch_models import ConvBN


class Holder:
    """An output object bnfold cannot look into."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors


class ReturnsHolder(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)

    def forward(self, x):
        if x.shape[0] > 1:  # not symbolically traceable: torch.export gives the data flow
            y = self.conv(x)
            return Holder(y, self.bn(y))
        return Holder(self.bn(self.conv(x)))


def test_export_fallback_refuses_outputs_it_cannot_see_into():
    """The conv output leaves the model inside the holder: unseen, it would look foldable."""
    model = randomize_all(ReturnsHolder())
    with pytest.raises(bnfold.TracingError, match="Holder"):
        bnfold.fold(model, (randn(2, 3, 6, 6),))


class StoresFeatures(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)
        self.features: dict[str, torch.Tensor] = {}

    def forward(self, x):
        y = self.conv(x)
        self.features["conv"] = y  # read by the caller after forward
        return self.bn(y)


def test_an_output_stored_on_the_side_is_a_use_and_the_model_is_left_clean():
    model = randomize_all(StoresFeatures())
    x = randn(2, 3, 6, 6)
    with torch.no_grad():
        model(x)
    kept = model.features["conv"]
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER
    assert "features" in report.entry("bn").reason
    assert model.features["conv"] is kept  # no tracing proxy left behind
    assert_close(model, folded, x)


class AliasedUnderExport(ConvBN):
    """The BatchNorm is called as seq.1 and as bn; a shape branch defeats torch.fx."""

    def __init__(self) -> None:
        super().__init__(padding=1)
        self.seq = nn.Sequential(self.conv, self.bn)
        self.other = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = x * 2
        return self.seq(x) + self.bn(self.other(x))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_export_fallback_counts_calls_under_every_name():
    model = randomize_all(AliasedUnderExport())
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.notes and report.entry("bn").rule == rules.UNSHARED
    assert_close(model, folded, x)


class StoresUnderExport(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=1)
        self.features: dict = {}

    def forward(self, x):
        if x.shape[-1] > 4:
            x = x * 2
        y = self.conv(x)
        self.features["conv"] = y
        return self.bn(y).relu()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_export_fallback_sees_values_stored_on_the_side():
    model = randomize_all(StoresUnderExport())
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert not report.entry("bn").folded and "features" in report.entry("bn").reason
    assert model.features == {}
    assert_close(model, folded, x)


class HoldsOutputs(ConvBN):
    __slots__ = ()

    def __init__(self, holder: str) -> None:
        super().__init__(padding=0)
        self.holder = holder
        self.history = collections.deque(maxlen=4)
        self.ns = types.SimpleNamespace(feat=None)

    def forward(self, x):
        y = self.conv(x)
        if self.holder == "deque":
            self.history.append(y)
        else:
            self.ns.feat = y
        return self.bn(y)


@pytest.mark.parametrize("holder", ["deque", "namespace"])
def test_values_stored_in_deques_and_namespaces_are_uses_and_cleaned_up(holder):
    model = randomize_all(HoldsOutputs(holder))
    folded, report = bnfold.fold(model, (randn(2, 3, 6, 6),), return_report=True)
    assert not report.entry("bn").folded
    assert len(model.history) == 0 and model.ns.feat is None


class Box:
    pass


STORE: dict = {}


class KeepsOutput(ConvBN):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.box = Box()
        self.feats = ([],)
        self.deep = {"a": {"b": {"c": {"d": {"e": []}}}}}

    def forward(self, x):
        y = self.conv(x)
        if self.where == "object":
            self.box.feat = y
        elif self.where == "tuple":
            self.feats[0].append(y)
        elif self.where == "deep":
            self.deep["a"]["b"]["c"]["d"]["e"].append(y)
        else:
            STORE["y"] = y
        return self.bn(y)


@pytest.mark.parametrize("where", ["object", "tuple", "deep", "global"])
def test_an_output_kept_anywhere_is_a_use(where):
    model = randomize_all(KeepsOutput(where).eval())
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER, report.entry("bn")
    if where != "global":  # the model's own holders are put back as they were
        assert not hasattr(model.box, "feat") and model.feats == ([],)
        assert model.deep["a"]["b"]["c"]["d"]["e"] == []
    assert_close(model, folded, x)  # (running the models fills the holders)
    STORE.clear()


class AsksWhatItHolds(ConvBN):
    def forward(self, x):
        y = self.conv(x)
        out = self.bn(y)
        if isinstance(y, torch.Tensor):  # False on a torch.fx proxy
            out = out + y
        return out


class AsksAboutItsInput(ConvBN):
    def forward(self, x):
        if torch.is_tensor(x):
            y = self.conv(x)
            return self.bn(y) + y.mean()
        return self.bn(self.conv(x[0]))


class CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bns = nn.ModuleList([nn.BatchNorm2d(8), nn.BatchNorm2d(8)])
        self.step = 0

    def forward(self, x):
        self.step += 1
        return self.bns[self.step % 2](self.conv(x))


@pytest.mark.parametrize("cls", [AsksWhatItHolds, AsksAboutItsInput, CountsCalls])
def test_a_forward_whose_run_differs_from_its_trace_is_not_folded(cls):
    model = randomize_all(cls().eval())
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert not report.folded, report
    for _ in range(2):
        assert_close(model, folded, x)


class UsesLayersOnlyWhenRun(ConvBN):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)
        self.how = how

    def forward(self, x):
        y = self.bn(self.conv(x))
        if isinstance(x, torch.Tensor):  # False while torch.fx traces
            if self.how == "bn-forward":
                y = y + self.bn.forward(self.conv2(x))
            elif self.how == "weight":
                y = y * self.conv.weight.mean()
            else:
                y = y + self.bn.running_mean.view(1, -1, 1, 1)
        return y


@pytest.mark.parametrize("how", ["bn-forward", "weight", "statistics"])
def test_layers_used_only_when_the_model_runs_keep_their_folds(how):
    model = randomize_all(UsesLayersOnlyWhenRun(how).eval())
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").action == "skipped"
    assert "outside their layer's call" in report.entry("bn").reason
    assert_close(model, folded, x)


class _UConv(nn.Module):
    """Ultralytics' Conv: conv -> bn -> SiLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _Stem(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.stem1, self.stem2 = _UConv(c), _UConv(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem2(self.stem1(x))


class _Decoder(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(2 * c, 3, 1)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat(xs, 1))


class _RTDETRLike(nn.Module):
    """RT-DETR's predict loop: modules reached through a sliced container (``self.model[:-1]``),
    an index kept per module (``m.f``), a container re-created from a slice and a module
    fetched by a computed name; ``int(x.shape[1])`` keeps torch.fx from tracing it, so the data
    flow comes from torch.export, which names such calls ``model.slice(None, -1, None).0...``
    in some torch releases."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.model = nn.Sequential(_Stem(c), _UConv(c), _UConv(c), _Decoder(c))
        for i, m in enumerate(self.model):
            m.f, m.i = (-1 if i < 3 else [1, 2]), i
        self.layers = nn.ModuleList([_UConv(c), _UConv(c), _UConv(c)])
        self.extra = _UConv(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: list[torch.Tensor | None] = []
        for m in self.model[:-1]:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [y[j] for j in m.f]
            x = m(x)
            y.append(x if int(x.shape[1]) > 0 else None)
        y[2] = getattr(self, "ex" + "tra")(nn.Sequential(*self.layers[1:])(y[2]))
        return self.model[-1]([y[j] for j in self.model[-1].f])


def test_modules_called_through_sliced_and_recreated_containers_fold():
    model = randomize_all(_RTDETRLike().eval())
    x = randn(1, 4, 8, 8)
    with pytest.warns(UserWarning, match="torch.fx could not trace"):
        folded, report = bnfold.fold(model, (x,), return_report=True)
    kept = {e.bn: e.reason for e in report.skipped}
    assert kept == {"layers.0.bn": kept["layers.0.bn"]}, str(report)
    assert "forward() never calls it" in kept["layers.0.bn"]  # it is truly never called
    assert len(report.folded) == 7, str(report)
    assert_close(model, folded, x)


def test_call_paths_through_slices_resolve_to_the_modules():
    """The names torch.export gives calls through sliced containers lead to the modules."""
    from bnfold.torch.eager.dataflow import _called_module

    model = _RTDETRLike()
    assert _called_module(model, "model.slice(None, -1, None).0.stem1") is model.model[0].stem1
    assert _called_module(model, "layers.slice(1, None, None).1.bn") is model.layers[2].bn
    assert _called_module(model, "model.slice(-2, None, None).0") is model.model[2]
    assert _called_module(model, "layers.slice(1, None, None).5") is None
    assert _called_module(model, "model.0.stem1.conv.weight") is None  # not a module
    assert _called_module(model, "nothing.here") is None
