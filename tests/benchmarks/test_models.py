"""The benchmark networks and harness are what the benchmark tables say they are.

Each network gets non-trivial statistics, folds exactly (only DenseNet's pre-activation
BatchNorms stay, for want of a producer), and its no-BatchNorm floor computes bit for bit what
the folded model computes: so a latency difference between the two is structure, not numbers.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import bnfold
from benchmarks import common, models, scaling
from benchmarks.fold_torch import check, floor_fold

EXPECTED_FOLDED = {
    "resnet18": (20, 20),
    "resnet50": (53, 53),
    "mobilenet_v2": (52, 52),
    "vgg11_bn": (8, 8),
    "densenet121": (59, 121),
}


@pytest.mark.parametrize("name", list(models.MODELS))
def test_benchmark_network_folds_exactly_and_matches_its_floor(name):
    net = models.build(name)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(float(bn.running_var.std()) > 0.1 for bn in bns)  # not the identity
    folded, report = bnfold.fold(net, return_report=True)
    folded_count = sum(e.action == "folded" for e in report.entries)
    assert (folded_count, len(report.entries)) == EXPECTED_FOLDED[name]
    kept = {e.rule for e in report.entries if e.action != "folded"}
    assert kept <= {"no-producer"}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = net(x), folded(x)
        floor_out = models.floor_like(name, folded)(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert torch.equal(floor_out, got)
    assert check(net, folded)["bn_calls"] == len(bns) - folded_count


def test_floor_fold_scales_each_folded_weight_once():
    net = models.build("resnet18")
    before = net.stem[0].weight.detach().clone()
    bn = net.stem[1]
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    floor_fold(net)
    assert torch.allclose(net.stem[0].weight, before * s.reshape(-1, 1, 1, 1))


def test_onnx_scaling_chain_folds_completely():
    proto = scaling.onnx_chain(4)
    folded = bnfold.fold(proto)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"] * 4
    x = np.random.default_rng(0).standard_normal((1, scaling.CHANNELS, 8, 8), dtype=np.float32)
    outs = []
    for m in (proto, folded):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {"input": x})[0])
    assert np.abs(outs[0] - outs[1]).max() <= 1e-5 * np.abs(outs[0]).max()


def test_measure_reports_time_and_memory():
    result, seconds, peak = common.measure(lambda: np.ones(8 << 20))  # 64 MiB
    assert result.shape == (8 << 20,) and seconds > 0
    if peak is not None:
        assert peak >= 60


def test_table_is_markdown_with_right_aligned_numbers():
    text = common.table(["a", "n"], [["x", "1"], ["yy", "10"]], right=[1])
    assert text.splitlines() == ["| a  |  n |", "| -- | -: |", "| x  |  1 |", "| yy | 10 |"]
