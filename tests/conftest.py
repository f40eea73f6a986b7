"""Shared fixtures and the hypothesis profiles.

CI (``CI`` set in the environment) uses the deterministic profile:
derandomized examples and no deadline, so a run is reproducible and a slow
shared machine does not make tests flaky.  Pick a profile explicitly with
``SUBQUAD_DS_HYPOTHESIS_PROFILE=ci|dev|thorough``.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=50,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(
    os.environ.get("SUBQUAD_DS_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)

FLOAT_DTYPES = [np.float32, np.float64]


@pytest.fixture(params=FLOAT_DTYPES, ids=["float32", "float64"])
def dtype(request):
    """Every structure is tested in both working dtypes."""
    return request.param


@pytest.fixture
def rng():
    """A seeded generator; each test gets the same stream."""
    return np.random.default_rng(0)


def rtol_for(dtype):
    """Relative tolerance for comparing a dtype's result with a float64 oracle."""
    return 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
