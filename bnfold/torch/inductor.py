"""An Inductor pre-grad pass that folds inference BatchNorm into the layer before it, in-graph.

For torch.compile users who keep Inductor as their backend::

    torch._inductor.config.pre_grad_custom_pass = bnfold.torch.FoldPass()

Every ``batch_norm(producer(x, w, b), mean, var, gamma, beta, training=False, eps=any)`` whose
producer is a convolution or transposed convolution (1-3 spatial dims, any stride, padding,
dilation, groups, with or without bias) or a 2-D ``linear``/``addmm``/``mm``/``matmul`` becomes
``producer(x, w * s, b * s + t)`` with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean*s``
computed in the graph from the tensors themselves (in float32, or float64 for float64 weights,
then cast back). Nothing is read at pass time, so the pass is exact for any values and stays
correct when weights change between calls; under Inductor's freezing the weight arithmetic is
constant-folded away, without it the graph scales the weights (not the activations) on each
call. The same legality rules as :func:`bnfold.fold` decide each pair.

Why pre-grad: this is the only Inductor hook that still sees a BatchNorm as one call with its
``training`` flag and ``eps``. AOT autograd decomposes it before the post-grad and joint hooks
run (they see ``sub``/``add``/``sqrt``/``reciprocal``/``mul`` chains, indistinguishable from
user arithmetic), and under freezing Inductor's own folding has already run by then.
"""

from __future__ import annotations

import hashlib
import logging
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, Node

from ..core import rules
from ..core.rules import PairFacts

log = logging.getLogger("bnfold")

aten = torch.ops.aten

# Positional parameter names of the calls the pass reads (torch functions, their functional
# forms and the ATen ops a graph of an exported program holds).
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONVOLUTION = _CONV[:6] + ("transposed", "output_padding", "groups")
_LINEAR = ("input", "weight", "bias")
_ADDMM = ("input", "mat1", "mat2")
_MM = ("input", "mat2")
_MATMUL = ("input", "other")
_F_BN = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ATEN_BN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum")
_ATEN_BN += ("eps", "cudnn_enabled")
_BN_NO_TRAINING = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")


@dataclass(frozen=True)
class _Kind:
    kind: rules.ProducerKind
    names: tuple[str, ...]
    spatial: int  # 0: linear; -1: read from the call
    weight: str = "weight"
    bias: str | None = "bias"
    transposed: bool = False


def _producer_table() -> dict[Any, _Kind]:
    table: dict[Any, _Kind] = {}
    for d in (1, 2, 3):
        conv = _Kind("conv", _CONV, d)
        conv_t = _Kind("conv_transpose", _CONV_T, d, transposed=True)
        for target in (getattr(torch, f"conv{d}d"), getattr(F, f"conv{d}d")):
            table[target] = conv
        for overload in ("default", "padding"):
            table[getattr(getattr(aten, f"conv{d}d"), overload)] = conv
        for target in (getattr(torch, f"conv_transpose{d}d"), getattr(F, f"conv_transpose{d}d")):
            table[target] = conv_t
        packet = getattr(aten, f"conv_transpose{d}d")
        for overload in packet.overloads():  # "default" or "input", by dimension
            table[getattr(packet, overload)] = conv_t
    table[aten.convolution.default] = _Kind("conv", _CONVOLUTION, -1)
    linear = _Kind("linear", _LINEAR, 0)
    for target in (torch._C._nn.linear, F.linear, aten.linear.default):
        table[target] = linear
    for target in (torch.addmm, aten.addmm.default):
        table[target] = _Kind("linear", _ADDMM, 0, weight="mat2", bias="input")
    for target in (torch.mm, aten.mm.default):
        table[target] = _Kind("linear", _MM, 0, weight="mat2", bias=None)
    for target in (torch.matmul, operator.matmul):  # x @ w arrives as operator.matmul
        table[target] = _Kind("linear", _MATMUL, 0, weight="other", bias=None)
    return table


