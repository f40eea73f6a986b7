"""LowRankUpdatedMatrix at m = n = 8192, float32, side by side with eager peers.

Groups (one per operation and size):

* ``lowrank-update-r{R}-m8192``: R rank-1 updates, then one matvec
  (R = 16, 64 and 128, the default ``max_rank`` at this size).
  subquad_ds appends the R updates, folds them with one GEMM (``flush()``,
  counted in the time) and multiplies; the peers update eagerly with BLAS
  ``sger`` in place (verified not to copy) or with numpy
  ``W += np.outer(u, v)``.  Divide by R for the amortised cost per update.
* ``lowrank-matvec-pending{r}-m8192``: a dense matvec with r pending rank-1
  updates, against numpy's dense ``W @ x`` and numpy with explicit factors
  ``W @ x + U @ (V.T @ x)``.
* ``lowrank-spmv-m8192-p0.01``: a matvec with a 1%-dense sparse vector
  ``(indices, values)`` against the dense matvec (ours and numpy) and the
  numpy gather ``W[:, idx] @ vals``.
* ``lowrank-spmv-rows-m8192-p0.01``: the same, only 1% of output rows.
* ``lowrank-sparse-rmatvec-m8192-p0.01``: ``W.T @ x`` for a sparse x, on the
  default Fortran base (rows of W are strided: gathered reads) and on a
  C-ordered base passed with ``copy=False`` (rows contiguous), against dense.
* ``lowrank-flush-r64-m8192``: folding 64 pending rank-1 updates against
  numpy's ``W += U @ V.T``.

BLAS and OpenMP are limited to one thread (threadpoolctl) so that the
comparison is per core and not disturbed by thread wake-ups on a shared
machine; without threadpoolctl the default thread counts are used and
``extra_info["threads"]`` says so.
"""

import numpy as np
import pytest
from scipy.linalg import blas

from subquad_ds import LowRankUpdatedMatrix

M = 8192
DTYPE = np.float32
DENSITY = 0.01


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run the whole module with one BLAS / OpenMP thread if threadpoolctl is there."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield "default (threadpoolctl not installed)"
        return
    with threadpool_limits(limits=1):
        yield 1


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1234)
    W_c = rng.standard_normal((M, M), dtype=DTYPE)
    W_f = np.asfortranarray(W_c)
    U = rng.standard_normal((M, 256), dtype=DTYPE) / np.float32(np.sqrt(M))
    V = rng.standard_normal((M, 256), dtype=DTYPE)
    x = rng.standard_normal(M, dtype=DTYPE)
    nnz = int(DENSITY * M)
    idx = np.sort(rng.choice(M, nnz, replace=False)).astype(np.intp)
    vals = rng.standard_normal(nnz, dtype=DTYPE)
    rows = np.sort(rng.choice(M, nnz, replace=False)).astype(np.intp)
    return {"W_c": W_c, "W_f": W_f, "U": U, "V": V, "x": x, "idx": idx, "vals": vals,
            "rows": rows}


def _info(benchmark, machine_info, single_thread, **kw):
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update({"m": M, "n": M, "dtype": np.dtype(DTYPE).name,
                                 "threads": single_thread, **kw})


# ------------------------------------------------------------------ updates

UPDATE_ROUNDS = 3


@pytest.mark.parametrize("R", [16, 64, 128])  # 128 = default_max_rank(8192, 8192)
class TestUpdates:
    def test_subquad_ds(self, benchmark, data, R, machine_info, single_thread):
        benchmark.group = f"lowrank-update-r{R}-m{M}"
        _info(benchmark, machine_info, single_thread, r=R, max_rank=R, impl="lazy + fold")
        U, V, x = data["U"], data["V"], data["x"]

        def setup():
            A = LowRankUpdatedMatrix(data["W_f"], max_rank=R if R != 128 else None)
            assert A.max_rank == R
            return (A,), {}

        def run(A):
            for i in range(R):
                A.update(U[:, i], V[:, i])
            A.flush()
            return A.matvec(x)

        benchmark.pedantic(run, setup=setup, rounds=UPDATE_ROUNDS, iterations=1)

    def test_scipy_sger_inplace(self, benchmark, data, R, machine_info, single_thread):
        benchmark.group = f"lowrank-update-r{R}-m{M}"
        _info(benchmark, machine_info, single_thread, r=R, impl="eager BLAS sger, in place")
        U, V, x = data["U"], data["V"], data["x"]

        def setup():
            return (np.array(data["W_f"], order="F", copy=True),), {}

        def run(W):
            for i in range(R):
                out = blas.sger(1.0, U[:, i], V[:, i], a=W, overwrite_a=True)
                if out is not W:  # would mean a hidden 256 MiB copy per update
                    raise AssertionError("sger did not update W in place")
            return W @ x

        benchmark.pedantic(run, setup=setup, rounds=UPDATE_ROUNDS, iterations=1)

    def test_numpy_outer(self, benchmark, data, R, machine_info, single_thread):
        benchmark.group = f"lowrank-update-r{R}-m{M}"
        _info(benchmark, machine_info, single_thread, r=R, impl="numpy W += outer(u, v)")
        U, V, x = data["U"], data["V"], data["x"]

        def setup():
            return (data["W_c"].copy(),), {}

        def run(W):
            for i in range(R):
                W += np.outer(U[:, i], V[:, i])
            return W @ x

        benchmark.pedantic(run, setup=setup, rounds=UPDATE_ROUNDS, iterations=1)


