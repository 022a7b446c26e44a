"""Domain-(site-)incremental scenarios: the same classes at every site, one experience per site.

Sites are real (a metadata column such as a manifest's ``site``) or simulated: each split is
partitioned class-stratified into sites and every simulated site gets its own acquisition shift
(:mod:`medcl.data.shifts`), all fixed by the scenario seed.
"""

from __future__ import annotations

__all__ = ["domain_incremental", "stratified_partition"]

from collections.abc import Mapping

import numpy as np

from medcl.data.experience import Scenario
from medcl.data.scenario_builders import (
    SPLITS,
    SourceOptions,
    SourceSpec,
    describe_source,
    make_experience,
    with_source_options,
)
from medcl.data.shifts import SiteShift, apply_site_shift, default_site_shifts, site_seed
from medcl.data.sources import SourceData
from medcl.errors import ConfigError, DataError, did_you_mean


def stratified_partition(
    labels: np.ndarray, n_parts: int, *, rng: np.random.Generator
) -> np.ndarray:
    """Assign each sample to one of ``n_parts`` parts, class-stratified and size-balanced.

    Args:
        labels: ``(N,)`` class ids.
        n_parts: number of parts.
        rng: numpy generator (seeded by the caller).

    Returns:
        ``(N,)`` int part ids: every class is spread over the parts as evenly as possible.
    """
    part = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        part[idx] = (np.arange(len(idx)) + offset) % n_parts
        offset += len(idx)
    return part


def _site_values(src: SourceData, column: str) -> dict[str, np.ndarray] | None:
    """Per-split site labels from the source metadata, or None when the source has none."""
    train = src.splits["train"].meta
    if column not in train.columns or not train[column].astype(str).str.len().gt(0).any():
        return None
    out = {}
    for split in SPLITS:
        meta = src.splits[split].meta
        values = meta[column].astype(str).to_numpy() if column in meta.columns else None
        if values is None or (values == "").any():
            raise DataError(
                f"source {src.name!r}: column {column!r} is empty for some {split} rows; every "
                "row needs a site, or drop the column to simulate sites."
            )
        out[split] = values
    return out


def _real_site_names(
    source: str, real: dict[str, np.ndarray], sites: list[str] | None, column: str
) -> list[str]:
    """The sites to use, each with training and test rows; errors say what each split holds."""
    per_split = {split: list(dict.fromkeys(real[split])) for split in SPLITS}
    found = "; ".join(f"{k}: {', '.join(v) or '(none)'}" for k, v in per_split.items())
    present = per_split["train"]
    for s in sites or []:
        if s not in present:
            where = [k for k in SPLITS if s in per_split[k]]
            why = (
                f"site {s!r}, but it has no training rows (only {' and '.join(where)} rows)"
                if where
                else f"unknown site {s!r} ({did_you_mean(s, {*real['train'], *real['test']})})"
            )
            raise ConfigError(
                f"`scenario.sites` names {why}. Sites in column {column!r} of {source!r} per "
                f"split: {found}. Give it training rows or leave it out."
            )
    orphans = [s for k in ("val", "test") for s in per_split[k] if s not in present]
    if sites is None and orphans:
        raise DataError(
            f"source {source!r}: site(s) {sorted(set(orphans))} have no training rows, so no "
            f"experience would learn them and their val/test rows would be dropped. Sites in "
            f"column {column!r} per split: {found}. Give them training rows, or list the sites "
            "to use in `scenario.sites` (which leaves the others out explicitly)."
        )
    names = list(sites or present)
    untested = [s for s in names if s not in per_split["test"]]
    if untested:
        raise DataError(
            f"source {source!r}: site(s) {untested} have no test rows, so they cannot be "
            f"evaluated. Sites in column {column!r} per split: {found}. Give them test rows, "
            "or leave them out with `scenario.sites`."
        )
    return names


def _custom_shift(name: str, fields: Mapping[str, float], *, seed: int) -> SiteShift:
    valid = [f for f in SiteShift.__dataclass_fields__ if f not in ("name", "seed")]
    for key in fields:
        if key not in valid:
            raise ConfigError(
                f"`scenario.shifts` entry for {name!r} has unknown field {key!r}; "
                f"{did_you_mean(key, valid)}"
            )
    return SiteShift(name=name, seed=seed, **fields)


