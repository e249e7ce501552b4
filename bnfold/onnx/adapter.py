"""ONNX frontend: fold BatchNormalization into Conv, ConvTranspose, Gemm and MatMul.

Works on the ``onnx_ir`` in-memory graph. For every BatchNormalization, in topological order:
find the producer behind it (through ``Identity``/``Transpose``/``Unsqueeze``/``Squeeze``,
and a constant ``Add`` after the producer), gather the facts :mod:`bnfold.core.rules` decides on,
compute the fold with :mod:`bnfold.core.algebra`, and rewrite: the weight is scaled where it is
stored (or copied to a new initializer when something else reads it), the bias replaced by a
new initializer, the BatchNorm removed and its output name kept when it is a graph output.
What the fold leaves unused (the BatchNorm's parameters, the old bias and the constant
subgraph that made it) is removed; nothing else in the model changes.

Folding in topological order means a chain ``Conv -> BN -> BN`` folds both at once.
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

from ..core import algebra, pipeline, rules
from ..core.pipeline import Pair, StoredOperand, bias_name, unique_name
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
    ProducerCall,
    batch_norm_call,
    follow,
    producer_call,
)

_RANK_HINT = (
    "give the model's inputs shapes of known rank (bnfold runs ONNX shape inference, which "
    "could not tell)"
)
_MAX_LAYOUT_OPS = 8


# --------------------------------------------------------------------------------------------
# What one BatchNorm pair looks like


@dataclass(kw_only=True)
class _Pair(Pair[ir.Node]):
    """A pair and what its rewrite needs: the layout nodes and a constant ``Add`` between the
    producer and the BatchNorm, where the weight is stored and who else reads it."""

    bn: BatchNormCall
    graph: ir.Graph
    producer: ProducerCall | None = None
    add: ir.Node | None = None  # an Add of a constant right after the producer
    add_const: int = 1  # which input of ``add`` is the constant
    chain: list[ir.Node] = field(default_factory=list)  # layout nodes, producer side first
    weight: StoredOperand[ir.Value] | None = None
    weight_shared: str = ""
    rank: int | None = None  # rank of the producer's output


def _note(pair: _Pair, **changes: Any) -> None:
    """Record facts learnt about ``pair`` (field names of :class:`~bnfold.core.rules.PairFacts`)."""
    pair.facts = replace(pair.facts, **changes)


class _Context:
    """Per-fold state: the model, its constants, the names in use and inferred ranks."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.constants = Constants(model, self.dtype)
        self.legacy_inputs = (model.ir_version or 0) < 4  # IR 3 lists initializers as inputs
        self._names: set[str] | None = None
        self._inferred: dict[tuple[ir.Graph, str], tuple[int | None, int]] | None = None

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


def _examine(ctx: _Context, graph: ir.Graph, bn: BatchNormCall) -> _Pair:
    """Find the producer behind ``bn`` and everything the rules need about the pair."""
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
                    tensor = ctx.constants.stored(pair.weight.source)
                    weight_rank = None if tensor is None else len(tensor.shape)
        except NotConstant as e:
            _note(pair, constant_detail=str(e), producer_params_constant=False)
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
        return pair
    p = pair.producer
    pair.target, pair.target_type = _name(p.node), _label(pair)
    _note(
        pair,
        producer=pair.target,
        producer_kind=p.kind,
        producer_spatial_dims=p.spatial_dims,
        producer_feature_axis=p.feature_axis,
    )
    _bn_constants(ctx, pair)
    _producer_constants(ctx, pair)
    _consumers(pair)
    _channel_axis(ctx, pair)
    _sharing(ctx, pair)
    return pair


