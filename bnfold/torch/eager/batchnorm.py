"""What a PyTorch BatchNorm module computes, as far as folding is concerned.

:func:`batchnorm_spec` reads a BatchNorm module (``nn.BatchNorm*d``, ``SyncBatchNorm``, their
subclasses, torchvision/detectron2-style ``FrozenBatchNorm2d``) and returns its statistics,
whether it normalises with them, and, for a subclass that overrides ``forward`` (a BatchNorm
followed by an activation, say), the part of ``forward`` that comes after the BatchNorm, so that
the BatchNorm can be folded while the rest is kept exactly.
"""

from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.algebra import affine_factors
from ...torch.eager.state import identity

_BN_RANKS = (
    (nn.BatchNorm1d, frozenset({2, 3})),
    (nn.BatchNorm2d, frozenset({4})),
    (nn.BatchNorm3d, frozenset({5})),
)
_BATCH_NORM_FNS = (F.batch_norm, torch.batch_norm)
_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)
# torch.batch_norm takes the same values in another order, and all of them.
_TORCH_BATCH_NORM_ORDER = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
    "cudnn_enabled",
)
_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement", "is_contiguous"})


def _class_ranks(m: nn.Module) -> frozenset[int] | None:
    """The input ranks nn's BatchNorm1d/2d/3d check for; None for other classes."""
    return next((r for cls, r in _BN_RANKS if isinstance(m, cls)), None)


def defining_class(cls: type, attr: str) -> type | None:
    """The class in ``cls``'s MRO that defines ``attr``."""
    for klass in cls.__mro__:
        if attr in klass.__dict__:
            return klass
    return None


def is_torch_class(klass: type | None) -> bool:
    return klass is not None and klass.__module__.startswith("torch.nn.")


def is_frozen_batchnorm(m: nn.Module) -> bool:
    """torchvision/detectron2-style FrozenBatchNorm2d: fixed statistics held as buffers."""
    return type(m).__name__ == "FrozenBatchNorm2d" and all(
        isinstance(m._buffers.get(b), torch.Tensor)
        for b in ("weight", "bias", "running_mean", "running_var")
    )


