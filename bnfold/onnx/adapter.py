"""ONNX frontend: fold BatchNormalization and per-channel arithmetic into Conv,
ConvTranspose, Gemm and MatMul.

Works on the ``onnx_ir`` in-memory graph. A *site* is a BatchNormalization, or (with
``affine``) the last of a run of affine links: ``Add``/``Sub``/``Mul``/``Div`` of an
activation and a constant, ``Neg`` (:func:`bnfold.onnx.ops.link_call`), as converters leave
BatchNorm behind. For every site: walk back to the producer through layout operators
(``Identity``/``Transpose``/``Unsqueeze``/``Squeeze``) and affine links in any order, gather the
facts :mod:`bnfold.core.rules` decides on (each link's constant must be one value, or one per
output channel where the channels are at that point), compose the links and the BatchNorm into
one ``y = k*z + c`` (:func:`bnfold.core.affine.compose`, float64) and rewrite: the weight is
scaled where it is stored (or written to a new initializer when something else reads it, or
when it was computed from constants), the bias replaced by a new initializer (MatMul, which
has none, gets one ``Add``), the links and the BatchNorm removed, and the last one's output
name kept when it is a graph output. What the fold leaves unused (parameters, constants, the
old bias and the constant subgraphs that made them) is removed; nothing else changes.

Without ``affine`` no arithmetic is passed but a constant ``Add`` right after the producer (a
layer's bias), and there are no affine sites; layout nodes and computed weights are followed
either way. A run of links after a BatchNorm is folded in the next pass, once the BatchNorm is.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..core import affine, algebra, pipeline, rules
from ..core.pipeline import BatchNormSite, Pair, StoredOperand, bias_name, unique_name
from ..core.report import FoldEntry, FoldReport
from ..errors import FoldRefused
from ..onnx.constants import (
    MAX_RANK,
    Constants,
    NotConstant,
    attribute,
    check_nodes,
    defining_graph,
    describe,
    describe_node,
    is_default_domain,
    opset_version,
    reads_data,
)
from ..onnx.ops import (
    LAYOUT_OPS,
    PRODUCER_OPS,
    AxisTrack,
    BatchNormCall,
    LinkCall,
    ProducerCall,
    batch_norm_call,
    follow,
    link_call,
    producer_call,
)

_RANK_HINT = (
    "give the model's inputs shapes of known rank (bnfold runs ONNX shape inference, which "
    "could not tell)"
)
_MAX_LAYOUT_OPS = 8
_MAX_LINKS = 64  # affine links passed between a producer and a site


# --------------------------------------------------------------------------------------------
# What one BatchNorm pair looks like


@dataclass(kw_only=True)
class AffineSite(BatchNormSite[ir.Node]):
    """The last link of a run of affine links, as a site (``node`` is that link's node)."""

    link: LinkCall


@dataclass(kw_only=True)
class _Pair(Pair[ir.Node]):
    """A site and what its rewrite needs: the layout nodes and affine links between the producer
    and the BatchNorm (or the site's own links), where the weight is stored and who else reads
    it."""

    bn: BatchNormCall | AffineSite
    graph: ir.Graph
    producer: ProducerCall | None = None
    # layout nodes and links from the producer on (an affine site's own last link included)
    steps: list[ir.Node] = field(default_factory=list)
    links: dict[ir.Node, LinkCall] = field(default_factory=dict)
    weight: StoredOperand[ir.Value] | None = None
    weight_shared: str = ""
    rank: int | None = None  # rank of the producer's output
    channels: int | None = None  # the producer's output channels

    @property
    def affine_site(self) -> bool:
        return isinstance(self.bn, AffineSite)

    # the weight is computed from constants, not stored: a new initializer takes it
    weight_computed: bool = False

    def link_nodes(self) -> list[LinkCall]:
        return [self.links[n] for n in self.steps if n in self.links]


def _note(pair: _Pair, **changes: Any) -> None:
    """Record facts learnt about ``pair`` (field names of :class:`~bnfold.core.rules.PairFacts`)."""
    pair.facts = replace(pair.facts, **changes)


class _Context:
    """Per-fold state: the model, its constants, the names in use and inferred ranks."""

    def __init__(self, model: ir.Model, affine: bool = True) -> None:
        self.model = model
        self.affine = affine
        self.created: set[ir.Node] = set()  # nodes the fold added (a MatMul's bias Add)
        self.constants = Constants(model, self.dtype)
        self._link_constants = Constants(model, self.dtype)
        self.legacy_inputs = (model.ir_version or 0) < 4  # IR 3 lists initializers as inputs
        self._names: set[str] | None = None
        self._inferred: dict[tuple[ir.Graph, str], tuple[int | None, int]] | None = None

    def link(self, node: ir.Node, per_channel: bool = False) -> LinkCall | None:
        """``node`` read as an affine link (:func:`bnfold.onnx.ops.link_call`), or ``None``.

        ``per_channel``: not a link whose stored constant varies along several axes (a mask,
        an embedding), which can never fold. Such a node ends an affine chain (no entry), but a
        BatchNorm's walk back passes it, to say why the BatchNorm is kept (``channel-axis``)."""
        if node.op_type not in ("Add", "Sub", "Mul", "Div", "Neg") or not node.inputs:
            return None
        link = link_call(node, opset_version(self.model, node), self._float_constant)
        if per_channel and link is not None and link.constant is not None:
            stored = self.constants.stored(link.constant)
            if stored is not None and sum(int(d) > 1 for d in stored.shape) > 1:
                return None
        return link

    def _float_constant(self, value: ir.Value) -> bool | None:
        """Whether ``value`` is a floating-point constant (``None``: not a constant), told
        without computing it where possible: every Add and Mul of a model is asked, and the
        evaluation budget is the folds' (a model's large constant masks would spend it). A
        stored tensor is judged by its header, a computed one by the graph and its inferred
        type; only a constant whose type inference left unknown is evaluated, by a cache of
        its own."""
        tensor = self.constants.stored(value)
        if tensor is not None:
            return tensor.dtype.is_floating_point()
        if not self.constants.looks_constant(value):
            return None
        dtype = self.dtype(value)
        if dtype is not None:
            return dtype.is_floating_point()
        try:
            array = self._link_constants.value(value)
        except NotConstant:
            return None
        return array.dtype.kind == "f" or "float" in array.dtype.name

    def unique(self, base: str) -> str:
        """A value name not used anywhere in the model, based on ``base``."""
        if self._names is None:
            self._names = _all_names(self.model)
        name = unique_name(base, self._names)
        self._names.add(name)
        return name

    def rank(self, value: ir.Value | None) -> int | None:
        """The rank of ``value`` by ONNX shape inference from the declared inputs (run once).

        A shape the model annotates (``value_info``, a graph output's type) is not taken: the
        checker does not tie it to the operators, and onnxruntime runs a model whose annotation
        says 2-D for a 3-D value; :func:`_annotation_problem` refuses a fold such a claim
        contradicts."""
        if value is None:
            return None
        return self._inference(value)[0]

    def dtype(self, value: ir.Value) -> ir.DataType | None:
        """The element type of ``value`` by ONNX type inference (when it is not declared)."""
        elem_type = self._inference(value)[1]
        return ir.DataType(elem_type) if elem_type else None

    def _inference(self, value: ir.Value) -> tuple[int | None, int]:
        """What inference derived for ``value`` in the graph that defines it: a name is looked
        up in its own scope only (sibling branches of an If reuse names for other values, and a
        rank inference found for one says nothing about the other)."""
        if self._inferred is None:
            self._inferred = _inferred_types(self.model)
        scope = defining_graph(value)
        if scope is None or not value.name:
            return (None, 0)
        return self._inferred.get((scope, value.name), (None, 0))


def _all_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for graph in model.graphs():
        names.update(v.name for v in graph.inputs if v.name)
        names.update(graph.initializers)
        for node in graph:
            names.update(v.name for v in node.outputs if v.name)
            if node.name:
                names.add(node.name)
    return names


def _inferred_types(model: ir.Model) -> dict[tuple[ir.Graph, str], tuple[int | None, int]]:
    """(rank, element type) of the model's values by ONNX shape inference, keyed by the graph
    that defines them and their name, on a copy without tensor data (initializers become typed
    inputs), so nothing large is read or serialized. A value inference did not type in its own
    graph is absent, whatever another scope says of the same name.

    Without ``data_prop``: ranks and types are all the fold reads, and data propagation only
    refines dimension sizes (the rank of a Reshape or Expand output is the length of its shape
    input, known without it; measured on Reshape/Expand/Squeeze/Unsqueeze/Tile/ConstantOfShape
    of ``Shape`` arithmetic at opsets 11 to 17: no rank it adds). It costs time and memory in
    the length of every static 1-D tensor on the way, whatever its data: a 906-byte model with
    ``Mul(Expand(c, [2**24]))`` took 3.4 GiB and 17 s.
    """
    graph = model.graph
    proto = onnx.ModelProto(ir_version=model.ir_version or 8)
    for domain, version in model.opset_imports.items():
        proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
    g = proto.graph
    listed = set()
    for v in graph.inputs:
        g.input.append(ir.serde.serialize_value(v))
        listed.add(v.name)
    for name, v in graph.initializers.items():
        tensor = v.const_value
        if name in listed or tensor is None:
            continue
        g.input.append(
            onnx.helper.make_tensor_value_info(name, int(tensor.dtype), list(tensor.shape))
        )
    try:
        for node in graph:
            g.node.append(ir.serde.serialize_node(node))
            _drop_annotations(g.node[-1])
        # The outputs' declared types are claims to check, not premises: inference fills them.
        g.output.extend(onnx.ValueInfoProto(name=v.name) for v in graph.outputs)
        for function in model.functions.values():
            proto.functions.append(ir.serde.serialize_function(function))
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=False)
    except Exception:  # noqa: BLE001 - inference is a hint; without it folds needing a rank stop
        return {}
    types: dict[tuple[ir.Graph, str], tuple[int | None, int]] = {}
    # Each inferred graph is read as the scope of the ir.Graph it was serialized from (nodes and
    # their graph attributes are serialized in order, so the two trees are walked side by side).
    pairs: list[tuple[ir.Graph, onnx.GraphProto]] = [(graph, inferred.graph)]
    while pairs:
        ir_graph, g = pairs.pop()
        for info in itertools.chain(g.input, g.value_info, g.output):
            t = info.type.tensor_type
            if info.type.HasField("tensor_type"):
                rank = len(t.shape.dim) if t.HasField("shape") else None
                types[(ir_graph, info.name)] = (rank, t.elem_type)
        if len(g.node) != len(ir_graph):
            continue  # not the graph serialized: nothing of its subgraphs is trusted
        for node, proto_node in zip(ir_graph, g.node, strict=True):
            protos = {a.name: a for a in proto_node.attribute}
            for name, attr in node.attributes.items():
                found = protos.get(name)
                if found is None or attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.GRAPH and found.HasField("g"):
                    pairs.append((attr.value, found.g))
                elif attr.type == ir.AttributeType.GRAPHS and len(attr.value) == len(found.graphs):
                    pairs.extend(zip(attr.value, found.graphs, strict=True))
    return types


