"""The generic scenario builders: class-, task- and cross-dataset incremental (sites: scenario_sites).

Each builder loads its sources with :func:`medcl.data.sources.load_source` (or takes a
:class:`~medcl.data.sources.SourceData` directly), maps local labels to global ids in order of
first appearance and returns a :class:`~medcl.data.experience.Scenario`. They are registered
under ``"class-incremental"``, ``"task-incremental"``, ``"cross-dataset"`` and
``"domain-incremental"`` by :mod:`medcl.data.scenarios`; call them through
:func:`~medcl.data.scenarios.build_scenario`, which validates parameters first.
"""

from __future__ import annotations

__all__ = [
    "SPLITS",
    "SourceOptions",
    "SourceSpec",
    "class_incremental",
    "cross_dataset",
    "describe_source",
    "make_experience",
    "plan_class_groups",
    "resolve_source",
    "task_incremental",
    "with_source_options",
]

import dataclasses
import functools
import inspect
import itertools
import typing
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcl.data.experience import Experience, Scenario
from medcl.data.samples import SampleSet
from medcl.data.sources import SourceData, load_source
from medcl.errors import ConfigError

#: A data source: a registered name ("pneumoniamnist", "breastmnist@64"), a mapping
#: ({"medmnist": "breastmnist", "size": 64}), a CSV manifest or folder path, or loaded data.
SourceSpec = str | Path | Mapping[str, Any] | SourceData

SPLITS = ("train", "val", "test")


def resolve_source(
    spec: SourceSpec,
    *,
    root: str | Path | None,
    download: bool,
    seed: int,
    image_size: int | None = None,
    channels: int | None = None,
    native_size: bool = True,
) -> SourceData:
    """``load_source`` for a spec; an already loaded :class:`SourceData` passes through."""
    if isinstance(spec, SourceData):
        return spec
    return load_source(
        spec,
        root=root,
        download=download,
        image_size=image_size,
        channels=channels,
        native_size=native_size,
        seed=seed,
    )


def describe_source(src: SourceData) -> dict[str, str]:
    """``{"dataset": name, **info}`` for :attr:`Scenario.sources` (licence, citation, ...)."""
    return {"dataset": src.name, **{k: str(v) for k, v in src.info.items()}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceOptions:
    """How a generic builder loads its sources: the keyword parameters each one ends with.

    A builder decorated with :func:`with_source_options` takes them as keywords (they close its
    signature) and receives them as one ``source`` argument.

    Attributes:
        image_size, channels: resize / convert the sources (default: as stored).
        native_size: with ``image_size`` set, a MedMNIST source named without a size loads the
            published file of that size when the data root has it (``breastmnist_64.npz``);
            False upsamples its 28-px file instead, so that every dataset of a stream takes the
            same resolution path.
        root, download, seed: see :func:`~medcl.data.scenarios.build_scenario`.
    """

    image_size: int | None = None
    channels: int | None = None
    native_size: bool = True
    root: str | Path | None = None
    download: bool = False
    seed: int = 0

    def load(self, spec: SourceSpec) -> SourceData:
        """:func:`resolve_source` of ``spec`` with these options."""
        return resolve_source(
            spec,
            root=self.root,
            download=self.download,
            seed=self.seed,
            image_size=self.image_size,
            channels=self.channels,
            native_size=self.native_size,
        )


def with_source_options(build: Callable[..., Scenario]) -> Callable[..., Scenario]:
    """``build(*, <own parameters>, source: SourceOptions)`` as a builder taking all as keywords.

    The builder's signature and annotations list ``build``'s own parameters, then the fields of
    :class:`SourceOptions` (what :func:`~medcl.data.scenarios.build_scenario` validates against
    and ``help()`` shows); a call gathers the fields it is given into ``source``.
    """
    shared = dataclasses.fields(SourceOptions)
    own = [p for p in inspect.signature(build).parameters.values() if p.name != "source"]
    tail = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
        )
        for f in shared
    ]
    hints = typing.get_type_hints(build) | typing.get_type_hints(SourceOptions)

    @functools.wraps(build)
    def builder(**params: Any) -> Scenario:
        source = SourceOptions(**{f.name: params.pop(f.name) for f in shared if f.name in params})
        return build(source=source, **params)

    params = [*own, *tail]
    builder.__signature__ = inspect.Signature(params, return_annotation="Scenario")  # type: ignore[attr-defined]
    builder.__annotations__ = {p.name: hints[p.name] for p in params} | {"return": Scenario}
    return builder


