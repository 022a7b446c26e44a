"""Per-site (per-group) clinical tables with bootstrap CIs, and heterogeneity across sites."""

from __future__ import annotations

__all__ = ["per_group_metrics", "site_heterogeneity"]

import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats
from sklearn.exceptions import UndefinedMetricWarning

from medcl.errors import DataError
from medcl.metrics.calibration import _as_numpy, check_predictions
from medcl.metrics.clinical.bootstrap import BootstrapOptions, bootstrap_ci
from medcl.metrics.clinical.spec import DEFAULT_METRICS, MetricSpec

# ---------------------------------------------------------------------------------------------
# Per-site tables and heterogeneity


def per_group_metrics(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    groups: ArrayLike | None,
    metrics: Sequence[MetricSpec] = DEFAULT_METRICS,
    *,
    class_names: Sequence[str] | None = None,
    overall: bool = True,
    **options: Any,
) -> pd.DataFrame:
    """:func:`bootstrap_ci` for every group (site, cohort, scanner) and for all samples.

    Each group's random stream is seeded from ``seed`` and the group's name, so adding a site
    does not change the other sites' intervals.

    Args:
        y_true: ``(N,)`` class ids.
        y_prob: ``(N, C)`` probabilities, or ``(N,)`` positive-class probabilities.
        groups: ``(N,)`` group label of each sample; ``None`` for the overall rows only.
        metrics, class_names: as in :func:`bootstrap_ci`.
        overall: also add rows for all samples pooled, with ``group = "overall"``.
        **options: :class:`~medcl.metrics.clinical.bootstrap.BootstrapOptions`; ``seed`` is
            the root seed.

    Returns:
        Tidy frame ``group, n, metric, class, value, ci_low, ci_high, se`` (groups sorted).
    """
    opt = BootstrapOptions(**options)
    yt, yp = check_predictions(y_true, y_prob)
    if groups is None:
        labels = np.full(yt.size, "overall", dtype=object)
        keys: list = []
        overall = True
    else:
        labels = _as_numpy(groups)
        if labels.shape != yt.shape:
            raise DataError(
                f"groups must give one label per sample, shape {yt.shape}; got {labels.shape}."
            )
        keys = sorted(pd.unique(labels), key=str)
        if overall and "overall" in {str(k) for k in keys}:
            raise DataError(
                "a group is named 'overall', which is reserved for the pooled rows; rename it or "
                "pass overall=False."
            )
    parts = [(k, labels == k) for k in keys]
    if overall:
        parts.append(("overall", np.ones(yt.size, dtype=bool)))
    tables = []
    for key, mask in parts:
        # The stream depends on the group's name only: adding a site leaves the others' CIs as is.
        child = np.random.SeedSequence([opt.seed, zlib.crc32(str(key).encode())])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = bootstrap_ci(
                yt[mask], yp[mask], metrics, class_names=class_names, **opt.keywords(seed=child)
            )
        for w in caught:  # re-emit, naming the group
            warnings.warn(f"group {key!r}: {w.message}", w.category, stacklevel=2)
        t.insert(0, "n", int(mask.sum()))
        t.insert(0, "group", key)
        tables.append(t)
    return pd.concat(tables, ignore_index=True)


