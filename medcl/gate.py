"""The update gate: acceptance criteria for replacing a deployed model, checked with paired tests.

A change-control plan for a deployed clinical model states, before an update is trained, what
the update must show to replace the model in use. ``criteria.yaml`` is that statement::

    n_resamples: 2000          # bootstrap resamples
    alpha: 0.05                # 95% two-sided intervals (one-sided 97.5% bounds)
    threshold: null            # binary: the deployed operating point p1 >= threshold
    criteria:
      - {metric: auroc, rule: non_inferiority, margin: 0.02, where: overall_and_sites}
      - {metric: sensitivity, class: pneumonia, rule: floor, value: 0.85, where: overall}
      - {metric: ece, rule: ceiling, value: 0.10}
      - {metric: forgetting, rule: ceiling, value: 0.05}
      - {metric: coverage, rule: floor, value: 0.87}   # 1 - alpha - delta: 0.1, 0.03

Rules, each judged on a confidence bound, never on a point estimate alone:

- ``non_inferiority``: the lower bound of the paired bootstrap CI of ``new - deployed``
  (:func:`medcl.reports.compare.paired_difference`, same resampled test rows for both
  models) must exceed ``-margin`` (for calibration error: the upper bound below ``+margin``).
  Scored on the test rows both models can score (the deployed model's cohorts).
- ``floor`` / ``ceiling``: the new model's lower bound must reach ``value`` / its upper bound
  must stay under ``value`` (per-site/overall stratified bootstrap), on every cohort the new
  model knows.
- ``forgetting`` (``ceiling`` only): the run's average forgetting (a point value; no CI).
- ``coverage`` (``floor`` only): the lower Wilson bound of how often the new model's conformal
  sets hold the label on its test rows (:meth:`medcl.reports.results.RunResults.coverage`) must
  reach ``value``: write ``1 - alpha - delta`` for sets calibrated at ``alpha`` with tolerance
  ``delta`` (0.87 for 0.1 and 0.03). Without a conformal calibration record it fails, noted.

Every metric is a fraction: ``value`` lies in [0, 1] and ``margin`` in [0, 0.5] (write 0.10
for 10 %); anything else, an unknown key, metric or rule is refused when the file is loaded.

``where``: ``overall``, ``sites`` (each experience/site) or ``overall_and_sites``. A metric that
is undefined on a group fails its criterion (nothing is shown, so nothing is accepted).

The decision is written to ``RUN_DIR/gate/after-NNN.json`` and ``report.json``; on PASS the
run's ``deployed.json`` pointer moves to the new model (the old pointer goes to its history;
every experience's checkpoint stays, so the previous model remains deployable).
"""

from __future__ import annotations

__all__ = ["Criterion", "GateCriteria", "GateResult", "deployed_model", "load_criteria", "run_gate"]

import datetime as _dt
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medcl.config import read_yaml
from medcl.engine.layout import RunLayout
from medcl.errors import ConfigError, DataError, did_you_mean
from medcl.metrics.clinical.spec import METRICS as CLINICAL_METRICS
from medcl.metrics.clinical.spec import why_undefined

#: What a criterion can judge: clinical metrics, average forgetting, conformal-set coverage.
METRICS = (*CLINICAL_METRICS, "forgetting", "coverage")
RULES = ("non_inferiority", "floor", "ceiling")
#: Largest non-inferiority margin: a larger one accepts nearly any model.
MAX_MARGIN = 0.5
_OVERALL_ONLY = {"accuracy", "ece"}
_SHOWN = {"auroc": "AUROC", "ece": "ECE", "ppv": "PPV", "npv": "NPV", "f1": "F1"}
_AS_CLINICAL = {"coverage": "value", "coverage_low": "ci_low", "coverage_high": "ci_high"}
_NO_SETS = (
    "the model has no conformal sets: no calibration/after-NNN.json, or one without thresholds "
    "(train with calibration.conformal: true)"
)


def _fraction_hint(value: float) -> str:
    """``": write 0.10 for 10 %"`` for a value that looks like a percentage, else ``""``."""
    x = f"{value / 100:.2f}" if value == round(value) else f"{value / 100:g}"
    return f": write {x} for {value:g} %" if 1 < value <= 100 else ""


