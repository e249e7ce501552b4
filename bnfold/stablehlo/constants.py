"""Constant subexpressions of a StableHLO function, evaluated with numpy.

JAX leaves a BatchNorm's factors as arithmetic on constants (``rsqrt(var + eps) * scale``,
broadcast and reshaped), and a weight may be a ``reverse``, ``transpose`` or ``convert`` of the
stored one. :class:`Constants` evaluates such expressions over a whitelist of pure ops, in
float64 for floating-point values; a ``convert`` to a narrower float rounds as the graph does,
so a weight read through one has the values the graph uses. Anything reached from a function
argument or computed by another op is not constant, with a reason. A budget of elements is
checked from the static shapes before numpy allocates anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .mlir import hlo, ir

# The most elements one evaluation may produce, all intermediate results together.
MAX_ELEMENTS = 1 << 26

_UNSIGNED = {"ui8": np.uint8, "ui16": np.uint16, "ui32": np.uint32, "ui64": np.uint64}
_SIGNED = {"i8": np.int8, "i16": np.int16, "i32": np.int32, "i64": np.int64}
_FLOATS = {"f16": np.float16, "f32": np.float32, "f64": np.float64}


def np_dtype(element_type: Any) -> np.dtype | None:
    """The numpy (or ml_dtypes) dtype of an MLIR element type; ``None`` for types numpy has no
    equivalent of (complex of narrow floats, index, tokens)."""
    name = str(element_type)
    if name in _FLOATS:
        return np.dtype(_FLOATS[name])
    if name in _SIGNED:
        return np.dtype(_SIGNED[name])
    if name in _UNSIGNED:
        return np.dtype(_UNSIGNED[name])
    if name == "i1":
        return np.dtype(np.bool_)
    if name == "complex<f32>":
        return np.dtype(np.complex64)
    if name == "complex<f64>":
        return np.dtype(np.complex128)
    import ml_dtypes

    special = {
        "bf16": ml_dtypes.bfloat16,
        "f8E4M3FN": ml_dtypes.float8_e4m3fn,
        "f8E5M2": ml_dtypes.float8_e5m2,
        "f8E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
        "f8E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
        "f8E4M3B11FNUZ": ml_dtypes.float8_e4m3b11fnuz,
    }
    dt = special.get(name)
    return np.dtype(dt) if dt is not None else None


def ranked(t: Any) -> Any | None:
    """``t`` as a ``RankedTensorType``, or ``None`` (unranked, tuples, tokens)."""
    try:
        return ir.RankedTensorType(t)
    except (ValueError, TypeError):
        return None


def tensor_type(value: Any) -> Any | None:
    """The ``RankedTensorType`` of ``value``, or ``None`` (unranked, tuples, tokens)."""
    return ranked(value.type)


def static_shape(value: Any) -> tuple[int, ...] | None:
    """``value``'s shape when it is ranked and every dimension is known."""
    t = tensor_type(value)
    if t is None or not t.has_static_shape:
        return None
    return tuple(int(d) for d in t.shape)


def op_of(value: Any) -> Any | None:
    """The op (as an ``ir.Operation``) computing ``value``, ``None`` for an argument."""
    if isinstance(value, ir.BlockArgument):
        return None
    owner = value.owner
    return owner.operation if hasattr(owner, "operation") else owner


def describe_argument(value: Any) -> str:
    """``an argument of @main`` for a block argument, naming its function."""
    block_op = value.owner.owner
    block_op = getattr(block_op, "operation", block_op)
    if block_op.name != "func.func":
        return f"a value of a block of {block_op.name} (a loop-carried or branch value)"
    name = _symbol(block_op)
    return f"argument {value.arg_number} of {name}" if name else "a block argument"


def symbol_name(op: Any) -> str:
    """The ``sym_name`` of a function (``main``), "" when it has none. A name that is not UTF-8
    is given as MLIR prints it, escaped: the bindings raise on it."""
    try:
        attr = op.attributes["sym_name"]
    except (KeyError, ValueError, TypeError):
        return ""
    try:
        return ir.StringAttr(attr).value
    except (RuntimeError, ValueError, TypeError, UnicodeDecodeError):
        return str(attr).strip('"')


