"""Post-hoc calibration after every experience: a temperature and conformal prediction sets.

After each experience the model is recalibrated on held-out data of every experience it has
seen (``calibration`` in the config; the math is :mod:`medcl.metrics.conformal`):

1. each seen experience's validation split is cut into two seeded parts (seed, experience): a
   third and the rest;
2. the **temperature** is fitted on the thirds (plus the replay memory with
   ``calibration.memory``), by negative log-likelihood; with ``per_experience``, also one per
   experience's classes, on the rows predicted as one of them (a routed model's heads differ in
   how over-confident they are); ``per_experience: auto`` (the default) keeps those only where
   their 5-fold cross-validated NLL on the same rows (folds seeded by ``seed * 1000 + after``)
   is lower than one temperature's (NLL, a proper scoring rule, is what the temperature
   minimises, Guo et al., ICML 2017; the folds keep the conformal rows out);
3. the **conformal thresholds** are calibrated on the rest, on probabilities after that
   temperature, one per (site, class) with the default ``mondrian: site_class``. Those rows never
   touched the temperature, so split-conformal coverage holds, and they also give the
   held-out NLL/ECE before and after scaling recorded beside them.

The record is ``RUN_DIR/calibration/after-NNN.json`` (written before the checkpoint pointer
moves, so a resumed run never lacks it); :func:`read_posthoc` reads it for export, predict, the
report and the gate. The test split is never used.
"""

from __future__ import annotations

__all__ = ["PostHoc", "fit_posthoc", "read_posthoc", "write_posthoc"]

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from medcl.config_sections import CalibrationConfig
from medcl.data.experience import Experience
from medcl.engine.checkpoint import atomic_write_text, json_dumps
from medcl.engine.evaluate import predict_proba, predict_proba_sets
from medcl.engine.layout import RunLayout
from medcl.errors import DataError
from medcl.metrics.calibration import expected_calibration_error
from medcl.metrics.conformal import (
    TEMPERATURE_BOUNDS,
    ConformalSets,
    apply_temperature,
    fit_conformal,
    fit_temperature,
    log_loss,
)

_T_MIN, _T_MAX = TEMPERATURE_BOUNDS
_MIN_ROWS = 20  # validation rows an experience needs for a temperature of its own

if TYPE_CHECKING:
    from medcl.data.memory import ReplayMemory
    from medcl.strategies.base import Strategy


@dataclass(frozen=True)
class PostHoc:
    """A model's post-hoc calibration (one ``calibration/after-NNN.json``).

    Attributes:
        temperature: divides the class scores (1.0: none fitted).
        conformal: the conformal thresholds, or ``None`` (switched off or nothing to calibrate on).
        sites: experience names of the seen experiences; index ``j`` is experience ``j``.
        record: the whole JSON record.
    """

    temperature: float
    conformal: ConformalSets | None
    sites: list[str]
    record: dict[str, Any]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PostHoc:
        """The calibration a JSON record describes (as :func:`fit_posthoc` returns it)."""
        conformal = record.get("conformal")
        return cls(
            temperature=float(record["temperature"]),
            conformal=ConformalSets.from_dict(conformal) if conformal else None,
            sites=[str(s) for s in record["sites"]],
            record=record,
        )

    @property
    def temperatures(self) -> list[float]:
        """Per class, the temperature of a row whose top class it is (``[T]``: one for all)."""
        return list(self.record.get("temperatures") or [self.temperature])

    def calibrate(self, probs: ArrayLike) -> NDArray[np.float64]:
        """``(N, K)`` probabilities after the temperature(s)."""
        t = self.temperatures
        return apply_temperature(probs, t if len(t) > 1 else t[0])

    def sets(
        self, calibrated: ArrayLike, experience: Sequence[int] | None = None
    ) -> NDArray[np.bool_]:
        """``(N, K)`` prediction sets of calibrated probabilities; ``experience`` gives each
        row's site (experience index) for per-site thresholds (``None``: site unknown)."""
        if self.conformal is None:
            raise DataError(
                "this model has no conformal calibration (calibration.conformal was off, or the "
                "run predates it); run it with calibration.conformal: true."
            )
        names = None if experience is None else [self.sites[int(e)] for e in experience]
        return self.conformal.sets(calibrated, names)


