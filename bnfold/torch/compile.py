"""torch.compile: the ``bnfold`` backend, which folds BatchNorm in every graph dynamo captures.

``torch.compile(model, backend="bnfold")`` (or ``backend=bnfold.torch.compile_backend``) gives
each captured graph to :class:`Backend`. For inference (grad mode off, nothing in the graph
writing module state) it

1. *bakes* the graph's module state: every tensor the graph reads from an ``nn.Module``
   (parameters, buffers, tensor attributes — with ``inline_inbuilt_nn_modules`` dynamo passes
   them as graph inputs) becomes a constant of the graph, and numbers dynamo wraps as tensors
   (a BatchNorm's ``eps``) become literals;
2. traces the graph to ATen (``aot_export_module``, functional, dynamo's fake mode so that
   ``dynamic=True`` shapes stay symbolic) and folds it with the ATen adapter, the same rules and
   report as :func:`bnfold.fold` on a torch.export program;
3. hands the folded graph — its folded weights as attributes, which Inductor lifts as
   parameters — to the inner backend (Inductor by default), and returns a guarded callable.

Folding bakes the weights as they are at compile time, the contract Inductor's freezing has. The
returned callable keeps it safe: dynamo guards the identity of every baked tensor (a replaced
parameter recompiles); on every call the baked tensors' version counters and memory addresses
are compared, and the BatchNorms' own tensors by value (a training-mode BatchNorm updates its
running statistics without bumping their counters). When one changed, the graph is folded again
from the current values and the new weights are written into the compiled graph's tensors
(nothing recompiles); when they no longer fold the same way, or the inner backend may have
copied its weights (Inductor's freezing), that graph runs unfolded, with a warning. Writes
through ``.data`` to a conv or linear weight escape the counters: ``watch="values"`` compares
every baked tensor. Grad mode and ``model.training`` are guarded by dynamo itself: a call in
another mode compiles another graph.
"""

from __future__ import annotations

import collections
import logging
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from ..core import pipeline, rules
from ..core.logs import quiet_warnings
from ..core.report import FoldReport
from ..errors import BnfoldError
from .aten.adapter import AtenAdapter
from .aten.store import ModuleStore, copy_graph_module, copy_quietly, module_tensors

log = logging.getLogger("bnfold")

_REPORTS: collections.deque[CompiledReport] = collections.deque(maxlen=64)


@dataclass(frozen=True)
class CompiledReport:
    """What the backend did to one captured graph: its dynamo compile id, the fold report
    (empty when it did not fold), and why it did not fold when it did not try."""

    graph: str
    report: FoldReport
    skipped: str = ""

    def __str__(self) -> str:
        if self.skipped:
            return f"graph {self.graph}: not folded: {self.skipped}"
        return f"graph {self.graph}: {self.report.summary()}"


def last_reports() -> list[CompiledReport]:
    """Reports of the graphs compiled most recently by any bnfold backend (oldest first; the
    last 64 are kept)."""
    return list(_REPORTS)


