"""Models the eager frontend refuses with a clear error rather than a wrong fold: TorchScript,
uninitialised lazy modules, the meta device, a torch.compile wrapper, containers without
forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold
from tests.helpers.check import assert_close
from tests.helpers.support import randn, randomize_all
from tests.helpers.torch_models import ConvBN


def test_torchscript_is_a_clear_error():
    model = torch.jit.script(randomize_all(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))))
    with pytest.raises(bnfold.UnsupportedModelError, match="TorchScript"):
        bnfold.fold(model)


def test_uninitialised_lazy_module_is_a_clear_error():
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(bnfold.UnsupportedModelError, match="run the model once"):
        bnfold.fold(model)
    model(randn(2, 3, 6, 6))
    randomize_all(model)
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("1").folded and report.entry("1").target == "0", report
    assert_close(model, folded, randn(2, 3, 6, 6, seed=1))


def test_meta_device_model_is_a_clear_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(bnfold.UnsupportedModelError, match="meta device"):
        bnfold.fold(model)


def test_a_torch_compile_wrapper_is_a_clear_error():
    model = torch.compile(randomize_all(ConvBN()))
    with pytest.raises(bnfold.UnsupportedModelError, match="_orig_mod"):
        bnfold.fold(model)


@pytest.mark.parametrize("container", [nn.ModuleList, nn.ModuleDict])
def test_a_container_without_forward_is_a_clear_error(container):
    layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)]
    model = container(
        layers if container is nn.ModuleList else dict(zip("ab", layers, strict=True))
    )
    with pytest.raises(bnfold.UnsupportedModelError, match="has no forward"):
        bnfold.fold(model.eval(), (randn(2, 3, 6, 6),))
