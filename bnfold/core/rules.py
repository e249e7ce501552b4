"""Legality of a forward fold, shared by every frontend.

A frontend translates its graph into :class:`PairFacts` (a few plain facts about one BatchNorm
and the layer feeding it) and calls :func:`decide`. Each rule is a small function returning
``None`` when it holds or a reason a user can read. The numeric validity rule lives in
:mod:`bnfold.core.algebra`, which refuses while computing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidArgumentError

ProducerKind = Literal["conv", "conv_transpose", "linear"]
PRODUCER_KINDS: tuple[ProducerKind, ...] = ("conv", "conv_transpose", "linear")


def selected_kinds(producers: Iterable[str] | str | None) -> set[str]:
    """The producer kinds a ``producers=`` argument selects (all when ``None``)."""
    if producers is None:
        return set(PRODUCER_KINDS)
    if isinstance(producers, (bytes, bytearray, Mapping)) or not isinstance(
        producers, (str, Iterable)
    ):
        # bytes iterate as numbers and a dict as its keys: neither is a list of kinds
        raise InvalidArgumentError(
            "producers must be a kind or a list, tuple or set of kinds "
            f"({', '.join(PRODUCER_KINDS)}), not {type(producers).__name__}"
        )
    given = [producers] if isinstance(producers, str) else list(producers)
    unknown = [k for k in given if not isinstance(k, str) or k not in PRODUCER_KINDS]
    if unknown:
        raise InvalidArgumentError(
            f"unknown producer kinds {', '.join(sorted(map(repr, unknown)))}; choose from "
            f"{', '.join(PRODUCER_KINDS)}"
        )
    return set(given)


# Where the tail of a pt2e QAT chain goes (``fold(..., qat=)``, ``--qat``): one exact add after
# the output dequantize, or the conv's bias where that is proven to move at most about a step.
QAT_MODES = ("exact", "bias")


def qat_mode(value: object) -> str:
    """Check a ``qat=`` argument (one of :data:`QAT_MODES`)."""
    if not isinstance(value, str) or value not in QAT_MODES:
        raise InvalidArgumentError(
            f"qat must be one of {', '.join(map(repr, QAT_MODES))}, not {value!r}"
        )
    return value


# Rule identifiers, as they appear in reports.
INFERENCE_MODE = "inference-mode"
NO_PRODUCER = "no-producer"
CONSTANT_PARAMS = "constant-params"
SINGLE_CONSUMER = "single-consumer"
CHANNEL_AXIS = "channel-axis"
UNSHARED = "unshared-weights"
STANDARD_FORWARD = "standard-forward"
MODULE_BOUNDARY = "module-boundary"
VALID_VALUES = "valid-values"
NOT_SELECTED = "not-selected"


@dataclass(frozen=True)
class PairFacts:
    """What the rules need to know about one BatchNorm and the layer that feeds it.

    Names are the frontend's (module paths, node names). ``producer`` is ``None`` when the
    BatchNorm's input does not come straight from a foldable layer; ``producer_detail`` then
    says what it comes from.
    """

    bn: str
    bn_axis: int = 1  # the activation axis the BatchNorm normalises (negative: from the end)
    chain: bool = False  # an affine chain (arithmetic by constants), not a BatchNorm
    bn_uses_running_stats: bool = True
    bn_not_inference_reason: str = ""
    bn_calls: int = 1
    bn_custom_forward: str = ""  # why its forward is not understood as a BatchNorm; "" if it is
    bn_params_constant: bool = True
    bn_state_used_elsewhere: str = ""
    bn_input_ranks: frozenset[int] | None = None  # ranks the BatchNorm accepts; None: any

    producer: str | None = None
    producer_detail: str = ""
    producer_kind: ProducerKind | None = None
    producer_spatial_dims: int = 0  # conv: 1, 2 or 3
    # The axis of the producer's output that holds its channels when the op fixes it (a
    # channels-last convolution: the last); None: derived from the kind and the output rank.
    producer_feature_axis: int | None = None
    producer_custom_forward: str = ""  # why its forward may do more than its base class's
    producer_calls: int = 1
    producer_output_users: int = 1
    producer_other_users: str = ""
    producer_params_constant: bool = True
    producer_params_shared: str = ""  # who else uses the weight/bias; "" if nobody
    can_unshare: bool = False  # graph forms give the folded layer its own weight copy
    output_rank: int | None = None  # rank of the producer's output when known
    rank_hint: str = "pass example_inputs"  # what tells bnfold the rank when it is unknown
    boundary: str = ""  # a module boundary the fold would cross and that must be kept
    constant_detail: str = ""  # which tensor is not constant and why, when the frontend knows
    # Graph forms that follow the channel axis through layout ops (Transpose, Unsqueeze) give
    # where it arrives at the BatchNorm, the ops passed, or why it cannot be followed.
    channel_axis: int | None = None
    axis_path: str = ""
    axis_problem: str = ""


Rule = Callable[[PairFacts], "str | None"]


def _inference_mode(f: PairFacts) -> str | None:
    if not f.bn_uses_running_stats:
        return f.bn_not_inference_reason or (
            f"{f.bn} normalises with batch statistics, not running statistics"
        )
    return None


def _within_boundary(f: PairFacts) -> str | None:
    if f.boundary:
        return (
            f"{f.producer} and {f.bn} are on different sides of {f.boundary}, whose call "
            "signature the program preserves; folding would change what that module computes"
        )
    return None


def _has_producer(f: PairFacts) -> str | None:
    if f.producer is None:
        detail = f.producer_detail or "a layer that cannot absorb it"
        return f"{f.bn}'s input comes from {detail}, not from a Conv, ConvTranspose or Linear"
    return None


def _standard_forward(f: PairFacts) -> str | None:
    for name, why in ((f.bn, f.bn_custom_forward), (f.producer, f.producer_custom_forward)):
        if why:
            return f"{name}: {why}"
    return None


def _single_call(f: PairFacts) -> str | None:
    if f.bn_calls > 1:
        return f"{f.bn} is called {f.bn_calls} times; folding it would change every call"
    if f.producer_calls > 1 and not f.can_unshare:
        return (
            f"{f.producer} is called {f.producer_calls} times; its other calls do not go "
            f"through {f.bn}"
        )
    return None


def _constant_params(f: PairFacts) -> str | None:
    why = f": {f.constant_detail}" if f.constant_detail else ""
    if not f.bn_params_constant and f.chain:
        return f"the operands of {f.bn} are not all constant tensors" + (
            why or " (computed at run time)"
        )
    if not f.bn_params_constant:
        return f"{f.bn}'s statistics or affine parameters are not constant tensors" + (
            why or " (computed at run time, parametrized or uninitialised)"
        )
    if not f.producer_params_constant:
        return f"{f.producer}'s weight or bias is not a constant tensor" + (
            why or " (computed at run time, parametrized or uninitialised)"
        )
    return None


def _single_consumer(f: PairFacts) -> str | None:
    if f.producer_output_users != 1:
        others = f" ({f.producer_other_users})" if f.producer_other_users else ""
        return (
            f"{f.producer}'s output is also used elsewhere{others}; folding would change "
            "what those users see"
        )
    if f.bn_state_used_elsewhere:
        return f"{f.bn}'s parameters are also used by {f.bn_state_used_elsewhere}"
    return None


def _unshared(f: PairFacts) -> str | None:
    if f.producer_params_shared and not f.can_unshare:
        return f"{f.producer}'s weight or bias is shared with {f.producer_params_shared}"
    return None


def producer_channel_axis(
    kind: ProducerKind, rank: int, spatial_dims: int, feature_axis: int | None = None
) -> int:
    """Axis of the activation that holds the producer's output channels: ``feature_axis`` when
    the op fixes it (negative counts from the end), else PyTorch's and ONNX's layouts."""
    if feature_axis is not None:
        return feature_axis % rank if -rank <= feature_axis < rank else -1
    if kind == "linear":
        return rank - 1
    return rank - spatial_dims - 1  # batched (N, C, *S): 1; unbatched (C, *S): 0


def normalised_axis(f: PairFacts, rank: int) -> int | None:
    """The axis the BatchNorm normalises on a ``rank``-D input (``None``: it has no such axis)."""
    return f.bn_axis % rank if -rank <= f.bn_axis < rank else None


def possible_output_ranks(f: PairFacts) -> frozenset[int] | None:
    """Ranks the producer's output can have given what is known; ``None`` when unbounded."""
    if f.output_rank is not None:
        return frozenset({f.output_rank})
    if f.producer_kind in ("conv", "conv_transpose"):
        own = frozenset({f.producer_spatial_dims + 1, f.producer_spatial_dims + 2})
        return own if f.bn_input_ranks is None else own & f.bn_input_ranks
    return f.bn_input_ranks