# ------------------------------------------------------------------ dense products

@pytest.fixture(scope="module")
def lazy(data):
    """Matrices with 0, 16 and 64 pending rank-1 updates (max_rank = 64)."""
    out = {}
    for r in (0, 16, 64):
        A = LowRankUpdatedMatrix(data["W_f"], max_rank=64)
        for i in range(r):
            A.update(data["U"][:, i], data["V"][:, i])
        assert A.pending_rank == r
        out[r] = A
    return out


# Fixed rounds: automatic calibration picked as few as 5 rounds for a 10 ms call.
MATVEC_ROUNDS = {"rounds": 40, "warmup_rounds": 2, "iterations": 1}


@pytest.mark.parametrize("r", [0, 16, 64])
class TestMatvec:
    def test_subquad_ds(self, benchmark, data, lazy, r, machine_info, single_thread):
        benchmark.group = f"lowrank-matvec-pending{r}-m{M}"
        _info(benchmark, machine_info, single_thread, pending_rank=r)
        benchmark.pedantic(lazy[r].matvec, args=(data["x"],), **MATVEC_ROUNDS)

    def test_numpy_dense(self, benchmark, data, r, machine_info, single_thread):
        benchmark.group = f"lowrank-matvec-pending{r}-m{M}"
        _info(benchmark, machine_info, single_thread, pending_rank=r, impl="W @ x")
        W, x = data["W_c"], data["x"]
        benchmark.pedantic(lambda: W @ x, **MATVEC_ROUNDS)

    def test_numpy_dense_plus_factors(self, benchmark, data, r, machine_info, single_thread):
        benchmark.group = f"lowrank-matvec-pending{r}-m{M}"
        _info(benchmark, machine_info, single_thread, pending_rank=r,
              impl="W @ x + U @ (V.T @ x)")
        W, x = data["W_c"], data["x"]
        U, V = np.ascontiguousarray(data["U"][:, :r]), np.ascontiguousarray(data["V"][:, :r])
        benchmark.pedantic(lambda: W @ x + U @ (V.T @ x), **MATVEC_ROUNDS)


# ------------------------------------------------------------------ sparse products

SPMV_GROUP = f"lowrank-spmv-m{M}-p{DENSITY}"
ROWS_GROUP = f"lowrank-spmv-rows-m{M}-p{DENSITY}"


def _dense_x(data):
    xd = np.zeros(M, dtype=DTYPE)
    xd[data["idx"]] = data["vals"]
    return xd


@pytest.mark.parametrize("r", [0, 64])
def test_spmv_subquad_ds_sparse(benchmark, data, lazy, r, machine_info, single_thread):
    benchmark.group = SPMV_GROUP
    _info(benchmark, machine_info, single_thread, pending_rank=r, nnz=len(data["idx"]),
          impl="sparse (indices, values)")
    benchmark(lazy[r].matvec, (data["idx"], data["vals"]))


def test_spmv_subquad_ds_dense(benchmark, data, lazy, machine_info, single_thread):
    benchmark.group = SPMV_GROUP
    _info(benchmark, machine_info, single_thread, pending_rank=0, impl="dense x")
    benchmark(lazy[0].matvec, _dense_x(data))


def test_spmv_numpy_dense(benchmark, data, machine_info, single_thread):
    benchmark.group = SPMV_GROUP
    _info(benchmark, machine_info, single_thread, impl="numpy W @ x (x densified)")
    W, xd = data["W_c"], _dense_x(data)
    benchmark(lambda: W @ xd)


