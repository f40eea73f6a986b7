"""Exact, dynamic half-space (inner-product threshold) reporting.

The public :class:`HalfspaceIndex` validates input, fixes the dtype and
forwards to the private Cython core ``_halfspace._HalfspaceCore``, whose
header documents the algorithm, its invariants and the rounding argument.
"""

import math
import numbers

import numpy as np

from ._halfspace import _HalfspaceCore
from ._validation import (
    all_finite,
    as_float_array,
    as_index_array,
    check_bool,
    check_int,
    check_n_threads,
    check_scalar_or_vector,
    reject_bools,
    is_sparse,
    resolve_float_dtype,
    to_float,
)

__all__ = ["HalfspaceIndex"]

_STATE_VERSION = 1
# Largest allowed bound on a score's partial sums, max|p_j| * ||w||_1: below
# it no float64 inner product (in any summation order, with its rounding)
# can overflow (float64 overflows beyond 1.797e308).
_MAX_SCORE = 1e307
_MODE_COUNT, _MODE_IDS, _MODE_SCORES = 0, 1, 2
_INTP_MIN, _INTP_MAX = int(np.iinfo(np.intp).min), int(np.iinfo(np.intp).max)


class HalfspaceIndex:
    """Exact, dynamic half-space reporting: every point with ``<p, w> >= b``.

    Stores a set of points with integer ids and answers, exactly,
    *which points lie in the half-space* ``{p : <p, w> >= b}`` for query
    vectors ``w`` and thresholds ``b``, while points are added, removed and
    updated.  It also answers exact top-k inner-product search.

    Three mechanisms beat a brute-force scan (which is memory-bound):

    - a ball tree per segment: with centre ``c`` and radius ``r``, every
      point of a ball scores within ``<c, w> +- r ||w||``, so whole subtrees
      are skipped or reported without computing an inner product (this pays
      on clustered data);
    - an int8 copy of the points with a rigorous per-point error bound:
      leaves are screened reading 1 byte per coordinate against a two-level
      int8 copy of the query; the few points whose bound straddles ``b``
      are refined with an int8 code of their quantisation residual, and
      only what is still undecided is verified with an exact dot product
      (this pays on unstructured data, where no tree prunes in high
      dimension);
    - leaves whose points lie close to their centre (tight clusters) also
      get 4-bit codes of ``p - c`` with one scale and error bound per leaf:
      they are screened reading half a byte per coordinate with integer
      thresholds, then the other 4 bits for the 16-point blocks holding
      undecided points (a leaf whose centre scores near ``b`` is read
      through both halves in one pass), then, where a row of ``X`` spans
      512 bytes or more, a third 4-bit code per coordinate for the points
      still undecided, then exact verification.  Build-time only: a leaf
      gets them if their 8-bit error bound is at most half its points'
      mean absolute-code error; a leaf that single adds extend, or an
      update moves a point far from, falls back to the absolute codes.

    Parameters
    ----------
    X : array-like of shape (n_points, n_features)
        Initial points (``n_points`` may be 0).  The index works in float32
        if ``X`` is a float32 ndarray and in float64 otherwise; later inputs
        are cast to that dtype.  Points get ids ``0 .. n_points-1``.
    leaf_size : int, default=256
        Maximum number of points per leaf (a node with more is split in
        two by 2-means, within a depth bound of O(log n); lopsidedly if
        that separates clusters, except in the small segments of fewer than
        16384 points that single adds rebuild).  Smaller leaves prune more
        finely on clustered data but cost more node bounds per query (at
        N = 200,000, d = 32 and 128, 256 was 2-35% faster than 128 in 16 of
        17 benchmark groups, single and top-10 queries on Gaussian and
        clustered data).
    n_threads : int, default=None
        Threads for queries (OpenMP): a batch shares its queries out among
        them; a single query large enough to pay for it (and each query of
        a batch with fewer than 4 queries per thread) is split into
        subtrees that they walk.  ``None`` or -1: all usable cores; ``-k``:
        all but ``k-1``; 1: every query on the calling thread.  Can be
        overridden per call.  Builds and large adds use as many threads as
        OpenMP allows (limit them with ``OMP_NUM_THREADS`` or
        ``threadpoolctl``); the result does not depend on the thread count.

    Attributes
    ----------
    n_features : int
        Dimension ``d`` of the points.
    dtype : numpy.dtype
        float32 or float64, fixed at construction.
    leaf_size : int
        As given.
    n_threads : int
        The resolved default thread count.

    See Also
    --------
    faiss.IndexFlatIP.range_search : brute-force scan, no exact removal
        cheaper than O(n).

    Notes
    -----
    **Semantics.**  A point is reported iff ``score(p, w) >= b`` (ties at
    ``b`` are reported), where ``score`` is the inner product of the stored
    values (for float32, the query is cast to float32 too) accumulated in
    float64.  ``b`` is used in float64.  Points whose exact inner product is
    farther from ``b`` than the float64 rounding error are decided
    identically for every summation order; the pruning and screening bounds
    are widened so that they can never change an answer.  A float64 index
    rejects (ValueError) a query whose scores could overflow float64:
    ``||w||_1`` times the largest entry of any point stored since the last
    :meth:`rebuild` (or unpickling) must stay below 1e307.

    **Complexity** (n live points, d features).  Build: O(n d log n).
    ``remove``: O(log n) (a tombstone; a full compaction after n/4
    removals, O(d log n) amortised).  ``add``: O(d log^2 n) amortised per
    point (logarithmic method: segments of growing size, merged and rebuilt
    when newer ones catch up; single points first fill an insertion
    buffer leaf in O(d)).  While adds outnumber query rows 32 to 1 (over
    the recent calls), segments merge lazily: each added point is rebuilt
    about half as often, and queries walk more segments (1.06-1.25x the
    time on an index grown that way).  Otherwise they merge eagerly (the
    last two whenever the last reaches half the size of the one before).
    :meth:`rebuild` makes a single segment.  ``update``: O(d log n) in
    place (ancestor radii grow; the tail from a segment is rebuilt after
    that segment absorbed as many updates as half its size).  Query: in
    the worst case (no pruning) 2 n d one-byte integer multiply-adds (n d
    bytes read), plus O(d) per point whose error bound straddles ``b`` and
    O(1) per reported point; with pruning, only the leaves that straddle
    the hyperplane are screened.  A single query is split across
    ``n_threads`` threads when its straddling subtrees hold enough points
    (about 10k at d = 32, 4k at d = 128): the split costs about 5 us and,
    on the benchmark's 200k points, two threads answered 1.4-1.9 times
    faster than one.  Top-k :meth:`search` of one query always runs on one
    thread.  Memory: per point, the point itself plus ``2 d' + 28`` bytes
    (``d'`` = d rounded up to a multiple of 4), plus about 60-70 bytes for
    the id hash map and the tree nodes; once a build finds leaves that
    qualify for leaf-relative codes (clustered data; never Gaussian data),
    ``d''`` more (d rounded up to a multiple of 8), and ``d'' / 2`` more
    again where a point takes 512 bytes or more (d >= 128 in float32, 64 in
    float64: their third level).

    **When it pays.**  Clustered or low-intrinsic-dimension data (the tree
    skips and reports whole subtrees), selective queries, and workloads that
    mix queries with updates (no O(n) rebuild per change).  On isotropic
    Gaussian data in high dimension it is a 1-byte-per-coordinate scan:
    still faster than a float32 scan, but not asymptotically.  It does not
    pay for tiny sets (a numpy product is as fast) or for queries that
    report most of the points (the output dominates).

    **Thread-safety.**  ``query``, ``query_count``, ``search``, ``get``,
    ``__len__`` and ``__contains__`` only read and release the GIL in their
    kernels: they may run concurrently with each other.  ``add``,
    ``remove``, ``update`` and ``rebuild`` mutate and must not run
    concurrently with any other method.  Each thread that runs single
    queries (1-D ``w``), and each OpenMP thread that walks part of a split
    one, keeps its result buffers (ids, scores) between calls, for all
    indexes: they hold the capacity of its largest result up to 2**20 ids
    (8 MiB, 16 MiB with scores) and are released past that.  Python
    threads querying at once each start their own OpenMP threads: pass
    ``n_threads=1`` there to avoid oversubscribing the cores.  Do the same
    on a machine whose cores are busy with other work: a split query (like
    a batch) waits for all its threads, and with one of two cores busy the
    slowest 1% of large single queries took 5-8 ms instead of 0.4-3 ms
    (their median still fell 1.3-2.1x, but at d = 128 their mean rose).

    **Errors.**  Every argument is validated before anything changes: a
    call that raises leaves the index unchanged.

    References
    ----------
    Song, Yang, Zhang, "Does preprocessing help training over-parameterized
    neural networks?", NeurIPS 2021 (half-space reporting to find fired
    neurons).  Song, Zhang, Zhang, "Training multi-layer over-parametrized
    neural network in subquadratic time", ITCS 2024.

    Examples
    --------
    >>> import numpy as np
    >>> from subquad_ds import HalfspaceIndex
    >>> X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> index = HalfspaceIndex(X)
    >>> np.sort(index.query([1.0, 1.0], 1.0))
    array([0, 1, 2])
    >>> index.remove([2])
    1
    >>> index.add([[2.0, 2.0]])
    array([3])
    >>> indptr, indices = index.query([[1.0, 0.0], [0.0, 1.0]], [1.5, 0.5])
    >>> indptr
    array([0, 1, 3])
    >>> scores, ids = index.search([1.0, 1.0], 2)
    >>> scores, ids
    (array([4., 1.]), array([3, 0]))
    >>> import pickle
    >>> len(pickle.loads(pickle.dumps(index)))
    3
    """

    def __init__(self, X, *, leaf_size=256, n_threads=None):
        dtype = resolve_float_dtype(X)
        X = as_float_array(X, "X", dtype=dtype, ndim=2)
        if X.shape[1] < 1:
            raise ValueError(f"X must have at least one feature; got shape {X.shape}")
        self.leaf_size = check_int(leaf_size, "leaf_size", minimum=1)
        self.n_threads = check_n_threads(n_threads)
        self._core = _HalfspaceCore(X.shape[1], self.leaf_size, dtype)
        self._max_abs = self._entry_bound(X)
        self._core.add(X, np.arange(X.shape[0], dtype=np.intp))

    # -- properties -------------------------------------------------------

    @property
    def n_features(self):
        return self._core.d

    @property
    def dtype(self):
        return self._core.dtype

    @property
    def ids(self):
        """Live ids, sorted (a new array)."""
        return np.sort(self._core.live_ids())

    def __len__(self):
        return self._core.n_alive

    def __contains__(self, id_):
        if isinstance(id_, (bool, np.bool_)) or not isinstance(id_, numbers.Integral):
            return False
        id_ = int(id_)
        if not _INTP_MIN <= id_ <= _INTP_MAX:  # would overflow np.intp
            return False
        return bool(self._core.has_ids(np.array([id_], dtype=np.intp))[0])

    def __repr__(self):
        return (f"<HalfspaceIndex(n={len(self)}, d={self.n_features}, "
                f"dtype={self.dtype.name})>")

    # -- validation helpers -------------------------------------------------

    def _points(self, X, name="X"):
        if (type(X) is np.ndarray and X.ndim == 2 and X.dtype == self._core.dtype
                and X.flags.c_contiguous and X.shape[1] == self._core.d):
            # fast path for the common exact-fit input (a single add or
            # update spends most of its time validating otherwise)
            if not all_finite(X):
                raise ValueError(f"{name} must be finite; found NaN or inf")
            return X
        X = as_float_array(X, name, dtype=self.dtype, ndim=2)
        if X.shape[1] != self.n_features:
            raise ValueError(f"{name} has {X.shape[1]} features; the index has "
                             f"{self.n_features}")
        return X

    @staticmethod
    def _distinct(ids, name):
        if ids.shape[0] > 1 and np.unique(ids).shape[0] != ids.shape[0]:
            raise ValueError(f"{name} contains duplicates")

    def _live_ids(self, ids, name="ids"):
        ids = as_index_array(ids, name)
        self._distinct(ids, name)
        pos = self._core.first_missing(ids)
        if pos >= 0:
            raise KeyError(f"{name}[{pos}] = {ids[pos]} is not in the index")
        return ids

    def _threads(self, n_threads):
        return self.n_threads if n_threads is None else check_n_threads(n_threads)

    def _queries(self, W):
        """Return (single, data, indptr, indices, n_queries) for dense or CSR W."""
        d = self.n_features
        if is_sparse(W):
            if W.ndim != 2:
                raise ValueError(f"W must be 2-D; got shape {W.shape}")
            if W.shape[1] != d:
                raise ValueError(f"W has {W.shape[1]} features; the index has {d}")
            W = W.tocsr()
            data = as_float_array(W.data, "W.data", dtype=self.dtype, ndim=1)
            indptr = np.ascontiguousarray(W.indptr, dtype=np.intp)
            indices = np.ascontiguousarray(W.indices, dtype=np.intp)
            if indices.size and (indices.min() < 0 or indices.max() >= d):
                raise ValueError("W has column indices outside [0, n_features)")
            if (indptr.shape[0] != W.shape[0] + 1 or indptr[0] != 0
                    or np.any(np.diff(indptr) < 0) or indptr[-1] != indices.shape[0]
                    or data.shape[0] != indices.shape[0]):
                raise ValueError("W is not a valid CSR matrix")
            if self._max_abs and data.size:
                rows = np.repeat(np.arange(W.shape[0]), np.diff(indptr))
                self._check_no_overflow(np.bincount(rows, np.abs(data), W.shape[0]))
            return False, data, indptr, indices, W.shape[0]
        if (type(W) is np.ndarray and W.dtype == self.dtype and W.ndim == 1
                and W.flags.c_contiguous and W.shape[0] == d):
            # fast path for the common single query (still checked for NaN/inf)
            if not all_finite(W):
                raise ValueError("W must be finite; found NaN or inf")
            if self._max_abs:
                self._check_no_overflow(float(np.abs(W).sum()))
            return True, W.reshape(1, d), None, None, 1
        W = as_float_array(W, "W", dtype=self.dtype, ndim=(1, 2))
        single = W.ndim == 1
        if single:
            W = W.reshape(1, -1)
        if W.shape[1] != d:
            raise ValueError(f"W has {W.shape[1]} features; the index has {d}")
        if self._max_abs and W.size:
            self._check_no_overflow(np.abs(W).sum(axis=1))
        return single, W, None, None, W.shape[0]

    def _entry_bound(self, X):
        """Largest entry magnitude of finite points X (float64 indexes; else 0)."""
        if self.dtype != np.float64 or X.size == 0:
            return 0.0
        return float(max(X.max(), -X.min()))

    def _check_no_overflow(self, l1_norms):
        """ValueError if a query's scores could overflow float64.

        Every partial sum of ``<p, w>`` is at most ``max|p_j| * ||w||_1`` in
        magnitude (``max|p_j|`` over every point stored since the last
        rebuild or unpickling).  ``l1_norms``: a float (one query) or an
        array.  Callers skip it when ``_max_abs`` is 0: float32 indexes
        (which never get near the limit, see ``_entry_bound``) and indexes
        of zero points.
        """
        limit = _MAX_SCORE / self._max_abs
        if isinstance(l1_norms, float):
            if l1_norms <= limit:
                return
            l1_norms = np.array([l1_norms])
        elif (l1_norms <= limit).all():
            return
        q = int(np.argmax(~(l1_norms <= limit)))   # also an infinite norm
        raise ValueError(
            f"W: scores of query {q} could overflow float64 (||w||_1 = "
            f"{l1_norms[q]:.3g} times the largest point entry {self._max_abs:.3g} "
            f"exceeds {_MAX_SCORE:g}); rescale the queries or the points")

    def _thresholds(self, b, n_queries, single):
        if type(b) is not float:                          # (a float is the fast path)
            reject_bools(b, "b")
        if single:
            if type(b) is float or isinstance(b, numbers.Real):   # not bool: see above
                b = to_float(b)
                if not math.isfinite(b):
                    raise ValueError("b must be finite; found NaN or inf")
                return (b,)
            b = as_float_array(b, "b", dtype=np.float64, ndim=(0, 1))
            if b.size != 1:
                raise ValueError(f"b must be a scalar for a 1-D w; got shape {b.shape}")
            return b.reshape(1)
        return check_scalar_or_vector(b, "b", length=n_queries, dtype=np.float64)

    # -- mutation -----------------------------------------------------------

    def add(self, X, ids=None):
        """Add points.

        Parameters
        ----------
        X : array-like of shape (n_new, n_features)
            The points, cast to the index dtype.
        ids : array-like of int of shape (n_new,), optional
            Ids in ``[0, iinfo(intp).max)`` not in the index, all distinct.
            By default ``max(every id ever used) + 1`` onwards.

        Returns
        -------
        ids : ndarray of shape (n_new,), dtype intp
            The ids of the new points.

        Notes
        -----
        O(d log^2 n) amortised per point; how eagerly the segments merge
        follows the recent mix of adds and queries (see the class notes).
        Not thread-safe.
        """
        X = self._points(X)
        if ids is None:
            if self._core.next_id + X.shape[0] > _INTP_MAX:  # must stay representable
                raise ValueError(f"no default ids are left after {self._core.next_id - 1}; "
                                 "pass ids")
        else:
            ids = as_index_array(ids, "ids")
            if ids.shape[0] != X.shape[0]:
                raise ValueError(f"ids has {ids.shape[0]} entries; X has {X.shape[0]} rows")
            if ids.size and ids.min() < 0:
                raise ValueError("ids must be non-negative")
            if ids.size and ids.max() >= _INTP_MAX:  # next_id = max + 1 would overflow
                raise ValueError(f"ids must be < {_INTP_MAX}; got {ids.max()}")
            self._distinct(ids, "ids")
            pos = self._core.first_present(ids)
            if pos >= 0:
                raise ValueError(f"ids[{pos}] = {ids[pos]} is already in the index")
            ids = ids.copy()     # the caller's array is not ours to return
        bound = max(self._max_abs, self._entry_bound(X))   # before anything changes
        ids = self._core.add(X, ids)
        self._max_abs = bound
        return ids

    def remove(self, ids):
        """Remove points by id.

        Parameters
        ----------
        ids : int or array-like of int
            Distinct ids, all in the index.

        Returns
        -------
        n_removed : int

        Raises
        ------
        KeyError
            If an id is not in the index; nothing is removed then.

        Notes
        -----
        O(log n) per id (a tombstone) plus an O(n d log n) compaction every
        n/4 removals.  Not thread-safe.
        """
        ids = self._live_ids(ids)
        return int(self._core.remove(ids))

    def update(self, ids, X):
        """Replace the coordinates of existing points.

        Parameters
        ----------
        ids : int or array-like of int of shape (n_upd,)
            Distinct ids in the index.
        X : array-like of shape (n_upd, n_features)
            New coordinates.

        Notes
        -----
        O(d log n) per point in place: the balls on the point's path grow
        to cover it, and the trees are rebuilt after half as many updates
        as they hold points.  Small moves cost queries little; points moved
        far (to another cluster) blunt the pruning until then (1,000 such
        moves on the 200k-point clustered benchmark made 1% queries 5.5x
        slower): after a large relocation call :meth:`rebuild`, or
        :meth:`remove` and :meth:`add` the moved points.  Not thread-safe.
        """
        ids = self._live_ids(ids)
        X = self._points(X)
        if X.shape[0] != ids.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows; ids has {ids.shape[0]} entries")
        bound = max(self._max_abs, self._entry_bound(X))   # before anything changes
        self._core.update(ids, X)
        self._max_abs = bound

    def get(self, ids):
        """Coordinates of the given ids, shape ``(len(ids), n_features)``.

        Raises KeyError for an unknown id.  Thread-safe with other readers.
        """
        ids = as_index_array(ids, "ids")
        pos = self._core.first_missing(ids)
        if pos >= 0:
            raise KeyError(f"ids[{pos}] = {ids[pos]} is not in the index")
        return self._core.get(ids)

    def rebuild(self):
        """Compact tombstones and rebuild one tree over all points (O(n d log n))."""
        self._core.rebuild()
        if self.dtype == np.float64:
            # the bound shrinks back to the live points (no copy of them)
            self._max_abs = self._core.live_max_abs()

    # -- queries ------------------------------------------------------------

    def query(self, W, b, *, return_scores=False, n_threads=None):
        """Report every point with ``<p, w> >= b``.

        Parameters
        ----------
        W : array-like of shape (n_features,) or (n_queries, n_features), or \
scipy sparse matrix/array of shape (n_queries, n_features)
            Query vectors (sparse input is read as CSR rows).
        b : float or array-like of shape (n_queries,)
            Thresholds, finite (not bool): a scalar for a 1-D ``w``; a
            scalar or one per query for a batch.
        return_scores : bool, default=False
            Also return the scores ``<p, w>`` of the reported points.
        n_threads : int, optional
            Overrides the index's default for this call.  A single query
            uses more than one thread only if it is large enough to pay
            for the split (see Notes of the class).

        Returns
        -------
        ids : ndarray of intp
            For a 1-D ``w``: the reported ids (``(scores, ids)`` with
            ``return_scores``).  Order is unspecified, but the same for
            the same index, query and thread count.
        indptr, indices : ndarray of intp
            For a batch: CSR, query ``q``'s hits are
            ``indices[indptr[q]:indptr[q+1]]``.  With ``return_scores``,
            ``(indptr, scores, indices)``.  Scores are float64 for either
            index dtype: they are the values the answer is decided on, so
            every reported score is ``>= b`` (rounded to float32, a hit
            within a float32 rounding of ``b`` could show a score below
            it).

        Notes
        -----
        Ties (``<p, w> == b``) are reported.  Queries run in parallel with
        the GIL released; thread-safe with other readers.
        """
        return_scores = check_bool(return_scores, "return_scores")
        mode = _MODE_SCORES if return_scores else _MODE_IDS
        single, data, indptr, indices, n_queries = self._queries(W)
        b = self._thresholds(b, n_queries, single)
        threads = self._threads(n_threads)
        if single:
            _, ids, scores = self._core.query_single(data[0], b[0], mode, threads)
            if return_scores:
                return scores, ids
            return ids
        ptr, ids, scores = self._core.query(data, indptr, indices, b, mode, threads)
        if n_queries == 0:
            ptr = np.zeros(1, dtype=np.intp)
            ids = np.empty(0, dtype=np.intp)
            scores = np.empty(0, dtype=np.float64)
        if return_scores:
            return (scores, ids) if single else (ptr, scores, ids)
        return ids if single else (ptr, ids)

    def query_count(self, W, b, *, n_threads=None):
        """Number of points with ``<p, w> >= b`` per query.

        Same inputs as :meth:`query`.  Returns an int for a 1-D ``w``,
        otherwise an intp array of shape ``(n_queries,)``.  Subtrees inside
        the half-space are counted from their live counts, without visiting
        their points.
        """
        single, data, indptr, indices, n_queries = self._queries(W)
        b = self._thresholds(b, n_queries, single)
        threads = self._threads(n_threads)
        if single:
            return int(self._core.query_single(data[0], b[0], _MODE_COUNT, threads)[0])
        counts, _, _ = self._core.query(data, indptr, indices, b, _MODE_COUNT, threads)
        return counts

    def search(self, W, k, *, n_threads=None):
        """Exact top-k inner-product search.

        Parameters
        ----------
        W : array-like of shape (n_features,) or (n_queries, n_features), or \
scipy sparse
            Query vectors.
        k : int
            Number of results per query (>= 0).  A ``k`` above ``len(self)``
            costs only the padding of the outputs: the search keeps at most
            ``len(self)`` candidates.

        Returns
        -------
        scores : ndarray of shape (n_queries, k) (or (k,)), float64
            Decreasing; ``-inf`` pads when fewer than ``k`` points exist.
            float64 for either index dtype (the exact scores the order is
            decided on; float32 could round distinct scores to a tie).
        ids : ndarray of shape (n_queries, k) (or (k,)), intp
            Ties in score are broken by smaller id; ``-1`` pads.
        """
        k = check_int(k, "k", minimum=0)
        single, data, indptr, indices, n_queries = self._queries(W)
        kept = min(k, len(self))        # the heaps never hold more than that
        scores, ids = self._core.search(data, indptr, indices, n_queries, kept,
                                        self._threads(n_threads))
        if kept < k:
            scores = np.hstack([scores, np.full((n_queries, k - kept), -np.inf)])
            ids = np.hstack([ids, np.full((n_queries, k - kept), -1, dtype=np.intp)])
        if single:
            return scores[0], ids[0]
        return scores, ids

    # -- pickling -----------------------------------------------------------

    def __reduce__(self):
        state = {
            "version": _STATE_VERSION,
            "dtype": self.dtype.str,
            "n_features": self.n_features,
            "leaf_size": self.leaf_size,
            "n_threads": self.n_threads,
            "next_id": self._core.next_id,
            "ids": self._core.live_ids(),
            "points": self._core.live_points(),
        }
        return (_rebuild_index, (type(self), state))


def _rebuild_index(cls, state):
    """Unpickle: rebuild the trees from the stored points (derived data)."""
    version = state.get("version") if isinstance(state, dict) else None
    if version != _STATE_VERSION:
        raise ValueError(f"unsupported HalfspaceIndex state version {version!r}; "
                         f"this build reads version {_STATE_VERSION}")
    self = cls.__new__(cls)
    dtype = np.dtype(state["dtype"])
    self.leaf_size = int(state["leaf_size"])
    self.n_threads = int(state["n_threads"])
    self._core = _HalfspaceCore(int(state["n_features"]), self.leaf_size, dtype)
    points = np.array(state["points"], dtype=dtype, order="C")   # writable copy
    ids = np.array(state["ids"], dtype=np.intp)
    points = points.reshape(-1, int(state["n_features"]))
    self._core.add(points, ids)
    self._core.set_next_id(int(state["next_id"]))
    self._max_abs = self._entry_bound(points)
    return self

