"""What ATen nodes of a torch.export graph compute: BatchNorm ops, producer ops, their arguments.

The graph frontend (:mod:`bnfold.torch.export`) reads nodes only through this module, so the op
tables (both the ops ``torch.export`` emits and what ``run_decompositions()`` turns them into)
live in one place.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from ...core.algebra import CONV, LINEAR, OutputLayout, conv_transpose_layout
from ...core.pipeline import BatchNormSite, ProducerSite, StoredOperand
from ...errors import FoldRefused

# BatchNorm ops. ``None``: the op has a ``training`` argument; ``False``: always inference;
# ``True``: always batch statistics. The second value says whether the op returns a tuple.
_BATCH_NORM_OPS: dict[str, tuple[bool | None, bool]] = {
    "batch_norm": (None, False),
    "native_batch_norm": (None, True),
    "_native_batch_norm_legit": (None, True),
    "_native_batch_norm_legit_functional": (None, True),
    "_native_batch_norm_legit_no_training": (False, True),
    "_batch_norm_no_update": (False, True),
    "_batch_norm_with_update": (True, True),
    "_batch_norm_with_update_functional": (True, True),
    "cudnn_batch_norm": (None, True),
    "miopen_batch_norm": (None, True),
}

_CONV_OPS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_CONV_T_OPS = {"conv_transpose1d": 1, "conv_transpose2d": 2, "conv_transpose3d": 3}

# Ops that pass a weight through unchanged in value (possibly permuted): the weight of a
# decomposed linear reaches aten.mm / aten.addmm as ``permute(weight, [1, 0])``.
# ``detach_`` writes autograd metadata only: a ``torch.tensor(...)`` made in forward reaches
# the graph as ``lift_fresh_copy`` then ``detach_``, and its values are as constant as before.
_PASS_THROUGH = {"alias", "detach", "detach_", "clone", "lift_fresh_copy"}
_TRANSPOSE_OPS = {"permute", "t", "transpose", "numpy_T", "mT"}
_METADATA_ONLY_WRITES = {"detach_"}

# Ops between a producer and its BatchNorm that keep every value and only move axes (or copy
# the values unchanged); reshapes are followed where they keep the channel axis (below).
_ACTIVATION_COPIES = {"alias", "detach", "clone", "contiguous"}
_RESHAPES = {"view", "reshape", "_unsafe_view", "_reshape_alias"}

# Ops that return views of their input without saying so in their schema.
_UNANNOTATED_VIEWS = {
    "_unsafe_view",
    "unsafe_split",
    "unsafe_split_with_sizes",
    "unsafe_chunk",
    "_reshape_alias",
}


def aten_name(node: Node) -> str | None:
    """``"conv2d"`` for a call of ``aten.conv2d.<overload>``; ``None`` for anything else."""
    t = node.target
    if node.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        return t._opname if t.namespace == "aten" else None
    return None


def describe(node: Node) -> str:
    """A short human name for a node: ``node relu (aten.relu)``, ``graph input x``."""
    if node.op == "placeholder":
        return f"graph input {node.name}"
    if node.op == "get_attr":
        return f"attribute {node.target}"
    if node.op == "call_function":
        t = node.target
        what = (
            f"{t.namespace}.{t._opname}"
            if isinstance(t, torch._ops.OpOverload)
            else getattr(t, "__name__", str(t))
        )
        return f"node {node.name} ({what})"
    return f"node {node.name} ({node.op} {node.target})"


def arguments(node: Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    bound: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            bound[a.name] = node.args[i]
        elif a.name in node.kwargs:
            bound[a.name] = node.kwargs[a.name]
        else:
            bound[a.name] = a.default_value if a.has_default_value() else None
    return bound


def set_argument(node: Node, name: str, value: Any) -> None:
    """Set the schema argument ``name`` of ``node`` (positionally if it is given so)."""
    schema_args = node.target._schema.arguments
    names = [a.name for a in schema_args]
    i = names.index(name)
    if name in node.kwargs:
        node.update_kwarg(name, value)
        return
    if i < len(node.args):
        node.update_arg(i, value)
        return
    gap = schema_args[len(node.args) : i]
    if schema_args[i].kwarg_only or any(a.kwarg_only or a.name in node.kwargs for a in gap):
        node.update_kwarg(name, value)
        return
    if any(not a.has_default_value() for a in gap):
        node.update_kwarg(name, value)
        return
    # Positional, as quantizers and pattern matchers read it (conv bias is args[2]).
    node.args = tuple(node.args) + tuple(a.default_value for a in gap) + (value,)


# Set in a node's meta by bnfold.torch.pt2 when a program read from a file carries shape
# metadata for the node that bnfold could not check against what the program computes (the node
# depends on an op bnfold does not run, even on fake tensors): its shape counts as unknown.
UNCHECKED_SHAPE = "bnfold_unchecked_shape"


def shape_value(node: Node) -> Any:
    """``node.meta["val"]``, or ``None`` when it is unknown or could not be checked."""
    return None if node.meta.get(UNCHECKED_SHAPE) else node.meta.get("val")


def rank(node: Node) -> int | None:
    """Rank of the tensor ``node`` produces, from ``node.meta["val"]``; ``None`` if unknown."""
    val = shape_value(node)
    return val.dim() if isinstance(val, torch.Tensor) else None


def may_be_written(
    node: Node, ignore: Node | None = None, reads_only: Callable[[Node], bool] | None = None
) -> bool:
    """Whether the program may write into the tensor ``node`` stands for while it runs
    (``ignore``: a node whose own writes do not count, one a fold removes; ``reads_only``:
    says of a node that is not an ATen op that it only reads, such as torch.export's guard
    module).

    Follows views: ``w[0].mul_(2)`` writes into ``w`` through a ``select`` (the graph as
    exported keeps such in-place ops). An ATen op argument annotated as aliased and written
    (``Tensor(a!)``) writes; one annotated as aliased but not written returns a view, whose
    users are followed in turn. Anything that is not an ATen op (higher-order ops, Python
    callables, submodules) may do anything, so it counts as writing; ``output`` only reads.
    """
    seen: set[Node] = set()
    work = [node]
    while work:
        current = work.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in current.users:
            if user.op == "output" or user is ignore:
                continue
            if reads_only is not None and user.op != "call_function" and reads_only(user):
                continue
            if user.op == "call_function" and user.target is operator.getitem:
                work.append(user)  # an element of a list of views (split, unbind)
                continue
            t = user.target
            if user.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
                return True
            bn = batch_norm_call(user)
            if bn is not None and bn.training is not False and current in (bn.mean, bn.var):
                return True  # aten.batch_norm updates its running statistics unannotated
            if t._opname in _UNANNOTATED_VIEWS or t._opname in _METADATA_ONLY_WRITES:
                work.append(user)
                continue
            for i, a in enumerate(t._schema.arguments):
                given = user.args[i] if i < len(user.args) else user.kwargs.get(a.name)
                uses = given is current or (isinstance(given, (list, tuple)) and current in given)
                if not uses or a.alias_info is None:
                    continue
                if a.alias_info.is_write:
                    return True
                work.append(user)  # a view of the tensor: its users may write into it
    return False


# --------------------------------------------------------------------------------------------
# BatchNorm nodes


@dataclass(kw_only=True)
class BatchNormCall(BatchNormSite[Node]):
    """One BatchNorm node: its operands and the node that carries its normalised output
    (``output``; ``None`` when nothing reads it)."""

    op: str
    training: Any  # a bool, or a node / symbol when not a literal
    other_outputs_used: str  # who uses the saved statistics outputs; "" if nobody


def batch_norm_call(node: Node) -> BatchNormCall | None:
    """Read ``node`` as a BatchNorm op; ``None`` if it is not one."""
    op = aten_name(node)
    if op not in _BATCH_NORM_OPS:
        return None
    fixed, returns_tuple = _BATCH_NORM_OPS[op]
    args = arguments(node)
    training = fixed if fixed is not None else args.get("training")
    if "running_mean" not in args:  # the no_stats overload normalises with batch statistics
        training = True
    output: Node | None = node
    others: list[str] = []
    if returns_tuple:
        output = None
        for user in node.users:
            if user.op == "call_function" and user.target is operator.getitem:
                if user.args[1] == 0:
                    output = user if output is None else output
                    if user is not output:  # two getitem(0): move the second one's users
                        others.append(f"a second read of its output ({user.name})")
                elif user.users:
                    others.append(", ".join(u.name for u in user.users))
            else:
                others.append(user.name)
    return BatchNormCall(
        node=node,
        op=op,
        input=args.get("input"),
        weight=args.get("weight"),
        bias=args.get("bias"),
        mean=args.get("running_mean"),
        var=args.get("running_var"),
        training=training,
        eps=args.get("eps", args.get("epsilon")),
        output=output,
        other_outputs_used=", ".join(others),
    )


# --------------------------------------------------------------------------------------------
# Producer nodes


@dataclass(kw_only=True)
class ProducerCall(ProducerSite[Node]):
    """One Conv / ConvTranspose / Linear-like node and where its weight and bias come from.

    ``weight_arg`` / ``bias_arg`` are the schema names of the operands; ``weight_axis`` is the
    axis of the *operand* that holds the output channels (1 for the ``(in, out)`` matrix of
    ``mm``/``addmm``).
    """

    op: str
    weight_arg: str
    bias_arg: str
    weight: Any
    bias: Any


def producer_call(node: Node) -> ProducerCall | None:
    """Read ``node`` as a producer op; ``None`` if it is not one."""
    op = aten_name(node)
    if op is None:
        return None
    if op in _CONV_OPS or op in _CONV_T_OPS or op in ("convolution", "_convolution"):
        args = arguments(node)
        if op in ("convolution", "_convolution"):
            transposed = args["transposed"]
            spatial = len(args["stride"]) if isinstance(args["stride"], (list, tuple)) else 0
        else:
            transposed = op in _CONV_T_OPS
            spatial = (_CONV_OPS | _CONV_T_OPS)[op]
        problem = ""
        if not isinstance(transposed, bool):
            problem = f"{op}'s transposed flag is not a constant"
        groups = args["groups"]
        if not isinstance(groups, int):
            problem, groups = f"{op}'s groups is not a constant", 1
        return ProducerCall(
            node=node,
            op=op,
            kind="conv_transpose" if transposed is True else "conv",
            spatial_dims=spatial,
            weight_arg="weight",
            bias_arg="bias",
            weight=args["weight"],
            bias=args["bias"],
            weight_axis=1 if transposed is True else 0,
            groups=groups,
            output_rank=rank(node),
            problem=problem,
        )
    if op == "linear":
        args = arguments(node)
        return ProducerCall(
            node=node,
            op=op,
            kind="linear",
            weight_arg="weight",
            bias_arg="bias",
            weight=args["weight"],
            bias=args["bias"],
            output_rank=rank(node),
        )
    if op in ("addmm", "mm", "matmul"):
        args = arguments(node)
        problem = ""
        if op == "addmm" and args.get("beta", 1) != 1:
            problem = f"aten.addmm scales its bias by beta={args['beta']}; bnfold folds beta=1"
        if op == "matmul":  # as exported, x @ W; only a 2-D x times a 2-D W is a linear layer
            x, w = args["self"], args["other"]
            ranks = [rank(v) if isinstance(v, Node) else None for v in (x, w)]
            if None in ranks:
                problem = "the ranks of aten.matmul's operands are unknown (no shape metadata)"
            elif ranks != [2, 2]:
                problem = f"aten.matmul of {ranks[0]}-D by {ranks[1]}-D operands is not x @ W"
            args = {"mat2": w, "self": None}
        return ProducerCall(
            node=node,
            op=op,
            kind="linear",
            spatial_dims=0,
            weight_arg="other" if op == "matmul" else "mat2",
            bias_arg="self",
            weight=args["mat2"],
            bias=args["self"] if op == "addmm" else None,
            weight_axis=1,
            groups=1,
            output_rank=rank(node) if op == "matmul" else 2,
            problem=problem,
        )
    return None


# --------------------------------------------------------------------------------------------
# Elementwise arithmetic (the links of per-channel affine chains)

# The overloads without rounding modes or outputs; ``neg`` has one operand.
_ARITHMETIC = {
    "mul": ("Tensor", "Scalar"),
    "div": ("Tensor", "Scalar"),
    "add": ("Tensor", "Scalar"),
    "sub": ("Tensor", "Scalar"),
    "rsub": ("Tensor", "Scalar"),
    "neg": ("default",),
}
_WITH_ALPHA = ("add", "sub", "rsub")


@dataclass(frozen=True)
class ArithCall:
    """One elementwise arithmetic node: ``op`` of ``first`` and ``second`` (the schema's
    ``self`` and ``other``: nodes or numbers; ``second`` is ``None`` for ``neg``). ``alpha``
    scales the second operand of ``add``/``sub`` (``first + alpha*second``,
    ``first - alpha*second``) and the first of ``rsub`` (``second - alpha*first``)."""

    node: Node
    op: str
    first: Any
    second: Any
    alpha: Any = 1


def arith_call(node: Node) -> ArithCall | None:
    """Read ``node`` as elementwise arithmetic; ``None`` if it is not."""
    op = aten_name(node)
    if op not in _ARITHMETIC or node.target._overloadname not in _ARITHMETIC[op]:
        return None
    args = arguments(node)
    alpha = args.get("alpha", 1) if op in _WITH_ALPHA else 1
    return ArithCall(node, op, args.get("self"), args.get("other"), alpha)


def layout(p: ProducerCall, source_axis: int, first_axis: int = 0) -> OutputLayout:
    """Output-channel layout of the producer's weight *source* tensor, whose axis
    ``source_axis`` is the operand's output-channel axis and ``first_axis`` its axis 0."""
    if p.kind == "conv_transpose":
        if source_axis == 1 and (first_axis == 0 or p.groups == 1):
            return conv_transpose_layout(p.groups)
        # A grouped weight's blocks lie along the operand's axis 0: moved by a permute, they
        # are not where the layout scales them.
        if p.groups > 1:
            raise FoldRefused(
                f"the grouped {p.op}'s weight reaches it through a permute; bnfold does not "
                "fold that layout"
            )
        return OutputLayout(source_axis)
    if source_axis == 0:
        return CONV if p.kind == "conv" else LINEAR
    return OutputLayout(axis=source_axis)


