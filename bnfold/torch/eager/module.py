"""PyTorch eager frontend: fold BatchNorms of an ``nn.Module`` into the layers feeding them.

The folded model is the caller's own class: folded BatchNorms become ``nn.Identity`` (or, for a
BatchNorm subclass with its own forward, what that forward does after normalising) and the
producers' parameters hold the folded values, so user methods and attributes survive. Data flow
comes from :mod:`bnfold.torch.eager.dataflow`, the decisions from :mod:`bnfold.core.rules`,
the numbers from :mod:`bnfold.core.algebra`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ...core import pipeline, rules
from ...core.algebra import ScaledWeight, checked_fold
from ...core.report import FoldEntry, FoldReport
from ...core.rules import PairFacts
from ...errors import (
    BnfoldError,
    FoldRefused,
    TrainingModeError,
    UnsupportedModelError,
    first_line,
)
from ...torch.eager.batchnorm import (
    BatchNormSpec,
    batchnorm_spec,
    call_changed_reason,
    carry_plain_attributes,
    is_batchnorm,
    spec_runs_forward,
)
from ...torch.eager.dataflow import (
    Dataflow,
    ModuleCalls,
    follow_steps,
    layout_text,
    module_dataflow,
    output_ranks,
    run_differences,
    trace_difference,
)
from ...torch.eager.producers import (
    custom_forward_reason,
    output_layout,
    params_not_constant,
    producer_kind,
)
from ...torch.eager.state import TRACE_LOCK, preserved_state, reachable_tensors
from ...torch.verify import compare, normalise_inputs, run_model, tolerance, verify

# --------------------------------------------------------------------------------------------
# Facts and decisions


@dataclass
class _PlannedFold:
    bn: str
    producer: str
    spec: BatchNormSpec
    rank: int | None  # set when the fold is exact only for activations of this rank


@dataclass
class _Plan:
    report: FoldReport
    folds: list[_PlannedFold]  # pairs that pass every rule; the algebra has the last word
    flow: Dataflow | None = None  # how the data flow was found (None: no BatchNorm)
    example_inputs: tuple | None = None
    references: list | None = None  # inputs and the model's outputs, for checking folds


def _names_of_state(model: nn.Module) -> dict[int, list[tuple[nn.Module | None, str]]]:
    """id(tensor) -> every place of the model that holds it, with one qualified name each.

    A place is a module's parameter, buffer or plain tensor attribute (a ``bias`` that is a plain
    tensor, shared by two convs), given with that module; or a tensor attribute of another name
    or a holder's content (``self.w = conv.weight``, ``self.cache = [conv.bias]``), given with
    ``None``: code bnfold does not trace may read it, so it counts as a second user of the tensor
    even on the producer itself. Memory shared by different tensor objects (a view of a weight)
    is no sharing here: a fold gives the layer new memory then (see :func:`_private_memory`).

    Each module is visited once, under its first name: a module registered under several names
    (at every level of a deep tree, the paths multiply) owns its tensors once.
    """
    names: dict[int, list[tuple[nn.Module | None, str]]] = defaultdict(list)
    for m, key, name, t in reachable_tensors(model):
        own = key in m._parameters or key in m._buffers or key in _LAYER_TENSORS
        names[id(t)].append((m if own else None, name))
    return names


# A layer's own tensors when they are plain attributes rather than parameters.
_LAYER_TENSORS = frozenset({"weight", "bias"})


def _around_every_call(model: nn.Module) -> str:
    """Why code bnfold does not trace runs around the model's own calls, or ``""``.

    torch.fx traces the root's ``forward`` only: the root's hooks and an overridden
    ``__call__`` run around it unseen, and global module hooks run around every module call;
    any of them may read a layer's weights or a BatchNorm's statistics.
    """
    from torch.nn.modules import module as torch_module

    root = call_changed_reason(model)
    if root:
        return f"the model: {root}, which may read or change any layer"
    tables = ("_global_forward_hooks", "_global_forward_pre_hooks")
    if any(getattr(torch_module, t, None) for t in tables):
        return (
            "global module forward hooks are registered (torch.nn.modules.module."
            "register_module_forward_hook / _pre_hook): they run on every module call and may "
            "change what any layer computes"
        )
    return ""


def _check_model(model: Any) -> None:
    """Refuse what cannot be folded at all, with what to do instead."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "TorchScript modules cannot be folded: fold the eager nn.Module, then script or "
            "trace the folded model"
        )
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected an nn.Module, got {type(model).__name__}")
    if model.training:
        raise TrainingModeError(
            f"{type(model).__name__} is in training mode, where BatchNorm uses batch statistics "
            "and cannot be folded: call model.eval() first"
        )
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a torch.compile wrapper: fold the module it compiles "
            "(model._orig_mod), or fold before compiling, then compile the folded model"
        )
    if type(model).forward is nn.Module.forward:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no forward(), so it has no data flow to follow: fold "
            "the model that calls its modules, or each of its modules that has a forward()"
        )
    if "forward" in vars(model):
        raise UnsupportedModelError(
            f"{type(model).__name__}.forward was replaced on the instance (by a hook library or "
            "an assignment such as model.forward = ...): bnfold traces the class's forward and "
            "cannot see what the replacement does; fold the model before replacing forward"
        )
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise UnsupportedModelError(
            f"parameter {meta} is on the meta device and has no values to fold: load the "
            "weights first (e.g. model.to_empty(device=...) and load_state_dict)"
        )
    lazy = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
    ]
    if lazy:
        raise UnsupportedModelError(
            f"lazy module {lazy[0] or type(model).__name__} has not been initialised yet: run "
            "the model once on a real input before folding it"
        )


