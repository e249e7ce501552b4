"""The torch.export frontend: fold BatchNorm in an ExportedProgram, and in the GraphModule that
``ep.module()`` returns, in both graph forms (as exported, and after ``run_decompositions()``).

Every fold test gives all BatchNorms non-trivial statistics, folds, and compares the folded
program with the original on inputs it has not seen (same shapes: an exported program is
specialised to its example shapes unless a dimension is declared dynamic). Every skip test checks
the report's rule and that the program still computes exactly what it computed before.

Exporting (and above all decomposing: about 0.4 s each) is the slow part, so most cases live in
case matrices: one model holds every case of a matrix as a submodule, is exported and folded once
per graph form, and each case is checked on its own report entries and outputs (a failure lists
every failing case). GraphModule tests reuse the matrices' programs through ``ep.module()``.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, TensorArgument
from torch.utils._pytree import tree_leaves

import bnfold
from bnfold.core import rules
from tests.helpers import forms
from tests.helpers import torch_models as models
from tests.helpers.check import (
    REL_TOL,
    assert_same_outputs,
    assert_snapshot_equal,
    check_report,
    check_report_entries,
    check_torch_fold,
    rel_err,
    snapshot,
    torch_outputs,
)
from tests.helpers.support import (
    POISONS,
    BatchNormAct2d,
    poison,
    randn,
    randomize_all,
    rms,
)
from tests.helpers.torch_models import C_IN, FOLDED, MIXED_FOLDED, Net, skipped

FORMS = ["exported", "decomposed"]


# --------------------------------------------------------------------------------------------
# Helpers


def export(model: nn.Module, inputs: tuple, form: str, dynamic_shapes=None) -> ExportedProgram:
    return forms.export(model, inputs, form == "decomposed", dynamic_shapes=dynamic_shapes)


bn_nodes = forms.graph_bn_nodes
n_bn = forms.graph_bn_count


def op_name(node: fx.Node) -> str:
    schema = getattr(node.target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else ""


PRODUCER_OPS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "convolution",
    "linear",
    "addmm",
    "mm",
}


def producer_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and op_name(n) in PRODUCER_OPS]


def op_arg(node: fx.Node, name: str):
    """The argument ``name`` of an ATen op node, positional or keyword, default if absent."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, a.default_value if a.has_default_value() else None)
    raise KeyError(name)


def assert_producers_have_bias(program) -> None:
    """Every conv/linear/addmm has a bias that is a registered tensor (mm has none by design)."""
    graph = program.graph
    ep = program if isinstance(program, ExportedProgram) else None
    for node in producer_nodes(graph):
        if op_name(node) == "mm":
            continue
        bias = op_arg(node, "self" if op_name(node) == "addmm" else "bias")
        assert isinstance(bias, fx.Node), f"{node.name} has no bias"
        if ep is None:
            assert bias.op == "get_attr", node.name
            continue
        sig = ep.graph_signature
        assert bias.op == "placeholder", node.name
        registered = {
            **sig.inputs_to_parameters,
            **sig.inputs_to_buffers,
            **sig.inputs_to_lifted_tensor_constants,
        }
        assert bias.name in registered, f"{node.name}'s bias {bias.name} is not registered"


def check_program(ep: ExportedProgram) -> None:
    """The program is well formed: verifier, lint, signature matching the graph, state_dict
    holding exactly the persistent parameters and buffers the signature names."""
    assert isinstance(ep, ExportedProgram)
    if hasattr(ep, "validate"):
        ep.validate()
    ep.graph.lint()
    sig = ep.graph_signature
    placeholders = [n.name for n in ep.graph.nodes if n.op == "placeholder"]
    assert [s.arg.name for s in sig.input_specs] == placeholders
    (out,) = [n for n in ep.graph.nodes if n.op == "output"]
    out_args = out.args[0]
    assert len(out_args) == len(sig.output_specs)
    for spec, arg in zip(sig.output_specs, out_args, strict=True):
        if isinstance(spec.arg, TensorArgument):
            assert isinstance(arg, fx.Node) and arg.name == spec.arg.name, (spec, arg)
    persistent = {
        s.target
        for s in sig.input_specs
        if s.kind == InputKind.PARAMETER or (s.kind == InputKind.BUFFER and s.persistent)
    }
    assert set(ep.state_dict) == persistent
    for s in sig.input_specs:
        if s.kind == InputKind.CONSTANT_TENSOR or (s.kind == InputKind.BUFFER and not s.persistent):
            assert s.target in ep.constants, s


def module_of(name: str) -> str:
    """A report name's module path: ``bn@1`` (second call of ``bn``) -> ``bn``."""
    return name.split("@")[0]


def check_bn_state_removed(
    ep: ExportedProgram, folded: ExportedProgram, report: bnfold.FoldReport
) -> None:
    """Keys of BatchNorm modules whose every call was folded are gone from the folded program's
    state_dict and signature, and still in the original's. (A functional batch_norm is named
    after the module calling it, which holds no running_mean of its own: not checked here.)"""
    modules = {module_of(e.bn) for e in report.folded} - {module_of(e.bn) for e in report.skipped}
    targets = {s.target for s in folded.graph_signature.input_specs if s.target is not None}
    for m in modules:
        prefix = f"{m}."
        before = [k for k in ep.state_dict if k.startswith(prefix)]
        if f"{m}.running_mean" not in before:
            continue
        assert f"{m}.num_batches_tracked" in before, before
        assert not [k for k in folded.state_dict if k.startswith(prefix)], m
        assert not [k for k in folded.constants if k.startswith(prefix)], m
        assert not [t for t in targets if t.startswith(prefix)], m


def fold_program(ep: ExportedProgram, **kwargs):
    """Fold ``ep`` and check the input is untouched and the result well formed."""
    check_program(ep)
    before = snapshot(ep)
    folded, report = bnfold.fold(ep, return_report=True, **kwargs)
    assert folded is not ep
    assert_snapshot_equal(before, snapshot(ep))
    check_program(folded)
    return folded, report


def check_fold(
    model: nn.Module,
    example: tuple,
    fresh: tuple,
    expected: dict[str, tuple[str, object]],
    form: str,
    *,
    tol: float = REL_TOL,
    exact: bool = False,
):
    """Export ``model`` in ``form``, fold, check report, graph, state and outputs on ``fresh``."""
    ep = export(model, example, form)
    return check_program_fold(ep, fresh, expected, tol=tol, exact=exact, model=model)


def check_program_fold(
    ep: ExportedProgram,
    fresh: tuple,
    expected: dict[str, tuple[str, object]],
    *,
    tol: float = REL_TOL,
    exact: bool = False,
    model: nn.Module | None = None,
):
    """``check_torch_fold`` of ``ep`` (input untouched, analyze agreeing, report, outputs on
    ``fresh`` against the original program; bit for bit when ``exact`` or nothing folded), then
    a well-formed result, its BatchNorm ops and state left, and the eager ``model`` agreeing."""
    assert n_bn(ep) == len(expected), ep.graph  # one entry per BatchNorm call
    check_program(ep)
    r = check_torch_fold(ep, None, fresh, expected, tol=tol, exact=exact or None)
    folded, report = r.folded, r.report
    check_program(folded)
    assert n_bn(folded) == len(report.skipped), folded.graph
    check_bn_state_removed(ep, folded, report)
    if model is not None and report.folded:  # and the eager model agrees
        assert rel_err(torch_outputs(model, fresh), r.after[0]) <= tol
    return ep, folded, report


def x4(seed: int, *spatial: int, batch: int = 3, dtype=torch.float32) -> tuple:
    """One (batch, C_IN, *spatial) input."""
    return (randn(batch, C_IN, *(spatial or (6, 6)), seed=seed, dtype=dtype),)