class Criterion(BaseModel):
    """One acceptance criterion (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    metric: str
    rule: str
    margin: float | None = None
    value: float | None = None
    class_name: str = Field("macro", alias="class")
    where: Literal["overall", "sites", "overall_and_sites"] = "overall_and_sites"
    name: str | None = None

    @field_validator("metric", "rule")
    @classmethod
    def _known(cls, value: str, info: ValidationInfo) -> str:
        choices = {"metric": METRICS, "rule": RULES}[info.field_name]
        if value not in choices:
            raise ValueError(f"unknown {info.field_name} {value!r}; {did_you_mean(value, choices)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Criterion:
        shown = _SHOWN.get(self.metric, self.metric)
        if self.rule == "non_inferiority":
            if self.value is not None:
                raise ValueError(
                    f"rule non_inferiority takes `margin`, not `value`; write margin: {self.value}"
                )
            if self.margin is None:
                raise ValueError("rule non_inferiority needs `margin` (e.g. 0.02)")
            if not 0 <= self.margin <= MAX_MARGIN:
                raise ValueError(
                    f"`margin`: got {self.margin:g}; a margin is the largest drop in {shown} "
                    f"accepted, a fraction in [0, {MAX_MARGIN}]{_fraction_hint(self.margin)}"
                )
        else:
            if self.margin is not None:
                raise ValueError(
                    f"rule {self.rule} takes `value`, not `margin`; write value: {self.margin}"
                )
            if self.value is None:
                raise ValueError(f"rule {self.rule} needs `value` (e.g. 0.8)")
            if not 0 <= self.value <= 1:
                raise ValueError(
                    f"`value`: got {self.value:g}; {shown} is a fraction in [0, 1]"
                    f"{_fraction_hint(self.value)}"
                )
        if self.metric == "forgetting" and self.rule != "ceiling":
            raise ValueError("forgetting takes rule ceiling only (a point value from the run)")
        if self.metric == "coverage" and self.rule != "floor":
            raise ValueError("coverage takes rule floor only (value: 1 - alpha - delta, e.g. 0.87)")
        pooled = _OVERALL_ONLY | {"balanced_accuracy", "forgetting", "coverage"}
        if self.metric in pooled and self.class_name == "macro":
            self.class_name = "overall"
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        limit = f"margin {self.margin}" if self.rule == "non_inferiority" else f"{self.value}"
        return f"{self.metric}[{self.class_name}] {self.rule} {limit}"


class GateCriteria(BaseModel):
    """The whole ``criteria.yaml``."""

    model_config = ConfigDict(extra="forbid")

    criteria: list[Criterion] = Field(min_length=1)
    n_resamples: int = Field(1000, ge=100)
    alpha: float = Field(0.05, gt=0, lt=1)
    seed: int = 0
    threshold: float | None = Field(None, ge=0, le=1)


def _problem(err: dict[str, Any], raw: Any) -> str:
    """One validation error as ``criteria[2] (ece): <rule, value received, fix>``."""
    loc = err["loc"]
    names = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc]
    items = raw.get("criteria") if isinstance(raw, dict) else None
    if loc[0] == "criteria" and len(loc) > 1 and isinstance(items, list):  # name its metric
        item = items[loc[1]]
        names[1] += f" ({item['metric']})" if isinstance(item, dict) and "metric" in item else ""
    where = "".join(names).lstrip(".")
    if err["type"] == "extra_forbidden":
        model = Criterion if loc[0] == "criteria" else GateCriteria
        keys = [f.alias or name for name, f in model.model_fields.items()]
        place = f" in {''.join(names[:-1]).lstrip('.')}" if len(loc) > 1 else ""
        return f"unknown key `{loc[-1]}`{place}; {did_you_mean(str(loc[-1]), keys)}"
    if err["type"] == "missing":
        return f"missing required key `{where}`"
    got = "" if err["type"] == "value_error" else f" (got {err.get('input')!r})"
    return f"{where or 'file'}: {err['msg'].removeprefix('Value error, ')}{got}"


def load_criteria(path: str | Path) -> GateCriteria:
    """Read and validate ``criteria.yaml``; a mistake is a :class:`ConfigError` naming it.

    Raises:
        ConfigError: missing file, bad YAML (file and line), a key given twice, an unknown
            key, metric or rule (with the closest valid name), a value outside [0, 1] or a
            margin outside [0, 0.5] (with the fraction meant, for a percentage).
    """
    path = Path(path)
    raw = read_yaml(
        path,
        what="gate criteria file",
        example="write one (example: configs/gate/criteria.yaml; rules: medcl.gate)",
    )
    try:
        return GateCriteria.model_validate(raw or {})
    except ValidationError as e:
        problems = "; ".join(_problem(err, raw) for err in e.errors())
        raise ConfigError(
            f"{path}: invalid gate criteria: {problems}. Fix the file (example: "
            "configs/gate/criteria.yaml; rules: medcl.gate)."
        ) from None


@dataclass
class GateResult:
    """The gate's decision: one row per criterion x group in :attr:`table`."""

    decision: Literal["PASS", "FAIL"]
    table: pd.DataFrame
    record: dict[str, Any]


