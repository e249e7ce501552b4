"""The fold maths, once for every framework.

An inference BatchNorm is the per-channel affine map ``y = s*x + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean*s``. Folding it forward into the layer that
produces its input scales that layer's filters by ``s`` along the output-channel axis and sets
its bias to ``s*b + t``.

Numbers: ``s``, ``t`` and the new bias are computed in float64 (they are per-channel vectors, so
this is cheap); the weight is scaled in float32 (float64 for float64 weights) and rounded once to
its own dtype. Whole weight tensors are never copied to float64.

Arrays: per-channel inputs may be numpy arrays, torch tensors or sequences; weights and biases
are numpy arrays (any float dtype, ml_dtypes' bfloat16 included) or torch tensors, and come back
in the same framework, dtype and device. Nothing here imports torch at module level.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FoldRefused

__all__ = [
    "HEADROOM_SHARE",
    "OutputLayout",
    "affine_factors",
    "require_headroom",
    "fold_into_producer",
    "fold_affine_into_producer",
    "checked_fold",
    "ScaledWeight",
    "scale_output_channels",
    "folded_bias",
    "float_info",
]


@dataclass(frozen=True)
class OutputLayout:
    """Where a producer's weight keeps its output channels.

    ``axis`` is the weight axis indexed by the output channel. When ``groups > 1`` and ``axis``
    is not 0, the weight's axis 0 is split into ``groups`` blocks and output channel
    ``g * weight.shape[axis] + j`` lives in block ``g`` at index ``j`` of ``axis``: this is the
    ConvTranspose layout ``(C_in, C_out/groups, *k)``.
    """

    axis: int = 0
    groups: int = 1

    def out_channels(self, weight_shape: tuple[int, ...]) -> int:
        """Number of output channels a weight of this shape has."""
        n = int(weight_shape[self.axis])
        return n * self.groups if self._grouped_blocks else n

    @property
    def _grouped_blocks(self) -> bool:
        return self.groups > 1 and self.axis != 0


CONV = OutputLayout(axis=0)
LINEAR = OutputLayout(axis=0)


def conv_transpose_layout(groups: int) -> OutputLayout:
    """Layout of a ConvTranspose weight ``(C_in, C_out/groups, *k)``."""
    return OutputLayout(axis=1, groups=groups)


# --------------------------------------------------------------------------------------------
# Per-channel factors (float64, numpy)


_NUMPY_FLOATS = frozenset({"torch.float16", "torch.float32", "torch.float64"})


def _vector64(x: Any, name: str) -> np.ndarray:
    """A per-channel vector as a float64 numpy array (torch tensors on any device accepted)."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().to("cpu")
        # numpy widens float16/32 exactly and faster than a float64 tensor would; bfloat16
        # and other dtypes numpy lacks go through torch.
        x = x.numpy() if str(x.dtype) in _NUMPY_FLOATS else x.double().numpy()
    if np.iscomplexobj(x):  # numpy would drop the imaginary part (with a warning)
        raise FoldRefused(f"{name} is complex")
    # A signalling NaN of bfloat16 warns as it converts; _require_finite reports it.
    with np.errstate(invalid="ignore", over="ignore"):
        arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise FoldRefused(f"{name} is not a vector (shape {tuple(arr.shape)})")
    return arr


