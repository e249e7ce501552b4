"""The ATen graph adapter: what :mod:`bnfold.core.pipeline` needs to fold BatchNorm in an ATen
graph (torch.export programs, ``ep.module()`` graph modules; torch.compile and pt2e graphs next).

Ops are read through :mod:`bnfold.torch.aten.ops`; constant tensors through a
:class:`~bnfold.torch.aten.store.Store`, one per container, so this adapter never asks where a
tensor lives. The pipeline decides and orders the folds; this module finds the pairs and their
facts, computes the new values with :mod:`bnfold.core.algebra`, and rewrites the graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node

from ...core import pipeline, rules
from ...core.affine import Step, compose
from ...core.algebra import (
    OutputLayout,
    affine_factors,
    fold_affine_into_producer,
    require_headroom,
)
from ...core.pipeline import BatchNormSite, Pair
from ...core.report import FoldEntry
from ...core.rules import PairFacts
from ...errors import FoldRefused, UnsupportedModelError
from .evaluate import Constants, is_pure
from .ops import (
    ArithCall,
    BatchNormCall,
    ProducerCall,
    activation_steps,
    arguments,
    arith_call,
    batch_norm_call,
    describe,
    follow_channel_axis,
    is_activation_layout,
    is_pass_through,
    layout,
    may_be_written,
    module_path,
    op_label,
    operand_source,
    other_uses,
    producer_call,
    quant_call,
    set_argument,
    shape_value,
    trace_back,
)
from .qat import QatChain, QatFold
from .qat import compute as qat_compute
from .qat import match as qat_match
from .qat import rewrite as qat_rewrite
from .store import Store

_RANK_HINT = "export the model again so that its nodes carry shapes (node.meta['val'])"

# What a fold may materialise for a weight stored smaller than it is (an expanded tensor,
# strides 0: torch.export.save writes its few distinct values only). Folding makes it dense,
# so a 12 KB file could ask for gigabytes. Such folds together may create at most
# max(MATERIALISE_FLOOR_BYTES, MATERIALISE_FACTOR * bytes the program stores) of new tensors,
# counted by logical size (numel * itemsize); beyond that they are refused (valid-values).
MATERIALISE_FLOOR_BYTES = 64 << 20
MATERIALISE_FACTOR = 4


@dataclass(kw_only=True)
class AffineSite(BatchNormSite[Node]):
    """A chain of arithmetic links as a site: ``node`` (and ``output``) is its last link,
    ``input`` where its walk back stopped. It has no BatchNorm operands."""


def _affine_site(node: Node, source: Any) -> AffineSite:
    return AffineSite(
        node=node, input=source, output=node, weight=None, bias=None, mean=None, var=None, eps=None
    )


@dataclass(frozen=True)
class _Link:
    """An arithmetic node read as a link of a per-channel affine chain: it computes from the
    chain value ``input`` and ``operand`` (a node, a number, or ``None`` for ``neg``), which
    varies along the axes ``varying`` of its output only (none: one value for all)."""

    call: ArithCall
    input: Node
    operand: Any
    chain_first: bool
    varying: tuple[int, ...]

    @property
    def node(self) -> Node:
        return self.call.node

    def steps(self, value: Any) -> list[Step]:
        """The link as :class:`~bnfold.core.affine.Step`s; ``value`` the operand's numbers
        (float64: one, or one per channel)."""
        op, alpha, where = self.call.op, self.call.alpha, describe(self.node)
        if op == "neg":
            return [Step("neg", where=where)]
        if op in ("mul", "div"):
            return [Step(op, value, where=where)]
        # add, sub, rsub: chain*p + operand*q, alpha scaling one of the two (see ArithCall)
        sign = -1 if op in ("sub", "rsub") else 1
        alpha_on_chain = (op == "rsub") == self.chain_first
        p, q = (sign * alpha, 1) if alpha_on_chain else (1, sign * alpha)
        scale = [Step("mul", float(p), where=where)] if p != 1 else []
        return scale + [Step("add", np.multiply(value, q), where=where)]


@dataclass(kw_only=True)
class _Pair(Pair[Node]):
    """A pair and where its tensors are: the constant chains of the producer's weight and bias
    (``[constant, view ops..., operand]``), the weight's output-channel axis at the constant,
    the constants the BatchNorm reads, and the arithmetic links between the producer and the
    BatchNorm (or the affine site's own links), in graph order."""

    bn: BatchNormCall | AffineSite
    producer: ProducerCall | None = None
    weight_chain: list[Node] | None = None
    bias_chain: list[Node] | None = None
    weight_axis: int = 0
    weight_first_axis: int = 0  # the constant's axis that is the operand's axis 0
    bn_sources: dict[str, Node] = field(default_factory=dict)
    links: list[_Link] = field(default_factory=list)
    channel_axis: int | None = None  # where the producer's channels are at the end of the walk
    value_problem: str = ""  # why the links' numbers cannot fold (a valid-values refusal)

    def weight_layout(self) -> OutputLayout:
        """How output channels lie in the stored weight (refuses layouts bnfold cannot scale)."""
        assert self.producer is not None
        return layout(self.producer, self.weight_axis, self.weight_first_axis)


@dataclass(kw_only=True)
class _QatPair(_Pair):
    """A BatchNorm at the end of a pt2e QAT chain (see :mod:`bnfold.torch.aten.qat`)."""

    chain: QatChain


@dataclass
class _Fold:
    weight: torch.Tensor
    bias: torch.Tensor | None  # None: the layer keeps having no bias (an affine chain, no shift)


class _Scope(NamedTuple):
    """What examining a site reads besides the site: the store, the producers at the start of
    this pass's walks and their report names, the preserved modules, the arithmetic links."""

    store: Store
    prod_calls: dict[Node, ProducerCall | None]
    prod_names: dict[Node, tuple[str, str]]
    boundaries: list[str]
    links: Mapping[Node, _Link]


class AtenAdapter:
    """One ATen graph (owned by ``root``, whose submodules hold subgraphs) and its store, as a
    :class:`bnfold.core.pipeline.GraphAdapter`. ``boundaries`` are modules whose call signature
    the program preserves; ``replaced`` says, after a rewrite, which node took the place of each
    folded BatchNorm's output. ``qat`` says where the tail of a pt2e QAT chain goes
    (:data:`bnfold.core.rules.QAT_MODES`). ``affine``: also fold chains of per-channel
    arithmetic by constants after a layer (affine sites), and let a BatchNorm's walk back pass
    such arithmetic between it and its layer."""

    def __init__(
        self,
        root: nn.Module,
        store: Store,
        boundaries: list[str],
        qat: str = "exact",
        affine: bool = True,
    ) -> None:
        self.qat = rules.qat_mode(qat)
        self.affine = affine
        self.root = root
        self.graph = store.graph
        self.store = store
        self.boundaries = boundaries
        self.replaced: dict[Node, Node] = {}
        self._bn_names: dict[Node, tuple[str, str]] = {}
        self._prod_calls: dict[Node, ProducerCall | None] = {}
        self._prod_names: dict[Node, tuple[str, str]] = {}
        self._links: dict[Node, _Link] = {}
        self._walks: dict[Node, tuple[Any, list[Node]]] = {}  # site node -> (source, steps)
        require_values(store)

    # -- the pipeline's questions ------------------------------------------------------------

    def batch_norms(self) -> list[BatchNormCall | AffineSite]:
        """Every BatchNorm node and affine site, in graph order; report names stay those of
        the first pass."""
        bns = [c for c in (batch_norm_call(n) for n in self.graph.nodes) if c is not None]
        missing = [c.node for c in bns if c.node not in self._bn_names]
        self._bn_names.update(_names(missing, "BatchNorm", self._stored_module))
        self._links = _find_links(self.store) if self.affine else {}
        self._walks = {c.node: activation_steps(c.input, c.node, self._links) for c in bns}
        sites = self._affine_sites()
        sources = (source for source, _ in self._walks.values())
        producer_nodes = {n for n in sources if isinstance(n, Node)}
        self._prod_calls = {n: producer_call(n) for n in producer_nodes}
        self._prod_names = _names(
            [n for n in self.graph.nodes if self._prod_calls.get(n) is not None], ""
        )
        if not sites:
            return bns
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return sorted([*bns, *sites], key=lambda site: order[site.node])

    def _affine_sites(self) -> list[AffineSite]:
        """A site for every link that ends a chain (see :meth:`_continued`), with its walk."""
        sites = []
        for node, link in self._links.items():
            if self._continued(node):
                continue
            source, steps = activation_steps(link.input, node, self._links)
            self._walks[node] = (source, [*steps, node])
            sites.append(_affine_site(node, source))
        return sites

    def _continued(self, node: Node) -> bool:
        """Whether a link's value flows, through layout ops and read by nothing else, into
        another link or into an inference BatchNorm: their walk back takes this link in."""
        value = node
        while len(value.users) == 1:
            (user,) = value.users
            if other_uses(value, user):
                return False
            if user in self._links:
                return self._links[user].input is value
            bn = batch_norm_call(user)
            if bn is not None:
                return bn.input is value and bn.training is False
            if not is_activation_layout(user) or operand_source(user) is not value:
                return False
            value = user
        return False

    def _scope(self) -> _Scope:
        return _Scope(self.store, self._prod_calls, self._prod_names, self.boundaries, self._links)

    def _stored_module(self, node: Node) -> str | None:
        """The module path a BatchNorm's stored tensors share (``bn`` for ``bn.running_mean``):
        its name when the node has no module stack (torchao's QAT rewrites drop it)."""
        c = batch_norm_call(node)
        keys = []
        for v in (c.mean, c.var, c.weight, c.bias) if c is not None else ():
            found = trace_back(v)
            if found is not None and self.store.tensor(found.source) is not None:
                keys.append(self.store.key(found.source).rpartition(".")[0])
        return keys[0] if keys and keys[0] and all(k == keys[0] for k in keys) else None

    def examine(self, bn: BatchNormCall | AffineSite) -> _Pair:
        if isinstance(bn, AffineSite):
            return self._examine_affine(bn)
        name, bn_type = self._bn_names[bn.node]
        pair = _examine(self._scope(), bn, name, bn_type, self._walks[bn.node])
        if pair.producer is not None:
            return pair
        chain, why = qat_match(bn, self.store)
        if chain is None:
            if why:
                detail = f"{pair.facts.producer_detail} (a quantized chain: {why})"
                pair.facts = replace(pair.facts, producer_detail=detail)
            return pair
        return _examine_qat(self.store, pair, chain, self.boundaries)

    def _examine_affine(self, site: AffineSite) -> _Pair:
        """The pair of an affine site, named by its links; quiet when there is no layer
        behind it, the layer is quantized (pt2e graphs are left as they are), or folding
        would gain nothing."""
        walk = self._walks[site.node]
        nodes = [n for n in walk[1] if n in self._links]
        name = " -> ".join(map(_link_name, nodes))
        bn_type = " -> ".join(self._links[n].call.op for n in nodes)
        facts = PairFacts(bn=name, chain=True, can_unshare=True, rank_hint=_RANK_HINT)
        pair = _Pair(bn=site, facts=facts, name=name, bn_type=bn_type, kind="affine")
        pair = _with_producer(self._scope(), pair, walk, None, [])
        p = pair.producer
        if p is None or _quantized(p) or _gains_nothing(pair):
            pair.quiet = True
        elif not pair.facts.axis_problem:
            # the chain "normalises" the axis the channels are on where it ends
            axis = pair.channel_axis
            pair.facts = replace(pair.facts, bn_axis=axis, channel_axis=axis, axis_path="")
        return pair

    def compute(self, pair: _Pair) -> _Fold | QatFold:
        if isinstance(pair, _QatPair):
            return qat_compute(self.store, pair.chain, pair.bn, self.qat)
        return _compute(self.store, pair)

    def apply(self, folds: list[tuple[_Pair, _Fold | QatFold]]) -> None:
        touched: list[Node] = []
        standard = [(p, f) for p, f in folds if not isinstance(p, _QatPair)]
        self.replaced.update(_apply(self.store, standard, touched))
        for pair, fold in folds:
            if isinstance(pair, _QatPair):
                assert isinstance(fold, QatFold)
                result, more = qat_rewrite(self.store, pair.chain, pair.bn, fold)
                self.replaced[pair.bn.output] = result
                touched += more
        _drop_unused(self.store, touched)
        self.store.changed()

    def upstream(self, bn: BatchNormCall | AffineSite) -> list[Any]:
        source, steps = self._walks[bn.node]
        return [source, *steps]

    def extra_entries(self) -> list[FoldEntry]:
        return _nested_entries(self.root, self.graph)


def _names(
    nodes: list[Node], fallback_type: str, stored: Any = None
) -> dict[Node, tuple[str, str]]:
    """Report names for nodes: module paths (``@k`` for repeated calls), else the module their
    stored tensors share (``stored(node)``), else node names."""
    out: dict[Node, tuple[str, str]] = {}
    seen: dict[str, int] = {}
    for node in nodes:
        where = module_path(node)
        if where is None and stored is not None:
            path = stored(node)
            where = (path, "") if path else None
        name, klass = where if where is not None else (node.name, fallback_type)
        if name in seen:  # two ops of one module call: tell them apart by node name
            name = f"{name} ({node.name})"
        seen[name] = 1
        out[node] = (name, klass or fallback_type)
    return out


def _link_name(node: Node) -> str:
    """A link's report name: its node name, after the path of the module whose forward (or
    hook) computes it (the module's own name is its BatchNorm's or layer's)."""
    where = module_path(node)
    return node.name if where is None else f"{where[0]} ({node.name})"


class _Operand(NamedTuple):
    """A producer operand traced back to a constant: the chain ``[constant, views...,
    operand]`` (``None`` when it is not constant, ``what`` then says what it is), and the
    constant's axes that become the operand's axis ``axis`` and axis 0."""

    chain: list[Node] | None
    axis: int
    first_axis: int = 0
    what: str = ""


def _operand_chain(store: Store, value: Any, axis: int) -> _Operand:
    """Where a producer operand's values are stored (see :class:`_Operand`)."""
    found = trace_back(value)
    if found is None:
        return _Operand(None, axis, what="not a tensor")
    chain = [found.source, *found.path]
    if store.tensor(chain[0]) is None:
        return _Operand(None, axis, what=describe(chain[0]))
    if store.mutated(chain[0]):
        what = f"{describe(chain[0])}, which the program changes while it runs"
        return _Operand(None, axis, what=what)
    written = _written_copy(chain)
    if written:
        return _Operand(None, axis, what=written)
    return _Operand(chain, found.source_axis(axis), found.source_axis(0))


def _written_copy(chain: list[Node]) -> str:
    """Why a copy in the chain is not constant ("" if none is written): ``w = p.clone();
    w[2:4] = 0`` writes the copy, not ``p``, and a fold rebuilding the chain on a folded
    ``p`` would lose that write."""
    for n in chain[1:]:
        if may_be_written(n):
            return f"{describe(n)}, computed from {describe(chain[0])} and written in place"
    return ""


def _constant_source(store: Store, value: Any) -> tuple[Node | None, str]:
    """The constant node a BatchNorm operand reads through pass-through ops (a statistic made
    by ``torch.tensor`` in forward arrives through ``lift_fresh_copy``), or why it is not."""
    chain, _, _, what = _operand_chain(store, value, 0)
    return (chain[0], "") if chain is not None else (None, what)


def _describe_use(user: Node) -> str:
    return "the graph output" if user.op == "output" else describe(user)


def _other_users(node: Node, but: Node) -> list[str]:
    """Uses of ``node`` besides one by ``but``: every argument position counts."""
    return [_describe_use(u) for u in other_uses(node, but)]


def _shared_uses(store: Store, chain: list[Node] | None, producer: Node) -> str:
    """Who else uses the tensors of a producer's weight or bias chain ("" if nobody): other
    nodes, the producer's other operands (``mm(w, w)``), and modules holding the tensor."""
    if chain is None:
        return ""
    others: list[str] = []
    for i, n in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else producer
        others += _other_users(n, nxt)
    for other in store.aliases(chain[0]):
        if other is not chain[0]:
            others += [describe(u) for u in other.users]
    others += store.readers(chain[0])
    return ", ".join(others)


def require_values(store: Store) -> None:
    """Refuse a graph whose constants have no values (meta tensors) before deciding anything."""
    for node in store.constant_nodes():
        value = store.tensor(node)
        if value is not None and value.is_meta:
            raise UnsupportedModelError(
                f"{store.key(node)} is on the meta device, so it has no values to fold; load "
                "the weights (e.g. load_state_dict(..., assign=True)) before exporting"
            )


def _inside(node: Node, fqn: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == fqn for path, _ in stack.values())


def _boundary(boundaries: list[str], producer: Node, bn: Node) -> str:
    """A preserved module that has one of the two nodes inside and not the other ("")."""
    return next((f"module {f}" for f in boundaries if _inside(producer, f) != _inside(bn, f)), "")


def _examine(
    scope: _Scope, c: BatchNormCall, name: str, bn_type: str, walk: tuple[Any, list[Node]]
) -> _Pair:
    """The pair of a BatchNorm: its own facts, then the producer's (:func:`_with_producer`)."""
    bn_sources: dict[str, Node] = {}
    not_constant: list[str] = []
    for role, v in (("weight", c.weight), ("bias", c.bias), ("mean", c.mean), ("var", c.var)):
        if v is None and role in ("weight", "bias"):
            continue
        source, what = _constant_source(scope.store, v)
        if source is None:
            not_constant.append(f"its {role} is {what}")
        else:
            bn_sources[role] = source
    not_inference = ""
    if c.training is not False:
        not_inference = (
            f"{name} ({op_label(c.node)}) normalises with batch statistics "
            f"(training={c.training}): it was captured in training mode or without running "
            "statistics; call model.eval() before exporting or compiling"
        )
    custom = ""
    if c.other_outputs_used:
        custom = (
            f"its saved-statistics outputs are used ({c.other_outputs_used}); only the "
            "normalised output can be folded"
        )
    elif c.output is None:
        custom = "its normalised output is never read"
    elif not isinstance(c.eps, (int, float)):
        custom = f"its eps is not a constant ({c.eps})"
    facts = PairFacts(
        bn=name,
        bn_axis=c.axis,
        bn_uses_running_stats=not not_inference,
        bn_not_inference_reason=not_inference,
        bn_custom_forward=custom,
        bn_params_constant=not not_constant,
        can_unshare=True,
        rank_hint=_RANK_HINT,
    )
    pair = _Pair(bn=c, facts=facts, name=name, bn_type=bn_type, bn_sources=bn_sources)
    return _with_producer(scope, pair, walk, c.node, not_constant)


def _with_producer(
    scope: _Scope,
    pair: _Pair,
    walk: tuple[Any, list[Node]],
    end: Node | None,
    not_constant: list[str],
) -> _Pair:
    """Fill in the producer at the start of ``walk`` (the value it stops at, and the layout
    ops and links after it) and its facts; the links' facts too. ``end`` reads the last step
    (the BatchNorm; ``None`` for an affine site, whose last step is its own last link);
    ``not_constant`` says which of the site's own operands are not constant."""
    source, steps = walk
    p = scope.prod_calls.get(source) if isinstance(source, Node) else None
    axis = _axis_facts(p, steps, scope.links) if p is not None else None
    if p is None or axis is None:
        detail = describe(pair.bn.input) if isinstance(pair.bn.input, Node) else "a constant"
        pair.facts = replace(pair.facts, producer_detail=detail)
        return pair
    store = scope.store
    target, target_type = scope.prod_names[p.node]
    target_type = target_type or op_label(p.node)
    links = [scope.links[n] for n in steps if n in scope.links]
    if links and isinstance(pair.bn, BatchNormCall):
        target_type = "+".join([target_type, *(link.call.op for link in links)])
    w_chain, w_axis, w_first_axis, w_what = _operand_chain(store, p.weight, p.weight_axis)
    b_chain: list[Node] | None = None
    b_what = ""
    if p.bias is not None:
        b_chain, _, _, b_what = _operand_chain(store, p.bias, 0)
    # every value from the producer on is read by the next step only (the last step's value
    # is the site's output, free to have any readers, unless a BatchNorm reads it)
    readers = [*steps, end] if end is not None else steps
    values = [p.node, *steps][: len(readers)]
    others = [u for n, r in zip(values, readers, strict=True) for u in _other_users(n, r)]
    issues = _link_issues(store, links, steps, axis.at, target)
    not_constant = not_constant + issues.not_constant
    if not_constant:
        detail = "; ".join(not_constant)
    elif w_what or b_what:
        detail = f"its {'weight' if w_what else 'bias'} is {w_what or b_what}"
    else:
        detail = ""
    pair.facts = replace(
        pair.facts,
        bn_params_constant=pair.facts.bn_params_constant and not issues.not_constant,
        constant_detail=detail,
        channel_axis=axis.channel_axis,
        axis_path=axis.axis_path,
        axis_problem=axis.axis_problem or issues.axis,
        producer=target,
        producer_kind=p.kind,
        producer_spatial_dims=p.spatial_dims,
        producer_custom_forward=p.problem,
        producer_output_users=1 + len(others),
        producer_other_users=", ".join(others),
        producer_params_constant=not w_what and not b_what,
        producer_params_shared=_shared_uses(store, w_chain, p.node)
        or _shared_uses(store, b_chain, p.node),
        output_rank=p.output_rank,
        # every node the fold removes (links, the BatchNorm) must be on the producer's side
        # of each preserved module: one removed inside it would empty the module's call
        boundary=next(
            (
                found
                for n in [*(link.node for link in links), pair.bn.node]
                if (found := _boundary(scope.boundaries, p.node, n))
            ),
            "",
        ),
    )
    pair.producer = p
    pair.target, pair.target_type = target, target_type
    pair.weight_chain, pair.bias_chain = w_chain, b_chain
    pair.weight_axis, pair.weight_first_axis = w_axis, w_first_axis
    pair.links, pair.channel_axis, pair.value_problem = links, axis.end, issues.value
    return pair


def _examine_qat(store: Store, pair: _Pair, chain: QatChain, boundaries: list[str]) -> _QatPair:
    """The facts of a BatchNorm at the end of a QAT chain: the producer is the conv before
    the quantize; a training flag left by ``convert_pt2e`` is read as inference (the chain
    exists only in converted, that is inference, graphs), and the statistics the BatchNorm
    itself updates count as constant, since the fold removes it."""
    c = pair.bn
    p = chain.producer
    ev = Constants(store, float64=True, ignore=c.node)
    not_constant = [
        f"its {role} is not constant ({ev.why(v)})"
        for role, v in (("weight", c.weight), ("bias", c.bias), ("mean", c.mean), ("var", c.var))
        if v is not None and ev.value(v) is None
    ]
    tail = [
        f"the constant of {describe(link.node)} is not ({ev.why(link.constant)})"
        for link in chain.links
        if ev.value(link.constant) is None
    ]
    if not_constant and c.training is True:
        not_constant.append(
            "its batch_norm runs in training mode and the program updates these statistics: "
            "call torchao's move_exported_model_to_eval on the converted model before exporting it"
        )
    name = pair.name
    not_inference = ""
    if not isinstance(c.training, bool):
        not_inference = f"{name}'s training flag is not a constant ({c.training})"
    target, target_type = module_path(p.node) or (p.node.name, "")
    facts = replace(
        pair.facts,
        bn_uses_running_stats=not not_inference,
        bn_not_inference_reason=not_inference,
        bn_params_constant=not not_constant and not tail,
        constant_detail="; ".join(not_constant + tail),
        producer=target,
        producer_detail="",
        producer_kind=p.kind,
        producer_spatial_dims=p.spatial_dims,
        producer_custom_forward=p.problem,
        producer_output_users=1 + len(chain.other_users),
        producer_other_users=", ".join(chain.other_users),
        producer_params_constant=True,  # the fold writes no producer tensor
        channel_axis=chain.axis,
        axis_path=" -> ".join(op_label(n) for n in chain.nodes()[1:]),
        axis_problem=chain.problem,
        output_rank=chain.rank,
        boundary=_boundary(boundaries, p.node, c.node),
    )
    return _QatPair(
        bn=c,
        facts=facts,
        name=name,
        bn_type=pair.bn_type,
        producer=None,
        target=target,
        target_type=target_type or op_label(p.node),
        chain=chain,
    )


class _Axis(NamedTuple):
    """Where the producer's channels arrive at the BatchNorm (see ``PairFacts.channel_axis``),
    where they are on each step's output (``at``) and at the end of the steps (``end``)."""

    channel_axis: int | None = None
    axis_path: str = ""
    axis_problem: str = ""
    at: tuple[int, ...] = ()
    end: int | None = None


def _axis_facts(p: ProducerCall, steps: list[Node], links: Mapping[Node, _Link]) -> _Axis | None:
    """Where the producer's channels arrive at the BatchNorm through layout ops between them
    (a Linear on ``(B, L, C)``, ``transpose(1, 2)``, BatchNorm1d); nothing without such ops
    (the rules then read the producer's output rank; links keep every axis). ``None`` when a
    reshape mixes the channels with other axes: the BatchNorm's input is then no producer's
    output."""
    rank = p.output_rank
    start = None
    if rank is not None:
        start = rules.producer_channel_axis(p.kind, rank, p.spatial_dims, p.feature_axis)  # type: ignore[arg-type]
    if not steps:
        return _Axis(end=start)
    if rank is None or start is None:
        return _Axis(
            axis_problem=f"the rank of {describe(p.node)}'s output is unknown; {_RANK_HINT}"
        )
    track = follow_channel_axis(steps, start, rank, links)
    via = " -> ".join(op_label(n) for n in steps)
    if track.reshaped:
        return None
    if track.axis is None:
        why = f"bnfold cannot follow the channels through {via}: {track.problem}"
        return _Axis(axis_problem=why, at=track.at)
    if all(n in links for n in steps):
        return _Axis(at=track.at, end=track.axis)
    return _Axis(track.axis, via, at=track.at, end=track.axis)


# --------------------------------------------------------------------------------------------
# Arithmetic links


def _origins(store: Store) -> dict[Node, str]:
    """What each node's value depends on: ``"constant"`` (stored tensors only, through pure
    ops), ``"input"`` (graph inputs too) or ``"computed"`` (anything else: activations)."""
    found: dict[Node, str] = {}
    for node in store.graph.nodes:
        if store.tensor(node) is not None:
            kind = "constant"
        elif node.op == "placeholder":
            kind = "input"
        elif is_pure(node):
            kinds = {found.get(n, "computed") for n in node.all_input_nodes}
            kind = next((k for k in ("computed", "input") if k in kinds), "constant")
        else:
            kind = "computed"
        found[node] = kind
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _find_links(store: Store) -> dict[Node, _Link]:
    """Every arithmetic node of the graph that reads as a link (:func:`_read_link`)."""
    origins = _origins(store)
    found: dict[Node, _Link] = {}
    for node in store.graph.nodes:
        call = arith_call(node)
        link = _read_link(call, origins) if call is not None else None
        if link is not None:
            found[node] = link
    return found


def _read_link(call: ArithCall, origins: Mapping[Node, str]) -> _Link | None:
    """``call`` as a link: one operand is the chain (an activation), the other a number or a
    tensor computed from constants or graph inputs, never from activations (whether it is
    constant is a fact for the rules); ``a / y`` is not affine."""

    def origin(value: Any) -> str:
        if isinstance(value, Node):
            return origins.get(value, "computed")
        return "number" if _is_number(value) else "other"

    if not _is_number(call.alpha):
        return None
    sides = [(call.first, call.second, True)]
    if call.op != "neg":
        sides.append((call.second, call.first, False))
    for chain, operand, first in sides:
        if origin(chain) != "computed":
            continue
        if call.op != "neg" and origin(operand) in ("computed", "other"):
            return None  # two activations (a residual add, a gate): not a per-channel map
        if not first and call.op == "div":
            return None
        return _shaped_link(call, chain, operand, first)
    return None


def _is_one(size: Any) -> bool:
    return isinstance(size, int) and size == 1


def _shaped_link(call: ArithCall, chain: Node, operand: Any, first: bool) -> _Link | None:
    """The link, when the shapes are known, the chain is floating point and the operand
    varies along one axis of the result at most (a bias or scale, not a mask or embedding)."""
    value, out = shape_value(chain), shape_value(call.node)
    if not isinstance(value, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    if not value.is_floating_point():
        return None  # integer graphs are left as they are
    shape: tuple[Any, ...] = ()
    if isinstance(operand, Node):
        given = shape_value(operand)
        if not isinstance(given, torch.Tensor):
            return None
        shape = tuple(given.shape)
    offset = out.dim() - len(shape)
    varying = tuple(offset + i for i, size in enumerate(shape) if not _is_one(size))
    if len(varying) > 1:
        return None
    return _Link(call, chain, operand, first, varying)


class _LinkIssues(NamedTuple):
    """Why links cannot fold: operands that are not constant, an axis problem (the
    channel-axis rule), a value problem (a valid-values refusal)."""

    not_constant: list[str]
    axis: str
    value: str


def _link_issues(
    store: Store, links: list[_Link], steps: list[Node], at: tuple[int, ...], target: str
) -> _LinkIssues:
    """The issues of the links among ``steps``; ``at[i]`` is the channel axis on step ``i``'s
    output (links keep it where it is), as far as it was followed."""
    ev = Constants(store, float64=True)
    not_constant: list[str] = []
    axis = value = ""
    where = {n: i for i, n in enumerate(steps)}
    for link in links:
        i = where[link.node]
        if isinstance(link.operand, Node) and ev.value(link.operand) is None:
            why = ev.why(link.operand)
            not_constant.append(f"the operand of {describe(link.node)} is not constant ({why})")
        channels = at[i] if i < len(at) else None
        axis = axis or _link_axis_problem(link, channels, target)
        value = value or _link_value_problem(link, target)
    return _LinkIssues(not_constant, axis, value)


def _dims(t: torch.Tensor) -> list[str]:
    return [str(d) for d in t.shape]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _link_axis_problem(link: _Link, channels: int | None, target: str) -> str:
    """Why ``link`` is not a per-channel map of ``target``'s output whose channels are on axis
    ``channels`` there ("" when it is): it broadcasts the activation to a bigger shape, or its
    operand varies along another axis."""
    before, after = shape_value(link.input), shape_value(link.node)
    if _dims(before) != _dims(after):
        return (
            f"{describe(link.node)} broadcasts the output of {target} from shape "
            f"[{', '.join(_dims(before))}] to [{', '.join(_dims(after))}]: the folded layer "
            "cannot stand in for it"
        )
    if channels is not None and link.varying and link.varying != (channels,):
        shape = ", ".join(_dims(shape_value(link.operand)))
        return (
            f"the operand of {describe(link.node)} (shape [{shape}]) varies along axis "
            f"{link.varying[0]}, but the channels of {target} are on axis {channels} there"
        )
    return ""


def _link_value_problem(link: _Link, target: str) -> str:
    """Why ``link``'s numbers cannot fold ("" when they can): it promotes the activation to
    another dtype, or its operand is not floating point."""
    before, after = shape_value(link.input), shape_value(link.node)
    if after.dtype != before.dtype:
        return (
            f"{describe(link.node)} computes in {_dtype_name(after.dtype)} on the "
            f"{_dtype_name(before.dtype)} output of {target} (type promotion by its operand); "
            f"folded, the layer would compute in {_dtype_name(before.dtype)}"
        )
    if isinstance(link.operand, Node):
        given = shape_value(link.operand)
        if not given.is_floating_point():
            return (
                f"the operand of {describe(link.node)} is {_dtype_name(given.dtype)}, not "
                "floating point"
            )
    return ""


def _quantized(p: ProducerCall) -> bool:
    """Whether the producer's weight is dequantized in the graph (pt2e: left as it is)."""
    found = trace_back(p.weight)
    return found is not None and quant_call(found.source) is not None


def _gains_nothing(pair: _Pair) -> bool:
    """An affine site whose fold would leave as many nodes: one add of a bias after a layer
    without a bias operand (``mm -> add`` is what a Linear decomposes to; folded, the add
    would come back as ``addmm``)."""
    p = pair.producer
    if p is None or p.op not in ("mm", "matmul") or len(pair.links) != 1:
        return False
    return [step.op for step in pair.links[0].steps(0.0)] == ["add"]


def _operand_value(ev: Constants, link: _Link) -> Any:
    """A link operand's numbers in float64 (flat: one, or one per channel)."""
    if link.operand is None or not isinstance(link.operand, Node):
        return None if link.operand is None else float(link.operand)
    value = ev.value(link.operand)
    if value is None:
        why = ev.why(link.operand)
        raise FoldRefused(f"the operand of {describe(link.node)} is not constant ({why})")
    return value.detach().cpu().reshape(-1).numpy()


def _sixteen_bit(dtype: torch.dtype) -> Any:
    """The numpy dtype of a 16-bit float (for the headroom rule); ``None`` for wider types
    (and bfloat16 without ml_dtypes, whose range is float32's)."""
    if dtype == torch.float16:
        return np.float16
    if dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            return None
        return ml_dtypes.bfloat16
    return None


def _affine_map(store: Store, pair: _Pair, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(k, c)`` in float64: what the links and the BatchNorm of ``pair`` make of the
    producer's output ``y``, as ``k*y + c`` per channel (raises :class:`FoldRefused`)."""
    c = pair.bn
    last: list[Step] = []
    if isinstance(c, BatchNormCall):

        def value(role: str) -> torch.Tensor | None:
            source = pair.bn_sources.get(role)
            return None if source is None else store.tensor(source)

        s, t = affine_factors(
            value("mean"), value("var"), float(c.eps), value("weight"), value("bias")
        )
        if not pair.links:
            return s, t
        last = [Step("affine", (s, t), where=pair.name)]
    if pair.value_problem:
        raise FoldRefused(pair.value_problem)
    ev = Constants(store, float64=True)
    steps = [step for link in pair.links for step in link.steps(_operand_value(ev, link))]
    k, shift = compose(steps + last, channels)
    assert pair.producer is not None
    out = shape_value(pair.producer.node)
    if isinstance(out, torch.Tensor):
        require_headroom(shift, _sixteen_bit(out.dtype), pair.name)
    return k, shift


def _compute(store: Store, pair: _Pair) -> _Fold:
    """Compute the folded weight and bias of ``pair`` (raises :class:`FoldRefused`)."""
    assert pair.producer is not None and pair.weight_chain is not None
    weight = store.tensor(pair.weight_chain[0])
    bias = store.tensor(pair.bias_chain[0]) if pair.bias_chain is not None else None
    _charge_materialised(store, pair, weight, bias)
    layout = pair.weight_layout()
    with torch.no_grad():
        k, shift = _affine_map(store, pair, layout.out_channels(tuple(weight.shape)))
        if bias is not None and bias.dim() != 1:
            raise FoldRefused(
                f"{pair.target}'s bias has shape {tuple(bias.shape)}, not one value per "
                "output channel"
            )
        w, b = fold_affine_into_producer(weight, bias, k, shift, layout)
    if bias is None and isinstance(pair.bn, AffineSite) and not shift.any():
        return _Fold(w, None)  # a scale only: the layer needs no bias for it
    return _Fold(w, b)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _logical_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _stored_smaller(t: torch.Tensor | None) -> bool:
    """Whether ``t`` occupies less memory than its values (stride 0, an expanded tensor)."""
    if t is None or t.is_meta or t.layout != torch.strided:
        return False
    try:
        return t.untyped_storage().nbytes() < _logical_bytes(t)
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return False


def _charge_materialised(
    store: Store, pair: _Pair, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Refuse (before allocating) a fold whose dense results would exceed what may be
    materialised for weights stored smaller than they are (see MATERIALISE_FLOOR_BYTES)."""
    if not (_stored_smaller(weight) or _stored_smaller(bias)):
        return
    out = pair.weight_layout().out_channels(tuple(weight.shape))
    new = _logical_bytes(weight) + out * weight.element_size()  # the weight and a bias
    budget = max(MATERIALISE_FLOOR_BYTES, MATERIALISE_FACTOR * store.stored_bytes())
    spent = store.materialised
    if spent + new > budget:
        raise FoldRefused(
            f"{pair.target}'s weight {tuple(weight.shape)} is stored in "
            f"{_mib(weight.untyped_storage().nbytes())} (an expanded tensor) and folding would "
            f"make it dense: {_mib(new)} of new values, more than the {_mib(budget - spent)} "
            f"left of what bnfold makes dense for such weights (the larger of "
            f"{_mib(MATERIALISE_FLOOR_BYTES)} and {MATERIALISE_FACTOR}x the "
            f"{_mib(store.stored_bytes())} the program stores)"
        )
    store.materialised = spent + new


def _nested_entries(root: nn.Module, graph: torch.fx.Graph) -> list[FoldEntry]:
    """BatchNorms inside subgraphs (``torch.cond`` branches, ``torch.no_grad()`` regions as
    exported): reported and kept."""
    users: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            for user in node.users:
                users[node.target] = getattr(user.target, "__name__", str(user.target))
    entries = []
    for sub_name, sub in root.named_modules():
        if sub is root or not isinstance(sub, GraphModule):
            continue
        hop = users.get(sub_name, "a higher-order op")
        hint = (
            "; ep.run_decompositions() inlines such regions, after which bnfold can fold them"
            if hop.startswith("wrap_with")
            else ""
        )
        for node in sub.graph.nodes:
            if batch_norm_call(node) is None:
                continue
            where = module_path(node)
            name = f"{sub_name}.{node.name}" if where is None else where[0]
            entries.append(
                FoldEntry(
                    bn=name,
                    target=None,
                    action="skipped",
                    rule=rules.NO_PRODUCER,
                    reason=(
                        f"{name} is inside the subgraph {sub_name} of {hop}; bnfold folds "
                        f"the top-level graph only{hint}"
                    ),
                    bn_type=where[1] if where else "BatchNorm",
                )
            )
    return entries


# --------------------------------------------------------------------------------------------
# Rewriting the graph


def _sole_use(store: Store, chain: list[Node], producer: Node) -> bool:
    """Whether every node of the chain feeds only the next one, in one argument position
    (and the last the producer), and no module holding the tensor is read elsewhere."""
    for i, n in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else producer
        if nxt not in n.users or other_uses(n, nxt):
            return False
    return not store.readers(chain[0])


def _rebuild_chain(store: Store, chain: list[Node], source: Node, before: Node) -> Node:
    """Copies of ``chain``'s pass-through nodes on top of ``source``; returns the last one."""
    current = source
    for old in chain[1:]:
        with store.graph.inserting_before(before):
            src = operand_source(old)
            new = store.graph.node_copy(old, lambda n, s=src, c=current: c if n is s else n)
        new.meta = dict(old.meta)
        current = new
    return current


def _set_operand(
    store: Store,
    pair: _Pair,
    chain: list[Node] | None,
    value: torch.Tensor,
    arg: str,
    hint: str,
    touched: list[Node],
) -> str:
    """Make the producer's operand ``arg`` hold ``value``: in place if nothing else uses the
    old tensor, else through a new constant (and copies of the view ops in between).
    Returns the key the value is stored under."""
    prod = pair.producer.node
    if chain is not None and _sole_use(store, chain, prod) and _is_only_alias(store, chain[0]):
        store.replace(chain[0], value)
        return store.key(chain[0])
    like = chain[0] if chain is not None else pair.weight_chain[0]
    source = store.add(like, hint, value, before=prod)
    node = source
    if chain is not None:
        node = _rebuild_chain(store, chain, source, before=prod)
        touched.append(chain[-1])
    set_argument(prod, arg, node)
    return store.key(source)


def _is_only_alias(store: Store, node: Node) -> bool:
    """Whether no other constant node holds the same tensor object (tied weights)."""
    return not any(other is not node and other.users for other in store.aliases(node))


def _apply(store: Store, folds: list[tuple[_Pair, _Fold]], touched: list[Node]) -> dict[Node, Node]:
    """Rewrite the graph for every computed fold; returns which node took each output's place.
    ``touched`` gains the nodes that may have lost their last user."""
    replaced: dict[Node, Node] = {}  # folded BatchNorm output -> the producer now in its place
    for pair, fold in folds:
        p, c = pair.producer, pair.bn
        assert p is not None and pair.weight_chain is not None
        w_key = store.key(pair.weight_chain[0])
        w_key = _set_operand(
            store,
            pair,
            pair.weight_chain,
            fold.weight,
            p.weight_arg,
            f"{w_key}_folded",
            touched,
        )
        if pair.bias_chain is not None:
            assert fold.bias is not None
            b_key = store.key(pair.bias_chain[0])
            _set_operand(
                store,
                pair,
                pair.bias_chain,
                fold.bias,
                p.bias_arg,
                f"{b_key}_folded",
                touched,
            )
        elif fold.bias is not None:
            bias = store.add(pair.weight_chain[0], pipeline.bias_name(w_key), fold.bias, p.node)
            if p.op in ("mm", "matmul"):  # no bias operand: it becomes addmm(bias, x, w)
                operands = arguments(p.node)  # read by name: a hand-built graph may use kwargs
                x, w = operands["self"], operands[p.weight_arg]
                p.node.target = torch.ops.aten.addmm.default
                p.node.args = (bias, x, w)
                p.node.kwargs = {}
            else:
                set_argument(p.node, p.bias_arg, bias)
        if isinstance(c, BatchNormCall):
            out = c.output
            replaced[out] = c.input  # the producer, or the last layout op or link before it
            out.replace_all_uses_with(c.input)
            for user in list(c.node.users):
                store.graph.erase_node(user)
            touched += [v for v in (c.weight, c.bias, c.mean, c.var) if isinstance(v, Node)]
            store.graph.erase_node(c.node)
        for link in reversed(pair.links):  # each read by the next step only: bypass it
            replaced[link.node] = link.input
            link.node.replace_all_uses_with(link.input)
            if isinstance(link.operand, Node):
                touched.append(link.operand)
            store.graph.erase_node(link.node)
    return replaced


def _drop_unused(store: Store, touched: list[Node]) -> None:
    """Erase view ops and constants the folds left without users (and the statistics
    counters of BatchNorms whose running mean went with them)."""
    dropped_keys: set[str] = set()

    def drop(node: Node) -> list[Node] | None:
        if node._erased or node.graph is not store.graph or node.users:
            return None
        if store.tensor(node) is not None:
            # Tied tensors: export routes every use through one placeholder and leaves the
            # other names' placeholders unused; they go with it.
            tied = [a for a in store.aliases(node) if a is not node]
            dropped_keys.add(store.key(node))
            store.drop(node)
            return tied
        if is_pass_through(node):
            src = operand_source(node)
            store.graph.erase_node(node)
            return [src] if isinstance(src, Node) else None
        if is_pure(node):  # what a QAT chain computed its constants with
            inputs = list(node.all_input_nodes)
            store.graph.erase_node(node)
            return inputs
        return None

    pipeline.drop_dead(touched, drop)
    counters = {
        k.rpartition(".")[0] + ".num_batches_tracked" if "." in k else "num_batches_tracked"
        for k in dropped_keys
        if k.rpartition(".")[2] == "running_mean"
    }
    for node in store.constant_nodes():
        if not node.users and store.key(node) in counters:
            store.drop(node)
