"""The embedded default data set (no download).

512 points on the unit sphere in R^64 with a smooth non-linear regression
target (zero mean, unit variance) and 4-class labels; the recipe is
``tools/make_default_task.py``.  It is the task the CLI ``train`` command,
the convergence tests and the training benchmarks use.
"""

from importlib import resources

import numpy as np

from ._validation import check_int, resolve_float_dtype

__all__ = ["load_default_task"]

_TASKS = ("regression", "classification")


def load_default_task(task="regression", *, n_samples=None, dtype=np.float64):
    """Load the embedded default data set.

    Parameters
    ----------
    task : {"regression", "classification"}, default="regression"
        Regression returns a float target; classification returns integer
        labels 0..3.
    n_samples : int, optional
        Return only the first ``n_samples`` points (at most 512).
    dtype : {np.float32, np.float64}, default=np.float64
        dtype of ``X`` (and of ``y`` for regression).

    Returns
    -------
    X : ndarray of shape (n_samples, 64)
        Rows have unit Euclidean norm.
    y : ndarray of shape (n_samples,)
        Target values (regression, ``dtype``) or labels (classification, int64).
    """
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}; got {task!r}")
    dtype = resolve_float_dtype(None, dtype)
    ref = resources.files("subquad_ds") / "data" / "default_task.npz"
    with resources.as_file(ref) as path, np.load(path) as data:
        X, y, labels = data["X"], data["y"], data["labels"]
    n = check_int(n_samples, "n_samples", minimum=1, maximum=X.shape[0], allow_none=True)
    n = X.shape[0] if n is None else n
    X = np.ascontiguousarray(X[:n], dtype=dtype)
    if task == "regression":
        return X, np.ascontiguousarray(y[:n], dtype=dtype)
    return X, labels[:n].copy()