def _split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint rows: a third for the temperature (one scalar needs few), the rest for
    the conformal thresholds (whose coverage varies as ``1 / sqrt(n)``)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, n // 3)
    return perm[:cut].sort().values, perm[cut:].sort().values


def fit_posthoc(
    strategy: Strategy,
    seen: Sequence[Experience],
    cfg: CalibrationConfig,
    *,
    seed: int,
    memory: ReplayMemory | None = None,
) -> dict[str, Any]:
    """Fit the temperature and the conformal thresholds of the current model.

    Args:
        strategy: the model after the last of ``seen``.
        seen: the experiences learned so far (their validation splits are used).
        cfg: the ``calibration`` section.
        seed: run seed; the parts of experience ``j`` are seeded by ``seed * 1000 + j``.
        memory: the replay memory (used for the temperature when ``cfg.memory``).

    Returns:
        The JSON record (see the module docstring and :class:`PostHoc`).
    """
    after = seen[-1].index
    record: dict[str, Any] = {
        "after": after,
        "temperature": 1.0,
        "fitted_on": "validation+memory" if cfg.memory else "validation",
        "sites": [e.name for e in seen],
        "conformal": None,
        "note": "",
    }
    fit_p, fit_y, cal_p, cal_y, cal_site = [], [], [], [], []
    used = [exp for exp in seen if len(exp.val) >= 2]
    desc = f"calibrate on {len(used)} validation split(s)"
    scored = predict_proba_sets(strategy, [(e.val.images, None) for e in used], desc=desc)
    for exp, probs in zip(used, scored, strict=True):
        val = exp.val
        a, b = _split(len(val), seed * 1000 + exp.index)
        fit_p.append(probs[a])
        fit_y.append(val.labels[a])
        cal_p.append(probs[b])
        cal_y.append(val.labels[b])
        cal_site += [exp.name] * len(b)
    if cfg.memory and memory is not None and len(memory):
        rows = memory.as_sampleset()
        fit_p.append(predict_proba(strategy, rows.images, desc="calibrate on the replay memory"))
        fit_y.append(rows.labels)
    if not cal_p:
        record["note"] = "no validation split with >= 2 images: not calibrated (T = 1, no sets)"
        return record
    fp, fy = torch.cat(fit_p).double().numpy(), torch.cat(fit_y).numpy()
    cp, cy = torch.cat(cal_p).double().numpy(), torch.cat(cal_y).numpy()
    t = fit_temperature(fy, fp) if cfg.temperature else 1.0
    per_class = _per_experience(fy, fp, seen, t) if cfg.temperature and cfg.per_experience else None
    if per_class is not None and cfg.per_experience == "auto":
        record["temperature_choice"] = choice = _choose_per_experience(
            fy, fp, seen, seed * 1000 + after
        )
        per_class = per_class if choice["chosen"] == "per_experience" else None
    calibrated = apply_temperature(cp, per_class if per_class is not None else t)
    record["temperature"], record["temperatures"] = t, per_class
    if not 1.01 * _T_MIN < t < 0.99 * _T_MAX:
        record["note"] = (
            f"temperature {t:.3g} at the bound of the search [{_T_MIN}, {_T_MAX}]: the "
            "probabilities carry little information on the validation data"
        )
    record["n_temperature"], record["n_conformal"] = len(fy), len(cy)
    record["held_out"] = {  # on the conformal rows: data the temperature never saw
        "nll_before": log_loss(cy, cp),
        "nll_after": log_loss(cy, calibrated),
        "ece_before": expected_calibration_error(cy, cp)[0],
        "ece_after": expected_calibration_error(cy, calibrated)[0],
    }
    if cfg.conformal:
        sets = fit_conformal(
            cy,
            calibrated,
            alpha=cfg.alpha,
            mondrian=cfg.mondrian,
            score=cfg.score,
            sites=cal_site,
            confidence=cfg.confidence,
        )
        record["conformal"] = sets.to_dict()
    return record


