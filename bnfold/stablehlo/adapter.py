"""The StableHLO graph adapter: per-channel affine chains after convolutions and dot_generals.

A StableHLO module has no BatchNorm op as JAX writes it: flax's ``BatchNorm`` becomes
``subtract``/``multiply``/``add`` by broadcast constants, after the convolution's own bias
``add``. The adapter reads every function's ops as links (:mod:`.ops`), groups them into
maximal per-channel affine chains (:func:`bnfold.core.affine.chains`), and hands the pipeline
each chain that scales channel by channel (or holds a ``batch_norm_inference``) as one
BatchNorm. A chain whose input is a producer's output folds into it: the weight operand becomes
a new constant scaled along the weight axis that feeds the chain's axis, and the chain becomes
one ``add`` of the composed shift (none when the shift is zero).

The rules are the shared ones: the chain's parameters and the producer's weight must be
constants (closed over, not arguments), the producer's output must feed the chain only, and
the chain's axis must be the producer's output feature axis (read from the dimension numbers).
Constants are never changed in place: a folded weight is a new constant, so a weight that
other ops read too stays as it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..core import affine, algebra, pipeline, rules
from ..core.pipeline import BatchNormSite, Pair
from ..core.report import FoldEntry
from ..errors import FoldRefused
from . import ops
from .constants import (
    PURE_OPS,
    Constants,
    NotConstant,
    np_dtype,
    op_of,
    symbol_name,
    tensor_type,
    write_attribute,
)
from .mlir import hlo, ir, walk_ops

CLOSE_OVER = (
    "parameters are arguments: close over them (for flax, export "
    "jax.jit(functools.partial(model.apply, variables)))"
)


@dataclass(kw_only=True)
class _Pair(Pair[Any]):
    chain: affine.Chain
    hlo_producer: ops.Producer | None = None
    weight_axis: int | None = None
    axis: int | None = None  # the producer's output axis the fold scales along


@dataclass
class _Fold:
    weight: np.ndarray
    bias: np.ndarray | None
    note: str = ""


# The attribute that marks the last op of a chain with the number of its site while a fold
# runs (removed by :meth:`StableHloAdapter.unmark`): MLIR values and ops hash by address, and
# an address freed by a rewrite is reused by the ops the next one creates, so neither can
# tell the same chain from one pass to the next.
SITE_MARK = "bnfold.site"


class _Site:
    """A chain as the pipeline keys it: by the mark on its last op, which stays the same from
    one pass to the next while the chain is kept (a chain folded in one pass is not looked at
    again)."""

    __slots__ = ("fn", "chain", "_key")

    def __init__(self, fn: _Function, chain: affine.Chain, number: int) -> None:
        self.fn, self.chain = fn, chain
        self._key = number

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Site) and self._key == other._key


@dataclass
class _Function:
    op: Any
    name: str
    state: Any = None


def _functions(module: Any) -> Iterator[Any]:
    for op in module.body.operations:
        if op.operation.name == "func.func":
            yield op.operation


class StableHloAdapter:
    """The :class:`~bnfold.core.pipeline.GraphAdapter` of one StableHLO module."""

    def __init__(self, module: Any, affine: bool = True) -> None:
        self.module = module
        self.affine = affine  # also fold chains that do not scale per channel
        self.constants = Constants()
        self._labels: dict[str, Any] = {}  # layer path -> the value it names
        # report name of a chain -> the other layers (BatchNorms) folded in the same chain
        self.companions: dict[str, list[str]] = {}
        self._first: dict[_Site, _Pair] = {}
        self._sites = 0
        self._functions = [_Function(op, symbol_name(op)) for op in _functions(module)]

    # -- reading ------------------------------------------------------------------------------

    def _mark(self, op: Any) -> int:
        """The site number of the chain ending in ``op`` (a new one when it has none)."""
        if SITE_MARK in op.attributes:
            return int(ir.IntegerAttr(op.attributes[SITE_MARK]).value)
        self._sites += 1
        i64 = ir.IntegerType.get_signless(64)
        op.attributes[SITE_MARK] = ir.IntegerAttr.get(i64, self._sites)
        return self._sites

    def unmark(self) -> None:
        """Remove the site marks from the module (after the fold, whatever happened)."""
        for fn in self._functions:
            for op in walk_ops(fn.op):
                if SITE_MARK in op.attributes:
                    del op.attributes[SITE_MARK]

    def _name(self, fn: _Function, value: Any) -> str:
        if fn.state is None:
            fn.state = ir.AsmState(fn.op)
        return f"@{fn.name}:{value.get_name(fn.state)}"

    def _label(self, fn: _Function, value: Any, op: Any) -> str:
        """The name of the layer ``op`` belongs to, from the module path JAX records in its
        location (``M/BatchNorm_0`` of ``jit(apply)/M/BatchNorm_0/mul``), with the value's
        own name when another value has that path already; the value's name alone when the
        location names no layer."""
        path = _layer_path(op.location)
        if not path:
            return self._name(fn, value)
        if self._labels.setdefault(path, value) != value:
            return f"{path} ({self._name(fn, value)})"
        return path

    def batch_norms(self) -> list[BatchNormSite[Any]]:
        sites = []
        for fn in self._functions:
            # every block: a function's body, and the bodies of its case, if and while ops
            # (a chain and its producer are always in one block; constants they read may be
            # defined outside it)
            blocks = [b for b in fn.op.regions[0].blocks]
            while blocks:
                block = blocks.pop(0)
                links = []
                for op in block.operations:
                    op = op.operation
                    found = ops.link(op, self.constants)
                    if found is not None:
                        links.append(found)
                    for region in op.regions:
                        blocks.extend(region.blocks)
                chains = affine.chains(links, lambda v: len(list(v.uses)))
                for chain in chains:
                    if not chain.is_batch_norm and not self.affine:
                        continue
                    sites.append(
                        BatchNormSite(
                            node=_Site(fn, chain, self._mark(chain.links[-1].node)),
                            input=chain.input,
                            output=chain.output,
                            weight=None,
                            bias=None,
                            mean=None,
                            var=None,
                            eps=None,
                            axis=chain.axis if chain.axis is not None else 1,
                        )
                    )
        return sites

    def examine(self, bn: BatchNormSite[Any]) -> _Pair:
        pair = self._examine(bn)
        # A chain kept in the first pass is looked at again after the rewrite (a chain before
        # it folded). It keeps the names the input's module gave it, and the first pass's
        # reason when the rule is the same (SSA names are renumbered by the rewrite).
        first = self._first.setdefault(bn.node, pair)
        if first is not pair:
            same_rule = rules.decide(first.facts).rule == rules.decide(pair.facts).rule
            pair.name, pair.target = first.name, first.target or pair.target
            pair.facts = (
                first.facts
                if same_rule
                else replace(
                    pair.facts, bn=first.name, producer=first.target or pair.facts.producer
                )
            )
        return pair

    def _examine(self, bn: BatchNormSite[Any]) -> _Pair:
        fn, chain = bn.node.fn, bn.node.chain
        scaling = [link for link in chain.links if link.scales]
        kind = "batchnorm" if scaling else "affine"
        name = self._label(fn, chain.output, (scaling or chain.links)[0].node)
        # Several BatchNorms in a row make one chain, folded as a whole; each layer JAX named
        # in the locations gets its own report entry (see ``companions``).
        firsts: dict[str, affine.Link] = {}
        for link in scaling:
            firsts.setdefault(_layer_path(link.node.location), link)
        firsts.pop("", None)
        others = [link for link in firsts.values() if link is not scaling[0]]
        if len(firsts) > 1:
            self.companions[name] = [self._label(fn, x.output, x.node) for x in others]
        pair = _Pair(
            bn=bn,
            facts=rules.PairFacts(bn=name),
            name=name,
            bn_type=_chain_type(chain),
            chain=chain,
            kind=kind,
        )
        facts: dict[str, Any] = {"bn": name, "bn_axis": bn.axis}
        why = self._params_not_constant(chain)
        if why:
            facts.update(bn_params_constant=False, constant_detail=why)
        before, start = self._walk_back(chain)
        source = op_of(start)
        producer = ops.producer(source, self.constants)
        if producer is None:
            source = op_of(chain.input)
        if producer is None or producer.problem:
            detail = (
                self._describe_value(fn, chain.input)
                if producer is None
                else f"{source.name} ({producer.problem})"
            )
            pair.facts = rules.PairFacts(**facts, producer_detail=detail)
            pair.quiet = kind == "affine"  # plain arithmetic with no layer behind it
            return pair
        if kind == "affine" and _gains_nothing(chain):
            pair.quiet = True
            return pair
        target = self._label(fn, producer.output, source)
        pair.hlo_producer = producer
        pair.target = target
        pair.target_type = source.name
        pair.producer = pipeline.ProducerSite(
            node=source,
            kind=producer.kind,
            spatial_dims=producer.spatial_dims,
            output_rank=tensor_type(producer.output).rank,
        )
        facts.update(
            producer=target,
            producer_kind=producer.kind,
            producer_spatial_dims=producer.spatial_dims,
            output_rank=tensor_type(producer.output).rank,
            can_unshare=True,  # a folded weight is always a new constant
        )
        # every value from the producer to the chain must feed the next op only
        path = [producer.output] + [link.output for link in reversed(before)]
        readers = [link.node for link in reversed(before)] + [chain.links[0].node]
        for value, reader in zip(path, readers, strict=True):
            users = [u.owner for u in value.uses]
            if len(users) != 1:
                others = [self._op_label(fn, u) for u in users if u != reader][:3]
                facts.update(
                    producer_output_users=len(users), producer_other_users=", ".join(others)
                )
                break
        weight_why = self.constants.why_not(producer.weight)
        if weight_why and facts.get("bn_params_constant", True):
            facts.update(
                producer_params_constant=False,
                constant_detail=self._constant_detail(producer.weight, weight_why),
            )
        elif weight_why:
            facts.update(producer_params_constant=False)
        axis = chain.axis if chain.axis is not None else _scalar_axis(producer)
        if chain.axis is None and axis is not None:  # scalars: any channel axis takes them
            facts["bn_axis"] = axis
        pair.axis = axis
        weight_axis, problem = (None, "") if axis is None else producer.at_axis(axis)
        crossing = next((x for x in before if x.axis is not None and x.axis != axis), None)
        if crossing is not None:
            problem = (
                f"{crossing.node.name} between {target} and {name} varies along axis "
                f"{crossing.axis}, {name} along axis {axis}"
            )
        if axis is None:
            problem = f"{target}'s weight feeds no axis of its output"
        elif tensor_type(producer.output).is_dynamic_dim(axis):
            problem = f"axis {axis} of {target} (the channels) has a dynamic size"
        if problem:
            facts["axis_problem"] = problem
        else:
            feature = producer.feature_axis if producer.kind != "linear" else axis
            if weight_axis is None:
                feature = producer.feature_axis
            facts["channel_axis"] = feature
        pair.weight_axis = weight_axis
        foreign = [x for x in before if x.op != "widen"]
        if foreign and facts.get("producer_output_users", 1) == 1 and crossing is None:
            # the ops between are a chain of their own only because they are in another block
            # (a lax.cond branch reads the conv's biased output): the fold would drop them
            outer = foreign[-1].node
            facts = {k: v for k, v in facts.items() if not k.startswith(("producer", "output"))}
            facts.pop("channel_axis", None)
            facts.pop("axis_problem", None)
            facts.pop("can_unshare", None)
            pair.producer = pair.hlo_producer = pair.target = None
            pair.target_type = ""
            facts["producer_detail"] = (
                f"{outer.name} ({self._name(fn, outer.results[0])}) in another block than it "
                f"(after {target}); bnfold folds a chain within one block"
            )
        pair.facts = rules.PairFacts(**facts)
        pair.quiet = kind == "affine" and pair.producer is None
        return pair

    def _walk_back(self, chain: affine.Chain) -> tuple[list[affine.Link], Any]:
        """The links before ``chain`` (a chain ends where its value has another reader or the
        next op varies along another axis), nearest first, and the value they start from."""
        before: list[affine.Link] = []
        value = chain.input
        while len(before) < 64:
            op = op_of(value)
            found = ops.link(op, self.constants) if op is not None else None
            if found is None:
                break
            before.append(found)
            value = found.input
        return before, value

    def _params_not_constant(self, chain: affine.Chain) -> str:
        for link in chain.links:
            sources: list[Any]
            if link.op == "affine":
                sources = list(link.operand)
            elif link.op in ("neg", "widen"):
                sources = []
            else:
                sources = [link.operand.source]
            for value in sources:
                why = self.constants.why_not(value)
                if why:
                    return self._constant_detail(value, why)
        return ""

    def _constant_detail(self, value: Any, why: str) -> str:
        if "argument" in why and "of @main" not in why:
            return (
                f"{why}, a function bnfold does not follow calls into (JAX makes one for "
                "each lax.cond branch and nested jit)"
            )
        if "argument" in why:
            return f"{CLOSE_OVER}; {why}"
        return why

    def _describe_value(self, fn: _Function, value: Any) -> str:
        op = op_of(value)
        if op is None:
            return f"{self._name(fn, value)}, a function argument"
        return f"{op.name} ({self._name(fn, value)})"

    def _op_label(self, fn: _Function, op: Any) -> str:
        op = getattr(op, "operation", op)
        if op.results:
            return f"{op.name} {self._name(fn, op.results[0])}"
        return op.name

    # -- computing ----------------------------------------------------------------------------

    def compute(self, pair: _Pair) -> _Fold:
        chain, producer = pair.chain, pair.hlo_producer
        assert producer is not None and pair.axis is not None and pair.weight_axis is not None
        channels = int(tensor_type(producer.output).shape[pair.axis])
        produced, result = tensor_type(producer.output), tensor_type(chain.output)
        if list(produced.shape) != list(result.shape) or str(produced.encoding) != str(
            result.encoding
        ):
            raise FoldRefused(
                f"the chain's result type {result} has another shape than {pair.target}'s "
                f"{produced}: the folded producer cannot stand in for it"
            )
        self._require_range(pair, produced, result)
        try:
            steps = [self._step(link) for link in chain.links]
            weight = self.constants.native(producer.weight)
        except NotConstant as e:
            raise FoldRefused(str(e)) from e
        k, c = affine.compose(steps, channels)
        _require_precision(weight.dtype, np_dtype(produced.element_type), pair.target)
        layout = algebra.OutputLayout(axis=pair.weight_axis)
        scaled = algebra.ScaledWeight(weight, k, layout)
        bias = None
        if (c != 0).any():
            out_dtype = np_dtype(tensor_type(chain.output).element_type)
            if out_dtype is None:
                raise FoldRefused(
                    f"the chain's element type {tensor_type(chain.output)} is unknown"
                )
            bias = algebra.folded_bias(None, k, c, like=weight, dtype=out_dtype)
            algebra.require_headroom(c, np_dtype(produced.element_type), pair.name)
        return _Fold(scaled.value(), bias)

    def _require_range(self, pair: _Pair, produced: Any, result: Any) -> None:
        """A chain that widens (a float16 conv, a float32 BatchNorm) applies its scale in the
        wide type; folded, the scale is applied in the producer's. Unless the chain's result is
        narrowed back to a type no wider than the producer's (then the original overflows
        there too), the folded layer can overflow where the chain did not."""
        narrow, wide = np_dtype(produced.element_type), np_dtype(result.element_type)
        if narrow is None or wide is None or narrow == wide:
            return

        def limit(dtype: np.dtype) -> float:
            return float(algebra.float_info(dtype).max)

        if limit(narrow) >= limit(wide) * 0.99:  # bfloat16 has float32's range
            return
        for use in pair.chain.output.uses:
            user = use.owner
            user = getattr(user, "operation", user)
            back = np_dtype(tensor_type(user.results[0]).element_type) if user.results else None
            if user.name != "stablehlo.convert" or back is None or limit(back) > limit(narrow):
                raise FoldRefused(
                    f"{pair.name} computes in {wide.name} on {pair.target}'s {narrow.name} "
                    f"output and its result stays {wide.name}: folded, its scale would be "
                    f"applied in {narrow.name}, which can overflow where it did not"
                )

    def _step(self, link: affine.Link) -> affine.Step:
        where = link.node.name
        if link.op in ("neg", "widen"):
            return affine.Step(link.op, where=where)
        if link.op == "affine":
            scale, offset, mean = (self.constants.value(v) for v in link.operand[:3])
            # the variance in its own dtype: var + eps must be positive where the op adds them
            var = self.constants.native(link.operand[3])
            eps = float(ir.FloatAttr(link.node.attributes["epsilon"]).value)
            s, t = algebra.affine_factors(mean, var, eps, scale, offset)
            return affine.Step("affine", (s, t), where=where)
        vector = ops.operand_vector(link.operand, self.constants)
        return affine.Step(link.op, vector, link.chain_first, where=where)

    # -- rewriting ----------------------------------------------------------------------------

    def apply(self, folds: list[tuple[_Pair, _Fold]]) -> None:
        dead: list[Any] = []
        for pair, fold in folds:
            dead.extend(self._rewrite(pair, fold))
        _drop_dead(dead)
        self.constants = Constants()
        for fn in self._functions:
            fn.state = None  # the names of a rewritten function are read afresh

    def _rewrite(self, pair: _Pair, fold: _Fold) -> list[Any]:
        chain, producer = pair.chain, pair.hlo_producer
        assert producer is not None
        op = producer.op
        old_weight = producer.weight
        weight_type = tensor_type(old_weight)
        with op.location, ir.InsertionPoint(op):
            new_weight = hlo.ConstantOp(write_attribute(fold.weight, weight_type.element_type))
        op.operands[producer.weight_index] = new_weight.result
        result = producer.output
        last = chain.links[-1].node
        out_type = tensor_type(chain.output)
        if out_type.element_type != tensor_type(result).element_type:
            # the chain widened the producer's output (a bfloat16 conv, a float32 BatchNorm)
            with last.location, ir.InsertionPoint(last):
                result = hlo.ConvertOp(out_type, result).result
        if fold.bias is not None:
            with last.location, ir.InsertionPoint(last):
                shift = hlo.ConstantOp(write_attribute(fold.bias, out_type.element_type))
                assert pair.axis is not None
                spread = _broadcast(shift.result, result, pair.axis, out_type)
                result = hlo.AddOp(result, spread).result
        chain.output.replace_all_uses_with(result)
        dead = [old_weight]
        for link in reversed(chain.links):
            node = link.node
            dead.extend(o for o in node.operands if o != link.input)
            node.erase()
        return dead

    def upstream(self, bn: BatchNormSite[Any]) -> list[Any]:
        chain = bn.node.chain
        return [link.output for link in self._walk_back(chain)[0]]

    def extra_entries(self) -> list[FoldEntry]:
        return []  # every block is read: nothing is left out


def _require_precision(weight: np.dtype, output: np.dtype | None, producer: str | None) -> None:
    """A producer may compute in a wider type than its weight (``preferred_element_type``: a
    float8 or bfloat16 weight, a float32 result). Its per-channel scale is then applied in the
    wide type; folded into the weight it would be rounded to the weight's few bits. Refused."""
    if output is None or weight.kind not in "fV" or output.kind not in "fV":
        return
    if algebra.float_info(weight).nmant < algebra.float_info(output).nmant:
        raise FoldRefused(
            f"{producer}'s weight is {weight.name} but it computes in {output.name}: the scale "
            f"would be rounded to {weight.name} in the weight, where the graph applies it in "
            f"{output.name}"
        )


