"""The one entry point scenarios use to load a data source: :func:`load_source`.

Accepted specs::

    "pneumoniamnist"                         MedMNIST flag (28 px)
    "breastmnist@64"                         MedMNIST flag at a published size
    {"medmnist": "breastmnist", "size": 64}  the same as a mapping
    "cohort.csv" / {"manifest": "cohort.csv", ...load_manifest options}
    "images/"    / {"folder": "images/", ...load_folder options}
    "synthetic"  / {"synthetic": {...make_synthetic options}}
"""

from __future__ import annotations

__all__ = ["SourceData", "load_source", "resize_and_convert"]

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medcl.data.medmnist_source import (
    MEDMNIST_CITATION,
    load_medmnist,
    medmnist_class_names,
    medmnist_filename,
    medmnist_info,
    medmnist_sizes,
    resolve_data_root,
)
from medcl.data.samples import SampleSet
from medcl.data.synthetic import make_synthetic, synthetic_class_names
from medcl.errors import ConfigError, did_you_mean

SPLITS = ("train", "val", "test")
FORMS = (
    "a MedMNIST flag ('pneumoniamnist'), a flag with a size ('breastmnist@64'), "
    "{'medmnist': 'breastmnist', 'size': 64}, a CSV manifest path ('cohort.csv' or "
    "{'manifest': path, ...}), an existing image folder ('images/' or {'folder': path, ...}), "
    "or 'synthetic' / {'synthetic': {...make_synthetic options}}"
)
_MODALITY = {
    "path": "colon pathology",
    "chest": "chest X-ray",
    "derma": "dermatoscopy",
    "oct": "retinal OCT",
    "pneumonia": "chest X-ray",
    "retina": "fundus camera",
    "breast": "breast ultrasound",
    "blood": "blood cell microscopy",
    "tissue": "kidney cortex microscopy",
    "organa": "abdominal CT",
    "organc": "abdominal CT",
    "organs": "abdominal CT",
    "organ": "abdominal CT",
    "nodule": "chest CT",
    "adrenal": "shape from abdominal CT",
    "fracture": "chest CT",
    "vessel": "shape from brain MRA",
    "synapse": "electron microscopy",
}


@dataclass(frozen=True)
class SourceData:
    """A loaded data source.

    Attributes:
        name: ``"pneumoniamnist"``, ``"breastmnist@64"``, the manifest/folder stem, or
            ``"synthetic"``.
        class_names: name of each local label id.
        splits: ``"train"``, ``"val"``, ``"test"`` sample sets with LOCAL labels ``0..K-1``.
        info: description, licence, citation, modality, task (strings, for reports).
    """

    name: str
    class_names: tuple[str, ...]
    splits: dict[str, SampleSet]
    info: dict[str, str]


