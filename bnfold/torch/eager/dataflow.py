"""Data flow between module calls of an ``nn.Module``, for the eager frontend.

A ``torch.fx`` symbolic trace in which producers and BatchNorms are leaves says which module's
output feeds which BatchNorm and who else uses it. When symbolic tracing fails and example inputs
are given, ``torch.export`` (non-strict) traces the model instead and its ATen nodes are mapped
back to module calls through their ``nn_module_stack``. Output ranks come from running the model
once on the example inputs, and only when a fold needs them.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import inspect
import itertools
import re
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ...core.logs import quiet_warnings
from ...errors import InvalidArgumentError, TracingError, first_line
from ...torch.eager.batchnorm import (
    BufferProxyTracer,
    forward_changed_reason,
    is_batchnorm,
    reads_metadata_only,
)
from ...torch.eager.producers import producer_kind
from ...torch.eager.state import TRACE_LOCK, find_proxies, preserved_state
from ...torch.verify import fresh_copy, output_tensors

# --------------------------------------------------------------------------------------------
# What may stand between a producer and its BatchNorm

# One step between them: ("module", path) for a module that passes its input through unchanged,
# ("transpose", d0, d1), ("permute", dims) or ("mT",) for an op that only reorders the axes.
Step = tuple

# Modules that are the identity in eval mode (Dropout), or always (Identity); exactly these
# classes, whose forward bnfold knows.
_PASS_THROUGH_TYPES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def pass_through_modules(model: nn.Module) -> dict[str, str]:
    """Every ``nn.Identity`` and Dropout module of ``model``, under the name torch.fx calls it
    by: ``""`` when calling it returns its input unchanged (a plain torch class, no hooks, no
    forward of its own on the instance, a Dropout in eval mode), or why not."""
    found = {}
    for path, m in model.named_modules():
        if path and type(m) in _PASS_THROUGH_TYPES:
            why = forward_changed_reason(m)
            if not why and m.training and not isinstance(m, nn.Identity):
                why = f"{type(m).__name__} in training mode"
            found[path] = why
    return found


# Ops that only reorder a tensor's axes: name (a Tensor method, a torch function) -> the step's
# kind and the names of its dimension arguments.
_LAYOUT_OPS = {"transpose": ("dim0", "dim1"), "swapdims": ("dim0", "dim1")}
_LAYOUT_OPS["swapaxes"] = ("axis0", "axis1")
_LAYOUT_FUNCTIONS = {
    torch.transpose: "transpose",
    torch.swapaxes: "swapaxes",
    torch.swapdims: "swapdims",
    torch.permute: "permute",
}


def _layout_call(name: str, args: tuple, kwargs: dict) -> tuple[Any, Step] | None:
    """``(source, step)`` for a call of layout op ``name`` (``"transpose"``, ``"permute"``,
    ``"mT"``, ...) with these arguments, the source first; ``None`` for anything else (a
    dimension that is not a plain int, an argument bnfold does not know)."""
    if not args:
        return None
    source, rest, kw = args[0], list(args[1:]), dict(kwargs)
    if name == "mT":
        return (source, ("mT",)) if not rest and not kw else None
    if name == "permute":
        dims: Any = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if not rest:
            dims = kw.pop("dims", None)
        if kw or not isinstance(dims, (list, tuple)) or not all(type(d) is int for d in dims):
            return None
        return source, ("permute", tuple(dims))
    names = _LAYOUT_OPS.get(name)
    if names is None:
        return None
    for k in names[len(rest) :]:
        if k in kw:
            rest.append(kw.pop(k))
    if kw or len(rest) != 2 or not all(type(d) is int for d in rest):
        return None
    return source, ("transpose", rest[0], rest[1])


def _fx_layout_step(node: torch.fx.Node) -> tuple[Any, Step] | None:
    """``(source, step)`` when graph node ``node`` only reorders its source's axes."""
    if node.op == "call_function" and node.target is getattr:
        mt = len(node.args) == 2 and node.args[1] == "mT" and not node.kwargs
        return (node.args[0], ("mT",)) if mt else None
    if node.op == "call_method" and isinstance(node.target, str):
        name = node.target
    elif node.op == "call_function":
        try:
            name = _LAYOUT_FUNCTIONS.get(node.target, "")  # type: ignore[call-overload]
        except TypeError:  # a callable object that cannot be hashed
            name = ""
    else:
        return None
    return _layout_call(name, node.args, node.kwargs) if name else None


def _run_layout_step(name: str, args: tuple, kwargs: dict) -> tuple[Any, Step] | None:
    """``(source, step)`` when a torch function called while the model runs (``name`` as
    ``torch.overrides.resolve_name`` gives it) only reorders its source's axes."""
    if name == "torch.Tensor.mT.__get__":
        return _layout_call("mT", args, kwargs)
    short = name.removeprefix("torch.Tensor.").removeprefix("torch.")
    if short in _LAYOUT_OPS or short == "permute":
        return _layout_call(short, args, kwargs)
    return None


def moved_axis(step: Step, axis: int, rank: int) -> int | None:
    """Where axis ``axis`` (``0 <= axis < rank``) of a ``rank``-D tensor is after ``step``;
    ``None`` when the step does not apply to that rank."""
    kind = step[0]
    if kind == "module":
        return axis
    if kind == "permute":
        dims = step[1]
        if len(dims) != rank or not all(-rank <= d < rank for d in dims):
            return None
        dims = [d % rank for d in dims]
        return dims.index(axis) if sorted(dims) == list(range(rank)) else None
    if kind == "mT":
        if rank < 2:
            return None
        d0, d1 = rank - 2, rank - 1
    else:
        d0, d1 = step[1], step[2]
        if not (-rank <= d0 < rank and -rank <= d1 < rank):
            return None
        d0, d1 = d0 % rank, d1 % rank
    return d1 if axis == d0 else d0 if axis == d1 else axis


def follow_steps(steps: tuple[Step, ...], axis: int, rank: int) -> tuple[int | None, str]:
    """Where axis ``axis`` of a ``rank``-D value arrives after ``steps`` (all keep the rank),
    or ``None`` and why not."""
    for step in steps:
        moved = moved_axis(step, axis, rank)
        if moved is None:
            return None, f"{step_text(step)} does not apply to a {rank}-D value"
        axis = moved
    return axis, ""


