"""A run's progress that is not a tensor: :class:`RunState`, checkpointed as ``state.json``."""

from __future__ import annotations

__all__ = ["RunState"]

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunState:
    """Everything about a run's progress that is not a tensor (stored in ``state.json``)."""

    completed: int = -1
    global_update: int = 0
    accuracy: list[list[float]] = field(default_factory=list)  # R[i][j], task-agnostic
    task_accuracy: list[list[float]] = field(default_factory=list)  # R[i][j], task-aware
    baseline: list[float] = field(default_factory=list)  # b[j]: untrained model
    fit: list[dict[str, float]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    extra_experiences: list[dict[str, Any]] = field(default_factory=list)  # from `medcl update`
    # wall seconds per phase: {"setup": [per start], "experiences": [per experience]}
    timing: dict[str, list[Any]] = field(default_factory=lambda: {"setup": [], "experiences": []})

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunState:
        """The state :meth:`to_json` gave, read back from ``state.json``: the ``null`` that
        strict JSON writes for NaN (an experience not scored, a set without rows) is NaN again,
        so the accuracy rows and the baseline hold floats only."""

        def floats(row: list[float | None]) -> list[float]:
            return [float("nan") if v is None else float(v) for v in row]

        out = cls(**raw)
        out.accuracy = [floats(r) for r in out.accuracy]
        out.task_accuracy = [floats(r) for r in out.task_accuracy]
        out.baseline = floats(out.baseline)
        return out
