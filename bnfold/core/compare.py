"""Comparing a folded model's outputs with the original's, for any frontend.

Everything about a comparison is decided here, once: the tolerance of each dtype, how an
error is measured, when a check passes and how it is summed up, and what random inputs
``--verify`` feeds. Nothing here imports a framework: outputs arrive as numpy arrays (a frontend
runs its models and converts its own tensors, widening the types numpy lacks such as torch's
bfloat16), and dtypes are named by their numpy names (``"float32"``, ``"bfloat16"``), which
torch dtypes map onto by dropping their ``torch.`` prefix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Relative error (max|a - b| / max|a|) a fold may cause, by output dtype: a few roundings of
# the dtype's precision, grown by depth; used by the command line's --verify.
REL_TOLERANCE = {
    "float64": 1e-9,
    "float32": 1e-4,
    "float16": 1e-2,
    "bfloat16": 5e-2,
}

# A complex output is as precise as its real parts.
_REAL_PART = {"complex32": "float16", "complex64": "float32", "complex128": "float64"}

# Integer and boolean outputs (class ids, masks) are decisions: an exact fold still flips the
# few that sit on a boundary. --verify allows this share of their elements to differ.
DISCRETE_MISMATCH_TOLERANCE = 1e-2


def tolerance(dtype_names: Iterable[str]) -> float:
    """The relative tolerance for floating-point outputs of these dtypes: that of the least
    precise (0.0 when there are none: then only discrete outputs are compared)."""
    tols = [REL_TOLERANCE.get(_REAL_PART.get(name, name), 1e-4) for name in dtype_names]
    return max(tols, default=0.0)


def is_floating(dtype: np.dtype) -> bool:
    """Whether outputs of ``dtype`` are compared by relative error (floats, complex, and the
    ml_dtypes floats such as bfloat16) rather than element by element."""
    if np.issubdtype(dtype, np.inexact):
        return True
    # ml_dtypes types (bfloat16, float8) are not numpy subtypes of np.inexact; numpy's kind
    # for them is "V", so they are recognised by name.
    return dtype.name.startswith(("bfloat", "float"))


def array_error(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(max |x - y|, that / max |x|), with NaN where the other is not NaN counting as inf.

    ``x`` is the original's output; equal infinities and NaN against NaN agree.
    """
    if x.size == 0:
        return 0.0, 0.0
    wide = np.complex128 if (np.iscomplexobj(x) or np.iscomplexobj(y)) else np.float64
    # Flattened: a 0-d array would come back from the ufuncs below as a scalar.
    x64 = np.asarray(x).astype(wide).reshape(-1)
    y64 = np.asarray(y).astype(wide).reshape(-1)
    same = (x64 == y64) | (np.isnan(x64) & np.isnan(y64))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(x64 - y64)
    diff = np.nan_to_num(diff, nan=np.inf, posinf=np.inf)
    diff[same] = 0.0
    err = float(diff.max())
    finite = np.isfinite(x64)
    scale = float(np.abs(x64[finite]).max()) if finite.any() else 0.0
    rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
    return err, rel


def max_error(a: Iterable[np.ndarray], b: Iterable[np.ndarray]) -> tuple[float, float]:
    """``(max_abs_err, max_rel_err)`` over pairs of outputs: the worst :func:`array_error` of
    any pair, integer and bool outputs included (``(0.0, 0.0)`` for none). The outputs are read
    once, in order: they may be made one pair at a time."""
    max_abs = max_rel = 0.0
    for x, y in zip(a, b, strict=True):
        err, rel = array_error(x, y)
        max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
    return max_abs, max_rel