def _walk_back(ctx: _Context, pair: _Pair) -> tuple[ir.Value | None, str]:
    """Follow the BatchNorm's input back through layout nodes and a constant Add; return the
    producer's output (or ``None``) and, when there is no producer, what the input is."""
    value = pair.bn.input
    while value is not None:
        node = value.producer()
        if node is None:
            return None, f"{describe(value)}, a graph input or constant"
        if node.graph is not pair.graph:
            return None, f"{describe(value)} from an enclosing graph"
        if node.op_type in LAYOUT_OPS and is_default_domain(node) and node.inputs:
            if len(pair.chain) >= _MAX_LAYOUT_OPS:
                return None, f"a chain of more than {_MAX_LAYOUT_OPS} layout operators"
            pair.chain.insert(0, node)
            value = node.inputs[0]
            continue
        if node.op_type in PRODUCER_OPS and is_default_domain(node):
            return value, ""
        if node.op_type == "Add" and is_default_domain(node) and len(node.inputs) == 2:
            for const in (1, 0):
                other = node.inputs[1 - const]
                source = None if other is None else other.producer()
                if (
                    source is not None
                    and source.graph is pair.graph
                    and source.op_type in PRODUCER_OPS
                    and is_default_domain(source)
                    and _is_constant(ctx, node.inputs[const])
                ):
                    pair.add, pair.add_const = node, const
                    return other, ""
        via = f" (through {', '.join(n.op_type for n in pair.chain)})" if pair.chain else ""
        return None, f"{describe_node(node)}{via}"
    return None, "nothing"


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
    for v in (p.bias, pair.add.inputs[pair.add_const] if pair.add else None):
        if v is None:
            continue
        try:
            ctx.constants.value(v)
        except NotConstant as e:
            _note(pair, producer_params_constant=False, constant_detail=str(e))
            return


def _consumers(pair: _Pair) -> None:
    """Every value between the producer and the BatchNorm must feed the next step only."""
    p = pair.producer
    assert p is not None
    steps = [p.node] + ([pair.add] if pair.add else []) + pair.chain
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
    if pair.chain and pair.chain[0].op_type == "Transpose":
        perm = attribute(pair.chain[0], "perm", ir.AttributeType.INTS)
        # The Transpose fixes the rank of what it reads: the producer's output, or the sum with
        # the added constant, which has the producer's rank when the constant's is lower.
        if perm is not None and (pair.add is None or _constant_rank(ctx, pair) < len(perm)):
            return len(perm)
    return ctx.rank(out) or ctx.rank(x)


def _constant_rank(ctx: _Context, pair: _Pair) -> int:
    assert pair.add is not None
    value = pair.add.inputs[pair.add_const]
    assert value is not None
    return ctx.constants.value(value).ndim


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
    ranks += [(pair.add.outputs[0], rank)] if pair.add is not None else []
    for node in pair.chain:
        axes = _layout_axes(ctx, node)
        problem = follow(track, node, axes)
        if problem:
            _note(
                pair,
                axis_problem=f"bnfold cannot follow {_name(p.node)}'s output channels to "
                f"{_name(pair.bn.node)}: {problem}",
            )
            return
        ranks.append((node.outputs[0], track.rank))
    ranks.append((pair.bn.node.outputs[0], track.rank))
    problem = _annotation_problem(ranks)
    if problem:
        _note(pair, axis_problem=problem)
        return
    _note(pair, channel_axis=track.axis, axis_path=" -> ".join(track.steps))
    if pair.add is not None:
        _check_add(ctx, pair)
    if p.node.op_type == "Gemm" and p.bias is not None and pair.facts.producer_params_constant:
        c = ctx.constants.value(p.bias)
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            _note(
                pair,
                axis_problem=f"{describe_node(p.node)}'s C has shape {list(c.shape)}, a bias per "
                "row and not per output channel",
            )


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


def _check_add(ctx: _Context, pair: _Pair) -> None:
    """The constant added after the producer must be one value per output channel."""
    assert pair.add is not None and pair.rank is not None and pair.producer is not None
    const = ctx.constants.value(pair.add.inputs[pair.add_const])
    axis = _feature_axis(pair.producer, pair.rank)
    if not _per_channel(const.shape, pair.rank, axis):
        _note(
            pair,
            axis_problem=(
                f"the constant added by {describe_node(pair.add)} has shape {list(const.shape)}, "
                f"which is not one value per channel of {_name(pair.producer.node)}'s "
                f"{pair.rank}-D output"
            ),
        )


