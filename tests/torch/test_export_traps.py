"""Graph-form traps found by trying to break the torch.export frontend, pinned as regressions.

Each test builds the smallest program that once folded wrongly, crashed or broke the program,
and checks numbers (non-trivial BatchNorm statistics throughout) and the report.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import bnfold
from bnfold.core import rules
from tests.helpers.support import randomize_all

aten = torch.ops.aten
REL_TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).abs().max() / a64.abs().max())


def x4(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def random_bn(bn: nn.Module, seed: int) -> nn.Module:
    return randomize_all(bn, seed)


def export(
    model: nn.Module, args: tuple, decomposed: bool = False, **kw
) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, args, **kw)
    return ep.run_decompositions() if decomposed else ep


def n_bn(gm_or_ep) -> int:
    graph = gm_or_ep.graph
    return sum(1 for n in graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))


# --------------------------------------------------------------------------------------------
# Writes through views (the graph as exported keeps in-place ops)


class WeightUpdatedThroughView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(4, 3, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(F.conv2d(x, self.w))
        self.w[0].mul_(2.0)  # a stateful update through a select
        return y


class StatisticsUpdatedThroughView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        self.bn.running_mean[0:2].add_(1.0)  # through a slice
        return y


@pytest.mark.parametrize("cls", [WeightUpdatedThroughView, StatisticsUpdatedThroughView])
@pytest.mark.parametrize("as_module", [False, True], ids=["program", "graph-module"])
def test_state_written_through_a_view_is_not_constant(cls, as_module):
    def program():
        torch.manual_seed(0)
        return export(random_bn(cls(), 1), (x4(),))

    original = program().module()
    target = program()
    target = target.module() if as_module else target
    folded, report = bnfold.fold(target, return_report=True)
    assert report.entry("bn").rule == rules.CONSTANT_PARAMS
    run = folded if as_module else folded.module()
    with torch.no_grad():
        for call in range(3):  # the state changes from call to call
            x = x4(call)
            torch.testing.assert_close(run(x), original(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Preserved module call signatures


class ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


class BnOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x)


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = ConvOnly()
        self.bnm = BnOnly()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bnm(self.conv(x)).relu()


@pytest.mark.parametrize("preserved", ["conv", "bnm"])
def test_folds_do_not_cross_a_preserved_module_signature(preserved):
    model = randomize_all(Split(), 2)
    ep = export(model, (x4(),), preserve_module_call_signature=(preserved,))
    folded, report = bnfold.fold(ep, return_report=True)
    (entry,) = report.entries
    assert entry.rule == rules.MODULE_BOUNDARY and preserved in entry.reason
    unflat = torch.export.unflatten(folded)  # still possible, and swapping still means the same
    x = x4(3)
    with torch.no_grad():
        torch.testing.assert_close(unflat(x), model(x), rtol=1e-5, atol=1e-5)
        setattr(unflat, preserved, getattr(model, preserved))
        torch.testing.assert_close(unflat(x), model(x), rtol=1e-5, atol=1e-5)


def test_folds_inside_one_preserved_module_still_happen():
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.b(self.c(x))

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x).relu()

    model = randomize_all(Outer(), 3)
    ep = export(model, (x4(),), preserve_module_call_signature=("inner",))
    folded, report = bnfold.fold(ep, return_report=True)
    assert report.entry("inner.b").folded
    unflat = torch.export.unflatten(folded)
    with torch.no_grad():
        assert rel(model(x4(4)), unflat(x4(4))) <= REL_TOL


# --------------------------------------------------------------------------------------------
# Programs in unusual states


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.c(x)).relu()


def test_program_that_was_unflattened_folds():
    model = randomize_all(ConvBn(), 4)
    ep = export(model, (x4(),))
    torch.export.unflatten(ep)  # caches itself in ep.graph_module.meta
    for target in (ep, ep.module()):
        folded = bnfold.fold(target)
        run = folded.module() if isinstance(folded, torch.export.ExportedProgram) else folded
        with torch.no_grad():
            assert rel(model(x4(5)), run(x4(5))) <= REL_TOL


def test_program_on_the_meta_device_is_a_clear_error():
    with torch.device("meta"):
        model = ConvBn().eval()
    ep = export(model, (torch.randn(2, 3, 8, 8, device="meta"),))
    for call in (lambda: bnfold.analyze(ep), lambda: bnfold.fold(ep)):
        with pytest.raises(bnfold.UnsupportedModelError, match="meta device"):
            call()


def test_in_place_fold_of_ep_module_leaves_the_program_and_model_alone():
    model = randomize_all(ConvBn(), 5)
    ep = export(model, (x4(),))
    x = x4(6)
    with torch.no_grad():
        expected = model(x)
    gm = ep.module()
    assert bnfold.fold(gm, inplace=True) is gm
    with torch.no_grad():
        assert rel(expected, gm(x)) <= REL_TOL
        # ep.module() shares its tensors with ep and model: none of them was written
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(ep.module()(x), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Graph shapes


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
    ep = export(model, (x4(),), decomposed)
    folded, report = bnfold.fold(ep, return_report=True)
    assert [e.bn for e in report.folded] == ["b1", "b2"] and n_bn(folded) == 0
    assert bnfold.analyze(ep).to_list() == report.to_list()
    assert not any(k.startswith(("b1.", "b2.")) for k in folded.state_dict)
    with torch.no_grad():
        assert rel(model(x4(7)), folded.module()(x4(7))) <= REL_TOL
    folded_gm = bnfold.fold(ep.module())
    with torch.no_grad():
        assert rel(model(x4(7)), folded_gm(x4(7))) <= REL_TOL


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
            assert rel(model(x), folded.module()(x)) <= REL_TOL


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
    ep = export(model, (x4(),))
    (entry,) = bnfold.analyze(ep).entries
    assert not entry.folded and "run_decompositions" in entry.reason
    folded = bnfold.fold(ep.run_decompositions())
    with torch.no_grad():
        assert n_bn(folded) == 0 and rel(model(x4(1)), folded.module()(x4(1))) <= REL_TOL


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
    ep = export(model, (x4(),))
    folded, report = bnfold.fold(ep, return_report=True)
    assert report.entry("bn").folded
    assert len(report.skipped) == 2 and all("subgraph" in e.reason for e in report.skipped)
    for x in (x4(11), -x4(11).abs(), x4(11).abs()):  # both branches
        with torch.no_grad():
            for a, b in zip(model(x), folded.module()(x), strict=True):
                assert rel(a, b) <= REL_TOL


# --------------------------------------------------------------------------------------------
# Hand-built ATen graphs (passes, symbolic_trace of ATen calls)


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
            assert rel(a, b) <= REL_TOL


def test_graph_without_shape_metadata_refuses_rank_dependent_folds():
    model = KeywordArguments().eval()
    gm = torch.fx.symbolic_trace(model)  # no meta["val"]
    report = bnfold.analyze(gm)
    linear = [e for e in report.entries if e.target_type == "aten.linear"]
    assert linear and linear[0].rule == rules.CHANNEL_AXIS
    assert "node.meta['val']" in linear[0].reason


# --------------------------------------------------------------------------------------------
# State that shares memory, inputs a program writes, verification


class BufferViewOfWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(8, 3, 3, 3))
        self.register_buffer("v", self.w[0:4])  # a second buffer that is a view of w
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.v.mul_(2.0)  # writes into w
        return self.bn(F.conv2d(x, self.w))


def test_weight_written_through_a_buffer_sharing_its_memory_is_not_folded():
    def program():
        torch.manual_seed(0)
        return export(random_bn(BufferViewOfWeight(), 12), (x4(),))

    original, target = program().module(), program()
    folded, report = bnfold.fold(target, return_report=True)
    assert report.entry("bn").rule == rules.CONSTANT_PARAMS
    run = folded.module()
    with torch.no_grad():
        for call in range(3):
            torch.testing.assert_close(run(x4(call)), original(x4(call)), rtol=0, atol=0)


class WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(0.5).mul_(2.0)
        return self.b(self.c(x))


def test_verification_gives_each_program_its_own_inputs():
    from bnfold.torch import pt2 as torch_pt2

    ep = export(randomize_all(WritesItsInput(), 13), (x4(),))
    folded = bnfold.fold(ep)
    x = x4(14)
    before = x.clone()
    _, max_rel = bnfold.verify(ep, folded, (x,))
    assert max_rel <= REL_TOL and torch.equal(x, before)
    result = torch_pt2.check(ep, folded, seed=1)
    assert result.passed and result.max_rel <= REL_TOL


class CountsAndTrains(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.head = nn.BatchNorm2d(4)  # kept in training mode: updates its statistics
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.head(self.b(self.c(x)))


def test_verification_and_running_the_folded_program_change_no_shared_state():
    from bnfold.torch import pt2 as torch_pt2

    model = randomize_all(CountsAndTrains(), 15)
    model.head.train()
    ep = export(model, (x4(),))
    folded, report = bnfold.fold(ep, return_report=True)
    assert report.entry("b").folded and report.entry("head").rule == rules.INFERENCE_MODE
    state = {k: v.clone() for k, v in ep.state_dict.items()}
    eager = {k: v.clone() for k, v in model.state_dict().items()}
    torch_pt2.check(ep, folded)
    bnfold.verify(ep, folded, (x4(16),))
    with torch.no_grad():
        folded.module()(x4(17))  # the folded program's own state is its own
    for k, v in ep.state_dict.items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, eager[k], rtol=0, atol=0)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.c(x)).argmax(1)  # only a decision comes out


def test_verification_of_programs_with_only_discrete_outputs():
    from bnfold.torch import pt2 as torch_pt2

    ep = export(randomize_all(Classifier(), 18), (x4(),))
    folded = bnfold.fold(ep)
    good = torch_pt2.check(ep, folded)
    assert good.passed and good.discrete_outputs and good.discrete_mismatch <= 0.01
    key = next(k for k in folded.state_dict if k.endswith("weight"))
    folded.state_dict[key] = nn.Parameter(-folded.state_dict[key].detach())  # a wrong fold
    bad = torch_pt2.check(ep, folded)
    assert not bad.passed and bad.discrete_mismatch > 0.1
    assert "integer/bool outputs differ" in bad.summary()


def test_unflattened_module_is_refused_with_what_to_do():
    ep = export(randomize_all(Split(), 19), (x4(),))
    unflat = torch.export.unflatten(ep)
    for call in (lambda: bnfold.analyze(unflat), lambda: bnfold.fold(unflat)):
        with pytest.raises(bnfold.UnsupportedModelError, match="fold the ExportedProgram first"):
            call()


@pytest.mark.parametrize("producers", [5, ["conv", 3], [["conv"]], "nope"])
def test_bad_producers_argument_is_an_invalid_argument(producers):
    ep = export(randomize_all(ConvBn(), 20), (x4(),))
    with pytest.raises(
        bnfold.InvalidArgumentError, match="unknown producer kinds|producers must be"
    ):
        bnfold.fold(ep, producers=producers)


# --------------------------------------------------------------------------------------------
# Memory shared between state, copied with the sharing kept (third review round)


class AliasedWeightBuffer(nn.Module):
    """c1's weight is also a buffer (same memory) that forward scales in place."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.register_buffer("w_alias", self.c1.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.c2(self.bn1(self.c1(x))))
        self.w_alias.mul_(1.5)
        return y


