"""Comparing a folded model's outputs with the original's, for any frontend.

Nothing here imports a framework: outputs arrive as numpy arrays (a frontend converts its own
tensors), and dtypes are named by their numpy names (``"float32"``, ``"bfloat16"``), which
torch dtypes map onto by dropping their ``torch.`` prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
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


def compare_arrays(a: list[np.ndarray], b: list[np.ndarray]) -> CheckResult:
    """Compare two models' outputs, given in the same order and checked to have equal shapes:
    relative error over the floating-point ones, share of differing elements over the rest."""
    max_abs = max_rel = 0.0
    differing = total = 0
    floats: list[str] = []
    discrete = False
    for x, y in zip(a, b, strict=True):
        if is_floating(x.dtype):
            floats.append(x.dtype.name)
            err, rel = array_error(x, y)
            max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
        else:
            discrete = True
            differing += int(np.count_nonzero(x != y))
            total += x.size
    return CheckResult(
        max_abs, max_rel, tolerance(floats), differing / total if total else 0.0, discrete
    )


__all__ = [
    "REL_TOLERANCE",
    "DISCRETE_MISMATCH_TOLERANCE",
    "CheckResult",
    "array_error",
    "compare_arrays",
    "is_floating",
    "tolerance",
]
