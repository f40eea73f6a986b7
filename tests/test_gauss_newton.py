"""The Gauss-Newton system solver against a dense Jacobian of explicit Kronecker rows."""

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose

from subquad_ds._gauss_newton import (
    gram_matrix,
    jacobian_gram_matvec,
    jacobian_rmatvec,
    solve_gauss_newton,
)

from _oracles import kron_jacobian

METHODS = ["exact", "sketched", "jacobi"]


def _sparse(rng, n, m, k, *, nonneg=False):
    """CSR (n, m) with exactly k random nonzeros per row (k = 0 allowed)."""
    idx = np.argsort(rng.random((n, m)), axis=1)[:, :k]
    data = rng.standard_normal((n, k))
    if nonneg:
        data = np.abs(data)
    return sp.csr_array((data.ravel(), idx.ravel(), np.arange(0, n * k + 1, k)), shape=(n, m))


def _factors(rng, n, *, d=5, widths=(12, 10), k=3):
    """Layer 1: sparse D, dense H (the input); later layers: sparse D and sparse H >= 0."""
    factors = [(_sparse(rng, n, widths[0], k), rng.standard_normal((n, d)))]
    for prev, width in zip(widths[:-1], widths[1:]):
        factors.append((_sparse(rng, n, width, k), _sparse(rng, n, prev, k, nonneg=True)))
    return factors


@pytest.fixture
def small(rng):
    factors = _factors(rng, 30)
    return factors, kron_jacobian(factors), rng.standard_normal(30)


def test_gram_matches_dense_jacobian(small):
    factors, J, _ = small
    assert_allclose(gram_matrix(factors), J @ J.T, rtol=1e-12, atol=1e-12)


