"""The ONNX operators the fold reads: BatchNormalization, its producers, and the layout
operators and elementwise arithmetic by constants that may stand between them.

Everything here reads the operator specifications (attributes, defaults, input positions) and
nothing else; the legality decision is :mod:`bnfold.core.rules`' and the rewriting
:mod:`bnfold.onnx.adapter`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from ..core.pipeline import BatchNormSite, ProducerSite
from ..onnx.constants import attribute, describe_node, is_default_domain

# BatchNormalization's default epsilon in every version.
DEFAULT_EPSILON = 1e-5

_FLOAT, _INT, _INTS = ir.AttributeType.FLOAT, ir.AttributeType.INT, ir.AttributeType.INTS


@dataclass(kw_only=True)
class BatchNormCall(BatchNormSite[ir.Node]):
    """One BatchNormalization node as the fold sees it (``weight`` is its ``scale`` input, the
    normalised ``axis`` is 1), of operator-set ``version``."""

    version: int


def batch_norm_call(node: ir.Node, version: int) -> BatchNormCall | None:
    """``node`` read as a BatchNormalization of operator-set ``version``, or ``None``."""
    if node.op_type != "BatchNormalization" or not is_default_domain(node):
        return None
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    eps = attribute(node, "epsilon", _FLOAT, DEFAULT_EPSILON)
    x, scale, bias, mean, var = inputs[:5]
    call = BatchNormCall(
        node=node,
        version=version,
        input=x,
        output=node.outputs[0] if node.outputs else None,
        weight=scale,
        bias=bias,
        mean=mean,
        var=var,
        eps=float(eps),
    )
    extra = [v for v in node.outputs[1:] if v is not None and v.name != ""]
    if version >= 14:
        if attribute(node, "training_mode", _INT, 0):
            call.not_inference = (
                f"{describe_node(node)} has training_mode=1: it normalises with the statistics "
                "of each batch (export the model in eval mode)"
            )
    elif extra:
        # Before version 14 the optional outputs (mean, var, saved_mean, saved_var) are what
        # marks the training form.
        call.not_inference = (
            f"{describe_node(node)} has the outputs of the training form (mean, var, "
            "saved_mean, saved_var): it normalises with batch statistics"
        )
    if version < 7:
        call.unsupported = (
            f"{describe_node(node)} is BatchNormalization-{version} (operator set < 7), which "
            "bnfold does not read; convert the model to a newer opset"
        )
    elif version < 9 and attribute(node, "spatial", _INT, 1) == 0:
        call.unsupported = (
            f"{describe_node(node)} has spatial=0: its statistics are per activation, not per "
            "channel"
        )
    used = [v for v in extra if v.uses() or v.is_graph_output()]
    if used and not call.not_inference:
        call.not_inference = (
            f"{describe_node(node)}'s running-statistics outputs are used, so it cannot disappear"
        )
    return call


# --------------------------------------------------------------------------------------------
# Producers


@dataclass(kw_only=True)
class ProducerCall(ProducerSite[ir.Node]):
    """A Conv, ConvTranspose, Gemm or MatMul node.

    ``weight_index`` is the weight operand's input position; ``bias_index`` is where its own
    bias goes, ``None`` for MatMul, which has none. ``output_rank`` is set when the operator
    fixes it (a convolution's is its weight's). Gemm and MatMul put the output channels on the
    last axis (:attr:`channel_last`), convolutions on axis 1.
    """

    weight_index: int
    bias_index: int | None = None
    gemm_beta: float = 1.0

    def __post_init__(self) -> None:
        if self.feature_axis is None:
            self.feature_axis = -1 if self.kind == "linear" else 1

    @property
    def channel_last(self) -> bool:
        return self.kind == "linear"

    @property
    def bias(self) -> ir.Value | None:
        inputs = self.node.inputs
        if self.bias_index is None or self.bias_index >= len(inputs):
            return None
        return inputs[self.bias_index]

    @property
    def weight(self) -> ir.Value | None:
        inputs = self.node.inputs
        return inputs[self.weight_index] if self.weight_index < len(inputs) else None


PRODUCER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def producer_call(node: ir.Node, weight_rank: int | None) -> ProducerCall | None:
    """``node`` read as a producer, or ``None`` when it is not one of :data:`PRODUCER_OPS`.

    ``weight_rank`` is the rank of its weight operand when known (it fixes a convolution's
    output rank).
    """
    if node.op_type not in PRODUCER_OPS or not is_default_domain(node):
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        groups = attribute(node, "group", _INT, 1)
        transpose = node.op_type == "ConvTranspose"
        call = ProducerCall(
            node=node,
            kind="conv_transpose" if transpose else "conv",
            weight_index=1,
            weight_axis=1 if transpose else 0,
            groups=groups if transpose else 1,
            bias_index=2,
            output_rank=weight_rank,
            spatial_dims=(weight_rank - 2) if weight_rank else 0,
        )
        if weight_rank is not None and weight_rank < 3:
            call.problem = f"{describe_node(node)} has a {weight_rank}-D weight"
        if groups < 1:
            call.problem = f"{describe_node(node)} has group={groups}"
        return call
    if node.op_type == "Gemm":
        trans_b = attribute(node, "transB", _INT, 0)
        call = ProducerCall(
            node=node,
            kind="linear",
            weight_index=1,
            weight_axis=0 if trans_b else 1,
            bias_index=2,
            output_rank=2,
            gemm_beta=float(attribute(node, "beta", _FLOAT, 1.0)),
        )
        return call
    # MatMul: x @ W with a 2-D constant W of shape (K, N); the output's last axis is N.
    call = ProducerCall(node=node, kind="linear", weight_index=1, weight_axis=1)
    if weight_rank is not None and weight_rank != 2:
        call.problem = (
            f"{describe_node(node)} multiplies by a {weight_rank}-D tensor; bnfold folds into "
            "2-D MatMul weights"
        )
    return call


# --------------------------------------------------------------------------------------------
# Layout operators between a producer and its BatchNorm


# Reshape is followed only where it keeps the channels as the last axis (a Linear on a 3-D
# input, as tf2onnx writes it: Reshape to 2-D, MatMul, Reshape back): see the adapter.
LAYOUT_OPS = ("Identity", "Transpose", "Unsqueeze", "Squeeze", "Reshape")


@dataclass
class AxisTrack:
    """The channel axis of a tensor and its rank, followed through layout operators."""

    rank: int
    axis: int
    steps: list[str] = field(default_factory=list)


def follow(track: AxisTrack, node: ir.Node, axes: list[int] | None) -> str:
    """Move ``track`` through the layout node ``node``; return why it cannot, or ``""``.

    ``axes`` are the Unsqueeze/Squeeze axes (attribute or constant input) when given.
    """
    op = node.op_type
    if op == "Identity":
        return ""
    if op == "Transpose":
        perm = attribute(node, "perm", _INTS)
        perm = list(reversed(range(track.rank))) if perm is None else [int(p) for p in perm]
        if sorted(perm) != list(range(track.rank)):
            return f"{describe_node(node)} has perm {perm}, not a permutation of {track.rank} axes"
        track.axis = perm.index(track.axis)
        track.steps.append(f"Transpose(perm={perm})")
        return ""
    if axes is None:
        return f"{describe_node(node)} has axes bnfold cannot read"
    if op == "Unsqueeze":
        out_rank = track.rank + len(axes)
        inserted = sorted({a + out_rank if a < 0 else a for a in axes})
        if len(inserted) != len(axes) or any(not 0 <= a < out_rank for a in inserted):
            return f"{describe_node(node)} has invalid axes {axes}"
        kept = [i for i in range(out_rank) if i not in inserted]
        track.axis = kept[track.axis]
        track.rank = out_rank
        track.steps.append(f"Unsqueeze(axes={inserted})")
        return ""
    # Squeeze with explicit axes
    removed = sorted({a + track.rank if a < 0 else a for a in axes})
    if len(removed) != len(axes) or any(not 0 <= a < track.rank for a in removed):
        return f"{describe_node(node)} has invalid axes {axes}"
    if track.axis in removed:
        return f"{describe_node(node)} removes the channel axis"
    track.axis -= sum(1 for a in removed if a < track.axis)
    track.rank -= len(removed)
    track.steps.append(f"Squeeze(axes={removed})")
    return ""


# --------------------------------------------------------------------------------------------
# Elementwise arithmetic by constants (affine links)


LINK_OPS = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Neg": "neg"}


@dataclass(frozen=True)
class LinkCall:
    """An ``Add``/``Sub``/``Mul``/``Div`` of an activation and a constant, or a ``Neg``: one
    step of a per-channel affine chain (:mod:`bnfold.core.affine`). ``chain_index`` is the
    input carrying the activation, ``const_index`` the constant's (``None`` for ``Neg``)."""

    node: ir.Node
    op: str  # a bnfold.core.affine.LinkOp: add, sub, mul, div or neg
    chain_index: int
    const_index: int | None

    @property
    def input(self) -> ir.Value:
        value = self.node.inputs[self.chain_index]
        assert value is not None
        return value

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def constant(self) -> ir.Value | None:
        return None if self.const_index is None else self.node.inputs[self.const_index]

    @property
    def chain_first(self) -> bool:
        return self.chain_index == 0