def _plan(
    model: nn.Module, example_inputs: tuple | None, producers: Iterable[str] | str | None
) -> _Plan:
    _check_model(model)
    selected = rules.selected_kinds(producers)
    paths: dict[int, str] = {}
    modules: dict[str, nn.Module] = {}
    for path, m in model.named_modules():
        if (is_batchnorm(m) or producer_kind(m)) and path:
            paths[id(m)] = path
            modules[path] = m
    report = FoldReport(model=type(model).__name__)
    if is_batchnorm(model):
        name = type(model).__name__
        reason = "the model is a lone BatchNorm: no layer feeds it"
        report.entries.append(FoldEntry(name, None, "skipped", reason, rules.NO_PRODUCER, name))
    bns = [p for p, m in modules.items() if is_batchnorm(m)]
    if not bns:
        return _Plan(report, [])

    flow = module_dataflow(model, example_inputs, paths)
    prod_modules = {p: m for p, m in modules.items() if producer_kind(m)}
    shared = _names_of_state(model)
    if any(spec_runs_forward(modules[bn]) for bn in bns):
        with TRACE_LOCK, preserved_state(model, values=True):  # reading it runs forward
            specs = {bn: batchnorm_spec(modules[bn], bn) for bn in bns}
    else:
        specs = {bn: batchnorm_spec(modules[bn], bn) for bn in bns}
    holders = _holders(model, modules, flow)
    _note_hidden_calls(holders, flow)
    around = _around_every_call(model)
    facts_of = {
        bn: _pair_facts(bn, specs[bn], modules, prod_modules, flow, shared, holders, around)
        for bn in bns
    }
    observed_rank = _observe_ranks(model, example_inputs, facts_of, prod_modules, flow)
    if example_inputs is not None and flow.traces:
        _check_against_a_run(model, example_inputs, facts_of, selected, flow)
    if flow.note:
        report.notes.append(flow.note)
        warnings.warn(flow.note, stacklevel=4)

    folds = []
    for bn_path in bns:
        bn = modules[bn_path]
        facts = facts_of[bn_path]
        prod_path = facts.producer
        decision = rules.decide(facts, selected)
        prod_type = type(modules[prod_path]).__name__ if prod_path else ""
        entry = pipeline.entry(bn_path, type(bn).__name__, prod_path, prod_type, decision)
        report.entries.append(entry)
        if decision.ok:
            folds.append(
                _PlannedFold(bn_path, prod_path, specs[bn_path], observed_rank.get(bn_path))
            )
    return _Plan(report, folds, flow, example_inputs)