def _feature_axis(p: ProducerCall, rank: int) -> int:
    """The axis of the producer's ``rank``-D output that holds its channels."""
    return rules.producer_channel_axis(p.kind, rank, p.spatial_dims, p.feature_axis)  # type: ignore[arg-type]


def _per_channel(shape: tuple[int, ...], rank: int, axis: int) -> bool:
    if len(shape) > rank:
        return False
    offset = rank - len(shape)
    return all(d == 1 for i, d in enumerate(shape) if i + offset != axis)


def _sharing(ctx: _Context, pair: _Pair) -> None:
    """Who else reads the stored weight (shape-only readers such as ``Shape`` do not count)."""
    w = pair.weight
    p = pair.producer
    if w is None or p is None:
        return
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
    bias: np.ndarray
    bias_shape: tuple[int, ...]


def _compute(ctx: _Context, pair: _Pair) -> _Fold:
    bn, p, w = pair.bn, pair.producer, pair.weight
    assert p is not None and w is not None and pair.rank is not None
    c = ctx.constants
    tensor = c.stored(w.source)
    assert tensor is not None
    try:
        stored = np.asarray(tensor.numpy())
    except Exception as e:  # a damaged tensor (its data does not match its shape)
        raise FoldRefused(f"the weight {describe(w.source)} cannot be read: {e}") from e
    in_place = (
        not pair.weight_shared and w.source.is_initializer() and (not w.perms or p.kind == "linear")
    )
    weight = stored if in_place else w.operand(stored)
    if p.kind == "conv_transpose":
        layout = algebra.conv_transpose_layout(p.groups)
    else:
        axis = w.source_axis(p.weight_axis) if in_place else p.weight_axis
        layout = algebra.OutputLayout(axis=axis)
    n = layout.out_channels(tuple(weight.shape))
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
    s, t = algebra.affine_factors(mean, var, bn.eps, scale, shift)
    new_weight = algebra.scale_output_channels(weight, s, layout)
    # Sums and products that overflow become inf or NaN, which the checks below refuse.
    with np.errstate(over="ignore", invalid="ignore"):
        new_bias = _folded_bias(ctx, pair, n, s, t, stored)
    keep_add = pair.add is not None and p.bias_index is None
    if keep_add and p.channel_last:
        bias_shape: tuple[int, ...] = (n,)
    elif keep_add:
        bias_shape = (n,) + (1,) * (pair.rank - 2)
    else:
        bias_shape = (n,)
    return _Fold(new_weight, in_place, new_bias, bias_shape)


def _folded_bias(
    ctx: _Context, pair: _Pair, n: int, s: np.ndarray, t: np.ndarray, like: np.ndarray
) -> np.ndarray:
    """``s * b + t`` in ``like``'s dtype, ``b`` being the layer's bias plus the constant added after
    it; their shapes are checked before anything is converted to float64."""
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
    if pair.add is not None:
        a = c.value(pair.add.inputs[pair.add_const])
        if a.size not in (1, n):
            raise FoldRefused(f"the constant added after the layer has shape {list(a.shape)}")
        a = a.astype(np.float64)
        vector = np.full(n, a.reshape(-1)[0]) if a.size == 1 else a.reshape(-1)
        total = total + vector
    if not np.isfinite(total).all():
        raise FoldRefused("the layer's bias is not finite")
    return algebra.folded_bias(None, s, s * total + t, like=like, dtype=like.dtype)


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
    tensor = ctx.constants.stored(w.source)
    assert tensor is not None
    dtype = tensor.dtype
    dead: list[ir.Value] = [v for v in (bn.weight, bn.bias, bn.mean, bn.var) if v is not None]
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
    bias_value = _new_initializer(
        ctx,
        graph,
        bias_name(w.source.name or "", _name(p.node)),
        fold.bias.reshape(fold.bias_shape),
        dtype,
    )
    last = p.node.outputs[0]
    if p.bias_index is not None:
        if len(p.node.inputs) <= p.bias_index:
            p.node.resize_inputs(p.bias_index + 1)
        old_bias = p.node.inputs[p.bias_index]
        p.node.replace_input_with(p.bias_index, bias_value)
        if old_bias is not None:
            dead.append(old_bias)
        if p.node.op_type == "Gemm":
            p.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        if pair.add is not None:
            add_out = pair.add.outputs[0]
            dead.append(pair.add.inputs[pair.add_const])  # type: ignore[arg-type]
            add_out.replace_all_uses_with(last)
            graph.remove(pair.add, safe=True)
    elif pair.add is not None:
        dead.append(pair.add.inputs[pair.add_const])  # type: ignore[arg-type]
        pair.add.replace_input_with(pair.add_const, bias_value)
        last = pair.add.outputs[0]
    else:
        add = ir.node("Add", [last, bias_value], name=ctx.unique(f"{_name(p.node)}_bias"))
        out = add.outputs[0]
        out.name = ctx.unique(f"{last.name or _name(p.node)}_biased")
        out.type, out.shape = last.type, last.shape
        for use in last.uses():
            if use.node is not add:
                use.node.replace_input_with(use.idx, out)
        graph.insert_after(p.node, add)
        last = out
    if pair.chain:
        last = pair.chain[-1].outputs[0]
    _remove_batch_norm(bn, last)
    _drop_unused(ctx, dead)


