"""HalfspaceIndex against the float64 brute-force oracle."""

import concurrent.futures
import copy
import gc
import pickle

import numpy as np
import pytest
import scipy.sparse as sp

from subquad_ds import HalfspaceIndex
from subquad_ds._halfspace import (_cap_screening_kernel, _set_split_min_work,
                                   _set_stage0_skip_spreads, screening_kernel)

from _oracles import check_csr_equal, halfspace_bruteforce, topk_bruteforce


@pytest.fixture(params=[0, 1, 2], ids=["portable", "avx2", "vnni"])
def kernel(request):
    """Run a test with each integer screening kernel this CPU supports."""
    old = _cap_screening_kernel(request.param)
    name = screening_kernel()
    if ("portable", "avx2", "avx512-vnni").index(name) != request.param:
        _cap_screening_kernel(old)
        pytest.skip(f"this CPU lacks the kernel (best: {name})")
    yield name
    _cap_screening_kernel(old)


def _live(index):
    ids = index.ids
    return index.get(ids) if ids.size else np.empty((0, index.n_features)), ids


def check_against_oracle(index, W, b, *, k=None):
    """query / query_count / scores / search agree with the oracle."""
    X, ids = _live(index)
    ref_ptr, ref_idx, ref_sc = halfspace_bruteforce(X, ids, W, b)
    indptr, scores, indices = index.query(W, b, return_scores=True)
    check_csr_equal(indptr, indices, ref_ptr, ref_idx)
    assert indptr.dtype == np.intp and indices.dtype == np.intp
    assert scores.dtype == np.float64       # the exact scores, for either dtype
    assert (scores >= np.repeat(np.broadcast_to(b, (len(indptr) - 1,)), np.diff(indptr))).all()
    # scores travel with their ids
    for q in range(len(indptr) - 1):
        sl = slice(indptr[q], indptr[q + 1])
        order = np.argsort(indices[sl])
        rtol = 1e-5 if index.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(scores[sl][order], ref_sc[ref_ptr[q]:ref_ptr[q + 1]],
                                   rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(index.query_count(W, b), np.diff(ref_ptr))
    ptr2, idx2 = index.query(W, b)
    check_csr_equal(ptr2, idx2, ref_ptr, ref_idx)
    if k is not None:
        s, i = index.search(W, k)
        ref_s, ref_i = topk_bruteforce(X, ids, W, k)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(s, ref_s.astype(index.dtype), rtol=1e-5)


def _thresholds(X, W, fractions, rng, *, on_scores=False):
    """Per-query b at the given selectivities (quantiles of the true scores).

    Unless ``on_scores`` (for data with exact arithmetic), b is put midway
    between two distinct scores: a b equal to an inexact score would make
    the answer depend on the rounding of the summation order.
    """
    S = np.atleast_2d(np.asarray(W, np.float64)) @ np.asarray(X, np.float64).T
    out = []
    for q in range(S.shape[0]):
        if S.shape[1] == 0:
            out.append(0.0)
            continue
        v = np.quantile(S[q], 1 - rng.choice(fractions), method="lower")
        if not on_scores:
            above = S[q][S[q] > v]
            v = (v + above.min()) / 2 if above.size else v + 1.0
        out.append(v)
    return np.array(out)


def clustered(rng, n, d, n_clusters=8, spread=0.05):
    centers = rng.normal(size=(n_clusters, d)) * 3
    return centers[rng.integers(n_clusters, size=n)] + spread * rng.normal(size=(n, d))


@pytest.mark.parametrize("kind", ["gaussian", "clustered", "duplicates", "integers"])
@pytest.mark.parametrize("d", [1, 3, 17, 64])
def test_oracle_random_data(dtype, rng, kind, d, kernel):
    n = 700
    if kind == "gaussian":
        X = rng.normal(size=(n, d))
    elif kind == "clustered":
        X = clustered(rng, n, d)
    elif kind == "duplicates":
        X = np.repeat(rng.normal(size=(7, d)), n // 7, axis=0)
    else:
        X = rng.integers(-3, 4, size=(n, d)).astype(float)
    X = X.astype(dtype)
    index = HalfspaceIndex(X, leaf_size=8)
    W = rng.normal(size=(9, d)).astype(dtype)
    if kind == "integers":
        W = rng.integers(-2, 3, size=(9, d)).astype(dtype)
    b = _thresholds(X, W, [0.001, 0.01, 0.1, 0.5, 0.99], rng, on_scores=kind == "integers")
    check_against_oracle(index, W, b, k=5)


def test_returned_scores_are_the_deciding_float64_scores(rng):
    # float32 points, thresholds just below each exact score: rounded to
    # float32, about half of those scores would fall below b
    X = rng.normal(size=(300, 16)).astype(np.float32)
    w = rng.normal(size=16).astype(np.float32)
    index = HalfspaceIndex(X, leaf_size=8)
    exact = X.astype(np.float64) @ w.astype(np.float64)
    for p in range(0, 300, 7):
        b = exact[p] - 1e-12 * abs(exact[p])
        scores, ids = index.query(w, b, return_scores=True)
        assert scores.dtype == np.float64 and p in ids
        np.testing.assert_allclose(scores, exact[ids], rtol=1e-13)
        assert (scores >= b).all()
    # top-k: two scores one float64 step apart stay ordered, not a float32 tie
    Y = np.array([[1.0, 0.0], [1.0 + 2.0**-23, 0.0]], dtype=np.float32)
    scores, ids = HalfspaceIndex(Y).search(np.array([1.0, 0.0], np.float32), 2)
    np.testing.assert_array_equal(ids, [1, 0])
    assert scores[0] > scores[1]


def test_ties_are_reported(dtype):
    # integer data: every score is exact, so b can sit exactly on scores
    X = np.array([[1, 2], [2, 1], [3, 0], [0, 3], [1, 2], [-1, 4]], dtype=dtype)
    index = HalfspaceIndex(X, leaf_size=1)
    w = np.array([1, 1], dtype=dtype)
    assert sorted(index.query(w, 3.0)) == [0, 1, 2, 3, 4, 5]
    assert sorted(index.query(w, np.nextafter(3.0, 4.0))) == []
    assert index.query_count(w, 3.0) == 6
    w = np.array([1, 0], dtype=dtype)
    assert sorted(index.query(w, 1.0)) == [0, 1, 2, 4]
    assert sorted(index.query(w, np.nextafter(1.0, 2.0))) == [1, 2]
    assert sorted(index.query(w, np.nextafter(1.0, 0.0))) == [0, 1, 2, 4]


@pytest.mark.parametrize("log2_scale", [-90, -20, 0, 30, 90])
def test_adversarial_near_threshold(dtype, rng, log2_scale, kernel):
    # Points whose scores differ from b by one unit of a 2**-20 (float32) or
    # 2**-40 (float64) relative grid, on both sides and exactly on it.  The
    # values are integers times a power of two, so every score is exact and
    # the oracle is unambiguous; all of these points sit deep inside the
    # int8 screening band and must be verified exactly.
    d = 24
    bits = 20 if dtype == np.float32 else 40
    base = rng.integers(2 ** (bits - 2), 2 ** (bits - 1), size=d) * rng.choice([-1, 1], d)
    w = rng.integers(-31, 32, size=d).astype(np.float64)
    n = 600
    Xi = base + rng.integers(-2, 3, size=(n, d)) * (rng.random((n, 1)) < 0.8)
    scale = 2.0 ** log2_scale
    X = (Xi.astype(np.float64) * scale).astype(dtype)
    assert np.array_equal(X.astype(np.float64) / scale, Xi)      # exact
    index = HalfspaceIndex(X, leaf_size=4)
    s = (Xi.astype(np.float64) @ w) * scale                      # exact scores
    assert np.unique(s).shape[0] > 20
    for v in [np.median(s), s[0], s[1], s.min(), s.max()]:
        for b in (v, np.nextafter(v, np.inf), np.nextafter(v, -np.inf)):
            ref = np.flatnonzero(s >= b)
            np.testing.assert_array_equal(np.sort(index.query(w.astype(dtype), b)), ref)
            assert index.query_count(w.astype(dtype), b) == ref.shape[0]
    ref_s, ref_i = topk_bruteforce(X, np.arange(n), w, 10)
    np.testing.assert_array_equal(index.search(w, 10)[1], ref_i[0])


def _sweep_exact_thresholds(index, w, s, quantiles):
    """Thresholds at, one unit above and one unit below the given quantiles
    of the exact scores s: query (with and without scores) and query_count
    agree with s >= b.  Returns the points refined (stage 1 of the relative
    codes, or the level-2 codes), decided by stage 2 of the relative codes
    and verified, in all."""
    refined = refined2 = verified = 0
    for v in np.quantile(s, quantiles, method="lower"):
        for b in (v, np.nextafter(v, np.inf), np.nextafter(v, -np.inf)):
            ref = np.flatnonzero(s >= b)
            np.testing.assert_array_equal(np.sort(index.query(w, b)), ref)
            assert index.query_count(w, b) == ref.shape[0]
            _, got = index.query(w, b, return_scores=True)
            np.testing.assert_array_equal(np.sort(got), ref)
            st = index._core.query_stats(w.astype(np.float64), b)
            assert st["count"] == ref.shape[0]
            refined += st["refined"]
            refined2 += st["refined2"]
            verified += st["verified"]
    return refined, refined2, verified


@pytest.mark.parametrize("log2_scale", [-90, -20, 0, 30, 90])
@pytest.mark.parametrize("rel_spread", [16, 11, 6])
def test_adversarial_level2_band_edge(dtype, rng, log2_scale, rel_spread, kernel):
    # Scores spread over a band of 2**-rel_spread relative around b, on a
    # 2**-20 (float32) or 2**-40 (float64) relative grid: the sweep crosses the edge
    # of the level-2 refinement bound, so some points are decided by their
    # level-2 codes, some are verified, and thresholds sit exactly on, one
    # unit above and one below scores.  Every value is an integer times a
    # power of two, so the oracle is exact.
    d = 24
    bits = 20 if dtype == np.float32 else 40
    base = rng.integers(2 ** (bits - 2), 2 ** (bits - 1), size=d) * rng.choice([-1, 1], d)
    w = rng.integers(-31, 32, size=d).astype(np.float64)
    n = 800
    spread = 2 ** (bits - rel_spread)
    Xi = base + rng.integers(-spread, spread + 1, size=(n, d))
    scale = 2.0 ** log2_scale
    X = (Xi.astype(np.float64) * scale).astype(dtype)
    assert np.array_equal(X.astype(np.float64) / scale, Xi)      # exact
    index = HalfspaceIndex(X, leaf_size=4)
    s = (Xi.astype(np.float64) @ w) * scale                      # exact scores
    refined, _, verified = _sweep_exact_thresholds(index, w.astype(dtype), s,
                                                   [0.02, 0.3, 0.5, 0.7, 0.98])
    assert verified <= refined
    if rel_spread <= 11 and 2.0 ** -110 < np.abs(X).max() < 2.0 ** 120:
        # wide spread (and float32 code scales): the refinement decides
        # points, not only the exact dots
        assert verified < refined


def test_level2_refinement_decides_most_of_the_band(dtype, rng, kernel):
    # Gaussian data at 10% selectivity: the level-2 codes decide almost
    # every point the level-1 codes leave undecided, and the answer stays
    # the oracle's.
    X = rng.normal(size=(4000, 64)).astype(dtype)
    index = HalfspaceIndex(X)
    W = rng.normal(size=(4, 64)).astype(dtype)
    b = _thresholds(X, W, [0.1], rng)
    check_against_oracle(index, W, b)
    for q in range(4):
        st = index._core.query_stats(W[q], b[q])
        assert st["screened"] == 4000
        assert st["refined"] > 0
        assert st["verified"] <= st["refined"] // 10


def test_tombstones_in_the_band_are_never_reported(dtype, rng, kernel):
    # Remove points whose scores lie just above b (inside the screening
    # band): they are refined or verified, and must not come back.
    X = rng.normal(size=(3000, 48)).astype(dtype)
    w = rng.normal(size=48).astype(dtype)
    s = X.astype(np.float64) @ w.astype(np.float64)
    b = float(np.quantile(s, 0.9))
    near = np.flatnonzero((s >= b) & (s < b + 0.05 * np.abs(b)))
    index = HalfspaceIndex(X)
    index.remove(near[::2])
    keep = np.setdiff1d(np.arange(3000), near[::2])
    ref = keep[s[keep] >= b]
    np.testing.assert_array_equal(np.sort(index.query(w, b)), ref)
    assert index.query_count(w, b) == ref.shape[0]
    st = index._core.query_stats(w, b)
    assert st["refined"] > 0 and st["count"] == ref.shape[0]


def test_slot_growth_paths_keep_every_point(dtype, rng):
    # fresh arrays (first add, and an add of more than the capacity, which
    # copies the used rows), then growth in place by single adds
    X = rng.normal(size=(5400, 12)).astype(dtype)
    index = HalfspaceIndex(X[:10], leaf_size=8)
    index.add(X[10:5000])
    for i in range(5000, 5400):
        index.add(X[i:i + 1])
    index._core.check_invariants()
    W = rng.normal(size=(3, 12)).astype(dtype)
    check_against_oracle(index, W, _thresholds(X, W, [0.01, 0.3], rng))


def test_exact_integer_boundaries(dtype, rng):
    # integer points and query: scores are exact integers; thresholds at,
    # just above and just below every distinct score
    d = 32
    X = rng.integers(-60, 61, size=(400, d)).astype(dtype)
    w = rng.integers(-50, 51, size=d).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=16)
    s = X.astype(np.float64) @ w.astype(np.float64)
    for v in np.unique(s)[::7]:
        for b in (v, np.nextafter(v, np.inf), np.nextafter(v, -np.inf)):
            assert index.query_count(w, b) == np.count_nonzero(s >= b)


def test_empty_and_single(dtype):
    index = HalfspaceIndex(np.empty((0, 3), dtype=dtype))
    assert len(index) == 0
    assert index.query(np.ones(3), 0.0).shape == (0,)
    indptr, indices = index.query(np.ones((2, 3)), 0.0)
    np.testing.assert_array_equal(indptr, [0, 0, 0])
    s, i = index.search(np.ones(3), 2)
    np.testing.assert_array_equal(i, [-1, -1])
    assert np.all(np.isneginf(s))
    index.add(np.array([[1.0, 2.0, 3.0]], dtype=dtype))
    assert list(index.query([1, 0, 0], 1.0)) == [0]
    assert list(index.query([1, 0, 0], 1.5)) == []
    s, i = index.search([0, 0, 1], 2)
    np.testing.assert_array_equal(i, [0, -1])
    assert s[0] == 3.0
    index.remove(0)
    assert len(index) == 0 and 0 not in index
    assert index.query_count([1, 0, 0], -1e9) == 0
    clone = pickle.loads(pickle.dumps(index))
    assert len(clone) == 0 and clone.dtype == dtype
    assert list(clone.add(np.ones((1, 3)))) == [1]
    assert list(index.add(np.ones((1, 3)))) == [1]   # ids are never reused


def test_zero_query_vector(dtype, rng):
    X = rng.normal(size=(300, 5)).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=4)
    z = np.zeros(5)
    assert index.query_count(z, 0.0) == 300        # 0 >= 0
    assert index.query_count(z, -1.0) == 300
    assert index.query_count(z, 1e-300) == 0
    scores, ids = index.query(z, 0.0, return_scores=True)
    assert np.all(scores == 0)
    s, i = index.search(z, 3)
    np.testing.assert_array_equal(i, [0, 1, 2])