def deployed_model(run_dir: str | Path) -> int | None:
    """The experience index the run's ``deployed.json`` points at (None: no pointer)."""
    path = RunLayout(run_dir).deployed
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["after"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is damaged ({e}); restore it from gate/*.json history.") from None


def _row(c: Criterion, group: str, estimate, low, high, passed, note="") -> dict[str, Any]:
    limit = -c.margin if c.rule == "non_inferiority" else c.value
    return {
        "criterion": c.label,
        "group": group,
        "metric": c.metric,
        "class": c.class_name,
        "rule": c.rule,
        "limit": limit,
        "estimate": estimate,
        "ci_low": low,
        "ci_high": high,
        "decision": "PASS" if passed else "FAIL",
        "note": note,
    }


def _groups(c: Criterion, groups: list[str]) -> list[str]:
    sites = [g for g in groups if g != "overall"]
    if c.metric in _OVERALL_ONLY or c.where == "overall":
        return ["overall"]
    return sites if c.where == "sites" else [*sites, "overall"]


def _judge(c: Criterion, group: str, row: pd.Series | None, lower_better: bool) -> dict[str, Any]:
    if row is None:
        return _row(c, group, np.nan, np.nan, np.nan, False, "no such metric/class/group")
    if c.rule == "non_inferiority":
        est, lo, hi = row["delta"], row["delta_low"], row["delta_high"]
        ok = (hi < c.margin) if lower_better else (lo > -c.margin)
    else:
        est, lo, hi = row["value"], row["ci_low"], row["ci_high"]
        ok = (lo >= c.value) if c.rule == "floor" else (hi <= c.value)
    if not all(np.isfinite([est, lo, hi])):  # null in the record, with the reason
        why = why_undefined(c.metric, c.class_name)
        return _row(c, group, est, lo, hi, False, f"undefined on this group: {why}")
    return _row(c, group, float(est), float(lo), float(hi), bool(ok))


def evaluate_criteria(
    criteria: GateCriteria, new_run: str | Path, deployed_run: str | Path, deployed_after: int
) -> pd.DataFrame:
    """One row per criterion x group: estimate, bound, limit, PASS/FAIL."""
    from sklearn.exceptions import UndefinedMetricWarning

    from medcl.reports.compare import LOWER_IS_BETTER, compare_run_predictions
    from medcl.reports.results import RunResults

    new, old = RunResults(new_run), RunResults(deployed_run)
    opts = criteria.model_dump(include={"n_resamples", "alpha", "seed", "threshold"})
    after, before = new.predictions(), old.predictions(deployed_after)
    with warnings.catch_warnings():
        # a metric undefined on a group (e.g. a class absent from a site) is NaN; a criterion
        # judged on it fails with the reason in its note (_judge), so the warning is not shown
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        paired = compare_run_predictions(new, before, after, **opts)
        own = new.clinical(**opts)
    cov = None  # coverage of the conformal sets, as rows of a clinical table (None: no sets)
    if any(c.metric == "coverage" for c in criteria.criteria):
        cov = new.coverage(confidence=1 - criteria.alpha)
    if cov is not None:
        cov = cov.rename(columns=_AS_CLINICAL).assign(metric="coverage", **{"class": "overall"})
    rows = []
    for c in criteria.criteria:
        if c.metric == "forgetting":
            f = new.metrics.get("summary", {}).get("forgetting")
            ok = f is not None and np.isfinite(f) and f <= c.value
            rows.append(_row(c, "overall", f, f, f, ok, "point value (no CI)"))
            continue
        if c.metric == "coverage" and cov is None:
            rows.append(_row(c, "overall", np.nan, np.nan, np.nan, False, _NO_SETS))
            continue
        table = cov if c.metric == "coverage" else paired if c.rule == "non_inferiority" else own
        for g in _groups(c, list(dict.fromkeys(table["group"].astype(str)))):
            sel = table[
                (table["group"].astype(str) == g)
                & (table["metric"] == c.metric)
                & (table["class"] == c.class_name)
            ]
            row = sel.iloc[0] if len(sel) else None
            rows.append(_judge(c, g, row, c.metric in LOWER_IS_BETTER))
    return pd.DataFrame(rows)


def _atomic_json(path: Path, data: Any) -> None:
    from medcl.engine.checkpoint import atomic_write_text
    from medcl.reports.report import _plain

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_plain(data), indent=1, allow_nan=False))


def run_gate(
    run_dir: str | Path,
    criteria: GateCriteria | str | Path,
    *,
    against: str | Path | None = None,
) -> GateResult:
    """Check the final model of ``run_dir`` against the deployed model; move the pointer on PASS.

    Args:
        run_dir: the run holding the candidate (its final model).
        criteria: a :class:`GateCriteria` or the path of ``criteria.yaml``.
        against: the run holding the deployed model (default ``run_dir`` itself); its
            ``deployed.json`` says which experience is deployed, else its final model (for
            ``run_dir`` itself without a pointer: the model before the final one).

    Returns:
        The :class:`GateResult`; the record is also written to ``RUN_DIR/gate/after-NNN.json``
        and appended to ``report.json``'s ``gate`` list.
    """
    from medcl.reports.results import RunResults

    if not isinstance(criteria, GateCriteria):
        criteria = load_criteria(criteria)
    run_dir = Path(run_dir)
    ref_dir = Path(against) if against is not None else run_dir
    new = RunResults(run_dir)
    deployed = deployed_model(ref_dir)
    if deployed is None:
        ref = RunResults(ref_dir)
        if ref_dir.resolve() == run_dir.resolve():
            if ref.previous is None:
                raise DataError(
                    f"{run_dir} has one model and no deployed.json: there is nothing to compare "
                    "with. Pass --against DEPLOYED_RUN, or update the run first."
                )
            deployed = ref.previous
        else:
            deployed = ref.final
    table = evaluate_criteria(criteria, run_dir, ref_dir, deployed)
    decision = "PASS" if (table["decision"] == "PASS").all() else "FAIL"
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    record = {
        "decision": decision,
        "candidate": {"run": new.name, "after": new.final},
        "deployed": f"{RunResults(ref_dir).name} after experience {deployed}",
        "deployed_after": deployed,
        "n_criteria": len(table),
        "n_pass": int((table["decision"] == "PASS").sum()),
        "options": criteria.model_dump(by_alias=True),
        "decided": now,
        "table": table,
    }
    files, relative = RunLayout(run_dir), RunLayout(Path())
    _atomic_json(files.gate_after(new.final), record)
    report = files.report_json
    if report.is_file():
        data = json.loads(report.read_text())
        data["gate"] = [
            g for g in data.get("gate", []) if g.get("candidate") != record["candidate"]
        ]
        data["gate"].append(record)
        _atomic_json(report, data)
    if decision == "PASS":
        prev = json.loads(files.deployed.read_text()) if files.deployed.is_file() else None
        history = [*prev.pop("history", []), prev] if prev is not None else []  # oldest first
        _atomic_json(
            files.deployed,
            {
                "after": new.final,
                "checkpoint": relative.checkpoint(new.final).as_posix(),
                "gate": relative.gate_after(new.final).as_posix(),
                "since": now,
                "history": history,
            },
        )
    return GateResult(decision, table, record)