# --------------------------------------------------------------------------------------------
# Case matrices: one model per matrix holding every case as a submodule, all called on the same
# input; exported and folded once per graph form, then every case is checked on its own outputs.


def key(case: str) -> str:
    """A module name for a case id."""
    return re.sub(r"[^0-9A-Za-z]", "_", case)


def path(case: str, sub: str | None) -> str:
    """The module path of ``sub`` in the case ``case`` of a Cases model (falsy: the case's own
    module, which is also the name of a functional op its forward calls)."""
    return f"cases.{key(case)}" + (f".{sub}" if sub else "")


class Cases(nn.Module):
    """One submodule per case, each called on the input; returns every case's outputs."""

    def __init__(self, cases: dict[str, nn.Module]) -> None:
        super().__init__()
        self.cases = nn.ModuleDict({key(k): m for k, m in cases.items()})

    def forward(self, x: torch.Tensor) -> tuple:
        return tuple(m(x) for m in self.cases.values())


@dataclass
class MatrixResult:
    ep: ExportedProgram
    folded: ExportedProgram
    report: bnfold.FoldReport
    fresh: tuple
    want: dict[str, list[torch.Tensor]]  # case -> the original program's outputs
    got: dict[str, list[torch.Tensor]]  # case -> the folded program's outputs
    eager: dict[str, list[torch.Tensor]]  # case -> the eager model's outputs


def check_matrix(
    r: MatrixResult,
    expected: dict[str, dict[str, tuple[str, object]]],
    tol: float = REL_TOL,
) -> None:
    """``expected``: case -> its report entries (action "folded", "skipped" or "any" for either,
    then the producer or the rule(s)). A case whose BatchNorms were all kept must give exactly
    the original outputs; any other within ``tol`` of the original program and of the eager
    model. Every failing case is listed. Affine chains (arithmetic folded after a BatchNorm)
    are not BatchNorms: their entries are checked by the tests that expect them."""
    check_program(r.folded)
    bns = r.report.batch_norms
    assert n_bn(r.folded) == sum(not e.folded for e in bns), r.folded.graph
    check_bn_state_removed(r.ep, r.folded, r.report)
    problems = []
    names = {bn for exp in expected.values() for bn in exp}
    assert n_bn(r.ep) == len(names), r.ep.graph  # one entry per BatchNorm call
    if {e.bn for e in bns} != names or len(bns) != len(names):
        problems.append(f"report names {sorted(e.bn for e in bns)} != {sorted(names)}")
    for case, exp in expected.items():
        try:
            check_report_entries(r.report, exp)
            want, got = r.want[case], r.got[case]
            chains = [e for e in r.report.affines if e.bn.startswith(f"{path(case, None)} ")]
            if all(not r.report.entry(bn).folded for bn in exp) and not chains:
                assert_same_outputs(want, got)
            else:
                assert rel_err(want, got) <= tol, "folded program vs original program"
                assert rel_err(r.eager[case], got) <= tol, "folded program vs eager model"
        except AssertionError as err:
            problems.append(f"{case}: {err}")
    assert not problems, "\n".join(problems) + f"\n{r.report}"


def net_folds(cases) -> dict[str, dict[str, tuple[str, object]]]:
    """Every case is a Net whose bn folds into its producer."""
    return {c: {path(c, "bn"): ("folded", path(c, "producer"))} for c in cases}


# Convolutions --------------------------------------------------------------------------------

# the eager tests' CONV_CASES, and padding="same" with zeros, which is aten.convNd.padding (a
# string padding) as exported
GRAPH_CONV_CASES = {
    **models.CONV_CASES,
    "same-zeros-nobias": dict(
        out=6, k=3, stride=1, padding="same", padding_mode="zeros", dilation=1, groups=2, bias=False
    ),
    "same-zeros-evenkernel-dilated": dict(
        out=6, k=2, stride=1, padding="same", padding_mode="zeros", dilation=2, groups=1, bias=True
    ),
}

CONV_MATRIX_CASES = {
    **{f"conv-{c}": (False, case) for c, case in GRAPH_CONV_CASES.items()},
    **{f"conv_transpose-{c}": (True, case) for c, case in models.CONV_T_CASES.items()},
}


def _conv_matrix(dims: int):
    torch.manual_seed(100 + dims)  # the layers' own initialisation
    model = Cases({c: models.conv_net(dims, *how) for c, how in CONV_MATRIX_CASES.items()})
    model = randomize_all(model, seed=10 * dims)
    shape = (2, C_IN, *models.SPATIAL[dims])
    return model, (randn(*shape, seed=1),), (randn(*shape, seed=2),)


# BatchNorm variants --------------------------------------------------------------------------

BN_VARIANT_CASES = [f"{v}-{b}" for v in models.BN_VARIANTS for b in ("bias", "nobias")]


def _bn_variant_matrix():
    torch.manual_seed(11)
    cases = {
        case: Net(
            nn.Conv2d(C_IN, 6, 3, bias=case.endswith("-bias")),
            nn.BatchNorm2d(6, **models.BN_VARIANTS[case.rsplit("-", 1)[0]]),
        )
        for case in BN_VARIANT_CASES
    }
    return randomize_all(Cases(cases), seed=11), x4(12, 7, 7), x4(13, 7, 7)


# Invalid values ------------------------------------------------------------------------------


def _invalid_matrix():
    torch.manual_seed(87)
    cases = {c: Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6)) for c in [*POISONS, "healthy"]}
    model = randomize_all(Cases(cases), seed=87)
    for c in POISONS:
        poison(model.cases[key(c)], c)
    return model, x4(88), x4(89)


# Skips ---------------------------------------------------------------------------------------


class ConvFeedsTwoBNs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.producer(x)
        return self.bn(y), self.bn2(y)


class LinearOn3D(nn.Module):
    """(N, C, L_in) -> Linear acts on L -> BatchNorm1d(C) normalises axis 1, not Linear's axis.
    (Decomposed, a Linear on 3-D is view -> addmm -> view: the BatchNorm's input is a view.)"""

    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.producer(x[:, :3, 0, :5]))  # (N, 3, 5) -> (N, 3, 7)


class UnbatchedConv1d(nn.Module):
    """Conv1d on an unbatched (C, L) input gives (C_out, L_out); BatchNorm1d then normalises
    axis 1, which is L_out. (Decomposed: unsqueeze -> convolution -> squeeze.)"""

    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Conv1d(C_IN, 6, 3)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.producer(x[0, :, 0, :]))  # (C_IN, 6) -> (6, 4)


# Linear + BatchNorm1d on 3-D: channel-axis as exported; decomposed, the view in between may
# make it no-producer.
CHANNEL_AXIS = {
    "exported": rules.CHANNEL_AXIS,
    "decomposed": {rules.CHANNEL_AXIS, rules.NO_PRODUCER},
}

