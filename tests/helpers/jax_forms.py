"""Torch ``StepNet``s as JAX programs: the StableHLO forms of the contract suite.

:func:`to_jax` translates a :class:`~tests.helpers.torch_models.StepNet` (in eval mode) into a
JAX function of its input with the network's parameters closed over as constants, written with
``jax.lax`` in the torch layout (NCHW activations, OIHW kernels), each layer as JAX code would
write it by hand. The constants keep the network's dtype (float32, float16, bfloat16 as
``ml_dtypes.bfloat16``; float64 only under ``jax_enable_x64``), so the program computes in it.
What the translation cannot express raises ``NotImplementedError``: hooks, a layer whose class
overrides ``__call__`` (unless ``after_call`` says what its call adds to its forward), layers
and steps not listed here.

- ``Conv{1,2,3}d``: ``lax.conv_general_dilated`` with the torch dimension numbers and
  ``feature_group_count`` for groups, ``jnp.pad`` first for the reflect, replicate and circular
  padding modes, then ``+ bias`` broadcast along axis 1;
- ``ConvTranspose{1,2,3}d``: the equivalent dilated convolution (``lhs_dilation`` = stride, the
  kernel regrouped from ``(C_in, C_out / groups, *k)`` to ``(C_out, C_in / groups, *k)`` and
  flipped in numpy, so the constant is the convolution's weight; padding ``dilation * (k - 1) -
  padding``, plus ``output_padding`` at the end);
- ``Linear``: ``x @ W.T + b``;
- ``BatchNorm{1,2,3}d`` (inference): ``(x - mean) * (gamma * lax.rsqrt(var + eps)) + beta``, the
  statistics shaped ``(C, 1, ...)`` so that they broadcast along axis 1: one subtract, one
  multiply of the activation by a per-channel value, one add per BatchNorm;
- the tensor steps of ``StepNet.forward`` (relu as ``jax.nn.relu``, tanh, add, cat, slice, mean,
  transpose, probe, is_tensor).

Each layer call runs in ``jax.named_scope("layers")`` and ``jax.named_scope(name)``, so that its
ops' locations name the layer as flax's do (``jit(fn)/layers/conv0/conv_general_dilated``).

:func:`export` exports the translation with ``jax.export`` for the example input's shape and
dtype and checks it against the torch module's outputs before handing it out (the random-network
fuzzer checks it against a float64 reference instead). :func:`count_bns` counts the BatchNorms a
module still computes (the multiplies of an activation by a per-channel constant vector: a
folded chain is one add) and :func:`bn_paths` names each by the layer path in its location,
:func:`weights` reads every ``stablehlo.constant`` as bytes, :func:`fingerprint` hashes the
module, :func:`run` runs an ``Exported`` or text, :func:`forget` drops JAX's caches.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from jax import lax
from jax.interpreters import mlir as jax_mlir
from jaxlib.mlir import ir
from torch import nn

from bnfold.stablehlo.run import run_text
from tests.helpers.torch_models import StepNet

# The translation must agree with torch to this (max|jax - torch| / max|torch|, per output).
AGREEMENT = 1e-4

_SPATIAL_LAYOUT = {1: "H", 2: "HW", 3: "DHW"}
_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


# --------------------------------------------------------------------------------------------
# The translation


def to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    """A tensor as a numpy array of its own dtype (bfloat16 as ``ml_dtypes.bfloat16``, the
    type JAX uses); float64 needs ``jax_enable_x64`` (JAX would compute it in float32)."""
    if t is None:
        return None
    t = t.detach().cpu()
    if t.dtype == torch.float64 and not jax.config.jax_enable_x64:
        raise NotImplementedError("float64 (JAX computes it in float32 without jax_enable_x64)")
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)  # exact: bfloat16 widens exactly
    return t.numpy().copy()


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _dimension_numbers(nd: int) -> tuple[str, str, str]:
    s = _SPATIAL_LAYOUT[nd]
    return ("NC" + s, "OI" + s, "NC" + s)


def _channel_shaped(v: np.ndarray, rank: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast along axis 1 of a rank-``rank`` activation."""
    return v.reshape((-1,) + (1,) * (rank - 2))