def is_batchnorm(m: nn.Module) -> bool:
    """Whether bnfold treats ``m`` as a BatchNorm."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or is_frozen_batchnorm(m)


def reads_metadata_only(user: torch.fx.Node) -> bool:
    """A graph user that reads only shape/dtype/device, which folding does not change."""
    if user.op == "call_function":
        if user.target is getattr and len(user.args) > 1 and user.args[1] in _METADATA_ATTRS:
            return True
        return user.target in _SYM_SIZE_OPS
    return user.op == "call_method" and user.target in _METADATA_METHODS


_SYM_SIZE_OPS = (
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_stride.int,
)


def measure_affine(m: nn.Module, channels: int, rank: int = 4) -> tuple[Any, Any] | str:
    """Measure ``m`` as a per-channel affine map over axis 1, in float64, or say why it is not.

    A float64 copy of ``m`` is run on probes: ``t = m(0)``, ``s = m(1) - m(0)``, then an input
    of random values and of values at extreme magnitudes (tiny, the float16 and float32 limits,
    far beyond them), with mixed signs in every channel, checks that ``m(x) == s*x + t``
    element by element. The factors are exactly what ``m``'s own formula computes, eps and all,
    without trusting its attribute names.

    No finite set of probes proves an arbitrary forward affine (``clamp(-1e3, 1e3)`` looks
    affine on small inputs), so the operations forward runs are checked too: recorded by
    ``make_fx`` on the probe input, in float64 and in the module's own dtype, every operation
    that the input's values flow through must be one that keeps a per-channel affine map affine
    (add, sub, mul or div by values not computed from the input, views, casts, an inference
    batch_norm). A clamp, ``where``, ``max``, ``abs``, an activation: the module is not folded.
    """
    try:
        probe = copy.deepcopy(m).double()
        shape = (1, channels) + (1,) * (rank - 2)
        x = _affinity_probe(channels, rank)
        with torch.no_grad():
            t = probe(torch.zeros(shape, dtype=torch.float64))
            s = probe(torch.ones(shape, dtype=torch.float64)) - t
            y = probe(x)
    except Exception as e:  # noqa: BLE001 - a module we cannot run is a module we cannot fold
        return f"running it on a probe input failed ({type(e).__name__})"
    if not (isinstance(y, torch.Tensor) and y.shape == x.shape and t.numel() == channels):
        return "its output does not have its input's shape"
    s, t = s.reshape(-1), t.reshape(-1)
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(t).all())):
        return s.numpy(), t.numpy()  # invalid numbers: the algebra refuses them with a reason
    scaled = s.reshape(shape) * x
    expected = scaled + t.reshape(shape)
    checked = torch.isfinite(expected)  # s times the largest probes may overflow even float64
    tolerance = 1e-9 * (scaled.abs() + t.abs().reshape(shape)) + 1e-300
    error = (y - expected).abs()
    if not bool((checked <= (error <= tolerance)).all()):
        return "it does not compute a per-channel affine map of its input"
    why = _non_affine_operations(probe, x)
    dtype = next((b.dtype for b in m.buffers() if b.is_floating_point()), torch.float64)
    if not why and dtype != torch.float64:
        why = _non_affine_operations(copy.deepcopy(m), x.to(dtype).nan_to_num())
    if why:
        return why
    return s.numpy(), t.numpy()


# Magnitudes an activation may have: tiny, ordinary, around the float16 and float32 limits, and
# beyond float32 (a float64 model).
_PROBE_MAGNITUDES = (1e-30, 1e-3, 0.5, 3.0, 1e2, 1e4, 65504.0, 1e8, 1e15, 1e30, 3.4e38, 1e100)


def _affinity_probe(channels: int, rank: int) -> torch.Tensor:
    """Random values, then each magnitude of :data:`_PROBE_MAGNITUDES` (slightly varied) with
    random signs, in every channel: one float64 batch."""
    g = torch.Generator().manual_seed(0)
    spatial = (3,) * (rank - 2)
    n = 3 + len(_PROBE_MAGNITUDES)
    x = torch.randn((n, channels) + spatial, generator=g, dtype=torch.float64) * 10
    size = (channels,) + spatial
    for i, magnitude in enumerate(_PROBE_MAGNITUDES):
        signs = torch.randint(0, 2, size, generator=g).to(torch.float64) * 2 - 1
        jitter = 1 + 0.01 * torch.rand(size, generator=g, dtype=torch.float64)
        x[3 + i] = signs * magnitude * jitter
    return x


def _non_affine_operations(probe: nn.Module, x: torch.Tensor) -> str:
    """Why the operations ``probe`` runs on ``x`` may not be affine in ``x``, or ``""``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with torch.no_grad():
            graph = make_fx(probe)(x).graph
    except Exception as e:  # noqa: BLE001 - what cannot be recorded cannot be checked
        return f"its forward cannot be recorded to check its operations ({type(e).__name__})"
    aten = torch.ops.aten
    tainted: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            tainted.add(node)
            continue
        if node.op != "call_function":
            continue
        flat: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), flat.append)
        from_x = [a for a in flat if a in tainted]
        if not from_x:
            continue
        tainted.add(node)
        target = node.target
        packet = getattr(target, "overloadpacket", None)
        first_only = node.args[:1] and node.args[0] in tainted and len(from_x) == 1
        if target is operator.getitem or packet in _AFFINE_PASS_THROUGH:
            continue
        if packet in (aten.add, aten.sub):
            continue  # sums of affine maps are affine (alpha is a number)
        if packet is aten.mul and len(from_x) == 1:
            continue
        if packet is aten.div and first_only:
            continue
        if packet in _INFERENCE_BATCH_NORMS and first_only and _not_training(node):
            continue
        name = getattr(packet, "__name__", str(target))
        return (
            f"its forward applies {name} to values computed from its input, which is not "
            "affine (probes cannot show it is affine for every input)"
        )
    return ""


def _not_training(node: torch.fx.Node) -> bool:
    if node.target is torch.ops.aten._native_batch_norm_legit_no_training.default:
        return True
    return len(node.args) > 5 and node.args[5] is False