# case -> (module, the rule(s) that keep its BatchNorm(s) ``bn`` (and ``bn2``); None: its
# BatchNorm is never called, so it is in neither graph nor report)
SKIP_CASES = {
    "no-running-stats": (
        lambda: Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)),
        rules.INFERENCE_MODE,
    ),
    "training-bn": (lambda: Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6)), rules.INFERENCE_MODE),
    "output-used-by-add": (lambda: models.OutputUsedTwice(False), rules.SINGLE_CONSUMER),
    "output-is-model-output": (lambda: models.OutputUsedTwice(True), rules.SINGLE_CONSUMER),
    "conv-feeds-two-bns": (ConvFeedsTwoBNs, rules.SINGLE_CONSUMER),
    "bn-on-input": (lambda: models.NoProducer("input"), rules.NO_PRODUCER),
    "bn-after-relu": (lambda: models.NoProducer("relu"), rules.NO_PRODUCER),
    "bn-after-view": (lambda: models.NoProducer("view"), rules.NO_PRODUCER),
    "bn-never-called": (lambda: models.NoProducer("never-called"), None),
    "linear-on-3d-input": (LinearOn3D, CHANNEL_AXIS),
    "unbatched-conv1d": (UnbatchedConv1d, CHANNEL_AXIS),
    # custom forwards are explicit ops in a graph: the rule is the graph's
    "bn-forward-uses-input": (
        lambda: Net(nn.Conv2d(C_IN, 6, 3), models.BNPlusInput2d(6)),
        rules.SINGLE_CONSUMER,
    ),
    "bn-forward-relu-first": (
        lambda: Net(nn.Conv2d(C_IN, 6, 3), models.ReLUThenBN2d(6)),
        rules.NO_PRODUCER,
    ),
    "conv-forward-clamps": (
        lambda: Net(models.ClampedConv2d(C_IN, 6, 3), nn.BatchNorm2d(6)),
        rules.NO_PRODUCER,
    ),
    "ws-conv-computed-weight": (
        lambda: Net(models.WSConv2d(C_IN, 6, 3, bias=False), nn.BatchNorm2d(6)),
        {rules.CONSTANT_PARAMS, rules.NO_PRODUCER},
    ),
}


def _skip_matrix():
    torch.manual_seed(112)
    model = randomize_all(Cases({c: make() for c, (make, _) in SKIP_CASES.items()}), seed=112)
    model.cases[key("training-bn")].bn.train()
    return model, x4(113), x4(114)


# Linear and matrix products on a 2-D activation ----------------------------------------------


class MatmulNet(nn.Module):
    """x @ W with W stored (in, out), as hand-written layers do: mm gets W itself, no permute;
    a square W cannot tell its axes apart by shape."""

    def __init__(self, n_in: int, n_out: int, op: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bn = nn.BatchNorm1d(n_out)
        self.op = op

    def forward(self, x):
        return self.bn(torch.mm(x, self.weight) if self.op == "mm" else x @ self.weight)


class ScaledAddmm(nn.Module):
    """addmm with beta and alpha: not a Linear as it stands."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6) / 6**0.5)
        self.bias = nn.Parameter(torch.randn(5))
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(torch.addmm(self.bias, x, self.weight.t(), beta=0.5, alpha=2.0))


# case -> (module, expected entry of its ``bn``: action and producer; None is the case module)
LINEAR_CASES = {
    "linear-bias": (lambda: Net(nn.Linear(6, 5), nn.BatchNorm1d(5)), ("folded", "producer")),
    "linear-nobias": (
        lambda: Net(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)),
        ("folded", "producer"),
    ),
    "mm-square-weight-not-transposed": (lambda: MatmulNet(6, 6, "mm"), ("folded", None)),
    # aten.matmul as exported (not a listed producer), aten.mm once decomposed
    "matmul-weight-not-transposed": (lambda: MatmulNet(6, 7, "matmul"), ("any", None)),
    "addmm-beta-alpha": (ScaledAddmm, ("any", None)),
}


def _linear_matrix():
    torch.manual_seed(22)
    model = randomize_all(Cases({c: make() for c, (make, _) in LINEAR_CASES.items()}), seed=22)
    return model, (randn(4, 6, seed=23),), (randn(4, 6, seed=24),)


# What a graph folds: other layer and BatchNorm kinds, shared producers and weights ------------


def _hooked() -> Net:
    net = Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6))
    net.bn.register_forward_hook(lambda _m, _args, out: out * 2 + 1)  # traced into the graph
    return net


class OneConvTwoBNs(nn.Module):
    """One conv module called twice, each call followed by its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn1(self.conv(x)) * self.bn2(self.conv(x.flip(-1)))


class SecondCallOnly(models.ConvThenBN):
    """The conv's second call is the one a BatchNorm follows."""

    def forward(self, x):
        return self.conv(x) * self.bn(self.conv(-x))


class TiedConvsEachWithBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(C_IN, 6, 3)
        self.conv_b = nn.Conv2d(C_IN, 6, 3)
        self.conv_b.weight = self.conv_a.weight
        self.bn_a = nn.BatchNorm2d(6)
        self.bn_b = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x * 0.5))


class TiedLinears(nn.Module):
    """Two Linears share one weight; only one is followed by a BatchNorm1d. (Decomposed, each
    reads the weight through its own permute.)"""

    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Linear(C_IN, 6)
        self.twin = nn.Linear(C_IN, 6)
        self.twin.weight = self.producer.weight
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        z = x.mean((2, 3))
        return self.bn(self.producer(z)) * self.twin(z)


class TiedBiases(nn.Module):
    """Two convs share one bias; only one is followed by a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.twin = nn.Conv2d(C_IN, 6, 3)
        self.twin.bias = self.producer.bias
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.producer(x)) + self.twin(x)


class SameConvSameBNTwice(models.ConvThenBN):
    def forward(self, x):
        return self.bn(self.conv(x)) - 0.5 * self.bn(self.conv(x * x))


class TwoOutputs(models.ConvThenBN):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.other = nn.Conv2d(C_IN, 5, 3)
        self.how = how

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.how == "bn-and-other":
            return y, torch.relu(self.other(x))
        if self.how == "other-and-bn":
            return torch.relu(self.other(x)), y
        if self.how == "bn-twice":
            return y, y
        return y, torch.relu(y) + 1  # "bn-and-its-relu"


class WritesBNResultToBuffer(models.ConvThenBN):
    """The BatchNorm's result is also copied into a buffer: decomposed, that is a
    BUFFER_MUTATION output naming the BatchNorm's node, which the fold must rename."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("last", torch.zeros(3, 6, 4, 4))

    def forward(self, x):
        y = self.bn(self.conv(x))
        self.last.copy_(y)
        return y * 2


class BufferWeightConv(nn.Module):
    """F.conv2d on a weight that is a buffer (``constant=False``) or a plain tensor attribute,
    which export lifts into ``ep.constants`` (``constant=True``)."""

    def __init__(self, constant: bool) -> None:
        super().__init__()
        w = torch.randn(6, C_IN, 3, 3) / 6
        if constant:
            self.w = w
        else:
            self.register_buffer("w", w)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.w))


