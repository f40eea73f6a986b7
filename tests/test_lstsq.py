"""sketched_lstsq against numpy.linalg.lstsq (float64)."""

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from subquad_ds import sketched_lstsq


def _problem(rng, m, n, cond, *, noise=0.1):
    """A = U diag(sigma) V^T with log-spaced sigma in [1/cond, 1], b with a residual."""
    U, _ = np.linalg.qr(rng.standard_normal((m, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (U * np.logspace(0, -np.log10(cond), n)) @ V.T
    b = A @ rng.standard_normal(n) + noise * rng.standard_normal(m)
    return A, b


def _optimality(A, b, x):
    """||A^T r|| / (||A||_2 ||r||): the relative residual of the normal equations."""
    r = b - A @ x
    return np.linalg.norm(A.T @ r) / (np.linalg.norm(A, 2) * np.linalg.norm(r))


@pytest.mark.parametrize("cond", [1e0, 1e4, 1e8])
@pytest.mark.parametrize("m,n", [(3000, 40), (1500, 100)])
def test_reaches_1e8_in_30_iterations(m, n, cond):
    rng = np.random.default_rng(int(cond) % 97 + n)
    A, b = _problem(rng, m, n, cond)
    x, info = sketched_lstsq(A, b, random_state=0, return_info=True)
    assert info["converged"] and info["iterations"] <= 30
    assert info["preconditioner"] == "qr"
    assert _optimality(A, b, x) <= 1e-8
    x_np = np.linalg.lstsq(A, b, rcond=None)[0]
    r, r_np = np.linalg.norm(b - A @ x), np.linalg.norm(b - A @ x_np)
    assert abs(r - r_np) <= 1e-10 * r_np
    # the forward error is limited by cond(A) (and cond(A)^2 ||r||), not by the solver
    assert np.linalg.norm(x - x_np) <= max(1e-9, cond * 1e-10) * np.linalg.norm(x_np)


def test_consistent_system_recovers_x():
    rng = np.random.default_rng(3)
    A, _ = _problem(rng, 1500, 30, 1e6)
    x_true = rng.standard_normal(30)
    x, info = sketched_lstsq(A, A @ x_true, random_state=1, return_info=True)
    assert info["iterations"] <= 30
    assert np.linalg.norm(A @ x - A @ x_true) <= 1e-8 * np.linalg.norm(A @ x_true)
    assert_allclose(x, x_true, rtol=1e-4)


def test_sparse_and_linear_operator_inputs_agree():
    rng = np.random.default_rng(4)
    A = sp.random_array((4000, 60), density=0.05, format="csr", rng=rng)
    A = A + sp.eye_array(4000, 60)  # full column rank
    A = sp.csr_array(A @ sp.diags_array(np.logspace(0, -6, 60)))
    b = rng.standard_normal(4000)
    x_np = np.linalg.lstsq(A.toarray(), b, rcond=None)[0]
    for op in (A, A.tocsc(), aslinearoperator(A)):
        x, info = sketched_lstsq(op, b, random_state=0, return_info=True)
        assert info["iterations"] <= 30
        assert _optimality(A.toarray(), b, x) <= 1e-8
        assert_allclose(x, x_np, rtol=1e-6)


def test_matvec_only_linear_operator(monkeypatch):
    rng = np.random.default_rng(5)
    A, b = _problem(rng, 2500, 50, 1e8)
    calls = {"matvec": 0, "rmatvec": 0}

    def mv(x):
        calls["matvec"] += 1
        return A @ x

    def rmv(y):
        calls["rmatvec"] += 1
        return A.T @ y

    op = LinearOperator(A.shape, matvec=mv, rmatvec=rmv, dtype=np.float64)
    import subquad_ds.lstsq as mod

    monkeypatch.setattr(mod, "_BLOCK_ENTRIES", 2500 * 7)  # 7 identity columns per block
    x, info = sketched_lstsq(op, b, random_state=0, return_info=True)
    assert _optimality(A, b, x) <= 1e-8 and info["iterations"] <= 30
    # S A costs n products with A (LinearOperator.matmat falls back to matvecs);
    # then one per LSQR iteration plus the warm start and the final answer
    assert calls["matvec"] == 50 + info["iterations"] + 1
    assert calls["rmatvec"] == info["iterations"] + 1


def test_rank_deficient_uses_svd_preconditioner():
    rng = np.random.default_rng(6)
    B = rng.standard_normal((1000, 10))
    A = np.hstack([B, B[:, :3] @ rng.standard_normal((3, 4))])  # rank 10, 14 columns
    b = rng.standard_normal(1000)
    x, info = sketched_lstsq(A, b, random_state=0, return_info=True)
    assert info["preconditioner"] == "svd" and info["rank"] == 10
    x_np = np.linalg.lstsq(A, b, rcond=None)[0]
    assert np.linalg.norm(b - A @ x) == pytest.approx(np.linalg.norm(b - A @ x_np), rel=1e-10)
    assert_allclose(x, x_np, rtol=1e-6)  # the minimum-norm solution


def test_no_sketch_when_sketch_size_reaches_m():
    rng = np.random.default_rng(7)
    A, b = _problem(rng, 300, 40, 1e8)
    x, info = sketched_lstsq(A, b, sketch_size=1000, random_state=0, return_info=True)
    assert info["sketch_size"] == 300 and info["iterations"] <= 3
    assert _optimality(A, b, x) <= 1e-8


def test_info_and_reproducibility():
    rng = np.random.default_rng(8)
    A, b = _problem(rng, 1000, 20, 1e3)
    x1, info = sketched_lstsq(A, b, random_state=3, return_info=True)
    x2 = sketched_lstsq(A, b, random_state=3)
    np.testing.assert_array_equal(x1, x2)
    assert set(info) >= {"iterations", "residual_norms", "optimality", "sketch_size",
                         "time_sketch", "time_qr", "time_iterations", "converged"}
    assert len(info["residual_norms"]) == info["iterations"] + 1
    assert info["sketch_size"] == 8 * 20 + 64 or info["sketch_size"] == 160
    assert info["optimality"][-1] <= 1e-10


def test_float32_input_returns_float32():
    rng = np.random.default_rng(9)
    A, b = _problem(rng, 800, 10, 1e2)
    x = sketched_lstsq(A.astype(np.float32), b.astype(np.float32), random_state=0)
    assert x.dtype == np.float32
    assert_allclose(x, np.linalg.lstsq(A.astype(np.float32).astype(np.float64),
                                       b.astype(np.float32).astype(np.float64),
                                       rcond=None)[0], rtol=1e-5)


def test_non_convergence_warns():
    rng = np.random.default_rng(10)
    A, b = _problem(rng, 800, 20, 1e8)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        sketched_lstsq(A, b, max_iter=2, random_state=0)


def test_inputs_not_modified():
    rng = np.random.default_rng(11)
    A, b = _problem(rng, 500, 10, 10.0)
    A = np.asfortranarray(A)
    A.flags.writeable = False
    b.flags.writeable = False
    A0, b0 = A.copy(), b.copy()
    sketched_lstsq(A, b, random_state=0)
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(b, b0)


def test_validation_messages():
    A = np.ones((10, 3))
    b = np.ones(10)
    with pytest.raises(ValueError, match="at least as many rows as columns"):
        sketched_lstsq(np.ones((2, 3)), np.ones(2))
    with pytest.raises(ValueError, match=r"b must have shape \(10,\) to match A; got shape \(9,\)"):
        sketched_lstsq(A, np.ones(9))
    with pytest.raises(ValueError, match="A must be finite"):
        sketched_lstsq(np.full((10, 3), np.nan), b)
    with pytest.raises(ValueError, match="b must be finite"):
        sketched_lstsq(A, np.full(10, np.inf))
    with pytest.raises(ValueError, match="sketch_size must be >= 3; got 2"):
        sketched_lstsq(A, b, sketch_size=2)
    with pytest.raises(ValueError, match=r"tol must be in \[0, 1\)"):
        sketched_lstsq(A, b, tol=2.0)
    with pytest.raises(TypeError, match="A must be an ndarray, a scipy.sparse matrix or a LinearOperator"):
        sketched_lstsq("A", b)
    with pytest.raises(ValueError, match="A must be 2-D"):
        sketched_lstsq(np.ones(10), b)
    with pytest.raises(ValueError, match="max_iter must be >= 0"):
        sketched_lstsq(A, b, max_iter=-1)
