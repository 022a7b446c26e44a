"""What changed between two models scored on the same test rows.

**Paired comparison** (:func:`paired_difference`, what ``medcl report --compare`` and the update
gate use): both models are scored on the same test rows, so the question is whether the
*difference* is beyond chance. Every bootstrap resample draws one set of rows (stratified by
class, seeded per group) and scores both models on it; the percentile interval of the
``after - before`` replicates is the CI of the difference, and a metric is **dropped** when
that interval lies entirely on the bad side of 0 (**improved**: on the good side; otherwise
**no significant change**). Pairing removes the row-to-row variation both models share, so a
small but consistent drop is found even when the two models' own intervals overlap.

:func:`compare_tables` is the older unpaired rule on two tables, kept for tables without
row-level predictions. There a metric is flagged as **dropped** when it moved beyond the confidence intervals: the new
model's interval lies entirely on the bad side of the reference (previous or compared) model's
interval (new ``ci_high`` below reference ``ci_low``; for calibration error, where lower is
better, new ``ci_low`` above reference ``ci_high``). It is **improved** when the intervals are
separated the other way, and **within CI** when they overlap.

Non-overlapping 95% intervals is a deliberately conservative rule: for two independent
estimates with equal standard errors it corresponds to a two-sided p of about 0.006, so an
equally good model retrained on the same data is rarely flagged, while a clinically relevant
drop is. (Flagging whenever the new point estimate leaves the reference interval flags an
equally good model in a few percent of the metrics, i.e. almost always somewhere in a table of
a hundred metrics.) Both tables are bootstrapped on identical rows with the same seed.
"""

from __future__ import annotations

__all__ = [
    "LOWER_IS_BETTER",
    "align_rows",
    "compare_predictions",
    "compare_run_predictions",
    "compare_tables",
    "paired_difference",
]

import warnings
import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from medcl.errors import DataError
from medcl.metrics.clinical.bootstrap import _replicates
from medcl.metrics.clinical.discrimination import _point
from medcl.reports.predictions import Predictions
from medcl.reports.results import REPORT_METRICS, RunResults

#: Metrics where a larger value is worse.
LOWER_IS_BETTER = frozenset({"ece"})
_KEYS = ["group", "metric", "class"]