def trace_back(value: Any) -> StoredOperand[Node] | None:
    """Follow a weight operand back through value-preserving ops to where it starts.

    Returns the start, the ops passed and the axis permutations they apply (see
    :class:`~bnfold.core.pipeline.StoredOperand`); ``None`` when the operand is not a node.
    Permutes and transposes whose permutation is known move axes; anything else that is not a
    pure pass-through ends the chain.
    """
    if not isinstance(value, Node):
        return None
    path: list[Node] = []
    perms: list[tuple[int, ...]] = []
    node = value
    while True:
        op = aten_name(node)
        source = node.args[0] if node.args else node.kwargs.get("self")
        if op in _TRANSPOSE_OPS:
            src_rank = rank(source) if isinstance(source, Node) else None
            perm = _permutation(node, op, src_rank)
            if perm is None:
                break
            perms.insert(0, perm)
        elif op not in _PASS_THROUGH:
            break
        if not isinstance(source, Node):
            return None
        path.insert(0, node)
        node = source
    return StoredOperand(node, tuple(path), tuple(perms))


def _permutation(node: Node, op: str, src_rank: int | None) -> tuple[int, ...] | None:
    """The axis permutation ``node`` applies (output axis ``i`` is input axis ``perm[i]``), or
    ``None`` when it cannot be told."""
    if op == "mT":  # swaps the last two axes
        if src_rank is None or src_rank < 2:
            return None
        return (*range(src_rank - 2), src_rank - 1, src_rank - 2)
    if op in ("t", "numpy_T"):
        if src_rank is None:
            # t() takes at most 2-D tensors and a weight is 2-D; numpy_T reverses any rank
            return None if op == "numpy_T" else (1, 0)
        if src_rank > 2:
            return None if op == "numpy_T" else (1, 0)
        return tuple(reversed(range(src_rank)))
    args = arguments(node)
    if op == "permute":
        dims = args.get("dims")
        if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
            return None
        n = len(dims)
        if src_rank is not None and src_rank != n:
            return None
        perm = tuple(d % n for d in dims if -n <= d < n)
        return perm if sorted(perm) == list(range(n)) else None
    if op == "transpose":
        d0, d1 = args.get("dim0"), args.get("dim1")
        if not isinstance(d0, int) or not isinstance(d1, int) or src_rank is None:
            return None
        if not (-src_rank <= d0 < src_rank and -src_rank <= d1 < src_rank):
            return None
        perm = list(range(src_rank))
        d0, d1 = d0 % src_rank, d1 % src_rank
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return tuple(perm)
    return None


