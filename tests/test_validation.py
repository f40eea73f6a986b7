import numpy as np
import pytest

from subquad_ds import openmp_enabled
from subquad_ds._validation import (
    all_finite,
    as_float_array,
    as_index_array,
    check_int,
    check_n_threads,
    check_random_state,
    check_scalar_or_vector,
    resolve_float_dtype,
)


def test_resolve_float_dtype_follows_input():
    assert resolve_float_dtype(np.zeros(3, np.float32)) == np.float32
    assert resolve_float_dtype(np.zeros(3, np.float64)) == np.float64
    assert resolve_float_dtype(np.zeros(3, np.int32)) == np.float64
    assert resolve_float_dtype([1.0, 2.0]) == np.float64
    assert resolve_float_dtype(np.zeros(3, np.float16)) == np.float64
    assert resolve_float_dtype([1.0], dtype=np.float32) == np.float32
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        resolve_float_dtype([1.0], dtype=np.int64)


def test_as_float_array_casts_and_keeps_fitting_input():
    X = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert as_float_array(X, "X", dtype=np.float64, ndim=2) is X
    out = as_float_array(X, "X", dtype=np.float32, ndim=2)
    assert out.dtype == np.float32 and out.flags.c_contiguous


def test_as_float_array_non_contiguous_and_read_only():
    X = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]
    X.flags.writeable = False
    out = as_float_array(X, "X", dtype=np.float64, ndim=2)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, X)
    ro = np.ones((2, 2))
    ro.flags.writeable = False
    assert as_float_array(ro, "X", dtype=np.float64) is ro


@pytest.mark.parametrize("bad", [np.array([1 + 2j]), np.array(["a"]), np.array([object()])])
def test_as_float_array_rejects_non_real(bad):
    with pytest.raises(TypeError, match="X must hold real numbers"):
        as_float_array(bad, "X", dtype=np.float64)


def test_as_float_array_messages():
    with pytest.raises(ValueError, match=r"X must be 2-D; got shape \(5,\)"):
        as_float_array(np.zeros(5), "X", dtype=np.float64, ndim=2)
    with pytest.raises(ValueError, match=r"w must have shape \(\*, 3\); got shape \(2, 4\)"):
        as_float_array(np.zeros((2, 4)), "w", dtype=np.float64, shape=(None, 3))
    with pytest.raises(ValueError, match="X is empty"):
        as_float_array(np.zeros((0, 3)), "X", dtype=np.float64, allow_empty=False)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="X must be finite; found NaN or inf"):
            as_float_array(np.array([0.0, bad]), "X", dtype=np.float64)
    # finite in float64 but overflows float32
    with pytest.raises(ValueError, match="must be finite"):
        as_float_array(np.array([1e300]), "X", dtype=np.float32)
    with pytest.raises(TypeError, match="X must be an array of real numbers"):
        as_float_array([[1.0], [1.0, 2.0]], "X", dtype=np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 131, 70_000])
