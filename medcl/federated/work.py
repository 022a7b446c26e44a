"""A federated site's bookkeeping inside an experience (:class:`medcl.federated.site.Site`)."""

from __future__ import annotations

__all__ = ["Work", "total"]

import dataclasses

from medcl.engine.trainer import FitStats


@dataclasses.dataclass
class Work:
    """The site's position inside the current experience (``federated/work.json``)."""

    begun: int = -1  # experience whose begin_experience ran
    consolidated: int = -1  # experience whose end_experience ran
    synced_version: int = -1  # the server's version the stored tensors match (-1: initial)
    fit: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # per round
    consolidated_keys: list[str] = dataclasses.field(default_factory=list)  # what it sent


def total(rounds: list[FitStats]) -> FitStats:
    """One experience's training over its rounds: summed, first/highest/last loss."""
    if not rounds:
        return FitStats(0, 0, 0.0)
    return FitStats(
        sum(r.updates for r in rounds),
        sum(r.images for r in rounds),
        sum(r.seconds for r in rounds),
        rounds[0].loss_first,
        max(r.loss_max for r in rounds),
        rounds[-1].loss_last,
    )
