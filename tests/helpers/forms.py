"""The forms a model takes in bnfold, and what a fold in any of them is checked against.

A *form* is one way of handing a network to bnfold: the eager ``nn.Module``, the
``torch.export.ExportedProgram``, the ATen ``GraphModule`` of ``ep.module()``, an
``onnx.ModelProto``, an ``onnx_ir.Model``, and a ``jax.export.Exported`` and StableHLO text of
the network translated to JAX (``tests/helpers/jax_forms.py``). :data:`FORMS` describes each one
by what the checks need (build it from a torch module and its input, fold and analyze it, run it,
count its BatchNorms, read its stored tensors), so that a check written once runs in every form,
and a new frontend is one more :class:`Form` in the list. The contract suite (``tests/contract``)
runs its checks over :data:`FORMS`; the random-network fuzzer (``tests/fuzz/networks.py``) uses
the pieces below: the float64 reference, the error bound, the condition of the folds, the hashes
of an input that a fold must not change.

**The error bound** (``compare_to_reference``). Every output is compared with the float64
evaluation of the original model (its weights as stored, computed in float64):
``err(m) = max|m - ref| / max|ref|``. A folded model passes when ``err(folded) <= 4 *
err(original) + 32 * u * cond``: the fold may cost a few times the rounding the model already
suffers in its dtype, plus a term for the one rounding the fold adds to each folded weight and
bias (``u`` the dtype's unit roundoff: 2**-24, 2**-11, 2**-8). ``cond`` is the condition of the
folds (``condition``): the largest ratio, over folded layers, of ``|W| * |x| + |b|`` to ``|W * x
+ b|``. Where the reference is not finite the folded model must not be finite either; where the
original overflowed, the folded model may too.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

import bnfold
from bnfold.core import rules

UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
ORIGINAL_FACTOR = 4.0
FOLD_FACTOR = 32.0

# Every rule id a report may name (the constants of bnfold.core.rules).
RULE_IDS = frozenset(
    v for k, v in vars(rules).items() if k.isupper() and isinstance(v, str) and "-" in v
)


# --------------------------------------------------------------------------------------------
# Outputs, the float64 reference and the error bound


class WrongResult(AssertionError):
    """A folded model whose outputs are further from the reference than the tolerance."""


def outputs(result: Any) -> list:
    """A model's result as a list of outputs (one tensor, or a tuple or list of them)."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result]


