"""HalfspaceIndex benchmarks: subquad_ds side by side with numpy and faiss.

Groups (one per operation and size): ``halfspace-query1-<data>-d<d>-sel<s>``
(single-query latency, one thread each, queried back to back: warm caches),
``halfspace-query1-cold-...`` (the same with the caches filled with other
data before each query), ``halfspace-query1-allcores-...`` (the same as the
first, with every implementation given all cores),
``halfspace-batch64-<data>-d<d>-sel<s>`` (64 queries per call),
``halfspace-{add,remove,update}1-d<d>`` (one point per call on an index of N
points), ``halfspace-addrun-<data>-d<d>-<workload>`` (N single adds onto N
points, alone or with a query every 16 adds), ``halfspace-build-<data>-d<d>``,
``halfspace-top10-<data>-d<d>`` and ``halfspace-trainer-m16384-d64``
(sparse activations as CSR queries, per-query thresholds).

Data (``default_rng(1234)``): N = 200,000 float32 points; "gaussian" is
N(0, I); "clustered" is a mixture of 256 Gaussian clusters with centres
N(0, I) and within-cluster std 0.1.  Queries are N(0, I).  Thresholds give
the stated selectivity (fraction of points reported): per query for single
queries, one common b for the batches (faiss takes one threshold per call).

Run: ``pytest bench/bench_halfspace.py --benchmark-only
--benchmark-group-by=group --benchmark-columns=median,mean,min,rounds``.
``--benchmark-disable`` (the CI smoke run) shrinks N to 20,000.
"""

import contextlib
import itertools
import time

import numpy as np
import pytest

try:  # single-threaded BLAS for the one-query numpy baseline, when available
    from threadpoolctl import threadpool_limits
except ImportError:  # not a dependency: the baseline then uses BLAS's default
    threadpool_limits = None

import subquad_ds
from subquad_ds import HalfspaceIndex
from subquad_ds._halfspace import screening_kernel

from conftest import require

N_FULL = 200_000
N_SMOKE = 20_000
DIMS = [32, 128]
KINDS = ["gaussian", "clustered"]
SELECTIVITIES = [0.001, 0.01, 0.1]
IMPLS = ["subquad_ds", "numpy", "faiss"]
N_QUERIES = 64


def _smoke(config):
    return bool(config.getoption("benchmark_disable", default=False))


def _n_points(config):
    return N_SMOKE if _smoke(config) else N_FULL


# a module fixture per (data kind, dimension) pair
per_dataset = pytest.fixture(scope="module", params=list(itertools.product(KINDS, DIMS)),
                             ids=lambda p: f"{p[0]}-d{p[1]}")


def make_points(kind, n, d, rng):
    if kind == "gaussian":
        return rng.standard_normal((n, d), dtype=np.float32)
    centres = rng.standard_normal((256, d), dtype=np.float32)
    labels = rng.integers(256, size=n)
    return centres[labels] + np.float32(0.1) * rng.standard_normal((n, d), dtype=np.float32)


@per_dataset
def data(request):
    kind, d = request.param
    n = _n_points(request.config)
    rng = np.random.default_rng(1234)
    X = make_points(kind, n, d, rng)
    W = rng.standard_normal((N_QUERIES, d), dtype=np.float32)
    S = W.astype(np.float64) @ X.astype(np.float64).T
    thresholds = {sel: np.quantile(S, 1 - sel, axis=1) for sel in SELECTIVITIES}
    common = {sel: float(np.quantile(S, 1 - sel)) for sel in SELECTIVITIES}
    return {"kind": kind, "d": d, "n": n, "X": X, "W": W, "b": thresholds,
            "b_common": common, "index": HalfspaceIndex(X), "faiss": None}


def faiss_index(data):
    faiss = require("faiss")
    if data["faiss"] is None:
        index = faiss.IndexFlatIP(data["d"])
        index.add(data["X"])
        data["faiss"] = index
    return faiss, data["faiss"]


def info(benchmark, machine_info, data, **extra):
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(n=data["n"], d=data["d"], data=data["kind"],
                                kernel=screening_kernel(), **extra)


