"""Which rows of a scenario a site holds: the hospitals of a federated run, simulated from one stream.

A federated run (:mod:`medcl.federated`) trains one model across sites that never pool their
images. Each site builds the configured scenario on its own machine and keeps only its part,
chosen by ``federation.partition``; a site's run directory records which part
(``federated/site.json``, :func:`read_site_part`), so that restoring it (``medcl export``'s OOD
guard, ``medcl report``) sees the same rows:

- ``"split"``: every experience's train, validation and test rows are divided among the sites,
  class-stratified (each class spread as evenly as it divides) and seeded, so each hospital
  receives every cohort, a share of it;
- ``"experience"``: experience ``i`` belongs to site ``i mod n`` whole (cross3 as three hospitals
  with one dataset each, pneumonia-sites' four acquisition sites as four hospitals); a site has
  no rows in the other experiences and joins the stream with its first cohort.

Every site keeps the whole scenario's structure (experiences, classes, names), so global class
ids, heads and the accuracy matrix have the same shape everywhere; only the rows differ.
"""

from __future__ import annotations

__all__ = ["Partition", "read_site_part", "site_part_file", "site_rows", "site_scenario"]

import dataclasses
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from medcl.data.experience import Experience, Scenario
from medcl.data.samples import SampleSet

Partition = Literal["split", "experience"]


def site_rows(labels: torch.Tensor, site: int, num_sites: int, seed: int) -> torch.Tensor:
    """Rows of a split that site ``site`` of ``num_sites`` holds under ``"split"``.

    Within each class the rows are shuffled (``seed``) and dealt round-robin, starting at a
    class-dependent site so that remainders do not all fall on site 0.

    Args:
        labels: ``(N,)`` class ids of the split.
        site: 0-based site index.
        num_sites: number of sites.
        seed: fixes the shuffle (the same on every site: the parts are disjoint and cover all).

    Returns:
        ``(n_site,)`` sorted row indices.
    """
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    keep: list[np.ndarray] = []
    for k, c in enumerate(np.unique(y)):
        rows = rng.permutation(np.flatnonzero(y == c))
        keep.append(rows[(site + k) % num_sites :: num_sites])
    out = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    return torch.as_tensor(out, dtype=torch.long)


def _part(data: SampleSet, site: int, num_sites: int, seed: int, holds: bool) -> SampleSet:
    if not holds:
        return data.subset(np.zeros(0, dtype=np.int64))
    if num_sites == 1:
        return data
    return data.subset(site_rows(data.labels, site, num_sites, seed))


def site_scenario(
    scenario: Scenario, site: int, num_sites: int, partition: Partition, seed: int
) -> Scenario:
    """The part of ``scenario`` that site ``site`` holds (same experiences, fewer rows).

    Args:
        scenario: the stream every site builds from the run's config.
        site: 0-based site index (the order of ``federation.sites``).
        num_sites: number of sites.
        partition: ``"split"`` or ``"experience"`` (module docstring).
        seed: the run's seed; each experience and split is dealt with its own derived seed.
    """
    experiences: list[Experience] = []
    for e in scenario.experiences:
        holds = partition == "split" or e.index % num_sites == site
        k = num_sites if partition == "split" else 1
        parts = {
            name: _part(getattr(e, name), site, k, seed * 7919 + e.index * 3 + j, holds)
            for j, name in enumerate(("train", "val", "test"))
        }
        experiences.append(dataclasses.replace(e, **parts))
    return dataclasses.replace(scenario, experiences=tuple(experiences))


def site_part_file(run_dir: str | Path) -> Path:
    """``RUN_DIR/federated/site.json``: ``{"site", "index", "num_sites", "partition", "seed"}``."""
    return Path(run_dir) / "federated" / "site.json"


def read_site_part(run_dir: str | Path, scenario: Scenario) -> Scenario:
    """``scenario`` cut to the part a federated site's run directory holds (else unchanged)."""
    path = site_part_file(run_dir)
    if not path.is_file():
        return scenario
    part = json.loads(path.read_text())
    return site_scenario(
        scenario, int(part["index"]), int(part["num_sites"]), part["partition"], int(part["seed"])
    )
