"""PyTorch eager frontend: fold BatchNorms of an ``nn.Module`` into the layers feeding them.

The folded model is the caller's own class: folded BatchNorms become ``nn.Identity`` (or, for a
BatchNorm subclass with its own forward, what that forward does after normalising) and the
producers' parameters hold the folded values, so user methods and attributes survive. Data flow
comes from :mod:`bnfold.torch_dataflow`, the decisions from :mod:`bnfold.rules`, the numbers from
:mod:`bnfold.algebra`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import rules
from .algebra import fold_affine_into_producer
from .errors import FoldRefused, TrainingModeError, UnsupportedModelError
from .report import FoldEntry, FoldReport
from .rules import PairFacts
from .torch_batchnorm import BatchNormSpec, batchnorm_spec, is_batchnorm
from .torch_dataflow import Dataflow, ModuleCalls, first_line, module_dataflow, output_ranks
from .torch_producers import (
    PRODUCER_KINDS,
    custom_forward_reason,
    output_layout,
    params_not_constant,
    producer_kind,
)

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


def _plan(model: nn.Module, example_inputs: tuple | None, producers: Iterable[str] | None) -> _Plan:
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
        report.entries.append(
            FoldEntry(
                type(model).__name__,
                None,
                "skipped",
                "the model is a lone BatchNorm: no layer feeds it",
                rules.NO_PRODUCER,
                type(model).__name__,
            )
        )
    bns = [p for p, m in modules.items() if is_batchnorm(m)]
    if not bns:
        return _Plan(report, [])

    flow = module_dataflow(model, example_inputs, paths)
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
        ranks = output_ranks(model, example_inputs, wanted)
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
                False,
                rules.NOT_SELECTED,
                f"folding into {facts.producer_kind} layers was not selected",
            )
        if decision.ok:
            folds.append((bn_path, prod_path, specs[bn_path]))
            report.entries.append(
                FoldEntry(
                    bn_path, prod_path, "folded", bn_type=type(bn).__name__, target_type=target_type
                )
            )
        else:
            report.entries.append(
                FoldEntry(
                    bn_path,
                    prod_path,
                    "skipped",
                    decision.reason,
                    decision.rule,
                    type(bn).__name__,
                    target_type,
                )
            )
    return _Plan(report, folds)


def _pair_facts(
    bn_path: str,
    spec: BatchNormSpec,
    modules: dict[str, nn.Module],
    prod_modules: dict[str, nn.Module],
    flow: Dataflow,
    shared: dict[int, list[str]],
) -> PairFacts:
    """Translate what the model and its data flow say about one BatchNorm into rule facts."""
    bn = modules[bn_path]
    call = flow.calls.get(bn_path, ModuleCalls())
    bn_facts = dict(
        bn=bn_path,
        bn_kind=type(bn).__name__,
        bn_uses_running_stats=not spec.uses_running_stats,
        bn_not_inference_reason=spec.uses_running_stats,
        bn_calls=max(call.calls, 1),
        bn_custom_forward=spec.not_foldable,
        bn_params_constant=not params_not_constant(bn),
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
        producer_custom_forward=custom_forward_reason(prod),
        producer_calls=pcall.calls,
        producer_output_users=pcall.output_users,
        producer_other_users=", ".join(u for u in pcall.other_users if u != f"module {bn_path}"),
        producer_params_constant=not params_not_constant(prod),
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
                w, b = fold_affine_into_producer(prod.weight, prod.bias, s, t, output_layout(prod))
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
            f"could not copy {type(model).__name__} ({type(e).__name__}: {first_line(e)}); "
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
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            raise UnsupportedModelError(
                f"output shapes differ: {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if not x.is_floating_point():
            diff = float((x != y).sum())
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff)
            continue
        x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
        if not x64.numel():
            continue
        same = (x64 == y64) | (x64.isnan() & y64.isnan())  # equal infinities and NaNs agree
        diff = torch.where(
            same, torch.zeros_like(x64), (x64 - y64).abs().nan_to_num(nan=float("inf"))
        )
        err = float(diff.max())
        scale = float(x64[x64.isfinite()].abs().max()) if x64.isfinite().any() else 0.0
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else (0.0 if err == 0 else float("inf")))
    return max_abs, max_rel
