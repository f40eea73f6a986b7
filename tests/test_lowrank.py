"""LowRankUpdatedMatrix against the float64 numpy oracle."""

import copy
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from numpy.testing import assert_allclose, assert_array_equal
from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, lsqr

from subquad_ds import LowRankUpdatedMatrix
from subquad_ds.lowrank import default_max_rank

from _oracles import lowrank_dense, sparse_to_dense
from conftest import rtol_for


def assert_product_close(got, want, dtype, scale):
    """Compare with an absolute tolerance relative to the size of the terms summed."""
    assert got.dtype == np.dtype(dtype)
    assert got.shape == want.shape
    assert_allclose(got, want, rtol=0, atol=rtol_for(dtype) * max(scale, 1.0))


def make_matrix(rng, m, n, dtype, *, order="C", mode="copy", max_rank=None):
    """A matrix in one of the storage modes, its float64 start and the input array."""
    W0 = np.asarray(rng.standard_normal((m, n)), dtype=dtype, order=order)
    start = W0.astype(np.float64)
    if mode == "copy":
        A = LowRankUpdatedMatrix(W0, max_rank=max_rank)
    elif mode == "inplace":
        A = LowRankUpdatedMatrix(W0, max_rank=max_rank, copy=False)
    elif mode == "frozen":
        W0.flags.writeable = False
        A = LowRankUpdatedMatrix(W0, max_rank=max_rank, copy=False)
    else:
        raise AssertionError(mode)
    return A, start, W0


MODES = ["copy", "inplace", "frozen"]


