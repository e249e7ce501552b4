"""Traps found by trying to break the eager frontend: each is a silent wrong result, a changed
input, or a crash that bnfold must not produce. Every fold compares outputs numerically."""

from __future__ import annotations

import collections
import copy
import threading
import types
import warnings
import weakref
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.core import rules
from bnfold.demo import randomize_batchnorms
from bnfold.torch.eager.module import FoldedBatchNorm


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _setup(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorms(model, seed=seed)


def _close(model: nn.Module, folded: nn.Module, *inputs: torch.Tensor) -> None:
    _, rel = bnfold.verify(model, folded, inputs)
    assert rel <= 1e-5, rel


class ConvBN(nn.Module):
    """conv -> bn; the models below change forward() or add what they need."""

    def __init__(self, out: int = 8, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, out, 3, padding=padding)
        self.bn = nn.BatchNorm2d(out)

    def forward(self, x):
        return self.bn(self.conv(x))


class OptionalResidual(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=1)

    def forward(self, x, residual=None):
        f = self.conv(x)
        if residual is None:
            residual = f  # the usual call uses the conv output twice
        return self.bn(f) + residual


@pytest.mark.parametrize("example", [None, "given"])
def test_optional_argument_left_at_none_is_traced_as_called(example):
    model = _setup(OptionalResidual())
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, None if example is None else (x,), return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER
    _close(model, folded, x)
    _close(model, folded, x, _x(2, 8, 6, 6, seed=1))


class OptionalMask(ConvBN):
    """Foldable whichever way forward is called."""

    def __init__(self) -> None:
        super().__init__(padding=1)

    def forward(self, x, mask=None, scale: float = 2.0):
        y = self.bn(self.conv(x)) * scale
        return y if mask is None else y * mask


def test_optional_arguments_that_do_not_matter_still_fold():
    model = _setup(OptionalMask())
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("bn").folded
    _close(model, folded, x)
    _close(model, folded, x, _x(1, 8, 1, 1, seed=2))


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
    model = _setup(ListPipeline())
    reference = copy.deepcopy(model)
    folded, report = bnfold.fold(model, inplace=inplace, return_report=True)
    assert report.entry("bn").folded
    assert folded.pipeline[1] is folded.bn and type(folded.bn) is nn.Identity
    _close(reference, folded, _x(2, 3, 6, 6))


def test_linear_bn1d_fold_decided_on_2d_refuses_3d_inputs_loudly():
    model = _setup(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)))
    folded = bnfold.fold(model, (_x(4, 8),))
    assert isinstance(folded[1], FoldedBatchNorm)
    _close(model, folded, _x(5, 8, seed=1))
    with torch.no_grad():
        model(_x(3, 8, 8, seed=2))  # the original accepts 3-D input too...
        with pytest.raises(AssertionError, match="2-D activations"):
            folded(_x(3, 8, 8, seed=2))  # ...where the fold would be wrong: it says so


def test_conv1d_bn1d_fold_decided_on_batched_refuses_unbatched_loudly():
    model = _setup(nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8)))
    folded = bnfold.fold(model, (_x(2, 3, 10),))
    _close(model, folded, _x(4, 3, 12, seed=1))
    with torch.no_grad():
        model(_x(3, 10, seed=2))  # unbatched (C, L) with L == 8 channels runs in the original
        with pytest.raises(AssertionError, match="3-D activations"):
            folded(_x(3, 10, seed=2))


def test_rank_checked_fold_of_a_batchnorm_with_its_own_forward_keeps_the_rest():
    class BNReLU1d(nn.BatchNorm1d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = _setup(nn.Sequential(nn.Linear(6, 5), BNReLU1d(5)))
    folded = bnfold.fold(model, (_x(4, 6),))
    assert isinstance(folded[1], FoldedBatchNorm) and type(folded[1].rest) is not nn.Identity
    _close(model, folded, _x(7, 6, seed=1))


class ReadsStatistics(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)

    def forward(self, x):
        return self.bn(self.conv(x)) - self.bn.running_mean.view(1, -1, 1, 1)


def test_forward_reading_batchnorm_buffers_keeps_the_batchnorm():
    model = _setup(ReadsStatistics())
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER
    assert "running_mean" in report.entry("bn").reason
    _close(model, folded, _x(2, 3, 6, 6))


class Counting(ConvBN):
    def __init__(self, reassign: bool) -> None:
        super().__init__(padding=0)
        self.reassign = reassign
        self.python_calls = 0
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.python_calls += 1
        if self.reassign:
            self.calls = self.calls + 1
        else:
            self.calls += 1
        return self.bn(self.conv(x))


@pytest.mark.parametrize("reassign", [False, True])
@pytest.mark.parametrize("example", [False, True])
def test_analyze_and_fold_leave_forward_state_alone(reassign, example):
    model = _setup(Counting(reassign))
    model.calls.zero_()
    model.python_calls = 0
    buffer = model.calls
    inputs = (_x(2, 3, 6, 6),) if example else None
    bnfold.analyze(model, inputs)
    folded = bnfold.fold(model, inputs)
    assert int(model.calls) == 0 and model.python_calls == 0 and model.calls is buffer
    with torch.no_grad():
        want, got = model(_x(2, 3, 6, 6, seed=1)), folded(_x(2, 3, 6, 6, seed=1))
    assert float((want - got).abs().max() / want.abs().max()) <= 1e-5


def test_two_threads_fold_different_models_correctly():
    models = [_setup(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), seed=s) for s in (1, 2)]
    models.append(_setup(OptionalMask(), seed=3))
    results: dict[int, list] = {i: [] for i in range(len(models))}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(15):
                results[i].append(bnfold.fold(models[i]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    x = _x(2, 3, 6, 6)
    for i, folded_list in results.items():
        for folded in folded_list:
            _close(models[i], folded, x)


def test_torchscript_is_a_clear_error():
    model = torch.jit.script(_setup(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))))
    with pytest.raises(bnfold.UnsupportedModelError, match="TorchScript"):
        bnfold.fold(model)


