"""distill_kernels.scale_rows (numpy, CPU backend) against numpy's own float32 arithmetic.

The reference is numpy: the float32 product ``x.astype(float32) * f``, rounded to the dtype by
``astype`` (float16: numpy; bfloat16: ml_dtypes; both round to nearest even). Rows whose factor is
exactly 1.0 hold NaN payloads and other distinctive bit patterns and must come back bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

import distill_kernels as dk
from distill_kernels import _lib

ml_dtypes = pytest.importorskip("ml_dtypes",
                                reason="ml_dtypes is not installed: bf16 tests skipped")

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
UINT = {4: np.uint32, 2: np.uint16}

# Per-row factors: the edge cases, then random ones.
EDGE_FACTORS = [1.0, 0.0, -0.0, -1.0, np.nan, np.inf, -np.inf, 2.5, 1e-6, 1e30, 1.0, -0.375,
                np.nextafter(np.float32(1), np.float32(2)),
                np.nextafter(np.float32(1), np.float32(0))]


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(UINT[a.dtype.itemsize])


def make(rng, dtype, n, v, stride, factors):
    """A [n, v] view with row stride `stride` into a buffer whose padding holds a pattern; rows
    with factor 1 hold random bit patterns (NaN payloads among them), the others random values."""
    big = np.empty((n, stride), dtype=dtype)
    bits(big)[...] = 0x7F81 if dtype.itemsize == 2 else 0x7F800123  # signalling NaN padding
    x = big[:, :v]
    vals = (rng.standard_normal((n, v)) * np.exp2(rng.uniform(-4, 4, (n, v)))).astype(np.float32)
    x[...] = vals.astype(dtype)
    for i, f in enumerate(factors):
        if np.float32(f) == 1.0:
            u = UINT[dtype.itemsize]
            bits(x[i])[...] = rng.integers(0, np.iinfo(u).max, v, dtype=u, endpoint=True)
            bits(x[i])[::3] = 0x7F81 + np.arange(0, v, 3) % 50 if dtype.itemsize == 2 else (
                0x7F800001 + np.arange(0, v, 3))
    return big, x


def check(before_big, after_big, x_before, x_after, factors, v):
    """Rows with factor 1 and the padding bit-identical; other rows equal to numpy's product."""
    f = np.asarray(factors, dtype=np.float32)
    np.testing.assert_array_equal(bits(after_big[:, v:]), bits(before_big[:, v:]))
    for i in range(x_before.shape[0]):
        fi = f[i] if f.size > 1 else f.reshape(-1)[0]
        if fi == 1.0:
            np.testing.assert_array_equal(bits(x_after[i]), bits(x_before[i]), err_msg=f"row {i}")
            continue
        want = (x_before[i].astype(np.float32) * fi).astype(x_before.dtype)
        nan = np.isnan(want.astype(np.float32))
        got = x_after[i]
        assert np.array_equal(np.isnan(got.astype(np.float32)), nan), f"row {i} (factor {fi})"
        np.testing.assert_array_equal(bits(got)[~nan], bits(want)[~nan],
                                      err_msg=f"row {i} (factor {fi})")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("n,v,stride", [(14, 1, 1), (14, 37, 45), (14, 8193, 8200)])
