"""A finished run directory as tidy pandas DataFrames: the notebook API behind ``medcl report``.

:class:`RunResults` reads what :func:`medcl.engine.run.run` wrote (``config.yaml``,
``scenario.json``, ``metrics.json``, ``curves.csv``, ``predictions/after-NNN.npz + .csv``) and
answers with tidy frames, one row per experience x site x metric, computed by the metric
functions of :mod:`medcl.metrics` (scikit-learn underneath, vectorised NumPy bootstrap)::

    res = RunResults("runs/pneumonia-sites-replay-s0")
    res.clinical(n_resamples=1000)          # per site + overall, with 95% CIs
    res.accuracy_frame()                    # R[i][j] in long form
    res.stability()                         # stability-gap metrics per experience

Privacy: per-row metadata is reduced on load to :data:`SAFE_COLUMNS` plus the columns the user
names in ``safe_id_columns``; anything else the run stored (file paths, manifest columns that may
hold names or ids) never reaches a frame, a plot or a report.

Loading and checking the run's files is :class:`~medcl.reports.run_directory.RunDirectory`
(the base class); :class:`~medcl.reports.predictions.Predictions` holds one model's test
predictions.
"""

from __future__ import annotations

__all__ = ["REPORT_METRICS", "SAFE_COLUMNS", "Predictions", "RunResults"]

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from medcl.engine.posthoc import PostHoc, read_posthoc
from medcl.errors import DataError
from medcl.metrics.calibration import expected_calibration_error, reliability_table
from medcl.metrics.clinical import DEFAULT_METRICS, confusion, per_group_metrics, site_heterogeneity
from medcl.metrics.continual import (
    check_accuracy_matrix,
    forgetting_per_experience,
    matrix_to_frame,
)
from medcl.metrics.coverage import coverage_table
from medcl.metrics.stability import stability_metrics, summarize_stability
from medcl.reports.predictions import SAFE_COLUMNS, Predictions
from medcl.reports.run_directory import RunDirectory

#: Metrics of the clinical tables: discrimination at the operating point plus top-label ECE.
REPORT_METRICS = (*DEFAULT_METRICS, "ece")


