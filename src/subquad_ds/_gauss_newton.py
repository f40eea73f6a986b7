"""The Gauss-Newton linear system of a sparse MLP: (J J^T + lambda I) alpha = r.

Private module; the trainer (SparseMLP, ``optimizer="gauss-newton"``) calls
``solve_gauss_newton`` once per iteration and then applies the weight step
dW_l = -sum_i alpha_i D_l[i]^T H_{l-1}[i] with its sparse update kernel.

Structure.  The Jacobian row of sample i with respect to W_l (m_l x d) is
the Kronecker product D_l[i] (x) H_{l-1}[i] of the backpropagated signal
D_l[i] (sparse: supported on the active neurons) and the layer input
H_{l-1}[i] (dense for the first layer, sparse after).  Hence

    J J^T = sum_l (D_l D_l^T) o (H_{l-1} H_{l-1}^T)        (o: Hadamard)

and J itself (n x sum_l m_l d_l entries, 16.7M columns per layer at
m = 4096) is never formed.

Three solvers:

``method="exact"``
    Form the n x n Gram from the factors with sparse products, cost
    O(sum_l (n^2 k_l^2 / m_l + n^2)) for k_l active entries per row (two
    samples' supports overlap in ~k^2/m places), then Cholesky,
    O(n^3 / 3).  Memory O(n^2).

``method="sketched"``
    Sketch-and-precondition (van den Brand, Peng, Song, Weinstein 2021;
    Avron, Clarkson, Woodruff 2017 for the kernel-ridge form):
    1. Z = sum_l TensorSketch_l(D_l, H_{l-1})  (n x s): a right sketch of
       J, Z = J S^T with S the stacked per-layer TensorSketches, so
       E[Z Z^T] = J J^T; O(sum_l nnz(D_l) + nnz(H_{l-1}) + n s log s).
    2. Preconditioner P = Z Z^T + lambda I, applied through Woodbury,
       P^{-1} v = (v - Z (lambda I_s + Z^T Z)^{-1} Z^T v) / lambda, after an
       O(n s^2 + s^3) setup (s < n), or through a Cholesky of P
       (O(n^2 s + n^3 / 3)) when s >= n or lambda = 0.
    3. Preconditioned CG on (J J^T + lambda I) alpha = r with the
       matrix-free product J (J^T v), organised by neuron r: the row
       W_l[r, :] = sum_{i: r in supp D_l[i]} v_i D_l[i, r] H_{l-1}[i] is built
       in a cache-resident scratch row and immediately contracted back,
       (J J^T v)_i += D_l[i, r] <W_l[r, :], H_{l-1}[i]> (Cython kernel
       ``kron_gram_matvec``); O(n k_D k_H) per layer and product, never
       O(n^2) time or memory.
    When S embeds range(J^T) with distortion eps (s large enough for the
    statistical dimension of J J^T at lambda), the preconditioned system has
    condition number (1 + eps) / (1 - eps) and CG needs O(log(1/tol))
    iterations whatever cond(J J^T).

``method="jacobi"``
    The same matrix-free CG, preconditioned by the exact diagonal
    diag(J J^T)_i = sum_l ||D_l[i]||^2 ||H_{l-1}[i]||^2 (O(nnz) to build).

Which one pays (measured single-threaded at m = 4096, 1% and 5% active,
L = 3, n = 64..8192; bench/RESULTS.md, section "Sketches", bench/sketch_gn_crossover.py):
the exact Gram wins up to n ~ 2000 at 1% active and ~10000 at 5%, because
sparse supports make D D^T cost n^2 k^2 / m, not n^2 m; the Jacobi CG wins
beyond when J J^T is as well conditioned as with random sparse factors
(5-10 iterations to 1e-10).  Factors of a real ReLU MLP (default task,
cond(J J^T) ~ 1e3) needed 48-72 Jacobi iterations, where the TensorSketch
preconditioner kept 33 (s = 4n) or 23 (s = 8n): the sketch is the robust
preconditioner, the diagonal the cheap one.  The
TensorSketch preconditioner never paid: at small damping it needs s >= n
(s = 4 n: ~30 iterations), and building Z Z^T + lambda I (n^2 s) then costs
more than the exact Cholesky (n^3 / 3); it can pay only when a large damping
makes s << n enough (Woodbury), or for an ill-conditioned J J^T at n too
large for the exact Gram.
"""

