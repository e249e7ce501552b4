"""bnfold.core.compare: tolerances by dtype, error measures, the pass/fail decision, its
summary, and the random inputs of --verify, the same for every format (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.core.compare import (
    DISCRETE_MISMATCH_TOLERANCE,
    CheckResult,
    array_error,
    compare_arrays,
    float_error,
    max_error,
    random_array,
    tolerance,
)


@pytest.mark.parametrize(
    "names, expected",
    [
        (["float64"], 1e-9),
        (["float32"], 1e-4),
        (["float16"], 1e-2),
        (["bfloat16"], 5e-2),
        (["complex128"], 1e-9),  # a complex output is as precise as its parts
        (["complex64"], 1e-4),
        (["complex32"], 1e-2),
        (["float8_e4m3fn"], 1e-4),  # a float bnfold has no entry for: float32's
        (["float64", "float16", "float32"], 1e-2),  # the least precise decides
        (["bfloat16", "float16"], 5e-2),
        ([], 0.0),  # no floating-point output: only discrete ones are compared
    ],
)
def test_tolerance_by_dtype(names, expected):
    assert tolerance(names) == expected


def test_array_error_is_norm_wise_and_nan_aware():
    x = np.array([2.0, -4.0, 1.0], np.float32)
    assert array_error(x, np.array([2.0, -4.0, 1.5])) == (0.5, 0.125)  # 0.5 / max|x| = 4
    assert array_error(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])) == (0.0, 0.0)
    assert array_error(np.array([np.inf, 1.0]), np.array([np.inf, 1.0])) == (0.0, 0.0)
    assert array_error(np.array([0.0, 1.0]), np.array([np.nan, 1.0])) == (np.inf, np.inf)
    assert array_error(np.zeros(3), np.array([0.0, 1e-3, 0.0])) == (1e-3, np.inf)
    assert array_error(np.array(3.0), np.array(2.0)) == (1.0, 1 / 3)  # 0-d outputs too
    assert array_error(np.array([1 + 1j]), np.array([1 - 1j])) == (2.0, 2 / np.sqrt(2))


def test_max_error_counts_every_output_float_error_only_floats_when_there_are():
    a = [np.array([1.0, 2.0], np.float32), np.array([3, 1], np.int64)]
    b = [np.array([1.0, 2.2], np.float32), np.array([3, 2], np.int64)]
    abs_all, rel_all = max_error(a, b)
    assert abs_all == 1.0 and rel_all == pytest.approx(1 / 3)  # the class id: 1 / 3
    abs_f, rel_f = float_error(a, b)
    assert abs_f == pytest.approx(0.2) and rel_f == pytest.approx(0.1, rel=1e-6)
    assert float_error(a[1:], b[1:]) == max_error(a[1:], b[1:]) == (1.0, 1 / 3)
    assert max_error([], []) == (0.0, 0.0)


def _table():
    """(outputs a, outputs b, keyword arguments, expected max_rel, tolerance, mismatch, passed)"""
    f32 = np.array([1.0, 2.0, 4.0], np.float32)
    ids = np.arange(200, dtype=np.int64)
    one_off, three_off = ids.copy(), ids.copy()
    one_off[0] = 7
    three_off[:3] = 7
    # perturbations by powers of two: exact in every dtype, so the errors are exact too
    small, large = 1 + 2**-14, 1 + 2**-8
    f16 = f32.astype(np.float16)
    return [
        ([f32], [f32.copy()], {}, 0.0, 1e-4, 0.0, True),
        ([f32], [f32 * small], {}, 2**-14, 1e-4, 0.0, True),
        ([f32], [f32 * large], {}, 2**-8, 1e-4, 0.0, False),
        ([f16], [f16 * np.float16(large)], {}, 2**-8, 1e-2, 0.0, True),
        # widened by the frontend (torch's bfloat16): the dtype named decides the tolerance
        (
            [f32.astype(np.float64)],
            [f32 * (1 + 2**-5)],
            {"dtypes": ["bfloat16"]},
            2**-5,
            5e-2,
            0.0,
            True,
        ),
        # a float16 model with float32 inputs and outputs: its weights' dtype bounds the error
        ([f32], [f32 * large], {"compute_dtypes": ["float16"]}, 2**-8, 1e-2, 0.0, True),
        ([f32], [f32 * large], {"compute_dtypes": ["float64"]}, 2**-8, 1e-4, 0.0, False),
        # discrete outputs: a share of elements may flip (1 %), and compute dtypes do not count
        ([ids], [one_off], {"compute_dtypes": ["float16"]}, 0.0, 0.0, 0.005, True),
        ([ids], [three_off], {}, 0.0, 0.0, 0.015, False),
        ([f32, ids], [f32.copy(), three_off], {}, 0.0, 1e-4, 0.015, False),
        ([f32, ids > 100], [f32.copy(), ids > 101], {}, 0.0, 1e-4, 0.005, True),
    ]


@pytest.mark.parametrize("a, b, kwargs, rel, tol, mismatch, passed", _table())
def test_compare_arrays_table(a, b, kwargs, rel, tol, mismatch, passed):
    result = compare_arrays(a, b, **kwargs)
    assert result.max_rel == rel
    assert result.tolerance == tol
    assert result.discrete_mismatch == pytest.approx(mismatch)
    assert result.discrete_outputs == any(x.dtype.kind in "biu" for x in a)
    assert result.passed is passed


def test_compare_arrays_reads_outputs_once_in_order():
    made = []

    def outputs(tag, scale):
        for i in range(3):
            made.append((tag, i))
            yield np.full(4, float(i + 1), np.float32) * scale

    result = compare_arrays(outputs("a", 1.0), outputs("b", 1.5))
    assert made == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert result.max_abs == 1.5 and result.max_rel == 0.5


def test_summary_text_and_decision():
    assert CheckResult(0.25, 1e-5, 1e-4, 0.0, False).summary() == (
        "max abs err 0.25, max rel err 1e-05 (tolerance 0.0001)"
    )
    mixed = CheckResult(0.0, 0.0, 1e-2, 0.005, True)
    assert mixed.summary() == (
        "max abs err 0, max rel err 0 (tolerance 0.01); integer/bool outputs differ in "
        "0.500% of elements (tolerance 1%)"
    )
    assert mixed.passed
    assert not CheckResult(0.0, 0.0, 1e-2, DISCRETE_MISMATCH_TOLERANCE * 1.01, True).passed
    assert not CheckResult(0.0, 1e-4 * 1.01, 1e-4, 0.0, False).passed
    assert CheckResult(0.0, 1e-4, 1e-4, DISCRETE_MISMATCH_TOLERANCE, True).passed  # inclusive


# ---------------------------------------------------------------------------------------------
# Random inputs


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("dtype", ["int16", "int32", "int64", "uint16", "uint32", "uint64"])
def test_wider_integers_are_0_or_1(dtype):
    values = random_array(dtype, (64, 64), _rng())
    assert values.dtype == np.dtype(dtype) and values.shape == (64, 64)
    assert set(np.unique(values).tolist()) == {0, 1}


@pytest.mark.parametrize("dtype, low, high", [("uint8", 0, 255), ("int8", -128, 127)])
def test_one_byte_integers_span_their_range(dtype, low, high):
    values = random_array(dtype, (100_000,), _rng())
    assert values.dtype == np.dtype(dtype)
    assert values.min() == low and values.max() == high and np.unique(values).size == 256


def test_bools_are_random():
    values = random_array("bool", (10_000,), _rng())
    assert values.dtype == np.bool_ and 0.45 < values.mean() < 0.55


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_wide_floats_are_standard_normal_in_their_own_dtype(dtype):
    values = random_array(dtype, (200_000,), _rng(1))
    assert values.dtype == np.dtype(dtype)
    assert abs(values.mean()) < 0.01 and abs(values.std() - 1) < 0.01
    np.testing.assert_array_equal(values, _rng(1).standard_normal(200_000, dtype=dtype))


def test_narrow_floats_are_float32_draws_rounded_a_chunk_at_a_time():
    n = (1 << 20) + 5  # over one chunk: the stream goes on where the first chunk stopped
    values = random_array("float16", (n,), _rng(2))
    assert values.dtype == np.float16
    expected = _rng(2).standard_normal(n, dtype=np.float32).astype(np.float16)
    np.testing.assert_array_equal(values, expected)


def test_bfloat16_through_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = random_array(ml_dtypes.bfloat16, (3, 5), _rng(3))
    assert values.dtype == ml_dtypes.bfloat16 and values.shape == (3, 5)
    expected = _rng(3).standard_normal(15, dtype=np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(values.reshape(-1), expected)


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_parts_are_each_standard_normal(dtype):
    values = random_array(dtype, (100_000,), _rng(4))
    assert values.dtype == np.dtype(dtype)
    for part in (values.real, values.imag):
        assert abs(part.mean()) < 0.02 and abs(part.std() - 1) < 0.02


def test_same_seed_same_values_other_seed_other_values():
    for dtype in ("float32", "float16", "int64", "uint8", "bool"):
        first = random_array(dtype, (50,), _rng(7))
        np.testing.assert_array_equal(first, random_array(dtype, (50,), _rng(7)))
        assert not np.array_equal(first, random_array(dtype, (50,), _rng(8)))


def test_scalars_and_empty_shapes():
    assert random_array("float32", (), _rng()).shape == ()
    assert random_array("int64", [0, 3], _rng()).shape == (0, 3)


@pytest.mark.parametrize("dtype", ["U3", "object", "datetime64[s]"])
def test_other_dtypes_are_refused(dtype):
    with pytest.raises(TypeError, match="no random values"):
        random_array(dtype, (2,), _rng())