def _channel_axis(f: PairFacts) -> str | None:
    assert f.producer_kind is not None
    if f.axis_problem:
        return f.axis_problem
    if f.channel_axis is not None:
        if f.channel_axis == f.bn_axis:
            return None
        via = f" after {f.axis_path}" if f.axis_path else ""
        return (
            f"{f.producer}'s output channels are on axis {f.channel_axis}{via}, but {f.bn} "
            f"normalises axis {f.bn_axis}"
        )
    ranks = possible_output_ranks(f)
    if ranks is None:
        return (
            f"the rank of {f.producer}'s output is unknown, so bnfold cannot tell whether "
            f"{f.bn} normalises its output-channel axis; {f.rank_hint}"
        )
    for rank in sorted(ranks):
        axis = producer_channel_axis(
            f.producer_kind, rank, f.producer_spatial_dims, f.producer_feature_axis
        )
        normalised = normalised_axis(f, rank)
        if axis != normalised:
            usual = producer_channel_axis(f.producer_kind, rank, f.producer_spatial_dims)
            if axis != usual or f.bn_axis != 1:
                return (
                    f"{f.producer}'s {rank}-D output has its channels on axis {axis} but "
                    f"{f.bn} normalises axis {f.bn_axis}"
                )
            where = "last axis" if f.producer_kind == "linear" else "axis 0 (unbatched input)"
            known = f.output_rank is not None
            lead = (
                f"{f.producer}'s output is {rank}-D"
                if known
                else (f"{f.producer}'s output may be {rank}-D (shape unknown)")
            )
            hint = "" if known else f"; {f.rank_hint} to decide"
            return (
                f"{lead}: its channels are on the {where} (axis {axis}) but {f.bn} normalises "
                f"axis 1{hint}"
            )
    return None


