"""The calibration and prediction-set sections of the clinical report.

Both read the model's post-hoc calibration record (``calibration/after-NNN.json``, written by
:mod:`medcl.engine.posthoc` on validation data) and apply it to the test predictions:

- **calibration**: ECE/MCE of the raw probabilities and after temperature scaling (Guo et al.,
  ICML 2017), overall and per site (experience), each with a stratified bootstrap CI, and the
  reliability diagrams before and after;
- **prediction sets**: empirical coverage (Wilson CI) and mean set size (normal CI) of the APS
  sets per site and overall (:func:`medcl.metrics.coverage.coverage_table`), against the target
  ``1 - alpha``, with the thresholds used.

A run written before medcl calibrated has no record: both sections say so and show the raw
calibration only.
"""

from __future__ import annotations

__all__ = ["calibration_figures", "calibration_section", "prediction_set_section"]

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medcl.metrics.calibration import expected_calibration_error, plot_reliability
from medcl.metrics.clinical import per_group_metrics
from medcl.metrics.conformal import min_calibration_rows
from medcl.reports import plots
from medcl.reports.predictions import Predictions
from medcl.reports.results import RunResults
from medcl.reports.sections import quiet, with_notes

TEMPERATURE_REFERENCE = "Guo et al., On Calibration of Modern Neural Networks, ICML 2017"
CONFORMAL_REFERENCES = (
    "Vovk, Gammerman and Shafer, Algorithmic Learning in a Random World, 2005",
    "Sadinle, Lei and Wasserman, Least Ambiguous Set-Valued Classifiers with Bounded Error "
    "Levels, JASA 2019 (score lac)",
    "Romano, Sesia and Candès, Classification with Valid and Adaptive Coverage, NeurIPS 2020 "
    "(score aps)",
    "Angelopoulos and Bates, A Gentle Introduction to Conformal Prediction and "
    "Distribution-Free Uncertainty Quantification, 2021",
)
_GROUPING = {  # how the thresholds are grouped, in words (calibration.mondrian)
    "none": "one threshold for all sites and classes",
    "site": "one threshold per site",
    "class": "one threshold per class",
    "site_class": "one threshold per site and class",
}
_NO_RECORD = (
    "No post-hoc calibration record (calibration/after-{k:03d}.json) for the reported model: "
    "the run predates it or the file was removed. Probabilities are shown as the model gives "
    "them (temperature 1) and no prediction sets are reported."
)


def _scored(res: RunResults) -> Predictions:
    p = res.predictions()
    return p.subset(p.scorable())


def _keys(res: RunResults) -> list[str]:
    """Group label of each experience as :meth:`RunResults.clinical` bootstraps it (its name if
    names are unique, else its index): the same label seeds the same resamples."""
    names = res.experience_names
    if len(set(names)) == len(names) and "overall" not in names:
        return list(names)
    return [str(i) for i in range(len(names))]


def _ece_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[(table["metric"] == "ece") & (table["class"] == "overall")]


