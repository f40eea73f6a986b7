# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled kernels behind ``subquad_ds.LowRankUpdatedMatrix``.

Design
======

Every matrix reaches these kernels as a column-major (Fortran-contiguous)
*store* ``S`` of shape ``(p_s, q_s)`` plus a flag ``trans``; the logical
operand is ``op(S) = S`` or ``op(S) = S.T``.  This one convention covers

* a Fortran-ordered base ``W`` (``S = W``, ``trans=False``: a column of ``W``
  is contiguous, which is what the sparse product reads),
* a C-ordered base used without a copy (``S = W.T``, ``trans=True``),
* the transposed products ``W.T @ x`` (flip ``trans``; no data moves),
* the pending factors ``U`` (m, r) and ``V`` (n, r), both Fortran buffers of
  ``max_rank`` columns so that an update writes one contiguous column each.

Kernels (all fused over float32/float64; ``accumulate`` means ``y +=``,
otherwise ``y =``)

============  ==========================================  ===================
kernel        computes                                    cost
============  ==========================================  ===================
gemm          C = [C +] op(A) op(B)         (BLAS xGEMM)  p q k flops
gemv          y = [y +] op(S) x             (BLAS xGEMV)  p q
spmv          y = [y +] op(S)[:, idx] @ vals              p nnz
gemv_rows     y = [y +] op(S)[rows, :] @ x                len(rows) q
spmv_rows     y = [y +] op(S)[rows, idx] @ vals           len(rows) nnz
============  ==========================================  ===================

The sparse and row-restricted kernels are plain loops with the GIL released,
parallel over output entries (OpenMP ``prange``) once the work is large
enough to pay for a thread team; each output entry is owned by one thread,
so results do not depend on the thread count.  When the entries a kernel
needs are strided in the store (a row of a column-major matrix), the loop
order is chosen so that the innermost loop walks a contiguous column:
``spmv`` with ``trans=False`` adds ``nnz`` contiguous columns, four at a time,
block by block (the block of ``y`` stays in L1/L2); with ``trans=True`` each output entry is a
gathered dot product along one contiguous column.