def test_d1(dtype, rng):
    X = rng.normal(size=(500, 1)).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=3)
    W = np.array([[1.0], [-1.0], [0.0], [2.5]])
    check_against_oracle(index, W, [0.3, 0.3, 0.0, -1.0], k=4)


def test_sparse_queries_match_dense(dtype, rng):
    X = rng.normal(size=(800, 64)).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=16)
    W = rng.normal(size=(20, 64)) * (rng.random((20, 64)) < 0.1)
    W[3] = 0.0                                      # an empty row
    b = _thresholds(X, W.astype(dtype), [0.01, 0.1], rng)
    dense_ptr, dense_idx = index.query(W.astype(dtype), b)
    for make in (sp.csr_matrix, sp.csr_array, sp.csc_matrix, sp.coo_array):
        Ws = make(W.astype(dtype))
        ptr, idx = index.query(Ws, b)
        check_csr_equal(ptr, idx, dense_ptr, np.concatenate(
            [np.sort(dense_idx[dense_ptr[q]:dense_ptr[q + 1]]) for q in range(20)]))
        np.testing.assert_array_equal(index.query_count(Ws, b), np.diff(dense_ptr))
        s1, i1 = index.search(Ws, 4)
        s2, i2 = index.search(W.astype(dtype), 4)
        np.testing.assert_array_equal(i1, i2)
    # duplicate entries in a CSR row are summed (scipy semantics)
    Wd = sp.csr_matrix((np.array([1.0, 2.0]), np.array([5, 5]), np.array([0, 2])),
                       shape=(1, 64))
    ptr, idx = index.query(Wd, 0.0)
    np.testing.assert_array_equal(np.sort(idx), np.sort(index.query(np.eye(64)[5] * 3, 0.0)))


