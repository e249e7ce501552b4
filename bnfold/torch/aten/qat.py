"""pt2e quantization-aware training: the conv/BatchNorm chain torchao's ``convert_pt2e`` leaves.

``prepare_qat_pt2e`` rewrites ``conv -> batch_norm`` into a training simulation: the weight is
multiplied by ``scale_factor = gamma / sqrt(running_var + eps)`` before it is fake-quantized,
and the output divided by it again. ``convert_pt2e`` folds that back only when its own patterns
match; when the quantizer also quantizes the conv's output (ExecuTorch's Cadence and Qualcomm
quantizers do), the converted graph keeps::

    conv(dq(x), dq(w * scale_factor), bias0) -> quantize -> dequantize
        -> div(scale_factor) [-> add(conv bias)] -> batch_norm

Every op after the dequantize is a per-channel affine map, so the whole tail is ``y = k*z + c``
with ``z`` the dequantized conv output; when the scale factor and the BatchNorm use the same
eps, ``k = 1`` and the tail is a per-channel shift ``c = (b - mean) * gamma / sqrt(var + eps) +
beta``. :func:`match` finds such chains (any ``add``/``sub``/``mul``/``div`` by per-channel or
scalar constants between the dequantize and the BatchNorm), :func:`compute` forms ``k`` and
``c`` in float64 from the constants the graph holds (the BatchNorm's own eps, as the graph
carries it), and :func:`rewrite` replaces the tail:

- ``"exact"``: one ``add(c)`` (``mul(k)`` first when ``k != 1``) after the dequantize — the
  unfolded graph's values up to float rounding;
- ``"bias"``: ``c`` added to the conv's bias *before* the output quantize, so that a backend sees
  one plain quantized conv. This moves a rounding, so it is done only where it is bounded:
  the conv's output range is bounded from its input's quantization range and its weights
  (interval arithmetic, every input), and both that range and the range shifted by ``c`` must
  lie inside the output quantization range (nothing clips, before or after); the difference to
  the unfolded graph is then at most one output step plus the new bias's own rounding (a
  quantized bias holds ``round(c / bias_scale)``). Where the bound does not hold the chain
  falls back to the exact form and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch.fx import Node

from ...core import affine
from ...core.algebra import affine_factors
from ...core.rules import producer_channel_axis
from ...errors import FoldRefused
from .evaluate import Constants
from .ops import (
    BatchNormCall,
    ProducerCall,
    QuantCall,
    arguments,
    aten_name,
    describe,
    may_be_written,
    op_label,
    other_uses,
    producer_call,
    quant_call,
    set_argument,
    shape_value,
    trace_back,
)
from .store import Store

# The most a bias fold may move an output from the unfolded graph's, in output quantization
# steps: one step for the moved rounding, and at most half a step for the new bias's own
# rounding (a quantized bias whose step is coarser than the output's is not folded into).
MAX_BIAS_STEPS = 1.5

_ARITHMETIC = {"add", "sub", "mul", "div"}


# --------------------------------------------------------------------------------------------
# Finding a chain


@dataclass(frozen=True)
class Link:
    """One elementwise op of the tail: ``node`` computes ``chain <op> constant`` (or
    ``constant <op> chain`` when ``chain_first`` is false)."""

    node: Node
    op: str
    constant: Any  # a node or a number
    chain_first: bool


@dataclass
class QatChain:
    """``producer -> quantize -> dequantize -> links... -> BatchNorm``."""

    producer: ProducerCall
    quantize: QuantCall
    dequantize: QuantCall
    links: list[Link]
    rank: int | None = None
    axis: int | None = None  # the activation axis holding the producer's channels
    channels: int | None = None
    problem: str = ""  # why the tail is not a per-channel affine map ("" when it is)
    other_users: list[str] = field(default_factory=list)

    def nodes(self) -> list[Node]:
        """The chain's nodes from the producer to the last link."""
        return [self.producer.node, self.quantize.node, self.dequantize.node] + [
            link.node for link in self.links
        ]


def _constant_expression(node: Any, store: Store, seen: dict[Node, bool]) -> bool:
    """Whether ``node`` is computed from stored tensors and numbers only (whatever its ops:
    which of them :class:`Constants` evaluates is its own question)."""
    if not isinstance(node, Node):
        return True
    if node in seen:
        return seen[node]
    seen[node] = False  # a cycle cannot occur in a graph; this guards the recursion anyway
    if store.tensor(node) is not None:
        result = True
    elif node.op != "call_function":
        result = False
    else:
        inputs = node.all_input_nodes
        result = all(_constant_expression(n, store, seen) for n in inputs)
    seen[node] = result
    return result


