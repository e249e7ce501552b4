"""The torch.export frontend: fold BatchNorm in an ExportedProgram, and in the GraphModule that
``ep.module()`` returns, in both graph forms (as exported, and after ``run_decompositions()``).

Every fold test gives all BatchNorms non-trivial statistics, folds, and compares the folded
program with the original on inputs it has not seen (same shapes: an exported program is
specialised to its example shapes unless a dimension is declared dynamic). Every skip test checks
the report's rule and that the program still computes exactly what it computed before.

Exporting (and above all decomposing) is the slow part, so the large case matrices put every case
of a matrix into one model, one branch per case, export and fold it once per graph form, and let
each parametrized test check its own branch.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from support import BatchNormAct2d, randomize_all
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, TensorArgument

import bnfold
from bnfold import rules
from bnfold.demo import DemoNet, randomize_batchnorms

REL_TOL = 1e-5  # float32 folds: max|a - b| / max|a|
FORMS = ["exported", "decomposed"]

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (11,), 2: (7, 6), 3: (5, 4, 5)}
C_IN = 4

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# --------------------------------------------------------------------------------------------
# Helpers


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics and affine parameters for every BatchNorm, then eval()."""
    return randomize_all(model, seed)


def export(model: nn.Module, inputs: tuple, form: str, dynamic_shapes=None) -> ExportedProgram:
    ep = torch.export.export(model, tuple(inputs), dynamic_shapes=dynamic_shapes)
    return ep.run_decompositions() if form == "decomposed" else ep


def run(program, inputs: tuple) -> list[torch.Tensor]:
    """Outputs of an ExportedProgram (through ``ep.module()``) or of a module."""
    module = program.module() if isinstance(program, ExportedProgram) else program
    with torch.no_grad():
        out = module(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def bn_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Every batch-norm op of a graph (aten.batch_norm, _native_batch_norm_legit_*, ...)."""
    return [
        n
        for n in graph.nodes
        if n.op == "call_function" and "batch_norm" in getattr(n.target, "__name__", str(n.target))
    ]


def n_bn(program) -> int:
    return len(bn_nodes(program.graph))


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


def rel_err(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    assert len(expected) == len(actual)
    worst = 0.0
    for a, b in zip(expected, actual, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        a64, b64 = a.double(), b.double()
        scale = float(a64.abs().max())
        assert scale > 0 and torch.isfinite(a64).all()
        worst = max(worst, float((a64 - b64).abs().max()) / scale)
    return worst


def assert_same_outputs(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


def _tensors(items) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in items if isinstance(v, torch.Tensor)}


def program_snapshot(ep: ExportedProgram) -> dict:
    """Everything about an ExportedProgram that a fold must leave alone."""
    return {
        "graph": str(ep.graph),
        "code": ep.graph_module.code,
        "signature": str(ep.graph_signature),
        "range_constraints": str(ep.range_constraints),
        "meta": [
            (n.name, str(n.meta.get("val")), str(n.meta.get("nn_module_stack")))
            for n in ep.graph.nodes
        ],
        "tensors": _tensors([*ep.state_dict.items(), *ep.constants.items()]),
        "ids": {k: id(v) for k, v in [*ep.state_dict.items(), *ep.constants.items()]},
    }


def module_snapshot(gm: nn.Module) -> dict:
    """Everything about a GraphModule that a fold must leave alone when it works on a copy."""
    return {
        "code": getattr(gm, "code", None),
        "graph": str(getattr(gm, "graph", None)),
        "structure": [(name, type(m).__name__) for name, m in gm.named_modules()],
        "tensors": _tensors(gm.state_dict(keep_vars=True).items()),
        "ids": {k: id(v) for k, v in gm.state_dict(keep_vars=True).items()},
    }


def assert_snapshot_equal(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if key != "tensors":
            assert before[key] == after[key], key
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        w = after["tensors"][k]
        assert v.dtype == w.dtype and v.shape == w.shape, k
        assert torch.equal(v.nan_to_num(), w.nan_to_num()) and torch.equal(v.isnan(), w.isnan()), k


def check_report(report: bnfold.FoldReport, expected: dict[str, tuple[str, object]]) -> None:
    """``expected``: bn name -> ("folded", producer name) or ("skipped", rule id or set of them)."""
    assert isinstance(report, bnfold.FoldReport)
    entries = {e.bn: e for e in report}
    assert len(entries) == len(report.entries), str(report)  # names are unique
    assert set(entries) == set(expected), str(report)
    for bn, (action, what) in expected.items():
        e = entries[bn]
        assert e.action == action, str(report)
        assert isinstance(e.bn_type, str) and e.bn_type, str(report)
        if action == "folded":
            assert e.folded and e.target == what and e.rule is None and e.reason == "", str(report)
        else:
            allowed = what if isinstance(what, (set, frozenset)) else {what}
            assert not e.folded and e.rule in allowed, str(report)
            assert isinstance(e.reason, str) and e.reason.strip(), str(report)


def check_entry_folded(report: bnfold.FoldReport, bn: str, target: str) -> None:
    e = report.entry(bn)
    assert e.folded and e.target == target and e.rule is None and e.reason == "", str(report)


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
    state_dict and signature, and still in the original's."""
    modules = {module_of(e.bn) for e in report.folded} - {module_of(e.bn) for e in report.skipped}
    targets = {s.target for s in folded.graph_signature.input_specs if s.target is not None}
    for m in modules:
        prefix = f"{m}."
        before = [k for k in ep.state_dict if k.startswith(prefix)]
        assert f"{m}.running_mean" in before and f"{m}.num_batches_tracked" in before, before
        assert not [k for k in folded.state_dict if k.startswith(prefix)], m
        assert not [k for k in folded.constants if k.startswith(prefix)], m
        assert not [t for t in targets if t.startswith(prefix)], m


def fold_program(ep: ExportedProgram, **kwargs):
    """Fold ``ep`` and check the input is untouched and the result well formed."""
    check_program(ep)
    before = program_snapshot(ep)
    folded, report = bnfold.fold(ep, return_report=True, **kwargs)
    assert folded is not ep
    assert_snapshot_equal(before, program_snapshot(ep))
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
    bn_state: bool = True,
    dynamic_shapes=None,
):
    """Export ``model`` in ``form``, fold, check report, graph, state and outputs on ``fresh``."""
    ep = export(model, example, form, dynamic_shapes)
    return check_program_fold(
        ep, fresh, expected, tol=tol, exact=exact, bn_state=bn_state, model=model
    )