def calibration_section(
    res: RunResults, table: pd.DataFrame, notes: list[str], *, options: dict[str, Any]
) -> dict[str, Any]:
    """ECE/MCE before and after temperature scaling, overall and per site, with CIs.

    Args:
        res: the run.
        table: :meth:`RunResults.clinical` of the reported model (per experience + overall,
            with ``"ece"``): the uncalibrated values and CIs are taken from it.
        notes: report notes (a missing record and undefined metrics are added).
        options: the bootstrap options of the report (``n_resamples``, ``alpha``, ``seed``,
            ``threshold``, ``n_bins``), reused for the calibrated ECE.

    Returns:
        ``ece, ece_ci_low, ece_ci_high, mce, n_bins, bins`` (raw probabilities); from the
        record ``temperature, temperature_fitted, fitted_on, n_temperature, held_out`` and the
        test ECE after scaling ``ece_after, ece_after_ci_low, ece_after_ci_high, mce_after``;
        ``table``: per site (experience) and ``overall``, ``n`` and ECE before and after with
        CIs; ``note``: why nothing was calibrated (then ``temperature`` is ``None``), or the
        record's own note.
    """
    n_bins = options["n_bins"]
    before = _ece_rows(table)
    overall = before[before["group"] == "overall"].iloc[0]
    out: dict[str, Any] = {
        "ece": overall["value"],
        "ece_ci_low": overall["ci_low"],
        "ece_ci_high": overall["ci_high"],
        "mce": res.calibration_error(n_bins=n_bins)["mce"],
        "n_bins": n_bins,
        "bins": res.calibration(n_bins=n_bins),
        "temperature": None,
        "note": "",
    }
    posthoc = res.posthoc()
    rows = [
        {
            "experience": None if r["group"] == "overall" else int(r["experience"]),
            "group": r["group"],
            "n": int(r["n"]),
            "ece": r["value"],
            "ece_ci_low": r["ci_low"],
            "ece_ci_high": r["ci_high"],
        }
        for _, r in before.iterrows()
    ]
    out["table"] = rows
    if posthoc is None:
        out["note"] = _NO_RECORD.format(k=res.final)
        notes.append(out["note"])
        return out
    record = posthoc.record
    out |= {
        "temperature": posthoc.temperature,
        # per class (each experience's classes share one; a row takes its top class's), or []
        "temperatures": _class_temperatures(posthoc, res),
        "reference": TEMPERATURE_REFERENCE,
        "fitted_on": record.get("fitted_on"),
        "n_temperature": record.get("n_temperature"),
        "held_out": record.get("held_out"),
        "temperature_fitted": bool(res.config.get("calibration", {}).get("temperature", True)),
    }
    if record.get("note"):
        out["note"] = f"Calibration after experience {res.final}: {record['note']}."
        notes.append(out["note"])
    p = _scored(res)
    calibrated = posthoc.calibrate(p.probs)
    after = with_notes(
        per_group_metrics,
        notes,
        p.labels,
        calibrated,
        np.asarray(_keys(res), dtype=object)[p.experience],
        ["ece"],
        class_names=res.class_names(p.n_classes),
        **options,
    )
    by_group = {str(r["group"]): r for _, r in _ece_rows(after).iterrows()}
    keys = _keys(res)
    for row in rows:
        r = by_group["overall" if row["experience"] is None else keys[row["experience"]]]
        row["ece_after"] = r["value"]
        row["ece_after_ci_low"], row["ece_after_ci_high"] = r["ci_low"], r["ci_high"]
    last = rows[-1]
    out |= {
        "ece_after": last["ece_after"],
        "ece_after_ci_low": last["ece_after_ci_low"],
        "ece_after_ci_high": last["ece_after_ci_high"],
        "mce_after": expected_calibration_error(p.labels, calibrated, n_bins=n_bins)[1],
    }
    return out


def _class_temperatures(posthoc: Any, res: RunResults) -> list[dict[str, Any]]:
    """``[{"class", "temperature"}]`` when the record has one temperature per experience's
    classes (applied by the predicted class), else ``[]``."""
    per_class = posthoc.record.get("temperatures") or []
    names = res.class_names(len(per_class)) if per_class else []
    return [{"class": n, "temperature": t} for n, t in zip(names, per_class, strict=True)]


