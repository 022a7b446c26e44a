"""Empirical coverage and set size of prediction sets, per group (site) and overall.

The test-side companion of :mod:`medcl.metrics.conformal`: how often the sets held the label and
how large they were, with intervals, so a report can set each site's coverage against the target
``1 - alpha``.
"""

from __future__ import annotations

__all__ = ["coverage_table"]

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.special import erfinv

from medcl.errors import DataError


def _wilson(hits: int, n: int, z: float) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def coverage_table(
    sets: ArrayLike, y_true: ArrayLike, groups: Sequence[object], *, confidence: float = 0.95
) -> pd.DataFrame:
    """Empirical coverage and mean set size per group, plus ``overall``.

    Coverage has a Wilson score interval; mean set size a normal-approximation interval.

    Args:
        sets: ``(N, K)`` bool prediction sets.
        y_true: ``(N,)`` class ids (rows whose class is not among the ``K`` count as not covered).
        groups: ``N`` group labels (sites).
        confidence: level of the intervals.

    Returns:
        One row per group and ``overall``: ``group, n, coverage, coverage_low, coverage_high,
        mean_size, size_low, size_high, empty``.
    """
    s = np.asarray(sets, dtype=bool)
    yt = np.asarray(y_true).astype(np.int64)
    g = np.asarray([str(x) for x in groups], dtype=object)
    if s.ndim != 2 or len(s) != len(yt) or len(g) != len(yt):
        raise DataError(
            f"sets (N, K), y_true (N,) and groups (N,) must describe the same rows; got shapes "
            f"{s.shape}, {yt.shape}, {g.shape}."
        )
    known = yt < s.shape[1]
    covered = np.zeros(len(yt), dtype=bool)
    covered[known] = s[np.flatnonzero(known), yt[known]]
    size = s.sum(1).astype(np.float64)
    z = float(np.sqrt(2) * erfinv(confidence))  # 1.96 at 95%
    rows = []
    for name in [*dict.fromkeys(g.tolist()), "overall"]:
        m = np.ones(len(g), dtype=bool) if name == "overall" else g == name
        n = int(m.sum())
        low, high = _wilson(int(covered[m].sum()), n, z)
        mean = float(size[m].mean()) if n else math.nan
        half = z * float(size[m].std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
        rows.append(
            {
                "group": name,
                "n": n,
                "coverage": float(covered[m].mean()) if n else math.nan,
                "coverage_low": low,
                "coverage_high": high,
                "mean_size": mean,
                "size_low": mean - half,
                "size_high": mean + half,
                "empty": int((size[m] == 0).sum()),
            }
        )
    return pd.DataFrame(rows)
