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
"""

from __future__ import annotations

__all__ = ["REPORT_METRICS", "SAFE_COLUMNS", "Predictions", "RunResults"]

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from medcl.errors import DataError, MedclError, did_you_mean
from medcl.metrics.calibration import expected_calibration_error, reliability_table
from medcl.metrics.clinical import DEFAULT_METRICS, confusion, per_group_metrics, site_heterogeneity
from medcl.metrics.continual import (
    check_accuracy_matrix,
    forgetting_per_experience,
    matrix_to_frame,
)
from medcl.metrics.stability import stability_metrics, summarize_stability

#: Per-row metadata that is never an identifier: kept in every frame and report.
SAFE_COLUMNS = ("dataset", "site", "split", "experience")
#: Metrics of the clinical tables: discrimination at the operating point plus top-label ECE.
REPORT_METRICS = (*DEFAULT_METRICS, "ece")
_AFTER = re.compile(r"after-(\d+)\.npz$")


@dataclass(frozen=True)
class Predictions:
    """Test-set predictions of one model of the stream.

    Attributes:
        after: index of the last experience the model was trained on.
        probs: ``(N, K)`` class probabilities over the ``K`` classes the model knows.
        labels: ``(N,)`` global class ids (may be ``>= K`` for classes not learned yet).
        experience: ``(N,)`` experience index of each test row.
        meta: ``N`` rows of safe metadata (:data:`SAFE_COLUMNS` + user-approved id columns).
    """

    after: int
    probs: np.ndarray
    labels: np.ndarray
    experience: np.ndarray
    meta: pd.DataFrame

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[1])

    @property
    def predicted(self) -> np.ndarray:
        """``(N,)`` arg-max class."""
        return self.probs.argmax(axis=1)

    def predict(self, threshold: float | None = None) -> np.ndarray:
        """``(N,)`` class at the operating point: arg-max, or binary ``p_1 >= threshold``."""
        if threshold is None:
            return self.predicted
        if self.n_classes != 2 or not 0.0 <= threshold <= 1.0:
            raise DataError(
                f"threshold applies to binary models and must lie in [0, 1]; got "
                f"threshold={threshold!r} for a {self.n_classes}-class model. Omit it to use "
                "the arg-max."
            )
        return (self.probs[:, 1] >= threshold).astype(np.int64)

    def scorable(self) -> np.ndarray:
        """``(N,)`` bool: rows whose class the model can output (all rows but future classes)."""
        return self.labels < self.n_classes

    def subset(self, mask: np.ndarray) -> Predictions:
        """The rows selected by a boolean mask or an index array."""
        idx = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask)
        return Predictions(
            self.after,
            self.probs[idx],
            self.labels[idx],
            self.experience[idx],
            self.meta.iloc[idx].reset_index(drop=True),
        )


def _read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise DataError(
                f"{path} is missing; a run directory holds config.yaml, scenario.json, "
                "metrics.json and predictions/ (written by `medcl run`). Point at the folder "
                "`medcl run` printed."
            )
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); was the run interrupted?") from e


class RunResults:
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

    def __init__(
        self,
        run_dir: str | Path,
        *,
        safe_id_columns: Sequence[str] = (),
        experience: int | None = None,
        allow_partial: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise DataError(
                f"run directory {self.run_dir} does not exist; pass the folder that "
                "`medcl run` printed (runs/<name>)."
            )
        self.safe_id_columns = tuple(str(c) for c in safe_id_columns)
        if "patient_id" in self.safe_id_columns:
            raise DataError(
                "`patient_id` can never be marked safe: it is dropped when the run "
                "is written. Use a de-identified study column instead."
            )
        cfg = self.run_dir / "config.yaml"
        if not cfg.is_file():
            raise DataError(f"{cfg} is missing; {self.run_dir} is not a medcl run directory.")
        self.config: dict[str, Any] = yaml.safe_load(cfg.read_text()) or {}
        self.scenario_info = _read_json(self.run_dir / "scenario.json")
        self.metrics = _read_json(self.run_dir / "metrics.json")
        self.environment = _read_json(self.run_dir / "environment.json", required=False)
        self._cache: dict[int, Predictions] = {}
        if not self.snapshots:
            raise DataError(
                f"{self.run_dir / 'predictions'} holds no after-NNN.npz files; the run "
                "has not finished an experience yet."
            )
        from medcl.engine.rundir import select_experience

        self._final = select_experience(
            self.run_dir, experience, allow_partial=allow_partial, command="medcl report"
        )
        self._check_final()

    def _check_final(self) -> None:
        """The final model's predictions exist, are readable and cover every test row."""
        k = self._final
        path = self.run_dir / "predictions" / f"after-{k:03d}.npz"
        earlier = [s for s in self.snapshots if s < k]
        other = (
            f"report the model after experience {earlier[-1]} instead with --experience "
            f"{earlier[-1]}"
            if earlier
            else "start the run again"
        )
        if not path.is_file():
            raise DataError(
                f"{path} is missing: the test predictions of the model after experience {k}, "
                f"which the report would describe as its final model. Resume the run to write "
                f"it again (`medcl run {self.run_dir / 'config.yaml'} --resume-from "
                f"{earlier[-1] if earlier else 0}`), or {other}."
            )
        try:
            p = self.predictions(k)
        except MedclError:
            raise
        except Exception as e:  # a truncated .npz: BadZipFile, EOFError, ValueError, ...
            raise DataError(
                f"{path} could not be read ({type(e).__name__}); it is partial or damaged. "
                f"Resume the run to write it again, or {other}."
            ) from None
        expected = [int(e.get("test", 0)) for e in self.scenario_info.get("experiences", [])]
        got = np.bincount(p.experience).tolist() if len(p.experience) else []
        n = min(len(expected), max(len(got), k + 1))  # at least every experience up to k
        short = [
            (j, got[j] if j < len(got) else 0, expected[j])
            for j in range(n)
            if (got[j] if j < len(got) else 0) != expected[j]
        ]
        if short:
            j, g, want = short[0]
            raise DataError(
                f"{path} is partial: it holds {g} test rows of experience {j} where "
                f"scenario.json lists {want} ({len(short)} experience(s) differ). Resume the run "
                f"to write it again, or {other}."
            )

    # -- what was run --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.metrics.get("run") or self.config.get("name") or self.run_dir.name)

    @cached_property
    def snapshots(self) -> list[int]:
        """Experience indices after which test predictions were saved, in order."""
        files = (self.run_dir / "predictions").glob("after-*.npz")
        return sorted(int(m.group(1)) for f in files if (m := _AFTER.search(f.name)))

    @property
    def final(self) -> int:
        """The experience after which the reported ("final") model was saved."""
        return self._final

    @property
    def previous(self) -> int | None:
        """The model before the final one (``None`` for a single experience)."""
        earlier = [s for s in self.snapshots if s < self._final]
        return earlier[-1] if earlier else None

    @property
    def experience_names(self) -> list[str]:
        names = [str(e["name"]) for e in self.scenario_info.get("experiences", [])]
        n = max(len(self.metrics.get("accuracy_matrix") or []), self.final + 1)
        return names + [f"experience {i}" for i in range(len(names), n)]

    @property
    def experience_sites(self) -> list[str]:
        sites = [str(e.get("site", "")) for e in self.scenario_info.get("experiences", [])]
        return sites + [""] * (len(self.experience_names) - len(sites))

    def class_names(self, n_classes: int | None = None) -> list[str]:
        """Names of the first ``n_classes`` global classes (default: all in the scenario)."""
        names = [str(c) for c in self.scenario_info.get("class_names", [])]
        n = len(names) if n_classes is None else n_classes
        return (names + [f"class {k}" for k in range(len(names), n)])[:n]

    # -- predictions ---------------------------------------------------------------------------
    def predictions(self, after: int | None = None) -> Predictions:
        """Test predictions of the model after experience ``after`` (default: the final model)."""
        after = self.final if after is None else int(after)
        if after not in self.snapshots:
            raise DataError(
                f"no predictions after experience {after} in {self.run_dir}; "
                f"available: {self.snapshots}."
            )
        if after not in self._cache:
            path = self.run_dir / "predictions" / f"after-{after:03d}.npz"
            with np.load(path, allow_pickle=False) as z:
                probs, labels, exp = z["probs"], z["labels"].astype(np.int64), z["experience"]
            if probs.ndim != 2 or not len(probs) == len(labels) == len(exp):
                raise DataError(
                    f"{path} must hold probs (N, K), labels (N,) and experience (N,); got "
                    f"shapes {probs.shape}, {labels.shape}, {exp.shape}. Re-run the evaluation."
                )
            csv = path.with_suffix(".csv")
            meta = pd.read_csv(csv, keep_default_na=False) if csv.is_file() else pd.DataFrame()
            if len(meta) != len(labels):
                meta = pd.DataFrame(index=range(len(labels)))
            missing = [c for c in self.safe_id_columns if c not in meta.columns]
            if missing:
                raise DataError(
                    f"safe id column(s) {missing} are not in {csv.name}; "
                    f"{did_you_mean(missing[0], meta.columns)}"
                )
            keep = [c for c in (*SAFE_COLUMNS, *self.safe_id_columns) if c in meta.columns]
            meta = meta[keep].copy()
            meta["experience"] = exp.astype(np.int64)
            if "site" not in meta:
                sites = np.asarray(self.experience_sites, dtype=object)
                meta["site"] = sites[exp.astype(np.int64)]
            self._cache[after] = Predictions(
                after, probs.astype(np.float64), labels, exp.astype(np.int64), meta
            )
        return self._cache[after]

    # -- clinical metrics ----------------------------------------------------------------------
    def clinical(
        self,
        after: int | None = None,
        *,
        by: str | None = "experience",
        metrics: Sequence[str] = REPORT_METRICS,
        n_resamples: int = 1000,
        alpha: float = 0.05,
        seed: int = 0,
        threshold: float | None = None,
        n_bins: int = 15,
        rows: np.ndarray | None = None,
    ) -> pd.DataFrame:
        """Discrimination and calibration with bootstrap CIs, per experience/site and overall.

        Only rows whose class the model can output are scored (a class-incremental model is
        not asked about classes it has not learned yet).

        Args:
            after: which model (default: the final one).
            by: ``"experience"`` (one group per experience, with its site), ``"site"``, or
                ``None`` (overall rows only).
            metrics: names from :data:`medcl.metrics.clinical.METRICS`.
            n_resamples, alpha, seed, threshold, n_bins: see
                :func:`medcl.metrics.clinical.bootstrap_ci` (stratified by class).
            rows: optional ``(N,)`` bool mask of test rows to score.

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
            threshold=threshold,
            n_resamples=n_resamples,
            alpha=alpha,
            seed=seed,
            n_bins=n_bins,
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
        path = self.run_dir / "curves.csv"
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

        cfg = validate_config(self.config, source=str(self.run_dir / "config.yaml"))
        return build_scenario(
            cfg.scenario.name,
            root=cfg.data.root,
            download=False,
            seed=cfg.seed,
            **cfg.scenario.options,
        )
