"""Experiences and scenarios: an ordered stream of labelled cohorts on one global label space."""

from __future__ import annotations

__all__ = ["Experience", "Scenario", "ScenarioKind"]

from dataclasses import dataclass, field
from typing import Literal

from medcl.data.samples import SampleSet
from medcl.errors import DataError

ScenarioKind = Literal["class", "domain", "task", "cross-dataset"]


@dataclass(frozen=True)
class Experience:
    """One step of the stream: a cohort with its classes and splits.

    Attributes:
        index: position in the stream (0-based).
        name: human-readable name, e.g. ``"pneumoniamnist"`` or ``"site-2"``.
        task_id: task identifier (known at test time only in task-incremental scenarios).
        classes: global class ids present in this experience.
        site: site/cohort name carried into per-site metrics.
        train, val, test: the splits; labels are global ids.
    """

    index: int
    name: str
    task_id: int
    classes: tuple[int, ...]
    site: str
    train: SampleSet
    val: SampleSet
    test: SampleSet

    def describe(self) -> dict[str, object]:
        """Plain summary used by ``medcl scenarios show`` and reports."""
        return {
            "index": self.index,
            "name": self.name,
            "task_id": self.task_id,
            "site": self.site,
            "classes": list(self.classes),
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
        }


@dataclass(frozen=True)
class Scenario:
    """An ordered stream of experiences on a shared global label space.

    Global class ids are assigned in order of first appearance, so after experience ``i`` the
    classes seen so far are exactly ``range(num_seen_classes(i))`` (class-incremental heads only
    grow at the end).

    Attributes:
        name: scenario name (registry name or ``"custom"``).
        kind: ``"class"``, ``"domain"``, ``"task"`` or ``"cross-dataset"``.
        class_names: name of each global class id.
        experiences: the stream, in training order.
        seed: the seed that fixed orders, splits and site shifts.
        sources: data-source descriptions (dataset, licence, citation) for reports.
    """

    name: str
    kind: ScenarioKind
    class_names: tuple[str, ...]
    experiences: tuple[Experience, ...]
    seed: int = 0
    sources: tuple[dict[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.experiences:
            raise DataError(f"scenario {self.name!r} has no experiences.")
        shapes = {tuple(e.train.images.shape[1:]) for e in self.experiences}
        if len(shapes) != 1:
            raise DataError(
                f"scenario {self.name!r} mixes input shapes {sorted(shapes)}; every experience must "
                "share one (C, H, W[, D]). Set image_size and channels in the scenario config."
            )
        seen: set[int] = set()
        for e in self.experiences:
            new = sorted(set(e.classes) - seen)
            if new and new[0] != len(seen):
                raise DataError(
                    f"scenario {self.name!r}: experience {e.index} introduces classes {new}, but "
                    f"global ids must be assigned in order of appearance (expected to start at "
                    f"{len(seen)})."
                )
            seen |= set(new)
        if seen != set(range(len(self.class_names))):
            raise DataError(
                f"scenario {self.name!r}: experiences cover classes {sorted(seen)} but "
                f"{len(self.class_names)} class names were given."
            )

    def __len__(self) -> int:
        return len(self.experiences)

    def __iter__(self):
        return iter(self.experiences)

    def __getitem__(self, i: int) -> Experience:
        return self.experiences[i]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` or ``(C, H, W, D)`` shared by every experience."""
        return tuple(self.experiences[0].train.images.shape[1:])

    def num_seen_classes(self, upto: int) -> int:
        """Number of distinct classes in experiences ``0..upto`` (inclusive)."""
        return len({c for e in self.experiences[: upto + 1] for c in e.classes})

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "seed": self.seed,
            "input_shape": list(self.input_shape),
            "class_names": list(self.class_names),
            "experiences": [e.describe() for e in self.experiences],
        }
