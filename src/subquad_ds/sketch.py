"""Oblivious linear sketches: CountSketch, TensorSketch, Gaussian and SRHT.

All four map a row x in R^d to S x in R^s with E[<Sx, Sy>] = <x, y> and share
one interface: ``transform(X)`` sketches every row of a dense (n, d) array or
a scipy.sparse matrix and returns a dense (n, s) array.  ``TensorSketch``
sketches Kronecker rows u_i (x) v_i from the two factors without forming
them.

dtype: the output is float32 when the input is float32 (for TensorSketch:
both factors), float64 otherwise.  The random maps are drawn once, at
construction, from ``random_state``; the same seed gives the same sketch.
"""

import numpy as np
import scipy.fft
import scipy.sparse as sp

from . import _sketch
from ._validation import (
    as_float_array,
    as_float_csr,
    check_int,
    check_n_threads,
    check_random_state,
    is_sparse,
)

__all__ = ["CountSketch", "TensorSketch", "GaussianSketch", "SRHT"]

# Rows per FFT block in TensorSketch.transform: keeps the complex buffers of
# one block near 2**22 entries (64 MiB in complex128) whatever n is.
_FFT_BLOCK_ENTRIES = 1 << 22
# Smallest kernel or FFT size (entries) worth a second thread.
_PARALLEL_MIN_WORK = 1 << 20
# TensorSketch of a sparse pair by direct convolution when nnz(u) nnz(v) <=
# this times s log2 s (the FFT path's three transforms; measured crossover
# near 0.5 at s = 1024: ~1.5 ns per pair vs ~8 us per row by FFT).
_DIRECT_PAIRS_PER_FFT = 0.5


def _input_dtype(X):
    dt = getattr(X, "dtype", None)
    return np.dtype(np.float32) if dt == np.float32 else np.dtype(np.float64)


def _check_rows(X, name, n_features, dtype):
    """Validate a batch of rows: dense 1-D/2-D or scipy.sparse 2-D."""
    if is_sparse(X):
        return as_float_csr(X, name, dtype=dtype, shape=(None, n_features)), False
    X = as_float_array(X, name, dtype=dtype, ndim=(1, 2))
    if X.shape[-1] != n_features:
        raise ValueError(
            f"{name} has {X.shape[-1]} features; the sketch was built for {n_features}"
        )
    if X.ndim == 1:
        return X.reshape(1, -1), True
    return X, False


def _threads_for(work, n_threads):
    """One thread below _PARALLEL_MIN_WORK entries: thread start-up and, on a
    busy machine, waiting for a second core cost more than the work
    (measured: 2 ms single-threaded vs 7-60 ms with 2 threads for 256
    Kronecker rows at 5% of 4096 under load)."""
    return n_threads if work >= _PARALLEL_MIN_WORK else 1


def _csr_index_arrays(X, dtype=None):
    """(indices, indptr) of a CSR with one shared int32/int64 dtype (or ``dtype``)."""
    indices, indptr = X.indices, X.indptr
    if dtype is None and (indices.dtype != indptr.dtype
                          or indices.dtype not in (np.int32, np.int64)):
        dtype = np.int64
    if dtype is not None:
        indices, indptr = indices.astype(dtype, copy=False), indptr.astype(dtype, copy=False)
    return indices, indptr


def _countsketch_rows(X, buckets, signs, sketch_size, n_threads):
    """Sketch each row of validated X (C-contiguous ndarray or CSR) with one hash."""
    dtype = X.dtype
    n_threads = _threads_for(X.nnz if is_sparse(X) else X.size, n_threads)
    out = np.zeros((X.shape[0], sketch_size), dtype=dtype)
    signs = signs.astype(dtype, copy=False)
    if is_sparse(X):
        indices, indptr = _csr_index_arrays(X)
        _sketch.countsketch_csr(X.data, indices, indptr, buckets, signs, out, n_threads)
    else:
        _sketch.countsketch_dense(X, buckets, signs, out, n_threads)
    return out