def step_text(step: Step) -> str:
    if step[0] == "module":
        return f"module {step[1]}"
    if step[0] == "mT":
        return ".mT"
    if step[0] == "permute":
        return f"permute{step[1]}"
    return f"transpose({step[1]}, {step[2]})"


def layout_text(steps: tuple[Step, ...]) -> str:
    """The layout ops of ``steps``, for messages (the pass-through modules left out)."""
    return " -> ".join(step_text(s) for s in steps if s[0] != "module")


@dataclass
class ModuleCalls:
    """What the data flow says about one module (over all its calls)."""

    calls: int = 0
    input_from: str | None = None  # path of the producer module whose output is the input
    input_detail: str = ""  # what the input is otherwise
    output_users: int = 0  # consumers of the output (first call); the graph output counts
    other_users: list[str] = field(default_factory=list)
    # Between input_from and this module: the pass-through modules and layout ops the input
    # went through (see :func:`_walk_back`), the first of them as input_from's users name it,
    # and the other users of the values in between.
    through: tuple[Step, ...] = ()
    via: str = ""
    through_users: list[str] = field(default_factory=list)

    def merged(self, other: ModuleCalls) -> ModuleCalls:
        """What holds in both of two traces: the more calls, every user of either, one input.

        Users are told apart by description, so a user seen in one trace only counts: an output
        that feeds only the BatchNorm in one trace and the model output in the other has two.
        """
        same_input = self.input_from == other.input_from and self.through == other.through
        users = sorted(set(self.other_users) | set(other.other_users))
        return ModuleCalls(
            calls=max(self.calls, other.calls),
            input_from=self.input_from if same_input else None,
            input_detail=(
                self.input_detail
                if same_input
                else "different layers depending on forward()'s optional arguments"
            ),
            output_users=max(self.output_users, other.output_users, len(users)),
            other_users=users,
            through=self.through if same_input else (),
            via=self.via if same_input else "",
            through_users=sorted(set(self.through_users) | set(other.through_users)),
        )


@dataclass
class Trace:
    """One torch.fx trace of forward: how it was called and the shape of its graph."""

    args: dict[str, Any] | None  # the arguments fixed to values (``concrete_args``)
    shape: list[tuple]  # graph_shape() of the graph


@dataclass
class Dataflow:
    calls: dict[str, ModuleCalls]
    outside_uses: dict[str, list[str]]  # module path -> users of its tensors outside its calls
    note: str = ""  # a caveat on how the data flow was found
    # Other modules called whole, their forward unseen (torch.nn modules torch.fx keeps as leaves)
    opaque_calls: list[str] = field(default_factory=list)
    traces: list[Trace] = field(default_factory=list)  # the torch.fx traces it came from

    def renamed(self, rename: Callable[[str], str]) -> Dataflow:
        """The same data flow with every module path passed through ``rename``."""
        calls = {
            rename(path): dataclasses.replace(
                c,
                input_from=None if c.input_from is None else rename(c.input_from),
                through=tuple(
                    ("module", rename(s[1])) if s[0] == "module" else s for s in c.through
                ),
            )
            for path, c in self.calls.items()
        }
        outside = {rename(path): uses for path, uses in self.outside_uses.items()}
        opaque = [rename(p) for p in self.opaque_calls]
        return Dataflow(calls, outside, self.note, opaque, self.traces)

    def merged(self, other: Dataflow) -> Dataflow:
        """The data flow of two traces of one model, as conservative as either."""
        calls = dict(self.calls)
        for path, c in other.calls.items():
            calls[path] = c.merged(calls[path]) if path in calls else c
        outside = {k: list(v) for k, v in self.outside_uses.items()}
        for k, v in other.outside_uses.items():
            outside.setdefault(k, []).extend(u for u in v if u not in outside[k])
        opaque = self.opaque_calls + [p for p in other.opaque_calls if p not in self.opaque_calls]
        return Dataflow(calls, outside, self.note or other.note, opaque, self.traces + other.traces)


EXPORT_NOTE = (
    "torch.fx could not trace this model, so its data flow comes from torch.export on the "
    "example inputs: the folds are exact for inputs that take the same Python control-flow "
    "path as those (check other paths with bnfold.verify)"
)


class _LeafTracer(BufferProxyTracer):
    """Symbolic tracer that stops at producers and BatchNorms (subclasses included), and at
    the modules in ``leaves`` (ids).

    Buffers are proxied like parameters, so that forward reading a BatchNorm's statistics
    elsewhere shows up in the graph, and in-place updates of buffers are recorded, not run.
    """

    def __init__(self, leaves: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.leaves = leaves
        self.produced: list[weakref.ref] = []  # the proxies of the producers' outputs

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if producer_kind(m) is not None or is_batchnorm(m) or id(m) in self.leaves:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        passes = type(m) in _PASS_THROUGH_TYPES  # may stand between a producer and its BatchNorm
        if (producer_kind(m) is not None or passes) and isinstance(out, torch.fx.Proxy):
            self.produced.append(weakref.ref(out))
        return out

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest, **more) -> Any:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        if kind in ("call_method", "call_function") and _fx_layout_step(proxy.node):
            self.produced.append(weakref.ref(proxy))  # layout ops too (see kept_outputs)
        return proxy

    def kept_outputs(self, known: set[torch.fx.Node]) -> list[torch.fx.Node]:
        """The producer calls (and pass-through modules and layout ops, which may stand
        between a producer and its BatchNorm) whose output proxy outlived the trace somewhere
        other than ``known`` places: forward kept it in an object, a global or a closure.

        Once the trace has returned, nothing of torch.fx holds a proxy: one still alive was
        stored by forward. (A reference cycle may keep one alive a little longer: collected
        first, and only when something is left.)
        """
        alive = [p for r in self.produced if (p := r()) is not None and p.node not in known]
        if alive:
            del alive
            gc.collect()
            alive = [p for r in self.produced if (p := r()) is not None and p.node not in known]
        return [p.node for p in alive]


class _Ref(int):
    """A node of a graph shape, by position."""


def graph_shape(graph: torch.fx.Graph) -> list[tuple]:
    """What a traced graph computes, independent of node names: each node's kind, target and
    arguments, with nodes given by position. Two traces of the same Python code on the same
    structure have equal shapes."""
    index: dict[torch.fx.Node, _Ref] = {}
    shape = []
    for node in graph.nodes:
        index[node] = _Ref(len(index))
        target = node.target if node.op == "call_function" else str(node.target)
        args = torch.fx.node.map_arg(node.args, index.__getitem__)
        kwargs = torch.fx.node.map_arg(node.kwargs, index.__getitem__)
        shape.append((node.op, target, args, kwargs))
    return shape