def float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def reference(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of ``model`` evaluated in float64 (its weights as stored)."""
    with torch.no_grad():
        return [t.double() for t in outputs(float64_copy(model)(x.double()))]


def errors(ref: list[torch.Tensor], got: list[np.ndarray | torch.Tensor]) -> list[dict]:
    """Per output: the relative error against the float64 reference, over the elements where
    the reference is finite, and where non-finite values appear that the reference lacks."""
    rows = []
    for r, g in zip(ref, got, strict=True):
        g64 = torch.as_tensor(np.asarray(g, dtype=np.float64) if not torch.is_tensor(g) else g)
        g64 = g64.double()
        assert g64.shape == r.shape, (g64.shape, r.shape)
        finite = torch.isfinite(r)
        scale = float(r[finite].abs().max()) if finite.any() else 0.0
        diff = (g64 - r)[finite]
        bad = ~torch.isfinite(diff)
        err = float(diff[~bad].abs().max()) / scale if scale > 0 and (~bad).any() else 0.0
        if scale == 0 and (~bad).any():
            err = float(diff[~bad].abs().max())
        rows.append(
            {
                "err": err,
                "nonfinite_where_finite": bad,  # mask over the finite-reference elements
                "finite_where_nonfinite": bool(torch.isfinite(g64[~finite]).any()),
            }
        )
    return rows


def compare_to_reference(
    form: str, dtype: str, ref: list[torch.Tensor], original: list, folded: list, cond: float
) -> tuple[float, float]:
    """Raise :class:`WrongResult` unless ``folded`` is within the bound of the module docstring
    for a model computing in ``dtype``; return the (error, tolerance) closest to failing."""
    u = UNIT_ROUNDOFF[dtype]
    e_orig = errors(ref, original)
    e_fold = errors(ref, folded)
    worst_err = worst_tol = 0.0
    for i, (o, f) in enumerate(zip(e_orig, e_fold, strict=True)):
        tol = ORIGINAL_FACTOR * o["err"] + FOLD_FACTOR * u * cond
        new_nonfinite = f["nonfinite_where_finite"] & ~o["nonfinite_where_finite"]
        if new_nonfinite.any():
            raise WrongResult(f"{form}: output {i} has non-finite values the original has not")
        if f["finite_where_nonfinite"] and not o["finite_where_nonfinite"]:
            raise WrongResult(f"{form}: output {i} is finite where the reference is not")
        if f["err"] > tol:
            raise WrongResult(
                f"{form}: output {i} error {f['err']:.3g} > tolerance {tol:.3g} "
                f"(original's error {o['err']:.3g}, cond {cond:.3g})"
            )
        if tol > 0:
            if f["err"] / tol >= (worst_err / worst_tol if worst_tol else 0):
                worst_err, worst_tol = f["err"], tol
    return worst_err, worst_tol


def _absolute_layer(layer: nn.Module) -> nn.Module:
    """A float64 copy of ``layer`` with every weight and bias replaced by its magnitude."""
    out = copy.deepcopy(layer)
    out._forward_hooks.clear()  # the copy would run the hook that made it
    with torch.no_grad():
        for p in out.parameters():
            p.abs_()
    return out


def condition(model: nn.Module, x: torch.Tensor, folded_layers: set[str]) -> float:
    """The condition of the folds (see the module docstring), measured in float64: for each
    folded layer (a name in ``model.layers``), ``max(|W| * |x| + |b|) / max|W * x + b|`` over
    its calls."""
    if not folded_layers:
        return 1.0
    model = float64_copy(model)
    worst = [1.0]

    def hook(layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
        absolute = _absolute_layer(layer)(args[0].abs())
        denom = float(out.abs().max())
        if denom > 0 and math.isfinite(denom):
            worst[0] = max(worst[0], float(absolute.max()) / denom)

    handles = [
        model.layers[n].register_forward_hook(hook) for n in folded_layers if n in model.layers
    ]
    try:
        with torch.no_grad():
            model(x.double())
    finally:
        for h in handles:
            h.remove()
    return worst[0]


def producers_of(report: bnfold.FoldReport) -> set[str]:
    """Module names of the layers folds went into: ``layers.conv3`` → ``conv3``; an ONNX node
    is named after its module path (``/layers/conv3/Conv``), so every part of a name counts
    (``condition`` keeps those that are layers)."""
    names = set()
    for e in report.folded:
        names.update(re.split(r"[./]", str(e.target)))
    return names


# --------------------------------------------------------------------------------------------
# Reports and BatchNorm counts


def check_entries(report: bnfold.FoldReport, form: str = "") -> None:
    """Every entry is a fold into a named layer, or kept under a rule id with a reason."""
    for e in report:
        if e.folded:
            assert e.target and e.rule is None and e.reason == "", (form, e)
        else:
            assert e.action == "skipped", (form, e)
            assert e.rule in RULE_IDS, (form, e)
            assert isinstance(e.reason, str) and e.reason.strip(), (form, e)


def graph_bn_nodes(graph: Any) -> list:
    """Every batch-norm op of an fx graph (aten.batch_norm, _native_batch_norm_legit_*, ...;
    a decomposed BatchNorm is one node too)."""
    return [
        n
        for n in graph.nodes
        if n.op == "call_function" and "batch_norm" in getattr(n.target, "__name__", str(n.target))
    ]


def graph_bn_count(program: Any) -> int:
    """The BatchNorm ops of an ExportedProgram's or a GraphModule's graph."""
    return len(graph_bn_nodes(program.graph))


def module_bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --------------------------------------------------------------------------------------------
# What a fold must not change: hashes and bytes of every stored tensor


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def module_weights(model: nn.Module) -> dict[str, bytes]:
    """Every parameter and buffer of a module, as bytes."""
    return {k: _tensor_bytes(v) for k, v in model.state_dict(keep_vars=True).items()}


def program_weights(ep: Any) -> dict[str, bytes]:
    """Every parameter, buffer and constant of an ExportedProgram, as bytes."""
    items = {**ep.state_dict, **ep.constants}
    return {k: _tensor_bytes(v) for k, v in items.items() if torch.is_tensor(v)}


def hash_module(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, data in sorted(module_weights(model).items()):
        h.update(name.encode())
        h.update(data)
    h.update(str([m.training for m in model.modules()]).encode())
    return h.hexdigest()


def hash_program(ep: Any) -> str:
    h = hashlib.sha256()
    for name, data in sorted(program_weights(ep).items()):
        h.update(name.encode())
        h.update(data)
    h.update(str(ep.graph).encode())
    h.update(str(ep.graph_signature).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Quiet runs


def quiet() -> contextlib.ExitStack:
    """No warnings, prints or framework logging (exporters and tracers are chatty)."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    for name in ("torch", "torch.onnx", "torch.export", "onnxscript", "onnx_ir", "torch._dynamo"):
        lg = logging.getLogger(name)
        old = lg.level
        lg.setLevel(logging.CRITICAL)
        stack.callback(lg.setLevel, old)
    return stack


# --------------------------------------------------------------------------------------------
# The forms


@dataclass(frozen=True)
class Form:
    """One kind of model bnfold folds, described by what a check needs of it.

    ``build(module, x)`` gives the torch module (called on ``x``) in this form; ``fold(model,
    x)`` returns ``(folded, report)`` and ``analyze(model, x)`` the report (``x`` is passed as
    the example input where the form takes one); ``run(model, x)`` returns every output as a
    numpy array; ``count_bns`` counts the BatchNorms in the model; ``weights`` gives every
    stored tensor by name, as bytes; ``fingerprint`` hashes the weights and the structure.
    """

    name: str
    build: Callable[[nn.Module, torch.Tensor], Any]
    fold: Callable[[Any, torch.Tensor], tuple[Any, bnfold.FoldReport]]
    analyze: Callable[[Any, torch.Tensor], bnfold.FoldReport]
    run: Callable[[Any, torch.Tensor], list[np.ndarray]]
    count_bns: Callable[[Any], int]
    weights: Callable[[Any], dict[str, bytes]]
    fingerprint: Callable[[Any], str]

    def __repr__(self) -> str:
        return self.name


def _numpy(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().copy() for t in tensors]


def _run_module(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return _numpy(outputs(model(x.clone())))


def _export(model: nn.Module, x: torch.Tensor) -> Any:
    with quiet():
        return torch.export.export(model, (x,))


def _fold_quietly(model: Any, example: Any) -> tuple[Any, bnfold.FoldReport]:
    with quiet():
        return bnfold.fold(model, example, return_report=True)


def _analyze_quietly(model: Any, example: Any) -> bnfold.FoldReport:
    with quiet():
        return bnfold.analyze(model, example)


def _module_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256(hash_module(model).encode())
    h.update(str([(n, type(m).__name__) for n, m in model.named_modules()]).encode())
    h.update(str(getattr(model, "code", "")).encode())
    return h.hexdigest()


EAGER = Form(
    name="eager",
    build=lambda module, x: module,
    fold=lambda model, x: _fold_quietly(model, (x,)),
    analyze=lambda model, x: _analyze_quietly(model, (x,)),
    run=_run_module,
    count_bns=module_bn_count,
    weights=module_weights,
    fingerprint=_module_fingerprint,
)

PROGRAM = Form(
    name="program",
    build=_export,
    fold=lambda ep, x: _fold_quietly(ep, None),
    analyze=lambda ep, x: _analyze_quietly(ep, None),
    run=lambda ep, x: _run_module(ep.module(), x),
    count_bns=lambda ep: graph_bn_count(ep.graph_module),
    weights=program_weights,
    fingerprint=hash_program,
)

GRAPH_MODULE = Form(
    name="graph_module",
    build=lambda module, x: _export(module, x).module(),
    fold=lambda gm, x: _fold_quietly(gm, None),
    analyze=lambda gm, x: _analyze_quietly(gm, None),
    run=_run_module,
    count_bns=graph_bn_count,
    weights=module_weights,
    fingerprint=_module_fingerprint,
)


def onnx_export(module: nn.Module, x: torch.Tensor, opset: int = 17) -> Any:
    """``module`` exported to an ONNX ModelProto (TorchScript exporter, no constant folding)."""
    from tests.helpers.onnx_models import export_torch

    with quiet():
        return export_torch(module, x, dynamo=False, opset_version=opset)


def _proto(model: Any) -> Any:
    import onnx_ir as ir

    return ir.to_proto(model) if isinstance(model, ir.Model) else model


def _run_onnx(model: Any, x: torch.Tensor) -> list[np.ndarray]:
    from tests.helpers.onnx_models import session

    s = session(_proto(model))
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})