def check_program_fold(
    ep: ExportedProgram,
    fresh: tuple,
    expected: dict[str, tuple[str, object]],
    *,
    tol: float = REL_TOL,
    exact: bool = False,
    bn_state: bool = True,
    model: nn.Module | None = None,
):
    assert n_bn(ep) == len(expected), ep.graph  # one entry per BatchNorm call
    folded, report = fold_program(ep)
    check_report(report, expected)
    n_kept = sum(e.action == "skipped" for e in report)
    assert n_bn(folded) == n_kept, folded.graph
    if bn_state:
        check_bn_state_removed(ep, folded, report)
    want, got = run(ep, fresh), run(folded, fresh)
    if exact:
        assert_same_outputs(want, got)
    else:
        assert rel_err(want, got) <= tol
        if model is not None:  # and the eager model agrees
            with torch.no_grad():
                eager = model(*fresh)
            eager = list(eager) if isinstance(eager, (tuple, list)) else [eager]
            assert rel_err(eager, got) <= tol
    return ep, folded, report


class Net(nn.Module):
    """producer -> BatchNorm; its output is the BatchNorm's."""

    def __init__(self, producer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.producer = producer
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.producer(x))


FOLDED = {"bn": ("folded", "producer")}


def skipped(rule) -> dict:
    return {"bn": ("skipped", rule)}


def x4(seed: int, *spatial: int, batch: int = 3, dtype=torch.float32) -> tuple:
    """One (batch, C_IN, *spatial) input."""
    return (randn(batch, C_IN, *(spatial or (6, 6)), seed=seed, dtype=dtype),)


# --------------------------------------------------------------------------------------------
# Case matrices: one model per matrix, one branch per case, exported and folded once per form


def key(case: str) -> str:
    """A module name for a case id."""
    return re.sub(r"[^0-9A-Za-z]", "_", case)


