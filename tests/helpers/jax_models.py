"""Small JAX models for the StableHLO frontend tests: a zoo of :class:`JaxCase`.

A case is one model in one of the two forms ``bnfold.fold`` takes from JAX: a
``jax.export.Exported`` (``exported``; flax linen and nnx models, plain JAX functions, all
exported with their parameters closed over, so that they are constants of the module, except
where a case is about parameters passed as arguments) or StableHLO MLIR text written here from
numpy arrays (``text``; ``stablehlo.batch_norm_inference``, which JAX itself never emits). Each
case says what the fold must do with it: how many BatchNorms are folded, how many are kept and
under which rule, which arithmetic stays in the folded module.

Every BatchNorm has non-trivial statistics (:func:`bn_params`: random mean, variance in
[0.5, 2], scale of either sign, bias; epsilon 1e-3 so that a fold forgetting it is seen at the
float32 tolerance), every conv and Dense a random bias: a default-initialised BatchNorm is the
identity and would prove nothing. Every random number comes from a fixed seed. Shapes are tiny
(batch 2, 8x8 pixels, 3 to 8 channels) so that every case builds, exports and compiles in well
under a second.

``CASES`` maps each name to its builder; :func:`case` builds one (cached: a case is built once
per process). :func:`run` runs a case's model (or a folded one) with XLA and returns its outputs
as numpy arrays; :func:`run_text` does it for MLIR text, :func:`op_counts` counts the StableHLO
ops of a module. The nnx cases need a flax whose ``nnx`` imports with the installed jax (flax
0.12.0's does not with jax 0.10: ``jax._src.core.mutable_array`` is gone; 0.12.8's does); their
builders skip the test otherwise.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

F32_TOL = 1e-4  # max|folded - original| <= F32_TOL * max(1, max|original|)
# bfloat16 keeps 8 significant bits: every op of the original rounds its result to a relative
# 2**-9, and so does the folded weight (w * s rounded once). The original's chain rounds four
# times (conv, subtract, multiply, add) values up to a few times larger than the output
# (y - mean, before the scale), the fold once per weight: they differ by a few 2**-8 of
# max|output|.
# 2**-5 leaves a margin of about 4 over what the bf16 case shows (<= 0.008 on 7 input sets)
# and still catches a fold that gets the scale or the shift wrong (tens of percent).
BF16_TOL = 2.0**-5
EPS = 1e-3  # every BatchNorm's epsilon: 1e-3 of a variance in [0.5, 2] is above F32_TOL

# Arithmetic a folded chain leaves nothing of (at most one add, the new bias, per chain).
CHAIN_OPS = ("multiply", "divide", "subtract", "negate", "batch_norm_inference", "rsqrt", "sqrt")


@dataclass(frozen=True)
class JaxCase:
    """One model for the StableHLO frontend and what folding it must do.

    Exactly one of ``exported`` and ``text`` is set (:attr:`model` is that one). ``inputs`` are
    the positional arguments the model is called with (arrays; a pytree of arrays where the
    parameters are arguments); ``fresh(seed)`` makes other arguments of the same shapes and
    dtypes, which the fold never saw. ``expect_folded`` is the number of report entries that
    must be folded (each into a named target), ``expect_skipped`` the number of skipped entries
    by rule id; ``optional_skips`` are rules under which further skipped entries may appear (a
    negative case whose constants are not a chain may be reported or not). ``reasons`` maps a
    rule to words every skipped entry under it must contain. ``kept_ops`` counts the ops of
    :data:`CHAIN_OPS` and adds the folded module keeps outside every BatchNorm chain (a
    residual add). ``tol`` bounds ``max|folded - original| / max(1, max|original|)``.
    ``bn_stats`` holds every BatchNorm's (mean, var, scale, bias), for the check that they are
    not the identity; ``variables`` a linen model's variables.
    """

    name: str
    inputs: tuple
    fresh: Callable[[int], tuple]
    expect_folded: int
    expect_skipped: dict[str, int] = field(default_factory=dict)
    exported: jax.export.Exported | None = None
    text: str | None = None
    optional_skips: frozenset[str] = frozenset()
    reasons: dict[str, str] = field(default_factory=dict)
    kept_ops: dict[str, int] = field(default_factory=dict)
    tol: float = F32_TOL
    bn_stats: tuple[tuple[np.ndarray, ...], ...] = ()
    variables: Any = None  # a flax linen model's variables, for references computed by hand

    @property
    def model(self) -> Any:
        return self.exported if self.exported is not None else self.text

    @property
    def expect_entries(self) -> int:
        return self.expect_folded + sum(self.expect_skipped.values())


CASES: dict[str, Callable[[], JaxCase]] = {}


def _register(fn: Callable[[], JaxCase]) -> Callable[[], JaxCase]:
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


@functools.cache
def case(name: str) -> JaxCase:
    """The case called ``name``, built once per process."""
    built = CASES[name]()
    assert built.name == name
    assert (built.exported is None) != (built.text is None), name
    return built


# --------------------------------------------------------------------------------------------
# Running models


def module_text(model: Any) -> str:
    """The StableHLO text of an ``Exported`` or of MLIR text."""
    return model if isinstance(model, str) else model.mlir_module()


@functools.lru_cache(maxsize=64)
def _executable(text: str) -> Any:
    backend = jax.extend.backend.get_backend()
    return backend.compile_and_load(text, jax.devices()[:1])


def run_text(text: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Compile StableHLO text with XLA (cached per text) and run it on ``inputs``."""
    outs = _executable(text).execute([jax.device_put(np.asarray(x)) for x in inputs])
    return [np.asarray(o) for o in outs]


