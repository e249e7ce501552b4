"""Regression tests from the adversarial review of the StableHLO frontend.

Each test is one finding: a module written to make a fold wrong (integer arithmetic, float16
and float32 rounding, overflow and underflow in constant expressions, transposing broadcasts,
saturating converts, complex and ``dense_resource`` constants, narrow weights with wide
results, refined result types, gating products, calls and regions) and the behaviour that is
correct for it: a fold whose outputs agree with the original's, or the BatchNorm kept under the
rule that explains why, with the original's outputs unchanged. A handful of the review's passing
checks (convolution dimension numbers, the dot_general weight on either side, window reversal)
are kept as positive tests.

The modules are small hand-written StableHLO (a few are exported from JAX); each is folded once
and run by XLA on the CPU before and after.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
ml_dtypes = pytest.importorskip("ml_dtypes")

import bnfold  # noqa: E402
from bnfold.core.report import FoldEntry  # noqa: E402
from bnfold.stablehlo.run import run_text  # noqa: E402

VALID = "valid-values"
F32_RTOL = 1e-5
F16_RTOL = 4 * 2**-10  # four float16 ulps: a fold rounds the scaled float16 weight

# --------------------------------------------------------------------------------------------
# Helpers

DTYPES = {
    "bf16": ml_dtypes.bfloat16,
    "f8E4M3FN": ml_dtypes.float8_e4m3fn,
    "f8E5M2": ml_dtypes.float8_e5m2,
}


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _hex(a: np.ndarray) -> str:
    """A float32 array as a hex ``dense`` literal (raw little-endian bytes)."""
    return '"0x' + np.ascontiguousarray(a, dtype="<f4").tobytes().hex().upper() + '"'


def printed(text: str) -> str:
    """``text`` parsed and printed back (no locations), as a folded module is printed."""
    from jax.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir

    with jax_mlir.make_ir_context():
        return ir.Module.parse(text).operation.get_asm(enable_debug_info=False)


@functools.cache
def fold_and_run(text: str, inputs_key: str = "x") -> tuple:
    """``(folded text, report, original outputs, folded outputs)``, once per module. A folded
    module that prints as the original does (nothing changed) is not compiled again."""
    inputs = INPUTS[inputs_key]
    folded, report = bnfold.fold(text, return_report=True)
    assert isinstance(folded, str)
    original = run_text(text, inputs)
    if folded == printed(text):
        return folded, report, original, original
    return folded, report, original, run_text(folded, inputs)


def assert_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    """The same outputs, value for value (NaN where NaN, the same infinities)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(_f64(x), _f64(y), equal_nan=True), (x, y)


def assert_close(a: list[np.ndarray], b: list[np.ndarray], rtol: float = F32_RTOL) -> None:
    """``max|b - a| <= rtol * max(1, max|a|)``, non-finite values where the original has them."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        x64, y64 = _f64(x), _f64(y)
        finite = np.isfinite(x64)
        assert np.array_equal(finite, np.isfinite(y64)), (x, y)
        assert np.array_equal(x64[~finite], y64[~finite], equal_nan=True)
        if finite.any():
            scale = max(1.0, float(np.abs(x64[finite]).max()))
            err = float(np.abs(x64[finite] - y64[finite]).max())
            assert err <= rtol * scale, f"max error {err} > {rtol} * {scale}"


def only_entry(report: bnfold.FoldReport) -> FoldEntry:
    assert len(report.entries) == 1, str(report)
    return report.entries[0]


def assert_kept(report: bnfold.FoldReport, rule: str, *words: str) -> None:
    entry = only_entry(report)
    assert not entry.folded, str(report)
    assert entry.rule == rule, str(report)
    for word in words:
        assert word in entry.reason, f"{word!r} not in {entry.reason!r}"


def assert_folded(report: bnfold.FoldReport, folded: str, *gone: str) -> None:
    entry = only_entry(report)
    assert entry.folded, str(report)
    for op in gone:
        assert op not in folded, f"{op} left in the folded module:\n{folded}"


# A 1x1 convolution over NCHW 1x2x4x4 with a weight that mixes both input channels.
W2 = "[[[[1.0]], [[0.5]]], [[[2.0]], [[-1.0]]]]"
X = np.random.default_rng(0).normal(size=(1, 2, 4, 4)).astype(np.float32)
INPUTS: dict[str, list[np.ndarray]] = {
    "x": [X],
    "x16": [X.astype(np.float16)],
}


def conv2(body: str, *, t: str = "f32", weight: str = W2, inp: str | None = None) -> str:
    """``%y = conv(%x, %w)`` followed by ``body``, which ends in ``%z`` of ``%y``'s shape; the
    input and weight are ``inp`` (``t`` unless given), the conv's result ``t``."""
    inp = inp or t
    return f"""
func.func @main(%x: tensor<1x2x4x4x{inp}>) -> tensor<1x2x4x4x{t}> {{
  %w = stablehlo.constant dense<{weight}> : tensor<2x2x1x1x{inp}>
  %y = stablehlo.convolution(%x, %w) dim_numbers = [b, f, 0, 1]x[o, i, 0, 1]->[b, f, 0, 1], \
window = {{}} {{batch_group_count = 1 : i64, feature_group_count = 1 : i64}} : \
(tensor<1x2x4x4x{inp}>, tensor<2x2x1x1x{inp}>) -> tensor<1x2x4x4x{t}>
{body}
  return %z : tensor<1x2x4x4x{t}>
}}
"""


def scaled(
    scale: str, *, t: str = "f32", shift: str = "[0.25, -1.5]", inp: str | None = None
) -> str:
    """``conv2`` times the per-channel vector ``%s`` that ``scale`` computes, plus ``shift``."""
    return conv2(
        f"""{scale}
  %sb = stablehlo.broadcast_in_dim %s, dims = [1] : (tensor<2x{t}>) -> tensor<1x2x4x4x{t}>
  %m = stablehlo.multiply %y, %sb : tensor<1x2x4x4x{t}>
  %c = stablehlo.constant dense<{shift}> : tensor<2x{t}>
  %cb = stablehlo.broadcast_in_dim %c, dims = [1] : (tensor<2x{t}>) -> tensor<1x2x4x4x{t}>
  %z = stablehlo.add %m, %cb : tensor<1x2x4x4x{t}>""",
        t=t,
        inp=inp,
    )


def conv2_reference(x: np.ndarray, scale: list[float], shift: list[float]) -> np.ndarray:
    """What ``scaled`` computes, in float64."""
    w = np.array([[1.0, 0.5], [2.0, -1.0]])
    y = np.einsum("oi,nihw->nohw", w, _f64(x))
    return y * np.array(scale)[:, None, None] + np.array(shift)[:, None, None]