_PRODUCERS = _producer_table()
_BATCH_NORMS: dict[Any, tuple[str, ...]] = {
    F.batch_norm: _F_BN,
    torch.batch_norm: _ATEN_BN,
    aten.batch_norm.default: _ATEN_BN,
    aten._native_batch_norm_legit_no_training.default: _BN_NO_TRAINING,
}
_DEFAULTS = {"training": False, "momentum": 0.1, "eps": 1e-5, "weight": None, "bias": None}
_DEFAULTS |= {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


def _bind(node: Node, names: tuple[str, ...]) -> dict[str, Any] | None:
    """The call's arguments by name (defaults filled in); ``None`` if they do not fit."""
    if len(node.args) > len(names) or any(
        k not in names for k in node.kwargs if k not in ("beta", "alpha")
    ):
        return None
    bound = {**_DEFAULTS, **dict(zip(names, node.args, strict=False)), **node.kwargs}
    return bound


def _meta(value: Any) -> Any:
    if isinstance(value, Node):
        return value.meta.get("val", value.meta.get("example_value"))
    return value


def _rank(value: Any) -> int | None:
    found = _meta(value)
    return found.dim() if isinstance(found, torch.Tensor) else None


@dataclass(frozen=True)
class PassDecision:
    """What the pass decided for one BatchNorm: folded into ``producer``, or kept with a rule."""

    bn: str
    producer: str | None
    folded: bool
    rule: str | None = None
    reason: str = ""


class FoldPass(CustomGraphPass):
    """Folds inference BatchNorm into convolutions and 2-D linear layers in the pre-grad graph.

    Set it as ``torch._inductor.config.pre_grad_custom_pass``. ``matches`` counts the folds
    made so far (also counted in ``torch._dynamo.utils.counters["bnfold"]``); ``decisions``
    holds one :class:`PassDecision` per BatchNorm seen, the latest graph last.
    """

    def __init__(self, producers: Iterable[str] | str | None = None) -> None:
        self.selected = rules.selected_kinds(producers)
        self.matches = 0
        self.decisions: list[PassDecision] = []

    def uuid(self) -> bytes:
        """Identifies the pass for Inductor's caches: this file and the producer selection."""
        with open(__file__, "rb") as f:
            source = f.read()
        return hashlib.sha256(source + repr(sorted(self.selected)).encode()).digest()

    def __call__(self, graph: Graph) -> None:
        from torch._dynamo.utils import counters

        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _BATCH_NORMS or node.graph is None:
                continue
            decision = self._fold(graph, node)
            self.decisions.append(decision)
            if decision.folded:
                self.matches += 1
                counters["bnfold"]["batch_norm_folded"] += 1
                log.debug("pre-grad pass: folded %s into %s", decision.bn, decision.producer)
            else:
                counters["bnfold"]["batch_norm_kept"] += 1
                log.debug("pre-grad pass: kept %s: %s", decision.bn, decision.reason)

    def _fold(self, graph: Graph, bn: Node) -> PassDecision:
        names = _BATCH_NORMS[bn.target]
        b = _bind(bn, names)
        if b is None:
            return PassDecision(
                bn.name, None, False, rules.STANDARD_FORWARD, "unexpected arguments"
            )
        out = bn
        if bn.target is aten._native_batch_norm_legit_no_training.default:
            b["training"] = False
            users = list(bn.users)
            if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
                return PassDecision(
                    bn.name, None, False, rules.STANDARD_FORWARD, "its statistics outputs are used"
                )
            out = users[0]
        source = b["input"]
        kind = _PRODUCERS.get(source.target) if isinstance(source, Node) else None
        facts, p = _facts(bn, b, source, kind)
        decision = rules.decide(facts, self.selected)
        if not decision.ok:
            return PassDecision(bn.name, facts.producer, False, decision.rule, decision.reason)
        assert isinstance(source, Node) and kind is not None and p is not None
        problem = _between(source, bn, b)
        if problem:
            return PassDecision(bn.name, source.name, False, rules.STANDARD_FORWARD, problem)
        _rewrite(graph, source, kind, p, bn, b, out)
        return PassDecision(bn.name, source.name, True)


def _facts(
    bn: Node, b: dict[str, Any], source: Any, kind: _Kind | None
) -> tuple[PairFacts, dict[str, Any] | None]:
    """The rules' facts about ``bn`` and the call feeding it, and that call's arguments."""
    training = b["training"]
    inference = training is False and b["running_mean"] is not None and b["running_var"] is not None
    why_not = (
        ""
        if inference
        else (
            f"{bn.name} runs in training mode (or its training flag is computed)"
            if training is not False
            else f"{bn.name} has no running statistics"
        )
    )
    base = dict(
        bn=bn.name,
        bn_uses_running_stats=inference,
        bn_not_inference_reason=why_not,
    )
    if kind is None or not isinstance(source, Node):
        what = source.name if isinstance(source, Node) else repr(source)
        return PairFacts(**base, producer_detail=what), None
    p = _bind(source, kind.names)
    custom = ""
    if p is None:
        custom = "unexpected arguments"
    elif kind.names is _CONVOLUTION and isinstance(p.get("transposed"), Node):
        custom = "its transposed flag is computed"
    elif kind.names is _ADDMM and (p.get("beta", 1) != 1 or p.get("alpha", 1) != 1):
        custom = "addmm with beta or alpha other than 1"
    elif isinstance(p.get("groups"), Node):
        custom = "its groups are computed"
    producer_kind = kind.kind
    spatial = kind.spatial
    if p is not None and kind.names is _CONVOLUTION:
        producer_kind = "conv_transpose" if p["transposed"] is True else "conv"
        stride = p["stride"]
        spatial = (
            len(stride) if isinstance(stride, (list, tuple)) else (_rank(p["weight"]) or 2) - 2
        )
    weight_rank = _rank(p[kind.weight]) if p is not None else None
    if kind.kind == "linear" and p is not None and weight_rank != 2:
        custom = custom or "its weight is not a 2-D matrix (or its shape is unknown)"
    facts = PairFacts(
        **base,
        producer=source.name,
        producer_kind=producer_kind,
        producer_spatial_dims=max(spatial, 0),
        producer_custom_forward=custom,
        producer_output_users=len(source.users),
        producer_other_users=", ".join(u.name for u in source.users if u is not bn),
        can_unshare=True,  # the scaled weight is a new value; other users keep the original
        output_rank=_rank(source),
        rank_hint="the graph carries no shapes (node.meta['val'])",
    )
    if p is not None:
        p["_spatial"] = max(spatial, 0)
        p["_kind"] = producer_kind
    return facts, p


_WRITING_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul}