def test_written_state_sharing_memory_keeps_sharing_it_after_the_fold():
    def fresh():
        torch.manual_seed(0)
        return randomize_all(AliasedWeightBuffer(), 21)

    x = x4(22)
    with torch.no_grad():
        eager = fresh()
        reference = [eager(x.clone()) for _ in range(3)]  # the write changes every call
    folded, report = bnfold.fold(export(fresh(), (x,)), return_report=True)
    assert report.entry("bn1").rule == rules.CONSTANT_PARAMS and report.entry("bn2").folded
    sd = folded.state_dict
    assert sd["c1.weight"].untyped_storage().data_ptr() == (
        sd["w_alias"].untyped_storage().data_ptr()
    )
    folded_gm = bnfold.fold(export(fresh(), (x,)).module())
    for run in (folded.module(), folded_gm):
        with torch.no_grad():
            for expected in reference:
                assert rel(expected, run(x.clone())) <= REL_TOL


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
    torch.export.save(export(model, (x4(),)), str(path))
    loaded = torch.export.load(str(path))
    x = x4(24)
    for target in (loaded, loaded.module()):
        folded = bnfold.fold(target)
        run = folded.module() if isinstance(folded, torch.export.ExportedProgram) else folded
        with torch.no_grad():
            assert rel(model(x), run(x)) <= REL_TOL