def affine_factors(
    mean: Any,
    var: Any,
    eps: float,
    gamma: Any | None = None,
    beta: Any | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(s, t)`` in float64 such that the inference BatchNorm is ``y = s*x + t``.

    ``gamma``/``beta`` default to 1/0 (a BatchNorm without affine parameters). Raises
    :class:`FoldRefused` when a value is not finite or ``var + eps <= 0``.
    """
    mean64 = _vector64(mean, "running mean")
    var64 = _vector64(var, "running variance")
    n = mean64.shape[0]
    gamma64 = np.ones(n) if gamma is None else _vector64(gamma, "weight (gamma)")
    beta64 = np.zeros(n) if beta is None else _vector64(beta, "bias (beta)")
    for name, v in (
        ("running variance", var64),
        ("weight (gamma)", gamma64),
        ("bias (beta)", beta64),
    ):
        if v.shape != (n,):
            raise FoldRefused(f"{name} has {v.shape[0]} channels, running mean has {n}")
    for name, v in (
        ("running mean", mean64),
        ("running variance", var64),
        ("weight (gamma)", gamma64),
        ("bias (beta)", beta64),
    ):
        _require_finite(v, f"BatchNorm {name}")
    eps64 = float(eps)
    if not np.isfinite(eps64) or eps64 < 0:
        raise FoldRefused(f"BatchNorm eps is {eps64}; it must be finite and not negative")
    _require_positive_in_own_dtype(var, eps64)
    with np.errstate(over="ignore"):
        denom = var64 + eps64
    if not (denom > 0).all():
        k = int(np.argmin(denom))
        raise FoldRefused(
            f"BatchNorm running_var + eps = {denom[k]:g} <= 0 at channel {k}: the BatchNorm output "
            "is not finite there"
        )
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        s = gamma64 / np.sqrt(denom)
        t = beta64 - mean64 * s
    _require_finite(s, "BatchNorm scale gamma/sqrt(var+eps)")
    _require_finite(t, "BatchNorm shift beta-mean*scale")
    return s, t


def _require_positive_in_own_dtype(var: Any, eps: float) -> None:
    """The BatchNorm adds eps to its variance in the variance's own dtype: if that sum is not
    positive there (say a tiny negative float32 variance that cancels eps), its output is not
    finite, whatever the float64 sum says."""
    if hasattr(var, "detach"):
        own = (var.detach() + eps).to("cpu").double().numpy()
    else:
        arr = np.asarray(var)
        if arr.dtype.kind != "f":
            return
        # eps or the sum may overflow the variance's dtype: inf passes, as in the BatchNorm.
        with np.errstate(over="ignore", invalid="ignore"):
            own = (arr + arr.dtype.type(eps)).astype(np.float64)
    if not (own > 0).all():
        k = int(np.argmin(own))
        raise FoldRefused(
            f"BatchNorm running_var + eps = {own[k]:g} <= 0 at channel {k} in the variance's "
            "own precision: the BatchNorm output is not finite there"
        )


def _require_finite(v: np.ndarray, what: str) -> None:
    if not np.isfinite(v).all():
        bad = np.flatnonzero(~np.isfinite(v))
        raise FoldRefused(f"{what} is not finite ({v[bad[0]]} at channel {int(bad[0])})")


# --------------------------------------------------------------------------------------------
# Framework shim: the handful of array operations the weight path needs.


def float_info(dtype: Any) -> Any:
    """``finfo`` of a numpy floating-point dtype, ml_dtypes' for bfloat16 and float8 (which
    ``np.finfo`` does not know)."""
    try:
        return np.finfo(dtype)
    except ValueError:
        import ml_dtypes

        return ml_dtypes.finfo(dtype)


class _NumpyOps:
    @staticmethod
    def compute_dtype(dtype: Any) -> Any:
        return np.float64 if np.dtype(dtype) == np.float64 else np.float32

    @staticmethod
    def cast(x: Any, dtype: Any) -> Any:
        # An overflow becomes inf, which the caller reports as a refused fold.
        with np.errstate(over="ignore", invalid="ignore"):
            return np.asarray(x).astype(dtype, copy=False)

    @staticmethod
    def from64(v: np.ndarray, like: Any, dtype: Any) -> Any:
        # A factor too large for the dtype becomes inf, refused with the weight it scales.
        with np.errstate(over="ignore", invalid="ignore"):
            return v.astype(dtype)

    @staticmethod
    def all_finite(x: Any) -> bool:
        # min and max propagate NaN and expose +-inf: two vectorised reductions, no mask.
        if x.size == 0:
            return True
        return bool(np.isfinite(x.min()) and np.isfinite(x.max()))

    @staticmethod
    def item_bits(dtype: Any) -> int:
        return np.dtype(dtype).itemsize * 8

    @staticmethod
    def underflow_share(weight: Any, out: Any, tiny: float, factor: Any) -> float:
        # A channel scaled by exactly 0 (gamma = 0, pruned) becomes exact zeros: no loss.
        normal = np.abs(np.asarray(weight, dtype=np.float32)) >= tiny
        lost = normal & (np.abs(np.asarray(out, dtype=np.float32)) < tiny) & (factor != 0)
        return float(lost.sum()) / max(int(normal.sum()), 1)

    @staticmethod
    def smallest_normal(dtype: Any) -> float:
        return float(float_info(dtype).smallest_normal)

    @staticmethod
    def max_finite(dtype: Any) -> float:
        return float(float_info(dtype).max)

    @staticmethod
    def is_float(dtype: Any) -> bool:
        d = np.dtype(dtype)
        if d.kind == "f":
            return True
        return "float" in d.name  # ml_dtypes' bfloat16, float8_*

    @staticmethod
    def to64(x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    @staticmethod
    def size(x: Any) -> int:
        return int(np.size(x))

    @staticmethod
    def max_abs(x: Any) -> float:
        return _max_abs(float(np.min(x)), float(np.max(x)))

    @staticmethod
    def mul_into(target: Any, factor: Any) -> None:
        np.multiply(target, factor, out=target)

    @staticmethod
    def copy_into(target: Any, value: Any) -> None:
        np.copyto(target, value)


class _TorchOps:
    def __init__(self) -> None:
        self.torch = sys.modules["torch"]

    def compute_dtype(self, dtype: Any) -> Any:
        return self.torch.float64 if dtype == self.torch.float64 else self.torch.float32

    @staticmethod
    def cast(x: Any, dtype: Any) -> Any:
        return x.to(dtype)

    def from64(self, v: np.ndarray, like: Any, dtype: Any) -> Any:
        # Convert on the CPU first: some devices have no float64.
        return self.torch.from_numpy(np.ascontiguousarray(v)).to(dtype).to(like.device)

    def all_finite(self, x: Any) -> bool:
        # min and max propagate NaN and expose +-inf: one vectorised reduction, no mask.
        if x.numel() == 0:
            return True
        lo, hi = self.torch.aminmax(x)
        return bool(self.torch.isfinite(lo) & self.torch.isfinite(hi))

    def max_finite(self, dtype: Any) -> float:
        return float(self.torch.finfo(dtype).max)

    @staticmethod
    def item_bits(dtype: Any) -> int:
        return dtype.itemsize * 8

    def underflow_share(self, weight: Any, out: Any, tiny: float, factor: Any) -> float:
        normal = weight.abs() >= tiny
        lost = normal & (out.abs() < tiny) & (factor != 0)
        return float(lost.sum()) / max(int(normal.sum()), 1)

    def smallest_normal(self, dtype: Any) -> float:
        return float(self.torch.finfo(dtype).smallest_normal)

    @staticmethod
    def is_float(dtype: Any) -> bool:
        return bool(dtype.is_floating_point)

    @staticmethod
    def to64(x: Any) -> np.ndarray:
        return x.detach().to("cpu").double().numpy()

    @staticmethod
    def size(x: Any) -> int:
        return int(x.numel())

    def max_abs(self, x: Any) -> float:
        lo, hi = self.torch.aminmax(x)  # one pass over the weight
        return _max_abs(float(lo), float(hi))

    @staticmethod
    def mul_into(target: Any, factor: Any) -> None:
        target.mul_(factor)

    @staticmethod
    def copy_into(target: Any, value: Any) -> None:
        target.copy_(value)


def _max_abs(lo: float, hi: float) -> float:
    """max(|lo|, |hi|) for the extremes of an array; inf when either is not finite (NaN too)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return float("inf")
    return max(-lo, hi, 0.0)