def _link(
    node: Node, op: str, store: Store, seen: dict[Node, bool]
) -> tuple[Link | None, Any, str]:
    """Read an arithmetic node as a link: (the link, the chain operand, ""), or (None, the
    chain operand when it is known, why not)."""
    t = node.target
    args = arguments(node)
    a, b = args.get("self"), args.get("other")
    a_const, b_const = _constant_expression(a, store, seen), _constant_expression(b, store, seen)
    if a_const == b_const:
        what = "constants" if a_const else "computed at run time"
        return None, None, f"both operands of {describe(node)} are {what}"
    chain = b if a_const else a
    if t._overloadname not in ("Tensor", "Scalar"):
        return None, chain, f"{describe(node)} is the {t._overloadname} overload"
    if op in ("add", "sub") and args.get("alpha", 1) != 1:
        return None, chain, f"{describe(node)} scales its operand by alpha={args['alpha']}"
    if op == "div" and a_const:
        return None, chain, f"{describe(node)} divides a constant by the activation"
    return Link(node, op, a if a_const else b, chain_first=not a_const), chain, ""


def _reaches_dequantize(value: Any, store: Store, seen: dict[Node, bool]) -> bool:
    """Whether ``value`` comes from a dequantize through arithmetic with constants."""
    for _ in range(64):  # tails are short; a bound keeps a pathological graph cheap
        if quant_call(value) is not None:
            return quant_call(value).kind == "dequantize"
        op = aten_name(value) if isinstance(value, Node) else None
        if op not in _ARITHMETIC:
            return False
        _, value, _ = _link(value, op, store, seen)
    return False


def match(bn: BatchNormCall, store: Store) -> tuple[QatChain | None, str]:
    """The QAT chain ending at ``bn``, or ``(None, why)``; ``why`` is empty when ``bn``'s input
    does not reach a dequantize through elementwise ops (no QAT chain to speak of)."""
    links: list[Link] = []
    seen: dict[Node, bool] = {}
    value = bn.input
    while isinstance(value, Node):
        op = aten_name(value)
        if op not in _ARITHMETIC:
            break
        link, chain, why = _link(value, op, store, seen)
        if link is None:
            if chain is not None and _reaches_dequantize(chain, store, seen):
                return None, f"the chain stops at {describe(value)}: {why}"
            return None, ""
        links.insert(0, link)
        value = chain
    dq = quant_call(value)
    if dq is None or dq.kind != "dequantize":
        return None, ""  # not a QAT chain at all: the usual reasons apply
    q = quant_call(dq.input)
    if q is None or q.kind != "quantize":
        what = describe(dq.input) if isinstance(dq.input, Node) else "a constant"
        return None, f"the chain stops at {what}: {describe(dq.node)} does not read a quantize"
    p = producer_call(q.input) if isinstance(q.input, Node) else None
    if p is None:
        what = describe(q.input) if isinstance(q.input, Node) else "a constant"
        return None, (
            f"the chain stops at {what}, which {describe(q.node)} quantizes: it is not a "
            "Conv, ConvTranspose or Linear"
        )
    if not links:
        return None, (
            f"it reads {describe(dq.node)} of {describe(p.node)}'s quantized output directly: "
            "its scale would change the output quantization, which bnfold does not fold; in "
            "torchao's QAT form a division by the scale factor comes first and leaves a shift"
        )
    chain = QatChain(producer=p, quantize=q, dequantize=dq, links=links)
    nodes = chain.nodes() + [bn.node]
    for i, n in enumerate(nodes[:-1]):
        chain.other_users += [
            "the graph output" if u.op == "output" else describe(u)
            for u in other_uses(n, nodes[i + 1])
        ]
    chain.problem = _shape_problem(chain, bn, store)
    return chain, ""


def _activation(chain: QatChain) -> torch.Tensor | None:
    """The shape and dtype of the dequantized activation, as metadata tells them: the
    quantize and dequantize a converter inserts often carry none, so the producer's output
    (whose shape they keep) stands in, with the dequantize's output dtype."""
    val = shape_value(chain.dequantize.node)
    if isinstance(val, torch.Tensor):
        return val
    val = shape_value(chain.producer.node)
    if not isinstance(val, torch.Tensor):
        return None
    dtype = chain.dequantize.out_dtype
    return val.to(dtype) if isinstance(dtype, torch.dtype) else val