def float_error(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> tuple[float, float]:
    """:func:`max_error` over the floating-point outputs, or over all outputs when none is
    floating (the errors ``bnfold.verify`` reports for ONNX models)."""
    floats = [i for i, x in enumerate(a) if is_floating(x.dtype)] or range(len(a))
    return max_error([a[i] for i in floats], [b[i] for i in floats])


@dataclass(frozen=True)
class CheckResult:
    """How the folded model's outputs compare with the original's on random inputs."""

    max_abs: float
    max_rel: float  # over floating-point outputs
    tolerance: float
    discrete_mismatch: float  # share of integer/bool output elements that differ
    discrete_outputs: bool

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance and (
            self.discrete_mismatch <= DISCRETE_MISMATCH_TOLERANCE
        )

    def summary(self) -> str:
        text = (
            f"max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g} "
            f"(tolerance {self.tolerance:.3g})"
        )
        if self.discrete_outputs:
            text += (
                f"; integer/bool outputs differ in {self.discrete_mismatch:.3%} of elements "
                f"(tolerance {DISCRETE_MISMATCH_TOLERANCE:.0%})"
            )
        return text


def compare_arrays(
    a: Iterable[np.ndarray],
    b: Iterable[np.ndarray],
    dtypes: Iterable[str] | None = None,
    compute_dtypes: Iterable[str] = (),
) -> CheckResult:
    """Compare two models' outputs, given in the same order and checked to have equal shapes:
    relative error over the floating-point ones, share of differing elements over the rest.

    ``dtypes`` names each output's own dtype when the arrays are not in it (a frontend widens
    the types numpy lacks); by default it is the arrays' own. The tolerance is that of the
    least precise floating-point output, or that of ``compute_dtypes`` (the dtypes a model
    computes in, its weights', when less precise than its outputs) if looser. The outputs are
    read once, in order: they may be made one pair at a time.
    """
    max_abs = max_rel = 0.0
    differing = total = 0
    floats: list[str] = []
    discrete = False
    names = iter(dtypes) if dtypes is not None else None
    for x, y in zip(a, b, strict=True):
        name = next(names) if names is not None else x.dtype.name
        if is_floating(x.dtype):
            floats.append(name)
            err, rel = array_error(x, y)
            max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
        else:
            discrete = True
            differing += int(np.count_nonzero(x != y))
            total += x.size
    tol = tolerance(floats)
    if tol:  # 0.0: no floating-point output, only the discrete ones are compared
        tol = max(tol, tolerance(compute_dtypes))
    return CheckResult(max_abs, max_rel, tol, differing / total if total else 0.0, discrete)


# Elements of a narrow float drawn at a time (as float32), so the draw stays small.
_CHUNK = 1 << 20


def random_array(
    dtype: np.dtype | str, shape: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """Random values for a model input of ``dtype`` (a numpy or ml_dtypes dtype), by the one rule
    of ``--verify`` for every format:

    * bool: False and True, equally likely;
    * one-byte integers (uint8 images, int8): every value of the type, equally likely;
    * wider integers, often indices: 0 or 1, which every index range of two or more holds;
    * float32 and float64: standard normal, drawn in the dtype itself;
    * narrower floats (float16, bfloat16, float8): standard normal drawn as float32, a chunk at
      a time, and rounded, so that no array larger than the result (plus 4 MiB) is made;
    * complex: real and imaginary parts each standard normal.

    A frontend whose framework has types numpy lacks (torch's bfloat16) asks for float32 (or
    complex64) values and rounds them itself. Other dtypes raise ``TypeError``.
    """
    dt = np.dtype(dtype)
    shape = tuple(shape)
    if dt == np.bool_:
        return rng.integers(0, 2, shape, dtype=np.bool_)
    if np.issubdtype(dt, np.integer):
        if dt.itemsize == 1:
            info = np.iinfo(dt)
            return rng.integers(int(info.min), int(info.max), shape, dtype=dt, endpoint=True)
        return rng.integers(0, 2, shape, dtype=dt)
    if dt in (np.float32, np.float64):
        return rng.standard_normal(shape, dtype=dt)
    if np.issubdtype(dt, np.complexfloating):
        part = np.float32 if dt == np.complex64 else np.float64
        out = np.empty(shape, dtype=dt)
        out.real = rng.standard_normal(shape, dtype=part)
        out.imag = rng.standard_normal(shape, dtype=part)
        return out
    if is_floating(dt):
        out = np.empty(shape, dtype=dt)
        flat = out.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            end = min(start + _CHUNK, flat.size)
            flat[start:end] = rng.standard_normal(end - start, dtype=np.float32)
        return out
    raise TypeError(f"no random values for inputs of dtype {dt.name}")


__all__ = [
    "REL_TOLERANCE",
    "DISCRETE_MISMATCH_TOLERANCE",
    "CheckResult",
    "array_error",
    "compare_arrays",
    "float_error",
    "is_floating",
    "max_error",
    "random_array",
    "tolerance",
]