def make_experience(
    index: int,
    name: str,
    *,
    task_id: int,
    classes: tuple[int, ...],
    site: str,
    splits: Mapping[str, SampleSet],
) -> Experience:
    """An experience whose sample metadata carry its ``site``."""
    sets = {k: splits[k].with_meta(site=site) for k in SPLITS}
    return Experience(index=index, name=name, task_id=task_id, classes=classes, site=site, **sets)


def _check_each_once(what: str, values: list[int], k: int, alternative: str) -> None:
    """Raise unless ``values`` lists each of the ``k`` classes exactly once."""
    counts = Counter(values)
    dups = [
        f"class {c} {'twice' if n == 2 else f'{n} times'}"
        for c, n in sorted(counts.items())
        if n > 1
    ]
    bad = [f"class {c} out of range 0..{k - 1}" for c in sorted(counts) if not 0 <= c < k]
    missing = [f"class {c} missing" for c in range(k) if c not in counts]
    if dups or bad or missing:
        fixes = (
            ["remove the duplicate"] * bool(dups)
            + ["drop ids outside 0..{k - 1}"] * bool(bad)
            + ["add the missing class"] * bool(missing)
        )
        fix = ", ".join(fixes).replace("{k - 1}", str(k - 1))
        raise ConfigError(
            f"`scenario.{what}` must list each of the {k} classes once; got {values} "
            f"({', '.join(dups + bad + missing)}). {fix[0].upper()}{fix[1:]} or {alternative}."
        )


