"""subquad_ds: data structures for subquadratic training of wide networks.

Each structure is importable on its own from its module; the common names
are re-exported here.
"""

from ._openmp_helpers import openmp_enabled
from .halfspace import HalfspaceIndex

__version__ = "0.1.0"

__all__ = [
    "HalfspaceIndex",
    "openmp_enabled",
]