def uses(value: Node, user: Node) -> int:
    """How many argument positions of ``user`` hold ``value`` (``mm(w, w)`` uses ``w`` twice)."""
    count = 0

    def seen(n: Node) -> Node:
        nonlocal count
        count += n is value
        return n

    torch.fx.node.map_arg((user.args, user.kwargs), seen)
    return count


def other_uses(value: Node, but: Node) -> list[Node]:
    """The users of ``value`` once for every argument position that holds it, less one use
    by ``but`` (the one the caller accounts for)."""
    found: list[Node] = []
    for user in value.users:
        n = uses(value, user) - (user is but)
        found += [user] * max(n, 0)
    return found


def operand_source(node: Node) -> Any:
    """What a view or layout op reads: its first operand, given by position or as ``self``."""
    return node.args[0] if node.args else node.kwargs.get("self")


def is_activation_layout(node: Node) -> bool:
    """Whether ``node`` is a layout op :func:`activation_steps` walks back through."""
    op = aten_name(node)
    return op in _TRANSPOSE_OPS or op in _ACTIVATION_COPIES or op in _RESHAPES


def activation_steps(
    value: Any, user: Node | None = None, links: Mapping[Node, Any] | None = None
) -> tuple[Any, list[Node]]:
    """Walk back from a BatchNorm's input through layout ops (transposes, copies, reshapes).

    Returns the value they start from and the ops in graph order; whether the channels can
    be followed through them is :func:`follow_channel_axis`'s question. ``links`` (arithmetic
    nodes -> what they read, ``.input``) are walked through too while every value from them to
    ``user`` (who reads ``value``) feeds the next step only: a link whose value is read
    elsewhere ends a chain of its own.
    """
    steps: list[Node] = []
    node, reader, single = value, user, True
    while isinstance(node, Node):
        single = single and reader is not None and not other_uses(node, reader)
        link = links.get(node) if links else None
        if link is not None and single:
            upstream = link.input
        elif is_activation_layout(node):
            upstream = operand_source(node)
        else:
            break
        steps.insert(0, node)
        node, reader = upstream, node
    return node, steps