@pytest.mark.parametrize("op", ["_unsafe_view", "unsafe_split"])
def test_weight_written_through_an_unannotated_view_is_not_folded(op):
    class WritesThroughView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randn(4, 3, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(F.conv2d(x, self.w))
            if op == "_unsafe_view":
                aten._unsafe_view.default(self.w, [4, 27]).mul_(2.0)
            else:
                aten.unsafe_split.Tensor(self.w, 2)[0].mul_(2.0)
            return y

    def program():
        torch.manual_seed(0)
        return export(random_bn(WritesThroughView(), 25), (x4(),))

    original = program().module()
    folded, report = bnfold.fold(program(), return_report=True)
    assert report.entry("bn").rule == rules.CONSTANT_PARAMS
    with torch.no_grad():
        for call in range(3):
            torch.testing.assert_close(
                folded.module()(x4(call)), original(x4(call)), rtol=0, atol=0
            )


def test_program_whose_input_is_called_input_keeps_its_signature():
    """fx renames a copied placeholder called "input" (a builtin); torch matches by name."""
    model = randomize_all(nn.Sequential(ConvOnly(), nn.BatchNorm2d(4), nn.ReLU()), 26)
    ep = export(model, (x4(),), preserve_module_call_signature=("0",))
    folded, report = bnfold.fold(ep, return_report=True)
    assert [p.name for p in folded.graph.nodes if p.op == "placeholder"][-1] == "input"
    again = folded.run_decompositions()
    with torch.no_grad():
        assert rel(model(x4(27)), again.module()(x4(27))) <= REL_TOL


def test_verification_tolerance_covers_complex_outputs():
    from bnfold.torch import pt2 as torch_pt2

    class Spectrum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.fft.rfft2(self.b(self.c(x)))

    ep = export(randomize_all(Spectrum(), 28), (x4(),))
    result = torch_pt2.check(ep, bnfold.fold(ep))
    assert result.tolerance == 1e-4 and result.passed


# --------------------------------------------------------------------------------------------
# Fourth review round: unusual tensors in copies, inputs for --verify, report text


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
    gm = export(model, (x4(),)).module()
    gm.tagged = TaggedParam(torch.randn(3))
    gm.register_buffer("tagged_buffer", torch.randn(3).as_subclass(Tagged))
    gm.register_buffer("q", torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8))
    folded = bnfold.fold(gm)
    assert type(folded.tagged) is TaggedParam and type(folded.tagged_buffer) is Tagged
    assert folded.q.is_quantized and torch.equal(folded.q.dequantize(), gm.q.dequantize())
    assert folded.tagged is not gm.tagged and folded.q is not gm.q
    with torch.no_grad():
        (y0, z0), (y1, z1) = model(x4(30)), folded(x4(30))
    assert rel(y0, y1) <= REL_TOL and torch.equal(z0, z1)


