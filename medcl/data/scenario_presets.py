"""Named scenarios: fixed, documented defaults over the generic builders (every one overridable).

Registered by :mod:`medcl.data.scenarios` under the keys of :data:`PRESETS`; described for
readers in ``datasets/scenarios.md``. Each preset's first docstring line is what
``medcl scenarios list`` prints.
"""

from __future__ import annotations

__all__ = ["PRESETS"]

from collections.abc import Callable
from pathlib import Path

from medcl.data.experience import Scenario
from medcl.data.scenario_builders import (
    SourceSpec,
    class_incremental,
    cross_dataset,
)
from medcl.data.scenario_sites import domain_incremental
from medcl.data.sources import SourceData, load_source

Root = str | Path | None


def medmnist_cross3(
    *,
    datasets: list[SourceSpec] = ("pneumoniamnist", "breastmnist", "retinamnist"),
    image_size: int = 28,
    channels: int = 3,
    root: Root = None,
    download: bool = False,
    seed: int = 0,
) -> Scenario:
    """PneumoniaMNIST -> BreastMNIST -> RetinaMNIST: 3 datasets, 9 classes, 28 px RGB.

    Chest X-ray (2 classes), breast ultrasound (2) and fundus DR grade (5), one experience each,
    on one 9-class label space (offsets 0, 2, 4); grayscale images repeated to 3 channels.
    """
    return cross_dataset(
        datasets=list(datasets),
        image_size=image_size,
        channels=channels,
        root=root,
        download=download,
        seed=seed,
    )


def adrenal_vessel_3d(
    *,
    datasets: list[SourceSpec] = ("adrenalmnist3d", "vesselmnist3d"),
    image_size: int = 28,
    channels: int = 1,
    root: Root = None,
    download: bool = False,
    seed: int = 0,
) -> Scenario:
    """AdrenalMNIST3D -> VesselMNIST3D: cross-dataset 3D volumes, 4 classes, 28^3.

    Adrenal-gland shape masks from CT (normal / hyperplasia), then brain-vessel segments from
    MRA (vessel / aneurysm): two experiences, classes 0-1 and 2-3.
    """
    return cross_dataset(
        datasets=list(datasets),
        image_size=image_size,
        channels=channels,
        root=root,
        download=download,
        seed=seed,
    )


def pneumonia_sites(
    *,
    dataset: SourceSpec = "pneumoniamnist",
    n_sites: int = 4,
    shift_strength: float = 1.0,
    shifts: list[dict[str, float]] | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    root: Root = None,
    download: bool = False,
    seed: int = 0,
) -> Scenario:
    """PneumoniaMNIST over 4 simulated sites with different acquisition shifts (domain-incremental).

    Every split is partitioned class-stratified into 4 sites; site 0 is the reference
    acquisition, sites 1-3 get low contrast + noise, low resolution + blur, bias field + gamma.
    """
    return domain_incremental(
        dataset=dataset,
        n_sites=n_sites,
        shifts=shifts,
        shift_strength=shift_strength,
        image_size=image_size,
        channels=channels,
        root=root,
        download=download,
        seed=seed,
    )


def breast_sites(
    *,
    dataset: SourceSpec = "breastmnist@64",
    n_sites: int = 3,
    shift_strength: float = 1.0,
    shifts: list[dict[str, float]] | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    root: Root = None,
    download: bool = False,
    seed: int = 0,
) -> Scenario:
    """BreastMNIST (64 px) over 3 simulated ultrasound sites (domain-incremental, small).

    Site 0 reference, site 1 low contrast + speckle-like noise, site 2 low resolution + blur.
    """
    return domain_incremental(
        dataset=dataset,
        n_sites=n_sites,
        shifts=shifts,
        shift_strength=shift_strength,
        image_size=image_size,
        channels=channels,
        root=root,
        download=download,
        seed=seed,
    )


def retina_ci(
    *,
    dataset: SourceSpec = "retinamnist",
    classes_per_experience: int | list[int] = (2, 2, 1),
    order: list[int] | None = None,
    root: Root = None,
    download: bool = False,
    seed: int = 0,
) -> Scenario:
    """RetinaMNIST class-incremental: DR grades 0-4 in 3 experiences of 2, 2 and 1 grades.

    The grade order is a permutation seeded by ``seed`` unless ``order`` is given (e.g.
    ``[0, 1, 2, 3, 4]`` for increasing severity).
    """
    return class_incremental(
        dataset=dataset,
        classes_per_experience=classes_per_experience,
        order=order,
        root=root,
        download=download,
        seed=seed,
    )


def _synthetic(
    k: int, dims: int, size: int, channels: int, n: tuple[int, int, int], seed: int
) -> SourceData:
    """The synthetic source with ``n = (train, val, test)`` images *per class*."""
    spec = {
        "num_classes": k,
        "spatial_dims": dims,
        "image_size": size,
        "channels": channels,
        "n_train": n[0] * k,
        "n_val": n[1] * k,
        "n_test": n[2] * k,
    }
    return load_source({"synthetic": spec}, seed=seed)


def synthetic_ci(
    *,
    num_classes: int = 4,
    classes_per_experience: int | list[int] = 2,
    order: list[int] | None = None,
    n_train: int = 32,
    n_val: int = 8,
    n_test: int = 16,
    image_size: int = 16,
    channels: int = 1,
    spatial_dims: int = 2,
    root: Root = None,
    download: bool = False,
    seed: int = 0,
) -> Scenario:
    """Synthetic learnable 2D classes, class-incremental (tiny and fast: for tests and demos).

    ``n_train``/``n_val``/``n_test`` are images per class; the data and the class order both
    follow ``seed``. No files needed.
    """
    src = _synthetic(
        num_classes, spatial_dims, image_size, channels, (n_train, n_val, n_test), seed
    )
    return class_incremental(
        dataset=src,
        classes_per_experience=classes_per_experience,
        order=order,
        root=root,
        download=download,
        seed=seed,
    )


def synthetic_sites(
    *,
    num_classes: int = 3,
    n_sites: int = 3,
    shift_strength: float = 1.0,
    n_train: int = 32,
    n_val: int = 8,
    n_test: int = 16,
    image_size: int = 16,
    channels: int = 1,
    spatial_dims: int = 2,
    root: Root = None,
    download: bool = False,
    seed: int = 0,
) -> Scenario:
    """Synthetic learnable 2D classes over simulated sites, domain-incremental (tiny and fast).

    ``n_train``/``n_val``/``n_test`` are images per class before the site partition.
    """
    src = _synthetic(
        num_classes, spatial_dims, image_size, channels, (n_train, n_val, n_test), seed
    )
    return domain_incremental(
        dataset=src,
        n_sites=n_sites,
        shift_strength=shift_strength,
        root=root,
        download=download,
        seed=seed,
    )


#: Registered name -> builder.
PRESETS: dict[str, Callable[..., Scenario]] = {
    "medmnist-cross3": medmnist_cross3,
    "adrenal-vessel-3d": adrenal_vessel_3d,
    "pneumonia-sites": pneumonia_sites,
    "breast-sites": breast_sites,
    "retina-ci": retina_ci,
    "synthetic-ci": synthetic_ci,
    "synthetic-sites": synthetic_sites,
}
