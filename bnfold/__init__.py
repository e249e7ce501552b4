"""bnfold: fold BatchNorm into the neighbouring linear layers of a trained network, exactly.

Public API: :func:`fold`, :func:`analyze`, :func:`verify`, :class:`FoldReport` and the
exceptions in :mod:`bnfold.errors`. ``import bnfold`` imports no framework: each frontend is
imported when a model of its kind arrives.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from .core.gc_pause import gc_paused
from .core.report import FoldEntry, FoldReport
from .errors import (
    BnfoldError,
    InvalidArgumentError,
    ModelFileError,
    TracingError,
    TrainingModeError,
    UnsupportedModelError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "fold",
    "analyze",
    "verify",
    "FoldReport",
    "FoldEntry",
    "BnfoldError",
    "InvalidArgumentError",
    "ModelFileError",
    "TracingError",
    "TrainingModeError",
    "UnsupportedModelError",
    "VerificationError",
]


def _frontend(model: Any) -> Any:
    """The frontend module for ``model``'s type, imported on first use."""
    # A model of a framework exists only if that framework was imported.
    torch = sys.modules.get("torch")
    if torch is not None:
        from torch.export import ExportedProgram

        if isinstance(model, ExportedProgram):
            from .torch import export as torch_export

            return torch_export
        if isinstance(model, torch.nn.Module):
            _refuse_unflattened(torch, model)
            if isinstance(model, torch.fx.GraphModule):
                from .torch import export as torch_export

                if torch_export.is_aten_graph(model):
                    return torch_export
            from .torch.eager import module as torch_module

            return torch_module
    onnx, onnx_ir = sys.modules.get("onnx"), sys.modules.get("onnx_ir")
    if (onnx is not None and isinstance(model, onnx.ModelProto)) or (
        onnx_ir is not None and isinstance(model, onnx_ir.Model)
    ):
        from .onnx import fold as onnx_fold

        return onnx_fold
    raise UnsupportedModelError(
        f"bnfold cannot fold a {type(model).__module__}.{type(model).__name__}: "
        "pass a torch.nn.Module, a torch.export.ExportedProgram, an ATen GraphModule, "
        "an onnx.ModelProto or an onnx_ir.Model"
    )


def _refuse_unflattened(torch: Any, model: Any) -> None:
    """An ``torch.export.unflatten`` result spreads one ATen graph over many modules, which
    neither the module nor the graph frontend reads; say what to do instead."""
    from torch.export.unflatten import InterpreterModule, UnflattenedModule

    kinds = (UnflattenedModule, InterpreterModule)
    if any(isinstance(m, kinds) for m in model.modules()):
        raise UnsupportedModelError(
            "this is (or holds) a module made by torch.export.unflatten: fold the "
            "ExportedProgram first (bnfold.fold(ep)), then unflatten the result"
        )


def fold(
    model: Any,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    producers: Iterable[str] | str | None = None,
    return_report: bool = False,
) -> Any:
    """Fold every BatchNorm that can be folded exactly into the layer that produces its input.

    Returns a model of the same kind and class as ``model``; the input is not modified unless
    ``inplace=True``. ``example_inputs`` (a tuple of positional arguments, or one tensor) lets
    bnfold see shapes, which some folds need (Linear + BatchNorm1d), and trace models that
    ``torch.fx`` cannot. ``producers`` limits the folds to some layer kinds (one or several of
    ``"conv"``, ``"conv_transpose"``, ``"linear"``). With ``return_report=True`` the result is
    ``(folded_model, report)``. Raises :class:`BnfoldError` subclasses with what to do.
    """
    for name, value in (("inplace", inplace), ("return_report", return_report)):
        if not isinstance(value, bool):  # "yes" would count as True and change the model
            raise InvalidArgumentError(f"{name} must be True or False, not {value!r}")
    frontend = _frontend(model)
    with gc_paused():
        return frontend.fold(
            model, example_inputs, inplace=inplace, producers=producers, return_report=return_report
        )


def analyze(
    model: Any, example_inputs: Any = None, *, producers: Iterable[str] | str | None = None
) -> FoldReport:
    """Return the :class:`FoldReport` that :func:`fold` would produce, changing nothing."""
    frontend = _frontend(model)
    with gc_paused():
        return frontend.analyze(model, example_inputs, producers=producers)


def verify(original: Any, folded: Any, example_inputs: Any) -> tuple[float, float]:
    """Run both models on ``example_inputs``; return ``(max_abs_err, max_rel_err)``."""
    return _frontend(original).verify(original, folded, example_inputs)