def test_float32_float64_agree(rng):
    X = rng.normal(size=(1000, 16))
    W = rng.normal(size=(10, 16))
    b = _thresholds(X, W, [0.05], rng)
    p32, i32 = HalfspaceIndex(X.astype(np.float32)).query(W, b)
    p64, i64 = HalfspaceIndex(X).query(W, b)
    # identical except for points within float32 rounding of b
    S = W @ X.T
    close = np.abs(S - b[:, None]) < 1e-4 * (np.abs(S) + 1)
    for q in range(10):
        a = set(i32[p32[q]:p32[q + 1]]) ^ set(i64[p64[q]:p64[q + 1]])
        assert all(close[q, j] for j in a)


def test_dynamic_against_oracle(dtype, rng):
    d = 16
    index = HalfspaceIndex(clustered(rng, 500, d).astype(dtype), leaf_size=8)
    for step in range(30):
        op = step % 3
        if op == 0:
            index.add(clustered(rng, int(rng.integers(1, 60)), d).astype(dtype))
        elif op == 1:
            ids = index.ids
            index.remove(rng.choice(ids, size=min(len(ids), 40), replace=False))
        else:
            ids = rng.choice(index.ids, size=30, replace=False)
            index.update(ids, clustered(rng, 30, d).astype(dtype))
        index._core.check_invariants()
        W = rng.normal(size=(4, d))
        X, ids = _live(index)
        check_against_oracle(index, W, _thresholds(X, W, [0.01, 0.2, 0.7], rng), k=7)
    assert index._core.n_rebuilds > 5


def test_update_keeps_ids_and_moves_points(dtype):
    index = HalfspaceIndex(np.zeros((100, 2), dtype=dtype), leaf_size=4)
    index.update([5, 7], np.array([[10.0, 0.0], [0.0, 10.0]]))
    assert sorted(index.query([1, 0], 5.0)) == [5]
    assert sorted(index.query([0, 1], 5.0)) == [7]
    np.testing.assert_array_equal(index.get([7, 5]), [[0, 10], [10, 0]])
    assert index.get([7]).dtype == dtype


def test_explicit_ids_and_next_id(dtype):
    index = HalfspaceIndex(np.ones((3, 2), dtype=dtype))
    out = index.add(np.ones((2, 2)), ids=[100, 50])
    np.testing.assert_array_equal(out, [100, 50])
    assert 100 in index and 50 in index and 4 not in index and "x" not in index
    np.testing.assert_array_equal(index.add(np.ones((1, 2))), [101])
    np.testing.assert_array_equal(index.ids, [0, 1, 2, 50, 100, 101])


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_round_trip(dtype, rng, protocol):
    index = HalfspaceIndex(rng.normal(size=(300, 8)).astype(dtype), leaf_size=8)
    index.remove(np.arange(0, 300, 5))
    index.update([1, 2], np.ones((2, 8)))
    index.add(rng.normal(size=(10, 8)), ids=[1000 + i for i in range(10)])
    clone = pickle.loads(pickle.dumps(index, protocol=protocol))
    assert clone.dtype == dtype and len(clone) == len(index)
    assert clone.leaf_size == 8
    np.testing.assert_array_equal(clone.ids, index.ids)
    W = rng.normal(size=(5, 8))
    b = np.zeros(5)
    p1, i1 = index.query(W, b)
    p2, i2 = clone.query(W, b)
    check_csr_equal(p2, i2, p1, np.concatenate(
        [np.sort(i1[p1[q]:p1[q + 1]]) for q in range(5)]))
    np.testing.assert_array_equal(clone.add(np.ones((1, 8))), [1010])
    deep = copy.deepcopy(index)
    assert len(deep) == len(index)


def test_pickle_rejects_unknown_version():
    index = HalfspaceIndex(np.ones((2, 2)))
    fn, (cls, state) = index.__reduce__()
    state["version"] = 99
    with pytest.raises(ValueError, match="unsupported HalfspaceIndex state version 99"):
        fn(cls, state)


@pytest.mark.parametrize("n_threads", [1, 2, None])
def test_threads_agree(rng, n_threads):
    X = clustered(rng, 3000, 24).astype(np.float32)
    index = HalfspaceIndex(X, leaf_size=16, n_threads=n_threads)
    W = rng.normal(size=(64, 24)).astype(np.float32)
    b = _thresholds(X, W, [0.01, 0.1], rng)
    ref = HalfspaceIndex(X, leaf_size=16, n_threads=1)
    p1, s1, i1 = index.query(W, b, return_scores=True)
    p2, s2, i2 = ref.query(W, b, return_scores=True, n_threads=1)
    # deterministic: same order per query whatever the thread count
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(index.search(W, 5)[1], ref.search(W, 5)[1])