def _may_write(node: Node) -> bool:
    """Whether a node of the (not functional) pre-grad graph may write a tensor in place."""
    if node.op == "call_module":
        return True  # a module call: anything may happen inside
    if node.op == "call_method":
        return str(node.target).endswith("_")  # relu_, copy_, __setitem__, ...
    if node.op != "call_function":
        return False
    target = node.target
    if target in _WRITING_FUNCTIONS or "out" in node.kwargs or _inplace(node):
        return True
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    return getattr(target, "__name__", "").endswith("_")


def _inplace(node: Node) -> bool:
    """Whether a functional call asks to work in place (``F.relu(x, True)`` as well as
    ``inplace=True``); a call whose arguments cannot be matched to its signature may."""
    import inspect

    if node.kwargs.get("inplace"):
        return True
    try:
        parameters = inspect.signature(node.target).parameters
    except (TypeError, ValueError):  # builtins without a signature: no inplace parameter
        return False
    if "inplace" not in parameters:
        return False
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except TypeError:
        return True
    return bool(bound.arguments.get("inplace", False))


def _between(producer: Node, bn: Node, b: dict[str, Any]) -> str:
    """Why the folded call cannot replace the producer where it stands ("" if it can): the
    scaled weights are computed there, from the BatchNorm's tensors, so no write may happen in
    between and those tensors must be defined there (``get_attr`` nodes can be moved up)."""
    position = {n: i for i, n in enumerate(producer.graph.nodes)}
    for node in producer.graph.nodes:
        if position[producer] < position[node] < position[bn] and _may_write(node):
            return (
                f"the graph may write a tensor ({node.name}) between {producer.name} and "
                f"{bn.name}; folding would move the BatchNorm's reads across that write"
            )
    for key in ("running_mean", "running_var", "weight", "bias", "eps"):
        value = b[key]
        if isinstance(value, Node) and position[value] > position[producer]:
            if not _movable(value, producer, position):
                return (
                    f"{bn.name}'s {key} is computed after {producer.name}, so the scaled "
                    "weights cannot be computed where the producer runs"
                )
    return ""


def _movable(node: Node, producer: Node, position: dict[Node, int]) -> bool:
    """Whether ``node``, defined after ``producer``, can be computed before it instead: a
    ``get_attr``, or ``.item()`` of a tensor that can (dynamo's ``eps`` with ``dynamic=True``)."""
    if node.op == "get_attr":
        return True
    if node.op == "call_method" and node.target == "item" and len(node.args) == 1:
        (source,) = node.args
        return isinstance(source, Node) and (
            position[source] < position[producer] or _movable(source, producer, position)
        )
    return False


