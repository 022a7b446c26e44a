"""Calibration: expected/maximum calibration error and reliability diagrams.

Top-label calibration with equal-width confidence bins (Guo et al., "On Calibration of Modern
Neural Networks", ICML 2017): the confidence of a prediction is its largest class probability,
and a prediction is correct when the arg-max class is the label.

Also home of the prediction validation shared by :mod:`medcl.metrics.clinical`.
"""

from __future__ import annotations

__all__ = [
    "check_predictions",
    "confidence_bins",
    "expected_calibration_error",
    "plot_reliability",
    "reliability_table",
    "top_label",
]

import sys

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike, NDArray

from medcl.errors import DataError


def _as_numpy(x: object) -> np.ndarray:
    """numpy view of an array-like; torch tensors (any device) are detached and moved to CPU."""
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_predictions(
    y_true: ArrayLike, y_prob: ArrayLike, *, name: str = "y_prob"
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Validate labels and class scores; return ``(y_true (N,), y_prob (N, C))``.

    A 1-D ``y_prob`` is the positive-class probability of a binary problem and becomes the
    ``(N, 2)`` array ``[1 - p, p]``.

    Args:
        y_true: ``(N,)`` integer class ids in ``[0, C)``.
        y_prob: ``(N, C)`` class probabilities (or scores), or ``(N,)`` for binary.
        name: argument name used to word messages.

    Raises:
        DataError: wrong shapes, lengths, non-integer or out-of-range labels, non-finite scores.
    """
    yt = _as_numpy(y_true)
    yp = _as_numpy(y_prob).astype(np.float64, copy=False)
    if yt.ndim != 1:
        raise DataError(
            f"y_true must be 1-D class ids of shape (N,); got shape {yt.shape}. If it is "
            "one-hot, pass y_true.argmax(1)."
        )
    if yt.size == 0:
        raise DataError("y_true is empty; metrics need at least one prediction.")
    if yt.dtype.kind == "f":
        if not np.all(np.isfinite(yt)) or not np.all(yt == np.round(yt)):
            raise DataError(
                f"y_true must hold integer class ids; got non-integer values such as "
                f"{yt[~np.isfinite(yt) | (yt != np.round(yt))][:3].tolist()}."
            )
    elif yt.dtype.kind not in "iub":
        raise DataError(
            f"y_true must hold integer class ids; got dtype {yt.dtype}. Map labels to 0..C-1 first."
        )
    yt = yt.astype(np.int64)
    if yp.ndim == 1:
        yp = np.stack([1.0 - yp, yp], axis=1)
    if yp.ndim != 2 or yp.shape[1] < 2:
        raise DataError(
            f"{name} must be (N, C) class probabilities with C >= 2, or (N,) positive-class "
            f"probabilities for a binary problem; got shape {yp.shape}."
        )
    if yp.shape[0] != yt.shape[0]:
        raise DataError(
            f"{name} has {yp.shape[0]} rows but y_true has {yt.shape[0]} labels; they must "
            "describe the same samples."
        )
    if not np.isfinite(yp).all():
        raise DataError(f"{name} holds NaN or infinite scores; check the model outputs.")
    n_classes = yp.shape[1]
    bad = (yt < 0) | (yt >= n_classes)
    if bad.any():
        raise DataError(
            f"y_true must hold class ids in [0, {n_classes}) to match the {n_classes} columns of "
            f"{name}; got {np.unique(yt[bad])[:5].tolist()}."
        )
    return yt, yp


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise DataError(f"n_bins must be a positive integer; got {n_bins!r}.")


def confidence_bins(confidence: NDArray[np.float64], n_bins: int) -> NDArray[np.int64]:
    """Equal-width bin of each confidence: bin ``b`` is ``(b/n_bins, (b+1)/n_bins]``, 0 in bin 0."""
    inner = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    return np.searchsorted(inner, confidence, side="left").astype(np.int64)


def top_label(
    y_true: ArrayLike, y_prob: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Top-label ``(confidence (N,), correct (N,) as 0/1)``; probabilities must lie in [0, 1]."""
    yt, yp = check_predictions(y_true, y_prob)
    if (yp < 0).any() or (yp > 1).any():
        raise DataError(
            "calibration needs probabilities in [0, 1]; got scores outside that range. Apply "
            "softmax (or sigmoid) to the logits first."
        )
    confidence = yp.max(axis=1)
    correct = (yp.argmax(axis=1) == yt).astype(np.float64)
    return confidence, correct


def reliability_table(y_true: ArrayLike, y_prob: ArrayLike, *, n_bins: int = 15) -> pd.DataFrame:
    """Per-bin mean confidence, accuracy and count of top-label predictions.

    Bin ``b`` covers confidences in ``(b/n_bins, (b+1)/n_bins]`` (bin 0 also takes 0).

    Args:
        y_true: ``(N,)`` class ids.
        y_prob: ``(N, C)`` probabilities, or ``(N,)`` positive-class probabilities.
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        ``n_bins`` rows with columns ``bin, bin_low, bin_high, confidence, accuracy, count``;
        empty bins have ``count = 0`` and NaN confidence/accuracy.
    """
    _check_n_bins(n_bins)
    confidence, correct = top_label(y_true, y_prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = confidence_bins(confidence, n_bins)  # (N,)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=confidence, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return pd.DataFrame(
        {
            "bin": np.arange(n_bins),
            "bin_low": edges[:-1],
            "bin_high": edges[1:],
            "confidence": conf,
            "accuracy": acc,
            "count": count,
        }
    )


def expected_calibration_error(
    y_true: ArrayLike, y_prob: ArrayLike, *, n_bins: int = 15
) -> tuple[float, float]:
    """Expected and maximum calibration error of top-label predictions.

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` and ``MCE = max_{b: n_b > 0} |acc_b - conf_b|``
    over equal-width confidence bins (see :func:`reliability_table`).

    Args:
        y_true: ``(N,)`` class ids.
        y_prob: ``(N, C)`` probabilities, or ``(N,)`` positive-class probabilities.
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        ``(ece, mce)`` as fractions.
    """
    table = reliability_table(y_true, y_prob, n_bins=n_bins)
    filled = table[table["count"] > 0]
    err = (filled["accuracy"] - filled["confidence"]).abs()
    ece = float((err * filled["count"]).sum() / filled["count"].sum())
    return ece, float(err.max())


def plot_reliability(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    *,
    n_bins: int = 15,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal.

    Works under any backend: without ``ax`` it draws on a new, pyplot-free
    :class:`~matplotlib.figure.Figure`.

    Args:
        y_true: ``(N,)`` class ids.
        y_prob: ``(N, C)`` probabilities, or ``(N,)`` positive-class probabilities.
        n_bins: number of equal-width bins.
        ax: axes to draw on; ``None`` creates a figure.
        title: axes title; the ECE is appended.

    Returns:
        The figure holding the axes.
    """
    table = reliability_table(y_true, y_prob, n_bins=n_bins)
    ece, _ = expected_calibration_error(y_true, y_prob, n_bins=n_bins)
    if ax is None:
        fig = Figure(figsize=(4.0, 4.0), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.get_figure()
    width = 1.0 / n_bins
    filled = table[table["count"] > 0]
    ax.bar(
        filled["bin_low"],
        filled["accuracy"],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="white",
        label="accuracy",
    )
    ax.bar(
        filled["bin_low"],
        filled["confidence"] - filled["accuracy"],
        bottom=filled["accuracy"],
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], color="0.3", ls="--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title + ' - ' if title else ''}ECE {ece:.3f}")
    ax.legend(loc="upper left", fontsize="small")
    return fig
