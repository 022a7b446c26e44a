"""The sections of the clinical report, each built from a :class:`RunResults` as plain data.

Every builder returns dicts / DataFrames of numbers (what ``report.json`` holds); figures are
built separately by :func:`figures` from the same numbers. Undefined metrics are NaN and their
reasons become report notes.
"""

from __future__ import annotations

__all__ = [
    "change_section",
    "continual_section",
    "data_section",
    "failure_section",
    "figures",
    "heterogeneity_section",
    "model_section",
    "quiet",
    "summary_section",
    "with_notes",
]

import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning

from medcl.errors import DataError
from medcl.metrics.calibration import plot_reliability
from medcl.metrics.stability import plot_stability_curves
from medcl.reports import plots
from medcl.reports.compare import align_rows, compare_run_predictions
from medcl.reports.failures import confident_errors, images_of_rows, thumbnail_png
from medcl.reports.predictions import Predictions
from medcl.reports.results import RunResults


def with_notes(fn: Callable[..., Any], notes: list[str], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; undefined-metric warnings (which metric, where, why) become report notes.

    Other warnings are passed on unchanged.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    for w in caught:
        if not issubclass(w.category, UndefinedMetricWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif str(w.message) not in notes:
            notes.append(str(w.message))
    return out


def quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with warnings silenced (their content is already reported elsewhere)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


_PATH = re.compile(r"(?:[A-Za-z]:)?[\\/]?(?:[^\s\\/]+[\\/])+([^\s\\/]*)")


def _shorten_paths(options: dict[str, Any]) -> dict[str, Any]:
    """Strings for display with every file path cut to its final name (folders may hold names)."""
    return {k: _PATH.sub(r"\1", v) if isinstance(v, str) else v for k, v in options.items()}


def model_section(res: RunResults) -> dict[str, Any]:
    """Method, backbone, training and memory settings, software versions."""
    cfg, env = res.config, res.environment
    strategy = cfg.get("strategy", {})
    return {
        "run": res.name,
        "strategy": strategy.get("name"),
        "strategy_options": {k: v for k, v in strategy.items() if k != "name"},
        "model": {k: v for k, v in cfg.get("model", {}).items() if k != "checkpoint_path"},
        "scenario_options": _shorten_paths(
            {k: v for k, v in cfg.get("scenario", {}).items() if k != "name"}
        ),
        "train": cfg.get("train", {}),
        "memory": cfg.get("memory", {}),
        "seed": cfg.get("seed"),
        "environment": {
            k: env.get(k)
            for k in ("medcl", "torch", "timm", "monai", "python", "platform", "threads", "cuda")
        },
    }


def data_section(res: RunResults, scenario: Any | None, notes: list[str]) -> dict[str, Any]:
    """Experiences in order, class names, counts per split x site x class, sources + licences."""
    info = res.scenario_info
    names = res.class_names()
    experiences = [
        {
            "index": e["index"],
            "name": e["name"],
            "site": e.get("site", ""),
            "classes": [names[c] for c in e["classes"] if c < len(names)],
            **{s: e.get(s) for s in ("train", "val", "test")},
        }
        for e in info.get("experiences", [])
    ]
    if scenario is not None:
        counts = pd.DataFrame(
            [
                {"experience": e.index, "site": e.site, "split": s, "class": names[c], "n": n}
                for e in scenario
                for s in ("train", "val", "test")
                for c, n in getattr(e, s).class_counts().items()
            ]
        )
        sources = [_shorten_paths(dict(src)) for src in scenario.sources]
        tests = res.test_counts()
        added = tests[tests["experience"] >= len(scenario)]  # cohorts from `medcl update`
        if len(added):
            counts = pd.concat([counts, added], ignore_index=True)
            notes.append(
                f"Experiences {sorted({int(e) for e in added['experience']})} were added by `medcl "
                "update`: only their test counts and no thumbnails are shown."
            )
    else:
        counts = res.test_counts()
        sources = []
        notes.append("Sample counts are test counts only (from the saved predictions).")
    wide = counts.pivot_table(
        index=["experience", "site", "split"],
        columns="class",
        values="n",
        aggfunc="sum",
        fill_value=0,
        sort=False,
    )
    wide = wide.reindex(columns=[c for c in names if c in wide.columns]).reset_index()
    return {
        "scenario": info.get("name"),
        "kind": info.get("kind"),
        "seed": info.get("seed"),
        "input_shape": info.get("input_shape"),
        "class_names": names,
        "experiences": experiences,
        "totals": counts.groupby("split", sort=False)["n"].sum().to_dict(),
        "counts": counts,
        "counts_wide": wide,
        "sources": sources,
    }


def heterogeneity_section(res: RunResults, table: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Heterogeneity across the groups of ``table`` when they span two sites or more."""
    groups = table[table["group"] != "overall"]
    if groups["site"].nunique() < 2:
        notes.append(
            "All experiences come from one site, so heterogeneity across sites is not "
            "computed (the per-experience rows differ in classes, not in site)."
        )
        return pd.DataFrame()
    return with_notes(res.heterogeneity, notes, table)


def continual_section(res: RunResults) -> dict[str, Any]:
    """Accuracy matrices, continual summary, forgetting and stability-gap metrics."""
    R = res.accuracy_matrix()
    stability = quiet(res.stability)
    has_task = bool(res.metrics.get("task_accuracy_matrix"))
    return {
        "experiences": res.experience_names[: R.shape[0]],
        "accuracy_matrix": R,
        "not_scored": bool(np.isnan(R).any()),  # shown as "—" (eval.future, no test rows)
        "task_accuracy_matrix": quiet(res.accuracy_matrix, task_aware=True) if has_task else None,
        "summary": res.metrics.get("summary", {}),
        "task_aware_summary": res.metrics.get("task_aware_summary", {}),
        "forgetting": quiet(res.forgetting),
        "stability": stability,
        "stability_summary": None
        if stability is None or stability.empty
        else quiet(res.stability_summary),
    }


def change_section(
    res: RunResults,
    ref: RunResults,
    ref_after: int,
    label: str,
    final_table: pd.DataFrame,
    options: dict[str, Any],
    notes: list[str],
) -> dict[str, Any] | None:
    """The final model of ``res`` against model ``ref_after`` of ``ref`` on their shared rows.

    Args:
        res: this run.
        ref: the reference run (``res`` itself for the previous model).
        ref_after: which model of ``ref``.
        label: how the page names the reference.
        final_table: :meth:`RunResults.clinical` of the final model on all scorable rows
            (reused when the shared rows are exactly those).
        options: bootstrap options of :meth:`RunResults.clinical`.
        notes: why a comparison is impossible is appended here (then ``None`` is returned).
    """
    before, after = ref.predictions(ref_after), res.predictions()
    if before.n_classes < 2:
        notes.append(
            f"No comparison with the {label}: it has a single output class, so "
            "discrimination metrics are undefined for it."
        )
        return None
    # paired: both models scored on the same resampled rows (medcl.reports.compare)
    try:
        _, mask_after = align_rows(before, after)
    except DataError as e:  # e.g. a federated site without test rows of the earlier classes
        notes.append(f"No comparison with the {label}: {e}")
        return None
    table = compare_run_predictions(res, before, after, **options)
    return {
        "label": label,
        "reference": ref.name,
        "reference_after": ref_after,
        "rows": int(mask_after.sum()),
        "n_compared": len(table),
        "n_dropped": int((table["change"] == "dropped").sum()),
        "n_improved": int((table["change"] == "improved").sum()),
        "table": table,
    }


def failure_section(
    res: RunResults,
    scenario: Any | None,
    *,
    per_class: int,
    threshold: float | None,
    notes: list[str],
) -> tuple[pd.DataFrame, dict[int, str]]:
    """Most confident errors per class of the final model and their thumbnails (by row)."""
    final = res.predictions()
    rows = np.flatnonzero(final.scorable())
    errors = confident_errors(
        final.subset(rows),
        res.class_names(final.n_classes),
        per_class=per_class,
        threshold=threshold,
    )
    errors["row"] = rows[errors["row"].to_numpy()]  # back to rows of the prediction files
    errors.insert(5, "experience_name", [res.experience_names[i] for i in errors["experience"]])
    thumbs = {} if scenario is None else _thumbnails(scenario, final, errors["row"], notes)
    return errors, thumbs


def _thumbnails(
    scenario: Any, final: Predictions, rows: pd.Series, notes: list[str]
) -> dict[int, str]:
    """PNG data URIs of test rows; rows are in experience order, as the predictions are."""
    images = images_of_rows(scenario, final, rows)
    if images is None:
        notes.append(
            "Error thumbnails are omitted: the data loaded again does not match the "
            "run's test set (it changed since the run)."
        )
        return {}
    return {r: plots.png_data_uri(thumbnail_png(image)) for r, image in images.items()}


def summary_section(overall: pd.DataFrame, data: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers (repeated from their sections)."""

    def pick(metric: str, cls: str) -> dict[str, float]:
        r = overall[(overall["metric"] == metric) & (overall["class"] == cls)].iloc[0]
        return {"value": r["value"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}

    summary = data["continual"]["summary"]
    cal = data["calibration"]  # after temperature scaling: None without a calibration record
    calibrated = None
    if cal.get("temperature") is not None:
        keys = ("ece_after", "ece_after_ci_low", "ece_after_ci_high")
        calibrated = dict(zip(("value", "ci_low", "ci_high"), (cal[k] for k in keys), strict=True))
    return {
        "accuracy": pick("accuracy", "overall"),
        "auroc_macro": pick("auroc", "macro"),
        "balanced_accuracy": pick("balanced_accuracy", "overall"),
        "ece": pick("ece", "overall"),
        "ece_calibrated": calibrated,
        "average_accuracy": summary.get("average_accuracy"),
        "forgetting": summary.get("forgetting"),
        "n_dropped": sum(c["n_dropped"] for c in data["changes"]),
        "parameters": data["compute"].get("parameters"),
        "macs": data["compute"].get("macs"),
    }


def figures(
    res: RunResults, final_table: pd.DataFrame, confusion: pd.DataFrame, *, n_bins: int
) -> dict[str, str]:
    """Every plot of the page as a PNG data URI (``confusion``: at the operating point)."""
    final = res.predictions()
    p = final.subset(final.scorable())
    names = res.class_names(p.n_classes)
    R = res.accuracy_matrix()
    uri = plots.figure_data_uri
    out = {
        "roc": uri(plots.plot_roc_curves(p.labels, p.probs, names)),
        "reliability": uri(
            quiet(plot_reliability, p.labels, p.probs, n_bins=n_bins, title="final model")
        ),
        "confusion": uri(plots.plot_confusion(confusion)),
        "sites": uri(plots.plot_groups(final_table)),
        "accuracy_matrix": uri(plots.plot_accuracy_matrix(R, res.experience_names[: R.shape[0]])),
    }
    forgetting = quiet(res.forgetting)
    if len(forgetting):
        out["forgetting"] = uri(plots.plot_forgetting(forgetting))
    curves = res.curves()
    if curves is not None and len(curves):
        out["stability"] = uri(plot_stability_curves(curves, title="accuracy every k updates"))
    return out