def _move_before(node: Node, producer: Node, position: dict[Node, int]) -> None:
    for arg in node.all_input_nodes:
        if position[arg] > position[producer]:
            _move_before(arg, producer, position)
    producer.prepend(node)
    position[node] = position[producer] - 0.5  # before the producer from now on


def _rewrite(
    graph: Graph,
    producer: Node,
    kind: _Kind,
    p: dict[str, Any],
    bn: Node,
    b: dict[str, Any],
    out: Node,
) -> None:
    """``producer(x, w*s, b*s + t)`` in place of ``out``, computed where the producer runs (what
    it reads may be written later in a graph that is not functional)."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    for key in ("running_mean", "running_var", "weight", "bias", "eps"):
        value = b[key]
        if isinstance(value, Node) and position[value] > position[producer]:
            _move_before(value, producer, position)  # pure reads (checked by _between)
    weight = p[kind.weight]
    bias = p.get(kind.bias) if kind.bias else None

    def call(target: Any, *args: Any) -> Node:
        return graph.call_function(target, args)

    def method(name: str, *args: Any) -> Node:
        return graph.call_method(name, args)

    with graph.inserting_before(producer):
        w_dtype = call(getattr, weight, "dtype")
        # float32 arithmetic for half-precision weights, float64 for float64 ones
        dtype = call(torch.promote_types, w_dtype, torch.float32)
        var = method("to", b["running_var"], dtype)
        scale = call(torch.rsqrt, call(operator.add, var, b["eps"]))
        if b["weight"] is not None:
            scale = call(operator.mul, scale, method("to", b["weight"], dtype))
        shift = call(
            operator.neg, call(operator.mul, method("to", b["running_mean"], dtype), scale)
        )
        if b["bias"] is not None:
            shift = call(operator.add, shift, method("to", b["bias"], dtype))
        if bias is not None:
            shift = call(operator.add, shift, call(operator.mul, method("to", bias, dtype), scale))
        new_weight = method("to", _scaled(graph, weight, scale, kind, p, dtype), w_dtype)
        new_bias = method("to", shift, w_dtype)
    with graph.inserting_before(producer):
        if kind.bias is None:
            # mm / matmul have no bias: addmm(t, x, w*s) computes the same in one op
            folded = graph.call_function(torch.addmm, (new_bias, p["input"], new_weight))
        else:
            args, kwargs = list(producer.args), dict(producer.kwargs)
            for name, value in ((kind.weight, new_weight), (kind.bias, new_bias)):
                at = kind.names.index(name)
                if at < len(args):
                    args[at] = value
                elif name in kwargs or at > len(args):
                    kwargs[name] = value
                else:
                    args.append(value)
            folded = graph.call_function(producer.target, tuple(args), kwargs)
    folded.meta = dict(producer.meta)
    out.replace_all_uses_with(folded)
    # Only what this fold made dead goes: the pre-grad graph has calls kept for their writes.
    for node in dict.fromkeys((out, bn, producer)):  # out is bn unless a getitem follows
        if node.graph is not None and not node.users:
            graph.erase_node(node)


def _scaled(
    graph: Graph, weight: Any, scale: Node, kind: _Kind, p: dict[str, Any], dtype: Node
) -> Node:
    """``weight`` (in ``dtype``) times ``scale`` along its output channels."""

    def method(name: str, *args: Any) -> Node:
        return graph.call_method(name, args)

    w = method("to", weight, dtype)
    spatial = p["_spatial"]
    if kind.kind == "linear":
        shape = (-1, 1) if kind.weight == "weight" else (1, -1)  # (out, in) or (in, out)
        return graph.call_function(operator.mul, (w, method("reshape", scale, shape)))
    if p["_kind"] == "conv":
        shape = (-1,) + (1,) * (spatial + 1)
        return graph.call_function(operator.mul, (w, method("reshape", scale, shape)))
    # Transposed: weight (in, out/groups, *k); output channel g*(out/groups) + j is column j of
    # group g, so both go to their own axes before scaling.
    groups = p["groups"]
    grouped = method("unflatten", w, 0, (groups, -1))  # (groups, in/groups, out/groups, *k)
    s = method("reshape", scale, (groups, 1, -1) + (1,) * spatial)
    return method("flatten", graph.call_function(operator.mul, (grouped, s)), 0, 1)


__all__ = ["FoldPass", "PassDecision"]
