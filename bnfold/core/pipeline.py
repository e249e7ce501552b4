"""The graph-fold driver, written once for every graph form.

A graph frontend (ATen graphs of torch.export, ONNX, and those to come) is an *adapter*: it
knows its IR — which nodes are BatchNorms and producers, how to read a constant and trace a
weight back to where it is stored, how to rewrite nodes and delete dead ones — and nothing
else. This module drives it:

    for each pass:
        every BatchNorm ──► adapter.examine ──► Pair (typed PairFacts, report names)
                        ──► rules.decide ──► adapter.compute (algebra; FoldRefused = valid-values)
                        ──► FoldEntry
        adapter.apply(every computed fold)     # rewrite, drop what became dead
    until no BatchNorm left unfolded reads the output of one folded in this pass

Chained BatchNorms (``conv -> bn1 -> bn2``) take one pass per link: after the first, ``bn2``
reads the producer and the next pass folds it. The report keeps the BatchNorms in the order of
the first pass, each with its last decision.

The adapter contract (:class:`GraphAdapter`) is what a new graph frontend implements; the
shared records (:class:`BatchNormSite`, :class:`ProducerSite`, :class:`StoredOperand`,
:class:`Pair`) are what it describes its IR with. The eager ``nn.Module`` frontend finds its
data flow its own way and shares :func:`judge`, :func:`entry` and :func:`refused` with this
driver.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Hashable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from ..errors import FoldRefused
from . import rules
from .report import FoldEntry

N = TypeVar("N")  # a node (or value) of the adapter's IR
F = TypeVar("F")  # what the adapter's compute step returns for one fold
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# What an adapter describes its graph with


@dataclass(kw_only=True)
class BatchNormSite(Generic[N]):
    """One BatchNorm of the graph, as the pipeline and the rules see it.

    Operands are the adapter's values (``None`` when absent). ``axis`` is the activation axis
    the BatchNorm normalises (1 for PyTorch and ONNX; a StableHLO ``feature_index``; the last
    axis of a channels-last model). ``not_inference`` says why it normalises with batch
    statistics and ``unsupported`` why it cannot be read as a per-channel affine map ("" when
    it can).
    """

    node: N
    input: Any
    output: Any  # what carries the normalised value (a node or value of the adapter's IR)
    weight: Any  # gamma (ONNX calls it scale)
    bias: Any  # beta
    mean: Any
    var: Any
    eps: Any  # a number, or whatever the IR holds when it is not a constant
    axis: int = 1
    not_inference: str = ""
    unsupported: str = ""


@dataclass(kw_only=True)
class ProducerSite(Generic[N]):
    """A node whose output channels a BatchNorm can be folded into.

    ``weight_axis`` is the axis of the weight *operand* that indexes output channels (a
    ConvTranspose's ``groups`` blocks are described by
    :func:`bnfold.core.algebra.conv_transpose_layout`). ``output_rank`` is the rank of its
    output when known; ``feature_axis`` the axis of its output that holds the channels when the
    op fixes it (``None``: derived from the kind and rank, see
    :func:`bnfold.core.rules.producer_channel_axis`). ``problem`` says why this node cannot
    absorb a BatchNorm after all ("" when it can). Adapters add how to reach the weight and
    bias operands (``weight`` and ``bias``) in their IR.
    """

    node: N
    kind: str  # a rules.ProducerKind
    spatial_dims: int = 0
    weight_axis: int = 0
    groups: int = 1
    output_rank: int | None = None
    feature_axis: int | None = None
    problem: str = ""


@dataclass(frozen=True)
class StoredOperand(Generic[N]):
    """A producer operand traced back to the constant it is read from.

    ``source`` holds the stored tensor; ``path`` are the nodes from it to the operand, in
    order (value-preserving views and transposes); ``perms`` the axis permutations those nodes
    apply, in order (a pass-through node applies none). The fold scales the operand along an
    axis: :meth:`source_axis` says which axis of the stored tensor that is.
    """

    source: N
    path: tuple[N, ...] = ()
    perms: tuple[tuple[int, ...], ...] = ()

    def source_axis(self, operand_axis: int) -> int:
        """The axis of the stored tensor that becomes ``operand_axis`` of the operand."""
        axis = operand_axis
        for perm in reversed(self.perms):
            axis = perm[axis]
        return axis

    def operand(self, stored: np.ndarray) -> np.ndarray:
        """The operand the layer sees, computed from the stored array."""
        for perm in self.perms:
            stored = np.transpose(stored, perm)
        return stored


@dataclass(kw_only=True)
class Pair(Generic[N]):
    """One BatchNorm, the producer feeding it (if any), the facts the rules decide on, and the
    names the report gives them. Adapters subclass it to keep what their rewrite needs."""

    bn: BatchNormSite[N]
    facts: rules.PairFacts
    name: str
    bn_type: str
    producer: ProducerSite[N] | None = None
    target: str | None = None
    target_type: str = ""
    # "affine" for a chain of plain arithmetic, which is reported only when there is a layer
    # to fold it into, folding gains something (``quiet`` otherwise: no entry, no fold) and
    # the values on its way feed it alone (:func:`run` drops a single-consumer refusal)
    kind: str = "batchnorm"
    quiet: bool = False


# --------------------------------------------------------------------------------------------
# The adapter contract


class GraphAdapter(Protocol[N, F]):
    """What a graph frontend provides to :func:`run`.

    - :meth:`batch_norms`: every BatchNorm of the graph in graph order, read afresh (it is
      called once per pass, after the previous pass's rewrite);
    - :meth:`examine`: the :class:`Pair` for one of them — the producer behind it (through the
      layout ops the adapter can follow) and every fact :func:`bnfold.core.rules.decide` needs,
      as a typed :class:`~bnfold.core.rules.PairFacts`. Reads only;
    - :meth:`compute`: the folded values of an allowed pair (with
      :mod:`bnfold.core.algebra`); raises :class:`~bnfold.errors.FoldRefused` for numbers the
      fold cannot take. Reads only;
    - :meth:`apply`: rewrite the graph for every computed fold of a pass, then drop what
      became dead (:func:`drop_dead`);
    - :meth:`upstream`: what lies between a BatchNorm and where its input was traced back to
      (values in the same terms as :attr:`BatchNormSite.output`), for telling chained
      BatchNorms;
    - :meth:`extra_entries`: report entries of BatchNorms the adapter never folds (inside
      subgraphs or functions), each with its rule.
    """

    def batch_norms(self) -> list[BatchNormSite[N]]: ...

    def examine(self, bn: BatchNormSite[N]) -> Pair[N]: ...

    def compute(self, pair: Pair[N]) -> F: ...

    def apply(self, folds: list[tuple[Pair[N], F]]) -> None: ...

    def upstream(self, bn: BatchNormSite[N]) -> Iterable[Any]: ...

    def extra_entries(self) -> list[FoldEntry]: ...


# --------------------------------------------------------------------------------------------
# Deciding one pair (shared with the eager frontend)


def refused(e: FoldRefused) -> rules.Decision:
    """The decision for a fold whose numbers the algebra refused."""
    return rules.Decision(False, rules.VALID_VALUES, e.reason)


def judge(
    facts: rules.PairFacts, selected: set[str] | None, compute: Callable[[], F]
) -> tuple[rules.Decision, F | None]:
    """Decide a pair and, when allowed, compute its fold; a refusal of the numbers becomes a
    ``valid-values`` skip."""
    decision = rules.decide(facts, selected)
    if not decision.ok:
        return decision, None
    try:
        return decision, compute()
    except FoldRefused as e:
        return refused(e), None


def entry(
    bn: str,
    bn_type: str,
    target: str | None,
    target_type: str,
    decision: rules.Decision,
    kind: str = "batchnorm",
) -> FoldEntry:
    """The report entry for a decided BatchNorm (or affine chain)."""
    return FoldEntry(
        bn=bn,
        target=target,
        action="folded" if decision.ok else "skipped",
        reason=decision.reason,
        rule=decision.rule,
        bn_type=bn_type,
        target_type=target_type,
        kind=kind,  # type: ignore[arg-type]
    )


def skipped(e: FoldEntry, decision: rules.Decision) -> FoldEntry:
    """``e`` turned into a skip for ``decision`` (a fold refused after it was planned)."""
    return replace(e, action="skipped", reason=decision.reason, rule=decision.rule)


# --------------------------------------------------------------------------------------------
# The driver


@dataclass
class Outcome:
    """What :func:`run` found: one entry per BatchNorm (first-pass order), and whether they are
    final. Without rewriting, a chain of BatchNorms needs a rewrite to be decided past its first
    link; ``complete`` is then ``False`` and the caller folds a scratch copy to know."""

    entries: list[FoldEntry] = field(default_factory=list)
    complete: bool = True


def run(adapter: GraphAdapter[N, F], selected: set[str], *, rewrite: bool = True) -> Outcome:
    """Decide every BatchNorm of the adapter's graph and, with ``rewrite``, fold it there."""
    entries: dict[Hashable, FoldEntry] = {}
    while True:
        folds: list[tuple[Pair[N], F]] = []
        kept: list[BatchNormSite[N]] = []
        for bn in adapter.batch_norms():
            pair = adapter.examine(bn)
            if pair.quiet:
                # an affine chain with nothing to fold into (yet: a later pass may give it one)
                entries.pop(_key(bn), None)
                kept.append(bn)
                continue
            decision, fold = judge(
                pair.facts,
                selected,
                partial(adapter.compute, pair),
            )
            if pair.kind == "affine" and decision.rule == rules.SINGLE_CONSUMER:
                # arithmetic on a value that other nodes read too (a swish's x * 1.0 next to
                # its x * sigmoid(x)) is the model's own computation, not a folded BatchNorm
                entries.pop(_key(bn), None)
                kept.append(bn)
                continue
            entries[_key(bn)] = entry(
                pair.name, pair.bn_type, pair.target, pair.target_type, decision, pair.kind
            )
            note = getattr(fold, "note", "")  # how the fold was done, when the adapter says
            if note:
                entries[_key(bn)] = replace(entries[_key(bn)], note=note)
            if fold is not None:
                folds.append((pair, fold))
            else:
                kept.append(bn)
        outputs = {_key_of(p.bn.output) for p, _ in folds}
        chained = bool(outputs) and any(
            _key_of(v) in outputs for bn in kept for v in adapter.upstream(bn)
        )
        if not rewrite:
            return Outcome(list(entries.values()) + adapter.extra_entries(), not chained)
        adapter.apply(folds)
        if not chained:
            return Outcome(list(entries.values()) + adapter.extra_entries())


def _key(bn: BatchNormSite[Any]) -> Hashable:
    return _key_of(bn.node)


def _key_of(value: Any) -> Hashable:
    # IR nodes hash by identity in torch.fx and onnx_ir; anything else is keyed by id
    try:
        hash(value)
    except TypeError:
        return id(value)
    return value


# --------------------------------------------------------------------------------------------
# Rewriting helpers


def drop_dead(start: Iterable[T], drop: Callable[[T], Iterable[T] | None]) -> None:
    """Remove what a rewrite left unused, and upstream what that leaves unused in turn.

    ``drop(x)`` removes ``x`` if nothing uses it any more and returns what ``x`` read (to look
    at next), or returns ``None`` when ``x`` stays.
    """
    work = list(dict.fromkeys(start))
    while work:
        upstream = drop(work.pop())
        if upstream:
            work.extend(upstream)


def unique_name(hint: str, taken: Container[str]) -> str:
    """``hint``, or ``hint_2``, ``hint_3``, ...: the first not in ``taken`` (looked up, never
    copied: a fold adds one name per BatchNorm, so copying would make it quadratic)."""
    if hint not in taken:
        return hint
    k = 2
    while f"{hint}_{k}" in taken:
        k += 1
    return f"{hint}_{k}"


def bias_name(weight_name: str, fallback: str = "") -> str:
    """The name for a new bias next to a weight named ``weight_name`` (``conv.weight`` ->
    ``conv.bias``), or next to ``fallback`` when the weight has no name."""
    base = weight_name or fallback
    prefix, dot, attr = base.rpartition(".")
    if "weight" in attr:
        head, _, tail = attr.rpartition("weight")
        return f"{prefix}{dot}{head}bias{tail}"
    return f"{base}_bias"