def _shape_problem(chain: QatChain, bn: BatchNormCall, store: Store) -> str:
    """Where the channels lie, and why the tail is not per-channel ("" when it is)."""
    val = _activation(chain)
    if val is None:
        return f"{describe(chain.producer.node)} has no shape metadata"
    p = chain.producer
    chain.rank = val.dim()
    chain.axis = producer_channel_axis(p.kind, chain.rank, p.spatial_dims, p.feature_axis)  # type: ignore[arg-type]
    size = val.shape[chain.axis] if 0 <= chain.axis < chain.rank else None
    if not isinstance(size, int):
        return f"the number of {describe(p.node)}'s output channels is not a constant"
    chain.channels = size
    ev = Constants(store, ignore=bn.node)
    for link in chain.links:
        problem = _per_channel_problem(ev, link, val, chain.axis, size)
        if problem:
            return problem
    return ""


def _per_channel_problem(
    ev: Constants, link: Link, val: torch.Tensor, axis: int, channels: int
) -> str:
    """Why ``link``'s constant is not a per-channel (or scalar) operand that keeps the
    activation's shape and dtype ("" when it is)."""
    const = ev.value(link.constant)
    if const is None:
        return ""  # not constant: the constant-params rule says so
    if not isinstance(const, torch.Tensor):
        return ""  # a number: a scalar operand, no promotion beyond the activation's dtype
    what = f"the constant of {describe(link.node)}"
    if const.dim() > 0 and const.dtype != val.dtype:
        return f"{what} is {const.dtype}, the activation {val.dtype}: the result changes dtype"
    if const.dim() == 0 and not const.is_floating_point() and val.is_floating_point():
        return ""
    if const.dim() == 0 and const.is_floating_point() != val.is_floating_point():
        return f"{what} is {const.dtype}, the activation {val.dtype}"
    if const.dim() > val.dim():
        return f"{what} has more axes than the activation: it broadcasts the output"
    padded = const.reshape((1,) * (val.dim() - const.dim()) + tuple(const.shape))
    for i, n in enumerate(padded.shape):
        if n == 1 or (i == axis and n == channels):
            continue
        # a per-channel constant expanded to the activation's shape has its size, not its
        # variation: what counts is whether its values change along the axis
        first = padded.narrow(i, 0, 1)
        if n != val.shape[i] or not torch.equal(padded, first.expand_as(padded)):
            return (
                f"{what} (shape {tuple(const.shape)}) varies along axis {i}, not only along "
                f"the channel axis {axis}"
            )
    return ""