def test_spmv_numpy_gather(benchmark, data, machine_info, single_thread):
    benchmark.group = SPMV_GROUP
    _info(benchmark, machine_info, single_thread, impl="numpy W_f[:, idx] @ vals")
    W, idx, vals = data["W_f"], data["idx"], data["vals"]
    benchmark(lambda: W[:, idx] @ vals)


@pytest.mark.parametrize("r", [0, 64])
def test_spmv_rows_subquad_ds(benchmark, data, lazy, r, machine_info, single_thread):
    benchmark.group = ROWS_GROUP
    _info(benchmark, machine_info, single_thread, pending_rank=r,
          n_rows=len(data["rows"]), nnz=len(data["idx"]))
    benchmark(lazy[r].matvec, (data["idx"], data["vals"]), rows=data["rows"])


def test_spmv_rows_subquad_ds_all_rows(benchmark, data, lazy, machine_info, single_thread):
    benchmark.group = ROWS_GROUP
    _info(benchmark, machine_info, single_thread, pending_rank=0,
          impl="all rows, then index")
    A, sp, rows = lazy[0], (data["idx"], data["vals"]), data["rows"]
    benchmark(lambda: A.matvec(sp)[rows])


def test_spmv_rows_numpy_gather(benchmark, data, machine_info, single_thread):
    benchmark.group = ROWS_GROUP
    _info(benchmark, machine_info, single_thread, impl="numpy W[np.ix_(rows, idx)] @ vals")
    W, idx, vals, rows = data["W_f"], data["idx"], data["vals"], data["rows"]
    benchmark(lambda: W[np.ix_(rows, idx)] @ vals)


RMATVEC_GROUP = f"lowrank-sparse-rmatvec-m{M}-p{DENSITY}"


@pytest.fixture(scope="module")
def c_ordered(data):
    """A matrix on the C-ordered W (copy=False): rows of W are contiguous."""
    A = LowRankUpdatedMatrix(data["W_c"], copy=False)
    assert np.shares_memory(A._base, data["W_c"])
    return A


def test_sparse_rmatvec_subquad_ds_fortran(benchmark, data, lazy, machine_info,
                                           single_thread):
    benchmark.group = RMATVEC_GROUP
    _info(benchmark, machine_info, single_thread, pending_rank=0,
          impl="W.T @ sparse x, default Fortran base (gathered rows)")
    benchmark(lazy[0].rmatvec, (data["idx"], data["vals"]))


def test_sparse_rmatvec_subquad_ds_c(benchmark, data, c_ordered, machine_info, single_thread):
    benchmark.group = RMATVEC_GROUP
    _info(benchmark, machine_info, single_thread, pending_rank=0,
          impl="W.T @ sparse x, C-ordered base via copy=False (contiguous rows)")
    benchmark(c_ordered.rmatvec, (data["idx"], data["vals"]))


def test_sparse_rmatvec_numpy_dense(benchmark, data, machine_info, single_thread):
    benchmark.group = RMATVEC_GROUP
    _info(benchmark, machine_info, single_thread, impl="numpy W.T @ x (x densified)")
    W, xd = data["W_c"], _dense_x(data)
    benchmark(lambda: W.T @ xd)


# ------------------------------------------------------------------ fold

class TestFlush:
    group = f"lowrank-flush-r64-m{M}"

    def test_subquad_ds(self, benchmark, data, machine_info, single_thread):
        benchmark.group = self.group
        _info(benchmark, machine_info, single_thread, r=64)
        U, V = data["U"], data["V"]

        def setup():
            A = LowRankUpdatedMatrix(data["W_f"], max_rank=64)
            A.update(U[:, :64], V[:, :64])
            return (A,), {}

        benchmark.pedantic(lambda A: A.flush(), setup=setup, rounds=5, iterations=1)

    def test_numpy_gemm(self, benchmark, data, machine_info, single_thread):
        benchmark.group = self.group
        _info(benchmark, machine_info, single_thread, r=64, impl="numpy W += U @ V.T")
        U, V = np.ascontiguousarray(data["U"][:, :64]), np.ascontiguousarray(data["V"][:, :64])

        def setup():
            return (data["W_c"].copy(),), {}

        def run(W):
            W += U @ V.T

        benchmark.pedantic(run, setup=setup, rounds=5, iterations=1)
