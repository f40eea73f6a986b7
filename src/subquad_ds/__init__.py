"""subquad_ds: data structures for subquadratic training of wide networks.

Each structure is importable on its own from its module; the common names
are re-exported here.
"""

from ._openmp_helpers import openmp_enabled
from .lowrank import LowRankUpdatedMatrix
from .lstsq import sketched_lstsq
from .sketch import SRHT, CountSketch, GaussianSketch, TensorSketch
from .halfspace import HalfspaceIndex

__version__ = "0.1.0"

__all__ = [
    "LowRankUpdatedMatrix",
    "CountSketch",
    "GaussianSketch",
    "SRHT",
    "TensorSketch",
    "sketched_lstsq",
    "HalfspaceIndex",
    "openmp_enabled",
]