class FunctionalBN(models.ConvThenBN):
    """F.batch_norm with only one of weight and bias."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which

    def forward(self, x):
        weight = self.bn.weight if self.which == "weight" else None
        bias = self.bn.bias if self.which == "bias" else None
        return F.batch_norm(self.conv(x), self.bn.running_mean, self.bn.running_var, weight, bias)


NET_FOLD = {"bn": "producer"}

# case -> (module, its BatchNorm calls -> their producer, or (action, producer or rule)), names
# relative to the case's module; "" is the case's module itself, which is also the name of a
# functional op its forward calls
GRAPH_FOLD_CASES = {
    "subclasses-without-own-forward": (
        lambda: Net(models.MyConv2d(C_IN, 6, 3, bias=False), models.MyBatchNorm2d(6)),
        NET_FOLD,
    ),
    "sync-batchnorm-in-eval": (lambda: Net(nn.Conv2d(C_IN, 6, 3), nn.SyncBatchNorm(6)), NET_FOLD),
    "bn-relu-subclass": (lambda: Net(nn.Conv2d(C_IN, 6, 3), models.BNReLU2d(6)), NET_FOLD),
    "bn-act-silu-subclass": (lambda: Net(nn.Conv2d(C_IN, 6, 3), BatchNormAct2d(6)), NET_FOLD),
    "bn-forward-hook": (_hooked, NET_FOLD),
    "extreme-statistics": (models.ExtremeStatistics, NET_FOLD),
    "producer-called-twice": (models.ProducerCalledTwice, NET_FOLD),
    "one-conv-two-bns": (OneConvTwoBNs, {"bn1": "conv", "bn2": "conv@1"}),
    "second-call-of-conv": (SecondCallOnly, {"bn": "conv@1"}),
    "tied-convs-each-with-bn": (TiedConvsEachWithBN, {"bn_a": "conv_a", "bn_b": "conv_b"}),
    "weight-tied-to-conv-without-bn": (models.TiedWeights, NET_FOLD),
    "weight-tied-to-linear-without-bn": (TiedLinears, NET_FOLD),
    "bias-tied-to-conv-without-bn": (TiedBiases, NET_FOLD),
    "producer-weight-read-elsewhere": (models.ReadsProducerWeight, {"bn": ("any", "producer")}),
    "bn-called-twice-after-two-convs": (
        lambda: models.BnCalledTwice(other_bias=False),
        {"bn": "producer", "bn@1": "other"},
    ),
    "same-conv-same-bn-twice": (SameConvSameBNTwice, {"bn": "conv", "bn@1": "conv@1"}),
    "chained-bns": (models.ChainedBNs, {"bn1": "conv", "bn2": ("any", "conv")}),
    "residual-use-of-producer-output": (
        lambda: models.DataDependent(conv2_bias=True),
        {"bn1": "conv1", "bn2": ("skipped", rules.SINGLE_CONSUMER)},
    ),
    "training-bn-next-to-a-fold": (
        models.TrainBnAndLinear,
        {"bn": ("skipped", rules.INFERENCE_MODE), "bn_fc": "fc"},
    ),
    **{
        f"two-outputs-{how}": (functools.partial(TwoOutputs, how), {"bn": "conv"})
        for how in ("bn-and-other", "other-and-bn", "bn-twice", "bn-and-its-relu")
    },
    "bn-result-written-to-a-buffer": (WritesBNResultToBuffer, {"bn": "conv"}),
    "conv-weight-is-a-buffer": (lambda: BufferWeightConv(False), {"bn": ""}),
    "conv-weight-is-a-constant-tensor": (lambda: BufferWeightConv(True), {"bn": ""}),
    "functional-bn-weight-only": (lambda: FunctionalBN("weight"), {"": "conv"}),
    "functional-bn-bias-only": (lambda: FunctionalBN("bias"), {"": "conv"}),
}


def _graph_fold_matrix():
    torch.manual_seed(19)
    model = randomize_all(Cases({c: make() for c, (make, _) in GRAPH_FOLD_CASES.items()}), seed=19)
    model.cases[key("extreme-statistics")].set_statistics()
    model.cases[key("training-bn-next-to-a-fold")].bn.train()
    return model, x4(20), x4(21)


def graph_fold_expectations() -> dict[str, dict[str, tuple[str, object]]]:
    expected = {}
    for case, (_, calls) in GRAPH_FOLD_CASES.items():
        expected[case] = {}
        for bn, what in calls.items():
            action, target = what if isinstance(what, tuple) else ("folded", what)
            if action != "skipped":
                target = path(case, target)
            expected[case][path(case, bn)] = (action, target)
    return expected


# BatchNorms with tied parameters ---------------------------------------------------------------


class TiedBNs(nn.Module):
    """Two BatchNorms sharing gamma and running_var (a tied Parameter and buffer): torch.export
    gives each state_dict key a placeholder but routes both uses through one of them. ``kept``
    is kept by a NaN in its own, untied, running_mean."""

    def __init__(self, kept: str | None) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(C_IN, 6, 3)
        self.conv_b = nn.Conv2d(C_IN, 6, 3)
        self.bn_a = nn.BatchNorm2d(6)
        self.bn_b = nn.BatchNorm2d(6)
        randomize_all(self, seed=160)
        self.bn_b.weight = self.bn_a.weight
        self.bn_b.running_var = self.bn_a.running_var
        if kept is not None:
            with torch.no_grad():
                getattr(self, kept).running_mean[0] = float("nan")

    def forward(self, x):
        return self.bn_a(self.conv_a(x)), self.bn_b(self.conv_b(x))


TIED_BN_CASES = {"both-fold": None, "a-kept": "bn_a", "b-kept": "bn_b"}


def _tied_bn_matrix():
    torch.manual_seed(160)
    model = Cases({c: TiedBNs(kept) for c, kept in TIED_BN_CASES.items()}).eval()
    return model, x4(161), x4(162)


MATRIX_CASES = {
    **{f"conv{d}d": CONV_MATRIX_CASES for d in (1, 2, 3)},
    "bn_variants": BN_VARIANT_CASES,
    "invalid": [*POISONS, "healthy"],
    "skips": SKIP_CASES,
    "linear": LINEAR_CASES,
    "graph_folds": GRAPH_FOLD_CASES,
    "tied_bns": TIED_BN_CASES,
}
MATRICES = {
    **{f"conv{d}d": functools.partial(_conv_matrix, d) for d in (1, 2, 3)},
    "bn_variants": _bn_variant_matrix,
    "invalid": _invalid_matrix,
    "skips": _skip_matrix,
    "linear": _linear_matrix,
    "graph_folds": _graph_fold_matrix,
    "tied_bns": _tied_bn_matrix,
}


@functools.cache
def fold_matrix(name: str, form: str) -> MatrixResult:
    """Export the matrix ``name`` in ``form``, fold it (checking the input program is left
    alone) and run original, folded and eager model on fresh inputs."""
    model, example, fresh = MATRICES[name]()
    ep = export(model, example, form)
    check_program(ep)
    before = snapshot(ep)
    folded, report = bnfold.fold(ep, return_report=True)
    assert folded is not ep
    assert_snapshot_equal(before, snapshot(ep))
    ids = {key(c): c for c in MATRIX_CASES[name]}
    assert list(ids) == list(model.cases)

    def by_case(program) -> dict[str, list[torch.Tensor]]:
        module = program.module() if isinstance(program, ExportedProgram) else program
        with torch.no_grad():
            out = module(*fresh)
        return {ids[k]: tree_leaves(o) for k, o in zip(model.cases, out, strict=True)}

    return MatrixResult(ep, folded, report, fresh, by_case(ep), by_case(folded), by_case(model))


# --------------------------------------------------------------------------------------------
# Matrix tests


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_and_conv_transpose_bn_fold(dims, form):
    """GRAPH_CONV_CASES and CONV_T_CASES in ``dims`` spatial dimensions: strides, paddings (modes,
    "same"), dilations, groups (depthwise, grouped ConvTranspose), output_padding, with and
    without bias. The folded program's outputs are renamed from the removed BatchNorms' nodes."""
    r = fold_matrix(f"conv{dims}d", form)
    check_matrix(r, net_folds(CONV_MATRIX_CASES))
    assert_producers_have_bias(r.folded)  # the bias-less ones got one
    removed = {n.name for n in r.ep.graph.nodes} - {n.name for n in r.folded.graph.nodes}
    assert not removed & set(r.folded.graph_signature.user_outputs)


@pytest.mark.parametrize("form", FORMS)
def test_batchnorm_variants_fold(form):
    """affine=False, momentum=None, several eps; into convs with and without bias."""
    r = fold_matrix("bn_variants", form)
    check_matrix(r, net_folds(BN_VARIANT_CASES))
    assert_producers_have_bias(r.folded)


@pytest.mark.parametrize("form", FORMS)
def test_linear_bn1d_on_2d_activation_folds(form):
    """LINEAR_CASES on a 2-D activation. Decomposed, a Linear is aten.addmm (bias) or aten.mm
    (no bias) with a permuted weight; x @ W is aten.mm on W itself (fold along the right axis
    or keep); addmm with beta/alpha may be folded (exactly) or kept."""
    r = fold_matrix("linear", form)
    check_matrix(
        r,
        {
            c: {path(c, "bn"): (action, path(c, target))}
            for c, (_, (action, target)) in LINEAR_CASES.items()
        },
    )
    assert_producers_have_bias(r.folded)
    if form == "decomposed":
        assert {"addmm", "mm"} <= {op_name(n) for n in producer_nodes(r.ep.graph)}


@pytest.mark.parametrize("form", FORMS)
def test_graph_fold_cases(form):
    """GRAPH_FOLD_CASES: BatchNorm and conv subclasses, SyncBatchNorm, BatchNorm + activation
    modules (the activation stays), a forward hook (its ``* 2 + 1`` folds too, as an affine
    chain, once the BatchNorm is folded), extreme statistics, one conv
    module called twice (each call with its own BatchNorm, or only one), tied weights and
    biases, a BatchNorm called twice (``bn``, ``bn@1``), chained BatchNorms, a residual use of
    the producer's output, a training-mode BatchNorm next to a fold, two outputs, a BatchNorm
    result copied into a buffer, conv weights that are buffers or lifted constants, functional
    batch_norm with weight or bias only."""
    r = fold_matrix("graph_folds", form)
    check_matrix(r, graph_fold_expectations())
    assert {(e.bn_type, e.target) for e in r.report.affines if e.folded} == {
        ("mul -> add", path("bn-forward-hook", "producer")),  # the hook's out * 2 + 1
        ("mul", path("same-conv-same-bn-twice", "conv@1")),  # 0.5 * bn(conv(x * x))
    }, str(r.report)
    assert (r.want["bn-relu-subclass"][0] == 0).any()  # the ReLU matters for this input
    ops = {op_name(n) for n in r.folded.graph.nodes if n.op == "call_function"}
    assert "relu" in ops and {"silu", "sigmoid"} & ops  # decomposed SiLU: x * sigmoid(x)
    assert_producers_have_bias(r.folded)
    # convs that shared a weight (one module called twice, tied weights) now have their own
    weights = [op_arg(n, "weight") for n in producer_nodes(r.folded.graph) if "conv" in op_name(n)]
    assert len(set(weights)) == len(weights)
    # the training-mode BatchNorm still updates its statistics, the copy still lands in `last`
    mutated = r.folded.graph_signature.buffers_to_mutate
    assert sorted(mutated.values()) == sorted(r.ep.graph_signature.buffers_to_mutate.values())
    assert set(mutated.values()) <= set(r.folded.state_dict)
    written = []
    for program in (r.ep, r.folded):  # (the two share the unchanged buffer: copy it each time)
        gm = program.module()
        torch_outputs(gm, r.fresh)
        written.append(gm.cases.get_submodule(key("bn-result-written-to-a-buffer")).last.clone())
    assert rel_err(written[:1], written[1:]) <= REL_TOL


@pytest.mark.parametrize("form", FORMS)
def test_skipped_bns_stay_and_outputs_do_not_change(form):
    """SKIP_CASES: the rule that keeps each BatchNorm, and exactly the same outputs. The
    training-mode BatchNorm's buffer mutations stay in the folded signature."""
    r = fold_matrix("skips", form)
    expected = {}
    for case, (_, rule) in SKIP_CASES.items():
        rule = rule[form] if isinstance(rule, dict) else rule
        bns = ["bn", "bn2"] if case == "conv-feeds-two-bns" else ["bn"]
        expected[case] = {} if rule is None else {path(case, bn): ("skipped", rule) for bn in bns}
    check_matrix(r, expected)
    assert r.folded.graph_signature.buffers_to_mutate == r.ep.graph_signature.buffers_to_mutate
    assert set(r.folded.state_dict) == set(r.ep.state_dict)


