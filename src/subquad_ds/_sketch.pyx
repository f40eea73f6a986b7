# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Hashing and scatter kernels of the sketches (private core).

Design
------
A CountSketch of R^d into R^s is a bucket map ``h : [d] -> [s]`` and a sign
map ``g : [d] -> {-1, +1}``; the sketch of a row x is
``y[h[j]] += g[j] * x[j]``.  Every kernel here sketches a batch of rows:
row i of the input only writes row i of ``out``, so rows are independent
and the batch loop is an OpenMP ``prange`` with the GIL released; no
atomics, no per-thread buffers, and the result does not depend on the
number of threads (each output entry is summed in the same order).

Kernels
-------
countsketch_dense(X, buckets, signs, out, n_threads)
    Dense rows: O(n * d).
countsketch_csr(data, indices, indptr, buckets, signs, out, n_threads)
    CSR rows: O(nnz); indices need not be sorted, duplicates add up
    (the sketch is linear).
kron_rmatvec
    W += J^T v = sum_i v_i D[i]^T H[i] for a Jacobian whose row i is the
    Kronecker product D[i] (x) H[i] (sparse row of D, sparse or dense row
    of H), into a dense (m, d) buffer; O(sum_i nnz(D[i]) nnz(H[i])), one
    thread (rows of the input collide in W).
kron_gram_matvec
    The matrix-free J J^T v of the Gauss-Newton solver, organised by neuron
    r (D by columns): W[r, :] lives in a per-thread scratch row that stays
    in cache, instead of scattering into a 134 MB (m, d) buffer with a TLB
    miss per access (measured 10-20x slower at m = d = 4096).  Same
    O(sum_i nnz(D[i]) nnz(H[i])) work, neurons split over threads.

Invariants the callers (``subquad_ds.sketch``, ``_gauss_newton``) establish:
arrays are C-contiguous, of one float dtype per call, ``out`` is zeroed and
of shape (n, s), every bucket is in [0, s), every index is in range.
"""

from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.stdint cimport int32_t, int64_t

ctypedef Py_ssize_t intp_t

ctypedef fused index_t:
    int32_t
    int64_t


def countsketch_dense(const floating[:, ::1] X, const intp_t[::1] buckets,
                      const floating[::1] signs, floating[:, ::1] out,
                      int n_threads):
    """out[i, buckets[j]] += signs[j] * X[i, j] for every row i."""
    cdef intp_t i, j
    cdef intp_t n_samples = X.shape[0], n_features = X.shape[1]
    if n_samples < 4 * n_threads:
        n_threads = 1
    with nogil:
        for i in prange(n_samples, schedule="static", num_threads=n_threads):
            for j in range(n_features):
                out[i, buckets[j]] += signs[j] * X[i, j]


def countsketch_csr(const floating[::1] data, const index_t[::1] indices,
                    const index_t[::1] indptr, const intp_t[::1] buckets,
                    const floating[::1] signs, floating[:, ::1] out,
                    int n_threads):
    """Sketch the rows of the CSR matrix (data, indices, indptr) into out."""
    cdef intp_t i, p, j
    cdef intp_t n_samples = indptr.shape[0] - 1
    if n_samples < 4 * n_threads:
        n_threads = 1
    with nogil:
        for i in prange(n_samples, schedule="static", num_threads=n_threads):
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                out[i, buckets[j]] += signs[j] * data[p]


def kron_rmatvec(const double[::1] d_data, const index_t[::1] d_indices,
                 const index_t[::1] d_indptr,
                 const double[::1] h_data, const index_t[::1] h_indices,
                 const index_t[::1] h_indptr,
                 const double[::1] v, double[:, ::1] W):
    """W += sum_i v_i D[i]^T H[i] for CSR D (n, m) and CSR H (n, d)."""
    cdef intp_t i, p, q, r
    cdef double a
    cdef intp_t n_samples = d_indptr.shape[0] - 1
    with nogil:
        for i in range(n_samples):
            if v[i] == 0.0:
                continue
            for p in range(d_indptr[i], d_indptr[i + 1]):
                r = d_indices[p]
                a = v[i] * d_data[p]
                for q in range(h_indptr[i], h_indptr[i + 1]):
                    W[r, h_indices[q]] += a * h_data[q]


def kron_gram_matvec(const index_t[::1] dc_indptr, const index_t[::1] dc_rows,
                     const double[::1] dc_data,
                     const double[::1] h_data, const index_t[::1] h_indices,
                     const index_t[::1] h_indptr,
                     const double[::1] v, double[:, ::1] w_scratch,
                     double[:, ::1] out_scratch, int n_threads):
    """out_scratch[t] += (part of) J J^T v for one layer, by neuron r.

    D is given by columns (CSC: dc_indptr over the m neurons, dc_rows the
    samples), H by rows (CSR).  For each neuron r, the row W[r, :] =
    sum_{i in col r} v_i D[i, r] H[i] is accumulated in a per-thread dense
    scratch row (it stays in cache), then each sample i of column r gets
    D[i, r] <W[r, :], H[i]>, then the touched scratch entries are reset.
    O(sum_i nnz(D[i]) nnz(H[i])) and no (m, d) buffer.  Threads split the
    neurons and add into their own row of out_scratch; the caller sums the
    rows.  w_scratch is (n_threads, d) and must start (and stays) zero.
    """
    cdef intp_t r, p, q, i, t
    cdef double a, acc
    cdef intp_t n_neurons = dc_indptr.shape[0] - 1
    with nogil:
        for r in prange(n_neurons, schedule="dynamic", num_threads=n_threads):
            t = threadid()
            for p in range(dc_indptr[r], dc_indptr[r + 1]):
                i = dc_rows[p]
                a = v[i] * dc_data[p]
                for q in range(h_indptr[i], h_indptr[i + 1]):
                    w_scratch[t, h_indices[q]] += a * h_data[q]
            for p in range(dc_indptr[r], dc_indptr[r + 1]):
                i = dc_rows[p]
                acc = 0.0
                for q in range(h_indptr[i], h_indptr[i + 1]):
                    acc = acc + w_scratch[t, h_indices[q]] * h_data[q]
                out_scratch[t, i] += dc_data[p] * acc
            for p in range(dc_indptr[r], dc_indptr[r + 1]):
                i = dc_rows[p]
                for q in range(h_indptr[i], h_indptr[i + 1]):
                    w_scratch[t, h_indices[q]] = 0.0
