"""Reference Gauss-Newton loop on the default task, before SparseMLP exists.

    OMP_NUM_THREADS=1 python bench/sketch_gn_default_task.py [--width 1024] [--depth 3]

A plain dense ReLU MLP in numpy, f(x) = a^T h_L, h_l = relu(W_l h_{l-1}),
a fixed random signs / sqrt(m), He initialisation.  Each iteration builds
the factors the GN solver expects, D_l = df/dz_l (n, m_l) and H_{l-1} (the
layer input), solves (J J^T + lambda I) alpha = f - y with
solve_gauss_newton, and steps W_l -= J_l^T alpha (jacobian_rmatvec, the
sum_i alpha_i D_l[i]^T H_{l-1}[i] that SparseMLP computes with its sparse
update kernel).  lambda = 1e-9 x mean diag(J J^T).  Prints the MSE per
iteration.  This fixes the conventions for the SparseMLP wiring; it is not
a benchmark of the sparse trainer.
"""

import argparse
import time

import numpy as np
import scipy.sparse as sp

from subquad_ds._gauss_newton import (
    _check_factors,
    _gram_diagonal,
    jacobian_rmatvec,
    solve_gauss_newton,
)
from subquad_ds.datasets import load_default_task


def forward(X, Ws, a):
    Hs, Zs = [X], []
    for W in Ws:
        Zs.append(Hs[-1] @ W.T)
        Hs.append(np.maximum(Zs[-1], 0.0))
    return Hs, Zs, Hs[-1] @ a


def gn_factors(Hs, Zs, Ws, a):
    """[(D_l, H_{l-1})] with D_l = df/dz_l, sparse where the ReLU is off."""
    L = len(Ws)
    Ds = [None] * L
    Ds[-1] = a * (Zs[-1] > 0)
    for l in range(L - 2, -1, -1):
        Ds[l] = (Ds[l + 1] @ Ws[l + 1]) * (Zs[l] > 0)
    return [(sp.csr_array(Ds[l]), Hs[l] if l == 0 else sp.csr_array(Hs[l])) for l in range(L)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    X, y = load_default_task()
    rng = np.random.default_rng(0)
    m, d = args.width, X.shape[1]
    Ws = [rng.standard_normal((m, d)) * np.sqrt(2.0 / d)]
    Ws += [rng.standard_normal((m, m)) * np.sqrt(2.0 / m) for _ in range(args.depth - 1)]
    a = rng.choice([-1.0, 1.0], size=m) / np.sqrt(m)
    for it in range(args.iters + 1):
        t0 = time.perf_counter()
        Hs, Zs, f = forward(X, Ws, a)
        mse = float(np.mean((f - y) ** 2))
        print(f"iteration {it}: mse {mse:.3e}", flush=True)
        if mse <= 1e-10 or it == args.iters:
            break
        factors = gn_factors(Hs, Zs, Ws, a)
        checked, _ = _check_factors(factors)
        damping = 1e-9 * float(np.mean(_gram_diagonal(checked)))
        alpha, info = solve_gauss_newton(factors, f - y, damping=damping)
        for W, dW in zip(Ws, jacobian_rmatvec(factors, alpha)):
            W -= dW
        print(f"  solve ({info['method']}) {info['time_gram'] + info['time_factor']:.2f} s, "
              f"iteration {time.perf_counter() - t0:.2f} s", flush=True)


if __name__ == "__main__":
    main()
