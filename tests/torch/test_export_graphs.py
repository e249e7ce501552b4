"""Graph shapes: chained BatchNorms (folded in one call), matmul with a constant, a transposed or a
batched weight, BatchNorms in a ``no_grad`` region or a ``cond`` branch, layout ops between a
Linear and BatchNorm1d (folded when the channels arrive on axis 1), and hand-built ATen graphs
(keyword arguments; no shape metadata, where rank-dependent folds are refused).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import bnfold
from bnfold.core import rules
from tests.helpers.check import REL_TOL, assert_close, rel_err, torch_outputs
from tests.helpers.forms import export, program_forms
from tests.helpers.forms import graph_bn_count as n_bn
from tests.helpers.support import randn, randomize_all

aten = torch.ops.aten


@pytest.mark.parametrize("decomposed", [False, True], ids=["exported", "decomposed"])
def test_chained_batchnorms_fold_in_one_call(decomposed):
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, bias=False)
            self.b1, self.b2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.b2(self.b1(self.c(x)))

    model = randomize_all(Chain(), 6)
    ep = export(model, (randn(2, 3, 8, 8),), decomposed)
    folded, report = bnfold.fold(ep, return_report=True)
    assert [e.bn for e in report.folded] == ["b1", "b2"] and n_bn(folded) == 0
    assert bnfold.analyze(ep).to_list() == report.to_list()
    assert not any(k.startswith(("b1.", "b2.")) for k in folded.state_dict)
    assert_close(model, folded, randn(2, 3, 8, 8, seed=7))
    folded_gm, report_gm = bnfold.fold(ep.module(), return_report=True)
    assert [e.bn for e in report_gm.folded] == ["b1", "b2"] and n_bn(folded_gm) == 0
    assert_close(model, folded_gm, randn(2, 3, 8, 8, seed=7))


def test_matmul_with_a_constant_weight_folds_as_exported():
    class MatMul(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.randn(4, 6))
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(x @ self.W)

    model = randomize_all(MatMul(), 7)
    x = torch.randn(5, 4)
    for decomposed in (False, True):
        folded, report = bnfold.fold(export(model, (x,), decomposed), return_report=True)
        assert report.entry("bn").folded and n_bn(folded) == 0
        with torch.no_grad():
            assert rel_err([model(x)], [folded.module()(x)]) <= REL_TOL


def test_batched_matmul_is_not_folded():
    class Batched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.randn(4, 6))
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(x @ self.W)  # (N, 3, 4) @ (4, 6): channels on the last axis

    model = randomize_all(Batched(), 8)
    x = torch.randn(2, 3, 4)
    folded, report = bnfold.fold(export(model, (x,)), return_report=True)
    assert not report.entry("bn").folded
    with torch.no_grad():
        torch.testing.assert_close(folded.module()(x), model(x), rtol=0, atol=0)


def test_batchnorm_in_a_no_grad_region_is_reported_with_a_way_out():
    class NoGrad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            with torch.no_grad():
                y = self.b(self.c(x))
            return y.relu()

    model = randomize_all(NoGrad(), 9)
    ep = export(model, (randn(2, 3, 8, 8),))
    (entry,) = bnfold.analyze(ep).entries
    assert not entry.folded and "run_decompositions" in entry.reason
    folded, report = bnfold.fold(ep.run_decompositions(), return_report=True)
    assert [e.action for e in report] == ["folded"], report  # (named after its node there)
    assert n_bn(folded) == 0
    assert_close(model, folded, randn(2, 3, 8, 8, seed=1))


def test_batchnorm_in_a_cond_branch_is_kept_and_the_rest_folds():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.fc, self.bn_t, self.bn_f = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)

        def forward(self, x):
            z = x.mean((2, 3))
            out = torch.cond(
                z.sum() > 0, lambda v: self.bn_t(self.fc(v)), lambda v: self.bn_f(self.fc(v)), (z,)
            )
            return self.bn(self.c(x)), out

    model = randomize_all(Branchy(), 10)
    ep = export(model, (randn(2, 3, 8, 8),))
    folded, report = bnfold.fold(ep, return_report=True)
    assert report.entry("bn").folded
    assert len(report.skipped) == 2 and all("subgraph" in e.reason for e in report.skipped)
    for x in (
        randn(2, 3, 8, 8, seed=11),
        -randn(2, 3, 8, 8, seed=11).abs(),
        randn(2, 3, 8, 8, seed=11).abs(),
    ):  # both branches
        with torch.no_grad():
            for a, b in zip(model(x), folded.module()(x), strict=True):
                assert rel_err([a], [b]) <= REL_TOL


class KeywordArguments(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4))
        self.g, self.bb = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
        self.register_buffer("m", torch.randn(5))
        self.register_buffer("v", torch.rand(5) + 0.5)

    def bn(self, y):
        return aten.batch_norm.default(y, self.g, self.bb, self.m, self.v, False, 0.1, 1e-5, False)

    def forward(self, x):
        a = aten.linear.default(x, self.w, bias=None)
        b = aten.mm.default(x, aten.transpose.int(self.w, dim0=0, dim1=1))
        c = aten.mm.default(x, aten.permute.default(self.w, dims=[1, 0]))
        d = aten.mm.default(self=x, mat2=aten.t.default(self.w))  # no bias: becomes addmm
        return self.bn(a), self.bn(b), self.bn(c), self.bn(d)


def test_keyword_arguments_in_hand_built_graphs():
    model = KeywordArguments().eval()
    x = torch.randn(3, 4)
    gm = torch.fx.symbolic_trace(model)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
    folded, report = bnfold.fold(gm, return_report=True)
    assert len(report.folded) == 4 and n_bn(folded) == 0
    with torch.no_grad():
        for a, b in zip(model(x), folded(x), strict=True):
            assert rel_err([a], [b]) <= REL_TOL


def test_graph_without_shape_metadata_refuses_rank_dependent_folds():
    model = KeywordArguments().eval()
    gm = torch.fx.symbolic_trace(model)  # no meta["val"]
    report = bnfold.analyze(gm)
    linear = [e for e in report.entries if e.target_type == "aten.linear"]
    assert linear and linear[0].rule == rules.CHANNEL_AXIS
    assert "node.meta['val']" in linear[0].reason


class TransposedWeights(nn.Module):
    """``x @ w.mT`` and friends: the weight stored (out, in), transposed in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = (nn.Parameter(torch.randn(6, 4)) for _ in range(3))
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm1d(6) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.bn1(x @ self.w1.mT), self.bn2(x @ self.w2.T), self.bn3(x @ self.w3.t())