def _owners(k: int, seen: Sequence[Experience]) -> NDArray[np.int64]:
    """``(k,)``: per class, the index of the first seen experience that holds it (``-1``: none)."""
    owner = np.full(k, -1)
    for j, exp in enumerate(seen):
        for c in exp.classes:
            if c < k and owner[c] < 0:
                owner[c] = j
    return owner


def _per_experience(
    y: NDArray[np.int64],
    probs: NDArray[np.float64],
    seen: Sequence[Experience],
    t: float,
    own: set[int] | None = None,
) -> list[float] | None:
    """One temperature per experience's classes, fitted on the rows whose top class is one of
    them (the experience the prediction goes to: a routed model's head); ``t`` for the others:
    experiences not in ``own`` (default: those with fewer than ``_MIN_ROWS`` such rows), or with
    fewer than 2. ``None`` when one experience holds every class (domain-incremental streams:
    one temperature)."""
    owner = _owners(probs.shape[1], seen)
    if len(set(owner[owner >= 0].tolist())) < 2:
        return None
    top = owner[probs.argmax(1)]
    own = _own(top) if own is None else own
    per = {j: t for j in set(owner.tolist())}
    for j in own:
        rows = top == j
        if rows.sum() >= 2:
            per[j] = fit_temperature(y[rows], probs[rows])
    return [float(per[o]) for o in owner]


def _own(top: NDArray[np.int64]) -> set[int]:
    """The experiences with at least ``_MIN_ROWS`` rows predicted in their classes."""
    j, n = np.unique(top[top >= 0], return_counts=True)
    return {int(a) for a, b in zip(j, n, strict=True) if b >= _MIN_ROWS}


def _row_nll(
    y: NDArray[np.int64], probs: NDArray[np.float64], t: float | list[float]
) -> NDArray[np.float64]:
    """``(N,)`` negative log-likelihood of each row after the temperature(s) ``t``."""
    calibrated = np.clip(apply_temperature(probs, t), np.exp(-700), None)
    return -np.log(calibrated[np.arange(len(y)), y])


def _choose_per_experience(
    y: NDArray[np.int64],
    probs: NDArray[np.float64],
    seen: Sequence[Experience],
    seed: int,
    folds: int = 5,
) -> dict[str, Any]:
    """One temperature or one per experience, by seeded ``folds``-fold cross-validation on the
    temperature's rows (``y``, ``probs``): the lower mean held-out NLL, one on ties (the rule of
    scikit-learn's ``GridSearchCV``; the mean gain per row and its standard error are recorded
    beside it). The experiences that get their own are decided once, on all rows, as the final
    fit decides them."""
    own = _own(_owners(probs.shape[1], seen)[probs.argmax(1)])
    order = np.random.default_rng(seed).permutation(len(y))
    one, per = np.zeros(len(y)), np.zeros(len(y))
    for held in np.array_split(order, folds):
        fit = np.setdiff1d(order, held)
        if len(held) == 0 or len(fit) < 2:
            continue
        t = fit_temperature(y[fit], probs[fit])
        ts = _per_experience(y[fit], probs[fit], seen, t, own)
        one[held] = _row_nll(y[held], probs[held], t)
        per[held] = _row_nll(y[held], probs[held], ts if ts is not None else t)
    gain = one - per
    se = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else float("inf")
    chosen = "per_experience" if gain.mean() > 0 else "one"
    return {
        "cv_nll": {"one": float(one.mean()), "per_experience": float(per.mean())},
        "gain": float(gain.mean()),
        "gain_se": se,
        "folds": folds,
        "chosen": chosen,
    }


def write_posthoc(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``calibration/after-NNN.json`` (atomically)."""
    path = RunLayout(run_dir).calibration_after(int(record["after"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json_dumps(record))


def read_posthoc(run_dir: str | Path, after: int) -> PostHoc | None:
    """The calibration of the model after experience ``after``; ``None`` for a run written
    before medcl calibrated (no file).

    Raises:
        DataError: the file exists but is not a calibration record.
    """
    path = RunLayout(run_dir).calibration_after(after)
    if not path.is_file():
        return None
    try:
        return PostHoc.from_record(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{path} is not a readable calibration record ({type(e).__name__}: {e}); restore it "
            "from a backup, or delete it to use the model uncalibrated (T = 1, no prediction "
            "sets)."
        ) from None
