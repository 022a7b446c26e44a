"""Stability-gap metrics from accuracy curves evaluated every ``k`` updates.

The stability gap is the transient collapse of accuracy on previously learned classes right after
training on a new experience starts, followed by (partial) recovery (De Lange et al., ICLR 2023,
arXiv 2205.13452). Harun & Kanan, "Overcoming the Stability Gap in Continual Learning",
TMLR 2024 (arXiv 2306.01904) quantify it from curves evaluated every few updates. The
definitions below are stated in full; they are what the numbers mean here.

For experience ``t >= 1`` with evaluation ``u = 0`` at update offset 0 (the pre-update level) and
evaluations ``u = 1..U_t`` taken after updates, and upper-bound accuracies ``A*_old, A*_new,
A*_all`` (e.g. a jointly trained model on the same classes):

- stability gap ``S_t = 1 - 1/U_t * sum_u old_acc_u / A*_old``
- plasticity gap ``P_t = 1 - 1/U_t * sum_u new_acc_u / A*_new``
- continual-knowledge gap ``C_t = 1 - 1/U_t * sum_u all_acc_u / A*_all``

(the paper's summary numbers average these over ``t = 1..T-1``, see :func:`summarize_stability`).
The offset-0 evaluation is not part of the means: the authors evaluate every ``k`` updates from
the ``k``-th on (github.com/yousuf907/SGM), and counting the untouched model would credit every
method with its pre-update accuracy (and ~0 new-class accuracy in class-incremental streams).
With the default upper bound 1.0 a gap is simply the mean error over the experience.

On top of those, per experience:

- ``start_old_acc``: old-class accuracy at the experience's **first evaluation, which must be
  taken at update offset 0** (the trainer logs it after the strategy's set-up, e.g. head growth
  or data-driven initialisation, and before any update). The experience starts at that row's
  ``update``.
- ``pre_old_acc``: old-class accuracy of the model as deployed before the update: the previous
  experience's last ``all_acc`` (:class:`~medcl.engine.evaluate.CurveMonitor` measures "all" of
  ``t - 1`` on exactly the images that are "old" for ``t``; exact when that evaluation was at
  its final update, i.e. a budget that is a multiple of ``k``). Falls back to ``start_old_acc``
  when the previous experience has no evaluation. Measuring from here, not from offset 0, counts
  what the set-up itself costs: ``init_drop = pre_old_acc - start_old_acc`` (NaN on fallback).
- ``min_old_acc`` (offset 0 included) and ``max_drop = pre_old_acc - min_old_acc``.
- ``updates_to_recover``: updates from the experience start to the first evaluation, at or after
  the minimum, with ``old_acc >= pre_old_acc - tol``. 0 when old accuracy never falls below
  ``pre_old_acc - tol``; NaN with ``recovered = False`` when it never comes back.
- ``gap_area = sum_u max(0, pre_old_acc - old_acc_u) * (update_u - update_{u-1})``: the area
  between the pre-update line and the curve in accuracy x updates (``x k`` for a regular grid).
"""

from __future__ import annotations

__all__ = [
    "CURVE_COLUMNS",
    "plot_stability_curves",
    "stability_metrics",
    "summarize_stability",
    "updates_to_reach",
]

import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.exceptions import UndefinedMetricWarning

from medcl.errors import DataError, did_you_mean

#: Columns a curves frame must have.
CURVE_COLUMNS = ("experience", "update", "old_acc", "new_acc", "all_acc")

_KINDS = ("old", "new", "all")
_METRIC_COLUMNS = (
    "experience",
    "n_evals",
    "start_update",
    "pre_old_acc",
    "start_old_acc",
    "init_drop",
    "min_old_acc",
    "updates_to_min",
    "max_drop",
    "recovered",
    "updates_to_recover",
    "gap_area",
    "stability_gap",
    "plasticity_gap",
    "continual_knowledge_gap",
)

UpperBound = float | Mapping[str, float | Mapping[int, float]]