def run(model: Any, inputs: tuple) -> list[np.ndarray]:
    """The outputs of an ``Exported`` (``.call``) or of MLIR text on ``inputs``, as numpy."""
    if isinstance(model, str):
        return run_text(model, jax.tree_util.tree_leaves(inputs))
    return [np.asarray(o) for o in jax.tree_util.tree_leaves(model.call(*inputs))]


def rel_error(original: Sequence[np.ndarray], folded: Sequence[np.ndarray]) -> float:
    """``max|folded - original| / max(1, max|original|)`` over every output (float64)."""
    assert len(original) == len(folded)
    worst = 0.0
    for a, b in zip(original, folded, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        assert np.isfinite(a64).all() == np.isfinite(b64).all()
        scale = max(1.0, float(np.abs(a64).max()))
        worst = max(worst, float(np.abs(a64 - b64).max()) / scale)
    return worst


def bit_equal(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    """Same shapes, dtypes and bits (NaN equal to NaN)."""
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()
        for x, y in zip(a, b, strict=True)
    )


_OP = re.compile(r'(?:^|[\s=("])stablehlo\.([a-z_]+)\b')


def op_counts(model: Any) -> Counter:
    """How many ops of each StableHLO kind (``"multiply"``) the module of ``model`` holds, in
    every function (location lines and ``#stablehlo.`` attributes are not ops)."""
    counts: Counter = Counter()
    for line in module_text(model).splitlines():
        if line.lstrip().startswith("#loc"):
            continue
        counts.update(_OP.findall(line.split(" loc(")[0]))
    return counts


# --------------------------------------------------------------------------------------------
# Random numbers


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def normal(rng: np.random.Generator, shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
    return rng.standard_normal(tuple(shape)).astype(dtype)


def bn_params(rng: np.random.Generator, c: int, dtype: Any = np.float32) -> tuple:
    """Random (mean, var, scale, bias) of ``c`` channels, nothing like the identity: means and
    biases of both signs and magnitudes 0.2 to 1.2, variances spread over [0.5, 2], scales of
    magnitude 0.5 to 2 and both signs."""

    def signs() -> np.ndarray:
        return rng.permutation(np.resize([1.0, -1.0], c))

    mean = rng.uniform(0.2, 1.2, c) * signs()
    var = np.clip(rng.permutation(np.linspace(0.5, 2.0, c)) + rng.uniform(-0.05, 0.05, c), 0.5, 2)
    scale = rng.uniform(0.5, 2.0, c) * signs()
    bias = rng.uniform(0.2, 1.2, c) * signs()
    return tuple(a.astype(dtype) for a in (mean, var, scale, bias))


def _fresh_like(inputs: tuple) -> Callable[[int], tuple]:
    """Fresh standard-normal inputs with the shapes and dtypes of ``inputs``."""

    def fresh(seed: int) -> tuple:
        rng = _rng(10_000 + seed)
        return jax.tree_util.tree_map(lambda a: normal(rng, a.shape, a.dtype), inputs)

    return fresh


def _export(fn: Callable, *inputs: Any) -> jax.export.Exported:
    return jax.export.export(jax.jit(fn))(*inputs)


def _jax_case(name: str, fn: Callable, inputs: tuple, folded: int, **kw: Any) -> JaxCase:
    return JaxCase(
        name=name,
        exported=_export(fn, *inputs),
        inputs=inputs,
        fresh=kw.pop("fresh", _fresh_like(inputs)),
        expect_folded=folded,
        **kw,
    )


# --------------------------------------------------------------------------------------------
# flax linen: parameters closed over (constants), batch statistics replaced by random ones


def _linen_variables(model: Any, x: np.ndarray, seed: int) -> tuple[Any, tuple]:
    """Random variables for a linen ``model`` (shapes from ``jax.eval_shape`` of its init, so
    nothing is compiled): kernels normal over sqrt(fan-in), biases normal, BatchNorm statistics,
    scales and biases from :func:`bn_params`; as jax arrays, as a trained model holds them. Also
    every BatchNorm's (mean, var, scale, bias), ones/zeros for a scale or bias it lacks."""
    rng = _rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    variables = {k: dict(v) for k, v in variables.items()}
    params, stats = variables["params"], variables.get("batch_stats", {})
    found = []
    for mod in sorted(params, key=_module_order):
        p = params[mod] = dict(params[mod])
        if "kernel" in p:
            k = p["kernel"]
            p["kernel"] = (rng.standard_normal(k.shape) / np.sqrt(np.prod(k.shape[:-1]))).astype(
                k.dtype
            )
            if "bias" in p:
                p["bias"] = rng.normal(0.0, 0.7, p["bias"].shape).astype(p["bias"].dtype)
    for mod in sorted(stats, key=_module_order):
        c = stats[mod]["mean"].shape[-1]
        mean, var, scale, bias = bn_params(rng, c)
        stats[mod] = {"mean": mean, "var": var}
        p = params[mod] = dict(params.get(mod, {}))
        if "scale" in p:
            p["scale"] = scale
        else:
            scale = np.ones(c, np.float32)
        if "bias" in p:
            p["bias"] = bias
        else:
            bias = np.zeros(c, np.float32)
        found.append((mean, var, scale, bias))
    return jax.device_put(variables), tuple(found)


def _module_order(name: str) -> tuple[str, int]:
    """``BatchNorm_10`` after ``BatchNorm_9``."""
    base, _, num = name.rpartition("_")
    return (base, int(num)) if num.isdigit() else (name, -1)


def _linen_case(name: str, model: Any, x: np.ndarray, folded: int, seed: int = 0, **kw: Any):
    variables, stats = _linen_variables(model, x, seed)
    return _jax_case(
        name,
        functools.partial(model.apply, variables),
        (x,),
        folded,
        bn_stats=stats,
        variables=variables,
        **kw,
    )


def _linen():
    import flax.linen as nn

    return nn


def _bn(nn: Any, **kw: Any) -> Any:
    return nn.BatchNorm(use_running_average=True, epsilon=EPS, **kw)


@_register
def case_linen_conv_bn() -> JaxCase:
    nn = _linen()

    class ConvBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _bn(nn)(nn.Conv(6, (3, 3))(x))

    x = normal(_rng(1), (2, 8, 8, 3))
    return _linen_case("linen_conv_bn", ConvBN(), x, 1)


@_register
def case_linen_dense_bn() -> JaxCase:
    nn = _linen()

    class DenseBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _bn(nn)(nn.Dense(5)(x))

    x = normal(_rng(2), (2, 6))
    return _linen_case("linen_dense_bn", DenseBN(), x, 1)


@_register
def case_linen_conv_transpose_bn() -> JaxCase:
    nn = _linen()

    class ConvTBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _bn(nn)(nn.ConvTranspose(5, (3, 3), strides=(2, 2))(x))

    x = normal(_rng(3), (2, 4, 4, 3))
    return _linen_case("linen_conv_transpose_bn", ConvTBN(), x, 1)


@_register
def case_linen_grouped_conv_bn() -> JaxCase:
    nn = _linen()

    class GroupedBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _bn(nn)(nn.Conv(6, (3, 3), feature_group_count=2)(x))

    x = normal(_rng(4), (2, 8, 8, 4))
    return _linen_case("linen_grouped_conv_bn", GroupedBN(), x, 1)


@_register
def case_linen_depthwise_conv_bn() -> JaxCase:
    nn = _linen()

    class DepthwiseBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            # depthwise with a channel multiplier of 2: 4 groups of 1 input, 2 outputs each
            return _bn(nn)(nn.Conv(8, (3, 3), feature_group_count=4)(x))

    x = normal(_rng(5), (2, 8, 8, 4))
    return _linen_case("linen_depthwise_conv_bn", DepthwiseBN(), x, 1)


@_register
def case_linen_resnet_identity() -> JaxCase:
    nn = _linen()

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.relu(_bn(nn)(nn.Conv(4, (3, 3), use_bias=False)(x)))
            y = _bn(nn)(nn.Conv(4, (3, 3), use_bias=False)(y))
            return nn.relu(y + x)

    x = normal(_rng(6), (2, 8, 8, 4))
    return _linen_case("linen_resnet_identity", Block(), x, 2, kept_ops={"add": 1})


@_register
def case_linen_resnet_projection() -> JaxCase:
    nn = _linen()

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.relu(_bn(nn)(nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False)(x)))
            y = _bn(nn)(nn.Conv(8, (3, 3), use_bias=False)(y))
            shortcut = _bn(nn)(nn.Conv(8, (1, 1), strides=(2, 2), use_bias=False)(x))
            return nn.relu(y + shortcut)

    x = normal(_rng(7), (2, 8, 8, 4))
    return _linen_case("linen_resnet_projection", Block(), x, 3, kept_ops={"add": 1})


@_register
def case_linen_conv_nobias_bn() -> JaxCase:
    nn = _linen()

    class ConvBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _bn(nn)(nn.Conv(6, (3, 3), use_bias=False)(x))

    x = normal(_rng(8), (2, 8, 8, 3))
    return _linen_case("linen_conv_nobias_bn", ConvBN(), x, 1)


@_register
def case_linen_bn_no_affine() -> JaxCase:
    nn = _linen()

    class ConvBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _bn(nn, use_scale=False, use_bias=False)(nn.Conv(6, (3, 3))(x))

    x = normal(_rng(9), (2, 8, 8, 3))
    return _linen_case("linen_bn_no_affine", ConvBN(), x, 1)


@_register
def case_linen_conv_bn_bn() -> JaxCase:
    """Two BatchNorms in a row are one chain of per-channel constants, folded as a whole; each
    BatchNorm layer flax named has its own entry."""
    nn = _linen()

    class ConvBNBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _bn(nn)(_bn(nn)(nn.Conv(6, (3, 3))(x)))

    x = normal(_rng(10), (2, 8, 8, 3))
    return _linen_case("linen_conv_bn_bn", ConvBNBN(), x, 2)


@_register
def case_linen_conv_output_returned() -> JaxCase:
    """The conv (+ bias) output is also an output of the model: the BatchNorm stays."""
    nn = _linen()

    class ConvBNOut(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Conv(6, (3, 3))(x)
            return _bn(nn)(y), y

    x = normal(_rng(11), (2, 8, 8, 3))
    return _linen_case(
        "linen_conv_output_returned", ConvBNOut(), x, 0, expect_skipped={"single-consumer": 1}
    )


@_register
def case_linen_relu_then_bn() -> JaxCase:
    """Conv -> relu -> BatchNorm: nothing linear feeds the BatchNorm."""
    nn = _linen()

    class ConvReluBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _bn(nn)(nn.relu(nn.Conv(6, (3, 3))(x)))

    x = normal(_rng(12), (2, 8, 8, 3))
    return _linen_case("linen_relu_then_bn", ConvReluBN(), x, 0, expect_skipped={"no-producer": 1})


@_register
def case_linen_params_as_arguments() -> JaxCase:
    """``jax.jit(model.apply)`` exported with ``(variables, x)``: the BatchNorm's parameters
    are arguments of the module, not constants."""
    nn = _linen()

    class ConvBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _bn(nn)(nn.Conv(6, (3, 3))(x))

    model = ConvBN()
    x = normal(_rng(13), (2, 8, 8, 3))

    variables, stats = _linen_variables(model, x, 0)

    def fresh(seed: int) -> tuple:
        return (_linen_variables(model, x, 100 + seed)[0], normal(_rng(10_000 + seed), x.shape))

    return JaxCase(
        name="linen_params_as_arguments",
        exported=_export(model.apply, variables, x),
        inputs=(variables, x),
        fresh=fresh,
        expect_folded=0,
        expect_skipped={"constant-params": 1},
        reasons={"constant-params": "parameters are arguments"},
        bn_stats=stats,
        variables=variables,
    )


# --------------------------------------------------------------------------------------------
# flax nnx: BatchNorm with random statistics, the module closed over by a jitted function


def _nnx():
    return pytest.importorskip(
        "flax.nnx", reason="flax.nnx does not import with this jax", exc_type=ImportError
    )


def _set_variable(variable: Any, value: np.ndarray) -> None:
    if hasattr(variable, "set_value"):  # flax >= 0.12.x; older ones only have .value
        variable.set_value(jnp.asarray(value))
    else:
        variable.value = jnp.asarray(value)


def _randomize_nnx_bn(bn: Any, seed: int) -> tuple:
    mean, var, scale, bias = params = bn_params(_rng(seed), bn.num_features)
    for variable, value in zip((bn.mean, bn.var, bn.scale, bn.bias), params, strict=True):
        _set_variable(variable, value)
    return mean, var, scale, bias


def _randomize_nnx_bias(layer: Any, seed: int, c: int) -> None:
    _set_variable(layer.bias, normal(_rng(seed), (c,)) * 0.7)


def _nnx_case(name: str, model: Any, x: np.ndarray, stats: tuple, folded: int) -> JaxCase:
    model.eval()  # use_running_average=True for every BatchNorm

    def forward(x):
        return model(x)

    return _jax_case(name, forward, (x,), folded, bn_stats=(stats,))


@_register
def case_nnx_conv_bn() -> JaxCase:
    nnx = _nnx()

    class ConvBN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(6, epsilon=EPS, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.conv(x))

    model = ConvBN(nnx.Rngs(0))
    _randomize_nnx_bias(model.conv, 1, 6)
    stats = _randomize_nnx_bn(model.bn, 2)
    return _nnx_case("nnx_conv_bn", model, normal(_rng(3), (2, 8, 8, 3)), stats, 1)


@_register
def case_nnx_linear_bn() -> JaxCase:
    nnx = _nnx()

    class LinearBN(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(6, 5, rngs=rngs)
            self.bn = nnx.BatchNorm(5, epsilon=EPS, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.linear(x))

    model = LinearBN(nnx.Rngs(0))
    _randomize_nnx_bias(model.linear, 1, 5)
    stats = _randomize_nnx_bn(model.bn, 2)
    return _nnx_case("nnx_linear_bn", model, normal(_rng(3), (2, 6)), stats, 1)


@_register
def case_nnx_conv_transpose_bn() -> JaxCase:
    nnx = _nnx()

    class ConvTransposeBN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.ConvTranspose(4, 6, (3, 3), strides=(2, 2), rngs=rngs)
            self.bn = nnx.BatchNorm(6, epsilon=EPS, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.conv(x))

    model = ConvTransposeBN(nnx.Rngs(0))
    _randomize_nnx_bias(model.conv, 1, 6)
    stats = _randomize_nnx_bn(model.bn, 2)
    x = normal(_rng(3), (2, 5, 5, 4))
    return _nnx_case("nnx_conv_transpose_bn", model, x, stats, 1)


@_register
def case_nnx_resnet_projection() -> JaxCase:
    """A basic block with a strided 1x1 projection shortcut: three conv + BatchNorm pairs."""
    nnx = _nnx()

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(4, 6, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs)
            self.bn1 = nnx.BatchNorm(6, epsilon=EPS, rngs=rngs)
            self.conv2 = nnx.Conv(6, 6, (3, 3), use_bias=False, rngs=rngs)
            self.bn2 = nnx.BatchNorm(6, epsilon=EPS, rngs=rngs)
            self.proj = nnx.Conv(4, 6, (1, 1), strides=(2, 2), use_bias=False, rngs=rngs)
            self.bn_proj = nnx.BatchNorm(6, epsilon=EPS, rngs=rngs)

        def __call__(self, x):
            y = nnx.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return nnx.relu(y + self.bn_proj(self.proj(x)))

    model = Block(nnx.Rngs(0))
    stats = tuple(
        _randomize_nnx_bn(bn, seed) for seed, bn in enumerate((model.bn1, model.bn2, model.bn_proj))
    )
    x = normal(_rng(4), (2, 8, 8, 4))
    model.eval()
    return _jax_case(
        "nnx_resnet_projection", lambda x: model(x), (x,), 3, bn_stats=stats, kept_ops={"add": 1}
    )


# --------------------------------------------------------------------------------------------
# Plain JAX functions: lax convolutions and matmuls, BatchNorms written by hand with jnp (the
# parameters are numpy arrays closed over, so their arithmetic is constant ops in the module)


def _bn_rsqrt(y, stats, axis_shape):
    """``(y - mean) * (scale * rsqrt(var + eps)) + bias``, parameters reshaped to ``axis_shape``."""
    mean, var, scale, bias = (jnp.asarray(a).reshape(axis_shape) for a in stats)
    return (y - mean) * (scale * lax.rsqrt(var + EPS)) + bias


def _bn_sqrt(y, stats, axis_shape):
    """``(y - mean) * (scale / sqrt(var + eps)) + bias``."""
    mean, var, scale, bias = (jnp.asarray(a) for a in stats)
    s = (scale / jnp.sqrt(var + EPS)).reshape(axis_shape)
    return (y - mean.reshape(axis_shape)) * s + bias.reshape(axis_shape)


def _bn_divide(y, stats, axis_shape):
    """``(y - mean) / sqrt(var + eps) * scale + bias``: a per-channel divide, then a multiply."""
    mean, var, scale, bias = (jnp.asarray(a).reshape(axis_shape) for a in stats)
    return (y - mean) / jnp.sqrt(var + EPS) * scale + bias


_NCHW = ("NCHW", "OIHW", "NCHW")


def _conv_bn_case(
    name: str,
    x_shape: tuple,
    w_shape: tuple,
    c: int,
    axis_shape: tuple,
    bn: Callable,
    seed: int,
    conv: Callable,
    bias: bool = True,
    dtype: Any = np.float32,
    folded: int = 1,
    **kw: Any,
) -> JaxCase:
    """``bn(conv(x, w) + b)``: ``conv(x, w)`` a lax convolution, the bias and the BatchNorm's
    parameters of ``c`` channels reshaped to ``axis_shape``."""
    rng = _rng(seed)
    x = normal(rng, x_shape, dtype)
    w = (normal(rng, w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(dtype)
    b = (rng.normal(0.0, 0.7, c)).astype(dtype)
    stats = bn_params(rng, c, dtype)

    def forward(x):
        y = conv(x, w)
        if bias:
            y = y + jnp.asarray(b).reshape(axis_shape)
        return bn(y, stats, axis_shape)

    return _jax_case(name, forward, (x,), folded, bn_stats=(stats,), **kw)


def _nchw_conv(stride: int = 1) -> Callable:
    return lambda x, w: lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=_NCHW
    )


@_register
def case_jax_nchw_rsqrt() -> JaxCase:
    return _conv_bn_case(
        "jax_nchw_rsqrt", (2, 3, 8, 8), (4, 3, 3, 3), 4, (4, 1, 1), _bn_rsqrt, 20, _nchw_conv()
    )


@_register
def case_jax_nchw_sqrt() -> JaxCase:
    return _conv_bn_case(
        "jax_nchw_sqrt",
        (2, 3, 8, 8),
        (5, 3, 3, 3),
        5,
        (5, 1, 1),
        _bn_sqrt,
        21,
        _nchw_conv(stride=2),
        bias=False,
    )


@_register
def case_jax_nchw_divide() -> JaxCase:
    return _conv_bn_case(
        "jax_nchw_divide", (2, 3, 8, 8), (4, 3, 3, 3), 4, (4, 1, 1), _bn_divide, 22, _nchw_conv()
    )


@_register
def case_jax_conv1d_bn() -> JaxCase:
    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NCH", "OIH", "NCH"))

    return _conv_bn_case("jax_conv1d_bn", (2, 3, 16), (6, 3, 3), 6, (6, 1), _bn_rsqrt, 23, conv)


@_register
def case_jax_conv3d_bn() -> JaxCase:
    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )

    # DHWIO: the fan-in scaling of _conv_bn_case divides by 3*3*3*4 instead of 3*3*3*3: fine
    return _conv_bn_case(
        "jax_conv3d_bn", (2, 4, 4, 4, 3), (3, 3, 3, 3, 4), 4, (4,), _bn_sqrt, 24, conv
    )


@_register
def case_jax_conv_transpose_bn() -> JaxCase:
    def conv(x, w):
        return lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    return _conv_bn_case(
        "jax_conv_transpose_bn", (2, 4, 4, 3), (3, 3, 3, 5), 5, (5,), _bn_rsqrt, 25, conv
    )


@_register
def case_jax_conv_transpose_flipped_bn() -> JaxCase:
    """``transpose_kernel=True`` (the gradient of a conv) of a jax array: the convolution's
    weight operand is the constant kernel reversed twice and transposed by ops of the module
    (``stablehlo.reverse``, ``stablehlo.transpose``), a constant expression, not a constant."""

    def conv(x, w):
        w = jnp.asarray(w)  # a numpy kernel would be flipped by numpy, outside the module
        return lax.conv_transpose(
            x, w, (2, 2), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"), transpose_kernel=True
        )

    # OIHW with transpose_kernel: O is the *input* feature dim (3), I the output one (5)
    return _conv_bn_case(
        "jax_conv_transpose_flipped_bn",
        (2, 3, 4, 4),
        (3, 5, 3, 3),
        5,
        (5, 1, 1),
        _bn_divide,
        26,
        conv,
    )


@_register
def case_jax_grouped_conv_transpose_bn() -> JaxCase:
    """A grouped transposed conv as lax writes it: lhs_dilation and feature_group_count=2."""

    def conv(x, w):
        return lax.conv_general_dilated(
            x,
            w,
            (1, 1),
            [(1, 1), (1, 1)],
            lhs_dilation=(2, 2),
            feature_group_count=2,
            dimension_numbers=_NCHW,
        )

    return _conv_bn_case(
        "jax_grouped_conv_transpose_bn",
        (2, 4, 5, 5),
        (6, 2, 3, 3),
        6,
        (6, 1, 1),
        _bn_rsqrt,
        27,
        conv,
    )


@_register
def case_jax_bf16_conv_bn() -> JaxCase:
    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    return _conv_bn_case(
        "jax_bf16_conv_bn",
        (2, 8, 8, 3),
        (3, 3, 3, 6),
        6,
        (6,),
        _bn_rsqrt,
        28,
        conv,
        dtype=ml_dtypes.bfloat16,
        tol=BF16_TOL,
    )


def _matmul_case(
    name: str,
    seed: int,
    forward_of: Callable,
    x_shape: tuple,
    w_shape: tuple,
    c: int,
    folded: int = 1,
    **kw: Any,
) -> JaxCase:
    rng = _rng(seed)
    x = normal(rng, x_shape)
    w = (normal(rng, w_shape) / np.sqrt(6)).astype(np.float32)
    b = rng.normal(0.0, 0.7, c).astype(np.float32)
    stats = bn_params(rng, c)
    return _jax_case(name, forward_of(w, b, stats), (x,), folded, bn_stats=(stats,), **kw)


@_register
def case_jax_matmul_bn() -> JaxCase:
    """``x @ W + b`` on a rank-3 activation, the BatchNorm over the last axis."""

    def forward_of(w, b, stats):
        return lambda x: _bn_rsqrt(x @ w + b, stats, (5,))

    return _matmul_case("jax_matmul_bn", 30, forward_of, (2, 3, 6), (6, 5), 5)


@_register
def case_jax_weight_lhs_bn() -> JaxCase:
    """``W @ x``: the weight is the lhs of dot_general, the result's channels are its axis 0
    (the columns of ``x`` are samples), so the BatchNorm's parameters are ``[:, None]``."""

    def forward_of(w, b, stats):
        return lambda x: _bn_sqrt(w @ x + b[:, None], stats, (5, 1))

    return _matmul_case("jax_weight_lhs_bn", 31, forward_of, (6, 3), (5, 6), 5)


@_register
def case_jax_weight_lhs_wrong_axis() -> JaxCase:
    """``W @ x`` with "BatchNorm" parameters along axis 1 (one per column of ``x``, a sample):
    scaling a column scales the input, not the weight. Not foldable."""

    def forward_of(w, b, stats):
        return lambda x: _bn_rsqrt(w @ x + b[:, None], stats, (1, 3))

    rng = _rng(32)
    w, b = normal(rng, (5, 6)), normal(rng, (5,))
    stats = bn_params(rng, 3)
    x = normal(rng, (6, 3))
    return _jax_case(
        "jax_weight_lhs_wrong_axis",
        forward_of(w, b, stats),
        (x,),
        0,
        bn_stats=(stats,),
        optional_skips=frozenset({"channel-axis", "no-producer"}),
    )


@_register
def case_jax_conv_wrong_axis() -> JaxCase:
    """NCHW conv + per-channel bias, then "BatchNorm" parameters that vary along H (8 rows, 4
    channels): not per output channel, not foldable."""
    rng = _rng(33)
    x, w = normal(rng, (2, 3, 8, 8)), normal(rng, (4, 3, 3, 3)) / 5
    b = normal(rng, (4,))
    stats = bn_params(rng, 8)

    def forward(x):
        y = _nchw_conv()(x, w) + b.reshape(4, 1, 1)
        return _bn_rsqrt(y, stats, (8, 1))

    return _jax_case(
        "jax_conv_wrong_axis",
        forward,
        (x,),
        0,
        bn_stats=(stats,),
        optional_skips=frozenset({"channel-axis", "no-producer"}),
    )


@_register
def case_jax_reciprocal_not_linear() -> JaxCase:
    """``scale / (conv(x) - mean)``: the chain's value is the divisor, which is not linear
    in the conv's output. Nothing may be folded (the ``sub`` alone is a bias: no affine fold
    either; with a bias ``add`` before it, the two would fold into one, which is exact, but
    the reciprocal of values near 0 magnifies its rounding beyond this suite's tolerance)."""
    rng = _rng(34)
    x, w = normal(rng, (2, 3, 8, 8)), normal(rng, (4, 3, 3, 3)) / 5
    mean, _, scale, _ = stats = bn_params(rng, 4)

    def forward(x):
        y = _nchw_conv()(x, w)
        return jnp.asarray(scale).reshape(4, 1, 1) / (y - jnp.asarray(mean).reshape(4, 1, 1))

    return _jax_case(
        "jax_reciprocal_not_linear",
        forward,
        (x,),
        0,
        bn_stats=(stats,),
        optional_skips=frozenset({"channel-axis", "no-producer"}),
    )


@_register
def case_jax_conv_output_returned() -> JaxCase:
    """Conv without bias whose output is both the BatchNorm's input and a model output."""
    rng = _rng(35)
    x, w = normal(rng, (2, 3, 8, 8)), normal(rng, (4, 3, 3, 3)) / 5
    stats = bn_params(rng, 4)

    def forward(x):
        y = _nchw_conv()(x, w)
        return _bn_rsqrt(y, stats, (4, 1, 1)), y

    return _jax_case(
        "jax_conv_output_returned",
        forward,
        (x,),
        0,
        bn_stats=(stats,),
        expect_skipped={"single-consumer": 1},
    )


@_register
def case_jax_conv_output_added() -> JaxCase:
    """``bn(y) + y`` for ``y = conv(x)``: the conv's output has two users."""
    rng = _rng(36)
    x, w = normal(rng, (2, 3, 8, 8)), normal(rng, (4, 3, 3, 3)) / 5
    stats = bn_params(rng, 4)

    def forward(x):
        y = _nchw_conv()(x, w)
        return _bn_rsqrt(y, stats, (4, 1, 1)) + y

    return _jax_case(
        "jax_conv_output_added",
        forward,
        (x,),
        0,
        bn_stats=(stats,),
        expect_skipped={"single-consumer": 1},
    )


# --------------------------------------------------------------------------------------------
# StableHLO text with stablehlo.batch_norm_inference (JAX never emits it; other producers of
# StableHLO do)

_MLIR_TYPES = {np.dtype(np.float32): "f32", np.dtype(ml_dtypes.bfloat16): "bf16"}


def tensor_type(shape: Sequence[int], dtype: Any = np.float32) -> str:
    dims = "".join(f"{d}x" for d in shape)
    return f"tensor<{dims}{_MLIR_TYPES[np.dtype(dtype)]}>"


def dense(arr: np.ndarray) -> str:
    """A ``dense<"0x...">`` literal of ``arr`` with its type (raw little-endian bytes)."""
    arr = np.ascontiguousarray(arr)
    return f'dense<"0x{arr.tobytes().hex().upper()}"> : {tensor_type(arr.shape, arr.dtype)}'


def _constant(name: str, arr: np.ndarray) -> str:
    return f"    %{name} = stablehlo.constant {dense(arr)}"


def _text_module(
    x: np.ndarray, out_shape: tuple, consts: dict[str, np.ndarray], body: list[str], result: str
) -> str:
    lines = [
        "module @bnfold_case {",
        f"  func.func public @main(%arg0: {tensor_type(x.shape)}) -> {tensor_type(out_shape)} {{",
        *(_constant(k, v) for k, v in consts.items()),
        *(f"    {line}" for line in body),
        f"    return %{result} : {tensor_type(out_shape)}",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _bni(operand: str, shape: tuple, c: int, feature_index: int, out: str) -> str:
    t, p = tensor_type(shape), tensor_type((c,))
    return (
        f'%{out} = "stablehlo.batch_norm_inference"(%{operand}, %scale, %offset, %mean, %var) '
        f"{{epsilon = {EPS:e} : f32, feature_index = {feature_index} : i64}} : "
        f"({t}, {p}, {p}, {p}, {p}) -> {t}"
    )


def _bn_consts(stats: tuple) -> dict[str, np.ndarray]:
    mean, var, scale, bias = stats
    return {"scale": scale, "offset": bias, "mean": mean, "var": var}


def _text_case(
    name: str,
    x: np.ndarray,
    out_shape: tuple,
    consts: dict,
    body: list,
    result: str,
    stats: tuple,
    folded: int,
    **kw: Any,
) -> JaxCase:
    text = _text_module(x, out_shape, consts, body, result)
    return JaxCase(
        name=name,
        text=text,
        inputs=(x,),
        fresh=_fresh_like((x,)),
        expect_folded=folded,
        bn_stats=(stats,),
        **kw,
    )


def _conv_op(x_shape, w_shape, out_shape, dims: str, window: str, out: str = "0") -> str:
    return (
        f"%{out} = stablehlo.convolution(%arg0, %w) dim_numbers = {dims}, window = {{{window}}} "
        "{batch_group_count = 1 : i64, feature_group_count = 1 : i64} : "
        f"({tensor_type(x_shape)}, {tensor_type(w_shape)}) -> {tensor_type(out_shape)}"
    )


_NHWC_DIMS = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"
_NCHW_DIMS = "[b, f, 0, 1]x[o, i, 0, 1]->[b, f, 0, 1]"


def _nhwc_text(
    name: str,
    seed: int,
    feature_index: int,
    bn_c: int,
    bad_var: bool = False,
    bias: bool = True,
    **kw: Any,
) -> JaxCase:
    """NHWC conv 3 -> 4 channels (3x3, pad 1, on 2x6x6) + bias (unless not ``bias``), then
    batch_norm_inference of ``bn_c`` channels along ``feature_index``."""
    rng = _rng(seed)
    x = normal(rng, (2, 6, 6, 3))
    w = normal(rng, (3, 3, 3, 4)) / 5
    b = normal(rng, (4,))
    stats = bn_params(rng, bn_c)
    if bad_var:
        stats[1][1] = -0.5  # var + eps < 0: rsqrt is NaN, the fold would write NaN weights
    out = (2, 6, 6, 4)
    body = [_conv_op(x.shape, w.shape, out, _NHWC_DIMS, "pad = [[1, 1], [1, 1]]")]
    consts = {"w": w}
    if bias:
        consts["b"] = b
        body += [
            f"%1 = stablehlo.broadcast_in_dim %b, dims = [3] : ({tensor_type((4,))}) -> "
            f"{tensor_type(out)}",
            f"%2 = stablehlo.add %0, %1 : {tensor_type(out)}",
        ]
    body.append(_bni("2" if bias else "0", out, bn_c, feature_index, "3"))
    return _text_case(name, x, out, {**consts, **_bn_consts(stats)}, body, "3", stats, **kw)


@_register
def case_text_nhwc_bni() -> JaxCase:
    return _nhwc_text("text_nhwc_bni", 40, 3, 4, folded=1)


@_register
def case_text_nhwc_bni_wrong_axis() -> JaxCase:
    """batch_norm_inference along H (feature_index=1, 6 rows) of an NHWC conv's output."""
    return _nhwc_text(
        "text_nhwc_bni_wrong_axis", 41, 1, 6, folded=0, expect_skipped={"channel-axis": 1}
    )


@_register
def case_text_nhwc_bni_wrong_axis_nobias() -> JaxCase:
    """The same without the conv's bias: the batch_norm_inference reads the conv directly."""
    return _nhwc_text(
        "text_nhwc_bni_wrong_axis_nobias",
        46,
        1,
        6,
        bias=False,
        folded=0,
        expect_skipped={"channel-axis": 1},
    )


@_register
def case_text_nhwc_bni_negative_var() -> JaxCase:
    """A variance below -epsilon: the BatchNorm's output is NaN in that channel; a fold would
    make NaN weights that spread NaN to every channel of the next layer. Kept."""
    return _nhwc_text(
        "text_nhwc_bni_negative_var",
        42,
        3,
        4,
        bad_var=True,
        folded=0,
        expect_skipped={"valid-values": 1},
    )


@_register
def case_text_nchw_bni() -> JaxCase:
    """NCHW/OIHW conv with stride 2, no bias, then batch_norm_inference(feature_index=1)."""
    rng = _rng(43)
    x = normal(rng, (2, 3, 8, 8))
    w = normal(rng, (5, 3, 3, 3)) / 5
    stats = bn_params(rng, 5)
    out = (2, 5, 4, 4)
    body = [
        _conv_op(x.shape, w.shape, out, _NCHW_DIMS, "stride = [2, 2], pad = [[1, 1], [1, 1]]"),
        _bni("0", out, 5, 1, "1"),
    ]
    consts = {"w": w, **_bn_consts(stats)}
    return _text_case("text_nchw_bni", x, out, consts, body, "1", stats, 1)


@_register
def case_text_dot_bni() -> JaxCase:
    """dot_general(x, W) + bias, then batch_norm_inference(feature_index=1)."""
    rng = _rng(44)
    x = normal(rng, (2, 6))
    w = normal(rng, (6, 5)) / 3
    b = normal(rng, (5,))
    stats = bn_params(rng, 5)
    out = (2, 5)
    body = [
        f"%0 = stablehlo.dot_general %arg0, %w, contracting_dims = [1] x [0] : "
        f"({tensor_type(x.shape)}, {tensor_type(w.shape)}) -> {tensor_type(out)}",
        f"%1 = stablehlo.broadcast_in_dim %b, dims = [1] : ({tensor_type((5,))}) -> "
        f"{tensor_type(out)}",
        f"%2 = stablehlo.add %0, %1 : {tensor_type(out)}",
        _bni("2", out, 5, 1, "3"),
    ]
    consts = {"w": w, "b": b, **_bn_consts(stats)}
    return _text_case("text_dot_bni", x, out, consts, body, "3", stats, 1)


@_register
def case_text_weight_lhs_dot_bni() -> JaxCase:
    """dot_general(W, x): the weight is the lhs, the result's channels are axis 0, and the
    batch_norm_inference has feature_index=0."""
    rng = _rng(45)
    x = normal(rng, (6, 3))
    w = normal(rng, (5, 6)) / 3
    stats = bn_params(rng, 5)
    out = (5, 3)
    body = [
        f"%0 = stablehlo.dot_general %w, %arg0, contracting_dims = [1] x [0] : "
        f"({tensor_type(w.shape)}, {tensor_type(x.shape)}) -> {tensor_type(out)}",
        _bni("0", out, 5, 0, "1"),
    ]
    consts = {"w": w, **_bn_consts(stats)}
    return _text_case("text_weight_lhs_dot_bni", x, out, consts, body, "1", stats, 1)


# --------------------------------------------------------------------------------------------
# A float64 reference for the simplest case, folded by hand


def linen_conv_bn_reference(x: np.ndarray, fold_error: str = "") -> np.ndarray:
    """The output of ``linen_conv_bn`` on ``x``, computed by folding its BatchNorm into the conv
    by hand in float64 and running the folded conv in float64 (numpy). ``fold_error`` makes the
    fold wrong the way a folding bug would: ``"no-eps"`` forgets epsilon, ``"no-mean"`` the
    mean, ``"input-scale"`` scales the input channels, ``"bias-unscaled"`` does not scale the
    conv's own bias."""
    c = case("linen_conv_bn")
    conv = c.variables["params"]["Conv_0"]
    kernel, bias = (np.asarray(conv[k], np.float64) for k in ("kernel", "bias"))
    ((mean, var, scale, beta),) = c.bn_stats
    mean, var, scale, beta = (a.astype(np.float64) for a in (mean, var, scale, beta))
    s = scale / np.sqrt(var + (0.0 if fold_error == "no-eps" else EPS))
    new_kernel = kernel * s  # HWIO: the output channel is the last axis
    if fold_error == "input-scale":
        new_kernel = kernel * s[: kernel.shape[2], None]
    mu = 0.0 if fold_error == "no-mean" else mean
    new_bias = (bias - mu) * s + beta if fold_error != "bias-unscaled" else bias - mu * s + beta
    return _conv_nhwc_same_f64(x.astype(np.float64), new_kernel) + new_bias


def _conv_nhwc_same_f64(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """A stride-1 'SAME' NHWC/HWIO convolution (cross-correlation) in float64 numpy."""
    kh, kw = k.shape[:2]
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros((n, h, w, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwi,io->nhwo", xp[:, i : i + h, j : j + w], k[i, j])
    return out
