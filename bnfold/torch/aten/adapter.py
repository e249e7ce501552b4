"""The ATen graph adapter: what :mod:`bnfold.core.pipeline` needs to fold BatchNorm in an ATen
graph (torch.export programs, ``ep.module()`` graph modules; torch.compile and pt2e graphs next).

Ops are read through :mod:`bnfold.torch.aten.ops`; constant tensors through a
:class:`~bnfold.torch.aten.store.Store`, one per container, so this adapter never asks where a
tensor lives. The pipeline decides and orders the folds; this module finds the pairs and their
facts, computes the new values with :mod:`bnfold.core.algebra`, and rewrites the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ...core import pipeline, rules
from ...core.algebra import OutputLayout, affine_factors, fold_affine_into_producer
from ...core.pipeline import Pair
from ...core.report import FoldEntry
from ...core.rules import PairFacts
from ...errors import FoldRefused, UnsupportedModelError
from .evaluate import Constants, is_pure
from .ops import (
    BatchNormCall,
    ProducerCall,
    activation_steps,
    arguments,
    batch_norm_call,
    describe,
    follow_channel_axis,
    is_pass_through,
    layout,
    may_be_written,
    module_path,
    op_label,
    operand_source,
    other_uses,
    producer_call,
    set_argument,
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
class _Pair(Pair[Node]):
    """A pair and where its tensors are: the constant chains of the producer's weight and bias
    (``[constant, view ops..., operand]``), the weight's output-channel axis at the constant,
    and the constants the BatchNorm reads."""

    bn: BatchNormCall
    producer: ProducerCall | None = None
    weight_chain: list[Node] | None = None
    bias_chain: list[Node] | None = None
    weight_axis: int = 0
    weight_first_axis: int = 0  # the constant's axis that is the operand's axis 0
    bn_sources: dict[str, Node] = field(default_factory=dict)

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
    bias: torch.Tensor


class AtenAdapter:
    """One ATen graph (owned by ``root``, whose submodules hold subgraphs) and its store, as a
    :class:`bnfold.core.pipeline.GraphAdapter`. ``boundaries`` are modules whose call signature
    the program preserves; ``replaced`` says, after a rewrite, which node took the place of each
    folded BatchNorm's output. ``qat`` says where the tail of a pt2e QAT chain goes
    (:data:`bnfold.core.rules.QAT_MODES`)."""

    def __init__(
        self, root: nn.Module, store: Store, boundaries: list[str], qat: str = "exact"
    ) -> None:
        self.qat = rules.qat_mode(qat)
        self.root = root
        self.graph = store.graph
        self.store = store
        self.boundaries = boundaries
        self.replaced: dict[Node, Node] = {}
        self._bn_names: dict[Node, tuple[str, str]] = {}
        self._prod_calls: dict[Node, ProducerCall | None] = {}
        self._prod_names: dict[Node, tuple[str, str]] = {}
        require_values(store)

    # -- the pipeline's questions ------------------------------------------------------------

    def batch_norms(self) -> list[BatchNormCall]:
        """Every BatchNorm node; report names stay those of the first pass."""
        bns = [c for c in (batch_norm_call(n) for n in self.graph.nodes) if c is not None]
        missing = [c.node for c in bns if c.node not in self._bn_names]
        self._bn_names.update(_names(missing, "BatchNorm", self._stored_module))
        sources = (activation_steps(c.input)[0] for c in bns)
        producer_nodes = {n for n in sources if isinstance(n, Node)}
        self._prod_calls = {n: producer_call(n) for n in producer_nodes}
        self._prod_names = _names(
            [n for n in self.graph.nodes if self._prod_calls.get(n) is not None], ""
        )
        return bns

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

    def examine(self, bn: BatchNormCall) -> _Pair:
        name, bn_type = self._bn_names[bn.node]
        pair = _examine(
            self.store, bn, name, bn_type, self._prod_calls, self._prod_names, self.boundaries
        )
        if pair.producer is not None:
            return pair
        chain, why = qat_match(bn, self.store)
        if chain is None:
            if why:
                detail = f"{pair.facts.producer_detail} (a quantized chain: {why})"
                pair.facts = replace(pair.facts, producer_detail=detail)
            return pair
        return _examine_qat(self.store, pair, chain, self.boundaries)

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

    def upstream(self, bn: BatchNormCall) -> list[Any]:
        source, steps = activation_steps(bn.input)
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
    store: Store,
    c: BatchNormCall,
    name: str,
    bn_type: str,
    prod_calls: dict[Node, ProducerCall | None],
    prod_names: dict[Node, tuple[str, str]],
    boundaries: list[str],
) -> _Pair:
    bn_sources: dict[str, Node] = {}
    not_constant: list[str] = []
    for role, v in (("weight", c.weight), ("bias", c.bias), ("mean", c.mean), ("var", c.var)):
        if v is None and role in ("weight", "bias"):
            continue
        source, what = _constant_source(store, v)
        if source is None:
            not_constant.append(f"its {role} is {what}")
        else:
            bn_sources[role] = source
    bn_constant = not not_constant
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
        bn_params_constant=bn_constant,
        can_unshare=True,
        rank_hint=_RANK_HINT,
    )
    source, steps = activation_steps(c.input)
    p = prod_calls.get(source) if isinstance(source, Node) else None
    axis = _axis_facts(p, steps) if p is not None else None
    if axis is None:
        p = None
    if p is None:
        detail = describe(c.input) if isinstance(c.input, Node) else "a constant"
        facts = replace(facts, producer_detail=detail)
        return _Pair(bn=c, facts=facts, name=name, bn_type=bn_type, bn_sources=bn_sources)
    target, target_type = prod_names[p.node]
    target_type = target_type or op_label(p.node)
    w_chain, w_axis, w_first_axis, w_what = _operand_chain(store, p.weight, p.weight_axis)
    b_chain: list[Node] | None = None
    b_what = ""
    if p.bias is not None:
        b_chain, _, _, b_what = _operand_chain(store, p.bias, 0)
    path = [*steps, c.node]
    others = [u for i, n in enumerate([p.node, *steps]) for u in _other_users(n, path[i])]
    if not_constant:
        detail = "; ".join(not_constant)
    elif w_what or b_what:
        detail = f"its {'weight' if w_what else 'bias'} is {w_what or b_what}"
    else:
        detail = ""
    facts = replace(
        facts,
        constant_detail=detail,
        channel_axis=axis.channel_axis,
        axis_path=axis.axis_path,
        axis_problem=axis.axis_problem,
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
        boundary=_boundary(boundaries, p.node, c.node),
    )
    return _Pair(
        bn=c,
        facts=facts,
        name=name,
        bn_type=bn_type,
        producer=p,
        target=target,
        target_type=target_type,
        weight_chain=w_chain,
        bias_chain=b_chain,
        weight_axis=w_axis,
        weight_first_axis=w_first_axis,
        bn_sources=bn_sources,
    )


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
    """Where the producer's channels arrive at the BatchNorm (see ``PairFacts.channel_axis``)."""

    channel_axis: int | None = None
    axis_path: str = ""
    axis_problem: str = ""


