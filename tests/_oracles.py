"""Brute-force numpy references, computed in float64.

Every structure in subquad_ds is compared with one of these on random and
adversarial data.  They favour obviousness over speed.
"""

import numpy as np


# --- LowRankUpdatedMatrix -----------------------------------------------------

def lowrank_dense(W0, updates=()):
    """``W0 + sum U @ V.T`` over ``updates`` (pairs, 1-D = rank-1), in float64."""
    W = np.array(W0, dtype=np.float64)
    for U, V in updates:
        U = np.asarray(U, dtype=np.float64)
        V = np.asarray(V, dtype=np.float64)
        if U.ndim == 1:
            U, V = U[:, None], V[:, None]
        W += U @ V.T
    return W


def sparse_to_dense(indices, values, length):
    """Dense vector of a sparse ``(indices, values)`` pair; duplicates add up."""
    x = np.zeros(length, dtype=np.float64)
    np.add.at(x, np.asarray(indices, dtype=np.intp), np.asarray(values, dtype=np.float64))
    return x
