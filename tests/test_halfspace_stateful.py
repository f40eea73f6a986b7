"""Long random add/remove/update/query sequences against a dict-of-points model."""

import numpy as np
from hypothesis import assume, settings, strategies as st
from hypothesis.extra import numpy as hynp
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from subquad_ds import HalfspaceIndex
from subquad_ds._halfspace import _set_split_min_work

from _oracles import halfspace_bruteforce, topk_bruteforce

D = 3
# Dyadic values: every score is exact in float32 and float64 (any summation
# order), so the oracle is unambiguous and thresholds drawn from the coarse
# grid produce real ties, which must be reported.
coord = st.integers(-8, 8).map(lambda v: v / 4)
floats = st.integers(-4096, 4096).map(lambda v: v / 1024)


def points(n):
    return hynp.arrays(np.float64, (n, D), elements=st.one_of(coord, floats))


# Tight clusters: a few dyadic centres plus offsets of at most 8/1024 per
# coordinate (still exact), so that leaves of two or more points get
# leaf-relative codes (single-point leaves have nothing to encode).
CENTRES = np.array([[2.0, -1.5, 0.5], [-1.0, 1.0, 2.0], [0.25, -2.0, -0.75]])
# Wide rows (128 features: 512 bytes in float32, 1 KiB in float64) also run
# stage 2 of the relative codes; same construction, dyadic centres.
WIDE = 128
WIDE_CENTRES = np.random.default_rng(7).integers(-8, 9, size=(3, WIDE)) / 4


def clustered_in(centres):
    """Points drawn around ``centres`` (tight, dyadic: exact scores)."""
    d = centres.shape[1]

    def draw(n):
        return st.tuples(
            hynp.arrays(np.intp, (n,), elements=st.integers(0, len(centres) - 1)),
            hynp.arrays(np.float64, (n, d), elements=st.integers(-8, 8).map(lambda v: v / 1024)),
        ).map(lambda t: centres[t[0]] + t[1])
    return draw


clustered_points = clustered_in(CENTRES)


