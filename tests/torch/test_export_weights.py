"""Weights with more than one reader or an unusual storage: a weight that is also the activation
(``mm(w, w)``: folded into a copy), a parameter of a module the graph also runs (a mixed graph),
a buffer viewing a parameter in a loaded program, weights stored expanded (stride 0: folded
within a memory budget, refused beyond it without allocating), and tensors a GraphModule copy
must keep as they are (conjugate views, tensor subclasses, quantized tensors).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import bnfold
from bnfold.core import rules
from tests.helpers.check import REL_TOL, assert_close, check_report, rel_err, torch_outputs
from tests.helpers.forms import export, program_forms
from tests.helpers.support import randn, randomize_all

aten = torch.ops.aten


class ReadOnlyAlias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.register_buffer("w_copy", self.c1.weight.detach())  # same memory, only read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.c1(x)) + self.w_copy.sum()


def test_loaded_program_with_a_buffer_viewing_a_parameter_folds(tmp_path):
    """torch.export.load rebuilds such a buffer as a non-leaf view of the parameter, which
    copy.deepcopy refuses."""
    model = randomize_all(ReadOnlyAlias(), 23)
    path = tmp_path / "alias.pt2"
    torch.export.save(export(model, (randn(2, 3, 8, 8),)), str(path))
    loaded = torch.export.load(str(path))
    x = randn(2, 3, 8, 8, seed=24)
    for target in (loaded, loaded.module()):
        folded, report = bnfold.fold(target, return_report=True)
        check_report(report, {"bn1": ("folded", "c1")})
        assert_close(model, folded, x)


def test_graph_module_copy_keeps_conjugate_views_subclasses_and_quantized_tensors():
    class Tagged(torch.Tensor):
        pass

    class TaggedParam(nn.Parameter):
        pass

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.register_buffer("z", torch.randn(4, dtype=torch.complex64).conj())

        def forward(self, x):
            return self.b(self.c(x)), self.z * 2

    model = randomize_all(Odd(), 29)
    gm = export(model, (randn(2, 3, 8, 8),)).module()
    gm.tagged = TaggedParam(torch.randn(3))
    gm.register_buffer("tagged_buffer", torch.randn(3).as_subclass(Tagged))
    gm.register_buffer("q", torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8))
    folded, report = bnfold.fold(gm, return_report=True)
    check_report(report, {"b": ("folded", "c")})
    assert type(folded.tagged) is TaggedParam and type(folded.tagged_buffer) is Tagged
    assert folded.q.is_quantized and torch.equal(folded.q.dequantize(), gm.q.dequantize())
    assert folded.tagged is not gm.tagged and folded.q is not gm.q
    with torch.no_grad():
        (y0, z0), (y1, z1) = model(randn(2, 3, 8, 8, seed=30)), folded(randn(2, 3, 8, 8, seed=30))
    assert rel_err([y0], [y1]) <= REL_TOL and torch.equal(z0, z1)


class SelfProduct(nn.Module):
    """The weight is also the activation."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 5))
        self.bn = nn.BatchNorm1d(5)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        y = {"mm": torch.mm, "linear": F.linear, "matmul": torch.matmul}[self.how](w, w)
        return self.bn(y) + x