def _check_single_answer(ids, scores, s, b):
    """One single query's ids (any order) and scores, given the oracle
    scores ``s`` of ids 0..n-1 and the threshold ``b``."""
    expect = np.flatnonzero(s >= b)
    order = np.argsort(ids)
    np.testing.assert_array_equal(ids[order], expect)
    np.testing.assert_allclose(scores[order], s[expect], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("split", [False, True], ids=["one-thread", "split"])
def test_single_queries_from_several_python_threads(rng, split):
    """Single queries keep per-thread result buffers between calls: threads
    querying one index at once, with results from empty to every point and
    with and without scores, each get exactly their own answers; also when
    each query is split across OpenMP threads of its own."""
    X = clustered(rng, 4000, 20)
    index = HalfspaceIndex(X, leaf_size=16)
    W = rng.normal(size=(24, 20))
    S = W @ X.T
    b = np.quantile(S, [1.0, 0.999, 0.9, 0.5, 0.0], axis=1)
    b[0] += 1.0                                   # nothing reported
    b[-1] -= 1.0                                  # everything reported
    jobs = [(q, level) for q in range(W.shape[0]) for level in range(b.shape[0])]

    threads = 2 if split else 1

    def run(offset):
        out = []
        for j in range(len(jobs)):
            q, level = jobs[(j + offset) % len(jobs)]
            scores, ids = index.query(W[q], b[level, q], return_scores=True, n_threads=threads)
            out.append((q, level, ids, scores, index.query(W[q], b[level, q], n_threads=threads)))
        return out

    old = _set_split_min_work(0) if split else None
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(run, range(0, 4 * 29, 29)))
    finally:
        if split:
            _set_split_min_work(old)
    for out in results:
        for q, level, ids, scores, ids_only in out:
            _check_single_answer(ids, scores, S[q], b[level, q])
            np.testing.assert_array_equal(np.sort(ids_only), np.flatnonzero(S[q] >= b[level, q]))


def test_single_query_reentered_from_a_garbage_collector_callback(rng):
    """A single query run by a gc callback while another single query on the
    same thread still holds its results in the thread's buffers: both
    answers stay exact."""
    X = clustered(rng, 3000, 12)
    index = HalfspaceIndex(X, leaf_size=16)
    W = rng.normal(size=(8, 12))
    S = W @ X.T
    b = np.quantile(S, 0.6, axis=1)
    answers = []

    def nested_query(phase, info):
        if phase == "start" and len(answers) < 100:
            q = len(answers) % W.shape[0]
            answers.append((q, index.query(W[q], b[q], return_scores=True)))

    threshold = gc.get_threshold()
    gc.callbacks.append(nested_query)
    gc.set_threshold(1)                       # collect at (almost) every allocation
    try:
        for _ in range(4):
            for q in range(W.shape[0]):
                answers.append((q, index.query(W[q], b[q], return_scores=True)))
    finally:
        gc.callbacks.remove(nested_query)
        gc.set_threshold(*threshold)
    assert len(answers) > 4 * W.shape[0]      # the callback did run queries
    for q, (scores, ids) in answers:
        _check_single_answer(ids, scores, S[q], b[q])


@pytest.fixture
def split_every_query():
    """Split every single query that straddles two or more subtrees across
    threads, however small (the default waits for ~10k points at d = 32)."""
    old = _set_split_min_work(0)
    yield
    _set_split_min_work(old)


@pytest.mark.parametrize("n_threads", [2, 3, 7])
@pytest.mark.parametrize("kind", ["gaussian", "clustered", "duplicates"])
def test_split_single_queries_against_oracle(dtype, rng, kind, n_threads, split_every_query):
    """A single query cut into subtrees walked by several threads (more
    threads than cores too), on an index with several segments, tombstones
    and updated points: ids, scores and counts match the oracle, from
    nothing to every point reported."""
    d = 13
    if kind == "gaussian":
        X = rng.normal(size=(1500, d))
    elif kind == "clustered":
        X = clustered(rng, 1500, d)
    else:
        X = np.repeat(rng.normal(size=(5, d)), 300, axis=0)
    X = X.astype(dtype)
    index = HalfspaceIndex(X[:1000], leaf_size=8)
    index.add(X[1000:1300])                       # a second segment
    for x in X[1300:]:
        index.add(x[None])                        # the insertion buffer
    index.remove(rng.choice(1500, size=200, replace=False))
    moved = rng.choice(index.ids, size=50, replace=False)
    index.update(moved, X[rng.integers(1500, size=50)])
    Xl, ids = _live(index)
    W = rng.normal(size=(30, d)).astype(dtype)
    S = W.astype(np.float64) @ Xl.astype(np.float64).T
    b = _thresholds(Xl, W, [0.001, 0.01, 0.1, 0.5, 0.9], rng)
    b[0] = S[0].max() + 1.0
    b[1] = S[1].min() - 1.0
    n_split = 0
    for q in range(W.shape[0]):
        expect = ids[S[q] >= b[q]]
        scores, got = index.query(W[q], b[q], return_scores=True, n_threads=n_threads)
        order = np.argsort(got)
        np.testing.assert_array_equal(got[order], expect)
        rtol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(scores[order], S[q][S[q] >= b[q]], rtol=rtol, atol=rtol)
        np.testing.assert_array_equal(np.sort(index.query(W[q], b[q], n_threads=n_threads)),
                                      expect)
        assert index.query_count(W[q], b[q], n_threads=n_threads) == expect.size
        st = index._core.query_stats(W[q].astype(np.float64), b[q], n_threads)
        assert st["count"] == expect.size
        n_split += st["subtrees"] > 0
    assert n_split >= 20                          # the queries were split


def test_split_query_output_is_deterministic(rng, split_every_query):
    """A split query's hits come in the order of its subtrees, not of the
    threads' timing: repeated calls return identical arrays."""
    X = clustered(rng, 3000, 16)
    index = HalfspaceIndex(X, leaf_size=8)
    w = rng.normal(size=16)
    b = float(np.quantile(X @ w, 0.7))
    first_scores, first = index.query(w, b, return_scores=True, n_threads=2)
    assert index._core.query_stats(w, b, 2)["subtrees"] > 1
    for _ in range(30):
        scores, ids = index.query(w, b, return_scores=True, n_threads=2)
        np.testing.assert_array_equal(ids, first)
        np.testing.assert_array_equal(scores, first_scores)


def test_small_batches_split_each_query(dtype, rng, split_every_query):
    """Fewer than 4 queries per thread run one after the other, each split
    across the threads: same answers as the oracle, CSR layout intact."""
    X = clustered(rng, 2000, 9).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=8, n_threads=2)
    W = rng.normal(size=(3, 9)).astype(dtype)
    b = _thresholds(X, W, [0.01, 0.3, 0.9], rng)
    check_against_oracle(index, W, b, k=4)
    rows = sp.csr_array(np.where(rng.random((3, 9)) < 0.5, W, 0))
    ptr, idx = index.query(rows, b)
    ref_ptr, ref_idx, _ = halfspace_bruteforce(X, np.arange(2000), rows.toarray(), b)
    check_csr_equal(ptr, idx, ref_ptr, ref_idx)


def test_large_single_queries_split_by_default(rng):
    """Without the test hook: a query straddling ~20k points at d = 32 is
    split (and answered exactly); a selective one on clustered data or
    n_threads=1 is not."""
    X = rng.standard_normal((20000, 32), dtype=np.float32)
    index = HalfspaceIndex(X)
    w = rng.standard_normal(32).astype(np.float32)
    s = X.astype(np.float64) @ w.astype(np.float64)
    b = float(np.quantile(s, 0.9))
    assert index._core.query_stats(w, b, 2)["subtrees"] > 1
    assert index._core.query_stats(w, b, 1)["subtrees"] == 0
    np.testing.assert_array_equal(np.sort(index.query(w, b, n_threads=2)), np.flatnonzero(s >= b))
    C = clustered(rng, 20000, 32).astype(np.float32)
    b = float(np.quantile(C.astype(np.float64) @ w.astype(np.float64), 0.999))
    assert HalfspaceIndex(C)._core.query_stats(w, b, 2)["subtrees"] == 0