def check_all_products(A, ref, rng, dtype):
    """Every product of A against the dense float64 matrix ref."""
    m, n = ref.shape
    scale_w = np.abs(ref).max()
    x = rng.standard_normal(n)
    z = rng.standard_normal(m)
    assert_product_close(A.matvec(x), ref @ x, dtype, scale_w * np.abs(x).sum())
    assert_product_close(A.rmatvec(z), ref.T @ z, dtype, scale_w * np.abs(z).sum())
    assert_product_close(A @ x, ref @ x, dtype, scale_w * np.abs(x).sum())
    assert_product_close(z @ A, z @ ref, dtype, scale_w * np.abs(z).sum())
    col = A.matvec(x[:, None])
    assert col.shape == (m, 1)
    assert_product_close(col[:, 0], ref @ x, dtype, scale_w * np.abs(x).sum())
    # sparse input, with a duplicate index
    nnz = max(1, n // 5)
    idx = rng.integers(0, n, nnz)
    idx[0] = idx[-1]
    vals = rng.standard_normal(nnz)
    xs = sparse_to_dense(idx, vals, n)
    scale = scale_w * np.abs(vals).sum()
    assert_product_close(A.matvec((idx, vals)), ref @ xs, dtype, scale)
    assert_product_close(A @ (idx, vals), ref @ xs, dtype, scale)
    jdx = rng.integers(0, m, max(1, m // 5))
    zvals = rng.standard_normal(jdx.shape[0])
    zs = sparse_to_dense(jdx, zvals, m)
    assert_product_close(A.rmatvec((jdx, zvals)), ref.T @ zs, dtype,
                         scale_w * np.abs(zvals).sum())
    # row-restricted, dense and sparse input, few rows and many rows
    for k in (1, max(1, m // 10), 2 * m):
        rows = rng.integers(0, m, k)
        assert_product_close(A.matvec(x, rows=rows), (ref @ x)[rows], dtype,
                             scale_w * np.abs(x).sum())
        assert_product_close(A.matvec((idx, vals), rows=rows), (ref @ xs)[rows], dtype, scale)
    cols = rng.integers(0, n, max(1, n // 3))
    assert_product_close(A.rmatvec(z, rows=cols), (ref.T @ z)[cols], dtype,
                         scale_w * np.abs(z).sum())
    assert_product_close(A.rmatvec((jdx, zvals), rows=cols), (ref.T @ zs)[cols], dtype,
                         scale_w * np.abs(zvals).sum())
    # matrix products
    X = rng.standard_normal((n, 3))
    Z = rng.standard_normal((m, 4))
    assert_product_close(A.matmat(X), ref @ X, dtype, scale_w * np.abs(X).sum(0).max())
    assert_product_close(A @ X, ref @ X, dtype, scale_w * np.abs(X).sum(0).max())
    assert_product_close(A.rmatmat(Z), ref.T @ Z, dtype, scale_w * np.abs(Z).sum(0).max())
    assert_product_close(Z.T @ A, Z.T @ ref, dtype, scale_w * np.abs(Z).sum(0).max())
    assert A.matmat(np.empty((n, 0))).shape == (m, 0)
    assert_product_close(A.toarray(), ref, dtype, scale_w)
    assert_product_close(np.asarray(A), ref, dtype, scale_w)
    assert np.asarray(A, dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("shape", [(37, 23), (23, 37), (1, 9), (9, 1), (600, 40)])
def test_products_match_oracle(dtype, order, mode, shape, rng):
    m, n = shape
    A, start, _ = make_matrix(rng, m, n, dtype, order=order, mode=mode,
                              max_rank=min(4, m, n))
    updates = []
    check_all_products(A, start, rng, dtype)
    for step in range(7):
        s = int(rng.integers(1, 4))
        U, V = rng.standard_normal((m, s)), rng.standard_normal((n, s))
        if s == 1 and step % 2:
            U, V = U[:, 0], V[:, 0]
        A.update(U, V)
        updates.append((U, V))
        assert 0 <= A.pending_rank <= A.max_rank
        check_all_products(A, lowrank_dense(start, updates), rng, dtype)
    assert A.n_flushes >= 1
    A.flush()
    assert A.pending_rank == 0
    check_all_products(A, lowrank_dense(start, updates), rng, dtype)


def test_update_beyond_max_rank_folds_directly(dtype, rng):
    A, start, _ = make_matrix(rng, 20, 15, dtype, max_rank=3)
    u, v = rng.standard_normal(20), rng.standard_normal(15)
    A.update(u, v)
    U, V = rng.standard_normal((20, 5)), rng.standard_normal((15, 5))
    A.update(U, V)  # flushes the pending rank-1, then folds the rank-5 directly
    assert A.pending_rank == 0
    assert A.n_flushes == 2
    ref = lowrank_dense(start, [(u, v), (U, V)])
    assert_product_close(A.toarray(), ref, dtype, np.abs(ref).max())
    A.update(np.empty((20, 0)), np.empty((15, 0)))  # rank 0: nothing happens
    assert A.pending_rank == 0 and A.n_flushes == 2
    A.flush()  # nothing pending: no fold
    assert A.n_flushes == 2


def test_flush_happens_only_when_the_buffer_overflows(rng):
    A = LowRankUpdatedMatrix(rng.standard_normal((10, 10)), max_rank=4)
    for i in range(4):
        A.update(rng.standard_normal(10), rng.standard_normal(10))
    assert (A.pending_rank, A.n_flushes) == (4, 0)
    A.update(rng.standard_normal(10), rng.standard_normal(10))
    assert (A.pending_rank, A.n_flushes) == (1, 1)
    A.update(rng.standard_normal((10, 3)), rng.standard_normal((10, 3)))
    assert (A.pending_rank, A.n_flushes) == (4, 1)
    A.update(rng.standard_normal((10, 2)), rng.standard_normal((10, 2)))
    assert (A.pending_rank, A.n_flushes) == (2, 2)


@pytest.mark.parametrize("mode", ["copy", "frozen"])
def test_drift_after_10000_rank1_updates(dtype, mode):
    """10,000 rank-1 updates with 625 folds stay at float rounding level."""
    rng = np.random.default_rng(7)
    m, n, steps = 48, 40, 10_000
    A, start, _ = make_matrix(rng, m, n, dtype, mode=mode, max_rank=16)
    W = start.copy()
    Us = rng.standard_normal((steps, m)) / np.sqrt(steps)
    Vs = rng.standard_normal((steps, n))
    for u, v in zip(Us, Vs):
        A.update(u, v)
        W += np.outer(u, v)
    assert A.n_flushes == steps // 16 - 1
    A.flush()
    eps = np.finfo(dtype).eps
    # Each entry is a sum of `steps` terms of size ~1/sqrt(steps): the error of
    # summing them in the working precision grows like sqrt(#folds) * eps.
    # Observed: 5-8 eps (float32) and ~33 eps (float64) for 625 folds; eager
    # float32 `W += outer(u, v)` reaches ~30 eps on the same sequence.
    err = np.abs(A.toarray() - W).max() / np.abs(W).max()
    assert err < 4 * np.sqrt(A.n_flushes) * eps, err / eps
    x = rng.standard_normal(n)
    y = W @ x
    assert np.abs(A.matvec(x) - y).max() / np.abs(y).max() < 100 * np.sqrt(A.n_flushes) * eps


def test_float32_agrees_with_float64(rng):
    W0 = rng.standard_normal((64, 48))
    A64 = LowRankUpdatedMatrix(W0, max_rank=5)
    A32 = LowRankUpdatedMatrix(W0.astype(np.float32), max_rank=5)
    assert A64.dtype == np.float64 and A32.dtype == np.float32
    for _ in range(12):
        u, v = rng.standard_normal(64), rng.standard_normal(48)
        A64.update(u, v)
        A32.update(u, v)  # float64 input is cast to the matrix's float32
    x = rng.standard_normal(48)
    assert A32.matvec(x).dtype == np.float32
    assert_allclose(A32.matvec(x), A64.matvec(x), rtol=1e-4, atol=1e-4)


def test_as_float_array_order():
    from subquad_ds._validation import as_float_array

    c = np.ones((3, 2))
    f = np.asfortranarray(c)
    assert as_float_array(f, "X", dtype=np.float64, order="A") is f
    assert as_float_array(c, "X", dtype=np.float64, order="A") is c
    assert as_float_array(c, "X", dtype=np.float64, order="F").flags.f_contiguous
    assert as_float_array(f, "X", dtype=np.float64).flags.c_contiguous
    assert as_float_array(c[:, ::2], "X", dtype=np.float64, order="A").flags.c_contiguous


def test_dtype_rule():
    assert LowRankUpdatedMatrix(np.ones((2, 2), dtype=np.float32)).dtype == np.float32
    assert LowRankUpdatedMatrix(np.ones((2, 2), dtype=np.float64)).dtype == np.float64
    assert LowRankUpdatedMatrix(np.ones((2, 2), dtype=np.float16)).dtype == np.float64
    assert LowRankUpdatedMatrix(np.ones((2, 2), dtype=int)).dtype == np.float64
    assert LowRankUpdatedMatrix([[1, 2], [3, 4]]).dtype == np.float64


# ---------------------------------------------------------------- storage modes

def test_copy_true_never_touches_w0(rng):
    W0 = rng.standard_normal((8, 6))
    keep = W0.copy()
    A = LowRankUpdatedMatrix(W0, max_rank=2)
    for _ in range(5):
        A.update(rng.standard_normal(8), rng.standard_normal(6))
    A.flush()
    assert_array_equal(W0, keep)
    assert not A.frozen


@pytest.mark.parametrize("order", ["C", "F"])
def test_copy_false_writeable_is_updated_in_place(order, rng):
    W0 = np.asarray(rng.standard_normal((8, 6)), order=order)
    start = W0.copy()
    A = LowRankUpdatedMatrix(W0, max_rank=2, copy=False)
    u, v = rng.standard_normal(8), rng.standard_normal(6)
    A.update(u, v)
    assert_array_equal(W0, start)  # pending: the base is not yet touched
    A.flush()
    assert_allclose(W0, start + np.outer(u, v), rtol=1e-12)
    assert not A.frozen


def test_copy_false_with_a_cast_copies(rng):
    W0 = rng.standard_normal((8, 6)).astype(np.float16)
    W0.flags.writeable = False
    A = LowRankUpdatedMatrix(W0, copy=False)  # float16 -> float64 copy: not frozen
    assert not A.frozen
    W1 = rng.standard_normal((8, 12))[:, ::2]  # non-contiguous: copied
    W1.flags.writeable = False
    assert not LowRankUpdatedMatrix(W1, copy=False).frozen


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("mmap_mode", ["r", "r+", "c"])
def test_memmap_base_is_never_written(tmp_path, dtype, order, mmap_mode, rng):
    m, n = 30, 20
    W0 = np.asarray(rng.standard_normal((m, n)), dtype=dtype, order=order)
    path = tmp_path / "w.npy"
    np.save(path, W0)
    before = path.read_bytes()
    W = np.load(path, mmap_mode=mmap_mode)
    assert isinstance(W, np.memmap)
    A = LowRankUpdatedMatrix(W, max_rank=3, copy=False)
    assert A.frozen
    updates = []
    for _ in range(10):
        u, v = rng.standard_normal(m), rng.standard_normal(n)
        A.update(u, v)
        updates.append((u, v))
    A.flush()
    ref = lowrank_dense(W0, updates)
    check_all_products(A, ref, rng, dtype)
    B = A.copy()
    B.update(rng.standard_normal(m), rng.standard_normal(n))
    B.flush()
    C = pickle.loads(pickle.dumps(A))
    assert C.frozen and not isinstance(C._base, np.memmap)
    assert_array_equal(C.toarray(), A.toarray())
    del A, B, C, W
    assert path.read_bytes() == before


def test_frozen_copy_shares_base_but_not_updates(rng):
    W0 = rng.standard_normal((10, 7))
    W0.flags.writeable = False
    A = LowRankUpdatedMatrix(W0, max_rank=2, copy=False)
    A.update(rng.standard_normal(10), rng.standard_normal(7))
    B = A.copy()
    assert np.shares_memory(B._base, W0)
    before = A.toarray()
    for _ in range(5):
        B.update(rng.standard_normal(10), rng.standard_normal(7))
    assert_array_equal(A.toarray(), before)
    assert B.frozen and B.n_flushes == 2


def test_copy_is_independent(rng):
    A = LowRankUpdatedMatrix(rng.standard_normal((10, 7)), max_rank=3)
    A.update(rng.standard_normal((10, 2)), rng.standard_normal((7, 2)))
    for B in (A.copy(), copy.copy(A), copy.deepcopy(A)):
        assert_array_equal(B.toarray(), A.toarray())
        assert (B.pending_rank, B.max_rank, B.n_flushes) == (2, 3, 0)
        before = A.toarray()
        B.update(rng.standard_normal(10), rng.standard_normal(7))
        B.flush()
        assert_array_equal(A.toarray(), before)


# ---------------------------------------------------------------- inputs

def test_readonly_and_noncontiguous_inputs_are_accepted(dtype, rng):
    A, start, _ = make_matrix(rng, 12, 9, dtype, max_rank=4)
    U = rng.standard_normal((12, 4))[:, ::2]  # non-contiguous
    V = np.asfortranarray(rng.standard_normal((9, 2)))
    U_keep, V_keep = U.copy(), V.copy()
    U.flags.writeable = V.flags.writeable = False
    A.update(U, V)
    assert_array_equal(U, U_keep)
    assert_array_equal(V, V_keep)
    ref = lowrank_dense(start, [(U, V)])
    x = rng.standard_normal(18)[::2]
    x.flags.writeable = False
    scale = np.abs(ref).max() * np.abs(x).sum()
    assert_product_close(A.matvec(x), ref @ x, dtype, scale)
    X = np.asfortranarray(rng.standard_normal((9, 3)))
    assert_product_close(A.matmat(X), ref @ X, dtype, np.abs(ref).max() * np.abs(X).sum())
    idx = np.array([8, 0, 3], dtype=np.int32)
    vals = np.array([1, 2, 3])  # integers are cast
    assert_product_close(A.matvec((idx, vals)), ref @ sparse_to_dense(idx, vals, 9), dtype,
                         np.abs(ref).max() * 6)
    assert A.matvec((np.array([], dtype=np.intp), np.array([]))).tolist() == [0] * 12
    assert A.matvec(x, rows=[]).shape == (0,)


def state_of(A):
    return (A.toarray(), A.pending_rank, A.n_flushes, A.max_rank)


def assert_same_state(A, state):
    arr, r, f, mr = state
    assert_array_equal(A.toarray(), arr)
    assert (A.pending_rank, A.n_flushes, A.max_rank) == (r, f, mr)


@pytest.mark.parametrize(
    "U, V, exc, match",
    [
        (np.ones(5), np.ones(4), ValueError, r"U must have 6 rows \(matrix shape \(6, 4\)\); got shape \(5, 1\)"),
        (np.ones(6), np.ones(5), ValueError, r"V must have 4 rows .*got shape \(5, 1\)"),
        (np.ones((6, 2)), np.ones((4, 3)), ValueError, r"same number of columns \(the update rank\); got 2 and 3"),
        (np.ones(6), np.ones((4, 1)), ValueError, r"both be 1-D .* or both 2-D; got shapes \(6,\) and \(4, 1\)"),
        (np.ones((6, 1, 1)), np.ones((4, 1)), ValueError, r"U must be 1-D or 2-D; got shape \(6, 1, 1\)"),
        (np.full(6, np.nan), np.ones(4), ValueError, r"U must be finite; found NaN or inf"),
        (np.ones(6), np.array([1, 2, np.inf, 4]), ValueError, r"V must be finite"),
        (np.full(6, 1e300), np.ones(4), ValueError, r"U must be finite"),  # overflows float32 only
        (np.ones(6, dtype=complex), np.ones(4), TypeError, r"U must hold real numbers"),
        (np.array(["a"] * 6), np.ones(4), TypeError, r"U must hold real numbers"),
    ],
)
def test_bad_update_raises_and_leaves_matrix_unchanged(U, V, exc, match, rng):
    for dt in (np.float32, np.float64):
        A = LowRankUpdatedMatrix(rng.standard_normal((6, 4)).astype(dt), max_rank=2)
        A.update(rng.standard_normal(6), rng.standard_normal(4))
        state = state_of(A)
        if dt == np.float64 and U.dtype == np.float64 and np.isfinite(U).all() and U.max() > 1e299:
            A.update(U, V)  # finite in float64: accepted
            continue
        with pytest.raises(exc, match=match):
            A.update(U, V)
        assert_same_state(A, state)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda A: A.matvec(np.ones(5)), ValueError, r"x must have shape \(4,\) or \(4, 1\); got shape \(5,\)"),
        (lambda A: A.matvec(np.ones((4, 2))), ValueError, r"x must have shape \(4,\) or \(4, 1\); got shape \(4, 2\)"),
        (lambda A: A.rmatvec(np.ones(4)), ValueError, r"x must have shape \(6,\)"),
        (lambda A: A.matvec(np.array([1, np.nan, 0, 0])), ValueError, r"x must be finite"),
        (lambda A: A.matvec(np.ones(4, dtype=object)), TypeError, r"x must hold real numbers"),
        (lambda A: A.matvec(([0, 4], [1.0, 2.0])), ValueError, r"x indices must be in \[0, 4\); got values from 0 to 4"),
        (lambda A: A.matvec(([-1], [1.0])), ValueError, r"x indices must be in \[0, 4\)"),
        (lambda A: A.matvec(([0, 1], [1.0])), ValueError, r"x indices and x values must have the same length; got 2 and 1"),
        (lambda A: A.matvec(([0.0], [1.0])), TypeError, r"x indices must be integers"),
        (lambda A: A.matvec(([0], [np.inf])), ValueError, r"x values must be finite"),
        (lambda A: A.matvec(([0], [1.0], 3)), ValueError, r"a sparse x must be a pair \(indices, values\)"),
        (lambda A: A.matvec(np.ones(4), rows=[6]), ValueError, r"rows must be in \[0, 6\); got values from 6 to 6"),
        (lambda A: A.matvec(np.ones(4), rows=[[0]]), ValueError, r"rows must be 1-D"),
        (lambda A: A.rmatvec(np.ones(6), rows=[4]), ValueError, r"rows must be in \[0, 4\)"),
        (lambda A: A.matmat(np.ones((5, 2))), ValueError, r"X must have shape \(4, k\); got shape \(5, 2\)"),
        (lambda A: A.matmat(np.ones(4)), ValueError, r"X must be 2-D"),
        (lambda A: A.rmatmat(np.ones((4, 2))), ValueError, r"X must have shape \(6, k\)"),
        (lambda A: A @ np.ones((4, 1, 1)), ValueError, r"operand of @ must be 1-D or 2-D; got 3-D"),
        (lambda A: np.asarray(A, copy=False), ValueError, r"without a copy"),
    ],
)
def test_bad_product_input_raises_and_leaves_matrix_unchanged(call, exc, match, rng):
    A = LowRankUpdatedMatrix(rng.standard_normal((6, 4)), max_rank=2)
    A.update(rng.standard_normal(6), rng.standard_normal(4))
    state = state_of(A)
    with pytest.raises(exc, match=match):
        call(A)
    assert_same_state(A, state)


@pytest.mark.parametrize(
    "W0, kwargs, exc, match",
    [
        (np.ones(3), {}, ValueError, r"W0 must be 2-D; got shape \(3,\)"),
        (np.ones((0, 3)), {}, ValueError, r"W0 is empty; got shape \(0, 3\)"),
        (np.array([[1.0, np.nan]]), {}, ValueError, r"W0 must be finite; found NaN or inf"),
        (np.ones((2, 2), dtype=complex), {}, TypeError, r"W0 must hold real numbers"),
        (np.ones((4, 3)), {"max_rank": 0}, ValueError, r"max_rank must be >= 1; got 0"),
        (np.ones((4, 3)), {"max_rank": 4}, ValueError, r"max_rank must be <= 3; got 4"),
        (np.ones((4, 3)), {"max_rank": 2.0}, TypeError, r"max_rank must be an integer"),
        (np.ones((4, 3)), {"copy": "no"}, TypeError, r"copy must be a bool"),
    ],
)
def test_bad_constructor_input(W0, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LowRankUpdatedMatrix(W0, **kwargs)


def test_default_max_rank():
    assert default_max_rank(8192, 8192) == 128
    assert default_max_rank(1024, 1024) == 45
    assert default_max_rank(100, 100) == 16  # clipped below
    assert default_max_rank(10**6, 10**6) == 256  # clipped above
    assert default_max_rank(5, 1000) == 5  # never above min(m, n)
    assert LowRankUpdatedMatrix(np.zeros((1024, 1024))).max_rank == 45


def test_repr(rng):
    A = LowRankUpdatedMatrix(rng.standard_normal((5, 3)).astype(np.float32), max_rank=2)
    A.update(np.ones(5), np.ones(3))
    assert repr(A) == (
        "<LowRankUpdatedMatrix(shape=(5, 3), dtype=float32, pending_rank=1, "
        "max_rank=2, frozen=False)>"
    )


# ---------------------------------------------------------------- pickling

@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("mode", MODES)
def test_pickle_round_trip(protocol, mode, dtype, rng):
    A, start, _ = make_matrix(rng, 15, 11, dtype, order="C", mode=mode, max_rank=3)
    for _ in range(5):
        A.update(rng.standard_normal(15), rng.standard_normal(11))
    assert A.pending_rank == 2
    B = pickle.loads(pickle.dumps(A, protocol=protocol))
    assert (B.shape, B.dtype, B.pending_rank, B.max_rank, B.n_flushes, B.frozen) == (
        A.shape, A.dtype, A.pending_rank, A.max_rank, A.n_flushes, A.frozen)
    assert_array_equal(B.toarray(), A.toarray())
    x = rng.standard_normal(11)
    assert_array_equal(B.matvec(x), A.matvec(x))
    before = A.toarray()
    B.update(rng.standard_normal(15), rng.standard_normal(11))
    B.flush()
    assert_array_equal(A.toarray(), before)


def test_pickle_rejects_unknown_version(rng):
    A = LowRankUpdatedMatrix(rng.standard_normal((3, 3)))
    func, (state,) = A.__reduce__()
    state = dict(state, version=99)
    with pytest.raises(ValueError, match="state version 99"):
        func(state)


# ---------------------------------------------------------------- scipy interop

def test_aslinearoperator_cg(dtype, rng):
    m = 40
    G = rng.standard_normal((m, m))
    A = LowRankUpdatedMatrix((G @ G.T / m + np.eye(m)).astype(dtype), max_rank=4)
    ref = G @ G.T / m + np.eye(m)
    for _ in range(6):  # symmetric positive semi-definite updates keep it SPD
        u = rng.standard_normal(m) / np.sqrt(m)
        A.update(u, u)
        ref += np.outer(u, u)
    op = aslinearoperator(A)
    assert op.shape == (m, m) and op.dtype == dtype
    b = rng.standard_normal(m)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    x, info = cg(op, b, rtol=rtol, maxiter=500)
    assert info == 0
    assert_allclose(x, np.linalg.solve(ref, b), rtol=0, atol=50 * rtol * np.abs(b).max())


def test_aslinearoperator_lsqr(rng):
    m, n = 60, 25
    W0 = rng.standard_normal((m, n))
    A = LowRankUpdatedMatrix(W0, max_rank=4)
    updates = [(rng.standard_normal((m, 2)), rng.standard_normal((n, 2))) for _ in range(3)]
    for U, V in updates:
        A.update(U, V)
    ref = lowrank_dense(W0, updates)
    b = rng.standard_normal(m)
    op = aslinearoperator(A)
    x = lsqr(op, b, atol=1e-12, btol=1e-12, iter_lim=1000)[0]
    assert_allclose(x, np.linalg.lstsq(ref, b, rcond=None)[0], rtol=1e-6, atol=1e-8)
    assert_allclose(op.rmatmat(np.eye(m)), ref.T, atol=1e-12)
    assert_allclose(op.matmat(np.eye(n)), ref, atol=1e-12)
    full = LinearOperator(A.shape, matvec=A.matvec, rmatvec=A.rmatvec, matmat=A.matmat,
                          rmatmat=A.rmatmat, dtype=A.dtype)
    assert_allclose(full.matmat(np.eye(n)), ref, atol=1e-12)
    assert_allclose(full.H.matmat(np.eye(m)), ref.T, atol=1e-12)


# ---------------------------------------------------------------- threads

def test_thread_count_does_not_change_results(dtype, monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from subquad_ds import lowrank
    from subquad_ds._openmp_helpers import max_threads

    monkeypatch.setattr(lowrank, "_PARALLEL_MIN_WORK", 0)  # threads even for small calls
    assert lowrank._n_threads(1) == max_threads()
    rng = np.random.default_rng(3)
    m, n = 2048, 300
    A, _, _ = make_matrix(rng, m, n, dtype, max_rank=8)
    A.update(rng.standard_normal((m, 3)), rng.standard_normal((n, 3)))
    idx = rng.integers(0, n, 64)
    vals = rng.standard_normal(64)
    rows = rng.integers(0, m, 1500)
    x = rng.standard_normal(n)

    def run():
        return [A.matvec((idx, vals)), A.matvec((idx, vals), rows=rows),
                A.matvec(x, rows=rows[:100]), A.rmatvec((rows[:64], vals))]

    many = run()
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        one = run()
    for a, b in zip(many, one):
        assert_array_equal(a, b)


# ---------------------------------------------------------------- hypothesis

class LowRankMachine(RuleBasedStateMachine):
    """Random sequences of updates, folds, products and bad inputs vs the oracle."""

    @initialize(
        m=st.integers(1, 12), n=st.integers(1, 12), max_rank=st.integers(1, 5),
        dtype=st.sampled_from([np.float32, np.float64]),
        order=st.sampled_from("CF"), mode=st.sampled_from(MODES), seed=st.integers(0, 2**16),
    )
    def setup(self, m, n, max_rank, dtype, order, mode, seed):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.A, start, self.W0 = make_matrix(
            self.rng, m, n, dtype, order=order, mode=mode, max_rank=min(max_rank, m, n))
        self.frozen_copy = self.W0.copy() if mode == "frozen" else None
        self.ref = start

    @rule(s=st.integers(0, 7), one_d=st.booleans())
    def update(self, s, one_d):
        m, n = self.A.shape
        U, V = self.rng.standard_normal((m, s)), self.rng.standard_normal((n, s))
        if one_d and s == 1:
            U, V = U[:, 0], V[:, 0]
        before = self.A.pending_rank
        self.A.update(U, V)
        self.ref = lowrank_dense(self.ref, [(U, V)])
        s_eff = s
        if s_eff > self.A.max_rank:
            assert self.A.pending_rank == 0
        elif before + s_eff > self.A.max_rank:
            assert self.A.pending_rank == s_eff
        else:
            assert self.A.pending_rank == before + s_eff

    @rule()
    def flush(self):
        f = self.A.n_flushes
        had = self.A.pending_rank > 0
        self.A.flush()
        assert self.A.pending_rank == 0
        assert self.A.n_flushes == f + had

    @rule(nnz=st.integers(0, 6), n_rows=st.integers(0, 6), restrict=st.booleans(),
          transpose=st.booleans(), sparse=st.booleans())
    def product(self, nnz, n_rows, restrict, transpose, sparse):
        ref = self.ref.T if transpose else self.ref
        p, q = ref.shape
        f = self.A.rmatvec if transpose else self.A.matvec
        if sparse:
            idx = self.rng.integers(0, q, nnz)
            vals = self.rng.standard_normal(nnz)
            x, xd = (idx, vals), sparse_to_dense(idx, vals, q)
        else:
            x = xd = self.rng.standard_normal(q)
        rows = self.rng.integers(0, p, n_rows) if restrict else None
        want = ref @ xd
        if restrict:
            want = want[rows]
        scale = np.abs(ref).max() * np.abs(xd).sum()
        assert_product_close(f(x, rows=rows), want, self.dtype, scale)

    @rule(b=st.integers(0, 3), transpose=st.booleans())
    def matmat(self, b, transpose):
        ref = self.ref.T if transpose else self.ref
        X = self.rng.standard_normal((ref.shape[1], b))
        got = self.A.rmatmat(X) if transpose else self.A.matmat(X)
        scale = np.abs(ref).max() * (np.abs(X).sum(0).max() if b else 1)
        assert_product_close(got, ref @ X, self.dtype, scale)

    @rule()
    def bad_update(self):
        m, n = self.A.shape
        state = state_of(self.A)
        U = self.rng.standard_normal(m)
        U[0] = np.nan
        with pytest.raises(ValueError, match="U must be finite"):
            self.A.update(U, np.ones(n))
        with pytest.raises(ValueError, match="V must have"):
            self.A.update(np.ones(m), np.ones(n + 1))
        assert_same_state(self.A, state)

    @rule()
    def pickle_round_trip(self):
        self.A = pickle.loads(pickle.dumps(self.A))

    @rule()
    def copy_then_diverge(self):
        """A copy takes its own updates; the original keeps its state."""
        B = self.A.copy()
        m, n = self.A.shape
        before = state_of(self.A)
        for _ in range(self.A.max_rank + 1):  # forces a fold in B
            B.update(self.rng.standard_normal(m), self.rng.standard_normal(n))
        assert_same_state(self.A, before)
        assert B.frozen == self.A.frozen

    @rule(nnz=st.integers(0, 4))
    def bad_sparse_product(self, nnz):
        m, n = self.A.shape
        state = state_of(self.A)
        idx = np.full(max(nnz, 1), n)  # out of range
        with pytest.raises(ValueError, match=r"x indices must be in \[0, "):
            self.A.matvec((idx, np.ones(idx.shape[0])))
        with pytest.raises(ValueError, match="rows must be in"):
            self.A.matvec(np.ones(n), rows=[m])
        assert_same_state(self.A, state)

    @precondition(lambda self: getattr(self, "frozen_copy", None) is not None)
    @invariant()
    def frozen_base_untouched(self):
        assert_array_equal(self.W0, self.frozen_copy)

    @invariant()
    def matches_oracle(self):
        if hasattr(self, "A"):
            assert 0 <= self.A.pending_rank <= self.A.max_rank
            assert_product_close(self.A.toarray(), self.ref, self.dtype, np.abs(self.ref).max())


TestLowRankMachine = LowRankMachine.TestCase
TestLowRankMachine.settings = settings(stateful_step_count=30, deadline=None)


@given(
    shape=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    k=st.integers(0, 25),
    seed=st.integers(0, 2**16),
)
def test_sparse_equals_dense_product(shape, k, seed):
    """A sparse matvec equals the dense matvec of the densified vector (float64)."""
    rng = np.random.default_rng(seed)
    m, n = shape
    A = LowRankUpdatedMatrix(rng.standard_normal((m, n)), max_rank=1)
    A.update(rng.standard_normal(m), rng.standard_normal(n))
    idx = rng.integers(0, n, k)
    vals = rng.standard_normal(k)
    xd = sparse_to_dense(idx, vals, n)
    assert_allclose(A.matvec((idx, vals)), A.matvec(xd), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", ["F", "C"])
@pytest.mark.parametrize("nnz", range(10))
def test_sparse_products_every_column_remainder(dtype, order, nnz, rng):
    """The column kernel adds four columns per pass: cover every remainder,
    blocks of outputs beyond one block, duplicates and restricted rows."""
    m, n = 4096 + 37, 50
    W0 = np.asarray(rng.standard_normal((m, n)), dtype=dtype, order=order)
    A = LowRankUpdatedMatrix(W0, copy=False)
    idx = rng.integers(0, n, nnz)  # duplicates add up
    vals = rng.standard_normal(nnz)
    rows = rng.integers(0, m, 300)
    ref = W0.astype(np.float64) @ sparse_to_dense(idx, vals, n)
    rtol = rtol_for(dtype)
    assert_allclose(A.matvec((idx, vals)), ref, rtol=rtol, atol=rtol * 10)
    assert_allclose(A.matvec((idx, vals), rows=rows), ref[rows], rtol=rtol, atol=rtol * 10)