def _ops_for(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return _NumpyOps
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return _TorchOps()
    raise TypeError(f"expected a numpy array or torch tensor, got {type(x).__name__}")


# --------------------------------------------------------------------------------------------
# The fold


def scale_output_channels(weight: Any, s: np.ndarray, layout: OutputLayout) -> Any:
    """Return ``weight`` with output channel ``k`` multiplied by ``s[k]``.

    The product is formed in float32 (float64 for float64 weights) and rounded once to the
    weight's dtype. Raises :class:`FoldRefused` if the result is not finite in that dtype
    (a non-finite weight, or an overflow such as float16 beyond 65504).
    """
    return ScaledWeight(weight, s, layout).value()


class ScaledWeight:
    """A checked scaling of ``weight``'s output channels by ``s``: the fold's big write.

    Constructing it validates everything (it raises :class:`FoldRefused` exactly as
    :func:`scale_output_channels` does), so that a frontend can check every fold of a model
    before it changes any weight. The product is formed later, by :meth:`value` (a new tensor)
    or by :meth:`write_into` (in place: one read and one write of the weight, no new memory).
    Both give the same bits.
    """

    def __init__(self, weight: Any, s: np.ndarray, layout: OutputLayout) -> None:
        ops = _ops_for(weight)
        if not ops.is_float(weight.dtype):
            raise FoldRefused(f"weight dtype {weight.dtype} is not a floating-point type")
        shape = tuple(weight.shape)
        n_out = layout.out_channels(shape)
        if s.shape != (n_out,):
            raise FoldRefused(
                f"BatchNorm has {s.shape[0]} channels but the layer has {n_out} output channels"
            )
        compute = ops.compute_dtype(weight.dtype)
        ndim = len(shape)
        if layout._grouped_blocks:
            g = layout.groups
            if shape[0] % g:
                raise FoldRefused(f"weight axis 0 ({shape[0]}) is not divisible by groups={g}")
            self._work_shape: tuple[int, ...] | None = (g, shape[0] // g) + shape[1:]
            bshape = [1] * (ndim + 1)
            bshape[0] = g
            bshape[layout.axis + 1] = shape[layout.axis]
        else:
            self._work_shape = None
            bshape = [1] * ndim
            bshape[layout.axis] = n_out
        self._ops, self._weight, self._shape, self._compute = ops, weight, shape, compute
        self._s = s
        self._factor = ops.from64(s, weight, compute).reshape(bshape)
        self._result: Any = None
        if ops.item_bits(weight.dtype) <= 16 or not self._cannot_overflow():
            # 16-bit weights are rounded from a float32 product and may underflow; a product
            # that might overflow is formed now to see whether it does.
            out = self._product()
            if not ops.all_finite(out):
                if not ops.all_finite(weight):
                    raise FoldRefused("the layer's weight contains non-finite values")
                raise FoldRefused(
                    f"folded weight overflows {_dtype_name(weight.dtype)} "
                    f"(max {ops.max_finite(weight.dtype):g})"
                )
            _refuse_underflow(ops, self._work(weight), out, s, self._factor)
            self._result = out

    def _work(self, weight: Any) -> Any:
        return weight if self._work_shape is None else weight.reshape(self._work_shape)

    def _product(self) -> Any:
        ops = self._ops
        with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are refused
            w = ops.cast(self._work(self._weight), self._compute)
            return ops.cast(w * self._factor, self._weight.dtype)

    def _cannot_overflow(self) -> bool:
        """A finite weight whose largest |value| times the largest |factor| fits the dtype
        cannot overflow (float32/float64, computed in their own dtype): one read, no product.
        Raises when the weight is not finite."""
        ops = self._ops
        if ops.size(self._weight) == 0:
            return True
        big_w = ops.max_abs(self._weight)
        if not np.isfinite(big_w):
            raise FoldRefused("the layer's weight contains non-finite values")
        # The factor is s rounded to the compute dtype (at most one ulp, 2**-23 relative for
        # float32, up); the float64 product is within a few ulps of the exact one. The margin
        # covers both.
        big_f = float(np.max(np.abs(self._s))) if self._s.size else 0.0
        limit = ops.max_finite(self._weight.dtype)
        return bool(np.isfinite(big_f)) and big_w * big_f * (1 + 2**-20) <= limit

    def value(self) -> Any:
        """The scaled weight as a new array or tensor, in the weight's shape and dtype."""
        out = self._result if self._result is not None else self._product()
        return out if self._work_shape is None else out.reshape(self._shape)

    def write_into(self, target: Any) -> None:
        """Write the scaled weight into ``target``, the weight itself or a tensor like it.

        Multiplies in place when ``target`` is the weight and nothing had to be computed ahead;
        else copies the product in. The caller makes sure nothing else reads ``target``'s memory.
        """
        if self._result is None and target is self._weight and self._work_shape is None:
            self._ops.mul_into(target, self._factor)
        else:
            self._ops.copy_into(target, self.value())


# A 16-bit weight scaled below the smallest normal number keeps only a few significant bits;
# when more than this share of its values would, the fold is refused (the unfolded model keeps
# them: its BatchNorm scales activations, in their own precision). Measured: a whole layer
# underflowing (98 %) made the error 60x the unfolded model's; a few pruned or near-zero
# channels (1-3 % of a weight, common in float16 exports) changed nothing measurable.
UNDERFLOW_SHARE = 0.25


def _refuse_underflow(ops: Any, weight: Any, out: Any, s: np.ndarray, factor: Any) -> None:
    """``weight``, ``out`` and ``factor`` are in the working layout (``factor`` broadcasts)."""
    if ops.item_bits(weight.dtype) > 16 or not (np.abs(s) < 1).any():
        return  # float32/float64 have the range; nothing shrinks when no |s| < 1
    tiny = ops.smallest_normal(weight.dtype)
    share = ops.underflow_share(weight, out, tiny, factor)
    if share > UNDERFLOW_SHARE:
        raise FoldRefused(
            f"folded weight underflows {_dtype_name(weight.dtype)}: {share:.0%} of its values "
            f"fall below {tiny:g} and lose precision the unfolded model keeps"
        )


def folded_bias(
    bias: Any | None, s: np.ndarray, t: np.ndarray, like: Any, dtype: Any | None = None
) -> Any:
    """Return ``s*bias + t`` (``t`` when there is no bias), computed in float64.

    The result is in ``like``'s framework and device, with ``dtype`` if given, else ``bias``'s
    dtype, else ``like``'s. Raises :class:`FoldRefused` when the bias is not finite or the
    result does not fit the dtype.
    """
    ops = _ops_for(like)
    if bias is None:
        b64 = t
        target = like.dtype if dtype is None else dtype
    else:
        b = ops.to64(bias)
        if b.shape != s.shape:
            raise FoldRefused(f"bias has shape {tuple(b.shape)}, expected {tuple(s.shape)}")
        _require_finite(b, "layer bias")
        b64 = s * b + t
        target = bias.dtype if dtype is None else dtype
    limit = ops.max_finite(target)
    if not (np.abs(b64) <= limit).all():
        k = int(np.argmax(np.abs(b64)))
        raise FoldRefused(
            f"folded bias {b64[k]:g} at channel {k} overflows {_dtype_name(target)} (max {limit:g})"
        )
    return ops.from64(b64, like, target)


# A folded producer computes k*y where the chain computed (y - mean)*k, and adds c after:
# k*y overflows where the chain's output is beyond (limit - |c|). With |c| at most a quarter
# of a 16-bit float's largest value, that happens only for outputs within a quarter of
# overflowing themselves; a larger shift is refused.
HEADROOM_SHARE = 1 / 4


def require_headroom(shift: np.ndarray, dtype: Any, name: str) -> None:
    """Refuse a folded shift ``shift`` that takes more than :data:`HEADROOM_SHARE` of a
    16-bit float ``dtype``'s range (``dtype`` is a numpy or ml_dtypes dtype, ``None`` when
    unknown); wider types have room enough."""
    dtype = None if dtype is None else np.dtype(dtype)
    if dtype is None or dtype.itemsize > 2 or dtype.kind not in "fV":
        return
    limit = float(float_info(dtype).max)
    big = float(np.max(np.abs(shift))) if shift.size else 0.0
    if big > limit * HEADROOM_SHARE:
        raise FoldRefused(
            f"the folded shift of {name} reaches {big:g}, near the {dtype.name} limit "
            f"({limit:g}): the folded layer's output before it may overflow where the "
            "unfolded chain's does not"
        )


def fold_into_producer(
    weight: Any,
    bias: Any | None,
    mean: Any,
    var: Any,
    eps: float,
    gamma: Any | None = None,
    beta: Any | None = None,
    layout: OutputLayout = CONV,
) -> tuple[Any, Any]:
    """Fold an inference BatchNorm into the layer that produces its input.

    Returns ``(new_weight, new_bias)`` in the weight's framework; the inputs are not modified.
    Raises :class:`FoldRefused` with a reason when the fold would not be exact and finite.
    """
    s, t = affine_factors(mean, var, eps, gamma, beta)
    return fold_affine_into_producer(weight, bias, s, t, layout)


def fold_affine_into_producer(
    weight: Any, bias: Any | None, s: np.ndarray, t: np.ndarray, layout: OutputLayout = CONV
) -> tuple[Any, Any]:
    """Fold the per-channel affine map ``y = s*x + t`` (float64 vectors) into a producer.

    For BatchNorm-like layers whose factors are known directly rather than as statistics.
    """
    scaled, new_bias = checked_fold(weight, bias, s, t, layout)
    return scaled.value(), new_bias


def checked_fold(
    weight: Any, bias: Any | None, s: np.ndarray, t: np.ndarray, layout: OutputLayout = CONV
) -> tuple[ScaledWeight, Any]:
    """Check the fold of ``y = s*x + t`` into a producer without forming the new weight yet.

    Returns the checked :class:`ScaledWeight` and the new bias; raises :class:`FoldRefused`
    as :func:`fold_affine_into_producer` does.
    """
    _require_finite(s, "per-channel scale")
    _require_finite(t, "per-channel shift")
    new_bias = folded_bias(bias, s, t, like=weight)
    return ScaledWeight(weight, s, layout), new_bias


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")