class Branches(nn.Module):
    """One branch per case, ``producers[k] -> bns[k]``; returns every branch's output."""

    def __init__(self, pairs: dict[str, tuple[nn.Module, nn.Module]]) -> None:
        super().__init__()
        self.producers = nn.ModuleDict({key(k): p for k, (p, _) in pairs.items()})
        self.bns = nn.ModuleDict({key(k): b for k, (_, b) in pairs.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.bns[k](p(x)) for k, p in self.producers.items())


@dataclass
class MatrixResult:
    cases: list[str]
    ep: ExportedProgram
    before: dict
    folded: ExportedProgram
    report: bnfold.FoldReport
    want: list[torch.Tensor]
    got: list[torch.Tensor]

    def output(self, case: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.cases.index(case)
        return self.want[i], self.got[i]

    def check_common(self) -> None:
        """The checks every test of the matrix shares (cheap: the fold is already done)."""
        assert_snapshot_equal(self.before, program_snapshot(self.ep))
        check_program(self.folded)
        assert len(self.report) == len(self.cases) == n_bn(self.ep)
        assert n_bn(self.folded) == len(self.report.skipped)
        check_bn_state_removed(self.ep, self.folded, self.report)


def conv_pair(dims: int, transposed: bool, case: dict) -> tuple[nn.Module, nn.Module]:
    c = dict(case)
    out, k = c.pop("out"), c.pop("k")
    return (CONV_T if transposed else CONV)[dims](C_IN, out, k, **c), BN[dims](out)


CONV_CASES = {
    "plain": dict(
        out=6, k=3, stride=1, padding=0, padding_mode="zeros", dilation=1, groups=1, bias=True
    ),
    "stride2-reflect-groups2-nobias": dict(
        out=6, k=3, stride=2, padding=1, padding_mode="reflect", dilation=1, groups=2, bias=False
    ),
    "circular-dilated-depthwise": dict(
        out=4, k=3, stride=1, padding=2, padding_mode="circular", dilation=2, groups=4, bias=True
    ),
    "same-replicate-evenkernel-nobias": dict(
        out=8,
        k=2,
        stride=1,
        padding="same",
        padding_mode="replicate",
        dilation=1,
        groups=1,
        bias=False,
    ),
    "stride2-groups4-multiplier2": dict(
        out=8, k=3, stride=2, padding=1, padding_mode="zeros", dilation=1, groups=4, bias=True
    ),
    # padding="same" with zeros is aten.convNd.padding (a string padding) as exported
    "same-zeros-nobias": dict(
        out=6, k=3, stride=1, padding="same", padding_mode="zeros", dilation=1, groups=2, bias=False
    ),
    "same-zeros-evenkernel-dilated": dict(
        out=6, k=2, stride=1, padding="same", padding_mode="zeros", dilation=2, groups=1, bias=True
    ),
}

CONV_T_CASES = {
    "plain": dict(
        out=6, k=3, stride=1, padding=0, output_padding=0, dilation=1, groups=1, bias=True
    ),
    "stride2-outpad1-groups2-nobias": dict(
        out=6, k=3, stride=2, padding=1, output_padding=1, dilation=1, groups=2, bias=False
    ),
    "dilated-depthwise": dict(
        out=4, k=3, stride=2, padding=0, output_padding=1, dilation=2, groups=4, bias=True
    ),
    "stride3-outpad2-groups2": dict(
        out=6, k=2, stride=3, padding=2, output_padding=2, dilation=1, groups=2, bias=True
    ),
    "groups4-cout-per-group2-nobias": dict(
        out=8, k=3, stride=2, padding=1, output_padding=0, dilation=1, groups=4, bias=False
    ),
}

BN_VARIANTS = {
    "affine": dict(affine=True, momentum=0.1, eps=1e-5),
    "no-affine": dict(affine=False, momentum=0.1, eps=1e-5),
    "momentum-none-eps1e-3": dict(affine=True, momentum=None, eps=1e-3),
    "no-affine-momentum-none-eps0.1": dict(affine=False, momentum=None, eps=0.1),
    "eps0.1": dict(affine=True, momentum=0.1, eps=0.1),
}


def _poison(model: Net, what: str) -> None:
    with torch.no_grad():
        if what == "nan-running-var":
            model.bn.running_var[1] = float("nan")
        elif what == "inf-gamma":
            model.bn.weight[0] = float("inf")
        elif what == "var-plus-eps-negative":
            model.bn.running_var[2] = -1.0
        elif what == "var-plus-eps-zero":
            model.bn.running_var[3] = -model.bn.eps
            assert float(model.bn.running_var[3] + model.bn.eps) == 0.0
        elif what == "nan-conv-weight":
            model.producer.weight[3, 0, 0, 0] = float("nan")
        elif what == "inf-beta":
            model.bn.bias[4] = float("-inf")
        elif what == "nan-conv-bias":
            model.producer.bias[5] = float("nan")
        else:
            raise AssertionError(what)


POISONS = [
    "nan-running-var",
    "inf-gamma",
    "var-plus-eps-negative",
    "var-plus-eps-zero",
    "nan-conv-weight",
    "inf-beta",
    "nan-conv-bias",
]


def _conv_matrix(dims: int, transposed: bool):
    cases = CONV_T_CASES if transposed else CONV_CASES
    torch.manual_seed(100 + dims)  # the layers' own initialisation
    model = Branches({c: conv_pair(dims, transposed, cases[c]) for c in cases})
    model = randomize(model, seed=10 * dims + transposed)
    shape = (2, C_IN, *SPATIAL[dims])
    return list(cases), model, (randn(*shape, seed=1),), (randn(*shape, seed=2),)


def _bn_variant_matrix():
    torch.manual_seed(11)
    pairs = {
        f"{variant}-{'bias' if bias else 'nobias'}": (
            nn.Conv2d(C_IN, 6, 3, bias=bias),
            nn.BatchNorm2d(6, **BN_VARIANTS[variant]),
        )
        for variant in BN_VARIANTS
        for bias in (True, False)
    }
    model = randomize(Branches(pairs), seed=11)
    return list(pairs), model, x4(12, 7, 7), x4(13, 7, 7)


def _invalid_matrix():
    torch.manual_seed(87)
    cases = [*POISONS, "healthy"]
    model = randomize(
        Branches({c: (nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6)) for c in cases}), seed=87
    )
    for c in POISONS:
        one = Net(model.producers[key(c)], model.bns[key(c)])
        _poison(one, c)
    return cases, model, x4(88), x4(89)


MATRICES = {
    **{f"conv{d}d": functools.partial(_conv_matrix, d, False) for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": functools.partial(_conv_matrix, d, True) for d in (1, 2, 3)},
    "bn_variants": _bn_variant_matrix,
    "invalid": _invalid_matrix,
}


@functools.cache
def fold_matrix(name: str, form: str) -> MatrixResult:
    cases, model, example, fresh = MATRICES[name]()
    ep = export(model, example, form)
    check_program(ep)
    before = program_snapshot(ep)
    folded, report = bnfold.fold(ep, return_report=True)
    return MatrixResult(cases, ep, before, folded, report, run(ep, fresh), run(folded, fresh))


# --------------------------------------------------------------------------------------------
# Folds: convolutions


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_bn_folds(dims, case, form):
    r = fold_matrix(f"conv{dims}d", form)
    r.check_common()
    check_entry_folded(r.report, f"bns.{key(case)}", f"producers.{key(case)}")
    want, got = r.output(case)
    assert rel_err([want], [got]) <= REL_TOL
    assert_producers_have_bias(r.folded)  # the bias-less convolutions got one


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", list(CONV_T_CASES))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_transpose_bn_folds(dims, case, form):
    r = fold_matrix(f"conv_transpose{dims}d", form)
    r.check_common()
    check_entry_folded(r.report, f"bns.{key(case)}", f"producers.{key(case)}")
    want, got = r.output(case)
    assert rel_err([want], [got]) <= REL_TOL
    assert_producers_have_bias(r.folded)


@pytest.mark.parametrize("form", FORMS)
def test_conv_bn_fold_compares_with_eager_model(form):
    """The matrices compare program with program; one check that both equal the eager model."""
    cases, model, example, fresh = _conv_matrix(2, False)
    expected = {f"bns.{key(c)}": ("folded", f"producers.{key(c)}") for c in cases}
    check_fold(model, example, fresh, expected, form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", list(BN_VARIANTS))
@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_variants_fold(variant, bias, form):
    r = fold_matrix("bn_variants", form)
    r.check_common()
    case = f"{variant}-{'bias' if bias else 'nobias'}"
    check_entry_folded(r.report, f"bns.{key(case)}", f"producers.{key(case)}")
    want, got = r.output(case)
    assert rel_err([want], [got]) <= REL_TOL
    assert_producers_have_bias(r.folded)


@pytest.mark.parametrize("form", FORMS)
def test_extreme_but_valid_statistics_fold(form):
    """Tiny and huge variances, large means, zero and negative gamma, var slightly below 0."""
    model = Net(nn.Conv2d(C_IN, 8, 3), nn.BatchNorm2d(8, eps=1e-5)).eval()
    with torch.no_grad():
        model.bn.running_var.copy_(torch.tensor([1e-7, 1e4, 3e-6, 1.0, 0.5, -5e-6, 1e-3, 2.0]))
        model.bn.running_mean.copy_(torch.tensor([100.0, -250.0, 0.0, 1e-3, 3.0, -0.5, 40.0, 0.0]))
        model.bn.weight.copy_(torch.tensor([50.0, 1e-3, 0.0, -2.0, 1.0, 0.3, -20.0, 1e3]))
        model.bn.bias.copy_(torch.tensor([10.0, -3.0, 0.5, 0.0, 1e3, -1.0, 2.0, 0.1]))
    check_fold(model, x4(14), x4(15), FOLDED, form)


@pytest.mark.parametrize("form", FORMS)
def test_conv_without_bias_gets_a_registered_bias(form):
    model = randomize(Net(nn.Conv2d(C_IN, 6, 3, bias=False), nn.BatchNorm2d(6)), seed=16)
    ep, folded, _ = check_fold(model, x4(17), x4(18), FOLDED, form)
    assert "producer.bias" not in ep.state_dict
    (conv,) = producer_nodes(folded.graph)
    assert op_arg(conv, "bias") is not None
    assert_producers_have_bias(folded)


# --------------------------------------------------------------------------------------------
# Folds: other layer and BatchNorm kinds


class MyBatchNorm2d(nn.BatchNorm2d):
    def describe(self) -> str:
        return "my bn"


class MyConv2d(nn.Conv2d):
    def describe(self) -> str:
        return "my conv"


@pytest.mark.parametrize("form", FORMS)
def test_subclasses_without_own_forward_fold(form):
    model = randomize(Net(MyConv2d(C_IN, 6, 3, bias=False), MyBatchNorm2d(6)), seed=19)
    check_fold(model, x4(20), x4(21), FOLDED, form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn1d_on_2d_activation_folds(bias, form):
    """Decomposed: aten.addmm (bias) or aten.mm (no bias), both with a permuted weight."""
    model = randomize(Net(nn.Linear(5, 6, bias=bias), nn.BatchNorm1d(6)), seed=22)
    ep, folded, _ = check_fold(
        model, (randn(4, 5, seed=23),), (randn(4, 5, seed=24),), FOLDED, form
    )
    if form == "decomposed":
        assert {op_name(n) for n in producer_nodes(ep.graph)} == {"addmm" if bias else "mm"}
    assert_producers_have_bias(folded)


@pytest.mark.parametrize("form", FORMS)
def test_linear_bn1d_on_3d_input_is_skipped(form):
    """(N, C, L_in) -> Linear acts on L -> BatchNorm1d(C) normalises axis 1, not Linear's axis.
    Decomposed, the Linear is view -> addmm -> view, so the BatchNorm's input is a view."""
    model = randomize(Net(nn.Linear(5, 7), nn.BatchNorm1d(3)), seed=25)
    rule = rules.CHANNEL_AXIS if form == "exported" else {rules.CHANNEL_AXIS, rules.NO_PRODUCER}
    check_fold(
        model,
        (randn(2, 3, 5, seed=26),),
        (randn(2, 3, 5, seed=27),),
        skipped(rule),
        form,
        exact=True,
    )


@pytest.mark.parametrize("form", FORMS)
def test_unbatched_conv1d_into_bn1d_is_skipped(form):
    """Conv1d on an unbatched (C, L) input gives (C_out, L_out); BatchNorm1d then normalises
    axis 1, which is L_out, not the convolution's channels."""
    model = randomize(Net(nn.Conv1d(C_IN, 6, 3), nn.BatchNorm1d(7)), seed=28)
    rule = rules.CHANNEL_AXIS if form == "exported" else {rules.CHANNEL_AXIS, rules.NO_PRODUCER}
    check_fold(
        model,
        (randn(C_IN, 9, seed=29),),
        (randn(C_IN, 9, seed=30),),
        skipped(rule),
        form,
        exact=True,
    )


@pytest.mark.parametrize("form", FORMS)
def test_sync_batchnorm_in_eval_folds(form):
    model = randomize(Net(nn.Conv2d(C_IN, 6, 3), nn.SyncBatchNorm(6)), seed=31)
    check_fold(model, x4(32), x4(33), FOLDED, form)


class BNReLU2d(nn.BatchNorm2d):
    """BatchNorm + activation in one module, as some model libraries have."""

    def forward(self, x):
        return torch.relu(super().forward(x))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bn_cls", [BNReLU2d, BatchNormAct2d], ids=["bn-relu", "bn-act-silu"])
def test_bn_subclass_with_activation_folds_and_keeps_the_activation(bn_cls, form):
    model = randomize(Net(nn.Conv2d(C_IN, 6, 3), bn_cls(6)), seed=34)
    fresh = x4(35)
    ep, folded, report = check_fold(model, x4(36), fresh, FOLDED, form)
    if bn_cls is BNReLU2d:
        assert (run(ep, fresh)[0] == 0).any()  # the ReLU matters for this input
    acts = {"relu"} if bn_cls is BNReLU2d else {"silu", "sigmoid"}  # decomposed: x * sigmoid(x)
    assert acts & {op_name(n) for n in folded.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("form", FORMS)
def test_bn_with_forward_hook_folds_and_keeps_the_hook(form):
    """Export traces the hook into the graph: the BatchNorm folds, the hook's ops stay."""
    model = randomize(Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6)), seed=37)
    model.bn.register_forward_hook(lambda _m, _args, out: out * 2 + 1)
    _, folded, _ = check_fold(model, x4(38), x4(39), FOLDED, form)
    ops = {op_name(n) for n in folded.graph.nodes if n.op == "call_function"}
    assert {"mul", "add"} <= ops


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.layers = nn.Sequential(Block(8), Block(8))
        self.up = nn.ConvTranspose2d(8, 4, 2, 2, groups=4)
        self.bn_up = nn.BatchNorm2d(4)
        self.fc = nn.Linear(8, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor):
        y = self.layers(self.stem(x))
        seg = self.bn_up(self.up(y))
        return self.bn_fc(self.fc(y.mean((2, 3)))), seg


@pytest.mark.parametrize("form", FORMS)
def test_nested_sequential_and_residual_model_folds(form):
    model = randomize(ResNetish(), seed=40)
    expected = {
        "stem.1": ("folded", "stem.0"),
        "layers.0.body.1": ("folded", "layers.0.body.0"),
        "layers.0.body.3.1": ("folded", "layers.0.body.3.0"),
        "layers.1.body.1": ("folded", "layers.1.body.0"),
        "layers.1.body.3.1": ("folded", "layers.1.body.3.0"),
        "bn_up": ("folded", "up"),
        "bn_fc": ("folded", "fc"),
    }
    _, folded, _ = check_fold(
        model, (randn(2, 3, 12, 12, seed=41),), (randn(2, 3, 12, 12, seed=42),), expected, form
    )
    assert_producers_have_bias(folded)


@pytest.mark.parametrize("form", FORMS)
def test_demo_net_with_calibrated_statistics_folds_completely(form):
    torch.manual_seed(43)
    model = DemoNet(num_classes=5, width=8)
    gen = torch.Generator().manual_seed(44)
    randomize_batchnorms(
        model, lambda: (torch.randn(4, 3, 16, 16, generator=gen),), seed=43, batches=2
    )
    ep = export(model, (randn(2, 3, 16, 16, seed=45),), form)
    folded, report = fold_program(ep)
    assert len(report) == 16 and [e.action for e in report] == ["folded"] * 16, str(report)
    assert n_bn(ep) == 16 and n_bn(folded) == 0
    check_bn_state_removed(ep, folded, report)
    fresh = (randn(2, 3, 16, 16, seed=46),)
    assert rel_err(run(ep, fresh), run(folded, fresh)) <= REL_TOL
    max_abs, max_rel = bnfold.verify(ep, folded, fresh)
    assert 0 <= max_rel <= REL_TOL and max_abs >= 0


# --------------------------------------------------------------------------------------------
# Graph-only folds: shared producers, shared weights, shared BatchNorms


class ProducerCalledTwice(nn.Module):
    """One conv module, two calls; only the first call goes through a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.producer(x)) - self.producer(2 * x)


@pytest.mark.parametrize("form", FORMS)
def test_producer_called_twice_folds_into_its_own_weight_copy(form):
    """Eager mode must refuse (one weight, two calls); a graph gives the folded call its own
    weight, and the other call still sees the original one."""
    model = randomize(ProducerCalledTwice(), seed=47)
    ep, folded, _ = check_fold(model, x4(48), x4(49), FOLDED, form)
    convs = producer_nodes(folded.graph)
    assert len(convs) == 2
    assert op_arg(convs[0], "weight") is not op_arg(convs[1], "weight")


class OneConvTwoBNs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn1(self.conv(x)) * self.bn2(self.conv(x.flip(-1)))


ONE_CONV_TWO_BNS = {"bn1": ("folded", "conv"), "bn2": ("folded", "conv@1")}


@pytest.mark.parametrize("form", FORMS)
def test_one_conv_module_two_bns_both_fold(form):
    model = randomize(OneConvTwoBNs(), seed=50)
    ep, folded, _ = check_fold(model, x4(51), x4(52), ONE_CONV_TWO_BNS, form)
    c1, c2 = producer_nodes(folded.graph)
    assert op_arg(c1, "weight") is not op_arg(c2, "weight")
    # the original's shared weight is what the eager model has, untouched
    assert torch.equal(ep.state_dict["conv.weight"], model.conv.weight)
    assert_producers_have_bias(folded)


class SecondCallOnly(nn.Module):
    """The conv's second call is the one a BatchNorm follows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.conv(x) * self.bn(self.conv(-x))


@pytest.mark.parametrize("form", FORMS)
def test_second_call_of_a_conv_is_named_with_its_call_index(form):
    model = randomize(SecondCallOnly(), seed=53)
    check_fold(model, x4(54), x4(55), {"bn": ("folded", "conv@1")}, form)


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


@pytest.mark.parametrize("form", FORMS)
def test_tied_weights_each_with_its_own_bn_both_fold(form):
    model = randomize(TiedConvsEachWithBN(), seed=56)
    assert model.conv_b.weight is model.conv_a.weight
    check_fold(
        model, x4(57), x4(58), {"bn_a": ("folded", "conv_a"), "bn_b": ("folded", "conv_b")}, form
    )


class TiedWeights(nn.Module):
    """Two convs share one weight; only one is followed by a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.twin = nn.Conv2d(C_IN, 6, 3)
        self.twin.weight = self.producer.weight
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.producer(x)) * self.twin(x)


@pytest.mark.parametrize("form", FORMS)
def test_weight_tied_to_a_conv_without_bn_folds_without_corrupting_it(form):
    model = randomize(TiedWeights(), seed=59)
    _, folded, _ = check_fold(model, x4(60), x4(61), FOLDED, form)
    c1, c2 = producer_nodes(folded.graph)
    assert op_arg(c1, "weight") is not op_arg(c2, "weight")


class ReadsProducerWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.producer(x)) * self.producer.weight.abs().mean()


@pytest.mark.parametrize("form", FORMS)
def test_producer_weight_read_elsewhere_is_never_corrupted(form):
    """Folding with a private weight copy or refusing are both right; changing what the other
    reader of the weight sees is not."""
    model = randomize(ReadsProducerWeight(), seed=62)
    ep = export(model, x4(63), form)
    folded, report = fold_program(ep)
    entry = report.entry("bn")
    assert entry.folded or entry.rule == rules.UNSHARED, str(report)
    fresh = x4(64)
    assert rel_err(run(ep, fresh), run(folded, fresh)) <= REL_TOL


class BnCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.other = nn.Conv2d(C_IN, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.producer(x)) + self.bn(self.other(x))


@pytest.mark.parametrize("form", FORMS)
def test_bn_called_twice_after_two_convs_both_calls_fold(form):
    model = randomize(BnCalledTwice(), seed=65)
    expected = {"bn": ("folded", "producer"), "bn@1": ("folded", "other")}
    _, folded, _ = check_fold(model, x4(66), x4(67), expected, form)
    assert_producers_have_bias(folded)


class SameConvSameBNTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv(x)) - 0.5 * self.bn(self.conv(x * x))


@pytest.mark.parametrize("form", FORMS)
def test_same_conv_and_same_bn_called_twice_fold(form):
    model = randomize(SameConvSameBNTwice(), seed=68)
    expected = {"bn": ("folded", "conv"), "bn@1": ("folded", "conv@1")}
    check_fold(model, x4(69), x4(70), expected, form)


class ChainedBNs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn2(self.bn1(self.conv(x)))


@pytest.mark.parametrize("form", FORMS)
def test_chained_bns_first_folds_second_stays_or_folds_too(form):
    """bn1 folds into conv; bn2's input is a BatchNorm (report: no-producer), though folding it
    too after bn1 is gone would also be exact."""
    model = randomize(ChainedBNs(), seed=71)
    ep = export(model, x4(72), form)
    folded, report = fold_program(ep)
    assert report.entry("bn1").folded and report.entry("bn1").target == "conv"
    bn2 = report.entry("bn2")
    assert (bn2.folded and bn2.target == "conv") or bn2.rule == rules.NO_PRODUCER, str(report)
    assert n_bn(folded) == len(report.skipped)
    fresh = x4(73)
    assert rel_err(run(ep, fresh), run(folded, fresh)) <= REL_TOL


# --------------------------------------------------------------------------------------------
# Outputs, names and the program's bookkeeping


class TwoOutputs(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)
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


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("how", ["bn-and-other", "other-and-bn", "bn-twice", "bn-and-its-relu"])
def test_model_with_two_outputs_one_a_bn(how, form):
    model = randomize(TwoOutputs(how), seed=74)
    _, folded, _ = check_fold(model, x4(75), x4(76), {"bn": ("folded", "conv")}, form)
    assert len(folded.graph_signature.user_outputs) == 2


@pytest.mark.parametrize("form", FORMS)
def test_model_whose_output_is_a_bn_result(form):
    """The BatchNorm's node was the graph output: the folded program's output is renamed."""
    model = randomize(Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6)), seed=77)
    ep, folded, _ = check_fold(model, x4(78), x4(79), FOLDED, form)
    (out,) = folded.graph_signature.user_outputs
    assert out in {n.name for n in folded.graph.nodes}
    assert out not in {n.name for n in bn_nodes(ep.graph)}


@pytest.mark.parametrize("form", FORMS)
def test_bn_node_without_module_stack_is_named_by_its_node_name(form):
    model = randomize(Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6)), seed=80)
    ep = export(model, x4(81), form)
    (bn,) = bn_nodes(ep.graph)
    for n in [bn, *bn.users]:  # the getitem of the decomposed form too
        n.meta.pop("nn_module_stack", None)
    check_program_fold(ep, x4(82), {bn.name: ("folded", "producer")}, bn_state=False)


class FunctionalBNs(nn.Module):
    """F.batch_norm on the root module's own parameters and buffers: no BatchNorm module."""

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


@pytest.mark.parametrize("form", FORMS)
def test_functional_batch_norms_fold_with_distinct_names(form):
    model = FunctionalBNs().eval()
    ep = export(model, x4(84), form)
    folded, report = fold_program(ep)
    assert len(report) == 2 and all(e.folded for e in report), str(report)
    names = [e.bn for e in report]
    assert all(names) and len(set(names)) == 2
    assert sorted(e.target for e in report) == ["conv_a", "conv_b"]
    assert n_bn(folded) == 0
    fresh = x4(85)
    assert rel_err(run(ep, fresh), run(folded, fresh)) <= REL_TOL


@pytest.mark.parametrize("form", FORMS)
def test_state_dict_of_folded_program_drops_folded_bn_state(form):
    model = randomize(TwoBranches(), seed=86)
    with torch.no_grad():
        model.bn_a.running_var[0] = float("nan")  # bn_a stays, bn_b folds
    ep = export(model, x4(87), form)
    folded, report = fold_program(ep)
    bn_keys = {f"{m}.{b}" for m in ("bn_a", "bn_b") for b in BN_STATE}
    assert bn_keys <= set(ep.state_dict)
    assert {k for k in bn_keys if k.startswith("bn_a.")} <= set(folded.state_dict)
    assert not {k for k in bn_keys if k.startswith("bn_b.")} & set(folded.state_dict)
    assert not any(k.startswith("bn_b.") for k in folded.constants)


BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.mark.parametrize("form", FORMS)
def test_dynamic_batch_dimension_survives_folding(form):
    model = randomize(Mixed(), seed=88)
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = export(model, x4(89, batch=4), form, dynamic_shapes=({0: batch},))
    folded, report = fold_program(ep)
    check_report(report, MIXED_FOLDED)
    (x,) = [n for n in folded.graph.nodes if n.op == "placeholder" and n.name == "x"]
    assert isinstance(x.meta["val"].shape[0], torch.SymInt)
    for n in (3, 7):
        fresh = x4(90 + n, batch=n)
        got = run(folded, fresh)
        assert got[0].shape[0] == n
        assert rel_err(run(ep, fresh), got) <= REL_TOL


@pytest.mark.parametrize("form", FORMS)
def test_save_load_round_trip_of_folded_program(form, tmp_path):
    model = randomize(Mixed(), seed=95)
    ep = export(model, x4(96), form)
    folded, _ = fold_program(ep)
    path = tmp_path / "folded.pt2"
    torch.export.save(folded, path)
    loaded = torch.export.load(path)
    check_program(loaded)
    assert n_bn(loaded) == 0
    assert set(loaded.state_dict) == set(folded.state_dict)
    fresh = x4(97)
    assert_same_outputs(run(folded, fresh), run(loaded, fresh))
    assert rel_err(run(ep, fresh), run(loaded, fresh)) <= REL_TOL


@pytest.mark.parametrize("form", FORMS)
def test_folded_program_survives_run_decompositions(form):
    model = randomize(Mixed(), seed=98)
    ep = export(model, x4(99), form)
    folded, _ = fold_program(ep)
    decomposed = folded.run_decompositions()
    check_program(decomposed)
    assert n_bn(decomposed) == 0
    fresh = x4(100)
    assert rel_err(run(ep, fresh), run(decomposed, fresh)) <= REL_TOL


def test_folding_the_decomposition_of_a_folded_program_changes_nothing_more():
    model = randomize(Mixed(), seed=101)
    folded, _ = fold_program(export(model, x4(102), "exported"))
    again, report = fold_program(folded.run_decompositions())
    assert len(report) == 0 and n_bn(again) == 0


@pytest.mark.parametrize("form", FORMS)
def test_channels_last_input(form):
    model = nn.Sequential(
        nn.Conv2d(C_IN, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2),
        nn.BatchNorm2d(6),
    )
    model = randomize(model, seed=103).to(memory_format=torch.channels_last)
    x = randn(2, C_IN, 7, 7, seed=104).to(memory_format=torch.channels_last)
    fresh = randn(2, C_IN, 7, 7, seed=105).to(memory_format=torch.channels_last)
    ep, folded, _ = check_fold(
        model, (x,), (fresh,), {"1": ("folded", "0"), "4": ("folded", "3")}, form
    )
    want, got = run(ep, (fresh,))[0], run(folded, (fresh,))[0]
    assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
        memory_format=torch.channels_last
    )


@pytest.mark.parametrize("form", FORMS)
def test_float64_program_folds_in_float64(form):
    model = randomize(Net(nn.Conv2d(C_IN, 6, 3, bias=False), nn.BatchNorm2d(6)), seed=106)
    model = model.double()
    _, folded, _ = check_fold(
        model, x4(107, dtype=torch.float64), x4(108, dtype=torch.float64), FOLDED, form, tol=1e-12
    )
    assert {v.dtype for v in folded.state_dict.values() if v.is_floating_point()} == {torch.float64}


class LowPrecisionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C_IN, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 36, 16)
        self.bn_fc = nn.BatchNorm1d(16)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.bn_fc(self.fc(y.flatten(1)))


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


# max|folded - unfolded| / max|unfolded| for a low-precision program; float16 has 11 significant
# bits, bfloat16 8; the folded weights are rounded once more than the unfolded ones.
LOW_PRECISION_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_program_folds(dtype, form):
    torch.manual_seed(109)
    model = randomize(LowPrecisionNet(), seed=109)
    x = randn(64, C_IN, 6, 6, seed=110)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    low = copy.deepcopy(model).to(dtype)
    xl = (x.to(dtype),)
    ep = export(low, (randn(64, C_IN, 6, 6, seed=111, dtype=dtype),), form)
    folded, report = fold_program(ep)
    assert [e.action for e in report] == ["folded"] * 3, str(report)
    assert {v.dtype for v in folded.state_dict.values() if v.is_floating_point()} == {dtype}
    (unfolded_out,), (folded_out,) = run(ep, xl), run(folded, xl)
    assert folded_out.dtype == dtype
    assert rel_err([unfolded_out], [folded_out]) <= LOW_PRECISION_TOL[dtype]
    # against float64: folding costs at most a little accuracy (see test_torch_module)
    assert _rms(folded_out, ref) <= 1.6 * _rms(unfolded_out, ref)


# --------------------------------------------------------------------------------------------
# Skips: the BatchNorm stays, the report says why, the outputs do not change


@pytest.mark.parametrize("form", FORMS)
def test_bn_without_running_stats_is_skipped(form):
    model = randomize(
        Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)), seed=112
    )
    check_fold(
        model, x4(113), x4(114), skipped(rules.INFERENCE_MODE), form, exact=True, bn_state=False
    )


