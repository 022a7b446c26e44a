"""Ready-made report plots (matplotlib, pyplot-free: safe under any backend and in threads).

Each ``plot_*`` returns a :class:`~matplotlib.figure.Figure`; :func:`figure_data_uri` embeds one
in HTML as a base64 PNG. The reliability diagram and the stability-gap curves come from
:mod:`medcl.metrics.calibration` and :mod:`medcl.metrics.stability`.
"""

from __future__ import annotations

__all__ = [
    "figure_data_uri",
    "plot_accuracy_matrix",
    "plot_confusion",
    "plot_forgetting",
    "plot_groups",
    "plot_roc_curves",
    "png_data_uri",
]

import base64
import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for inline ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_data_uri(fig: Figure, *, dpi: int = 96) -> str:
    """Render ``fig`` to PNG and return it as a data URI (the report stays one offline file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return png_data_uri(buf.getvalue())


def _figure(width: float, height: float) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def plot_accuracy_matrix(R: np.ndarray, names: Sequence[str], *, title: str = "") -> Figure:
    """Heat-map of ``R[i, j]`` (rows: after training ``i``; columns: tested on ``j``)."""
    T = R.shape[0]
    fig, ax = _figure(1.6 + 0.75 * T, 1.2 + 0.6 * T)
    im = ax.imshow(np.ma.masked_invalid(R), vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(T):
        for j in range(T):
            if np.isfinite(R[i, j]):
                ax.text(
                    j,
                    i,
                    f"{R[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if R[i, j] < 0.6 else "black",
                )
    short = [n if len(n) <= 18 else n[:17] + "…" for n in names]
    ax.set_xticks(range(T), short, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(T), short, fontsize=8)
    ax.set_xlabel("tested on")
    ax.set_ylabel("after training")
    ax.set_title(title or "accuracy matrix")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def plot_roc_curves(y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]) -> Figure:
    """One-vs-rest ROC curve of every class present (scikit-learn ``roc_curve``)."""
    fig, ax = _figure(4.6, 4.2)
    for c, name in enumerate(class_names):
        positive = y_true == c
        if 0 < positive.sum() < positive.size:
            fpr, tpr, _ = roc_curve(positive, y_prob[:, c])
            auc = roc_auc_score(positive, y_prob[:, c])
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title("ROC curves (one-vs-rest)")
    ax.legend(loc="lower right", fontsize="x-small")
    return fig


def plot_confusion(frame: pd.DataFrame) -> Figure:
    """Counts and row-normalised confusion matrices side by side.

    Args:
        frame: long form with columns ``true, predicted, count, fraction``
            (:meth:`~medcl.reports.results.RunResults.confusion_frame`).
    """
    names = list(dict.fromkeys(frame["true"]))
    k = len(names)
    counts = frame["count"].to_numpy().reshape(k, k)
    frac = frame["fraction"].to_numpy(dtype=float).reshape(k, k)
    fig = Figure(figsize=(2.0 + 1.2 * k, 0.9 + 0.55 * k), layout="constrained")
    short = [n if len(n) <= 14 else n[:13] + "…" for n in names]
    for ax, values, fmt, title in zip(
        fig.subplots(1, 2),
        (counts, frac),
        ("{:.0f}", "{:.2f}"),
        ("counts", "normalised by true class"),
        strict=True,
    ):
        ax.imshow(
            np.ma.masked_invalid(values.astype(float)),
            cmap="Blues",
            vmin=0,
            vmax=max(1.0, float(np.nanmax(values)) if values.size else 1.0),
        )
        top = np.nanmax(values) if np.isfinite(values).any() else 1.0
        for i in range(k):
            for j in range(k):
                if np.isfinite(values[i, j]):
                    ax.text(
                        j,
                        i,
                        fmt.format(values[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if values[i, j] > 0.6 * top else "black",
                    )
        ax.set_xticks(range(k), short, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(k), short, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
    return fig


def plot_groups(
    table: pd.DataFrame,
    targets: Sequence[tuple[str, str]] = (("auroc", "macro"), ("balanced_accuracy", "overall")),
) -> Figure:
    """Forest plot: each site/experience's value with its CI, and the pooled value.

    Args:
        table: a clinical table with columns ``group, metric, class, value, ci_low, ci_high``.
        targets: ``(metric, class)`` pairs, one panel each.
    """
    groups = list(dict.fromkeys(table["group"]))
    fig = Figure(figsize=(3.4 * len(targets), 0.9 + 0.42 * len(groups)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(targets), sharey=True))
    for ax, (metric, cls) in zip(axes, targets, strict=True):
        sel = table[(table["metric"] == metric) & (table["class"] == cls)].set_index("group")
        for y, g in enumerate(groups):
            if g not in sel.index or not np.isfinite(sel.at[g, "value"]):
                continue
            v, lo, hi = (float(sel.at[g, k]) for k in ("value", "ci_low", "ci_high"))
            pooled = g == "overall"
            ax.errorbar(
                v,
                y,
                xerr=[[max(v - lo, 0)], [max(hi - v, 0)]],
                capsize=3,
                fmt="D" if pooled else "o",
                color="black" if pooled else "tab:blue",
            )
            if pooled:
                ax.axvline(v, color="0.6", ls="--", lw=0.8)
        ax.set_yticks(range(len(groups)), groups, fontsize=8)
        ax.set_xlabel(f"{metric} [{cls}]")
        ax.set_xlim(-0.02, 1.02)
    axes[0].invert_yaxis()  # shared y axis: invert once, first group on top
    return fig


def plot_forgetting(frame: pd.DataFrame) -> Figure:
    """Bars of best and final accuracy per experience; forgetting is their difference."""
    fig, ax = _figure(1.8 + 0.9 * max(len(frame), 1), 3.0)
    x = np.arange(len(frame))
    ax.bar(x - 0.2, frame["best_accuracy"], width=0.4, label="best before the end")
    ax.bar(x + 0.2, frame["final_accuracy"], width=0.4, label="final model")
    for i, f in enumerate(frame["forgetting"]):
        if np.isfinite(f):
            ax.text(i, 1.02, f"-{f:.2f}" if f >= 0 else f"+{-f:.2f}", ha="center", fontsize=8)
    ax.set_xticks(
        x,
        [n if len(n) <= 14 else n[:13] + "…" for n in frame["name"]],
        fontsize=8,
        rotation=20,
        ha="right",
    )
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy")
    ax.set_title("forgetting per experience", fontsize=10)
    ax.legend(loc="lower left", fontsize="x-small")
    return fig