def _drop_annotations(node: onnx.NodeProto) -> None:
    """Clear what ``node``'s subgraphs (and theirs) annotate: ``value_info``, the outputs' types
    and the inputs' shapes (a Loop or Scan body's inputs get theirs from the node's inputs), so
    that inference derives every rank from the main graph's declared inputs."""
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            del sub.value_info[:]
            for out in sub.output:
                out.ClearField("type")
            for info in sub.input:
                if info.type.HasField("tensor_type"):
                    info.type.tensor_type.ClearField("shape")
            for inner in sub.node:
                _drop_annotations(inner)


# --------------------------------------------------------------------------------------------
# Gathering the facts


def _name(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "") or node.op_type


def _examine(ctx: _Context, graph: ir.Graph, bn: BatchNormCall | AffineSite) -> _Pair:
    """Find the producer behind a site and everything the rules need about the pair."""
    if isinstance(bn, AffineSite):
        pair = _affine_pair(ctx, graph, bn)
    else:
        facts = rules.PairFacts(
            bn=_name(bn.node),
            bn_axis=bn.axis,
            bn_uses_running_stats=not bn.not_inference,
            bn_not_inference_reason=bn.not_inference,
            bn_custom_forward=bn.unsupported,
            can_unshare=True,
            rank_hint=_RANK_HINT,
        )
        pair = _Pair(bn=bn, graph=graph, facts=facts, name=facts.bn, bn_type="BatchNormalization")
        if bn.input is None or any(v is None for v in (bn.weight, bn.bias, bn.mean, bn.var)):
            _note(pair, bn_custom_forward=f"{describe_node(bn.node)} lacks required inputs")
    producer_value, detail = _walk_back(ctx, pair)
    node = producer_value.producer() if producer_value is not None else None
    if node is not None:
        weight_rank = None
        try:
            if node.op_type in PRODUCER_OPS and len(node.inputs) > 1:
                w = node.inputs[1]
                if w is not None:
                    pair.weight = ctx.constants.weight(w)
                    shape = _weight_shape(ctx, pair.weight)
                    pair.weight_computed = ctx.constants.stored(pair.weight.source) is None
                    weight_rank = None if shape is None else len(shape)
        except NotConstant as e:
            _note(pair, constant_detail=str(e), producer_params_constant=False)
            if pair.affine_site and (
                _is_activation(node.inputs[1]) or _dequantized(node.inputs[1])
            ):
                # a product of two activations (attention's Q @ K^T), or a quantized layer
                # (QDQ): arithmetic there is left alone, without an entry
                pair.quiet = True
                return pair
        pair.producer = producer_call(node, weight_rank)
        if pair.producer is not None and pair.producer.problem:
            detail, pair.producer = pair.producer.problem, None
        elif pair.weight is None and node.op_type == "MatMul" and _is_constant(ctx, node.inputs[0]):
            detail, pair.producer = (
                f"{describe_node(node)}, which multiplies a constant by the activation (W @ x); "
                "bnfold folds into x @ W only",
                None,
            )
    if pair.producer is None:
        _note(pair, producer_detail=detail)
        # plain arithmetic with no layer behind it is not a fold candidate: no report entry
        pair.quiet = pair.affine_site
        return pair
    p = pair.producer
    pair.target, pair.target_type = _name(p.node), _label(pair)
    if pair.affine_site and _gains_nothing(pair):
        pair.quiet = True
        return pair
    _note(
        pair,
        producer=pair.target,
        producer_kind=p.kind,
        producer_spatial_dims=p.spatial_dims,
        producer_feature_axis=p.feature_axis,
    )
    if pair.weight is not None and pair.facts.producer_params_constant:
        shape = _weight_shape(ctx, pair.weight)
        if shape is not None and p.problem == "":
            pair.channels = _layout(p, shape).out_channels(shape)
    if not pair.affine_site:
        _bn_constants(ctx, pair)
    _producer_constants(ctx, pair)
    _consumers(pair)
    _channel_axis(ctx, pair)
    _sharing(ctx, pair)
    return pair


