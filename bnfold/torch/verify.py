"""Compare the outputs of two PyTorch models (``bnfold.verify``)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..core import compare as checks
from ..errors import InvalidArgumentError, UnsupportedModelError, first_line
from ..torch.eager.state import TRACE_LOCK, preserved_state

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def output_tensors(
    out: Any, where: str = "output", strict: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a model output, with where it is: tensors in tuples, lists, dicts and
    dataclasses, to any depth. Plain values hold none; another object raises ``TypeError`` when
    ``strict`` (it might hold tensors), and is passed over otherwise."""
    if isinstance(out, torch.Tensor):
        return [(where, out)]
    if isinstance(out, dict):
        return [t for k in out for t in output_tensors(out[k], f"{where}[{k!r}]", strict)]
    if isinstance(out, (list, tuple)):
        return [t for i, o in enumerate(out) for t in output_tensors(o, f"{where}[{i}]", strict)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [
            t
            for f in dataclasses.fields(out)
            for t in output_tensors(getattr(out, f.name), f"{where}.{f.name}", strict)
        ]
    if strict and not isinstance(out, _PLAIN):
        raise TypeError(f"{where} is a {type(out).__name__}, which bnfold cannot look into")
    return []


def normalise_inputs(example_inputs: Any) -> tuple | None:
    """Example inputs as a tuple of positional arguments (``None`` stays ``None``).

    A tuple is the positional arguments; anything else (a tensor, a list, a dict) is the one
    argument of ``forward``.
    """
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    return (example_inputs,)


def _error(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(max |x - y|, that / max |x|), as :func:`bnfold.core.compare.array_error` measures it."""
    if x.dtype == torch.bool:
        x, y = x.to(torch.uint8), y.to(torch.uint8)
    wide = torch.complex128 if (x.is_complex() or y.is_complex()) else torch.float64
    # Widened on the CPU first: numpy has no bfloat16, and some devices no float64.
    x64, y64 = (t.detach().to("cpu", wide).resolve_conj().resolve_neg() for t in (x, y))
    return checks.array_error(x64.numpy(), y64.numpy())


def tolerance(outputs: list[torch.Tensor]) -> float:
    """The relative tolerance for outputs of these dtypes: that of the least precise
    (:data:`bnfold.core.compare.REL_TOLERANCE`; integer and bool outputs must match exactly)."""
    return checks.tolerance(
        str(t.dtype).removeprefix("torch.")
        for t in outputs
        if t.is_floating_point() or t.is_complex()
    )


def verify(original: nn.Module, folded: nn.Module, example_inputs: Any) -> tuple[float, float]:
    """Run both models on ``example_inputs``; return ``(max_abs_err, max_rel_err)``.

    The relative error of each output tensor is ``max|a - b| / max|a|`` (norm-wise, so that
    outputs near zero do not blow it up); the worst output counts. NaN where the original has a
    number (or the reverse) is an infinite error. Raises when the outputs hold no tensor or
    differ in structure or shape.
    """
    inputs = normalise_inputs(example_inputs)
    if inputs is None:
        raise InvalidArgumentError("verify needs example_inputs to run the models on")
    for which, m in (("original", original), ("folded", folded)):
        if not isinstance(m, nn.Module):
            raise UnsupportedModelError(
                f"verify compares two PyTorch models, but the {which} one is a "
                f"{type(m).__module__}.{type(m).__name__}"
            )
    return compare(run_model(original, inputs, "original"), run_model(folded, inputs, "folded"))


def run_model(model: nn.Module, inputs: tuple, which: str) -> list[tuple[str, torch.Tensor]]:
    """The output tensors of ``model`` on a copy of ``inputs`` (a forward may write into
    them), leaving the model as it was: a BatchNorm in training mode updates its statistics
    when run, and verifying must change nothing."""
    kept = _kept_buffers(model) if isinstance(model, torch.jit.ScriptModule) else None
    state = contextlib.nullcontext() if kept else preserved_state(model, values=True, run=True)
    with TRACE_LOCK, state, kept or contextlib.nullcontext(), torch.no_grad():
        try:
            out = output_tensors(model(*fresh_copy(inputs)))
        except Exception as e:  # noqa: BLE001 - whatever the model raises for these inputs
            raise InvalidArgumentError(
                f"running the {which} model on example_inputs failed ({type(e).__name__}: "
                f"{first_line(e)}): pass a tuple of the positional arguments forward() takes"
            ) from e
        # copies: an output may be a view of a buffer that is put back when the block ends
        return [(where, t.clone()) for where, t in out]


@contextlib.contextmanager
def _kept_buffers(model: torch.jit.ScriptModule) -> Iterator[None]:
    """Put a TorchScript module's buffers back after a block (its attributes cannot be
    restored the way an eager module's are; its buffers are what running it changes)."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(saved[k])


def fresh_copy(inputs: Any) -> Any:
    """A copy of ``inputs`` that forward may write into: every object deep-copied (plain
    objects and namespaces too, which pytree passes through as they are), or, for inputs that
    cannot be deep-copied, every tensor in tuples, lists and dicts cloned."""
    import torch.utils._pytree as pytree

    try:
        with torch.inference_mode(False):
            return copy.deepcopy(inputs)
    except Exception:  # noqa: BLE001 - a lock, a file, an object refusing to be copied
        return pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), inputs)


def compare(
    a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]
) -> tuple[float, float]:
    """``(max_abs_err, max_rel_err)`` between two models' outputs (from :func:`output_tensors`).

    Raises when the outputs hold no tensor or differ in structure or shape.
    """
    if not a:
        raise UnsupportedModelError(
            "the model's output holds no tensor bnfold can find (tensors, or tensors in "
            "tuples, lists, dicts or dataclasses): verify cannot compare it"
        )
    if [w for w, _ in a] != [w for w, _ in b]:
        raise UnsupportedModelError(
            f"the models' outputs differ in structure: {[w for w, _ in a]} and {[w for w, _ in b]}"
        )
    max_abs = max_rel = 0.0
    for (where, x), (_, y) in zip(a, b, strict=True):
        if x.shape != y.shape:
            raise UnsupportedModelError(
                f"{where} has shape {tuple(x.shape)} in the original and {tuple(y.shape)} folded"
            )
        err, rel = _error(x, y)
        max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
    return max_abs, max_rel
