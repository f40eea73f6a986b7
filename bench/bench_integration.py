"""Where HalfspaceIndex and LowRankUpdatedMatrix pay inside SparseMLP training (issue 4).

Network 64 -> m -> m (depth 2, float32, default "sqrt-log" schedule,
norm-relative threshold ``t_i = tau s ||x_i||``) fitted by three SGD steps
on the default task; batch n = 32; m = 4096 and 16384
(``SUBQUAD_BENCH_MAX_WIDTH`` caps them: the CI smoke run uses 4096).
Everything runs on one thread: numpy/scipy BLAS and OpenMP through
threadpoolctl, ``n_threads=1`` for our kernels, one faiss thread.

Groups, one per case and width:

* ``fired-layer1-m{m}``: the fired neurons of the first layer and their
  pre-activations for a batch (static weights, i.e. inference):

  - ``HalfspaceIndex`` over the m neuron rows of ``W_1`` (points in R^64),
    ``query(X, t, return_scores=True)`` with the per-sample thresholds;
  - numpy sgemm ``X @ W_1^T`` + the compiled threshold/CSR extraction
    (``_sparse_mlp.extract_active``, what ``shifted_relu`` uses);
  - the trainer's own first-layer path (``_sparse_mlp.sparse_forward`` on the
    dense input, as ``SparseMLP``'s sparse backend does);
  - faiss ``IndexFlatIP.range_search`` (one call per sample: one threshold
    per call), skipped without faiss.

  All four are checked to report the same active sets (outside the timing):
  they may differ only on entries whose exact pre-activation lies within
  float32 rounding of the threshold (the index decides ``fl64(<w, x>) >= t``,
  the trainer ``fl32(z) - t > 0``).
* ``fired-layer1-train-step-m{m}``: the same inside SGD training.  Every
  round first runs one real training step (not timed), which changes the
  first-layer rows of every neuron active for some sample of the batch.  The
  index then pays ``update(touched ids, new rows)`` before the query (timed
  together); the others just recompute.
* ``frozen-base-m{m}``: fine-tuning a frozen pre-trained hidden weight
  (m x m float32, memory-mapped read-only) for T = 8 steps without writing
  it.  A step = the forward products of the batch's sparse layer-1
  activations (one sparse product per sample) and their shifted-ReLU
  extraction, then the step ``dW = -lr sum_i delta_i h_i^T`` (rank <= n = 32;
  ``delta_i = h_{2,i}`` stands in for the back-propagated error: same support,
  same cost).  Compared:

  - ``LowRankUpdatedMatrix(base_memmap.T, copy=False)`` (frozen), products by
    ``matvec((idx, vals))``, each step one rank-32 ``update``; with the
    default ``max_rank`` (folds go into a dense delta the size of the base)
    and with ``max_rank = T n`` (never folds during the session);
  - a RAM copy of the base with the trainer's eager sparse kernels
    (``sparse_forward`` + ``sparse_update``: n k^2 entries per step);
  - dense numpy (sgemm forward, in-place sgemm update) on a RAM copy.

  A round is one session of T steps from the pre-trained base (the copy into
  RAM is setup, not timed: its time is in ``extra_info["copy_seconds"]``);
  per-step cost = median / T.  ``extra_info`` records the bytes each
  approach allocates next to the mapped base.
"""

import copy
import time

import numpy as np
import pytest
from scipy.linalg import blas

from conftest import max_width, require
from subquad_ds import HalfspaceIndex, LowRankUpdatedMatrix, SparseMLP
from subquad_ds import _sparse_mlp
from subquad_ds.datasets import load_default_task
from subquad_ds.lowrank import default_max_rank
from subquad_ds.mlp import _full_pattern
from subquad_ds.sparsify import RULE_RELATIVE

