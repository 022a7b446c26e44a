"""What changed between two models scored on the same test rows.

A metric is flagged as **dropped** when it moved beyond the confidence intervals: the new
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

__all__ = ["LOWER_IS_BETTER", "align_rows", "compare_tables"]

import numpy as np
import pandas as pd

from medcl.errors import DataError
from medcl.reports.results import Predictions

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
