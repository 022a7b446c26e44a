"""The clinical evaluation report: ``report.html`` (one offline file) + ``report.json``.

Contents follow the reporting items of TRIPOD+AI (Collins et al., BMJ 2024) and CLAIM (Mongan
et al., Radiology: AI 2020; 2024 update) that a continual-learning update touches: model and
data summary with sources and licences, discrimination with bootstrap 95% CIs, calibration
before and after temperature scaling, conformal prediction-set coverage per site, confusion
matrix, per-site performance and heterogeneity, continual behaviour (accuracy matrix,
forgetting, stability-gap curves, what changed since the previous model), compute cost and the
most confident errors.

``report.json`` holds every number the page shows (NaN as ``null``); the page is rendered from
that same dictionary. Patient identifiers never enter either: per-row metadata is reduced to
:data:`~medcl.reports.results.SAFE_COLUMNS` plus the columns the user marks safe, and
thumbnails are pixels only.
"""

from __future__ import annotations

__all__ = ["Report", "build_report", "write_report"]

import datetime as _dt
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import medcl
from medcl.engine.checkpoint import atomic_write_text
from medcl.engine.layout import RunLayout
from medcl.errors import MedclError
from medcl.progress import progress_bar
from medcl.reports import sections
from medcl.reports.calibration_section import (
    calibration_figures,
    calibration_section,
    prediction_set_section,
)
from medcl.reports.results import RunResults
from medcl.reports.saliency_gallery import saliency_gallery


