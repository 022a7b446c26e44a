"""The MONAI-style accumulator of the clinical metrics: update batch by batch, then compute."""

from __future__ import annotations

__all__ = ["ClinicalMetrics"]

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from medcl.errors import DataError
from medcl.metrics.calibration import _as_numpy, check_predictions
from medcl.metrics.clinical.bootstrap import BootstrapOptions
from medcl.metrics.clinical.groups import per_group_metrics
from medcl.metrics.clinical.spec import DEFAULT_METRICS, MetricSpec, _check_metrics


class ClinicalMetrics:
    """Accumulate predictions batch by batch, then compute the per-group table (MONAI style).

    Example:
        >>> acc = ClinicalMetrics(class_names=["normal", "pneumonia"], n_resamples=200)
        >>> for probs, labels, site in batches:  # doctest: +SKIP
        ...     acc.update(probs, labels, group=site)
        >>> table = acc.compute()  # doctest: +SKIP

    Args:
        metrics, class_names: as in :func:`per_group_metrics`.
        **options: :class:`~medcl.metrics.clinical.bootstrap.BootstrapOptions`, as in
            :func:`per_group_metrics`.
    """

    def __init__(
        self,
        metrics: Sequence[MetricSpec] = DEFAULT_METRICS,
        *,
        class_names: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        self.metrics = _check_metrics(metrics)
        self.class_names = class_names
        self.options = BootstrapOptions(**options)
        self.reset()

    def reset(self) -> None:
        """Forget every accumulated prediction."""
        self._prob: list[np.ndarray] = []
        self._true: list[np.ndarray] = []
        self._group: list[np.ndarray] | None = None

    def update(self, y_prob: ArrayLike, y_true: ArrayLike, *, group: object = None) -> None:
        """Add a batch.

        Args:
            y_prob: ``(B, C)`` probabilities or ``(B,)`` positive-class probabilities (numpy or
                torch, any device).
            y_true: ``(B,)`` class ids.
            group: one label for the whole batch, a ``(B,)`` array of labels, or ``None``. Give
                it for every batch or for none.
        """
        yt, yp = check_predictions(y_true, y_prob)
        if self._true and yp.shape[1] != self._prob[0].shape[1]:
            raise DataError(
                f"ClinicalMetrics.update got {yp.shape[1]} classes; earlier batches had "
                f"{self._prob[0].shape[1]}."
            )
        if self._true and (group is None) != (self._group is None):
            raise DataError(
                "ClinicalMetrics.update: give `group` for every batch or for none; got a mix."
            )
        if group is not None:
            g = _as_numpy(group)
            g = np.full(yt.size, group, dtype=object) if g.ndim == 0 else g.astype(object)
            if g.shape != yt.shape:
                raise DataError(
                    f"group must be one label or one per sample, shape {yt.shape}; got {g.shape}."
                )
            self._group = [*(self._group or []), g]
        self._true.append(yt)
        self._prob.append(yp)

    def compute(self) -> pd.DataFrame:
        """Per-group (and overall) table of :func:`per_group_metrics` on everything seen."""
        if not self._true:
            raise DataError("ClinicalMetrics.compute called before any update; add a batch first.")
        groups = None if self._group is None else np.concatenate(self._group)
        return per_group_metrics(
            np.concatenate(self._true),
            np.concatenate(self._prob),
            groups,
            self.metrics,
            class_names=self.class_names,
            **self.options.keywords(),
        )
