"""A wide shifted-ReLU network trained in sub-quadratic time per iteration.

``SparseMLP`` is the estimator; the maths runs in one of two interchangeable
"nets" holding the same parameters:

* ``_SparseNet`` -- the compiled kernels of ``_sparse_mlp.pyx``: per-sample
  active sets in CSR, the forward gathers only the active input rows of the
  transposed weights, the backward touches only the active k_in x k_out
  blocks, and the update is the eager sum of sparse outer products.
* ``_DenseNet`` -- the same maths with dense numpy BLAS (the reference).

Both expose ``forward(X) -> cache``, ``last_hidden(cache)``, ``hidden``,
``deltas(cache, E, head)``, ``update(cache, deltas, lr)`` and
``backward_update(cache, E, head, lr)`` (the two fused; what training
calls), so an optimiser is written once.  Weights are stored as ``coefs_[l]`` of shape (d_in, d_out)
(scikit-learn's layout; the transpose of ``W_l``) by both.
"""

import json
import math
import numbers
import time

import numpy as np
from scipy import sparse
from scipy.linalg import blas

from . import _sparse_mlp
from ._gn_optimizer import GN_SOLVERS, GaussNewtonState
from ._validation import (
    as_float_array,
    check_int,
    check_n_threads,
    check_random_state,
    resolve_float_dtype,
    to_float,
)
from .sparsify import RULE_FIXED, RULE_RELATIVE, RULE_TOPK, init_scale, resolve_sparsity

__all__ = ["SparseMLP"]

_FORMAT_VERSION = 1
_TASKS = ("regression", "classification")
_BACKENDS = ("sparse", "dense")
_OPTIMIZERS = ("gd", "sgd", "gauss-newton")
_THRESHOLDS = ("relative", "fixed")
_PREDICT_CHUNK = 256
_LR_SAMPLES = 256
# Kernel calls with fewer multiply-adds than this run on one thread.
_PARALLEL_WORK = 1 << 20
# Default step = _LR_FACTOR / (largest curvature of the loss at init).  At
# practical widths the tangent kernel moves during training (this is not the
# lazy regime) and steps near 1/lambda_max oscillate or diverge; a quarter of
# it converged on every setting tried on the default task (n = 32; m = 2048
# with p = 0.01, 0.03, 0.1 and sqrt-log; sqrt-log at m = 8192 and 16384 reached
# MSE 1e-10 and 1e-8 in 150 and 100 steps; top-k at m = 256).
_LR_FACTOR = 0.25


class _LayerRule:
    """Threshold rule shared by every layer: ``rule``, ``b = tau*s``, ``k``, ``rel_coef``."""

    def __init__(self, rule, b, k, dtype):
        self.rule = rule
        self.b = dtype.type(b)
        self.k = 0 if k is None else int(k)
        # Backward extra term of the norm-relative rule: d t_i / d h = b h / ||h||.
        self.rel_coef = dtype.type(b if rule == RULE_RELATIVE else 0.0)


def _full_pattern(X):
    """A dense batch as a CSR triple with every entry stored."""
    n, d = X.shape
    indptr = np.arange(0, (n + 1) * d, d, dtype=np.intp)
    # np.tile, not a broadcast reshape: with d = 1 the reshape is a stride-0
    # view, which the kernels' contiguous memoryviews reject.
    indices = np.tile(np.arange(d, dtype=np.int32), n)
    return indptr, indices, X.reshape(-1)