# --------------------------------------------------------------------------------------------
# Integer arithmetic in constant expressions (t01, t02, t03)


def test_integer_divide_is_kept():
    text = scaled(
        """  %a = stablehlo.constant dense<[7, -9]> : tensor<2xi32>
  %b = stablehlo.constant dense<2> : tensor<2xi32>
  %q = stablehlo.divide %a, %b : tensor<2xi32>
  %s = stablehlo.convert %q : (tensor<2xi32>) -> tensor<2xf32>"""
    )
    folded, report, a, b = fold_and_run(text)
    assert_kept(report, VALID, "integer stablehlo.divide")
    assert_identical(a, b)
    # the graph truncates (3, -4): a float divide (3.5, -4.5) would be a wrong fold
    np.testing.assert_allclose(a[0], conv2_reference(X, [3, -4], [0.25, -1.5]), rtol=1e-6)


def test_integer_divide_from_jax_is_kept():
    rng = np.random.default_rng(0)
    k = jax.numpy.asarray(rng.normal(size=(3, 3, 4, 8)).astype(np.float32))
    counts = jax.numpy.asarray(np.arange(1, 9, dtype=np.int32) * 3)

    def f(x):
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y * jax.lax.div(counts, np.int32(2)).astype(np.float32)

    x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    exported = jax.export.export(jax.jit(f))(x)
    assert "stablehlo.divide" in exported.mlir_module()
    folded, report = bnfold.fold(exported, return_report=True)
    assert_kept(report, VALID, "integer stablehlo.divide")
    assert_identical([np.asarray(exported.call(x))], [np.asarray(folded.call(x))])


def test_integer_power_with_negative_exponent_is_kept():
    text = scaled(
        """  %a = stablehlo.constant dense<[3, 2]> : tensor<2xi32>
  %b = stablehlo.constant dense<[2, -1]> : tensor<2xi32>
  %q = stablehlo.power %a, %b : tensor<2xi32>
  %s = stablehlo.convert %q : (tensor<2xi32>) -> tensor<2xf32>"""
    )
    folded, report, a, b = fold_and_run(text)
    assert_kept(report, VALID, "integer stablehlo.power")
    assert_identical(a, b)


# --------------------------------------------------------------------------------------------
# Constant expressions evaluated as the graph computes them (t04, t05, t06, t14, t08, t10)


def test_deep_constant_expression_folds():
    depth = 3000
    assert depth > sys.getrecursionlimit()
    lines = [
        "  %c0 = stablehlo.constant dense<[1.5, -2.0]> : tensor<2xf32>",
        "  %step = stablehlo.constant dense<[0.25, -0.1]> : tensor<2xf32>",
    ]
    lines += [f"  %c{i + 1} = stablehlo.add %c{i}, %step : tensor<2xf32>" for i in range(depth)]
    lines.append(f"  %s = stablehlo.add %c{depth}, %c0 : tensor<2xf32>")
    text = scaled("\n".join(lines))
    folded, report, a, b = fold_and_run(text)
    assert_folded(report, folded, "stablehlo.multiply")
    assert folded.count("stablehlo.add") == 1  # the composed shift
    assert_close(a, b)
    # the sum is rounded to float32 at every step, as the graph does it (-0.1 is not exact)
    ch1 = np.float32(-2.0)
    for _ in range(depth):
        ch1 = np.float32(ch1 + np.float32(-0.1))
    scale = [751.5 + 1.5, float(ch1) - 2.0]
    np.testing.assert_allclose(a[0], conv2_reference(X, scale, [0.25, -1.5]), rtol=1e-5)


UNDERFLOW = """  %a = stablehlo.constant dense<[1.0e-30, 1.5e-15]> : tensor<2xf32>
  %big = stablehlo.constant dense<[1.0e30, 1.0e15]> : tensor<2xf32>
  %p = stablehlo.multiply %a, %a : tensor<2xf32>
  %q = stablehlo.multiply %p, %big : tensor<2xf32>
  %s = stablehlo.multiply %q, %big : tensor<2xf32>"""

# (1 + 1e-8) - 1 is 0 in float32: channel 0's scale is 3 in the graph (4 in float64)
ROUNDING = """  %one = stablehlo.constant dense<1.0> : tensor<2xf32>
  %tiny = stablehlo.constant dense<[1.0e-8, 0.5]> : tensor<2xf32>
  %k = stablehlo.constant dense<[1.0e8, 4.0]> : tensor<2xf32>
  %o = stablehlo.constant dense<[3.0, 2.0]> : tensor<2xf32>
  %p = stablehlo.add %one, %tiny : tensor<2xf32>
  %q = stablehlo.subtract %p, %one : tensor<2xf32>
  %r = stablehlo.multiply %q, %k : tensor<2xf32>
  %s = stablehlo.add %r, %o : tensor<2xf32>"""


@pytest.mark.parametrize(
    "scale, expect",
    [(UNDERFLOW, [0.0, 2.25]), (ROUNDING, [3.0, 4.0])],
    ids=["underflow", "rounding"],
)
def test_float32_constant_expression_folds_as_the_graph_computes_it(scale, expect):
    text = scaled(scale, shift="[0.0, -1.5]")
    folded, report, a, b = fold_and_run(text)
    assert_folded(report, folded, "stablehlo.multiply")
    assert_close(a, b)
    np.testing.assert_allclose(a[0], conv2_reference(X, expect, [0.0, -1.5]), rtol=1e-5)
    if expect[0] == 0.0:  # zeros stay zeros
        assert not a[0][:, 0].any() and not b[0][:, 0].any()


def bni_f16(eps: str) -> str:
    return conv2(
        f"""  %scale = stablehlo.constant dense<[0.75, 1.25]> : tensor<2xf16>
  %offset = stablehlo.constant dense<[0.5, 0.25]> : tensor<2xf16>
  %mean = stablehlo.constant dense<[0.125, -0.1]> : tensor<2xf16>
  %var = stablehlo.constant dense<[0.0, 1.5]> : tensor<2xf16>
  %z = "stablehlo.batch_norm_inference"(%y, %scale, %offset, %mean, %var) \
{{epsilon = {eps} : f32, feature_index = 1 : i64}} : (tensor<1x2x4x4xf16>, tensor<2xf16>, \
tensor<2xf16>, tensor<2xf16>, tensor<2xf16>) -> tensor<1x2x4x4xf16>""",
        t="f16",
    )


def test_float16_batch_norm_inference_eps_below_resolution_is_kept():
    # var = 0 and eps = 1e-8, which is 0 in float16: XLA computes rsqrt(0) for channel 0
    folded, report, a, b = fold_and_run(bni_f16("1.0e-8"), "x16")
    assert_kept(report, VALID, "channel 0", "own precision")
    assert_identical(a, b)
    assert not np.isfinite(_f64(a[0][:, 0])).any()