def _same(a: Any, b: Any) -> bool:
    """Equality for graph-shape entries: NaN equals NaN, containers elementwise, anything that
    cannot be compared by value by identity."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b or (a != a and b != b)
    if isinstance(a, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    if isinstance(a, torch.Tensor):
        return False  # a tensor literal of each trace: nothing to compare but identity
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object without a usable ==
        return False


def _entry_text(entry: tuple) -> str:
    op, target, _, _ = entry
    name = getattr(target, "__name__", str(target))
    return f"{op} {name}"


def trace_difference(model: nn.Module, traces: list[Trace], leaves: frozenset[int]) -> str:
    """How ``model`` traces differently from ``traces`` (made from another model that should
    behave the same), or ``""``. Modules in ``leaves`` are kept whole, as producers and
    BatchNorms are."""
    with TRACE_LOCK, preserved_state(model, values=True) as state:
        for trace in traces:
            try:
                with quiet_warnings():
                    args = fresh_arguments(trace.args)
                    graph = _LeafTracer(leaves).trace(model, concrete_args=args)
            except Exception as e:  # noqa: BLE001 - any failure is a difference
                return f"the trace fails ({type(e).__name__}: {first_line(e)})"
            finally:
                state.restore()
            shape = graph_shape(graph)
            for i, (a, b) in enumerate(itertools.zip_longest(trace.shape, shape)):
                if a is None or b is None or not _same(a, b):
                    was = _entry_text(a) if a is not None else "nothing"
                    now = _entry_text(b) if b is not None else "nothing"
                    return f"the trace differs at step {i}: {was} became {now}"
    return ""


def _describe(node: torch.fx.Node) -> str:
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "output":
        return "the model output"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _fx_dataflow(
    graph: torch.fx.Graph,
    paths: dict[int, str],
    side_uses: dict[torch.fx.Node, str],
    pass_through: dict[str, str] | None = None,
) -> Dataflow:
    """Data flow from a symbolic trace; ``side_uses`` are values forward stored on the side,
    ``pass_through`` what :func:`pass_through_modules` says of the model's modules."""
    interesting = set(paths.values())
    calls: dict[str, ModuleCalls] = defaultdict(ModuleCalls)
    outside: dict[str, list[str]] = defaultdict(list)
    opaque: dict[str, None] = {}
    module_calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    passes = {
        path: why or (f"called {module_calls[path]} times" if module_calls[path] > 1 else "")
        for path, why in (pass_through or {}).items()
    }
    for node in graph.nodes:
        if node.op == "call_module" and node.target not in interesting:
            opaque[str(node.target)] = None
        if node.op == "call_module" and node.target in interesting:
            c = calls[node.target]
            c.calls += 1
            if c.calls > 1:
                continue
            src = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
            start, steps, first, between = _walk_back(node, src, passes, side_uses, interesting)
            if (
                isinstance(start, torch.fx.Node)
                and start.op == "call_module"
                and start.target in interesting
            ):
                c.input_from = start.target
                if steps:
                    c.through, c.via, c.through_users = tuple(steps), _describe(first), between
            if isinstance(start, torch.fx.Node) and (steps or c.input_from is None):
                stopped = passes.get(start.target, "") if start.op == "call_module" else ""
                c.input_detail = _describe(start) + (f" ({stopped})" if stopped else "")
                if steps:
                    c.input_detail += f" through {' -> '.join(map(step_text, steps))}"
            users = [_describe(u) for u in node.users if not reads_metadata_only(u)]
            if node in side_uses:
                users.append(f"forward() storing it in {side_uses[node]}")
            c.output_users = len(users)
            c.other_users = users
        elif node.op == "get_attr":
            owner = _owner(str(node.target), interesting)
            if owner is not None and not all(reads_metadata_only(u) for u in node.users):
                outside[owner].append(f"forward() reading {node.target}")
    return Dataflow(dict(calls), dict(outside), opaque_calls=list(opaque))


def _walk_back(
    node: torch.fx.Node,
    src: Any,
    passes: dict[str, str],
    side_uses: dict[torch.fx.Node, str],
    interesting: set[str],
) -> tuple[Any, list[Step], torch.fx.Node, list[str]]:
    """Walk back from ``node``'s input ``src`` through modules that pass their input through
    unchanged (``passes[path] == ""``) and ops that only reorder its axes.

    Returns where the walk stopped, the steps passed (in the order they run), the first of
    them (``node`` when none), and the other users of the values between: everything that
    reads one of them besides the next step, and forward storing one on the side.
    """
    steps: list[Step] = []
    between: list[str] = []
    after = node
    while isinstance(src, torch.fx.Node) and not (
        src.op == "call_module" and src.target in interesting
    ):
        if src.op == "call_module" and passes.get(src.target) == "":
            one_input = len(src.args) == 1 and not src.kwargs
            found = (src.args[0], ("module", src.target)) if one_input else None
        else:
            found = _fx_layout_step(src)
        if found is None or not isinstance(found[0], torch.fx.Node):
            break
        between += [
            _describe(u) for u in src.users if u is not after and not reads_metadata_only(u)
        ]
        if src in side_uses:
            between.append(f"forward() storing it in {side_uses[src]}")
        steps.insert(0, found[1])
        after, src = src, found[0]
    return src, steps, after, between


def _owner(qualname: str, paths: set[str]) -> str | None:
    parent = qualname.rpartition(".")[0]
    return parent if parent in paths else None


class _TensorOutputs(nn.Module):
    """``model`` returning the tensors of its output as a flat tuple.

    torch.export accepts only outputs it knows how to flatten; the data flow needs only which
    tensors leave the model. An output object bnfold cannot look into stops the trace, since it
    might hold a producer's output.
    """

    PREFIX = "model"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return tuple(t for _, t in output_tensors(self.model(*args), strict=True))


