"""torch.export programs and ATen graph modules: fold BatchNorm where ExecuTorch and pt2e see it.

Two containers hold the same kind of graph:

- an ``ExportedProgram``, whose parameters, buffers and constants are placeholders described by
  its graph signature, with values in ``state_dict`` / ``constants``;
- the ``GraphModule`` of ``ep.module()`` (what pt2e quantization takes), whose tensors are
  ``get_attr`` nodes.

Each gets a :class:`~bnfold.torch.aten.store.Store`; the ATen adapter
(:mod:`bnfold.torch.aten.adapter`) and the shared driver (:mod:`bnfold.core.pipeline`) do the
rest. This module copies the container, runs the pipeline and builds the result.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule

from ..core import pipeline, rules
from ..core.report import FoldEntry, FoldReport
from ..errors import InvalidArgumentError
from ..torch.aten.adapter import AtenAdapter
from ..torch.aten.store import (
    ModuleStore,
    ProgramStore,
    Store,
    copy_graph_module,
    copy_quietly,
    module_tensors,
    unshare,
)
from ..torch.verify import verify as verify_modules


def _preserved_modules(ep: ExportedProgram) -> list[str]:
    """Modules whose call signature the program preserves (``preserve_module_call_signature``)."""
    return [e.fqn for e in ep.module_call_graph if e.fqn and e.signature is not None]


# --------------------------------------------------------------------------------------------
# Public entry points


def _report(entries: list[FoldEntry], model: Any) -> FoldReport:
    notes = []
    if not entries:
        # torchao's convert_pt2e folds conv + BatchNorm itself where its patterns match
        notes.append("the graph has no BatchNorm left: nothing to fold")
    return FoldReport(entries, type(model).__name__, notes)


def analyze(
    model: ExportedProgram | GraphModule,
    example_inputs: Any = None,
    *,
    producers: Iterable[str] | str | None = None,
    qat: str = "exact",
    affine: bool = True,
) -> FoldReport:
    """Decide every BatchNorm node (and affine chain) of ``model`` without changing anything.

    ``example_inputs`` is not needed: the shapes come from the graph's metadata.
    """
    selected = rules.selected_kinds(producers)
    qat = rules.qat_mode(qat)
    if isinstance(model, ExportedProgram):
        gm, boundaries = model.graph_module, _preserved_modules(model)
        store: Store = ProgramStore(model, gm.graph)
    else:
        gm, boundaries, store = model, [], ModuleStore(model)
    adapter = AtenAdapter(gm, store, boundaries, qat, affine=affine)
    outcome = pipeline.run(adapter, selected, rewrite=False)
    if outcome.complete:
        return _report(outcome.entries, model)
    # Chained BatchNorms: what a fold does takes more than one pass, so fold a scratch copy
    # (sharing the tensors, which are never written) and report that.
    return _fold(model, selected, inplace=False, scratch=True, qat=qat, affine=affine)[1]


def fold(
    model: ExportedProgram | GraphModule,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    producers: Iterable[str] | str | None = None,
    return_report: bool = False,
    qat: str = "exact",
    affine: bool = True,
) -> Any:
    """Fold every BatchNorm node of ``model`` that can be folded exactly.

    An ExportedProgram gives a new ExportedProgram (sharing the unchanged tensors, as
    ``run_decompositions`` does); a GraphModule gives a new GraphModule, or ``model`` itself
    with ``inplace=True``. ``example_inputs`` is not needed: shapes come from the graph.
    ``qat`` says where the tail of a pt2e QAT chain goes: ``"exact"`` (one add after the
    output dequantize) or ``"bias"`` (into the conv's bias, where the bound holds).
    ``affine`` also folds chains of per-channel arithmetic by constants after a layer
    (``mul``/``div``/``add``/``sub``/``neg``, before or after a BatchNorm); ``False`` leaves
    all arithmetic as it is.
    """
    qat = rules.qat_mode(qat)
    if isinstance(model, ExportedProgram) and inplace:
        raise InvalidArgumentError(
            "an ExportedProgram is folded into a new program; inplace=True is only for "
            "nn.Module and GraphModule models"
        )
    result, report = _fold(
        model, rules.selected_kinds(producers), inplace=inplace, qat=qat, affine=affine
    )
    return (result, report) if return_report else result


def _fold(
    model: ExportedProgram | GraphModule,
    selected: set[str],
    inplace: bool,
    scratch: bool = False,
    qat: str = "exact",
    affine: bool = True,
) -> tuple[Any, FoldReport]:
    if isinstance(model, ExportedProgram):
        # Only the graph is copied: the new program is built on the input's graph module,
        # whose submodules (control-flow bodies) bnfold does not change.
        root = model.graph_module
        graph = copy_quietly(root.graph)
        copied = list(zip(root.graph.nodes, graph.nodes, strict=True))
        for old, new in copied:
            # fx renames a node on copy when its name is a Python builtin ("input"); torch
            # matches placeholders and signatures by name, so the copy keeps the original's.
            if new.name != old.name:
                new.name = old.name
        store: Store = ProgramStore(model, graph)
        adapter = AtenAdapter(root, store, _preserved_modules(model), qat, affine=affine)
        entries = pipeline.run(adapter, selected).entries
        replaced = adapter.replaced
        if scratch:
            return None, _report(entries, model)
        graph.lint()
        renamed = {}
        for old, new in copied:
            final = replaced.get(new, new)
            while final in replaced:  # conv -> bn1 -> bn2: bn2's output went to bn1's place
                final = replaced[final]
            if final.name != old.name:
                renamed[old.name] = final.name
        return store.program(root, graph, renamed), _report(entries, model)
    originals = module_tensors(model)
    # A copy sharing the input's tensors: the fold replaces what it changes with new tensors,
    # and whatever is still shared afterwards is copied once (unshare).
    gm = model if inplace else copy_graph_module(model, dict(originals))
    adapter = AtenAdapter(gm, ModuleStore(gm), [], qat, affine=affine)
    entries = pipeline.run(adapter, selected).entries
    if scratch:
        return None, _report(entries, model)
    gm.graph.lint()
    gm.recompile()
    if not inplace:
        unshare(gm, originals)
    return gm, _report(entries, model)


def verify(original: Any, folded: Any, example_inputs: Any) -> tuple[float, float]:
    """Run both programs (or graph modules) on ``example_inputs``; return the errors."""

    from ..torch.verify import runnable as program_runnable

    def runnable(m: Any) -> Any:
        return program_runnable(m) if isinstance(m, ExportedProgram) else m

    return verify_modules(runnable(original), runnable(folded), example_inputs)


def is_aten_graph(model: Any) -> bool:
    """Whether a GraphModule holds ATen ops (torch.export / pt2e) rather than module calls."""
    if not isinstance(model, GraphModule):
        return False
    saw_aten = False
    for node in model.graph.nodes:
        if node.op == "call_module":
            sub = model.get_submodule(node.target)
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                return False
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            saw_aten = True
    # A program that computes nothing (ep.module() of an identity) has no ATen op, but its
    # placeholders carry the example values torch.export records; symbolic traces do not.
    exported = any("val" in n.meta for n in model.graph.nodes if n.op == "placeholder")
    return saw_aten or exported


__all__ = ["analyze", "fold", "verify", "is_aten_graph"]