def test_uninitialised_lazy_module_is_a_clear_error():
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(bnfold.UnsupportedModelError, match="run the model once"):
        bnfold.fold(model)
    model(_x(2, 3, 6, 6))
    _setup(model)
    _close(model, bnfold.fold(model), _x(2, 3, 6, 6, seed=1))


def test_producers_accepts_one_kind_as_a_string():
    model = _setup(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    report = bnfold.analyze(model, producers="linear")
    assert report.entry("1").rule == rules.NOT_SELECTED
    assert bnfold.analyze(model, producers="conv").entry("1").folded
    with pytest.raises(bnfold.InvalidArgumentError, match="unknown producer kinds"):
        bnfold.analyze(model, producers="convolution")


class TakesAList(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)

    def forward(self, xs: list):
        return [self.bn(self.conv(x)) for x in xs]


def test_a_list_example_input_is_one_argument():
    model = _setup(TakesAList())
    xs = [_x(1, 3, 6, 6), _x(1, 3, 6, 6, seed=1)]
    with pytest.raises(bnfold.TracingError):
        bnfold.fold(model)  # iterating over a proxy cannot be traced symbolically
    folded, report = bnfold.fold(model, xs, return_report=True)
    assert report.entry("bn").rule == rules.UNSHARED  # called once per list element
    assert bnfold.verify(model, folded, xs) == (0.0, 0.0)


def test_folded_batchnorm_with_own_forward_leaves_no_statistics_behind():
    class BNSiLU2d(nn.BatchNorm2d):
        def forward(self, x):
            return F.silu(super().forward(x))

    model = _setup(nn.Sequential(nn.Conv2d(3, 8, 3), BNSiLU2d(8)))
    folded = bnfold.fold(model)
    assert set(folded.state_dict()) == {"0.weight", "0.bias"}
    _close(model, folded, _x(2, 3, 6, 6))


class SameConvTwoNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.stem = self.body[0]  # an alias, called once

    def forward(self, x):
        return self.body(x) * x.shape[-1]


def test_module_registered_under_two_names_but_called_once_folds():
    model = _setup(SameConvTwoNames())
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("body.1").folded
    assert folded.stem is folded.body[0]
    _close(model, folded, _x(2, 3, 6, 6))


class ReadsWeightShape(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)

    def forward(self, x):
        return self.bn(self.conv(x)).flatten(1)[:, : self.conv.weight.shape[0]]


def test_reading_only_the_weight_shape_does_not_block_the_fold():
    model = _setup(ReadsWeightShape())
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("bn").folded
    _close(model, folded, _x(2, 3, 6, 6))


@dataclass
class Out:
    y: torch.Tensor
    label: str = "y"


class ReturnsDataclass(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)

    def forward(self, x):
        return Out(self.bn(self.conv(x)))


def test_verify_looks_inside_dataclasses():
    model = _setup(ReturnsDataclass())
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.conv.weight.mul_(3)
    _, rel = bnfold.verify(model, wrong, _x(2, 3, 6, 6))
    assert rel > 0.1
    assert bnfold.verify(model, bnfold.fold(model), _x(2, 3, 6, 6))[1] <= 1e-5


def test_verify_refuses_outputs_without_tensors():
    class Nothing(nn.Module):
        def forward(self, x):
            return "done"

    with pytest.raises(bnfold.UnsupportedModelError, match="no tensor"):
        bnfold.verify(Nothing(), Nothing(), _x(2))


def test_verify_compares_complex_integer_and_nan_outputs():
    class Mixed(nn.Module):
        def __init__(self, shift: float) -> None:
            super().__init__()
            self.shift = shift

        def forward(self, x):
            y = x + self.shift
            return torch.fft.fft(y), y.argmax(-1), y.log()

    x = _x(3, 8)
    assert bnfold.verify(Mixed(0.0), Mixed(0.0), x) == (0.0, 0.0)  # NaN logs agree with NaN
    err, rel = bnfold.verify(Mixed(0.0), Mixed(1e-3), x)
    assert 0 < err < 1 and rel < 1


def test_meta_device_model_is_a_clear_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(bnfold.UnsupportedModelError, match="meta device"):
        bnfold.fold(model)


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
    model = _setup(ReturnsHolder())
    with pytest.raises(bnfold.TracingError, match="Holder"):
        bnfold.fold(model, (_x(2, 3, 6, 6),))


def test_folded_model_exports_scripts_and_pickles_without_batchnorm():
    """Deployment paths after an eager fold: torch.export, TorchScript, torch.save."""
    import io

    from bnfold.demo import DemoNet
    from tests.helpers.support import BatchNormAct2d

    torch.manual_seed(0)
    model = DemoNet(width=8)
    model.bn_up = BatchNormAct2d(8)  # a BatchNorm with its own forward, folded to its rest
    model = _setup(model)
    x = (_x(2, 3, 16, 16),)
    folded = bnfold.fold(model, x)
    assert isinstance(folded.bn_fc, FoldedBatchNorm)
    ep = torch.export.export(folded, x)
    assert not [n for n in ep.graph.nodes if "batch_norm" in str(n.target)]
    fresh = (_x(2, 3, 16, 16, seed=1),)  # the exported program is specialised to batch 2
    assert bnfold.verify(model, ep.module(), fresh)[1] <= 1e-5
    assert bnfold.verify(model, torch.jit.script(folded), fresh)[1] <= 1e-5
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    assert bnfold.verify(model, torch.load(buffer, weights_only=False), fresh)[1] <= 1e-5


class NormOnlyWithoutSkip(ConvBN):
    """With skip=None the conv output goes through the BatchNorm only; with a skip tensor it
    also leaves the model un-normalised."""

    def __init__(self) -> None:
        super().__init__(padding=1)

    def forward(self, x, skip=None):
        y = self.conv(x)
        if skip is None:
            return self.bn(y)
        return y + skip


def test_a_user_seen_in_one_trace_only_blocks_the_fold():
    model = _setup(NormOnlyWithoutSkip())
    x, skip = _x(2, 3, 6, 6), _x(2, 8, 6, 6, seed=1)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER
    _close(model, folded, x)
    _close(model, folded, x, skip)


# --------------------------------------------------------------------------------------------
# Second round: what forward does besides the graph


def test_a_forward_set_on_a_batchnorm_instance_is_not_trusted():
    model = _setup(ConvBN())
    bn = model.bn
    bn.forward = lambda x: torch.relu(nn.BatchNorm2d.forward(bn, x))
    folded, report = bnfold.fold(model, (_x(2, 3, 6, 6),), return_report=True)
    assert report.entry("bn").rule == rules.STANDARD_FORWARD
    assert "instance" in report.entry("bn").reason
    _close(model, folded, _x(2, 3, 6, 6, seed=1))


def test_a_forward_set_on_the_model_instance_is_a_clear_error():
    model = _setup(ConvBN())

    def residual_forward(x):
        y = model.conv(x)
        return model.bn(y) + y

    model.forward = residual_forward
    with pytest.raises(bnfold.UnsupportedModelError, match="replaced on the instance"):
        bnfold.fold(model)


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
    model = _setup(HiddenProducerCall(shared_first))
    x = _x(2, 4, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert not report.entry("bn3").folded
    assert "bnp" in report.entry("bn3").reason
    _close(model, folded, _x(3, 4, 6, 6, seed=1))


class StoresFeatures(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)
        self.features: dict[str, torch.Tensor] = {}

    def forward(self, x):
        y = self.conv(x)
        self.features["conv"] = y  # read by the caller after forward
        return self.bn(y)


def test_an_output_stored_on_the_side_is_a_use_and_the_model_is_left_clean():
    model = _setup(StoresFeatures())
    x = _x(2, 3, 6, 6)
    with torch.no_grad():
        model(x)
    kept = model.features["conv"]
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER
    assert "features" in report.entry("bn").reason
    assert model.features["conv"] is kept  # no tracing proxy left behind
    _close(model, folded, x)


class ClampsWeights(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)

    def forward(self, x):
        with torch.no_grad():
            for p in self.conv.parameters():
                p.clamp_(-0.3, 0.3)
        return self.bn(self.conv(x))


def test_a_forward_that_rewrites_its_weights_is_not_folded():
    model = _setup(ClampsWeights())
    x = _x(2, 3, 6, 6)
    with torch.no_grad():
        model(x)  # the weights are clamped from the first call on
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert not report.entry("bn").folded
    assert "in place" in report.entry("bn").reason
    _close(model, folded, x)


class TouchesBuffers(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        for b in self.buffers(recurse=False):
            b.add_(1)
        return self.bn(self.conv(x))


def test_buffers_changed_without_attribute_access_are_restored():
    model = _setup(TouchesBuffers())
    model.n.zero_()
    folded = bnfold.fold(model, (_x(2, 3, 6, 6),))
    assert float(model.n) == 0.0
    _close(model, folded, _x(2, 3, 6, 6, seed=1))


class LazyAct2d(nn.BatchNorm2d):
    def forward(self, x):
        if not hasattr(self, "act"):
            self.act = nn.ReLU()
        return self.act(super().forward(x))


class LogsOutputs2d(nn.BatchNorm2d):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.log: list = []
        self.calls = 0

    def forward(self, x):
        y = super().forward(x)
        self.log.append(y)
        self.calls += 1
        return y


@pytest.mark.parametrize("cls", [LazyAct2d, LogsOutputs2d])
def test_a_batchnorm_forward_with_python_side_effects_is_kept_and_left_clean(cls):
    model = _setup(nn.Sequential(nn.Conv2d(3, 4, 3), cls(4)))
    before = dict(vars(model[1]))
    folded, report = bnfold.fold(model, (_x(2, 3, 6, 6),), return_report=True)
    assert report.entry("1").rule == rules.STANDARD_FORWARD
    assert vars(model[1]).keys() == before.keys()
    assert not getattr(model[1], "log", [])
    assert "act" not in model[1]._modules


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
    model = _setup(nn.Sequential(nn.Conv2d(3, 4, 3), NamedLikeGraphModule2d(4)))
    reference = copy.deepcopy(model)
    folded = bnfold.fold(model, (_x(2, 3, 6, 6),), inplace=inplace)
    copied = copy.deepcopy(folded)
    for m in (folded[1], copied[1]):
        assert m.num_features == 4 and m.code == "bn-7" and m.graph == "none"
    _close(reference, copied, _x(1, 3, 6, 6, seed=1))


def test_folded_models_trace_with_fx_and_fold_again():
    model = _setup(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.BatchNorm1d(5)))
    x = _x(4, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert [e.action for e in report] == ["folded", "skipped"]
    traced = torch.fx.symbolic_trace(folded)
    _close(model, traced, x)
    again, report2 = bnfold.fold(folded, (x,), return_report=True)
    assert [e.action for e in report2] == ["skipped"] and not report2.notes
    _close(model, again, x)


def test_variance_plus_eps_is_checked_in_the_variance_precision():
    model = _setup(ConvBN())
    with torch.no_grad():
        model.bn.running_var[3] = -model.bn.eps  # float32: var + eps == 0, the output is inf
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("bn").rule == rules.VALID_VALUES


def test_negative_eps_is_refused():
    model = _setup(ConvBN())
    model.bn.eps = -1e-3
    assert bnfold.analyze(model).entry("bn").rule == rules.VALID_VALUES


def test_example_inputs_the_model_rejects_are_a_clear_error():
    model = _setup(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)))
    with pytest.raises(bnfold.InvalidArgumentError, match="example_inputs"):
        bnfold.fold(model, (_x(4, 7),))


# --------------------------------------------------------------------------------------------
# Third round: aliases and side channels on the torch.export path, holders, odd tensors


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
    model = _setup(AliasedUnderExport())
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.notes and report.entry("bn").rule == rules.UNSHARED
    _close(model, folded, x)


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
    model = _setup(StoresUnderExport())
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert not report.entry("bn").folded and "features" in report.entry("bn").reason
    assert model.features == {}
    _close(model, folded, x)


class ReadsParametersDirectly(ConvBN):
    def __init__(self, how: str) -> None:
        super().__init__(padding=0)
        self.how = how

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.how == "table":
            return y / self.conv._parameters["weight"].flatten(1).norm(dim=1).mean()
        if self.how == "iterator":
            return y, sum(p.pow(2).sum() for p in self.conv.parameters())
        return y - dict(self.bn.named_buffers())["running_var"].mean()


@pytest.mark.parametrize("how", ["table", "iterator", "named_buffers"])
def test_parameters_reached_without_attribute_access_are_uses(how):
    model = _setup(ReadsParametersDirectly(how))
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert not report.entry("bn").folded
    _close(model, folded, x)


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
    model = _setup(HoldsOutputs(holder))
    folded, report = bnfold.fold(model, (_x(2, 3, 6, 6),), return_report=True)
    assert not report.entry("bn").folded
    assert len(model.history) == 0 and model.ns.feat is None


class StrictDict(dict):
    """A config dict whose update and clear refuse to work, as some config classes do."""

    def update(self, *args, **kwargs):
        raise TypeError("read-only")

    def clear(self):
        raise TypeError("read-only")


class WithConfig(ConvBN):
    def __init__(self) -> None:
        super().__init__()
        self.cfg = StrictDict(width=8, name="net")
        self.calls = torch.zeros(())
        self.history = [torch.zeros(2)]

    def forward(self, x):
        self.calls += 1
        self.history[0].add_(1)
        return super().forward(x)


def test_config_holders_and_plain_tensor_attributes_survive():
    model = _setup(WithConfig())
    x = _x(2, 3, 6, 6)
    bnfold.analyze(model, (x,))
    folded = bnfold.fold(model, (x,))
    assert dict(model.cfg) == {"width": 8, "name": "net"}
    assert float(model.calls) == 0 and model.history[0].tolist() == [0.0, 0.0]
    _close(model, folded, x)


def test_models_built_under_inference_mode_and_expanded_buffers_fold():
    with torch.inference_mode():
        model = _setup(ConvBN())
    _close(model, bnfold.fold(model), _x(2, 3, 6, 6))
    model = _setup(ConvBN())
    model.register_buffer("grid", torch.zeros(1, 8, 1, 1).expand(1, 8, 6, 6))
    _close(model, bnfold.fold(model, (_x(2, 3, 6, 6),)), _x(2, 3, 6, 6, seed=1))


def test_a_torch_compile_wrapper_is_a_clear_error():
    model = torch.compile(_setup(ConvBN()))
    with pytest.raises(bnfold.UnsupportedModelError, match="_orig_mod"):
        bnfold.fold(model)


class ReturnsFeatures(ConvBN):
    def __init__(self) -> None:
        super().__init__(out=4, padding=0)

    def forward(self, x, return_features: bool = False, mode: str = "plain"):
        f = self.conv(x)
        if mode == "relu":
            f = f.relu()
        y = self.bn(f)
        return (y, f) if return_features else y


def test_flags_are_traced_both_ways_and_other_values_are_noted():
    model = _setup(ReturnsFeatures())
    x = _x(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="mode='plain'"):
        folded, report = bnfold.fold(model, (x,), return_report=True)
    # return_features=True returns the conv output: traced, so the fold is refused
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER
    assert report.notes and "mode" in report.notes[0]
    for call in [(x,), (x, True), (x, False, "relu")]:
        _close(model, folded, *call)


# --------------------------------------------------------------------------------------------
# Code that runs around a layer's forward: overridden call methods, hooks on the root, global
# hooks. torch.fx stops at a layer's call, so it never sees them.


class ReLUOnCall2d(nn.BatchNorm2d):
    def __call__(self, x):
        return torch.relu(super().__call__(x))


class ReLUOnCallImpl2d(nn.BatchNorm2d):
    def _call_impl(self, *args, **kwargs):
        return torch.relu(super()._call_impl(*args, **kwargs))


class ClampsOnCall(nn.Conv2d):
    def __call__(self, x):
        with torch.no_grad():
            self.weight.clamp_(-0.1, 0.1)  # invisible to torch.fx: it stops at the call
        return super().__call__(x)


def _instance_call_impl() -> nn.Module:
    bn = nn.BatchNorm2d(8)
    plain = bn._call_impl
    bn._call_impl = lambda *a, **k: torch.tanh(plain(*a, **k))
    return bn


@pytest.mark.parametrize(
    "make",
    [
        lambda m: setattr(m, "bn", ReLUOnCall2d(8)),
        lambda m: setattr(m, "bn", ReLUOnCallImpl2d(8)),
        lambda m: setattr(m, "bn", _instance_call_impl()),
        lambda m: setattr(m, "conv", ClampsOnCall(3, 8, 3, padding=1)),
    ],
    ids=["bn-__call__", "bn-_call_impl", "bn-instance-_call_impl", "conv-__call__"],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_a_layer_whose_call_does_more_than_forward_is_not_folded(make, inplace):
    base = ConvBN()
    make(base)
    model = _setup(base.eval())
    reference = copy.deepcopy(model)
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    assert report.entry("bn").rule == rules.STANDARD_FORWARD
    assert "runs around its forward()" in report.entry("bn").reason
    _close(reference, folded, x)


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
    model = _setup(cls().eval())
    x = _x(2, 5, 8)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("bn")
    assert entry.action == "skipped"
    if cls is AttentionThenBN:  # linear2 also runs inside the layer, on 3-D values
        assert entry.rule == rules.UNSHARED, entry
        assert "which bnfold does not trace" in entry.reason
    _close(model, folded, x)


class RootHookNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))