def _conv(layer: nn.Module) -> Callable[[Any], Any]:
    nd = len(layer.kernel_size)
    weight, bias = to_numpy(layer.weight), to_numpy(layer.bias)
    k, dilation = layer.kernel_size, _tuple(layer.dilation, nd)
    if layer.padding == "same":
        totals = [d * (kk - 1) for kk, d in zip(k, dilation, strict=True)]
        pads = [(t // 2, t - t // 2) for t in totals]
    elif layer.padding == "valid":
        pads = [(0, 0)] * nd
    else:
        pads = [(p, p) for p in _tuple(layer.padding, nd)]
    mode = _PAD_MODES.get(layer.padding_mode)
    if mode is None and layer.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode {layer.padding_mode!r}")

    def f(x: Any) -> Any:
        padding = pads
        if mode is not None:
            x = jnp.pad(x, [(0, 0), (0, 0), *pads], mode=mode)
            padding = [(0, 0)] * nd
        y = lax.conv_general_dilated(
            x,
            jnp.asarray(weight),
            window_strides=_tuple(layer.stride, nd),
            padding=padding,
            rhs_dilation=dilation,
            dimension_numbers=_dimension_numbers(nd),
            feature_group_count=layer.groups,
        )
        return y if bias is None else y + jnp.asarray(_channel_shaped(bias, y.ndim))

    return f


def conv_transpose_kernel(weight: np.ndarray, groups: int) -> np.ndarray:
    """A ``ConvTranspose`` weight ``(C_in, C_out / groups, *k)`` as the kernel of the equivalent
    dilated convolution: ``(C_out, C_in / groups, *k)``, regrouped and flipped spatially."""
    c_in, c_out_g, *k = weight.shape
    w = weight.reshape(groups, c_in // groups, c_out_g, *k).swapaxes(1, 2)
    w = w.reshape(groups * c_out_g, c_in // groups, *k)
    return np.ascontiguousarray(np.flip(w, axis=tuple(range(2, 2 + len(k)))))


def _conv_transpose(layer: nn.Module) -> Callable[[Any], Any]:
    nd = len(layer.kernel_size)
    if layer.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode {layer.padding_mode!r}")
    kernel = conv_transpose_kernel(to_numpy(layer.weight), layer.groups)
    bias = to_numpy(layer.bias)
    dilation = _tuple(layer.dilation, nd)
    pads = [
        (d * (kk - 1) - p, d * (kk - 1) - p + op)
        for kk, d, p, op in zip(
            layer.kernel_size,
            dilation,
            _tuple(layer.padding, nd),
            _tuple(layer.output_padding, nd),
            strict=True,
        )
    ]

    def f(x: Any) -> Any:
        y = lax.conv_general_dilated(
            x,
            jnp.asarray(kernel),
            window_strides=(1,) * nd,
            padding=pads,
            lhs_dilation=_tuple(layer.stride, nd),
            rhs_dilation=dilation,
            dimension_numbers=_dimension_numbers(nd),
            feature_group_count=layer.groups,
        )
        return y if bias is None else y + jnp.asarray(_channel_shaped(bias, y.ndim))

    return f


def _linear(layer: nn.Linear) -> Callable[[Any], Any]:
    weight, bias = to_numpy(layer.weight), to_numpy(layer.bias)

    def f(x: Any) -> Any:
        y = x @ jnp.asarray(weight).T
        return y if bias is None else y + jnp.asarray(bias)

    return f


def _batch_norm(layer: nn.modules.batchnorm._BatchNorm) -> Callable[[Any], Any]:
    if layer.training or layer.running_mean is None or layer.running_var is None:
        raise NotImplementedError("a BatchNorm in training mode or without running statistics")
    mean, var = to_numpy(layer.running_mean), to_numpy(layer.running_var)
    gamma, beta, eps = to_numpy(layer.weight), to_numpy(layer.bias), float(layer.eps)

    def f(x: Any) -> Any:
        def c(v: np.ndarray) -> Any:
            return jnp.asarray(_channel_shaped(v, x.ndim))

        scale = lax.rsqrt(c(var) + eps)
        if gamma is not None:
            scale = c(gamma) * scale
        y = (x - c(mean)) * scale
        return y if beta is None else y + c(beta)

    return f


def _affine_chain(layer: nn.Module) -> Callable[[Any], Any]:
    """An ``AffineChain`` of the random-network fuzzer (``tests/fuzz/networks.py``; any module
    with ``chain_ops``): the same arithmetic in the same order, its operands as constants of
    their stored shape (a ``view`` in its forward as a reshape of the constant) or Python
    numbers (weakly typed: they compute in the activation's dtype, as torch's do)."""
    operands = {}
    for _, key, _, _ in layer.chain_ops:
        if isinstance(key, str):
            value = to_numpy(getattr(layer, key))
            if key in layer.views:
                value = value.reshape(layer.views[key])
            operands[key] = value

    def f(x: Any) -> Any:
        y = x.astype(jnp.float32) if layer.wide else x
        again = None
        for i, (op, key, first, alpha) in enumerate(layer.chain_ops):
            a = jnp.asarray(operands[key]) if isinstance(key, str) else key
            if op == "neg":
                y = -y
            elif op == "mul":
                y = y * a if first else a * y
            elif op == "div":
                y = y / a
            elif op == "add" and alpha != 1:  # torch.add(y, a, alpha=alpha)
                y = y + a * alpha
            elif op == "add":
                y = y + a if first else a + y
            elif op == "sub" and alpha != 1:
                y = y - a * alpha
            elif op == "sub":
                y = y - a if first else a - y
            else:
                raise NotImplementedError(f"no JAX translation of the chain op {op!r}")
            if i == layer.reread:
                again = y
        if again is not None:
            y = y + again
        return y.astype(x.dtype) if layer.wide else y

    return f


def _layer(layer: nn.Module, after_call: dict[type, Callable[[Any], Any]]) -> Callable[[Any], Any]:
    if _hooked(layer):
        raise NotImplementedError(f"a {type(layer).__name__} with hooks")
    then = None
    if type(layer).__call__ is not nn.Module.__call__:  # a call that adds to forward
        then = next((f for cls, f in after_call.items() if isinstance(layer, cls)), None)
        if then is None:
            raise NotImplementedError(f"{type(layer).__name__} overrides __call__")
    f = _forward(layer)
    return f if then is None else lambda x: then(f(x))


def _forward(layer: nn.Module) -> Callable[[Any], Any]:
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return _conv_transpose(layer)
    if isinstance(layer, nn.modules.conv._ConvNd):
        return _conv(layer)
    if isinstance(layer, nn.Linear):
        return _linear(layer)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return _batch_norm(layer)
    if isinstance(layer, nn.ReLU):
        return jax.nn.relu
    if hasattr(layer, "chain_ops"):
        return _affine_chain(layer)
    raise NotImplementedError(f"no JAX translation of {type(layer).__name__}")


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks or pre-hooks (which the translation would miss)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def to_jax(
    net: StepNet, after_call: dict[type, Callable[[Any], Any]] | None = None
) -> Callable[[Any], tuple]:
    """``net``'s forward as a JAX function of its input (parameters closed over). A layer whose
    class overrides ``__call__`` is translated when it is an instance of a class in
    ``after_call``, as its forward followed by that function (``{ReLUOnCall: jax.nn.relu}``);
    hooks, other layers and other steps raise ``NotImplementedError``."""
    if _hooked(net) or type(net).__call__ is not nn.Module.__call__:
        raise NotImplementedError("a StepNet with hooks, or calling other than nn.Module does")
    layers = {name: _layer(m, after_call or {}) for name, m in net.layers.items()}

    def fn(x: Any) -> tuple:
        values = [x]
        for kind, arg, ins in net.steps:
            a = [values[i] for i in ins]
            if kind == "call":
                with jax.named_scope("layers"), jax.named_scope(arg):  # the module path
                    y = layers[arg](a[0])
            elif kind == "add":
                y = a[0] + a[1]
            elif kind == "cat":
                y = jnp.concatenate([a[0], a[1]], axis=1)
            elif kind == "slice":
                y = a[0][:, arg[0] : arg[1]]
            elif kind == "relu":
                y = jax.nn.relu(a[0])
            elif kind == "tanh":
                y = jnp.tanh(a[0])
            elif kind == "pool":
                y = jnp.mean(a[0], axis=arg)
            elif kind == "transpose":
                y = jnp.swapaxes(a[0], 1, 2)
            elif kind == "probe":  # decided in Python, as torch's forward decides it
                layer = net.layers[arg[0]]
                if arg[1] == "isinstance":
                    flag = isinstance(layer, nn.modules.batchnorm._BatchNorm)
                else:
                    flag = getattr(layer, "bias", None) is None
                y = a[0] * 2 if flag else a[0]
            elif kind == "is_tensor":  # the eager path: the input is a tensor
                y = a[0] + a[0]
            else:
                raise NotImplementedError(f"no JAX translation of the step {kind!r}")
            values.append(y)
        return tuple(values[i] for i in net.outputs)

    return fn


def export(
    net: StepNet,
    x: torch.Tensor,
    *,
    check: bool = True,
    after_call: dict[type, Callable[[Any], Any]] | None = None,
) -> Any:
    """``net`` as a ``jax.export.Exported`` for inputs of ``x``'s shape and dtype, checked
    against torch on ``x`` (unless ``check`` is false): every output within
    :data:`AGREEMENT` of the module's. ``after_call`` as for :func:`to_jax`."""
    arg = to_numpy(x)
    spec = jax.ShapeDtypeStruct(arg.shape, arg.dtype)
    exported = jax.export.export(jax.jit(to_jax(net, after_call)))(spec)
    if not check:
        return exported
    with torch.no_grad():
        expected = [t.detach().double().numpy() for t in net(x.clone())]
    got = run(exported, x)
    assert len(got) == len(expected), (len(got), len(expected))
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape, (i, g.shape, e.shape)
        scale = float(np.abs(e).max()) or 1.0
        err = float(np.abs(g.astype(np.float64) - e).max()) / scale
        assert err <= AGREEMENT, f"the JAX translation's output {i} is {err:.3g} off torch's"
    return exported


def export_text(net: StepNet, x: torch.Tensor) -> str:
    """:func:`export`'s module as StableHLO text."""
    return export(net, x).mlir_module()


# --------------------------------------------------------------------------------------------
# Reading and running a form


def run(model: Any, x: torch.Tensor) -> list[np.ndarray]:
    """Every output of an ``Exported`` or of StableHLO text on ``x``, as numpy arrays."""
    arg = to_numpy(x)
    if isinstance(model, str):
        return run_text(model, [arg])
    return [np.asarray(y) for y in jax.tree_util.tree_leaves(model.call(arg))]


def forget() -> None:
    """Drop what JAX and this module keep between programs (compiled calls, traces, the MLIR
    context's uniqued constants): a process that exports thousands of programs grows by
    megabytes a program otherwise."""
    jax.clear_caches()
    _context.cache_clear()


def _text(model: Any) -> str:
    return model if isinstance(model, str) else model.mlir_module()


@functools.cache
def _context() -> Any:
    return jax_mlir.make_ir_context()  # one for every parse here (making one takes ~7 ms)


def _module(model: Any) -> tuple[Any, Any]:
    ctx = _context()
    with ctx:
        return ctx, ir.Module.parse(_text(model))


def _walk(op: Any) -> Iterator[Any]:
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                inner = inner.operation
                yield inner
                yield from _walk(inner)


def _functions(module: Any) -> Iterator[Any]:
    for op in module.body.operations:
        if op.operation.name == "func.func":
            yield op.operation


def _varying_axes(value: Any) -> int:
    """How many axes of more than one element ``value`` has before the broadcasts and
    reshapes that made it (1 for a per-channel vector, 0 for a scalar)."""
    while not isinstance(value.owner, ir.Block):  # an op's result, not an argument
        op = getattr(value.owner, "operation", value.owner)
        if op.name not in ("stablehlo.broadcast_in_dim", "stablehlo.reshape"):
            break
        value = op.operands[0]
    return sum(n > 1 for n in ir.RankedTensorType(value.type).shape)


def count_bns(model: Any) -> int:
    """The BatchNorms a module still computes: multiplies of an activation (a value that
    depends on a function argument) by a per-channel constant (a value that does not, varying
    along one axis before its broadcasts), and divisions of an activation by one. Each
    BatchNorm the translation writes has one; a folded chain has none (it becomes one add);
    the fuzzer's ``AffineChain`` has one for each multiply or division by a vector (bnfold
    counts a chain that scales channel by channel as a BatchNorm), and nothing else the
    translation writes has one (a probe's ``* 2`` is by a scalar)."""
    return len(bn_paths(model))


def bn_paths(model: Any) -> list[str]:
    """The layer path JAX recorded in the location of each multiply :func:`count_bns` counts
    (``layers/bn1`` of ``jit(fn)/layers/bn1/mul``; "" when it names none): one per BatchNorm
    call the module still computes, in program order."""
    ctx, module = _module(model)
    found = []
    with ctx:
        for func in _functions(module):
            data = {arg for block in func.regions[0].blocks for arg in block.arguments}
            for op in _walk(func):
                depends = [v in data for v in op.operands]
                if any(depends):
                    data.update(op.results)
                divides = op.name == "stablehlo.divide" and depends == [True, False]
                if (op.name == "stablehlo.multiply" and sum(depends) == 1) or divides:
                    constant = op.operands[depends.index(False)]
                    if _varying_axes(constant) == 1:
                        found.append(_location_path(op.location))
    return found


def _location_path(location: Any) -> str:
    """``layers/bn1`` from a location named ``jit(fn)/layers/bn1/mul``, "" otherwise."""
    name = re.match(r'loc\("([^"]*)"', str(location))
    parts = name.group(1).split("/") if name else []
    return "/".join(parts[1:-1]) if len(parts) >= 3 else ""


def _attribute_bytes(attr: Any) -> bytes:
    dense = ir.DenseElementsAttr(attr)
    if dense.is_splat:
        value = dense.get_splat_value()
        return f"splat {dense.type}: ".encode() + np.asarray(value.value).tobytes()
    return f"{dense.type}: ".encode() + np.ascontiguousarray(np.array(dense)).tobytes()


def weights(model: Any) -> dict[str, bytes]:
    """Every ``stablehlo.constant`` of the module (named by function, position and type), as
    bytes."""
    ctx, module = _module(model)
    found = {}
    with ctx:
        for func in _functions(module):
            name = ir.StringAttr(func.attributes["sym_name"]).value
            constants = [op for op in _walk(func) if op.name == "stablehlo.constant"]
            for i, op in enumerate(constants):
                found[f"@{name}/{i}"] = _attribute_bytes(op.attributes["value"])
    return found


def fingerprint(model: Any) -> str:
    """A hash of the text, or of an ``Exported``'s serialized module and calling convention."""
    h = hashlib.sha256()
    if isinstance(model, str):
        h.update(model.encode())
        return h.hexdigest()
    h.update(bytes(model.mlir_module_serialized))
    for name in ("fun_name", "in_tree", "out_tree", "in_avals", "out_avals", "platforms"):
        h.update(repr(getattr(model, name)).encode())
    h.update(repr(model.in_shardings_hlo).encode() + repr(model.out_shardings_hlo).encode())
    return h.hexdigest()