@dataclass(frozen=True)
class AxisTrack:
    """Where a producer's channel axis arrives after layout ops: ``axis``, or ``None`` and
    ``problem``; ``reshaped`` when a reshape lost it (the channels are then mixed with other
    axes, which is no producer at all rather than a wrong axis)."""

    axis: int | None
    problem: str = ""
    reshaped: bool = False
    at: tuple[int, ...] = ()  # the axis on each step's output, as far as it was followed


def follow_channel_axis(
    steps: list[Node], axis: int, src_rank: int, keeps: Container[Node] = ()
) -> AxisTrack:
    """Follow axis ``axis`` of a ``src_rank``-D value through ``steps`` (those in ``keeps``,
    elementwise arithmetic, keep every axis where it is)."""
    at: list[int] = []
    for step in steps:
        op = aten_name(step)
        out_rank = rank(step)
        if op in _ACTIVATION_COPIES or step in keeps:
            at.append(axis)
            continue
        if op in _RESHAPES:
            moved = _reshaped_axis(operand_source(step), step, axis)
            if moved is None:
                why = f"{describe(step)} reshapes axis {axis}"
                return AxisTrack(None, why, reshaped=True, at=tuple(at))
        elif out_rank is None:
            return AxisTrack(None, f"{describe(step)} has no shape metadata", at=tuple(at))
        else:
            perm = _permutation(step, op, src_rank)
            found = [] if perm is None or len(perm) != out_rank else perm_positions(perm, axis)
            if len(found) != 1:
                why = f"{describe(step)} does not keep axis {axis} as one axis"
                return AxisTrack(None, why, at=tuple(at))
            moved = found[0]
        axis, src_rank = moved, out_rank if out_rank is not None else src_rank
        at.append(axis)
    return AxisTrack(axis, at=tuple(at))