def test_read_only_and_non_contiguous_inputs(rng):
    X = rng.normal(size=(200, 12))[:, ::2]
    X.flags.writeable = False
    index = HalfspaceIndex(X)
    W = rng.normal(size=(6, 12)).T            # non-contiguous, 12 queries
    W.flags.writeable = False
    b = np.zeros(12)
    b.flags.writeable = False
    check_against_oracle(index, W, b, k=3)
    ids = np.array([1, 2])
    ids.flags.writeable = False
    Y = rng.normal(size=(2, 12))[:, ::2]
    Y.flags.writeable = False
    index.update(ids, Y)
    index.remove(ids)
    assert len(index) == 198


def test_large_magnitudes_and_tiny_values(dtype, rng):
    # points whose per-point int8 scale is not a normal float32 fall back to
    # exact verification; results stay exact
    big = 1e36 if dtype == np.float32 else 1e300
    X = rng.normal(size=(50, 4))
    X[:10] *= 1e-40 if dtype == np.float64 else 1e-38
    X[10:20] *= big / 10
    X = X.astype(dtype)
    index = HalfspaceIndex(X, leaf_size=4)
    w = np.array([1.0, 0.0, 0.0, 0.0], dtype=dtype)
    s = X[:, 0].astype(np.float64)
    for b in (0.0, 1e-45, -1e-45, 1.0, big / 100):
        np.testing.assert_array_equal(np.sort(index.query(w, b)), np.flatnonzero(s >= b))


def test_repr_and_properties(rng):
    index = HalfspaceIndex(rng.normal(size=(5, 3)).astype(np.float32))
    assert repr(index) == "<HalfspaceIndex(n=5, d=3, dtype=float32)>"
    assert index.n_features == 3 and index.dtype == np.float32


def test_single_adds_use_the_insertion_buffer(dtype, rng):
    # with n / 256 > leaf_size the trailing leaf grows past leaf_size before
    # a tree is built over it; answers stay exact throughout
    index = HalfspaceIndex(clustered(rng, 4000, 6).astype(dtype), leaf_size=4)
    sizes = set()
    for i in range(60):
        index.add(clustered(rng, 1, 6).astype(dtype))
        sizes.add(index._core.segment_sizes[-1])
        if i % 10 == 9:
            index._core.check_invariants()
            W = rng.normal(size=(3, 6))
            X, _ = _live(index)
            check_against_oracle(index, W, _thresholds(X, W, [0.01, 0.3], rng), k=3)
    assert max(sizes) > 4          # the buffer leaf outgrew leaf_size


def test_merge_rule_follows_the_mix_of_adds_and_queries(dtype, rng):
    # single adds with no queries merge lazily (base 3: each segment holds
    # more than half of all later ones, and fewer rebuilds); with a query
    # after every add the tail merges eagerly (each segment at least twice
    # the next: fewer segments to walk); answers are exact either way
    X = clustered(rng, 9000, 6).astype(dtype)
    lazy = HalfspaceIndex(X[:600], leaf_size=8)
    eager = HalfspaceIndex(X[:600], leaf_size=8)
    w = rng.normal(size=6)
    for k in range(600, len(X)):
        lazy.add(X[k:k + 1])
        eager.add(X[k:k + 1])
        eager.query(w, 0.0)
    sizes = lazy._core.segment_sizes
    assert all(2 * s > sum(sizes[i + 1:]) for i, s in enumerate(sizes))
    assert any(s < 2 * t for s, t in zip(sizes, sizes[1:]))
    sizes = eager._core.segment_sizes
    assert all(s >= 2 * t for s, t in zip(sizes, sizes[1:]))
    assert lazy._core.n_rebuilds < eager._core.n_rebuilds
    W = rng.normal(size=(4, 6))
    for index in (lazy, eager):
        index._core.check_invariants()
        check_against_oracle(index, W, _thresholds(X, W, [0.01, 0.3], rng), k=3)


def test_dimension_beyond_integer_screening(rng):
    # d > 16384: integer dots could overflow int32, so screening is off and
    # every candidate leaf is verified exactly
    d = 16390
    X = rng.normal(size=(40, d)).astype(np.float32)
    index = HalfspaceIndex(X, leaf_size=4)
    W = rng.normal(size=(3, d)).astype(np.float32)
    check_against_oracle(index, W, _thresholds(X, W, [0.1, 0.5], rng), k=3)


def test_query_stats_accounting(rng):
    X = clustered(rng, 3000, 16).astype(np.float32)
    index = HalfspaceIndex(X, leaf_size=16)
    w = rng.normal(size=16)
    b = float(np.quantile(X @ w, 0.99))
    st = index._core.query_stats(w, b)
    assert st["count"] == index.query_count(w, b)
    assert st["screened"] + st["bulk"] <= len(index) and st["nodes"] > 0
    assert st["verified"] <= st["refined"] <= st["screened"]
    assert st["refined2"] <= st["refined"]


def test_large_build_uses_parallel_subtrees(dtype, rng):
    # n >= 16384 builds the top levels first and the subtrees below them in
    # parallel, then splices them in preorder: the tree must be the same
    # kind of valid tree, and answers exact
    X = clustered(rng, 20000, 8).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=16)
    index._core.check_invariants()
    W = rng.normal(size=(5, 8))
    check_against_oracle(index, W, _thresholds(X, W, [0.001, 0.05], rng), k=4)


# -- tree shape -------------------------------------------------------------

def _steps(m, leaf_size):
    """Levels below a node of m points if every cut is in the middle half."""
    k = 0
    while m > leaf_size and m >= 2:
        m = min(m - m // 4, m - 1)
        k += 1
    return k


def _tree_depths(tree):
    """Depth of every node of every segment (preorder, right child = right[i])."""
    depth = np.zeros(len(tree["start"]), dtype=np.intp)
    for _, _, node0, n_nodes in tree["segments"]:
        for i in range(node0, node0 + n_nodes):
            r = tree["right"][i]
            if r >= 0:
                depth[i + 1] = depth[node0 + r] = depth[i] + 1
    return depth


def _check_depth_bound(index):
    tree = index._core.tree_arrays()
    depth = _tree_depths(tree)
    for start, end, node0, n_nodes in tree["segments"]:
        steps = _steps(end - start, index.leaf_size)
        bound = max(min(2 * steps + 4, 120), steps)
        assert depth[node0:node0 + n_nodes].max() <= bound
    return depth


def test_separated_clusters_get_their_own_subtrees(dtype, rng):
    # well separated clusters of very unequal sizes: every cluster is the
    # exact slot range of one node, even at ratios far from the middle half
    d = 8
    sizes = [1500, 37, 400, 9, 2600, 120, 3]
    centers = rng.normal(size=(len(sizes), d)) * 20
    labels = np.repeat(np.arange(len(sizes)), sizes)
    X = (centers[labels] + 0.05 * rng.normal(size=(len(labels), d))).astype(dtype)
    perm = rng.permutation(len(labels))
    X, labels = X[perm], labels[perm]
    index = HalfspaceIndex(X, leaf_size=16)
    assert index._core.n_segments == 1
    index._core.check_invariants()
    tree = index._core.tree_arrays()
    slot_labels = np.empty_like(labels)
    slot_labels[index._core.slots_of(index.ids)] = labels[index.ids]
    ranges = set(zip(tree["start"].tolist(), tree["end"].tolist()))
    for c in range(len(sizes)):
        where = np.flatnonzero(slot_labels == c)
        assert where[-1] - where[0] + 1 == sizes[c]          # contiguous
        assert (where[0], where[-1] + 1) in ranges           # one node
    # a query that selects one cluster screens (about) only that cluster
    for c in [1, 4, 5]:
        w = centers[c] / np.linalg.norm(centers[c])
        s = X.astype(np.float64) @ w
        b = s[labels == c].min() - 1e-3
        st = index._core.query_stats(w, b)
        assert st["count"] == np.count_nonzero(s >= b)
        assert st["screened"] + st["bulk"] <= st["count"] + 2 * 16


def test_lopsided_data_keeps_depth_logarithmic(dtype, rng):
    # exponentially spaced points on a line: the unrestricted 1-D 2-means cut
    # would peel one point per level; the depth budget stops it
    n = 3000
    X = np.exp(np.linspace(0.0, 60.0, n))[:, None] * np.ones((1, 3))
    X = X[rng.permutation(n)].astype(dtype)
    for leaf_size in [1, 8]:
        index = HalfspaceIndex(X, leaf_size=leaf_size)
        index._core.check_invariants()
        depth = _check_depth_bound(index)
        assert depth.max() > 2 * _steps(n, leaf_size) - 8     # the budget is used
        W = np.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.5]])
        check_against_oracle(index, W, _thresholds(X, W, [0.001, 0.3], rng), k=3)