def _is_activation(value: ir.Value | None, limit: int = 64) -> bool:
    """Whether ``value`` is computed from the graph's inputs (or too far back to tell): a
    MatMul by such a value multiplies two activations."""
    seen: set[ir.Value] = set()
    work = [value]
    while work:
        v = work.pop()
        if v is None or v in seen:
            continue
        seen.add(v)
        if len(seen) > limit or (v.is_graph_input() and not v.is_initializer()):
            return True
        node = v.producer()
        if node is not None:
            work.extend(node.inputs)
        elif not v.is_initializer():
            return True  # from an enclosing graph
    return False


def _dequantized(value: ir.Value | None) -> bool:
    """Whether ``value`` is a ``DequantizeLinear``'s output, possibly behind layout nodes."""
    for _ in range(_MAX_LAYOUT_OPS + 1):
        node = None if value is None else value.producer()
        if node is None or not node.inputs:
            return False
        if node.op_type == "DequantizeLinear":
            return True
        if node.op_type not in LAYOUT_OPS:
            return False
        value = node.inputs[0]
    return False


def _affine_pair(ctx: _Context, graph: ir.Graph, site: AffineSite) -> _Pair:
    """The pair of an affine site, named by its links (filled in by :func:`_walk_back`)."""
    facts = rules.PairFacts(bn=_name(site.node), chain=True, can_unshare=True, rank_hint=_RANK_HINT)
    return _Pair(
        bn=site, graph=graph, facts=facts, name=facts.bn, bn_type=site.node.op_type, kind="affine"
    )


def _gains_nothing(pair: _Pair) -> bool:
    """An affine site whose fold would leave as many nodes: one ``Add`` (or ``z - a``) after a
    MatMul, which has no bias input (the fold would write the ``Add`` again), is its bias."""
    links = pair.link_nodes()
    p = pair.producer
    if p is None or p.bias_index is not None or len(links) != 1:
        return False
    return links[0].op == "add" or (links[0].op == "sub" and links[0].chain_first)


def _weight_shape(ctx: _Context, weight: StoredOperand[ir.Value]) -> tuple[int, ...] | None:
    """The shape of the weight operand the layer reads."""
    tensor = ctx.constants.stored(weight.source)
    if tensor is None:
        try:
            return tuple(ctx.constants.value(weight.source).shape)
        except NotConstant:
            return None
    shape = tuple(int(d) for d in tensor.shape)
    for perm in weight.perms:
        if len(perm) != len(shape):
            return None
        shape = tuple(shape[i] for i in perm)
    return shape


def _layout(p: ProducerCall, weight_shape: tuple[int, ...]) -> algebra.OutputLayout:
    """How the producer's weight operand holds its output channels."""
    if p.kind == "conv_transpose":
        return algebra.conv_transpose_layout(p.groups)
    return algebra.OutputLayout(axis=p.weight_axis)


