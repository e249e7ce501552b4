"""bnfold: fold BatchNorm into the neighbouring linear layers of a trained network, exactly.

Public API: :func:`fold`, :func:`analyze`, :func:`verify`, :class:`FoldReport` and the
exceptions in :mod:`bnfold.errors`. ``import bnfold`` imports no framework: each frontend is
imported when a model of its kind arrives (:mod:`bnfold.core.frontend` says which frontend
takes which model).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from .core.frontend import model_frontend
from .core.gc_pause import gc_paused
from .core.report import FoldEntry, FoldReport
from .core.rules import qat_mode
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
    qat: str = "exact",
    affine: bool = True,
) -> Any:
    """Fold every BatchNorm that can be folded exactly into the layer that produces its input.

    Returns a model of the same kind and class as ``model``; the input is not modified unless
    ``inplace=True``. ``example_inputs`` (a tuple of positional arguments, or one tensor) lets
    bnfold see shapes, which some folds need (Linear + BatchNorm1d), and trace models that
    ``torch.fx`` cannot. ``producers`` limits the folds to some layer kinds (one or several of
    ``"conv"``, ``"conv_transpose"``, ``"linear"``). With ``return_report=True`` the result is
    ``(folded_model, report)``. ``qat`` says where the BatchNorm of a pt2e quantization-aware
    training chain goes (graphs after torchao's ``convert_pt2e``): ``"exact"`` (the default)
    makes the conv's div/add/batch_norm tail one per-channel add after its output dequantize,
    equal to the unconverted graph up to float rounding; ``"bias"`` folds it into the conv's
    bias before the output quantize where at most about one output quantization step is
    provably moved, and keeps it exact elsewhere (the report says why). ``affine`` (on by
    default) also folds chains of plain per-channel arithmetic after a layer (``Mul``/``Div``
    by constants, ``Add``/``Sub`` of them, as converters leave BatchNorm behind) in graph forms
    (ONNX, ATen graphs of torch.export programs); the report lists them as entries of kind
    ``"affine"``. ``affine=False`` leaves such arithmetic as it is. Raises
    :class:`BnfoldError` subclasses with what to do.
    """
    for name, value in (
        ("inplace", inplace),
        ("return_report", return_report),
        ("affine", affine),
    ):
        if not isinstance(value, bool):  # "yes" would count as True and change the model
            raise InvalidArgumentError(f"{name} must be True or False, not {value!r}")
    frontend = model_frontend(model)
    with gc_paused():
        return frontend.fold(
            model,
            example_inputs,
            inplace=inplace,
            producers=producers,
            return_report=return_report,
            **_qat_argument(frontend, model, qat),
            **_affine_argument(frontend, affine),
        )


def _affine_argument(frontend: Any, affine: bool) -> dict[str, bool]:
    """``affine=`` for the frontends that fold plain arithmetic. The others (eager modules)
    never touch arithmetic, which is what ``affine=False`` asks for, and ``True`` only allows."""
    if "affine" not in inspect.signature(frontend.fold).parameters:
        return {}
    return {"affine": affine}


def _qat_argument(frontend: Any, model: Any, qat: Any) -> dict[str, str]:
    """``qat=`` for the frontends whose graphs hold pt2e QAT chains (nothing for the default)."""
    if qat_mode(qat) == "exact":
        return {}
    if "qat" not in inspect.signature(frontend.fold).parameters:
        raise InvalidArgumentError(
            f"qat={qat!r} applies to pt2e quantized graphs (a torch.export program or an ATen "
            f"GraphModule after convert_pt2e), not to a {type(model).__name__}"
        )
    return {"qat": qat}


def analyze(
    model: Any,
    example_inputs: Any = None,
    *,
    producers: Iterable[str] | str | None = None,
    qat: str = "exact",
    affine: bool = True,
) -> FoldReport:
    """Return the :class:`FoldReport` that :func:`fold` would produce, changing nothing."""
    if not isinstance(affine, bool):
        raise InvalidArgumentError(f"affine must be True or False, not {affine!r}")
    frontend = model_frontend(model)
    with gc_paused():
        return frontend.analyze(
            model,
            example_inputs,
            producers=producers,
            **_qat_argument(frontend, model, qat),
            **_affine_argument(frontend, affine),
        )


def verify(original: Any, folded: Any, example_inputs: Any = None) -> tuple[float, float]:
    """Run both models on ``example_inputs``; return ``(max_abs_err, max_rel_err)``.

    ``None`` runs them on random inputs where the model says what its inputs are (ONNX models,
    ``jax.export`` programs, StableHLO text); PyTorch models need example inputs."""
    return model_frontend(original).verify(original, folded, example_inputs)