@pytest.mark.parametrize("form", FORMS)
def test_bn_in_training_mode_inside_eval_model_is_skipped(form):
    model = randomize(Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6)), seed=115)
    model.bn.train()
    check_fold(model, x4(116), x4(117), skipped(rules.INFERENCE_MODE), form, exact=True)


class TrainBnAndLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_fc(self.fc(self.bn(self.conv(x)).mean((2, 3))))


@pytest.mark.parametrize("form", FORMS)
def test_training_bn_is_skipped_and_its_neighbour_folds(form):
    """The training-mode BatchNorm's buffer mutations stay in the signature, consistent."""
    model = randomize(TrainBnAndLinear(), seed=118)
    model.bn.train()
    ep = export(model, x4(119), form)
    folded, report = fold_program(ep)
    check_report(report, {"bn": ("skipped", rules.INFERENCE_MODE), "bn_fc": ("folded", "fc")})
    assert len(folded.graph_signature.buffers_to_mutate) == len(
        ep.graph_signature.buffers_to_mutate
    )
    fresh = x4(120)
    assert rel_err(run(ep, fresh), run(folded, fresh)) <= REL_TOL


class OutputUsedTwice(nn.Module):
    def __init__(self, as_output: bool) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.as_output = as_output

    def forward(self, x):
        y = self.producer(x)
        if self.as_output:
            return self.bn(y), y
        return self.bn(y) + y


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("as_output", [False, True], ids=["used-by-add", "model-output"])
def test_producer_output_with_other_users_is_skipped(as_output, form):
    model = randomize(OutputUsedTwice(as_output), seed=121)
    check_fold(model, x4(122), x4(123), skipped(rules.SINGLE_CONSUMER), form, exact=True)