def link_call(
    node: ir.Node, version: int, is_float_constant: Callable[[ir.Value], bool | None]
) -> LinkCall | None:
    """``node`` read as an affine link, or ``None``.

    ``is_float_constant(value)`` says whether a value is a constant of a floating-point type
    (``True``), a constant of another type (``False``) or not a constant (``None``). A link has
    exactly one floating-point constant operand (``Div`` only as the divisor: ``a / x`` is not
    affine). Before operator set 7, ``Add``/``Mul``/... broadcast by an ``axis`` attribute,
    which bnfold does not read: no link.
    """
    op = LINK_OPS.get(node.op_type)
    if op is None or not is_default_domain(node) or version < 7 or len(node.outputs) != 1:
        return None
    inputs = list(node.inputs)
    if op == "neg":
        if len(inputs) != 1 or inputs[0] is None:
            return None
        return LinkCall(node, op, 0, None) if is_float_constant(inputs[0]) is None else None
    if len(inputs) != 2 or inputs[0] is None or inputs[1] is None or inputs[0] is inputs[1]:
        return None
    kinds = [is_float_constant(v) for v in inputs]
    for const in (1, 0):
        if kinds[const] is True and kinds[1 - const] is None:
            if op == "div" and const == 0:
                return None
            return LinkCall(node, op, 1 - const, const)
    return None