def _walk_back(ctx: _Context, pair: _Pair) -> tuple[ir.Value | None, str]:
    """Follow the site's input back through layout nodes and affine links (without
    ``affine``: a constant Add right after the producer only) to a producer; return the
    producer's output (or ``None``) and, when there is none, what the input is. The nodes
    passed are recorded in ``pair.steps``."""
    if isinstance(pair.bn, AffineSite):
        site = pair.bn.link
        pair.steps.insert(0, site.node)
        pair.links[site.node] = site
        value: ir.Value | None = site.input
    else:
        value = pair.bn.input
    layouts = 0
    while value is not None:
        node = value.producer()
        if node is None:
            return None, f"{describe(value)}, a graph input or constant" + _through(pair)
        if node.graph is not pair.graph:
            return None, f"{describe(value)} from an enclosing graph{_through(pair)}"
        if node.op_type in LAYOUT_OPS and is_default_domain(node) and node.inputs:
            layouts += 1
            if layouts > _MAX_LAYOUT_OPS:
                return None, f"a chain of more than {_MAX_LAYOUT_OPS} layout operators"
            pair.steps.insert(0, node)
            value = node.inputs[0]
            continue
        if node.op_type in PRODUCER_OPS and is_default_domain(node):
            _name_links(ctx, pair)
            return value, ""
        link = ctx.link(node, per_channel=pair.affine_site)
        if link is not None and _passes(ctx, link):
            if len(pair.links) >= _MAX_LINKS:
                return None, f"a chain of more than {_MAX_LINKS} elementwise operators"
            pair.steps.insert(0, node)
            pair.links[node] = link
            value = link.input
            continue
        return None, f"{describe_node(node)}{_through(pair)}"
    return None, "nothing"


def _passes(ctx: _Context, link: LinkCall) -> bool:
    """Whether the walk back goes through ``link``: any link with ``affine``; without, only a
    constant ``Add`` right after a producer (a layer's bias)."""
    if ctx.affine:
        return True
    source = link.input.producer()
    return (
        link.op == "add"
        and source is not None
        and source.op_type in PRODUCER_OPS
        and is_default_domain(source)
    )


def _through(pair: _Pair) -> str:
    return f" (through {', '.join(n.op_type for n in pair.steps)})" if pair.steps else ""


def _name_links(ctx: _Context, pair: _Pair) -> None:
    """An affine site is named by its links: ``Mul_3 -> Add_4`` (op types ``Mul -> Add``),
    leaving out the ``Add`` an earlier fold gave a MatMul (not a node of the user's model)."""
    if not pair.affine_site:
        return
    links = [x for x in pair.link_nodes() if x.node not in ctx.created] or pair.link_nodes()
    pair.name = " -> ".join(_name(x.node) for x in links)
    pair.bn_type = " -> ".join(x.node.op_type for x in links)
    pair.facts = replace(pair.facts, bn=pair.name)


def _is_constant(ctx: _Context, value: ir.Value | None) -> bool:
    if value is None:
        return False
    try:
        ctx.constants.value(value)
    except NotConstant:
        return False
    return True


def _bn_constants(ctx: _Context, pair: _Pair) -> None:
    bn = pair.bn
    for v in (bn.weight, bn.bias, bn.mean, bn.var):
        if v is None:
            continue
        try:
            _bn_param(ctx, v)
        except NotConstant as e:
            _note(pair, bn_params_constant=False, constant_detail=str(e))
            return


def _bn_param(ctx: _Context, value: ir.Value) -> tuple[np.ndarray, bool]:
    """A BatchNorm parameter and whether it is spread: a constant, or one constant value spread
    over a shape known only at run time, which is that value for every channel (the PyTorch
    exporter writes ``Expand(CastLike(1, x), Shape(x))`` for the scale of a BatchNorm without
    affine parameters), returned 0-d."""
    try:
        return ctx.constants.value(value), False
    except NotConstant:
        fill = ctx.constants.uniform(value)
        if fill is None:
            raise
        return fill, True


def _producer_constants(ctx: _Context, pair: _Pair) -> None:
    p = pair.producer
    assert p is not None
    if not pair.facts.producer_params_constant:
        return
    for v in [p.bias] + [link.constant for link in pair.link_nodes()]:
        if v is None:
            continue
        try:
            ctx.constants.value(v)
        except NotConstant as e:
            _note(pair, producer_params_constant=False, constant_detail=str(e))
            return


def _consumers(pair: _Pair) -> None:
    """Every value between the producer and the site must feed the next step only."""
    p = pair.producer
    assert p is not None
    if pair.affine_site:
        steps, nexts = [p.node] + pair.steps[:-1], pair.steps
    else:
        steps = [p.node] + pair.steps
        nexts = steps[1:] + [pair.bn.node]
    for node, following in zip(steps, nexts, strict=True):
        out = node.outputs[0]
        # Readers of the shape or type only (Shape, CastLike's second input) see no change.
        readers = [u.node for u in out.uses() if reads_data(u.node, u.idx)]
        others = [u for u in readers if u is not following]
        uses = len(readers)
        if out.is_graph_output() or others or uses != 1:
            described = [describe_node(u) for u in others[:3]]
            if out.is_graph_output():
                described.insert(0, "a graph output")
            where = "" if node is p.node else f" (after {describe_node(node)})"
            _note(
                pair,
                producer_output_users=max(uses, 2),
                producer_other_users=", ".join(described) + where,
            )
            return
    for extra in p.node.outputs[1:]:
        if extra.uses() or extra.is_graph_output():
            _note(
                pair, producer_output_users=2, producer_other_users=f"its output {describe(extra)}"
            )
            return


def _producer_rank(ctx: _Context, pair: _Pair) -> int | None:
    """The rank of the producer's output (a MatMul's is its activation's)."""
    p = pair.producer
    assert p is not None
    if p.output_rank is not None:
        return p.output_rank
    out = p.node.outputs[0]
    x = p.node.inputs[0] if p.node.inputs else None
    before = 0  # the largest rank of a constant the links before the first layout node take
    for node in pair.steps:
        link = pair.links.get(node)
        if link is not None:
            before = max(before, _constant_rank(ctx, link))
            continue
        perm = attribute(node, "perm", ir.AttributeType.INTS)
        # A Transpose fixes the rank of what it reads: the producer's output, or what links
        # made of it, which has the producer's rank when their constants' ranks are lower.
        if node.op_type == "Transpose" and perm is not None and before < len(perm):
            return len(perm)
        break
    return ctx.rank(out) or ctx.rank(x)