def _single_query_runner(data, impl, sel, threads):
    """A call that answers the next of 16 queries with ``threads`` threads.

    faiss range_search uses one thread for one query whatever it is given
    (its thread count only parallelises across queries); numpy's product is
    limited to one BLAS thread when ``threads == 1`` (if threadpoolctl is
    installed), else uses BLAS's default.
    """
    W, b, X = data["W"], data["b"][sel], data["X"]
    queries = itertools.cycle(range(16))
    if impl == "subquad_ds":
        index = data["index"]

        def run():
            q = next(queries)
            return index.query(W[q], b[q], n_threads=threads)
    elif impl == "numpy":
        def blas_threads():
            if threads == 1 and threadpool_limits:
                return threadpool_limits(1)
            return contextlib.nullcontext()

        def run():
            q = next(queries)
            with blas_threads():
                return np.flatnonzero(X @ W[q] >= b[q])
    else:
        faiss, index = faiss_index(data)
        faiss.omp_set_num_threads(threads)

        def run():
            q = next(queries)
            return index.range_search(W[q:q + 1], float(b[q]))
    return run


def _blas_info(threads):
    return 1 if threads == 1 and threadpool_limits else "default"


@pytest.mark.parametrize("sel", SELECTIVITIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_query_single(benchmark, machine_info, data, impl, sel):
    """One query per call, one thread (faiss range_search uses one thread for one query)."""
    benchmark.group = f"halfspace-query1-{data['kind']}-d{data['d']}-sel{sel}"
    run = _single_query_runner(data, impl, sel, 1)
    info(benchmark, machine_info, data, impl=impl, selectivity=sel,
         numpy_blas_threads=_blas_info(1))
    benchmark(run)


def _last_level_cache_bytes():
    """Size of the largest CPU cache (Linux sysfs), or 512 MiB if unknown."""
    sizes = []
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes) if sizes else 2**29