@with_source_options
def domain_incremental(
    *,
    dataset: SourceSpec,
    n_sites: int | None = None,
    sites: list[str] | None = None,
    site_column: str = "site",
    shifts: list[dict[str, float]] | None = None,
    shift_strength: float = 1.0,
    source: SourceOptions,
) -> Scenario:
    """The same classes at every site; one experience per site (real or simulated).

    Real sites come from the source's ``site_column`` (e.g. a manifest ``site`` column); their
    images are used as they are unless ``shifts`` is given. Otherwise each split is partitioned
    into ``n_sites`` simulated sites (class-stratified, seeded by ``(seed, split)``) and site
    ``i`` gets the acquisition shift :func:`~medcl.data.shifts.default_site_shifts` draws from
    ``(seed, i)`` (site 0 is the reference acquisition).

    Args:
        dataset: the source.
        n_sites: number of simulated sites (default 4, or ``len(sites)``).
        sites: site names; for real sites, which ones and in what order (default: order of
            first appearance in the training split).
        site_column: metadata column holding real sites.
        shifts: one :class:`~medcl.data.shifts.SiteShift` field mapping per site (e.g.
            ``{"noise_std": 0.05}``), replacing the default shifts.
        shift_strength: scales the default simulated shifts (0 switches them off).
        image_size, channels: resize / convert the source.
        native_size: False upsamples a MedMNIST source named without a size from 28 px even
            where a published file of ``image_size`` exists (see
            :class:`~medcl.data.scenario_builders.SourceOptions`).
        root, download, seed: see :func:`~medcl.data.scenarios.build_scenario`.

    Returns:
        A ``kind="domain"`` scenario; every experience has all classes and ``task_id`` 0.
    """
    src = source.load(dataset)
    real = _site_values(src, site_column)
    if real is not None:
        if n_sites is not None:
            raise ConfigError(
                f"`scenario.n_sites` applies to simulated sites, but {src.name!r} defines sites in "
                f"column {site_column!r}; drop n_sites (use `sites` to select some)."
            )
        names = _real_site_names(src.name, real, sites, site_column)
        site_of = dict(real)
    else:
        if sites is not None and n_sites is not None and len(sites) != n_sites:
            raise ConfigError(
                f"`scenario.sites` has {len(sites)} names but n_sites={n_sites}; give one."
            )
        n = len(sites) if sites is not None else (4 if n_sites is None else n_sites)
        if n < 1:
            raise ConfigError(f"`scenario.n_sites` must be >= 1; got {n}.")
        if sites is not None and len(set(sites)) != len(sites):
            raise ConfigError(f"`scenario.sites` must name each site once; got {sites}.")
        names = list(sites) if sites is not None else [f"site-{i}" for i in range(n)]
        site_of = {}
        for j, split in enumerate(SPLITS):
            part = stratified_partition(
                src.splits[split].labels.numpy(), n, rng=np.random.default_rng((source.seed, j))
            )
            site_of[split] = np.asarray(names, dtype=object)[part]
    if shifts is not None:
        if len(shifts) != len(names):
            raise ConfigError(
                f"`scenario.shifts` must give one shift per site ({len(names)}); got {len(shifts)}."
            )
        site_shifts = [
            _custom_shift(n, s, seed=site_seed(source.seed, i))
            for i, (n, s) in enumerate(zip(names, shifts, strict=True))
        ]
    elif real is None:
        site_shifts = default_site_shifts(
            len(names), seed=source.seed, strength=shift_strength, names=names
        )
    else:
        site_shifts = [SiteShift(name=n) for n in names]
    classes = tuple(range(len(src.class_names)))
    experiences = []
    for i, (name, shift) in enumerate(zip(names, site_shifts, strict=True)):
        parts = {
            split: apply_site_shift(
                src.splits[split].subset(np.flatnonzero(site_of[split] == name)), shift, stream=j
            )
            for j, split in enumerate(SPLITS)
        }
        experiences.append(
            make_experience(i, name, task_id=0, classes=classes, site=name, splits=parts)
        )
    info = describe_source(src) | {
        "sites": "; ".join(f"{s.name}: {s.describe()}" for s in site_shifts)
    }
    return Scenario(
        name="domain-incremental",
        kind="domain",
        class_names=tuple(src.class_names),
        experiences=tuple(experiences),
        seed=source.seed,
        sources=(info,),
    )