def test_matrix_free_products_match_dense_jacobian(small, rng):
    factors, J, _ = small
    v = rng.standard_normal(30)
    for threads in (1, 2):
        assert_allclose(jacobian_gram_matvec(factors, v, n_threads=threads), J @ (J.T @ v),
                        rtol=1e-12, atol=1e-12)
    blocks = jacobian_rmatvec(factors, v)
    assert [b.shape for b in blocks] == [(12, 5), (10, 12)]
    assert_allclose(np.concatenate([b.ravel() for b in blocks]), J.T @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("damping", [1e-6, 1e-2, 1.0])
def test_solution_matches_dense_solve(small, method, damping):
    factors, J, r = small
    expected = np.linalg.solve(J @ J.T + damping * np.eye(30), r)
    alpha, info = solve_gauss_newton(factors, r, damping=damping, method=method,
                                     random_state=0)
    assert info["method"] == method and info["converged"]
    A = J @ J.T + damping * np.eye(30)
    assert np.linalg.norm(A @ alpha - r) <= 1e-9 * np.linalg.norm(r)
    assert_allclose(alpha, expected, rtol=1e-6 * np.linalg.cond(A), atol=0)
    if method != "exact":
        assert info["residual_norms"][-1] <= 1e-10
        assert len(info["residual_norms"]) == info["iterations"] + 1


def test_sketched_uses_woodbury_below_n(small):
    factors, J, r = small
    alpha, info = solve_gauss_newton(factors, r, damping=1.0, method="sketched",
                                     sketch_size=10, random_state=0, max_iter=500)
    assert info["preconditioner"] == "woodbury" and info["sketch_size"] == 10
    assert np.linalg.norm((J @ J.T + np.eye(30)) @ alpha - r) <= 1e-9 * np.linalg.norm(r)


def test_sketched_iterations_fall_with_sketch_size(rng):
    factors = _factors(rng, 120, d=8, widths=(60, 60, 60), k=8)
    r = rng.standard_normal(120)
    its = [solve_gauss_newton(factors, r, damping=1e-8, method="sketched", sketch_size=s,
                              random_state=0)[1]["iterations"] for s in (240, 960)]
    assert its[1] < its[0] and its[1] <= 30


def test_dense_and_sparse_factors_agree(small):
    factors, _, r = small
    dense = [(D.toarray(), H.toarray() if sp.issparse(H) else H) for D, H in factors]
    a1, _ = solve_gauss_newton(factors, r, damping=1e-3, method="exact")
    a2, _ = solve_gauss_newton(dense, r, damping=1e-3, method="exact")
    assert_allclose(a1, a2, rtol=1e-12)


def test_weight_step_is_minus_jacobian_transpose(small):
    factors, J, r = small
    alpha, _ = solve_gauss_newton(factors, r, damping=1e-3, method="exact")
    step = J.T @ alpha
    # dW_l = -sum_i alpha_i D_l[i]^T H_{l-1}[i] is minus the GN step J^T alpha
    assert_allclose(np.concatenate([b.ravel() for b in jacobian_rmatvec(factors, alpha)]),
                    step, rtol=1e-12, atol=1e-12)
    # and it is the minimum-norm minimiser of ||J dx - r||^2 + damping ||dx||^2
    grad = J.T @ (J @ step - r) + 1e-3 * step
    assert np.linalg.norm(grad) <= 1e-8 * np.linalg.norm(J.T @ r)


def test_auto_is_exact_for_small_n(small):
    factors, _, r = small
    assert solve_gauss_newton(factors, r, damping=1e-3)[1]["method"] == "exact"


def test_singular_without_damping_raises(rng):
    factors = _factors(rng, 40, d=2, widths=(3, 3), k=1)  # 40 samples, 15 parameters
    with pytest.raises(ValueError, match="not positive definite.*increase damping"):
        solve_gauss_newton(factors, rng.standard_normal(40), damping=0.0, method="exact")


def test_zero_jacobian_row_with_jacobi(rng):
    factors = _factors(rng, 10)
    keep = sp.diags_array((np.arange(10) != 3).astype(float))  # sample 3: zero signal
    factors = [(sp.csr_array(keep @ D), H) for D, H in factors]
    r = rng.standard_normal(10)
    with pytest.raises(ValueError, match="zero diagonal entry"):
        solve_gauss_newton(factors, r, damping=0.0, method="jacobi")
    alpha, _ = solve_gauss_newton(factors, r, damping=1e-2, method="jacobi")
    assert alpha[3] == pytest.approx(r[3] / 1e-2)


def test_inputs_not_modified(small):
    factors, _, r = small
    before = [(D.copy(), H.copy()) for D, H in factors]
    r0 = r.copy()
    for method in METHODS:
        solve_gauss_newton(factors, r, damping=1e-3, method=method, random_state=0)
    for (D, H), (D0, H0) in zip(factors, before):
        assert (D != D0).nnz == 0
        if sp.issparse(H):
            assert (H != H0).nnz == 0
        else:
            np.testing.assert_array_equal(H, H0)
    np.testing.assert_array_equal(r, r0)


def test_validation_messages(small):
    factors, _, r = small
    with pytest.raises(ValueError, match="method must be one of"):
        solve_gauss_newton(factors, r, damping=1.0, method="newton")
    with pytest.raises(ValueError, match="factors must hold at least one"):
        solve_gauss_newton([], r, damping=1.0)
    with pytest.raises(TypeError, match=r"factors\[0\] must be a \(D, H\) pair"):
        solve_gauss_newton([factors[0][0]], r, damping=1.0)
    with pytest.raises(ValueError, match=r"factors\[1\]\[1\] \(H\) has 29 rows; expected 30"):
        solve_gauss_newton([factors[0], (factors[1][0], factors[1][1][:29])], r, damping=1.0)
    with pytest.raises(ValueError, match=r"residual must have shape \(30\)"):
        solve_gauss_newton(factors, r[:5], damping=1.0)
    with pytest.raises(ValueError, match="residual must be finite"):
        solve_gauss_newton(factors, np.full(30, np.nan), damping=1.0)
    with pytest.raises(ValueError, match="damping must be >= 0.0; got -1.0"):
        solve_gauss_newton(factors, r, damping=-1.0)
    with pytest.raises(ValueError, match="damping must be finite"):
        solve_gauss_newton(factors, r, damping=np.inf)
    with pytest.raises(ValueError, match="tol must be < 1.0"):
        solve_gauss_newton(factors, r, damping=1.0, tol=1.0)
    with pytest.raises(ValueError, match=r"factors\[0\]\[1\] \(H\) must be finite"):
        solve_gauss_newton([(factors[0][0], np.full((30, 5), np.inf))], r, damping=1.0)
    with pytest.raises(ValueError, match="sketch_size must be >= 1"):
        solve_gauss_newton(factors, r, damping=1.0, method="sketched", sketch_size=0)


def _tiny_mlp_factors(X, W1, W2, a):
    """Forward pass of f(x) = a^T relu(W2 relu(W1 x)); returns f and the GN factors."""
    z1 = X @ W1.T
    h1 = np.maximum(z1, 0.0)
    z2 = h1 @ W2.T
    h2 = np.maximum(z2, 0.0)
    f = h2 @ a
    D2 = a * (z2 > 0)              # df/dz2, (n, m)
    D1 = (D2 @ W2) * (z1 > 0)      # df/dz1, (n, m)
    return f, [(sp.csr_array(D1), X), (sp.csr_array(D2), sp.csr_array(h1))]


@pytest.mark.parametrize("method", ["exact", "jacobi"])
def test_gauss_newton_trains_a_tiny_mlp(method):
    """A reference Gauss-Newton loop: dW_l = -J_l^T alpha reaches MSE <= 1e-10 in <= 10 steps.

    This fixes the conventions the trainer relies on: row i of the layer-l
    Jacobian is D_l[i] (x) H_{l-1}[i] with D_l = df/dz_l, and
    jacobian_rmatvec(factors, alpha)[l] has the shape of W_l.
    """
    rng = np.random.default_rng(0)
    n, d, m = 16, 4, 64
    X = rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = np.sin(X @ rng.standard_normal(d))
    W1 = rng.standard_normal((m, d)) * np.sqrt(2.0 / d)
    W2 = rng.standard_normal((m, m)) * np.sqrt(2.0 / m)
    a = rng.choice([-1.0, 1.0], size=m) / np.sqrt(m)
    losses = []
    for _ in range(10):
        f, factors = _tiny_mlp_factors(X, W1, W2, a)
        losses.append(np.mean((f - y) ** 2))
        if losses[-1] <= 1e-10:
            break
        damping = 1e-10 * np.mean(np.diag(gram_matrix(factors)))
        alpha, _ = solve_gauss_newton(factors, f - y, damping=damping, method=method)
        dW1, dW2 = jacobian_rmatvec(factors, alpha)
        W1 -= dW1
        W2 -= dW2
    assert losses[-1] <= 1e-10, losses
    assert len(losses) <= 7  # quadratic convergence: 0.68, 5e-3, 2e-4, 1e-6, 5e-13


def test_gram_kernel_threads_and_empty_rows(rng, monkeypatch):
    import subquad_ds._gauss_newton as mod

    monkeypatch.setattr(mod, "_PARALLEL_MIN_WORK", 0)  # use threads even on a small input
    factors = _factors(rng, 50, d=3, widths=(40, 30), k=4)
    keep = sp.diags_array((np.arange(50) % 7 != 0).astype(float))  # some zero rows
    factors = [(sp.csr_array(keep @ D), H) for D, H in factors]
    J = kron_jacobian(factors)
    G1 = gram_matrix(factors, n_threads=1)
    G2 = gram_matrix(factors, n_threads=2)
    assert_allclose(G1, J @ J.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(G1, G2)
    np.testing.assert_array_equal(G1, G1.T)


def test_auto_follows_the_cost_model(small, monkeypatch):
    import subquad_ds._gauss_newton as mod

    factors, J, r = small
    monkeypatch.setattr(mod, "AUTO_EXACT_MIN_N", 10)
    monkeypatch.setattr(mod, "_T_FLOP", 1.0)  # Cholesky "expensive": Jacobi CG
    alpha, info = solve_gauss_newton(factors, r, damping=1e-2)
    assert info["method"] == "jacobi" and info["auto_estimate"][0] > info["auto_estimate"][1]
    assert np.linalg.norm((J @ J.T + 1e-2 * np.eye(30)) @ alpha - r) <= 1e-9 * np.linalg.norm(r)
    monkeypatch.setattr(mod, "_T_FLOP", 0.0)
    monkeypatch.setattr(mod, "_T_KRON", 1.0)
    assert solve_gauss_newton(factors, r, damping=1e-2)[1]["method"] == "exact"


def test_cost_model_counts(rng):
    from subquad_ds._gauss_newton import _check_factors, _estimate_seconds

    import subquad_ds._gauss_newton as mod

    factors, n = _check_factors(_factors(rng, 30))
    exact, jacobi = _estimate_seconds(factors, n)
    # layer 1: 3 x 5 pairs per sample, layer 2: 3 x 3
    assert jacobi == pytest.approx(mod.AUTO_CG_ITERS * mod._T_KRON * 30 * (15 + 9))
    assert exact > mod._T_FLOP * 30**3 / 3


def test_unsorted_and_duplicate_csr_inputs_untouched(rng):
    factors = _factors(rng, 12)
    D, H = factors[0]
    # reverse each row's indices and split every entry into two halves (duplicates)
    rows = np.repeat(np.arange(12), np.diff(D.indptr))
    idx, val = D.indices[::-1].copy(), D.data[::-1].copy()
    order = np.argsort(rows[::-1], kind="stable")
    idx, val = idx[order], val[order]
    indptr = D.indptr * 2
    D2 = sp.csr_array((np.repeat(val / 2, 2), np.repeat(idx, 2), indptr), shape=D.shape)
    snapshot = (D2.data.copy(), D2.indices.copy())
    r = rng.standard_normal(12)
    a1, _ = solve_gauss_newton([(D2, H)] + factors[1:], r, damping=1e-3, method="exact")
    a2, _ = solve_gauss_newton(factors, r, damping=1e-3, method="exact")
    assert_allclose(a1, a2, rtol=1e-10)
    np.testing.assert_array_equal(D2.data, snapshot[0])
    np.testing.assert_array_equal(D2.indices, snapshot[1])