Validation (shapes, dtypes, index ranges, finiteness) is done once in
``subquad_ds.lowrank``; these kernels trust their arguments.
"""

from cython cimport floating
from cython.parallel cimport prange

from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv

# Output rows handled per task by the column-axpy form of spmv (16-32 KiB of
# y, in L1/L2), four columns streaming at a time.  Long column segments keep
# the hardware prefetchers streaming: at m = 16384 with 400 nonzeros, blocks of
# 512 rows ran at 15 GB/s, 4096 at 25 GB/s (one thread, this machine).
cdef Py_ssize_t ROW_BLOCK = 4096


cdef inline int _imax1(Py_ssize_t v) noexcept nogil:
    return <int>(v if v > 1 else 1)


def gemm(floating[::1, :] C, const floating[::1, :] A, bint trans_a,
         const floating[::1, :] B, bint trans_b, bint accumulate):
    """C = [C +] op(A) @ op(B) with BLAS xGEMM (all stores column-major)."""
    cdef int m = <int>C.shape[0]
    cdef int n = <int>C.shape[1]
    cdef int k = <int>(A.shape[0] if trans_a else A.shape[1])
    cdef int lda = _imax1(A.shape[0])
    cdef int ldb = _imax1(B.shape[0])
    cdef int ldc = _imax1(C.shape[0])
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef floating alpha = 1
    cdef floating beta = 1 if accumulate else 0
    if m == 0 or n == 0:
        return
    if k == 0:
        if not accumulate:
            with nogil:
                _fill_zero_2d(C)
        return
    with nogil:
        if floating is float:
            sgemm(&ta, &tb, &m, &n, &k, &alpha, <float*>&A[0, 0], &lda,
                  <float*>&B[0, 0], &ldb, &beta, &C[0, 0], &ldc)
        else:
            dgemm(&ta, &tb, &m, &n, &k, &alpha, <double*>&A[0, 0], &lda,
                  <double*>&B[0, 0], &ldb, &beta, &C[0, 0], &ldc)


cdef void _fill_zero_2d(floating[::1, :] C) noexcept nogil:
    cdef Py_ssize_t i, j
    for j in range(C.shape[1]):
        for i in range(C.shape[0]):
            C[i, j] = 0


def gemv(const floating[::1, :] S, bint trans, const floating[::1] x,
         floating[::1] y, bint accumulate):
    """y = [y +] op(S) @ x with BLAS xGEMV."""
    cdef int m = <int>S.shape[0]
    cdef int n = <int>S.shape[1]
    cdef int lda = _imax1(S.shape[0])
    cdef int inc = 1
    cdef char t = b'T' if trans else b'N'
    cdef floating alpha = 1
    cdef floating beta = 1 if accumulate else 0
    cdef Py_ssize_t i
    if y.shape[0] == 0:
        return
    if x.shape[0] == 0:
        if not accumulate:
            for i in range(y.shape[0]):
                y[i] = 0
        return
    with nogil:
        if floating is float:
            sgemv(&t, &m, &n, &alpha, <float*>&S[0, 0], &lda, <float*>&x[0], &inc,
                  &beta, &y[0], &inc)
        else:
            dgemv(&t, &m, &n, &alpha, <double*>&S[0, 0], &lda, <double*>&x[0], &inc,
                  &beta, &y[0], &inc)


cdef void _gather_mv(const floating[::1, :] S, bint trans,
                     const Py_ssize_t* rows, Py_ssize_t n_out,
                     const Py_ssize_t* idx, Py_ssize_t n_in, const floating* vals,
                     floating* y, bint accumulate, int n_threads) noexcept nogil:
    """y[i] = [y[i] +] sum_t vals[t] * op(S)[row(i), col(t)] for i < n_out.

    ``row(i) = rows[i]`` and ``col(t) = idx[t]``; a NULL ``rows`` or ``idx``
    means the identity (all output rows, a dense input vector).
    """
    cdef Py_ssize_t i, t, b, i0, i1, n_blocks, r
    cdef const floating* col
    cdef const floating *c0
    cdef const floating *c1
    cdef const floating *c2
    cdef const floating *c3
    cdef floating v0, v1, v2, v3, acc
    if trans:
        # Row row(i) of op(S) is the contiguous column row(i) of S: one
        # (gathered) dot product per output entry.
        for i in prange(n_out, schedule='static', num_threads=n_threads):
            col = &S[0, rows[i] if rows != NULL else i]
            acc = y[i] if accumulate else 0
            if idx == NULL:
                for t in range(n_in):
                    acc = acc + vals[t] * col[t]
            else:
                for t in range(n_in):
                    acc = acc + vals[t] * col[idx[t]]
            y[i] = acc
    else:
        # Column col(t) of op(S) is contiguous in S: add the columns, one
        # L1-sized block of outputs at a time (gathering row(i) within it).
        n_blocks = (n_out + ROW_BLOCK - 1) // ROW_BLOCK
        for b in prange(n_blocks, schedule='static', num_threads=n_threads):
            i0 = b * ROW_BLOCK
            i1 = i0 + ROW_BLOCK
            if i1 > n_out:
                i1 = n_out
            if not accumulate:
                for i in range(i0, i1):
                    y[i] = 0
            # Four columns per pass: four concurrent memory streams and a
            # quarter of the read-modify-writes of y.
            for t in range(0, n_in - 3, 4):
                c0 = &S[0, idx[t] if idx != NULL else t]
                c1 = &S[0, idx[t + 1] if idx != NULL else t + 1]
                c2 = &S[0, idx[t + 2] if idx != NULL else t + 2]
                c3 = &S[0, idx[t + 3] if idx != NULL else t + 3]
                v0 = vals[t]
                v1 = vals[t + 1]
                v2 = vals[t + 2]
                v3 = vals[t + 3]
                if rows == NULL:
                    for i in range(i0, i1):
                        y[i] = y[i] + (v0 * c0[i] + v1 * c1[i]) + (v2 * c2[i] + v3 * c3[i])
                else:
                    for i in range(i0, i1):
                        r = rows[i]
                        y[i] = y[i] + (v0 * c0[r] + v1 * c1[r]) + (v2 * c2[r] + v3 * c3[r])
            for t in range(n_in - n_in % 4, n_in):
                v0 = vals[t]
                c0 = &S[0, idx[t] if idx != NULL else t]
                if rows == NULL:
                    for i in range(i0, i1):
                        y[i] = y[i] + v0 * c0[i]
                else:
                    for i in range(i0, i1):
                        y[i] = y[i] + v0 * c0[rows[i]]


def spmv(const floating[::1, :] S, bint trans, const Py_ssize_t[::1] idx,
         const floating[::1] vals, floating[::1] y, bint accumulate, int n_threads):
    """y = [y +] op(S)[:, idx] @ vals (duplicate indices add up)."""
    if y.shape[0] == 0:
        return
    with nogil:
        _gather_mv(S, trans, NULL, y.shape[0], &idx[0], idx.shape[0], &vals[0],
                   &y[0], accumulate, n_threads)


def gemv_rows(const floating[::1, :] S, bint trans, const Py_ssize_t[::1] rows,
              const floating[::1] x, floating[::1] y, bint accumulate, int n_threads):
    """y = [y +] op(S)[rows, :] @ x (y has len(rows) entries)."""
    if rows.shape[0] == 0:
        return
    with nogil:
        _gather_mv(S, trans, &rows[0], rows.shape[0], NULL, x.shape[0], &x[0],
                   &y[0], accumulate, n_threads)


def spmv_rows(const floating[::1, :] S, bint trans, const Py_ssize_t[::1] rows,
              const Py_ssize_t[::1] idx, const floating[::1] vals, floating[::1] y,
              bint accumulate, int n_threads):
    """y = [y +] op(S)[rows, idx] @ vals (y has len(rows) entries)."""
    if rows.shape[0] == 0:
        return
    with nogil:
        _gather_mv(S, trans, &rows[0], rows.shape[0], &idx[0], idx.shape[0], &vals[0],
                   &y[0], accumulate, n_threads)