def _channels_of(value: Any, rank: int, axis: int) -> Any:
    """A per-channel constant with every other axis reduced to its first entry (it does not
    vary along them: :func:`_per_channel_problem`), so that what is left is one value per
    channel or one value."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    padded = value.reshape((1,) * (rank - value.dim()) + tuple(value.shape))
    for i in range(rank):
        if i != axis:
            padded = padded.narrow(i, 0, 1)
    return padded


# --------------------------------------------------------------------------------------------
# The numbers


@dataclass
class QatFold:
    """What a chain's tail becomes: ``mode`` ``"exact"`` (``y = k*z + shift`` after the
    dequantize; ``k`` is ``None`` when it is 1) or ``"bias"`` (``bias`` replaces the conv's
    bias operand; quantized: ``bias_int`` read through a copy of ``bias_dq``). ``note`` is what
    the report says about it."""

    mode: str
    shift: torch.Tensor
    k: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    bias_dq: QuantCall | None = None
    bias_like: Node | None = None
    like: Node | None = None  # a stored tensor the new constants are stored like
    note: str = ""
    steps: float | None = None  # the bound of a bias fold, in output steps


def _vector(value: Any, channels: int, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        flat = value.detach().to(torch.float64).reshape(-1).numpy()
    else:
        flat = np.asarray([float(value)], dtype=np.float64)
    if flat.size not in (1, channels):
        raise FoldRefused(f"{what} has {flat.size} values for {channels} channels")
    return np.broadcast_to(flat, (channels,)).astype(np.float64)


def tail_affine(store: Store, chain: QatChain, bn: BatchNormCall) -> tuple[np.ndarray, np.ndarray]:
    """``(k, c)`` in float64 with ``batch_norm(tail(z)) = k*z + c`` per channel: the links,
    then the BatchNorm's ``(s, t)``, as steps composed by :func:`bnfold.core.affine.compose`.

    Refused here besides what ``compose`` refuses: a division by 0, in float64 (torchao's
    scale factor is 0 where a BatchNorm weight is) or in the graph's own dtype, and a constant
    that is not finite in the graph's own dtype."""
    assert chain.channels is not None
    n = chain.channels
    ev = Constants(store, float64=True, ignore=bn.node)
    native = Constants(store, ignore=bn.node)
    steps: list[affine.Step] = []
    for link in chain.links:
        raw = ev.value(link.constant)
        if raw is None:
            raise FoldRefused(ev.why(link.constant))
        assert chain.rank is not None and chain.axis is not None
        raw = _channels_of(raw, chain.rank, chain.axis)
        a = _vector(raw, n, f"the constant of {describe(link.node)}")
        if link.op == "div" and (a == 0).any():
            i = int(np.argmin(np.abs(a)))
            raise FoldRefused(
                f"{describe(link.node)} divides by 0 at channel {i} (a BatchNorm weight of "
                "0 makes torchao's scale factor 0): the graph's output is not finite there"
            )
        # What the graph computes must be a number too: a constant that overflows or
        # divides by zero in the graph's dtype makes its output non-finite there.
        own = native.value(link.constant)
        if isinstance(own, torch.Tensor) and own.is_floating_point():
            if not torch.isfinite(own).all() or (link.op == "div" and (own == 0).any()):
                raise FoldRefused(
                    f"the constant of {describe(link.node)} is not finite or is 0 in the "
                    "graph's dtype: the graph's output is not finite there"
                )
        # a constant divided by the chain is not a link (_link): a div has the chain first
        op = cast(affine.LinkOp, link.op)
        steps.append(affine.Step(op, a, link.chain_first, where=describe(link.node)))
    values = {}
    for role in ("weight", "bias", "mean", "var"):
        operand = getattr(bn, role)
        if operand is None:
            values[role] = None
            continue
        v = ev.value(operand)
        if v is None:
            raise FoldRefused(ev.why(operand))
        values[role] = v
    s, t = affine_factors(
        values["mean"], values["var"], float(bn.eps), values["weight"], values["bias"]
    )
    if s.shape != (n,):
        raise FoldRefused(f"the BatchNorm has {s.shape[0]} channels, the conv {n}")
    steps.append(affine.Step("affine", (s, t), where=describe(bn.node)))
    return affine.compose(steps, n)


def _torch_dtype(chain: QatChain) -> torch.dtype:
    val = _activation(chain)
    return val.dtype if val is not None else torch.float32


def _broadcastable(v: np.ndarray, chain: QatChain, dtype: torch.dtype) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along the chain's channel axis."""
    assert chain.rank is not None and chain.axis is not None
    shape = (v.shape[0],) + (1,) * (chain.rank - chain.axis - 1)
    return torch.from_numpy(np.ascontiguousarray(v)).to(dtype).reshape(shape)


def compute(store: Store, chain: QatChain, bn: BatchNormCall, mode: str) -> QatFold:
    """The fold of a matched chain (raises :class:`FoldRefused`)."""
    k, c = tail_affine(store, chain, bn)
    like = _like(store, bn)
    if like is None:
        raise FoldRefused("the graph stores no tensor that the folded values could be kept like")
    dtype = _torch_dtype(chain)
    k_rounded = torch.from_numpy(k).to(dtype)
    is_shift = bool((k_rounded == 1).all())
    eps = f"eps {float(bn.eps):g} as the graph carries it"
    training = (
        "; its batch_norm was in training mode (convert_pt2e without "
        "move_exported_model_to_eval): folded with the running statistics, as inference uses"
        if bn.training is True
        else ""
    )
    ops = " -> ".join(op_label(link.node).rpartition(".")[2] for link in chain.links)
    tail = f"{ops + ' -> ' if ops else ''}batch_norm"
    exact = QatFold(
        mode="exact",
        shift=_broadcastable(c, chain, dtype),
        k=None if is_shift else _broadcastable(k, chain, dtype),
        like=like,
        note=(
            f"QAT tail ({tail}, {eps}) became one per-channel "
            f"{'add' if is_shift else 'mul and add'} after {chain.dequantize.node.name}"
            f"{training}"
        ),
    )
    if mode != "bias":
        return exact
    if not is_shift:
        exact.note += (
            "; not folded into the bias: the tail also scales the output (the scale factor's "
            "eps differs from the BatchNorm's)"
        )
        return exact
    plan = _bias_plan(store, chain, bn, c, dtype)
    if isinstance(plan, str):
        exact.note += f"; kept exact, not folded into the bias: {plan}"
        return exact
    plan.like = like
    plan.note = (
        f"QAT tail ({tail}, {eps}) folded into {chain.producer.node.name}'s "
        f"{'int' if plan.bias_dq is not None else 'float'} bias before the output quantize: "
        f"at most {plan.steps:.3f} output steps from the unfolded graph{training}"
    )
    return plan


