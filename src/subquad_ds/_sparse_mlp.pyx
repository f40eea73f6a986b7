# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled kernels of the shifted-ReLU network (private; see ``mlp.py``).

Design
------
A layer maps the batch of inputs ``H`` (n x d_in) to ``Z = H @ WT`` with the
weights stored *transposed*, ``WT`` of shape (d_in, m): column ``j`` of the
usual ``W`` (m x d_in) is the contiguous row ``WT[j]``.  Activations are kept
in a CSR batch layout (``indptr`` intp, ``indices`` int32 sorted ascending
within each row, ``data`` of the working dtype), which
``scipy.sparse.csr_array((data, indices, indptr))`` wraps without a copy.

Invariants
~~~~~~~~~~
* A stored activation is strictly positive: ``h = z - t > 0``.  The CSR
  pattern of ``H_l`` is therefore exactly the active set of layer ``l`` and
  every backward or update quantity of layer ``l`` lives on that pattern
  (``delta`` arrays are aligned with ``H_l.data``).
* Threshold rules (``rule``): 0 fixed, ``t_i = b``; 1 norm-relative,
  ``t_i = b * norm_i`` (``norm_i`` = Euclidean norm of the sample's layer
  input); 2 top-k, ``t_i`` = the (k+1)-th largest entry of ``z_i``, so
  exactly the k largest entries are active when there are no ties.
* Kernels never allocate per sample; each OpenMP thread owns one scratch row
  of length m.  Validation is done by the Python caller.

Complexity per sample (k_in, k_out active inputs/outputs, m outputs)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
* ``sparse_forward``: O(k_in * m) reads of ``WT`` (the gather of active
  rows; memory-bound) plus O(m) for the threshold (O(m) expected for top-k,
  ``std::nth_element``).
* ``sparse_backward``: O(k_in * k_out), the active block of ``WT`` only.
* ``sparse_update``: O(k_in * k_out) writes (eager sum of sparse outer
  products).  It parallelises over disjoint ranges of ``WT`` rows, so no
  two threads write the same row and the result does not depend on the
  number of threads.