_NAMED_LOCATION = re.compile(r'^loc\("([^"\\]*)"')


def _layer_path(location: Any) -> str:
    """``M/BatchNorm_0`` from a location named ``jit(apply)/M/BatchNorm_0/mul`` (what JAX
    records for flax modules); "" when the location names no layer. Read from the location as
    MLIR prints it (the bindings abort the process on a name that is not UTF-8; printed, such a
    name is escaped, and an escaped name is not read)."""
    found = _NAMED_LOCATION.match(str(location))
    if found is None:
        return ""
    parts = found.group(1).split("/")
    if len(parts) < 3:
        return ""
    return "/".join(parts[1:-1])


def _scalar_axis(producer: ops.Producer) -> int | None:
    """The output axis a chain of scalars folds along: the convolution's feature axis, or the
    first output axis of a dot_general that its weight feeds."""
    if producer.kind != "linear":
        return producer.feature_axis
    return min(producer.free_axes, default=None)


def _gains_nothing(chain: affine.Chain) -> bool:
    """A chain whose fold would leave as many ops: one ``add`` or ``z - a`` (a layer's bias: the
    fold would write it again), and widening converts, which the fold keeps."""
    links = [link for link in chain.links if link.op != "widen"]
    return len(links) <= 1 and all(
        x.op == "add" or (x.op == "sub" and x.chain_first) for x in links
    )


