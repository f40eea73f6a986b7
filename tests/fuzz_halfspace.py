"""Timed random fuzz of HalfspaceIndex against a float64 brute-force oracle.

Not collected by pytest (the CI runs the seeded and hypothesis tests); run
it by hand after a change to the query or update paths::

    python tests/fuzz_halfspace.py --seconds 300 --seed 1

Each trial builds an index (float32 or float64, d from 1 to 130, Gaussian,
clustered, small-integer or duplicated points at a random power-of-two
scale, a random ``leaf_size``), applies a few random batches of adds
(single and bulk), removes and updates, and after each batch compares
single queries (with and without scores, on 1-3 threads) and one batched
query with the oracle; in half the trials every query that straddles two or
more subtrees is split across the threads, however small, and each trial
picks whether relative leaves near ``b`` skip stage 0 (never, by default,
or always).  Thresholds are score quantiles (0% .. 100%) or exactly a
stored point's score.  A point whose oracle score lies within ``1e-12 *
sum |p_j w_j|`` of ``b`` may go either way (the summation order is
unspecified); any other difference stops the run with the trial's details.
"""

import argparse
import time

import numpy as np

from subquad_ds import HalfspaceIndex
from subquad_ds._halfspace import _set_split_min_work, _set_stage0_skip_spreads

DIMS = [1, 2, 3, 7, 16, 31, 32, 33, 64, 100, 128, 130]


def random_points(rng, n, d, dtype):
    kind = rng.integers(4)
    scale = 2.0 ** int(rng.integers(-20, 21))
    if kind == 0:
        X = rng.standard_normal((n, d))
    elif kind == 1:
        k = int(rng.integers(1, 20))
        centres = 3.0 * rng.standard_normal((k, d))
        X = centres[rng.integers(k, size=n)] + rng.uniform(0.001, 0.3) * rng.standard_normal((n, d))
    elif kind == 2:
        X = rng.integers(-3, 4, size=(n, d)).astype(float)
    else:
        base = rng.standard_normal((max(1, n // 10), d))
        X = base[rng.integers(base.shape[0], size=n)]
    return (X * scale).astype(dtype)


def expected(live, w, b):
    """(ids that must be reported, ids within rounding of b)."""
    ids = np.fromiter(live, dtype=np.intp, count=len(live))
    if ids.size == 0:
        return set(), set()
    P = np.stack([live[i] for i in ids])
    s = P @ w
    slack = 1e-12 * (np.abs(P) @ np.abs(w)) + 1e-300
    return set(ids[s >= b].tolist()), set(ids[np.abs(s - b) <= slack].tolist())


def check(rng, index, live, W, b, dtype, trial):
    """Single and batched queries against the oracle; returns the checks made."""
    threads = int(rng.integers(1, 4))
    ptr, batch = index.query(W, b, n_threads=threads)
    for q in range(W.shape[0]):
        w = W[q].astype(dtype).astype(np.float64)
        want, ambiguous = expected(live, w, b[q])
        if rng.random() < 0.5:
            _, single = index.query(W[q], b[q], return_scores=True, n_threads=threads)
        else:
            single = index.query(W[q], b[q], n_threads=threads)
        for name, got in (("single", single), ("batch", batch[ptr[q]:ptr[q + 1]])):
            wrong = (set(got.tolist()) ^ want) - ambiguous
            if wrong:
                raise AssertionError(f"trial {trial}, {name} query {q} on {threads} threads: "
                                     f"ids {sorted(wrong)[:5]}")
    return 2 * W.shape[0]


def run(seconds, seed):
    rng = np.random.default_rng(seed)
    t_end = time.monotonic() + seconds
    trials = checks = 0
    default_split = _set_split_min_work(0)
    _set_split_min_work(default_split)
    default_skip = _set_stage0_skip_spreads(0.0)
    _set_stage0_skip_spreads(default_skip)
    while time.monotonic() < t_end:
        trials += 1
        _set_split_min_work(0 if rng.random() < 0.5 else default_split)
        _set_stage0_skip_spreads(rng.choice([-np.inf, default_skip, np.inf]))
        dtype = np.float32 if rng.random() < 0.6 else np.float64
        d = int(rng.choice(DIMS))
        n = int(rng.integers(0, 6000))
        X = random_points(rng, n, d, dtype)
        index = HalfspaceIndex(X, leaf_size=int(rng.choice([1, 4, 16, 64, 256])))
        live = {i: X[i].astype(np.float64) for i in range(n)}
        for _ in range(int(rng.integers(1, 6))):
            op = rng.integers(4)
            if op == 0:
                Y = random_points(rng, int(rng.integers(1, 300)), d, dtype)
                if rng.random() < 0.5:                       # one point per call
                    for row in Y[:50]:
                        live[int(index.add(row[None, :])[0])] = row.astype(np.float64)
                else:
                    for i, row in zip(index.add(Y), Y):
                        live[int(i)] = row.astype(np.float64)
            elif op == 1 and live:
                gone = rng.choice(list(live), size=min(len(live), int(rng.integers(1, 500))),
                                  replace=False)
                index.remove(gone)
                for i in gone:
                    del live[int(i)]
            elif op == 2 and live:
                moved = rng.choice(list(live), size=min(len(live), int(rng.integers(1, 200))),
                                   replace=False)
                Y = random_points(rng, moved.size, d, dtype)
                index.update(moved, Y)
                for i, row in zip(moved, Y):
                    live[int(i)] = row.astype(np.float64)
            n_queries = int(rng.integers(1, 8))
            if rng.random() < 0.5:
                W = random_points(rng, n_queries, d, dtype)
            else:
                W = rng.standard_normal((n_queries, d)).astype(dtype)
            if live:
                S = np.stack(list(live.values())) @ W.astype(np.float64).T
                if rng.random() < 0.3:                       # exactly on a stored score
                    b = S[rng.integers(S.shape[0], size=n_queries), np.arange(n_queries)]
                else:
                    levels = rng.choice([0.0, 0.5, 0.9, 0.99, 0.999, 1.0], size=n_queries)
                    b = np.array([np.quantile(S[:, q], levels[q]) for q in range(n_queries)])
            else:
                b = rng.standard_normal(n_queries)
            checks += check(rng, index, live, W, b, dtype, trials)
    _set_split_min_work(default_split)
    _set_stage0_skip_spreads(default_skip)
    return trials, checks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    trials, checks = run(args.seconds, args.seed)
    print(f"seed {args.seed}: {trials} trials, {checks} checks, no mismatch")


if __name__ == "__main__":
    main()
