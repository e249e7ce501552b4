"""Reliability across every form bnfold takes (eager nn.Module, ExportedProgram, the
GraphModule of ``ep.module()``, onnx.ModelProto and onnx_ir.Model):

1. invalid numbers (NaN, +/-inf, negative variance, ``var + eps == 0``, negative eps) in one
   channel of a producer or BatchNorm are never folded, the report says ``valid-values``, the
   poisoned output stays bit-for-bit what it was and the healthy BatchNorms beside it still fold;
2. ``fold``, ``analyze`` and ``verify`` change nothing of their inputs (hashes of every tensor,
   of the graph and signature, training flags, state_dict keys);
3. folds of different models in several threads at once give what they give alone;
4. the command line writes atomically when writing fails anywhere (mid-serialization, fsync,
   chmod, rename, ENOSPC, KeyboardInterrupt), for new outputs, existing ones and the input;
5. every exception a public entry point raises for bad input is a ``BnfoldError``.

Tests marked ``xfail(strict=True, reason="FINDING: ...")`` fail because of a bnfold bug; each has
a standalone reproducer under /tmp/reliability-findings/.
"""

from __future__ import annotations

import builtins
import copy
import errno
import functools
import hashlib
import io
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn
from torch.export import ExportedProgram
from torch.utils._pytree import tree_leaves

import bnfold
from bnfold.cli import main
from bnfold.core import rules
from tests.helpers.check import REL_TOL
from tests.helpers.cli import listing
from tests.helpers.forms import export
from tests.helpers.onnx_models import Graph, conv_model, gemm_model, random_feeds, rel_err, run
from tests.helpers.support import randn, randomize_all

FORMS = ["eager", "program", "graph_module", "onnx", "onnx_ir"]
TORCH_FORMS = FORMS[:3]
ONNX_FORMS = FORMS[3:]


# --------------------------------------------------------------------------------------------
# Helpers shared by the areas


def _as_form(form: str, model: nn.Module, inputs: tuple, onnx_model: Callable[[], onnx.ModelProto]):
    """``model`` in ``form`` (the ONNX forms from ``onnx_model()``) and fold's example inputs."""
    if form == "eager":
        return model, inputs
    if form in ("program", "graph_module"):
        ep = export(model, inputs)
        return (ep if form == "program" else ep.module()), None
    proto = onnx_model()
    return (proto if form == "onnx" else ir.serde.deserialize_model(proto)), None


def _proto(model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model


def _outputs(model, inputs: tuple, names=("x", "z")) -> list[np.ndarray]:
    """Every output of any form on ``inputs`` (tensors; ONNX inputs named ``names``)."""
    if isinstance(model, (onnx.ModelProto, ir.Model)):
        feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=False)}
        return run(_proto(model), feeds)
    module = model.module() if isinstance(model, ExportedProgram) else model
    with torch.no_grad():
        return [t.detach().numpy().copy() for t in tree_leaves(module(*inputs))]