# Order matters: the first failing rule is the one reported.
RULES: tuple[tuple[str, Rule], ...] = (
    (INFERENCE_MODE, _inference_mode),
    (STANDARD_FORWARD, _standard_forward),
    (NO_PRODUCER, _has_producer),
    (MODULE_BOUNDARY, _within_boundary),
    (UNSHARED, _single_call),
    (CONSTANT_PARAMS, _constant_params),
    (SINGLE_CONSUMER, _single_consumer),
    (CHANNEL_AXIS, _channel_axis),
    (UNSHARED, _unshared),
)


@dataclass(frozen=True)
class Decision:
    """The verdict on one (producer, BatchNorm) pair."""

    ok: bool
    rule: str | None = None
    reason: str = ""


def decide(facts: PairFacts, selected: set[str] | None = None) -> Decision:
    """Apply every rule in order; the first one that fails decides.

    A fold that every rule allows but whose producer kind is not in ``selected`` (the user's
    ``producers=`` choice) is reported as not selected.
    """
    for rule_id, rule in RULES:
        reason = rule(facts)
        if reason is not None:
            return Decision(False, rule_id, reason)
    if selected is not None and facts.producer_kind not in selected:
        return Decision(
            False, NOT_SELECTED, f"folding into {facts.producer_kind} layers was not selected"
        )
    return Decision(True)