class Backend:
    """A torch.compile backend that folds BatchNorm, then compiles with ``inner``.

    ``inner`` is a backend name (``"inductor"``, ``"eager"``, ``"aot_eager"``...) or a backend
    callable. ``producers`` and ``affine`` are as in :func:`bnfold.fold`. ``watch`` says how
    each call checks that the baked tensors did not change: ``"versions"`` (version counters
    and memory addresses, plus the BatchNorms' own tensors by value) or ``"values"`` (every
    baked tensor by value, against a copy: also sees writes through ``.data``, at the cost of
    that copy and a pass over the weights per call). ``reports`` collects a
    :class:`CompiledReport` for every graph this backend compiled.

    Through ``torch.compile(model, backend="bnfold", options={...})`` the same settings are the
    options ``"inner"``, ``"producers"``, ``"affine"`` and ``"watch"``; the other options, and
    ``mode`` (given
    to torch.compile, or as the option ``"mode"``, since torch.compile refuses both at once), go
    to Inductor as they would with ``backend="inductor"``.
    """

    def __init__(
        self,
        inner: str | Callable[..., Any] = "inductor",
        *,
        producers: Iterable[str] | str | None = None,
        watch: str = "versions",
        affine: bool = True,
    ) -> None:
        if watch not in ("versions", "values"):
            raise BnfoldError(f"watch must be 'versions' or 'values', not {watch!r}")
        if not isinstance(affine, bool):
            raise BnfoldError(f"affine must be True or False, not {affine!r}")
        self.inner = inner
        self.affine = affine
        self.producers = producers
        self.watch = watch
        self.selected = rules.selected_kinds(producers)
        self.reports: list[CompiledReport] = []

    def __repr__(self) -> str:
        return f"bnfold.torch.compile.Backend(inner={self.inner!r})"

    def __call__(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Any],
        *,
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Callable[..., Any]:
        if mode is not None or options:
            return self._with(mode, options)(gm, example_inputs)
        inner = _inner_backend(self.inner)
        graph_id = _compile_id(gm)
        if not _may_fold(gm, self.affine):  # nothing to fold: no tracing, no guards, no wrapper
            return self._unfolded(
                graph_id, FoldReport([], "GraphModule"), "", inner, gm, example_inputs
            )
        if torch.is_grad_enabled():
            reason = (
                "grad mode is on (the graph may be trained); run the model under "
                "torch.no_grad() or torch.inference_mode() to fold"
            )
            return self._unfolded(
                graph_id, FoldReport([], "GraphModule"), reason, inner, gm, example_inputs
            )
        try:
            capture = _Capture.of(gm, example_inputs)
            folded = capture.fold(self.selected, self.affine)
        except BnfoldError as e:  # what bnfold refuses (not its bugs) compiles unfolded
            return self._unfolded(
                graph_id, FoldReport([], "GraphModule"), str(e), inner, gm, example_inputs
            )
        if not folded.report.folded:
            return self._unfolded(graph_id, folded.report, "", inner, gm, example_inputs)
        self._remember(CompiledReport(graph_id, folded.report))
        capture.guard_identity()
        handed = folded.handed(dict(gm.meta))
        compiled = inner(handed, capture.runtime_examples(example_inputs))
        not_live = _reads_live_weights(inner)
        watch_values = self.watch == "values"
        return _Guarded(
            capture,
            folded,
            handed,
            compiled,
            gm,
            self.selected,
            not_live,
            watch_values,
            self.affine,
        )

    def _with(self, mode: str | None, options: dict[str, Any] | None) -> Backend:
        """This backend with ``torch.compile``'s ``mode`` and ``options`` applied."""
        options = dict(options or {})
        inner = options.pop("inner", self.inner)
        producers = options.pop("producers", self.producers)
        watch = options.pop("watch", self.watch)
        affine = options.pop("affine", self.affine)
        # torch.compile takes mode or options, not both: a mode can come as an option too
        mode = options.pop("mode", mode)
        if mode is not None or options:
            if inner != "inductor":
                raise BnfoldError(
                    f"torch.compile mode and Inductor options apply to inner='inductor', not "
                    f"{inner!r}: {sorted(options)}"
                )
            inner = torch._TorchCompileInductorWrapper(mode, options or None, None)
        backend = Backend(inner, producers=producers, watch=watch, affine=affine)
        backend.reports = self.reports
        return backend

    def _unfolded(
        self,
        graph_id: str,
        report: FoldReport,
        reason: str,
        inner: Callable[..., Any],
        gm: GraphModule,
        example_inputs: Sequence[Any],
    ) -> Callable[..., Any]:
        self._remember(CompiledReport(graph_id, report, reason))
        return inner(gm, example_inputs)

    def _remember(self, r: CompiledReport) -> None:
        # Dynamo may compile a graph again when it restarts its analysis (a later attempt of
        # the same compile id): that report replaces the aborted attempt's.
        from torch._guards import CompileContext

        trace = CompileContext.current_trace_id()
        restarted = trace is not None and trace.attempt > 0
        for reports in (self.reports, _REPORTS):
            if restarted and reports and reports[-1].graph == r.graph:
                reports.pop()
            reports.append(r)
        if r.skipped:
            # Once at warning level: compiling a model that trains is legitimate, and a
            # warning on every graph would drown the user's own output.
            level = logging.INFO if r.skipped in _WARNED else logging.WARNING
            _WARNED.add(r.skipped)
            log.log(level, "torch.compile graph %s: BatchNorm not folded: %s", r.graph, r.skipped)
        else:
            log.info("torch.compile graph %s: %s", r.graph, r.report.summary())
            log.debug("%s", r.report)