"""

import numpy as np

cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport sqrt
from libc.string cimport memcpy, memset
from libcpp.algorithm cimport nth_element

cnp.import_array()

ctypedef cnp.int32_t idx_t
ctypedef cnp.intp_t ptr_t

cdef enum:
    RULE_FIXED = 0
    RULE_RELATIVE = 1
    RULE_TOPK = 2


cdef inline floating _row_threshold(floating* z, floating* scratch, Py_ssize_t m,
                                    int rule, floating b, floating norm,
                                    Py_ssize_t k) noexcept nogil:
    """Threshold of one sample (``scratch`` is only used by top-k)."""
    if rule == RULE_FIXED:
        return b
    if rule == RULE_RELATIVE:
        return b * norm
    memcpy(scratch, z, m * sizeof(floating))
    nth_element(scratch, scratch + (m - k - 1), scratch + m)
    return scratch[m - k - 1]


cdef inline Py_ssize_t _extract_row(const floating* z, Py_ssize_t m, floating t,
                                    idx_t* out_idx, floating* out_val) noexcept nogil:
    """Write the positive entries of ``z - t`` (ascending index); return their count."""
    cdef Py_ssize_t r, c = 0
    cdef floating v
    for r in range(m):
        v = z[r] - t
        if v > 0:
            out_idx[c] = <idx_t>r
            out_val[c] = v
            c += 1
    return c


cdef inline void _gather_rows(floating* z, const floating* WT, Py_ssize_t m,
                              const idx_t* idx, const floating* val,
                              Py_ssize_t nnz) noexcept nogil:
    """``z = sum_q val[q] * WT[idx[q]]``, four rows per pass over ``z``."""
    cdef Py_ssize_t q = 0, r
    cdef const floating* w0
    cdef const floating* w1
    cdef const floating* w2
    cdef const floating* w3
    cdef floating v0, v1, v2, v3
    memset(z, 0, m * sizeof(floating))
    while q + 4 <= nnz:
        w0 = WT + <Py_ssize_t>idx[q] * m
        w1 = WT + <Py_ssize_t>idx[q + 1] * m
        w2 = WT + <Py_ssize_t>idx[q + 2] * m
        w3 = WT + <Py_ssize_t>idx[q + 3] * m
        v0 = val[q]
        v1 = val[q + 1]
        v2 = val[q + 2]
        v3 = val[q + 3]
        for r in range(m):
            z[r] += v0 * w0[r] + v1 * w1[r] + v2 * w2[r] + v3 * w3[r]
        q += 4
    while q < nnz:
        w0 = WT + <Py_ssize_t>idx[q] * m
        v0 = val[q]
        for r in range(m):
            z[r] += v0 * w0[r]
        q += 1


cdef _compact(ptr_t[::1] counts, idx_t[:, ::1] pad_idx, floating[:, ::1] pad_val,
              int n_threads):
    """Turn padded per-sample rows into CSR arrays."""
    cdef Py_ssize_t n = counts.shape[0], i
    indptr_arr = np.zeros(n + 1, dtype=np.intp)
    cdef ptr_t[::1] indptr = indptr_arr
    for i in range(n):
        indptr[i + 1] = indptr[i] + counts[i]
    indices_arr = np.empty(indptr[n], dtype=np.int32)
    data_arr = np.empty(indptr[n], dtype=np.asarray(pad_val).dtype)
    cdef idx_t[::1] indices = indices_arr
    cdef floating[::1] data = data_arr
    with nogil:
        for i in prange(n, num_threads=n_threads, schedule="static"):
            if counts[i] > 0:
                memcpy(&indices[indptr[i]], &pad_idx[i, 0], counts[i] * sizeof(idx_t))
                memcpy(&data[indptr[i]], &pad_val[i, 0], counts[i] * sizeof(floating))
    return indptr_arr, indices_arr, data_arr


def extract_active(const floating[:, ::1] Z, int rule, floating b,
                   const floating[::1] norms, Py_ssize_t k, int n_threads):
    """Shifted ReLU of a dense batch ``Z`` into CSR; returns (indptr, indices, data, t)."""
    cdef Py_ssize_t n = Z.shape[0], m = Z.shape[1], i
    dtype = np.asarray(Z).dtype
    cdef floating[:, ::1] scratch = np.empty((n_threads if rule == RULE_TOPK else 1, m), dtype)
    cdef idx_t[:, ::1] pad_idx = np.empty((n, m), np.int32)
    cdef floating[:, ::1] pad_val = np.empty((n, m), dtype)
    cdef ptr_t[::1] counts = np.empty(n, np.intp)
    thr_arr = np.empty(n, dtype)
    cdef floating[::1] thr = thr_arr
    cdef floating t, nrm
    cdef int tid
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for i in prange(n, schedule="dynamic"):
            nrm = norms[i] if rule == RULE_RELATIVE else 1
            t = _row_threshold(<floating*>&Z[i, 0], &scratch[tid if rule == RULE_TOPK else 0, 0],
                               m, rule, b, nrm, k)
            thr[i] = t
            counts[i] = _extract_row(&Z[i, 0], m, t, &pad_idx[i, 0], &pad_val[i, 0])
    indptr, indices, data = _compact(counts, pad_idx, pad_val, n_threads)
    return indptr, indices, data, thr_arr


def sparse_forward(const floating[:, ::1] WT, const ptr_t[::1] indptr,
                   const idx_t[::1] indices, const floating[::1] data,
                   int rule, floating b, const floating[::1] norms, Py_ssize_t k,
                   int n_threads):
    """Next layer of a CSR batch: ``max(H @ WT - t, 0)`` as CSR; returns (indptr, indices, data, t)."""
    cdef Py_ssize_t n = indptr.shape[0] - 1, m = WT.shape[1], i
    dtype = np.asarray(WT).dtype
    cdef floating[:, ::1] zbuf = np.empty((n_threads, m), dtype)
    cdef floating[:, ::1] scratch = np.empty((n_threads if rule == RULE_TOPK else 1, m), dtype)
    cdef idx_t[:, ::1] pad_idx = np.empty((n, m), np.int32)
    cdef floating[:, ::1] pad_val = np.empty((n, m), dtype)
    cdef ptr_t[::1] counts = np.empty(n, np.intp)
    thr_arr = np.empty(n, dtype)
    cdef floating[::1] thr = thr_arr
    cdef floating t, nrm
    cdef floating* z
    cdef int tid
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        z = &zbuf[tid, 0]
        for i in prange(n, schedule="dynamic"):
            _gather_rows(z, &WT[0, 0], m, &indices[indptr[i]], &data[indptr[i]],
                         indptr[i + 1] - indptr[i])
            nrm = norms[i] if rule == RULE_RELATIVE else 1
            t = _row_threshold(z, &scratch[tid if rule == RULE_TOPK else 0, 0],
                               m, rule, b, nrm, k)
            thr[i] = t
            counts[i] = _extract_row(z, m, t, &pad_idx[i, 0], &pad_val[i, 0])
    out_indptr, out_indices, out_data = _compact(counts, pad_idx, pad_val, n_threads)
    return out_indptr, out_indices, out_data, thr_arr


def row_norms(const ptr_t[::1] indptr, const floating[::1] data):
    """Euclidean norm of every CSR row."""
    cdef Py_ssize_t n = indptr.shape[0] - 1, i, p
    out_arr = np.empty(n, np.asarray(data).dtype)
    cdef floating[::1] out = out_arr
    cdef double acc
    with nogil:
        for i in range(n):
            acc = 0
            for p in range(indptr[i], indptr[i + 1]):
                acc = acc + <double>data[p] * data[p]
            out[i] = <floating>sqrt(acc)
    return out_arr


def sparse_backward(const floating[:, ::1] WT,
                    const ptr_t[::1] out_indptr, const idx_t[::1] out_indices,
                    const floating[::1] delta_out,
                    const ptr_t[::1] in_indptr, const idx_t[::1] in_indices,
                    const floating[::1] in_data, const floating[::1] in_norms,
                    floating rel_coef, int n_threads):
    """Error on the layer input, restricted to its active set (aligned with ``in_data``).

    ``g_j = sum_r WT[j, r] delta_r - rel_coef * (sum_r delta_r) * h_j / ||h||``
    for every active input ``j``; the sums run over the sample's active
    outputs only (the k_in x k_out block).  ``rel_coef`` is ``tau * s`` for
    the norm-relative rule and 0 otherwise.
    """
    cdef Py_ssize_t n = in_indptr.shape[0] - 1, m = WT.shape[1], i, p, q
    cdef Py_ssize_t p0, p1
    out_arr = np.empty(in_indptr[n], np.asarray(WT).dtype)
    cdef floating[::1] delta_in = out_arr
    cdef floating acc, c, total
    cdef const floating* w
    with nogil:
        for i in prange(n, num_threads=n_threads, schedule="dynamic"):
            p0 = out_indptr[i]
            p1 = out_indptr[i + 1]
            c = 0
            if rel_coef != 0 and in_norms[i] > 0:
                total = 0
                for p in range(p0, p1):
                    total = total + delta_out[p]
                c = rel_coef * total / in_norms[i]
            for q in range(in_indptr[i], in_indptr[i + 1]):
                w = &WT[in_indices[q], 0]
                acc = 0
                for p in range(p0, p1):
                    acc = acc + w[out_indices[p]] * delta_out[p]
                delta_in[q] = acc - c * in_data[q]
    return out_arr


def sparse_update(floating[:, ::1] WT,
                  const ptr_t[::1] out_indptr, const idx_t[::1] out_indices,
                  const floating[::1] delta_out,
                  const ptr_t[::1] in_indptr, const idx_t[::1] in_indices,
                  const floating[::1] in_data, floating lr, int n_threads):
    """Eager sparse step ``WT[j, r] -= lr * sum_i h_ij delta_ir`` over active blocks.

    Thread ``c`` owns the rows ``j`` in ``[c*d/T, (c+1)*d/T)`` and walks
    every sample, skipping inputs outside its range (inputs are sorted).
    """
    cdef Py_ssize_t n = in_indptr.shape[0] - 1, d = WT.shape[0], i, p, q, ch
    cdef Py_ssize_t p0, p1, j, j_lo, j_hi, n_chunks = n_threads
    cdef floating coef
    cdef floating* w
    if n_chunks > d:
        n_chunks = d
    with nogil:
        for ch in prange(n_chunks, num_threads=n_threads, schedule="static"):
            j_lo = ch * d // n_chunks
            j_hi = (ch + 1) * d // n_chunks
            for i in range(n):
                p0 = out_indptr[i]
                p1 = out_indptr[i + 1]
                for q in range(in_indptr[i], in_indptr[i + 1]):
                    j = in_indices[q]
                    if j < j_lo:
                        continue
                    if j >= j_hi:
                        break
                    coef = lr * in_data[q]
                    w = &WT[j, 0]
                    for p in range(p0, p1):
                        w[out_indices[p]] -= coef * delta_out[p]