def _observe_ranks(
    model: nn.Module,
    example_inputs: tuple | None,
    facts_of: dict[str, PairFacts],
    prod_modules: dict[str, nn.Module],
    flow: Dataflow,
) -> dict[str, int]:
    """Settle the folds that only the activation's rank decides, from the example inputs.

    Updates ``facts_of`` and returns, for each such BatchNorm, the rank seen: a fold decided this
    way is exact for that rank only, so it gets a rank check in place of the BatchNorm. With
    layout ops between the producer and the BatchNorm (``transpose(1, 2)``), the rank says
    where they take the producer's channels (see :func:`_layout_facts`).
    """
    if example_inputs is None:
        return {}
    need_rank = [
        bn
        for bn, f in facts_of.items()
        if f.producer is not None and rules.decide(f).rule == rules.CHANNEL_AXIS
    ]
    if not need_rank:  # most models: no extra forward pass
        return {}
    wanted = {facts_of[bn].producer: prod_modules[facts_of[bn].producer] for bn in need_rank}
    ranks = output_ranks(model, example_inputs, wanted)
    observed = {}
    for bn in need_rank:
        seen = ranks.get(facts_of[bn].producer, set())
        if len(seen) == 1:
            rank = next(iter(seen))
            steps = flow.calls[bn].through
            facts_of[bn] = dataclasses.replace(
                facts_of[bn], output_rank=rank, **_layout_facts(facts_of[bn], steps, rank)
            )
            observed[bn] = rank  # every step keeps the rank: the BatchNorm sees this one too
    return observed


def _layout_facts(f: PairFacts, steps: tuple, rank: int | None) -> dict[str, Any]:
    """Where the producer's channels arrive at the BatchNorm through the layout ops between
    them, as the graph frontends say it (``channel_axis``, ``axis_path``, ``axis_problem``);
    nothing without layout ops. A ``rank`` of ``None`` (unknown) cannot be followed."""
    via = layout_text(steps)
    if not via:
        return {}
    if rank is None:
        return {
            "axis_problem": f"the rank of {f.producer}'s output is unknown, so bnfold cannot "
            f"follow its channels through {via} to {f.bn}; {f.rank_hint}"
        }
    assert f.producer_kind is not None
    start = rules.producer_channel_axis(f.producer_kind, rank, f.producer_spatial_dims)
    axis, problem = follow_steps(steps, start, rank) if start >= 0 else (None, "")
    if axis is None:
        why = problem or f"{f.producer}'s {rank}-D output has no channel axis"
        return {"axis_problem": f"bnfold cannot follow the channels through {via}: {why}"}
    return {"channel_axis": axis, "axis_path": via, "axis_problem": ""}


def _check_against_a_run(
    model: nn.Module,
    example_inputs: tuple,
    facts_of: dict[str, PairFacts],
    selected: set[str],
    flow: Dataflow,
) -> None:
    """Run the model on the example inputs and keep the BatchNorms of the folds the run does
    not bear out (see :func:`bnfold.torch.eager.dataflow.run_differences`); updates ``facts_of``."""
    pairs = {
        bn: f.producer
        for bn, f in facts_of.items()
        if f.producer is not None and rules.decide(f, selected).ok
    }
    if not pairs:
        return
    through = {bn: flow.calls[bn].through for bn in pairs if flow.calls[bn].through}
    from_end = {
        bn: -1 if f.producer_kind == "linear" else -f.producer_spatial_dims - 1
        for bn, f in facts_of.items()
        if bn in through
    }
    for bn, problem in run_differences(model, example_inputs, pairs, through, from_end).items():
        facts_of[bn] = dataclasses.replace(
            facts_of[bn], producer_output_users=2, producer_other_users=problem
        )