_WARNED: set[str] = set()


# What dynamo's graphs call for arithmetic that may start an affine chain after a layer
# (operator.mul for ``y * s``, torch.mul, Tensor.mul as a method, their in-place forms).
_ARITHMETIC = ("mul", "truediv", "div", "add", "sub", "rsub", "neg")
_PRODUCER_MODULES = (nn.modules.conv._ConvNd, nn.Linear)


def _may_fold(gm: GraphModule, affine: bool) -> bool:
    """Whether the graph calls a BatchNorm (a functional or ATen call, or a module) at all, or,
    with ``affine``, does arithmetic on what a conv or linear call returns."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", None) or str(node.target)
            if "batch_norm" in name:
                return True
            if affine and _is_producer_call(gm, node) and any(map(_is_arithmetic, node.users)):
                return True
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return True
            if affine and _is_producer_call(gm, node) and any(map(_is_arithmetic, node.users)):
                return True
        elif node.op == "get_attr" and isinstance(_fetch(gm, node.target), GraphModule):
            if _may_fold(_fetch(gm, node.target), affine):  # a control-flow body
                return True
    return False


def _is_producer_call(gm: GraphModule, node: Any) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PRODUCER_MODULES)
    name = getattr(node.target, "__name__", None) or str(node.target)
    return any(word in name for word in ("conv", "linear", "matmul", "addmm", "mm"))


def _is_arithmetic(node: Any) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return str(name).strip("_").removeprefix("i") in _ARITHMETIC or str(name) in _ARITHMETIC


def _inner_backend(inner: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(inner):
        return inner
    from torch._dynamo.backends.registry import lookup_backend

    if inner == "bnfold":
        raise BnfoldError("inner='bnfold' would fold forever; choose the backend after the fold")
    return lookup_backend(inner)


compile_backend = Backend()
"""The default backend (Inductor after the fold), registered with dynamo as ``"bnfold"``."""


class _NotFoldable(BnfoldError):
    """This graph is compiled as dynamo gave it; the message says why."""


def _compile_id(gm: GraphModule) -> str:
    found = gm.meta.get("dynamo_compile_id") if isinstance(gm.meta, dict) else None
    return str(found) if found is not None else "?"


# --------------------------------------------------------------------------------------------
# Capture: the dynamo graph with its module state baked, traced to ATen


def _module_owned(node: Node) -> bool:
    """Whether dynamo took the input ``node`` from an ``nn.Module`` (a parameter, a buffer or a
    tensor attribute), as opposed to an argument of the call or a global."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return False
    guard = source.guard_source
    guard = guard() if callable(guard) else guard
    if guard.is_fsdp_module():
        return False
    return bool(guard.is_specialized_nn_module() or guard.is_unspecialized_nn_module())


def _is_item(node: Node) -> bool:
    return (node.op == "call_method" and node.target == "item") or (
        node.op == "call_function" and node.target is torch.ops.aten._local_scalar_dense.default
    )


def _substitute(node: Node, old: Node, value: Any) -> None:
    node.args = torch.fx.node.map_arg(node.args, lambda n: value if n is old else n)
    node.kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: value if n is old else n)