@pytest.mark.parametrize("form", FORMS)
def test_invalid_values_are_skipped_and_do_not_stop_the_valid_fold(form):
    """NaN/inf statistics, affine parameters, conv weight or bias, var + eps < 0 or == 0: kept,
    rule valid-values, outputs exactly the original's; the healthy case next to them folds."""
    r = fold_matrix("invalid", form)
    expected = {c: {path(c, "bn"): ("skipped", rules.VALID_VALUES)} for c in POISONS}
    check_matrix(r, {**expected, **net_folds(["healthy"])})
    assert n_bn(r.folded) == len(POISONS)


@pytest.mark.parametrize("form", FORMS)
def test_analyze_agrees_with_fold_on_invalid_values(form):
    r = fold_matrix("invalid", form)
    before = snapshot(r.ep)
    report = bnfold.analyze(r.ep)
    assert_snapshot_equal(before, snapshot(r.ep))
    assert report.to_list() == r.report.to_list()


@pytest.mark.parametrize("form", FORMS)
def test_bns_with_tied_parameters_fold_independently(form):
    """Folding one BatchNorm must not take away the tied tensors the other still reads."""
    r = fold_matrix("tied_bns", form)
    check_program(r.folded)
    expected = {
        path(case, bn): ("skipped", rules.VALID_VALUES)
        if bn == kept
        else ("folded", path(case, f"conv_{bn[-1]}"))
        for case, kept in TIED_BN_CASES.items()
        for bn in ("bn_a", "bn_b")
    }
    check_report(r.report, expected)
    assert n_bn(r.folded) == len(r.report.skipped) == 2
    for case, kept in TIED_BN_CASES.items():
        for bn, want, got in zip(("bn_a", "bn_b"), r.want[case], r.got[case], strict=True):
            if bn == kept:
                assert_same_outputs([want], [got])
            else:
                assert rel_err([want], [got]) <= REL_TOL, (case, bn)


@pytest.mark.parametrize("form", FORMS)
def test_bns_with_tied_parameters_both_folded_leave_no_bn_state(form):
    """export routes both uses of a tied tensor through one placeholder and leaves the other
    key's placeholder without users; folding both BatchNorms must drop that alias too."""
    r = fold_matrix("tied_bns", form)
    prefixes = tuple(f"{path('both-fold', bn)}." for bn in ("bn_a", "bn_b"))
    assert [k for k in r.ep.state_dict if k.startswith(prefixes)]
    assert [k for k in r.folded.state_dict if k.startswith(prefixes)] == []


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["graph_folds", "skips"])
def test_graph_module_of_a_matrix_folds_like_its_program(name, form):
    """``ep.module()`` (get_attr parameters, ATen ops): a new GraphModule, the input untouched,
    the same decisions under the same names as for the ExportedProgram."""
    r = fold_matrix(name, form)
    gm = r.ep.module()
    before = snapshot(gm)
    folded, report = bnfold.fold(gm, return_report=True)
    assert isinstance(folded, fx.GraphModule) and folded is not gm
    assert_snapshot_equal(before, snapshot(gm))
    decisions = [(e.bn, e.target, e.action, e.rule) for e in report]
    assert decisions == [(e.bn, e.target, e.action, e.rule) for e in r.report]
    folded.graph.lint()
    assert n_bn(folded) == sum(not e.folded for e in report.batch_norms)
    want, got = torch_outputs(gm, r.fresh), torch_outputs(folded, r.fresh)
    if name == "skips":
        assert_same_outputs(want, got)
    else:
        assert rel_err(want, got) <= REL_TOL
    if name == "graph_folds":
        assert_producers_have_bias(folded)