def test_high_dimensional_gaussian_leaves_hold_several_points(dtype, rng):
    # In d = 130 the far pair's own points project far outside the rest of a
    # small node; lopsided cuts keep 2 points per side, so they are not
    # peeled off as single-point leaves.
    n, leaf_size = 3000, 64
    X = rng.normal(size=(n, 130)).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=leaf_size)
    t = index._core.tree_arrays()
    sizes = (t["end"] - t["start"])[t["right"] < 0]
    assert sizes.min() >= 2
    assert len(sizes) <= 2 * n // leaf_size
    W = rng.normal(size=(4, 130)).astype(dtype)
    check_against_oracle(index, W, _thresholds(X, W, [0.01, 0.3], rng), k=3)


@pytest.mark.parametrize("kind", ["outliers", "ladder", "two_points", "tiny"])
def test_tree_invariants_on_awkward_data(dtype, rng, kind):
    d = 5
    if kind == "outliers":      # a blob and a few far points
        X = np.vstack([rng.normal(size=(900, d)), 1e6 * rng.normal(size=(5, d))])
    elif kind == "ladder":      # clusters of sizes 1, 2, 4, ..., 512
        sizes = 2 ** np.arange(10)
        centers = rng.normal(size=(10, d)) * 10
        X = np.repeat(centers, sizes, axis=0) + 0.01 * rng.normal(size=(sizes.sum(), d))
    elif kind == "two_points":  # duplicates of two distinct points
        X = np.repeat(rng.normal(size=(2, d)), [700, 11], axis=0)
    else:                       # n smaller than or near leaf_size
        X = rng.normal(size=(3, d))
    X = X[rng.permutation(len(X))].astype(dtype)
    for leaf_size in [1, 4, 128]:
        index = HalfspaceIndex(X, leaf_size=leaf_size)
        index._core.check_invariants()
        _check_depth_bound(index)
        W = rng.normal(size=(4, d))
        check_against_oracle(index, W, _thresholds(X, W, [0.01, 0.5], rng), k=2)
    if kind == "two_points":
        # the two distinct values are split apart whatever their counts
        index = HalfspaceIndex(X, leaf_size=4)
        tree = index._core.tree_arrays()
        assert tree["radius"][1] < 1e-6 and tree["radius"][tree["right"][0]] < 1e-6


def test_build_is_independent_of_thread_count(rng):
    # the parallel subtree build (n >= 16384) yields the sequential tree
    threadpoolctl = pytest.importorskip("threadpoolctl")
    # (and so is the parallel encoding of the codes, n >= 8192: the work
    # counters of a query depend on every code and error constant)
    X = clustered(rng, 20000, 6, n_clusters=40).astype(np.float32)
    W = rng.normal(size=(8, 6))
    trees, stats = [], []
    for threads in [1, 2, 3]:
        with threadpoolctl.threadpool_limits(threads, user_api="openmp"):
            index = HalfspaceIndex(X, leaf_size=16)
        trees.append(index._core.tree_arrays())
        stats.append([index._core.query_stats(w, float(np.quantile(X @ w, 0.9))) for w in W])
    for t in trees[1:]:
        for key in ["start", "end", "right", "center", "radius", "segments"]:
            np.testing.assert_array_equal(t[key], trees[0][key])
    assert stats[1] == stats[0] and stats[2] == stats[0]
    assert sum(st["refined"] for st in stats[0]) > 0


def test_tree_shape_is_independent_of_the_data_scale(dtype, rng):
    # Splits sort float32 keys of the projections, offset and scaled by a
    # power of two per node: data scaled by 2**k (exact) get the same cuts
    # at any scale, with no key overflowing or underflowing float32 (at
    # 2**+-400 the raw projections lie far outside its range).
    X = clustered(rng, 6000, 24, n_clusters=30).astype(np.float64)
    exps = [-60, 0, 60] if dtype == np.float32 else [-400, -60, 0, 60, 400]
    shapes = []
    for e in exps:
        Xe = (X * 2.0 ** e).astype(dtype)
        index = HalfspaceIndex(Xe[:5000], leaf_size=16)
        for k in range(5000, 6000, 7):      # tail segments: the unrefined builds
            index.add(Xe[k:k + 7])
        t = index._core.tree_arrays()
        shapes.append([t[key] for key in ["start", "end", "right", "segments"]])
        assert len(t["segments"]) > 1
    for shape in shapes[1:]:
        for a, b in zip(shape, shapes[0]):
            np.testing.assert_array_equal(a, b)


def test_leaf_balls_are_no_larger_than_centroid_balls(dtype, rng):
    # a leaf's centre is refined (approximate minimum enclosing ball) only
    # when that shrinks its radius; on Gaussian blobs it mostly does
    X = clustered(rng, 5000, 12, n_clusters=20, spread=0.3).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=64)
    tree = index._core.tree_arrays()
    slots = index._core.slots_of(index.ids)
    Xs = np.empty((len(X), X.shape[1]))
    Xs[slots] = X[index.ids]
    shrunk = 0
    leaves = np.flatnonzero(tree["right"] < 0)
    for i in leaves:
        P = Xs[tree["start"][i]:tree["end"][i]]
        c = P.mean(axis=0).astype(np.float32).astype(np.float64)
        r_centroid = np.sqrt(((P - c) ** 2).sum(axis=1).max())
        assert tree["radius"][i] <= r_centroid * (1 + 1e-9) + 1e-12
        shrunk += tree["radius"][i] < 0.97 * r_centroid
    assert shrunk > len(leaves) // 2
    index._core.check_invariants()


def test_build_near_the_overflow_limit(rng):
    # projections and sums of squares overflow (inf - inf = NaN): the split
    # heuristics must still yield a valid tree and exact answers
    X = rng.normal(size=(3000, 5)) * 1e300
    index = HalfspaceIndex(X, leaf_size=4)
    index._core.check_invariants()
    _check_depth_bound(index)
    w = np.array([1.0, -1.0, 0.5, 0.0, 0.0])
    s = X @ w
    for b in (0.0, 1e299, -1e300):
        np.testing.assert_array_equal(np.sort(index.query(w, b)), np.flatnonzero(s >= b))