def test_matmul_by_a_transposed_weight_folds_as_exported():
    model = randomize_all(TransposedWeights(), 49)
    x = (torch.randn(5, 4),)
    expected = torch_outputs(model, x)
    for form, target in program_forms(model, x):
        folded, report = bnfold.fold(target, return_report=True)
        assert len(report.folded) == 3 and n_bn(folded) == 0, (form, report)
        assert rel_err(expected, torch_outputs(folded, x)) <= REL_TOL, form


class LayoutBetween(nn.Module):
    """Layout ops between producer and BatchNorm: Conformer-style Linear on (B, L, C), then
    (B, C, L) for BatchNorm1d; and cases where the channels do not arrive on axis 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_t, self.bn_t = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.fc_p, self.bn_p = nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6)
        self.fc_c, self.bn_c = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.conv, self.bn_conv = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
        self.fc_wrong, self.bn_wrong = nn.Linear(4, 7), nn.BatchNorm1d(3)
        self.fc_used, self.bn_used = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, seq: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = self.bn_t(self.fc_t(seq).transpose(1, 2))
        p = self.bn_p(self.fc_p(seq).permute(0, 2, 1))
        c = self.bn_c(self.fc_c(seq).transpose(1, 2).contiguous())
        conv = self.bn_conv(self.conv(img).transpose(2, 3))  # channels stay on axis 1
        wrong = self.bn_wrong(self.fc_wrong(seq).permute(1, 0, 2))  # (L, B, C): B on axis 1
        used = self.fc_used(seq).transpose(1, 2)
        return t, p, c, conv, wrong, self.bn_used(used) + used


def test_linear_then_transpose_then_batchnorm1d_folds():
    model = randomize_all(LayoutBetween(), 50)
    args = (torch.randn(3, 2, 4), randn(2, 3, 8, 8, seed=51))
    x = (
        torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(52)),
        randn(2, 3, 8, 8, seed=53),
    )
    expected = torch_outputs(model, x)
    for form, target in program_forms(model, args):
        folded, report = bnfold.fold(target, return_report=True)
        for name in ("bn_t", "bn_p", "bn_c", "bn_conv"):
            assert report.entry(name).folded, (form, report.entry(name))
        assert report.entry("bn_wrong").rule == rules.CHANNEL_AXIS, form
        assert "axis 2" in report.entry("bn_wrong").reason, report.entry("bn_wrong")
        assert report.entry("bn_used").rule == rules.SINGLE_CONSUMER, form
        assert n_bn(folded) == 2
        assert rel_err(expected, torch_outputs(folded, x)) <= REL_TOL, form
