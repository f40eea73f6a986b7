"""Sketching benchmarks: TensorSketch vs forming Kronecker rows, and the GN solvers.

Run:  pytest bench/bench_sketch.py --benchmark-only --benchmark-group-by=group
Smoke: pytest bench/bench_sketch.py --benchmark-disable

Groups
------
kron-sketch-m4096-{1,5}pct
    Sketch n = 256 Kronecker rows u_i (x) v_i, u, v in R^4096 with 1% or 5%
    random supports, into s = 1024: TensorSketch.transform(U, V) vs forming
    the sparse Kronecker rows (vectorised numpy, nnz(u) nnz(v) entries each)
    then a CountSketch of R^(4096^2) (our Cython kernel, fully random
    hash).  extra_info["rows"] gives the rows per call (divide the median by it).
kron-dense-m4096-5pct
    The same rows formed densely (16.7M entries each, 134 MB in float64),
    CountSketched, one row at a time, 2 rows; vs TensorSketch on those rows.
kron-gaussian-m128
    A dense Gaussian sketch of the Kronecker rows is infeasible at m = 4096
    (S would be 1024 x 16.7M, 137 GB in float64): it is measured at
    m = 128 (d1 d2 = 16384, S = 134 MB), the largest size that fits
    comfortably on the shared machine, next to TensorSketch at the same size.
    Its cost is proportional to d1 d2 s, so m = 4096 costs (4096/128)^2 =
    1024 times more.
gn-solve-{1,5}pct-n{64,256}
    solve_gauss_newton on random sparse factors shaped like a width-4096,
    3-layer MLP (input dim 64), damping 1e-6 x mean diag: exact Gram +
    Cholesky vs TensorSketch-preconditioned CG (s = 4n) vs Jacobi CG.  The
    sweep over n up to 4096 is bench/sketch_gn_crossover.py (too long for
    the smoke run).
"""

import numpy as np
import pytest
import scipy.sparse as sp

from subquad_ds import CountSketch, GaussianSketch, TensorSketch
from subquad_ds._gauss_newton import _gram_diagonal, _check_factors, solve_gauss_newton

M = 4096
S = 1024
N_ROWS = 256


def _fixed_k_csr(rng, n, m, k, *, nonneg=False):
    """CSR (n, m) with exactly k random nonzeros per row, sorted indices."""
    idx = np.sort(np.argsort(rng.random((n, m)), axis=1)[:, :k], axis=1)
    data = rng.standard_normal((n, k))
    if nonneg:
        data = np.abs(data)
    return sp.csr_array((data.ravel(), idx.ravel(), np.arange(0, n * k + 1, k)), shape=(n, m))


def _sparse_kron_rows(U, V):
    """CSR of the rows u_i (x) v_i for fixed-k CSR U, V (vectorised numpy)."""
    n, d2 = U.shape[0], V.shape[1]
    k1, k2 = np.diff(U.indptr)[0], np.diff(V.indptr)[0]
    ud, vd = U.data.reshape(n, k1), V.data.reshape(n, k2)
    ui, vi = U.indices.reshape(n, k1).astype(np.int64), V.indices.reshape(n, k2).astype(np.int64)
    data = (ud[:, :, None] * vd[:, None, :]).ravel()
    indices = (ui[:, :, None] * d2 + vi[:, None, :]).ravel()
    indptr = np.arange(0, n * k1 * k2 + 1, k1 * k2, dtype=np.int64)
    return sp.csr_array((data, indices, indptr), shape=(n, U.shape[1] * d2))


@pytest.fixture(scope="module", params=[0.01, 0.05], ids=["1pct", "5pct"])
def kron_rows(request):
    rng = np.random.default_rng(1234)
    k = int(request.param * M)
    U = _fixed_k_csr(rng, N_ROWS, M, k)
    V = _fixed_k_csr(rng, N_ROWS, M, k, nonneg=True)
    return request.param, k, U, V


@pytest.fixture(scope="module")
def kron_countsketch():
    # A CountSketch of R^(4096^2): its bucket and sign maps take 268 MB.
    return CountSketch(M * M, S, random_state=1234)


def _info(benchmark, machine_info, rows, **kw):
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(kw)
    benchmark.extra_info["rows"] = rows


def test_tensorsketch_m4096(benchmark, kron_rows, machine_info):
    frac, k, U, V = kron_rows
    benchmark.group = f"kron-sketch-m4096-{round(frac * 100)}pct"
    ts = TensorSketch((M, M), S, random_state=0)
    Z = benchmark(ts.transform, U, V)
    assert Z.shape == (N_ROWS, S)
    _info(benchmark, machine_info, N_ROWS, m=M, k=k, sketch_size=S)


def test_sparse_kron_then_countsketch_m4096(benchmark, kron_rows, kron_countsketch,
                                            machine_info):
    frac, k, U, V = kron_rows
    benchmark.group = f"kron-sketch-m4096-{round(frac * 100)}pct"

    def run():
        return kron_countsketch.transform(_sparse_kron_rows(U, V))

    Z = benchmark(run)
    assert Z.shape == (N_ROWS, S)
    _info(benchmark, machine_info, N_ROWS, m=M, k=k, sketch_size=S, kron_nnz_per_row=k * k)


