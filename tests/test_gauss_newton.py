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
    with pytest.raises(ValueError, match="damping must be finite and >= 0"):
        solve_gauss_newton(factors, r, damping=-1.0)
    with pytest.raises(ValueError, match=r"factors\[0\]\[1\] \(H\) must be finite"):
        solve_gauss_newton([(factors[0][0], np.full((30, 5), np.inf))], r, damping=1.0)
    with pytest.raises(ValueError, match="sketch_size must be >= 1"):
        solve_gauss_newton(factors, r, damping=1.0, method="sketched", sketch_size=0)