@dataclass
class _Capture:
    """The dynamo graph traced to ATen with its module state as constants (``get_attr``)."""

    traced: GraphModule
    baked: list[tuple[int, torch.Tensor]]  # (input index, tensor) the graph treats as constant
    attributes: list[torch.Tensor]  # tensors the dynamo graph held as attributes
    scalars: list[tuple[int, float | int | bool]]  # inputs specialised to numbers
    runtime: list[int]  # inputs the compiled graph still takes
    sources: list[Any] = field(default_factory=list)  # dynamo sources of the baked inputs
    statistics: list[torch.Tensor] = field(default_factory=list)  # watched by value
    scalar_names: list[str] = field(default_factory=list)  # where each specialised number lives

    @classmethod
    def of(cls, gm: GraphModule, example_inputs: Sequence[Any]) -> _Capture:
        graph = copy_quietly(gm.graph)
        placeholders = graph.find_nodes(op="placeholder")
        if len(placeholders) != len(example_inputs):
            raise _NotFoldable("the graph's inputs do not match the example inputs")
        lifted = GraphModule(gm, graph)
        baked: list[tuple[int, torch.Tensor]] = []
        scalars: list[tuple[int, Any]] = []
        runtime: list[int] = []
        sources: list[Any] = []
        scalar_names: list[str] = []
        fakes: list[Any] = []
        for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
            if not (isinstance(value, torch.Tensor) and _module_owned(node)):
                runtime.append(i)
                fakes.append(node.meta.get("example_value", value))
                continue
            users = list(node.users)
            _has_values(value)
            if value.dim() == 0 and users and all(_is_item(u) for u in users):
                # A number dynamo wraps in a tensor (a BatchNorm's eps, momentum): a literal.
                number = value.item()
                for item in users:
                    for user in list(item.users):
                        _substitute(user, item, number)
                    graph.erase_node(item)
                graph.erase_node(node)
                scalars.append((i, number))
                scalar_names.append(_clean_path(node.meta["grapharg"].source.name) or "a number")
                continue
            _watchable(value)
            name = f"_bnfold_state_{len(baked)}"
            _attach(lifted, name, value)
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            graph.erase_node(node)
            baked.append((i, value))
            sources.append(node.meta["grapharg"].source)
        # Tensors the dynamo graph holds itself (get_attr, or inside modules it calls): dynamo
        # guards their identity, bnfold watches their versions.
        baked_ids = {id(t) for _, t in baked}
        attributes = [t for i, t in module_tensors(lifted).items() if i not in baked_ids]
        for value in attributes:
            _watchable(value)
        lifted.recompile()
        paths = {f"_bnfold_state_{k}": src.name for k, src in enumerate(sources)}
        traced = _trace(lifted, fakes, paths)
        return cls(
            traced, baked, attributes, scalars, runtime, sources, _statistics(traced), scalar_names
        )

    def runtime_examples(self, example_inputs: Sequence[Any]) -> list[Any]:
        return [example_inputs[i] for i in self.runtime]

    def fold(self, selected: set[str], affine: bool = True) -> _Folded:
        return _Folded.of(self.traced, selected, affine)

    def guard_identity(self) -> None:
        """Ask dynamo to recompile when a baked input is another tensor object next time (a
        parameter replaced, not written): the compiled code holds the objects it baked."""
        from torch._dynamo.guards import GuardBuilder, install_guard
        from torch._guards import TracingContext

        if TracingContext.try_get() is None:  # called outside dynamo: the call-time check stays
            return
        for source in self.sources:
            install_guard(source.make_guard(GuardBuilder.ID_MATCH))


def _statistics(traced: GraphModule) -> list[torch.Tensor]:
    """The tensors the graph's BatchNorms read. A training-mode BatchNorm call updates its
    running statistics inside its kernel without bumping their version counters (the op does
    not declare that it writes them), so they are compared by value instead; so are gamma and
    beta, which costs little and catches the usual writes through ``.data`` (a moving average
    of the weights updates every parameter, these included)."""
    found: dict[int, torch.Tensor] = {}
    for node in traced.graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target):
            continue
        # Every constant behind the BatchNorm's operands, through views, casts and detaches
        # (not its input, the activation: args[0]).
        work = [a for a in node.args[1:] if isinstance(a, Node)]
        seen: set[Node] = set()
        while work:
            arg = work.pop()
            if arg in seen:
                continue
            seen.add(arg)
            if arg.op == "get_attr":
                value = _fetch(traced, arg.target)
                if isinstance(value, torch.Tensor):
                    found[id(value)] = value
            elif arg.op == "call_function":
                work.extend(arg.all_input_nodes)
    return list(found.values())