def align_rows(before: Predictions, after: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks selecting, in each prediction set, the test rows both models can score.

    Rows are matched experience by experience (prediction files list rows in experience order;
    a run extended by ``medcl update`` has more experiences later). Only classes both models
    can output are kept, so a class-incremental model is compared on the classes it knew.

    Args:
        before: the reference model's predictions.
        after: the new model's predictions.

    Returns:
        ``(mask_before (N_b,), mask_after (N_a,))``: the selected rows are the same test images,
        in the same order.

    Raises:
        DataError: an experience has different test rows in the two (different scenario or
        seed), or no row is shared.
    """
    k = min(before.n_classes, after.n_classes)
    mb = np.zeros(len(before), dtype=bool)
    ma = np.zeros(len(after), dtype=bool)
    for e in np.intersect1d(np.unique(before.experience), np.unique(after.experience)):
        ib = np.flatnonzero(before.experience == e)
        ia = np.flatnonzero(after.experience == e)
        if ib.size != ia.size or not np.array_equal(before.labels[ib], after.labels[ia]):
            raise DataError(
                f"experience {e} has different test rows in the two runs ({ib.size} vs {ia.size} "
                "rows, or different labels); compare runs of the same scenario and seed "
                "(same `scenario` and `seed` in config.yaml)."
            )
        keep = before.labels[ib] < k
        mb[ib[keep]] = True
        ma[ia[keep]] = True
    if not mb.any():
        raise DataError(
            "the two models share no test row they can both score; compare runs of the same "
            "scenario and seed."
        )
    return mb, ma


def compare_tables(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Join two clinical tables of the same rows and flag the metrics that moved beyond the CI.

    Args:
        before: reference table (:meth:`~medcl.reports.results.RunResults.clinical`), with
            columns ``group, metric, class, value, ci_low, ci_high``.
        after: the new model's table on the same rows.

    Returns:
        One row per ``(group, metric, class)`` present in both with columns ``group,
        experience, site, n, metric, class, before, before_low, before_high, after, after_low,
        after_high, delta, change`` where ``change`` is ``"dropped"``, ``"improved"``,
        ``"within CI"`` or ``"n/a"`` (a value or interval is undefined).
    """
    need = {*_KEYS, "value", "ci_low", "ci_high"}
    for name, t in (("before", before), ("after", after)):
        if not need <= set(t.columns):
            raise DataError(
                f"compare_tables: `{name}` needs columns {sorted(need)}; got {list(t.columns)}."
            )
    cols = ["value", "ci_low", "ci_high"]
    b = before[[*_KEYS, *cols]].rename(
        columns=dict(zip(cols, ["before", "before_low", "before_high"], strict=True))
    )
    extra = [c for c in ("experience", "site", "n") if c in after.columns]
    a = after[[*_KEYS, *extra, *cols]].rename(
        columns=dict(zip(cols, ["after", "after_low", "after_high"], strict=True))
    )
    out = a.merge(b, on=_KEYS, how="inner", sort=False)
    out["delta"] = out["after"] - out["before"]
    good = np.where(out["metric"].isin(LOWER_IS_BETTER), -1.0, 1.0)
    # Signed so that larger is better: intervals of calibration error are negated and swapped.
    ref_lo = np.where(good > 0, out["before_low"], -out["before_high"])
    ref_hi = np.where(good > 0, out["before_high"], -out["before_low"])
    new_lo = np.where(good > 0, out["after_low"], -out["after_high"])
    new_hi = np.where(good > 0, out["after_high"], -out["after_low"])
    defined = np.isfinite(ref_lo) & np.isfinite(ref_hi) & np.isfinite(new_lo) & np.isfinite(new_hi)
    change = np.where(
        new_hi < ref_lo, "dropped", np.where(new_lo > ref_hi, "improved", "within CI")
    )
    out["change"] = np.where(defined, change, "n/a")
    order = [
        "group",
        *[c for c in ("experience", "site", "n") if c in out],
        "metric",
        "class",
        "before",
        "before_low",
        "before_high",
        "after",
        "after_low",
        "after_high",
        "delta",
        "change",
    ]
    return out[order].reset_index(drop=True)


def _paired_group(
    yt: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    names: list[str],
    metrics: Sequence[str],
    *,
    seed: np.random.SeedSequence,
    n_resamples: int,
    alpha: float,
    threshold: float | None,
    n_bins: int,
) -> pd.DataFrame:
    """Point values, CIs and the paired CI of ``after - before`` for one group of rows."""
    parts = []
    for probs in (before, after):
        k = probs.shape[1]
        point = _point(yt, probs, list(metrics), names[:k], threshold, n_bins)
        reps = _replicates(  # the same seed and labels draw the same rows for both models
            yt,
            probs,
            list(metrics),
            names[:k],
            threshold=threshold,
            n_resamples=n_resamples,
            stratified=True,
            seed=seed,
            n_bins=n_bins,
        )
        parts.append((point.set_index(["metric", "class"])["value"], reps))
    (vb, rb), (va, ra) = parts
    keys = [k for k in vb.index if k in set(va.index)]
    ib = [vb.index.get_loc(k) for k in keys]
    ia = [va.index.get_loc(k) for k in keys]
    diff = ra[:, ia] - rb[:, ib]  # (B, R) paired replicates of the difference
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined metrics stay NaN
        b_lo, b_hi = np.nanpercentile(rb[:, ib], q, axis=0)
        a_lo, a_hi = np.nanpercentile(ra[:, ia], q, axis=0)
        d_lo, d_hi = np.nanpercentile(diff, q, axis=0)
        defined = np.isfinite(diff).sum(0)
        below = np.nanmean(diff <= 0, axis=0, where=np.isfinite(diff))
        above = np.nanmean(diff >= 0, axis=0, where=np.isfinite(diff))
    out = pd.DataFrame(keys, columns=["metric", "class"])
    out["before"], out["before_low"], out["before_high"] = vb.to_numpy()[ib], b_lo, b_hi
    out["after"], out["after_low"], out["after_high"] = va.to_numpy()[ia], a_lo, a_hi
    out["delta"] = out["after"] - out["before"]
    out["delta_low"], out["delta_high"] = d_lo, d_hi
    # two-sided bootstrap p-value of "no difference"
    out["p_value"] = np.where(defined > 0, np.minimum(1.0, 2 * np.minimum(below, above)), np.nan)
    return out


def paired_difference(
    y_true: np.ndarray,
    p_before: np.ndarray,
    p_after: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    metrics: Sequence[str] = REPORT_METRICS,
    class_names: Sequence[str] | None = None,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    threshold: float | None = None,
    n_bins: int = 15,
) -> pd.DataFrame:
    """Paired bootstrap CIs of ``after - before`` for every metric, per group and overall.

    Args:
        y_true: ``(N,)`` class ids of the shared test rows.
        p_before: ``(N, K_b)`` probabilities of the reference (deployed / previous) model.
        p_after: ``(N, K_a)`` probabilities of the new model on the same rows (``K_a >= K_b``
            for a class-incremental update; only classes both models output are compared).
        groups: ``(N,)`` group (site / experience) of each row; ``None``: overall only.
        metrics: names from :data:`medcl.metrics.clinical.METRICS`.
        class_names: names of the classes (default ``"0"``, ``"1"``, ...).
        n_resamples, alpha, threshold, n_bins: as in :func:`~medcl.metrics.clinical.bootstrap_ci`.
        seed: root seed; each group's resamples are seeded from it and the group's name, and
            both models are scored on the same resampled rows.

    Returns:
        Tidy frame ``group, n, metric, class, before, before_low, before_high, after,
        after_low, after_high, delta, delta_low, delta_high, p_value, change``; ``change`` is
        ``"dropped"`` / ``"improved"`` when the CI of the difference excludes 0 (signed so
        that lower calibration error is better), ``"no significant change"`` otherwise, and
        ``"n/a"`` where a metric is undefined.
    """
    yt = np.asarray(y_true, dtype=np.int64)
    pb, pa = np.asarray(p_before, np.float64), np.asarray(p_after, np.float64)
    if pb.shape[0] != yt.size or pa.shape[0] != yt.size:
        raise DataError(
            f"paired_difference needs one row per label in both models; got {yt.size} labels, "
            f"{pb.shape[0]} and {pa.shape[0]} rows. Align them first (align_rows)."
        )
    k = max(pb.shape[1], pa.shape[1])
    names = [str(c) for c in (class_names or range(k))]
    keys: list = [] if groups is None else sorted(pd.unique(np.asarray(groups)), key=str)
    parts = [(g, np.asarray(groups) == g) for g in keys] + [("overall", np.ones(yt.size, bool))]
    tables = []
    for key, mask in parts:
        child = np.random.SeedSequence([seed, zlib.crc32(str(key).encode())])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # undefined metrics: NaN, reported as "n/a"
            t = _paired_group(
                yt[mask],
                pb[mask],
                pa[mask],
                names,
                metrics,
                seed=child,
                n_resamples=n_resamples,
                alpha=alpha,
                threshold=threshold,
                n_bins=n_bins,
            )
        t.insert(0, "n", int(mask.sum()))
        t.insert(0, "group", key)
        tables.append(t)
    out = pd.concat(tables, ignore_index=True)
    good = np.where(out["metric"].isin(LOWER_IS_BETTER), -1.0, 1.0)
    lo = np.where(good > 0, out["delta_low"], -out["delta_high"])
    hi = np.where(good > 0, out["delta_high"], -out["delta_low"])
    change = np.where(hi < 0, "dropped", np.where(lo > 0, "improved", "no significant change"))
    out["change"] = np.where(np.isfinite(lo) & np.isfinite(hi), change, "n/a")
    return out


def compare_predictions(
    before: Predictions,
    after: Predictions,
    *,
    experience_names: Sequence[str],
    experience_sites: Sequence[str] = (),
    class_names: Sequence[str] | None = None,
    **options,
) -> pd.DataFrame:
    """:func:`paired_difference` of two models' test predictions, per experience and overall.

    Rows are matched with :func:`align_rows`; ``options`` are ``n_resamples, alpha, seed,
    threshold, n_bins``.

    Returns:
        The :func:`paired_difference` frame with ``experience`` and ``site`` columns added.
    """
    mb, ma = align_rows(before, after)
    names = list(experience_names)
    exp = after.experience[ma]
    groups = np.asarray([names[e] if e < len(names) else str(e) for e in exp], dtype=object)
    table = paired_difference(
        after.labels[ma],
        before.probs[mb],
        after.probs[ma],
        groups=groups,
        class_names=class_names,
        **options,
    )
    index = {n: i for i, n in enumerate(names)}
    sites = list(experience_sites)
    table.insert(1, "experience", [index.get(g, pd.NA) for g in table["group"]])
    table.insert(
        2,
        "site",
        [
            sites[index[g]] if g in index and index[g] < len(sites) else "all"
            for g in table["group"]
        ],
    )
    table["experience"] = table["experience"].astype("Int64")
    return table


def compare_run_predictions(
    run: RunResults, before: Predictions, after: Predictions, **options
) -> pd.DataFrame:
    """:func:`compare_predictions` labelled with ``run``'s experience names, sites and classes.

    ``after`` is ``run``'s model (its class names are the run's first ``after.n_classes``).
    """
    return compare_predictions(
        before,
        after,
        experience_names=run.experience_names,
        experience_sites=run.experience_sites,
        class_names=run.class_names(after.n_classes),
        **options,
    )