class DataDependent(nn.Module):
    """Branches on a shape (torch.fx cannot trace it; export specialises it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C_IN, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        if x.shape[0] > 1:
            y = torch.relu(y)
        z = self.conv2(y)
        return self.bn2(z) + z  # conv2's output has another user: bn2 must stay


@pytest.mark.parametrize("form", FORMS)
def test_residual_use_of_producer_output_keeps_that_bn(form):
    model = randomize(DataDependent(), seed=124)
    expected = {"bn1": ("folded", "conv1"), "bn2": ("skipped", rules.SINGLE_CONSUMER)}
    check_fold(model, x4(125, 5, 5), x4(126, 5, 5), expected, form)


class NoProducer(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.producer = nn.Conv2d(C_IN, C_IN, 3, padding=1)
        self.bn = nn.BatchNorm2d(C_IN) if where != "view" else nn.BatchNorm1d(C_IN)
        self.where = where

    def forward(self, x):
        if self.where == "input":
            return self.producer(self.bn(x))
        if self.where == "relu":
            return self.bn(torch.relu(self.producer(x)))
        if self.where == "view":  # (N, C, H, W) -> (N, C, H*W): channels still on axis 1
            return self.bn(self.producer(x).flatten(2))
        return self.producer(x)  # never calls bn


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("where", ["input", "relu", "view"])
def test_bn_without_producer_is_skipped(where, form):
    model = randomize(NoProducer(where), seed=127)
    check_fold(model, x4(128), x4(129), skipped(rules.NO_PRODUCER), form, exact=True)


@pytest.mark.parametrize("form", FORMS)
def test_bn_never_called_is_not_in_the_graph_nor_the_report(form):
    model = randomize(NoProducer("never-called"), seed=130)
    ep, folded, report = check_fold(model, x4(131), x4(132), {}, form, exact=True)
    assert len(report) == 0
    assert set(folded.state_dict) == set(ep.state_dict)


class BNPlusInput2d(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward also uses its raw input."""

    def forward(self, x):
        return super().forward(x) + 0.25 * x