@pytest.fixture(scope="module")
def dense_rows():
    rng = np.random.default_rng(1234)
    k = int(0.05 * M)
    return (_fixed_k_csr(rng, 2, M, k).toarray(), _fixed_k_csr(rng, 2, M, k, nonneg=True).toarray())


def test_dense_kron_then_countsketch_m4096(benchmark, dense_rows, kron_countsketch,
                                           machine_info):
    U, V = dense_rows
    benchmark.group = "kron-dense-m4096-5pct"

    def run():
        return np.vstack([kron_countsketch.transform(np.kron(u, v)) for u, v in zip(U, V)])

    Z = benchmark.pedantic(run, rounds=3, iterations=1)
    assert Z.shape == (2, S)
    _info(benchmark, machine_info, 2, m=M, sketch_size=S)


def test_tensorsketch_dense_rows_m4096(benchmark, dense_rows, machine_info):
    U, V = dense_rows
    benchmark.group = "kron-dense-m4096-5pct"
    ts = TensorSketch((M, M), S, random_state=0)
    Z = benchmark(ts.transform, U, V)
    assert Z.shape == (2, S)
    _info(benchmark, machine_info, 2, m=M, sketch_size=S)


M_SMALL = 128


@pytest.fixture(scope="module")
def small_rows():
    rng = np.random.default_rng(1234)
    k = int(0.05 * M_SMALL)
    return _fixed_k_csr(rng, N_ROWS, M_SMALL, k), _fixed_k_csr(rng, N_ROWS, M_SMALL, k, nonneg=True)


def test_gaussian_of_kron_rows_m128(benchmark, small_rows, machine_info):
    U, V = small_rows
    benchmark.group = "kron-gaussian-m128"
    g = GaussianSketch(M_SMALL * M_SMALL, S, random_state=0)  # S: 1024 x 16384

    def run():
        return g.transform(_sparse_kron_rows(U, V).toarray())

    Z = benchmark(run)
    assert Z.shape == (N_ROWS, S)
    _info(benchmark, machine_info, N_ROWS, m=M_SMALL, sketch_size=S)


def test_tensorsketch_m128(benchmark, small_rows, machine_info):
    U, V = small_rows
    benchmark.group = "kron-gaussian-m128"
    ts = TensorSketch((M_SMALL, M_SMALL), S, random_state=0)
    Z = benchmark(ts.transform, U, V)
    assert Z.shape == (N_ROWS, S)
    _info(benchmark, machine_info, N_ROWS, m=M_SMALL, sketch_size=S)


# ----------------------------------------------------------------------------
# Gauss-Newton system: exact Gram vs sketched vs Jacobi
# ----------------------------------------------------------------------------

def mlp_like_factors(rng, n, *, m=M, frac=0.05, depth=3, input_dim=64):
    """(D_l, H_{l-1}) pairs shaped like a width-m, depth-L sparse MLP.

    D_l: k = frac * m active neurons per sample with Gaussian backpropagated
    values; H_0: dense Gaussian input (n, input_dim); H_l (l >= 1): k active,
    nonnegative (shifted-ReLU outputs).  Random supports: a stand-in for
    real training factors, which SparseMLP provides after the merge.
    """
    k = max(1, int(frac * m))
    factors = [(_fixed_k_csr(rng, n, m, k), rng.standard_normal((n, input_dim)))]
    for _ in range(depth - 1):
        factors.append((_fixed_k_csr(rng, n, m, k), _fixed_k_csr(rng, n, m, k, nonneg=True)))
    return factors


@pytest.fixture(scope="module", params=[(0.01, 64), (0.01, 256), (0.05, 64), (0.05, 256)],
                ids=["1pct-n64", "1pct-n256", "5pct-n64", "5pct-n256"])
def gn_problem(request):
    frac, n = request.param
    rng = np.random.default_rng(1234)
    factors = mlp_like_factors(rng, n, frac=frac)
    checked, _ = _check_factors(factors)
    damping = 1e-6 * float(np.mean(_gram_diagonal(checked)))
    return frac, n, factors, rng.standard_normal(n), damping


@pytest.mark.parametrize("method", ["exact", "sketched", "jacobi"])
def test_gauss_newton_solve(benchmark, gn_problem, method, machine_info):
    frac, n, factors, r, damping = gn_problem
    benchmark.group = f"gn-solve-{round(frac * 100)}pct-n{n}"
    alpha, info = benchmark.pedantic(
        solve_gauss_newton, args=(factors, r),
        kwargs=dict(damping=damping, method=method, random_state=0), rounds=3, iterations=1)
    assert info["converged"]
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(n=n, m=M, frac=frac, depth=3, damping=damping,
                                iterations=info["iterations"], sketch_size=info["sketch_size"])
