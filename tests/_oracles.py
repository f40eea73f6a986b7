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


# --- trainer: shifted-ReLU network (SparseMLP) ------------------------------

def shifted_relu_dense(Z, t):
    """``max(Z - t_i, 0)`` row by row, in float64."""
    Z = np.asarray(Z, dtype=np.float64)
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (Z.shape[0],))
    return np.maximum(Z - t[:, None], 0.0)


def topk_threshold(Z, k):
    """The (k+1)-th largest entry of every row."""
    return -np.sort(-np.asarray(Z, dtype=np.float64), axis=1)[:, k]


def mlp_loss(coefs, head, intercept, X, y, *, rule, b, k=None, task="regression"):
    """Training objective of the shifted-ReLU network, written out plainly.

    ``rule`` is "fixed" (t = b), "relative" (t_i = b ||h_{l-1,i}||) or "topk".
    Regression: 0.5 * mean squared error of ``h_L @ head[:, 0]``;
    classification: mean softmax cross-entropy of ``h_L @ head + intercept``
    with ``y`` holding class indices.
    """
    H = np.asarray(X, dtype=np.float64)
    for W in coefs:
        Z = H @ np.asarray(W, dtype=np.float64)
        if rule == "fixed":
            t = np.full(len(Z), b)
        elif rule == "relative":
            t = b * np.sqrt((H * H).sum(axis=1))
        else:
            t = topk_threshold(Z, k)
        H = shifted_relu_dense(Z, t)
    out = H @ np.asarray(head, dtype=np.float64) + np.asarray(intercept, dtype=np.float64)
    if task == "regression":
        r = out[:, 0] - np.asarray(y, dtype=np.float64)
        return 0.5 * np.mean(r * r)
    out = out - out.max(axis=1, keepdims=True)
    logp = out - np.log(np.exp(out).sum(axis=1, keepdims=True))
    return -np.mean(logp[np.arange(len(y)), y])