def test_forward_hooks_on_the_root_keep_every_batchnorm():
    model = _setup(RootHookNet().eval())
    model.register_forward_hook(lambda mod, _args, out: out + mod[0].weight.sum())
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("1").rule == rules.STANDARD_FORWARD
    assert "the model" in report.entry("1").reason
    _close(model, folded, x)


def test_a_root_hook_reading_statistics_does_not_break_the_folded_model():
    model = _setup(RootHookNet().eval())
    model.register_forward_pre_hook(lambda mod, args: (args[0] + mod[1].running_var.mean(),))
    x = _x(2, 3, 6, 6)
    folded = bnfold.fold(model, (x,))
    _close(model, folded, x)


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_global_module_hooks_keep_every_batchnorm(kind):
    from torch.nn.modules import module as torch_module

    def hook(mod, _args, out=None):
        if kind == "pre":
            return None
        return out * 2 if isinstance(mod, nn.BatchNorm2d) else out

    def pre_hook(mod, args):
        return (args[0] * 3,) if isinstance(mod, nn.Conv2d) else None

    model = _setup(ConvBN().eval())
    x = _x(2, 3, 6, 6)
    register = (
        torch_module.register_module_forward_hook
        if kind == "forward"
        else torch_module.register_module_forward_pre_hook
    )
    handle = register(hook if kind == "forward" else pre_hook)
    try:
        folded, report = bnfold.fold(model, (x,), return_report=True)
        assert report.entry("bn").rule == rules.STANDARD_FORWARD
        assert "global module forward hooks" in report.entry("bn").reason
        _close(model, folded, x)
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# Inputs, aliases, arguments


class WritesIntoInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, v):
        v.mul_(2)
        return self.bn(self.fc(v))


@pytest.mark.parametrize("call", ["fold", "analyze"])
def test_the_callers_example_inputs_are_never_written_into(call):
    model = _setup(WritesIntoInput().eval())
    v = _x(3, 4)
    before = v.clone()
    getattr(bnfold, call)(model, (v,))  # Linear + BatchNorm1d: the rank is probed by a run
    assert torch.equal(v, before)


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
    return _setup(inner.eval())


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

    x = _x(2, 3, 6, 6)
    monkeypatch.setattr(nn.Module, "named_modules", counting)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    monkeypatch.undo()
    assert yielded < 2**depth // 8, yielded  # every path once would be 65,536 per walk
    assert report.folded and len(report.entries) == 1
    _close(model, folded, x)


def test_aliases_under_the_export_fallback_fold_or_are_a_clear_error():
    x = _x(2, 3, 6, 6)
    model = _aliased(ShapeDependentConvBN(), 4)  # 16 names: torch.export takes it
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.folded
    _close(model, folded, x)
    # torch.export would give the program an input per name: 2**30 of them
    with pytest.raises(bnfold.TracingError, match="names"):
        bnfold.fold(_aliased(ShapeDependentConvBN(), 30), (x,))


