"""The model frontend for JAX programs and StableHLO text.

``bnfold.fold(exported)`` takes a ``jax.export.Exported`` and returns a new one (same calling
convention, shardings and effects; its module folded), which calls and serializes like the
original. ``bnfold.fold(text)`` takes StableHLO MLIR assembly and returns folded assembly
(with locations when the input had them). Both are immutable: the input is never changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from ..core import pipeline, rules
from ..core.report import FoldReport
from ..errors import InvalidArgumentError, UnsupportedModelError
from . import mlir
from .adapter import StableHloAdapter
from .constants import symbol_name


@dataclass
class Opened:
    """A model read into a module of its own context."""

    model: Any
    module: Any
    ctx: Any
    debug_info: bool = False

    @property
    def name(self) -> str:
        if mlir.is_exported(self.model):
            return f"jax.export.Exported {self.model.fun_name}"
        name = symbol_name(self.module.operation)
        return f"@{name}" if name else "StableHLO module"

    def result(self) -> Any:
        """The (folded) module, in the kind of model it came as."""
        if mlir.is_exported(self.model):
            return mlir.replace_module(self.model, self.module)
        return mlir.to_text(self.module, debug_info=self.debug_info)


def open_model(model: Any) -> Opened:
    """Read ``model`` (an ``Exported`` or text) into a fresh module."""
    mlir.require()
    ctx = mlir.context()
    if mlir.is_exported(model):
        return Opened(model, mlir.from_artifact(model.mlir_module_serialized, ctx), ctx)
    if isinstance(model, str):
        if "\n" not in model and os.path.exists(model):
            raise UnsupportedModelError(
                f"{model!r} is a file name: pass the module's text (open(path).read()), or "
                "fold the file with the bnfold command"
            )
        return Opened(model, mlir.parse_text(model, ctx), ctx, debug_info="loc(" in model)
    raise UnsupportedModelError(
        f"bnfold cannot fold a {type(model).__name__} as StableHLO: pass a "
        "jax.export.Exported or StableHLO text"
    )


def _run(opened: Opened, producers: Any, *, rewrite: bool, affine: bool = True) -> FoldReport:
    selected = rules.selected_kinds(producers)
    with opened.ctx, mlir.ir.Location.unknown():
        adapter = StableHloAdapter(opened.module, affine)
        try:
            outcome = pipeline.run(adapter, selected, rewrite=rewrite)
        finally:
            adapter.unmark()
        if rewrite:
            mlir.verify(opened.module)
    entries = []
    for entry in outcome.entries:
        entries.append(entry)
        for other in adapter.companions.get(entry.bn, []):
            note = f"in one chain with {entry.bn}"
            entries.append(replace(entry, bn=other, note=note if entry.folded else ""))
    report = FoldReport(entries, model=opened.name)
    if not outcome.entries:
        report.notes.append("no BatchNorm (or per-channel affine chain) found: nothing to fold")
    return report


def analyze(
    model: Any, example_inputs: Any = None, *, producers: Any = None, affine: bool = True
) -> FoldReport:
    """The report :func:`fold` would give, changing nothing: the fold runs on bnfold's own
    copy of the module (a chain kept after one that folds is decided after the rewrite), and
    the copy is dropped."""
    return _run(open_model(model), producers, rewrite=True, affine=affine)


def fold(
    model: Any,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    producers: Any = None,
    return_report: bool = False,
    affine: bool = True,
) -> Any:
    """A folded copy of ``model`` (an ``Exported``, or text), with the report if asked.

    Every chain that scales channel by channel is a BatchNorm (JAX writes them as arithmetic);
    ``affine`` also folds the other chains after a layer (scalars, several adds), reported as
    entries of kind ``"affine"``."""
    if inplace:
        raise InvalidArgumentError(
            "a jax.export.Exported and StableHLO text are immutable: fold returns the folded "
            "model (inplace=True is not possible)"
        )
    opened = open_model(model)
    report = _run(opened, producers, rewrite=True, affine=affine)
    result = opened.result()
    return (result, report) if return_report else result


def verify(original: Any, folded: Any, example_inputs: Any) -> tuple[float, float]:
    """Run both on ``example_inputs`` (the positional arguments; random when ``None``) and
    return ``(max_abs_err, max_rel_err)`` over their floating-point outputs."""
    from .run import verify as run_and_compare

    return run_and_compare(original, folded, example_inputs)
