"""Shifted-ReLU sparsifier, schedules and the compiled kernels against numpy oracles."""

import math

import hypothesis.extra.numpy as hynp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, sparse, special

from subquad_ds import (
    init_scale,
    resolve_sparsity,
    shifted_relu,
    shifted_relu_topk,
    threshold_for_sparsity,
)
from subquad_ds import _sparse_mlp

from _oracles import shifted_relu_dense, topk_threshold
from conftest import rtol_for


def _check_csr(H, expected, dtype):
    assert isinstance(H, sparse.csr_array)
    assert H.dtype == dtype
    assert H.shape == expected.shape
    for i in range(H.shape[0]):
        row = H.indices[H.indptr[i]:H.indptr[i + 1]]
        assert np.all(np.diff(row) > 0), "indices sorted within a row"
    assert np.all(H.data > 0), "only strictly positive activations are stored"
    np.testing.assert_allclose(H.toarray(), expected, rtol=rtol_for(dtype), atol=0)


# -- shifted_relu -----------------------------------------------------------

def test_shifted_relu_matches_oracle(dtype, rng):
    Z = rng.standard_normal((7, 50)).astype(dtype)
    _check_csr(shifted_relu(Z, 0.8), shifted_relu_dense(Z, 0.8), dtype)
    b = rng.uniform(0, 1.5, size=7)
    _check_csr(shifted_relu(Z, b), shifted_relu_dense(Z, b.astype(dtype)), dtype)


def test_shifted_relu_relative_multiplies_by_norms(dtype, rng):
    Z = rng.standard_normal((5, 30)).astype(dtype)
    norms = rng.uniform(0.2, 2.0, size=5)
    H = shifted_relu(Z, 0.5, relative=norms)
    _check_csr(H, shifted_relu_dense(Z, 0.5 * norms.astype(dtype)), dtype)


def test_shifted_relu_tie_at_threshold_is_inactive():
    Z = np.array([[1.0, 2.0, 1.0 + 1e-12], [0.0, 1.0, -1.0]])
    H = shifted_relu(Z, 1.0)
    assert H.indices.tolist() == [1, 2]
    assert H.indptr.tolist() == [0, 2, 2]


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1)])
def test_shifted_relu_edge_shapes(shape):
    Z = np.ones(shape)
    H = shifted_relu(Z, 0.5)
    assert H.shape == shape
    np.testing.assert_array_equal(H.toarray(), shifted_relu_dense(Z, 0.5))


@given(hynp.arrays(np.float64, hynp.array_shapes(min_dims=2, max_dims=2, max_side=12),
                   elements=st.floats(-4, 4)),
       st.floats(-1, 2))
def test_shifted_relu_property(Z, b):
    _check_csr(shifted_relu(Z, b), shifted_relu_dense(Z, b), np.float64)


def test_shifted_relu_accepts_readonly_and_noncontiguous(rng):
    Z = rng.standard_normal((6, 40))
    Zf = np.asfortranarray(Z)
    Zf.flags.writeable = False
    before = Zf.copy()
    H = shifted_relu(Zf[:, ::2], 0.3)
    np.testing.assert_allclose(H.toarray(), shifted_relu_dense(Z[:, ::2], 0.3))
    np.testing.assert_array_equal(Zf, before)


def test_shifted_relu_validation():
    with pytest.raises(ValueError, match="Z must be finite"):
        shifted_relu(np.array([[np.nan, 1.0]]), 0.0)
    with pytest.raises(ValueError, match="Z must be 2-D"):
        shifted_relu(np.ones(3), 0.0)
    with pytest.raises(ValueError, match=r"b must broadcast to \(2,\)"):
        shifted_relu(np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="relative must have shape"):
        shifted_relu(np.ones((2, 3)), 1.0, relative=np.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        shifted_relu(np.ones((2, 3)), 1.0, relative=-np.ones(2))
    with pytest.raises(TypeError, match="Z must hold real numbers"):
        shifted_relu(np.ones((2, 3), dtype=complex), 1.0)


# -- top-k --------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 29])
def test_shifted_relu_topk_matches_oracle(dtype, rng, k):
    Z = rng.standard_normal((6, 30)).astype(dtype)
    H, t = shifted_relu_topk(Z, k)
    np.testing.assert_allclose(t, topk_threshold(Z, k), rtol=rtol_for(dtype))
    _check_csr(H, shifted_relu_dense(Z, t), dtype)
    assert np.all(np.diff(H.indptr) == k)


def test_shifted_relu_topk_ties_drop_together():
    Z = np.array([[3.0, 1.0, 1.0, 0.0]])
    H, t = shifted_relu_topk(Z, 2)  # the 3rd largest is 1.0: both ones are dropped
    assert t.tolist() == [1.0]
    assert H.indices.tolist() == [0]


def test_shifted_relu_topk_validation():
    with pytest.raises(ValueError, match="k must be <="):
        shifted_relu_topk(np.ones((2, 3)), 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        shifted_relu_topk(np.ones((2, 3)), 0)


# -- schedules ----------------------------------------------------------------

@pytest.mark.parametrize("p", [0.5, 0.1, 0.01, 1e-4])
def test_threshold_for_sparsity_inverts_the_tail(p):
    tau = threshold_for_sparsity(p)
    assert special.ndtr(-tau) == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 2])
def test_threshold_for_sparsity_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\)"):
        threshold_for_sparsity(bad)