def test_random_inputs_of_a_program_without_examples_vary_8_bit_images():
    from bnfold.torch import pt2 as torch_pt2

    class FromBytes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, img):
            return self.b(self.c(img.float() / 255.0))

    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ep = export(randomize_all(FromBytes(), 31), (img,))
    ep.example_inputs = None
    (sample,), _ = torch_pt2.sample_inputs(ep, seed=3)
    assert sample.dtype == torch.uint8 and sample.unique().numel() > 50
    folded = bnfold.fold(ep)
    assert torch_pt2.check(ep, folded).passed
    key = next(k for k in folded.state_dict if k.endswith("weight"))
    folded.state_dict[key] = nn.Parameter(folded.state_dict[key].detach() * 1.5)
    assert not torch_pt2.check(ep, folded).passed  # a wrong fold is seen


def test_report_escapes_control_characters_in_names():
    model = nn.Sequential()
    model.add_module("conv\nFAKE", nn.Conv2d(3, 4, 3))
    model.add_module("bn\x1bM", nn.BatchNorm2d(4))
    ep = export(randomize_all(model, 32), (x4(),))
    text = str(bnfold.analyze(ep))
    assert "\x1b" not in text and len(text.splitlines()) == 4
    assert "conv\\nFAKE" in text


def test_module_of_a_program_that_computes_nothing_is_a_graph_not_a_training_module():
    # found by the random-network fuzzer: ep.module() is in training mode, and a program with
    # no ATen op was taken for an eager module, which raised TrainingModeError
    class Identity(torch.nn.Module):
        def forward(self, x):
            return (x,)

    ep = torch.export.export(Identity().eval(), (torch.randn(2, 3),))
    gm = ep.module()
    assert gm.training
    folded, report = bnfold.fold(gm, return_report=True)
    assert len(report) == 0
    x = torch.randn(2, 3)
    torch.testing.assert_close(folded(x)[0], x, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Fifth review round: writes into copies, one tensor in two roles, mixed graphs, expanded
# weights, and layout ops between producer and BatchNorm


def program_forms(model: nn.Module, args: tuple) -> list[tuple[str, object]]:
    """The program as exported, decomposed, and the GraphModule of each (``ep.module()``)."""
    exported = export(model, args)
    decomposed = exported.run_decompositions()
    return [
        ("exported", exported),
        ("decomposed", decomposed),
        ("exported-module", exported.module()),
        ("decomposed-module", decomposed.module()),
    ]


def runner(folded):
    return folded.module() if isinstance(folded, torch.export.ExportedProgram) else folded


def outputs(module, args: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*args)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def max_rel(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    return max(rel(a, b) for a, b in zip(expected, actual, strict=True))


class PrunedCopy(nn.Module):
    """Structured pruning in forward: a copy of the weight, zeroed in place."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bn = nn.BatchNorm2d(4)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w.clone()
        if self.how == "slice-assign":
            w[2:4] = 0
        elif self.how == "select-mul":
            w[1].mul_(0.5)
        elif self.how == "view-of-view":
            w.view(4, 27)[:, :5].zero_()
        elif self.how == "transposed-copy":
            w = self.w.transpose(0, 1).clone().transpose(0, 1)
            w[0:2].fill_(0.25)
        return self.bn(F.conv2d(x, w))


@pytest.mark.parametrize("how", ["slice-assign", "select-mul", "view-of-view", "transposed-copy"])
def test_weight_copy_written_in_place_is_not_folded_into(how):
    """Folding rebuilt the clone on the folded weight and lost the write (rel 0.95)."""
    model = randomize_all(PrunedCopy(how), 40)
    x = (x4(41),)
    expected = outputs(model, x)
    for form, target in program_forms(model, (x4(),)):
        folded, report = bnfold.fold(target, return_report=True)
        entry = report.entry("bn")
        # Decomposed, the write becomes slice_scatter & co., which no chain passes through.
        assert entry.rule == rules.CONSTANT_PARAMS, (form, entry)
        assert "written in place" in entry.reason or form.startswith("decomposed"), entry
        assert max_rel(expected, outputs(runner(folded), x)) <= REL_TOL, form


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
    expected = outputs(model, x)
    for form, target in program_forms(model, x):
        before = dict(target.state_dict()) if isinstance(target, nn.Module) else target.state_dict
        kept = {k: v.detach().clone() for k, v in before.items()}
        folded, report = bnfold.fold(target, return_report=True)
        assert report.entry("bn").folded, (form, report.entry("bn"))
        assert max_rel(expected, outputs(runner(folded), x)) <= REL_TOL, form
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
    bn = random_bn(nn.BatchNorm2d(4), 44)
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
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x4())
    return gm.eval()


@pytest.mark.parametrize("reader", ["call_module", "get_attr-module", "parent-call_module"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_parameter_of_a_module_the_graph_also_runs_is_shared(reader, inplace):
    """ModuleStore.replace rebound conv.weight under the module call (rel 0.36)."""
    gm = mixed_graph(reader)
    x = (x4(45),)
    expected = outputs(gm, x)
    folded, report = bnfold.fold(gm, return_report=True, inplace=inplace)
    (entry,) = report.entries
    assert entry.folded, entry
    assert max_rel(expected, outputs(folded, x)) <= REL_TOL
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
    from bnfold.torch import export as torch_export

    model = randomize_all(ExpandedWeight(8), 46)
    assert model.w.stride()[0] == 0
    x = (x4(47),)
    expected = outputs(model, x)
    forms = program_forms(model, (x4(),))
    for form, target in forms:  # 1 KiB of new values: well within the 64 MiB floor
        folded, report = bnfold.fold(target, return_report=True)
        assert report.entry("bn").folded, form
        assert max_rel(expected, outputs(runner(folded), x)) <= REL_TOL, form
    monkeypatch.setattr(torch_export, "MATERIALISE_FLOOR_BYTES", 0)
    monkeypatch.setattr(torch_export, "MATERIALISE_FACTOR", 1)
    for form, target in forms:  # now more than the program stores: refused
        folded, report = bnfold.fold(target, return_report=True)
        entry = report.entry("bn")
        assert entry.rule == rules.VALID_VALUES and "expanded" in entry.reason, (form, entry)
        assert max_rel(expected, outputs(runner(folded), x)) == 0, form


def test_huge_expanded_weight_of_a_small_file_is_refused_without_allocating(monkeypatch, tmp_path):
    """torch.export.save writes a 16384 x 16384 expanded weight as 4 bytes; folding it would
    allocate 1 GiB."""
    from bnfold.torch import export as torch_export

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

    monkeypatch.setattr(torch_export, "fold_affine_into_producer", no_dense_weights)
    for target in (loaded, loaded.module()):
        for call in (bnfold.analyze, bnfold.fold):
            result = call(target) if call is bnfold.analyze else call(target, return_report=True)
            report = result if call is bnfold.analyze else result[1]
            entry = report.entry("bn")
            assert entry.rule == rules.VALID_VALUES and "1024.1 MiB" in entry.reason, entry


class TensorStatistics(nn.Module):
    """BatchNorm statistics made by torch.tensor in forward (lift_fresh_copy in the graph)."""

    def __init__(self, written: bool) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.written = written

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor([0.1, -0.7, 0.3, 1.2])
        var = torch.tensor([0.2, 2.5, 1.1, 0.4])
        if self.written:
            mean[1:3] = 0.5  # not a constant any more
        weight, bias = torch.tensor([1.5, -0.5, 0.8, 2.0]), torch.tensor([0.1, 0.2, -0.3, 0.0])
        return F.batch_norm(self.c(x), mean, var, weight, bias, False, 0.1, 1e-3)


@pytest.mark.parametrize("written", [False, True], ids=["constant", "written"])
def test_statistics_made_by_torch_tensor_in_forward(written):
    model = TensorStatistics(written).eval()
    x = (x4(48),)
    expected = outputs(model, x)
    for form, target in program_forms(model, (x4(),)):
        folded, report = bnfold.fold(target, return_report=True)
        (entry,) = report.entries
        if written:
            assert entry.rule == rules.CONSTANT_PARAMS, (form, entry)
        else:
            assert entry.folded and n_bn(folded) == 0, (form, entry)
        assert max_rel(expected, outputs(runner(folded), x)) <= REL_TOL, form


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
    expected = outputs(model, x)
    for form, target in program_forms(model, x):
        folded, report = bnfold.fold(target, return_report=True)
        assert len(report.folded) == 3 and n_bn(folded) == 0, (form, report)
        assert max_rel(expected, outputs(runner(folded), x)) <= REL_TOL, form


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
    args = (torch.randn(3, 2, 4), x4(51))
    x = (torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(52)), x4(53))
    expected = outputs(model, x)
    for form, target in program_forms(model, args):
        folded, report = bnfold.fold(target, return_report=True)
        for name in ("bn_t", "bn_p", "bn_c", "bn_conv"):
            assert report.entry(name).folded, (form, report.entry(name))
        assert report.entry("bn_wrong").rule == rules.CHANNEL_AXIS, form
        assert "axis 2" in report.entry("bn_wrong").reason, report.entry("bn_wrong")
        assert report.entry("bn_used").rule == rules.SINGLE_CONSUMER, form
        assert n_bn(folded) == 2
        assert max_rel(expected, outputs(runner(folded), x)) <= REL_TOL, form