def _remove_batch_norm(bn: BatchNormCall, replacement: ir.Value) -> None:
    y = bn.node.outputs[0]
    graph = bn.node.graph
    assert graph is not None
    name = y.name
    was_output = y.is_graph_output()
    if replacement.type is None:
        replacement.type = y.type
    if replacement.shape is None:
        replacement.shape = y.shape
    y.replace_all_uses_with(replacement, replace_graph_outputs=True)
    graph.remove(bn.node, safe=True)
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

    def batch_norms(self) -> list[BatchNormCall]:
        found = []
        model = self.ctx.model
        for graph in model.graphs():
            for node in graph:
                bn = batch_norm_call(node, opset_version(model, node))
                if bn is not None:
                    found.append(bn)
        return found

    def examine(self, bn: BatchNormCall) -> _Pair:
        graph = bn.node.graph
        assert graph is not None
        return _examine(self.ctx, graph, bn)

    def compute(self, pair: _Pair) -> _Fold:
        return _compute(self.ctx, pair)

    def apply(self, folds: list[tuple[_Pair, _Fold]]) -> None:
        for pair, fold in folds:
            _apply(self.ctx, pair, fold)

    def upstream(self, bn: BatchNormCall) -> list[ir.Value]:
        """The values :func:`_walk_back` passes from the BatchNorm's input: through layout
        nodes, and both inputs of an ``Add``."""
        found: list[ir.Value] = []
        value = bn.input
        for _ in range(_MAX_LAYOUT_OPS + 1):
            if value is None:
                break
            found.append(value)
            node = value.producer()
            if node is None or not node.inputs:
                break
            if node.op_type == "Add":
                found.extend(v for v in node.inputs if v is not None)
                break
            if node.op_type not in LAYOUT_OPS:
                break
            value = node.inputs[0]
        return found

    def extra_entries(self) -> list[FoldEntry]:
        return _function_entries(self.ctx.model)


@contextlib.contextmanager
def folding(model: ir.Model) -> Iterator[OnnxAdapter]:
    """The adapter for ``model``: its nodes are checked before anything is decided or changed
    (``fold(inplace=True)`` included), and its constant cache is dropped afterwards (it may hold
    views of the caller's memory-mapped tensors)."""
    ctx = _Context(model)
    check_nodes(model.graphs(), ctx.constants)
    try:
        yield OnnxAdapter(ctx)
    finally:
        ctx.constants.clear()


def report(model: ir.Model, entries: list[FoldEntry]) -> FoldReport:
    """The report of a fold of ``model``."""
    return FoldReport(entries, model=model.graph.name or "ONNX model")


def _label(pair: _Pair) -> str:
    p = pair.producer
    if p is None:
        return ""
    return p.node.op_type + ("+Add" if pair.add is not None else "")


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
