"""Across-seed statistics for the tables: 95 % t-intervals and Welch tests.

Seeds are few (4 by default), so the interval uses Student's t with n − 1 degrees of freedom rather
than a normal quantile, and methods are compared with Welch's test, which does not assume that two
methods vary as much across seeds.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05  # two-sided significance level of the marks in the tables


def ci_half_width(values: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided t-interval of the mean; NaN below two values (no spread to use)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test; NaN when either side has fewer than two values, or when
    neither varies (the statistic is undefined, and a mark would claim what the data cannot show)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        # two constant samples: Welch's degrees of freedom are 0/0, and scipy's p of 0 (or NaN, for
        # equal means) would claim a certainty a handful of identical runs does not give
        return math.nan
    with warnings.catch_warnings():
        # scipy warns about precision when samples are nearly constant; the p-value still stands.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


__all__ = ["ALPHA", "CONFIDENCE", "ci_half_width", "welch_p"]