def prediction_set_section(
    res: RunResults, notes: list[str], *, confidence: float = 0.95
) -> dict[str, Any]:
    """Coverage and set size of the conformal prediction sets on the test split, per site.

    Args:
        res: the run.
        notes: report notes (sites below target, thresholds that are not finite).
        confidence: level of the coverage and set-size intervals (:meth:`RunResults.coverage`).

    Returns:
        ``available`` (False with a ``note`` when the model has no conformal calibration);
        otherwise ``alpha, target_coverage, mondrian, grouping, method, n_calibration,
        thresholds`` (one row per site and class threshold, ``qhat`` ``None`` where too few
        calibration images gave no finite threshold), ``table`` (one row per site and
        ``overall``: :func:`medcl.metrics.coverage.coverage_table` plus ``below_target``: the
        whole coverage interval lies under ``1 - alpha``), ``n_empty`` and ``under_covered``.
    """
    posthoc = res.posthoc()
    if posthoc is None or posthoc.conformal is None:
        note = (
            _NO_RECORD.format(k=res.final)
            if posthoc is None
            else "The reported model has no conformal calibration (calibration.conformal was "
            "off, or no validation split to calibrate on): no prediction sets."
        )
        if posthoc is not None:
            notes.append(note)
        return {"available": False, "note": note}
    sets = posthoc.conformal
    target = 1.0 - sets.alpha
    cov = res.coverage(confidence=confidence)
    cov = cov.assign(below_target=cov["coverage_high"] < target)
    under = [str(g) for g, low in zip(cov["group"], cov["below_target"], strict=True) if low]
    record = sets.to_dict()
    names = res.class_names(len(next(iter(record["groups"]))["qhat"]))
    per_class = sets.mondrian in ("class", "site_class")
    thresholds = [  # one row per (site, class) threshold; classes merged when they share one
        {
            "site": g["site"] if sets.by_site else "all sites",
            "class": names[c] if per_class else "all classes",
            "n": g["n"][c],
            "qhat": g["qhat"][c],
        }
        for g in record["groups"]
        for c in (range(len(names)) if per_class else [0])
        if g["n"][c] > 0  # a class never seen at a site enters its sets only as the top class
    ]
    infinite = [f"{t['site']} / {t['class']}" for t in thresholds if t["qhat"] is None]
    if infinite:
        notes.append(
            f"Prediction sets: too few calibration images for a finite threshold at alpha "
            f"{sets.alpha:g}{_at_confidence(sets.confidence)} for {infinite} (needs n >= "
            f"{min_calibration_rows(sets.alpha, sets.confidence)}): that class enters every set there."
        )
    if under:
        notes.append(
            f"Prediction sets: test coverage is below the target {target:.0%} beyond its "
            f"confidence interval at {under}; the data there may differ from the validation "
            "data the sets were calibrated on."
        )
    overall = cov[cov["group"] == "overall"].iloc[0]
    return {
        "available": True,
        "confidence_level_percent": round(100 * confidence, 6),
        "alpha": sets.alpha,
        "target_coverage": target,
        "target_coverage_percent": round(100 * target, 6),
        "mondrian": sets.mondrian,
        "grouping": _GROUPING[sets.mondrian],
        "method": record["method"],
        "training_conditional_percent": None
        if sets.confidence is None
        else round(100 * sets.confidence, 6),
        "references": list(CONFORMAL_REFERENCES),
        "n_calibration": sets.n,
        "thresholds": thresholds,
        "table": cov,
        "n_empty": int(overall["empty"]),
        "under_covered": under,
    }


def _at_confidence(confidence: float | None) -> str:
    return "" if confidence is None else f" and confidence {confidence:g}"


def temperature_text(temperatures: list[float]) -> str:
    """``"T = 3.10"``, or ``"T = 3.10-5.35 by predicted class"`` when the classes differ."""
    lo, hi = min(temperatures), max(temperatures)
    return f"T = {lo:.2f}" if lo == hi else f"T = {lo:.2f}-{hi:.2f} by predicted class"


def _before_after(
    labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, t: list[float], n_bins: int
) -> Figure:
    fig = Figure(figsize=(8.0, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    plot_reliability(labels, raw, n_bins=n_bins, ax=left, title="before (raw)")
    plot_reliability(
        labels, calibrated, n_bins=n_bins, ax=right, title=f"after {temperature_text(t)}"
    )
    return fig


def calibration_figures(res: RunResults, *, n_bins: int) -> dict[str, str]:
    """``{"reliability_before_after": PNG data URI}``: reliability diagrams of the raw and the
    temperature-scaled test probabilities side by side; empty without a calibration record."""
    posthoc = res.posthoc()
    if posthoc is None:
        return {}
    p = _scored(res)
    fig = quiet(
        _before_after, p.labels, p.probs, posthoc.calibrate(p.probs), posthoc.temperatures, n_bins
    )
    return {"reliability_before_after": plots.figure_data_uri(fig)}