def resize_and_convert(
    s: SampleSet, *, image_size: int | None = None, channels: int | None = None
) -> SampleSet:
    """Resize all spatial dims to ``image_size`` and convert channels, batched over the set.

    One ``F.interpolate`` per chunk of the whole set (``area`` when shrinking, ``bilinear`` /
    ``trilinear`` when enlarging); ``uint8`` input is rounded back to ``uint8``. Channels:
    1 -> 3 repeats, 3 -> 1 averages.

    Shapes: ``(N, C, *spatial)`` -> ``(N, channels or C, *[image_size] * len(spatial))``.
    """
    if channels not in (None, 1, 3) or (channels == 3 and s.channels not in (1, 3)):
        raise ConfigError(
            f"channels must be 1 or 3 (converting from 1 or 3 channels); got {channels!r} for a "
            f"source with {s.channels} channels."
        )
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be a positive int; got {image_size!r}.")
    x, spatial = s.images, tuple(s.images.shape[2:])
    size = spatial if image_size is None else (image_size,) * len(spatial)
    resize, convert = size != spatial, channels is not None and channels != s.channels
    if not (resize or convert):
        return s
    shrink = all(t <= o for t, o in zip(size, spatial, strict=True))
    mode = "area" if shrink else ("bilinear" if len(size) == 2 else "trilinear")
    kw = {} if mode == "area" else {"align_corners": False}
    out = torch.empty((len(s), channels or s.channels, *size), dtype=x.dtype)
    step = max(1, 2**24 // (x[0].numel() + out[0].numel()))  # bounds the float32 working copy
    for i in range(0, len(s), step):
        b = x[i : i + step].float()  # (B, C, *spatial)
        if resize:
            b = F.interpolate(b, size=size, mode=mode, **kw)  # (B, C, *size)
        if convert:
            b = b.mean(1, keepdim=True) if channels == 1 else b.repeat(1, 3, *([1] * len(size)))
        out[i : i + step] = b.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else b
    return SampleSet(out, s.labels, s.meta)


def _options(fn: Any, opts: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``opts`` checked against ``fn``'s keyword options (a typo is an error naming the key)."""
    valid = [n for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY]
    for key in opts:
        if key not in valid:
            raise ConfigError(
                f"unknown option {key!r} for a {what} source; {did_you_mean(key, valid)}"
            )
    return dict(opts)


def _task(k: int) -> str:
    return "binary-class" if k == 2 else "multi-class"


def _has_native(flag: str, size: int, root: Any) -> bool:
    """Whether the MedMNIST+ file of ``flag`` at ``size`` is published and present locally."""
    if size not in medmnist_sizes(flag):
        return False
    try:
        folder = resolve_data_root(root)
    except ConfigError:
        return False
    return (folder / medmnist_filename(flag, size)).is_file()


def _medmnist(flag: str, size: int, root: Any, download: bool) -> SourceData:
    info = medmnist_info(flag)
    splits = {s: load_medmnist(flag, s, size=size, root=root, download=download) for s in SPLITS}
    return SourceData(
        name=flag if size == 28 else f"{flag}@{size}",
        class_names=medmnist_class_names(flag),
        splits=splits,
        info={
            "description": info["description"],
            "licence": info["license"],
            "citation": MEDMNIST_CITATION,
            "modality": _MODALITY.get(re.sub(r"mnist(3d)?$", "", flag), "unspecified"),
            "task": info["task"],
            "dims": "3D" if flag.endswith("3d") else "2D",
        },
    )


def _files(kind: str, opts: Mapping[str, Any], seed: int) -> SourceData:
    from medcl.data.files import load_folder, load_manifest  # imports MONAI (slow): only if used

    fn = load_manifest if kind == "manifest" else load_folder
    opts = dict(opts)
    path = Path(opts.pop(kind)).expanduser()
    opts.setdefault("seed", seed)  # an unknown option is refused by FileOptions, by its name
    class_names, splits = fn(path, **opts)
    n = sum(len(s) for s in splits.values())
    return SourceData(
        name=path.stem if kind == "manifest" else path.name,
        class_names=class_names,
        splits=splits,
        info={
            "description": f"{n} images from the {kind} {path}",
            "licence": "as set by the data provider",
            "citation": "",
            "modality": "unspecified",
            "task": _task(len(class_names)),
            "dims": f"{splits['train'].spatial_dims}D",
        },
    )


def _synthetic(opts: Mapping[str, Any], seed: int) -> SourceData:
    opts = _options(make_synthetic, opts, "synthetic")
    opts.setdefault("seed", seed)
    splits = make_synthetic(**opts)
    k = opts.get("num_classes", 3)
    return SourceData(
        name="synthetic",
        class_names=synthetic_class_names(k),
        splits=splits,
        info={
            "description": "seeded synthetic images whose classes differ by lesion morphology "
            "and location (medcl.data.synthetic.make_synthetic)",
            "licence": "generated by medcl; no restrictions",
            "citation": "",
            "modality": "synthetic",
            "task": _task(k),
            "dims": f"{splits['train'].spatial_dims}D",
        },
    )


def _parse(spec: str | Path | Mapping[str, Any]) -> tuple[str, Any]:
    """``(kind, payload)`` for a spec; ConfigError listing the accepted forms otherwise."""
    if isinstance(spec, Mapping):
        kinds = [k for k in ("medmnist", "manifest", "folder", "synthetic") if k in spec]
        if len(kinds) != 1:
            raise ConfigError(
                "a source mapping needs exactly one of the keys 'medmnist', 'manifest', 'folder', "
                f"'synthetic'; got keys {sorted(spec)}. Accepted: {FORMS}."
            )
        kind = kinds[0]
        if kind == "medmnist":
            extra = sorted(set(spec) - {"medmnist", "size"})
            if extra:
                raise ConfigError(
                    f"unknown key(s) {extra} in a medmnist source; only 'size' is allowed."
                )
            size = spec.get("size", 28)
            if not isinstance(size, int) or isinstance(size, bool):
                raise ConfigError(
                    f"medmnist source 'size' must be an int (28/64/128/224); got {size!r}."
                )
            return kind, (str(spec["medmnist"]), size)
        if kind == "synthetic":
            if len(spec) > 1 or not isinstance(spec["synthetic"], Mapping | None | bool):
                raise ConfigError(
                    f"a synthetic source is {{'synthetic': {{...options}}}}; got {dict(spec)}."
                )
            return kind, dict(spec["synthetic"] or {})
        return kind, dict(spec)
    if not isinstance(spec, str | Path):
        raise ConfigError(
            f"a data source must be a string or a mapping; got {spec!r}. Accepted: {FORMS}."
        )
    text = str(spec)
    if text == "synthetic":
        return "synthetic", {}
    if text.lower().endswith(".csv"):
        return "manifest", {"manifest": text}
    if Path(text).expanduser().is_dir():
        return "folder", {"folder": text}
    m = re.fullmatch(r"([a-z0-9]+)(?:@(\d+))?", text.lower())
    if m is None:
        what = "no such folder" if "/" in text or "\\" in text else "not a recognised source"
        raise ConfigError(f"data source {text!r}: {what}. Accepted: {FORMS}.")
    return "medmnist", (m[1], int(m[2] or 28))


def load_source(
    spec: str | Path | Mapping[str, Any],
    *,
    root: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    native_size: bool = True,
    seed: int = 0,
) -> SourceData:
    """Load a data source into memory (see the module docstring for the accepted ``spec`` forms).

    Args:
        spec: what to load.
        root: MedMNIST data folder (see :func:`~medcl.data.medmnist_source.resolve_data_root`).
        download: fetch missing MedMNIST files when the network allows.
        image_size: resize every split once to this side length (None keeps the stored size).
            A MedMNIST source given without a size loads the published file of that size when
            it is in the data root (e.g. ``breastmnist_64.npz``) instead of upsampling 28 px,
            unless ``native_size`` is False.
        channels: convert to 1 (mean) or 3 (repeat) channels (None keeps them).
        native_size: False resizes the 28-px file of a MedMNIST source given without a size
            even where a published file of ``image_size`` exists, so that every such source
            takes the same resolution path (a size in the spec, ``"breastmnist@64"``, is
            always loaded as given).
        seed: seed of automatic file splits and of synthetic data (unless the spec sets one).

    Returns:
        :class:`SourceData` with images ``(N, C, H, W[, D])`` (uint8 for MedMNIST and synthetic,
        float32 in [0, 1] for files) and local labels.

    Raises:
        ConfigError: an unrecognised spec or option (with the accepted forms / closest key).
        DataError: missing, corrupt or invalid data (see the loaders).
    """
    kind, payload = _parse(spec)
    if kind == "medmnist":
        flag, size = payload
        try:
            medmnist_info(flag)
        except ConfigError as e:
            raise ConfigError(f"{e}. Accepted source forms: {FORMS}.") from None
        if not isinstance(native_size, bool):
            raise ConfigError(
                f"native_size must be true or false; got {native_size!r}. Use false to upsample "
                "every MedMNIST source from 28 px, true to prefer a published file of image_size."
            )
        if (
            native_size
            and image_size not in (None, size)
            and size == 28
            and _has_native(flag, image_size, root)
        ):
            size = image_size  # a published MedMNIST+ file at that size beats upsampling 28 px
        src = _medmnist(flag, size, root, download)
    elif kind == "synthetic":
        payload.setdefault("image_size", image_size or 28)
        payload.setdefault("channels", channels or 1)
        src = _synthetic(payload, seed)
    else:
        payload.setdefault("image_size", image_size)
        payload.setdefault("channels", channels)
        src = _files(kind, payload, seed)
    if image_size is None and channels is None:
        return src
    splits = {
        k: resize_and_convert(v, image_size=image_size, channels=channels)
        for k, v in src.splits.items()
    }
    return SourceData(src.name, src.class_names, splits, src.info)
