"""Conformal prediction sets in ``medcl predict`` and the bundle's ``predictions.csv``.

The export's metadata carries the run's conformal thresholds (``calibration.conformal``, written by
:func:`~medcl.export.loading.calibration_meta`); :func:`set_cells` applies them to the
probabilities the model returns. Those are already calibrated: the exported module divides its
scores by the temperature itself (:class:`~medcl.export.module.ExportModule`), so no temperature
is applied here. A set lists its classes in decreasing probability, joined by ``|``; it always
holds the top class (:class:`~medcl.metrics.conformal.ConformalSets`).
"""

from __future__ import annotations

__all__ = ["check_site", "conformal_sets", "set_cells"]

from typing import Any

import numpy as np

from medcl.errors import DataError
from medcl.metrics.conformal import ConformalSets


def conformal_sets(meta: dict[str, Any]) -> ConformalSets | None:
    """The thresholds in an export's metadata; ``None`` for a model without prediction sets
    (calibration switched off, or exported before medcl calibrated)."""
    record = (meta.get("calibration") or {}).get("conformal")
    return ConformalSets.from_dict(record) if record else None


def check_site(meta: dict[str, Any], site: str | None) -> None:
    """Refuse a ``site`` that selects no threshold (``medcl predict --site``).

    Raises:
        DataError: the model has no prediction sets, or (per-site thresholds) ``site`` is not a
            site it was calibrated on; the message lists the known sites.
    """
    if site is None:
        return
    sets = conformal_sets(meta)
    if sets is None:
        why = (meta.get("calibration") or {}).get("note") or "exported before medcl calibrated"
        raise DataError(
            f"--site {site!r} selects a conformal threshold, but this model has no prediction "
            f"sets ({why}). Omit --site, or export a run calibrated with "
            "calibration.conformal: true."
        )
    sets.thresholds(site)  # DataError naming the known sites


def set_cells(
    probs: np.ndarray, meta: dict[str, Any], site: str | None = None
) -> list[dict[str, Any]] | None:
    """Per row of ``probs`` ``(N, K)``: ``{"prediction_set": "a|b", "set_size": 2}``.

    Args:
        probs: the model's (calibrated) probabilities.
        meta: the export's metadata.
        site: where the inputs come from (per-site thresholds); ``None``: the threshold that
            covers every calibrated site (:meth:`ConformalSets.thresholds`).

    Returns:
        One dict per row, or ``None`` when the model has no prediction sets.
    """
    sets = conformal_sets(meta)
    if sets is None:
        return None
    p = np.asarray(probs, dtype=np.float64)
    if len(p) == 0:  # every input was unreadable
        return []
    member = sets.sets(p, None if site is None else [site] * len(p))
    names = list(meta["class_names"])
    order = np.argsort(-p, axis=1, kind="stable")
    return [
        {
            "prediction_set": "|".join(names[j] for j in o if m[j]),
            "set_size": int(m.sum()),
        }
        for o, m in zip(order, member, strict=True)
    ]
