import numpy as np
import pytest

from subquad_ds.datasets import load_default_task


def test_regression_task():
    X, y = load_default_task()
    assert X.shape == (512, 64) and y.shape == (512,)
    assert X.dtype == y.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-12)
    assert abs(y.mean()) < 1e-12 and abs(y.std() - 1) < 1e-12


def test_classification_task_and_subset():
    X, labels = load_default_task("classification", n_samples=32, dtype=np.float32)
    assert X.shape == (32, 64) and X.dtype == np.float32
    assert labels.dtype == np.int64 and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_bad_arguments():
    with pytest.raises(ValueError, match="task must be one of"):
        load_default_task("ranking")
    with pytest.raises(ValueError, match="n_samples must be <= 512"):
        load_default_task(n_samples=513)