class _BaseSketch:
    """Shared constructor checks and repr."""

    def __init__(self, input_dim, sketch_size, *, random_state=None, n_threads=None):
        self.input_dim = check_int(input_dim, "input_dim", minimum=1)
        self.sketch_size = check_int(sketch_size, "sketch_size", minimum=1)
        self._n_threads = check_n_threads(n_threads)
        self.n_threads = n_threads

    def __repr__(self):
        return (
            f"<{type(self).__name__}(input_dim={self.input_dim}, "
            f"sketch_size={self.sketch_size})>"
        )

    @property
    def shape(self):
        """(sketch_size, input_dim): the shape of the sketching matrix S."""
        return (self.sketch_size, self.input_dim)


class CountSketch(_BaseSketch):
    """CountSketch (Charikar-Chen-Farach-Colton; Clarkson-Woodruff sparse embedding).

    S has one nonzero, a random sign, per column, in a random row: each
    coordinate j of x is added with sign ``signs_[j]`` to bucket
    ``buckets_[j]`` of the sketch.

    Parameters
    ----------
    input_dim : int
        Dimension d of the rows to sketch.
    sketch_size : int
        Sketch dimension s.
    random_state : None, int, SeedSequence or Generator, default=None
        Seeds the bucket and sign maps (drawn once, here).
    n_threads : int, default=None
        Threads for ``transform`` (None or -1: all cores).

    Attributes
    ----------
    buckets_ : ndarray of shape (input_dim,), dtype intp
    signs_ : ndarray of shape (input_dim,), dtype float64 (+1 or -1)

    Notes
    -----
    ``transform`` costs O(nnz(X)) (dense: O(n d)) plus O(n s) to zero the
    output, and runs rows in parallel with the GIL released.  Inner products
    are unbiased, E<Sx, Sy> = <x, y>, with variance
    ``(||x||^2 ||y||^2 + <x, y>^2 - 2 sum_j x_j^2 y_j^2) / s``.
    It pays when the input is sparse or s is large: the cost does not grow
    with s.  For a subspace embedding of an r-dimensional space it needs
    s ~ r^2 in theory (Gaussian and SRHT need ~ r), but is often fine with
    s ~ 10 r in practice.

    Examples
    --------
    >>> import numpy as np
    >>> from subquad_ds import CountSketch
    >>> cs = CountSketch(1000, 64, random_state=0)
    >>> cs.transform(np.ones((3, 1000))).shape
    (3, 64)
    """

    def __init__(self, input_dim, sketch_size, *, random_state=None, n_threads=None):
        super().__init__(input_dim, sketch_size, random_state=random_state,
                         n_threads=n_threads)
        rng = check_random_state(random_state)
        self.buckets_ = rng.integers(0, self.sketch_size, size=self.input_dim).astype(np.intp)
        self.signs_ = rng.integers(0, 2, size=self.input_dim).astype(np.float64) * 2.0 - 1.0

    def transform(self, X):
        """Sketch every row of X.

        Parameters
        ----------
        X : array-like of shape (n_samples, input_dim) or (input_dim,), or scipy.sparse
            Rows to sketch.  A 1-D input is one row and gives a 1-D result.

        Returns
        -------
        Y : ndarray of shape (n_samples, sketch_size)
            float32 if X is float32, else float64.
        """
        X, single = _check_rows(X, "X", self.input_dim, _input_dtype(X))
        Y = _countsketch_rows(X, self.buckets_, self.signs_, self.sketch_size,
                              self._n_threads)
        return Y[0] if single else Y

    def toarray(self):
        """The dense (sketch_size, input_dim) matrix S (for tests and small sizes)."""
        S = np.zeros(self.shape)
        S[self.buckets_, np.arange(self.input_dim)] = self.signs_
        return S