def _export_dataflow(
    ep: torch.export.ExportedProgram,
    paths: dict[int, str],
    prefix: str = "",
    aliases: _Aliases | None = None,
) -> Dataflow:
    """Data flow from a non-strict torch.export trace, mapped back to modules.

    ``paths`` are the modules' paths in the exported module; the result uses the paths
    without the wrapper's prefix.
    """
    graph = ep.graph
    sig = ep.graph_signature
    state_of = {
        **sig.inputs_to_parameters,
        **sig.inputs_to_buffers,
        **getattr(sig, "inputs_to_lifted_tensor_constants", {}),
    }
    interesting = set(paths.values())

    # Which call of which interesting module each node belongs to.
    group: dict[torch.fx.Node, str] = {}
    path_of_key: dict[str, str] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for key, (path, _type) in stack.items():
            # The stack names a module by the name it was called under: map every alias of a
            # module to one name, so that calls under two names count as two calls.
            if aliases is not None and path.startswith(prefix):
                canonical = aliases[path[len(prefix) :]]
                path = prefix + canonical if canonical is not None else path
            if path in interesting:
                group[node] = key
                path_of_key[key] = path
    keys_by_path: dict[str, list[str]] = defaultdict(list)
    for key, path in path_of_key.items():
        keys_by_path[path].append(key)

    calls: dict[str, ModuleCalls] = {}
    outside: dict[str, list[str]] = defaultdict(list)
    first_key: dict[str, str] = {}
    for node in graph.nodes:  # graph order, so the first call comes first
        key = group.get(node)
        if key is not None and path_of_key[key] not in first_key:
            first_key[path_of_key[key]] = key
    members_of: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node, key in group.items():
        members_of[key].append(node)
    for path, keys in keys_by_path.items():
        c = ModuleCalls(calls=len(keys))
        key = first_key[path]
        members = members_of[key]
        member_set = set(members)
        inputs = []
        for n in members:
            for a in n.all_input_nodes:
                if a in member_set or a.name in state_of or a.op == "get_attr":
                    continue
                if a not in inputs:
                    inputs.append(a)
        if len(inputs) == 1:
            src = inputs[0]
            src_key = group.get(src)
            if src_key is not None and src_key != key:
                c.input_from = path_of_key[src_key]
            else:
                c.input_detail = _describe(src)
        elif inputs:
            c.input_detail = "several values: " + ", ".join(_describe(a) for a in inputs)
        outputs = [n for n in members if any(u not in member_set for u in n.users)]
        users = [
            u
            for n in outputs
            for u in n.users
            if u not in member_set and not reads_metadata_only(u)
        ]
        c.output_users = len(users) if len(outputs) == 1 else len(users) + 1
        c.other_users = [_describe(u) for u in users]
        calls[path] = c

    def canonical(fqn: str) -> str:
        """A parameter's name under the name bnfold uses for its module."""
        owner, _, attr = fqn.rpartition(".")
        if aliases is not None and owner.startswith(prefix):
            name = aliases[owner[len(prefix) :]]
            owner = prefix + name if name is not None else owner
        return f"{owner}.{attr}"

    state_of = {name: canonical(fqn) for name, fqn in state_of.items()}
    # Parameters or buffers read outside the calls of the module that owns them.
    for node in graph.nodes:
        if node.name not in state_of:
            continue
        owner = _owner(state_of[node.name], interesting)
        if owner is None:
            continue
        for u in node.users:
            if group.get(u) is None or path_of_key[group[u]] != owner:
                outside[owner].append(_describe(u))
    # Every call must compute with the module's own tensors: torch.func.functional_call, or
    # forward assigning another Parameter to conv.weight for one call, computes with others.
    for key, members in members_of.items():
        path = path_of_key[key]
        for problem in _foreign_operands(members, path, state_of):
            outside[path].append(problem)
    return Dataflow(calls, dict(outside), note=EXPORT_NOTE)


_OWN_OPERANDS = {
    "producer": ("weight", "bias"),
    "batch_norm": ("weight", "bias", "mean", "var"),
}


def _foreign_operands(
    members: list[torch.fx.Node], path: str, state_of: dict[str, str]
) -> list[str]:
    """What in one call of the module at ``path`` is computed from tensors not its own.

    A producer's weight and bias, and a BatchNorm's statistics and affine parameters, must be
    the module's own parameters and buffers (reached through value-preserving views): the fold
    rewrites those, so a call computing with anything else would not see the fold, or would see
    it where it does not belong.
    """
    from ...torch.aten.ops import batch_norm_call, producer_call, trace_back

    problems = []
    for node in members:
        call: Any = producer_call(node)
        kind = "producer"
        if call is None:
            call, kind = batch_norm_call(node), "batch_norm"
        if call is None:
            continue
        for operand in _OWN_OPERANDS[kind]:
            value = getattr(call, operand)
            if value is None:
                continue  # no bias, no affine parameters: nothing to rewrite
            chain = trace_back(value)
            source = chain.source if chain else value
            name = state_of.get(source.name) if isinstance(source, torch.fx.Node) else None
            if name is None or name.rpartition(".")[0] != path:
                what = f"{name}" if name else _describe(source) if chain else repr(value)
                problems.append(
                    f"forward() running it with {what} as its {operand}, not its own tensor"
                )
    return problems