def _constant_rank(ctx: _Context, link: LinkCall) -> int:
    value = link.constant
    try:
        return 0 if value is None else len(ctx.constants.shape(value, [0]))
    except NotConstant:
        return 0  # the constant-params rule refuses the fold before the rank matters


def _channel_axis(ctx: _Context, pair: _Pair) -> None:
    """Where the producer's output channels arrive at the BatchNorm, if that can be told."""
    p = pair.producer
    assert p is not None
    rank = _producer_rank(ctx, pair)
    pair.rank = rank
    if rank is None:
        return
    _note(pair, output_rank=rank)
    track = AxisTrack(rank, _feature_axis(p, rank))
    if track.axis < 0:
        _note(pair, axis_problem=f"{_name(p.node)}'s output is {rank}-D")
        return
    x = p.node.inputs[0] if p.node.inputs else None
    ranks = [(x, rank), (p.node.outputs[0], rank)]  # a producer's activation has its rank
    for node in pair.steps:
        link = pair.links.get(node)
        if link is not None:
            problem = _link_problem(ctx, pair, link, track)
            if problem:
                _note(pair, axis_problem=problem)
                return
            ranks.append((node.outputs[0], track.rank))
            continue
        if node.op_type == "Reshape":
            problem = _follow_reshape(ctx, pair, node, track)
        else:
            problem = follow(track, node, _layout_axes(ctx, node))
        if problem:
            _note(
                pair,
                axis_problem=f"bnfold cannot follow {_name(p.node)}'s output channels to "
                f"{_name(pair.bn.node)}: {problem}",
            )
            return
        ranks.append((node.outputs[0], track.rank))
    if not pair.affine_site:
        ranks.append((pair.bn.node.outputs[0], track.rank))
    problem = _annotation_problem(ranks)
    if problem:
        _note(pair, axis_problem=problem)
        return
    if pair.affine_site:  # links were checked where they are: no axis of its own to compare
        _note(pair, bn_axis=track.axis)
    _note(pair, channel_axis=track.axis, axis_path=" -> ".join(track.steps))
    if p.node.op_type == "Gemm" and p.bias is not None and pair.facts.producer_params_constant:
        c = ctx.constants.value(p.bias)
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            _note(
                pair,
                axis_problem=f"{describe_node(p.node)}'s C has shape {list(c.shape)}, a bias per "
                "row and not per output channel",
            )


def _follow_reshape(ctx: _Context, pair: _Pair, node: ir.Node, track: AxisTrack) -> str:
    """Move ``track`` through a Reshape that keeps the channels as the last axis: its input's
    last axis holds the ``n`` channels and its target shape ends in ``n``. Row-major order then
    maps every element of channel ``j`` to channel ``j``, whatever happens to the axes before.
    Anything else is not followed (returns why)."""
    n = pair.channels
    if n is None or track.axis != track.rank - 1:
        return f"{describe_node(node)} reshapes an activation whose channels are not its last axis"
    last = _last_entry(ctx, node.inputs[1] if len(node.inputs) > 1 else None)
    rank = ctx.rank(node.outputs[0])
    if last != n or rank is None or rank < 1:
        return f"{describe_node(node)} may move the {n} channels off the last axis"
    track.rank, track.axis = rank, rank - 1
    track.steps.append(f"Reshape(..., {n})")
    return ""


def _last_entry(ctx: _Context, value: ir.Value | None, depth: int = 0) -> int | None:
    """The last entry of a Reshape's target shape when it is known, even if the others are
    computed at run time (``Concat(Gather(Shape(x), ...), [16])``)."""
    if value is None or depth > 8:
        return None
    try:
        shape = ctx.constants.value(value)
        return int(shape.reshape(-1)[-1]) if shape.size and shape.dtype.kind in "iu" else None
    except NotConstant:
        pass
    node = value.producer()
    if node is None or not is_default_domain(node) or not node.inputs:
        return None
    if node.op_type in ("Cast", "Identity"):
        return _last_entry(ctx, node.inputs[0], depth + 1)
    if node.op_type == "Concat" and attribute(node, "axis", ir.AttributeType.INT, None) in (0, -1):
        return _last_entry(ctx, node.inputs[-1], depth + 1)
    return None


def _annotation_problem(ranks: list[tuple[ir.Value | None, int]]) -> str:
    """Why the fold cannot go on when the model annotates a value on its path (``value_info``,
    a graph output's type, a subgraph's declared input) with a rank other than the one the
    operators give it from the declared inputs; ``""`` when none does."""
    for value, rank in ranks:
        if value is None or value.shape is None or len(value.shape) == rank:
            continue
        return (
            f"the model annotates {describe(value)} as {len(value.shape)}-D, but from its "
            f"declared inputs and weights it is {rank}-D; bnfold does not fold where a model's "
            "own shapes contradict each other (onnx.checker.check_model(model, "
            "full_check=True) reports it): correct or remove the value_info and output shapes"
        )
    return ""


def _layout_axes(ctx: _Context, node: ir.Node) -> list[int] | None:
    if node.op_type not in ("Unsqueeze", "Squeeze"):
        return None
    if opset_version(ctx.model, node) < 13:
        axes = attribute(node, "axes", ir.AttributeType.INTS)
        return [int(a) for a in axes] if axes else None
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    try:
        given = ctx.constants.value(node.inputs[1])
    except NotConstant:
        return None
    if given.size > MAX_RANK:
        return None
    axes = [int(a) for a in given.reshape(-1)]
    return axes or None  # empty axes mean "every 1-sized axis" to onnxruntime: not followed