@pytest.mark.parametrize("tau", [0.0, 1.0, 2.3])
def test_init_scale_keeps_the_norm(tau):
    # c(tau) = E[max(g - tau, 0)^2] by quadrature.
    c, _ = integrate.quad(lambda g: (g - tau) ** 2 * math.exp(-g * g / 2) / math.sqrt(2 * math.pi),
                          tau, np.inf)
    assert init_scale(100, tau) == pytest.approx(1 / math.sqrt(100 * c), rel=1e-9)


def test_init_scale_keeps_the_norm_empirically(rng):
    # One wide relative-rule layer keeps ||h|| ~ 1 and the active fraction ~ p.
    m, tau = 4000, 1.5
    s = init_scale(m, tau)
    x = rng.standard_normal((20, 64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    Z = x @ (rng.standard_normal((64, m)) * s)
    H = shifted_relu(Z, tau * s, relative=np.ones(20))
    norms = np.sqrt(np.asarray(H.multiply(H).sum(axis=1)))
    assert np.mean(norms) == pytest.approx(1.0, abs=0.05)
    assert H.nnz / (20 * m) == pytest.approx(special.ndtr(-tau), rel=0.1)


def test_resolve_sparsity():
    tau, p, k = resolve_sparsity(16384)
    assert tau == pytest.approx(math.sqrt(0.4 * math.log(16384)))
    assert p == pytest.approx(0.0244, abs=1e-3) and k is None
    assert resolve_sparsity(1000, 0.05)[1:] == (0.05, None)
    tau, p, k = resolve_sparsity(1000, 40)
    assert (p, k) == (0.04, 40)
    with pytest.raises(ValueError, match="sparsity must be 'sqrt-log'"):
        resolve_sparsity(100, "log")
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        resolve_sparsity(100, 1.5)
    with pytest.raises(ValueError, match="sparsity must be <= 99"):
        resolve_sparsity(100, 100)
    with pytest.raises(TypeError, match="sparsity must be"):
        resolve_sparsity(100, True)


# -- compiled kernels against dense numpy -------------------------------------

def _random_csr(rng, n, d, density, dtype):
    M = rng.uniform(0.1, 1.0, size=(n, d)) * (rng.random((n, d)) < density)
    H = sparse.csr_array(M.astype(dtype))
    H.sort_indices()
    return (H.indptr.astype(np.intp), H.indices.astype(np.int32), H.data), H.toarray()


@pytest.mark.parametrize("rule", [0, 1, 2])
def test_sparse_forward_matches_dense(dtype, rng, rule):
    n, d, m, k = 9, 40, 60, 7
    (indptr, indices, data), Hd = _random_csr(rng, n, d, 0.3, dtype)
    WT = rng.standard_normal((d, m)).astype(dtype)
    norms = np.sqrt((Hd.astype(np.float64) ** 2).sum(axis=1)).astype(dtype)
    b = dtype(0.4)
    out = _sparse_mlp.sparse_forward(WT, indptr, indices, data, rule, b, norms, k, 1)
    Z = Hd.astype(np.float64) @ WT
    t = [np.full(n, 0.4), 0.4 * norms.astype(np.float64), topk_threshold(Z, k)][rule]
    np.testing.assert_allclose(out[3], t, rtol=rtol_for(dtype) * 10)
    H = sparse.csr_array((out[2], out[1], out[0]), shape=(n, m)).toarray()
    np.testing.assert_allclose(H, shifted_relu_dense(Z, out[3]), rtol=rtol_for(dtype) * 10,
                               atol=rtol_for(dtype) * 10)
    out2 = _sparse_mlp.sparse_forward(WT, indptr, indices, data, rule, b, norms, k, 2)
    for a, c in zip(out, out2):
        np.testing.assert_array_equal(a, c)  # thread count does not change the result


def test_sparse_backward_and_update_match_dense(dtype, rng):
    n, d, m = 8, 30, 50
    (i_ptr, i_idx, i_data), Hin = _random_csr(rng, n, d, 0.3, dtype)
    (o_ptr, o_idx, _), Hout = _random_csr(rng, n, m, 0.2, dtype)
    delta = rng.standard_normal(len(o_idx)).astype(dtype)
    D = sparse.csr_array((delta, o_idx, o_ptr), shape=(n, m)).toarray().astype(np.float64)
    WT = rng.standard_normal((d, m)).astype(dtype)
    norms = np.sqrt((Hin.astype(np.float64) ** 2).sum(axis=1))
    got = _sparse_mlp.sparse_backward(WT, o_ptr, o_idx, delta, i_ptr, i_idx, i_data,
                                      norms.astype(dtype), dtype(0.7), 1)
    G = D @ WT.T.astype(np.float64)
    scale = np.divide(D.sum(axis=1), norms, out=np.zeros(n), where=norms > 0)
    G -= 0.7 * scale[:, None] * Hin
    expected = G[Hin > 0]  # row-major order = CSR order
    np.testing.assert_allclose(got, expected, rtol=rtol_for(dtype) * 10, atol=rtol_for(dtype) * 10)

    for n_threads in (1, 2, 3):
        W2 = WT.copy()
        _sparse_mlp.sparse_update(W2, o_ptr, o_idx, delta, i_ptr, i_idx, i_data,
                                  dtype(0.1), n_threads)
        np.testing.assert_allclose(W2, WT - 0.1 * (Hin.astype(np.float64).T @ D),
                                   rtol=rtol_for(dtype) * 10, atol=rtol_for(dtype) * 10)