def _assert_bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    """Bit for bit (NaN where NaN was, with its payload; -0 where -0 was)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(b.view(f"u{b.itemsize}"), a.view(f"u{a.itemsize}"))


# --------------------------------------------------------------------------------------------
# 1. Invalid numbers


CH = 2  # the one poisoned channel
VALUES = {"nan": float("nan"), "posinf": float("inf"), "neginf": float("-inf")}
POISONS = [
    f"{where}-{v}"
    for where in ("weight", "bias", "mean", "var", "gamma", "beta")
    for v in ("nan", "posinf", "neginf")
] + ["var-negative", "var-minus-eps", "var0-eps0", "eps-negative"]
CASES = (
    [("conv", p) for p in POISONS]
    + [
        ("linear", p)
        for p in ("weight-nan", "bias-posinf", "var-neginf", "var-negative", "var0-eps0")
    ]
    + [("linear", "eps-negative")]
    + [
        ("conv_transpose", p)
        for p in ("weight-neginf", "mean-nan", "gamma-posinf", "var-minus-eps", "beta-nan")
    ]
)


class PoisonNet(nn.Module):
    """A poisoned producer -> BatchNorm (``bad`` -> ``bad_bn``) beside two healthy pairs
    (``conv`` -> ``bn``, ``fc`` -> ``bn_fc``), each with its own output."""

    def __init__(self, kind: str, eps: float) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.bad, self.bad_bn = nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, eps=eps)
        elif kind == "conv_transpose":
            self.bad = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
            self.bad_bn = nn.BatchNorm2d(6, eps=eps)
        else:
            self.bad, self.bad_bn = nn.Linear(5, 4), nn.BatchNorm1d(4, eps=eps)
        self.conv, self.bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc, self.bn_fc = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, z: torch.Tensor):
        bad = self.bad_bn(self.bad(z if self.kind == "linear" else x))
        return bad, self.bn(self.conv(x)), self.bn_fc(self.fc(z))


def poison_net(kind: str, what: str) -> PoisonNet:
    """A PoisonNet with non-trivial statistics and ``what`` in channel CH of ``bad``/``bad_bn``
    (torch refuses negative eps: that model never runs, see test_torch_refuses_negative_eps)."""
    torch.manual_seed(7)
    eps = {"var0-eps0": 0.0, "eps-negative": -1e-3}.get(what, 1e-5)
    m = randomize_all(PoisonNet(kind, eps), seed=8)
    where, _, v = what.partition("-")
    with torch.no_grad():
        if what == "var-negative":
            m.bad_bn.running_var[CH] = -0.5
        elif what == "var-minus-eps":
            m.bad_bn.running_var[CH] = -m.bad_bn.eps
            assert float(m.bad_bn.running_var[CH] + m.bad_bn.eps) == 0.0
        elif what == "var0-eps0":
            m.bad_bn.running_var[CH] = 0.0
        elif what not in ("eps-negative", "healthy"):
            t = {
                "weight": m.bad.weight,
                "bias": m.bad.bias,
                "mean": m.bad_bn.running_mean,
                "var": m.bad_bn.running_var,
                "gamma": m.bad_bn.weight,
                "beta": m.bad_bn.bias,
            }[where]
            if t.ndim == 1:
                t[CH] = VALUES[v]
            else:  # the output-channel axis: 1 for ConvTranspose (in, out/groups, k, k)
                index = (0, CH) if kind == "conv_transpose" else (CH, 0)
                t[index + (0,) * (t.ndim - 2)] = VALUES[v]
    return m


def poison_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return randn(3, 4, 7, 7, seed=seed), randn(3, 5, seed=seed + 1)


def _cases(form: str) -> list[tuple[str, str]]:
    """The cases a form can hold (torch refuses negative eps: see the last test of this area)."""
    return [c for c in CASES if not (c[1] == "eps-negative" and form in TORCH_FORMS)]


class PoisonMatrix(nn.Module):
    """One PoisonNet per case (``cases.k``), all on the same inputs, every output returned."""

    def __init__(self, cases: list[tuple[str, str]]) -> None:
        super().__init__()
        self.cases = nn.ModuleList(poison_net(kind, what) for kind, what in cases)
        self.eval()

    def forward(self, x: torch.Tensor, z: torch.Tensor):
        return tuple(out for case in self.cases for out in case(x, z))


def poison_onnx(cases: list[tuple[str, str]]) -> onnx.ModelProto:
    """The same networks as one ONNX graph, node names as the torch module names."""
    g = Graph(seed=0)
    x, z = g.input("x", [3, 4, 7, 7]), g.input("z", [3, 5])

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy()

    def bn(y: str, b: nn.Module, name: str) -> str:
        stats = [b.weight, b.bias, b.running_mean, b.running_var]
        params = [
            g.init(f"{name}.{p}", arr(t))
            for p, t in zip(("scale", "B", "mean", "var"), stats, strict=True)
        ]
        return g.bn(y, b.num_features, name=name, params=params, epsilon=b.eps)

    for k, (kind, what) in enumerate(cases):
        m, p = poison_net(kind, what), f"cases.{k}."
        wb = [g.init(p + "bad.weight", arr(m.bad.weight)), g.init(p + "bad.bias", arr(m.bad.bias))]
        if kind == "conv":
            y = g.node("Conv", [x, *wb], name=p + "bad")
        elif kind == "conv_transpose":
            y = g.node("ConvTranspose", [x, *wb], name=p + "bad", strides=[2, 2], group=2)
        else:
            y = g.node("Gemm", [z, *wb], name=p + "bad", transB=1)
        g.output(bn(y, m.bad_bn, p + "bad_bn"))
        w = g.init(p + "conv.weight", arr(m.conv.weight))
        g.output(bn(g.node("Conv", [x, w], name=p + "conv", pads=[1] * 4), m.bn, p + "bn"))
        fc = [z, g.init(p + "fc.weight", arr(m.fc.weight)), g.init(p + "fc.bias", arr(m.fc.bias))]
        g.output(bn(g.node("Gemm", fc, name=p + "fc", transB=1), m.bn_fc, p + "bn_fc"))
    return g.model(ir_version=8)


@functools.cache
def _poison_program() -> ExportedProgram:
    """Exported once, for the program and graph_module forms."""
    return export(PoisonMatrix(_cases("program")), poison_inputs(1))


@functools.cache
def _poison_fold(form: str) -> dict:
    """The matrix of ``form`` folded once: what each case's test checks."""
    cases = _cases(form)
    if form in ("program", "graph_module"):
        ep = _poison_program()
        model, example = (ep if form == "program" else ep.module()), None
    else:
        model, example = _as_form(
            form, PoisonMatrix(cases), poison_inputs(1), lambda: poison_onnx(cases)
        )
    with np.errstate(all="ignore"):
        folded, report = bnfold.fold(model, example, return_report=True)
        analyzed = bnfold.analyze(model, example)
        if form in ONNX_FORMS:  # the result loads, passes the full check, and runs
            folded = onnx.load_from_string(_proto(folded).SerializeToString())
            onnx.checker.check_model(folded, full_check=True)
        fresh = poison_inputs(11)  # not the example inputs
        before, after = _outputs(model, fresh), _outputs(folded, fresh)
    return dict(
        cases=cases,
        model=model,
        folded=folded,
        report=report,
        analyzed=analyzed,
        before=before,
        after=after,
    )


@pytest.mark.parametrize("form", FORMS)
def test_invalid_values_keep_exactly_the_poisoned_batchnorms(form):
    r = _poison_fold(form)
    report, n = r["report"], len(r["cases"])
    assert r["analyzed"].to_list() == report.to_list()
    assert len(report.entries) == 3 * n and len(report.folded) == 2 * n, str(report)
    kept = {e.bn for e in report.skipped}
    assert kept == {f"cases.{k}.bad_bn" for k in range(n)}, str(report)
    if form in ONNX_FORMS:
        left = {x.name for x in r["folded"].graph.node if x.op_type == "BatchNormalization"}
        assert left == kept
    elif form == "eager":
        assert all(type(c.bad_bn) in (nn.BatchNorm1d, nn.BatchNorm2d) for c in r["folded"].cases)


INVALID = [
    pytest.param(form, kind, what, id=f"{form}-{kind}-{what}")
    for form in FORMS
    for kind, what in _cases(form)
]


@pytest.mark.parametrize("form, kind, what", INVALID)
def test_invalid_values_are_refused_bit_exact_and_the_rest_folds(form, kind, what):
    r = _poison_fold(form)
    k = r["cases"].index((kind, what))
    p = f"cases.{k}."
    bad, good, good_fc = (r["report"].entry(p + name) for name in ("bad_bn", "bn", "bn_fc"))
    assert not bad.folded and bad.rule == rules.VALID_VALUES and bad.reason.strip(), bad
    assert good.folded and good.target == p + "conv", good
    assert good_fc.folded and good_fc.target == p + "fc", good_fc
    before, after = r["before"][3 * k : 3 * k + 3], r["after"][3 * k : 3 * k + 3]
    _assert_bits_equal(before[0], after[0])  # NaN where NaN was
    for b, a in zip(before[1:], after[1:], strict=True):
        assert rel_err([b], [a]) <= REL_TOL


def test_poisoned_outputs_are_really_poisoned():
    """The cases above are not vacuous: each poison changes the poisoned output's channel CH
    (or, for var=+inf, makes it constant), and var=-eps / var=0,eps=0 really divide by 0."""
    fresh = poison_inputs(11)
    healthy = _outputs(poison_net("conv", "healthy"), fresh)[0]
    for what in POISONS:
        if what == "eps-negative":
            continue
        with np.errstate(all="ignore"):
            out = _outputs(poison_net("conv", what), fresh)[0]
        assert not np.array_equal(out[:, CH], healthy[:, CH]), what
        if "eps" not in what:  # one channel only
            assert np.array_equal(out[:, CH + 1], healthy[:, CH + 1]), what
        if what.startswith(("var-minus", "var0", "var-neg", "weight-", "gamma-", "mean-")):
            assert not np.isfinite(out[:, CH]).all(), what


