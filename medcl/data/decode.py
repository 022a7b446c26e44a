"""Decode image files into one float32 tensor through the MONAI pipeline, cached.

Pixels go through MONAI: ``LoadImaged`` (PILReader / PydicomReader / NibabelReader, picked by
format), ``EnsureChannelFirstd``, channel conversion, ``ScaleIntensityd`` to [0, 1] and ``Resized``,
composed with ``Compose`` (:mod:`medcl.data.preprocessing`) and run once through
``CacheDataset`` into one in-RAM tensor, or, for a cohort larger than RAM, through
``PersistentDataset`` (decoded once to a cache folder, reused by later runs) with DataLoader
workers into a disk-backed tensor (see :mod:`medcl.data.cache`).
"""

from __future__ import annotations

__all__ = ["load_image_files", "spatial_size"]

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import monai
import torch
from monai.data import CacheDataset, PersistentDataset
from monai.transforms import Compose
from torch import Tensor

from medcl.data.cache import FileCache
from medcl.data.disk import disk_tensor
from medcl.data.preprocessing import Preprocessing
from medcl.errors import ConfigError, DataError


def spatial_size(
    image_size: int | Sequence[int] | None, spatial_dims: int
) -> tuple[int, ...] | None:
    """``28`` -> ``(28, 28)`` for 2D; a sequence is checked against ``spatial_dims``."""
    if image_size is None:
        return None
    size = (int(image_size),) * spatial_dims if isinstance(image_size, int) else tuple(image_size)
    if len(size) != spatial_dims or min(size) < 1:
        raise ConfigError(
            f"image_size must be a positive int or {spatial_dims} positive ints; got {image_size!r}."
        )
    return size


def _pipeline(
    size: tuple[int, ...] | None,
    channels: int | None,
    intensity: Literal["minmax", "uint8"] = "minmax",
) -> Compose:
    """The one MONAI pipeline shared with ``medcl predict`` and the bundle (see
    :mod:`medcl.data.preprocessing`)."""
    return Preprocessing(image_size=size, channels=channels, intensity=intensity).compose()


def load_image_files(
    paths: Sequence[str | Path],
    *,
    image_size: int | Sequence[int] | None,
    channels: int | None = None,
    spatial_dims: int = 2,
    progress: bool = False,
    intensity: Literal["minmax", "uint8"] = "minmax",
    cache: FileCache | None = None,
) -> Tensor:
    """Load, scale to [0, 1], resize and stack image files in one cached MONAI pass.

    Args:
        paths: PNG/JPEG, DICOM or NIfTI files, or DICOM series folders (3D).
        image_size: target spatial size (an int means square/cubic), or None to keep the native
            size (then every file must already share it).
        channels: output channels, 1 or 3, or None to keep each file's own.
        spatial_dims: 2 or 3.
        progress: show MONAI's caching progress bar.
        intensity: ``"minmax"`` rescales each image to [0, 1] (how file sources are trained);
            ``"uint8"`` maps the fixed range 0..255 to [0, 1] (how MedMNIST arrays are trained).
        cache: ``memory`` (default: ``CacheDataset``, one in-RAM tensor) or ``persistent``
            (``PersistentDataset`` under ``cache.folder`` + DataLoader workers, a disk-backed
            tensor); ``auto`` is resolved by the caller (:func:`~medcl.data.cache.choose_cache`).

    Returns:
        float32 ``(N, C, H, W)`` or ``(N, C, H, W, D)`` in [0, 1]; the same values either way.

    Raises:
        DataError: a file could not be decoded, or holds NaN/Inf pixels (the files are named).
    """
    cache = cache or FileCache("memory")
    preprocessing = (spatial_size(image_size, spatial_dims), channels, intensity)
    pipeline = _pipeline(*preprocessing)
    try:
        if cache.mode == "persistent":
            x = _decode_persistent(paths, pipeline, preprocessing, cache, progress)
        else:
            data = [{"image": str(p)} for p in paths]
            ds = CacheDataset(
                data, pipeline, num_workers=cache.num_workers, progress=progress, copy_cache=False
            )
            x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"loading image files failed: {e}") from e
    # a NaN/Inf pixel makes min-max scaling NaN for the whole image: the run would later die
    # with a misleading "loss became nan"; name the files now (checked in chunks: x may be
    # larger than RAM)
    bad = [
        start + int(i)
        for start in range(0, len(x), 256)
        for i in torch.nonzero(~torch.isfinite(x[start : start + 256].flatten(1)).all(1)).flatten()
    ]
    if bad:
        listed = "\n".join(f"  {paths[i]}" for i in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(
            f"{len(bad)} image file(s) hold NaN or infinite pixel values:\n{listed}{more}\n"
            "Repair these files (e.g. replace NaN with the background value) or remove them."
        )
    return x


def _stack_images(items: list[dict]) -> Tensor:
    """DataLoader collate: the ``image`` of each item, stacked ``(B, C, *spatial)``."""
    return torch.stack([torch.as_tensor(item["image"]) for item in items])


def _decode_persistent(
    paths: Sequence[str | Path],
    pipeline: Compose,
    preprocessing: tuple,
    cache: FileCache,
    progress: bool,
) -> Tensor:
    """Files -> disk-backed float32 tensor through ``PersistentDataset`` and DataLoader workers.

    Each preprocessed image is saved under ``cache.folder/<preprocessing key>/`` keyed by the
    file's path, size and modification time (a changed file is decoded again), and loaded back
    with ``torch.load(weights_only=True)`` (no pickled code runs).
    """
    from torch.utils.data import DataLoader

    key = hashlib.sha1(json.dumps([repr(preprocessing), monai.__version__]).encode()).hexdigest()
    data = []
    for p in paths:
        st = Path(p).stat()
        data.append({"image": str(p), "stamp": f"{st.st_size}-{st.st_mtime_ns}"})
    ds = PersistentDataset(data, pipeline, cache_dir=cache.folder / key[:16])
    loader = DataLoader(ds, batch_size=32, num_workers=cache.num_workers, collate_fn=_stack_images)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="decoding (persistent cache)", unit="batch")
    out, start = None, 0
    for batch in loader:  # (B, C, *spatial) float32
        if out is None:
            out = disk_tensor(
                (len(data), *batch.shape[1:]), torch.float32, cache.folder / "tensors"
            )
        out[start : start + len(batch)] = batch
        start += len(batch)
    if out is None:
        raise DataError("loading image files failed: no files were given.")
    return out
