"""PyTorch eager frontend: fold BatchNorms of an ``nn.Module`` into the layers feeding them.

The data flow (which module's output feeds which BatchNorm, and who else uses it) comes from a
``torch.fx`` symbolic trace in which convolutions, linears and BatchNorms are leaves. When
symbolic tracing fails and example inputs are given, ``torch.export`` (non-strict) traces the
model instead and its ATen nodes are mapped back to modules through their ``nn_module_stack``.
Output ranks come from running the model once on the example inputs.

The folded model is the caller's own class: folded BatchNorms become ``nn.Identity`` and the
producers' parameters hold the folded values, so user methods and attributes survive.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from . import rules
from .algebra import CONV, LINEAR, conv_transpose_layout, fold_affine_into_producer
from .errors import FoldRefused, TracingError, TrainingModeError, UnsupportedModelError
from .report import FoldEntry, FoldReport
from .rules import PairFacts
from .torch_batchnorm import (
    BatchNormSpec,
    batchnorm_spec,
    defining_class,
    is_batchnorm,
    is_torch_class,
    reads_metadata_only,
)

PRODUCER_KINDS = ("conv", "conv_transpose", "linear")

def producer_kind(m: nn.Module) -> str | None:
    """``"conv"``, ``"conv_transpose"``, ``"linear"`` or ``None`` for other modules."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv_transpose" if m.transposed else "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


# The methods through which a producer's forward computes its output.
_FORWARD_METHODS = ("forward", "_conv_forward", "_output_padding")


def _producer_custom_forward(m: nn.Module) -> str:
    """Why ``m``'s forward may do more than its torch base class's, or ``""``."""
    for method in _FORWARD_METHODS:
        owner = defining_class(type(m), method)
        if owner is not None and not is_torch_class(owner):
            return (
                f"{type(m).__name__} overrides {method}(); bnfold cannot prove that folding "
                "keeps what it does"
            )
    if m._forward_hooks or m._forward_pre_hooks:
        return f"{type(m).__name__} has forward hooks, which may change what it computes"
    return ""


def _params_not_constant(m: nn.Module) -> bool:
    from torch.nn.parameter import UninitializedParameter
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(m):
        return True
    return any(isinstance(p, UninitializedParameter) for p in m.parameters(recurse=False))


def _layout(m: nn.Module) -> Any:
    kind = producer_kind(m)
    if kind == "conv_transpose":
        return conv_transpose_layout(m.groups)
    return CONV if kind == "conv" else LINEAR


# --------------------------------------------------------------------------------------------
# Data flow between module calls


@dataclass
class _Call:
    """What the data flow says about one module (over all its calls)."""

    calls: int = 0
    input_from: str | None = None  # path of the producer module whose output is the input
    input_detail: str = ""  # what the input is otherwise
    output_users: int = 0  # consumers of the output (first call); the graph output counts
    other_users: list[str] = field(default_factory=list)


@dataclass
class _Dataflow:
    calls: dict[str, _Call]
    outside_uses: dict[str, list[str]]  # module path -> users of its tensors outside its calls
    note: str = ""  # a caveat on how the data flow was found


EXPORT_NOTE = (
    "torch.fx could not trace this model, so its data flow comes from torch.export on the "
    "example inputs: the folds are exact for inputs that take the same Python control-flow "
    "path as those (check other paths with bnfold.verify)"
)


