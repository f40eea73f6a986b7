"""Regenerate src/subquad_ds/data/default_task.npz (the embedded default data set).

The file is shipped, not regenerated at import, so the data stays identical
across numpy versions.  Recipe: 512 points drawn uniformly on the unit
sphere in R^64; the regression target is a smooth non-linear teacher
(sum of sines and cosines of random projections, plus a product term),
standardised to zero mean and unit variance; the 4-class labels are the
argmax of four random teacher features.
"""

from pathlib import Path

import numpy as np

N_SAMPLES, N_FEATURES, N_CLASSES, SEED = 512, 64, 4, 20240101


def make_default_task(seed=SEED):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N_SAMPLES, N_FEATURES))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    U = rng.standard_normal((N_FEATURES, 3)) * np.sqrt(N_FEATURES) / 2
    P = X @ U
    y = np.sin(P[:, 0]) + 0.5 * np.cos(P[:, 1]) + 0.3 * P[:, 0] * P[:, 2] / 4
    y = (y - y.mean()) / y.std()
    V = rng.standard_normal((N_FEATURES, N_CLASSES)) * np.sqrt(N_FEATURES)
    labels = np.argmax(np.tanh(X @ V) + 0.25 * np.sin(2 * (X @ V)), axis=1)
    return X, y, labels.astype(np.int64)


if __name__ == "__main__":
    X, y, labels = make_default_task()
    out = Path(__file__).resolve().parents[1] / "src" / "subquad_ds" / "data" / "default_task.npz"
    np.savez_compressed(out, X=X, y=y, labels=labels)
    print(f"wrote {out}: X {X.shape}, y {y.shape}, class counts {np.bincount(labels)}")