def test_float16_batch_norm_inference_with_representable_eps_folds():
    folded, report, a, b = fold_and_run(bni_f16("1.0e-3"), "x16")
    assert_folded(report, folded, "batch_norm_inference")
    assert np.isfinite(_f64(a[0])).all()
    assert_close(a, b, rtol=F16_RTOL)


def chain_f16(gamma: str) -> str:
    """A flax-style BatchNorm in float16: ``(y - mean) * (rsqrt(var + eps) * gamma) + beta``."""
    return conv2(
        f"""  %mean = stablehlo.constant dense<[0.3, -0.2]> : tensor<2xf16>
  %var = stablehlo.constant dense<[0.0, 1.5]> : tensor<2xf16>
  %eps = stablehlo.constant dense<1.0e-5> : tensor<2xf16>
  %g = stablehlo.constant dense<{gamma}> : tensor<2xf16>
  %beta = stablehlo.constant dense<[0.5, 1.0]> : tensor<2xf16>
  %ve = stablehlo.add %var, %eps : tensor<2xf16>
  %r = stablehlo.rsqrt %ve : tensor<2xf16>
  %mul = stablehlo.multiply %r, %g : tensor<2xf16>
  %mb = stablehlo.broadcast_in_dim %mean, dims = [1] : (tensor<2xf16>) -> tensor<1x2x4x4xf16>
  %d = stablehlo.subtract %y, %mb : tensor<1x2x4x4xf16>
  %kb = stablehlo.broadcast_in_dim %mul, dims = [1] : (tensor<2xf16>) -> tensor<1x2x4x4xf16>
  %e = stablehlo.multiply %d, %kb : tensor<1x2x4x4xf16>
  %bb = stablehlo.broadcast_in_dim %beta, dims = [1] : (tensor<2xf16>) -> tensor<1x2x4x4xf16>
  %z = stablehlo.add %e, %bb : tensor<1x2x4x4xf16>""",
        t="f16",
        # small weights: the float64 scale (79057) times them would fit float16
        weight="[[[[0.01]], [[0.02]]], [[[-0.015]], [[0.03]]]]",
    )


def test_float16_chain_constant_overflowing_to_inf_is_kept():
    # rsqrt(1e-5) * 250 = 79057 > 65504: inf in float16, so channel 0 is inf in the graph
    folded, report, a, b = fold_and_run(chain_f16("[250.0, -0.75]"), "x16")
    assert_kept(report, VALID, "not finite")
    assert_identical(a, b)
    assert np.isinf(_f64(a[0][:, 0])).all()


def test_float16_chain_constant_in_range_folds():
    folded, report, a, b = fold_and_run(chain_f16("[100.0, -0.75]"), "x16")
    assert_folded(report, folded, "stablehlo.rsqrt", "stablehlo.subtract")
    assert np.isfinite(_f64(a[0])).all()
    assert_close(a, b, rtol=F16_RTOL)


def convert_scale(values: str) -> str:
    return scaled(
        f"""  %a = stablehlo.constant dense<{values}> : tensor<2xf32>
  %i = stablehlo.convert %a : (tensor<2xf32>) -> tensor<2xi8>
  %s = stablehlo.convert %i : (tensor<2xi8>) -> tensor<2xf32>"""
    )


def test_float_to_int_convert_out_of_range_is_kept():
    folded, report, a, b = fold_and_run(convert_scale("[300.0, -2.5]"))
    assert_kept(report, VALID, "out of the integer's range")
    assert_identical(a, b)


def test_float_to_int_convert_in_range_folds():
    folded, report, a, b = fold_and_run(convert_scale("[100.75, -2.5]"))
    assert_folded(report, folded, "stablehlo.multiply", "stablehlo.convert")
    assert_close(a, b)
    # truncated toward zero, as XLA converts
    np.testing.assert_allclose(a[0], conv2_reference(X, [100, -2], [0.25, -1.5]), rtol=1e-6)