class _Snapshot:
    """The values of some tensors, to tell whether any of them changed: a few small ones
    concatenated (one comparison per call), or large ones copied and compared one by one."""

    def __init__(self, tensors: list[torch.Tensor], separate: bool = False) -> None:
        self.tensors = tensors
        self.separate = separate
        self.values = self._read()

    def _read(self) -> Any:
        if not self.tensors:
            return None
        if self.separate:  # large tensors: compare each in place, without a concatenated copy
            return [t.detach().clone() for t in self.tensors]
        try:  # one tensor: a single comparison per call
            return torch.cat([t.detach().reshape(-1) for t in self.tensors])
        except RuntimeError:  # several devices
            return [t.detach().clone() for t in self.tensors]

    def same(self) -> bool:
        if self.values is None:
            return True
        if self.separate:
            return all(map(_equal, (t.detach() for t in self.tensors), self.values))
        now = self._read()
        if isinstance(now, list):
            return all(map(_equal, now, self.values))
        return _equal(now, self.values)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (a BatchNorm kept for its NaN statistics must not make
    every call look like a change)."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or a.dtype != b.dtype or not a.is_floating_point():
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _has_values(value: torch.Tensor) -> None:
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, FakeTensor) or value.is_meta:
        raise _NotFoldable(
            "dynamo passed the module's tensors without values (fake or meta tensors), so "
            "there is nothing to fold at compile time"
        )


def _watchable(value: torch.Tensor) -> None:
    _has_values(value)
    try:
        value.data_ptr()
    except RuntimeError as e:  # no storage (sparse, some subclasses): nothing to watch
        raise _NotFoldable(f"a module tensor has no memory bnfold can watch ({e})") from e
    if value.is_inference():
        raise _NotFoldable(
            "the module's tensors are inference tensors (made under torch.inference_mode), "
            "whose in-place changes bnfold cannot see; load the model outside inference_mode"
        )


def _fetch(module: nn.Module, target: str) -> Any:
    owner = module
    *path, attr = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    return getattr(owner, attr)


def _attach(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters or name in module._buffers:
        module._parameters.pop(name, None)
        module._buffers.pop(name, None)
    if isinstance(value, nn.Parameter):
        module.register_parameter(name, value)
    else:
        module.register_buffer(name, value)


_STATISTICS = {"running_mean", "running_var", "num_batches_tracked"}


def _trace(lifted: GraphModule, fakes: list[Any], names: dict[str, str]) -> GraphModule:
    """``lifted`` as a functional ATen graph whose module state is ``get_attr`` constants.
    ``names`` gives the module path of each baked tensor, for messages."""
    from torch._functorch.aot_autograd import aot_export_module

    try:
        with quiet_warnings():
            aten, signature = aot_export_module(lifted, fakes, trace_joint=False)
    except Exception as e:  # noqa: BLE001 - anything aot cannot trace is compiled unfolded
        raise _NotFoldable(
            f"the graph could not be traced to ATen ({type(e).__name__}: {e})"
        ) from e
    if signature.buffers_to_mutate:
        paths = sorted(_clean_path(names.get(b, b)) for b in signature.buffers_to_mutate.values())
        written = ", ".join(paths)
        if any(p.rsplit(".", 1)[-1] in _STATISTICS for p in paths):
            raise _NotFoldable(
                f"the graph writes module state ({written}): a BatchNorm in training mode "
                "updates its running statistics; call model.eval() to fold"
            )
        raise _NotFoldable(
            f"the graph writes module state ({written}); bnfold folds graphs that only read "
            "their modules' tensors"
        )
    graph = aten.graph
    _write_back(graph, signature.user_inputs_to_mutate)
    state = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    holder: dict[str, Any] = {}
    for node in list(graph.find_nodes(op="placeholder")):
        fqn = state.get(node.name)
        if fqn is None:
            continue
        with graph.inserting_before(node):
            attr = graph.create_node("get_attr", fqn)  # the holder module is built below
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
        holder[fqn] = _fetch(lifted, fqn)
    for node in graph.nodes:
        _clean_module_stack(node)
        if node.op in ("get_attr", "call_module") and node.target not in holder:
            holder[node.target] = _fetch(aten, node.target)
    traced = GraphModule(holder, graph)
    traced.meta.update(aten.meta)
    return traced


def _write_back(graph: Graph, mutations: dict[str, str]) -> None:
    """Turn the functional graph's extra outputs for inputs it writes (an in-place ReLU on an
    activation another graph passed in) back into in-place copies, as the caller expects."""
    if not mutations:
        return
    output = graph.output_node()
    results = list(output.args[0])
    placeholders = {n.name: n for n in graph.find_nodes(op="placeholder")}
    with graph.inserting_before(output):
        for value in results[: len(mutations)]:  # mutated values come first, in input order
            target = placeholders[mutations[value.name]]
            graph.call_function(torch.ops.aten.copy_.default, (target, value))
    output.args = (tuple(results[len(mutations) :]),)


def _clean_path(path: str) -> str:
    """A dynamo source path (``L['self'].layer1[0]._modules['bn']``) as a module path
    (``layer1.0.bn``), the way the other frontends name modules."""
    path = re.sub(r"^L\['[^']*'\]", "", path)  # the compiled function's own arguments (self)
    path = re.sub(r"^G\['([^']*)'\]", r"\1", path)  # a global module keeps its name
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".")