class RunResults(RunDirectory):
    """Read a run directory; every accessor returns a tidy frame or a plain dict.

    Args:
        run_dir: directory written by ``medcl run`` / :func:`medcl.engine.run.run`.
        safe_id_columns: per-row metadata columns the user declares free of patient
            identifiers (e.g. a de-identified study number) to show in reports; every other
            column beyond :data:`SAFE_COLUMNS` is dropped on load.
        experience: the model to treat as final (``--experience K``); default the run's final
            model. Later experiences are left out of every frame.
        allow_partial: accept an unfinished run; its last completed experience is the final
            model (without this or ``experience``, an unfinished run is an error).

    Raises:
        DataError: the directory or one of its required files is missing or unreadable, or
            the final model's predictions file is missing or partial (the message names it).
        ConfigError: an unfinished run without ``experience`` / ``allow_partial``.
    """

    # -- clinical metrics ----------------------------------------------------------------------
    def clinical(
        self,
        after: int | None = None,
        *,
        by: str | None = "experience",
        metrics: Sequence[str] = REPORT_METRICS,
        rows: np.ndarray | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Discrimination and calibration with bootstrap CIs, per experience/site and overall.

        Only rows whose class the model can output are scored (a class-incremental model is
        not asked about classes it has not learned yet).

        Args:
            after: which model (default: the final one).
            by: ``"experience"`` (one group per experience, with its site), ``"site"``, or
                ``None`` (overall rows only).
            metrics: names from :data:`medcl.metrics.clinical.METRICS`.
            rows: optional ``(N,)`` bool mask of test rows to score.
            **options: :class:`medcl.metrics.clinical.BootstrapOptions` (``n_resamples``,
                ``alpha``, ``seed``, ``threshold``, ``n_bins``; stratified by class).

        Returns:
            Tidy frame ``after, group, experience, site, n, metric, class, value, ci_low,
            ci_high, se``; ``group`` is ``"overall"`` for the pooled rows.
        """
        pred = self.predictions(after)
        mask = pred.scorable() if rows is None else (np.asarray(rows, bool) & pred.scorable())
        p = pred.subset(mask)
        if by not in (None, "experience", "site"):
            raise DataError(f"by must be 'experience', 'site' or None; got {by!r}.")
        names = self.experience_names
        by_name = len(set(names)) == len(names) and "overall" not in names
        if by is None:
            groups = None
        elif by == "site":
            groups = p.meta["site"].astype(str).to_numpy()
        else:  # experience names read better in warnings; indices if names are ambiguous
            groups = np.asarray(names, dtype=object)[p.experience] if by_name else p.experience
        table = per_group_metrics(
            p.labels,
            p.probs,
            groups,
            list(metrics),
            class_names=self.class_names(p.n_classes),
            **options,
        )
        return self._label_groups(table, pred.after, by)

    def _label_groups(self, table: pd.DataFrame, after: int, by: str | None) -> pd.DataFrame:
        names, sites = self.experience_names, self.experience_sites
        is_all = table["group"].astype(str) == "overall"
        exp = pd.Series(pd.NA, index=table.index, dtype="Int64")
        site = pd.Series("all", index=table.index, dtype=object)
        group = table["group"].astype(str)
        if by == "experience":
            index = {n: i for i, n in enumerate(names)}
            ids = [index[g] if g in index else int(g) for g in table.loc[~is_all, "group"]]
            exp[~is_all] = ids
            group[~is_all] = [names[i] for i in ids]
            site[~is_all] = [sites[i] for i in ids]
        elif by == "site":
            site[~is_all] = group[~is_all]
        out = table.drop(columns="group").assign(
            after=after, group=group, experience=exp, site=site
        )
        order = [
            "after",
            "group",
            "experience",
            "site",
            "n",
            "metric",
            "class",
            "value",
            "ci_low",
            "ci_high",
            "se",
        ]
        out["_all"] = is_all.to_numpy()
        out = out.sort_values(["_all", "experience"], kind="stable", na_position="last")
        return out[order].reset_index(drop=True)

    @staticmethod
    def heterogeneity(
        table: pd.DataFrame,
        targets: Sequence[tuple[str, str]] = (
            ("auroc", "macro"),
            ("balanced_accuracy", "overall"),
            ("accuracy", "overall"),
        ),
    ) -> pd.DataFrame:
        """Cochran's Q, I² and tau² across the groups of a :meth:`clinical` table.

        Returns:
            One row per ``(metric, class)`` target with the keys of
            :func:`medcl.metrics.clinical.site_heterogeneity`.
        """
        rows = []
        for metric, cls in targets:
            if ((table["metric"] == metric) & (table["class"] == cls)).any():
                rows.append(
                    {"metric": metric, "class": cls}
                    | site_heterogeneity(table, metric=metric, class_name=cls)
                )
        return pd.DataFrame(rows)

    def calibration(self, after: int | None = None, *, n_bins: int = 15) -> pd.DataFrame:
        """Reliability table (per confidence bin) of the scorable test rows."""
        p = self.predictions(after)
        p = p.subset(p.scorable())
        return reliability_table(p.labels, p.probs, n_bins=n_bins)

    def calibration_error(self, after: int | None = None, *, n_bins: int = 15) -> dict[str, float]:
        """``{"ece", "mce"}`` of the scorable test rows."""
        p = self.predictions(after)
        p = p.subset(p.scorable())
        ece, mce = expected_calibration_error(p.labels, p.probs, n_bins=n_bins)
        return {"ece": ece, "mce": mce}

    def posthoc(self, after: int | None = None) -> PostHoc | None:
        """The post-hoc calibration of the model after ``after`` (default: the final one):
        temperature and conformal thresholds; ``None`` for a run written before medcl
        calibrated (:func:`medcl.engine.posthoc.read_posthoc`)."""
        return read_posthoc(self.run_dir, self.final if after is None else int(after))

    def coverage(
        self, after: int | None = None, *, confidence: float = 0.95
    ) -> pd.DataFrame | None:
        """Empirical coverage and size of the model's conformal prediction sets on the test rows.

        The stored test probabilities (uncalibrated softmax) go through the model's temperature,
        then its APS thresholds, each row with its experience as site; only the experiences the
        model has learned are scored (the sets were calibrated on them). The one computation
        behind the report's coverage table and the gate's ``coverage`` criterion.

        Args:
            after: which model (default: the final one).
            confidence: level of the Wilson (coverage) and normal (mean size) intervals.

        Returns:
            :func:`medcl.metrics.coverage.coverage_table` per experience name and
            ``overall``, plus ``after`` and ``target`` (``1 - alpha``); ``None`` when the model
            has no conformal calibration (a run written before it, or ``calibration.conformal``
            off).
        """
        post = self.posthoc(after)
        if post is None or post.conformal is None:
            return None
        p = self.predictions(after)
        p = p.subset(p.scorable() & (p.experience <= p.after))
        sets = post.sets(post.calibrate(p.probs), p.experience)
        sites = [post.sites[int(e)] for e in p.experience]
        table = coverage_table(sets, p.labels, sites, confidence=confidence)
        return table.assign(after=p.after, target=1.0 - post.conformal.alpha)

    def confusion_frame(
        self, after: int | None = None, *, threshold: float | None = None
    ) -> pd.DataFrame:
        """Long confusion matrix at the operating point: ``true, predicted, count, fraction``.

        ``fraction`` is normalised by true class (NaN for a class absent from the test set).
        """
        p = self.predictions(after)
        p = p.subset(p.scorable())
        k, names = p.n_classes, self.class_names(p.n_classes)
        counts = confusion(p.labels, p.predict(threshold), k)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = counts / counts.sum(axis=1, keepdims=True)  # NaN for an absent class
        t, q = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        return pd.DataFrame(
            {
                "true": np.asarray(names)[t.ravel()],
                "predicted": np.asarray(names)[q.ravel()],
                "count": counts.ravel(),
                "fraction": frac.ravel(),
            }
        )

    # -- continual behaviour -------------------------------------------------------------------
    def accuracy_matrix(self, *, task_aware: bool = False) -> np.ndarray:
        """``(T, T)`` accuracy matrix ``R[i, j]`` (NaN where not evaluated)."""
        key = "task_accuracy_matrix" if task_aware else "accuracy_matrix"
        raw = (self.metrics.get(key) or [])[: self.final + 1]  # up to the reported model
        if not raw:
            raise DataError(f"{self.run_dir / 'metrics.json'} has no {key!r}.")
        T = len(raw)
        return check_accuracy_matrix(
            [[np.nan if v is None else v for v in r[:T]] for r in raw], name=key
        )

    def accuracy_frame(self, *, task_aware: bool = False) -> pd.DataFrame:
        """Tidy ``R``: ``after_experience, eval_experience, after_name, eval_name, metric, value``."""
        R = self.accuracy_matrix(task_aware=task_aware)
        metric = "task_accuracy" if task_aware else "accuracy"
        return matrix_to_frame(R, self.experience_names[: R.shape[0]], metric=metric)

    def forgetting(self) -> pd.DataFrame:
        """Per experience: best accuracy before the end, final accuracy, forgetting."""
        R = self.accuracy_matrix()
        T = R.shape[0]
        best = [
            float(np.nanmax(R[: T - 1, j]))
            if T > 1 and not np.isnan(R[: T - 1, j]).all()
            else np.nan
            for j in range(T - 1)
        ]
        return pd.DataFrame(
            {
                "experience": range(T - 1),
                "name": self.experience_names[: T - 1],
                "best_accuracy": best,
                "final_accuracy": R[T - 1, : T - 1],
                "forgetting": forgetting_per_experience(R),
            }
        )

    def curves(self) -> pd.DataFrame | None:
        """Old/new/all accuracy every k updates (``None`` when ``train.eval_every`` was 0)."""
        path = self.files.curves
        return pd.read_csv(path) if path.is_file() else None

    def stability(self, *, tol: float = 0.01) -> pd.DataFrame | None:
        """Stability-gap metrics per experience (see :func:`medcl.metrics.stability`)."""
        c = self.curves()
        return None if c is None else stability_metrics(c, tol=tol)

    def stability_summary(self, *, tol: float = 0.01) -> dict[str, float] | None:
        c = self.curves()
        return None if c is None else summarize_stability(c, tol=tol)

    # -- cost and data -------------------------------------------------------------------------
    def compute(self) -> dict[str, float]:
        """Parameters, MACs and batch-1 latency of the deployable model, plus training time."""
        fit = self.metrics.get("fit") or []
        out = {
            k: np.nan if v is None else float(v)
            for k, v in (self.metrics.get("compute") or {}).items()
        }
        out["train_seconds"] = float(sum(f.get("seconds", 0.0) for f in fit))
        out["train_updates"] = float(sum(f.get("updates", 0) for f in fit))
        return out

    def fit_frame(self) -> pd.DataFrame:
        """Per experience: updates, seconds, images/s (method diagnostics: ``metrics["fit"]``)."""
        fit = pd.DataFrame(self.metrics.get("fit") or []).drop(
            columns=["diagnostics"], errors="ignore"
        )
        if not fit.empty:
            fit = fit[fit["experience"] <= self.final].reset_index(drop=True)
            fit.insert(1, "name", [self.experience_names[i] for i in fit["experience"]])
        return fit

    def test_counts(self) -> pd.DataFrame:
        """Test rows per experience, site and class (from the final predictions)."""
        p = self.predictions()
        names = np.asarray(self.class_names(max(p.n_classes, int(p.labels.max()) + 1)))
        frame = pd.DataFrame(
            {
                "experience": p.experience,
                "site": p.meta["site"].astype(str),
                "split": "test",
                "class": names[p.labels],
            }
        )
        return frame.value_counts(sort=False).rename("n").reset_index()

    def rebuild_scenario(self):
        """The run's :class:`~medcl.data.experience.Scenario`, rebuilt from ``config.yaml``.

        Needed for train/val counts, data sources and failure thumbnails. Loads the data again
        (seeded, so identical to the run's).
        """
        from medcl.config import validate_config
        from medcl.data.scenarios import build_scenario

        cfg = validate_config(self.config, source=str(self.files.config))
        return build_scenario(
            cfg.scenario.name,
            root=cfg.data.root,
            download=False,
            seed=cfg.seed,
            **cfg.scenario.options,
        )