# --------------------------------------------------------------------------------------------
# Folds of whole models, and what a graph makes of names


@pytest.mark.parametrize("form", FORMS)
def test_one_conv_module_two_bns_both_fold(form):
    """Both calls fold, each into its own copy of the weight, each with a new registered bias;
    the shared weight is not touched."""
    model = randomize_all(OneConvTwoBNs(), seed=50)
    weight = model.conv.weight.detach().clone()
    ep, folded, _ = check_fold(
        model, x4(51), x4(52), {"bn1": ("folded", "conv"), "bn2": ("folded", "conv@1")}, form
    )
    c1, c2 = producer_nodes(folded.graph)
    assert op_arg(c1, "weight") is not op_arg(c2, "weight")
    assert torch.equal(ep.state_dict["conv.weight"], weight)
    assert_producers_have_bias(folded)
    assert "conv.bias" not in ep.state_dict


@pytest.mark.parametrize("form", FORMS)
def test_nested_sequential_and_residual_model_folds(form):
    model = randomize_all(models.ResNetish(), seed=40)
    _, folded, _ = check_fold(
        model,
        (randn(2, 3, 12, 12, seed=41),),
        (randn(2, 3, 12, 12, seed=42),),
        models.RESNETISH_FOLDED,
        form,
    )
    assert_producers_have_bias(folded)


def test_demo_net_with_calibrated_statistics_folds_completely():
    """DemoNet (16 BatchNorms) with statistics measured in training mode; as exported only, to
    save a decomposition (ResNetish covers nested modules in both forms)."""
    model = models.calibrated_demo_net(seed=43)
    ep = export(model, (randn(2, 3, 16, 16, seed=45),), "exported")
    folded, report = fold_program(ep)
    assert len(report) == 16 and [e.action for e in report] == ["folded"] * 16, str(report)
    assert n_bn(ep) == 16 and n_bn(folded) == 0
    check_bn_state_removed(ep, folded, report)
    fresh = (randn(2, 3, 16, 16, seed=46),)
    assert rel_err(torch_outputs(ep, fresh), torch_outputs(folded, fresh)) <= REL_TOL
    max_abs, max_rel = bnfold.verify(ep, folded, fresh)
    assert 0 <= max_rel <= REL_TOL and max_abs >= 0


@pytest.mark.parametrize("form", FORMS)
def test_bn_node_without_module_stack_is_named_by_its_tensors(form):
    # torchao's QAT rewrites drop the module stack: the module holding the BatchNorm's
    # tensors names it, and a BatchNorm whose tensors lie at the root keeps its node name.
    model = randomize_all(Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6)), seed=80)
    ep = export(model, x4(81), form)
    (bn,) = bn_nodes(ep.graph)
    for n in [bn, *bn.users]:  # the getitem of the decomposed form too
        n.meta.pop("nn_module_stack", None)
    check_program_fold(ep, x4(82), {"bn": ("folded", "producer")})
    model = randomize_all(FunctionalBNs(), seed=80)
    ep = export(model, x4(81), form)
    for bn in bn_nodes(ep.graph):
        for n in [bn, *bn.users]:
            n.meta.pop("nn_module_stack", None)
    report = bnfold.analyze(ep)
    assert sorted(e.bn for e in report) == sorted(n.name for n in bn_nodes(ep.graph))


class FunctionalBNs(nn.Module):
    """F.batch_norm on the module's own parameters and buffers: no BatchNorm module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(C_IN, 6, 3)
        self.conv_b = nn.Conv2d(C_IN, 6, 3, bias=False)
        g = torch.Generator().manual_seed(83)
        for s in "ab":
            self.register_parameter(f"w_{s}", nn.Parameter(torch.rand(6, generator=g) + 0.5))
            self.register_parameter(f"b_{s}", nn.Parameter(torch.randn(6, generator=g)))
            self.register_buffer(f"mean_{s}", torch.randn(6, generator=g))
            self.register_buffer(f"var_{s}", torch.rand(6, generator=g) + 0.2)

    def forward(self, x):
        a = F.batch_norm(self.conv_a(x), self.mean_a, self.var_a, self.w_a, self.b_a, False)
        b = F.batch_norm(self.conv_b(x), self.mean_b, self.var_b, self.w_b, self.b_b, False)
        return a * b


class CallsFunctionalBNsTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = FunctionalBNs()

    def forward(self, x):
        return self.inner(x) - self.inner(x.flip(-2))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("where", ["root", "submodule-called-twice"])
def test_functional_batch_norms_fold_with_distinct_names(where, form):
    """Two F.batch_norm calls in one forward share a module path; the report still tells them
    apart (a BatchNorm at the root has no path: it is named by its node)."""
    model = (FunctionalBNs() if where == "root" else CallsFunctionalBNsTwice()).eval()
    ep = export(model, x4(84), form)
    folded, report = fold_program(ep)
    n = 2 if where == "root" else 4
    assert len(report) == n and all(e.folded for e in report), str(report)
    names = [e.bn for e in report]
    assert all(names) and len(set(names)) == n, str(report)
    if where == "root":
        assert sorted(e.target for e in report) == ["conv_a", "conv_b"]
    else:
        assert all(name.startswith("inner") for name in names), str(report)
        want = ["inner.conv_a", "inner.conv_a@1", "inner.conv_b", "inner.conv_b@1"]
        assert sorted(e.target for e in report) == want
    assert n_bn(folded) == 0
    fresh = x4(85)
    assert rel_err(torch_outputs(ep, fresh), torch_outputs(folded, fresh)) <= REL_TOL


class RuntimeParams(models.TwoBranches):
    """A conv weight and a BatchNorm's mean that are user inputs, not state."""

    def forward(self, x, weight, mean):
        a = self.bn_a(F.conv2d(x, weight, self.conv_a.bias))
        b = F.batch_norm(self.conv_b(x), mean, self.bn_b.running_var, self.bn_b.weight)
        return a, b


@pytest.mark.parametrize("form", FORMS)
def test_runtime_weight_or_statistics_are_skipped(form):
    model = randomize_all(RuntimeParams(), seed=136)
    t = (randn(6, C_IN, 3, 3, seed=137), randn(6, seed=138))
    ep = export(model, (*x4(139), *t), form)
    folded, report = fold_program(ep)
    assert len(report) == 2 and {e.rule for e in report} == {rules.CONSTANT_PARAMS}, str(report)
    assert report.entry("bn_a").rule == rules.CONSTANT_PARAMS
    assert n_bn(folded) == 2
    fresh = (*x4(140), t[0] * 1.5, t[1] - 0.5)
    assert_same_outputs(torch_outputs(ep, fresh), torch_outputs(folded, fresh))


@pytest.mark.parametrize("form", FORMS)
def test_float16_overflow_is_skipped(form):
    model = models.float16_overflow_net(seed=141)
    _, folded, report = check_fold(
        model,
        x4(142, dtype=torch.float16),
        x4(143, dtype=torch.float16),
        skipped(rules.VALID_VALUES),
        form,
        exact=True,
    )
    assert "float16" in report.entry("bn").reason
    for name, t in folded.state_dict.items():
        assert torch.isfinite(t).all(), name


# --------------------------------------------------------------------------------------------
# Dtypes and memory formats


@pytest.mark.parametrize("form", FORMS)
def test_channels_last_input(form):
    model = randomize_all(models.conv_and_conv_transpose(), seed=103).to(
        memory_format=torch.channels_last
    )
    x = randn(2, C_IN, 7, 7, seed=104).to(memory_format=torch.channels_last)
    fresh = randn(2, C_IN, 7, 7, seed=105).to(memory_format=torch.channels_last)
    ep, folded, _ = check_fold(model, (x,), (fresh,), models.SEQUENTIAL_FOLDED, form)
    want, got = torch_outputs(ep, (fresh,))[0], torch_outputs(folded, (fresh,))[0]
    assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
        memory_format=torch.channels_last
    )