@pytest.mark.parametrize("op", ["convert", "real"])
def test_complex_constant_is_kept(op):
    text = scaled(
        f"""  %a = stablehlo.constant dense<[(1.5, 0.0), (-2.0, 1.0)]> : tensor<2xcomplex<f32>>
  %s = stablehlo.{op} %a : (tensor<2xcomplex<f32>>) -> tensor<2xf32>"""
    )
    folded, report, a, b = fold_and_run(text)
    assert not report.folded, str(report)
    if op == "convert":
        assert_kept(report, VALID, "complex<f32>")
    assert_identical(a, b)
    np.testing.assert_allclose(a[0], conv2_reference(X, [1.5, -2.0], [0.25, -1.5]), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# broadcast_in_dim with non-increasing dimensions: a transpose (t07, t18)

DOT_TRANSPOSED_WEIGHT = """
func.func @main(%x: tensor<2x4xf32>) -> tensor<2x3xf32> {
  %w0 = stablehlo.constant dense<[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], \
[9.0, 10.0, 11.0, 12.0]]> : tensor<3x4xf32>
  %w = stablehlo.broadcast_in_dim %w0, dims = [1, 0] : (tensor<3x4xf32>) -> tensor<4x3xf32>
  %y = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0] : \
(tensor<2x4xf32>, tensor<4x3xf32>) -> tensor<2x3xf32>
  %c = stablehlo.constant dense<[2.0, -3.0, 0.7]> : tensor<3xf32>
  %s = stablehlo.broadcast_in_dim %c, dims = [1] : (tensor<3xf32>) -> tensor<2x3xf32>
  %z = stablehlo.multiply %y, %s : tensor<2x3xf32>
  return %z : tensor<2x3xf32>
}
"""

# the weight is a 2x4 constant spread transposed to O=4, I=2
CONV_TRANSPOSED_WEIGHT = """
func.func @main(%x: tensor<1x2x4x4xf32>) -> tensor<1x4x4x4xf32> {
  %w0 = stablehlo.constant dense<[[[[1.0]], [[0.5]], [[-0.1]], [[0.3]]], \
[[[2.0]], [[-1.0]], [[0.2]], [[0.4]]]]> : tensor<2x4x1x1xf32>
  %w = stablehlo.broadcast_in_dim %w0, dims = [1, 0, 2, 3] : \
(tensor<2x4x1x1xf32>) -> tensor<4x2x1x1xf32>
  %y = stablehlo.convolution(%x, %w) dim_numbers = [b, f, 0, 1]x[o, i, 0, 1]->[b, f, 0, 1], \
window = {} {batch_group_count = 1 : i64, feature_group_count = 1 : i64} : \
(tensor<1x2x4x4xf32>, tensor<4x2x1x1xf32>) -> tensor<1x4x4x4xf32>
  %c = stablehlo.constant dense<[2.0, -1.0, 0.5, 3.0]> : tensor<4xf32>
  %s = stablehlo.broadcast_in_dim %c, dims = [1] : (tensor<4xf32>) -> tensor<1x4x4x4xf32>
  %z0 = stablehlo.multiply %y, %s : tensor<1x4x4x4xf32>
  %z = stablehlo.add %z0, %s : tensor<1x4x4x4xf32>
  return %z : tensor<1x4x4x4xf32>
}
"""

# N == C == H == W == 4: an axis mix-up gives wrong numbers, not a shape error
SQUARE_HEAD = """
func.func @main(%x: tensor<4x4x4x4xf32>) -> tensor<4x4x4x4xf32> {
  %w = stablehlo.constant dense<[[[[1.0]], [[0.5]], [[0.1]], [[0.3]]], [[[2.0]], [[-1.0]], \
[[0.2]], [[0.4]]], [[[1.0]], [[0.5]], [[0.1]], [[0.7]]], [[[-2.0]], [[-1.0]], [[0.2]], \
[[0.9]]]]> : tensor<4x4x1x1xf32>
  %y = stablehlo.convolution(%x, %w) dim_numbers = [b, f, 0, 1]x[o, i, 0, 1]->[b, f, 0, 1], \
window = {} {batch_group_count = 1 : i64, feature_group_count = 1 : i64} : \
(tensor<4x4x4x4xf32>, tensor<4x4x1x1xf32>) -> tensor<4x4x4x4xf32>
  %c2 = stablehlo.constant dense<[[2.0, -1.0, 0.5, 3.0]]> : tensor<1x4xf32>
  %c41 = stablehlo.constant dense<[[2.0], [-1.0], [0.5], [3.0]]> : tensor<4x1xf32>
"""
SQUARE_TAIL = """
  %z = stablehlo.multiply %y, %s : tensor<4x4x4x4xf32>
  return %z : tensor<4x4x4x4xf32>
}
"""
SQUARE_OPERANDS = {
    # 4x1 spread with dims [1, 0]: its 4 values along axis 1, the channels
    "4x1-dims-1-0": (
        "%s = stablehlo.broadcast_in_dim %c41, dims = [1, 0] : "
        "(tensor<4x1xf32>) -> tensor<4x4x4x4xf32>",
        True,
    ),
    # 1x4 spread with dims [1, 0]: its 4 values along axis 0, the batch
    "1x4-dims-1-0": (
        "%s = stablehlo.broadcast_in_dim %c2, dims = [1, 0] : "
        "(tensor<1x4xf32>) -> tensor<4x4x4x4xf32>",
        False,
    ),
    # the same transposing spread under an add, evaluated as a constant
    "4x1-dims-1-0-evaluated": (
        "%t = stablehlo.broadcast_in_dim %c41, dims = [1, 0] : "
        "(tensor<4x1xf32>) -> tensor<4x4x4x4xf32>\n"
        "  %zero = stablehlo.constant dense<0.0> : tensor<4x4x4x4xf32>\n"
        "  %s = stablehlo.add %t, %zero : tensor<4x4x4x4xf32>",
        True,
    ),
    # a 4x4 matrix spread over axes 2 and 1: varies along the height too
    "4x4-dims-2-1-evaluated": (
        "%m = stablehlo.constant dense<[[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], "
        "[3.0, 3.0, 3.0, 3.0], [4.0, 4.0, 4.0, 4.0]]> : tensor<4x4xf32>\n"
        "  %t = stablehlo.broadcast_in_dim %m, dims = [2, 1] : "
        "(tensor<4x4xf32>) -> tensor<4x4x4x4xf32>\n"
        "  %zero = stablehlo.constant dense<0.0> : tensor<4x4x4x4xf32>\n"
        "  %s = stablehlo.add %t, %zero : tensor<4x4x4x4xf32>",
        False,
    ),
}
X_SQUARE = np.random.default_rng(1).normal(size=(4, 4, 4, 4)).astype(np.float32)
INPUTS["x_square"] = [X_SQUARE]
INPUTS["x_dot"] = [np.random.default_rng(2).normal(size=(2, 4)).astype(np.float32)]


@pytest.mark.parametrize(
    "text, inputs",
    [(DOT_TRANSPOSED_WEIGHT, "x_dot"), (CONV_TRANSPOSED_WEIGHT, "x")],
    ids=["dot_general", "convolution"],
)
def test_transposing_broadcast_in_the_weight_folds_exactly(text, inputs):
    folded, report, a, b = fold_and_run(text, inputs)
    assert_folded(report, folded, "stablehlo.multiply")
    assert_close(a, b)


@pytest.mark.parametrize("name", list(SQUARE_OPERANDS))
def test_transposing_broadcast_in_a_chain_operand(name):
    body, folds = SQUARE_OPERANDS[name]
    folded, report, a, b = fold_and_run(SQUARE_HEAD + "  " + body + SQUARE_TAIL, "x_square")
    if folds:
        assert_folded(report, folded, "stablehlo.multiply")
        assert_close(a, b)
    else:
        assert_kept(report, "channel-axis", "axis 1")
        assert_identical(a, b)


# --------------------------------------------------------------------------------------------
# A weight narrower than the result it computes (t13, t20, t21)


def narrow_dot(wt: str, ot: str, scale: str = "[0.37, -1.9, 2.3]") -> str:
    return f"""
func.func @main(%x: tensor<2x4x{wt}>) -> tensor<2x3x{ot}> {{
  %w = stablehlo.constant dense<[[1.0, 0.5, -2.0], [0.25, 1.5, 3.0], [-1.0, 2.0, 0.5], \
[0.75, -0.5, 1.0]]> : tensor<4x3x{wt}>
  %y = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0] : \
(tensor<2x4x{wt}>, tensor<4x3x{wt}>) -> tensor<2x3x{ot}>
  %c = stablehlo.constant dense<{scale}> : tensor<3x{ot}>
  %s = stablehlo.broadcast_in_dim %c, dims = [1] : (tensor<3x{ot}>) -> tensor<2x3x{ot}>
  %z = stablehlo.multiply %y, %s : tensor<2x3x{ot}>
  return %z : tensor<2x3x{ot}>
}}
"""


X_DOT = np.random.default_rng(3).normal(size=(2, 4))
for _name in ("bf16", "f8E4M3FN", "f8E5M2"):
    INPUTS["dot_" + _name] = [X_DOT.astype(DTYPES[_name])]
INPUTS["x_bf16"] = [X.astype(ml_dtypes.bfloat16)]


@pytest.mark.parametrize(
    "text, inputs, weight_dtype",
    [
        (narrow_dot("bf16", "f32"), "dot_bf16", "bfloat16"),
        (narrow_dot("f8E4M3FN", "f32"), "dot_f8E4M3FN", "float8_e4m3fn"),
        (narrow_dot("f8E5M2", "f32"), "dot_f8E5M2", "float8_e5m2"),
        (
            scaled("  %s = stablehlo.constant dense<[0.37, -1.9]> : tensor<2xf32>", inp="bf16"),
            "x_bf16",
            "bfloat16",
        ),
    ],
    ids=["dot-bf16", "dot-f8e4m3fn", "dot-f8e5m2", "conv-bf16"],
)
def test_narrow_weight_with_float32_result_is_kept(text, inputs, weight_dtype):
    folded, report, a, b = fold_and_run(text, inputs)
    assert_kept(report, VALID, weight_dtype, "float32")
    assert_identical(a, b)


def test_narrow_weight_with_its_own_result_type_folds():
    # a bfloat16 weight computing in bfloat16: the fold rounds where the graph rounds
    folded, report, a, b = fold_and_run(narrow_dot("bf16", "bf16", "[0.5, -2.0, 4.0]"), "dot_bf16")
    assert_folded(report, folded, "stablehlo.multiply")
    assert_identical(a, b)  # power-of-two scales: exact


# --------------------------------------------------------------------------------------------
# Refined result types (t19)


def refined(shift: bool, dynamic: str) -> str:
    """The conv's result (``dynamic="conv"``) or the chain's (``"chain"``) has a dynamic batch."""
    conv_t = "tensor<?x2x4x4xf32>" if dynamic == "conv" else "tensor<1x2x4x4xf32>"
    chain_t = "tensor<?x2x4x4xf32>" if dynamic == "chain" else "tensor<1x2x4x4xf32>"
    tail = f"  return %z : {chain_t}"
    if shift:
        tail = f"""  %b = stablehlo.constant dense<[1.0, 2.0]> : tensor<2xf32>
  %bb = stablehlo.broadcast_in_dim %b, dims = [1] : (tensor<2xf32>) -> tensor<1x2x4x4xf32>
  %z2 = stablehlo.add %z, %bb : ({chain_t}, tensor<1x2x4x4xf32>) -> {chain_t}
  return %z2 : {chain_t}"""
    return f"""
func.func @main(%x: tensor<1x2x4x4xf32>) -> {chain_t} {{
  %w = stablehlo.constant dense<{W2}> : tensor<2x2x1x1xf32>
  %y = stablehlo.convolution(%x, %w) dim_numbers = [b, f, 0, 1]x[o, i, 0, 1]->[b, f, 0, 1], \
window = {{}} {{batch_group_count = 1 : i64, feature_group_count = 1 : i64}} : \
(tensor<1x2x4x4xf32>, tensor<2x2x1x1xf32>) -> {conv_t}
  %c = stablehlo.constant dense<[3.0, -2.0]> : tensor<2xf32>
  %s = stablehlo.broadcast_in_dim %c, dims = [1] : (tensor<2xf32>) -> tensor<1x2x4x4xf32>
  %z = stablehlo.multiply %y, %s : ({conv_t}, tensor<1x2x4x4xf32>) -> {chain_t}
{tail}
}}
"""


@pytest.mark.parametrize("shift", [False, True], ids=["no-shift", "shift"])
@pytest.mark.parametrize("dynamic", ["conv", "chain"])
def test_refined_result_types_never_give_an_invalid_module(shift, dynamic):
    folded, report, a, b = fold_and_run(refined(shift, dynamic))  # the folded module runs
    entry = only_entry(report)
    if entry.folded:
        assert_close(a, b)
    else:
        assert entry.rule == VALID and "another shape" in entry.reason, str(report)
        assert_identical(a, b)


# --------------------------------------------------------------------------------------------
# dense_resource constants (t27): XLA's CPU client does not run them, so only the fold is checked

RESOURCE = """
module {
func.func @main(%x: tensor<1x2xf32>) -> tensor<1x2xf32> {
  %w = stablehlo.constant WEIGHT : tensor<2x2xf32>
  %y = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0] : \
(tensor<1x2xf32>, tensor<2x2xf32>) -> tensor<1x2xf32>
  %c = stablehlo.constant SCALE : tensor<2xf32>
  %s = stablehlo.broadcast_in_dim %c, dims = [1] : (tensor<2xf32>) -> tensor<1x2xf32>
  %z = stablehlo.multiply %y, %s : tensor<1x2xf32>
  return %z : tensor<1x2xf32>
}
}
{-#
  dialect_resources: {
    builtin: {
      wblob: "0x040000000000803F000000400000404000008040",
      cblob: "0x040000000000003F00000040"
    }
  }
#-}
"""


@pytest.mark.parametrize(
    "weight, scale",
    [
        ("dense_resource<wblob>", "dense_resource<cblob>"),
        ("dense<[[1.0, 2.0], [3.0, 4.0]]>", "dense_resource<cblob>"),
        ("dense_resource<wblob>", "dense<[0.5, 2.0]>"),
    ],
    ids=["both", "scale", "weight"],
)
def test_dense_resource_constant_is_kept(weight, scale):
    text = RESOURCE.replace("WEIGHT", weight).replace("SCALE", scale)
    folded, report = bnfold.fold(text, return_report=True)
    assert_kept(report, VALID, "dense_resource")
    assert "stablehlo.multiply" in folded and "dialect_resources" in folded


# --------------------------------------------------------------------------------------------
# What is, and is not, a BatchNorm (t29, t15)


@functools.cache
def conv_nhwc_params() -> tuple:
    rng = np.random.default_rng(0)
    jnp = jax.numpy
    k = jnp.asarray(rng.normal(size=(3, 3, 4, 8)).astype(np.float32))
    wse = jnp.asarray(rng.normal(size=(8, 8)).astype(np.float32))
    scale = jnp.asarray(rng.uniform(0.5, 2.0, size=8).astype(np.float32))
    return k, wse, scale


def _conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize("batch", [1, 2])
def test_squeeze_excitation_gate_is_not_a_batch_norm(batch):
    k, wse, scale = conv_nhwc_params()

    def f(x):
        y = _conv(x, k)
        gate = jax.nn.sigmoid(y.mean((1, 2)) @ wse)
        return y * gate[:, None, None, :], _conv(x, k * 0.5) * scale

    x = np.zeros((batch, 6, 6, 4), np.float32)
    report = bnfold.analyze(jax.export.export(jax.jit(f))(x))
    # the constant scale of the second output is the one BatchNorm-like chain; the sigmoid's
    # negation of the gate's dot_general is an affine chain of a scalar, folded into its weight
    assert len(report.batch_norms) == 1, str(report)
    bn = report.batch_norms[0]
    assert bn.bn_type == "affine chain (mul)" and bn.folded
    assert [(e.bn_type, e.target_type, e.folded) for e in report.affines] == [
        ("affine chain (neg)", "stablehlo.dot_general", True)
    ], str(report)
    assert len(bnfold.analyze(jax.export.export(jax.jit(f))(x), affine=False).entries) == 1


@functools.cache
def branch_block() -> object:
    rng = np.random.default_rng(0)
    jnp = jax.numpy
    k = jnp.asarray(rng.normal(size=(3, 3, 4, 4)).astype(np.float32))
    mean = jnp.asarray(rng.normal(size=4).astype(np.float32))
    var = jnp.asarray(rng.uniform(0.5, 2, size=4).astype(np.float32))
    g = jnp.asarray(rng.normal(size=4).astype(np.float32))

    def block(y):
        y = _conv(y, k)
        return (y - mean) * (jax.lax.rsqrt(var + 1e-5) * g) + 0.1

    return block


X_NHWC = np.random.default_rng(4).normal(size=(2, 6, 6, 4)).astype(np.float32)


def test_chain_in_a_scan_body_is_reported_with_its_function():
    block = branch_block()

    def f(x):
        return jax.lax.scan(lambda c, _: (block(c), None), x, None, length=3)[0]

    exported = jax.export.export(jax.jit(f))(X_NHWC)
    folded, report = bnfold.fold(exported, return_report=True)
    entry = only_entry(report)
    assert not entry.folded, str(report)
    assert entry.rule == "constant-params", str(report)
    assert "@closed_call" in entry.reason and "calls into" in entry.reason, str(report)
    assert_identical([np.asarray(exported.call(X_NHWC))], [np.asarray(folded.call(X_NHWC))])


def test_chain_in_a_jitted_function_called_from_a_cond_branch_folds():
    # the branch calls a private function that closes over its constants: folded there
    block = jax.jit(branch_block())

    def f(x, p):
        return jax.lax.cond(p > 0, block, lambda y: y * 2.0, x)

    exported = jax.export.export(jax.jit(f))(X_NHWC, np.float32(1))
    assert "stablehlo.case" in exported.mlir_module()
    folded, report = bnfold.fold(exported, return_report=True)
    entry = only_entry(report)
    assert entry.folded and entry.bn.startswith("@block:"), str(report)
    for p in (np.float32(1), np.float32(-1)):
        assert_close([np.asarray(exported.call(X_NHWC, p))], [np.asarray(folded.call(X_NHWC, p))])


def test_chain_in_a_cond_branch_folds_inside_the_branch():
    # JAX writes lax.cond branches inline, as the regions of a stablehlo.case: a conv and its
    # BatchNorm inside a branch fold there, like in a function body
    block = branch_block()

    def f(x, p):
        return jax.lax.cond(p > 0, block, lambda y: y * 2.0, x)

    exported = jax.export.export(jax.jit(f))(X_NHWC, np.float32(1))
    folded, report = bnfold.fold(exported, return_report=True)
    entry = only_entry(report)
    assert entry.folded, str(report)
    for p in (np.float32(1), np.float32(-1)):
        assert_close([np.asarray(exported.call(X_NHWC, p))], [np.asarray(folded.call(X_NHWC, p))])


# --------------------------------------------------------------------------------------------
# Positive checks: convolution layouts, the dot_general weight's side, window reversal
# (t12, t13, t22)

_LHS = {"N": "b", "C": "f", "H": "0", "W": "1"}
_RHS = {"O": "o", "I": "i", "H": "0", "W": "1"}


def conv_layout_text(lhs: str, rhs: str, out: str, groups: int, seed: int) -> tuple[str, list]:
    """A strided, padded, dilated convolution in the given layouts, then
    ``(y - t) / s * 2 + t`` along the output features."""
    rng = np.random.default_rng(seed)
    n, cin, cout, h, w = 2, 4, 6, 5, 7
    lhs_sizes = {"N": n, "C": cin, "H": h, "W": w}
    rhs_sizes = {"O": cout, "I": cin // groups, "H": 3, "W": 2}
    out_sizes = {"N": n, "C": cout, "H": 4, "W": 4}
    lhs_shape = [lhs_sizes[d] for d in lhs]
    rhs_shape = [rhs_sizes[d] for d in rhs]
    out_shape = [out_sizes[d] for d in out]

    def ty(shape):
        return "tensor<" + "x".join(map(str, shape)) + "xf32>"

    weight = rng.normal(size=rhs_shape).astype(np.float32)
    t = rng.normal(size=cout).astype(np.float32)
    s = rng.uniform(0.5, 2.0, size=cout).astype(np.float32) * rng.choice([-1, 1], cout)
    dn = (
        "["
        + ", ".join(_LHS[d] for d in lhs)
        + "]x["
        + ", ".join(_RHS[d] for d in rhs)
        + "]->["
        + ", ".join(_LHS[d] for d in out)
        + "]"
    )
    axis = out.index("C")
    o = ty(out_shape)
    text = f"""
func.func @main(%x: {ty(lhs_shape)}) -> {o} {{
  %w = stablehlo.constant dense<{_hex(weight)}> : {ty(rhs_shape)}
  %y = stablehlo.convolution(%x, %w) dim_numbers = {dn}, window = {{stride = [1, 2], \
pad = [[1, 0], [2, 1]], rhs_dilate = [1, 2]}} {{batch_group_count = 1 : i64, \
feature_group_count = {groups} : i64}} : ({ty(lhs_shape)}, {ty(rhs_shape)}) -> {o}
  %t = stablehlo.constant dense<{_hex(t)}> : tensor<{cout}xf32>
  %s = stablehlo.constant dense<{_hex(s)}> : tensor<{cout}xf32>
  %tb = stablehlo.broadcast_in_dim %t, dims = [{axis}] : (tensor<{cout}xf32>) -> {o}
  %sb = stablehlo.broadcast_in_dim %s, dims = [{axis}] : (tensor<{cout}xf32>) -> {o}
  %two = stablehlo.constant dense<2.0> : {o}
  %a = stablehlo.subtract %y, %tb : {o}
  %b = stablehlo.divide %a, %sb : {o}
  %c = stablehlo.multiply %b, %two : {o}
  %z = stablehlo.add %c, %tb : {o}
  return %z : {o}
}}
"""
    return text, [rng.normal(size=lhs_shape).astype(np.float32)]


CONV_LAYOUTS = [
    ("NCHW", "OIHW", "NCHW", 1),
    ("NHWC", "HWIO", "NHWC", 2),
    ("CHWN", "IOHW", "HWCN", 1),
    ("WCNH", "WOIH", "CNWH", 2),
]


@pytest.mark.parametrize("lhs, rhs, out, groups", CONV_LAYOUTS)
def test_convolution_dimension_numbers_fold(lhs, rhs, out, groups):
    seed = CONV_LAYOUTS.index((lhs, rhs, out, groups))
    text, inputs = conv_layout_text(lhs, rhs, out, groups, seed)
    key = f"conv-{lhs}-{rhs}-{out}-{groups}"
    INPUTS[key] = inputs
    folded, report, a, b = fold_and_run(text, key)
    assert_folded(report, folded, "stablehlo.divide", "stablehlo.subtract", "stablehlo.multiply")
    assert_close(a, b)


def dot_text(weight_first: bool, w_shape, x_shape, dims: str, out_shape, axis: int, seed: int):
    rng = np.random.default_rng(seed)

    def ty(shape):
        return "tensor<" + "x".join(map(str, shape)) + "xf32>"

    weight = rng.normal(size=w_shape).astype(np.float32)
    c = out_shape[axis]
    s = rng.uniform(0.5, 2.0, size=c).astype(np.float32) * rng.choice([-1, 1], c)
    t = rng.normal(size=c).astype(np.float32)
    operands = "%w, %x" if weight_first else "%x, %w"
    types = f"{ty(w_shape)}, {ty(x_shape)}" if weight_first else f"{ty(x_shape)}, {ty(w_shape)}"
    o = ty(out_shape)
    text = f"""
func.func @main(%x: {ty(x_shape)}) -> {o} {{
  %w = stablehlo.constant dense<{_hex(weight)}> : {ty(w_shape)}
  %y = stablehlo.dot_general {operands}, contracting_dims = {dims} : ({types}) -> {o}
  %s = stablehlo.constant dense<{_hex(s)}> : tensor<{c}xf32>
  %t = stablehlo.constant dense<{_hex(t)}> : tensor<{c}xf32>
  %sb = stablehlo.broadcast_in_dim %s, dims = [{axis}] : (tensor<{c}xf32>) -> {o}
  %tb = stablehlo.broadcast_in_dim %t, dims = [{axis}] : (tensor<{c}xf32>) -> {o}
  %m = stablehlo.multiply %y, %sb : {o}
  %z = stablehlo.add %m, %tb : {o}
  return %z : {o}
}}
"""
    return text, [rng.normal(size=x_shape).astype(np.float32)]


DOTS = {
    # weight (o, k) as lhs: (o, n)
    "lhs-axis0": ((True, (5, 3), (4, 3), "[1] x [1]", (5, 4), 0), True),
    "lhs-axis1-activation": ((True, (5, 3), (4, 3), "[1] x [1]", (5, 4), 1), False),
    # weight (a, k, c) as rhs: (n, a, c)
    "rhs-two-free-axis1": ((False, (2, 3, 6), (4, 3), "[1] x [1]", (4, 2, 6), 1), True),
    "rhs-two-free-axis2": ((False, (2, 3, 6), (4, 3), "[1] x [1]", (4, 2, 6), 2), True),
    # weight (a, k, c) as lhs: (a, c, n)
    "lhs-two-free-axis1": ((True, (2, 3, 6), (4, 3), "[1] x [1]", (2, 6, 4), 1), True),
    # two contracting dims, in another order on each side
    "rhs-contract-two": ((False, (3, 6, 2), (4, 2, 3), "[1, 2] x [2, 0]", (4, 6), 1), True),
}


@pytest.mark.parametrize("name", list(DOTS))
def test_dot_general_weight_side(name):
    args, folds = DOTS[name]
    text, inputs = dot_text(*args, seed=list(DOTS).index(name))
    INPUTS["dot-" + name] = inputs
    folded, report, a, b = fold_and_run(text, "dot-" + name)
    if folds:
        assert_folded(report, folded, "stablehlo.multiply")
        assert_close(a, b)
    else:
        assert_kept(report, "channel-axis", "activation")
        assert_identical(a, b)


def test_window_reversal_folds():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    o = "tensor<1x4x11x2xf32>"
    text = f"""
func.func @main(%x: tensor<1x4x6x6xf32>) -> {o} {{
  %w = stablehlo.constant dense<{_hex(w)}> : tensor<4x2x3x3xf32>
  %y = stablehlo.convolution(%x, %w) dim_numbers = [b, f, 0, 1]x[o, i, 0, 1]->[b, f, 0, 1], \
window = {{stride = [1, 2], pad = [[1, 1], [2, 0]], lhs_dilate = [2, 1], rhs_dilate = [1, 2], \
reverse = [true, false]}} {{batch_group_count = 1 : i64, feature_group_count = 2 : i64, \
precision_config = [#stablehlo<precision HIGHEST>, #stablehlo<precision DEFAULT>]}} : \
(tensor<1x4x6x6xf32>, tensor<4x2x3x3xf32>) -> {o}
  %c = stablehlo.constant dense<[3.0, -2.0, 0.5, 1.5]> : tensor<4xf32>
  %s = stablehlo.broadcast_in_dim %c, dims = [1] : (tensor<4xf32>) -> {o}
  %m = stablehlo.multiply %y, %s : {o}
  %z = stablehlo.add %m, %s : {o}
  return %z : {o}
}}
"""
    INPUTS["reversal"] = [rng.normal(size=(1, 4, 6, 6)).astype(np.float32)]
    folded, report, a, b = fold_and_run(text, "reversal")
    assert_folded(report, folded, "stablehlo.multiply")
    assert "reverse = [true, false]" in folded
    assert_close(a, b)


# --------------------------------------------------------------------------------------------
# Found by the random-network fuzzer


def _vectors(seed: int, n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=n).astype(np.float32), rng.uniform(0.5, 2, n).astype(np.float32)]


def test_a_chain_kept_after_a_folded_one_has_one_entry_named_as_analyze_names_it():
    # the kept chain reads a folded chain's output that is also returned: the fold takes a
    # second pass over the rewritten module, which must not add a second entry or rename it
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    (m1, s1), (m2, s2) = _vectors(1, 4), _vectors(2, 4)

    def f(x):
        z = (x @ w.T - m1) * s1
        return (z - m2) * s2, z

    exported = jax.export.export(jax.jit(f))(jax.ShapeDtypeStruct((2, 3), np.float32))
    folded, report = bnfold.fold(exported, return_report=True)
    assert report.to_list() == bnfold.analyze(exported).to_list()
    assert [e.action for e in report] == ["folded", "skipped"], str(report)
    x = rng.normal(size=(2, 3)).astype(np.float32)
    assert_close([np.asarray(a) for a in exported.call(x)], [np.asarray(b) for b in folded.call(x)])


@pytest.mark.parametrize("order", [("bn0", "bn1"), ("bn1", "bn0")])
def test_every_named_layer_of_a_chain_has_an_entry_with_a_unique_name(order):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3)).astype(np.float32)
    stats = {"bn0": _vectors(1), "bn1": _vectors(2)}

    def f(x):
        with jax.named_scope("bn0"):
            m, s = stats["bn0"]
            a = (x - m) * s  # kept: no producer
        y = x @ w.T
        for name in order:
            with jax.named_scope(name):
                m, s = stats[name]
                y = (y - m) * s
        return a, y

    exported = jax.export.export(jax.jit(f))(jax.ShapeDtypeStruct((2, 3), np.float32))
    folded, report = bnfold.fold(exported, return_report=True)
    names = [e.bn for e in report]
    assert len(names) == 3 and len(set(names)) == 3, str(report)
    assert {n.split(" ")[0] for n in names} == {"bn0", "bn1"}
    assert len(report.folded) == 2, str(report)
    x = rng.normal(size=(2, 3)).astype(np.float32)
    assert_close([np.asarray(a) for a in exported.call(x)], [np.asarray(b) for b in folded.call(x)])