class TensorSketch:
    """TensorSketch of degree 2 (Pagh 2013; Pham-Pagh 2013).

    Sketches the Kronecker rows ``u_i (x) v_i`` (dimension d1 * d2, index
    ``j * d2 + k`` as in ``np.kron``) without forming them: CountSketch u_i
    and v_i with independent hashes (h1, g1), (h2, g2), then multiply their
    FFTs and transform back.  The result equals the CountSketch of
    ``u_i (x) v_i`` with bucket ``(h1(j) + h2(k)) mod s`` and sign
    ``g1(j) g2(k)``.

    Parameters
    ----------
    input_dims : pair of int
        (d1, d2), the dimensions of the two factors.
    sketch_size : int
        Sketch dimension s.
    random_state : None, int, SeedSequence or Generator, default=None
        Seeds both hash pairs (drawn once, here).
    n_threads : int, default=None
        Threads for the hashing kernels and the FFTs.

    Attributes
    ----------
    sketches_ : tuple of two CountSketch
        The factor sketches (d1 -> s and d2 -> s).

    Notes
    -----
    ``transform`` costs, per row, O(min(nnz(u) nnz(v), nnz(u) + nnz(v) +
    s log s)): when both factors are sparse and nnz(u) nnz(v) <= s log2(s) / 2,
    the row is sketched by direct sparse convolution of the two
    CountSketches (Cython, no FFT); otherwise by FFT.  Both give the same
    sketch up to rounding.  Forming the Kronecker row costs O(nnz(u) nnz(v))
    sparse (plus a hash lookup per entry into a d1 d2 table) and O(d1 d2)
    dense.  TensorSketch pays most when nnz(u) nnz(v) >> s log s.  Inner products are unbiased; the variance is
    larger than a fully random CountSketch of the Kronecker vectors (the
    bucket map is only 3-wise independent over pairs), bounded by
    ``(2 + 3^2) ||x||^2 ||y||^2 / s`` (Avron-Nguyen-Woodruff 2014).

    Examples
    --------
    >>> import numpy as np
    >>> from subquad_ds import TensorSketch
    >>> ts = TensorSketch((30, 40), 128, random_state=0)
    >>> rng = np.random.default_rng(0)
    >>> U, V = rng.standard_normal((5, 30)), rng.standard_normal((5, 40))
    >>> Z = ts.transform(U, V)
    >>> Z.shape
    (5, 128)
    """

    def __init__(self, input_dims, sketch_size, *, random_state=None, n_threads=None):
        try:
            dims = tuple(input_dims)
        except TypeError:
            raise TypeError(
                f"input_dims must be a pair of ints (d1, d2); got {input_dims!r}"
            ) from None
        if len(dims) != 2:
            raise ValueError(f"input_dims must be a pair (d1, d2); got {input_dims!r}")
        d1 = check_int(dims[0], "input_dims[0]", minimum=1)
        d2 = check_int(dims[1], "input_dims[1]", minimum=1)
        self.input_dims = (d1, d2)
        self.sketch_size = check_int(sketch_size, "sketch_size", minimum=1)
        self.n_threads = n_threads
        self._n_threads = check_n_threads(n_threads)
        rng = check_random_state(random_state)
        self.sketches_ = (
            CountSketch(d1, self.sketch_size, random_state=rng, n_threads=n_threads),
            CountSketch(d2, self.sketch_size, random_state=rng, n_threads=n_threads),
        )

    def __repr__(self):
        return (
            f"<TensorSketch(input_dims={self.input_dims}, "
            f"sketch_size={self.sketch_size})>"
        )

    @property
    def shape(self):
        """(sketch_size, d1 * d2)."""
        return (self.sketch_size, self.input_dims[0] * self.input_dims[1])

    @property
    def buckets_(self):
        """Bucket of every Kronecker coordinate j * d2 + k (dense, O(d1 d2): tests only)."""
        h1, h2 = self.sketches_[0].buckets_, self.sketches_[1].buckets_
        return ((h1[:, None] + h2[None, :]) % self.sketch_size).ravel()

    @property
    def signs_(self):
        """Sign of every Kronecker coordinate (dense, O(d1 d2): tests only)."""
        return np.outer(self.sketches_[0].signs_, self.sketches_[1].signs_).ravel()

    def transform(self, U, V):
        """Sketch the Kronecker rows u_i (x) v_i.

        Parameters
        ----------
        U : array-like of shape (n_samples, d1) or (d1,), or scipy.sparse
        V : array-like of shape (n_samples, d2) or (d2,), or scipy.sparse
            Same number of rows as U.  1-D U and V are one pair and give a
            1-D result.

        Returns
        -------
        Z : ndarray of shape (n_samples, sketch_size)
            float32 if both U and V are float32, else float64.
        """
        dtype = (np.dtype(np.float32)
                 if _input_dtype(U) == np.float32 and _input_dtype(V) == np.float32
                 else np.dtype(np.float64))
        d1, d2 = self.input_dims
        U, single_u = _check_rows(U, "U", d1, dtype)
        V, single_v = _check_rows(V, "V", d2, dtype)
        if single_u != single_v:
            # shapes as given: a 1-D row was reshaped to (1, d)
            shape_u = (d1,) if single_u else U.shape
            shape_v = (d2,) if single_v else V.shape
            raise ValueError(
                f"U and V must both be 1-D or both 2-D; got shapes {shape_u} and {shape_v}"
            )
        if U.shape[0] != V.shape[0]:
            raise ValueError(
                f"U and V must have the same number of rows; got {U.shape[0]} and {V.shape[0]}"
            )
        n, s = U.shape[0], self.sketch_size
        Z = np.empty((n, s), dtype=dtype)
        cs1, cs2 = self.sketches_
        fft_rows = None  # None: every row
        if is_sparse(U) and is_sparse(V):
            # Per row, the cheaper exact method: direct sparse convolution,
            # nnz(u) nnz(v) multiply-adds, or three FFTs, ~ s log2 s each.
            pairs = np.diff(U.indptr).astype(np.float64) * np.diff(V.indptr)
            direct = pairs <= _DIRECT_PAIRS_PER_FFT * s * max(1.0, np.log2(s))
            if direct.any():
                rows = np.flatnonzero(direct).astype(np.intp)
                idx_dtype = np.promote_types(U.indices.dtype, V.indices.dtype)
                idx_dtype = np.int64 if idx_dtype not in (np.int32, np.int64) else idx_dtype
                ui, up = _csr_index_arrays(U, idx_dtype)
                vi, vp = _csr_index_arrays(V, idx_dtype)
                _sketch.tensorsketch_direct_csr(
                    U.data, ui, up, V.data, vi, vp, rows,
                    cs1.buckets_, cs1.signs_.astype(dtype), cs2.buckets_,
                    cs2.signs_.astype(dtype), Z,
                    _threads_for(pairs[direct].sum(), self._n_threads))
                fft_rows = np.flatnonzero(~direct)
                U, V = U[fft_rows], V[fft_rows]
        block = max(1, _FFT_BLOCK_ENTRIES // s)
        for start in range(0, U.shape[0], block):
            stop = min(U.shape[0], start + block)
            A = _countsketch_rows(U[start:stop], cs1.buckets_, cs1.signs_, s, self._n_threads)
            B = _countsketch_rows(V[start:stop], cs2.buckets_, cs2.signs_, s, self._n_threads)
            workers = _threads_for(A.size, self._n_threads)
            FA = scipy.fft.rfft(A, axis=1, workers=workers)
            FA *= scipy.fft.rfft(B, axis=1, workers=workers)
            out = scipy.fft.irfft(FA, n=s, axis=1, workers=workers)
            if fft_rows is None:
                Z[start:stop] = out
            else:
                Z[fft_rows[start:stop]] = out
        return Z[0] if single_u else Z


class GaussianSketch(_BaseSketch):
    """Dense Gaussian sketch: S has i.i.d. N(0, 1/s) entries.

    The reference embedding: the best constants (an r-dimensional subspace
    needs s ~ r / eps^2) at the highest cost, O(nnz(X) s) per batch and
    O(s d) memory for S.  Inner-product variance:
    ``(||x||^2 ||y||^2 + <x, y>^2) / s``.

    Parameters and ``transform`` as in :class:`CountSketch`.

    Attributes
    ----------
    matrix_ : ndarray of shape (sketch_size, input_dim), float64
    """

    def __init__(self, input_dim, sketch_size, *, random_state=None, n_threads=None):
        super().__init__(input_dim, sketch_size, random_state=random_state,
                         n_threads=n_threads)
        rng = check_random_state(random_state)
        self.matrix_ = rng.standard_normal((self.sketch_size, self.input_dim))
        self.matrix_ *= 1.0 / np.sqrt(self.sketch_size)
        self._matrix32 = None

    def transform(self, X):
        """Sketch every row of X (see :meth:`CountSketch.transform`)."""
        X, single = _check_rows(X, "X", self.input_dim, _input_dtype(X))
        S = self.matrix_
        if X.dtype == np.float32:
            if self._matrix32 is None:
                self._matrix32 = self.matrix_.astype(np.float32)
            S = self._matrix32
        Y = np.asarray(X @ S.T)
        return Y[0] if single else Y

    def toarray(self):
        """The dense (sketch_size, input_dim) matrix S."""
        return self.matrix_.copy()


def _fwht(a):
    """Unnormalised fast Walsh-Hadamard transform along axis 1, in place.

    ``a`` is (n, d) with d a power of two; O(n d log d).
    """
    n, d = a.shape
    h = 1
    while h < d:
        b = a.reshape(n, d // (2 * h), 2, h)
        x = b[:, :, 0, :].copy()
        y = b[:, :, 1, :]
        b[:, :, 0, :] += y
        np.subtract(x, y, out=b[:, :, 1, :])
        h *= 2
    return a


class SRHT(_BaseSketch):
    """Subsampled randomized Hadamard transform (Ailon-Chazelle; Tropp 2011).

    S = sqrt(1/s) P H D: random signs D, the unnormalised Walsh-Hadamard
    transform H of the input zero-padded to the next power of two d', and
    P samples s of the d' coordinates without replacement.  Costs
    O(n d' log d') per batch, whatever the sparsity of X (sparse input is
    densified block by block), with O(d') memory for the maps.  Unbiased
    inner products; embeds an r-dimensional subspace with s ~ r log r.

    Parameters and ``transform`` as in :class:`CountSketch`; requires
    ``sketch_size <= padded_dim_``.

    Attributes
    ----------
    padded_dim_ : int
    signs_ : ndarray of shape (input_dim,)
    rows_ : ndarray of shape (sketch_size,), intp, the sampled coordinates
    """

    def __init__(self, input_dim, sketch_size, *, random_state=None, n_threads=None):
        super().__init__(input_dim, sketch_size, random_state=random_state,
                         n_threads=n_threads)
        self.padded_dim_ = 1 << max(0, int(self.input_dim - 1).bit_length())
        if self.sketch_size > self.padded_dim_:
            raise ValueError(
                f"sketch_size must be <= {self.padded_dim_} (input_dim padded to a "
                f"power of two) for SRHT; got {self.sketch_size}"
            )
        rng = check_random_state(random_state)
        self.signs_ = rng.integers(0, 2, size=self.input_dim).astype(np.float64) * 2.0 - 1.0
        self.rows_ = np.sort(rng.choice(self.padded_dim_, size=self.sketch_size,
                                        replace=False)).astype(np.intp)

    def transform(self, X):
        """Sketch every row of X (see :meth:`CountSketch.transform`)."""
        X, single = _check_rows(X, "X", self.input_dim, _input_dtype(X))
        dtype = X.dtype
        n = X.shape[0]
        Y = np.empty((n, self.sketch_size), dtype=dtype)
        scale = dtype.type(1.0 / np.sqrt(self.sketch_size))
        signs = self.signs_.astype(dtype)
        block = max(1, _FFT_BLOCK_ENTRIES // self.padded_dim_)
        for start in range(0, n, block):
            stop = min(n, start + block)
            buf = np.zeros((stop - start, self.padded_dim_), dtype=dtype)
            rows = X[start:stop]
            buf[:, : self.input_dim] = rows.toarray() if sp.issparse(rows) else rows
            buf[:, : self.input_dim] *= signs
            _fwht(buf)
            Y[start:stop] = buf[:, self.rows_] * scale
        return Y[0] if single else Y

    def toarray(self):
        """The dense (sketch_size, input_dim) matrix S."""
        return self.transform(np.eye(self.input_dim)).T