class _LeafTracer(torch.fx.Tracer):
    """Symbolic tracer that stops at producers and BatchNorms (subclasses included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if producer_kind(m) is not None or is_batchnorm(m):
            return True
        return super().is_leaf_module(m, qualname)


def _describe(node: torch.fx.Node) -> str:
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "output":
        return "the model output"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _fx_dataflow(model: nn.Module, paths: dict[int, str]) -> _Dataflow:
    graph = _LeafTracer().trace(model)
    interesting = set(paths.values())
    calls: dict[str, _Call] = defaultdict(_Call)
    outside: dict[str, list[str]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_module" and node.target in interesting:
            c = calls[node.target]
            c.calls += 1
            if c.calls > 1:
                continue
            src = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
            if isinstance(src, torch.fx.Node) and src.op == "call_module" and src.target in interesting:
                c.input_from = src.target
            elif isinstance(src, torch.fx.Node):
                c.input_detail = _describe(src)
            users = [u for u in node.users if not reads_metadata_only(u)]
            c.output_users = len(users)
            c.other_users = [_describe(u) for u in users]
        elif node.op == "get_attr":
            owner = _owner(str(node.target), interesting)
            if owner is not None:
                outside[owner].append(f"forward() reading {node.target}")
    return _Dataflow(dict(calls), dict(outside))


def _owner(qualname: str, paths: set[str]) -> str | None:
    parent = qualname.rpartition(".")[0]
    return parent if parent in paths else None


def _export_dataflow(model: nn.Module, example_inputs: tuple, paths: dict[int, str]) -> _Dataflow:
    """Data flow from a non-strict torch.export trace, mapped back to modules."""
    ep = torch.export.export(model, example_inputs, strict=False)
    graph = ep.graph
    sig = ep.graph_signature
    state_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    interesting = set(paths.values())

    # Which call of which interesting module each node belongs to.
    group: dict[torch.fx.Node, str] = {}
    path_of_key: dict[str, str] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for key, (path, _type) in stack.items():
            if path in interesting:
                group[node] = key
                path_of_key[key] = path
    keys_by_path: dict[str, list[str]] = defaultdict(list)
    for key, path in path_of_key.items():
        keys_by_path[path].append(key)

    calls: dict[str, _Call] = {}
    outside: dict[str, list[str]] = defaultdict(list)
    first_key: dict[str, str] = {}
    for node in graph.nodes:  # graph order, so the first call comes first
        key = group.get(node)
        if key is not None and path_of_key[key] not in first_key:
            first_key[path_of_key[key]] = key
    for path, keys in keys_by_path.items():
        c = _Call(calls=len(keys))
        key = first_key[path]
        members = [n for n in graph.nodes if group.get(n) == key]
        member_set = set(members)
        inputs = []
        for n in members:
            for a in n.all_input_nodes:
                if a in member_set or a.name in state_of or a.op == "get_attr":
                    continue
                if a not in inputs:
                    inputs.append(a)
        if len(inputs) == 1:
            src = inputs[0]
            src_key = group.get(src)
            if src_key is not None and src_key != key:
                c.input_from = path_of_key[src_key]
            else:
                c.input_detail = _describe(src)
        elif inputs:
            c.input_detail = "several values: " + ", ".join(_describe(a) for a in inputs)
        outputs = [n for n in members if any(u not in member_set for u in n.users)]
        users = [
            u for n in outputs for u in n.users if u not in member_set and not reads_metadata_only(u)
        ]
        c.output_users = len(users) if len(outputs) == 1 else len(users) + 1
        c.other_users = [_describe(u) for u in users]
        calls[path] = c
    # Parameters or buffers read outside the calls of the module that owns them.
    for node in graph.nodes:
        if node.name not in state_of:
            continue
        owner = _owner(state_of[node.name], interesting)
        if owner is None:
            continue
        for u in node.users:
            if group.get(u) is None or path_of_key[group[u]] != owner:
                outside[owner].append(_describe(u))
    return _Dataflow(calls, dict(outside), note=EXPORT_NOTE)


def _dataflow(model: nn.Module, example_inputs: tuple | None, paths: dict[int, str]) -> _Dataflow:
    try:
        return _fx_dataflow(model, paths)
    except Exception as fx_error:  # symbolic tracing fails on data-dependent Python code
        if example_inputs is None:
            raise TracingError(
                f"torch.fx could not trace {type(model).__name__} ({type(fx_error).__name__}: "
                f"{_first_line(fx_error)}); pass example_inputs so that bnfold can trace it "
                "with torch.export instead"
            ) from fx_error
        try:
            return _export_dataflow(model, example_inputs, paths)
        except Exception as export_error:
            raise TracingError(
                f"bnfold could not find the data flow of {type(model).__name__}: torch.fx failed "
                f"({_first_line(fx_error)}) and torch.export failed ({_first_line(export_error)}). "
                "Make forward traceable (no Python control flow on tensor values), or fold the "
                "traceable submodules one by one"
            ) from export_error


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _output_ranks(model: nn.Module, example_inputs: tuple, producers: dict[str, nn.Module]) -> dict[str, set[int]]:
    """Run the model once and record the rank of every producer's output."""
    ranks: dict[str, set[int]] = defaultdict(set)
    # forward may update state (a BatchNorm left in training mode updates its statistics):
    # put every buffer back afterwards.
    saved = [(buf, buf.clone()) for buf in model.buffers()]
    handles = []
    for path, m in producers.items():
        def hook(_m, _args, out, path=path):
            if isinstance(out, torch.Tensor):
                ranks[path].add(out.dim())
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
    return ranks