def _clean_module_stack(node: Node) -> None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        node.meta["nn_module_stack"] = {
            key: (_clean_path(path) if isinstance(path, str) else path, klass)
            for key, (path, klass) in stack.items()
        }


@dataclass
class _Folded:
    module: GraphModule
    report: FoldReport
    code: str

    @classmethod
    def of(cls, traced: GraphModule, selected: set[str], affine: bool = True) -> _Folded:
        shared = {id(t): t for t in [*traced.parameters(), *traced.buffers()]}
        gm = copy_graph_module(traced, dict(shared))
        adapter = AtenAdapter(gm, ModuleStore(gm), [], affine=affine)
        entries = pipeline.run(adapter, selected).entries
        gm.graph.lint()
        gm.recompile()
        return cls(gm, FoldReport(entries, "GraphModule"), gm.code)

    def handed(self, meta: dict[str, Any]) -> GraphModule:
        """The folded graph for the inner backend: constants stay attributes, which Inductor lifts
        as parameters (static shapes; constant under freezing)."""
        graph = copy_quietly(self.module.graph)
        # A traced `view` trusts the strides the fake kernels gave, and some differ from the
        # real ones (batch_norm on a non-contiguous input: fake keeps the input's strides, the
        # CPU kernel returns a contiguous tensor), so a `view` that held while tracing can fail
        # when run. The graph is functional: `reshape` computes the same values and never fails
        # on strides (Inductor's freezing makes the same change for the same reason).
        for node in graph.find_nodes(op="call_function", target=torch.ops.aten.view.default):
            node.target = torch.ops.aten.reshape.default
        handed = GraphModule(self.module, graph)
        handed.meta.update(meta)
        return handed

    def tensors(self, module: GraphModule) -> dict[str, torch.Tensor]:
        return {
            n.target: v
            for n in module.graph.find_nodes(op="get_attr")
            if isinstance(v := _fetch(module, n.target), torch.Tensor)
        }


def _reads_live_weights(inner: Callable[..., Any]) -> str:
    """Why new folded values written into the graph's tensors would not reach what ``inner``
    compiled ("" when they would): eager backends read the graph's attributes on every call,
    and so does Inductor without freezing (it passes them as parameters); Inductor with
    freezing copies them into its code, and other backends may copy them too."""
    import torch._inductor.config
    from torch._dynamo.backends.registry import lookup_backend

    freezing = bool(torch._inductor.config.freezing)
    config = getattr(inner, "config", None)  # torch.compile's Inductor wrapper: its options
    if getattr(inner, "compiler_name", None) == "inductor" and isinstance(config, dict):
        freezing = bool(config.get("freezing", freezing))
        return "Inductor's freezing copied them into its code" if freezing else ""
    if any(inner is lookup_backend(name) for name in ("eager", "aot_eager")):
        return ""
    if inner is lookup_backend("inductor"):
        return "Inductor's freezing copied them into its code" if freezing else ""
    name = getattr(inner, "__name__", type(inner).__name__)
    return f"the inner backend {name} may have copied them when it compiled"