def _pair_facts(
    bn_path: str,
    spec: BatchNormSpec,
    modules: dict[str, nn.Module],
    prod_modules: dict[str, nn.Module],
    flow: Dataflow,
    shared: dict[int, list[tuple[nn.Module, str]]],
    holders: dict[str, list[_Holder]],
    around: str,
) -> PairFacts:
    """Translate what the model and its data flow say about one BatchNorm into rule facts.

    ``around`` says why code bnfold cannot see runs around the model's calls (hooks on the
    root, global hooks): it keeps every BatchNorm.
    """
    bn = modules[bn_path]
    call = flow.calls.get(bn_path, ModuleCalls())
    bn_facts = dict(
        bn=bn_path,
        bn_uses_running_stats=not spec.uses_running_stats,
        bn_not_inference_reason=spec.uses_running_stats,
        bn_calls=max(call.calls, 1),
        bn_custom_forward=spec.not_foldable or around,
        bn_params_constant=not params_not_constant(bn),
        bn_state_used_elsewhere=", ".join(flow.outside_uses.get(bn_path, [])),
        bn_input_ranks=spec.input_ranks,
    )
    prod_path = call.input_from if call.calls and call.input_from in prod_modules else None
    if prod_path is None:
        if call.calls == 0:
            if holders.get(bn_path):
                h = holders[bn_path][0]
                bn_facts["bn_custom_forward"] = (
                    f"it belongs to {h.layer} ({h.kind}), a layer whose forward() bnfold treats "
                    "as a whole; folding inside a layer is not attempted"
                )
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
        for owner, name in shared[id(getattr(prod, pname))]
        if owner is not prod  # the same module under a second name is not sharing
    ]
    others += flow.outside_uses.get(prod_path, [])
    # With pass-through modules or layout ops between them, the first of them takes the
    # BatchNorm's place among the producer's users, and what reads the values between is a user.
    first = call.via if call.through else f"module {bn_path}"
    users = [u for u in pcall.other_users if u != first] + call.through_users
    facts = PairFacts(
        **bn_facts,
        producer=prod_path,
        producer_kind=kind,
        producer_spatial_dims=len(prod.kernel_size) if kind != "linear" else 0,
        producer_custom_forward=custom_forward_reason(prod),
        producer_calls=pcall.calls,
        producer_output_users=pcall.output_users + len(call.through_users),
        producer_other_users=", ".join(users),
        producer_params_constant=not params_not_constant(prod),
        producer_params_shared=", ".join(others),
    )
    return dataclasses.replace(facts, **_layout_facts(facts, call.through, None))


class _Holder(NamedTuple):
    layer: str  # the path of the layer that holds it
    kind: str  # that layer's class name
    name: str  # the holder's path to it


def _holders(
    model: nn.Module, modules: dict[str, nn.Module], flow: Dataflow
) -> dict[str, list[_Holder]]:
    """For each producer and BatchNorm: the layers that hold it below them and whose forward
    bnfold does not look into, with the name it has there.

    Those are the producers and BatchNorms themselves (a conv that a BatchNorm subclass's
    forward calls) and the modules torch.fx kept whole (``nn.MultiheadAttention`` reads its
    ``out_proj.weight`` without calling ``out_proj``). Each layer's subtree is walked once, so a
    module registered under many names costs no more than one.
    """
    path_of = {id(m): p for p, m in modules.items()}
    containers = dict(modules)
    for path in flow.opaque_calls:
        containers[path] = model.get_submodule(path)
    found: dict[str, list[_Holder]] = defaultdict(list)
    for cpath, container in containers.items():
        seen = {id(container)}
        stack = [(cpath, container)]
        while stack:
            prefix, m = stack.pop()
            for name, child in m._modules.items():
                if child is None or id(child) in seen:
                    continue
                seen.add(id(child))
                sub = f"{prefix}.{name}"
                own = path_of.get(id(child))
                if own is not None and own != cpath:
                    found[own].append(_Holder(cpath, type(container).__name__, sub))
                stack.append((sub, child))
    return found


def _note_hidden_calls(holders: dict[str, list[_Holder]], flow: Dataflow) -> None:
    """A producer or BatchNorm held inside a layer bnfold does not trace into may be called, or
    its tensors read, where the trace does not look: record that as a use the data flow cannot
    see, so that no fold relies on its single call."""
    for own, places in holders.items():
        if own in flow.calls and flow.calls[own].calls > 0:
            for h in places:
                flow.outside_uses.setdefault(own, []).append(
                    f"the forward() of {h.layer} ({h.kind}), which bnfold does not trace and "
                    f"which may call it or read its tensors as {h.name}"
                )


# --------------------------------------------------------------------------------------------
# Applying the folds


