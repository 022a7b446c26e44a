"""Named scenarios: fixed, documented defaults over the generic builders (every one overridable).

Registered by :mod:`medcl.data.scenarios` under the keys of :data:`PRESETS`; described for
readers in ``datasets/scenarios.md``. Each preset's first docstring line is what
``medcl scenarios list`` prints.

A preset is written as data: its builder, its description and the parameters it accepts with
their defaults (:func:`preset`); nothing re-passes the builder's keywords.
"""

from __future__ import annotations

__all__ = ["PRESETS", "preset", "synthetic_source"]

import functools
import inspect
import operator
import types
import typing
from collections.abc import Callable
from typing import Any

from medcl.data.experience import Scenario
from medcl.data.scenario_builders import class_incremental, cross_dataset
from medcl.data.scenario_sites import domain_incremental
from medcl.data.sources import SourceData, load_source

#: Parameters every builder receives from :func:`~medcl.data.scenarios.build_scenario`.
_CONTEXT = ("root", "download", "seed")


def synthetic_source(
    *,
    num_classes: int,
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int,
    channels: int,
    spatial_dims: int,
    seed: int = 0,
) -> SourceData:
    """The synthetic source with ``n_train`` / ``n_val`` / ``n_test`` images *per class*."""
    spec = {
        "num_classes": num_classes,
        "spatial_dims": spatial_dims,
        "image_size": image_size,
        "channels": channels,
        "n_train": n_train * num_classes,
        "n_val": n_val * num_classes,
        "n_test": n_test * num_classes,
    }
    return load_source({"synthetic": spec}, seed=seed)


def _without_none(hint: Any, default: Any) -> Any:
    """``int | None`` -> ``int`` when the preset's default is not None (None means nothing)."""
    args = typing.get_args(hint)
    if default is None or not isinstance(hint, types.UnionType) or type(None) not in args:
        return hint
    return functools.reduce(operator.or_, [a for a in args if a is not type(None)])


def preset(
    name: str,
    builder: Callable[..., Scenario],
    doc: str,
    *,
    dataset_from: Callable[..., SourceData] | None = None,
    **defaults: Any,
) -> Callable[..., Scenario]:
    """A named scenario: ``builder`` with ``defaults``, accepting exactly those parameters.

    Args:
        name: the registered name (``"retina-ci"``), for the function's name.
        builder: the generic builder it calls.
        doc: the description; its first line is what ``medcl scenarios list`` prints.
        dataset_from: builds the builder's ``dataset`` from the parameters it names (and
            ``seed``), e.g. :func:`synthetic_source`; the others go to ``builder``.
        **defaults: the parameters the preset accepts (besides ``root``, ``download``,
            ``seed``), in order, with their defaults; their types are the builder's (or
            ``dataset_from``'s).

    Returns:
        A scenario builder whose signature lists those parameters, for
        :func:`~medcl.data.scenarios.build_scenario` to validate against.
    """
    hints = typing.get_type_hints(builder)
    to_source: set[str] = set()
    if dataset_from is not None:
        hints |= typing.get_type_hints(dataset_from)
        to_source = set(inspect.signature(dataset_from).parameters) - {"seed"}
    context = inspect.signature(builder).parameters
    params = [
        inspect.Parameter(
            k, inspect.Parameter.KEYWORD_ONLY, default=v, annotation=_without_none(hints[k], v)
        )
        for k, v in defaults.items()
    ] + [context[k].replace(annotation=hints[k]) for k in _CONTEXT]
    signature = inspect.Signature(params, return_annotation=Scenario)

    def build(**kwargs: Any) -> Scenario:
        bound = signature.bind(**kwargs)  # an unknown parameter is a TypeError, as for a def
        bound.apply_defaults()
        args = dict(bound.arguments)
        if dataset_from is not None:
            source = {k: args.pop(k) for k in list(args) if k in to_source}
            args["dataset"] = dataset_from(seed=args["seed"], **source)
        return builder(**args)

    build.__signature__ = signature  # type: ignore[attr-defined]
    build.__annotations__ = {p.name: p.annotation for p in params} | {"return": Scenario}
    build.__name__ = build.__qualname__ = name.replace("-", "_")
    build.__doc__ = inspect.cleandoc(doc)
    return build