# --------------------------------------------------------------------------------------------
# Facts and decisions


@dataclass
class _Plan:
    report: FoldReport
    folds: list[tuple[str, str, BatchNormSpec]]  # (bn, producer, spec) passing every rule


def _normalise_inputs(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tuple of positional arguments (or one tensor), "
            f"not {type(example_inputs).__name__}"
        )
    return example_inputs


def _shared_params(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter or buffer) -> every qualified name it is reachable under."""
    names: dict[int, list[str]] = defaultdict(list)
    for mpath, m in model.named_modules(remove_duplicate=False):
        for pname, p in list(m._parameters.items()) + list(m._buffers.items()):
            if p is not None:
                names[id(p)].append(f"{mpath}.{pname}" if mpath else pname)
    return names


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected an nn.Module, got {type(model).__name__}")
    if model.training:
        raise TrainingModeError(
            f"{type(model).__name__} is in training mode, where BatchNorm uses batch statistics "
            "and cannot be folded: call model.eval() first"
        )


def _plan(
    model: nn.Module, example_inputs: tuple | None, producers: Iterable[str] | None
) -> _Plan:
    _check_model(model)
    selected = set(PRODUCER_KINDS if producers is None else producers)
    unknown = selected - set(PRODUCER_KINDS)
    if unknown:
        raise ValueError(f"unknown producer kinds {sorted(unknown)}; choose from {PRODUCER_KINDS}")

    paths: dict[int, str] = {}
    modules: dict[str, nn.Module] = {}
    for path, m in model.named_modules():
        if (is_batchnorm(m) or producer_kind(m)) and path:
            paths[id(m)] = path
            modules[path] = m
    report = FoldReport(model=type(model).__name__)
    if is_batchnorm(model):
        report.entries.append(FoldEntry(
            type(model).__name__, None, "skipped",
            "the model is a lone BatchNorm: no layer feeds it", rules.NO_PRODUCER, type(model).__name__,
        ))
    bns = [p for p, m in modules.items() if is_batchnorm(m)]
    if not bns:
        return _Plan(report, [])

    flow = _dataflow(model, example_inputs, paths)
    prod_modules = {p: m for p, m in modules.items() if producer_kind(m)}
    shared = _shared_params(model)
    specs = {bn: batchnorm_spec(modules[bn], bn) for bn in bns}
    facts_of = {bn: _pair_facts(bn, specs[bn], modules, prod_modules, flow, shared) for bn in bns}
    need_rank = [
        bn
        for bn, f in facts_of.items()
        if f.producer is not None and rules.decide(f).rule == rules.CHANNEL_AXIS
    ]
    if need_rank and example_inputs is not None:
        # Only some folds need shapes (Linear + BatchNorm1d, Conv1d + BatchNorm1d): run the
        # model once for them, not for every model.
        wanted = {facts_of[bn].producer: prod_modules[facts_of[bn].producer] for bn in need_rank}
        ranks = _output_ranks(model, example_inputs, wanted)
        for bn in need_rank:
            prod_ranks = ranks.get(facts_of[bn].producer, set())
            if len(prod_ranks) == 1:
                facts_of[bn] = dataclasses.replace(facts_of[bn], output_rank=next(iter(prod_ranks)))

    if flow.note:
        report.notes.append(flow.note)
        warnings.warn(flow.note, stacklevel=3)
    folds = []
    for bn_path in bns:
        bn = modules[bn_path]
        facts = facts_of[bn_path]
        prod_path = facts.producer
        decision = rules.decide(facts)
        target_type = type(modules[prod_path]).__name__ if prod_path else ""
        if decision.ok and facts.producer_kind not in selected:
            decision = rules.Decision(
                False, rules.NOT_SELECTED, f"folding into {facts.producer_kind} layers was not selected"
            )
        if decision.ok:
            folds.append((bn_path, prod_path, specs[bn_path]))
            report.entries.append(FoldEntry(bn_path, prod_path, "folded", bn_type=type(bn).__name__, target_type=target_type))
        else:
            report.entries.append(
                FoldEntry(bn_path, prod_path, "skipped", decision.reason, decision.rule, type(bn).__name__, target_type)
            )
    return _Plan(report, folds)


def _pair_facts(
    bn_path: str,
    spec: BatchNormSpec,
    modules: dict[str, nn.Module],
    prod_modules: dict[str, nn.Module],
    flow: _Dataflow,
    shared: dict[int, list[str]],
) -> PairFacts:
    """Translate what the model and its data flow say about one BatchNorm into rule facts."""
    bn = modules[bn_path]
    call = flow.calls.get(bn_path, _Call())
    bn_facts = dict(
        bn=bn_path,
        bn_kind=type(bn).__name__,
        bn_uses_running_stats=not spec.uses_running_stats,
        bn_not_inference_reason=spec.uses_running_stats,
        bn_calls=max(call.calls, 1),
        bn_custom_forward=spec.not_foldable,
        bn_params_constant=not _params_not_constant(bn),
        bn_state_used_elsewhere=", ".join(flow.outside_uses.get(bn_path, [])),
        bn_input_ranks=spec.input_ranks,
    )
    prod_path = call.input_from if call.calls and call.input_from in prod_modules else None
    if prod_path is None:
        if call.calls == 0:
            detail = "nothing: forward() never calls it"
        else:
            detail = call.input_detail or f"module {call.input_from}"
        return PairFacts(**bn_facts, producer=None, producer_detail=detail)

    prod = prod_modules[prod_path]
    pcall = flow.calls[prod_path]
    kind = producer_kind(prod)
    others = [
        name
        for pname in ("weight", "bias")
        if getattr(prod, pname, None) is not None
        for name in shared[id(getattr(prod, pname))]
        if name.rpartition(".")[0] != prod_path
    ]
    others += flow.outside_uses.get(prod_path, [])
    return PairFacts(
        **bn_facts,
        producer=prod_path,
        producer_kind=kind,
        producer_spatial_dims=len(prod.kernel_size) if kind != "linear" else 0,
        producer_custom_forward=_producer_custom_forward(prod),
        producer_calls=pcall.calls,
        producer_output_users=pcall.output_users,
        producer_other_users=", ".join(u for u in pcall.other_users if u != f"module {bn_path}"),
        producer_params_constant=not _params_not_constant(prod),
        producer_params_shared=", ".join(others),
    )


# --------------------------------------------------------------------------------------------
# Applying the folds


@dataclass
class _Folded:
    """The new values of one fold, computed from the original model's tensors."""

    bn_path: str
    prod_path: str
    weight: torch.Tensor
    bias: torch.Tensor
    replacement: nn.Module  # what takes the BatchNorm's place (Identity, or its forward's rest)