def _plain(x: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None, frames to records."""
    if isinstance(x, pd.DataFrame):
        return [_plain(r) for r in x.to_dict(orient="records")]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple | np.ndarray):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if x is None or x is pd.NA:
        return None
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def _fmt(x: Any, digits: int = 3) -> str:
    """Number for the page: ``n/a`` for undefined, thousands separators for counts."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int) or (float(x).is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


def _cell(records: list[dict[str, Any]], metric: str, cls: str, group: str | None = None):
    """The record of ``metric`` x ``cls`` (x ``group``) in a tidy table, or None."""
    for r in records:
        if r["metric"] == metric and r["class"] == cls and group in (None, r.get("group")):
            return r
    return None


@dataclass
class Report:
    """A built report: :attr:`data` (exactly what report.json holds) plus embedded images.

    Attributes:
        data: JSON-safe nested dict; every number on the page comes from it.
        figures: plot name -> PNG data URI.
        thumbnails: prediction row -> PNG data URI of the test image.
        saliency: prediction row -> PNG data URI of its Grad-CAM overlay.
    """

    data: dict[str, Any]
    figures: dict[str, str] = field(default_factory=dict)
    thumbnails: dict[int, str] = field(default_factory=dict)
    saliency: dict[int, str] = field(default_factory=dict)

    def html(self) -> str:
        """The page, rendered by jinja2 from :attr:`data` (autoescaped, no scripts)."""
        from jinja2 import Environment, PackageLoader, select_autoescape

        env = Environment(
            loader=PackageLoader("medcl.reports", "templates"),
            autoescape=select_autoescape(["html", "j2"]),
        )
        env.filters["num"] = _fmt
        env.globals["cell"] = _cell
        template = env.get_template("report.html.j2")
        return template.render(
            d=self.data, fig=self.figures, thumbs=self.thumbnails, cams=self.saliency
        )

    def write(self, out_dir: str | Path) -> Path:
        """Write ``report.html`` and ``report.json`` into ``out_dir``; return the HTML path."""
        out = RunLayout(out_dir)
        atomic_write_text(out.report_json, json.dumps(self.data, indent=1, allow_nan=False))
        atomic_write_text(out.report_html, self.html())
        return out.report_html


def _load_scenario(res: RunResults, notes: list[str]):
    try:
        return res.rebuild_scenario()
    except (MedclError, OSError, RuntimeError, ValueError) as e:
        # The message may quote file paths, which can hold names: console only, not the page.
        warnings.warn(f"report: the run's data could not be loaded again: {e}", stacklevel=3)
        notes.append(
            f"The data could not be loaded again ({type(e).__name__}; details on the "
            "console), so train/val counts, data sources and error thumbnails are "
            "omitted."
        )
        return None


def build_report(
    run_dir: str | Path,
    compare: str | Path | None = None,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    threshold: float | None = None,
    n_bins: int = 15,
    errors_per_class: int = 4,
    safe_id_columns: Sequence[str] = (),
    thumbnails: bool = True,
    saliency: bool = True,
    experience: int | None = None,
    allow_partial: bool = False,
) -> Report:
    """Compute everything the report shows for the final model of ``run_dir``.

    Args:
        run_dir: a run directory (``medcl run`` output).
        compare: another run of the same scenario and seed whose final model is a second
            reference for "what changed" (the first is this run's previous model).
        n_resamples: bootstrap resamples (stratified by class) for every CI.
        seed: bootstrap seed.
        alpha: 1 - confidence level (0.05: 95% intervals).
        threshold: binary only: operating point ``p_1 >= threshold`` instead of the arg-max.
        n_bins: equal-width confidence bins for ECE/MCE and the reliability diagram.
        errors_per_class: confident errors shown per true class.
        safe_id_columns: per-row columns the user marks free of patient identifiers (shown
            with the failure cases).
        thumbnails: load the run's data again for error thumbnails, train/val counts and data
            sources (off: test counts only, no thumbnails).
        saliency: per site, the most confident errors with Grad-CAM maps of the restored final
            model and the randomisation sanity check (:mod:`medcl.reports.saliency_gallery`;
            needs ``thumbnails``).
        experience: report the model after this experience as the final one.
        allow_partial: report an unfinished run's last completed experience (otherwise an
            unfinished run is an error).

    Returns:
        The :class:`Report`.

    Raises:
        DataError: unreadable run directory, or a ``compare`` run of another scenario.
    """
    res = RunResults(
        run_dir,
        safe_id_columns=safe_id_columns,
        experience=experience,
        allow_partial=allow_partial,
    )
    options = {
        "n_resamples": n_resamples,
        "alpha": alpha,
        "seed": seed,
        "threshold": threshold,
        "n_bins": n_bins,
    }
    notes: list[str] = []
    bar = progress_bar(total=5, desc="report", unit="step")
    bar.set_postfix_str("data")
    scenario = _load_scenario(res, notes) if thumbnails else None
    final = res.predictions()
    _step(bar, "clinical metrics (bootstrap)")
    table = sections.with_notes(res.clinical, notes, **options)  # per experience + overall
    overall = table[table["group"] == "overall"]
    confusion = res.confusion_frame(threshold=threshold)
    k = final.n_classes
    data: dict[str, Any] = {
        "report": {
            "title": f"Clinical evaluation report: {res.name}",
            "medcl": medcl.__version__,
            "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "model_after_experience": res.final,
            "n_predictions": int(final.scorable().sum()),
            "n_resamples": n_resamples,
            "alpha": alpha,
            "confidence_level_percent": round(100 * (1 - alpha), 6),
            "bootstrap_seed": seed,
            "stratified_bootstrap": True,
            "n_bins": n_bins,
            "operating_point": "arg-max" if threshold is None else f"p1 >= {threshold}",
            "safe_id_columns": list(res.safe_id_columns),
        },
        "model": sections.model_section(res),
        "data": sections.data_section(res, scenario, notes),
        "discrimination": overall[overall["metric"] != "ece"],
        "calibration": calibration_section(res, table, notes, options=options),
        "prediction_sets": prediction_set_section(res, notes, confidence=1 - alpha),
        "confusion": {
            "class_names": res.class_names(k),
            "counts": confusion["count"].to_numpy().reshape(k, k),
            "normalised": confusion["fraction"].to_numpy().reshape(k, k),
        },
        "sites": {
            "table": table[table["group"] != "overall"],
            "heterogeneity": sections.heterogeneity_section(res, table, notes),
        },
        "continual": sections.continual_section(res),
        "changes": [],
        "compute": res.compute() | {"fit": res.fit_frame()},
    }
    references = []
    if res.previous is not None:
        name = res.experience_names[res.previous]
        references.append(
            (res, res.previous, f"previous model (after experience {res.previous}: {name})")
        )
    if compare is not None:
        other = RunResults(compare)
        references.append((other, other.final, f"run {other.name} (final model)"))
    _step(bar, "changes")
    for ref, after, label in references:
        change = sections.change_section(res, ref, after, label, table, options, notes)
        if change is not None:
            data["changes"].append(change)
    _step(bar, "failure cases")
    data["failures"], thumbs = sections.failure_section(
        res, scenario, per_class=errors_per_class, threshold=threshold, notes=notes
    )
    data["saliency"], site_thumbs, cams = (
        saliency_gallery(res, scenario, threshold=threshold, notes=notes)
        if saliency
        else ({"shown": False, "sites": []}, {}, {})
    )
    thumbs |= site_thumbs
    data["summary"] = sections.summary_section(overall, data)
    data["notes"] = notes
    data["gate"] = [  # update-gate decisions (medcl.gate), oldest first
        json.loads(f.read_text()) for f in sorted(RunLayout(run_dir).gate.glob("after-*.json"))
    ]
    _step(bar, "figures")
    figures = sections.figures(res, table, confusion, n_bins=n_bins)
    figures |= calibration_figures(res, n_bins=n_bins)
    bar.close()
    return Report(_plain(data), figures, thumbs, cams)


def _step(bar: Any, name: str) -> None:
    """One step of the report done; ``name`` is the next one."""
    bar.update(1)
    bar.set_postfix_str(name)


def write_report(
    run_dir: str | Path,
    compare: str | Path | None = None,
    *,
    out_dir: str | Path | None = None,
    **options: Any,
) -> Path:
    """Build the report of ``run_dir`` and write ``report.html`` + ``report.json``.

    Args:
        run_dir: the run directory.
        compare: optional second run (same scenario and seed) to compare against.
        out_dir: where to write (default: ``run_dir``).
        **options: the keyword options of :func:`build_report` (``n_resamples``, ``seed``,
            ``alpha``, ``threshold``, ``n_bins``, ``errors_per_class``, ``safe_id_columns``,
            ``thumbnails``, ``saliency``, ``experience``, ``allow_partial``).

    Returns:
        Path of ``report.html``.
    """
    report = build_report(run_dir, compare, **options)
    return report.write(Path(run_dir) if out_dir is None else out_dir)
