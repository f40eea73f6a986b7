"""Damped Gauss-Newton (Levenberg-Marquardt) steps for SparseMLP regression.

Private module: ``SparseMLP(optimizer="gauss-newton")`` creates one
``GaussNewtonState`` per ``fit`` and calls ``step`` once per iteration.

One iteration at weights ``theta`` on the full batch, loss
``L = 0.5 mean(r^2)`` with residual ``r = f(X) - y``:

1. Jacobian factors.  One backward pass with a unit output error gives
   ``D_l = df/dz_l`` per sample (sparse: supported on the active neurons);
   the layer inputs ``H_{l-1}`` come from the forward cache.  Row ``i`` of
   the Jacobian w.r.t. ``W_l`` is ``D_l[i] (x) H_{l-1}[i]`` (never formed).
2. Linear solve.  ``lambda = mu * mean(diag(J J^T))`` (``mu`` relative, so
   the damping does not depend on the scale of the data or the width), and
   ``(J J^T + lambda I) alpha = r`` by ``solve_gauss_newton`` (exact Gram
   and Cholesky, or TensorSketch-preconditioned / Jacobi CG).
3. Step.  ``dW_l = -sum_i alpha_i D_l[i] (x) H_{l-1}[i] = -J^T alpha``, the
   minimum-norm solution of the damped linearised problem.  For a fixed
   activation pattern the backward pass is linear in the output error, so
   the deltas of ``E = alpha`` are the unit deltas scaled row by row by
   ``alpha_i``: no second backward pass.  The step goes through the
   backend's update kernel (the sparse one costs ``O(n k_in k_out)`` per
   layer; only active blocks of ``W`` are written).
4. Trial.  One forward pass at ``theta + dtheta`` gives the new loss
   ``L'``.  The linear model predicts the residual
   ``r - J J^T alpha = lambda alpha``, hence the predicted loss
   ``L_pred = 0.5 mean((lambda alpha)^2)`` and the gain ratio
   ``rho = (L - L') / (L - L_pred)``.

   * ``L' < L`` (``rho > 0``): accept.  ``mu <- max(mu_min, mu *
     max(1/3, 1 - (2 rho - 1)^3))``, ``nu <- 2`` (the update of Nielsen,
     1999; Madsen, Nielsen and Tingleff, "Methods for non-linear least
     squares problems", 2004, sec. 3.2).  The trial forward pass is the next
     iteration's forward pass.
   * otherwise (also when the damped system is numerically singular or the
     step overflows the working dtype; such a step is never applied):
     reject.  ``mu <- mu nu``, ``nu <- 2 nu``, solve again with the same
     factors (the Jacobian does not change) and replace the step: one
     update with ``alpha_new - alpha_old`` undoes the old step and takes the
     new one.  At most ``MAX_TRIES`` solves per iteration; if none
     decreases the loss (at the rounding floor, or a very rough region)
     the step is undone and the iteration ends at ``theta`` with the larger
     ``mu``.

``mu_min`` is the ``damping`` parameter of SparseMLP and also the initial
``mu``: while the linear model is good (``rho`` near 1) the method is
plain Gauss-Newton with a tiny ridge, which keeps ``J J^T + lambda I``
positive definite when ``J J^T`` is singular (duplicate samples, dead
units) and costs nothing in accuracy; failed steps raise ``mu`` and turn
the step toward a short gradient step.

Cost per iteration (no rejection): one backward pass, the solve, one
sparse update and one forward pass (the trial, which is the next
iteration's forward), i.e. a gradient-descent iteration plus the solve.
A rejected trial costs a solve, an update and a forward pass.  The
Jacobian is never formed; ``solve_gauss_newton`` documents the costs of
the solvers.
"""

import math

import numpy as np

from ._gauss_newton import solve_gauss_newton

__all__ = ["GaussNewtonState", "MAX_TRIES", "GN_SOLVERS"]

MAX_TRIES = 6
GN_SOLVERS = ("auto", "exact", "sketched", "jacobi")
_MU_MAX = 1e12


def _row_scaled_deltas(cache, deltas, alpha, dtype):
    """The deltas of output error ``alpha`` from the deltas of a unit error.

    Dense backend: ``deltas[l]`` is (n, m); sparse backend: a flat array
    aligned with ``cache["H"][l]`` (CSR pattern of layer ``l + 1``).
    The product is taken in float64 (a huge ``alpha_i`` on a sample whose
    deltas are zero stays zero); an entry that overflows the working dtype
    becomes inf and the caller rejects the step.
    """
    out = []
    with np.errstate(over="ignore", invalid="ignore"):
        for layer, d in enumerate(deltas):
            if d.ndim == 2:
                scaled = d * alpha[:, None]
            else:
                scaled = d * np.repeat(alpha, np.diff(cache["H"][layer][0]))
            out.append(np.ascontiguousarray(scaled, dtype=dtype))
    return out


