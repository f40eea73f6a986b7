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
* Kernels never allocate per sample: a batch's pre-activations go to one
  (n, m) buffer, extraction to padded (n, m) rows compacted into CSR, and
  top-k uses one scratch row per thread.  Validation is done by the Python
  caller.

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
* ``backward_update`` (what training uses): the two above fused.  Rows of
  ``WT`` are visited once, through the column view of the input pattern
  (``invert_pattern``, O(nnz + d)): for row ``j``, first every sample's
  backward gather (old weights), then every sample's update, while the
  row's touched cache lines are still in L1.  Exactly the same arithmetic as
  the separate kernels, half the memory traffic.  While row ``j`` is
  processed, the lines the next two visited rows will touch are prefetched
  (for writing): the scattered reads of a matrix far larger than the caches
  are otherwise latency-bound, one row's misses at a time.

Where the time goes (m = 16384, k ~ 400, n = 32, one core): the forward
gather reads 32 * 400 rows of 64 KiB per layer (~820 MB, bandwidth-bound at
~22 GB/s: ~36 ms per layer); the fused backward and update touches about
one cache line per gathered entry (~4M distinct lines per layer, read and
written back: ~19 ms per layer with the prefetch, ~38 ms without).  At
m = 2048 the two hidden matrices (16 MiB each) sit in the 32 MiB L3, so
both kernels run several times faster per byte there than at m >= 4096.
With the sqrt-log schedule the forward's operation count ``n p m^2`` has a
width exponent of about 1.76 (the backward's ``n p^2 m^2`` about 1.52), so
the forward's share grows with m.  Column-blocked forwards that
try to read each row once per batch (the union of the supports is ~54% of
the rows here) were measured 1.3-3x slower than the per-sample gather of
whole rows (probably: short segments defeat the hardware prefetcher, and
the shared cache does not keep them between samples) and are not used.
"""

import numpy as np

cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport sqrt
from libc.string cimport memcpy, memset
from libcpp.algorithm cimport nth_element

cnp.import_array()

cdef extern from *:
    """
    #if defined(__GNUC__)
    #define SQD_PREFETCH_W(p) __builtin_prefetch((const void*)(p), 1, 2)
    #else
    #define SQD_PREFETCH_W(p) ((void)0)
    #endif
    """
    void SQD_PREFETCH_W(const void* p) noexcept nogil

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
    """Next layer of a CSR batch: ``max(H @ WT - t, 0)`` as CSR; returns (indptr, indices, data, t).

    Each sample's pre-activations are the sum of its active rows of ``WT``
    (``_gather_rows``); ``extract_active`` then thresholds the batch.
    """
    cdef Py_ssize_t n = indptr.shape[0] - 1, m = WT.shape[1], i
    Z_arr = np.empty((n, m), np.asarray(WT).dtype)
    cdef floating[:, ::1] Z = Z_arr
    with nogil:
        for i in prange(n, num_threads=n_threads, schedule="dynamic"):
            _gather_rows(&Z[i, 0], &WT[0, 0], m, &indices[indptr[i]], &data[indptr[i]],
                         indptr[i + 1] - indptr[i])
    return extract_active(Z_arr, rule, b, norms, k, n_threads)


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


def invert_pattern(const ptr_t[::1] indptr, const idx_t[::1] indices, Py_ssize_t d):
    """Column view of a CSR pattern: for every column ``j`` the positions ``q`` holding it.

    Returns ``(col_ptr, col_pos)``: the entries of column ``j`` are
    ``col_pos[col_ptr[j]:col_ptr[j+1]]`` (CSR positions, in increasing sample
    order).  O(nnz + d), a counting sort.
    """
    cdef Py_ssize_t n = indptr.shape[0] - 1, nnz = indices.shape[0], q, j
    col_ptr_arr = np.zeros(d + 1, np.intp)
    col_pos_arr = np.empty(nnz, np.intp)
    cdef ptr_t[::1] col_ptr = col_ptr_arr
    cdef ptr_t[::1] col_pos = col_pos_arr
    cdef ptr_t[::1] fill = np.empty(d, np.intp)
    with nogil:
        for q in range(nnz):
            col_ptr[indices[q] + 1] += 1
        for j in range(d):
            col_ptr[j + 1] += col_ptr[j]
            fill[j] = col_ptr[j]
        for q in range(nnz):
            j = indices[q]
            col_pos[fill[j]] = q
            fill[j] += 1
    return col_ptr_arr, col_pos_arr


def sample_of_positions(const ptr_t[::1] indptr):
    """Row (sample) index of every CSR position."""
    cdef Py_ssize_t n = indptr.shape[0] - 1, i, q
    out_arr = np.empty(indptr[n], np.intp)
    cdef ptr_t[::1] out = out_arr
    with nogil:
        for i in range(n):
            for q in range(indptr[i], indptr[i + 1]):
                out[q] = i
    return out_arr


cdef inline Py_ssize_t _next_visited(const ptr_t[::1] col_ptr, Py_ssize_t j,
                                     Py_ssize_t d) noexcept nogil:
    """First row after ``j`` (at most 8 on) with an active entry, or ``d``."""
    cdef Py_ssize_t jn = j + 1, stop = j + 9
    if stop > d:
        stop = d
    while jn < stop:
        if col_ptr[jn] != col_ptr[jn + 1]:
            return jn
        jn += 1
    return d


cdef inline void _prefetch_row_block(floating[:, ::1] WT, Py_ssize_t j,
                                     const ptr_t[::1] col_ptr, const ptr_t[::1] col_pos,
                                     const ptr_t[::1] row_of, const ptr_t[::1] out_indptr,
                                     const idx_t[::1] out_indices) noexcept nogil:
    """Prefetch (for writing) the entries of row ``j`` that ``backward_update`` touches."""
    cdef Py_ssize_t e, i, p
    if j >= WT.shape[0]:
        return
    for e in range(col_ptr[j], col_ptr[j + 1]):
        i = row_of[col_pos[e]]
        for p in range(out_indptr[i], out_indptr[i + 1]):
            SQD_PREFETCH_W(&WT[j, out_indices[p]])


def backward_update(floating[:, ::1] WT,
                    const ptr_t[::1] out_indptr, const idx_t[::1] out_indices,
                    const floating[::1] delta_out,
                    const ptr_t[::1] in_indptr, const floating[::1] in_data,
                    const floating[::1] in_norms, const ptr_t[::1] col_ptr,
                    const ptr_t[::1] col_pos, const ptr_t[::1] row_of,
                    floating rel_coef, floating lr, bint want_delta, int n_threads):
    """``sparse_backward`` then ``sparse_update`` in one pass over the active weight rows.

    Row ``j`` of ``WT`` is visited once: first the backward gathers of every
    sample that has input ``j`` active (old weights), then their updates
    (the row is still in cache).  Rows are independent, so the result is
    exactly that of the two separate kernels, whatever the thread count.
    Returns the input deltas (aligned with ``in_data``) or None.
    """
    cdef Py_ssize_t n = in_indptr.shape[0] - 1, d = WT.shape[0], i, j, e, p, q, jn
    cdef Py_ssize_t p0, p1
    dtype = np.asarray(WT).dtype
    coef_arr = np.zeros(n, dtype)
    cdef floating[::1] c = coef_arr
    cdef floating total, acc, cf
    cdef floating* w
    delta_arr = np.empty(in_data.shape[0] if want_delta else 0, dtype)
    cdef floating[::1] delta_in = delta_arr
    if want_delta and rel_coef != 0:
        for i in range(n):
            if in_norms[i] > 0:
                total = 0
                for p in range(out_indptr[i], out_indptr[i + 1]):
                    total = total + delta_out[p]
                c[i] = rel_coef * total / in_norms[i]
    with nogil:
        for j in prange(d, num_threads=n_threads, schedule="dynamic", chunksize=16):
            if col_ptr[j] == col_ptr[j + 1]:
                continue
            w = &WT[j, 0]
            # Prefetch the lines the next two visited rows will touch, so
            # every row is prefetched twice (two rows and one row ahead):
            # the scattered reads of a matrix far larger than the caches
            # are otherwise latency-bound, and a single prefetch is often
            # dropped while the miss buffers are full (both hidden layers
            # of an iteration at m = 16384, one core: 76 ms without, 52 ms
            # with one, 39 ms with two, 43 ms with three prefetches per row).
            jn = _next_visited(col_ptr, j, d)
            _prefetch_row_block(WT, jn, col_ptr, col_pos, row_of, out_indptr, out_indices)
            _prefetch_row_block(WT, _next_visited(col_ptr, jn, d), col_ptr, col_pos, row_of,
                                out_indptr, out_indices)
            if want_delta:
                for e in range(col_ptr[j], col_ptr[j + 1]):
                    q = col_pos[e]
                    i = row_of[q]
                    acc = 0
                    for p in range(out_indptr[i], out_indptr[i + 1]):
                        acc = acc + w[out_indices[p]] * delta_out[p]
                    delta_in[q] = acc - c[i] * in_data[q]
            for e in range(col_ptr[j], col_ptr[j + 1]):
                q = col_pos[e]
                i = row_of[q]
                cf = lr * in_data[q]
                for p in range(out_indptr[i], out_indptr[i + 1]):
                    w[out_indices[p]] -= cf * delta_out[p]
    return delta_arr if want_delta else None
