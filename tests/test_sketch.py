"""CountSketch, TensorSketch, GaussianSketch and SRHT against float64 oracles."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from subquad_ds import SRHT, CountSketch, GaussianSketch, TensorSketch

from _oracles import (
    countsketch_rows,
    countsketch_variance,
    gaussian_sketch_variance,
    kron_rows,
    tensorsketch_variance,
)
from conftest import rtol_for

ALL_SKETCHES = [CountSketch, GaussianSketch, SRHT]


def _sparse_rows(rng, n, d, density, dtype):
    X = sp.random_array((n, d), density=density, format="csr", rng=rng, dtype=np.float64)
    X.data = rng.standard_normal(X.nnz)
    X.sort_indices()
    return X.astype(dtype)


# ----------------------------------------------------------------------------
# exactness against the explicit matrices
# ----------------------------------------------------------------------------

def test_countsketch_matches_oracle(dtype, rng):
    X = rng.standard_normal((40, 300)).astype(dtype)
    cs = CountSketch(300, 17, random_state=1)
    Y = cs.transform(X)
    assert Y.dtype == dtype and Y.shape == (40, 17)
    assert_allclose(Y, countsketch_rows(X, cs.buckets_, cs.signs_, 17),
                    rtol=rtol_for(dtype), atol=rtol_for(dtype) * 10)
    assert_allclose(cs.toarray(), np.eye(17)[cs.buckets_].T * cs.signs_)


def test_countsketch_csr_equals_dense(dtype, rng):
    X = _sparse_rows(rng, 50, 400, 0.05, dtype)
    cs = CountSketch(400, 32, random_state=3)
    assert_array_equal(cs.transform(X), cs.transform(X.toarray()))
    # other sparse formats, int64 indices and unsorted indices are accepted
    assert_allclose(cs.transform(X.tocoo()), cs.transform(X), rtol=rtol_for(dtype))
    X64 = sp.csr_array((X.data, X.indices.astype(np.int64), X.indptr.astype(np.int64)),
                       shape=X.shape)
    assert_array_equal(cs.transform(X64), cs.transform(X))


def test_tensorsketch_matches_kron_oracle(dtype, rng):
    U = rng.standard_normal((30, 12)).astype(dtype)
    V = rng.standard_normal((30, 9)).astype(dtype)
    ts = TensorSketch((12, 9), 16, random_state=5)
    Z = ts.transform(U, V)
    assert Z.dtype == dtype and Z.shape == (30, 16)
    expected = countsketch_rows(kron_rows(U, V), ts.buckets_, ts.signs_, 16)
    assert_allclose(Z, expected, rtol=rtol_for(dtype), atol=rtol_for(dtype) * 10)


def test_tensorsketch_csr_equals_dense(dtype, rng):
    U = _sparse_rows(rng, 40, 200, 0.05, dtype)
    V = _sparse_rows(rng, 40, 150, 0.05, dtype)
    ts = TensorSketch((200, 150), 64, random_state=0)
    Z = ts.transform(U, V)
    assert_array_equal(Z, ts.transform(U.toarray(), V.toarray()))
    assert_array_equal(Z, ts.transform(U, V.toarray()))
    expected = countsketch_rows(kron_rows(U.toarray(), V.toarray()), ts.buckets_, ts.signs_, 64)
    assert_allclose(Z, expected, rtol=rtol_for(dtype), atol=rtol_for(dtype) * 10)


def test_tensorsketch_blocks_rows(monkeypatch, rng):
    import subquad_ds.sketch as mod

    U, V = rng.standard_normal((37, 5)), rng.standard_normal((37, 4))
    ts = TensorSketch((5, 4), 8, random_state=0)
    full = ts.transform(U, V)
    monkeypatch.setattr(mod, "_FFT_BLOCK_ENTRIES", 8 * 5)  # 5 rows per block
    assert_allclose(ts.transform(U, V), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [GaussianSketch, SRHT])
def test_dense_sketches_are_linear_maps(cls, dtype, rng):
    X = rng.standard_normal((20, 50)).astype(dtype)
    sk = cls(50, 16, random_state=2)
    Y = sk.transform(X)
    assert Y.dtype == dtype and Y.shape == (20, 16)
    assert_allclose(Y, X.astype(np.float64) @ sk.toarray().T,
                    rtol=rtol_for(dtype) * 10, atol=rtol_for(dtype) * 10)
    Xs = sp.csr_array(X)
    assert_allclose(sk.transform(Xs), Y, rtol=rtol_for(dtype), atol=rtol_for(dtype))


def test_srht_rows_are_orthogonal():
    sk = SRHT(64, 16, random_state=0)
    S = sk.toarray()
    assert_allclose(S @ S.T, (64 / 16) * np.eye(16), atol=1e-12)


@given(n=st.integers(0, 6), d1=st.integers(1, 7), d2=st.integers(1, 7),
       s=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_tensorsketch_property(n, d1, d2, s, seed):
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n, d1)) * (rng.random((n, d1)) < 0.6)
    V = rng.standard_normal((n, d2))
    ts = TensorSketch((d1, d2), s, random_state=seed)
    expected = countsketch_rows(kron_rows(U, V), ts.buckets_, ts.signs_, s)
    assert_allclose(ts.transform(U, V), expected, rtol=1e-10, atol=1e-10)
    assert_allclose(ts.transform(sp.csr_array(U), V), expected, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------
# statistics: unbiasedness and variance against theory
# ----------------------------------------------------------------------------

def _estimates(make, x_rows, reps):
    out = np.empty(reps)
    for r in range(reps):
        Y = make(r)(x_rows)
        out[r] = Y[0] @ Y[1]
    return out


def test_countsketch_unbiased_with_known_variance():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal(24), rng.standard_normal(24)
    y[:12] += x[:12]  # correlated, so <x, y> and sum x^2 y^2 matter
    s, reps = 8, 8000
    est = _estimates(lambda r: CountSketch(24, s, random_state=r).transform,
                     np.array([x, y]), reps)
    var = countsketch_variance(x, y, s)
    assert abs(est.mean() - x @ y) <= 4.0 * np.sqrt(var / reps)
    # sample variance of ~8000 draws: relative std ~ sqrt((kurt - 1) / reps) ~ 2%
    assert est.var() == pytest.approx(var, rel=0.1)


def test_gaussian_sketch_unbiased_with_known_variance():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal(10), rng.standard_normal(10)
    s, reps = 4, 6000
    est = _estimates(lambda r: GaussianSketch(10, s, random_state=r).transform,
                     np.array([x, y]), reps)
    var = gaussian_sketch_variance(x, y, s)
    assert abs(est.mean() - x @ y) <= 4.0 * np.sqrt(var / reps)
    assert est.var() == pytest.approx(var, rel=0.15)


def test_srht_unbiased():
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal(13), rng.standard_normal(13)
    reps = 4000
    est = _estimates(lambda r: SRHT(13, 4, random_state=r).transform, np.array([x, y]), reps)
    # SRHT is never worse than 2x the Gaussian variance on these sizes; a loose bound
    # only sets the tolerance of the mean test.
    bound = 2 * gaussian_sketch_variance(x, y, 4) + np.var(est)
    assert abs(est.mean() - x @ y) <= 4.0 * np.sqrt(bound / reps)


def test_tensorsketch_variance_oracle_reduces_to_countsketch():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(5), rng.standard_normal(5)
    # d1 = 1: the bucket h1(0) + h2(k) is a shifted uniform hash, so TensorSketch
    # is a CountSketch of R^5
    assert tensorsketch_variance(x, y, (1, 5), 3) == pytest.approx(countsketch_variance(x, y, 3))


def test_tensorsketch_unbiased_with_exact_variance():
    rng = np.random.default_rng(1)
    u, v, u2, v2 = (rng.standard_normal(2), rng.standard_normal(3),
                    rng.standard_normal(2), rng.standard_normal(3))
    x, y = np.kron(u, v), np.kron(u2, v2)
    s, reps = 3, 10000
    var = tensorsketch_variance(x, y, (2, 3), s)
    # TensorSketch's buckets are only 3-wise independent: its variance differs
    # from a fully random CountSketch of the Kronecker vectors (by 30% here), so
    # the variance test below tells the two apart.
    assert abs(var - countsketch_variance(x, y, s)) > 0.25 * var
    U, V = np.array([u, u2]), np.array([v, v2])
    est = np.empty(reps)
    for r in range(reps):
        Z = TensorSketch((2, 3), s, random_state=r).transform(U, V)
        est[r] = Z[0] @ Z[1]
    assert abs(est.mean() - x @ y) <= 4.0 * np.sqrt(var / reps)
    # kurtosis ~3.6 here: the relative std of the sample variance is ~1.6%
    assert est.var() == pytest.approx(var, rel=0.08)


def test_tensorsketch_variance_within_anw_bound():
    # Avron-Nguyen-Woodruff: E (<TS x, TS y> - <x, y>)^2 <= (2 + 3^2) ||x||^2 ||y||^2 / s
    rng = np.random.default_rng(2)
    U, V = rng.standard_normal((2, 20)), rng.standard_normal((2, 15))
    x, y = np.kron(U[0], V[0]), np.kron(U[1], V[1])
    s, reps = 16, 2000
    est = np.empty(reps)
    for r in range(reps):
        Z = TensorSketch((20, 15), s, random_state=r).transform(U, V)
        est[r] = Z[0] @ Z[1]
    assert np.mean((est - x @ y) ** 2) <= 11 * (x @ x) * (y @ y) / s


# ----------------------------------------------------------------------------
# seeds, dtypes, layouts, threads
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ALL_SKETCHES)
def test_seeds_reproducible(cls, rng):
    X = rng.standard_normal((5, 40))
    assert_array_equal(cls(40, 8, random_state=3).transform(X),
                       cls(40, 8, random_state=3).transform(X))
    assert not np.array_equal(cls(40, 8, random_state=3).transform(X),
                              cls(40, 8, random_state=4).transform(X))
    g = np.random.default_rng(11)
    a, b = cls(40, 8, random_state=g), cls(40, 8, random_state=g)  # shared stream
    assert not np.array_equal(a.transform(X), b.transform(X))


def test_tensorsketch_seed_reproducible(rng):
    U, V = rng.standard_normal((4, 6)), rng.standard_normal((4, 5))
    assert_array_equal(TensorSketch((6, 5), 8, random_state=1).transform(U, V),
                       TensorSketch((6, 5), 8, random_state=1).transform(U, V))


@pytest.mark.parametrize("cls", ALL_SKETCHES)
def test_float32_agrees_with_float64(cls, rng):
    X = rng.standard_normal((10, 33))
    sk = cls(33, 12, random_state=0)
    Y64 = sk.transform(X)
    Y32 = sk.transform(X.astype(np.float32))
    assert Y64.dtype == np.float64 and Y32.dtype == np.float32
    assert_allclose(Y32, Y64, rtol=1e-4, atol=1e-4)
    assert sk.transform(X.astype(np.int64)).dtype == np.float64


def test_tensorsketch_dtype_rule(rng):
    U, V = rng.standard_normal((3, 4)), rng.standard_normal((3, 5))
    ts = TensorSketch((4, 5), 8, random_state=0)
    assert ts.transform(U.astype(np.float32), V.astype(np.float32)).dtype == np.float32
    assert ts.transform(U.astype(np.float32), V).dtype == np.float64


@pytest.mark.parametrize("cls", ALL_SKETCHES)
def test_non_contiguous_and_read_only_inputs(cls, rng):
    base = rng.standard_normal((12, 80))
    X = base[::2, ::2]
    X_ro = np.ascontiguousarray(X)
    X_ro.flags.writeable = False
    before = X.copy()
    sk = cls(40, 8, random_state=0)
    expected = sk.transform(np.ascontiguousarray(X))
    assert_array_equal(sk.transform(X), expected)
    assert_array_equal(sk.transform(X_ro), expected)
    assert_array_equal(X, before)


def test_single_row_is_1d(rng):
    x = rng.standard_normal(30)
    cs = CountSketch(30, 8, random_state=0)
    assert_array_equal(cs.transform(x), cs.transform(x[None])[0])
    ts = TensorSketch((30, 3), 8, random_state=0)
    v = rng.standard_normal(3)
    assert_allclose(ts.transform(x, v), ts.transform(x[None], v[None])[0])


def test_empty_batch():
    assert CountSketch(5, 3, random_state=0).transform(np.zeros((0, 5))).shape == (0, 3)
    assert TensorSketch((5, 2), 3, random_state=0).transform(
        np.zeros((0, 5)), np.zeros((0, 2))).shape == (0, 3)


def test_thread_count_does_not_change_result(rng, monkeypatch):
    import subquad_ds.sketch as mod

    monkeypatch.setattr(mod, "_PARALLEL_MIN_WORK", 0)  # threads even for small inputs
    X = _sparse_rows(rng, 300, 500, 0.05, np.float64)
    V = rng.standard_normal((300, 7))
    outs = [TensorSketch((500, 7), 64, random_state=0, n_threads=t).transform(X, V)
            for t in (1, 2, None)]
    assert_array_equal(outs[0], outs[1])
    assert_array_equal(outs[0], outs[2])


# ----------------------------------------------------------------------------
# validation messages
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ALL_SKETCHES)
def test_constructor_validation(cls):
    with pytest.raises(ValueError, match="sketch_size must be >= 1; got 0"):
        cls(10, 0)
    with pytest.raises(ValueError, match="input_dim must be >= 1; got 0"):
        cls(0, 4)
    with pytest.raises(TypeError, match="input_dim must be an integer"):
        cls(10.5, 4)
    with pytest.raises(TypeError, match="random_state must be None"):
        cls(10, 4, random_state="x")
    with pytest.raises(ValueError, match="n_threads = 0 is invalid"):
        cls(10, 4, n_threads=0)


def test_srht_sketch_size_limit():
    with pytest.raises(ValueError, match=r"sketch_size must be <= 16 .*SRHT; got 17"):
        SRHT(10, 17)


@pytest.mark.parametrize("cls", ALL_SKETCHES)
def test_transform_validation(cls):
    sk = cls(6, 4, random_state=0)
    with pytest.raises(ValueError, match="X has 5 features; the sketch was built for 6"):
        sk.transform(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="X must be 1-D or 2-D"):
        sk.transform(np.zeros((2, 2, 6)))
    with pytest.raises(ValueError, match="X must be finite"):
        sk.transform(np.full((1, 6), np.nan))
    with pytest.raises(ValueError, match="X must be finite"):
        sk.transform(sp.csr_array(np.full((1, 6), np.inf)))
    with pytest.raises(ValueError, match=r"X must have shape \(\*, 6\)"):
        sk.transform(sp.csr_array(np.ones((1, 5))))
    with pytest.raises(TypeError, match="X must hold real numbers"):
        sk.transform(np.zeros((1, 6), dtype=complex))
    with pytest.raises(TypeError, match="X must hold real numbers"):
        sk.transform(np.array([["a"] * 6]))


def test_tensorsketch_validation():
    with pytest.raises(TypeError, match="input_dims must be a pair of ints"):
        TensorSketch(5, 4)
    with pytest.raises(ValueError, match="input_dims must be a pair"):
        TensorSketch((5, 4, 3), 4)
    with pytest.raises(ValueError, match=r"input_dims\[1\] must be >= 1"):
        TensorSketch((5, 0), 4)
    ts = TensorSketch((3, 2), 4, random_state=0)
    with pytest.raises(ValueError, match="U and V must have the same number of rows; got 2 and 3"):
        ts.transform(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="V has 3 features; the sketch was built for 2"):
        ts.transform(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="U and V must both be 1-D or both 2-D"):
        ts.transform(np.zeros(3), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="U must be finite"):
        ts.transform(np.full((1, 3), np.nan), np.zeros((1, 2)))


def test_repr():
    assert repr(CountSketch(10, 4)) == "<CountSketch(input_dim=10, sketch_size=4)>"
    assert repr(TensorSketch((3, 2), 4)) == "<TensorSketch(input_dims=(3, 2), sketch_size=4)>"