def plan_class_groups(
    k: int,
    *,
    classes_per_experience: int | list[int] | None = None,
    order: list[int] | None = None,
    splits: list[list[int]] | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Local class ids of each experience, in stream order.

    Args:
        k: number of classes in the source.
        classes_per_experience: an int (equal groups, the last one may be smaller) or the size
            of each group (``[2, 2, 1]``); default 2.
        order: class order; default a permutation drawn with ``numpy.random.default_rng(seed)``.
        splits: explicit groups (``[[3, 0], [1, 4], [2]]``), instead of order + sizes.
        seed: seeds the default order.

    Returns:
        ``[[local ids of experience 0], [..of experience 1], ...]``.
    """
    if splits is not None:
        if order is not None or classes_per_experience is not None:
            raise ConfigError(
                "`scenario.splits` fixes both the class order and the group sizes; drop "
                "`order` and `classes_per_experience`, or drop `splits`."
            )
        if any(len(g) == 0 for g in splits):
            raise ConfigError(f"`scenario.splits` has an empty experience: {splits}. Remove it.")
        flat = [c for g in splits for c in g]
        _check_each_once("splits", flat, k, "use `order` + `classes_per_experience` instead")
        return [list(g) for g in splits]
    if order is None:
        order = np.random.default_rng(seed).permutation(k).tolist()
    _check_each_once("order", list(order), k, "omit `order` to use the seeded default")
    cpe = 2 if classes_per_experience is None else classes_per_experience
    if isinstance(cpe, int):
        if cpe < 1:
            raise ConfigError(f"`scenario.classes_per_experience` must be >= 1; got {cpe}.")
        sizes = [min(cpe, k - s) for s in range(0, k, cpe)]
    else:
        sizes = list(cpe)
        if any(s < 1 for s in sizes) or sum(sizes) != k:
            raise ConfigError(
                f"`scenario.classes_per_experience` must be positive group sizes summing to the "
                f"{k} classes; got {sizes} (sum {sum(sizes)}). E.g. {[2] * (k // 2) + [k % 2] * (k % 2)}."
            )
    bounds = np.cumsum([0, *sizes])
    return [list(order[a:b]) for a, b in itertools.pairwise(bounds)]


@with_source_options
def class_incremental(
    *,
    dataset: SourceSpec,
    classes_per_experience: int | list[int] | None = None,
    order: list[int] | None = None,
    splits: list[list[int]] | None = None,
    source: SourceOptions,
) -> Scenario:
    """One dataset's classes split into experiences; the task id is unknown at test time.

    Args:
        dataset: the source (see :data:`SourceSpec`).
        classes_per_experience: group size (int) or sizes (``[2, 2, 1]``); default 2.
        order: class order (local ids); default a permutation seeded by ``seed``.
        splits: explicit class groups instead of ``order`` + ``classes_per_experience``.
        image_size, channels: resize / convert the source (default: as stored).
        native_size: False upsamples a MedMNIST source named without a size from 28 px even
            where a published file of ``image_size`` exists (see
            :class:`~medcl.data.scenario_builders.SourceOptions`).
        root, download, seed: see :func:`~medcl.data.scenarios.build_scenario`.

    Returns:
        A ``kind="class"`` scenario: global id ``g`` is the ``g``-th class of the order; each
        experience's ``task_id`` is its index and ``site`` the dataset name.
    """
    src = source.load(dataset)
    groups = plan_class_groups(
        len(src.class_names),
        classes_per_experience=classes_per_experience,
        order=order,
        splits=splits,
        seed=source.seed,
    )
    flat = [c for g in groups for c in g]
    to_global = {local: g for g, local in enumerate(flat)}
    class_names = tuple(src.class_names[c] for c in flat)
    experiences = []
    for i, group in enumerate(groups):
        parts = {}
        for split in SPLITS:
            s = src.splits[split]
            keep = torch.isin(s.labels, torch.tensor(group)).nonzero()[:, 0]
            parts[split] = s.subset(keep).relabel(to_global)
        ids = tuple(to_global[c] for c in group)
        name = f"{src.name}:{'+'.join(class_names[g] for g in ids)}"
        experiences.append(
            make_experience(i, name, task_id=i, classes=ids, site=src.name, splits=parts)
        )
    return Scenario(
        name="class-incremental",
        kind="class",
        class_names=class_names,
        experiences=tuple(experiences),
        seed=source.seed,
        sources=(describe_source(src),),
    )


@functools.wraps(class_incremental, assigned=("__annotations__",))  # its signature and types
def task_incremental(**params: Any) -> Scenario:
    """Class groups as in class-incremental, with the task id (experience index) known at test time.

    Same arguments as :func:`class_incremental`; returns a ``kind="task"`` scenario.
    """
    scenario = class_incremental(**params)
    return dataclasses.replace(scenario, name="task-incremental", kind="task")


def _harmonise(s: SampleSet, channels: int, dtype: torch.dtype) -> SampleSet:
    """Grayscale ``(N, 1, ...)`` -> ``(N, channels, ...)`` by repetition; uint8 -> float in [0, 1]."""
    if s.channels != channels:
        s = SampleSet(s.images.repeat(1, channels, *([1] * s.spatial_dims)), s.labels, s.meta)
    return s.to_dtype(dtype)


@with_source_options
def cross_dataset(*, datasets: list[SourceSpec], source: SourceOptions) -> Scenario:
    """One dataset per experience on a shared label space (each dataset's classes offset).

    Args:
        datasets: the sources, in stream order.
        image_size: common side length (sources are resized); default: as stored, which must
            then already agree.
        channels: common channel count; default 3 if any source is RGB, else 1 (grayscale
            sources are repeated to 3 channels).
        native_size: False upsamples every MedMNIST source named without a size from 28 px,
            even where a published file of ``image_size`` exists (default True: that file is
            used), so that every dataset takes the same resolution path.
        root, download, seed: see :func:`~medcl.data.scenarios.build_scenario`.

    Returns:
        A ``kind="cross-dataset"`` scenario; class names read ``"<dataset>:<class>"``.
    """
    if not datasets:
        raise ConfigError("`scenario.datasets` must list at least one dataset; got [].")
    sources = [source.load(d) for d in datasets]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"`scenario.datasets` lists {dup!r} twice; got {names}. List each once.")
    target = source.channels or max(s.splits["train"].channels for s in sources)
    dtypes = {s.splits["train"].images.dtype for s in sources}
    dtype = torch.uint8 if dtypes == {torch.uint8} else torch.float32  # mixed: all float in [0, 1]
    experiences, class_names = [], []
    for i, src in enumerate(sources):
        offset = len(class_names)
        ids = tuple(range(offset, offset + len(src.class_names)))
        class_names += [f"{src.name}:{c}" for c in src.class_names]
        parts = {
            k: _harmonise(src.splits[k], target, dtype).relabel(
                {j: offset + j for j in range(len(src.class_names))}
            )
            for k in SPLITS
        }
        experiences.append(
            make_experience(i, src.name, task_id=i, classes=ids, site=src.name, splits=parts)
        )
    shapes = {n: tuple(e.train.images.shape[1:]) for n, e in zip(names, experiences, strict=True)}
    if len(set(shapes.values())) > 1:
        raise ConfigError(
            f"cross-dataset sources have different input shapes {shapes}; set `image_size` "
            "(and `channels`) so they share one, e.g. image_size: 28."
        )
    return Scenario(
        name="cross-dataset",
        kind="cross-dataset",
        class_names=tuple(class_names),
        experiences=tuple(experiences),
        seed=source.seed,
        sources=tuple(describe_source(s) for s in sources),
    )
