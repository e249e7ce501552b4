"""The legality rules: plain facts in, the first failing rule and its reason out."""

from __future__ import annotations

import dataclasses

import pytest

from bnfold.core import rules
from bnfold.core.rules import PairFacts, decide

CONV2D = PairFacts(
    bn="bn",
    bn_input_ranks=frozenset({4}),
    producer="conv",
    producer_kind="conv",
    producer_spatial_dims=2,
)
LINEAR_BN1D = PairFacts(
    bn="bn", bn_input_ranks=frozenset({2, 3}), producer="fc", producer_kind="linear"
)


def _with(base: PairFacts, **changes) -> PairFacts:
    return dataclasses.replace(base, **changes)


def test_plain_conv_bn_folds_without_shapes():
    assert decide(CONV2D).ok


@pytest.mark.parametrize(
    "changes,rule,words",
    [
        (dict(bn_uses_running_stats=False), rules.INFERENCE_MODE, "batch statistics"),
        (dict(producer=None, producer_detail="relu (relu)"), rules.NO_PRODUCER, "relu"),
        (dict(bn_custom_forward="BatchNormAct2d"), rules.STANDARD_FORWARD, "BatchNormAct2d"),
        (dict(producer_custom_forward="StdConv2d"), rules.STANDARD_FORWARD, "StdConv2d"),
        (dict(bn_calls=2), rules.UNSHARED, "called 2 times"),
        (dict(producer_calls=3), rules.UNSHARED, "called 3 times"),
        (dict(bn_params_constant=False), rules.CONSTANT_PARAMS, "run time"),
        (dict(producer_params_constant=False), rules.CONSTANT_PARAMS, "run time"),
        (dict(producer_output_users=2, producer_other_users="add"), rules.SINGLE_CONSUMER, "add"),
        (
            dict(bn_state_used_elsewhere="forward() reading bn.weight"),
            rules.SINGLE_CONSUMER,
            "bn.weight",
        ),
        (dict(producer_params_shared="other.weight"), rules.UNSHARED, "other.weight"),
        (dict(output_rank=3, producer_spatial_dims=2), rules.CHANNEL_AXIS, "axis 0"),
    ],
)
def test_each_rule_refuses_with_its_reason(changes, rule, words):
    d = decide(_with(CONV2D, **changes))
    assert not d.ok
    assert d.rule == rule
    assert words in d.reason


def test_graph_forms_may_unshare_weights_and_calls():
    assert decide(_with(CONV2D, producer_params_shared="other.weight", can_unshare=True)).ok
    assert decide(_with(CONV2D, producer_calls=2, can_unshare=True)).ok


def test_linear_bn1d_needs_a_known_2d_activation():
    assert decide(_with(LINEAR_BN1D, output_rank=2)).ok
    d = decide(_with(LINEAR_BN1D, output_rank=3))
    assert d.rule == rules.CHANNEL_AXIS and "3-D" in d.reason and "last axis" in d.reason
    d = decide(LINEAR_BN1D)  # unknown rank: 3-D is possible
    assert d.rule == rules.CHANNEL_AXIS and "example_inputs" in d.reason


def test_unknown_bn_rank_and_unknown_shape_is_refused():
    d = decide(_with(LINEAR_BN1D, bn_input_ranks=None))
    assert d.rule == rules.CHANNEL_AXIS and "example_inputs" in d.reason


def test_conv1d_bn1d_could_be_unbatched_without_shapes():
    f = PairFacts(
        bn="bn",
        bn_input_ranks=frozenset({2, 3}),
        producer="c",
        producer_kind="conv",
        producer_spatial_dims=1,
    )
    d = decide(f)
    assert d.rule == rules.CHANNEL_AXIS and "unbatched" in d.reason
    assert decide(_with(f, output_rank=3)).ok
    assert not decide(_with(f, output_rank=2)).ok


def test_conv3d_into_bn2d_is_never_the_channel_axis():
    f = _with(CONV2D, producer_spatial_dims=3)  # BatchNorm2d accepts 4-D: an unbatched Conv3d
    assert decide(f).rule == rules.CHANNEL_AXIS


def test_first_failing_rule_wins():
    d = decide(_with(CONV2D, bn_uses_running_stats=False, producer_output_users=2))
    assert d.rule == rules.INFERENCE_MODE


@pytest.mark.parametrize(
    "kind,rank,spatial,axis",
    [
        ("linear", 2, 0, 1),
        ("linear", 3, 0, 2),
        ("conv", 4, 2, 1),
        ("conv", 3, 2, 0),
        ("conv_transpose", 5, 3, 1),
        ("conv", 3, 1, 1),
    ],
)
def test_producer_channel_axis(kind, rank, spatial, axis):
    assert rules.producer_channel_axis(kind, rank, spatial) == axis