def _number(ev: Constants, value: Any, what: str) -> np.ndarray | str:
    v = ev.value(value)
    if v is None:
        return f"{what} is not constant ({ev.why(value)})"
    if isinstance(v, torch.Tensor):
        return v.detach().to(torch.float64).reshape(-1).numpy()
    return np.asarray([float(v)])


def _integer_range(ev: Constants, dq: QuantCall) -> tuple[float, float] | str:
    """The integers ``dq`` can read: a dequantize does not clamp to the ``quant_min`` and
    ``quant_max`` it declares, so they are the range its input's dtype holds, narrowed by the
    clamp of a quantize feeding it."""
    dtype = dq.dtype
    if not isinstance(dtype, torch.dtype) or dtype.is_floating_point or dtype == torch.bool:
        return f"{describe(dq.node)} reads {dtype}, not integers"
    info = torch.iinfo(dtype)
    lo, hi = float(info.min), float(info.max)
    q = quant_call(dq.input)
    if q is not None and q.kind == "quantize" and q.dtype == dtype:
        bounds = [_number(ev, v, "a quantize bound") for v in (q.quant_min, q.quant_max)]
        if not any(isinstance(b, str) for b in bounds):
            lo, hi = max(lo, float(bounds[0][0])), min(hi, float(bounds[1][0]))  # type: ignore[index]
    return lo, hi


def _producer_input(p: ProducerCall) -> Any:
    """The activation operand of a producer (``addmm``'s ``self`` is its bias)."""
    args = arguments(p.node)
    return args["mat1"] if p.op == "addmm" else args.get("input", args.get("self"))


def _input_range(ev: Constants, p: ProducerCall) -> tuple[float, float] | str:
    """The values the producer's input can take (0 included: padding), from its dequantize."""
    dq = quant_call(_producer_input(p))
    if dq is None or dq.kind != "dequantize" or dq.per_channel:
        return f"{describe(p.node)}'s input is not dequantized per tensor, so its range is unknown"
    parts = [_number(ev, v, f"{describe(dq.node)}'s {w}") for v, w in (
        (dq.scale, "scale"), (dq.zero_point, "zero point"))]  # fmt: skip
    for part in parts:
        if isinstance(part, str):
            return part
    ints = _integer_range(ev, dq)
    if isinstance(ints, str):
        return ints
    scale, zp = (float(p[0]) for p in parts)  # type: ignore[index]
    lo, hi = scale * (ints[0] - zp), scale * (ints[1] - zp)
    return min(lo, hi, 0.0), max(lo, hi, 0.0)


def _activation_dtype(node: Node) -> torch.dtype | None:
    val = shape_value(node)
    return val.dtype if isinstance(val, torch.Tensor) else None


def _written_quantization(store: Store, p: ProducerCall) -> str:
    """Why the producer's input range may not be what its dequantize says ("" if it is): the
    graph writes into the dequantized input, or the integers it reads, in place."""
    dq = quant_call(_producer_input(p))
    for n in (dq.node, dq.input) if dq is not None else ():
        if isinstance(n, Node) and may_be_written(n, reads_only=lambda u: _guard(store, u)):
            return f"{describe(n)} is written in place while the program runs"
    return ""


def _guard(store: Store, node: Node) -> bool:
    """Whether ``node`` calls the input-guard module ``ep.module()`` adds (it only reads)."""
    gm = getattr(store, "gm", None)
    if node.op != "call_module" or gm is None or not isinstance(node.target, str):
        return False
    try:
        module = gm.get_submodule(node.target)
    except AttributeError:
        return False
    kind = type(module)
    return kind.__name__ == "GuardsFn" and kind.__module__.startswith("torch.")