@pytest.mark.parametrize("how", ["mm", "linear", "matmul"])
def test_weight_that_is_also_the_activation_folds_into_a_copy(how):
    """mm(w, w): the single-use check counted the node once and folded the activation too
    (rel 0.13 to 1.6)."""
    model = randomize_all(SelfProduct(how), 42)
    x = (torch.randn(5, 5),)
    expected = torch_outputs(model, x)
    for form, target in program_forms(model, x):
        before = dict(target.state_dict()) if isinstance(target, nn.Module) else target.state_dict
        kept = {k: v.detach().clone() for k, v in before.items()}
        folded, report = bnfold.fold(target, return_report=True)
        assert report.entry("bn").folded, (form, report.entry("bn"))
        assert rel_err(expected, torch_outputs(folded, x)) <= REL_TOL, form
        for k, v in kept.items():  # the shared weight is never changed
            torch.testing.assert_close(before[k], v, rtol=0, atol=0)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def mixed_graph(reader: str) -> torch.fx.GraphModule:
    """``block.conv.weight`` read by ``get_attr`` into aten.conv2d -> aten.batch_norm, while
    ``reader`` runs the same conv (or its parent) as a module."""
    torch.manual_seed(43)
    root = nn.Module()
    root.block = Block()
    bn = randomize_all(nn.BatchNorm2d(4), 44)
    root.g, root.bb = bn.weight, bn.bias
    root.register_buffer("m", bn.running_mean)
    root.register_buffer("v", bn.running_var)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    w, b = g.get_attr("block.conv.weight"), g.get_attr("block.conv.bias")
    y = g.call_function(aten.conv2d.default, (x, w, b))
    stats = [g.get_attr(n) for n in ("g", "bb", "m", "v")]
    z = g.call_function(aten.batch_norm.default, (y, *stats, False, 0.1, 1e-5, False))
    if reader == "call_module":
        other = g.call_module("block.conv", (x,))
    elif reader == "get_attr-module":
        other = g.call_method("forward", (g.get_attr("block.conv"), x))
    else:  # the parent module, which runs the conv inside
        other = g.call_module("block", (x,))
    g.output((z, other))
    gm = torch.fx.GraphModule(root, g)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(randn(2, 3, 8, 8))
    return gm.eval()