_AFFINE_PASS_THROUGH = frozenset(
    {
        torch.ops.aten.view,
        torch.ops.aten.reshape,
        torch.ops.aten._unsafe_view,
        torch.ops.aten.expand,
        torch.ops.aten.unsqueeze,
        torch.ops.aten.squeeze,
        torch.ops.aten.alias,
        torch.ops.aten.clone,
        torch.ops.aten.contiguous,
        torch.ops.aten.detach,
        torch.ops.aten._to_copy,
        torch.ops.aten.to,
        torch.ops.aten.neg,
        torch.ops.aten.lift_fresh_copy,
    }
)
_INFERENCE_BATCH_NORMS = frozenset(
    {
        torch.ops.aten.batch_norm,
        torch.ops.aten.native_batch_norm,
        torch.ops.aten._native_batch_norm_legit_no_training,
        torch.ops.aten._native_batch_norm_legit,
    }
)


@dataclass
class BatchNormSpec:
    """The inference BatchNorm a module computes, or why it cannot be folded.

    ``remainder`` is what the module's ``forward`` does after the BatchNorm (``None``: nothing);
    it replaces the module once the BatchNorm is folded. ``not_foldable`` is empty when the
    module's forward is understood, else it says why not.
    """

    mean: torch.Tensor | None
    var: torch.Tensor | None
    eps: float
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    uses_running_stats: str = ""  # empty when it does; else why not
    not_foldable: str = ""
    remainder: nn.Module | None = None
    input_ranks: frozenset[int] | None = None
    affine: tuple[Any, Any] | None = None  # measured (s, t), used instead of the statistics

    def factors(self) -> tuple[Any, Any]:
        """``(s, t)`` in float64; raises FoldRefused when the numbers are invalid."""
        if self.affine is not None:
            return self.affine
        return affine_factors(self.mean, self.var, self.eps, self.gamma, self.beta)


_PLAIN = (bool, int, float, str, tuple, type(None))