def _concrete_args(model: nn.Module, example_inputs: tuple | None) -> dict[str, Any]:
    """forward()'s arguments that a call with ``example_inputs`` fixes to non-tensor values.

    torch.fx makes every argument a proxy, so ``if mask is None`` sees "not None" and a
    ``mask=None`` default traces a branch that the usual call never takes. These arguments are
    traced with their actual values instead: the defaults, and non-tensor example values.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    given = example_inputs or ()
    concrete: dict[str, Any] = {}
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            break
        if i < len(given):
            if not isinstance(given[i], torch.Tensor) and p.kind != p.KEYWORD_ONLY:
                concrete[p.name] = given[i]
        elif p.default is not p.empty:
            concrete[p.name] = p.default
    return fresh_arguments(concrete) or {}


def fresh_arguments(args: dict[str, Any] | None) -> dict[str, Any] | None:
    """``args`` with every container (tuples, lists, dicts, ...) copied and every tensor cloned.

    torch.fx runs forward on concrete arguments as they are: ``batch["img"].sub_(0.5)`` or
    ``batch["feat"] = y`` would change the caller's example inputs (or a default value of
    forward's signature). Each trace gets its own copy, which :func:`input_side_uses` then
    searches for what forward stored in it. torch.fx rebuilds a dict, list or tuple argument
    (with ``pytree.tree_map``) before forward sees it, and what forward writes into the rebuilt
    one is lost: those are handed over as subclasses that pytree passes as they are.
    """
    if args is None:
        return None
    return {k: _handed_as_is(fresh_copy(v)) for k, v in args.items()}


class _DictArgument(dict):
    """A dict argument torch.fx hands to forward itself (see :func:`fresh_arguments`)."""


class _ListArgument(list):
    """A list argument torch.fx hands to forward itself."""


class _TupleArgument(tuple):
    """A tuple argument torch.fx hands to forward itself."""

    __slots__ = ()


for _kind, _name in ((_DictArgument, "dict"), (_ListArgument, "list"), (_TupleArgument, "tuple")):
    _kind.__name__ = _kind.__qualname__ = _name  # as messages name the caller's value


def _handed_as_is(value: Any) -> Any:
    kind = {dict: _DictArgument, list: _ListArgument, tuple: _TupleArgument}.get(type(value))
    return value if kind is None else kind(value)


def input_side_uses(args: dict[str, Any] | None) -> list[tuple[str, torch.fx.Proxy]]:
    """torch.fx proxies that a trace left in the (copied) concrete arguments ``args``.

    forward writing a layer's output into a container it was given (``batch["feat"] = y``)
    hands that value to the caller, a use of it the graph does not show.
    """
    return [
        (f"the argument {name!r}", proxy)
        for name, value in (args or {}).items()
        for proxy in find_proxies(value)
    ]


_TENSOR = object()  # in a variant: leave the argument to torch.fx as a tensor proxy
_MAX_VARIANTS = 16


def _variants(concrete: dict[str, Any]) -> list[dict[str, Any] | None]:
    """The ways of calling forward to trace, the example call first.

    Arguments fixed by the example call take, besides their example value, the values that are
    easy to enumerate: the other truth value of a flag, a tensor for a ``None`` default. Other
    values (strings, numbers) stay as in the example, and a last trace makes every argument a
    tensor proxy: if it succeeds, no ``if`` depends on them. When a trace fails, the report says
    which calls bnfold could not check.
    """
    if not concrete:
        return [None]
    choices = []
    for name, value in concrete.items():
        if isinstance(value, bool):
            choices.append([(name, value), (name, not value)])
        elif value is None:
            choices.append([(name, None), (name, _TENSOR)])
        else:
            choices.append([(name, value)])
    variants: list[dict[str, Any] | None] = []
    for combo in itertools.islice(itertools.product(*choices), _MAX_VARIANTS):
        # Each variant its own copy: what one trace writes into it is not seen by the next.
        args = fresh_arguments({k: v for k, v in combo if v is not _TENSOR})
        variants.append(args or None)
    if None not in variants:
        # Every argument a tensor proxy: if this traces, no `if` depends on the fixed ones.
        variants.append(None)
    return variants


def module_dataflow(
    model: nn.Module, example_inputs: tuple | None, paths: dict[int, str]
) -> Dataflow:
    """The data flow between the calls of the modules in ``paths`` (id(module) -> path).

    With optional arguments, forward is traced once per way of calling it that bnfold can
    enumerate (see :func:`_variants`), and the data flow keeps what holds in all of them.
    """
    concrete = _concrete_args(model, example_inputs)
    flows, errors = [], []
    variants = _variants(concrete)
    untraced: list[dict[str, Any] | None] = []
    watched = _watched_tensors(model, set(paths.values()))
    passes = pass_through_modules(model)
    with TRACE_LOCK, preserved_state(model, values=True) as state:
        for i, args in enumerate(variants):
            if i > 0 and not flows:
                break  # the example call itself cannot be traced: torch.export instead
            pristine = fresh_arguments(args)  # forward may write into the ones it is given
            try:
                with warnings.catch_warnings(), _RealTensorUses(watched) as real_uses:
                    # fx warns that it cannot guard a specialised argument; the report's note
                    # says what was fixed when only that trace succeeds. (Under the lock: no
                    # other trace is running.)
                    warnings.filterwarnings("ignore", "Was not able to add assertion")
                    tracer = _LeafTracer()
                    graph = tracer.trace(model, concrete_args=args)
            except Exception as e:  # noqa: BLE001 - fx fails on data-dependent Python code
                errors.append(e)
                untraced.append(args)
                state.restore()
                continue
            side_uses = {proxy.node: where for where, proxy in state.leaked_proxies()}
            side_uses.update({p.node: where for where, p in input_side_uses(args)})
            for node in tracer.kept_outputs(set(side_uses)):
                side_uses[node] = "a place outside the model (an object, a global, a closure)"
            flow = _fx_dataflow(graph, paths, side_uses, passes)
            flow.traces.append(Trace(pristine, graph_shape(graph)))
            _note_changed_in_place(flow, state.changed_in_place(), set(paths.values()))
            for owner, use in real_uses.found:
                flow.outside_uses.setdefault(owner, []).append(use)
            _note_state_dependent_calls(flow, state.changed_attributes(), set(paths.values()))
            flows.append(flow)
            state.restore()
    if flows:
        flow = flows[0]
        for other in flows[1:]:
            flow = flow.merged(other)
        if untraced:
            names = ", ".join(f"{k}={_short(v)}" for k, v in concrete.items())
            flow.note = (
                f"forward() was traced as called with {names} (the example call); calls with "
                "other values for these arguments may take other paths, which bnfold could not "
                "trace: check them with bnfold.verify"
            )
        return flow
    fx_error = errors[-1]
    if example_inputs is None:
        raise TracingError(
            f"torch.fx could not trace {type(model).__name__} ({type(fx_error).__name__}: "
            f"{first_line(fx_error)}); pass example_inputs so that bnfold can trace it "
            "with torch.export instead"
        ) from fx_error
    names, unique = count_module_names(model)
    if names > max(_MAX_EXPORT_NAMES, 4 * unique):
        raise TracingError(
            f"torch.fx could not trace {type(model).__name__} ({first_line(fx_error)}), and "
            f"torch.export, which bnfold would use instead, visits every name of every module: "
            f"modules registered under several names at many levels give this model {names:.3g} "
            "names. Make forward traceable by torch.fx, or register each module once"
        ) from fx_error
    try:
        with TRACE_LOCK, preserved_state(model, values=True) as state:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ep = torch.export.export(_TensorOutputs(model), example_inputs, strict=False)
            changed = state.changed_in_place()
            # torch.export puts tensor attributes that forward assigns back itself, and says so
            # in a warning; what it leaves is seen by the record.
            stored = state.stored_tensors() + _assigned_during_export(caught)
    except Exception as export_error:
        raise TracingError(
            f"bnfold could not find the data flow of {type(model).__name__}: torch.fx failed "
            f"({first_line(fx_error)}) and torch.export failed ({first_line(export_error)}). "
            "Make forward traceable (no Python control flow on tensor values), or fold the "
            "traceable submodules one by one"
        ) from export_error
    prefix = _TensorOutputs.PREFIX + "."
    aliases = _Aliases(model, paths)
    flow = _export_dataflow(ep, {k: prefix + p for k, p in paths.items()}, prefix, aliases)
    flow = flow.renamed(lambda path: path.removeprefix(prefix))
    _note_changed_in_place(flow, changed, set(paths.values()))
    if stored:
        # torch.export's values cannot be told apart once stored: any of them may be a layer's
        # output that leaves the model unseen, so no fold relies on a single consumer.
        use = f"forward() storing tensors in {', '.join(stored)}"
        for path in paths.values():
            flow.outside_uses.setdefault(path, []).append(use)
    return flow


# torch.export walks named_parameters(remove_duplicate=False) and gives the program an input
# per name: its time and graph grow with the names, not the modules.
_MAX_EXPORT_NAMES = 10_000


def count_module_names(model: nn.Module) -> tuple[int, int]:
    """How many names ``named_modules(remove_duplicate=False)`` would give, counted without
    walking them (a module held under two names at each of N levels has 2**N), and how many
    modules there are."""
    counts: dict[int, int] = {}

    def names(m: nn.Module, active: frozenset[int]) -> int:
        if id(m) in counts:
            return counts[id(m)]
        if id(m) in active:  # a cycle: torch would recurse without end
            return 1 << 62
        inner = active | {id(m)}
        total = 1 + sum(names(c, inner) for c in m._modules.values() if c is not None)
        counts[id(m)] = total
        return total

    return names(model, frozenset()), len(counts)


def _assigned_during_export(caught: list[warnings.WarningMessage]) -> list[str]:
    """Attributes torch.export reports as assigned during its trace (and has undone)."""
    names = []
    for w in caught:
        text = str(w.message)
        head, sep, _ = text.partition(" was assigned during export")
        if sep and "attribute " in head:
            name = head.rpartition("attribute ")[2]
            names.append(name.removeprefix(f"self.{_TensorOutputs.PREFIX}.").removeprefix("self."))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return names


class _Aliases(dict):
    """A module's name as the program calls it -> the name bnfold uses for it (or ``None``).

    Names are resolved when asked, by walking the model along the name: listing every name of
    every module up front would walk every path of the module tree, and a module registered
    under two names at each of N levels has 2**N paths.
    """

    def __init__(self, model: nn.Module, paths: dict[int, str]) -> None:
        super().__init__()
        self.model = model
        self.paths = paths

    def __missing__(self, name: str) -> str | None:
        m = _called_module(self.model, name) if name else None
        self[name] = self.paths.get(id(m)) if m is not None else None
        return self[name]


# A container sliced in forward (``for m in self.model[:-1]``): torch.export names the calls
# through it ``model.slice(None, -1, None).0.stem1``.
_SLICE = re.compile(r"slice\((-?\d+|None), (-?\d+|None), (-?\d+|None)\)")


def _called_module(model: nn.Module, name: str) -> nn.Module | None:
    """The module a program's call path ``name`` reaches, walking ``model`` as forward did:
    attribute and child names, and slices of containers (``model.slice(None, -1, None).0``:
    the first module of ``model[:-1]``, by name or else by position); ``None`` when the path
    leads nowhere."""
    m: Any = model
    for part in name.split("."):
        sliced = _SLICE.fullmatch(part)
        try:
            if sliced:
                bounds = [None if b == "None" else int(b) for b in sliced.groups()]
                m = m[slice(*bounds)]
            elif part in getattr(m, "_modules", {}):
                m = m._modules[part]
            elif part.isdigit() and isinstance(m, (nn.Sequential, nn.ModuleList)):
                # a slice of a Sequential keeps its children's names ("2", "3" for [-2:]); the
                # program may count positions instead
                m = list(m._modules.values())[int(part)]
            else:
                m = getattr(m, part)
        except (AttributeError, TypeError, IndexError, KeyError, ValueError):
            return None
        if not isinstance(m, nn.Module):
            return None
    return m


def _watched_tensors(model: nn.Module, paths: set[str]) -> dict[int, tuple[str, str]]:
    """id(tensor) -> (owning module path, qualified name) for the producers' and BatchNorms'
    parameters and buffers."""
    watched = {}
    for path in paths:
        m = model.get_submodule(path)
        for name, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None:
                watched[id(t)] = (path, f"{path}.{name}")
    return watched


class _RealTensorUses(TorchFunctionMode):
    """Notes torch operations on the real parameters and buffers of producers and BatchNorms
    while forward is traced.

    torch.fx sees a parameter read as an attribute (``self.conv.weight``) but not one reached
    through ``.parameters()``, ``_parameters[...]`` or ``named_buffers()``: those are real
    tensors, and what forward computes from them is baked into the graph as a constant. Any
    such operation is a use of the tensor outside its module.
    """

    def __init__(self, watched: dict[int, tuple[str, str]]) -> None:
        super().__init__()
        self.watched = watched
        self.found: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watched:
            for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
                hit = self.watched.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                if hit is not None and not isinstance(leaf, torch.fx.Proxy):
                    owner, name = hit
                    name_of = getattr(func, "__name__", str(func))
                    self.found.append((owner, f"forward() computing {name_of} from {name}"))
        return func(*args, **kwargs)


def _note_state_dependent_calls(
    flow: Dataflow, changed: list[tuple[str, str, bool]], paths: set[str]
) -> None:
    """What forward changes on the model's own Python objects as it runs.

    A producer's or BatchNorm's attribute set in forward (``self.bn.eps = 0.1``) is what that
    layer computes with from then on, not what bnfold read before: the layer is not folded. A
    counter or flag anywhere (``self.step += 1``) means later calls may compute differently
    from the call bnfold traced (``self.bns[self.step % 2]``, ``if self.step > 1: ...``): no
    fold relies on that trace.
    """
    for path, key, _ in changed:
        if path in paths:
            flow.outside_uses.setdefault(path, []).append(f"forward() setting {path}.{key}")
    counters = [f"{p + '.' if p else ''}{k}" for p, k, scalar in changed if scalar]
    if counters:
        use = (
            f"forward() changing {', '.join(counters[:3])} on every call (later calls may "
            "compute differently from the one traced)"
        )
        for path in paths:
            flow.outside_uses.setdefault(path, []).append(use)


def _note_changed_in_place(flow: Dataflow, names: list[str], paths: set[str]) -> None:
    """Parameters and buffers that forward changes in place are used outside the graph: a
    fold that rewrote them would be rewritten again on every call."""
    for name in names:
        owner = _owner(name, paths)
        if owner is not None:
            flow.outside_uses.setdefault(owner, []).append(f"forward() changing {name} in place")


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 30 else text[:27] + "..."


def _rejected(model: nn.Module, error: Exception) -> InvalidArgumentError:
    """The error for example inputs the model fails on when bnfold runs it."""
    return InvalidArgumentError(
        f"running {type(model).__name__} on example_inputs failed ({type(error).__name__}: "
        f"{first_line(error)}): pass a tuple of the positional arguments forward() takes"
    )


def output_ranks(
    model: nn.Module, example_inputs: tuple, producers: dict[str, nn.Module]
) -> dict[str, set[int]]:
    """Run the model once and record the rank of every producer's output; change nothing."""
    ranks: dict[str, set[int]] = defaultdict(set)
    handles = []
    with TRACE_LOCK, preserved_state(model, values=True, run=True):
        for path, m in producers.items():

            def hook(_m, _args, out, path=path):
                if isinstance(out, torch.Tensor):
                    ranks[path].add(out.dim())

            handles.append(m.register_forward_hook(hook))
        try:
            with torch.no_grad():
                model(*fresh_copy(example_inputs))  # forward may write into its inputs
        except Exception as e:
            raise _rejected(model, e) from e
        finally:
            for h in handles:
                h.remove()
    return ranks