def _link_problem(ctx: _Context, pair: _Pair, link: LinkCall, track: AxisTrack) -> str:
    """Why ``link``'s constant is not one value, or one value per output channel along the
    axis where the producer's channels are at that point (``""`` when it is): a constant
    varying along another axis, or one that would broadcast the activation to a bigger shape,
    cannot fold."""
    value = link.constant
    if value is None:
        return ""
    try:
        shape = tuple(ctx.constants.shape(value, [0]))
    except NotConstant:
        return ""  # the constant-params rule refuses the fold first
    n = pair.channels
    p = pair.producer
    assert p is not None
    where = f"the constant of {describe_node(link.node)}"
    if len(shape) > track.rank:
        return (
            f"{where} has shape {list(shape)}: it broadcasts {_name(p.node)}'s {track.rank}-D "
            "output to a higher rank"
        )
    offset = track.rank - len(shape)
    along = [i + offset for i, d in enumerate(shape) if d != 1]
    if any(i != track.axis for i in along):
        return (
            f"{where} has shape {list(shape)}, which varies along axis "
            f"{next(i for i in along if i != track.axis)} of the {track.rank}-D activation, "
            f"not only along the channels of {_name(p.node)} (axis {track.axis})"
        )
    if along and n is not None and shape[track.axis - offset] != n:
        return (
            f"{where} has shape {list(shape)}: {shape[track.axis - offset]} values for the {n} "
            f"channels of {_name(p.node)}"
        )
    return ""


def _feature_axis(p: ProducerCall, rank: int) -> int:
    """The axis of the producer's ``rank``-D output that holds its channels."""
    return rules.producer_channel_axis(p.kind, rank, p.spatial_dims, p.feature_axis)  # type: ignore[arg-type]


def _sharing(ctx: _Context, pair: _Pair) -> None:
    """Who else reads the stored weight (shape-only readers such as ``Shape`` do not count)."""
    w = pair.weight
    p = pair.producer
    if w is None or p is None or pair.weight_computed:
        return  # a computed weight is written to a new initializer: nothing else changes
    readers = list(w.path) + [p.node]
    value = w.source
    others: list[str] = []
    for step, reader in enumerate(readers):
        for use in value.uses():
            # The step that leads to the producer is not a second reader; anything else is,
            # also the producer reading the same tensor through another input (W @ W).
            expected = use.idx == 0 if step < len(w.path) else use.idx == p.weight_index
            if (use.node is reader and expected) or not reads_data(use.node, use.idx):
                continue
            others.append(describe_node(use.node))
        if value.is_graph_output():
            others.append("a graph output")
        if step < len(w.path):
            value = reader.outputs[0]
    if w.source.producer() is not None and not others:
        return  # a Constant node: it is always replaced by a new initializer
    if others:
        pair.weight_shared = ", ".join(dict.fromkeys(others))
        _note(pair, producer_params_shared=pair.weight_shared)


# --------------------------------------------------------------------------------------------
# Computing and applying one fold


@dataclass
class _Fold:
    weight: np.ndarray
    weight_in_place: bool
    bias: np.ndarray  # (n,): the producer's new bias, or what an Add after a MatMul adds
    dtype: ir.DataType


def _compute(ctx: _Context, pair: _Pair) -> _Fold:
    p, w = pair.producer, pair.weight
    assert p is not None and w is not None and pair.rank is not None
    c = ctx.constants
    if pair.weight_computed:
        stored = c.value(w.source)
        dtype = ir.DataType.from_numpy(stored.dtype)
    else:
        tensor = c.stored(w.source)
        assert tensor is not None
        dtype = tensor.dtype
        try:
            stored = np.asarray(tensor.numpy())
        except Exception as e:  # a damaged tensor (its data does not match its shape)
            raise FoldRefused(f"the weight {describe(w.source)} cannot be read: {e}") from e
    in_place = (
        not pair.weight_shared
        and not pair.weight_computed
        and w.source.is_initializer()
        and (not w.perms or p.kind == "linear")
    )
    weight = stored if in_place else w.operand(stored)
    if p.kind == "conv_transpose":
        layout = algebra.conv_transpose_layout(p.groups)
    else:
        axis = w.source_axis(p.weight_axis) if in_place else p.weight_axis
        layout = algebra.OutputLayout(axis=axis)
    n = layout.out_channels(tuple(weight.shape))
    k, shift = _composed(ctx, pair, n)
    new_weight = algebra.scale_output_channels(weight, k, layout)
    # Sums and products that overflow become inf or NaN, which the checks below refuse.
    with np.errstate(over="ignore", invalid="ignore"):
        new_bias = _folded_bias(ctx, pair, n, k, shift, stored)
    if pair.link_nodes():
        algebra.require_headroom(new_bias, stored.dtype, pair.name)
    return _Fold(new_weight, in_place, new_bias, dtype)


