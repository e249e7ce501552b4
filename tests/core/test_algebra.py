"""The fold algebra against a float64 reference: every layout, groups, bias, affine."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnfold.core.algebra import (
    CONV,
    LINEAR,
    OutputLayout,
    affine_factors,
    conv_transpose_layout,
    fold_into_producer,
    folded_bias,
    scale_output_channels,
)
from bnfold.errors import FoldRefused


def _bn_stats(n: int, rng: np.random.Generator, affine: bool = True):
    mean = rng.normal(0, 2, n)
    var = rng.uniform(0.05, 4.0, n)
    gamma = rng.uniform(-2, 2, n) if affine else None
    beta = rng.normal(0, 1, n) if affine else None
    return mean, var, gamma, beta


def _bn64(y: torch.Tensor, mean, var, eps, gamma, beta) -> torch.Tensor:
    n = y.shape[1]
    g = torch.ones(n, dtype=torch.float64) if gamma is None else torch.as_tensor(gamma)
    b = torch.zeros(n, dtype=torch.float64) if beta is None else torch.as_tensor(beta)
    return F.batch_norm(y, torch.as_tensor(mean), torch.as_tensor(var), g, b, False, 0.0, eps)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONVT_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@pytest.mark.parametrize(
    "dims,groups,bias,affine,transposed",
    [
        (d, g, b, a, t)
        for d, g, b, a, t in itertools.product(
            (1, 2, 3), (1, 2, 6), (True, False), (True, False), (False, True)
        )
        if not (d == 3 and g == 2)  # keep the matrix small; 3-D is covered by groups 1 and 6
    ],
)
def test_conv_fold_matches_float64_reference(dims, groups, bias, affine, transposed):
    rng = np.random.default_rng(dims * 100 + groups * 10 + bias * 2 + affine + 50 * transposed)
    c_in, c_out, k = 6, 12, 3
    if transposed:
        w = rng.normal(0, 0.5, (c_in, c_out // groups) + (k,) * dims)
        fn = CONVT_FNS[dims]
        layout = conv_transpose_layout(groups)
    else:
        w = rng.normal(0, 0.5, (c_out, c_in // groups) + (k,) * dims)
        fn = CONV_FNS[dims]
        layout = CONV
    b = rng.normal(0, 1, c_out) if bias else None
    mean, var, gamma, beta = _bn_stats(c_out, rng, affine)
    eps = 1e-3
    x = torch.as_tensor(rng.normal(0, 1, (2, c_in) + (5,) * dims))
    tw = torch.as_tensor(w)
    tb = None if b is None else torch.as_tensor(b)
    ref = _bn64(fn(x, tw, tb, groups=groups), mean, var, eps, gamma, beta)

    # float64 torch tensors: exact up to rounding
    w2, b2 = fold_into_producer(tw, tb, mean, var, eps, gamma, beta, layout=layout)
    assert w2.dtype == torch.float64 and b2.dtype == torch.float64
    assert _rel(ref, fn(x, w2, b2, groups=groups)) < 1e-12
    # float32 numpy arrays: the same fold through the numpy path
    w3, b3 = fold_into_producer(
        w.astype(np.float32),
        None if b is None else b.astype(np.float32),
        mean,
        var,
        eps,
        gamma,
        beta,
        layout=layout,
    )
    assert isinstance(w3, np.ndarray) and w3.dtype == np.float32 and b3.dtype == np.float32
    out = fn(x.float(), torch.from_numpy(w3), torch.from_numpy(b3), groups=groups).double()
    assert _rel(ref, out) < 1e-5


def test_grouped_conv_transpose_is_not_scaled_along_flat_axis_1():
    """The trap several tools fall into: scaling axis 1 of a grouped ConvTranspose by flat s."""
    rng = np.random.default_rng(0)
    groups, c_in, per_group = 2, 4, 3
    w = torch.as_tensor(rng.normal(size=(c_in, per_group, 3, 3)))
    s = np.arange(1.0, groups * per_group + 1.0)
    out = scale_output_channels(w, s, conv_transpose_layout(groups))
    # input channels 0-1 belong to group 0 (out channels 0-2), 2-3 to group 1 (out 3-5)
    expected = w.clone()
    for g in range(groups):
        for j in range(per_group):
            expected[g * 2 : (g + 1) * 2, j] *= s[g * per_group + j]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_and_matmul_layouts(trans_b, bias):
    rng = np.random.default_rng(int(trans_b) * 2 + int(bias))
    w = rng.normal(size=(7, 5))  # (out, in)
    b = rng.normal(size=7) if bias else None
    mean, var, gamma, beta = _bn_stats(7, rng)
    x = torch.as_tensor(rng.normal(size=(4, 5)))
    ref = _bn64(
        F.linear(x, torch.as_tensor(w), None if b is None else torch.as_tensor(b)),
        mean,
        var,
        1e-5,
        gamma,
        beta,
    )
    stored = w if trans_b else w.T.copy()  # Gemm transB=0 / MatMul keep (in, out)
    layout = LINEAR if trans_b else OutputLayout(axis=1)
    w2, b2 = fold_into_producer(stored, b, mean, var, 1e-5, gamma, beta, layout=layout)
    w2 = w2 if trans_b else w2.T
    out = F.linear(x, torch.as_tensor(w2), torch.as_tensor(b2))
    assert _rel(ref, out) < 1e-12


def test_factors_are_float64_and_exact():
    mean, var = np.array([1.0, -2.0]), np.array([4.0, 0.25])
    s, t = affine_factors(mean, var, 0.0, np.array([2.0, 1.0]), np.array([0.5, 0.0]))
    assert s.dtype == np.float64
    np.testing.assert_array_equal(s, [1.0, 2.0])
    np.testing.assert_array_equal(t, [-0.5, 4.0])
    s, t = affine_factors(torch.tensor(mean, dtype=torch.float32), torch.tensor(var), 0.0)
    np.testing.assert_array_equal(s, [0.5, 2.0])  # affine=False: gamma 1, beta 0


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("var", np.nan, "running variance"),
        ("mean", np.inf, "running mean"),
        ("gamma", -np.inf, "gamma"),
        ("beta", np.nan, "beta"),
        ("var", -1.0, "<= 0"),
    ],
)
def test_invalid_statistics_are_refused(field, value, message):
    stats = dict(mean=np.zeros(3), var=np.ones(3), gamma=np.ones(3), beta=np.zeros(3))
    stats[field][1] = value
    with pytest.raises(FoldRefused, match=message):
        affine_factors(stats["mean"], stats["var"], 1e-5, stats["gamma"], stats["beta"])


def test_var_plus_eps_zero_is_refused():
    with pytest.raises(FoldRefused, match="<= 0"):
        affine_factors(np.zeros(2), np.array([1.0, -1e-3]), 1e-3)


def test_non_finite_weight_and_bias_are_refused():
    s, t = np.ones(2), np.zeros(2)
    w = torch.ones(2, 3)
    w[1, 2] = float("nan")
    with pytest.raises(FoldRefused, match="non-finite"):
        scale_output_channels(w, s, LINEAR)
    with pytest.raises(FoldRefused, match="bias"):
        folded_bias(torch.tensor([1.0, float("inf")]), s, t, like=torch.ones(2, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_overflow_of_target_dtype_is_refused(dtype):
    w = torch.full((2, 3), 1000.0, dtype=dtype)
    limit = torch.finfo(dtype).max
    s = np.array([1.0, 2 * limit / 1000.0])
    with pytest.raises(FoldRefused, match="overflows"):
        scale_output_channels(w, s, LINEAR)
    with pytest.raises(FoldRefused, match="overflows"):
        folded_bias(None, np.ones(2), np.array([0.0, 2.0 * limit]), like=w)


def test_float16_numpy_bias_overflow_is_refused():
    w = np.ones((2, 2), dtype=np.float16)
    with pytest.raises(FoldRefused, match="65504"):
        folded_bias(
            np.array([1.0, 1.0], dtype=np.float16), np.array([1.0, 7e4]), np.zeros(2), like=w
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_rounded_once_from_float32(dtype):
    rng = np.random.default_rng(3)
    w = torch.as_tensor(rng.normal(size=(16, 8)), dtype=torch.float32).to(dtype)
    s = rng.uniform(0.1, 3.0, 16)
    out = scale_output_channels(w, s, LINEAR)
    assert out.dtype == dtype
    expected = (w.double() * torch.as_tensor(s)[:, None]).float().to(dtype)
    # one rounding from the float32 product: identical except for float32 double-rounding ties
    assert (out != expected).float().mean() < 0.01
    exact = w.double() * torch.as_tensor(s)[:, None]
    err_ours = (out.double() - exact).abs().max()
    ulp = exact.abs().max() * torch.finfo(dtype).eps
    assert err_ours <= ulp


def test_inputs_are_not_modified_and_result_is_new():
    w = torch.randn(4, 3)
    b = torch.randn(4)
    w0, b0 = w.clone(), b.clone()
    w2, b2 = fold_into_producer(
        w, b, np.zeros(4), np.full(4, 2.0), 1e-5, np.full(4, 3.0), np.ones(4)
    )
    assert torch.equal(w, w0) and torch.equal(b, b0)
    assert w2.data_ptr() != w.data_ptr()


def test_channel_count_mismatch_is_refused():
    with pytest.raises(FoldRefused, match="channels"):
        fold_into_producer(np.ones((3, 2)), None, np.zeros(4), np.ones(4), 1e-5)


def test_channels_last_weight_keeps_its_memory_format():
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    out = scale_output_channels(w, np.linspace(0.5, 2, 8), CONV)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_unknown_array_type_is_a_type_error():
    with pytest.raises(TypeError):
        scale_output_channels([[1.0]], np.ones(1), LINEAR)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_any_non_finite_weight_element_is_found(bad, framework):
    w = torch.randn(6, 5, 3)
    w[4, 2, 1] = bad
    arr = w if framework == "torch" else w.numpy()
    with pytest.raises(FoldRefused, match="non-finite"):
        scale_output_channels(arr, np.linspace(0.5, 1.5, 6), CONV)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_low_precision_weights_scaled_into_subnormals_are_refused(framework):
    """A float16 weight scaled below 6.1e-5 keeps only a few significant bits, which the
    unfolded model (whose BatchNorm scales activations) does not lose."""
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(4, 64)) * 0.05).astype(np.float16)
    tiny, fine = np.full(4, 2e-5), np.full(4, 0.5)
    if framework == "torch":
        w = torch.from_numpy(w)
    with pytest.raises(FoldRefused, match="underflows float16"):
        scale_output_channels(w, tiny, OutputLayout(axis=0))
    scale_output_channels(w, fine, OutputLayout(axis=0))
    w32 = w.float() if framework == "torch" else w.astype(np.float32)
    scale_output_channels(w32, tiny, OutputLayout(axis=0))  # float32 has the range


def test_a_few_near_zero_channels_of_a_float16_weight_still_fold():
    """One pruned channel of eight (its values subnormal after the fold) is a negligible loss;
    only a weight underflowing broadly is refused."""
    w = (np.random.default_rng(1).normal(size=(8, 64)) * 0.05).astype(np.float16)
    s = np.full(8, 0.7)
    s[3] = 1e-5
    out = scale_output_channels(w, s, OutputLayout(axis=0))
    assert np.abs(out[3].astype(np.float32)).max() < 6.2e-5


def test_pruned_channels_of_a_float16_weight_are_exact_zeros_not_underflow():
    """Channels whose BatchNorm scale is exactly 0 (gamma = 0) fold to exact zeros, however
    many there are: nothing is lost."""
    w = (np.random.default_rng(2).normal(size=(8, 64)) * 0.05).astype(np.float16)
    s = np.full(8, 0.7)
    s[:5] = 0.0
    out = scale_output_channels(w, s, OutputLayout(axis=0))
    assert not out[:5].any()


def test_verify_reads_conjugate_and_negative_views():
    from bnfold.torch.verify import _error

    z = torch.randn(4, dtype=torch.complex128)
    assert _error(z.conj(), z.conj()) == (0.0, 0.0)
    assert _error(z.conj().imag, z.conj().imag) == (0.0, 0.0)
    err, rel = _error(z.conj(), z)
    assert err > 0 and rel > 0
