"""Failure analysis: the most confident errors per class, with image thumbnails.

Thumbnails are rendered from the test images of the rebuilt scenario (pixels only: no file name,
header or metadata is ever read into the report). 3D volumes show their middle axial slice.
"""

from __future__ import annotations

__all__ = ["confident_errors", "images_of_rows", "thumbnail_png"]

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from medcl.errors import DataError
from medcl.models.saliency import scaled_png
from medcl.reports.predictions import Predictions


def confident_errors(
    pred: Predictions,
    class_names: Sequence[str],
    *,
    per_class: int = 4,
    threshold: float | None = None,
) -> pd.DataFrame:
    """The ``per_class`` misclassified test rows of each true class with the highest confidence.

    Args:
        pred: predictions of one model.
        class_names: name of every class id in ``pred.labels``.
        per_class: errors kept per true class.
        threshold: binary operating point ``p_1 >= threshold`` (default: arg-max); confidence
            is the probability of the predicted class.

    Returns:
        Rows ``row, true, predicted, confidence, p_true, experience`` plus the safe metadata
        columns of ``pred.meta``; ``row`` indexes ``pred`` (and the prediction files), sorted
        by true class, then decreasing confidence.
    """
    if per_class < 0:
        raise DataError(f"per_class must be >= 0; got {per_class}.")
    names = np.asarray([str(c) for c in class_names], dtype=object)
    if names.size <= max(int(pred.labels.max()), pred.n_classes - 1):
        raise DataError(
            f"class_names has {names.size} names but the predictions use class ids up to "
            f"{max(int(pred.labels.max()), pred.n_classes - 1)}."
        )
    scorable = pred.scorable()
    predicted = pred.predict(threshold)
    confidence = pred.probs[np.arange(len(pred)), predicted]
    rows = []
    for c in np.unique(pred.labels[scorable]):
        wrong = np.flatnonzero(scorable & (pred.labels == c) & (predicted != c))
        top = wrong[np.argsort(-confidence[wrong], kind="stable")[:per_class]]
        rows.extend(top.tolist())
    idx = np.asarray(rows, dtype=np.int64)
    p_true = pred.probs[idx, pred.labels[idx]] if idx.size else np.zeros(0)
    out = pd.DataFrame(
        {
            "row": idx,
            "true": names[pred.labels[idx]],
            "predicted": names[predicted[idx]],
            "confidence": confidence[idx],
            "p_true": p_true,
        }
    )
    meta = pred.meta.iloc[idx].reset_index(drop=True)
    return pd.concat([out, meta], axis=1)


def thumbnail_png(image: torch.Tensor | np.ndarray, *, size: int = 96) -> bytes:
    """PNG bytes of one image, scaled to ``size`` px on its long side.

    Args:
        image: ``(C, H, W)`` or ``(C, H, W, D)`` (middle slice of ``D`` shown); uint8, or float
            in [0, 1]; ``C`` is 1 (grayscale) or 3 (RGB); other channel counts show channel 0.

    Returns:
        Encoded PNG.
    """
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if x.ndim == 4:
        x = x[..., x.shape[-1] // 2]
    if x.ndim != 3:
        raise DataError(f"thumbnail needs (C, H, W) or (C, H, W, D); got shape {x.shape}.")
    if x.dtype != np.uint8:
        x = (np.clip(x.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    return scaled_png(Image.fromarray(x[0] if x.shape[0] != 3 else np.moveaxis(x, 0, -1)), size)


def images_of_rows(
    scenario: Any, final: Predictions, rows: np.ndarray | pd.Series
) -> dict[int, torch.Tensor] | None:
    """The test image ``(C, H, W[, D])`` of each prediction row (rows in experience order).

    Args:
        scenario: the rebuilt scenario (:meth:`~medcl.reports.results.RunResults.rebuild_scenario`).
        final: the predictions the rows index.
        rows: prediction rows.

    Returns:
        ``row -> image`` as stored (uint8 for MedMNIST); ``None`` when the rebuilt scenario's
        test labels do not match the run's predictions (the data changed since the run).
    """
    images = [e.test.images for e in scenario]
    labels = np.concatenate([e.test.labels.numpy() for e in scenario])
    if labels.size > len(final) or not np.array_equal(labels, final.labels[: labels.size]):
        return None
    offsets = np.cumsum([0, *[len(x) for x in images]])
    out = {}
    for r in np.asarray(rows)[np.asarray(rows) < labels.size]:
        e = int(np.searchsorted(offsets, r, side="right") - 1)
        out[int(r)] = images[e][r - offsets[e]]
    return out