def test_torch_refuses_negative_eps():
    """Why the torch forms have no negative-eps case: torch itself will not run one."""
    with pytest.raises(ValueError, match="eps"):
        F.batch_norm(torch.ones(2, 3), torch.zeros(3), torch.ones(3), eps=-1e-3)


# --------------------------------------------------------------------------------------------
# 2. No input mutation


class MixedNet(nn.Module):
    """Foldable and unfoldable BatchNorms: a conv called twice with a BatchNorm after each
    (eager: unshared-weights; graphs fold both), a residual (single-consumer), a chain conv ->
    BN -> convT -> BN, a training-mode BN (inference-mode), Linear on 3-D (channel-axis), and
    Linear + BatchNorm1d on 2-D."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_s1, self.bn_s2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.res, self.bn_res = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv, self.bn = nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6)
        self.up, self.bn_up = nn.ConvTranspose2d(6, 4, 2, 2), nn.BatchNorm2d(4)
        self.train_conv, self.bn_train = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fc3, self.bn3 = nn.Linear(5, 5), nn.BatchNorm1d(5)
        self.fc, self.bn_fc = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, z: torch.Tensor):
        a = self.bn_s2(self.shared(torch.relu(self.bn_s1(self.shared(x)))))
        r = self.res(a)
        a = self.bn_res(r) + r
        u = self.bn_up(self.up(self.bn(self.conv(a))))
        t = self.bn_train(self.train_conv(x))
        w = self.bn3(self.fc3(z))
        return u, t, w, self.bn_fc(self.fc(w.mean(2)))


MIXED_DECISIONS = {
    "eager": {
        "bn_s1": rules.UNSHARED,
        "bn_s2": rules.UNSHARED,
        "bn_res": rules.SINGLE_CONSUMER,
        "bn": None,
        "bn_up": None,
        "bn_train": rules.INFERENCE_MODE,
        "bn3": rules.CHANNEL_AXIS,
        "bn_fc": None,
    },
}
MIXED_DECISIONS["program"] = MIXED_DECISIONS["graph_module"] = {
    **MIXED_DECISIONS["eager"],
    "bn_s1": None,
    "bn_s2": None,
}


def mixed_net() -> MixedNet:
    torch.manual_seed(3)
    model = randomize_all(MixedNet(), seed=4)
    model.bn_train.train()
    return model


def mixed_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return randn(2, 4, 8, 8, seed=seed), randn(2, 5, 5, seed=seed + 1)


def mixed_onnx() -> onnx.ModelProto:
    """The ONNX counterpart: a weight shared by two Convs each with a BatchNorm (both fold), a
    residual, Conv -> BN -> ConvTranspose -> BN, MatMul on 3-D straight into a BatchNorm
    (channel-axis), Gemm + BN, and a BatchNorm whose scale is also a graph input
    (constant-params)."""
    g = Graph(seed=5)
    x, z = g.input("x", [2, 4, 8, 8]), g.input("z", [2, 5, 5])
    w = g.weight("shared.weight", [4, 4, 3, 3])
    a = g.bn(g.node("Conv", [x, w], name="shared", pads=[1] * 4), 4, name="bn_s1")
    a = g.bn(g.node("Conv", [g.node("Relu", [a]), w], name="shared_1", pads=[1] * 4), 4, "bn_s2")
    r = g.node("Conv", [a, g.weight("res.weight", [4, 4, 1, 1])], name="res")
    a = g.node("Add", [g.bn(r, 4, name="bn_res"), r])
    c = g.bn(g.node("Conv", [a, g.weight("conv.weight", [6, 4, 3, 3])], name="conv"), 6, "bn")
    u = g.node("ConvTranspose", [c, g.weight("up.weight", [6, 4, 2, 2])], name="up", strides=[2, 2])
    g.output(g.bn(u, 4, name="bn_up"))
    m = g.node("MatMul", [z, g.weight("fc3.weight", [5, 5])], name="fc3")
    g.output(g.bn(m, 5, name="bn3"))
    q = g.node("ReduceMean", [z], axes=[2], keepdims=0)
    fc = [q, g.weight("fc.weight", [4, 5]), g.init("fc.bias", g.uniform(4, True))]
    g.output(g.bn(g.node("Gemm", fc, name="fc", transB=1), 4, name="bn_fc"))
    params = g.bn_params(4, "bn_in")
    y = g.node("Conv", [x, g.weight("in.weight", [4, 4, 1, 1])], name="in_conv")
    g.output(g.bn(y, 4, name="bn_in", params=params))
    model = g.model(opset=15, ir_version=8)
    scale = next(t for t in model.graph.initializer if t.name == params[0])
    model.graph.input.append(helper.make_tensor_value_info(scale.name, scale.data_type, [4]))
    return model


MIXED_DECISIONS["onnx"] = MIXED_DECISIONS["onnx_ir"] = {
    "bn_s1": None,
    "bn_s2": None,
    "bn_res": rules.SINGLE_CONSUMER,
    "bn": None,
    "bn_up": None,
    "bn3": rules.CHANNEL_AXIS,
    "bn_fc": None,
    "bn_in": rules.CONSTANT_PARAMS,
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_sha(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return _sha(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _module_state(m: nn.Module) -> dict:
    tensors = [
        *m.named_parameters(remove_duplicate=False),
        *m.named_buffers(remove_duplicate=False),
    ]
    state = {
        "tensors": {
            k: (str(v.dtype), tuple(v.shape), v.stride(), v.requires_grad, _tensor_sha(v))
            for k, v in tensors
        },
        "ids": {k: id(v) for k, v in tensors},
        "training": {k: s.training for k, s in m.named_modules(remove_duplicate=False)},
        "modules": {k: type(s).__name__ for k, s in m.named_modules(remove_duplicate=False)},
        "state_dict": list(m.state_dict()),
    }
    if isinstance(m, torch.fx.GraphModule):
        state["graph"] = str(m.graph)
        state["code"] = m.code
    return state


def _state(model) -> dict:
    """Everything a fold could change in ``model``, as comparable values."""
    if isinstance(model, onnx.ModelProto):
        return {"proto": _sha(model.SerializeToString())}
    if isinstance(model, ir.Model):
        return {"proto": _sha(ir.serde.serialize_model(model).SerializeToString())}
    if isinstance(model, ExportedProgram):
        return {
            "graph": str(model.graph),
            "signature": str(model.graph_signature),
            "state_dict": {k: _tensor_sha(v) for k, v in model.state_dict.items()},
            "constants": {
                k: _tensor_sha(v) if isinstance(v, torch.Tensor) else repr(v)
                for k, v in model.constants.items()
            },
            "call_graph": str(model.module_call_graph),
            "graph_module": _module_state(model.graph_module),
        }
    return _module_state(model)


def _mixed(form: str):
    model, example = _as_form(form, mixed_net(), mixed_inputs(1), mixed_onnx)
    return model, example, mixed_inputs(1) if form in TORCH_FORMS else None


def _check_mixed_fold(form, model, folded, report) -> None:
    assert {e.bn: e.rule for e in report} == MIXED_DECISIONS[form], str(report)
    fresh = mixed_inputs(21)
    before, after = _outputs(model, fresh), _outputs(folded, fresh)
    for b, a in zip(before, after, strict=True):
        assert rel_err([b], [a]) <= REL_TOL


@pytest.mark.parametrize("form", FORMS)
def test_fold_and_analyze_change_nothing(form):
    model, example, _ = _mixed(form)
    inputs = copy.deepcopy(example)
    states = [_state(model)]
    folded, report = bnfold.fold(model, example, return_report=True)
    states.append(_state(model))
    analyzed = bnfold.analyze(model, example)
    states.append(_state(model))
    assert analyzed.to_list() == report.to_list()
    assert states[1] == states[0], "fold changed its input"
    assert states[2] == states[0], "analyze changed its input"
    if example is not None:
        for a, b in zip(example, inputs, strict=True):
            assert torch.equal(a, b)
    # and the fold is right (copies: a training-mode BatchNorm updates its statistics when run)
    if form in ("eager", "graph_module"):
        model, folded = copy.deepcopy(model), copy.deepcopy(folded)
    _check_mixed_fold(form, model, folded, report)


@pytest.mark.parametrize(
    "form",
    [
        "eager",
        "program",
        "graph_module",
        "onnx",
        "onnx_ir",
    ],
)
def test_verify_changes_nothing(form):
    model, example, verify_inputs = _mixed(form)
    folded = bnfold.fold(model, example)
    before, before_folded = _state(model), _state(folded)
    inputs = copy.deepcopy(verify_inputs)
    max_abs, max_rel = bnfold.verify(model, folded, verify_inputs)
    assert 0 < max_rel <= REL_TOL and max_abs > 0  # folds happened, and they are exact enough
    if verify_inputs is not None:
        for a, b in zip(verify_inputs, inputs, strict=True):
            assert torch.equal(a, b)
    assert _state(model) == before, "verify changed the original model"
    assert _state(folded) == before_folded, "verify changed the folded model"


# --------------------------------------------------------------------------------------------
# 3. Threads


class ThreadNet(nn.Module):
    """``depth`` conv + BN blocks (one residual each), a ConvTranspose + BN, a Linear + BN1d
    head when ``head`` (a fold the eager frontend decides by running the example inputs)."""

    def __init__(self, width: int, depth: int, head: bool) -> None:
        super().__init__()
        self.stem, self.bn_stem = (
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(depth))
        self.up, self.bn_up = nn.ConvTranspose2d(width, 4, 2, 2, groups=2), nn.BatchNorm2d(4)
        self.head = head
        if head:
            self.fc, self.bn_fc = nn.Linear(width, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor):
        y = torch.relu(self.bn_stem(self.stem(x)))
        for conv, bn in zip(self.convs, self.bns, strict=True):
            y = torch.relu(bn(conv(y))) + y
        up = self.bn_up(self.up(y))
        return (up, self.bn_fc(self.fc(y.mean((2, 3))))) if self.head else up


def thread_net(i: int, head: bool) -> tuple[nn.Module, tuple]:
    torch.manual_seed(100 + i)
    model = randomize_all(ThreadNet(4 + 2 * i, 4 + i, head), seed=100 + i)
    return model, (randn(2, 3, 8, 8, seed=200 + i),)


@functools.cache
def _thread_program(i: int) -> ExportedProgram:
    return export(*thread_net(i, head=True))


def thread_onnx(i: int) -> onnx.ModelProto:
    """A chain of Conv + BN + Relu, a ConvTranspose + BN and a Gemm + BN, sized by ``i``."""
    g = Graph(seed=300 + i)
    width, y = 4 + 2 * i, g.input("x", [2, 3, 8, 8])
    y = g.bn(g.node("Conv", [y, g.weight("stem", [width, 3, 3, 3])], pads=[1] * 4), width)
    for k in range(6 + i):
        w = g.weight(f"w{k}", [width, width, 3, 3])
        y = g.node("Relu", [g.bn(g.node("Conv", [y, w], pads=[1] * 4), width)])
    up = g.node("ConvTranspose", [y, g.weight("up", [width, 2, 2, 2])], strides=[2, 2], group=2)
    g.output(g.bn(up, 4))
    q = g.node("ReduceMean", [y], axes=[2, 3], keepdims=0)
    g.output(g.bn(g.node("Gemm", [q, g.weight("fc", [5, width])], transB=1), 5))
    return g.model(opset=15, ir_version=8)


def _thread_job(form: str, i: int):
    """(model, fold example inputs, check(folded)) for job ``i`` of ``form``; the expected
    outputs are computed here, before any thread starts."""
    if form in ONNX_FORMS:
        proto = thread_onnx(i)
        feeds = random_feeds(proto, seed=i)
        expected = run(proto, feeds)
        model = proto if form == "onnx" else ir.serde.deserialize_model(proto)
        n_bn = 9 + i

        def check(result):
            folded, report = result
            assert len(report.folded) == n_bn == len(report.entries), str(report)
            got = run(_proto(folded), feeds)
            assert rel_err(expected, got) <= REL_TOL

        return model, None, check
    # The eager jobs have no Linear head: its fold runs the model, which a trace in another
    # thread breaks (test_eager_fold_beside_a_trace_in_another_thread).
    module, inputs = thread_net(i, head=form != "eager")
    fresh = (randn(2, 3, 8, 8, seed=250 + i),)
    expected = _outputs(module, fresh)
    n_bn = 6 + i + (form != "eager")
    if form == "eager":
        model, example = module, inputs
    else:
        ep = _thread_program(i)
        model, example = (ep if form == "program" else ep.module()), None

    def check(result):
        folded, report = result
        assert len(report.folded) == n_bn == len(report.entries), str(report)
        got = _outputs(folded, fresh)
        assert rel_err(expected, got) <= REL_TOL

    return model, example, check


def _run_concurrently(jobs: list, rounds: int = 3) -> None:
    """Fold every job's model in its own thread, all released at once by a barrier, ``rounds``
    times; check each result after the threads are joined."""
    for _ in range(rounds):
        barrier = threading.Barrier(len(jobs), timeout=60)
        results: list = [None] * len(jobs)

        def work(k: int, barrier: threading.Barrier, results: list) -> None:
            model, example, _ = jobs[k]
            barrier.wait()
            try:
                results[k] = bnfold.fold(model, example, return_report=True)
            except BaseException as e:  # noqa: BLE001 - reported below
                results[k] = e

        threads = [
            threading.Thread(target=work, args=(k, barrier, results)) for k in range(len(jobs))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for (_, _, check), result in zip(jobs, results, strict=True):
            assert not isinstance(result, BaseException), repr(result)
            check(result)


@pytest.mark.parametrize("form", FORMS)
def test_concurrent_folds_of_different_models(form):
    _run_concurrently([_thread_job(form, i) for i in range(4)])


def test_concurrent_folds_of_every_form_at_once():
    _run_concurrently([_thread_job(form, i) for i, form in enumerate(FORMS)])


# Module-level: bnfold deep-copies the models, and an Event cannot be copied.
_RUNNING, _TRACING = threading.Event(), threading.Event()


class _SlowToTrace(nn.Module):
    """Conv + BN whose forward waits while torch.fx traces it (a long trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if isinstance(y, torch.fx.Proxy):
            _TRACING.set()
            time.sleep(1.0)
        return self.bn(y)


class _LinearHead(nn.Module):
    """Linear + BatchNorm1d (decided by running the example inputs), slow to run for real."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, z):
        if not isinstance(z, torch.fx.Proxy):
            _RUNNING.set()  # bnfold runs the model to see the Linear's output rank
            _TRACING.wait(3)  # ... while the other thread traces
        return self.bn(self.fc(z))


def test_eager_fold_beside_a_trace_in_another_thread():
    head, slow = randomize_all(_LinearHead(), seed=1), randomize_all(_SlowToTrace(), seed=2)
    z, x = (randn(3, 5, seed=3),), (randn(2, 3, 6, 6, seed=4),)
    _TRACING.set()  # let the real runs below through
    expected_head, expected_slow = _outputs(head, z), _outputs(slow, x)
    _RUNNING.clear()
    _TRACING.clear()
    results: dict = {}

    def fold(key: str, model: nn.Module, inputs: tuple) -> None:
        if key == "slow":
            _RUNNING.wait(5)  # the head's fold has traced and now runs its model
        try:
            results[key] = bnfold.fold(model, inputs, return_report=True)
        except Exception as e:  # noqa: BLE001 - checked below
            results[key] = e

    threads = [
        threading.Thread(target=fold, args=("head", head, z)),
        threading.Thread(target=fold, args=("slow", slow, x)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    _TRACING.set()  # nobody waits any more
    for key, expected, inputs in (("head", expected_head, z), ("slow", expected_slow, x)):
        result = results[key]
        assert not isinstance(result, Exception), repr(result)
        folded, report = result
        assert [e.folded for e in report] == [True], str(report)
        got = _outputs(folded, inputs)
        assert rel_err([expected[0]], [got[0]]) <= REL_TOL


# --------------------------------------------------------------------------------------------
# 4. Atomic writes through the command line, with injected failures


class CliNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.up, self.bn_up = nn.ConvTranspose2d(16, 8, 2, 2), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn_up(self.up(torch.relu(self.bn(self.conv(x)))))


def cli_onnx(seed: int) -> onnx.ModelProto:
    """Conv (a weight over 1 KiB: external data) + BN + Relu + ConvTranspose + BN."""
    g = Graph(seed=seed)
    x = g.input("x", [2, 3, 8, 8])
    y = g.node(
        "Conv", [x, g.weight("w", [16, 3, 3, 3]), g.init("b", g.uniform(16, True))], pads=[1] * 4
    )
    y = g.node("Relu", [g.bn(y, 16)])
    y = g.node("ConvTranspose", [y, g.weight("up", [16, 8, 2, 2])], strides=[2, 2])
    g.output(g.bn(y, 8, name="bn_up"))
    return g.model(opset=15, ir_version=8)


@functools.cache
def _pt2_bytes(seed: int) -> bytes:
    torch.manual_seed(seed)
    model = randomize_all(CliNet(), seed=seed)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(export(model, (randn(2, 3, 8, 8, seed=seed),)), f)
    return f.getvalue()


def _write_model(fmt: str, path: Path, seed: int) -> None:
    if fmt == "pt2":
        path.write_bytes(_pt2_bytes(seed))
    elif fmt == "onnx-external":
        onnx.save(
            cli_onnx(seed),
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=0,
        )
    else:
        onnx.save(cli_onnx(seed), str(path))


class _Budget:
    """Bytes that writes into the watched directory may still write before failing."""

    def __init__(self, limit: int | None, exc: BaseException | None) -> None:
        self.limit, self.exc, self.written, self.fired = limit, exc, 0, 0


class _FailingWriter(io.BufferedWriter):
    """A binary file that writes the first ``budget.limit`` bytes, then raises ``budget.exc``
    (a real file object: torch.export.save and onnx-ir check what they are given)."""

    budget: _Budget
    hide_fileno = False  # onnx-ir would write around ``write`` through the descriptor

    def write(self, b) -> int:
        data = memoryview(b).cast("B")
        budget = self.budget
        if budget.limit is not None and budget.written + len(data) > budget.limit:
            keep = budget.limit - budget.written
            super().write(data[:keep].tobytes())
            budget.written += keep
            budget.fired += 1
            raise budget.exc
        budget.written += len(data)
        return super().write(b)

    def fileno(self) -> int:
        if self.hide_fileno:
            raise io.UnsupportedOperation("fileno")
        return super().fileno()


def _inject(monkeypatch, point: str, directory: Path) -> _Budget:
    """Make writing into ``directory`` fail at ``point``; the budget counts the failures."""
    budget = _Budget(None, None)
    home = os.path.realpath(directory)

    def inside(p) -> bool:
        return isinstance(p, (str, os.PathLike)) and os.path.realpath(p).startswith(home + os.sep)

    def fail(exc: BaseException):
        budget.fired += 1
        raise exc

    if point.startswith("write"):
        budget.limit = 300  # after the first 300 bytes: a partial file exists
        budget.exc = {
            "write-eio": OSError(errno.EIO, "Input/output error"),
            "write-enospc": OSError(errno.ENOSPC, "No space left on device"),
            "write-interrupt": KeyboardInterrupt(),
        }[point]
        real_open, real_fdopen = builtins.open, os.fdopen

        def wrap(raw, hide_fileno: bool):
            f = _FailingWriter(raw)
            f.budget, f.hide_fileno = budget, hide_fileno
            return f

        def open_(file, mode="r", *args, **kwargs):
            if mode in ("wb", "xb") and not args and not kwargs and inside(file):
                return wrap(real_open(file, mode, buffering=0), True)
            return real_open(file, mode, *args, **kwargs)

        def fdopen(fd, mode="r", *args, **kwargs):
            if mode in ("wb", "w+b") and not args and not kwargs:
                return wrap(real_fdopen(fd, mode, buffering=0), False)
            return real_fdopen(fd, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "fdopen", fdopen)
    elif point == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: fail(OSError(errno.EIO, "Input/output error")))
    elif point == "chmod":
        real_chmod = os.chmod

        def chmod(path, *args, **kwargs):
            if inside(path):
                fail(PermissionError(errno.EPERM, "Operation not permitted"))
            return real_chmod(path, *args, **kwargs)

        monkeypatch.setattr(os, "chmod", chmod)
    elif point in ("rename-model", "rename-data"):
        # The renames into the directory itself (not those between temporary files): of the
        # model file, or (external data) of the data file, the first of the two.
        def renaming(real):
            def rename(src, dst, *args, **kwargs):
                target = os.path.realpath(dst)
                if os.path.dirname(target) == home and (
                    point == "rename-data" or not target.endswith(".data")
                ):
                    fail(OSError(errno.EXDEV, "Invalid cross-device link"))
                return real(src, dst, *args, **kwargs)

            return rename

        monkeypatch.setattr(os, "replace", renaming(os.replace))
        monkeypatch.setattr(os, "rename", renaming(os.rename))
    else:
        raise AssertionError(point)
    return budget


SUFFIX = {"onnx-inline": ".onnx", "onnx-external": ".onnx", "pt2": ".pt2"}
POINTS = ["write-eio", "write-enospc", "write-interrupt", "fsync", "chmod", "rename-model"]
ATOMIC = [
    pytest.param(fmt, point, target, id=f"{fmt}-{point}-{target}")
    for fmt in SUFFIX
    for point in POINTS + (["rename-data"] if fmt == "onnx-external" else [])
    for target in ("new", "existing", "input")
]


def _cli_setup(tmp_path: Path, fmt: str, target: str) -> tuple[Path, Path, Path]:
    """(directory, input, output) with the input (and an existing output) written."""
    d = tmp_path / "work"
    d.mkdir()
    src = d / f"in{SUFFIX[fmt]}"
    _write_model(fmt, src, seed=1)
    out = d / f"out{SUFFIX[fmt]}"
    if target == "existing":
        _write_model(fmt, out, seed=2)
    return d, src, (src if target == "input" else out)


@pytest.mark.parametrize("fmt, point, target", ATOMIC)
def test_failed_write_leaves_the_directory_as_it_was(
    tmp_path, monkeypatch, capsys, fmt, point, target
):
    d, src, out = _cli_setup(tmp_path, fmt, target)
    before = listing(d, recursive=True)
    capsys.readouterr()
    with monkeypatch.context() as mp:
        budget = _inject(mp, point, d)
        status = main([str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert budget.fired >= 1, "the failure was not injected"
    if point == "write-interrupt" and fmt != "pt2":  # pt2: see test_pt2_write_failure_keeps...
        assert status == 130
    else:
        assert status != 0
    assert err.count("\n") == 1 and err.startswith("bnfold: "), err
    assert listing(d, recursive=True) == before


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_injection_points_are_harmless_when_nothing_fails(tmp_path, monkeypatch, capsys, fmt):
    """The failing writer with an infinite budget: the command succeeds, the folded model
    computes what the original computes (so the failures above are the injected ones)."""
    d, src, out = _cli_setup(tmp_path, fmt, "existing")
    with monkeypatch.context() as mp:
        budget = _inject(mp, "write-eio", d)
        budget.limit = None
        assert main([str(src), "-o", str(out)]) == 0, capsys.readouterr().err
    assert budget.written > 1000
    x = randn(2, 3, 8, 8, seed=9)
    if fmt == "pt2":
        original, folded = (torch.export.load(str(p)) for p in (src, out))
        assert "batch_norm" not in str(folded.graph) and "batch_norm" in str(original.graph)
        want, got = _outputs(original, (x,)), _outputs(folded, (x,))
    else:
        assert sorted(os.listdir(d)) == sorted(
            ["in.onnx", "out.onnx"] + (["in.onnx.data", "out.onnx.data"] if "ext" in fmt else [])
        )
        original, folded = onnx.load(str(src)), onnx.load(str(out))
        assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
        want, got = run(original, {"x": x.numpy()}), run(folded, {"x": x.numpy()})
    assert rel_err([want[0]], [got[0]]) <= REL_TOL


@pytest.mark.parametrize("point", ["write-enospc", "write-interrupt"])
def test_pt2_write_failure_keeps_its_cause(tmp_path, monkeypatch, capsys, point):
    d, src, out = _cli_setup(tmp_path, "pt2", "new")
    capsys.readouterr()
    with monkeypatch.context() as mp:
        _inject(mp, point, d)
        status = main([str(src), "-o", str(out)])
    err = capsys.readouterr().err
    if point == "write-enospc":  # as for ONNX files: a ModelFileError naming the cause
        assert status == 1 and "No space left on device" in err, err
    else:
        assert status == 130 and err == "bnfold: interrupted\n", err


@pytest.mark.parametrize("target", ["existing", "input"])
def test_failed_rename_without_hard_links_leaves_the_directory_as_it_was(
    tmp_path, monkeypatch, capsys, target
):
    d, src, out = _cli_setup(tmp_path, "onnx-external", target)
    before = listing(d, recursive=True)
    with monkeypatch.context() as mp:
        mp.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no")))
        budget = _inject(mp, "rename-model", d)
        assert main([str(src), "-o", str(out)]) == 1
    assert budget.fired == 1
    assert listing(d, recursive=True) == before


# --------------------------------------------------------------------------------------------
# 5. Error types


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)

    def forward(self, x):
        return (self.bn(self.conv(x)),)


class _TensorOut(_TupleOut):
    def forward(self, x):
        return self.bn(self.conv(x))


class _DictOut(_TupleOut):
    def forward(self, x):
        return {"y": self.bn(self.conv(x))}


HEALTHY = [("conv", "healthy")]


@functools.cache
def _err_models() -> tuple[ExportedProgram, onnx.ModelProto]:
    """A healthy PoisonNet (one of its folds needs the example inputs' shapes) as a program
    and as ONNX."""
    return export(PoisonMatrix(HEALTHY), poison_inputs(1)), poison_onnx(HEALTHY)


def _e(which: str):
    """A fresh model of form ``which`` (a bad call must not leak into the next case)."""
    ep, proto = _err_models()
    if which == "eager":
        return PoisonMatrix(HEALTHY)
    if which == "program":
        return ep
    if which == "graph_module":
        return ep.module()
    fresh = onnx.ModelProto()
    fresh.CopyFrom(proto)
    return fresh if which == "onnx" else ir.serde.deserialize_model(fresh)


EX = poison_inputs(1)


def _onnx_edit(edit) -> Callable[[], onnx.ModelProto]:
    def make():
        p = conv_model(seed=3)  # x -> Conv "conv" (w, b) -> BatchNormalization "bn"
        edit(p)
        return p

    return make


def _set_attr(node: int, name: str, value):
    def edit(p):
        n = p.graph.node[node]
        kept = [a for a in n.attribute if a.name != name]
        del n.attribute[:]
        n.attribute.extend([*kept, helper.make_attribute(name, value)])

    return edit


def _gemm_c7() -> onnx.ModelProto:
    p = gemm_model()  # Gemm N=4 with C of shape (4,); C of 7 values fits no output
    c = next(t for t in p.graph.initializer if t.name == "c")
    c.CopyFrom(onnx.numpy_helper.from_array(np.ones(7, np.float32), "c"))
    return p


def _dangling() -> ir.Model:
    model = ir.serde.deserialize_model(conv_model(seed=3))
    model.graph.node(0).replace_input_with(0, ir.Value(name="nowhere"))
    return model


def _eps(value):
    def make():
        m = _TensorOut().eval()
        m.bn.eps = value
        return m

    return make


def _xfail(reason: str, repro: str):
    return pytest.mark.xfail(
        strict=True, reason=f"FINDING: {reason}; /tmp/reliability-findings/{repro}"
    )


INV, UNS, VER, TRN = (
    bnfold.InvalidArgumentError,
    bnfold.UnsupportedModelError,
    bnfold.VerificationError,
    bnfold.TrainingModeError,
)
_fold, _analyze, _verify = bnfold.fold, bnfold.analyze, bnfold.verify


def _no_external_data() -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        kw = dict(save_as_external_data=True, size_threshold=0, location="m.onnx.data")
        onnx.save(conv_model(seed=3), path, **kw)
        return onnx.load(path, load_external_data=False)


def _sparse() -> onnx.ModelProto:
    p = conv_model(seed=3)
    b = next(t for t in p.graph.initializer if t.name == "b")
    values = onnx.numpy_helper.to_array(b)
    indices = onnx.numpy_helper.from_array(np.arange(values.size, dtype=np.int64), "b_idx")
    sparse = helper.make_sparse_tensor(b, indices, [values.size])
    p.graph.initializer.remove(b)
    p.graph.sparse_initializer.append(sparse)
    return p


def _case(name: str, expected: type, call: Callable[[], object], *marks):
    """A bad call and the BnfoldError subclass it raises (as seen; marks: findings)."""
    return pytest.param(call, expected, id=name, marks=marks)


def _drop_conv_inputs(p: onnx.ModelProto) -> None:
    del p.graph.node[0].input[1:]  # a Conv without weight (and bias)


def _relu_into(p: onnx.ModelProto) -> None:
    p.graph.node.append(helper.make_node("Relu", ["x"], ["conv_out"]))  # a second producer


X7 = torch.randn(3, 7, 7, 7)  # 7 channels where 4 are expected
ERROR_CASES = [
    # not a model
    _case("fold-str", UNS, lambda: _fold("model.onnx")),
    _case("fold-none", UNS, lambda: _fold(None)),
    _case("fold-dict", UNS, lambda: _fold({"conv": 1})),
    _case("analyze-str", UNS, lambda: _analyze("model.pt2")),
    _case("analyze-none", UNS, lambda: _analyze(None)),
    _case("verify-dicts", UNS, lambda: _verify({}, {}, None)),
    _case("fold-scripted", UNS, lambda: _fold(torch.jit.script(_TensorOut().eval()))),
    _case("fold-unflattened", UNS, lambda: _fold(torch.export.unflatten(_e("program")))),
    _case("fold-meta", UNS, lambda: _fold(_TensorOut().to("meta").eval())),
    # training mode
    _case("fold-training", TRN, lambda: _fold(_e("eager").train(), EX)),
    _case("analyze-training", TRN, lambda: _analyze(_e("eager").train(), EX)),
    # producers=
    *[
        _case(f"producers-bogus-{f}", INV, lambda f=f: _fold(_e(f), producers="bogus"))
        for f in FORMS
    ],
    _case("producers-int", INV, lambda: _fold(_e("eager"), EX, producers=5)),
    _case("producers-list-with-int", INV, lambda: _fold(_e("onnx"), producers=["conv", 3])),
    _case("producers-comma-string", INV, lambda: _analyze(_e("program"), producers="conv,linear")),
    # inplace=
    _case("inplace-true-program", INV, lambda: _fold(_e("program"), inplace=True)),
    *[
        _case(
            f"inplace-str-{f}",
            INV,
            lambda f=f: _fold(_e(f), EX if f == "eager" else None, inplace="yes"),
        )
        for f in FORMS
    ],
    # example inputs
    _case("inputs-wrong-channels", INV, lambda: _fold(_e("eager"), (X7, EX[1]))),
    _case("inputs-too-few", INV, lambda: _fold(_e("eager"), (EX[0],))),
    _case("inputs-string", INV, lambda: _fold(_e("eager"), ("abc",))),
    _case("inputs-dict", INV, lambda: _fold(_e("eager"), {"x": EX[0], "z": EX[1]})),
    _case("inputs-float64", INV, lambda: _fold(_e("eager"), tuple(t.double() for t in EX))),
    # malformed models
    _case("onnx-no-external-data", UNS, lambda: _fold(_no_external_data())),
    _case("onnx-sparse-initializer", UNS, lambda: _fold(_sparse())),
    _case("onnx-duplicate-output", UNS, lambda: _fold(_onnx_edit(_relu_into)())),
    _case("onnx-conv-no-weight", UNS, lambda: _fold(_onnx_edit(_drop_conv_inputs)())),
    _case("onnx-eps-string", UNS, lambda: _fold(_onnx_edit(_set_attr(1, "epsilon", "x"))())),
    _case("onnx-eps-int", UNS, lambda: _analyze(_onnx_edit(_set_attr(1, "epsilon", 3))())),
    _case("onnx-group-string", UNS, lambda: _fold(_onnx_edit(_set_attr(0, "group", "x"))())),
    _case("onnx-ir-dangling-value", UNS, lambda: _fold(_dangling())),
    _case("onnx-ir-dangling-analyze", UNS, lambda: _analyze(_dangling())),
    # verify
    _case("verify-no-inputs-eager", INV, lambda: _verify(_e("eager"), _e("eager"), None)),
    _case("verify-no-inputs-program", INV, lambda: _verify(_e("program"), _e("program"), None)),
    _case("verify-tuple-vs-tensor", UNS, lambda: _verify(_TupleOut(), _TensorOut(), (EX[0],))),
    _case("verify-dict-vs-tuple", UNS, lambda: _verify(_DictOut(), _TupleOut(), (EX[0],))),
    _case("verify-onnx-vs-eager", UNS, lambda: _verify(_e("onnx"), _e("eager"), None)),
    _case("verify-onnx-vs-str", UNS, lambda: _verify(_e("onnx"), "folded", None)),
    _case("verify-eager-vs-onnx", UNS, lambda: _verify(_e("eager"), _e("onnx"), EX)),
    _case("verify-program-vs-onnx", UNS, lambda: _verify(_e("program"), _e("onnx"), EX)),
    _case("verify-eager-vs-str", UNS, lambda: _verify(_e("eager"), "folded", EX)),
    *[
        _case(f"verify-{f}-{what}", INV, lambda f=f, i=inputs: _verify(_e(f), _e(f), i))
        for f, what, inputs in [
            ("eager", "too-few-inputs", (EX[0],)),
            ("eager", "wrong-channels", (X7, EX[1])),
            ("program", "too-few-inputs", (EX[0],)),
            ("program", "wrong-batch", (torch.randn(5, 4, 7, 7), EX[1])),
            ("graph_module", "too-few-inputs", (EX[0],)),
        ]
    ],
    _case(
        "verify-onnx-missing-feed",
        VER,
        lambda: _verify(_e("onnx"), _e("onnx"), {"x": EX[0].numpy()}),
    ),
    _case(
        "verify-onnx-wrong-rank",
        VER,
        lambda: _verify(
            _e("onnx"), _e("onnx"), {"x": np.zeros((1, 2), np.float32), "z": EX[1].numpy()}
        ),
    ),
    _case("verify-onnx-string-inputs", INV, lambda: _verify(_e("onnx"), _e("onnx"), "inputs")),
    _case(
        "verify-onnx-ir-one-array",
        INV,
        lambda: _verify(_e("onnx_ir"), _e("onnx_ir"), [EX[0].numpy()]),
    ),
]


@pytest.mark.parametrize("call, expected", ERROR_CASES)
def test_bad_input_raises_a_bnfold_error(call, expected):
    """Every case raises a BnfoldError subclass (the one named) with a message."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as excinfo:  # noqa: B017 - the type is the subject
            call()
    e = excinfo.value
    assert isinstance(e, bnfold.BnfoldError), f"{type(e).__module__}.{type(e).__name__}: {e}"
    assert type(e) is expected, f"{type(e).__name__}: {e}"
    assert str(e).strip(), repr(e)


@pytest.mark.parametrize("eps", [None, "x", [1e-5]])
def test_a_batchnorm_whose_eps_is_not_a_number_is_kept_as_invalid(eps):
    model = randomize_all(_eps(eps)(), seed=3)
    folded, report = bnfold.fold(model, return_report=True)
    entry = report.entry("bn")
    assert not entry.folded and entry.rule == rules.VALID_VALUES, entry
    assert "eps" in entry.reason
    assert folded.bn is not model.bn and isinstance(folded.bn, nn.BatchNorm2d)


def test_example_inputs_are_run_to_check_the_trace():
    # example inputs are run once to check the trace against a real run (documented), so
    # inputs the model rejects are an error even where the fold needs no shapes
    model = randomize_all(_TensorOut(), seed=4)
    with pytest.raises(bnfold.InvalidArgumentError, match="example_inputs"):
        bnfold.fold(model, (X7,))
    folded, report = bnfold.fold(model, return_report=True)  # without them: nothing is run
    assert report.entry("bn").folded
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_gemm_c_of_another_length_is_kept_with_a_reason():
    folded, report = bnfold.fold(_gemm_c7(), return_report=True)
    assert [e.rule for e in report] == [rules.VALID_VALUES], report
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 1


def test_verify_puts_back_the_buffers_of_a_scripted_model_in_training_mode():
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), seed=5)
    scripted = torch.jit.script(model).train()
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    bnfold.verify(model, scripted, (torch.randn(2, 3, 8, 8),))
    after = scripted.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
