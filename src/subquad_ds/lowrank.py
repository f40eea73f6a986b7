"""A dense matrix that takes low-rank updates lazily: ``LowRankUpdatedMatrix``."""

import math
import mmap

import numpy as np

from . import _lowrank
from ._openmp_helpers import max_threads
from ._validation import (
    as_float_array,
    as_index_array,
    check_bool,
    check_int,
    resolve_float_dtype,
)

__all__ = ["LowRankUpdatedMatrix", "default_max_rank"]

_STATE_VERSION = 1
_BLAS_INT_MAX = 2**31 - 1
# Below this many multiply-adds (about a millisecond on one core) a sparse or
# row-restricted kernel runs on one thread.  These kernels are memory-bound, so
# a second thread gains little on short calls, while a thread team whose
# members are descheduled on a busy machine costs a whole time slice (measured
# here: a 1%-dense matvec at m = 8192 took 94 us on one thread and 12 ms on
# two while other processes kept both cores busy).
_PARALLEL_MIN_WORK = 1 << 22


def default_max_rank(m, n):
    """Default pending-rank threshold of an ``m x n`` LowRankUpdatedMatrix.

    Returns ``2 * sqrt(m * n / (m + n))`` rounded, clipped to ``[16, 256]``
    and to ``min(m, n)``; see the Notes of :class:`LowRankUpdatedMatrix` for
    the cost model.  For a square ``m x m`` matrix this is ``sqrt(2 m)``:
    45 at m = 1024, 128 at m = 8192.
    """
    m = check_int(m, "m", minimum=1)
    n = check_int(n, "n", minimum=1)
    r = round(2.0 * math.sqrt(m * n / (m + n)))
    return max(1, min(min(m, n), 256, max(16, r)))