def test_matches_numpy_float32_product(dtype, n, v, stride):
    rng = np.random.default_rng([n, v, stride])
    factors = np.array(EDGE_FACTORS[:n], dtype=np.float32)
    big, x = make(rng, dtype, n, v, stride, factors)
    before_big = big.copy()
    x_before = before_big[:, :v]
    with np.errstate(all="ignore"):
        out = dk.scale_rows(x, factors)
        assert out is x
        check(before_big, big, x_before, x, factors, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_one_factor_for_every_row(dtype):
    rng = np.random.default_rng(7)
    big, x = make(rng, dtype, 5, 100, 104, [3.0] * 5)
    before = big.copy()
    dk.scale_rows(x, 1.0)  # exactly 1: nothing moves
    np.testing.assert_array_equal(bits(big), bits(before))
    dk.scale_rows(x, np.float32(-0.5))
    with np.errstate(all="ignore"):
        check(before, big, before[:, :100], x, [-0.5], 100)
    # One row given as a 1-D array.
    row = x[2].copy()
    dk.scale_rows(row, [2.0])
    np.testing.assert_array_equal(bits(row), bits((x[2].astype(np.float32) * 2).astype(dtype)))


def test_bad_arguments():
    x = np.ones((3, 8), dtype=np.float32)
    with pytest.raises(TypeError):
        dk.scale_rows(x.astype(np.float64), 2.0)
    with pytest.raises(TypeError):
        dk.scale_rows([[1.0, 2.0]], 2.0)
    with pytest.raises(ValueError, match="contiguous"):
        dk.scale_rows(x[:, ::2], 2.0)
    with pytest.raises(ValueError, match="N = 3"):
        dk.scale_rows(x, [1.0, 2.0])
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        dk.scale_rows(ro, 2.0)
    with pytest.raises(ValueError, match="empty rows"):
        dk.scale_rows(np.ones((3, 0), dtype=np.float32), 2.0)
    assert dk.scale_rows(np.ones((0, 8), dtype=np.float32), 2.0).shape == (0, 8)  # no rows
    # With no rows the factors are still checked.
    with pytest.raises(TypeError, match="numbers"):
        dk.scale_rows(np.ones((0, 8), dtype=np.float32), "junk")
    with pytest.raises(ValueError, match=r"\[N, 1\]"):
        dk.scale_rows(np.ones((0, 8), dtype=np.float32), np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="N = 0"):
        dk.scale_rows(np.ones((0, 8), dtype=np.float32), [1.0, 2.0])
    with pytest.raises(TypeError, match="numbers"):
        dk.scale_rows(x, "2")
    with pytest.raises(TypeError, match="numbers"):
        dk.scale_rows(x, np.array(["1", "2", "3"]))
    # None (and None among numbers) would become NaN and wipe x: a misplaced argument.
    with pytest.raises(TypeError, match="numbers"):
        dk.scale_rows(x, None)
    with pytest.raises(TypeError, match="numbers"):
        dk.scale_rows(x, [None, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"\[N, 1\]"):
        dk.scale_rows(np.ones((4, 8), dtype=np.float32), np.ones((2, 2)))
    with pytest.raises(TypeError, match="numbers"):
        dk.scale_rows(x, np.array([1 + 1j, 2, 3]))
    with pytest.raises(TypeError, match="masked array"):
        dk.scale_rows(x, np.ma.masked_array([1.0, 2.0, 3.0], [0, 1, 0]))
    with pytest.raises(TypeError, match="masked array"):
        dk.scale_rows(np.ma.masked_array(x.copy(), x > 5), 2.0)
    assert np.all(x == 1.0)


def test_factor_shapes_and_dtypes():
    # [N, 1], [1, N], [1, 1], bfloat16 and integer factors: the same as a float32 [N].
    rng = np.random.default_rng(8)
    x0 = rng.standard_normal((3, 8)).astype(np.float32)
    f = np.array([2.0, -0.5, 3.0], dtype=np.float32)
    want = x0 * f[:, None]
    for factors in (f[:, None], f[None, :], f.astype(BF16), [2, -0.5, 3]):
        x = x0.copy()
        dk.scale_rows(x, factors)
        np.testing.assert_array_equal(x, want)
    x = x0.copy()
    dk.scale_rows(x, np.array([[2.0]]))
    np.testing.assert_array_equal(x, x0 * 2)


def test_factors_that_share_memory_with_x():
    # A row of a square x as the factors: read as they were before the call.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 4)).astype(np.float32)
    want = x * x[0].copy()[:, None]
    dk.scale_rows(x, x[0])
    np.testing.assert_array_equal(x, want)


def test_library_rejects_bad_shapes_and_writes_nothing():
    # Straight through the C ABI: the library's own checks, status mapped to the exception.
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    f = np.array([2.0, 3.0, 4.0], dtype=np.float32)
    ctx = _lib.context(-1)
    ptr = x.ctypes.data
    for n, v, stride, fs, dtype, err in [
        (3, 4, 3, f.ctypes.data, _lib.DTYPE_F32, dk.ShapeError),  # stride < v
        (3, 4, 4, f.ctypes.data, 9, dk.UnsupportedDtypeError),
        (3, 0, 4, f.ctypes.data, _lib.DTYPE_F32, dk.ShapeError),  # v = 0 (n = 0: nothing to do)
        (3, 4, 4, None, _lib.DTYPE_F32, dk.NullPointerError),
    ]:
        with pytest.raises(err):
            _lib.scale_rows_call(ctx, ptr, dtype, n, v, stride, fs, 1, None)
    with pytest.raises(dk.ShapeError, match="factor_stride"):
        _lib.scale_rows_call(ctx, ptr, _lib.DTYPE_F32, 3, 4, 4, f.ctypes.data, -1, None)
    np.testing.assert_array_equal(x, np.arange(12, dtype=np.float32).reshape(3, 4))
    _lib.scale_rows_call(ctx, ptr, _lib.DTYPE_F32, 3, 4, 4, f.ctypes.data, 1, None)
    np.testing.assert_array_equal(x, np.arange(12, dtype=np.float32).reshape(3, 4) * f[:, None])


def test_factors_from_any_sequence_of_numbers():
    """Factors are numbers in any form numpy reads: a range, an array.array, a memoryview."""
    import array

    for factors in (range(1, 4), array.array("f", [1.0, 2.0, 3.0]),
                    memoryview(np.array([1.0, 2.0, 3.0], np.float32))):
        x = np.ones((3, 8), dtype=np.float32)
        dk.scale_rows(x, factors)
        assert np.array_equal(x[:, 0], [1.0, 2.0, 3.0]), type(factors)