@pytest.mark.parametrize("producers", [b"conv", bytearray(b"conv"), {"conv": 1}, 5])
def test_producers_must_be_kinds_not_bytes_or_a_dict(producers):
    with pytest.raises(bnfold.InvalidArgumentError, match="producers must be"):
        bnfold.fold(_setup(ConvBN().eval()), producers=producers)


@pytest.mark.parametrize("container", [nn.ModuleList, nn.ModuleDict])
def test_a_container_without_forward_is_a_clear_error(container):
    layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)]
    model = container(
        layers if container is nn.ModuleList else dict(zip("ab", layers, strict=True))
    )
    with pytest.raises(bnfold.UnsupportedModelError, match="has no forward"):
        bnfold.fold(model.eval(), (_x(2, 3, 6, 6),))


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
    model = _setup(cls().eval())
    reference = copy.deepcopy(model)
    x = _x(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch.export fallback's note
        folded, report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    entry = report.entry("bn")
    assert entry.action == "skipped", entry
    assert "not its own tensor" in entry.reason
    _close(reference, folded, x)


# Fourth review round


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
    model = _setup(TwoStages(SlotBN(4)).eval())
    model.b2.tag = "kept"
    reference = copy.deepcopy(model)
    x = _x(2, 3, 8, 8)
    folded, report = bnfold.fold(model, (x,), inplace=True, return_report=True)
    assert folded is model
    assert report.entry("b1").action == "folded"
    entry = report.entry("b2")
    assert entry.action == "skipped" and "__slots__" in entry.reason, entry
    assert type(model.b2) is SlotBN and model.b2.tag == "kept"
    _close(reference, model, x)
    _close(reference, model, _x(3, 3, 8, 8, seed=1))


class ConvBNConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


@pytest.mark.parametrize("inplace", [False, True])
def test_fold_under_inference_mode_gives_a_model_usable_outside_it(inplace):
    model = _setup(ConvBNConv().eval())
    reference = copy.deepcopy(model)
    x = _x(2, 3, 8, 8)
    with torch.inference_mode():
        folded = bnfold.fold(model, (x,), inplace=inplace)
    assert not any(t.is_inference() for t in folded.parameters())
    xg = x.clone().requires_grad_()
    out = folded(xg)  # a normal call, with autograd: no inference tensor may be saved
    out.sum().backward()
    assert xg.grad is not None
    with torch.no_grad():
        assert torch.allclose(out, reference(x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        assert torch.allclose(folded(x), reference(x), rtol=1e-5, atol=1e-5)
    _close(reference, folded, _x(3, 3, 8, 8, seed=1))


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
    x = _x(1, 3, 8, 8).to(dtype)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("1")
    assert entry.action == "skipped", entry
    _close(model, folded, x)
    _close(model, folded, _x(2, 3, 8, 8, seed=1).to(dtype) * (1e4 if bound < 1e10 else 1e250))


class WritesIntoBatch(ConvBN):
    def forward(self, batch):
        y = self.conv(batch["img"])
        batch["feat"] = y  # the features go back to the caller in its own dict
        return self.bn(y)


class ShiftsInput(ConvBN):
    def forward(self, batch):
        x = batch["img"]
        x.sub_(0.5)
        return self.bn(self.conv(x))


def test_dict_example_inputs_are_not_changed_and_writes_into_them_are_uses():
    model = _setup(ShiftsInput().eval())
    x = _x(2, 3, 6, 6)
    example = {"img": x.clone()}
    folded = bnfold.fold(model, example)
    assert torch.equal(example["img"], x) and list(example) == ["img"]
    a, b = {"img": x.clone()}, {"img": x.clone()}
    with torch.no_grad():
        assert torch.allclose(model(a), folded(b), rtol=1e-5, atol=1e-5)

    model = _setup(WritesIntoBatch().eval())
    example = {"img": x.clone()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note on what was traced as fixed
        folded, report = bnfold.fold(model, example, return_report=True)
    assert list(example) == ["img"]
    entry = report.entry("bn")
    assert entry.action == "skipped" and "argument 'batch'" in entry.reason, entry
    a, b = {"img": x.clone()}, {"img": x.clone()}
    with torch.no_grad():
        out_a, out_b = model(a), folded(b)
    assert torch.allclose(out_a, out_b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(a["feat"], b["feat"], rtol=1e-5, atol=1e-5)


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
    model = _setup(cls().eval())
    reference = copy.deepcopy(model)
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    entry = report.entry("bn")
    assert entry.action == action, entry
    if action == "skipped":
        assert entry.rule == rules.UNSHARED and "c2.bias" in entry.reason, entry
    _close(reference, folded, x)
    _close(reference, folded, _x(3, 3, 6, 6, seed=1))


# --------------------------------------------------------------------------------------------
# forward looking at the layers, not only calling them: the folded model must behave the same.


class TestsForBias(ConvBN):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.conv.bias is None:  # the fold gives the conv a bias
            y = y + 1
        return y


class CollectsAfterNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()])

    def forward(self, x):
        out = None
        for m in self.layers:
            x = m(x)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                out = x if out is None else out + x
        return x if out is None else x + out


class ReadsNormDtype(ConvBN):
    def forward(self, x):
        return self.bn(self.conv(x)).to(self.bn.weight.dtype)


class ReadsNormShape(ConvBN):
    def forward(self, x):
        return self.bn(self.conv(x))[:, : self.bn.running_mean.shape[0] // 2]


class ChecksNormInput(ConvBN):
    def forward(self, x):
        y = self.conv(x)
        self.bn._check_input_dim(y)
        return self.bn(y)


class ReadsAffineFlag(ConvBN):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * 2 if self.bn.weight is not None else y


@pytest.mark.parametrize(
    "cls",
    [
        TestsForBias,
        CollectsAfterNorms,
        ReadsNormDtype,
        ReadsNormShape,
        ChecksNormInput,
        ReadsAffineFlag,
    ],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_forward_that_looks_at_the_layers_keeps_working(cls, inplace):
    model = _setup(cls().eval())
    reference = copy.deepcopy(model)
    x = _x(2, 3, 6, 6)
    report = bnfold.analyze(model, (x,))
    folded, fold_report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    assert fold_report == report
    entry = next(e for e in report.entries)
    assert entry.action == "skipped", entry
    # the structure check, or (reads of a BatchNorm's tensors) the run on the example inputs
    assert "looks at the layers" in entry.reason or "outside their layer's call" in entry.reason
    _close(reference, folded, x)
    if cls is not ChecksNormInput:  # (torch.fx cannot trace that one: it needs the inputs)
        no_example = bnfold.analyze(model)  # without example inputs: the structure check alone
        assert no_example.entries[0].rule == rules.STANDARD_FORWARD, no_example.entries[0]
        assert "looks at the layers" in no_example.entries[0].reason


class ShapeControlledTestsForBias(TestsForBias):
    """The same on the torch.export path (torch.fx cannot trace the shape test)."""

    def forward(self, x):
        y = super().forward(x)
        return y if x.shape[0] > 1 else -y


def test_forward_that_looks_at_the_layers_on_the_export_path():
    model = _setup(ShapeControlledTestsForBias().eval())
    x = _x(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="torch.export"):
        folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.STANDARD_FORWARD
    _close(model, folded, x)


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
    model = _setup(ConvThenHeldNorm(holder).eval())
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("norm.bn")
    assert entry.action == "skipped" and "__deepcopy__" in entry.reason, entry
    _close(model, folded, x)
    # in place there is no copy to go wrong... but the check needs one: kept with the reason
    inplace_model = copy.deepcopy(model)
    _, report = bnfold.fold(inplace_model, (x,), inplace=True, return_report=True)
    _close(model, inplace_model, x)


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
    model = _setup(StemByReference(how).eval())
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").action == "skipped"
    _close(model, folded, x)


# --------------------------------------------------------------------------------------------
# Where forward keeps a value, and what differs between its trace and a real run


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
    model = _setup(KeepsOutput(where).eval())
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER, report.entry("bn")
    _close(model, folded, x)
    if where != "global":  # the model's own holders are put back as they were
        assert not hasattr(model.box, "feat") and model.feats == ([],)
        assert model.deep["a"]["b"]["c"]["d"]["e"] == []
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
    model = _setup(cls().eval())
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert not report.folded, report
    for _ in range(2):
        _close(model, folded, x)


# Layers and layout ops between a producer and its BatchNorm


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
    model = _setup(ThroughModule(PASS_THROUGH[middle]()))
    reference = copy.deepcopy(model)
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(
        model, None if example is None else (x,), inplace=inplace, return_report=True
    )
    assert report.entry("bn").folded and report.entry("bn").target == "conv", report
    assert type(folded.mid) is type(reference.mid)  # the identity in eval: it stays
    assert type(folded.bn) is nn.Identity
    _close(reference, folded, x)
    _close(reference, folded, _x(3, 3, 5, 7, seed=1))


def test_linear_dropout_bn1d_is_decided_by_the_example_rank_as_without_dropout():
    model = _setup(nn.Sequential(nn.Linear(8, 6), nn.Dropout(0.2), nn.BatchNorm1d(6)))
    report = bnfold.analyze(model)
    assert report.entry("2").rule == rules.CHANNEL_AXIS, report
    folded = bnfold.fold(model, (_x(4, 8),))
    assert isinstance(folded[2], FoldedBatchNorm) and isinstance(folded[1], nn.Dropout)
    _close(model, folded, _x(5, 8, seed=1))


def test_dropout_in_training_mode_inside_an_eval_model_is_kept():
    model = _setup(ThroughModule(nn.Dropout(0.5)))
    model.mid.train()
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("bn")
    assert entry.rule == rules.NO_PRODUCER and "training mode" in entry.reason, entry
    assert type(folded.bn) is nn.BatchNorm2d
    model.mid.eval()
    folded.mid.eval()  # dropout is random in training mode: compare without it
    _close(model, folded, x)


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
    model = _setup(cls())
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rule, report.entry("bn")
    _close(model, folded, x)


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
    model = _setup(LinearTransposeBN(how, nn.Dropout(0.1) if how == "permute" else None))
    reference = copy.deepcopy(model)
    x = _x(2, 5, 4)
    folded, report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    assert report.entry("bn").folded and report.entry("bn").target == "lin", report
    assert isinstance(folded.bn, FoldedBatchNorm) and folded.bn.rank == 3
    _close(reference, folded, x)
    _close(reference, folded, _x(3, 7, 4, seed=1))


def test_linear_transpose_bn1d_without_example_inputs_is_kept_with_the_hint():
    model = _setup(LinearTransposeBN("method"))
    folded, report = bnfold.fold(model, return_report=True)
    entry = report.entry("bn")
    assert entry.rule == rules.CHANNEL_AXIS and "example_inputs" in entry.reason, entry
    assert "transpose(1, 2)" in entry.reason
    _close(model, folded, _x(2, 5, 4))


def test_a_layout_op_that_leaves_the_channels_elsewhere_is_kept():
    model = LinearTransposeBN("elsewhere")
    model.bn = nn.BatchNorm1d(2)  # (B=2, L, C) -> (L, B, C): normalises B
    model = _setup(model)
    x = _x(2, 3, 4)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("bn")
    assert entry.rule == rules.CHANNEL_AXIS and "axis 2" in entry.reason, entry
    _close(model, folded, x)


class Conv1dTransposeBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):  # (B, C, L) -> (B, L, C): the BatchNorm normalises L
        return self.bn(self.conv(x).transpose(1, 2))


def test_conv1d_transposed_away_from_axis_1_is_kept():
    model = _setup(Conv1dTransposeBN())
    x = _x(2, 3, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.CHANNEL_AXIS, report.entry("bn")
    _close(model, folded, x)


class ConvChannelsLastAndBack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):  # (N, C, H, W) -> (N, H, W, C) -> (N, C, H, W)
        return self.bn(self.conv(x).permute(0, 2, 3, 1).permute(0, 3, 1, 2))


@pytest.mark.parametrize("inplace", [False, True])
def test_conv_channels_brought_back_to_axis_1_fold(inplace):
    model = _setup(ConvChannelsLastAndBack())
    reference = copy.deepcopy(model)
    x = _x(2, 3, 6, 6)
    assert bnfold.analyze(model).entry("bn").rule == rules.CHANNEL_AXIS
    folded, report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    assert report.entry("bn").folded, report
    _close(reference, folded, x)


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
    model = _setup(cls())
    x = _x(2, 5, 4)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER, report.entry("bn")
    _close(model, folded, x)


@pytest.mark.parametrize("how", ["method", "mT"])
def test_a_folded_transpose_model_given_another_rank_fails_loudly(how):
    model = _setup(LinearTransposeBN(how))
    folded = bnfold.fold(model, (_x(2, 5, 4),))
    for x in (_x(8, 4, seed=1), _x(2, 3, 5, 4, seed=2)):
        with torch.no_grad(), pytest.raises((AssertionError, RuntimeError, IndexError)):
            folded(x)
    if how == "mT":  # (8, 4) -> (8, 8) -> .mT: the original normalises the batch axis...
        with torch.no_grad():
            model(_x(8, 4, seed=1))
            with pytest.raises(AssertionError, match="3-D activations"):
                folded(_x(8, 4, seed=1))  # ...where the fold would be wrong: it says so


# --------------------------------------------------------------------------------------------
# Second review round: state forward changes, inputs bnfold cannot flatten, copies that fail


class CountsThenReads(ConvBN):
    """From its second call on, reads a BatchNorm attribute a fold removes."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def forward(self, x):
        self.steps += 1
        y = self.bn(self.conv(x))
        return y * self.bn.weight.view(1, -1, 1, 1) if self.steps > 1 else y


class SetsEps(ConvBN):
    def forward(self, x):
        self.bn.eps = 0.1  # forward configures the layer before calling it
        return self.bn(self.conv(x))


@pytest.mark.parametrize("cls", [CountsThenReads, SetsEps])
def test_forward_changing_python_state_keeps_the_folds(cls):
    model = _setup(cls().eval())
    with torch.no_grad():
        model.bn.running_var.uniform_(1e-3, 1e-2)  # eps 0.1 against 1e-5 matters here
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").action == "skipped", report.entry("bn")
    for _ in range(3):  # the model's own state moves on with every call
        with torch.no_grad():
            want, got = model(x), folded(x)
        assert float((want - got).abs().max() / want.abs().max()) <= 1e-5


class Batch:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.n = 0
        self.feats: list = []


class TakesAnObject(ConvBN):
    def forward(self, b):
        b.n += 1
        b.x.mul_(2)
        y = self.conv(b.x)
        b.feats.append(y)
        return self.bn(y)


def test_example_inputs_pytree_cannot_flatten_are_copied_too():
    model = _setup(TakesAnObject().eval())
    batch = Batch(_x(2, 3, 6, 6))
    before = batch.x.clone()
    folded, report = bnfold.fold(model, batch, return_report=True)
    assert batch.n == 0 and batch.feats == [] and torch.equal(batch.x, before)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER  # y is kept in the argument
    with torch.no_grad():
        want, got = model(Batch(before.clone())), folded(Batch(before.clone()))
    assert torch.allclose(want, got, rtol=1e-5, atol=1e-6)


class RenormalisesInPlace(ConvBN):
    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        self.step.add_(1)
        with torch.no_grad():
            self.conv2.weight.div_(self.conv2.weight.norm())
        return self.conv2(self.bn(self.conv(x)))


@pytest.mark.parametrize("call", ["fold", "analyze", "verify"])
def test_parameters_forward_writes_are_put_back(call):
    model = _setup(RenormalisesInPlace().eval())
    x = _x(2, 3, 6, 6)
    folded = bnfold.fold(copy.deepcopy(model), (x,)) if call == "verify" else None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if call == "verify":
        bnfold.verify(model, folded, (x,))
    else:
        getattr(bnfold, call)(model, (x,))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert changed == []


class HoldsALock(ConvBN):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()  # deepcopy refuses it


def test_a_model_that_cannot_be_copied_still_folds_in_place():
    model = _setup(HoldsALock().eval())
    reference = _setup(ConvBN().eval())
    reference.load_state_dict(model.state_dict())
    x = _x(2, 3, 6, 6)
    report = bnfold.analyze(model, (x,))
    assert report.entry("bn").action == "folded"
    folded = bnfold.fold(model, (x,), inplace=True)
    _close(reference, folded, x)
    with pytest.raises(bnfold.UnsupportedModelError, match="inplace=True"):
        bnfold.fold(_setup(HoldsALock().eval()), (x,))


class ManyPairsOneLook(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(n))
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(n))

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = bn(conv(x))
        return x * 2 if isinstance(self.bns[0], nn.BatchNorm2d) else x


def test_one_bad_fold_among_many_is_found_by_halving(monkeypatch):
    from bnfold.torch.eager import module as torch_module

    model = _setup(ManyPairsOneLook(32).eval())
    checks = 0
    plain = torch_module._structure_problem

    def counting(*args):
        nonlocal checks
        checks += 1
        return plain(*args)

    monkeypatch.setattr(torch_module, "_structure_problem", counting)
    x = _x(2, 4, 5, 5)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert [e.bn for e in report.skipped] == ["bns.0"]
    assert len(report.folded) == 31
    assert checks <= 2 * 5 + 3, checks  # one per fold would be 33
    _close(model, folded, x)


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
    model = _setup(UsesLayersOnlyWhenRun(how).eval())
    x = _x(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").action == "skipped"
    assert "outside their layer's call" in report.entry("bn").reason
    _close(model, folded, x)


class WritesThroughOtherNames(ConvBN):
    """Writes a parameter through names other than the usual in-place methods."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.how = how

    def forward(self, x):
        w = self.conv2.weight
        with torch.no_grad():
            if self.how == "aten":
                torch.ops.aten.add_.Tensor(w, 1.0)
            elif self.how == "foreach":
                torch._foreach_mul_([w], 0.9)
            elif self.how == "vector":
                torch.nn.utils.vector_to_parameters(
                    torch.zeros(72), [self.conv2.weight, self.conv2.bias]
                )
            else:
                w.data = w.data * 2
        return self.conv2(self.bn(self.conv(x)))


@pytest.mark.parametrize("how", ["aten", "foreach", "vector", "data"])
def test_parameters_written_through_any_name_are_put_back(how):
    model = _setup(WritesThroughOtherNames(how).eval())
    x = _x(2, 3, 6, 6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (bnfold.fold, bnfold.analyze):
        try:
            call(model, (x,))
        except bnfold.TracingError:  # neither torch.fx nor torch.export follows every write
            pass
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