@pytest.mark.parametrize("form", FORMS)
def test_float64_program_folds_in_float64(form):
    model = randomize_all(Net(nn.Conv2d(C_IN, 6, 3, bias=False), nn.BatchNorm2d(6)), seed=106)
    model = model.double()
    _, folded, _ = check_fold(
        model, x4(107, dtype=torch.float64), x4(108, dtype=torch.float64), FOLDED, form, tol=1e-12
    )
    assert {v.dtype for v in folded.state_dict.values() if v.is_floating_point()} == {torch.float64}


# max|folded - unfolded| / max|unfolded| for a low-precision program: a few roundings of the
# output's largest value (measured: about 0.6 eps for both dtypes); the folded weights are
# rounded once more than the unfolded ones.
LOW_PRECISION_TOL = {dt: 4 * torch.finfo(dt).eps for dt in (torch.float16, torch.bfloat16)}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_program_folds(dtype, form):
    """Against the unfolded program within a few of the dtype's roundings; against float64 at
    most a little less accurate (measured RMS ratio 1.12 for float16, 0.89 for bfloat16)."""
    torch.manual_seed(109)
    model = randomize_all(models.LowPrecisionNet(), seed=109)
    x = randn(64, C_IN, 6, 6, seed=110)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    low = copy.deepcopy(model).to(dtype)
    xl = (x.to(dtype),)
    ep = export(low, (randn(64, C_IN, 6, 6, seed=111, dtype=dtype),), form)
    folded, report = fold_program(ep)
    assert [e.action for e in report] == ["folded"] * 3, str(report)
    assert {v.dtype for v in folded.state_dict.values() if v.is_floating_point()} == {dtype}
    (unfolded_out,), (folded_out,) = torch_outputs(ep, xl), torch_outputs(folded, xl)
    assert folded_out.dtype == dtype
    assert rel_err([unfolded_out], [folded_out]) <= LOW_PRECISION_TOL[dtype]
    assert rms(folded_out, ref) <= 1.6 * rms(unfolded_out, ref)


@pytest.mark.parametrize("form", FORMS)
def test_half_conv_with_float32_bn_folds_into_half_weights(form):
    """Mixed precision that keeps BatchNorm in float32: the folded conv stays float16."""
    model = randomize_all(Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6)), seed=164)
    x = randn(32, C_IN, 6, 6, seed=165)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    model.producer.half()
    ep = export(model, x4(166, batch=32, dtype=torch.float16), form)
    folded, report = fold_program(ep)
    check_report(report, FOLDED)
    assert {v.dtype for v in folded.state_dict.values()} == {torch.float16}
    xl = (x.half(),)
    (unfolded_out,), (folded_out,) = torch_outputs(ep, xl), torch_outputs(folded, xl)
    assert folded_out.dtype == unfolded_out.dtype == torch.float16
    assert rel_err([unfolded_out], [folded_out]) <= LOW_PRECISION_TOL[torch.float16]
    assert rms(folded_out, ref) <= 1.6 * rms(unfolded_out, ref)


# --------------------------------------------------------------------------------------------
# API behaviour and the life of a folded program


BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@functools.cache
def mixed_program(form: str) -> ExportedProgram:
    """Shared by the API tests, which must all leave it untouched."""
    return export(randomize_all(models.Mixed(), seed=143), x4(144), form)


@pytest.mark.parametrize("form", FORMS)
def test_fold_returns_a_new_program_and_leaves_its_input_alone(form):
    """The folded program's state_dict loses exactly the BatchNorms' keys (weight, bias,
    running_mean, running_var, num_batches_tracked) and gains the bias-less conv's new bias;
    the original keeps all of its own and still computes what it did."""
    ep = mixed_program(form)
    fresh = x4(145)
    want = torch_outputs(ep, fresh)
    _, folded, _ = check_program_fold(ep, fresh, MIXED_FOLDED)
    assert_producers_have_bias(folded)
    bn_keys = {f"{m}.{b}" for m in ("bn", "bn_up", "bn_fc") for b in BN_STATE}
    assert bn_keys <= set(ep.state_dict)
    assert set(ep.state_dict) - set(folded.state_dict) == bn_keys
    assert len(set(folded.state_dict) - set(ep.state_dict)) == 1  # conv's new bias
    assert_same_outputs(want, torch_outputs(ep, fresh))
    assert n_bn(ep) == 3


@pytest.mark.parametrize("form", FORMS)
def test_fold_without_report_returns_the_program(form):
    ep = mixed_program(form)
    folded = bnfold.fold(ep)
    assert isinstance(folded, ExportedProgram) and folded is not ep
    assert n_bn(folded) == 0


@pytest.mark.parametrize("form", FORMS)
def test_inplace_with_exported_program_raises(form):
    ep = mixed_program(form)
    before = snapshot(ep)
    with pytest.raises(bnfold.InvalidArgumentError):
        bnfold.fold(ep, inplace=True)
    with pytest.raises(bnfold.InvalidArgumentError):
        bnfold.fold(ep, inplace=True, return_report=True)
    assert_snapshot_equal(before, snapshot(ep))


@pytest.mark.parametrize("form", FORMS)
def test_analyze_reports_what_fold_does_and_changes_nothing(form):
    ep = mixed_program(form)
    before = snapshot(ep)
    report = bnfold.analyze(ep)
    assert_snapshot_equal(before, snapshot(ep))
    check_report(report, MIXED_FOLDED)
    _, fold_report = bnfold.fold(ep, return_report=True)
    assert report.to_list() == fold_report.to_list()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "producers,expected",
    [
        ({"conv"}, {"bn": "folded", "bn_up": "not-selected", "bn_fc": "not-selected"}),
        ("linear", {"bn": "not-selected", "bn_up": "not-selected", "bn_fc": "folded"}),
        ({"conv", "conv_transpose"}, {"bn": "folded", "bn_up": "folded", "bn_fc": "not-selected"}),
    ],
)
def test_producers_selects_fold_kinds(producers, expected, form):
    ep = mixed_program(form)
    folded, report = fold_program(ep, producers=producers)
    check_report(report, models.mixed_selected(expected))
    assert n_bn(folded) == len(report.skipped)
    check_bn_state_removed(ep, folded, report)
    fresh = x4(146)
    assert rel_err(torch_outputs(ep, fresh), torch_outputs(folded, fresh)) <= REL_TOL
    assert bnfold.analyze(ep, producers=producers).to_list() == report.to_list()


@pytest.mark.parametrize("form", FORMS)
def test_verify_measures_the_difference(form):
    ep = mixed_program(form)
    folded = bnfold.fold(ep)
    fresh = x4(147)
    max_abs, max_rel = bnfold.verify(ep, folded, fresh)
    assert 0 <= max_rel <= REL_TOL and 0 <= max_abs
    assert max_rel == pytest.approx(
        rel_err(torch_outputs(ep, fresh), torch_outputs(folded, fresh)), rel=0.5, abs=1e-7
    )
    same_abs, same_rel = bnfold.verify(ep, ep, fresh)
    assert same_abs == 0 and same_rel == 0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dynamic", ["batch", "batch-height-width"])