def _symbol(op: Any) -> str:
    name = symbol_name(op)
    return "@" + name if name else ""


class NotConstant(Exception):
    """A value is not a constant bnfold can evaluate; ``str(e)`` says why."""


# The ops evaluated, by name: each takes the op and its evaluated operands (float64 for
# floats) and returns the result in the same convention.
Rule = Callable[[Any, list[np.ndarray], tuple[int, ...]], np.ndarray]


def _dims(op: Any, name: str) -> list[int]:
    return [int(d) for d in ir.DenseI64ArrayAttr(op.attributes[name])]


def _broadcast(op: Any, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    x = args[0]
    dims = _dims(op, "broadcast_dimensions")
    # the dimensions may be in any order (a broadcast that also transposes): put the operand's
    # axes in the order of the result's first
    order = sorted(range(len(dims)), key=lambda i: dims[i])
    x = np.transpose(x, order)
    expanded = [1] * len(shape)
    for i in order:
        expanded[dims[i]] = args[0].shape[i]
    return np.broadcast_to(x.reshape(expanded), shape)


def _convert(op: Any, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    target = np_dtype(tensor_type(op.results[0]).element_type)
    if target is None or target.kind == "c":
        raise NotConstant(f"a convert to {tensor_type(op.results[0]).element_type}")
    x = args[0]
    if target.kind in "iub" and x.dtype.kind == "f":
        # out of range or NaN, a float-to-integer convert is implementation-defined
        if target.kind == "b":
            return x != 0
        info = np.iinfo(target)
        if not (np.isfinite(x).all() and (x >= info.min).all() and (x <= info.max).all()):
            raise NotConstant("a float-to-integer convert of values out of the integer's range")
        return np.trunc(x).astype(target)
    with np.errstate(all="ignore"):
        out = x.astype(target)
    return out.astype(np.float64) if _is_float(target) else out


def _slice(op: Any, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    starts = _dims(op, "start_indices")
    limits = _dims(op, "limit_indices")
    strides = _dims(op, "strides")
    index = tuple(slice(a, b, c) for a, b, c in zip(starts, limits, strides, strict=True))
    return args[0][index]


def _unary(f: Callable[[np.ndarray], np.ndarray]) -> Rule:
    return lambda op, args, shape: f(args[0])


def _binary(f: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Rule:
    return lambda op, args, shape: f(args[0], args[1])


def _float_only(op: Any, args: list[np.ndarray], f: Callable[..., np.ndarray]) -> np.ndarray:
    """Integer division and powers round and fail differently in numpy than in StableHLO
    (truncation, division by zero, negative exponents): only floats are evaluated."""
    if any(a.dtype.kind != "f" for a in args):
        raise NotConstant(f"an integer {op.name}, which bnfold does not evaluate")
    return f(*args)


_RULES: dict[str, Rule] = {
    "stablehlo.broadcast_in_dim": _broadcast,
    "stablehlo.dynamic_broadcast_in_dim": _broadcast,
    "stablehlo.reshape": lambda op, args, shape: args[0].reshape(shape),
    "stablehlo.transpose": lambda op, args, shape: np.transpose(args[0], _dims(op, "permutation")),
    "stablehlo.reverse": lambda op, args, shape: np.flip(args[0], _dims(op, "dimensions")),
    "stablehlo.slice": _slice,
    "stablehlo.concatenate": lambda op, args, shape: np.concatenate(
        args, int(ir.IntegerAttr(op.attributes["dimension"]).value)
    ),
    "stablehlo.convert": _convert,
    "stablehlo.add": _binary(np.add),
    "stablehlo.subtract": _binary(np.subtract),
    "stablehlo.multiply": _binary(np.multiply),
    "stablehlo.divide": lambda op, args, shape: _float_only(op, args, np.divide),
    "stablehlo.maximum": _binary(np.maximum),
    "stablehlo.minimum": _binary(np.minimum),
    "stablehlo.power": lambda op, args, shape: _float_only(op, args, np.power),
    "stablehlo.negate": _unary(np.negative),
    "stablehlo.abs": _unary(np.abs),
    "stablehlo.sqrt": _unary(np.sqrt),
    "stablehlo.rsqrt": _unary(lambda x: 1.0 / np.sqrt(x)),
    "stablehlo.exponential": _unary(np.exp),
    "stablehlo.log": _unary(np.log),
}

# Ops that compute a value from their operands only: dead ones may be erased after a fold.
PURE_OPS = frozenset(_RULES) | {"stablehlo.constant"}


def _is_float(dt: np.dtype) -> bool:
    return dt.kind in "fc" or "float" in dt.name


class Constants:
    """Evaluates constant subexpressions of one module (results cached per value)."""

    def __init__(self, max_elements: int = MAX_ELEMENTS) -> None:
        self._cache: dict[Any, np.ndarray] = {}
        self._why: dict[Any, str] = {}
        self._like: dict[Any, bool] = {}
        self._max = max_elements

    def is_constant(self, value: Any) -> bool:
        """Whether ``value`` is computed from ``stablehlo.constant`` ops by evaluated ops only
        (no evaluation: a look at the ops)."""
        return not self.why_not(value)

    def why_not(self, value: Any) -> str:
        """Why ``value`` is not an evaluable constant ("" when it is)."""

        def leaf(v: Any, op: Any) -> str | None:
            if op is None:
                return f"it is {describe_argument(v)}"
            if op.name == "stablehlo.constant":
                return ""
            if op.name not in _RULES:
                return f"it is computed by {op.name}, which bnfold does not evaluate"
            return None

        return _fold_over_operands(
            value, self._why, leaf, lambda whys: next((w for w in whys if w), "")
        )

    def parameter_like(self, value: Any) -> bool:
        """Whether ``value`` is computed by the evaluated ops from constants and function
        arguments only: a parameter passed as an argument (``rsqrt(var + eps) * scale`` of
        arguments), not something computed from activations (a squeeze-excitation gate)."""

        def leaf(v: Any, op: Any) -> bool | None:
            if op is None or op.name == "stablehlo.constant":
                return True
            return False if op.name not in _RULES else None

        return _fold_over_operands(value, self._like, leaf, all)

    def value(self, value: Any) -> np.ndarray:
        """``value`` evaluated: float64 for floating-point values (holding the graph's own
        values after any rounding ``convert``), the integer or bool dtype otherwise. Raises
        :class:`NotConstant`."""
        why = self.why_not(value)
        if why:
            raise NotConstant(why)
        return self._evaluate(value, [0])

    def native(self, value: Any) -> np.ndarray:
        """``value`` in its own dtype (a stored weight, read without widening when it is a
        ``stablehlo.constant``)."""
        t = tensor_type(value)
        dt = np_dtype(t.element_type) if t is not None else None
        if dt is None:
            raise NotConstant(f"its element type {t.element_type if t else value.type} is unknown")
        op = op_of(value)
        if op is not None and op.name == "stablehlo.constant":
            self._charge([0], value)
            return read_attribute(op.attributes["value"], dt)
        with np.errstate(all="ignore"):
            return self.value(value).astype(dt)

    def _charge(self, budget: list[int], value: Any) -> tuple[int, ...]:
        shape = static_shape(value)
        if shape is None:
            raise NotConstant("its shape is not static")
        budget[0] += math.prod(shape)  # Python integers: no overflow
        if budget[0] > self._max:
            raise NotConstant(
                f"evaluating it takes more than {self._max:,} elements (bnfold's budget)"
            )
        return shape

    def _evaluate(self, value: Any, budget: list[int]) -> np.ndarray:
        # iterative: a long constant expression must not hit the recursion limit
        stack = [value]
        while stack:
            v = stack[-1]
            if v in self._cache:
                stack.pop()
                continue
            op = op_of(v)
            assert op is not None
            pending = [o for o in op.operands if o not in self._cache]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            self._cache[v] = self._compute(v, op, budget)
        return self._cache[value]

    def _compute(self, value: Any, op: Any, budget: list[int]) -> np.ndarray:
        """One op's result, as the graph computes it: each floating-point result is rounded
        to its element type (an overflow is inf and an underflow 0 there too), and held in
        float64."""
        shape = self._charge(budget, value)
        t = tensor_type(value)
        dt = np_dtype(t.element_type)
        if dt is None or dt.kind == "c":
            raise NotConstant(f"it has element type {t.element_type}")
        if op.name == "stablehlo.constant":
            raw = read_attribute(op.attributes["value"], dt)
            return raw.astype(np.float64) if _is_float(dt) and dt != np.float64 else raw
        args = [self._cache[o] for o in op.operands]
        with np.errstate(all="ignore"):
            out = np.asarray(_RULES[op.name](op, args, shape))
            if _is_float(dt):
                out = out.astype(dt).astype(np.float64)
            elif out.dtype != dt:
                out = out.astype(dt)
        if out.shape != shape:
            raise NotConstant(f"{op.name} gave shape {out.shape}, its type says {shape}")
        return out


def _fold_over_operands(
    value: Any,
    memo: dict[Any, Any],
    leaf: Callable[[Any, Any], Any],
    combine: Callable[[list[Any]], Any],
) -> Any:
    """A property of ``value`` computed from its operands' (``combine``), down to the values
    ``leaf`` decides alone (it returns ``None`` for the others), memoised in ``memo``.
    Iterative: a long constant expression must not hit the recursion limit."""
    stack = [value]
    while stack:
        v = stack.pop()
        if v in memo:
            continue
        op = op_of(v)
        decided = leaf(v, op)
        if decided is not None:
            memo[v] = decided
            continue
        pending = [o for o in op.operands if o not in memo]
        if pending:
            stack.append(v)
            stack.extend(pending)
            continue
        memo[v] = combine([memo[o] for o in op.operands])
    return memo[value]


def read_attribute(attr: Any, dtype: np.dtype) -> np.ndarray:
    """The array of a dense elements attribute, in ``dtype`` (its own element type)."""
    try:
        dense = ir.DenseElementsAttr(attr)
    except (ValueError, TypeError) as e:
        kind = "a dense_resource blob" if "dense_resource" in str(attr)[:20] else "not dense"
        raise NotConstant(f"its value is {kind}, which bnfold does not read") from e
    shape = tuple(int(d) for d in ir.ShapedType(dense.type).shape)
    if dense.is_splat:
        v = dense.get_splat_value()
        number = getattr(v, "value", None)
        if number is None:
            raise NotConstant(f"its splat value {v} cannot be read")
        return np.full(shape, number, dtype=dtype)
    arr = np.array(dense)
    if arr.dtype != object:
        return arr.astype(dtype, copy=False).reshape(shape)
    return _read_through_bits(dense, dtype, shape)


def _read_through_bits(dense: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Types the buffer protocol does not export (bfloat16, float8): reinterpret the constant
    as integers of its width with StableHLO's own interpreter, then view the bits."""
    from jaxlib.mlir.dialects import func

    width = dtype.itemsize * 8
    int_type = ir.RankedTensorType.get(list(shape), ir.IntegerType.get_signless(width))
    with dense.context, ir.Location.unknown():
        module = ir.Module.create()
        with ir.InsertionPoint(module.body):
            f = func.FuncOp("main", ir.FunctionType.get([], [int_type]))
            with ir.InsertionPoint(f.add_entry_block()):
                c = hlo.ConstantOp(dense)
                bits = hlo.BitcastConvertOp(int_type, c.result)
                func.ReturnOp([bits.result])
        out = hlo.eval_module(module, [])
    ints = np.array(out[0]).reshape(shape)
    return ints.astype(np.dtype(f"u{dtype.itemsize}")).view(dtype)


def write_attribute(array: np.ndarray, element_type: Any) -> Any:
    """A dense elements attribute holding ``array`` with MLIR element type ``element_type``."""
    t = ir.RankedTensorType.get(list(array.shape), element_type)
    return ir.DenseElementsAttr.get(np.ascontiguousarray(array), type=t)