class _SparseNet:
    """The compiled sparse backend (see the module docstring)."""

    def __init__(self, coefs, rule, n_threads):
        self.coefs = coefs
        self.rule = rule
        self.n_threads = n_threads
        self.dtype = coefs[0].dtype

    def _threads(self, work):
        # A parallel region costs tens of microseconds (more on a busy
        # machine): small calls run on one thread.
        return self.n_threads if work >= _PARALLEL_WORK else 1

    def forward(self, X):
        r = self.rule
        # The dense input goes through the same kernel with every entry
        # "active" (n d m work, like a GEMM, but on our threads: a BLAS call
        # here would start its own thread pool next to OpenMP's).
        indptr, indices, data = x_pattern = _full_pattern(X)
        H, all_norms = [], []
        for W in self.coefs:
            norms = _sparse_mlp.row_norms(indptr, data)
            nt = self._threads(len(indices) * W.shape[1])
            indptr, indices, data, _ = _sparse_mlp.sparse_forward(
                W, indptr, indices, data, r.rule, r.b, norms, r.k, nt
            )
            H.append((indptr, indices, data))
            all_norms.append(norms)
        return {"X": X, "X_pattern": x_pattern, "H": H, "norms": all_norms}

    def last_hidden(self, cache):
        return self.hidden(cache, len(self.coefs))

    def hidden(self, cache, layer):
        """``H_layer`` as a csr_array (layer 0 is the dense input)."""
        if layer == 0:
            return cache["X"]
        indptr, indices, data = cache["H"][layer - 1]
        return sparse.csr_array(
            (data, indices, indptr), shape=(len(indptr) - 1, self.coefs[layer - 1].shape[1])
        )

    def _output_delta(self, cache, E, head):
        """``dL/dz_L = (E @ head.T)`` on the last active set."""
        indptr, indices, _ = cache["H"][-1]
        rows = _sparse_mlp.sample_of_positions(indptr)
        if E.shape[1] == 1:
            delta = E[rows, 0] * head[indices, 0]
        else:
            delta = np.einsum("pc,pc->p", E[rows], head[indices])
        return np.ascontiguousarray(delta, dtype=self.dtype)

    def deltas(self, cache, E, head):
        """``dL/dz_l`` on each layer's active set (aligned with ``H_l.data``), l = 1..L."""
        delta = self._output_delta(cache, E, head)
        out = [delta]
        for layer in range(len(self.coefs) - 1, 0, -1):
            o_indptr, o_indices, _ = cache["H"][layer]
            i_indptr, i_indices, i_data = cache["H"][layer - 1]
            delta = _sparse_mlp.sparse_backward(
                self.coefs[layer], o_indptr, o_indices, delta,
                i_indptr, i_indices, i_data, cache["norms"][layer],
                self.rule.rel_coef, self.n_threads,
            )
            out.append(delta)
        return out[::-1]

    def backward_update(self, cache, E, head, lr):
        """Backward and eager sparse step fused per layer (``_sparse_mlp.backward_update``).

        Layer ``l``'s weight rows are visited once: the gathers that produce
        ``delta_{l-1}`` read the old weights, then the same rows are updated
        while in cache.  Same result as ``deltas`` followed by ``update``.
        """
        lr = self.dtype.type(lr)
        delta = self._output_delta(cache, E, head)
        for layer in range(len(self.coefs) - 1, -1, -1):
            W = self.coefs[layer]
            o_indptr, o_indices, _ = cache["H"][layer]
            if layer == 0:
                i_indptr, i_indices, i_data = cache["X_pattern"]
                norms = cache["norms"][0]
            else:
                i_indptr, i_indices, i_data = cache["H"][layer - 1]
                norms = cache["norms"][layer]
            col_ptr, col_pos = _sparse_mlp.invert_pattern(i_indptr, i_indices, W.shape[0])
            row_of = _sparse_mlp.sample_of_positions(i_indptr)
            n = len(i_indptr) - 1
            nt = self._threads(len(i_indices) * len(o_indices) // max(n, 1))
            delta = _sparse_mlp.backward_update(
                W, o_indptr, o_indices, delta, i_indptr, i_data, norms, col_ptr, col_pos,
                row_of, self.rule.rel_coef, lr, layer > 0, nt,
            )

    def update(self, cache, deltas, lr):
        """Eager sparse step on every layer (after all deltas were computed)."""
        lr = self.dtype.type(lr)
        for layer, W in enumerate(self.coefs):
            o_indptr, o_indices, _ = cache["H"][layer]
            if layer == 0:
                i_indptr, i_indices, i_data = cache["X_pattern"]
            else:
                i_indptr, i_indices, i_data = cache["H"][layer - 1]
            _sparse_mlp.sparse_update(
                W, o_indptr, o_indices, deltas[layer], i_indptr, i_indices, i_data,
                lr, self.n_threads,
            )

    def delta_matrix(self, cache, deltas, layer):
        """``deltas[layer - 1]`` as a csr_array on ``H_layer``'s pattern."""
        indptr, indices, _ = cache["H"][layer - 1]
        return sparse.csr_array(
            (deltas[layer - 1], indices, indptr),
            shape=(len(indptr) - 1, self.coefs[layer - 1].shape[1]),
        )

    @staticmethod
    def active_fraction(cache, width):
        n = len(cache["X"])
        return float(np.mean([h[0][-1] for h in cache["H"]])) / (n * width)


class _DenseNet:
    """The dense numpy reference: the same maths with BLAS matrix products.

    Three matrix products per layer and iteration (forward, backward, and
    the update fused into one in-place GEMM), as a good dense
    implementation would do: the baseline the sparse kernels must beat.
    """

    def __init__(self, coefs, rule, n_threads=None):
        self.coefs = coefs
        self.rule = rule
        self.dtype = coefs[0].dtype

    def _threshold(self, Z, norms):
        r = self.rule
        if r.rule == RULE_FIXED:
            return np.full(Z.shape[0], r.b, dtype=self.dtype)
        if r.rule == RULE_RELATIVE:
            return r.b * norms
        m = Z.shape[1]
        return np.partition(Z, m - r.k - 1, axis=1)[:, m - r.k - 1]

    def forward(self, X):
        H = [X]
        all_norms = []
        for W in self.coefs:
            norms = np.linalg.norm(H[-1], axis=1).astype(self.dtype, copy=False)
            Z = H[-1] @ W
            t = self._threshold(Z, norms)
            H.append(np.maximum(Z - t[:, None], 0))
            all_norms.append(norms)
        return {"X": X, "H": H, "norms": all_norms}

    def last_hidden(self, cache):
        return cache["H"][-1]

    def hidden(self, cache, layer):
        return cache["H"][layer]

    def deltas(self, cache, E, head):
        H, norms = cache["H"], cache["norms"]
        G = (E @ head.T).astype(self.dtype, copy=False)
        delta = G * (H[-1] > 0)
        out = [delta]
        for layer in range(len(self.coefs) - 1, 0, -1):
            G = delta @ self.coefs[layer].T
            if self.rule.rel_coef != 0:
                nrm = norms[layer]
                scale = np.divide(
                    delta.sum(axis=1), nrm, out=np.zeros_like(nrm), where=nrm > 0
                )
                G -= self.rule.rel_coef * scale[:, None] * H[layer]
            delta = G * (H[layer] > 0)
            out.append(delta)
        return out[::-1]

    def backward_update(self, cache, E, head, lr):
        self.update(cache, self.deltas(cache, E, head), lr)

    def gradients(self, cache, deltas):
        """``dL/dcoefs_[l] = H_{l-1}^T delta_l`` (dense)."""
        return [cache["H"][layer].T @ deltas[layer] for layer in range(len(self.coefs))]

    def update(self, cache, deltas, lr):
        """``W -= lr * H^T delta`` as one in-place GEMM per layer (no gradient array)."""
        for layer, W in enumerate(self.coefs):
            H = np.ascontiguousarray(cache["H"][layer])
            D = np.ascontiguousarray(deltas[layer])
            gemm = blas.get_blas_funcs("gemm", (W,))
            # Fortran view: W^T (d_out x d_in) = W^T - lr * D^T H.
            out = gemm(-lr, D.T, H.T, beta=1.0, c=W.T, trans_b=1, overwrite_c=1)
            if not np.shares_memory(out, W):  # pragma: no cover - BLAS copied c
                W[...] = out.T

    def delta_matrix(self, cache, deltas, layer):
        D = deltas[layer - 1]
        active = cache["H"][layer] > 0
        # Keep the active pattern (an active neuron may carry an exact zero).
        rows, cols = np.nonzero(active)
        return sparse.csr_array((D[rows, cols], (rows, cols)), shape=D.shape)

    @staticmethod
    def active_fraction(cache, width):
        return float(np.mean([np.count_nonzero(h) for h in cache["H"][1:]])) / (
            len(cache["X"]) * width
        )


_NETS = {"sparse": _SparseNet, "dense": _DenseNet}


class SparseMLP:
    """Wide multi-layer shifted-ReLU network trained with sparse kernels.

    The model is ``h_0 = x``, ``z_l = W_l h_{l-1}``,
    ``h_l = max(z_l - t_l, 0)`` for ``l = 1..depth`` (all of width ``m``),
    and the output ``f(x) = a^T h_L`` with ``a`` fixed random signs divided
    by ``sqrt(m)`` for regression (as in the theory), or trainable logits
    ``h_L^T A + c`` for classification.  Only about ``k = p m`` neurons of
    each layer fire per sample, so with the sparse backend an iteration on
    ``n`` samples costs ``O(n (d m + (L-1) k m + L k^2))`` instead of the
    dense ``O(n L m^2)``: sub-quadratic in ``m`` whenever ``k = o(m)``, as
    with the default ``"sqrt-log"`` schedule.

    Parameters
    ----------
    width : int, default=1024
        Hidden width ``m``.
    depth : int, default=3
        Number of hidden layers ``L`` (one ``m x d`` and ``L - 1`` ``m x m``
        weight matrices).
    task : {"regression", "classification"}, default="regression"
        Squared loss ``0.5 * mean((f - y)^2)`` with a fixed output vector,
        or softmax cross-entropy with a trainable head.
    backend : {"sparse", "dense"}, default="sparse"
        Compiled sparse kernels, or the dense numpy reference (same maths).
    optimizer : {"gd", "sgd", "gauss-newton"}, default="gd"
        Full-batch gradient descent, mini-batch SGD, or full-batch damped
        Gauss-Newton (Levenberg-Marquardt; regression only): solve
        ``(J J^T + lambda I) alpha = f - y`` on the ``n x n`` system of the
        samples and step ``dW_l = -sum_i alpha_i D_l[i] (x) H_{l-1}[i]``
        through the sparse update kernel (see Notes).
    max_iter : int, default=200
        Number of iterations (one step each; an SGD step is one mini-batch).
    learning_rate : float, optional
        Step size.  Default: ``0.25 n' / lambda_max(K)`` with ``K`` the
        neural tangent kernel Gram matrix at initialisation on ``n' <= 256``
        training points: a quarter of the inverse of the largest curvature
        of the mean squared loss at initialisation (stored in
        ``learning_rate_``).  The quarter is a safety margin: the kernel
        moves during training at practical widths, and steps close to
        ``1 / lambda_max`` oscillate.  For classification the kernel
        includes the head and bias terms, and the softmax curvature at
        initialisation is ``1 / n_classes``.  For "sgd" regression it is
        multiplied by ``0.5 sqrt(batch_size / n')`` against the mini-batch
        noise; SGD classification keeps the full-batch step (the softmax
        curvature only falls during training; on the default task the
        reduced step reached 48-89% training accuracy in 300 steps, the full
        one 99-100%, widths 256-4096, batches 8 and 32).
    batch_size : int, optional
        Mini-batch size for "sgd" (default ``min(32, n_samples)``); must be
        None for "gd" and "gauss-newton".
    damping : float, default=1e-6
        Only used by "gauss-newton": the smallest (and initial) relative
        Levenberg-Marquardt damping ``mu``; the system is damped by
        ``lambda = mu * mean(diag(J J^T))``, so the value does not depend on
        the scale of the data or on the width.  ``mu`` grows when a step
        fails to decrease the loss and shrinks back to ``damping`` while
        the linear model predicts the decrease well.  Must be > 0.
    gn_solver : {"auto", "exact", "sketched", "jacobi"}, default="auto"
        Only used by "gauss-newton": the solver of the ``n x n`` damped
        system (``subquad_ds._gauss_newton.solve_gauss_newton``).
        "exact": Gram ``J J^T = sum_l (D_l D_l^T) o (H_{l-1} H_{l-1}^T)``
        from the sparse factors and Cholesky, ``O(n^2)`` memory.
        "sketched": TensorSketch preconditioner and matrix-free CG, no
        ``n x n`` matrix.  "jacobi": matrix-free CG with the exact diagonal
        as preconditioner.  "auto": exact up to 1024 samples, beyond that
        the faster of exact and "jacobi" by a fitted cost model.
    threshold : {"relative", "fixed"}, default="relative"
        ``"relative"``: per-sample threshold ``t_i = tau s ||h_{l-1,i}||``.
        ``"fixed"``: the paper's ``t = tau s``.  The relative rule is the
        default because the fixed one is unstable through depth at
        practical widths: per-sample norm noise is amplified from layer to
        layer (gain 2.5-4.7 per layer measured for p = 0.1-0.01), many samples
        end up with no active neuron, the tangent kernel is singular at
        initialisation and gradient descent stalls.  The relative rule is
        scale-equivariant, so every sample keeps an active fraction near
        ``p`` at every depth.  Its backward pass gains the term
        ``-tau s (sum_r delta_r) h_{l-1} / ||h_{l-1}||`` (the threshold
        depends on ``h_{l-1}``).  Must stay "relative" with an int sparsity.
    sparsity : "sqrt-log", float or int, default="sqrt-log"
        ``"sqrt-log"``: ``tau = sqrt(0.4 ln m)``, active fraction
        ``Phibar(tau)`` (about 4.4% at m=1024 and 2.4% at m=16384).  A float
        ``p``: fixed active fraction.  An int ``k``: exactly the ``k``
        largest pre-activations of each sample fire (threshold = the
        (k+1)-th largest); the backward pass treats that threshold as a
        constant (straight-through of the selection).
    dtype : {np.float32, np.float64}, default=np.float32
        Working precision of the parameters and the kernels.
    random_state : int, Generator or None, default=None
        Seeds the initial weights and the SGD shuffles.
    n_threads : int, optional
        OpenMP threads of the sparse kernels (None: all cores).  The kernels
        are memory-bound: on a machine whose cores are busy with other work
        a second thread gained nothing and, with OpenMP's default spin-wait,
        could be several times slower; use 1 there.  The dense backend uses
        numpy's BLAS threads (limit them with threadpoolctl).
    verbose : bool or int, default=0
        Print the loss every ``max_iter // 10`` iterations (True) or every
        ``verbose`` iterations (an int > 1).
    callback : callable, optional
        ``callback(iteration, loss)`` called after every iteration (for a
        progress bar); training stops early if it returns True.

    Attributes
    ----------
    coefs_ : list of ndarray
        ``coefs_[l]`` of shape (d_in, width), the transposed ``W_{l+1}``.
    head_ : ndarray of shape (width, n_outputs)
        Output weights: ``a`` (fixed) for regression, ``A`` for classification.
    intercept_ : ndarray of shape (n_outputs,)
        Output bias (zero and fixed for regression).
    classes_ : ndarray
        Class labels (classification only).
    learning_rate_ : float
        Step size used.
    tau_, scale_, active_fraction_, active_count_ : float, float, float, int or None
        The sparsity schedule: threshold ``tau``, weight scale ``s``,
        expected active fraction ``p`` and the top-k count.
    history_ : dict of lists
        One entry per iteration: ``"loss"`` (the training objective of that
        iteration's batch, before its step), ``"time"`` (seconds spent in
        the iteration) and ``"active_fraction"`` (mean fraction of active
        neurons per hidden layer); with "gauss-newton" also ``"damping"``
        (the relative damping ``mu`` of the iteration's last trial step).
    n_iter_ : int
        Iterations run.

    Notes
    -----
    Cost.  Initialisation is ``O(L m^2)`` (drawing the weights).  With the
    sparse backend an iteration costs ``O(n d m)`` for the first layer,
    ``O(n k m)`` per hidden layer for the forward gather (memory-bound: every
    pre-activation is still computed, reading ``k`` rows of ``m`` weights)
    and ``O(n k^2)`` per layer for the backward block and the eager update.
    It pays when ``k`` is a small fraction of ``m`` (measured: 1x at
    p = 0.1, about 4x at 0.03, 14-27x at 0.01 over dense BLAS per
    iteration); at a fixed ``p`` the speed-up is only a constant.  The
    paper's lazy low-rank updates and fast rectangular matrix multiplication
    are not used: with BLAS (which lacks fast rectangular products) eager
    sparse updates are faster in practice.

    Thread-safety: ``fit`` mutates the model; ``predict``, ``score`` and
    ``decision_function`` only read it and may run concurrently (the
    kernels release the GIL).

    Gauss-Newton hook.  ``_backward(self._forward(X), E, lr)`` accepts an
    arbitrary per-sample output error ``E`` (``E = residual / n`` is the MSE
    gradient), and ``_jacobian_factors(X)`` returns the Kronecker factors of
    the Jacobian rows.

    Gauss-Newton (``optimizer="gauss-newton"``, regression).  Each
    iteration solves ``(J J^T + lambda I) alpha = f(X) - y`` on the
    ``n x n`` sample system (``J`` is never formed: its rows are
    ``D_l[i] (x) H_{l-1}[i]``), takes the minimum-norm step
    ``dW_l = -sum_i alpha_i D_l[i] (x) H_{l-1}[i]`` through the sparse update
    kernel, and accepts it only if the loss decreases (Levenberg-Marquardt:
    a rejected step is undone and retried with a larger ``lambda``; see
    ``subquad_ds._gn_optimizer``).  Cost per accepted iteration: one
    forward pass (the trial pass, reused by the next iteration), one
    backward pass, the solve (exact: ``O(n^2)`` sparse Gram products and an
    ``O(n^3)`` Cholesky) and one sparse update, so about a gradient step
    plus the solve.  It pays when a few
    iterations to a tiny loss matter more than ``O(n^3)``: on the default
    task (n = 32, m = 2048) it reaches MSE 1e-10 in 6-7 iterations where
    gradient descent needs about 190 (bench/bench_gauss_newton.py).
    Training samples with no active neuron (the fixed threshold rule) have
    a zero Jacobian row and keep their residual.  With an int sparsity
    (top-k) the Jacobian is the straight-through one (the selection held
    constant), so convergence is only linear.

    Examples
    --------
    >>> from subquad_ds import SparseMLP
    >>> from subquad_ds.datasets import load_default_task
    >>> X, y = load_default_task(n_samples=32)
    >>> model = SparseMLP(width=256, max_iter=50, random_state=0).fit(X, y)
    >>> len(model.history_["loss"])
    50
    >>> model.history_["loss"][-1] < model.history_["loss"][0]
    True
    """

    def __init__(self, *, width=1024, depth=3, task="regression", backend="sparse",
                 optimizer="gd", max_iter=200, learning_rate=None, batch_size=None,
                 damping=1e-6, gn_solver="auto",
                 threshold="relative", sparsity="sqrt-log", dtype=np.float32,
                 random_state=None, n_threads=None, verbose=0, callback=None):
        self.width = width
        self.depth = depth
        self.task = task
        self.backend = backend
        self.optimizer = optimizer
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.damping = damping
        self.gn_solver = gn_solver
        self.threshold = threshold
        self.sparsity = sparsity
        self.dtype = dtype
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose
        self.callback = callback

    # -- scikit-learn estimator protocol ---------------------------------
    _PARAMS = ("width", "depth", "task", "backend", "optimizer", "max_iter",
               "learning_rate", "batch_size", "damping", "gn_solver", "threshold",
               "sparsity", "dtype", "random_state", "n_threads", "verbose", "callback")

    def get_params(self, deep=True):
        """Constructor parameters as a dict (scikit-learn protocol)."""
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params):
        """Set constructor parameters (scikit-learn protocol); returns self."""
        for name, value in params.items():
            if name not in self._PARAMS:
                raise ValueError(f"invalid parameter {name!r} for SparseMLP")
            setattr(self, name, value)
        return self

    def __repr__(self):
        return (f"SparseMLP(width={self.width!r}, depth={self.depth!r}, task={self.task!r}, "
                f"backend={self.backend!r}, optimizer={self.optimizer!r})")

    # -- validation -------------------------------------------------------
    def _check_params(self):
        check_int(self.width, "width", minimum=2)
        check_int(self.depth, "depth", minimum=1)
        check_int(self.max_iter, "max_iter", minimum=1)
        for name, value, allowed in (("task", self.task, _TASKS),
                                     ("backend", self.backend, _BACKENDS),
                                     ("optimizer", self.optimizer, _OPTIMIZERS),
                                     ("threshold", self.threshold, _THRESHOLDS)):
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
        if self.learning_rate is not None:
            lr = self.learning_rate
            if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, numbers.Real):
                raise TypeError(f"learning_rate must be a positive float or None; got {lr!r}")
            if not (math.isfinite(to_float(lr)) and lr > 0):
                raise ValueError(f"learning_rate must be a positive finite float; got {lr!r}")
        if self.optimizer != "sgd" and self.batch_size is not None:
            raise ValueError(
                f"batch_size is only used by optimizer='sgd'; leave it None for {self.optimizer!r}"
            )
        if self.optimizer == "gauss-newton":
            self._check_gauss_newton_params()
        check_int(self.batch_size, "batch_size", minimum=1, allow_none=True)
        if not isinstance(self.verbose, (bool, np.bool_)):
            check_int(self.verbose, "verbose", minimum=0)
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"callback must be callable or None; got {self.callback!r}")
        tau, p, k = resolve_sparsity(self.width, self.sparsity)
        if k is not None and self.threshold != "relative":
            raise ValueError(
                "an int sparsity selects the top-k rule; threshold='fixed' cannot be combined with it"
            )
        dtype = resolve_float_dtype(None, self.dtype)
        n_threads = check_n_threads(self.n_threads)
        return tau, p, k, dtype, n_threads

    def _check_X(self, X, reset, dtype=None):
        dtype = self._dtype if dtype is None else dtype
        X = as_float_array(X, "X", dtype=dtype, ndim=2, allow_empty=False)
        if not reset and X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features; the model was fitted with {self.n_features_in_}"
            )
        return X

    def _check_fitted(self):
        if not hasattr(self, "coefs_"):
            raise ValueError("this SparseMLP is not fitted yet; call fit(X, y) first")

    # -- model construction -----------------------------------------------
    def _build_net(self):
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}; got {self.backend!r}")
        rule = RULE_TOPK if self.active_count_ is not None else (
            RULE_RELATIVE if self.threshold == "relative" else RULE_FIXED)
        self._rule = _LayerRule(rule, self.tau_ * self.scale_, self.active_count_, self._dtype)
        self._net = _NETS[self.backend](self.coefs_, self._rule, self._n_threads)

    def _init_params(self, n_features, n_outputs, rng):
        m, dt = self.width, self._dtype
        s = dt.type(self.scale_)
        self.coefs_ = []
        for d_in in [n_features] + [m] * (self.depth - 1):
            # Drawn in float32 for both dtypes: the same seed gives the same
            # network in float32 and float64 (and the draw is twice as fast).
            W = rng.standard_normal((d_in, m), dtype=np.float32)
            W *= np.float32(s) if dt == np.float32 else 1.0
            W = W.astype(dt, copy=False)
            if dt != np.float32:
                W *= s
            self.coefs_.append(W)
        signs = rng.integers(0, 2, size=(m, n_outputs)) * 2 - 1
        self.head_ = (signs / math.sqrt(m)).astype(dt)
        self.intercept_ = np.zeros(n_outputs, dtype=dt)

    # -- loss ---------------------------------------------------------------
    def _outputs(self, H):
        return np.asarray(H @ self.head_) + self.intercept_

    def _loss_and_error(self, out, y):
        """Objective and ``E = dL/d(out)`` of shape (n, n_outputs)."""
        n = out.shape[0]
        if self.task == "regression":
            r = out[:, 0].astype(np.float64) - y
            with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported
                loss = 0.5 * float(r @ r) / n
            return loss, (r / n).astype(self._dtype)[:, None]
        logits = out.astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -float(logp[np.arange(n), y].mean())
        E = np.exp(logp)
        E[np.arange(n), y] -= 1.0
        return loss, (E / n).astype(self._dtype)

    # -- training --------------------------------------------------------------
    def _forward(self, X):
        """Validated forward pass; returns the cache that ``_backward`` takes."""
        self._check_fitted()
        return self._net.forward(self._check_X(X, reset=False))

    def _backward(self, cache, E, lr):
        """Step ``W_l -= lr * dL/dW_l`` for an output error ``E = dL/d(out)``.

        ``E`` has shape (n,) or (n, n_outputs), one row per sample of the
        ``cache`` (from ``_forward``).  For the MSE, ``E = residual / n``; a
        Gauss-Newton step is this call with ``E = alpha`` and ``lr = 1``.
        The head is not updated here.
        """
        E = np.asarray(E, dtype=self._dtype)
        E = np.ascontiguousarray(E[:, None] if E.ndim == 1 else E)
        self._net.backward_update(cache, E, self.head_, lr)

    def _jacobian_factors(self, X, output=0):
        """Kronecker factors of the Jacobian rows of output ``output`` w.r.t. every ``W_l``.

        Returns a list over layers ``l = 1..L`` of ``(D_l, H_{l-1})``:
        ``D_l`` a csr_array (n, m) of ``df/dz_l`` per sample (unit output
        error), ``H_{l-1}`` the layer input (dense ndarray (n, d) for
        ``l = 1``, csr_array (n, m) after).  The Jacobian row of sample
        ``i`` w.r.t. ``W_l`` (m x d_in) is ``D_l[i] (x) H_{l-1}[i]``; in the
        stored layout ``coefs_[l-1] = W_l^T`` the gradient of
        ``sum_i e_i f(x_i)`` is ``H_{l-1}^T diag(e) D_l``.
        """
        self._check_fitted()
        X = self._check_X(X, reset=False)
        return self._jacobian_factors_checked(X, output)

    def _jacobian_factors_checked(self, X, output=0):
        net = self._net
        cache = net.forward(X)
        E = np.ones((X.shape[0], 1), dtype=self._dtype)
        deltas = net.deltas(cache, E, self.head_[:, [output]])
        factors = []
        for layer in range(1, self.depth + 1):
            H = net.hidden(cache, layer - 1)
            if layer > 1 and not sparse.issparse(H):
                H = sparse.csr_array(H)
            factors.append((net.delta_matrix(cache, deltas, layer), H))
        return factors

    def _default_learning_rate(self, X, rng):
        """``0.25 n' / lambda_max(K)`` with the tangent-kernel Gram ``K`` on ``n' <= 256`` points."""
        if X.shape[0] > _LR_SAMPLES:
            X = X[np.sort(rng.choice(X.shape[0], _LR_SAMPLES, replace=False))]
        K = np.zeros((X.shape[0], X.shape[0]))
        for D, H in self._jacobian_factors_checked(X):
            DD = (D @ D.T).toarray()
            HH = H @ H.T
            HH = HH.toarray() if sparse.issparse(HH) else HH
            K += DD.astype(np.float64) * HH.astype(np.float64)
        if self.task == "classification":
            HL = self._net.last_hidden(self._net.forward(X))
            HH = HL @ HL.T
            K += (HH.toarray() if sparse.issparse(HH) else HH) + 1.0
        lam = float(np.linalg.eigvalsh(K)[-1])
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(
                "cannot derive a learning rate: the tangent kernel is zero at "
                "initialisation (no active neuron); pass learning_rate explicitly"
            )
        if self.task == "classification":
            # The softmax Hessian at initialisation (uniform probabilities)
            # is (I - 11^T / C) / C: the curvature is lambda_max / (n C).
            lam /= self.head_.shape[1]
        return _LR_FACTOR * X.shape[0] / lam

    def fit(self, X, y):
        """Train on ``(X, y)`` from a fresh initialisation.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            Targets (regression) or integer labels (classification).

        Returns
        -------
        self : SparseMLP
        """
        # Everything is validated before any attribute changes, so a
        # rejected call leaves a fitted model as it was.
        tau, p, k, dtype, n_threads = self._check_params()
        X = self._check_X(X, reset=True, dtype=dtype)
        n = X.shape[0]
        if self.task == "regression":
            y = as_float_array(y, "y", dtype=np.float64, shape=(n,))
            as_float_array(y, "y", dtype=dtype)  # the loss is computed in dtype: no overflow
            n_outputs = 1
        else:
            y_arr = np.asarray(y)
            if y_arr.dtype.kind not in "iu" or y_arr.shape != (n,):
                raise ValueError(
                    f"y must be integer labels of shape ({n},); got dtype {y_arr.dtype}, "
                    f"shape {y_arr.shape}"
                )
            classes, y = np.unique(y_arr, return_inverse=True)
            if len(classes) < 2:
                raise ValueError("classification needs at least 2 classes in y")
            n_outputs = len(classes)
        batch = n if self.optimizer != "sgd" else min(self.batch_size or 32, n)
        rng = check_random_state(self.random_state)
        # Some inputs fail only once training starts (a zero tangent kernel or
        # Jacobian, a diverging loss, a raising callback): a fitted model is
        # then put back as it was.
        saved = dict(self.__dict__)
        try:
            self._dtype, self._n_threads = dtype, n_threads
            self.tau_, self.active_fraction_, self.active_count_ = tau, p, k
            self.scale_ = init_scale(self.width, tau)
            self.n_features_in_ = X.shape[1]
            if self.task == "classification":
                self.classes_ = classes
            self._init_params(X.shape[1], n_outputs, rng)
            self._build_net()
            self._gn_state = None
            if self.optimizer == "gauss-newton":
                # Unit steps: the damping sets the step length (learning_rate is None).
                self.learning_rate_ = 1.0
                self._gn_state = GaussNewtonState(self, X, y, damping=self.damping,
                                                  solver=self.gn_solver, rng=rng)
            elif self.learning_rate is not None:
                self.learning_rate_ = float(self.learning_rate)
            else:
                self.learning_rate_ = self._default_learning_rate(X, rng)
                if batch < n and self.task == "regression":
                    # Mini-batch gradient noise: smaller steps (tuned on the
                    # default task).  Classification keeps the full step: the
                    # softmax curvature is largest at initialisation and only
                    # falls as the predictions sharpen.
                    self.learning_rate_ *= 0.5 * math.sqrt(batch / min(n, _LR_SAMPLES))
            self.history_ = {"loss": [], "time": [], "active_fraction": []}
            if self.optimizer == "gauss-newton":
                self.history_["damping"] = []
            every = 0
            if self.verbose:
                every = max(1, self.max_iter // 10) if self.verbose is True or self.verbose == 1 \
                    else int(self.verbose)
            order, pos = np.arange(n), n
            self.n_iter_ = 0
            for it in range(self.max_iter):
                t0 = time.perf_counter()
                if batch == n:
                    Xb, yb = X, y
                else:
                    if pos + batch > n:
                        order, pos = rng.permutation(n), 0
                    idx = np.sort(order[pos:pos + batch])
                    pos += batch
                    Xb, yb = X[idx], y[idx]
                loss = self._step(Xb, yb)
                elapsed = time.perf_counter() - t0
                self.history_["loss"].append(loss)
                self.history_["time"].append(elapsed)
                self.history_["active_fraction"].append(self._last_active)
                self.n_iter_ = it + 1
                if every and (it % every == 0 or it == self.max_iter - 1):
                    print(f"SparseMLP iter {it:5d}  loss {loss:.6g}  {elapsed * 1e3:8.2f} ms")
                if self.callback is not None and self.callback(it, loss):
                    break
            self._gn_state = None
        except Exception:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        return self

    def _check_gauss_newton_params(self):
        if self.task != "regression":
            raise ValueError(
                "optimizer='gauss-newton' supports task='regression' only (the squared "
                "loss); use 'gd' or 'sgd' for classification"
            )
        if self.learning_rate is not None:
            raise ValueError(
                "learning_rate is not used by optimizer='gauss-newton' (the damped "
                "Gauss-Newton step has unit length; tune damping); leave it None"
            )
        mu = self.damping
        if isinstance(mu, (bool, np.bool_)) or not isinstance(mu, numbers.Real):
            raise TypeError(f"damping must be a positive float; got {mu!r}")
        if not (math.isfinite(to_float(mu)) and mu > 0):
            raise ValueError(f"damping must be a positive finite float; got {mu!r}")
        if not isinstance(self.gn_solver, str) or self.gn_solver not in GN_SOLVERS:
            raise ValueError(f"gn_solver must be one of {GN_SOLVERS}; got {self.gn_solver!r}")

    def _step(self, X, y):
        if self._gn_state is not None:
            return self._gn_state.step()
        net = self._net
        cache = net.forward(X)
        H = net.last_hidden(cache)
        loss, E = self._loss_and_error(self._outputs(H), y)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the training loss diverged ({loss}); lower learning_rate"
            )
        lr = self.learning_rate_
        if self.task == "classification":
            grad_head = np.asarray(H.T @ E)
            grad_intercept = E.sum(axis=0)
        self._backward(cache, E, lr)
        if self.task == "classification":
            self.head_ -= self._dtype.type(lr) * grad_head.astype(self._dtype, copy=False)
            self.intercept_ -= self._dtype.type(lr) * grad_intercept
        self._last_active = net.active_fraction(cache, self.width)
        return loss

    # -- inference -----------------------------------------------------------
    def _decision(self, X):
        self._check_fitted()
        X = self._check_X(X, reset=False)
        out = [self._outputs(self._net.last_hidden(self._net.forward(X[i:i + _PREDICT_CHUNK])))
               for i in range(0, X.shape[0], _PREDICT_CHUNK)]
        return np.concatenate(out, axis=0)

    def decision_function(self, X):
        """Network outputs: ``f(x)`` (regression, shape (n,)) or logits (n, n_classes)."""
        out = self._decision(X)
        return out[:, 0] if self.task == "regression" else out

    def predict(self, X):
        """Predicted values (regression) or labels from ``classes_`` (classification)."""
        out = self._decision(X)
        if self.task == "regression":
            return out[:, 0]
        return self.classes_[np.argmax(out, axis=1)]

    def predict_proba(self, X):
        """Class probabilities (classification only), shape (n, n_classes)."""
        if self.task != "classification":
            raise ValueError("predict_proba is only available for task='classification'")
        logits = self._decision(X).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        P = np.exp(logits)
        return P / P.sum(axis=1, keepdims=True)

    def score(self, X, y):
        """R^2 (regression) or accuracy (classification), as in scikit-learn."""
        pred = self.predict(X)
        if self.task == "regression":
            y = as_float_array(y, "y", dtype=np.float64)
        else:
            y = np.asarray(y)
        if y.shape != pred.shape:
            raise ValueError(f"y must have shape {pred.shape}; got shape {y.shape}")
        if self.task == "classification":
            return float(np.mean(pred == y))
        y = y.astype(np.float64)
        ss_res = float(((y - pred) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum())
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)

    # -- persistence -----------------------------------------------------------
    def save(self, path):
        """Write the fitted model to an ``.npz`` file (arrays + JSON metadata, no pickle).

        Returns the path written (numpy appends ``.npz`` when missing).
        """
        self._check_fitted()
        params = self.get_params()
        params.pop("callback")
        rs = params["random_state"]
        params["random_state"] = rs if isinstance(rs, (int, np.integer)) else None
        params["dtype"] = self._dtype.name
        sp = params["sparsity"]
        params["sparsity"] = sp if isinstance(sp, str) else (
            int(sp) if isinstance(sp, numbers.Integral) else float(sp))
        meta = {
            "format": "subquad_ds.SparseMLP", "version": _FORMAT_VERSION, "params": params,
            "tau": self.tau_, "scale": self.scale_, "active_fraction": self.active_fraction_,
            "active_count": self.active_count_, "learning_rate": self.learning_rate_,
            "n_features_in": self.n_features_in_, "n_iter": self.n_iter_,
            "history": self.history_,
        }
        arrays = {f"coef_{i}": W for i, W in enumerate(self.coefs_)}
        arrays.update(head=self.head_, intercept=self.intercept_)
        if self.task == "classification":
            arrays["classes"] = self.classes_
        path = str(path)
        np.savez(path, meta=np.array(json.dumps(meta)), **arrays)
        return path if path.endswith(".npz") else path + ".npz"

    @classmethod
    def load(cls, path, *, backend=None, n_threads=None):
        """Read a model written by :meth:`save` (optionally switching backend)."""
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as exc:  # not an .npy/.npz file (numpy tried pickle)
            raise ValueError(f"{path} is not a saved SparseMLP ({exc})") from None
        if not isinstance(data, np.lib.npyio.NpzFile) or "meta" not in data.files:
            if hasattr(data, "close"):
                data.close()
            raise ValueError(f"{path} is not a saved SparseMLP")
        with data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != "subquad_ds.SparseMLP":
                raise ValueError(f"{path} is not a saved SparseMLP")
            if meta.get("version") != _FORMAT_VERSION:
                raise ValueError(
                    f"unsupported SparseMLP file version {meta.get('version')!r}; "
                    f"this release reads version {_FORMAT_VERSION}"
                )
            params = meta["params"]
            if backend is not None:
                params["backend"] = backend
            if n_threads is not None:
                params["n_threads"] = n_threads
            model = cls(**params)
            model._dtype = resolve_float_dtype(None, params["dtype"])
            model._n_threads = check_n_threads(model.n_threads)
            model.coefs_ = [np.ascontiguousarray(data[f"coef_{i}"], dtype=model._dtype)
                            for i in range(model.depth)]
            model.head_ = np.ascontiguousarray(data["head"], dtype=model._dtype)
            model.intercept_ = np.ascontiguousarray(data["intercept"], dtype=model._dtype)
            if model.task == "classification":
                model.classes_ = data["classes"].copy()
        model.tau_, model.scale_ = meta["tau"], meta["scale"]
        model.active_fraction_, model.active_count_ = meta["active_fraction"], meta["active_count"]
        model.learning_rate_, model.n_features_in_ = meta["learning_rate"], meta["n_features_in"]
        model.n_iter_, model.history_ = meta["n_iter"], meta["history"]
        model._build_net()
        return model