def _compute(model: nn.Module, plan: _Plan) -> tuple[list[_Folded], FoldReport]:
    """Compute every planned fold from ``model``'s tensors (which stay untouched).

    The algebra's refusals (invalid or overflowing numbers) become skips in the returned report.
    """
    modules = dict(model.named_modules())
    outcome = {e.bn: e for e in plan.report.entries}
    done = []
    with torch.no_grad():
        for bn_path, prod_path, spec in plan.folds:
            prod = modules[prod_path]
            try:
                s, t = spec.factors()
                w, b = fold_affine_into_producer(prod.weight, prod.bias, s, t, _layout(prod))
            except FoldRefused as refusal:
                e = outcome[bn_path]
                outcome[bn_path] = dataclasses.replace(
                    e, action="skipped", reason=refusal.reason, rule=rules.VALID_VALUES
                )
                continue
            done.append(_Folded(bn_path, prod_path, w, b, spec.replacement(modules[bn_path])))
    entries = [outcome[e.bn] for e in plan.report.entries]
    return done, FoldReport(entries, plan.report.model, plan.report.notes)


def _new_param(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value, requires_grad=like.requires_grad)


def _copy_folded(model: nn.Module, folds: list[_Folded]) -> nn.Module:
    """Deep-copy ``model`` with the folds applied, without copying what the folds replace.

    The folded parameters and the removed BatchNorms are put into deepcopy's memo, so the copy
    costs one copy of the unchanged part of the model only.
    """
    memo: dict[int, Any] = {}
    for f in folds:
        prod = model.get_submodule(f.prod_path)
        memo[id(prod.weight)] = _new_param(f.weight, prod.weight)
        if prod.bias is not None:
            memo[id(prod.bias)] = _new_param(f.bias, prod.bias)
        # Copied with the same memo, so modules it shares with the model stay shared.
        memo[id(model.get_submodule(f.bn_path))] = copy.deepcopy(f.replacement, memo)
    try:
        target = copy.deepcopy(model, memo)
    except Exception as e:
        raise UnsupportedModelError(
            f"could not copy {type(model).__name__} ({type(e).__name__}: {_first_line(e)}); "
            "pass inplace=True to fold it in place instead"
        ) from e
    for f in folds:
        prod = target.get_submodule(f.prod_path)
        if prod.bias is None:
            prod.register_parameter("bias", _new_param(f.bias, prod.weight))
    return target