def site_heterogeneity(
    table: pd.DataFrame, *, metric: str = "auroc", class_name: str = "macro"
) -> dict[str, float]:
    """Heterogeneity of one metric across groups (Cochran's Q, I², DerSimonian-Laird tau²).

    With per-group estimates ``theta_k`` and bootstrap standard errors ``se_k`` (the ``se``
    column of :func:`per_group_metrics`), weights ``w_k = 1 / se_k^2``:
    ``theta = sum w theta / sum w``, ``Q = sum w_k (theta_k - theta)^2`` (chi-squared with
    ``K - 1`` df under homogeneity), ``I^2 = max(0, (Q - (K-1)) / Q)`` (Higgins & Thompson 2002),
    ``tau^2 = max(0, (Q - (K-1)) / (sum w - sum w^2 / sum w))``. The unweighted ``range`` and
    ``sd`` of ``theta_k`` are given too. Groups with an undefined value or ``se = 0`` (the metric
    is the same in every resample, e.g. accuracy of a site whose predictions are all one class
    under stratified resampling: an infinite weight) are left out, with a warning that says so.

    Args:
        table: output of :func:`per_group_metrics` (the ``"overall"`` rows are ignored).
        metric: metric to compare, e.g. ``"auroc"``.
        class_name: ``class`` row to compare, e.g. ``"macro"`` or a class name.

    Returns:
        ``{"n_groups", "pooled", "q", "df", "p_value", "i2", "tau2", "range", "sd"}``; NaN (with
        a warning) when fewer than two groups qualify.

    Warns:
        UndefinedMetricWarning: groups left out and why; every value NaN with fewer than two
            groups (the report shows these as notes, the values as null).
    """
    need = {"group", "metric", "class", "value", "se"}
    if not need <= set(table.columns):
        raise DataError(
            f"site_heterogeneity needs a per_group_metrics table with columns {sorted(need)}; "
            f"got {list(table.columns)}."
        )
    sel = table[
        (table["metric"] == metric) & (table["class"] == class_name) & (table["group"] != "overall")
    ]
    if sel.empty:
        raise DataError(
            f"no rows for metric={metric!r}, class={class_name!r} in the table; available "
            f"metrics: {sorted(table['metric'].unique())}, classes: "
            f"{sorted(table['class'].unique())}."
        )
    # a standard error at rounding-noise level is a constant metric: se = 0, an infinite weight
    constant = sel["value"].notna() & ~(sel["se"] > _SE_FLOOR) & sel["se"].notna()
    if constant.any():
        warnings.warn(
            f"site_heterogeneity: {metric}[{class_name}] of group(s) "
            f"{sorted(map(str, sel.loc[constant, 'group']))} left out: the same value in every "
            "bootstrap resample (se = 0), which would get infinite weight.",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    ok = sel["value"].notna() & (sel["se"] > _SE_FLOOR)
    theta = sel.loc[ok, "value"].to_numpy(np.float64)
    se = sel.loc[ok, "se"].to_numpy(np.float64)
    k = theta.size
    nan = float("nan")
    if k < 2:
        warnings.warn(
            f"site_heterogeneity: {k} group(s) with a defined {metric}[{class_name}] and a "
            "positive standard error; need at least 2. Returning NaN.",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        return {"n_groups": float(k)} | dict.fromkeys(
            ("pooled", "q", "df", "p_value", "i2", "tau2", "range", "sd"), nan
        )
    w = 1.0 / se**2
    pooled = float(np.sum(w * theta) / np.sum(w))
    q = float(np.sum(w * (theta - pooled) ** 2))
    df = k - 1
    return {
        "n_groups": float(k),
        "pooled": pooled,
        "q": q,
        "df": float(df),
        "p_value": float(stats.chi2.sf(q, df)),
        "i2": max(0.0, (q - df) / q) if q > 0 else 0.0,
        "tau2": _tau2(q, df, w, f"{metric}[{class_name}]"),
        "range": float(theta.max() - theta.min()),
        "sd": float(theta.std(ddof=1)),
    }


#: A bootstrap standard error at or below this is rounding noise of a constant metric.
_SE_FLOOR = 1e-12


def _tau2(q: float, df: int, w: np.ndarray, what: str) -> float:
    """DerSimonian-Laird tau^2; NaN (with the reason) when its scale is not positive.

    ``sum w - sum w^2 / sum w`` is computed as ``2 sum_{i<j} w_i w_j / sum w`` (no
    cancellation: every term is positive), on weights scaled by their maximum.
    """
    u = w / w.max()  # (K,) in (0, 1]
    after = np.cumsum(u[::-1])[::-1][1:]  # sum_{j>i} u_j for i < K-1
    scale = w.max() * 2.0 * float(np.sum(u[:-1] * after)) / float(u.sum())
    if not (np.isfinite(scale) and scale > 0):
        warnings.warn(
            f"site_heterogeneity: tau2 of {what} undefined: the groups' weights (1 / se^2) "
            f"give no between-group scale (sum w - sum w^2 / sum w = {scale:.3g}); set to NaN.",
            UndefinedMetricWarning,
            stacklevel=3,
        )
        return float("nan")
    return max(0.0, (q - df) / scale)