def _composed(ctx: _Context, pair: _Pair, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(k, c)``: the links and the BatchNorm after the producer as one per-channel
    ``k*z + c`` (:func:`bnfold.core.affine.compose`, float64)."""
    steps = []
    for link in pair.link_nodes():
        where = describe_node(link.node)
        value = None if link.constant is None else ctx.constants.value(link.constant)
        if value is not None and value.size not in (1, n):  # checked by _link_problem
            raise FoldRefused(f"the constant of {where} has shape {list(value.shape)}")
        steps.append(affine.Step(link.op, value, link.chain_first, where))  # type: ignore[arg-type]
    bn = pair.bn
    if isinstance(bn, BatchNormCall):
        steps.append(affine.Step("affine", _bn_factors(ctx, pair, n), where=_name(bn.node)))
    return affine.compose(steps, n)


def _bn_factors(ctx: _Context, pair: _Pair, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The BatchNorm's ``(s, t)``."""
    bn, p = pair.bn, pair.producer
    assert isinstance(bn, BatchNormCall) and p is not None
    # A parameter spread over a run-time shape is the same for every channel; any other must
    # have one value per channel (a computed 0-d one is invalid: onnxruntime refuses it).
    params = []
    for name, v in (("mean", bn.mean), ("var", bn.var), ("scale", bn.weight), ("B", bn.bias)):
        a, spread = _bn_param(ctx, v)
        if not spread and a.shape != (n,):  # before the float64 copies of affine_factors
            raise FoldRefused(
                f"{describe_node(bn.node)}'s {name} has shape {list(a.shape)}, not one value "
                f"for each of the {n} channels of {_name(p.node)}"
            )
        params.append(np.full(n, a.reshape(())) if spread else a)
    mean, var, scale, shift = params
    return algebra.affine_factors(mean, var, bn.eps, scale, shift)


def _folded_bias(
    ctx: _Context, pair: _Pair, n: int, k: np.ndarray, shift: np.ndarray, like: np.ndarray
) -> np.ndarray:
    """``k * b + shift`` in ``like``'s dtype, ``b`` being the layer's own bias; its shape is
    checked before anything is converted to float64."""
    p, c = pair.producer, ctx.constants
    assert p is not None
    total = np.zeros(n)
    if p.bias is not None:
        b = c.value(p.bias)
        if p.node.op_type == "Gemm":  # C per row is refused by _channel_axis
            if b.shape[-1:] not in ((), (1,), (n,)):
                raise FoldRefused(
                    f"{describe_node(p.node)}'s C has shape {list(b.shape)}, which is neither "
                    f"one value nor one per output channel ({n})"
                )
            b = p.gemm_beta * b.astype(np.float64).reshape(b.shape[-1:])
        elif b.shape != (n,):
            raise FoldRefused(f"{describe_node(p.node)}'s bias has shape {list(b.shape)}")
        else:
            b = b.astype(np.float64)
        total = total + np.broadcast_to(b, (n,))
    if not np.isfinite(total).all():
        raise FoldRefused("the layer's bias is not finite")
    return algebra.folded_bias(None, k, k * total + shift, like=like, dtype=like.dtype)


def _new_initializer(
    ctx: _Context, graph: ir.Graph, base: str, array: np.ndarray, dtype: ir.DataType
) -> ir.Value:
    name = ctx.unique(base)
    tensor = ir.Tensor(np.ascontiguousarray(array), dtype=dtype, name=name)
    value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(dtype))
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    if ctx.legacy_inputs:
        graph.inputs.append(value)
    return value


def _apply(ctx: _Context, pair: _Pair, fold: _Fold) -> None:
    bn, p, w, graph = pair.bn, pair.producer, pair.weight, pair.graph
    assert p is not None and w is not None
    dtype = fold.dtype
    dead: list[ir.Value] = []
    if isinstance(bn, BatchNormCall):
        dead += [v for v in (bn.weight, bn.bias, bn.mean, bn.var) if v is not None]
    if fold.weight_in_place:
        w.source.const_value = ir.Tensor(fold.weight, dtype=dtype, name=w.source.name)
        # The other values stay cached: the rewrite touches no other constant's data.
        ctx.constants.changed(w.source)
    else:
        base = f"{w.source.name or _name(p.node)}_folded"
        new = _new_initializer(ctx, graph, base, fold.weight, dtype)
        old = p.node.inputs[p.weight_index]
        p.node.replace_input_with(p.weight_index, new)
        if old is not None:
            dead.append(old)
    bias_base = bias_name(w.source.name or "", _name(p.node))
    if p.bias_index is not None:
        bias_value = _new_initializer(ctx, graph, bias_base, fold.bias, dtype)
        if len(p.node.inputs) <= p.bias_index:
            p.node.resize_inputs(p.bias_index + 1)
        old_bias = p.node.inputs[p.bias_index]
        p.node.replace_input_with(p.bias_index, bias_value)
        if old_bias is not None:
            dead.append(old_bias)
        if p.node.op_type == "Gemm":
            p.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    elif fold.bias.any() or any(x.op in ("add", "sub") for x in pair.link_nodes()):
        # MatMul has no bias input: one Add after it (on the last axis, where its channels
        # are); its own bias Add, right after it, stays with the new constant
        bias_value = _new_initializer(ctx, graph, bias_base, fold.bias, dtype)
        first = pair.links.get(pair.steps[0]) if pair.steps else None
        if first is not None and first.op == "add":
            assert first.const_index is not None and first.constant is not None
            dead.append(first.constant)
            first.node.replace_input_with(first.const_index, bias_value)
            del pair.links[first.node]  # stays in the graph
            pair.steps.pop(0)
            return _finish(ctx, pair, dead)
        last = p.node.outputs[0]
        add = ir.node("Add", [last, bias_value], name=ctx.unique(f"{_name(p.node)}_bias"))
        ctx.created.add(add)
        out = add.outputs[0]
        out.name = ctx.unique(f"{last.name or _name(p.node)}_biased")
        out.type, out.shape = last.type, last.shape
        for use in last.uses():
            if use.node is not add:
                use.node.replace_input_with(use.idx, out)
        graph.insert_after(p.node, add)
    _finish(ctx, pair, dead)


def _finish(ctx: _Context, pair: _Pair, dead: list[ir.Value]) -> None:
    """Remove the site's links and BatchNorm, and what that leaves unused."""
    bn = pair.bn
    for link in reversed(pair.link_nodes()):
        if link.constant is not None:
            dead.append(link.constant)
        _bypass(link.node, link.input)
    if isinstance(bn, BatchNormCall):
        x = bn.node.inputs[0]  # what the links' removal left it reading
        assert x is not None
        _bypass(bn.node, x)
    _drop_unused(ctx, dead)


