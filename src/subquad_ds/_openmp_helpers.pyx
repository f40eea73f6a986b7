# cython: boundscheck=False, wraparound=False
"""OpenMP availability and thread-count resolution shared by every core.

``n_threads`` follows the scikit-learn/joblib convention: ``None`` or ``-1``
means every usable core, a positive integer is an explicit count, and
``-k`` means ``n_cpus + 1 - k``.  Without OpenMP every kernel runs on one
thread, whatever is asked.
"""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define SQD_OPENMP_ENABLED 1
    #else
    #define SQD_OPENMP_ENABLED 0
    static int omp_get_max_threads(void) { return 1; }
    #endif
    """
    int SQD_OPENMP_ENABLED
    int omp_get_max_threads() nogil


def openmp_enabled():
    """Return True if the compiled cores were built with OpenMP support."""
    return bool(SQD_OPENMP_ENABLED)


def max_threads():
    """Number of threads an OpenMP parallel region would use by default (1 without OpenMP)."""
    return omp_get_max_threads()