class ReLUThenBN2d(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(torch.relu(x))


class ClampedConv2d(nn.Conv2d):
    def forward(self, x):
        return super().forward(x).clamp(min=-0.5)


class WSConv2d(nn.Conv2d):
    """Weight-standardised convolution: its weight is computed at run time."""

    def _conv_forward(self, x, weight, bias):
        mean = weight.mean((1, 2, 3), keepdim=True)
        std = weight.std((1, 2, 3), keepdim=True)
        return super()._conv_forward(x, (weight - mean) / (std + 1e-5), bias)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "producer,bn,rule",
    [
        (lambda: nn.Conv2d(C_IN, 6, 3), lambda: BNPlusInput2d(6), rules.SINGLE_CONSUMER),
        (lambda: nn.Conv2d(C_IN, 6, 3), lambda: ReLUThenBN2d(6), rules.NO_PRODUCER),
        (lambda: ClampedConv2d(C_IN, 6, 3), lambda: nn.BatchNorm2d(6), rules.NO_PRODUCER),
        (
            lambda: WSConv2d(C_IN, 6, 3, bias=False),
            lambda: nn.BatchNorm2d(6),
            {rules.CONSTANT_PARAMS, rules.NO_PRODUCER},
        ),
    ],
    ids=["bn-forward-uses-input", "bn-forward-relu-first", "conv-forward-clamps", "ws-conv"],
)
def test_custom_forwards_are_seen_through_and_skipped(producer, bn, rule, form):
    """In a graph, what a custom forward does is explicit ops: the rule is the graph's."""
    model = randomize(Net(producer(), bn()), seed=133)
    check_fold(model, x4(134), x4(135), skipped(rule), form, exact=True)