def _axis_facts(p: ProducerCall, steps: list[Node]) -> _Axis | None:
    """Where the producer's channels arrive at the BatchNorm through layout ops between them
    (a Linear on ``(B, L, C)``, ``transpose(1, 2)``, BatchNorm1d); nothing without such ops
    (the rules then read the producer's output rank). ``None`` when a reshape mixes the
    channels with other axes: the BatchNorm's input is then no producer's output."""
    if not steps:
        return _Axis()
    if p.output_rank is None:
        return _Axis(
            axis_problem=f"the rank of {describe(p.node)}'s output is unknown; {_RANK_HINT}"
        )
    axis = rules.producer_channel_axis(p.kind, p.output_rank, p.spatial_dims, p.feature_axis)  # type: ignore[arg-type]
    track = follow_channel_axis(steps, axis, p.output_rank)
    via = " -> ".join(op_label(n) for n in steps)
    if track.reshaped:
        return None
    if track.axis is None:
        return _Axis(
            axis_problem=f"bnfold cannot follow the channels through {via}: {track.problem}"
        )
    return _Axis(track.axis, via)


def _compute(store: Store, pair: _Pair) -> _Fold:
    """Compute the folded weight and bias of ``pair`` (raises :class:`FoldRefused`)."""
    c, p = pair.bn, pair.producer
    assert p is not None and pair.weight_chain is not None

    def value(role: str) -> torch.Tensor | None:
        source = pair.bn_sources.get(role)
        return None if source is None else store.tensor(source)

    weight = store.tensor(pair.weight_chain[0])
    bias = store.tensor(pair.bias_chain[0]) if pair.bias_chain is not None else None
    _charge_materialised(store, pair, weight, bias)
    with torch.no_grad():
        s, t = affine_factors(
            value("mean"), value("var"), float(c.eps), value("weight"), value("bias")
        )
        if bias is not None and bias.dim() != 1:
            raise FoldRefused(
                f"{pair.target}'s bias has shape {tuple(bias.shape)}, not one value per "
                "output channel"
            )
        w, b = fold_affine_into_producer(weight, bias, s, t, pair.weight_layout())
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
        else:
            bias = store.add(pair.weight_chain[0], pipeline.bias_name(w_key), fold.bias, p.node)
            if p.op in ("mm", "matmul"):  # no bias operand: it becomes addmm(bias, x, w)
                operands = arguments(p.node)  # read by name: a hand-built graph may use kwargs
                x, w = operands["self"], operands[p.weight_arg]
                p.node.target = torch.ops.aten.addmm.default
                p.node.args = (bias, x, w)
                p.node.kwargs = {}
            else:
                set_argument(p.node, p.bias_arg, bias)
        out = c.output
        replaced[out] = c.input  # the producer, or the last layout op between them
        out.replace_all_uses_with(c.input)
        for user in list(c.node.users):
            store.graph.erase_node(user)
        touched += [v for v in (c.weight, c.bias, c.mean, c.var) if isinstance(v, Node)]
        store.graph.erase_node(c.node)
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
