"""forward that looks at the layers instead of only calling them: reads a BatchNorm's buffers,
dtype, shape or affine flag, tests whether a producer has a bias, reaches parameters through
``_parameters``, ``parameters()`` or ``named_buffers()``, or checks its input through the
BatchNorm. A fold that would change what forward sees is refused with the reason; one that would
not (reading only a weight's shape) still happens. Among many folds, the one that breaks such a
forward is found by halving.
"""

from __future__ import annotations

import copy

import pytest
from torch import nn

import bnfold
from bnfold.core import rules
from tests.helpers.check import assert_close
from tests.helpers.support import randn, randomize_all
from tests.helpers.torch_models import ConvBN


class ReadsStatistics(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)

    def forward(self, x):
        return self.bn(self.conv(x)) - self.bn.running_mean.view(1, -1, 1, 1)


def test_forward_reading_batchnorm_buffers_keeps_the_batchnorm():
    model = randomize_all(ReadsStatistics())
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("bn").rule == rules.SINGLE_CONSUMER
    assert "running_mean" in report.entry("bn").reason
    assert_close(model, folded, randn(2, 3, 6, 6))


class ReadsWeightShape(ConvBN):
    def __init__(self) -> None:
        super().__init__(padding=0)

    def forward(self, x):
        return self.bn(self.conv(x)).flatten(1)[:, : self.conv.weight.shape[0]]


def test_reading_only_the_weight_shape_does_not_block_the_fold():
    model = randomize_all(ReadsWeightShape())
    folded, report = bnfold.fold(model, return_report=True)
    assert report.entry("bn").folded
    assert_close(model, folded, randn(2, 3, 6, 6))


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
    model = randomize_all(ReadsParametersDirectly(how))
    x = randn(2, 3, 6, 6)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert not report.entry("bn").folded
    assert_close(model, folded, x)


class TestsForBias(ConvBN):
    __test__ = False  # a model, not a test class

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
    model = randomize_all(cls().eval())
    reference = copy.deepcopy(model)
    x = randn(2, 3, 6, 6)
    report = bnfold.analyze(model, (x,))
    folded, fold_report = bnfold.fold(model, (x,), inplace=inplace, return_report=True)
    assert fold_report == report
    entry = next(e for e in report.entries)
    assert entry.action == "skipped", entry
    # the structure check, or (reads of a BatchNorm's tensors) the run on the example inputs
    assert "looks at the layers" in entry.reason or "outside their layer's call" in entry.reason
    assert_close(reference, folded, x)
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
    model = randomize_all(ShapeControlledTestsForBias().eval())
    x = randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="torch.export"):
        folded, report = bnfold.fold(model, (x,), return_report=True)
    assert report.entry("bn").rule == rules.STANDARD_FORWARD
    assert_close(model, folded, x)


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

    model = randomize_all(ManyPairsOneLook(32).eval())
    checks = 0
    plain = torch_module._structure_problem

    def counting(*args):
        nonlocal checks
        checks += 1
        return plain(*args)

    monkeypatch.setattr(torch_module, "_structure_problem", counting)
    x = randn(2, 4, 5, 5)
    folded, report = bnfold.fold(model, (x,), return_report=True)
    assert [e.bn for e in report.skipped] == ["bns.0"]
    assert len(report.folded) == 31
    assert checks <= 2 * 5 + 3, checks  # one per fold would be 33
    assert_close(model, folded, x)