class RuntimeParams(nn.Module):
    """The conv weight or the BatchNorm's statistics are user inputs, not state."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.what = what

    def forward(self, x, t):
        if self.what == "weight":
            return self.bn(F.conv2d(x, t, self.conv.bias))
        return F.batch_norm(
            self.conv(x), t, self.bn.running_var, self.bn.weight, self.bn.bias, False
        )


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("what", ["weight", "mean"])
def test_runtime_weight_or_statistics_are_skipped(what, form):
    model = randomize(RuntimeParams(what), seed=136)
    t = randn(6, C_IN, 3, 3, seed=137) if what == "weight" else randn(6, seed=137)
    ep = export(model, (*x4(138), t), form)
    folded, report = fold_program(ep)
    assert len(report) == 1
    (entry,) = report
    assert entry.rule == rules.CONSTANT_PARAMS, str(report)
    assert n_bn(folded) == 1
    fresh = (*x4(139), t * 1.5)
    assert_same_outputs(run(ep, fresh), run(folded, fresh))


# --------------------------------------------------------------------------------------------
# Invalid values: refuse, keep the BatchNorm, keep the outputs


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("what", POISONS)
def test_invalid_values_are_skipped(what, form):
    r = fold_matrix("invalid", form)
    r.check_common()
    entry = r.report.entry(f"bns.{key(what)}")
    assert not entry.folded and entry.rule == rules.VALID_VALUES, str(r.report)
    assert entry.reason.strip()
    want, got = r.output(what)
    assert_same_outputs([want], [got])


@pytest.mark.parametrize("form", FORMS)
def test_one_invalid_bn_does_not_stop_the_valid_fold(form):
    r = fold_matrix("invalid", form)
    r.check_common()
    entry = r.report.entry("bns.healthy")
    assert entry.folded and entry.target == "producers.healthy"
    want, got = r.output("healthy")
    assert rel_err([want], [got]) <= REL_TOL
    assert n_bn(r.folded) == len(POISONS)


@pytest.mark.parametrize("form", FORMS)
def test_analyze_agrees_with_fold_on_invalid_values(form):
    r = fold_matrix("invalid", form)
    before = program_snapshot(r.ep)
    report = bnfold.analyze(r.ep)
    assert_snapshot_equal(before, program_snapshot(r.ep))
    assert report.to_list() == r.report.to_list()


@pytest.mark.parametrize("form", FORMS)
def test_float16_overflow_is_skipped(form):
    model = Net(nn.Conv2d(C_IN, 6, 3), nn.BatchNorm2d(6)).eval()
    with torch.no_grad():
        model.producer.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(140))
        model.bn.weight.fill_(1e4)
        model.bn.running_var.fill_(1e-7)
        model.bn.running_mean.zero_()
    model = model.half()
    _, folded, _ = check_fold(
        model,
        x4(141, dtype=torch.float16),
        x4(142, dtype=torch.float16),
        skipped(rules.VALID_VALUES),
        form,
        exact=True,
    )
    for name, t in folded.state_dict.items():
        assert torch.isfinite(t).all(), name


# --------------------------------------------------------------------------------------------
# API behaviour


class Mixed(nn.Module):
    """Conv, ConvTranspose and Linear folds plus a Linear without BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn_fc = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        y = torch.relu(self.bn_up(self.up(torch.relu(self.bn(self.conv(x))))))
        return self.head(torch.relu(self.bn_fc(self.fc(y.mean((2, 3))))))


MIXED_FOLDED = {"bn": ("folded", "conv"), "bn_up": ("folded", "up"), "bn_fc": ("folded", "fc")}


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(C_IN, 6, 3)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(C_IN, 6, 3)
        self.bn_b = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn_a(self.conv_a(x)), self.bn_b(self.conv_b(x))


@functools.cache
def mixed_program(form: str) -> ExportedProgram:
    """Shared by the API tests, which must all leave it untouched."""
    return export(randomize(Mixed(), seed=143), x4(144), form)