def _mean_gram_diagonal(factors):
    """``mean_i diag(J J^T)_i = mean_i sum_l ||D_l[i]||^2 ||H_{l-1}[i]||^2``, O(nnz)."""
    diag = 0.0
    for D, H in factors:
        dn = np.asarray(D.multiply(D).sum(axis=1), dtype=np.float64).ravel()
        if isinstance(H, np.ndarray):
            hn = np.einsum("ij,ij->i", H, H, dtype=np.float64)
        else:
            hn = np.asarray(H.multiply(H).sum(axis=1), dtype=np.float64).ravel()
        diag = diag + dn * hn
    return float(np.mean(diag))


class GaussNewtonState:
    """Levenberg-Marquardt state of one ``fit`` (see the module docstring)."""

    def __init__(self, model, X, y, *, damping, solver, rng):
        self.model = model
        self.X = X
        self.y = y
        self.mu_min = float(damping)
        self.mu = float(damping)
        self.nu = 2.0
        self.solver = solver
        self.rng = rng
        self.cache = None  # forward cache at the current weights

    def _loss(self, cache):
        model = self.model
        out = model._outputs(model._net.last_hidden(cache))
        r = out[:, 0].astype(np.float64) - self.y
        with np.errstate(over="ignore", invalid="ignore"):
            loss = 0.5 * float(r @ r) / r.shape[0]
        return loss, r

    def factors(self, cache):
        """``[(D_l, H_{l-1})]`` and the unit deltas, at the weights of ``cache``."""
        model, net = self.model, self.model._net
        n = self.X.shape[0]
        deltas = net.deltas(cache, np.ones((n, 1), dtype=model._dtype), model.head_)
        factors = []
        for layer in range(1, model.depth + 1):
            factors.append((net.delta_matrix(cache, deltas, layer), net.hidden(cache, layer - 1)))
        return factors, deltas

    def _solve(self, factors, r, lam):
        """alpha of the damped system, or None when it is numerically singular."""
        try:
            alpha, _ = solve_gauss_newton(
                factors, r, damping=lam, method=self.solver, random_state=self.rng,
                n_threads=self.model._n_threads,
            )
        except ValueError as exc:
            # The solver's own advice ("... increase damping") is what the
            # Levenberg-Marquardt loop does next; anything else is a bug.
            if "increase damping" not in str(exc):
                raise
            return None
        return alpha if np.isfinite(alpha).all() else None

    def step(self):
        """One damped Gauss-Newton iteration; returns the loss before the step."""
        model, net = self.model, self.model._net
        dtype = model._dtype
        cache = self.cache if self.cache is not None else net.forward(self.X)
        loss, r = self._loss(cache)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the training loss diverged ({loss}); increase damping"
            )
        model._last_active = net.active_fraction(cache, model.width)
        if loss == 0.0:
            self.cache = cache
            model.history_["damping"].append(self.mu)
            return loss
        factors, deltas = self.factors(cache)
        scale = _mean_gram_diagonal(factors)
        if not scale > 0.0:
            raise ValueError(
                "the Jacobian is zero (no active neuron on any sample); a Gauss-Newton "
                "step is undefined; use a denser sparsity or threshold='relative'"
            )
        # Rounding floor of the loss: residuals are only known to about
        # eps |f| (measured floors: MSE ~3e-15 in float32, ~1e-31 in float64).
        eps = float(np.finfo(dtype).eps)
        floor = 0.5 * eps * eps * float(np.mean((r + self.y) ** 2 + self.y ** 2))
        applied = np.zeros_like(r)
        accepted = False
        for _ in range(MAX_TRIES):
            lam = self.mu * scale
            alpha = self._solve(factors, r, lam)
            if alpha is not None:
                # The linear model predicts the residual r - J J^T alpha = lambda alpha.
                predicted = 0.5 * float(np.dot(lam * alpha, lam * alpha)) / r.shape[0]
                gain = loss - predicted
                if gain <= floor:
                    # Nothing left that a step can remove (converged to rounding,
                    # or the rest of the residual is outside the range of J:
                    # samples with no active neuron): no step, damping unchanged.
                    break
                # Replace the step in place: undo ``applied`` and apply ``alpha``.
                step = _row_scaled_deltas(cache, deltas, alpha - applied, dtype)
                if all(np.isfinite(d).all() for d in step):
                    net.update(cache, step, 1.0)
                    applied = alpha
                    trial = net.forward(self.X)
                    new_loss, _ = self._loss(trial)
                    if new_loss < loss:
                        rho = (loss - new_loss) / gain
                        self.mu = max(self.mu_min,
                                      self.mu * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3))
                        self.nu = 2.0
                        self.cache = trial
                        accepted = True
                        break
            # Rejected (no decrease, a singular system or a step that overflows
            # the working dtype): more damping, same factors.
            self.mu = min(self.mu * self.nu, _MU_MAX)
            self.nu *= 2.0
        if not accepted:
            if applied.any():
                net.update(cache, _row_scaled_deltas(cache, deltas, -applied, dtype), 1.0)
            self.cache = cache
        model.history_["damping"].append(lam / scale)
        return loss