def _onnx_bn_count(model: Any) -> int:
    from tests.helpers.onnx_models import all_nodes

    return sum(n.op_type == "BatchNormalization" for n in all_nodes(_proto(model)))


def _onnx_weights(model: Any) -> dict[str, bytes]:
    """Every initializer (of every graph) and every Constant node's value, as bytes."""
    from tests.helpers.onnx_models import all_graphs

    proto = _proto(model)
    found = {}
    for g in all_graphs(proto.graph):
        for t in g.initializer:
            found[f"{g.name}/{t.name}"] = t.SerializeToString()
        for n in g.node:
            if n.op_type == "Constant":
                found[f"{g.name}/{n.output[0]}"] = n.SerializeToString()
    return found


def _onnx_fingerprint(model: Any) -> str:
    return hashlib.sha256(_proto(model).SerializeToString()).hexdigest()


ONNX = Form(
    name="onnx",
    build=onnx_export,
    fold=lambda m, x: _fold_quietly(m, None),
    analyze=lambda m, x: _analyze_quietly(m, None),
    run=_run_onnx,
    count_bns=_onnx_bn_count,
    weights=_onnx_weights,
    fingerprint=_onnx_fingerprint,
)


def _to_ir(module: nn.Module, x: torch.Tensor) -> Any:
    import onnx_ir as ir

    return ir.from_proto(onnx_export(module, x))


