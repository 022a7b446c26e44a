"""Test-set predictions of one model of a run, with the per-row metadata that is safe to show.

Privacy: per-row metadata is reduced on load to :data:`SAFE_COLUMNS` plus the columns the user
names in ``safe_id_columns`` (see :class:`~medcl.reports.results.RunResults`).
"""

from __future__ import annotations

__all__ = ["SAFE_COLUMNS", "Predictions"]

from dataclasses import dataclass

import numpy as np
import pandas as pd

from medcl.errors import DataError

#: Per-row metadata that is never an identifier: kept in every frame and report.
SAFE_COLUMNS = ("dataset", "site", "split", "experience")


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