def _chain_type(chain: affine.Chain) -> str:
    if len(chain.links) == 1 and chain.links[0].op == "affine":
        return ops.BATCH_NORM
    names = {"affine": "batch_norm_inference"}
    return "affine chain (" + ", ".join(names.get(x.op, x.op) for x in chain.links) + ")"


def _broadcast(shift: Any, like: Any, axis: int, out_type: Any) -> Any:
    """``shift`` (one value per channel) broadcast along ``axis`` to ``like``'s shape."""
    if out_type.has_static_shape:
        return hlo.broadcast_in_dim(out_type, shift, [axis])
    i32 = ir.IntegerType.get_signless(32)
    one = ir.RankedTensorType.get([1], i32)
    sizes = [hlo.reshape(one, hlo.get_dimension_size(like, d)) for d in range(out_type.rank)]
    shape = hlo.concatenate(sizes, 0)
    return hlo.dynamic_broadcast_in_dim(out_type, shift, shape, [axis])


def _drop_dead(values: list[Any]) -> None:
    """Erase the pure ops the rewrites left without users, and what that frees in turn."""
    gone: set[int] = set()

    def drop(value: Any) -> list[Any] | None:
        if hash(value) in gone:
            return None
        op = op_of(value)
        if op is None or op.name not in PURE_OPS:
            return None
        if any(len(list(r.uses)) for r in op.results):
            return None
        operands = list(op.operands)
        gone.update(hash(r) for r in op.results)
        op.erase()
        return operands

    pipeline.drop_dead(values, drop)


__all__ = ["StableHloAdapter", "CLOSE_OVER"]