@pytest.mark.parametrize("reader", ["call_module", "get_attr-module", "parent-call_module"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_parameter_of_a_module_the_graph_also_runs_is_shared(reader, inplace):
    """ModuleStore.replace rebound conv.weight under the module call (rel 0.36)."""
    gm = mixed_graph(reader)
    x = (randn(2, 3, 8, 8, seed=45),)
    expected = torch_outputs(gm, x)
    folded, report = bnfold.fold(gm, return_report=True, inplace=inplace)
    (entry,) = report.entries
    assert entry.folded, entry
    assert rel_err(expected, torch_outputs(folded, x)) <= REL_TOL
    assert folded.get_submodule("block.conv").weight is not None  # the call still has it


class ExpandedWeight(nn.Module):
    """A weight stored as one value per input position, repeated over the output channels."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 3, 3, 3).expand(out, 3, 3, 3))
        self.bn = nn.BatchNorm2d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv2d(x, self.w))


def test_expanded_weight_folds_within_the_budget_and_is_refused_beyond(monkeypatch):
    from bnfold.torch.aten import adapter as aten_adapter

    model = randomize_all(ExpandedWeight(8), 46)
    assert model.w.stride()[0] == 0
    x = (randn(2, 3, 8, 8, seed=47),)
    expected = torch_outputs(model, x)
    forms = program_forms(model, (randn(2, 3, 8, 8),))
    for form, target in forms:  # 1 KiB of new values: well within the 64 MiB floor
        folded, report = bnfold.fold(target, return_report=True)
        assert report.entry("bn").folded, form
        assert rel_err(expected, torch_outputs(folded, x)) <= REL_TOL, form
    monkeypatch.setattr(aten_adapter, "MATERIALISE_FLOOR_BYTES", 0)
    monkeypatch.setattr(aten_adapter, "MATERIALISE_FACTOR", 1)
    for form, target in forms:  # now more than the program stores: refused
        folded, report = bnfold.fold(target, return_report=True)
        entry = report.entry("bn")
        assert entry.rule == rules.VALID_VALUES and "expanded" in entry.reason, (form, entry)
        assert rel_err(expected, torch_outputs(folded, x)) == 0, form


def test_huge_expanded_weight_of_a_small_file_is_refused_without_allocating(monkeypatch, tmp_path):
    """torch.export.save writes a 16384 x 16384 expanded weight as 4 bytes; folding it would
    allocate 1 GiB."""
    from bnfold.torch.aten import adapter as aten_adapter

    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 1).expand(16384, 16384))
            self.bn = nn.BatchNorm1d(16384)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(F.linear(x, self.w))

    path = tmp_path / "big.pt2"
    torch.export.save(export(Big().eval(), (torch.randn(2, 16384),)), str(path))
    assert path.stat().st_size < 2**20
    loaded = torch.export.load(str(path))
    assert loaded.state_dict["w"].untyped_storage().nbytes() == 4

    def no_dense_weights(*args, **kwargs):
        raise AssertionError("the fold computed a dense weight")

    monkeypatch.setattr(aten_adapter, "fold_affine_into_producer", no_dense_weights)
    for target in (loaded, loaded.module()):
        for call in (bnfold.analyze, bnfold.fold):
            result = call(target) if call is bnfold.analyze else call(target, return_report=True)
            report = result if call is bnfold.analyze else result[1]
            entry = report.entry("bn")
            assert entry.rule == rules.VALID_VALUES and "1024.1 MiB" in entry.reason, entry


class PermutedGroupedConvT(nn.Module):
    """A grouped ConvTranspose whose weight is stored ``(kH, out/g, in, kW)`` and permuted into
    place: axis 1 (out/groups) stays where it is, but the axis carrying the group blocks moves."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 4, 4))
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(F.conv_transpose2d(x, self.w.permute(2, 1, 0, 3), groups=2))


def test_grouped_conv_transpose_weight_whose_group_axis_moved_is_refused():
    """Folding scaled the stored tensor as if its group blocks were on axis 0: a silent wrong
    result (relative error 1.0). Only a permutation keeping axes 0 and 1 in place is folded."""
    model = randomize_all(PermutedGroupedConvT(), seed=61)
    x = (randn(2, 4, 5, 5, seed=62),)
    expected = torch_outputs(model, x)
    for form, target in program_forms(model, x):
        folded, report = bnfold.fold(target, return_report=True)
        entry = report.entry("bn")
        assert entry.rule == rules.VALID_VALUES and "permute" in entry.reason, (form, entry)
        assert rel_err(expected, torch_outputs(folded, x)) <= REL_TOL, form
        assert bnfold.analyze(target).entries == report.entries, form


class SharedPermutedWeight(nn.Module):
    """One weight read by two convs through a permute and a transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn1(F.conv2d(x, self.w.permute(1, 0, 2, 3)))
        return a + self.bn2(F.conv2d(x, self.w.transpose(0, 1)))


@pytest.mark.parametrize("inplace", [False, True])
def test_shared_weight_reached_through_keyword_operands_folds_both(inplace):
    """A hand-built graph giving permute/transpose their operands by keyword: rebuilding the
    view chain on a new weight read ``args[0]`` and raised IndexError mid-rewrite."""
    model = randomize_all(SharedPermutedWeight(), seed=63)
    x = (randn(2, 4, 6, 6, seed=64),)
    expected = torch_outputs(model, x)
    gm = export(model, x).module()
    views = (torch.ops.aten.permute.default, torch.ops.aten.transpose.int)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in views:
            given = zip(node.target._schema.arguments, node.args, strict=False)
            node.kwargs, node.args = {**{a.name: v for a, v in given}, **node.kwargs}, ()
    gm.recompile()
    assert rel_err(expected, torch_outputs(gm, x)) <= REL_TOL
    report = bnfold.analyze(gm)
    folded, fold_report = bnfold.fold(gm, inplace=inplace, return_report=True)
    assert fold_report.entries == report.entries
    check_report(fold_report, {"bn1": ("folded", "conv2d"), "bn2": ("folded", "conv2d_1")})
    assert rel_err(expected, torch_outputs(folded, x)) <= REL_TOL


def test_graph_module_copy_keeps_non_persistent_buffers_out_of_state_dict():
    # GraphModule's deepcopy forgets which buffers are not persistent; the folded copy must
    # not grow state_dict entries the input does not have
    class WithScratch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.register_buffer("offset", torch.full((1, 4, 1, 1), 0.5), persistent=False)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x))) + self.offset  # relu: the add stays

    model = randomize_all(WithScratch(), seed=90)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(91))
    gm = torch.export.export(model, (x,)).module()
    assert "offset" not in gm.state_dict()
    folded = bnfold.fold(gm)
    assert "offset" not in folded.state_dict()
    assert "offset" in dict(folded.named_buffers())
    assert torch.allclose(folded(x), gm(x), rtol=1e-5, atol=1e-5)