def test_all_finite_finds_every_non_finite_entry(dtype, n):
    # the one-pass kernel (eight partial sums of x - x) against numpy, with
    # the bad value at every kind of position: first, in the 8-wide body,
    # in the tail, last; C and F order, read-only, and strided views
    rng = np.random.default_rng(n)
    x = rng.uniform(-0.5, 0.5, size=n).astype(dtype) * np.finfo(dtype).max
    x[0] = np.finfo(dtype).max
    x[-1] = -np.finfo(dtype).tiny / 2                  # subnormal
    assert all_finite(x)
    for pos in sorted({0, min(5, n - 1), n // 2, max(n - 3, 0), n - 1}):
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[pos] = bad
            assert not all_finite(y)
            y.flags.writeable = False
            assert not all_finite(y)
            assert not all_finite(np.asfortranarray(np.vstack([y, y]).T))
            assert not all_finite(np.repeat(y, 2)[::2])      # not contiguous
            assert all_finite(np.delete(y, pos))
    assert all_finite(np.zeros(0, dtype))
    assert all_finite(np.zeros((0, 3), dtype))


class _Sub(np.ndarray):
    pass


def test_as_float_array_keeps_subclasses_out():
    # ndarray subclasses (memmaps, ...) come back as plain ndarrays, as
    # before the no-cast fast path
    M = np.ones((2, 3)).view(_Sub)
    out = as_float_array(M, "X", dtype=np.float64, ndim=2)
    assert type(out) is np.ndarray and out.shape == (2, 3)
    with pytest.raises(ValueError, match="X must be finite"):
        as_float_array(np.array([[1.0, np.nan]]).view(_Sub), "X", dtype=np.float64, ndim=2)


def test_as_index_array():
    out = as_index_array([3, 1], "ids")
    assert out.dtype == np.intp and out.tolist() == [3, 1]
    assert as_index_array(np.uint8(7), "ids").tolist() == [7]
    assert as_index_array([], "ids").shape == (0,)
    with pytest.raises(TypeError, match="ids must be integers; got dtype float64"):
        as_index_array([1.0], "ids")
    with pytest.raises(ValueError, match="ids must be 1-D"):
        as_index_array([[1]], "ids")


def test_check_int():
    assert check_int(np.int64(3), "k", minimum=1) == 3
    with pytest.raises(TypeError, match="k must be an integer"):
        check_int(3.0, "k")
    with pytest.raises(TypeError, match="k must be an integer"):
        check_int(True, "k")
    with pytest.raises(ValueError, match="k must be >= 1; got 0"):
        check_int(0, "k", minimum=1)
    with pytest.raises(ValueError, match="k must be <= 2; got 3"):
        check_int(3, "k", maximum=2)
    assert check_int(None, "k", allow_none=True) is None


def test_check_scalar_or_vector():
    np.testing.assert_array_equal(check_scalar_or_vector(2, "b", length=3, dtype=np.float64), [2, 2, 2])
    np.testing.assert_array_equal(check_scalar_or_vector([1, 2, 3], "b", length=3, dtype=np.float64), [1, 2, 3])
    with pytest.raises(ValueError, match=r"b must broadcast to \(64,\); got shape \(3,\)"):
        check_scalar_or_vector([1, 2, 3], "b", length=64, dtype=np.float64)


def test_check_n_threads():
    assert check_n_threads(1) == 1
    assert check_n_threads(None) >= 1
    assert check_n_threads(-1) == check_n_threads(None)
    assert check_n_threads(-1000) == 1
    if openmp_enabled():
        assert check_n_threads(3) == 3
    with pytest.raises(ValueError, match="n_threads = 0 is invalid"):
        check_n_threads(0)
    with pytest.raises(TypeError, match="n_threads must be an integer"):
        check_n_threads(1.5)


def test_check_random_state():
    g = np.random.default_rng(1)
    assert check_random_state(g) is g
    a = check_random_state(5).standard_normal(3)
    b = check_random_state(5).standard_normal(3)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="random_state must be None"):
        check_random_state("x")
    with pytest.raises(TypeError, match="random_state must be None"):
        check_random_state(True)


def test_openmp_flag_is_bool():
    assert isinstance(openmp_enabled(), bool)


def test_check_float():
    from subquad_ds._validation import check_float

    assert check_float(np.float32(0.5), "tol", minimum=0.0, below=1.0) == 0.5
    assert isinstance(check_float(3, "x"), float)
    with pytest.raises(TypeError, match="x must be a real number"):
        check_float(True, "x")
    with pytest.raises(TypeError, match="x must be a real number"):
        check_float("1", "x")
    with pytest.raises(ValueError, match="x must be finite; got nan"):
        check_float(float("nan"), "x")
    with pytest.raises(ValueError, match="x must be >= 0.0; got -1.0"):
        check_float(-1, "x", minimum=0.0)
    with pytest.raises(ValueError, match="x must be < 1.0; got 1.0"):
        check_float(1.0, "x", below=1.0)


def test_as_float_csr():
    import scipy.sparse as sp

    from subquad_ds._validation import as_float_csr

    X = sp.coo_array(np.eye(3, dtype=np.float32))
    out = as_float_csr(X, "X", dtype=np.float64, shape=(None, 3))
    assert out.format == "csr" and out.dtype == np.float64
    with pytest.raises(TypeError, match="X must be a scipy.sparse matrix"):
        as_float_csr(np.eye(3), "X", dtype=np.float64)
    with pytest.raises(ValueError, match=r"X must have shape \(\*, 4\)"):
        as_float_csr(X, "X", dtype=np.float64, shape=(None, 4))
    with pytest.raises(TypeError, match="X must hold real numbers"):
        as_float_csr(sp.csr_array(np.eye(2, dtype=complex)), "X", dtype=np.float64)