ONNX_IR = replace(ONNX, name="onnx_ir", build=_to_ir)  # the same model, as an onnx_ir.Model


@dataclass
class Compiled:
    """A module compiled with the ``bnfold`` torch.compile backend, and the graphs the backend
    handed on after its fold (recorded by its inner backend, which runs them eagerly)."""

    module: nn.Module
    fn: Callable[..., Any]
    graphs: list = field(default_factory=list)


def _compile(model: nn.Module, x: torch.Tensor) -> tuple[Compiled, bnfold.FoldReport]:
    """The compile form's fold: compile under no_grad and run once (compiling is lazy); the
    report joins those of the captured graphs."""
    import bnfold.torch

    if isinstance(model, Compiled):
        raise TypeError("a compiled callable is not folded again")
    graphs: list = []

    def record(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    backend = bnfold.torch.Backend(inner=record)
    # StepNets share one forward: dynamo's code cache would serve another network's graphs
    torch._dynamo.reset()
    compiled = Compiled(model, torch.compile(model, backend=backend), graphs)
    with quiet(), torch.no_grad():
        compiled.fn(x.clone())
    compiled.graphs = list(graphs)  # those of this compile (a later reset makes dynamo recompile)
    entries = [e for r in backend.reports for e in r.report.entries]
    return compiled, bnfold.FoldReport(entries, type(model).__name__)


def _run_compiled(model: Any, x: torch.Tensor) -> list[np.ndarray]:
    return _run_module(model.fn if isinstance(model, Compiled) else model, x)


def _count_compiled(model: Any) -> int:
    if isinstance(model, Compiled):
        return sum(len(graph_bn_nodes(gm.graph)) for gm in model.graphs)
    return module_bn_count(model)


def _unwrapped(model: Any) -> nn.Module:
    return model.module if isinstance(model, Compiled) else model


COMPILE = Form(
    name="compile",
    build=lambda module, x: module,
    fold=_compile,
    analyze=lambda model, x: _compile(model, x)[1],  # no analyze: the report of a compile
    run=_run_compiled,
    count_bns=_count_compiled,
    weights=lambda model: module_weights(_unwrapped(model)),
    fingerprint=lambda model: _module_fingerprint(_unwrapped(model)),
)


def _jax_forms() -> Any:
    """``tests.helpers.jax_forms``, or a skip when JAX is not installed (JAX is an extra)."""
    import pytest

    pytest.importorskip("jax")
    from tests.helpers import jax_forms

    return jax_forms


# The network translated to a JAX function (parameters closed over) and exported with jax.export
STABLEHLO = Form(
    name="stablehlo",
    build=lambda module, x: _jax_forms().export(module, x),
    fold=lambda m, x: _fold_quietly(m, None),
    analyze=lambda m, x: _analyze_quietly(m, None),
    run=lambda m, x: _jax_forms().run(m, x),
    count_bns=lambda m: _jax_forms().count_bns(m),
    weights=lambda m: _jax_forms().weights(m),
    fingerprint=lambda m: _jax_forms().fingerprint(m),
)

# The same program as StableHLO MLIR text
STABLEHLO_TEXT = replace(
    STABLEHLO, name="stablehlo_text", build=lambda module, x: _jax_forms().export_text(module, x)
)

# Every form bnfold folds; a new frontend is one more entry.
FORMS: list[Form] = [
    EAGER,
    PROGRAM,
    GRAPH_MODULE,
    ONNX,
    ONNX_IR,
    COMPILE,
    STABLEHLO,
    STABLEHLO_TEXT,
]


def export(model: nn.Module, args: tuple, decomposed: bool = False, **kw: Any) -> Any:
    """``torch.export.export(model, args, **kw)`` without its warnings; decomposed
    (``run_decompositions()``) when asked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, tuple(args), **kw)
    return ep.run_decompositions() if decomposed else ep


def program_forms(model: nn.Module, args: tuple) -> list[tuple[str, Any]]:
    """The program of ``model`` as exported and decomposed, and the GraphModule of each
    (``ep.module()``): the four graph forms a torch.export test folds."""
    exported = export(model, args)
    decomposed = exported.run_decompositions()
    return [
        ("exported", exported),
        ("decomposed", decomposed),
        ("exported-module", exported.module()),
        ("decomposed-module", decomposed.module()),
    ]