WIDTHS = [m for m in (4096, 16384) if m <= max_width()] or [4096]
BATCH = 32
N_TRAIN = 256
DTYPE = np.float32
SESSION_STEPS = 8
FT_LR = 1e-4
# Generous float32 rounding factor for a 64-term dot product and a threshold.
_GAMMA = 80 * np.finfo(np.float32).eps


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threadpoolctl = require("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=1):
        yield 1


@pytest.fixture(scope="module")
def task():
    X, y = load_default_task(n_samples=N_TRAIN, dtype=DTYPE)
    return X, y


_MODELS = {}


def _fitted(m, task):
    """SparseMLP 64 -> m -> m trained 3 SGD steps (default learning rate), cached per width."""
    if m not in _MODELS:
        X, y = task
        _MODELS[m] = SparseMLP(width=m, depth=2, optimizer="sgd", batch_size=BATCH, max_iter=3,
                               dtype=DTYPE, random_state=1234, n_threads=1).fit(X, y)
    return _MODELS[m]


def _info(benchmark, machine_info, impl, m, **kw):
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(impl=impl, width=m, batch=BATCH, threads=1,
                                dtype=np.dtype(DTYPE).name, **kw)


# ------------------------------------------------------------ first layer

def _thresholds(model, X):
    """The trainer's per-sample thresholds ``t_i = b * ||x_i||`` in float32."""
    indptr, _, data = _full_pattern(X)
    norms = _sparse_mlp.row_norms(indptr, data)
    return norms, model._rule.b * norms


def fired_index(index, model, X):
    _, t = _thresholds(model, X)
    return index.query(X, t.astype(np.float64), return_scores=True, n_threads=1)


def fired_gemm(model, X):
    norms, _ = _thresholds(model, X)
    Z = X @ model.coefs_[0]
    indptr, indices, data, _ = _sparse_mlp.extract_active(Z, RULE_RELATIVE, model._rule.b,
                                                          norms, 0, 1)
    return indptr, data, indices


def fired_trainer(model, X):
    indptr, indices, data = _full_pattern(X)
    norms = _sparse_mlp.row_norms(indptr, data)
    indptr, indices, data, _ = _sparse_mlp.sparse_forward(
        model.coefs_[0], indptr, indices, data, RULE_RELATIVE, model._rule.b, norms, 0, 1)
    return indptr, data, indices


def fired_faiss(findex, model, X):
    _, t = _thresholds(model, X)
    parts = [findex.range_search(X[i:i + 1], float(t[i])) for i in range(X.shape[0])]
    counts = np.array([lims[1] for lims, _, _ in parts], dtype=np.intp)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return (indptr, np.concatenate([D for _, D, _ in parts]),
            np.concatenate([ids for _, _, ids in parts]))


def _faiss_index(faiss, WT):
    faiss.omp_set_num_threads(1)
    findex = faiss.IndexFlatIP(WT.shape[0])
    findex.add(np.ascontiguousarray(WT.T))
    return findex


def check_same_fired(model, X, reference, other, name):
    """``other`` reports the same (sample, neuron) pairs as ``reference``, up to rounding ties.

    Pairs may differ only where ``|z - t|`` is within float32 rounding of
    the exact (float64) pre-activation; shared pairs carry the same value.
    Returns the number of differing pairs.
    """
    WT = model.coefs_[0].astype(np.float64)
    X64 = X.astype(np.float64)
    Z = X64 @ WT
    bound = _GAMMA * (np.abs(X64) @ np.abs(WT))
    _, t = _thresholds(model, X)
    m = WT.shape[1]

    def keys(res):
        indptr, vals, ids = res
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        k = rows * m + ids.astype(np.int64)
        order = np.argsort(k)
        return k[order], np.asarray(vals, dtype=np.float64)[order]

    k_ref, _ = keys(reference)
    k_oth, v_oth = keys(other)
    diff = np.setxor1d(k_ref, k_oth)
    r, c = np.divmod(diff, m)
    far = np.abs(Z[r, c] - t[r]) > bound[r, c] + _GAMMA * np.abs(t[r])
    assert not far.any(), f"{name}: {far.sum()} fired pairs differ beyond rounding"
    # Values of the reported pairs: the pre-activation z (index, faiss) or z - t.
    rr, cc = np.divmod(k_oth, m)
    expect = Z[rr, cc] if name in ("index", "faiss") else Z[rr, cc] - t[rr]
    np.testing.assert_allclose(v_oth, expect, rtol=0, atol=float(bound.max()) * 2)
    return int(diff.size)


@pytest.fixture(scope="module")
def layer1(task):
    """Per width: the fitted model, the query batch and a HalfspaceIndex on W_1's rows."""
    out = {}
    for m in WIDTHS:
        model = _fitted(m, task)
        X = np.ascontiguousarray(task[0][:BATCH])
        t0 = time.perf_counter()
        index = HalfspaceIndex(model.coefs_[0].T, n_threads=1)
        build = time.perf_counter() - t0
        out[m] = (model, X, index, build)
    return out


IMPLS = ["subquad_ds HalfspaceIndex", "numpy sgemm + extract", "trainer sparse_forward",
         "faiss range_search"]


@pytest.mark.parametrize("m", WIDTHS)
@pytest.mark.parametrize("impl", IMPLS)
def test_fired_layer1(benchmark, machine_info, layer1, impl, m):
    model, X, index, build = layer1[m]
    if impl.startswith("subquad"):
        fn, args = fired_index, (index, model, X)
    elif impl.startswith("numpy"):
        fn, args = fired_gemm, (model, X)
    elif impl.startswith("trainer"):
        fn, args = fired_trainer, (model, X)
    else:
        fn, args = fired_faiss, (_faiss_index(require("faiss"), model.coefs_[0]), model, X)
    res = fn(*args)
    name = {"s": "index", "n": "gemm", "t": "trainer", "f": "faiss"}[impl[0]]
    n_diff = check_same_fired(model, X, fired_trainer(model, X), res, name)
    benchmark.group = f"fired-layer1-m{m}"
    _info(benchmark, machine_info, impl, m, active_per_sample=float(res[0][-1]) / BATCH,
          pairs_differing_from_trainer=n_diff,
          index_build_seconds=build if name == "index" else None)
    benchmark.pedantic(fn, args=args, rounds=30, iterations=1, warmup_rounds=2)


TRAIN_ROUNDS = 8


@pytest.mark.parametrize("m", WIDTHS)
@pytest.mark.parametrize("impl", IMPLS[:3])
def test_fired_layer1_train_step(benchmark, machine_info, task, impl, m):
    model = copy.deepcopy(_fitted(m, task))
    X, y = task
    index = HalfspaceIndex(model.coefs_[0].T, n_threads=1) if impl.startswith("subquad") else None
    batches = [slice(i, i + BATCH) for i in range(0, N_TRAIN, BATCH)]
    state = {"it": 0, "touched": []}

    def setup():
        # One real SGD step (not timed); the next batch is then queried.
        it = state["it"]
        state["it"] += 1
        sb, qb = batches[it % len(batches)], batches[(it + 1) % len(batches)]
        before = model.coefs_[0].copy()
        model._step(X[sb], y[sb])
        touched = np.flatnonzero((before != model.coefs_[0]).any(axis=0))
        state["touched"].append(touched.size)
        return (touched, np.ascontiguousarray(X[qb])), {}

    if index is not None:
        def body(touched, Xq):
            index.update(touched, model.coefs_[0].T[touched])
            return fired_index(index, model, Xq)
    elif impl.startswith("numpy"):
        def body(touched, Xq):
            return fired_gemm(model, Xq)
    else:
        def body(touched, Xq):
            return fired_trainer(model, Xq)

    benchmark.group = f"fired-layer1-train-step-m{m}"
    _info(benchmark, machine_info, impl, m)
    benchmark.pedantic(body, setup=setup, rounds=TRAIN_ROUNDS, iterations=1)
    benchmark.extra_info["touched_neurons_per_step"] = float(np.mean(state["touched"]))
    # After the last update the index answers like the trainer on the new weights.
    if index is not None:
        Xq = np.ascontiguousarray(X[:BATCH])
        check_same_fired(model, Xq, fired_trainer(model, Xq), fired_index(index, model, Xq),
                         "index")


# ------------------------------------------------------------ frozen base

@pytest.fixture(scope="module")
def frozen(task, tmp_path_factory):
    """Per width: the pre-trained hidden weight memory-mapped read-only, and the session data."""
    out = {}
    X = task[0]
    for m in WIDTHS:
        model = _fitted(m, task)
        WT = model.coefs_[1]                       # W_2^T, C-ordered (m, m)
        path = tmp_path_factory.mktemp("frozen") / f"w2_m{m}.f32"
        mm = np.memmap(path, dtype=DTYPE, mode="w+", shape=WT.shape)
        mm[:] = WT
        mm.flush()
        del mm
        base = np.memmap(path, dtype=DTYPE, mode="r", shape=WT.shape)
        # Layer-1 activations of the session's batches (the first layer is frozen too).
        acts = []
        for s in range(SESSION_STEPS):
            rows = slice((s * BATCH) % N_TRAIN, (s * BATCH) % N_TRAIN + BATCH)
            H = model._net.forward(np.ascontiguousarray(X[rows]))["H"][0]
            acts.append((H, _sparse_mlp.row_norms(H[0], H[2])))
        out[m] = {"base": base, "acts": acts, "b": model._rule.b, "original": WT}
    return out


def _scatter(indptr, indices, vals, m, scale=1.0):
    """Dense (m, n) factor from a CSR batch: column i holds sample i's sparse vector."""
    n = len(indptr) - 1
    F = np.zeros((m, n), dtype=DTYPE)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    F[indices, rows] = vals * DTYPE(scale)
    return F


def session_lowrank(A, acts, b, record=None):
    m = A.shape[0]
    for (ip, ix, hv), norms in acts:
        Z = np.empty((len(ip) - 1, m), dtype=DTYPE)
        for i in range(len(ip) - 1):
            Z[i] = A.matvec((ix[ip[i]:ip[i + 1]], hv[ip[i]:ip[i + 1]]))
        op, ox, ov, _ = _sparse_mlp.extract_active(Z, RULE_RELATIVE, b, norms, 0, 1)
        # dW = -lr sum_i delta_i h_i^T with delta = h_2 (rank <= n).
        A.update(_scatter(op, ox, ov, m, -FT_LR), _scatter(ip, ix, hv, m))
        if record is not None:
            record.append((op, ox))
    return A


def session_eager(WT, acts, b, record=None):
    for (ip, ix, hv), norms in acts:
        op, ox, ov, _ = _sparse_mlp.sparse_forward(WT, ip, ix, hv, RULE_RELATIVE, b, norms, 0, 1)
        _sparse_mlp.sparse_update(WT, op, ox, ov, ip, ix, hv, DTYPE(FT_LR), 1)
        if record is not None:
            record.append((op, ox))
    return WT


def session_dense(WT, acts, b):
    m = WT.shape[0]
    gemm = blas.get_blas_funcs("gemm", (WT,))
    for (ip, ix, hv), norms in acts:
        Hd = np.ascontiguousarray(_scatter(ip, ix, hv, m).T)
        Z = Hd @ WT
        op, ox, ov, _ = _sparse_mlp.extract_active(Z, RULE_RELATIVE, b, norms, 0, 1)
        D = np.ascontiguousarray(_scatter(op, ox, ov, m).T)
        # WT -= lr * Hd^T D, in place (W = WT.T is Fortran-ordered: W -= lr D^T Hd).
        gemm(-FT_LR, D.T, Hd.T, beta=1.0, c=WT.T, trans_b=1, overwrite_c=1)
    return WT


def _check_sessions(data, m):
    """The frozen low-rank session and the eager one agree (active sets and final weights)."""
    base, acts, b = data["base"], data["acts"], data["b"]
    rec_l, rec_e = [], []
    A = session_lowrank(LowRankUpdatedMatrix(base.T, copy=False,
                                             max_rank=default_max_rank(m, m)), acts, b, rec_l)
    assert A.frozen and A.n_flushes >= 1
    WT = session_eager(np.array(base), acts, b, rec_e)
    n_diff = 0
    for (pl, xl), (pe, xe) in zip(rec_l, rec_e):
        kl = np.repeat(np.arange(BATCH), np.diff(pl)) * m + xl
        ke = np.repeat(np.arange(BATCH), np.diff(pe)) * m + xe
        n_diff += np.setxor1d(kl, ke).size
    total = sum(p[-1] for p, _ in rec_e)
    assert n_diff <= 1e-4 * total, f"{n_diff} of {total} active pairs differ"
    probe = np.random.default_rng(1234).standard_normal(m).astype(DTYPE)
    np.testing.assert_allclose(A.matvec(probe), WT.T @ probe, rtol=1e-4,
                               atol=1e-4 * float(np.abs(WT.T @ probe).max()))
    assert np.array_equal(base, data["original"]), "the frozen base was written"
    return n_diff, int(total)


FT_IMPLS = ["subquad_ds LowRank frozen (default max_rank)",
            "subquad_ds LowRank frozen (max_rank = T n, no fold)",
            "eager sparse (RAM copy)", "numpy dense (RAM copy)"]


@pytest.mark.parametrize("m", WIDTHS)
@pytest.mark.parametrize("impl", FT_IMPLS)
def test_frozen_base(benchmark, machine_info, frozen, impl, m):
    data = frozen[m]
    base, acts, b = data["base"], data["acts"], data["b"]
    copy_times, agreement = [], None
    elem = np.dtype(DTYPE).itemsize
    if impl.startswith("subquad"):
        if "default" in impl:
            agreement = _check_sessions(data, m)
            max_rank = default_max_rank(m, m)
        else:
            max_rank = SESSION_STEPS * BATCH

        def setup():
            return (LowRankUpdatedMatrix(base.T, copy=False, max_rank=max_rank), acts, b), {}
        body = session_lowrank
        # Allocated next to the mapped base: the factor buffers, plus the
        # dense delta once a fold happened (measured after the benchmark).
        alloc = 2 * m * max_rank * elem
    else:
        def setup():
            t0 = time.perf_counter()
            WT = np.array(base)                     # the copy into RAM
            copy_times.append(time.perf_counter() - t0)
            return (WT, acts, b), {}
        body = session_eager if impl.startswith("eager") else session_dense
        alloc = m * m * elem
    benchmark.group = f"frozen-base-m{m}"
    _info(benchmark, machine_info, impl, m, session_steps=SESSION_STEPS,
          active_in_per_sample=float(np.mean([a[0][0][-1] for a in acts])) / BATCH)
    result = benchmark.pedantic(body, setup=setup, rounds=3, iterations=1)
    if isinstance(result, LowRankUpdatedMatrix):
        assert result.frozen
        if result._delta is not None:
            alloc += result._delta.nbytes
        benchmark.extra_info["n_flushes_per_session"] = result.n_flushes
    benchmark.extra_info["allocated_bytes"] = alloc
    benchmark.extra_info["mapped_base_bytes"] = base.nbytes
    if agreement is not None:
        benchmark.extra_info["active_pairs_differing_from_eager"] = agreement[0]
        benchmark.extra_info["active_pairs_per_session"] = agreement[1]
    if copy_times:
        benchmark.extra_info["copy_seconds"] = float(np.median(copy_times))
