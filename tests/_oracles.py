"""Brute-force numpy references, computed in float64.

Every structure in subquad_ds is compared with one of these on random and
adversarial data.  They favour obviousness over speed.
"""

import numpy as np