def _bypass(node: ir.Node, replacement: ir.Value) -> None:
    """Remove ``node``, whose output becomes ``replacement`` for every reader; a graph output
    keeps its name (and what the model says of it)."""
    y = node.outputs[0]
    graph = node.graph
    assert graph is not None
    name = y.name
    was_output = y.is_graph_output()
    if replacement.type is None:
        replacement.type = y.type
    if replacement.shape is None:
        replacement.shape = y.shape
    y.replace_all_uses_with(replacement, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if was_output and name:
        y.name = None
        replacement.name = name
        replacement.doc_string = replacement.doc_string or y.doc_string
        replacement.metadata_props.update(y.metadata_props)


def _drop_unused(ctx: _Context, values: Iterable[ir.Value]) -> None:
    """Remove the given values' producers and initializers when nothing uses them any more,
    and so on upstream: the constant subgraphs the fold made dead, and nothing else."""

    def drop(value: ir.Value) -> list[ir.Value] | None:
        if value.uses() or value.is_graph_output():
            return None
        node = value.producer()
        if node is not None:
            graph = node.graph
            if (
                graph is None
                or any(o.uses() or o.is_graph_output() for o in node.outputs)
                or any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values())
                or any(a.type == ir.AttributeType.GRAPHS for a in node.attributes.values())
            ):
                return None
            inputs = [v for v in node.inputs if v is not None]
            graph.remove(node, safe=True)
            return inputs
        if value.is_initializer():
            graph = value.graph
            if graph is None or (value.is_graph_input() and not ctx.legacy_inputs):
                return None
            if value.is_graph_input():
                graph.inputs.remove(value)
            graph.initializers.pop(value.name)
        return None

    pipeline.drop_dead(values, drop)


# --------------------------------------------------------------------------------------------
# The adapter


class OnnxAdapter:
    """An ONNX model (every graph, subgraphs included) as a
    :class:`bnfold.core.pipeline.GraphAdapter`. Construct it inside :func:`folding`."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx

    def batch_norms(self) -> list[BatchNormCall | AffineSite]:
        """Every BatchNormalization and, with ``affine``, the last link of every run of affine
        links (one whose output does not go on, alone, through layout nodes into another link
        or a BatchNormalization, which would take the run in its own walk back)."""
        found: list[BatchNormCall | AffineSite] = []
        model = self.ctx.model
        for graph in model.graphs():
            for node in graph:
                bn = batch_norm_call(node, opset_version(model, node))
                if bn is not None:
                    found.append(bn)
                    continue
                if not self.ctx.affine:
                    continue
                link = self.ctx.link(node, per_channel=True)
                if link is not None and not self._continues(link.output):
                    found.append(
                        AffineSite(
                            node=node,
                            link=link,
                            input=link.input,
                            output=link.output,
                            weight=None,
                            bias=None,
                            mean=None,
                            var=None,
                            eps=None,
                        )
                    )
        return found

    def _continues(self, value: ir.Value) -> bool:
        """Whether a walk back from a later link or BatchNorm passes ``value``: its only
        reader, past layout nodes that are each the only reader, is one of them."""
        for _ in range(_MAX_LAYOUT_OPS + 1):
            if value.is_graph_output():
                return False
            readers = [u for u in value.uses() if reads_data(u.node, u.idx)]
            if len(readers) != 1:  # (the walk back's consumer check refuses the same)
                return False
            node, idx = readers[0].node, readers[0].idx
            if node.graph is not defining_graph(value) or not is_default_domain(node):
                return False
            if node.op_type == "BatchNormalization":
                return idx == 0
            if node.op_type in LAYOUT_OPS:
                if idx != 0 or not node.outputs:
                    return False
                value = node.outputs[0]
                continue
            link = self.ctx.link(node, per_channel=True)
            return link is not None and link.chain_index == idx
        return False

    def examine(self, bn: BatchNormCall) -> _Pair:
        graph = bn.node.graph
        assert graph is not None
        return _examine(self.ctx, graph, bn)

    def compute(self, pair: _Pair) -> _Fold:
        return _compute(self.ctx, pair)

    def apply(self, folds: list[tuple[_Pair, _Fold]]) -> None:
        for pair, fold in folds:
            _apply(self.ctx, pair, fold)

    def upstream(self, bn: BatchNormCall | AffineSite) -> list[ir.Value]:
        """The values :func:`_walk_back` passes from the site's input: through layout nodes
        and affine links (every input of an arithmetic node)."""
        found: list[ir.Value] = []
        value = bn.input
        for _ in range(_MAX_LAYOUT_OPS + _MAX_LINKS + 1):
            if value is None:
                break
            found.append(value)
            node = value.producer()
            if node is None or not node.inputs:
                break
            if node.op_type in ("Add", "Sub", "Mul", "Div"):
                found.extend(v for v in node.inputs if v is not None)
                link = self.ctx.link(node)
                if link is None:
                    break
                value = link.input
                continue
            if node.op_type not in LAYOUT_OPS and node.op_type != "Neg":
                break
            value = node.inputs[0]
        return found

    def extra_entries(self) -> list[FoldEntry]:
        return _function_entries(self.ctx.model)


@contextlib.contextmanager
def folding(model: ir.Model, affine: bool = True) -> Iterator[OnnxAdapter]:
    """The adapter for ``model``: its nodes are checked before anything is decided or changed
    (``fold(inplace=True)`` included), and its constant cache is dropped afterwards (it may hold
    views of the caller's memory-mapped tensors). ``affine``: fold plain per-channel arithmetic
    too (affine sites, and links before a BatchNorm)."""
    ctx = _Context(model, affine)
    check_nodes(model.graphs(), ctx.constants)
    try:
        yield OnnxAdapter(ctx)
    finally:
        ctx.constants.clear()
        ctx._link_constants.clear()


def report(model: ir.Model, entries: list[FoldEntry]) -> FoldReport:
    """The report of a fold of ``model``."""
    return FoldReport(entries, model=model.graph.name or "ONNX model")


def _label(pair: _Pair) -> str:
    p = pair.producer
    if p is None:
        return ""
    if pair.affine_site:
        return p.node.op_type
    return "+".join([p.node.op_type] + [x.node.op_type for x in pair.link_nodes()])


def _function_entries(model: ir.Model) -> list[FoldEntry]:
    entries = []
    for function in model.functions.values():
        for node in function.all_nodes():
            if node.op_type == "BatchNormalization" and is_default_domain(node):
                entries.append(
                    FoldEntry(
                        bn=f"{function.name}/{_name(node)}",
                        target=None,
                        action="skipped",
                        rule=rules.MODULE_BOUNDARY,
                        reason=(
                            f"inside model-local function {function.domain}:{function.name}, "
                            "whose body serves every call; inline the functions first "
                            "(onnx.inliner.inline_local_functions)"
                        ),
                        bn_type="BatchNormalization",
                    )
                )
    return entries