def test_float16_shift_near_the_limit_is_kept():
    # (y - 150) * 400 fits float16 for y = 200; y * 400 = 80000 does not
    w = np.eye(2, dtype=np.float16)
    mean = np.array([150.0, 150.0], np.float16)
    scale = np.array([400.0, 300.0], np.float16)

    def f(x):
        return (x @ w.T - mean) * scale

    x = np.array([[200.0, 200.0]], np.float16)
    exported = jax.export.export(jax.jit(f))(jax.ShapeDtypeStruct(x.shape, x.dtype))
    folded, report = bnfold.fold(exported, return_report=True)
    (entry,) = report.entries
    assert entry.rule == "valid-values" and "float16 limit" in entry.reason, str(report)
    np.testing.assert_array_equal(np.asarray(exported.call(x)), np.asarray(folded.call(x)))


# --------------------------------------------------------------------------------------------
# Second review: chains across blocks, widening chains, bounded types


def _conv_nhwc(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_a_branch_chain_after_the_conv_bias_outside_the_branch_is_kept():
    # the conv's bias add is outside the lax.cond, the BatchNorm inside: folding the branch's
    # chain alone would drop the bias
    rng = np.random.default_rng(0)
    k = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
    bias = (rng.normal(size=4) * 5).astype(np.float32)
    (mean, g), var = _vectors(1, 4), rng.uniform(0.5, 2, 4).astype(np.float32)

    def f(x, p):
        y = _conv_nhwc(x, k) + bias
        scale = jax.lax.rsqrt(var + 1e-5) * g
        return jax.lax.cond(p > 0, lambda: (y - mean) * scale + 0.1, lambda: x)

    x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    exported = jax.export.export(jax.jit(f))(x, np.float32(1))
    folded, report = bnfold.fold(exported, return_report=True)
    assert not report.folded, str(report)
    for p in (np.float32(1), np.float32(-1)):
        assert_close([np.asarray(exported.call(x, p))], [np.asarray(folded.call(x, p))])


def test_two_scales_in_two_blocks_fold_one_after_the_other():
    rng = np.random.default_rng(2)
    k = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
    s1, s2 = (rng.uniform(0.5, 2, 4).astype(np.float32) for _ in range(2))

    def f(x, p):
        y = _conv_nhwc(x, k) * s1
        return jax.lax.cond(p > 0, lambda: y * s2, lambda: x)

    x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    exported = jax.export.export(jax.jit(f))(x, np.float32(1))
    folded, report = bnfold.fold(exported, return_report=True)
    assert report.to_list() == bnfold.analyze(exported).to_list()
    assert all(e.target for e in report.folded), str(report)
    for p in (np.float32(1), np.float32(-1)):
        assert_close([np.asarray(exported.call(x, p))], [np.asarray(folded.call(x, p))])


def test_a_chain_that_widens_and_stays_wide_is_kept():
    # a float16 conv whose output is scaled by ~1000 in float32: folded, the scale would be
    # applied in float16 and overflow where the float32 chain does not
    text = """
func.func @main(%x: tensor<1x2x4x4xf16>) -> tensor<1x2x4x4xf32> {
  %w = stablehlo.constant dense<[[[[1.0]], [[0.5]]], [[[2.0]], [[-1.0]]]]> : tensor<2x2x1x1xf16>
  %y = stablehlo.convolution(%x, %w)
      dim_numbers = [b, f, 0, 1]x[o, i, 0, 1]->[b, f, 0, 1], window = {}
      {batch_group_count = 1 : i64, feature_group_count = 1 : i64}
      : (tensor<1x2x4x4xf16>, tensor<2x2x1x1xf16>) -> tensor<1x2x4x4xf16>
  %yf = stablehlo.convert %y : (tensor<1x2x4x4xf16>) -> tensor<1x2x4x4xf32>
  %c = stablehlo.constant dense<[1000.0, 2000.0]> : tensor<2xf32>
  %s = stablehlo.broadcast_in_dim %c, dims = [1] : (tensor<2xf32>) -> tensor<1x2x4x4xf32>
  %z = stablehlo.multiply %yf, %s : tensor<1x2x4x4xf32>
  return %z : tensor<1x2x4x4xf32>
}
"""
    folded, report = bnfold.fold(text, return_report=True)
    (entry,) = report.entries
    assert entry.rule == "valid-values" and "float16" in entry.reason, str(report)
    x = (np.random.default_rng(0).normal(size=(1, 2, 4, 4)) * 100).astype(np.float16)
    assert np.isfinite(run_text(folded, [x])[0]).all()


def test_site_marks_do_not_outlive_the_fold():
    """Sites are told apart across passes by a mark on their last op (MLIR values hash by
    address, and a rewrite's new ops reuse freed addresses); no mark is left in the result,
    folded or analyzed."""
    k, _, scale = conv_nhwc_params()

    def f(x):
        return (_conv(x, k) * scale + 0.5) * 2.0

    exported = jax.export.export(jax.jit(f))(np.zeros((1, 6, 6, 4), np.float32))
    text = exported.mlir_module()
    folded = bnfold.fold(text)
    bnfold.analyze(text)
    assert "bnfold.site" not in folded and "bnfold.site" not in exported.mlir_module()
    assert "bnfold.site" not in bnfold.fold(exported).mlir_module()