def test_queries_whose_scores_could_overflow_float64_are_rejected(rng):
    X = rng.normal(size=(200, 6)) * 1e200
    index = HalfspaceIndex(X, leaf_size=8)
    w = rng.normal(size=6)
    # scores near 1e200 are fine, and exact
    np.testing.assert_array_equal(np.sort(index.query(w, 0.0)), np.flatnonzero(X @ w >= 0))
    big = w * 1e120           # max|p_j| * ||w||_1 > 1e307: a score could overflow
    for call in (lambda: index.query(big, 0.0),
                 lambda: index.query(np.stack([w, big]), [0.0, 0.0]),
                 lambda: index.query(sp.csr_array(np.stack([w, big])), 0.0),
                 lambda: index.query_count(big, 0.0),
                 lambda: index.search(big, 3)):
        with pytest.raises(ValueError, match="W: scores of query .* could overflow float64"):
            call()
    assert len(index) == 200
    # the bound follows the stored points: gone after removal and a rebuild
    small = rng.normal(size=(5, 6))
    index.add(small)
    index.remove(np.arange(200))
    index.rebuild()
    np.testing.assert_array_equal(np.sort(index.query(big, 0.0)),
                                  200 + np.flatnonzero(small @ big >= 0))
    # and it survives pickling
    again = pickle.loads(pickle.dumps(HalfspaceIndex(X)))
    with pytest.raises(ValueError, match="could overflow"):
        again.query(big, 0.0)


def test_live_max_abs_skips_tombstones(dtype, rng):
    # the entry bound a rebuild recomputes, read in place from the live slots
    X = rng.normal(size=(300, 5)).astype(dtype)
    X[17, 2] = -40.0
    X[50, 4] = 25.0
    index = HalfspaceIndex(X, leaf_size=8)
    assert index._core.live_max_abs() == 40.0
    index.remove([17])
    assert index._core.live_max_abs() == 25.0           # tombstone skipped
    index.rebuild()
    assert index._core.live_max_abs() == np.abs(np.delete(X, 17, axis=0)).max()
    index.remove(index.ids)
    assert index._core.live_max_abs() == 0.0


def test_update_raises_the_overflow_bound_and_unpickling_recomputes_it(rng):
    index = HalfspaceIndex(rng.normal(size=(30, 4)))
    w = np.full(4, 1e300)
    assert len(index.query(w, 0.0)) <= 30            # scores ~1e300: allowed
    index.update([3], np.full((1, 4), 1e10))
    with pytest.raises(ValueError, match="could overflow"):
        index.query(w, 0.0)
    index.remove([3])
    with pytest.raises(ValueError, match="could overflow"):
        index.query(w, 0.0)                           # the bound only grows...
    restored = pickle.loads(pickle.dumps(index))      # ...until the points are re-read
    X = index.get(restored.ids)
    np.testing.assert_array_equal(np.sort(restored.query(w, 0.0)),
                                  restored.ids[np.flatnonzero(X @ w >= 0)])


def test_float32_indexes_never_reach_the_overflow_check(rng):
    X = (rng.normal(size=(50, 4)) * 1e38).astype(np.float32)
    index = HalfspaceIndex(X)
    w = np.full(4, 3e38, dtype=np.float32)
    s = X.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_array_equal(np.sort(index.query(w, 0.0)), np.flatnonzero(s >= 0))


# -- leaf-relative codes ------------------------------------------------------

def _relative_leaves(index):
    t = index._core.tree_arrays()
    return int(((t["right"] < 0) & (t["rel"][:, 0] > 0)).sum())


@pytest.fixture(params=[-np.inf, np.inf], ids=["stage0", "skip-stage0"])
def stage0_skip(request):
    """Run a test with every relative leaf through stage 0, then with every
    one (of positive radius) skipping it: its whole chunks go to stage 1."""
    old = _set_stage0_skip_spreads(request.param)
    yield request.param
    _set_stage0_skip_spreads(old)


@pytest.mark.parametrize("d", [32, 136])
def test_relative_leaves_near_b_skip_stage0(dtype, rng, d, kernel):
    # A leaf whose centre lies near b sends whole chunks to stage 1 instead
    # of screening them at stage 0 first; the answers are the same either
    # way, and by default only some of the leaves skip.
    X = clustered(rng, 5000, d, n_clusters=16, spread=0.1).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=64)
    t = index._core.tree_arrays()
    assert _relative_leaves(index) == (t["right"] < 0).sum()
    W = rng.normal(size=(4, d)).astype(dtype)
    B = _thresholds(X, W, [0.02, 0.2], rng)
    default = _set_stage0_skip_spreads(0.0)
    stats = {}
    try:
        for spreads in (-np.inf, default, np.inf):
            _set_stage0_skip_spreads(spreads)
            check_against_oracle(index, W, B)
            stats[spreads] = [index._core.query_stats(W[i], float(B[i])) for i in range(4)]
    finally:
        _set_stage0_skip_spreads(default)
    for never, some, always in zip(stats[-np.inf], stats[default], stats[np.inf]):
        assert never["count"] == some["count"] == always["count"]
        assert never["screened"] == some["screened"] == always["screened"] > 0
        # skipping: every screened slot reaches stage 1
        assert always["refined"] == always["screened"]
        assert never["refined"] <= some["refined"] <= always["refined"]
        assert never["refined"] < always["refined"]
    refined = {k: sum(s["refined"] for s in v) for k, v in stats.items()}
    assert refined[-np.inf] < refined[default] < refined[np.inf]


def test_relative_codes_are_used_on_clustered_data_only(dtype, rng, kernel):
    # Tight clusters: (almost) every leaf screens through codes relative to
    # its centre; Gaussian data keep the absolute codes.  Both are exact.
    X = clustered(rng, 6000, 40, n_clusters=24, spread=0.1).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=64)
    t = index._core.tree_arrays()
    assert _relative_leaves(index) >= 0.9 * (t["right"] < 0).sum()
    index._core.check_invariants()
    W = rng.normal(size=(6, 40)).astype(dtype)
    check_against_oracle(index, W, _thresholds(X, W, [0.001, 0.01, 0.1, 0.5], rng), k=5)
    G = rng.normal(size=(6000, 40)).astype(dtype)
    assert _relative_leaves(HalfspaceIndex(G, leaf_size=64)) == 0


