"""Brute-force numpy references, computed in float64.

Every structure in subquad_ds is compared with one of these on random and
adversarial data.  They favour obviousness over speed.
"""

import numpy as np


# --- halfspace: HalfspaceIndex -----------------------------------------------

def halfspace_scores(X, W):
    """All inner products ``W @ X.T`` in float64, shape (n_queries, n_points)."""
    X = np.asarray(X, dtype=np.float64).reshape(-1, np.shape(W)[-1])
    return np.asarray(W, dtype=np.float64) @ X.T


def halfspace_bruteforce(X, ids, W, b):
    """CSR ``(indptr, indices, scores)`` of ``{ids[i] : <X[i], w_q> >= b_q}``.

    Each row's indices are sorted.  float64 throughout.
    """
    W = np.atleast_2d(np.asarray(W, dtype=np.float64))
    S = halfspace_scores(X, W)
    b = np.broadcast_to(np.asarray(b, dtype=np.float64), (W.shape[0],))
    ids = np.asarray(ids, dtype=np.intp)
    indptr, indices, scores = [0], [], []
    for q in range(W.shape[0]):
        hit = np.flatnonzero(S[q] >= b[q])
        order = np.argsort(ids[hit], kind="stable")
        indices.append(ids[hit][order])
        scores.append(S[q, hit][order])
        indptr.append(indptr[-1] + hit.shape[0])
    return (np.asarray(indptr, dtype=np.intp),
            np.concatenate(indices).astype(np.intp) if indices else np.empty(0, np.intp),
            np.concatenate(scores) if scores else np.empty(0))


def topk_bruteforce(X, ids, W, k):
    """Exact top-k by inner product: (scores, ids) of shape (n_queries, k).

    Sorted by decreasing score, ties by increasing id; padded with -inf / -1.
    """
    W = np.atleast_2d(np.asarray(W, dtype=np.float64))
    S = halfspace_scores(X, W)
    ids = np.asarray(ids, dtype=np.intp)
    out_s = np.full((W.shape[0], k), -np.inf)
    out_i = np.full((W.shape[0], k), -1, dtype=np.intp)
    for q in range(W.shape[0]):
        order = np.lexsort((ids, -S[q]))[:k]
        out_s[q, :order.shape[0]] = S[q, order]
        out_i[q, :order.shape[0]] = ids[order]
    return out_s, out_i


def check_csr_equal(indptr, indices, ref_indptr, ref_indices):
    """Assert two CSR results hold the same id set per row (order-free)."""
    np.testing.assert_array_equal(indptr, ref_indptr)
    for q in range(len(indptr) - 1):
        got = np.sort(indices[indptr[q]:indptr[q + 1]])
        np.testing.assert_array_equal(got, ref_indices[ref_indptr[q]:ref_indptr[q + 1]],
                                      err_msg=f"query {q}")
