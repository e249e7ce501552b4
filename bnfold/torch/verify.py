"""Running PyTorch models and programs to compare their outputs (``bnfold.verify``).

This module runs models and hands their outputs to :mod:`bnfold.core.compare` as numpy arrays;
tolerances, error measures and the pass/fail decision are made there. It also says which
programs are untrusted (read from a file) and makes a program runnable without changing it,
for every torch frontend (the graph frontend's ``verify`` and the ``.pt2`` file frontend).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import ExportedProgram

from ..core import compare as checks
from ..core.compare import CheckResult
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


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A model output as a numpy array on the CPU: floating-point and complex outputs widened to
    float64 and complex128 (numpy has no bfloat16 or float8, some devices no float64), integer
    and bool ones in their own dtype. Conjugate and negative views are resolved."""
    t = t.detach()
    if t.is_floating_point() or t.is_complex():
        t = t.to("cpu", torch.complex128 if t.is_complex() else torch.float64)
    else:
        t = t.cpu()
    return t.resolve_conj().resolve_neg().numpy()


def dtype_name(t: torch.Tensor) -> str:
    """The numpy name of a tensor's dtype (``"bfloat16"`` for torch.bfloat16), as
    :mod:`bnfold.core.compare` names dtypes."""
    return str(t.dtype).removeprefix("torch.")


def _error(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(max |x - y|, that / max |x|), as :func:`bnfold.core.compare.array_error` measures it."""
    return checks.array_error(as_numpy(x), as_numpy(y))


def tolerance(outputs: list[torch.Tensor]) -> float:
    """The relative tolerance for outputs of these dtypes: that of the least precise
    (:data:`bnfold.core.compare.REL_TOLERANCE`; integer and bool outputs must match exactly)."""
    return checks.tolerance(
        dtype_name(t) for t in outputs if t.is_floating_point() or t.is_complex()
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


def _check_structure(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> None:
    """Raise unless two models' outputs (from :func:`output_tensors`) hold tensors, in the same
    places, of the same shapes."""
    if not a:
        raise UnsupportedModelError(
            "the model's output holds no tensor bnfold can find (tensors, or tensors in "
            "tuples, lists, dicts or dataclasses): verify cannot compare it"
        )
    if [w for w, _ in a] != [w for w, _ in b]:
        raise UnsupportedModelError(
            f"the models' outputs differ in structure: {[w for w, _ in a]} and {[w for w, _ in b]}"
        )
    for (where, x), (_, y) in zip(a, b, strict=True):
        if x.shape != y.shape:
            raise UnsupportedModelError(
                f"{where} has shape {tuple(x.shape)} in the original and {tuple(y.shape)} folded"
            )


def _arrays(outputs: list[tuple[str, torch.Tensor]]) -> Iterable[np.ndarray]:
    """The outputs as numpy arrays, each made when it is compared (one pair at a time)."""
    return (as_numpy(t) for _, t in outputs)


def compare(
    a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]
) -> tuple[float, float]:
    """``(max_abs_err, max_rel_err)`` between two models' outputs (from :func:`output_tensors`),
    over every output, integer and bool ones included
    (:func:`bnfold.core.compare.max_error`).

    Raises when the outputs hold no tensor or differ in structure or shape.
    """
    _check_structure(a, b)
    return checks.max_error(_arrays(a), _arrays(b))


def check_outputs(
    a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]
) -> CheckResult:
    """How the folded model's outputs ``b`` compare with the original's ``a``
    (:func:`bnfold.core.compare.compare_arrays`: relative error over the floating-point ones,
    share of differing elements over the rest). Raises as :func:`compare` does."""
    _check_structure(a, b)
    return checks.compare_arrays(_arrays(a), _arrays(b), [dtype_name(t) for _, t in a])


# Programs read from files (bnfold.torch.pt2.load): running one (--verify, bnfold.verify)
# first passes bnfold.torch.aten.safe_ops.check_program, as a file is untrusted input.
_FROM_FILES: weakref.WeakSet[ExportedProgram] = weakref.WeakSet()


def mark_from_file(program: ExportedProgram) -> None:
    """Note that ``program`` was read from a file, so that it is checked before it runs."""
    _FROM_FILES.add(program)


def from_file(program: ExportedProgram) -> bool:
    """Whether ``program`` was read from a file (so it is untrusted)."""
    return program in _FROM_FILES


def runnable(program: ExportedProgram, untrusted: bool | None = None) -> nn.Module:
    """``program.module()``, with its own copy of any state the program writes while it runs
    (so verifying never changes the program, nor the eager model it shares tensors with).

    An ``untrusted`` program (by default: one read from a file, :func:`from_file`) must pass
    :func:`bnfold.torch.aten.safe_ops.check_program` first, or :class:`VerificationError` is
    raised.
    """
    # Imported here: the eager frontend uses this module too, and never runs a program.
    from ..torch.aten.safe_ops import check_program
    from ..torch.aten.store import ProgramStore, copy_quietly, copy_tensors, module_tensors

    if untrusted if untrusted is not None else from_file(program):
        check_program(program)
    module = program.module()
    store = ProgramStore(program, program.graph_module.graph)
    written = [store.tensor(n) for n in store.written_state()]
    if not written:
        return module
    memo: dict[int, Any] = {id(t): t for t in module_tensors(module).values()}
    memo.update(copy_tensors(written))
    return copy_quietly(module, memo)