@pytest.mark.parametrize("form", FORMS)
def test_fold_returns_a_new_program_and_leaves_its_input_alone(form):
    ep = mixed_program(form)
    fresh = x4(145)
    want = run(ep, fresh)
    _, folded, report = check_program_fold(ep, fresh, MIXED_FOLDED)
    assert_producers_have_bias(folded)
    assert set(ep.state_dict) - set(folded.state_dict) == {
        f"{m}.{b}" for m in ("bn", "bn_up", "bn_fc") for b in BN_STATE
    }
    assert_same_outputs(want, run(ep, fresh))  # the original still computes what it did
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
    before = program_snapshot(ep)
    with pytest.raises(bnfold.InvalidArgumentError):
        bnfold.fold(ep, inplace=True)
    with pytest.raises(bnfold.InvalidArgumentError):
        bnfold.fold(ep, inplace=True, return_report=True)
    assert_snapshot_equal(before, program_snapshot(ep))


@pytest.mark.parametrize("form", FORMS)
def test_analyze_reports_what_fold_does_and_changes_nothing(form):
    ep = mixed_program(form)
    before = program_snapshot(ep)
    report = bnfold.analyze(ep)
    assert_snapshot_equal(before, program_snapshot(ep))
    check_report(report, MIXED_FOLDED)
    _, fold_report = bnfold.fold(ep, return_report=True)
    assert report.to_list() == fold_report.to_list()
    assert n_bn(ep) == 3


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "producers,expected",
    [
        ({"conv"}, {"bn": "folded", "bn_up": "not-selected", "bn_fc": "not-selected"}),
        ({"linear"}, {"bn": "not-selected", "bn_up": "not-selected", "bn_fc": "folded"}),
        ({"conv", "conv_transpose"}, {"bn": "folded", "bn_up": "folded", "bn_fc": "not-selected"}),
    ],
)
def test_producers_selects_fold_kinds(producers, expected, form):
    ep = mixed_program(form)
    want = {
        bn: ("folded", MIXED_FOLDED[bn][1]) if what == "folded" else ("skipped", rules.NOT_SELECTED)
        for bn, what in expected.items()
    }
    folded, report = fold_program(ep, producers=producers)
    check_report(report, want)
    assert n_bn(folded) == len(report.skipped)
    check_bn_state_removed(ep, folded, report)
    fresh = x4(146)
    assert rel_err(run(ep, fresh), run(folded, fresh)) <= REL_TOL
    assert bnfold.analyze(ep, producers=producers).to_list() == report.to_list()


@pytest.mark.parametrize("form", FORMS)
def test_verify_measures_the_difference(form):
    ep = mixed_program(form)
    folded = bnfold.fold(ep)
    fresh = x4(147)
    max_abs, max_rel = bnfold.verify(ep, folded, fresh)
    assert 0 <= max_rel <= REL_TOL and 0 <= max_abs
    assert max_rel == pytest.approx(rel_err(run(ep, fresh), run(folded, fresh)), rel=0.5, abs=1e-7)
    same_abs, same_rel = bnfold.verify(ep, ep, fresh)
    assert same_abs == 0 and same_rel == 0


# --------------------------------------------------------------------------------------------
# GraphModules from ep.module(): parameters are get_attr nodes


@pytest.mark.parametrize("form", FORMS)
def test_graph_module_fold_returns_a_new_graph_module(form):
    ep = mixed_program(form)
    gm = ep.module()
    before_gm, before_ep = module_snapshot(gm), program_snapshot(ep)
    fresh = x4(148)
    want = run(gm, fresh)
    folded, report = bnfold.fold(gm, return_report=True)
    assert isinstance(folded, fx.GraphModule) and folded is not gm
    assert_snapshot_equal(before_gm, module_snapshot(gm))
    assert_snapshot_equal(before_ep, program_snapshot(ep))
    check_report(report, MIXED_FOLDED)
    folded.graph.lint()
    assert n_bn(gm) == 3 and n_bn(folded) == 0
    assert_producers_have_bias(folded)
    assert rel_err(want, run(folded, fresh)) <= REL_TOL
    assert_same_outputs(want, run(gm, fresh))


@pytest.mark.parametrize("form", FORMS)
def test_graph_module_fold_inplace_returns_the_same_module(form):
    ep = mixed_program(form)
    gm = ep.module()
    fresh = x4(149)
    want = run(gm, fresh)
    result, report = bnfold.fold(gm, inplace=True, return_report=True)
    assert result is gm
    check_report(report, MIXED_FOLDED)
    gm.graph.lint()
    assert n_bn(gm) == 0
    assert rel_err(want, run(gm, fresh)) <= REL_TOL


@pytest.mark.parametrize("form", FORMS)
def test_graph_module_inplace_fold_leaves_the_exported_program_alone(form):
    """ep.module() shares its tensors with ep.state_dict: folding the module must not change
    what the program computes."""
    model = randomize(Mixed(), seed=150)
    ep = export(model, x4(151), form)
    fresh = x4(152)
    want = run(ep, fresh)
    before = program_snapshot(ep)
    bnfold.fold(ep.module(), inplace=True)
    assert_snapshot_equal(before, program_snapshot(ep))
    assert_same_outputs(want, run(ep, fresh))


@pytest.mark.parametrize("form", FORMS)
def test_graph_module_analyze_and_verify(form):
    ep = mixed_program(form)
    gm = ep.module()
    before = module_snapshot(gm)
    report = bnfold.analyze(gm)
    assert_snapshot_equal(before, module_snapshot(gm))
    check_report(report, MIXED_FOLDED)
    folded = bnfold.fold(gm)
    max_abs, max_rel = bnfold.verify(gm, folded, x4(153))
    assert 0 <= max_rel <= REL_TOL and max_abs >= 0


@pytest.mark.parametrize("form", FORMS)
def test_graph_module_one_conv_two_bns_both_fold(form):
    model = randomize(OneConvTwoBNs(), seed=154)
    gm = export(model, x4(155), form).module()
    fresh = x4(156)
    want = run(gm, fresh)
    before = module_snapshot(gm)
    folded, report = bnfold.fold(gm, return_report=True)
    assert_snapshot_equal(before, module_snapshot(gm))
    check_report(report, ONE_CONV_TWO_BNS)
    assert n_bn(folded) == 0
    assert rel_err(want, run(folded, fresh)) <= REL_TOL
    assert_same_outputs(want, run(gm, fresh))  # the shared weight was not corrupted


@pytest.mark.parametrize("form", FORMS)
def test_graph_module_skips_keep_outputs_exactly(form):
    model = randomize(OutputUsedTwice(as_output=False), seed=157)
    gm = export(model, x4(158), form).module()
    folded, report = bnfold.fold(gm, return_report=True)
    check_report(report, skipped(rules.SINGLE_CONSUMER))
    assert n_bn(folded) == 1
    fresh = x4(159)
    assert_same_outputs(run(gm, fresh), run(folded, fresh))