class _Guarded:
    """The compiled graph, checked on every call against changes to the weights it baked."""

    def __init__(
        self,
        capture: _Capture,
        folded: _Folded,
        handed: GraphModule,
        compiled: Callable[..., Any],
        original: GraphModule,
        selected: set[str],
        not_refreshable: str,
        watch_values: bool = False,
        affine: bool = True,
    ) -> None:
        self.capture = capture
        self.folded = folded
        self.handed = handed
        self.compiled = compiled
        self.original = original
        self.selected = selected
        self.not_refreshable = not_refreshable
        self.watch_values = watch_values
        self.affine = affine
        self.fallback = False
        self.refolds = 0
        self._index = [i for i, _ in capture.baked]
        self._watch([t for _, t in capture.baked], list(capture.scalars))

    def _watch(self, inputs: list[torch.Tensor], scalars: list[tuple[int, Any]]) -> None:
        """Remember the baked tensors as they are now: objects, version counters, numbers."""
        self._inputs = inputs
        self._tensors = [*inputs, *self.capture.attributes]
        self._versions = [t._version for t in self._tensors]
        self._pointers = [t.data_ptr() for t in self._tensors]
        self._statistics = _Snapshot(self.capture.statistics)
        # watch="values": a copy of every baked tensor, compared on each call (sees writes
        # through .data too, at the cost of memory and a pass over the weights per call)
        self._values = _Snapshot(self._tensors, separate=True) if self.watch_values else None
        self.scalars = scalars

    def _current(self, args: Sequence[Any]) -> bool:
        # Runs before every call: kept to C-level loops (about 0.3 us per tensor).
        if not all(map(operator.is_, map(args.__getitem__, self._index), self._inputs)):
            return False
        if [t._version for t in self._tensors] != self._versions:
            return False
        if [t.data_ptr() for t in self._tensors] != self._pointers:
            return False  # memory swapped under the same object (param.data = other)
        if not all(_number(args[i]) == number for i, number in self.scalars):
            return False
        if self._values is not None and not self._values.same():
            return False
        return self._statistics.same()

    def __call__(self, *args: Any) -> Any:
        if not self._current(args):
            self._refold(args)
        if self.fallback:
            return self.original(*args)
        # Dynamo calls what a backend returns with the arguments spread out, whatever
        # attributes it carries (Inductor's result has a copied `_boxed_call` flag).
        return self.compiled(*[args[i] for i in self.capture.runtime])

    def _refold(self, args: Sequence[Any]) -> None:
        """The baked tensors changed: fold again from their values, or run unfolded. What was
        seen is recorded only at the end, so that an interrupted refold is tried again."""
        self.refolds += 1
        inputs = [args[i] for i in self._index]
        scalars = [(i, _number(args[i])) for i, _ in self.scalars]
        replaced = not all(map(operator.is_, inputs, self._inputs)) or any(
            t.data_ptr() != ptr for t, ptr in zip(self._tensors, self._pointers, strict=True)
        )
        changed = [
            name
            for (i, n), name in zip(self.capture.scalars, self.capture.scalar_names, strict=True)
            if _number(args[i]) != n
        ]
        why = ""
        if replaced:
            why = "a weight was replaced by another tensor (or given new memory)"
        elif changed:
            why = f"{', '.join(changed)} changed (the graph was specialised on its value)"
        elif self.not_refreshable:
            why = f"weights changed in place, and {self.not_refreshable}"
        else:
            folded = self.capture.fold(self.selected, self.affine)
            if folded.code != self.folded.code:
                why = "weights changed in place so that the graph no longer folds the same way"
            else:
                with torch.no_grad():
                    new = folded.tensors(folded.module)
                    for name, tensor in self.folded.tensors(self.handed).items():
                        if new[name] is not tensor:
                            tensor.copy_(new[name])
                self.fallback = False
                self._watch(inputs, scalars)
                log.info("torch.compile: weights changed in place; folded again from new values")
                return
        if not self.fallback:
            log.warning(
                "torch.compile: %s after bnfold folded this graph; it now runs unfolded (eager). "
                "Call torch._dynamo.reset() and run the model again to compile it folded.",
                why,
            )
        self.fallback = True
        self._watch(inputs, scalars)


def _number(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


__all__ = ["Backend", "CompiledReport", "compile_backend", "last_reports"]
