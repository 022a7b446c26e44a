"""The files of a run directory, checked and loaded: what was run and its test predictions.

:class:`RunDirectory` reads what :func:`medcl.engine.run.run` wrote (``config.yaml``,
``scenario.json``, ``metrics.json``, ``predictions/after-NNN.npz + .csv``), checks that the
final model's predictions are complete, and loads predictions with only the safe metadata
columns; :class:`~medcl.reports.results.RunResults` adds the tidy frames on top.

Privacy: per-row metadata is reduced on load to :data:`~medcl.reports.predictions.SAFE_COLUMNS`
plus the columns the user names in ``safe_id_columns``; anything else the run stored (file
paths, manifest columns that may hold names or ids) never reaches a frame, a plot or a report.
"""

from __future__ import annotations

__all__ = ["RunDirectory"]

import json
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from medcl.engine.layout import RunLayout
from medcl.engine.rundir import read_environments
from medcl.errors import DataError, MedclError, did_you_mean
from medcl.reports.predictions import SAFE_COLUMNS, Predictions

_AFTER = re.compile(r"after-(\d+)\.npz$")


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


class RunDirectory:
    """A run directory's files, checked and loaded; the base class of ``RunResults``.

    :class:`~medcl.reports.results.RunResults` adds the tidy frames.

    Arguments and errors as :class:`~medcl.reports.results.RunResults` (``run_dir``,
    ``safe_id_columns``, ``experience``, ``allow_partial``).
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
        self.files = RunLayout(self.run_dir)
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
        cfg = self.files.config
        if not cfg.is_file():
            raise DataError(f"{cfg} is missing; {self.run_dir} is not a medcl run directory.")
        self.config: dict[str, Any] = yaml.safe_load(cfg.read_text()) or {}
        self.scenario_info = _read_json(self.files.scenario)
        self.metrics = _read_json(self.files.metrics)
        #: the software and machine of each start of the run (first start first)
        self.environments = read_environments(self.run_dir)
        #: the latest start's: what trained the final model
        self.environment = self.environments[-1] if self.environments else {}
        self._cache: dict[int, Predictions] = {}
        if not self.snapshots:
            raise DataError(
                f"{self.files.predictions} holds no after-NNN.npz files; the run "
                "has not finished an experience yet."
            )
        from medcl.engine.rundir import select_experience

        self._final = select_experience(
            self.run_dir, experience, allow_partial=allow_partial, command="medcl report"
        )
        self._check_final()

    def _check_final(self) -> None:
        """The final model's predictions exist, are readable and cover every test row of the
        experiences they hold: those up to the final one at least (``eval.future`` may leave
        later ones out)."""
        k = self._final
        path = self.files.predictions_after(k)
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
        files = self.files.predictions.glob("after-*.npz")
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
            path = self.files.predictions_after(after)
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