def test_dynamic_shapes_survive_folding(dynamic, form):
    model = randomize_all(models.Mixed(), seed=88)
    dims = {0: torch.export.Dim("batch", min=2, max=64)}
    if dynamic == "batch-height-width":
        dims |= {2: torch.export.Dim("h", min=4, max=32), 3: torch.export.Dim("w", min=4, max=32)}
    ep = export(model, x4(89, 8, 8, batch=4), form, dynamic_shapes=(dims,))
    folded, report = fold_program(ep)
    check_report(report, MIXED_FOLDED)
    (x,) = [n for n in folded.graph.nodes if n.op == "placeholder" and n.name == "x"]
    for axis in dims:
        assert isinstance(x.meta["val"].shape[axis], torch.SymInt), axis
    sizes = [(3, 8, 8), (7, 8, 8)] if dynamic == "batch" else [(3, 8, 6), (5, 6, 10)]
    for seed, (n, h, w) in enumerate(sizes):
        fresh = x4(90 + seed, h, w, batch=n)
        got = torch_outputs(folded, fresh)
        assert got[0].shape[0] == n
        assert rel_err(torch_outputs(ep, fresh), got) <= REL_TOL


@pytest.mark.parametrize("form", FORMS)
def test_save_load_round_trip_of_folded_program(form, tmp_path):
    ep = mixed_program(form)
    folded, _ = fold_program(ep)
    path = tmp_path / "folded.pt2"
    torch.export.save(folded, path)
    loaded = torch.export.load(path)
    check_program(loaded)
    assert n_bn(loaded) == 0
    assert set(loaded.state_dict) == set(folded.state_dict)
    fresh = x4(97)
    assert_same_outputs(torch_outputs(folded, fresh), torch_outputs(loaded, fresh))
    assert rel_err(torch_outputs(ep, fresh), torch_outputs(loaded, fresh)) <= REL_TOL


def test_save_load_round_trip_of_a_program_with_unshared_weights(tmp_path):
    """New weight copies and biases (one conv, two BatchNorms) survive a save/load."""
    r = fold_matrix("graph_folds", "exported")
    path = tmp_path / "folded.pt2"
    torch.export.save(r.folded, path)
    loaded = torch.export.load(path)
    check_program(loaded)
    assert_same_outputs(torch_outputs(r.folded, r.fresh), torch_outputs(loaded, r.fresh))


@pytest.mark.parametrize("form", FORMS)
def test_folded_program_survives_run_decompositions(form):
    ep = mixed_program(form)
    folded, _ = fold_program(ep)
    decomposed = folded.run_decompositions()
    check_program(decomposed)
    assert n_bn(decomposed) == 0
    fresh = x4(100)
    assert rel_err(torch_outputs(ep, fresh), torch_outputs(decomposed, fresh)) <= REL_TOL


def test_folding_the_decomposition_of_a_folded_program_changes_nothing_more():
    folded, _ = fold_program(mixed_program("exported"))
    again, report = fold_program(folded.run_decompositions())
    assert len(report) == 0 and n_bn(again) == 0


@pytest.mark.parametrize("form", FORMS)
def test_folding_a_folded_program_again_changes_nothing(form):
    """Only the kept BatchNorms are reported again, with the same names and rules."""
    r = fold_matrix("invalid", form)
    again, report = fold_program(r.folded)
    assert [(e.bn, e.action, e.rule) for e in report] == [
        (e.bn, e.action, e.rule) for e in r.report.skipped
    ]
    assert_same_outputs(torch_outputs(r.folded, r.fresh), torch_outputs(again, r.fresh))


@pytest.mark.parametrize("form", FORMS)
def test_unflatten_of_folded_program(form):
    """torch.export.unflatten rebuilds the module hierarchy from the module call graph."""
    ep = mixed_program(form)
    folded, report = bnfold.fold(ep, return_report=True)
    check_report(report, MIXED_FOLDED)
    unflat = torch.export.unflatten(folded)
    fresh = x4(98)
    with torch.no_grad():
        got = tree_leaves(unflat(*fresh))
    assert rel_err(torch_outputs(ep, fresh), got) <= REL_TOL


class KeywordInput(models.ConvThenBN):
    def forward(self, x, *, scale):
        return self.bn(self.conv(x)) * scale


@pytest.mark.parametrize("form", FORMS)
def test_program_with_keyword_input_folds(form):
    model = randomize_all(KeywordInput(), seed=99)
    ep = torch.export.export(model, x4(100), kwargs={"scale": torch.tensor(2.0)})
    ep = ep.run_decompositions() if form == "decomposed" else ep
    folded, report = fold_program(ep)
    # the scale is an input: the multiplication by it stays, and says why
    check_report(report, {"bn": ("folded", "conv"), "mul": ("skipped", rules.CONSTANT_PARAMS)})
    scale = torch.tensor(-3.0)
    with torch.no_grad():
        want, got = ep.module()(*x4(101), scale=scale), folded.module()(*x4(101), scale=scale)
    assert rel_err([want], [got]) <= REL_TOL


# --------------------------------------------------------------------------------------------
# GraphModules from ep.module(): parameters are get_attr nodes (see also
# test_graph_module_of_a_matrix_folds_like_its_program)


@pytest.mark.parametrize("form", FORMS)
def test_graph_module_fold_returns_a_new_graph_module(form):
    ep = mixed_program(form)
    gm = ep.module()
    before_gm, before_ep = snapshot(gm), snapshot(ep)
    fresh = x4(148)
    want = torch_outputs(gm, fresh)
    folded, report = bnfold.fold(gm, return_report=True)
    assert isinstance(folded, fx.GraphModule) and folded is not gm
    assert_snapshot_equal(before_gm, snapshot(gm))
    assert_snapshot_equal(before_ep, snapshot(ep))
    check_report(report, MIXED_FOLDED)
    folded.graph.lint()
    assert n_bn(gm) == 3 and n_bn(folded) == 0
    assert_producers_have_bias(folded)
    assert rel_err(want, torch_outputs(folded, fresh)) <= REL_TOL
    assert_same_outputs(want, torch_outputs(gm, fresh))


@pytest.mark.parametrize("form", FORMS)
def test_graph_module_fold_inplace_returns_the_same_module(form):
    ep = mixed_program(form)
    gm = ep.module()
    fresh = x4(149)
    want = torch_outputs(gm, fresh)
    result, report = bnfold.fold(gm, inplace=True, return_report=True)
    assert result is gm
    check_report(report, MIXED_FOLDED)
    gm.graph.lint()
    assert n_bn(gm) == 0
    assert rel_err(want, torch_outputs(gm, fresh)) <= REL_TOL


@pytest.mark.parametrize("form", FORMS)
def test_graph_module_inplace_fold_leaves_the_exported_program_alone(form):
    """ep.module() shares its tensors with ep.state_dict: folding the module in place must not
    change what the program computes."""
    model = randomize_all(models.Mixed(), seed=150)
    ep = export(model, x4(151), form)
    fresh = x4(152)
    want = torch_outputs(ep, fresh)
    before = snapshot(ep)
    gm = ep.module()
    folded, report = bnfold.fold(gm, inplace=True, return_report=True)
    assert folded is gm and n_bn(gm) == 0
    check_report(report, MIXED_FOLDED)  # the module's weights were rewritten, not ep's
    assert_snapshot_equal(before, snapshot(ep))
    assert_same_outputs(want, torch_outputs(ep, fresh))


@pytest.mark.parametrize("form", FORMS)
def test_graph_module_analyze_and_verify(form):
    ep = mixed_program(form)
    gm = ep.module()
    before = snapshot(gm)
    report = bnfold.analyze(gm)
    assert_snapshot_equal(before, snapshot(gm))
    check_report(report, MIXED_FOLDED)
    folded = bnfold.fold(gm)
    max_abs, max_rel = bnfold.verify(gm, folded, x4(153))
    assert 0 <= max_rel <= REL_TOL and max_abs >= 0