import time

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from . import _sketch
from ._validation import (
    as_float_array,
    check_float,
    check_int,
    check_n_threads,
    check_random_state,
    is_sparse,
)
from .sketch import TensorSketch, _csr_index_arrays

__all__ = ["solve_gauss_newton", "gram_matrix", "jacobian_rmatvec", "jacobian_gram_matvec"]

_METHODS = ("auto", "exact", "sketched", "jacobi")

# method="auto": the exact Gram (a direct solve, robust whatever the
# conditioning) always up to AUTO_EXACT_MIN_N samples; beyond, whichever of
# exact and Jacobi CG a cost model predicts faster.  The model's constants
# were fitted to single-threaded measurements on the project machine
# (bench/RESULTS.md, section "Sketches": m = 4096, 1% and 5% active, L = 3, n up to 8192;
# it predicts those times within ~25%):
#   exact  = T_FLOP n^3/3 (Cholesky) + T_PAIR sum_M sum_r nnz(M[:, r])^2 / 2
#            (sparse Gram products) + T_N2 L n^2 (dense passes)
#   jacobi = AUTO_CG_ITERS * T_KRON sum_l sum_i nnz(D_l[i]) nnz(H_{l-1}[i])
# AUTO_CG_ITERS is deliberately pessimistic: random sparse factors need 5-10
# Jacobi CG iterations, but the factors of a real ReLU MLP on the default task
# (cond(J J^T) ~ 400-1200) needed 48-72, and a direct solve does not care.
# With 50, exact is chosen up to n ~ 8000 at 1% active and beyond memory
# limits at 5%; with the random-factor count (10) the crossover would be
# ~2000 and ~10000.
AUTO_EXACT_MIN_N = 1024
AUTO_CG_ITERS = 50
_T_FLOP, _T_PAIR, _T_N2, _T_KRON = 3.7e-11, 3.3e-9, 1.5e-8, 4.3e-9

_PARALLEL_MIN_WORK = 100_000


def _check_factors(factors, n_rows=None):
    """Validate the list of (D_l, H_{l-1}) pairs; return float64 copies.

    D_l becomes a CSR array; H_{l-1} stays dense (C-contiguous float64) or
    becomes CSR.
    """
    try:
        pairs = list(factors)
    except TypeError:
        raise TypeError("factors must be a list of (D, H) pairs") from None
    if not pairs:
        raise ValueError("factors must hold at least one (D, H) pair")
    out = []
    n = n_rows
    for l, pair in enumerate(pairs):
        try:
            D, H = pair
        except (TypeError, ValueError):
            raise TypeError(f"factors[{l}] must be a (D, H) pair") from None
        mats = []
        for name, M in ((f"factors[{l}][0] (D)", D), (f"factors[{l}][1] (H)", H)):
            if is_sparse(M):
                if M.ndim != 2:
                    raise ValueError(f"{name} must be 2-D; got shape {M.shape}")
                if M.dtype.kind not in "biuf":
                    raise TypeError(f"{name} must hold real numbers; got dtype {M.dtype}")
                M = sp.csr_array(M, dtype=np.float64)  # may share the caller's arrays
                if not M.has_canonical_format:
                    M = M.copy()  # sum_duplicates sorts in place: never touch the input
                    M.sum_duplicates()
                if M.nnz and not np.isfinite(M.data).all():
                    raise ValueError(f"{name} must be finite; found NaN or inf")
            else:
                M = as_float_array(M, name, dtype=np.float64, ndim=2)
            if n is None:
                n = M.shape[0]
            elif M.shape[0] != n:
                raise ValueError(f"{name} has {M.shape[0]} rows; expected {n} (one per sample)")
            mats.append(M)
        D, H = mats
        if not is_sparse(D):
            D = sp.csr_array(D)
        out.append((D, H))
    return out, n