def _check_curves(curves: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(curves, pd.DataFrame):
        raise DataError(
            f"curves must be a pandas DataFrame with columns {list(CURVE_COLUMNS)}; got "
            f"{type(curves).__name__}."
        )
    missing = [c for c in CURVE_COLUMNS if c not in curves.columns]
    if missing:
        raise DataError(
            f"curves is missing column(s) {missing}; expected {list(CURVE_COLUMNS)}, got "
            f"{list(curves.columns)}."
        )
    frame = curves.loc[:, list(CURVE_COLUMNS)].copy()
    for col in CURVE_COLUMNS[1:]:
        try:
            frame[col] = pd.to_numeric(frame[col], errors="raise").astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"curves[{col!r}] must be numeric (NaN allowed for accuracies); {exc}."
            ) from exc
    dup = frame.duplicated(subset=["experience", "update"])
    if dup.any():
        row = frame[dup].iloc[0]
        raise DataError(
            f"curves has more than one evaluation at experience={row['experience']}, "
            f"update={row['update']}; keep one row per (experience, update)."
        )
    return frame.sort_values(["experience", "update"], kind="stable").reset_index(drop=True)


def _upper_bounds(upper_bound: UpperBound, experiences: list[int]) -> dict[str, dict[int, float]]:
    """Resolve ``upper_bound`` into ``{kind: {experience: value}}`` and validate it."""
    if isinstance(upper_bound, Mapping):
        unknown = [k for k in upper_bound if k not in _KINDS]
        if unknown:
            raise DataError(
                f"upper_bound key {unknown[0]!r} is not one of {list(_KINDS)}; "
                f"{did_you_mean(str(unknown[0]), _KINDS)}."
            )
        missing = [k for k in _KINDS if k not in upper_bound]
        if missing:
            raise DataError(
                f"upper_bound must give 'old', 'new' and 'all'; missing {missing}. Pass a float "
                "to use one value for all three."
            )
        spec = dict(upper_bound)
    else:
        spec = {k: upper_bound for k in _KINDS}
    out: dict[str, dict[int, float]] = {}
    for kind, value in spec.items():
        if isinstance(value, Mapping):
            lacking = [e for e in experiences if e not in value]
            if lacking:
                raise DataError(
                    f"upper_bound[{kind!r}] has no value for experience(s) {lacking}; give one "
                    f"per experience >= 1 ({experiences}) or a single float."
                )
            per = {e: float(value[e]) for e in experiences}
        else:
            per = dict.fromkeys(experiences, float(value))
        bad = {e: v for e, v in per.items() if not (np.isfinite(v) and v > 0)}
        if bad:
            raise DataError(f"upper_bound[{kind!r}] must be positive finite accuracies; got {bad}.")
        out[kind] = per
    return out


def _gap(acc: np.ndarray, bound: float) -> float:
    acc = acc[~np.isnan(acc)]
    return float(1.0 - np.mean(acc / bound)) if acc.size else float("nan")