def make_machine(points, dtype, d=D):
    """A state machine drawing its d-dimensional points from ``points`` into an
    index of ``dtype``."""

    class HalfspaceMachine(RuleBasedStateMachine):

        @initialize(X=st.integers(0, 12).flatmap(points), leaf_size=st.sampled_from([1, 2, 5]))
        def init(self, X, leaf_size):
            X = X.astype(dtype)
            self.index = HalfspaceIndex(X, leaf_size=leaf_size)
            self.model = {i: X[i].astype(np.float64) for i in range(X.shape[0])}
            self.next_id = X.shape[0]

        def _live(self):
            ids = np.array(sorted(self.model), dtype=np.intp)
            X = np.array([self.model[i] for i in ids]).reshape(-1, d)
            return ids, X

        @rule(X=st.integers(0, 9).flatmap(points))
        def add(self, X):
            X = X.astype(dtype)
            ids = self.index.add(X)
            np.testing.assert_array_equal(ids, np.arange(self.next_id, self.next_id + len(X)))
            for i, x in zip(ids, X):
                self.model[int(i)] = x.astype(np.float64)
            self.next_id += len(X)

        @rule(data=st.data())
        def remove(self, data):
            assume(self.model)
            ids = data.draw(st.lists(st.sampled_from(sorted(self.model)), unique=True,
                                     max_size=8))
            assert self.index.remove(ids) == len(ids)
            for i in ids:
                del self.model[i]

        @rule(data=st.data())
        def update(self, data):
            assume(self.model)
            ids = data.draw(st.lists(st.sampled_from(sorted(self.model)), unique=True,
                                     min_size=1, max_size=6))
            X = data.draw(points(len(ids))).astype(dtype)
            self.index.update(ids, X)
            for i, x in zip(ids, X):
                self.model[i] = x.astype(np.float64)

        @rule(W=hynp.arrays(np.float64, (3, d), elements=coord),
              b=st.lists(coord, min_size=3, max_size=3))
        def query(self, W, b):
            ids, X = self._live()
            ref_ptr, ref_idx, _ = halfspace_bruteforce(X, ids, W, b)
            indptr, indices = self.index.query(W.astype(dtype), b)
            np.testing.assert_array_equal(indptr, ref_ptr)
            for q in range(3):
                np.testing.assert_array_equal(np.sort(indices[indptr[q]:indptr[q + 1]]),
                                              ref_idx[ref_ptr[q]:ref_ptr[q + 1]])
            np.testing.assert_array_equal(self.index.query_count(W, b), np.diff(ref_ptr))

        @rule(w=hynp.arrays(np.float64, (d,), elements=coord),
              data=st.data(), delta=st.integers(-64, 64))
        def query_near_a_point(self, w, data, delta):
            # b within a few grid steps of a live point's score, so that the
            # point sits inside the screening bands (ties included)
            assume(self.model)
            ids, X = self._live()
            i = data.draw(st.integers(0, len(ids) - 1))
            b = float(X[i] @ w) + delta / 2 ** 16
            ref = ids[X @ w >= b]
            np.testing.assert_array_equal(np.sort(self.index.query(w.astype(dtype), b)), ref)

        @rule(W=hynp.arrays(np.float64, (2, d), elements=coord),
              b=st.lists(coord, min_size=2, max_size=2), n_threads=st.sampled_from([2, 3]))
        def split_queries(self, W, b, n_threads):
            # every query split across threads, however small: single
            # queries, and a batch too small to share out by queries
            ids, X = self._live()
            ref_ptr, ref_idx, _ = halfspace_bruteforce(X, ids, W, b)
            old = _set_split_min_work(0)
            try:
                for q in range(2):
                    got = self.index.query(W[q].astype(dtype), b[q], n_threads=n_threads)
                    np.testing.assert_array_equal(np.sort(got), ref_idx[ref_ptr[q]:ref_ptr[q + 1]])
                    assert self.index.query_count(W[q], b[q], n_threads=n_threads) == got.size
                indptr, indices = self.index.query(W.astype(dtype), b, n_threads=n_threads)
            finally:
                _set_split_min_work(old)
            np.testing.assert_array_equal(indptr, ref_ptr)
            for q in range(2):
                np.testing.assert_array_equal(np.sort(indices[indptr[q]:indptr[q + 1]]),
                                              ref_idx[ref_ptr[q]:ref_ptr[q + 1]])

        @rule(w=hynp.arrays(np.float64, (d,), elements=coord), k=st.integers(0, 6))
        def search(self, w, k):
            ids, X = self._live()
            s, i = self.index.search(w.astype(dtype), k)
            ref_s, ref_i = topk_bruteforce(X, ids, w, k)
            np.testing.assert_array_equal(i, ref_i[0])

        @rule()
        def rebuild(self):
            self.index.rebuild()

        @invariant()
        def consistent(self):
            if not hasattr(self, "index"):
                return
            assert len(self.index) == len(self.model)
            ids, X = self._live()
            np.testing.assert_array_equal(self.index.ids, ids)
            if ids.size:
                np.testing.assert_array_equal(self.index.get(ids), X.astype(dtype))
            self.index._core.check_invariants()

    return HalfspaceMachine


_SETTINGS = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestHalfspace64 = make_machine(points, np.float64).TestCase
TestHalfspace64.settings = _SETTINGS
TestHalfspace32 = make_machine(points, np.float32).TestCase
TestHalfspace32.settings = _SETTINGS
TestClusteredHalfspace64 = make_machine(clustered_points, np.float64).TestCase
TestClusteredHalfspace64.settings = _SETTINGS
TestClusteredHalfspace32 = make_machine(clustered_points, np.float32).TestCase
TestClusteredHalfspace32.settings = _SETTINGS
TestWideClusteredHalfspace64 = make_machine(clustered_in(WIDE_CENTRES), np.float64, WIDE).TestCase
TestWideClusteredHalfspace64.settings = _SETTINGS
TestWideClusteredHalfspace32 = make_machine(clustered_in(WIDE_CENTRES), np.float32, WIDE).TestCase
TestWideClusteredHalfspace32.settings = _SETTINGS
