"""Code that runs around a layer's forward, where torch.fx does not look: ``__call__`` or
``_call_impl`` overridden on a class or set on an instance, ``forward`` set on an instance,
forward hooks and pre-hooks on the root, and global module hooks. Such a layer or model keeps its
BatchNorms (``standard-forward``, with the reason), and the folded model computes what the
original computes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnfold
from bnfold.core import rules
from tests.helpers.check import assert_close
from tests.helpers.support import randn, randomize_all
from tests.helpers.torch_models import ConvBN


def test_a_forward_set_on_a_batchnorm_instance_is_not_trusted():
    model = randomize_all(ConvBN())
    bn = model.bn
    bn.forward = lambda x: torch.relu(nn.BatchNorm2d.forward(bn, x))
    folded, report = bnfold.fold(model, (randn(2, 3, 6, 6),), return_report=True)
    assert report.entry("bn").rule == rules.STANDARD_FORWARD
    assert "instance" in report.entry("bn").reason
    assert_close(model, folded, randn(2, 3, 6, 6, seed=1))


def test_a_forward_set_on_the_model_instance_is_a_clear_error():
    model = randomize_all(ConvBN())

    def residual_forward(x):
        y = model.conv(x)
        return model.bn(y) + y

    model.forward = residual_forward
    with pytest.raises(bnfold.UnsupportedModelError, match="replaced on the instance"):
        bnfold.fold(model)


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
    model = randomize_all(base.eval())
    reference = copy.deepcopy(model)
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    assert report.entry("bn").rule == rules.STANDARD_FORWARD
    assert "runs around its forward()" in report.entry("bn").reason
    assert_close(reference, folded, x)


class RootHookNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))


def test_forward_hooks_on_the_root_keep_every_batchnorm():
    model = randomize_all(RootHookNet().eval())
    model.register_forward_hook(lambda mod, _args, out: out + mod[0].weight.sum())
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("1").rule == rules.STANDARD_FORWARD
    assert "the model" in report.entry("1").reason
    assert_close(model, folded, x)


def test_a_root_hook_reading_statistics_does_not_break_the_folded_model():
    model = randomize_all(RootHookNet().eval())
    model.register_forward_pre_hook(lambda mod, args: (args[0] + mod[1].running_var.mean(),))
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    entry = report.entry("1")
    assert entry.rule == rules.STANDARD_FORWARD and "forward hooks" in entry.reason, entry
    assert type(folded[1]) is nn.BatchNorm2d  # still there for the hook to read
    assert_close(model, folded, x)


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_global_module_hooks_keep_every_batchnorm(kind):
    from torch.nn.modules import module as torch_module

    def hook(mod, _args, out=None):
        if kind == "pre":
            return None
        return out * 2 if isinstance(mod, nn.BatchNorm2d) else out

    def pre_hook(mod, args):
        return (args[0] * 3,) if isinstance(mod, nn.Conv2d) else None

    model = randomize_all(ConvBN().eval())
    x = randn(2, 3, 6, 6)
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
        assert_close(model, folded, x)
    finally:
        handle.remove()