def _fold_in_place(model: nn.Module, folds: list[_Folded]) -> None:
    """Write the folds into ``model``: Parameter objects are kept, BatchNorms become Identity."""
    slots: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for _path, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent._modules.items():
            if child is not None:
                slots[id(child)].append((parent, name))
    for f in folds:
        prod = model.get_submodule(f.prod_path)
        bn = model.get_submodule(f.bn_path)
        # Keep the Parameter objects: optimizers and other references see the new values.
        prod.weight.data = f.weight
        if prod.bias is None:
            prod.register_parameter("bias", _new_param(f.bias, prod.weight))
        else:
            prod.bias.data = f.bias
        for parent, name in slots[id(bn)]:
            setattr(parent, name, f.replacement)


# --------------------------------------------------------------------------------------------
# Public entry points (called through bnfold.fold / analyze / verify)


def analyze(
    model: nn.Module, example_inputs: Any = None, *, producers: Iterable[str] | None = None
) -> FoldReport:
    """Decide every BatchNorm of ``model`` without changing anything.

    The folds are computed and thrown away, so that numbers the algebra refuses (non-finite,
    overflowing) are reported exactly as :func:`fold` would.
    """
    plan = _plan(model, _normalise_inputs(example_inputs), producers)
    return _compute(model, plan)[1]


def fold(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    producers: Iterable[str] | None = None,
    return_report: bool = False,
) -> Any:
    """Fold every BatchNorm of ``model`` that can be folded exactly.

    Returns a model of the same class (``model`` itself when ``inplace``), or
    ``(model, report)`` with ``return_report=True``.
    """
    plan = _plan(model, _normalise_inputs(example_inputs), producers)
    folds, report = _compute(model, plan)
    if inplace:
        _fold_in_place(model, folds)
        target = model
    else:
        target = _copy_folded(model, folds)
    return (target, report) if return_report else target


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in _flatten(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return []


def verify(original: nn.Module, folded: nn.Module, example_inputs: Any) -> tuple[float, float]:
    """Run both models on ``example_inputs``; return ``(max_abs_err, max_rel_err)``.

    The relative error of each output is ``max|a - b| / max|a|`` (norm-wise, so that outputs
    near zero do not blow it up); the worst output counts.
    """
    inputs = _normalise_inputs(example_inputs)
    if inputs is None:
        raise TypeError("verify needs example_inputs to run the models on")
    with torch.no_grad():
        a = _flatten(original(*inputs))
        b = _flatten(folded(*inputs))
    if len(a) != len(b):
        raise UnsupportedModelError(
            f"the models return different numbers of tensors ({len(a)} and {len(b)})"
        )
    max_abs = max_rel = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise UnsupportedModelError(f"output shapes differ: {tuple(x.shape)} and {tuple(y.shape)}")
        if not x.is_floating_point():
            diff = float((x != y).sum())
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff)
            continue
        x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
        if not x64.numel():
            continue
        same = (x64 == y64) | (x64.isnan() & y64.isnan())  # equal infinities and NaNs agree
        diff = torch.where(same, torch.zeros_like(x64), (x64 - y64).abs().nan_to_num(nan=float("inf")))
        err = float(diff.max())
        scale = float(x64[x64.isfinite()].abs().max()) if x64.isfinite().any() else 0.0
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else (0.0 if err == 0 else float("inf")))
    return max_abs, max_rel