def _is_memory_mapped(a):
    """True if ``a`` or an array it views is backed by a memory map."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def _check_index_range(ids, name, upper):
    """``ids`` as a 1-D intp array with every value in ``[0, upper)``."""
    ids = as_index_array(ids, name)
    if ids.size and (ids.min() < 0 or ids.max() >= upper):
        raise ValueError(
            f"{name} must be in [0, {upper}); got values from {ids.min()} to {ids.max()}"
        )
    return ids


def _n_threads(work):
    return max_threads() if work >= _PARALLEL_MIN_WORK else 1


def _gemm_into(C, A, B, accumulate):
    """Logical ``C = [C +] A @ B``; each operand is a (column-major store, trans) pair."""
    c_store, c_trans = C
    if c_trans:  # C is held as its transpose: store C.T = B.T @ A.T
        _lowrank.gemm(c_store, B[0], not B[1], A[0], not A[1], accumulate)
    else:
        _lowrank.gemm(c_store, A[0], A[1], B[0], B[1], accumulate)


def _rebuild(state):
    """Unpickle helper (module level so that pickles stay importable)."""
    return LowRankUpdatedMatrix._from_state(state)


class LowRankUpdatedMatrix:
    """Dense matrix ``W`` that absorbs low-rank updates ``W += U @ V.T`` lazily.

    Updates are appended to two preallocated factor buffers instead of being
    applied to ``W``.  Products use ``W = B + U_p @ V_p.T`` (base plus
    pending factors) at the cost of one dense product plus ``O((m + n) r)``
    for pending rank ``r``.  When the pending rank would pass ``max_rank``,
    the factors are folded into the base with a single BLAS GEMM, so ``r``
    rank-1 updates cost one matrix-matrix product (compute-bound, near peak
    flop rate) instead of ``r`` memory-bound passes over ``W``.

    Parameters
    ----------
    W0 : array-like of shape (m, n)
        Initial matrix.  A ``np.float32`` ndarray gives a float32 matrix,
        anything else float64; the dtype is fixed from then on.  Must be
        finite and non-empty.
    max_rank : int, default=None
        Largest pending rank kept before folding, ``1 <= max_rank <=
        min(m, n)``.  ``None`` picks :func:`default_max_rank` ``(m, n)``
        (``2 sqrt(mn/(m+n))`` clipped to ``[16, 256]``; 128 for 8192 x 8192).
    copy : bool, default=True
        If True, ``W0`` is copied into a private Fortran-ordered array (a
        column of ``W`` is then contiguous, which makes the sparse product
        fast).  If False and ``W0`` is a C- or Fortran-contiguous ndarray of
        the working dtype, its memory is used without a copy:

        * a **writeable** ``W0`` is then modified in place by every fold
          (:meth:`flush`, or an update that overflows ``max_rank``); between
          folds it holds the base ``B``, not ``W``.
        * a **read-only or memory-mapped** ``W0`` is a *frozen base*: it is
          never written.  Folds go into a separate dense delta ``D`` (same
          shape, allocated at the first fold), and ``W = W0 + D + U_p V_p.T``.

        Other inputs (lists, other dtypes, non-contiguous arrays) are copied
        even when ``copy=False``.

    Attributes
    ----------
    shape : tuple of int
        ``(m, n)``.
    dtype : numpy.dtype
        float32 or float64.
    ndim : int
        Always 2.
    pending_rank : int
        Rank of the updates not yet folded into the base.
    max_rank : int
        Pending-rank threshold that triggers a fold.
    n_flushes : int
        Number of GEMM folds performed so far (explicit or automatic).
    frozen : bool
        True if the base is a read-only or memory-mapped ``W0`` used without
        a copy (folds then go to a separate delta).

    Raises
    ------
    ValueError
        ``W0`` not 2-D, empty or not finite; ``max_rank`` out of range.
    TypeError
        Non-numeric ``W0``; non-integer ``max_rank``; non-bool ``copy``.

    See Also
    --------
    scipy.sparse.linalg.aslinearoperator : wraps this object as a LinearOperator
        (it has ``shape``, ``dtype``, ``matvec``, ``rmatvec`` and ``rmatmat``),
        so it can be passed to ``scipy.sparse.linalg.cg``, ``lsqr`` and friends.
        ``aslinearoperator`` does not forward ``matmat`` (its ``matmat`` loops
        over columns); for block methods build
        ``LinearOperator(A.shape, matvec=A.matvec, rmatvec=A.rmatvec,
        matmat=A.matmat, rmatmat=A.rmatmat, dtype=A.dtype)``.

    Notes
    -----
    **Complexity** (``r`` = pending rank, ``nnz`` = nonzeros of a sparse
    vector, ``k`` = number of requested output rows):

    ==================================  ===============================
    operation                           cost
    ==================================  ===============================
    ``update`` of rank ``s``            ``O((m + n) s)`` copy, no allocation;
                                        plus a fold when ``r + s > max_rank``
    fold (``flush``)                    one GEMM, ``2 m n r`` flops
    ``matvec`` / ``rmatvec``            ``2 m n + 2 (m + n) r``
    sparse ``matvec((idx, vals))``      ``O(m nnz + r nnz + m r)``
    ``matvec(x, rows=idx)``             ``O(k n + n r + k r)`` (sparse x:
                                        ``O(k nnz + r nnz + k r)``)
    ``matmat`` of ``b`` columns         ``2 m n b + 2 (m + n) r b``
    ==================================  ===============================

    **Storage.**  With ``copy=True`` the base is Fortran-ordered: column
    ``j`` of ``W`` is contiguous, so a sparse ``matvec`` streams ``nnz``
    contiguous columns (``m * nnz`` elements).  A sparse ``rmatvec`` needs
    rows of ``W`` instead and then touches one cache line per nonzero per
    column: at 1% density and m = n = 8192 it measured about 40-100x slower
    than the sparse ``matvec`` and only 2-4x faster than a dense product.  A
    C-ordered ``W0`` passed with ``copy=False`` keeps its layout and the two
    roles swap, so pick the layout for the sparse direction you use most.  The pending
    factors take ``(m + n) * max_rank`` elements.  A frozen base adds, after
    the first fold, a dense delta of ``m * n`` elements (the size of
    ``W0``), and every dense product then reads both ``W0`` and the delta.

    **When laziness pays (cost model).**  An eager rank-1 update
    (BLAS ``xGER``) reads and writes all of ``W``: it is memory-bound.
    Folding ``r`` pending rank-1 updates with one GEMM does the same flops at
    the compute-bound GEMM rate and reads and writes ``W`` once per ``r``
    updates.  Pending factors make every product ``2 (m + n) r`` flops
    dearer.  With about one product per update (the training pattern), the
    memory traffic per update is ``2 m n / r + (m + n) r / 2`` elements,
    minimised by ``r = 2 sqrt(m n / (m + n))``: the default ``max_rank``
    (clipped to ``[16, 256]`` so that GEMM runs near peak).  Laziness pays
    when ``W`` does not fit in cache and updates arrive one low rank at a
    time.  It does not pay when

    * ``W`` is small (a few hundred kB): an eager update is then cheap;
    * products vastly outnumber updates: keep ``max_rank`` small, or call
      :meth:`flush` after a batch of updates;
    * updates are *sparse* outer products (``k x k`` nonzero block with
      ``k << m``): adding them eagerly costs ``k^2``, far less than any dense
      fold.  Lazy folding only beats that asymptotically with fast
      rectangular matrix multiplication, which BLAS does not offer.

    **Numerics.**  Products evaluate ``B x + U_p (V_p^T x)``, which differs
    from ``(B + U_p V_p^T) x`` by rounding only; a fold adds the GEMM result
    to ``B`` once, so the drift after many folds is that of summing the
    updates in float arithmetic.

    **Thread safety.**  Products only read the state and may run
    concurrently with each other (they release the GIL in the compiled
    loops).  ``update`` and ``flush`` mutate it and must not run concurrently
    with anything else on the same object.

    **Pickling** keeps the pending factors (no fold) and the frozen/delta
    split; the restored base is a private copy (read-only if it was frozen).

    Examples
    --------
    >>> import numpy as np
    >>> from subquad_ds import LowRankUpdatedMatrix
    >>> rng = np.random.default_rng(0)
    >>> W0 = rng.standard_normal((300, 200))
    >>> A = LowRankUpdatedMatrix(W0, max_rank=8)
    >>> u, v = rng.standard_normal(300), rng.standard_normal(200)
    >>> A.update(u, v)                      # rank-1, O(m + n)
    >>> A.pending_rank
    1
    >>> x = rng.standard_normal(200)
    >>> np.allclose(A.matvec(x), (W0 + np.outer(u, v)) @ x)
    True
    >>> idx, vals = np.array([3, 17, 150]), np.array([1.0, -2.0, 0.5])
    >>> np.allclose(A.matvec((idx, vals)), (W0 + np.outer(u, v))[:, idx] @ vals)
    True
    >>> A.flush(); A.pending_rank, A.n_flushes
    (0, 1)
    >>> import pickle
    >>> B = pickle.loads(pickle.dumps(A))
    >>> np.array_equal(B.toarray(), A.toarray())
    True
    """

    ndim = 2
    # Make ``ndarray @ LowRankUpdatedMatrix`` call __rmatmul__ instead of
    # densifying through __array__.
    __array_ufunc__ = None

    def __init__(self, W0, *, max_rank=None, copy=True):
        copy = check_bool(copy, "copy")
        dtype = resolve_float_dtype(W0)
        fits = (
            isinstance(W0, np.ndarray)
            and W0.dtype == dtype
            and (W0.flags.c_contiguous or W0.flags.f_contiguous)
        )
        order = "A" if (fits and not copy) else "F"
        W = as_float_array(W0, "W0", dtype=dtype, ndim=2, allow_empty=False, order=order)
        m, n = W.shape
        if max(m, n) > _BLAS_INT_MAX:
            raise ValueError(f"W0 dimensions must be < 2**31 (BLAS int); got shape {W.shape}")
        if max_rank is None:
            max_rank = default_max_rank(m, n)
        else:
            max_rank = check_int(max_rank, "max_rank", minimum=1, maximum=min(m, n))
        shares = isinstance(W0, np.ndarray) and np.may_share_memory(W, W0)
        if copy and shares:
            W = np.array(W, order="F", copy=True)
            shares = False
        frozen = shares and (not W.flags.writeable or _is_memory_mapped(W0))
        self._setup(W, frozen, max_rank)

    def _setup(self, base, frozen, max_rank):
        """Set the state around a validated base array (no copy)."""
        self._base = base
        if base.flags.f_contiguous:
            self._base_op = (base, False)
        else:  # C-ordered: its transpose is the column-major store
            self._base_op = (base.T, True)
        self._dtype = base.dtype
        self._shape = base.shape
        self._frozen = bool(frozen)
        self._delta = None
        self._max_rank = max_rank
        m, n = base.shape
        self._U = np.empty((m, max_rank), dtype=base.dtype, order="F")
        self._V = np.empty((n, max_rank), dtype=base.dtype, order="F")
        self._rank = 0
        self._n_flushes = 0

    # ------------------------------------------------------------------ attributes
    @property
    def shape(self):
        """``(m, n)``."""
        return self._shape

    @property
    def dtype(self):
        """Working dtype, float32 or float64 (fixed at construction)."""
        return self._dtype

    @property
    def pending_rank(self):
        """Rank of the updates not yet folded into the base."""
        return self._rank

    @property
    def max_rank(self):
        """Pending-rank threshold that triggers a fold."""
        return self._max_rank

    @property
    def n_flushes(self):
        """Number of GEMM folds performed so far."""
        return self._n_flushes

    @property
    def frozen(self):
        """True if the base is a read-only or memory-mapped ``W0`` that is never written."""
        return self._frozen

    def __repr__(self):
        m, n = self._shape
        return (
            f"<LowRankUpdatedMatrix(shape=({m}, {n}), dtype={self._dtype.name}, "
            f"pending_rank={self._rank}, max_rank={self._max_rank}, "
            f"frozen={self._frozen})>"
        )

    # ------------------------------------------------------------------ updates
    def update(self, U, V):
        """Add ``U @ V.T`` to the matrix, lazily.

        Parameters
        ----------
        U : array-like of shape (m,) or (m, s)
            Left factor; 1-D means a rank-1 update ``outer(U, V)``.
        V : array-like of shape (n,) or (n, s)
            Right factor, with as many dimensions and columns as ``U``.

        Raises
        ------
        ValueError
            Wrong shapes, ``U`` and ``V`` of different ranks, NaN or inf.
            The matrix is then unchanged.
        TypeError
            Non-numeric input.

        Notes
        -----
        Costs an ``O((m + n) s)`` copy into the factor buffers.  If the
        pending rank would pass ``max_rank``, the pending factors are first
        folded into the base (one GEMM).  An update of rank
        ``s > max_rank`` is folded directly, without going through the
        buffers.
        """
        m, n = self._shape
        U = as_float_array(U, "U", dtype=self._dtype, ndim=(1, 2))
        V = as_float_array(V, "V", dtype=self._dtype, ndim=(1, 2))
        if U.ndim != V.ndim:
            raise ValueError(
                "U and V must both be 1-D (a rank-1 update) or both 2-D; "
                f"got shapes {U.shape} and {V.shape}"
            )
        if U.ndim == 1:
            U = U[:, None]
            V = V[:, None]
        if U.shape[0] != m:
            raise ValueError(f"U must have {m} rows (matrix shape {self._shape}); got shape {U.shape}")
        if V.shape[0] != n:
            raise ValueError(f"V must have {n} rows (matrix shape {self._shape}); got shape {V.shape}")
        s = U.shape[1]
        if V.shape[1] != s:
            raise ValueError(
                f"U and V must have the same number of columns (the update rank); "
                f"got {s} and {V.shape[1]}"
            )
        if s == 0:
            return
        if s > self._max_rank:
            self.flush()
            # U, V are C-ordered (m, s), (n, s): their transposes are column-major stores.
            self._fold((U.T, True), (V.T, False))
            return
        if self._rank + s > self._max_rank:
            self.flush()
        r = self._rank
        self._U[:, r:r + s] = U
        self._V[:, r:r + s] = V
        self._rank = r + s

    def _fold_target(self):
        if not self._frozen:
            return self._base_op
        if self._delta is None:
            self._delta = np.zeros(self._shape, dtype=self._dtype, order="F")
        return (self._delta, False)

    def _fold(self, A, B):
        """Logical ``base (or delta) += A @ B`` with one GEMM."""
        _gemm_into(self._fold_target(), A, B, True)
        self._n_flushes += 1

    def flush(self):
        """Fold the pending factors into the base with one GEMM.

        A no-op when nothing is pending.  For a frozen base the fold goes
        into the separate delta (allocated, ``m * n`` elements, at the first
        fold).  Costs ``2 m n r`` flops for pending rank ``r``.
        """
        r = self._rank
        if r == 0:
            return
        self._fold((self._U[:, :r], False), (self._V[:, :r], True))
        self._rank = 0

    # ------------------------------------------------------------------ products
    def _operands(self, transpose):
        """Dense parts (store, trans) and the (inner, outer) pending factors of W or W.T."""
        dense = [(self._base_op[0], self._base_op[1] != transpose)]
        if self._delta is not None:
            dense.append((self._delta, transpose))
        r = self._rank
        U, V = self._U[:, :r], self._V[:, :r]
        inner, outer = (U, V) if transpose else (V, U)
        return dense, inner, outer


    def _check_sparse(self, x, q):
        if len(x) != 2:
            raise ValueError(
                f"a sparse x must be a pair (indices, values); got a tuple of length {len(x)}"
            )
        idx = _check_index_range(x[0], "x indices", q)
        vals = as_float_array(x[1], "x values", dtype=self._dtype, ndim=1)
        if idx.shape != vals.shape:
            raise ValueError(
                "x indices and x values must have the same length; "
                f"got {idx.shape[0]} and {vals.shape[0]}"
            )
        return idx, vals

    def _apply(self, x, rows, transpose):
        p, q = self._shape[::-1] if transpose else self._shape
        column = False
        sparse = isinstance(x, tuple)
        if sparse:
            idx, vals = self._check_sparse(x, q)
        else:
            x = as_float_array(x, "x", dtype=self._dtype, ndim=(1, 2))
            if x.ndim == 2 and x.shape[1] == 1:  # scipy LinearOperator column vectors
                column = True
                x = x[:, 0]
            if x.shape != (q,):
                raise ValueError(f"x must have shape ({q},) or ({q}, 1); got shape {x.shape}")
        if rows is not None:
            rows = _check_index_range(rows, "rows", p)
        n_out = p if rows is None else rows.shape[0]
        y = np.empty(n_out, dtype=self._dtype)
        dense, inner, outer = self._operands(transpose)
        accumulate = False
        for store, trans in dense:
            if sparse and rows is None:
                _lowrank.spmv(store, trans, idx, vals, y, accumulate,
                              _n_threads(p * idx.shape[0]))
            elif sparse:
                _lowrank.spmv_rows(store, trans, rows, idx, vals, y, accumulate,
                                   _n_threads(n_out * idx.shape[0]))
            elif rows is None:
                _lowrank.gemv(store, trans, x, y, accumulate)
            elif trans or 64 * n_out < p * self._dtype.itemsize:
                # Selected rows are contiguous (trans), or few enough that
                # gathering them touches less memory than a full pass.
                _lowrank.gemv_rows(store, trans, rows, x, y, accumulate,
                                   _n_threads(n_out * q))
            else:
                full = np.empty(p, dtype=self._dtype)
                _lowrank.gemv(store, trans, x, full, False)
                if accumulate:
                    y += full[rows]
                else:
                    y[:] = full[rows]
            accumulate = True
        r = self._rank
        if r:
            t = np.empty(r, dtype=self._dtype)
            if sparse:
                _lowrank.spmv(inner, True, idx, vals, t, False, 1)
            else:
                _lowrank.gemv(inner, True, x, t, False)
            if rows is None:
                _lowrank.gemv(outer, False, t, y, True)
            else:
                _lowrank.gemv_rows(outer, False, rows, t, y, True, _n_threads(n_out * r))
        return y[:, None] if column else y

    def matvec(self, x, *, rows=None):
        """Matrix-vector product ``W @ x``.

        Parameters
        ----------
        x : array-like of shape (n,) or (n, 1), or tuple (indices, values)
            Dense vector, or a sparse vector given by its nonzero
            ``indices`` (integers in ``[0, n)``, duplicates add up) and
            ``values``.
        rows : array-like of int, optional
            Compute only these output entries, ``(W @ x)[rows]``.

        Returns
        -------
        y : ndarray of shape (m,) (or (m, 1) for an (n, 1) x, or (len(rows),))
            In the matrix's dtype.

        Notes
        -----
        Dense: ``2 m n + 2 (m + n) r`` flops (BLAS GEMV).  Sparse with
        ``nnz`` nonzeros: ``O(m nnz + r nnz + m r)``, reading ``nnz``
        contiguous columns of a Fortran-ordered base.  With ``rows`` of
        length ``k``: ``O(k n + ...)`` (dense x) or ``O(k nnz + ...)``.
        """
        return self._apply(x, rows, False)

    def rmatvec(self, x, *, rows=None):
        """Transposed product ``W.T @ x``.

        Parameters
        ----------
        x : array-like of shape (m,) or (m, 1), or tuple (indices, values)
            Dense vector, or sparse ``(indices, values)`` with indices in
            ``[0, m)``.
        rows : array-like of int, optional
            Compute only these output entries (columns of ``W``),
            ``(W.T @ x)[rows]``.

        Returns
        -------
        y : ndarray of shape (n,) (or (n, 1), or (len(rows),))

        Notes
        -----
        Same costs as :meth:`matvec` with ``m`` and ``n`` swapped.  A sparse
        ``rmatvec`` reads rows of the base; with the default Fortran storage
        these are strided, one cache line per nonzero per column (40-100x
        slower than a sparse ``matvec`` at 1% density, m = 8192).  Build
        from a C-ordered ``W0`` with ``copy=False`` when sparse ``rmatvec``
        is the hot direction.
        """
        return self._apply(x, rows, True)

    def _matmat(self, X, transpose):
        p, q = self._shape[::-1] if transpose else self._shape
        X = as_float_array(X, "X", dtype=self._dtype, ndim=2)
        if X.shape[0] != q:
            raise ValueError(f"X must have shape ({q}, k); got shape {X.shape}")
        b = X.shape[1]
        Y = np.empty((p, b), dtype=self._dtype)
        # Work on transposes so that the C-ordered X and Y are column-major stores:
        # Y.T = X.T @ M.T, with X.T of shape (b, q) and Y.T of shape (b, p).
        Yt = (Y.T, False)
        Xt = (X.T, False)
        dense, inner, outer = self._operands(transpose)
        accumulate = False
        for store, trans in dense:
            _gemm_into(Yt, Xt, (store, not trans), accumulate)
            accumulate = True
        r = self._rank
        if r and b:
            T = np.empty((b, r), dtype=self._dtype, order="F")  # X.T @ inner
            _gemm_into((T, False), Xt, (inner, False), False)
            _gemm_into(Yt, (T, False), (outer, True), True)
        return Y

    def matmat(self, X):
        """Matrix-matrix product ``W @ X``.

        Parameters
        ----------
        X : array-like of shape (n, b)

        Returns
        -------
        Y : ndarray of shape (m, b)

        Notes
        -----
        One GEMM with the base (``2 m n b`` flops) plus ``2 (m + n) r b``
        for the pending factors.
        """
        return self._matmat(X, False)

    def rmatmat(self, X):
        """Transposed matrix-matrix product ``W.T @ X``.

        Parameters
        ----------
        X : array-like of shape (m, b)

        Returns
        -------
        Y : ndarray of shape (n, b)
        """
        return self._matmat(X, True)

    def _operand_ndim(self, x):
        """ndim of an @ operand; a ragged list or a string is a TypeError here."""
        if isinstance(x, np.ndarray):
            return x.ndim
        return as_float_array(x, "operand of @", dtype=self._dtype, finite=False).ndim

    def __matmul__(self, x):
        if isinstance(x, tuple):
            return self.matvec(x)
        nd = self._operand_ndim(x)
        if nd == 1:
            return self.matvec(x)
        if nd == 2:
            return self.matmat(x)
        raise ValueError(f"operand of @ must be 1-D or 2-D; got {nd}-D")

    def __rmatmul__(self, x):
        nd = self._operand_ndim(x)
        if nd == 1:
            return self.rmatvec(x)
        if nd == 2:
            X = as_float_array(x, "X", dtype=self._dtype, ndim=2)
            return self.rmatmat(X.T).T
        raise ValueError(f"operand of @ must be 1-D or 2-D; got {nd}-D")

    # ------------------------------------------------------------------ materialise
    def toarray(self):
        """Return ``W`` (base, delta and pending factors) as a new C-ordered array.

        Costs one copy of ``m n`` elements plus ``2 m n r`` flops; the
        object itself is not changed (no fold).
        """
        out = np.array(self._base, dtype=self._dtype, order="C", copy=True)
        if self._delta is not None:
            out += self._delta
        r = self._rank
        if r:
            _gemm_into((out.T, True), (self._U[:, :r], False), (self._V[:, :r], True), True)
        return out

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("a LowRankUpdatedMatrix cannot be converted to an array without a copy")
        out = self.toarray()
        return out if dtype is None else out.astype(dtype, copy=False)

    def copy(self):
        """Return an independent copy.

        A frozen base is shared (it is never written); everything else
        (a writeable base, the delta, the pending factors) is copied.
        """
        new = type(self).__new__(type(self))
        base = self._base if self._frozen else self._base.copy(order="K")
        new._setup(base, self._frozen, self._max_rank)
        new._delta = None if self._delta is None else self._delta.copy(order="F")
        r = self._rank
        new._U[:, :r] = self._U[:, :r]
        new._V[:, :r] = self._V[:, :r]
        new._rank = r
        new._n_flushes = self._n_flushes
        return new

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    # ------------------------------------------------------------------ pickling
    def __reduce__(self):
        r = self._rank
        state = {
            "version": _STATE_VERSION,
            "dtype": self._dtype.name,
            "max_rank": self._max_rank,
            "n_flushes": self._n_flushes,
            "frozen": self._frozen,
            "base": self._base,
            "delta": self._delta,
            "U": np.array(self._U[:, :r]),
            "V": np.array(self._V[:, :r]),
        }
        return (_rebuild, (state,))

    @classmethod
    def _from_state(cls, state):
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise ValueError(
                f"cannot unpickle LowRankUpdatedMatrix state version {version!r}; "
                f"this version of subquad_ds reads version {_STATE_VERSION}"
            )
        dtype = np.dtype(state["dtype"])
        base = state["base"]
        order = "F" if base.flags.f_contiguous else "C"
        base = np.array(base, dtype=dtype, order=order, copy=True)
        frozen = bool(state["frozen"])
        if frozen:
            base.flags.writeable = False
        new = cls.__new__(cls)
        new._setup(base, frozen, int(state["max_rank"]))
        if state["delta"] is not None:
            new._delta = np.array(state["delta"], dtype=dtype, order="F", copy=True)
        U, V = state["U"], state["V"]
        r = U.shape[1]
        new._U[:, :r] = U
        new._V[:, :r] = V
        new._rank = r
        new._n_flushes = int(state["n_flushes"])
        return new
