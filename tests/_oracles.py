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


# ---------------------------------------------------------------------------
# Sketches (workstream "sketch")
# ---------------------------------------------------------------------------
import itertools  # noqa: E402


def countsketch_matrix(buckets, signs, sketch_size):
    """The dense (s, d) CountSketch matrix with S[buckets[j], j] = signs[j]."""
    d = len(buckets)
    S = np.zeros((sketch_size, d))
    S[np.asarray(buckets), np.arange(d)] = np.asarray(signs, dtype=np.float64)
    return S


def countsketch_rows(X, buckets, signs, sketch_size):
    """Sketch each row of a dense X with an explicit S (float64)."""
    return np.asarray(X, dtype=np.float64) @ countsketch_matrix(buckets, signs, sketch_size).T


def kron_rows(U, V):
    """Row-wise Kronecker products: row i is np.kron(U[i], V[i])."""
    U = np.asarray(U, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    return (U[:, :, None] * V[:, None, :]).reshape(U.shape[0], U.shape[1] * V.shape[1])


def countsketch_variance(x, y, sketch_size):
    """Var <Sx, Sy> for a CountSketch with fully random buckets and signs."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return (x @ x * (y @ y) + (x @ y) ** 2 - 2 * np.sum(x**2 * y**2)) / sketch_size


def gaussian_sketch_variance(x, y, sketch_size):
    """Var <Sx, Sy> for S with i.i.d. N(0, 1/s) entries."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return (x @ x * (y @ y) + (x @ y) ** 2) / sketch_size


def tensorsketch_variance(x, y, dims, sketch_size):
    """Exact Var <TS x, TS y> for degree-2 TensorSketch, by enumeration.

    x, y are vectors of length d1 * d2 (index j * d2 + k).  The bucket of
    (j, k) is (h1[j] + h2[k]) mod s and its sign g1[j] g2[k], with h1, h2,
    g1, g2 fully random and independent.  The error is
    sum_{a != b} x_a y_b sigma_a sigma_b [H(a) = H(b)], so
    Var = sum over a != b, c != d of x_a y_b x_c y_d E[sigma_a sigma_b
    sigma_c sigma_d] P[H(a) = H(b), H(c) = H(d)]; the sign moment is 1 when
    every j and every k value occurs an even number of times, else 0, and
    the probability is computed by enumerating the hash values of the
    distinct j's and k's involved.  O((d1 d2)^4 s^4): tiny sizes only.
    """
    d1, d2 = dims
    s = sketch_size
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    D = d1 * d2
    total = 0.0
    for a, b, c, d in itertools.product(range(D), repeat=4):
        if a == b or c == d:
            continue
        w = x[a] * y[b] * x[c] * y[d]
        if w == 0.0:
            continue
        js = [a // d2, b // d2, c // d2, d // d2]
        ks = [a % d2, b % d2, c % d2, d % d2]
        if any(js.count(j) % 2 for j in set(js)) or any(ks.count(k) % 2 for k in set(ks)):
            continue
        uj, uk = sorted(set(js)), sorted(set(ks))
        hits = 0
        for hv in itertools.product(range(s), repeat=len(uj) + len(uk)):
            h1 = dict(zip(uj, hv[: len(uj)]))
            h2 = dict(zip(uk, hv[len(uj):]))
            H = [(h1[j] + h2[k]) % s for j, k in zip(js, ks)]
            hits += H[0] == H[1] and H[2] == H[3]
        total += w * hits / s ** (len(uj) + len(uk))
    return total


def kron_jacobian(factors):
    """Dense J whose layer-l block row i is np.kron(D_l[i], H_{l-1}[i]) (float64)."""
    blocks = []
    for D, H in factors:
        D = D.toarray() if hasattr(D, "toarray") else np.asarray(D)
        H = H.toarray() if hasattr(H, "toarray") else np.asarray(H)
        blocks.append(np.stack([np.kron(D[i], H[i]) for i in range(D.shape[0])]))
    return np.hstack(blocks)


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


# ---------------------------------------------------------------------------
# Gauss-Newton training of SparseMLP (workstream "gn")
# ---------------------------------------------------------------------------

def mlp_outputs(coefs, head, X, *, rule, b, frozen=None):
    """Regression outputs ``f(X) = h_L @ head[:, 0]`` in float64, written out plainly.

    ``frozen``: a list of per-layer ``(t, mask)`` from :func:`topk_selection`;
    the top-k threshold and active set are then held constant (the
    straight-through rule of the top-k backward pass).
    """
    H = np.asarray(X, dtype=np.float64)
    for layer, W in enumerate(coefs):
        Z = H @ np.asarray(W, dtype=np.float64)
        if frozen is not None:
            t, mask = frozen[layer]
            H = (Z - t[:, None]) * mask
            continue
        if rule == "fixed":
            t = np.full(len(Z), b)
        else:
            t = b * np.sqrt((H * H).sum(axis=1))
        H = shifted_relu_dense(Z, t)
    return H @ np.asarray(head, dtype=np.float64)[:, 0]


def topk_selection(coefs, X, k):
    """Per-layer top-k thresholds and active masks at ``coefs`` (to freeze them)."""
    H, frozen = np.asarray(X, dtype=np.float64), []
    for W in coefs:
        Z = H @ np.asarray(W, dtype=np.float64)
        t = topk_threshold(Z, k)
        mask = Z - t[:, None] > 0
        frozen.append((t, mask))
        H = (Z - t[:, None]) * mask
    return frozen


def mlp_jacobian_fd(coefs, head, X, *, rule, b, frozen=None, eps=1e-6):
    """Dense Jacobian df/dtheta (n, sum of coef sizes) by central differences.

    Columns follow ``np.concatenate([W.ravel() for W in coefs])`` (the
    stored ``coefs_`` layout, (d_in, m) per layer, row-major).
    """
    coefs = [np.array(W, dtype=np.float64) for W in coefs]
    cols = []
    for W in coefs:
        for idx in np.ndindex(W.shape):
            w0 = W[idx]
            W[idx] = w0 + eps
            up = mlp_outputs(coefs, head, X, rule=rule, b=b, frozen=frozen)
            W[idx] = w0 - eps
            down = mlp_outputs(coefs, head, X, rule=rule, b=b, frozen=frozen)
            W[idx] = w0
            cols.append((up - down) / (2 * eps))
    return np.stack(cols, axis=1)


def gauss_newton_step_dense(J, r, damping):
    """The damped Gauss-Newton step ``-J^T (J J^T + damping I)^{-1} r`` (flat)."""
    G = J @ J.T + damping * np.eye(J.shape[0])
    return -J.T @ np.linalg.solve(G, r)
