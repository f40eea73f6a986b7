"""Sweep n for the Gauss-Newton system solvers: where does each one pay?

    python bench/sketch_gn_crossover.py [--fracs 0.01 0.05] [--ns 64 128 ...] [--repeats 2]

Factors shaped like a width-4096, 3-layer sparse MLP (input dim 64; see
``mlp_like_factors`` in bench_sketch.py).  For each n it times
solve_gauss_newton with method="exact" (Gram + Cholesky), "sketched"
(TensorSketch preconditioner, s = 4n, matrix-free CG) and "jacobi"
(diagonal preconditioner, matrix-free CG), damping 1e-6 x mean diag(J J^T)
(the Gauss-Newton regime); then, in a second table, the large-damping
regime (0.1 x mean diag) where a sketch with s = n/4 < n (Woodbury) is
enough.  Prints markdown tables (medians over --repeats runs, seconds).
Not a pytest file: the full sweep takes several minutes.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from bench_sketch import mlp_like_factors  # noqa: E402

from subquad_ds._gauss_newton import _check_factors, _gram_diagonal, solve_gauss_newton  # noqa: E402


def run(factors, r, damping, method, repeats, **kw):
    times, info = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        _, info = solve_gauss_newton(factors, r, damping=damping, method=method,
                                     random_state=0, **kw)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fracs", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--ns", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--sketched-max-n", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    print("| active | n | exact s (gram + chol) | sketched s (sketch + precond + CG) | CG its "
          "| jacobi s | CG its | sketched / exact | jacobi / exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for frac in args.fracs:
        for n in args.ns:
            rng = np.random.default_rng(1234)
            factors = mlp_like_factors(rng, n, frac=frac)
            r = rng.standard_normal(n)
            checked, _ = _check_factors(factors)
            damping = 1e-6 * float(np.mean(_gram_diagonal(checked)))
            te, ie = run(factors, r, damping, "exact", args.repeats)
            tj, ij = run(factors, r, damping, "jacobi", args.repeats)
            if n <= args.sketched_max_n:
                ts, isk = run(factors, r, damping, "sketched", 1)
                sk = (f"{ts:.3f} ({isk['time_sketch']:.3f} + {isk['time_factor']:.3f} + "
                      f"{isk['time_iterations']:.3f})")
                sk_its, ratio = str(isk["iterations"]), f"{ts / te:.1f}"
            else:
                sk, sk_its, ratio = "not run", "", ""
            print(f"| {frac:.0%} | {n} | {te:.3f} ({ie['time_gram']:.3f} + {ie['time_factor']:.3f}) "
                  f"| {sk} | {sk_its} | {tj:.3f} | {ij['iterations']} | {ratio} | {tj / te:.2f} |",
                  flush=True)

    print()
    print("Large damping (0.1 x mean diag), sketched with s = n / 4 (Woodbury):")
    print()
    print("| active | n | exact s | sketched s | CG its | sketched / exact |")
    print("|---|---|---|---|---|---|")
    for frac in args.fracs:
        for n in (256, 1024, 2048):
            rng = np.random.default_rng(1234)
            factors = mlp_like_factors(rng, n, frac=frac)
            r = rng.standard_normal(n)
            checked, _ = _check_factors(factors)
            damping = 0.1 * float(np.mean(_gram_diagonal(checked)))
            te, _ = run(factors, r, damping, "exact", args.repeats)
            ts, isk = run(factors, r, damping, "sketched", 1, sketch_size=n // 4)
            print(f"| {frac:.0%} | {n} | {te:.3f} | {ts:.3f} | {isk['iterations']} | {ts / te:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