#: The synthetic presets' images (per class, before any site partition).
_SYNTHETIC_IMAGES = {
    "n_train": 32,
    "n_val": 8,
    "n_test": 16,
    "image_size": 16,
    "channels": 1,
    "spatial_dims": 2,
}

#: What the MedMNIST site presets leave to the config besides the dataset and ``n_sites``.
_SITE_OPTIONS = {
    "shift_strength": 1.0,
    "shifts": None,
    "image_size": None,
    "channels": None,
    "native_size": True,
}

_PRESETS = [
    preset(
        "medmnist-cross3",
        cross_dataset,
        """PneumoniaMNIST -> BreastMNIST -> RetinaMNIST: 3 datasets, 9 classes, 28 px RGB.

        Chest X-ray (2 classes), breast ultrasound (2) and fundus DR grade (5), one experience
        each, on one 9-class label space (offsets 0, 2, 4); grayscale images repeated to 3
        channels.
        """,
        datasets=("pneumoniamnist", "breastmnist", "retinamnist"),
        image_size=28,
        channels=3,
        native_size=True,
    ),
    preset(
        "adrenal-vessel-3d",
        cross_dataset,
        """AdrenalMNIST3D -> VesselMNIST3D: cross-dataset 3D volumes, 4 classes, 28^3.

        Adrenal-gland shape masks from CT (normal / hyperplasia), then brain-vessel segments
        from MRA (vessel / aneurysm): two experiences, classes 0-1 and 2-3.
        """,
        datasets=("adrenalmnist3d", "vesselmnist3d"),
        image_size=28,
        channels=1,
        native_size=True,
    ),
    preset(
        "pneumonia-sites",
        domain_incremental,
        """PneumoniaMNIST over 4 simulated sites with different acquisition shifts (domain-incremental).

        Every split is partitioned class-stratified into 4 sites; site 0 is the reference
        acquisition, sites 1-3 get low contrast + noise, low resolution + blur, bias field +
        gamma.
        """,
        dataset="pneumoniamnist",
        n_sites=4,
        **_SITE_OPTIONS,
    ),
    preset(
        "breast-sites",
        domain_incremental,
        """BreastMNIST (64 px) over 3 simulated ultrasound sites (domain-incremental, small).

        Site 0 reference, site 1 low contrast + speckle-like noise, site 2 low resolution + blur.
        """,
        dataset="breastmnist@64",
        n_sites=3,
        **_SITE_OPTIONS,
    ),
    preset(
        "retina-ci",
        class_incremental,
        """RetinaMNIST class-incremental: DR grades 0-4 in 3 experiences of 2, 2 and 1 grades.

        The grade order is a permutation seeded by ``seed`` unless ``order`` is given (e.g.
        ``[0, 1, 2, 3, 4]`` for increasing severity).
        """,
        dataset="retinamnist",
        classes_per_experience=(2, 2, 1),
        order=None,
    ),
    preset(
        "synthetic-ci",
        class_incremental,
        """Synthetic learnable 2D classes, class-incremental (tiny and fast: for tests and demos).

        ``n_train``/``n_val``/``n_test`` are images per class; the data and the class order
        both follow ``seed``. No files needed.
        """,
        dataset_from=synthetic_source,
        num_classes=4,
        classes_per_experience=2,
        order=None,
        **_SYNTHETIC_IMAGES,
    ),
    preset(
        "synthetic-sites",
        domain_incremental,
        """Synthetic learnable 2D classes over simulated sites, domain-incremental (tiny and fast).

        ``n_train``/``n_val``/``n_test`` are images per class before the site partition.
        """,
        dataset_from=synthetic_source,
        num_classes=3,
        n_sites=3,
        shift_strength=1.0,
        **_SYNTHETIC_IMAGES,
    ),
]

#: Registered name -> builder.
PRESETS: dict[str, Callable[..., Scenario]] = {fn.__name__.replace("_", "-"): fn for fn in _PRESETS}
