"""State forward changes while it runs: parameters and buffers written in place (through
attributes, ``buffers()``, ATen ops called directly, ``_foreach`` lists,
``vector_to_parameters``, ``.data``), Python attributes and side effects (counters, logs,
lazily created modules, config holders). Tracing a model and checking a fold run forward:
``fold``, ``analyze`` and ``verify`` put every such change back, and a fold the changing state
would make wrong is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnfold
from bnfold.core import rules
from tests.helpers.check import assert_close, check_report
from tests.helpers.support import randn, randomize_all
from tests.helpers.torch_models import ConvBN


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
    model = randomize_all(Counting(reassign))
    model.calls.zero_()
    model.python_calls = 0
    buffer = model.calls
    inputs = (randn(2, 3, 6, 6),) if example else None
    analyzed = bnfold.analyze(model, inputs)
    folded, report = bnfold.fold(model, inputs, return_report=True)
    assert int(model.calls) == 0 and model.python_calls == 0 and model.calls is buffer
    # the Python counter forward changes keeps the fold: later calls could differ
    assert analyzed == report
    entry = report.entry("bn")
    assert entry.rule == rules.SINGLE_CONSUMER and "python_calls" in entry.reason, entry
    with torch.no_grad():
        want, got = model(randn(2, 3, 6, 6, seed=1)), folded(randn(2, 3, 6, 6, seed=1))
    assert float((want - got).abs().max() / want.abs().max()) <= 1e-5


class ClampsWeights(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)

    def forward(self, x):
        with torch.no_grad():
            for p in self.conv.parameters():
                p.clamp_(-0.3, 0.3)
        return self.bn(self.conv(x))


def test_a_forward_that_rewrites_its_weights_is_not_folded():
    model = randomize_all(ClampsWeights())
    x = randn(2, 3, 6, 6)
    with torch.no_grad():
        model(x)  # the weights are clamped from the first call on
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert not report.entry("bn").folded
    assert "in place" in report.entry("bn").reason
    assert_close(model, folded, x)


class TouchesBuffers(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        for b in self.buffers(recurse=False):
            b.add_(1)
        return self.bn(self.conv(x))


def test_buffers_changed_without_attribute_access_are_restored():
    model = randomize_all(TouchesBuffers())
    model.n.zero_()
    folded, report = bnfold.fold(model, (randn(2, 3, 6, 6),), return_report=True)
    assert float(model.n) == 0.0
    check_report(report, {"bn": ("folded", "conv")})  # a counter forward never reads
    assert_close(model, folded, randn(2, 3, 6, 6, seed=1))


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
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), cls(4)))
    before = dict(vars(model[1]))
    folded, report = bnfold.fold(model, (randn(2, 3, 6, 6),), return_report=True)
    assert report.entry("1").rule == rules.STANDARD_FORWARD
    assert vars(model[1]).keys() == before.keys()
    assert not getattr(model[1], "log", [])
    assert "act" not in model[1]._modules


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
    model = randomize_all(WithConfig())
    x = randn(2, 3, 6, 6)
    analyzed = bnfold.analyze(model, (x,))
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert analyzed == report
    check_report(report, {"bn": ("folded", "conv")})
    assert dict(model.cfg) == {"width": 8, "name": "net"}
    assert float(model.calls) == 0 and model.history[0].tolist() == [0.0, 0.0]
    assert_close(model, folded, x)


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
    model = randomize_all(cls().eval())
    with torch.no_grad():
        model.bn.running_var.uniform_(1e-3, 1e-2)  # eps 0.1 against 1e-5 matters here
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").action == "skipped", report.entry("bn")
    for _ in range(3):  # the model's own state moves on with every call
        with torch.no_grad():
            want, got = model(x), folded(x)
        assert float((want - got).abs().max() / want.abs().max()) <= 1e-5


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
    model = randomize_all(RenormalisesInPlace().eval())
    x = randn(2, 3, 6, 6)
    folded = bnfold.fold(copy.deepcopy(model), (x,)) if call == "verify" else None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if call == "verify":
        bnfold.verify(model, folded, (x,))
    else:
        getattr(bnfold, call)(model, (x,))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert changed == []


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
    model = randomize_all(WritesThroughOtherNames(how).eval())
    x = randn(2, 3, 6, 6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (bnfold.fold, bnfold.analyze):
        try:
            call(model, (x,))
        except bnfold.TracingError:  # neither torch.fx nor torch.export follows every write
            pass
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
