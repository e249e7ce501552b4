"""bnfold: fold BatchNorm into the neighbouring linear layers of a trained network, exactly.

Public API: :func:`fold`, :func:`analyze`, :func:`verify`, :class:`FoldReport` and the
exceptions in :mod:`bnfold.errors`. ``import bnfold`` imports no framework: each frontend is
imported when a model of its kind arrives (:mod:`bnfold.core.frontend` says which frontend
takes which model).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .core.frontend import model_frontend
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
    frontend = model_frontend(model)
    with gc_paused():
        return frontend.fold(
            model, example_inputs, inplace=inplace, producers=producers, return_report=return_report
        )


def analyze(
    model: Any, example_inputs: Any = None, *, producers: Iterable[str] | str | None = None
) -> FoldReport:
    """Return the :class:`FoldReport` that :func:`fold` would produce, changing nothing."""
    frontend = model_frontend(model)
    with gc_paused():
        return frontend.analyze(model, example_inputs, producers=producers)


def verify(original: Any, folded: Any, example_inputs: Any) -> tuple[float, float]:
    """Run both models on ``example_inputs``; return ``(max_abs_err, max_rel_err)``."""
    return model_frontend(original).verify(original, folded, example_inputs)