@pytest.mark.parametrize("d", [5, 37, 130])
@pytest.mark.parametrize("log2_scale", [-60, 0, 60])
def test_relative_codes_are_the_same_on_every_kernel(rng, d, log2_scale):
    # float32 points get their leaf-relative codes from AVX2 intrinsics
    # where the CPU has AVX2, else from the generic code: the codes and the
    # leaf constants (sums of squares in the same order) must be identical
    if screening_kernel() == "portable":
        pytest.skip("this CPU lacks AVX2")
    X = (clustered(rng, 3000, d, n_clusters=12, spread=0.1) * 2.0 ** log2_scale).astype(np.float32)
    fast = HalfspaceIndex(X, leaf_size=64)
    old = _cap_screening_kernel(0)
    try:
        generic = HalfspaceIndex(X, leaf_size=64)
    finally:
        _cap_screening_kernel(old)
    tf, tg = fast._core.tree_arrays(), generic._core.tree_arrays()
    assert (tf["rel"][:, 0] > 0).sum() > 0
    for key in tf:
        np.testing.assert_array_equal(tf[key], tg[key])
    for slot in range(0, 3000, 3):
        for a, b in zip(fast._core.rel_codes(slot), generic._core.rel_codes(slot)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("d", [40, 130])
def test_relative_planes_are_allocated_when_a_leaf_first_needs_them(dtype, rng, d, kernel):
    # Gaussian data never use the relative codes, so their planes (1.5 d
    # bytes per slot with stage 2) are not allocated; a later add whose build
    # finds tight clusters allocates them, and the index stays exact while
    # its capacity grows further.
    G = rng.normal(size=(3000, d)).astype(dtype)
    index = HalfspaceIndex(G, leaf_size=64)
    assert not index._core.rel_planes and _relative_leaves(index) == 0
    C = clustered(rng, 20000, d, n_clusters=12, spread=0.1).astype(dtype)
    index.add(C)                                  # one build of >= 16384 slots
    assert index._core.rel_planes and _relative_leaves(index) > 0
    index._core.check_invariants()
    index.add(clustered(rng, 500, d, n_clusters=3, spread=0.1).astype(dtype))
    index.remove(np.arange(0, 23000, 7))
    Xl, _ = _live(index)
    W = rng.normal(size=(5, d)).astype(dtype)
    check_against_oracle(index, W, _thresholds(Xl, W, [0.01, 0.1, 0.5], rng), k=3)


@pytest.mark.parametrize("log2_scale", [-90, -20, 0, 30, 90])
@pytest.mark.parametrize("rel_spread", [14, 10, 7])
@pytest.mark.parametrize("d", [24, 136])
def test_adversarial_relative_band_edges(dtype, rng, log2_scale, rel_spread, d, kernel,
                                         stage0_skip):
    # A few tight clusters of points on a 2**-20 (float32) or 2**-40
    # (float64) relative grid, so that every score is exact: thresholds at,
    # one unit above and one unit below scores sweep across the edges of the
    # stage-0, stage-1 and (d = 136: rows of X of 544 bytes or more) stage-2
    # bands of the relative codes, at scales 2**-90 .. 2**90.  Stage 1, and
    # stage 2 where it runs, must decide points, not only the exact dots.
    bits = 20 if dtype == np.float32 else 40
    spread = 2 ** (bits - rel_spread)
    centres = rng.integers(2 ** (bits - 2), 2 ** (bits - 1), size=(4, d)) \
        * rng.choice([-1, 1], (4, d))
    n = 1200
    Xi = centres[rng.integers(4, size=n)] + rng.integers(-spread, spread + 1, size=(n, d))
    w = rng.integers(-31, 32, size=d).astype(np.float64)
    scale = 2.0 ** log2_scale
    X = (Xi.astype(np.float64) * scale).astype(dtype)
    assert np.array_equal(X.astype(np.float64) / scale, Xi)      # exact
    index = HalfspaceIndex(X, leaf_size=32)
    stage2 = index._core.r3w > 0
    assert stage2 == (d == 136)
    rel_used = 2.0 ** -100 < np.abs(X).max() < 2.0 ** 100        # float32-safe scales
    if rel_used:
        assert _relative_leaves(index) > 0
        index._core.check_invariants()
    s = (Xi.astype(np.float64) @ w) * scale                      # exact scores
    refined, refined2, verified = _sweep_exact_thresholds(index, w.astype(dtype), s,
                                                          [0.05, 0.2, 0.5, 0.8, 0.95])
    assert verified <= refined and refined2 <= refined
    if not stage2:
        assert refined2 == 0
    if rel_used and rel_spread >= 10:
        assert verified < refined
        if stage2:
            assert 0 < refined2 and verified < refined2


@pytest.mark.parametrize("d", [32, 130])
def test_relative_leaves_with_tombstones(dtype, rng, d, kernel, stage0_skip):
    # Removed points of relative leaves whose scores lie far above b (decided
    # by stage 0, or by stage 1 where leaves skip it) or near it (stages 1
    # and 2, verification) never come back.
    X = clustered(rng, 4000, d, n_clusters=10, spread=0.1).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=64)
    assert _relative_leaves(index) > 0
    w = rng.normal(size=d).astype(dtype)
    s = X.astype(np.float64) @ w.astype(np.float64)
    b = float(np.quantile(s, 0.7))
    gone = np.concatenate([np.flatnonzero(s >= b)[::3], np.flatnonzero(s < b)[::5]])
    index.remove(gone)
    keep = np.setdiff1d(np.arange(4000), gone)
    for bb in (b, float(np.quantile(s, 0.95)), float(s.max()) + 1):
        ref = keep[s[keep] >= bb]
        np.testing.assert_array_equal(np.sort(index.query(w, bb)), ref)
        assert index.query_count(w, bb) == ref.shape[0]
        scores, ids = index.query(w, bb, return_scores=True)
        assert ids.shape == ref.shape


@pytest.mark.parametrize("d", [24, 130])
def test_updates_grow_or_retire_relative_constants(dtype, rng, d):
    # Small moves re-encode the point against its leaf and grow the leaf's
    # constants; a move far from the centre turns the leaf's relative codes
    # off.  Either way the index stays exact and its invariants hold.
    X = clustered(rng, 3000, d, n_clusters=6, spread=0.1).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=64)
    before = _relative_leaves(index)
    assert before > 0
    ids = rng.choice(3000, size=200, replace=False)
    index.update(ids[:150], (X[ids[:150]] + 0.02 * rng.normal(size=(150, d))).astype(dtype))
    index._core.check_invariants()
    index.update(ids[150:], (X[ids[150:]] + 5.0 * rng.normal(size=(50, d))).astype(dtype))
    index._core.check_invariants()
    assert _relative_leaves(index) < before
    Xl, _ = _live(index)
    W = rng.normal(size=(5, d)).astype(dtype)
    check_against_oracle(index, W, _thresholds(Xl, W, [0.01, 0.1, 0.5], rng), k=3)


@pytest.mark.parametrize("d", [24, 136])
@pytest.mark.parametrize("sign", [1, -1])
def test_relative_bounds_are_nearly_tight_for_aligned_residuals(dtype, rng, d, sign, kernel):
    # With w = +-sign(e), e a point's residual at the finest level its leaf
    # uses (stage 1 at d = 24, stage 2 at d = 136), |<e, w>| = ||e||_1, about
    # 0.87 sqrt(d) ||e||: the Cauchy-Schwarz band of that level is nearly
    # tight.  Thresholds swept across the point's exact score in steps of a
    # twentieth of the band must all give the oracle's answer; a band
    # shrunk to 0.3x misclassifies the point.  Dyadic data: exact scores.
    n = 1500
    centres = rng.integers(-2 ** 14, 2 ** 14, size=(6, d))
    Xi = centres[rng.integers(6, size=n)] + rng.integers(-2 ** 9, 2 ** 9, size=(n, d))
    X = (Xi / 2.0 ** 12).astype(dtype)
    index = HalfspaceIndex(X, leaf_size=32)
    core = index._core
    t = core.tree_arrays()
    leaves = np.flatnonzero((t["right"] < 0) & (t["rel"][:, 0] > 0))
    assert leaves.size > 0
    ids = core.live_ids()
    slot_to_id = dict(zip(core.slots_of(ids).tolist(), ids.tolist()))
    checked = 0
    for node in rng.choice(leaves, size=min(4, leaves.size), replace=False):
        s4, A0, C0, A1, C1, A2, C2 = (float(x) for x in t["rel"][node])
        slot = next(s for s in range(t["start"][node], t["end"][node]) if s in slot_to_id)
        pid = slot_to_id[slot]
        r = X[pid].astype(np.float64) - t["center"][node].astype(np.float64)
        hi, lo, q3 = core.rel_codes(slot)
        q8 = 16 * hi + lo
        if q3 is None:
            e, C = r - s4 / 16 * q8, C1
        else:
            e, C = r - s4 / 256 * (16 * q8 + q3), C2
        w = sign * np.where(e >= 0, 1.0, -1.0)
        scores = Xi @ w / 2.0 ** 12                          # exact
        band = C * np.sqrt(d)
        assert np.abs(e).sum() > 0.5 * band                  # nearly tight
        for frac in np.linspace(-1.0, 1.0, 41):
            b = scores[pid] + frac * band
            ref = np.flatnonzero(scores >= b)
            np.testing.assert_array_equal(np.sort(index.query(w.astype(dtype), b)), ref)
            st = core.query_stats(w, b)
            checked += st["refined2" if q3 is not None else "refined"] > 0
    assert checked > 0