def _one_experience(
    exp: int, g: pd.DataFrame, bounds: dict[str, dict[int, float]], tol: float, prev_end: float
):
    upd = g["update"].to_numpy()
    old = g["old_acc"].to_numpy()
    start = upd[0]
    row: dict[str, object] = {
        "experience": exp,
        "n_evals": len(g),
        "start_update": start,
        # gaps average the evaluations after updates (u >= 1), not the offset-0 one
        "stability_gap": _gap(old[1:], bounds["old"][exp]),
        "plasticity_gap": _gap(g["new_acc"].to_numpy()[1:], bounds["new"][exp]),
        "continual_knowledge_gap": _gap(g["all_acc"].to_numpy()[1:], bounds["all"][exp]),
    }
    start_old = float(old[0])
    pre = prev_end if np.isfinite(prev_end) else start_old
    row |= {"start_old_acc": start_old, "init_drop": prev_end - start_old}
    if np.isnan(pre) or np.isnan(old).all():
        warnings.warn(
            f"experience {exp}: old-class accuracy at its first evaluation (update {start:g}, "
            "the pre-update level) is NaN; drop, recovery and gap area are NaN. Log an "
            "evaluation at update offset 0 of every experience.",
            UndefinedMetricWarning,
            stacklevel=3,
        )
        nan = float("nan")
        valid = ~np.isnan(old)
        return row | {
            "pre_old_acc": pre,
            "min_old_acc": float(np.min(old[valid])) if valid.any() else nan,
            "updates_to_min": nan,
            "max_drop": nan,
            "recovered": False,
            "updates_to_recover": nan,
            "gap_area": nan,
        }
    filled = np.where(np.isnan(old), np.inf, old)  # NaN evaluations never count as the minimum
    i_min = int(np.argmin(filled))
    steps = np.diff(upd, prepend=upd[0])  # (U,) updates since the previous evaluation
    below = np.clip(pre - old, 0.0, None)
    gap_area = float(np.nansum(below * steps))
    if not (old < pre - tol).any():
        recovered, to_recover = True, 0.0
    else:
        later = np.flatnonzero(old[i_min:] >= pre - tol)
        recovered = later.size > 0
        to_recover = float(upd[i_min + later[0]] - start) if recovered else float("nan")
    return row | {
        "pre_old_acc": float(pre),
        "min_old_acc": float(old[i_min]),
        "updates_to_min": float(upd[i_min] - start),
        "max_drop": float(pre - old[i_min]),
        "recovered": recovered,
        "updates_to_recover": to_recover,
        "gap_area": gap_area,
    }


def stability_metrics(
    curves: pd.DataFrame, *, upper_bound: UpperBound = 1.0, tol: float = 0.01
) -> pd.DataFrame:
    """Stability-gap metrics, one row per experience after the first.

    Args:
        curves: one row per evaluation with columns ``experience, update, old_acc, new_acc,
            all_acc`` (``update`` is the global step; ``old_acc`` is NaN in the first
            experience). Each experience's first row must be the evaluation at update offset 0
            (see the module docstring). Accuracies are fractions in [0, 1].
        upper_bound: upper-bound accuracy for the gaps: one float for old, new and all, or a
            mapping ``{"old": ..., "new": ..., "all": ...}`` whose values are floats or
            ``{experience: accuracy}`` dicts (e.g. a joint model trained on experiences ``<= t``).
        tol: recovery tolerance: recovered once ``old_acc >= pre_old_acc - tol``.

    Returns:
        One row per experience ``t >= 1`` with columns ``experience, n_evals, start_update,
        pre_old_acc, start_old_acc, init_drop, min_old_acc, updates_to_min, max_drop, recovered,
        updates_to_recover, gap_area,
        stability_gap, plasticity_gap, continual_knowledge_gap`` (empty for a single experience).

    Raises:
        DataError: missing columns, duplicated evaluations or an invalid upper bound.
    """
    if not (np.isfinite(tol) and tol >= 0):
        raise DataError(f"tol must be a non-negative accuracy difference; got {tol!r}.")
    frame = _check_curves(curves)
    last_all = frame.groupby("experience", sort=True)["all_acc"].last()  # deployed levels
    experiences = [
        e.item() if isinstance(e, np.generic) else e for e in pd.unique(frame["experience"])
    ][1:]
    bounds = _upper_bounds(upper_bound, experiences)
    rows = [
        _one_experience(exp, g, bounds, tol, float(last_all.get(exp - 1, np.nan)))
        for exp, g in frame.groupby("experience", sort=True)
        if exp in experiences
    ]
    out = pd.DataFrame(rows, columns=list(_METRIC_COLUMNS))
    return out.astype({"recovered": bool, "n_evals": int})