def gram_matrix(factors, *, n_threads=None):
    """The exact Gram J J^T = sum_l (D_l D_l^T) o (H_{l-1} H_{l-1}^T), dense (n, n).

    O(sum_l n^2 (k_D^2 / m_l + k_H^2 / d_l)) with sparse factors, never
    forming a Kronecker row.
    """
    factors, n = _check_factors(factors)
    G = _gram_lower(factors, n, check_n_threads(n_threads))
    return G + np.tril(G, -1).T


def _sparse_gram_lower(M, n_threads, out=None):
    """Lower triangle of M M^T (dense, upper part zero) for a CSR M (Cython kernel)."""
    n = M.shape[0]
    if n_threads > 1 and M.nnz * max(1, M.nnz // max(1, M.shape[1])) < _PARALLEL_MIN_WORK:
        n_threads = 1
    Mc = sp.csc_array(M)
    Mc.sort_indices()
    data, indices, indptr = _as_csr_index_pair(M)
    c_data, c_rows, c_indptr = _as_csr_index_pair(
        sp.csr_array((Mc.data, Mc.indices, Mc.indptr), shape=(M.shape[1], n)))
    if len({indices.dtype, c_rows.dtype}) > 1:
        indices, indptr = indices.astype(np.int64), indptr.astype(np.int64)
        c_rows, c_indptr = c_rows.astype(np.int64), c_indptr.astype(np.int64)
    out = np.zeros((n, n)) if out is None else out
    scratch = np.zeros((n_threads, n))
    _sketch.csr_gram_lower(data, indices, indptr, c_indptr, c_rows, c_data, out, scratch,
                           n_threads)
    return out


def _gram_lower(factors, n, n_threads):
    """sum_l (D_l D_l^T) o (H_{l-1} H_{l-1}^T), lower triangle only (upper part zero)."""
    G = np.zeros((n, n))
    DD = np.zeros((n, n))  # the kernel writes only the lower triangle: the upper stays 0
    HH = np.empty((n, n))
    for D, H in factors:
        _sparse_gram_lower(D, n_threads, out=DD)
        if is_sparse(H):
            _sparse_gram_lower(H, n_threads, out=HH)
        else:
            np.matmul(H, H.T, out=HH)
        DD *= HH  # the upper triangle of DD is zero, so G stays lower
        G += DD
    return G


def _estimate_seconds(factors, n):
    """Predicted (exact, jacobi) solve times from nonzero counts (see AUTO_*)."""
    pairs = 0.0
    flops = float(n) ** 3 / 3
    kron = 0.0
    for D, H in factors:
        for M in (D, H):
            if is_sparse(M):
                counts = np.bincount(M.indices, minlength=M.shape[1]).astype(np.float64)
                pairs += counts @ counts / 2
            else:
                flops += float(n) ** 2 * M.shape[1]
        h_nnz = np.diff(H.indptr) if is_sparse(H) else np.full(n, H.shape[1])
        kron += float(np.diff(D.indptr).astype(np.float64) @ h_nnz)
    exact = _T_FLOP * flops + _T_PAIR * pairs + _T_N2 * len(factors) * float(n) ** 2
    return exact, AUTO_CG_ITERS * _T_KRON * kron


def _gram_diagonal(factors):
    """diag(J J^T)_i = sum_l ||D_l[i]||^2 ||H_{l-1}[i]||^2, O(nnz)."""
    diag = 0.0
    for D, H in factors:
        dn = np.asarray(D.multiply(D).sum(axis=1)).ravel()
        hn = (np.asarray(H.multiply(H).sum(axis=1)).ravel() if is_sparse(H)
              else np.einsum("ij,ij->i", H, H))
        diag = diag + dn * hn
    return diag


def _as_csr_index_pair(M):
    """(data, indices, indptr) with one shared int32/int64 index dtype, for the kernels."""
    M = M if is_sparse(M) else sp.csr_array(M)
    return (np.ascontiguousarray(M.data, dtype=np.float64), *_csr_index_arrays(M))


class _KronOperator:
    """v -> J J^T v without forming J or J J^T (see module docstring)."""

    def __init__(self, factors, n, n_threads):
        self.n = n
        self.n_threads = n_threads
        self.layers = []
        for D, H in factors:
            Dc = sp.csc_array(D)
            Dc.sort_indices()
            Dc = _as_csr_index_pair(sp.csr_array((Dc.data, Dc.indices, Dc.indptr),
                                                 shape=(D.shape[1], n)))
            Dp = _as_csr_index_pair(D)
            Hp = _as_csr_index_pair(H)
            if len({Dc[1].dtype, Dp[1].dtype, Hp[1].dtype}) > 1:
                Dc, Dp, Hp = ((x[0], x[1].astype(np.int64), x[2].astype(np.int64))
                              for x in (Dc, Dp, Hp))
            self.layers.append((Dc, Dp, Hp, (D.shape[1], H.shape[1])))
        # Threads pay only beyond ~1e5 multiply-adds per product (measured).
        work = sum(int(np.dot(np.diff(Dp[2]), np.diff(Hp[2]))) for _, Dp, Hp, _ in self.layers)
        if work < _PARALLEL_MIN_WORK:
            self.n_threads = n_threads = 1
        d_max = max(shape[1] for *_, shape in self.layers)
        self._w = np.zeros((n_threads, d_max))
        self._out = np.zeros((n_threads, n))

    def rmatvec(self, v):
        """J^T v as a list of dense (m_l, d_l) arrays."""
        v = np.ascontiguousarray(v, dtype=np.float64)
        out = []
        for _, Dp, Hp, shape in self.layers:
            W = np.zeros(shape)
            _sketch.kron_rmatvec(*Dp, *Hp, v, W)
            out.append(W)
        return out

    def gram_matvec(self, v):
        """J J^T v."""
        v = np.ascontiguousarray(v, dtype=np.float64)
        self._out.fill(0.0)
        for Dc, _, Hp, _ in self.layers:
            _sketch.kron_gram_matvec(Dc[2], Dc[1], Dc[0], *Hp, v, self._w, self._out,
                                     self.n_threads)
        return self._out.sum(axis=0)


def jacobian_rmatvec(factors, v):
    """J^T v per layer: [D_l^T diag(v) H_{l-1}], dense (m_l, d_l) arrays.

    With v = alpha this is minus the Gauss-Newton weight step.
    """
    factors, n = _check_factors(factors)
    v = as_float_array(v, "v", dtype=np.float64, shape=(n,))
    return _KronOperator(factors, n, 1).rmatvec(v)


def jacobian_gram_matvec(factors, v, *, n_threads=None):
    """J J^T v, matrix-free (O(sum_l nnz(D_l[i]) nnz(H_{l-1}[i])) per sample)."""
    factors, n = _check_factors(factors)
    v = as_float_array(v, "v", dtype=np.float64, shape=(n,))
    return _KronOperator(factors, n, check_n_threads(n_threads)).gram_matvec(v)


def _tensor_sketch(factors, n, s, rng, n_threads):
    """Z = sum_l TensorSketch_l(D_l, H_{l-1}): (n, s), E[Z Z^T] = J J^T."""
    Z = np.zeros((n, s))
    for D, H in factors:
        ts = TensorSketch((D.shape[1], H.shape[1]), s, random_state=rng, n_threads=n_threads)
        Z += ts.transform(D, H)
    return Z


class _SketchPreconditioner:
    """v -> (Z Z^T + lambda I)^{-1} v."""

    def __init__(self, Z, damping):
        n, s = Z.shape
        if s < n and damping > 0.0:
            self.kind = "woodbury"
            self.Z = Z
            self.damping = damping
            C = Z.T @ Z
            C[np.diag_indices_from(C)] += damping
            self.chol = scipy.linalg.cho_factor(C, lower=True, check_finite=False)
        else:
            self.kind = "cholesky"
            P = Z @ Z.T
            P[np.diag_indices_from(P)] += damping
            self.chol = scipy.linalg.cho_factor(P, lower=True, check_finite=False)

    def __call__(self, v):
        if self.kind == "woodbury":
            t = scipy.linalg.cho_solve(self.chol, self.Z.T @ v, check_finite=False)
            return (v - self.Z @ t) / self.damping
        return scipy.linalg.cho_solve(self.chol, v, check_finite=False)


def _pcg(matvec, precond, b, *, tol, max_iter):
    """Preconditioned CG from 0; stops when ||b - A x|| <= tol ||b||."""
    x = np.zeros_like(b)
    bnorm = np.linalg.norm(b)
    hist = [1.0]
    if bnorm == 0.0:
        return x, 0, [0.0], True
    r = b.copy()
    z = precond(r)
    p = z.copy()
    rz = r @ z
    for it in range(1, max_iter + 1):
        q = matvec(p)
        pq = p @ q
        if pq <= 0.0:
            break
        a = rz / pq
        x += a * p
        r -= a * q
        res = np.linalg.norm(r) / bnorm
        hist.append(res)
        if res <= tol:
            return x, it, hist, True
        z = precond(r)
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, len(hist) - 1, hist, False


def solve_gauss_newton(factors, residual, *, damping, method="auto", sketch_size=None,
                       tol=1e-10, max_iter=None, random_state=None, n_threads=None):
    """Solve (J J^T + damping I) alpha = residual for a Kronecker-row Jacobian.

    Parameters
    ----------
    factors : list of (D_l, H_{l-1}) pairs
        D_l of shape (n, m_l), scipy.sparse (CSR preferred) or dense; H_{l-1}
        of shape (n, d_l), dense or scipy.sparse.  Row i of the Jacobian
        block of layer l is D_l[i] (x) H_{l-1}[i] (index r * d_l + c, i.e.
        row-major vec of the (m_l, d_l) weight matrix).
    residual : array-like of shape (n,)
        f - y (or any right-hand side).
    damping : float >= 0
        lambda (Levenberg-Marquardt damping).  0 is allowed when J J^T is
        positive definite.
    method : {"auto", "exact", "sketched", "jacobi"}, default="auto"
        "auto": exact when n <= AUTO_EXACT_MIN_N (1024), else the faster of
        exact and jacobi by a cost model fitted on this project's
        measurements, assuming a pessimistic 50 CG iterations (exact up to
        n ~ 8000 at 1% active, and at any n that fits in memory at 5%).
        "jacobi": matrix-free CG preconditioned by the exact diagonal of
        J J^T (O(nnz) to build): no sketch, good when J J^T is well
        conditioned, as it is for wide sparse layers at initialisation
        (measured cond ~2-3 on random factors).
    sketch_size : int, default=None
        Sketch dimension s for "sketched" (None: 4 n; 2 n needed ~60 CG
        iterations at 1e-10, 4 n ~30, 8 n ~22 on random sparse factors).
    tol : float, default=1e-10
        Relative residual ||r - (J J^T + lambda I) alpha|| / ||r|| at which CG
        stops ("sketched", "jacobi"; "exact" is a direct solve).
    max_iter : int, default=None
        CG iteration limit (None: 200).
    random_state : None, int, SeedSequence or Generator
        Seeds the TensorSketches.
    n_threads : int, default=None
        Threads for the sketching and product kernels.

    Returns
    -------
    alpha : ndarray of shape (n,), float64
    info : dict
        ``method``, ``iterations`` (0 for exact), ``residual_norms``
        (relative, per CG iteration), ``converged``, ``sketch_size``,
        ``preconditioner`` ("woodbury", "cholesky" or "jacobi"),
        ``auto_estimate`` (predicted (exact, jacobi) seconds when "auto"
        had to choose, else None), and timings
        ``time_gram``, ``time_factor``, ``time_sketch``, ``time_iterations``.

    Raises
    ------
    ValueError
        Bad shapes, non-finite input, unknown method, negative damping, or a
        Gram plus damping that is not positive definite (increase damping).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    factors, n = _check_factors(factors)
    residual = as_float_array(residual, "residual", dtype=np.float64, shape=(n,))
    damping = check_float(damping, "damping", minimum=0.0)
    tol = check_float(tol, "tol", minimum=0.0, below=1.0)
    s = check_int(sketch_size, "sketch_size", minimum=1, allow_none=True)
    max_iter = check_int(max_iter, "max_iter", minimum=1, allow_none=True)
    max_iter = 200 if max_iter is None else max_iter
    threads = check_n_threads(n_threads)
    estimate = None
    if method == "auto":
        method = "exact"
        if n > AUTO_EXACT_MIN_N:
            estimate = _estimate_seconds(factors, n)
            method = "exact" if estimate[0] <= estimate[1] else "jacobi"

    info = {"method": method, "iterations": 0, "residual_norms": [], "converged": True,
            "sketch_size": None, "preconditioner": None, "time_gram": 0.0,
            "time_factor": 0.0, "time_sketch": 0.0, "time_iterations": 0.0,
            "auto_estimate": estimate}
    if method == "exact":
        t0 = time.perf_counter()
        G = _gram_lower(factors, n, threads)  # cho_factor(lower=True) reads only this
        G[np.diag_indices_from(G)] += damping
        t1 = time.perf_counter()
        try:
            chol = scipy.linalg.cho_factor(G, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            raise ValueError(
                "J J^T + damping I is not positive definite (J J^T is singular); "
                f"increase damping (got {damping:g})"
            ) from None
        alpha = scipy.linalg.cho_solve(chol, residual, check_finite=False)
        t2 = time.perf_counter()
        info.update(time_gram=t1 - t0, time_factor=t2 - t1)
        return alpha, info

    t0 = time.perf_counter()
    if method == "jacobi":
        diag = _gram_diagonal(factors) + damping
        if not (diag > 0.0).all():
            raise ValueError(
                "J J^T + damping I has a zero diagonal entry (a sample with a zero "
                f"Jacobian row); increase damping (got {damping:g})"
            )
        kind = "jacobi"
        t1 = t2 = time.perf_counter()

        def precond(v):
            return v / diag
    else:
        s = 4 * n if s is None else s
        rng = check_random_state(random_state)
        Z = _tensor_sketch(factors, n, s, rng, threads)
        t1 = time.perf_counter()
        try:
            precond = _SketchPreconditioner(Z, damping)
        except np.linalg.LinAlgError:
            raise ValueError(
                "the sketched preconditioner Z Z^T + damping I is singular; "
                f"increase damping (got {damping:g}) or sketch_size (got {s})"
            ) from None
        kind = precond.kind
        t2 = time.perf_counter()
    op = _KronOperator(factors, n, threads)

    def matvec(v):
        out = op.gram_matvec(v)
        out += damping * v
        return out

    alpha, itn, hist, converged = _pcg(matvec, precond, residual, tol=tol, max_iter=max_iter)
    t3 = time.perf_counter()
    info.update(iterations=itn, residual_norms=hist, converged=converged,
                sketch_size=s if method == "sketched" else None, preconditioner=kind, time_sketch=t1 - t0, time_factor=t2 - t1,
                time_iterations=t3 - t2)
    return alpha, info
