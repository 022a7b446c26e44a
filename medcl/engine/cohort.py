"""A new cohort joining a run (``medcl update``): its classes matched to the run's by name.

A cohort's class matches the run's class with the same name under the label rule of
:mod:`medcl.data.labels`, ignoring case (``"Normal"`` is the run's ``"normal"``; a run class
``"<dataset>:pneumonia"`` also matches ``"pneumonia"``). A class that matches none is a NEW class
and grows the output layer, so it is accepted only with ``new_classes=True``
(``medcl update --new-classes``); otherwise the error lists it with its row count and the closest
run class.
"""

from __future__ import annotations

__all__ = ["extend_scenario", "match_classes"]

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from medcl.data.cache import run_file_cache
from medcl.data.experience import Experience, Scenario
from medcl.data.labels import label_key
from medcl.data.samples import SampleSet
from medcl.errors import ConfigError, DataError, did_you_mean

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from medcl.config import RunConfig


def match_classes(
    run_names: Sequence[str],
    cohort_names: Sequence[str],
    counts: Sequence[int],
    *,
    new_classes: bool,
    what: str,
) -> tuple[list[str], dict[int, int]]:
    """Map each cohort class (local id) to a global class of the run.

    Args:
        run_names: the run's global class names.
        cohort_names: the cohort's class names (local id order).
        counts: rows of each cohort class (for the message).
        new_classes: append unmatched classes as new global classes.
        what: how messages name the cohort (``"--data cohort.csv"``).

    Returns:
        ``(names, mapping)``: the global class names afterwards and local id -> global id.

    Raises:
        ConfigError: a class matches several run classes, or is new without ``new_classes``.
    """
    names = list(run_names)
    keys = [label_key(n) for n in names]
    short = [label_key(n.split(":", 1)[-1]) for n in names]
    mapping: dict[int, int] = {}
    unknown = []
    for local, cname in enumerate(cohort_names):
        key = label_key(cname)
        hits = [g for g in range(len(names)) if key in (keys[g], short[g])]
        if len(hits) > 1:
            raise ConfigError(
                f"{what}: class {cname!r} matches several of the run's classes "
                f"{[names[h] for h in hits]}; rename it in the manifest."
            )
        if hits:
            mapping[local] = hits[0]
        else:
            unknown.append(local)
    if unknown and not new_classes:
        listed = "; ".join(
            f"{cohort_names[i]!r} ({counts[i]} rows; "
            f"{did_you_mean(cohort_names[i], run_names, quote=True)})"
            for i in unknown
        )
        raise ConfigError(
            f"{what}: {len(unknown)} class(es) are not among the run's classes {list(run_names)}: "
            f"{listed}. Fix the labels, or pass --new-classes to add them as new classes (the "
            "output layer grows)."
        )
    for local in unknown:
        names.append(str(cohort_names[local]))
        mapping[local] = len(names) - 1
    return names, mapping


def _check_channels(spec: str, train: SampleSet, found: int, want: int, cfg: RunConfig) -> None:
    """Accept a cohort whose channel count differs from the run's only when nothing is lost.

    Grey images repeated to the run's 3 channels lose nothing (cross-dataset scenarios do the
    same); colour averaged to grey does, so it needs the run's own ``scenario.channels``.

    Raises:
        DataError: colour images for a 1-channel run that did not ask for the conversion.
    """
    kind = {1: "greyscale", 3: "RGB"}
    if found == 1 or cfg.scenario.options.get("channels") == want:
        log.info(
            "--data %r: %d-channel images converted to the run's %d channels",
            spec,
            found,
            want,
        )
        return
    paths = train.meta["path"] if "path" in train.meta.columns and len(train.meta) else []
    example = f", e.g. {paths[0]}" if len(paths) else ""
    raise DataError(
        f"--data {spec!r}: the cohort's images have {found} channels "
        f"({kind.get(found, 'multi-channel')}{example}); the run was trained on {want}-channel "
        f"({kind.get(want, 'multi-channel')}) images, and colour is never dropped silently. "
        "Convert the images to single-channel greyscale first (e.g. with PIL: "
        "Image.open(f).convert('L').save(f)), or train a run on images like these."
    )


def extend_scenario(
    scenario: Scenario,
    spec: str,
    site: str | None,
    *,
    cfg: RunConfig,
    new_classes: bool = False,
    replay: bool = False,
) -> Scenario:
    """``scenario`` plus one experience from the source ``spec`` (a new cohort).

    Args:
        scenario: the run's scenario (with earlier cohorts).
        spec: a source spec (MedMNIST flag, CSV manifest, class folder).
        site: the cohort's site name (default: the source's name).
        cfg: the run's config (data root, seed).
        new_classes: accept classes the run has not seen (see the module docstring).
        replay: the run learned this cohort already (:func:`~medcl.engine.resume.restore_run`):
            load it exactly as then, converted to the run's channels without a check.

    Raises:
        ConfigError: other image dimensionality, or classes that do not match.
        DataError: colour images for a 1-channel run (see :func:`_check_channels`), or a bad
            source (e.g. a manifest without rows).
    """
    from medcl.data.sources import load_source

    shape = scenario.input_shape

    def load(channels: int | None):
        with run_file_cache(cfg):
            return load_source(
                spec,
                root=cfg.data.root,
                download=cfg.data.download,
                image_size=shape[1],
                channels=channels,
                seed=cfg.seed,
            )

    src = load(shape[0] if replay else None)  # else its own channels, to compare
    found = tuple(src.splits["train"].images.shape[1:])
    if len(found) == len(shape) and found[0] != shape[0]:
        _check_channels(spec, src.splits["train"], found[0], shape[0], cfg)
        src = load(shape[0])
    new_shape = tuple(src.splits["train"].images.shape[1:])
    if new_shape != shape:
        raise ConfigError(
            f"--data {spec!r} gives images of shape {new_shape}; the run was trained "
            f"on {shape}. Use data of the same dimensionality (2D/3D)."
        )
    labels = torch.cat([s.labels for s in src.splits.values()])
    counts = torch.bincount(labels, minlength=len(src.class_names)).tolist()
    names, mapping = match_classes(
        scenario.class_names,
        src.class_names,
        counts,
        new_classes=new_classes,
        what=f"--data {spec!r}",
    )
    index = len(scenario)
    site_name = site or src.name
    dtype = scenario[0].train.images.dtype  # e.g. PNG files (float) joining a MedMNIST run (uint8)
    splits = {
        k: src.splits[k].relabel(mapping).with_meta(site=site_name).to_dtype(dtype)
        for k in ("train", "val", "test")
    }
    exp = Experience(
        index=index,
        name=site_name,
        task_id=index,
        classes=tuple(sorted(set(mapping.values()))),
        site=site_name,
        **splits,
    )
    kind = scenario.kind if len(names) == scenario.num_classes else "class"
    return Scenario(
        name=scenario.name,
        kind=kind,
        class_names=tuple(names),
        experiences=(*scenario.experiences, exp),
        seed=scenario.seed,
        sources=(*scenario.sources, {"dataset": src.name, **src.info}),
    )