def summarize_stability(
    curves: pd.DataFrame, *, upper_bound: UpperBound = 1.0, tol: float = 0.01
) -> dict[str, float]:
    """Means over experiences ``t >= 1`` of :func:`stability_metrics` (same arguments).

    Returns:
        ``stability_gap``, ``plasticity_gap``, ``continual_knowledge_gap``, ``min_old_acc``,
        ``max_drop``, ``init_drop``, ``gap_area`` (means), ``updates_to_recover`` (mean over the experiences that
        recovered), ``n_not_recovered`` and ``n_experiences`` (experiences scored). All NaN, with
        a warning, when the stream has a single experience.
    """
    table = stability_metrics(curves, upper_bound=upper_bound, tol=tol)
    keys = (
        "stability_gap",
        "plasticity_gap",
        "continual_knowledge_gap",
        "min_old_acc",
        "max_drop",
        "init_drop",
        "gap_area",
    )
    if table.empty:
        warnings.warn(
            "stability metrics are undefined for a single experience (there are no old classes "
            "to forget); returning NaN.",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        return dict.fromkeys(keys, float("nan")) | {
            "updates_to_recover": float("nan"),
            "n_not_recovered": 0.0,
            "n_experiences": 0.0,
        }
    out = {k: float(table[k].mean()) for k in keys}
    recovered = table.loc[table["recovered"], "updates_to_recover"]
    out["updates_to_recover"] = float(recovered.mean()) if len(recovered) else float("nan")
    out["n_not_recovered"] = float((~table["recovered"]).sum())
    out["n_experiences"] = float(len(table))
    return out


def updates_to_reach(
    curves: pd.DataFrame, targets: Mapping[int, float], *, column: str = "all_acc"
) -> dict[int, float]:
    """Updates into each experience until ``column`` first reaches a target accuracy.

    Args:
        curves: the frame :func:`stability_metrics` takes.
        targets: ``{experience: accuracy}`` to reach (e.g. another method's final accuracy).
        column: ``old_acc``, ``new_acc`` or ``all_acc``.

    Returns:
        ``{experience: updates}`` from the experience's first evaluation (offset 0, which counts
        as 0 updates) to the first evaluation with ``column >= target``; ``inf`` when it never
        does.

    Raises:
        DataError: an unknown column, or a target experience the curves do not contain.
    """
    if column not in CURVE_COLUMNS[2:]:
        raise DataError(f"column must be one of {list(CURVE_COLUMNS[2:])}; got {column!r}.")
    frame = _check_curves(curves)
    groups = dict(tuple(frame.groupby("experience", sort=True)))
    missing = [e for e in targets if e not in groups]
    if missing:
        raise DataError(
            f"targets name experience(s) {missing} that the curves lack; they have "
            f"{sorted(groups)}."
        )
    out = {}
    for exp, target in targets.items():
        g = groups[exp]
        hit = np.flatnonzero(g[column].to_numpy() >= target)
        upd = g["update"].to_numpy()
        out[exp] = float(upd[hit[0]] - upd[0]) if hit.size else float("inf")
    return out


def plot_stability_curves(
    curves: pd.DataFrame,
    ax: Axes | None = None,
    *,
    boundaries: bool = True,
    title: str | None = None,
) -> Figure:
    """Plot old-, new- and all-class accuracy against the update count.

    Works under any backend (``Agg`` included): without ``ax`` it draws on a new
    :class:`~matplotlib.figure.Figure` that is not registered with pyplot.

    Args:
        curves: the frame :func:`stability_metrics` takes.
        ax: axes to draw on; ``None`` creates a figure.
        boundaries: draw a dashed vertical line where each experience after the first starts.
        title: axes title.

    Returns:
        The figure holding the axes.
    """
    frame = _check_curves(curves)
    if ax is None:
        fig = Figure(figsize=(7.0, 3.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.get_figure()
    # One segment per experience: "new" and "old" change meaning at each boundary.
    for k, (_, g) in enumerate(frame.groupby("experience", sort=True)):
        for col, label, color in (
            ("old_acc", "old classes", "tab:blue"),
            ("new_acc", "new classes", "tab:orange"),
            ("all_acc", "all classes", "tab:green"),
        ):
            ax.plot(g["update"], g[col], label=label if k == 0 else None, color=color, lw=1.5)
    if boundaries:
        starts = frame.groupby("experience", sort=True)["update"].min().to_numpy()[1:]
        for x in starts:
            ax.axvline(x, color="0.5", ls="--", lw=0.8)
    ax.set_xlabel("update")
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    ax.legend(loc="lower left", fontsize="small")
    return fig