class FoldedBatchNorm(nn.Module):
    """Takes the place of a folded BatchNorm where ``nn.Identity`` would not be enough.

    ``rest`` is what a BatchNorm subclass's own forward did after normalising (an activation,
    say). ``rank`` (0: no check) is set when the example inputs decided the fold: Linear +
    BatchNorm1d is exact on 2-D ``(N, C)`` activations and wrong on 3-D ones, which BatchNorm1d
    also accepts, so another rank fails loudly here instead of giving different answers. Written
    with ``torch._assert`` so that torch.fx, torch.export and TorchScript all take it.
    """

    def __init__(self, bn: str, producer: str, rank: int = 0, rest: nn.Module | None = None):
        super().__init__()
        self.folded_into = producer
        self.rank = rank
        self.rest = nn.Identity() if rest is None else rest
        self.message = (
            f"bnfold folded BatchNorm {bn} into {producer} for {rank}-D activations (as the "
            "example inputs had them); this input has another rank: fold again with example "
            "inputs of the rank you use"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank > 0:
            torch._assert(x.dim() == self.rank, self.message)
        return self.rest(x)

    def extra_repr(self) -> str:
        return f"folded_into={self.folded_into!r}, rank={self.rank}"


@dataclass
class _Folded:
    """The new values of one fold, checked against the original model's tensors."""

    bn: str
    producer: str
    weight: ScaledWeight  # formed when applied: in place, or as a new tensor for a copy
    bias: torch.Tensor
    replacement: nn.Module  # what takes the BatchNorm's place


def _replacement(fold: _PlannedFold, bn: nn.Module) -> nn.Module:
    """What takes the folded BatchNorm's place, with the BatchNorm's plain attributes."""
    if fold.rank is None and fold.spec.remainder is None:
        new: nn.Module = nn.Identity()
    else:
        new = FoldedBatchNorm(fold.bn, fold.producer, fold.rank or 0, fold.spec.remainder)
    # An eval model stays in eval mode throughout: set on the modules made here only (a
    # remainder wraps the user's own modules, which keep their flags).
    new.training = bn.training
    if isinstance(new, FoldedBatchNorm):
        new.rest.training = bn.training
    return carry_plain_attributes(bn, new)


def _compute(model: nn.Module, plan: _Plan) -> tuple[list[_Folded], FoldReport]:
    """Compute every planned fold from ``model``'s tensors (which stay untouched).

    The algebra's refusals (invalid or overflowing numbers) become skips in the returned report.
    """
    modules = dict(model.named_modules())
    outcome = {e.bn: e for e in plan.report.entries}
    done = []
    with torch.no_grad():
        for fold in plan.folds:
            prod = modules[fold.producer]
            try:
                s, t = fold.spec.factors()
                w, b = checked_fold(prod.weight, prod.bias, s, t, output_layout(prod))
            except FoldRefused as refusal:
                outcome[fold.bn] = pipeline.skipped(outcome[fold.bn], pipeline.refused(refusal))
                continue
            done.append(_Folded(fold.bn, fold.producer, w, b, _replacement(fold, modules[fold.bn])))
    entries = [outcome[e.bn] for e in plan.report.entries]
    return done, FoldReport(entries, plan.report.model, plan.report.notes)


def _new_param(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A Parameter holding ``value``, with ``like``'s requires_grad.

    Made outside inference mode: the fold may run under the caller's ``torch.inference_mode``,
    whose tensors could not be used by autograd or changed in place outside it, where the
    model's own parameters can.
    """
    with torch.inference_mode(False):
        return nn.Parameter(_normal_tensor(value), requires_grad=like.requires_grad)


def _normal_tensor(value: torch.Tensor) -> torch.Tensor:
    """``value``, or a copy made outside inference mode when it is an inference tensor."""
    if not value.is_inference():
        return value
    with torch.inference_mode(False):
        return value.clone()


class _CopyMismatch(Exception):
    """Copying the model did not give the copy bnfold folded (a ``__deepcopy__`` of its own)."""


def _copy_folded(
    model: nn.Module, folds: list[_Folded], share: bool = False, scaled: bool = True
) -> nn.Module:
    """Deep-copy ``model`` with the folds applied, without copying what the folds replace.

    The folded parameters and the replaced BatchNorms are put into deepcopy's memo: every
    reference to them, in module slots or anywhere else, gets the new object, and the copy costs
    one copy of the unchanged part of the model only. With ``share``, the copy's other
    parameters and buffers are the model's own, and without ``scaled`` its folded weights
    hold the old values: light copies, to check, never returned.

    Raises :class:`_CopyMismatch` when a folded layer of the copy is not what the memo put
    there: a module's own ``__deepcopy__`` that ignores the memo, or rebuilds the module.
    """
    memo: dict[int, Any] = {}
    if share:  # every tensor the modules hold, plain attributes too: a light copy is cheap
        for _, _, _, t in reachable_tensors(model):
            memo[id(t)] = t
    expected = []
    for f in folds:
        prod = model.get_submodule(f.producer)
        weight = _new_param(f.weight.value(), prod.weight) if scaled else prod.weight
        memo[id(prod.weight)] = weight
        if prod.bias is not None:
            memo[id(prod.bias)] = _new_param(f.bias, prod.bias)
        # Copied with the same memo, so modules it shares with the model stay shared.
        with torch.inference_mode(False):
            replacement = copy.deepcopy(f.replacement, memo)
        memo[id(model.get_submodule(f.bn))] = replacement
        expected.append((f, weight, replacement))
    planned = dict(memo)  # deepcopy adds what it copied, also when it fails halfway
    try:
        with torch.inference_mode(False):  # a clone made under inference mode would be one
            target = copy.deepcopy(model, memo)
    except Exception as e:
        if share:  # a lock, a file: the modules alone are enough to check the folds on
            target = _module_tree_copy(model, planned)
        else:
            raise UnsupportedModelError(
                f"could not copy {type(model).__name__} ({type(e).__name__}: "
                f"{first_line(e)}); pass inplace=True to fold it in place instead"
            ) from e
    for f, weight, replacement in expected:
        try:
            prod, bn = target.get_submodule(f.producer), target.get_submodule(f.bn)
        except AttributeError:
            prod = bn = None
        if prod is None or prod.weight is not weight or bn is not replacement:
            raise _CopyMismatch(
                f"copying {type(model).__name__} did not give the copy of {f.producer} and "
                f"{f.bn} that bnfold folded (a __deepcopy__ of its own that rebuilds modules "
                "or ignores deepcopy's memo)"
            )
        if prod.bias is None:
            prod.register_parameter("bias", _new_param(f.bias, prod.weight))
    return target


def _module_tree_copy(model: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """The modules of ``model`` copied one by one (their own tables of parameters, buffers and
    children), every other attribute shared; what ``memo`` maps is replaced. For checking
    folds on a model that cannot be deep-copied."""

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = copy.copy(m)
        memo[id(m)] = new
        for table in ("_parameters", "_buffers"):
            tensors = {k: memo.get(id(t), t) for k, t in getattr(m, table).items()}
            object.__setattr__(new, table, tensors)
        children = {k: c if c is None else clone(c) for k, c in m._modules.items()}
        object.__setattr__(new, "_modules", children)
        return new

    return clone(model)


# --------------------------------------------------------------------------------------------
# Checking the folded model behaves as the model does


def _structure_problem(model: nn.Module, plan: _Plan, folds: list[_Folded]) -> str:
    """Why the model with ``folds`` applied would not run as the model does, or ``""``.

    forward may look at the layers instead of only calling them: ``if self.conv.bias is
    None``, ``isinstance(m, nn.BatchNorm2d)``, ``self.bn.weight.dtype``, a method of the
    BatchNorm. A light copy with the folds applied is traced the way the model was, and its
    graph must be the model's; on the torch.export path, where there is one trace of the
    example inputs, the copy is run on them and its outputs compared with the model's.
    """
    flow = plan.flow
    if flow is None or not folds:
        return ""
    try:
        light = _copy_folded(model, folds, share=True, scaled=not flow.traces)
    except _CopyMismatch as e:
        return f"bnfold checks folds on a copy of the model, and {e}"
    if flow.traces:
        leaves = frozenset(id(light.get_submodule(f.bn)) for f in folds)
        difference = trace_difference(light, flow.traces, leaves)
        return f"with this fold {difference}; {_LOOKS}" if difference else ""
    for inputs, reference in _references(model, plan):
        try:
            folded = run_model(light, inputs, "folded")
            _, rel = compare(reference, folded)
        except Exception as e:  # noqa: BLE001 - the folded model failing is the difference
            return f"with this fold the model fails when run ({first_line(e)}); {_LOOKS}"
        # A fold's rounding is far below the dtype's tolerance, a changed computation far above.
        if not rel <= tolerance([t for _, t in reference]):
            return (
                "with this fold the model's outputs on the example inputs (or on them scaled) "
                f"change (relative error {rel:.2g}); {_LOOKS}"
            )
    return ""


def _references(model: nn.Module, plan: _Plan) -> list[tuple[tuple, list]]:
    """The inputs the torch.export path checks folds on, with the model's outputs, computed
    once per fold call: the example inputs, and the same with their floating-point tensors
    scaled by 30 and by 1/1000 (a branch on the layers may only show on larger or smaller
    values: ``if isinstance(self.bn, BatchNorm2d): y = y.clamp(-20, 20)``). Scaled inputs the
    model rejects, or on which it overflows, are left out."""
    if plan.references is None:
        example = plan.example_inputs or ()
        plan.references = [(example, run_model(model, example, "original"))]
        for factor in (30.0, 1e-3):
            scaled = torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda t, k=factor: t * k if t.is_floating_point() else t, example
            )
            try:
                outputs = run_model(model, scaled, "original")
            except BnfoldError:
                continue
            if all(bool(t.isfinite().all()) for _, t in outputs if t.is_floating_point()):
                plan.references.append((scaled, outputs))  # overflowing ones compare nothing
    return plan.references


_LOOKS = (
    "forward() looks at the layers instead of only calling them (a bias tested for None, a "
    "type checked, a BatchNorm attribute read), or reaches them where a copy does not"
)


def _refused_folds(model: nn.Module, plan: _Plan, folds: list[_Folded]) -> dict[str, str]:
    """The folds that make the model behave differently, with the reason: found by halving
    (one bad fold among N costs about 2*log2(N) checks, not N)."""
    problem = _structure_problem(model, plan, folds)
    if not problem:
        return {}
    if len(folds) == 1:
        return {folds[0].bn: problem}
    half = len(folds) // 2
    bad = {**_refused_folds(model, plan, folds[:half]), **_refused_folds(model, plan, folds[half:])}
    return bad or {f.bn: problem for f in folds}  # only the halves together misbehave


def _settle(
    model: nn.Module, plan: _Plan, folds: list[_Folded], report: FoldReport
) -> tuple[list[_Folded], FoldReport]:
    """Keep the folds with which the model still behaves as it did (see
    :func:`_structure_problem`); the others become skips with the reason."""
    refused = _refused_folds(model, plan, folds)
    kept = [f for f in folds if f.bn not in refused]
    together = _structure_problem(model, plan, kept) if kept and refused else ""
    if together:  # each part on its own is fine, but not all of them together
        refused.update({f.bn: together for f in kept})
        kept = []
    return kept, _keep(report, refused)


def _keep(report: FoldReport, refused: dict[str, str]) -> FoldReport:
    """``report`` with the folds of ``refused`` (BatchNorm -> reason) turned into skips: what
    the model does cannot be kept with them (``standard-forward``)."""
    entries = [
        pipeline.skipped(e, rules.Decision(False, rules.STANDARD_FORWARD, refused[e.bn]))
        if e.bn in refused
        else e
        for e in report.entries
    ]
    return FoldReport(entries, report.model, report.notes)


def _become(obj: nn.Module, new: nn.Module) -> None:
    """Turn module ``obj`` into ``new`` in place, so that every reference to it sees ``new``.

    A BatchNorm may be held outside module slots (a plain list of layers, a dict): rebinding the
    slots would leave those references calling the old BatchNorm after a folded producer.
    The class is changed first: when Python refuses (see :func:`_become_problem`), ``obj`` is
    left as it was.
    """
    object.__setattr__(obj, "__class__", new.__class__)
    obj.__dict__.clear()
    obj.__dict__.update(new.__dict__)
    if isinstance(obj, torch.fx.GraphModule):
        obj.graph = new.graph  # the graph's owning module must be obj itself


def _become_problem(obj: nn.Module, new: nn.Module) -> str:
    """Why :func:`_become` cannot turn ``obj`` into ``new``, or ``""``.

    Python changes an object's class only between classes of the same memory layout: a
    BatchNorm subclass declaring ``__slots__`` (or built on a C type) has another one than
    ``nn.Identity``, and no class that is not a BatchNorm can have it. Tried on ``obj`` itself,
    and undone.
    """
    old = type(obj)
    try:
        object.__setattr__(obj, "__class__", type(new))
    except TypeError as e:
        return (
            f"{old.__name__} cannot be replaced in place ({first_line(e)}; a class declaring "
            "__slots__ has another memory layout than the module replacing it): fold with "
            "inplace=False"
        )
    object.__setattr__(obj, "__class__", old)
    return ""


def _fold_in_place(
    model: nn.Module, folds: list[_Folded], report: FoldReport | None = None
) -> FoldReport | None:
    """Write the folds into ``model``; the Parameter and module objects are kept.

    Every BatchNorm is first checked to be replaceable in place (:func:`_become_problem`),
    before any weight is written: the folds of those that are not become skips in ``report``,
    returned updated (without a report, they raise :class:`UnsupportedModelError`, the model
    untouched). The new values are made outside the caller's inference mode (see
    :func:`_new_param`).
    """
    refused = {
        f.bn: why
        for f in folds
        if (why := _become_problem(model.get_submodule(f.bn), f.replacement))
    }
    if refused and report is None:
        raise UnsupportedModelError(f"BatchNorm {next(iter(refused.values()))}")
    if refused and report is not None:
        report = _keep(report, refused)
    private = _private_memory(model)
    # inference_mode(False) turns grad mode back on: no_grad inside it.
    with torch.inference_mode(False), torch.no_grad():
        for f in folds:
            if f.bn in refused:
                continue
            prod = model.get_submodule(f.producer)
            # Keep the Parameter objects: optimizers and other references see the new values.
            if id(prod.weight) in private:
                f.weight.write_into(prod.weight)  # one read and one write, no new memory
            else:
                prod.weight.data = _normal_tensor(f.weight.value())
            if prod.bias is None:
                prod.register_parameter("bias", _new_param(f.bias, prod.weight))
            else:
                prod.bias.data = _normal_tensor(f.bias)
            _become(model.get_submodule(f.bn), f.replacement)
    return report


def _private_memory(model: nn.Module) -> set[int]:
    """ids of the model's parameters whose memory no other tensor of the model reaches.

    Only those are multiplied in place: a parameter viewing a shared buffer (tied through a
    view, or a slice of one flat tensor), or viewed by a plain tensor attribute or a tensor in a
    holder (``self.w = conv.weight.detach()``), keeps the other tensors' values by getting new
    memory. Inference tensors (made under ``torch.inference_mode``) cannot be written outside
    it.
    """
    storage: dict[int, tuple[int, int]] = {}  # id(tensor) -> (data pointer, bytes)
    for _, _, _, t in reachable_tensors(model):
        try:
            storage[id(t)] = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # no storage of its own (a subclass)
            continue
    users: dict[int, int] = defaultdict(int)
    for ptr, _ in storage.values():
        users[ptr] += 1
    tensors = {id(t): t for _, _, _, t in reachable_tensors(model)}
    return {
        i
        for i, t in tensors.items()
        if isinstance(t, nn.Parameter)
        and type(t.data) is torch.Tensor
        and not t.is_inference()
        and i in storage
        and users[storage[i][0]] == 1
        and storage[i][1] == t.numel() * t.element_size()
    }


# --------------------------------------------------------------------------------------------
# Public entry points (called through bnfold.fold / analyze / verify)


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    producers: Iterable[str] | str | None = None,
) -> FoldReport:
    """Decide every BatchNorm of ``model`` without changing anything.

    The folds are computed and thrown away, so that numbers the algebra refuses (non-finite,
    overflowing) are reported exactly as :func:`fold` would.
    """
    plan = _plan(model, normalise_inputs(example_inputs), producers)
    return _settle(model, plan, *_compute(model, plan))[1]


def fold(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    producers: Iterable[str] | str | None = None,
    return_report: bool = False,
) -> Any:
    """Fold every BatchNorm of ``model`` that can be folded exactly.

    Returns a model of the same class (``model`` itself when ``inplace``), or
    ``(model, report)`` with ``return_report=True``.
    """
    plan = _plan(model, normalise_inputs(example_inputs), producers)
    folds, report = _settle(model, plan, *_compute(model, plan))
    if inplace:
        report = _fold_in_place(model, folds, report)
        target = model
    else:
        try:
            target = _copy_folded(model, folds)
        except _CopyMismatch as e:  # copying behaved otherwise when the folds were checked
            raise UnsupportedModelError(f"{e}: fold it with inplace=True") from e
    return (target, report) if return_report else target


__all__ = ["analyze", "fold", "verify", "FoldedBatchNorm"]
