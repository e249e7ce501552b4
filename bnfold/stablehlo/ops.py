"""What bnfold knows of StableHLO ops: producers, chain links and per-channel operands.

Producers are ``stablehlo.convolution`` (any dimension numbers, feature groups, input
dilation for transposed convolutions) and ``stablehlo.dot_general``; the axis of the output
that holds their channels and the weight axis that feeds it are read from the dimension numbers,
never assumed from a layout. Links are the elementwise ops a BatchNorm decomposes into
(``add``, ``subtract``, ``multiply``, ``divide``, ``negate``) when one operand is the chain and
the other is *per-channel*: a scalar, or a value that varies along one axis only — told from the
broadcast that made it full size, or from its values when it is a constant; and
``stablehlo.batch_norm_inference``, a link of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.affine import Link
from .constants import Constants, NotConstant, op_of, static_shape, tensor_type
from .mlir import hlo, ir

CONVOLUTION = "stablehlo.convolution"
DOT_GENERAL = "stablehlo.dot_general"
BATCH_NORM = "stablehlo.batch_norm_inference"
_BINARY = {
    "stablehlo.add": "add",
    "stablehlo.subtract": "sub",
    "stablehlo.multiply": "mul",
    "stablehlo.divide": "div",
}
_BROADCASTS = ("stablehlo.broadcast_in_dim", "stablehlo.dynamic_broadcast_in_dim")


def int_attr(op: Any, name: str, default: int | None = None) -> int | None:
    if name not in op.attributes:
        return default
    return int(ir.IntegerAttr(op.attributes[name]).value)


def i64_array(op: Any, name: str) -> list[int] | None:
    if name not in op.attributes:
        return None
    attr = op.attributes[name]
    try:
        return [int(d) for d in ir.DenseI64ArrayAttr(attr)]
    except (ValueError, TypeError):
        return [int(d) for d in np.array(ir.DenseIntElementsAttr(attr)).reshape(-1)]


# --------------------------------------------------------------------------------------------
# Producers


@dataclass
class Producer:
    """A convolution or dot_general whose output channels a chain can fold into.

    ``weight_index`` is the operand holding the weight, ``weight_axis`` the weight axis that
    feeds output axis ``feature_axis`` (``None`` for a dot_general until the chain's axis picks
    one of the weight's free dimensions). ``problem`` says why it cannot take a fold.
    """

    op: Any
    kind: str  # rules.ProducerKind
    weight_index: int
    weight_axis: int | None
    feature_axis: int | None
    spatial_dims: int = 0
    groups: int = 1
    free_axes: dict[int, int] = field(default_factory=dict)  # output axis -> weight axis
    problem: str = ""

    @property
    def weight(self) -> Any:
        return self.op.operands[self.weight_index]

    @property
    def output(self) -> Any:
        return self.op.results[0]

    def at_axis(self, axis: int) -> tuple[int | None, str]:
        """The weight axis feeding output ``axis``, or why none does."""
        if self.kind != "linear":
            if axis == self.feature_axis:
                return self.weight_axis, ""
            return None, ""
        if axis in self.free_axes:
            return self.free_axes[axis], ""
        return None, (
            f"axis {axis} of the dot_general's output comes from its activation operand, not "
            "from its weight"
        )


def producer(op: Any, constants: Constants) -> Producer | None:
    """``op`` read as a producer, or ``None`` when it is not a convolution or dot_general."""
    if op is None:
        return None
    if op.name == CONVOLUTION:
        return _convolution(op)
    if op.name == DOT_GENERAL:
        return _dot_general(op, constants)
    return None


def _convolution(op: Any) -> Producer:
    dn = hlo.ConvDimensionNumbers(op.attributes["dimension_numbers"])
    lhs_dilation = i64_array(op, "lhs_dilation") or []
    transposed = any(d != 1 for d in lhs_dilation)
    p = Producer(
        op=op,
        kind="conv_transpose" if transposed else "conv",
        weight_index=1,
        weight_axis=int(dn.kernel_output_feature_dimension),
        feature_axis=int(dn.output_feature_dimension),
        spatial_dims=len(dn.output_spatial_dimensions),
        groups=int_attr(op, "feature_group_count", 1) or 1,
    )
    if (int_attr(op, "batch_group_count", 1) or 1) != 1:
        p.problem = "its batch_group_count is not 1"
    return p


def _dot_general(op: Any, constants: Constants) -> Producer:
    dn = hlo.DotDimensionNumbers(op.attributes["dot_dimension_numbers"])
    lhs, rhs = op.operands[0], op.operands[1]
    lhs_rank, rhs_rank = (tensor_type(v).rank for v in (lhs, rhs))
    lhs_batch = list(dn.lhs_batching_dimensions)
    rhs_batch = list(dn.rhs_batching_dimensions)
    lhs_free = [
        d for d in range(lhs_rank) if d not in lhs_batch and d not in dn.lhs_contracting_dimensions
    ]
    rhs_free = [
        d for d in range(rhs_rank) if d not in rhs_batch and d not in dn.rhs_contracting_dimensions
    ]
    # The output is (batch..., lhs free..., rhs free...). The weight is the constant operand;
    # when neither is (parameters passed as arguments), the right one, as x @ kernel writes it.
    weight_index = 0 if constants.is_constant(lhs) and not constants.is_constant(rhs) else 1
    nb = len(lhs_batch)
    if weight_index == 1:
        free = {nb + len(lhs_free) + i: d for i, d in enumerate(rhs_free)}
    else:
        free = {nb + i: d for i, d in enumerate(lhs_free)}
    p = Producer(
        op=op,
        kind="linear",
        weight_index=weight_index,
        weight_axis=None,
        feature_axis=None,
        free_axes=free,
    )
    if lhs_batch if weight_index == 0 else rhs_batch:
        p.problem = "its weight has batch dimensions"
    return p


# --------------------------------------------------------------------------------------------
# Per-channel operands and links


@dataclass(frozen=True)
class ChannelOperand:
    """A link operand that is one number, or varies along one axis of the chain value.

    ``source`` is the value before the broadcasts that made it full size, ``axes`` maps each
    of its axes to the chain value's, and ``axis`` is the chain axis it varies along (``None``:
    a scalar)."""

    source: Any
    axes: tuple[int, ...]
    axis: int | None


def channel_operand(value: Any, rank: int, constants: Constants) -> ChannelOperand | None:
    """``value`` as a per-channel operand of a rank-``rank`` chain value, or ``None``.

    It must be a constant or have been broadcast to full size (what tells it from an
    activation); its varying axes are read from its shape, or from its values when it is a
    constant stored at full size.
    """
    source, axes = value, tuple(range(rank))
    peeled = False
    while True:
        op = op_of(source)
        if op is None or op.name not in _BROADCASTS:
            break
        dims = i64_array(op, "broadcast_dimensions") or []
        axes = tuple(axes[d] for d in dims)
        source = op.operands[0]
        peeled = True
    constant = constants.is_constant(source)
    if not constant and not (peeled and constants.parameter_like(source)):
        return None
    shape = static_shape(source)
    if shape is None or len(shape) != len(axes):
        return None
    varying = [axes[i] for i, n in enumerate(shape) if n != 1]
    if len(varying) > 1 and constant:
        varying = _varying_by_value(source, shape, axes, constants)
        if varying is None:
            return None
    if len(varying) > 1:
        return None
    return ChannelOperand(source, axes, varying[0] if varying else None)


def _varying_by_value(
    source: Any, shape: tuple[int, ...], axes: tuple[int, ...], constants: Constants
) -> list[int] | None:
    try:
        arr = constants.value(source)
    except NotConstant:
        return None
    varying = []
    for i, n in enumerate(shape):
        if n != 1 and not (arr == arr.take([0], axis=i)).all():
            varying.append(axes[i])
    return varying


def operand_vector(operand: ChannelOperand, constants: Constants) -> np.ndarray:
    """The values of a per-channel operand along its axis (one value for a scalar), float64."""
    arr = np.asarray(constants.value(operand.source), dtype=np.float64)
    if operand.axis is None:
        return arr.reshape(-1)[:1]
    i = operand.axes.index(operand.axis)  # the source axis that varies (channel_operand)
    index = tuple(slice(None) if j == i else 0 for j in range(arr.ndim))
    return arr[index]


def link(op: Any, constants: Constants) -> Link | None:
    """``op`` as a link of a per-channel affine chain, or ``None``."""
    name = op.name
    if name == BATCH_NORM:
        x = op.operands[0]
        if constants.is_constant(x):
            return None
        return Link(
            node=op,
            input=x,
            output=op.results[0],
            op="affine",
            axis=int_attr(op, "feature_index"),
            operand=list(op.operands[1:5]),
        )
    if name == "stablehlo.convert":
        x = op.operands[0]
        if constants.is_constant(x) or not _widening(x, op.results[0]):
            return None
        return Link(node=op, input=x, output=op.results[0], op="widen")
    if name == "stablehlo.negate":
        x = op.operands[0]
        if constants.is_constant(x) or tensor_type(x) is None:
            return None
        return Link(node=op, input=x, output=op.results[0], op="neg")
    kind = _BINARY.get(name)
    if kind is None or len(op.operands) != 2:
        return None
    result = tensor_type(op.results[0])
    if result is None or not _float_type(result.element_type):
        return None
    for side in (0, 1):
        chain, other = op.operands[side], op.operands[1 - side]
        if constants.is_constant(chain) or channel_operand(chain, result.rank, constants):
            continue  # arithmetic on parameters, not on an activation
        operand = channel_operand(other, result.rank, constants)
        if operand is None:
            continue
        if kind == "div" and side == 1:
            return None  # a / z is not affine in z
        return Link(
            node=op,
            input=chain,
            output=op.results[0],
            op=kind,  # type: ignore[arg-type]
            axis=operand.axis,
            chain_first=side == 0,
            operand=operand,
        )
    return None


# Float conversions that keep every value: mixed-precision models compute their BatchNorm in
# float32 on a bfloat16 or float16 activation.
_WIDENING = {("bf16", "f32"), ("bf16", "f64"), ("f16", "f32"), ("f16", "f64"), ("f32", "f64")}


def _widening(source: Any, result: Any) -> bool:
    a, b = tensor_type(source), tensor_type(result)
    if a is None or b is None:
        return False
    return (str(a.element_type), str(b.element_type)) in _WIDENING


def _float_type(element_type: Any) -> bool:
    name = str(element_type)
    return name.startswith(("f", "bf")) and not name.startswith("func")