def perm_positions(perm: tuple[int, ...], axis: int) -> list[int]:
    """The output axes of a permutation that read input axis ``axis``."""
    return [j for j, source in enumerate(perm) if source == axis]


def _reshaped_axis(source: Any, step: Node, axis: int) -> int | None:
    """The output axis of a reshape that holds input axis ``axis`` unchanged, when that axis
    is the last one on both sides (a Linear on 3-D input decomposes into reshapes around a
    2-D ``addmm``); ``None`` otherwise."""
    before = shape_value(source) if isinstance(source, Node) else None
    after = shape_value(step)
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return None
    if axis != before.dim() - 1 or after.dim() == 0 or before.dim() == 0:
        return None
    a, b = before.shape[-1], after.shape[-1]
    # Row-major: with equal last sizes, element (..., c) stays at (..., c).
    same = a == b if isinstance(a, int) and isinstance(b, int) else str(a) == str(b)
    return after.dim() - 1 if same else None


def is_pass_through(node: Node) -> bool:
    """Whether ``node`` is one of the ops :func:`trace_back` looks through."""
    op = aten_name(node)
    return op in _PASS_THROUGH or op in _TRANSPOSE_OPS


def module_path(node: Node) -> tuple[str, str] | None:
    """``(path, class name)`` of the innermost module a node was called in.

    Repeated calls of a module get torch.export's ``@k`` suffix (``"bn@1"``) so that every call
    has its own name. ``None`` for nodes without a module stack (or at the root).
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (path, klass) = list(stack.items())[-1]
    if not path:
        return None
    if "@" in key and "@" not in path:
        path = f"{path}@{key.rsplit('@', 1)[1]}"
    name = klass.rsplit(".", 1)[-1] if isinstance(klass, str) else getattr(klass, "__name__", "")
    return path, name


# --------------------------------------------------------------------------------------------
# Quantize / dequantize nodes (pt2e: torchao's and torch.ao's ``quantized_decomposed`` ops)

_QUANT_NAMESPACE = "quantized_decomposed"
_QUANT_OPS = {
    "quantize_per_tensor": ("quantize", False),
    "dequantize_per_tensor": ("dequantize", False),
    "quantize_per_channel": ("quantize", True),
    "dequantize_per_channel": ("dequantize", True),
}


@dataclass(frozen=True)
class QuantCall:
    """One ``quantized_decomposed`` quantize or dequantize node, its operands by meaning.

    ``scale`` and ``zero_point`` are numbers or nodes (per-channel, and the ``.tensor``
    overloads); ``axis`` is ``None`` per tensor. ``out_dtype`` is a dequantize's float type
    (``None``: float32).
    """

    node: Node
    kind: str  # "quantize" or "dequantize"
    per_channel: bool
    input: Any
    scale: Any
    zero_point: Any
    axis: int | None
    quant_min: Any
    quant_max: Any
    dtype: Any
    out_dtype: Any = None


def quant_call(node: Any) -> QuantCall | None:
    """Read ``node`` as a quantize or dequantize op; ``None`` if it is not one."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    t = node.target
    if not isinstance(t, torch._ops.OpOverload) or t.namespace != _QUANT_NAMESPACE:
        return None
    if t._opname not in _QUANT_OPS:
        return None
    kind, per_channel = _QUANT_OPS[t._opname]
    args = arguments(node)
    return QuantCall(
        node=node,
        kind=kind,
        per_channel=per_channel,
        input=args.get("input"),
        scale=args.get("scales" if per_channel else "scale"),
        zero_point=args.get("zero_points" if per_channel else "zero_point"),
        axis=args.get("axis") if per_channel else None,
        quant_min=args.get("quant_min"),
        quant_max=args.get("quant_max"),
        dtype=args.get("dtype"),
        out_dtype=args.get("out_dtype"),
    )


def op_label(node: Node) -> str:
    """``aten.add``, ``quantized_decomposed.dequantize_per_tensor``: a node's op in messages."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}"
    return getattr(t, "__name__", str(t))