# What reads only a tensor's metadata, which a fold does not change.
_METADATA_READS = frozenset(
    f"torch.Tensor.{name}"
    for name in (
        "shape.__get__",
        "dtype.__get__",
        "device.__get__",
        "ndim.__get__",
        "layout.__get__",
        "is_cuda.__get__",
        "requires_grad.__get__",
        "dim",
        "size",
        "numel",
        "ndimension",
        "nelement",
        "is_contiguous",
        "__len__",
        "is_floating_point",
    )
)


@dataclass
class _Head:
    """What a producer's output has become on its way to its BatchNorm while the model runs."""

    tensor: int  # id of the value (the output, or what a layout op made of it)
    axis: int | None  # where the producer's channels are in it, when followed
    done: bool = False  # the BatchNorm has taken it: whatever comes after is a use


class _RunWatch(TorchFunctionMode):
    """While the model runs: which torch operations take a producer's output (or a value it
    became on its way to its BatchNorm), outside the BatchNorm and pass-through calls it is
    meant to go through.

    For the producers in ``follow``, an op that only reorders the axes of the value their
    output has become so far (their head) is a step on the way, not a use: its result becomes
    the head, and where the channels are is followed.
    """

    def __init__(self, follow: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.outputs: dict[int, tuple[str, torch.Tensor]] = {}  # held: ids stay unique
        self.inside = 0  # depth of watched BatchNorm and pass-through calls
        self.uses: dict[str, list[str]] = defaultdict(list)
        self.follow = follow
        self.heads: dict[str, _Head] = {}
        # The layers' own tensors: id -> (layer, name, any read counts). A BatchNorm's are
        # gone after the fold (even a dtype read fails); a producer's change in value.
        self.own: dict[int, tuple[str, str, bool]] = {}
        self.running: list[str] = []  # the watched layers whose call is under way
        self.outside: dict[str, list[str]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = ""
        if self.own:
            name = torch.overrides.resolve_name(func) or getattr(func, "__name__", str(func))
            for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
                hit = self.own.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                if hit is None or hit[0] in self.running:
                    continue
                if hit[2] or name not in _METADATA_READS:
                    self.outside[hit[0]].append(f"{hit[1]} ({name.removeprefix('torch.')})")
        if self.outputs and not self.inside:
            name = name or torch.overrides.resolve_name(func) or getattr(func, "__name__", "")
            if name not in _METADATA_READS:
                on_the_way = self._layout_step_of_a_head(name, args, kwargs)
                if on_the_way is not None:
                    path, source, step = on_the_way
                    out = func(*args, **kwargs)
                    if isinstance(out, torch.Tensor):
                        axis = self.heads[path].axis
                        moved = None if axis is None else moved_axis(step, axis, source.dim())
                        self.outputs[id(out)] = (path, out)
                        self.heads[path] = _Head(id(out), moved)
                    else:
                        self.uses[path].append(name.removeprefix("torch.Tensor."))
                    return out
                for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
                    hit = self.outputs.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                    if hit is not None:
                        self.uses[hit[0]].append(name.removeprefix("torch.Tensor."))
        return func(*args, **kwargs)

    def _layout_step_of_a_head(
        self, name: str, args: tuple, kwargs: dict
    ) -> tuple[str, torch.Tensor, Step] | None:
        """``(producer, source, step)`` when this call only reorders the axes of a followed
        producer's head (its other arguments are plain ints)."""
        found = _run_layout_step(name, args, kwargs)
        if found is None or not isinstance(found[0], torch.Tensor):
            return None
        hit = self.outputs.get(id(found[0]))
        if hit is None or hit[0] not in self.follow:
            return None
        head = self.heads.get(hit[0])
        if head is None or head.done or head.tensor != id(found[0]):
            return None
        return hit[0], found[0], found[1]


def run_differences(
    model: nn.Module,
    example_inputs: tuple,
    pairs: dict[str, str],
    through: dict[str, tuple[Step, ...]] | None = None,
    channels_from_end: dict[str, int] | None = None,
) -> dict[str, str]:
    """Run the model once on a copy of ``example_inputs`` and say, for each BatchNorm of
    ``pairs`` (BatchNorm path -> producer path), how the run differs from what the trace
    showed: each called once, the producer's output handed to the BatchNorm and used by
    nothing else, not returned, not kept after forward returns. Empty for the pairs that
    behave as traced.

    ``through`` gives, for a BatchNorm, the steps the trace found between its producer and it
    (see :func:`_walk_back`): each pass-through module must run once, in eval mode, on what the
    producer's output has become, and what they and the layout ops make of it is what the
    BatchNorm must be given; calls inside those modules are not uses. With layout ops, the
    producer's channels (at ``channels_from_end[bn]`` from the end of its output's axes) must
    arrive on the BatchNorm's axis 1.

    torch.fx traces with proxies, not tensors, so forward code that asks what its values are
    (``isinstance(y, torch.Tensor)``, ``torch.is_tensor``) or counts its calls can take
    another path when it really runs.
    """
    through = through or {}
    channels_from_end = channels_from_end or {}
    layout_of = {bn: layout_text(through.get(bn, ())) for bn in pairs}
    follow = frozenset(pairs[bn] for bn in pairs if layout_of[bn])
    from_end = {pairs[bn]: channels_from_end.get(bn) for bn in pairs}
    chain_of = {s[1]: pairs[bn] for bn in pairs for s in through.get(bn, ()) if s[0] == "module"}
    watch = _RunWatch(follow)
    calls: dict[str, int] = defaultdict(int)
    fed: dict[str, tuple[bool, int | None]] = {}
    took: dict[str, bool] = {}
    trained: set[str] = set()
    handles = []

    def on_start(path: str) -> Callable:
        def hook(_m: nn.Module, _args: Any) -> None:
            watch.running.append(path)

        return hook

    def on_end(path: str) -> Callable:
        def hook(_m: nn.Module, _args: Any, _out: Any) -> None:
            if path in watch.running:
                watch.running.remove(path)

        return hook

    def on_output(path: str) -> Callable:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            calls[path] += 1
            if isinstance(out, torch.Tensor):
                end = from_end.get(path)
                axis = out.dim() + end if end is not None and out.dim() + end >= 0 else None
                watch.outputs[id(out)] = (path, out)
                watch.heads[path] = _Head(id(out), axis)

        return hook

    def on_bn_input(path: str, prod: str) -> Callable:
        def hook(_m: nn.Module, args: Any) -> None:
            calls[path] += 1
            head = watch.heads.get(prod)
            given = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if head is not None:
                fed[path] = (given is not None and id(given) == head.tensor, head.axis)
                head.done = True
            watch.inside += 1

        return hook

    def on_pass_input(path: str) -> Callable:
        def hook(m: nn.Module, args: Any) -> None:
            calls[path] += 1
            head = watch.heads.get(chain_of[path])
            given = args[0] if args and isinstance(args[0], torch.Tensor) else None
            took[path] = head is not None and not head.done and id(given) == head.tensor
            if m.training:
                trained.add(path)
            watch.inside += 1

        return hook

    def on_pass_output(path: str) -> Callable:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            watch.inside -= 1
            prod = chain_of[path]
            if took.get(path) and isinstance(out, torch.Tensor):
                watch.outputs[id(out)] = (prod, out)
                watch.heads[prod] = _Head(id(out), watch.heads[prod].axis)

        return hook

    def on_bn_output(_m: nn.Module, _args: Any, _out: Any) -> None:
        watch.inside -= 1

    kept: dict[str, list[weakref.ref]] = defaultdict(list)
    with TRACE_LOCK, preserved_state(model, values=True, run=True):
        try:
            for bn, prod in pairs.items():
                for path, is_bn in ((prod, False), (bn, True)):
                    layer = model.get_submodule(path)
                    for key, t in [*layer._parameters.items(), *layer._buffers.items()]:
                        if t is not None:
                            watch.own[id(t)] = (path, f"{path}.{key}", is_bn)
                    handles.append(layer.register_forward_pre_hook(on_start(path)))
                    handles.append(layer.register_forward_hook(on_end(path)))
                handles.append(model.get_submodule(prod).register_forward_hook(on_output(prod)))
                b = model.get_submodule(bn)
                handles.append(b.register_forward_pre_hook(on_bn_input(bn, prod)))
                handles.append(b.register_forward_hook(on_bn_output))
            for path in chain_of:
                m = model.get_submodule(path)
                handles.append(m.register_forward_pre_hook(on_pass_input(path)))
                handles.append(m.register_forward_hook(on_pass_output(path)))
            with torch.no_grad(), watch:
                out = model(*fresh_copy(example_inputs))
            returned = {id(t) for _, t in output_tensors(out)}
            for path, t in watch.outputs.values():
                if id(t) in returned:
                    watch.uses[path].append("the model's output")
                kept[path].append(weakref.ref(t))
            t = None  # noqa: F841 - the loop variable would keep the last output alive
        except Exception as e:
            raise _rejected(model, e) from e
        finally:
            for h in handles:
                h.remove()
    watch.outputs.clear()
    out = returned = None

    def alive(path: str) -> bool:
        return any(r() is not None for r in kept.get(path, ()))

    if any(alive(path) for path in kept):
        gc.collect()  # a reference cycle of forward's may hold one a little longer
    problems = {}
    for bn, prod in pairs.items():
        modules = [s[1] for s in through.get(bn, ()) if s[0] == "module"]
        way = f" through {layout_of[bn]}" if layout_of[bn] else ""
        given, axis = fed.get(bn, (False, None))
        if calls[prod] != 1 or calls[bn] != 1:
            what = f"{prod} ran {calls[prod]} times and {bn} {calls[bn]} times"
        elif reads := watch.outside.get(prod, []) + watch.outside.get(bn, []):
            what = f"forward() used {', '.join(sorted(set(reads))[:3])} outside their layer's call"
        elif bad := next((p for p in modules if calls[p] != 1), None):
            what = f"{bad}, between {prod} and {bn}, ran {calls[bad]} times"
        elif bad := next((p for p in modules if p in trained or not took.get(p)), None):
            state = (
                "in training mode" if bad in trained else f"on another value than {prod}'s output"
            )
            what = f"{bad}, between {prod} and {bn}, ran {state}"
        elif not given:
            what = f"{bn} was not given {prod}'s output{way}"
        elif layout_of[bn] and axis != 1:
            where = "an axis bnfold could not follow" if axis is None else f"axis {axis}"
            what = (
                f"{prod}'s channels reached {bn} on {where}, not on axis 1 (the trace has "
                f"{layout_of[bn]} between them)"
            )
        elif watch.uses.get(prod):
            what = f"{prod}'s output also went to {', '.join(sorted(set(watch.uses[prod])))}"
        elif alive(prod):
            what = f"forward() kept {prod}'s output somewhere after returning"
        else:
            continue
        problems[bn] = f"run on the example inputs, the model differs from its trace: {what}"
    return problems
