"""Shared benchmark fixtures.

Every benchmark group pairs subquad_ds with numpy and, where one exists,
an external peer.  ``machine_info`` is attached to each result so saved
runs say where they were measured.
"""

import os
import platform

import numpy as np
import pytest

import subquad_ds


@pytest.fixture(scope="session")
def machine_info():
    """Context recorded with every benchmark (``benchmark.extra_info``)."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "n_cpus": os.cpu_count(),
        "numpy": np.__version__,
        "subquad_ds": subquad_ds.__version__,
        "openmp": subquad_ds.openmp_enabled(),
    }


def max_width(default=16384):
    """Largest network width a benchmark may use: ``SUBQUAD_BENCH_MAX_WIDTH``.

    The full sweeps go to m = 16384 (several GiB and seconds per dense
    step); the CI smoke run caps them.
    """
    return int(os.environ.get("SUBQUAD_BENCH_MAX_WIDTH", default))


def require(module_name):
    """Import an optional peer or skip the benchmark saying which is missing."""
    return pytest.importorskip(
        module_name, reason=f"{module_name} is not installed (pip install '.[bench]')"
    )