def carry_plain_attributes(bn: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` (what replaces a folded BatchNorm) ``bn``'s plain attributes.

    ``num_features``, ``eps`` and the like stay readable, so that code reading them still runs;
    tensor attributes are gone with the BatchNorm, and the rules refuse to fold a BatchNorm whose
    tensors forward reads elsewhere.
    """
    for key, value in vars(bn).items():
        if key.startswith("_") or key in vars(new) or not isinstance(value, _PLAIN):
            continue
        if hasattr(type(new), key):  # a method or property of the new module's class
            continue
        setattr(new, key, value)
    return new


# The methods through which calling a module reaches its forward: a class that overrides one
# of them (``def __call__(self, x): return relu(super().__call__(x))``) computes more than its
# forward, and torch.fx, which stops at the call, shows the extra work as if it came after.
_CALL_METHODS = ("__call__", "_wrapped_call_impl", "_call_impl")


def call_changed_reason(m: nn.Module) -> str:
    """Why calling ``m`` may do more than its forward: forward hooks, or a call method
    overridden by a class or set on the instance. Empty when neither."""
    name = type(m).__name__
    for method in _CALL_METHODS:
        owner = defining_class(type(m), method)
        if owner is not None and not is_torch_class(owner):
            return f"{name} overrides {method}(), which runs around its forward()"
        if method != "__call__" and method in vars(m):  # looked up on the instance by torch
            return f"{name} has {method}() set on the instance, which runs around its forward()"
    if m._forward_hooks or m._forward_pre_hooks:
        pruned = pruned_tensors(m)
        if pruned:
            return (
                f"{name}'s {' and '.join(pruned)} is pruned (torch.nn.utils.prune): its forward "
                "pre-hook recomputes it on every call; make the pruning permanent with "
                f"torch.nn.utils.prune.remove(module, {pruned[0]!r}) before folding"
            )
        return f"{name} has forward hooks, which may change what it computes"
    return ""


def pruned_tensors(m: nn.Module) -> list[str]:
    """The tensors of ``m`` that torch.nn.utils.prune recomputes in a forward pre-hook."""
    from torch.nn.utils.prune import BasePruningMethod

    return [
        hook._tensor_name
        for hook in m._forward_pre_hooks.values()
        if isinstance(hook, BasePruningMethod)
    ]


def forward_changed_reason(m: nn.Module) -> str:
    """Why ``m`` may not compute what its class's forward says: hooks, an overridden call
    method, or a forward set on the instance (by a hook library, or ``m.forward = ...``).
    Empty when none of these."""
    if "forward" in vars(m):
        return f"{type(m).__name__} has a forward() set on the instance, which bnfold cannot see"
    return call_changed_reason(m)


def _number(value: Any) -> float:
    """``value`` as a float; NaN when it is not a real number (the fold is then refused as an
    invalid value, as a NaN eps is)."""
    try:
        return float(value) if not isinstance(value, (str, bytes)) else float("nan")
    except (TypeError, ValueError, OverflowError):
        return float("nan")


def spec_runs_forward(m: nn.Module) -> bool:
    """Whether :func:`batchnorm_spec` runs or traces ``m``'s forward to read it."""
    return is_frozen_batchnorm(m) or not is_torch_class(defining_class(type(m), "forward"))


def batchnorm_spec(m: nn.Module, name: str) -> BatchNormSpec:
    """Read BatchNorm module ``m`` (called ``name`` in messages)."""
    if is_frozen_batchnorm(m):
        # FrozenBatchNorm2d is not a torch class and implementations differ (eps or none, a
        # fused activation, ...): measure what its forward computes instead of trusting names.
        spec = BatchNormSpec(None, None, 0.0, None, None, input_ranks=frozenset({4}))
        spec.not_foldable = forward_changed_reason(m)
        if not spec.not_foldable:
            measured = measure_affine(m, m.running_mean.numel())
            if isinstance(measured, str):
                spec.not_foldable = f"{type(m).__name__} is not an inference BatchNorm: {measured}"
            else:
                spec.affine = measured
        return spec
    spec = BatchNormSpec(m.running_mean, m.running_var, _number(m.eps), m.weight, m.bias)
    if m.training:
        spec.uses_running_stats = (
            f"{name} is in training mode (batch statistics); call .eval() on it"
        )
    elif m.running_mean is None or m.running_var is None:
        spec.uses_running_stats = (
            f"{name} has no running statistics (track_running_stats=False): it always "
            "normalises with batch statistics"
        )
    spec.not_foldable = forward_changed_reason(m)
    if is_torch_class(defining_class(type(m), "forward")):
        if is_torch_class(defining_class(type(m), "_check_input_dim")):
            spec.input_ranks = _class_ranks(m)
        return spec
    if not spec.uses_running_stats and not spec.not_foldable:
        _split_custom_forward(m, spec)
    return spec


def _batch_norm_arguments(node: torch.fx.Node) -> dict[str, Any] | None:
    """The arguments of a traced F.batch_norm / torch.batch_norm call, by name."""
    if node.target is torch.batch_norm:
        if node.kwargs or len(node.args) != len(_TORCH_BATCH_NORM_ORDER):
            return None
        return dict(zip(_TORCH_BATCH_NORM_ORDER, node.args, strict=True))
    try:
        bound = _BATCH_NORM_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


class BufferProxyTracer(torch.fx.Tracer):
    """Buffers become graph nodes too: forward's in-place updates are recorded, not run."""

    proxy_buffer_attributes = True


def _no_check(*_args: Any) -> None:
    return None


def _split_custom_forward(m: nn.Module, spec: BatchNormSpec) -> None:
    """Understand a subclass's own ``forward`` as ``rest(batch_norm(x))``, or say why not.

    The forward is traced on its own; it must apply an inference ``batch_norm`` with the module's
    own statistics to its input before anything else touches the input's values.
    """
    cls = type(m).__name__
    why = f"{cls} overrides forward()"
    # nn's input checks compare the input's rank, which a symbolic trace cannot do: trace a
    # shallow copy (same tensors and submodules) in which they are switched off. They only
    # validate; the rank rule decides what the checks would have.
    traced = copy.copy(m)
    # Its own slots and containers, so that what forward does to them stays on the copy.
    for key, value in list(vars(traced).items()):
        if isinstance(value, (dict, list, set)):
            object.__setattr__(traced, key, copy.copy(value))
    checked: list[Any] = []  # what the class's own rank check was called on

    def rank_check(value: Any) -> None:
        checked.append(value)

    for check in ("_check_input_dim", "_check_non_zero_input_channels"):
        if hasattr(traced, check):
            stub = rank_check if check == "_check_input_dim" else _no_check
            object.__setattr__(traced, check, stub)
    before = {k: identity(v) for k, v in vars(traced).items()}
    try:
        graph = BufferProxyTracer().trace(traced)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "not understood"
        spec.not_foldable = f"{why} and it cannot be traced ({type(e).__name__})"
        return
    changed = sorted(
        k
        for k, v in vars(traced).items()
        if not k.startswith(("_check", "_tensor_constant"))
        and (k not in before or identity(v) != before[k])
    )
    if changed:
        spec.not_foldable = (
            f"{why} and its forward changes {', '.join(changed)}, which a folded module "
            "would not keep doing"
        )
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        spec.not_foldable = f"{why} and takes {len(placeholders)} inputs"
        return
    x = placeholders[0]
    users = [u for u in x.users if not reads_metadata_only(u)]
    bn_nodes = [n for n in graph.nodes if n.op == "call_function" and n.target in _BATCH_NORM_FNS]
    if len(users) != 1 or len(bn_nodes) != 1 or users[0] is not bn_nodes[0]:
        spec.not_foldable = (
            f"{why} and does more than apply one batch_norm to its input first; bnfold cannot "
            "prove that folding keeps what it does"
        )
        return
    bn_node = bn_nodes[0]
    a = _batch_norm_arguments(bn_node)
    if a is None:
        spec.not_foldable = f"{why} and calls batch_norm with unexpected arguments"
        return
    stats = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        v = a[key]
        if v is None and key in ("weight", "bias"):
            stats[key] = None
            continue
        if not (isinstance(v, torch.fx.Node) and v.op == "get_attr" and "." not in str(v.target)):
            spec.not_foldable = f"{why} and its batch_norm {key} is not one of its own tensors"
            return
        stats[key] = getattr(traced, str(v.target))  # a buffer, or a constant of the trace
    if a["training"] is not False or not isinstance(a["eps"], (int, float)):
        spec.not_foldable = f"{why} and its batch_norm does not run in inference mode"
        return
    if any(getattr(v, "node", None) is x for v in checked) and is_torch_class(
        defining_class(type(m), "_check_input_dim")
    ):
        # forward runs nn's rank check on its input, so the input has the class's rank.
        spec.input_ranks = _class_ranks(m)
    else:
        spec.input_ranks = _asserted_rank(graph, x)
    spec.mean, spec.var = stats["running_mean"], stats["running_var"]
    spec.gamma, spec.beta, spec.eps = stats["weight"], stats["bias"], float(a["eps"])
    bn_node.replace_all_uses_with(x)
    graph.erase_node(bn_node)
    spec.remainder = _remainder_module(traced, graph)


def _asserted_rank(graph: torch.fx.Graph, x: torch.fx.Node) -> frozenset[int] | None:
    """The rank ``forward`` asserts for ``x`` (``torch._assert(x.ndim == 4, ...)``), if any."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch._assert or not node.args:
            continue
        cond = node.args[0]
        if not (isinstance(cond, torch.fx.Node) and cond.target is operator.eq):
            continue
        a, b = cond.args
        rank_node, value = (a, b) if isinstance(a, torch.fx.Node) else (b, a)
        reads_rank = (
            isinstance(rank_node, torch.fx.Node)
            and rank_node.args[:1] == (x,)
            and (
                (
                    rank_node.op == "call_function"
                    and rank_node.target is getattr
                    and rank_node.args[1] == "ndim"
                )
                or (rank_node.op == "call_method" and rank_node.target in ("dim", "ndimension"))
            )
        )
        if reads_rank and isinstance(value, int):
            return frozenset({value})
    return None


def _remainder_module(root: nn.Module, graph: torch.fx.Graph) -> nn.Module | None:
    """The graph left after removing the batch_norm, as a module; ``None`` if it is the identity.

    ``root`` is the traced module; the new module shares its submodules.
    """
    name = f"{type(root).__name__}AfterFold"
    for node in graph.nodes:
        node.type = None  # annotations from forward's signature would not script
    draft = torch.fx.GraphModule(root, graph, class_name=name)
    # Drop the statistics' get_attr nodes, unused now; everything else forward did stays, even
    # what looks dead (an in-place buffer update, an assert).
    for node in reversed(list(draft.graph.nodes)):
        if node.op == "get_attr" and not node.users:
            draft.graph.erase_node(node)
    nodes = [n for n in draft.graph.nodes if n.op not in ("placeholder", "output")]
    output = next(n for n in draft.graph.nodes if n.op == "output")
    first = next(iter(draft.graph.nodes))
    if output.args[0] is first and all(reads_metadata_only(n) for n in nodes):
        return None
    # Built again from the pruned graph, so that it holds only what it uses: not the folded
    # BatchNorm's statistics and affine parameters.
    return torch.fx.GraphModule(draft, draft.graph, class_name=name)