@pytest.fixture(scope="module")
def cache_flusher(request):
    """Reads twice the last-level cache (at most 1 GiB) of other data, so that
    the next call finds neither the index nor faiss's copy of the points in
    any cache.  The smoke run reads 1 MiB (only to exercise the code)."""
    n_bytes = 2**20 if _smoke(request.config) else min(2 * _last_level_cache_bytes(), 2**30)
    junk = np.ones(n_bytes // 8)

    def flush():
        junk.sum()
        return (), {}
    flush.n_bytes = n_bytes
    return flush


@pytest.mark.parametrize("sel", SELECTIVITIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_query_single_cold(benchmark, machine_info, data, impl, sel, cache_flusher, request):
    """One query per round on a cold cache, one thread: before each (untimed)
    the caches are filled with other data.  The warm groups above measure a
    structure queried back to back; this one, an index (or a faiss copy)
    that other work has pushed out of the caches in between queries."""
    benchmark.group = f"halfspace-query1-cold-{data['kind']}-d{data['d']}-sel{sel}"
    run = _single_query_runner(data, impl, sel, 1)
    info(benchmark, machine_info, data, impl=impl, selectivity=sel,
         numpy_blas_threads=_blas_info(1), cache_flush_bytes=cache_flusher.n_bytes)
    benchmark.pedantic(run, setup=cache_flusher, rounds=_rounds(request.config, 48),
                       iterations=1)


@pytest.mark.parametrize("sel", SELECTIVITIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_query_single_all_cores(benchmark, machine_info, data, impl, sel):
    """One query per call, every implementation given all cores.

    subquad_ds splits a large query into subtrees walked by its threads;
    numpy's matrix-vector product uses BLAS's threads; faiss range_search
    still uses one thread for one query, so its time matches the
    one-thread group's.
    """
    benchmark.group = f"halfspace-query1-allcores-{data['kind']}-d{data['d']}-sel{sel}"
    threads = subquad_ds._validation.check_n_threads(None)
    run = _single_query_runner(data, impl, sel, threads)
    info(benchmark, machine_info, data, impl=impl, selectivity=sel, threads=threads,
         numpy_blas_threads=_blas_info(threads))
    benchmark(run)


@pytest.mark.parametrize("sel", SELECTIVITIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_query_batch(benchmark, machine_info, data, impl, sel):
    """64 queries per call, all cores, one common threshold."""
    benchmark.group = f"halfspace-batch64-{data['kind']}-d{data['d']}-sel{sel}"
    W, b, X = data["W"], data["b_common"][sel], data["X"]
    if impl == "subquad_ds":
        index = data["index"]

        def run():
            return index.query(W, b)
    elif impl == "numpy":
        def run():
            hits = (W @ X.T) >= b
            indptr = np.concatenate([[0], np.cumsum(hits.sum(axis=1))])
            return indptr, np.nonzero(hits)[1]
    else:
        faiss, index = faiss_index(data)
        faiss.omp_set_num_threads(subquad_ds._validation.check_n_threads(None))

        def run():
            return index.range_search(W, b)
    info(benchmark, machine_info, data, impl=impl, selectivity=sel, n_queries=N_QUERIES)
    benchmark(run)


@pytest.mark.parametrize("impl", ["subquad_ds", "faiss"])
def test_top10(benchmark, machine_info, data, impl):
    """Exact top-10 inner-product search, one query per call, one thread."""
    benchmark.group = f"halfspace-top10-{data['kind']}-d{data['d']}"
    W = data["W"]
    queries = itertools.cycle(range(16))
    if impl == "subquad_ds":
        index = data["index"]

        def run():
            q = next(queries)
            return index.search(W[q], 10, n_threads=1)
    else:
        faiss, index = faiss_index(data)
        faiss.omp_set_num_threads(1)

        def run():
            q = next(queries)
            return index.search(W[q:q + 1], 10)
    info(benchmark, machine_info, data, impl=impl)
    benchmark(run)


@pytest.mark.parametrize("impl", IMPLS)
def test_build(benchmark, machine_info, data, impl, request):
    benchmark.group = f"halfspace-build-{data['kind']}-d{data['d']}"
    X = data["X"]
    if impl == "subquad_ds":
        def run():
            return HalfspaceIndex(X)
    elif impl == "numpy":
        def run():
            return X.copy()
    else:
        faiss = require("faiss")

        def run():
            index = faiss.IndexFlatIP(data["d"])
            index.add(X)
            return index
    info(benchmark, machine_info, data, impl=impl)
    benchmark.pedantic(run, rounds=_rounds(request.config, 3) if impl != "numpy" else 10,
                       iterations=1)


# -- updates: one point per call on an index of N points ------------------------

@pytest.fixture(scope="module", params=DIMS, ids=lambda d: f"d{d}")
def dynamic(request):
    d = request.param
    n = _n_points(request.config)
    rng = np.random.default_rng(1234)
    X = make_points("gaussian", n, d, rng)
    return {"d": d, "n": n, "X": X, "rng": rng, "kind": "gaussian",
            "fresh": rng.standard_normal((50_000, d), dtype=np.float32)}


def _rounds(config, full):
    return min(3, full) if _smoke(config) else full


@pytest.mark.parametrize("op", ["add", "remove", "update"])
@pytest.mark.parametrize("impl", ["subquad_ds", "numpy", "faiss"])
def test_update_one(benchmark, machine_info, dynamic, impl, op, request):
    """Latency of one add/remove/update of a single point (pedantic rounds).

    numpy keeps a plain array (add: np.concatenate, remove: np.delete,
    update: row assignment); faiss IndexFlatIP has add and remove_ids, and
    no in-place update (remove + add).
    """
    d, X, rng, fresh = dynamic["d"], dynamic["X"], dynamic["rng"], dynamic["fresh"]
    benchmark.group = f"halfspace-{op}1-d{d}"
    counter = itertools.count()
    rounds = _rounds(request.config, 2000 if impl == "subquad_ds" else 20)
    if impl == "faiss":
        faiss = require("faiss")
    if impl == "subquad_ds":
        index = HalfspaceIndex(X)
        doomed = iter(rng.permutation(dynamic["n"]).tolist())
        if op == "add":
            def run(p):
                index.add(p)
        elif op == "remove":
            def run(p):
                index.remove(next(doomed))
        else:
            def run(p):
                index.update(int(rng.integers(dynamic["n"])), p)
    elif impl == "numpy":
        state = {"X": X.copy()}
        if op == "add":
            def run(p):
                state["X"] = np.concatenate([state["X"], p])
        elif op == "remove":
            def run(p):
                state["X"] = np.delete(state["X"], int(rng.integers(len(state["X"]))), axis=0)
        else:
            def run(p):
                state["X"][int(rng.integers(len(state["X"])))] = p[0]
    else:
        index = faiss.IndexFlatIP(d)
        index.add(X)
        if op == "add":
            def run(p):
                index.add(p)
        elif op == "remove":
            def run(p):
                index.remove_ids(np.array([rng.integers(index.ntotal)], dtype=np.int64))
        else:
            def run(p):
                index.remove_ids(np.array([rng.integers(index.ntotal)], dtype=np.int64))
                index.add(p)

    def setup():
        i = next(counter) % fresh.shape[0]
        return (fresh[i:i + 1],), {}
    info(benchmark, machine_info, dynamic, impl=impl, op=op)
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)


# -- runs of single adds: the amortised cost, merges included -------------------

@per_dataset
def growing(request):
    kind, d = request.param
    n = _n_points(request.config)
    rng = np.random.default_rng(1234)
    X = make_points(kind, 2 * n, d, rng)
    w = rng.standard_normal(d, dtype=np.float32)
    b = float(np.quantile(X[:n] @ w, 0.99))          # 1% selectivity
    return {"kind": kind, "d": d, "n": n, "X": X, "w": w, "b": b}


@pytest.mark.parametrize("workload", ["adds", "adds+queries"])
@pytest.mark.parametrize("impl", ["subquad_ds", "faiss"])
def test_add_run(benchmark, machine_info, growing, impl, workload, request):
    """A run of N single adds (one call per point) that doubles an index of
    N points: the time of one round divided by N is the amortised cost of
    an add, every merge included.  With "adds+queries" a single query (1%
    selectivity, one thread) follows every 16th add: the index then merges
    eagerly (see HalfspaceIndex), and the round also holds N / 16 queries.
    The index is built in the untimed setup.  faiss runs the adds only (its
    IndexFlatIP appends in O(d); its queries take milliseconds each)."""
    if impl == "faiss" and workload != "adds":
        pytest.skip("faiss: adds only (a faiss query scans the whole index)")
    n, d, X, w, b = growing["n"], growing["d"], growing["X"], growing["w"], growing["b"]
    benchmark.group = f"halfspace-addrun-{growing['kind']}-d{d}-{workload}"
    every = 16 if workload == "adds+queries" else 0

    def setup():
        if impl == "faiss":
            index = require("faiss").IndexFlatIP(d)
            index.add(X[:n])
        else:
            index = HalfspaceIndex(X[:n])
        return (index,), {}

    parts = {"add_us": [], "query_us": []}   # per round, for the mixed workload

    def run(index):
        if not every:
            for k in range(n, 2 * n):
                index.add(X[k:k + 1])
            return
        t_add = t_query = 0.0
        for k in range(n, 2 * n):
            t0 = time.perf_counter()
            index.add(X[k:k + 1])
            t1 = time.perf_counter()
            t_add += t1 - t0
            if k % every == every - 1:
                index.query(w, b, n_threads=1)
                t_query += time.perf_counter() - t1
        parts["add_us"].append(round(t_add / n * 1e6, 2))
        parts["query_us"].append(round(t_query / (n // every) * 1e6, 1))

    info(benchmark, machine_info, growing, impl=impl, workload=workload, adds=n,
         queries=n // every if every else 0)
    if every:   # the adds and the queries of each round, timed apart
        benchmark.extra_info.update(parts)
    benchmark.pedantic(run, setup=setup, rounds=_rounds(request.config, 3), iterations=1)


# -- the trainer's use: fired neurons of a first layer --------------------------

@pytest.fixture(scope="module")
def trainer():
    rng = np.random.default_rng(1234)
    m, d, batch = 16384, 64, 32
    Wl = (rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32)   # neuron rows
    H = rng.standard_normal((batch, d)).astype(np.float32)
    H[rng.random((batch, d)) < 0.7] = 0.0                               # sparse inputs
    tau = 2.326                                                         # p = 1%
    b = tau / np.sqrt(d) * np.linalg.norm(H, axis=1)                    # per-sample b
    import scipy.sparse as sp
    return {"X": Wl, "H": H, "Hs": sp.csr_array(H), "b": b.astype(np.float64),
            "index": HalfspaceIndex(Wl), "n": m, "d": d, "kind": "trainer"}


@pytest.mark.parametrize("impl", ["subquad_ds-csr", "subquad_ds-csr-1thread",
                                  "subquad_ds-dense", "numpy", "faiss"])
def test_trainer_fired_neurons(benchmark, machine_info, trainer, impl):
    """Neurons with <w_r, h_i> >= b_i for a batch of 32 sparse samples."""
    benchmark.group = "halfspace-trainer-m16384-d64"
    X, H, b = trainer["X"], trainer["H"], trainer["b"]
    if impl == "subquad_ds-csr":
        def run():
            return trainer["index"].query(trainer["Hs"], b)
    elif impl == "subquad_ds-csr-1thread":
        def run():
            return trainer["index"].query(trainer["Hs"], b, n_threads=1)
    elif impl == "subquad_ds-dense":
        def run():
            return trainer["index"].query(H, b)
    elif impl == "numpy":
        def run():
            hits = (H @ X.T) >= b[:, None]
            return np.nonzero(hits)
    else:
        faiss = require("faiss")
        index = faiss.IndexFlatIP(trainer["d"])
        index.add(X)

        def run():   # faiss has one threshold per call: one call per sample
            return [index.range_search(H[i:i + 1], float(b[i])) for i in range(len(b))]
    info(benchmark, machine_info, trainer, impl=impl)
    benchmark(run)
