"""Wall time per phase of a run, recorded in ``metrics.json`` under ``timing``.

A run times each experience's phases with one :class:`PhaseTimer`: ``train`` (the update loop,
without the curve evaluations inside it), ``curves``, ``consolidation`` (the strategy's
``after_experience``: merges, Fisher, stage-2 re-tuning), ``features`` (the forward passes
consolidation and exemplar selection make, e.g. herding features, each once per model state:
:class:`~medcl.models.feature_cache.FeatureCache`), ``memory`` (exemplar selection), ``eval``
(the test sets ``eval.future`` scores), ``predictions``, ``checkpoint`` and ``metrics`` (files
written); ``setup`` (data, model, the untrained baseline) once per start, ``report`` when the
command line writes the report. ``validation`` (early stopping's scoring after each epoch)
appears only in runs that set ``train.early_stopping_patience``.
"""

from __future__ import annotations

__all__ = ["PHASES", "PhaseTimer"]

import time
from collections.abc import Iterator
from contextlib import contextmanager

#: The phases of one experience, in the order a run goes through them.
PHASES = (
    "train",
    "curves",
    "consolidation",
    "features",
    "memory",
    "eval",
    "calibration",
    "predictions",
    "checkpoint",
    "metrics",
)


class PhaseTimer:
    """Seconds spent per named phase (a phase entered twice adds up).

    Example::

        timer = PhaseTimer()
        with timer("eval"):
            evaluate(...)
        timer.seconds  # {"eval": 1.93}
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the block as ``phase``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``phase``."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def record(self) -> dict[str, float]:
        """The phases (known ones in :data:`PHASES` order, then others) and their ``total``."""
        order = [p for p in PHASES if p in self.seconds]
        order += [p for p in self.seconds if p not in PHASES]
        out = {p: round(self.seconds[p], 4) for p in order}
        return out | {"total": round(sum(self.seconds.values()), 4)}