def _weight_sums(w: np.ndarray, p: ProducerCall) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the sums of the weight's positive and negative entries."""
    pos, neg = np.clip(w, 0, None), np.clip(w, None, 0)
    if p.kind == "conv_transpose":
        g = p.groups
        shape = (g, w.shape[0] // g, w.shape[1], -1)
        return tuple(x.reshape(shape).sum(axis=(1, 3)).reshape(-1) for x in (pos, neg))  # type: ignore[return-value]
    moved = [np.moveaxis(x, p.weight_axis, 0) for x in (pos, neg)]
    return tuple(x.reshape(x.shape[0], -1).sum(axis=1) for x in moved)  # type: ignore[return-value]


def _bias_plan(
    store: Store, chain: QatChain, bn: BatchNormCall, c: np.ndarray, dtype: torch.dtype
) -> QatFold | str:
    """The bias fold of a shift ``c``, or why it is not bounded."""
    p, q, dq = chain.producer, chain.quantize, chain.dequantize
    ev = Constants(store, ignore=bn.node)  # the graph's own dtypes; the BatchNorm goes
    if p.op in ("mm", "matmul"):
        return f"{describe(p.node)} has no bias operand"
    if p.op == "addmm" and arguments(p.node).get("alpha", 1) != 1:  # u = bias + alpha * x @ W
        return f"{describe(p.node)} scales its product by alpha={arguments(p.node)['alpha']}"
    if q.per_channel:
        return f"{describe(q.node)} quantizes per channel"
    out = []
    for what, a, b in (
        ("scale", q.scale, dq.scale),
        ("zero point", q.zero_point, dq.zero_point),
        ("quant_min", q.quant_min, dq.quant_min),
        ("quant_max", q.quant_max, dq.quant_max),
    ):
        va, vb = _number(ev, a, f"the output quantize's {what}"), _number(ev, b, what)
        if isinstance(va, str):
            return va
        if isinstance(vb, str) or vb.shape != va.shape or not (va == vb).all():
            return f"the output dequantize's {what} differs from the quantize's"
        out.append(float(va[0]))
    if q.dtype != dq.dtype:
        return "the output dequantize's dtype differs from the quantize's"
    s_out, zp_out, qmin, qmax = out
    if not s_out > 0:
        return f"the output scale is {s_out}"
    low, high = s_out * (qmin - zp_out), s_out * (qmax - zp_out)
    # The conv's output before the quantize, for every input the input quantization allows.
    rng = _input_range(ev, p)
    if isinstance(rng, str):
        return rng
    conv_dtype = _activation_dtype(p.node)
    if conv_dtype not in (torch.float32, torch.float64):
        # the conv rounds u + c to its own dtype before the quantize: not in the bound
        return f"{describe(p.node)} computes in {conv_dtype}, whose rounding the bound leaves out"
    written = _written_quantization(store, p)
    if written:
        return written
    weight = ev.value(p.weight)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return f"{describe(p.node)}'s weight is not constant ({ev.why(p.weight)})"
    bias_operand = p.bias
    n = c.shape[0]
    if bias_operand is None:
        b0 = np.zeros(n)
    else:
        got = ev.value(bias_operand)
        if not isinstance(got, torch.Tensor) or got.numel() not in (1, n):
            return f"{describe(p.node)}'s bias is not constant ({ev.why(bias_operand)})"
        b0 = _vector(got, n, "the bias")
    w = weight.detach().to(torch.float64).numpy()
    try:
        pos, neg = _weight_sums(w, p)
    except ValueError:
        return f"{describe(p.node)}'s weight does not have the layout its op implies"
    if pos.shape != (n,):
        return f"{describe(p.node)}'s weight has {pos.shape[0]} output channels, the tail {n}"
    lo_x, hi_x = rng
    u_lo, u_hi = pos * lo_x + neg * hi_x + b0, pos * hi_x + neg * lo_x + b0
    # The new bias, as the graph will hold it.
    target = b0 + c
    bias_dq = quant_call(bias_operand)
    like: Node | None = None
    if bias_dq is not None and bias_dq.kind == "dequantize":
        plan = _quantized_bias(ev, bias_dq, target)
        if isinstance(plan, str):
            return plan
        bias_int, new_b = plan
        stored = trace_back(bias_dq.input)
        if stored is not None and isinstance(store.tensor(stored.source), torch.Tensor):
            if not isinstance(store.tensor(stored.source), torch.nn.Parameter):
                like = stored.source
        if like is None:
            like = _like(store, bn, plain=True)
            if like is None:
                return "the graph stores no buffer or constant to keep an integer bias like"
        bias_value = bias_int
    else:
        bias_dq = None
        bias_value = torch.from_numpy(target).to(weight.dtype)  # a conv takes its weight's
        new_b = bias_value.to(torch.float64).numpy()
    moved = new_b - b0  # what the folded conv adds to its output
    rounding = float(np.max(np.abs(new_b - target))) if n else 0.0
    # Both the unfolded and the folded conv outputs must stay inside the quantize's range.
    checks = (("reach", u_lo, u_hi), ("reach after the shift", u_lo + moved, u_hi + moved))
    for what, lo, hi in checks:
        bad = np.flatnonzero((lo < low) | (hi > high))
        if bad.size:
            i = int(bad[np.argmax(np.maximum(low - lo[bad], hi[bad] - high))])
            return (
                f"channel {i} of {describe(p.node)}'s output may {what} [{lo[i]:.4g}, "
                f"{hi[i]:.4g}] (bounded from its input's quantization range and its weights), "
                f"outside the output quantization range [{low:.4g}, {high:.4g}], where the "
                "quantize clips"
            )
    steps = 1.0 + rounding / s_out
    if steps > MAX_BIAS_STEPS:
        return (
            f"the new bias rounds by up to {rounding:.3g}, {rounding / s_out:.2f} output steps "
            f"(the bias is quantized more coarsely than the output)"
        )
    return QatFold(
        mode="bias",
        shift=torch.empty(0),
        bias=bias_value,
        bias_dq=bias_dq,
        bias_like=like,
        steps=steps,
    )


def _quantized_bias(
    ev: Constants, dq: QuantCall, target: np.ndarray
) -> tuple[torch.Tensor, np.ndarray] | str:
    """The integer bias closest to ``target`` under ``dq``'s parameters, and its value."""
    n = target.shape[0]
    if dq.per_channel and dq.axis not in (0, -1):
        return f"{describe(dq.node)} quantizes the bias along axis {dq.axis}"
    scale = _number(ev, dq.scale, "the bias scale")
    zp = np.zeros(1) if dq.zero_point is None else _number(ev, dq.zero_point, "the bias zero point")
    bounds = [_number(ev, v, what) for v, what in ((dq.quant_min, "quant_min"),
                                                   (dq.quant_max, "quant_max"))]  # fmt: skip
    for part in (scale, zp, *bounds):
        if isinstance(part, str):
            return part
    if not isinstance(dq.dtype, torch.dtype) or dq.dtype.is_floating_point:
        return f"{describe(dq.node)} has the dtype {dq.dtype}"
    scale, zp = np.broadcast_to(scale, (n,)), np.broadcast_to(zp, (n,))  # type: ignore[arg-type]
    if not (scale > 0).all():
        return "a bias scale is not positive"
    qmin, qmax = float(bounds[0][0]), float(bounds[1][0])  # type: ignore[index]
    if dq.dtype == torch.bool:
        return f"{describe(dq.node)} reads booleans"
    info = torch.iinfo(dq.dtype)
    qmin, qmax = max(qmin, float(info.min)), min(qmax, float(info.max))
    with np.errstate(all="ignore"):
        ints = np.round(target / scale) + zp
    if not np.isfinite(ints).all() or (ints < qmin).any() or (ints > qmax).any():
        return f"the new bias does not fit {dq.dtype} at scale {float(scale.min()):.3g}"
    bias_int = torch.from_numpy(ints).to(dq.dtype)
    # Its value as the graph computes it: the dequantize op on the new integers.
    args = [
        bias_int if a is dq.input else ev.value(a) if isinstance(a, Node) else a
        for a in dq.node.args
    ]
    try:
        value = dq.node.target(*args, **_op_kwargs(ev, dq.node))
    except Exception as e:  # noqa: BLE001
        return f"{describe(dq.node)} cannot be evaluated on the new bias ({type(e).__name__})"
    return bias_int, value.detach().to(torch.float64).reshape(-1).numpy()


def _op_kwargs(ev: Constants, node: Node) -> dict[str, Any]:
    return {k: ev.value(v) if isinstance(v, Node) else v for k, v in node.kwargs.items()}


# --------------------------------------------------------------------------------------------
# Rewriting


def _like(store: Store, bn: BatchNormCall, *, plain: bool = False) -> Node | None:
    """A stored tensor to keep new constants next to (they are stored the same way): the
    BatchNorm's own first, then any; a buffer or constant rather than a parameter (``plain``:
    only those, since an integer tensor cannot be a parameter)."""
    candidates = []
    for operand in (bn.mean, bn.var, bn.weight, bn.bias):
        found = trace_back(operand)
        if found is not None and store.tensor(found.source) is not None:
            candidates.append(found.source)
    candidates += store.constant_nodes()
    tensors = [(n, store.tensor(n)) for n in candidates]
    plain_ones = [n for n, t in tensors if t is not None and not isinstance(t, torch.nn.Parameter)]
    if plain_ones or plain:
        return plain_ones[0] if plain_ones else None
    return next((n for n, t in tensors if t is not None), None)


def _old_bias(store: Store, p: ProducerCall) -> Node | None:
    """The stored float tensor the producer's bias operand is computed from (``conv.bias``
    behind torchao's ``zeros_like(conv.bias)``), to keep the folded bias next to; ``None``."""
    operand = p.bias
    for _ in range(4):  # a few pass-through steps at most
        if not isinstance(operand, Node):
            return None
        value = store.tensor(operand)
        if value is not None:
            return operand if value.is_floating_point() else None
        inputs = operand.all_input_nodes
        if len(inputs) != 1:
            return None
        operand = inputs[0]
    return None


def rewrite(store: Store, chain: QatChain, bn: BatchNormCall, fold: QatFold) -> tuple[Node, list]:
    """Replace the chain's tail; returns the node that now carries the BatchNorm's output and
    the nodes that may have lost their last user."""
    graph = store.graph
    like = fold.like
    assert like is not None
    prefix = store.key(like).rpartition(".")[0]
    z = chain.dequantize.node
    out = bn.output
    assert out is not None
    if fold.mode == "exact":
        current: Node = z
        for name, value, op in (
            ("qat_scale", fold.k, torch.ops.aten.mul.Tensor),
            ("qat_shift", fold.shift, torch.ops.aten.add.Tensor),
        ):
            if value is None:
                continue
            const = store.add(like, f"{prefix}.{name}" if prefix else name, value, bn.node)
            with graph.inserting_before(bn.node):
                current = graph.call_function(op, (current, const))
            current.meta = dict(out.meta)
        result = current
    else:
        result = z
        p = chain.producer
        before = p.node
        if fold.bias_dq is None:
            home = _old_bias(store, p)  # torchao's zeros_like(conv.bias): next to conv.bias
            if home is not None:
                bias = store.add(home, f"{store.key(home)}_folded", fold.bias, before)
            else:
                hint = f"{prefix}.qat_bias" if prefix else "qat_bias"
                bias = store.add(like, hint, fold.bias, before)
        else:
            holder = fold.bias_like
            assert holder is not None
            old_source = trace_back(fold.bias_dq.input)
            if old_source is not None and old_source.source is holder:
                hint = f"{store.key(holder)}_folded"  # _frozen_param1 -> _frozen_param1_folded
            else:
                owner = store.key(holder).rpartition(".")[0]
                hint = f"{owner}.qat_bias_int" if owner else "qat_bias_int"
            stored = store.add(holder, hint, fold.bias, before)
            old = fold.bias_dq.node
            with graph.inserting_before(before):
                bias = graph.node_copy(old, lambda n: stored if n is old.args[0] else n)
            bias.meta = dict(old.meta)
        touched_bias = p.bias
        set_argument(p.node, p.bias_arg, bias)
        if isinstance(touched_bias, Node):
            chain_touched = [touched_bias]
        else:
            chain_touched = []
    out.replace_all_uses_with(result)
    touched: list[Any] = [link.node for link in chain.links]
    touched += [v for v in (bn.weight, bn.bias, bn.mean, bn.var) if isinstance(v, Node)]
    for user in list(bn.node.users):
        graph.erase_node(user)
    graph.erase_node(bn.node)
    if fold.mode == "bias":
        touched += chain_touched
    return result, touched


__all__ = ["QatChain", "QatFold", "compute", "match", "rewrite"]
