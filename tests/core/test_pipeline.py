"""The shared graph-fold driver (``bnfold.core.pipeline``) and the channel-axis rule for any
axis, on a toy IR: every behaviour a real adapter relies on is pinned here without a framework.

The toy graph is a list of ops ``(name, kind, input)``; a BatchNorm's scale ``s`` and shift
``t`` fold into a producer's ``(w, b)`` as ``(s*w, s*b + t)``, so every number is checkable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest

from bnfold.core import pipeline, rules
from bnfold.core.pipeline import BatchNormSite, Pair, ProducerSite, StoredOperand
from bnfold.core.report import FoldEntry
from bnfold.core.rules import PairFacts, decide
from bnfold.errors import FoldRefused


@dataclass
class Op:
    name: str
    kind: str  # "input", "linear", "bn", "relu"
    input: str | None = None
    w: float = 1.0
    b: float = 0.0
    s: float = 1.0
    t: float = 0.0


@dataclass
class Toy:
    """A toy graph adapter: ops in order, output of an op named like the op."""

    ops: list[Op]
    rewrites: int = 0
    passes: int = 0
    extra: list[FoldEntry] = field(default_factory=list)

    def _op(self, name: str | None) -> Op | None:
        return next((o for o in self.ops if o.name == name), None)

    def batch_norms(self) -> list[BatchNormSite[str]]:
        self.passes += 1
        return [
            BatchNormSite(
                node=o.name,
                input=o.input,
                output=o.name,
                weight=o.s,
                bias=o.t,
                mean=0,
                var=1,
                eps=0.0,
            )
            for o in self.ops
            if o.kind == "bn"
        ]

    def examine(self, bn: BatchNormSite[str]) -> Pair[str]:
        src = self._op(bn.input)
        facts = PairFacts(bn=bn.node, producer_kind="linear", output_rank=2)
        if src is None or src.kind != "linear":
            detail = f"{src.kind} {src.name}" if src else "nothing"
            facts = dataclasses.replace(facts, producer_detail=detail)
            return Pair(bn=bn, facts=facts, name=bn.node, bn_type="BN")
        users = sum(o.input == src.name for o in self.ops)
        facts = dataclasses.replace(facts, producer=src.name, producer_output_users=users)
        producer = ProducerSite(node=src.name, kind="linear")
        return Pair(
            bn=bn,
            facts=facts,
            name=bn.node,
            bn_type="BN",
            producer=producer,
            target=src.name,
            target_type="Linear",
        )

    def compute(self, pair: Pair[str]) -> tuple[float, float]:
        bn, prod = self._op(pair.bn.node), self._op(pair.target)
        assert bn is not None and prod is not None
        if not np.isfinite(bn.s):
            raise FoldRefused(f"{bn.name}'s scale is not finite")
        return bn.s * prod.w, bn.s * prod.b + bn.t

    def apply(self, folds: list[tuple[Pair[str], tuple[float, float]]]) -> None:
        self.rewrites += 1
        for pair, (w, b) in folds:
            prod, bn = self._op(pair.target), self._op(pair.bn.node)
            assert prod is not None and bn is not None
            prod.w, prod.b = w, b
            for o in self.ops:
                if o.input == bn.name:
                    o.input = prod.name
            self.ops.remove(bn)

    def upstream(self, bn: BatchNormSite[str]) -> list[str | None]:
        return [bn.input]

    def extra_entries(self) -> list[FoldEntry]:
        return list(self.extra)


def _net(*ops: Op) -> Toy:
    return Toy([Op("x", "input"), *ops])


def test_one_pass_folds_and_reports_in_graph_order():
    toy = _net(
        Op("fc", "linear", "x", w=2.0, b=1.0),
        Op("bn", "bn", "fc", s=3.0, t=0.5),
        Op("relu", "relu", "bn"),
        Op("bn2", "bn", "relu", s=2.0),
    )
    outcome = pipeline.run(toy, set(rules.PRODUCER_KINDS))
    assert [(e.bn, e.action, e.rule) for e in outcome.entries] == [
        ("bn", "folded", None),
        ("bn2", "skipped", rules.NO_PRODUCER),
    ]
    assert "relu relu" in outcome.entries[1].reason
    fc = toy._op("fc")
    assert (fc.w, fc.b) == (6.0, 3.5)
    assert toy.passes == 1 and toy.rewrites == 1
    assert outcome.complete


def test_chained_batchnorms_fold_in_one_pass_per_link_and_keep_first_order():
    toy = _net(
        Op("fc", "linear", "x", w=1.0, b=0.0),
        Op("bn1", "bn", "fc", s=2.0, t=1.0),
        Op("bn2", "bn", "bn1", s=3.0, t=-1.0),
        Op("bn3", "bn", "bn2", s=0.5, t=0.0),
    )
    outcome = pipeline.run(toy, set(rules.PRODUCER_KINDS))
    assert [(e.bn, e.action) for e in outcome.entries] == [
        ("bn1", "folded"),
        ("bn2", "folded"),
        ("bn3", "folded"),
    ]
    fc = toy._op("fc")
    # y = 0.5 * (3 * (2x + 1) - 1) = 3x + 1
    assert (fc.w, fc.b) == (3.0, 1.0)
    assert toy.passes == 3


def test_without_rewriting_a_chain_is_reported_incomplete_and_nothing_changes():
    toy = _net(
        Op("fc", "linear", "x"),
        Op("bn1", "bn", "fc", s=2.0),
        Op("bn2", "bn", "bn1", s=3.0),
    )
    outcome = pipeline.run(toy, set(rules.PRODUCER_KINDS), rewrite=False)
    assert not outcome.complete
    assert [e.action for e in outcome.entries] == ["folded", "skipped"]
    assert toy.rewrites == 0 and len(toy.ops) == 4 and toy._op("fc").w == 1.0
    # without a chain, one look is final
    plain = _net(Op("fc", "linear", "x"), Op("bn", "bn", "fc", s=2.0))
    assert pipeline.run(plain, {"linear"}, rewrite=False).complete


def test_refused_numbers_become_valid_values_skips_and_the_rest_still_folds():
    toy = _net(
        Op("fc1", "linear", "x"),
        Op("bn1", "bn", "fc1", s=float("inf")),
        Op("fc2", "linear", "bn1"),
        Op("bn2", "bn", "fc2", s=2.0),
    )
    outcome = pipeline.run(toy, set(rules.PRODUCER_KINDS))
    first, second = outcome.entries
    assert (first.action, first.rule, first.target) == ("skipped", rules.VALID_VALUES, "fc1")
    assert "not finite" in first.reason
    assert second.folded and toy._op("fc2").w == 2.0 and toy._op("fc1").w == 1.0


def test_rules_decide_before_compute_and_selection_is_applied():
    toy = _net(
        Op("fc", "linear", "x"),
        Op("bn", "bn", "fc", s=float("inf")),  # compute would refuse: it must not be asked
        Op("other", "relu", "fc"),  # fc's output has two users
    )
    [e] = pipeline.run(toy, set(rules.PRODUCER_KINDS)).entries
    assert e.rule == rules.SINGLE_CONSUMER
    toy = _net(Op("fc", "linear", "x"), Op("bn", "bn", "fc", s=2.0))
    [e] = pipeline.run(toy, {"conv"}).entries
    assert (e.action, e.rule) == ("skipped", rules.NOT_SELECTED)
    assert toy._op("fc").w == 1.0


def test_extra_entries_come_last():
    extra = FoldEntry("f/bn", None, "skipped", "inside a function", rules.MODULE_BOUNDARY)
    toy = _net(Op("fc", "linear", "x"), Op("bn", "bn", "fc", s=2.0))
    toy.extra = [extra]
    assert pipeline.run(toy, {"linear"}).entries[-1] == extra


def test_judge_and_entry_are_what_every_frontend_reports():
    facts = PairFacts(bn="bn", producer="fc", producer_kind="linear", output_rank=2)

    def refuse() -> None:
        raise FoldRefused("too big")

    decision, fold = pipeline.judge(facts, None, refuse)
    assert (decision.ok, decision.rule, decision.reason, fold) == (
        False,
        rules.VALID_VALUES,
        "too big",
        None,
    )
    decision, fold = pipeline.judge(facts, None, lambda: 42)
    assert decision.ok and fold == 42
    e = pipeline.entry("bn", "BatchNorm1d", "fc", "Linear", decision)
    assert e == FoldEntry("bn", "fc", "folded", "", None, "BatchNorm1d", "Linear")
    kept = pipeline.skipped(e, rules.Decision(False, rules.STANDARD_FORWARD, "why"))
    assert (kept.action, kept.rule, kept.reason, kept.target) == (
        "skipped",
        rules.STANDARD_FORWARD,
        "why",
        "fc",
    )


# --------------------------------------------------------------------------------------------
# Rewriting helpers


def test_drop_dead_removes_upstream_until_something_is_still_used():
    # c <- b <- a, and a is also read by d: dropping c drops b, not a
    users = {"a": {"b", "d"}, "b": {"c"}, "c": set(), "d": {"out"}}
    reads = {"c": ["b"], "b": ["a"], "a": []}
    removed: list[str] = []

    def drop(x: str) -> list[str] | None:
        if users[x]:
            return None
        removed.append(x)
        for r in reads[x]:
            users[r].discard(x)
        return reads[x]

    pipeline.drop_dead(["c", "c"], drop)
    assert removed == ["c", "b"]


def test_unique_name_and_bias_name():
    taken = {"w", "w_2"}
    assert pipeline.unique_name("v", taken) == "v"
    assert pipeline.unique_name("w", taken) == "w_3"
    assert pipeline.bias_name("conv.weight") == "conv.bias"
    assert pipeline.bias_name("conv.weight_folded") == "conv.bias_folded"
    assert pipeline.bias_name("onnx::Conv_3") == "onnx::Conv_3_bias"
    assert pipeline.bias_name("", "gemm0") == "gemm0_bias"


def test_stored_operand_maps_axes_through_permutations():
    stored = np.arange(24.0).reshape(2, 3, 4)
    op = StoredOperand("w", ("t1", "t2"), ((2, 0, 1), (1, 0, 2)))
    operand = op.operand(stored)
    assert operand.shape == (2, 4, 3)
    for axis in range(3):
        # scaling the operand along `axis` = scaling the stored tensor along source_axis(axis)
        s = np.array([1.0, 2.0, 3.0, 4.0][: operand.shape[axis]])
        shape = [1, 1, 1]
        shape[axis] = -1
        scaled_operand = operand * s.reshape(shape)
        src = op.source_axis(axis)
        shape = [1, 1, 1]
        shape[src] = -1
        assert np.array_equal(op.operand(stored * s.reshape(shape)), scaled_operand)


# --------------------------------------------------------------------------------------------
# The channel-axis rule for any axis


NHWC_CONV = PairFacts(
    bn="bn",
    bn_axis=3,
    producer="conv",
    producer_kind="conv",
    producer_spatial_dims=2,
    producer_feature_axis=3,
    output_rank=4,
)


def test_channels_last_pair_folds_when_the_axes_agree():
    assert decide(NHWC_CONV).ok
    assert decide(dataclasses.replace(NHWC_CONV, bn_axis=-1)).ok  # from the end
    assert decide(dataclasses.replace(NHWC_CONV, producer_feature_axis=-1)).ok


@pytest.mark.parametrize(
    "changes,words",
    [
        (dict(bn_axis=1), "channels on axis 3 but bn normalises axis 1"),
        (dict(producer_feature_axis=None), "channels on axis 1 but bn normalises axis 3"),
        (dict(channel_axis=1, axis_path="transpose"), "axis 1 after transpose, but bn"),
    ],
)
def test_channels_last_pair_is_refused_when_the_axes_differ(changes, words):
    d = decide(dataclasses.replace(NHWC_CONV, **changes))
    assert (d.ok, d.rule) == (False, rules.CHANNEL_AXIS)
    assert words in d.reason


def test_channel_axis_arriving_through_layout_ops_is_compared_with_the_normalised_axis():
    f = dataclasses.replace(NHWC_CONV, channel_axis=3, axis_path="transpose")
    assert decide(f).ok
    usual = PairFacts(bn="bn", producer="fc", producer_kind="linear", channel_axis=1)
    assert decide(usual).ok


def test_unknown_rank_checks_every_possible_rank_against_the_normalised_axis():
    f = dataclasses.replace(NHWC_CONV, output_rank=None, bn_input_ranks=frozenset({3, 4}))
    d = decide(f)  # a rank-3 output would have its channels on axis 2, not 3
    assert (d.ok, d.rule) == (False, rules.CHANNEL_AXIS)
    assert decide(dataclasses.replace(f, bn_input_ranks=frozenset({4}))).ok
    # the usual layout keeps its usual message
    usual = PairFacts(
        bn="bn", producer="fc", producer_kind="linear", bn_input_ranks=frozenset({2, 3})
    )
    assert "may be 3-D (shape unknown)" in decide(usual).reason
