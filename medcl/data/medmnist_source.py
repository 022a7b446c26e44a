"""MedMNIST through the ``medmnist`` package: root resolution, MD5 verification, tensors out.

Files are read by medmnist's own dataset classes (``getattr(medmnist, INFO[flag]["python_class"])``),
never by re-implementing their format. Every file is MD5-verified against ``INFO`` before use;
a verification is cached per (path, file size, mtime) for the life of the process.

Licence of the data: CC BY 4.0. Cite: Yang, J. et al. "MedMNIST v2 - A large-scale lightweight
benchmark for 2D and 3D biomedical image classification." Scientific Data 10, 41 (2023).
"""

from __future__ import annotations

__all__ = [
    "ENV_VAR",
    "MEDMNIST_CITATION",
    "check_medmnist",
    "load_medmnist",
    "medmnist_class_names",
    "medmnist_filename",
    "medmnist_info",
    "medmnist_sizes",
    "missing_medmnist",
    "resolve_data_root",
]

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from medcl.data.samples import SampleSet, make_meta
from medcl.errors import ConfigError, DataError, did_you_mean

MEDMNIST_CITATION = (
    'Yang, J. et al. "MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical '
    'image classification." Scientific Data 10, 41 (2023).'
)
ENV_VAR = "MEDCL_DATA_ROOT"
SPLITS = ("train", "val", "test")
Split = Literal["train", "val", "test"]

# (resolved path, file size, mtime_ns) -> md5 hex digest; filled by _md5.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def _info() -> dict[str, dict[str, Any]]:
    import medmnist  # slow (~1-3 s) and creates ~/.medmnist: imported only when needed

    return medmnist.INFO


def _default_root() -> Path:
    from medmnist.info import DEFAULT_ROOT

    return Path(DEFAULT_ROOT)


def _candidates(root: str | Path | None) -> list[tuple[str, Path]]:
    """Where to look, in order, each with how it was chosen (used to word errors)."""
    out: list[tuple[str, Path]] = []
    if root is not None:
        out.append(("root argument", Path(root).expanduser()))
    if os.environ.get(ENV_VAR):
        out.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser()))
    out.append(("medmnist default", _default_root()))
    return out


def resolve_data_root(root: str | Path | None = None) -> Path:
    """The MedMNIST data folder: explicit ``root`` -> ``$MEDCL_DATA_ROOT`` -> ``~/.medmnist``."""
    return _candidates(root)[0][1]


def medmnist_info(flag: str) -> dict[str, Any]:
    """``medmnist.INFO[flag]``; an unknown flag is a :class:`ConfigError` with a suggestion."""
    info = _info()
    if flag not in info:
        raise ConfigError(f"unknown MedMNIST dataset {flag!r}; {did_you_mean(flag, info)}")
    return info[flag]


def _dataset_class(flag: str) -> type:
    import medmnist

    return getattr(medmnist, medmnist_info(flag)["python_class"])


def medmnist_sizes(flag: str) -> tuple[int, ...]:
    """Image sizes published for ``flag``: (28, 64, 128, 224) for 2D, (28, 64) for 3D."""
    return tuple(_dataset_class(flag).available_sizes)


def medmnist_filename(flag: str, size: int = 28) -> str:
    """``"breastmnist.npz"`` for size 28, ``"breastmnist_64.npz"`` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def medmnist_class_names(flag: str) -> tuple[str, ...]:
    """Class names ordered by label id, from ``INFO[flag]["label"]``."""
    labels = medmnist_info(flag)["label"]
    return tuple(labels[k] for k in sorted(labels, key=int))


def _is_3d(flag: str) -> bool:
    return flag.endswith("3d")


def _check_size(flag: str, size: int) -> None:
    sizes = medmnist_sizes(flag)
    if size not in sizes:
        raise ConfigError(
            f"MedMNIST {flag!r} has no size {size}; valid sizes are {list(sizes)}. "
            f"Use e.g. '{flag}@{sizes[-1]}' or size={sizes[0]}."
        )


def _md5(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MD5_CACHE:
        h = hashlib.md5()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _MD5_CACHE[key] = h.hexdigest()
    return _MD5_CACHE[key]


def _expected_md5(flag: str, size: int) -> str:
    return medmnist_info(flag)["MD5" if size == 28 else f"MD5_{size}"]


def _verify(path: Path, flag: str, size: int) -> None:
    expected, got = _expected_md5(flag, size), _md5(path)
    if got != expected:
        raise DataError(
            f"MedMNIST file {path} failed its MD5 check: expected {expected}, got {got} "
            "(truncated or corrupt download, or a different medmnist release). Delete the file and "
            "download it again (download: true), or replace it with the official file."
        )


def _locate(flag: str, size: int, root: str | Path | None, download: bool) -> Path:
    """Folder holding the (verified) file; downloads into the first candidate when allowed."""
    name = medmnist_filename(flag, size)
    candidates = _candidates(root)
    for _, folder in candidates:
        if (folder / name).is_file():
            _verify(folder / name, flag, size)
            return folder
    target = candidates[0][1]
    if download:
        target.mkdir(parents=True, exist_ok=True)
        try:
            _dataset_class(flag)(split="train", root=str(target), size=size, download=True)
        except RuntimeError as e:
            raise DataError(f"downloading {name} into {target} failed: {e}") from None
        _verify(target / name, flag, size)
        return target
    looked = "; ".join(f"{folder / name} ({how})" for how, folder in candidates)
    raise DataError(
        f"MedMNIST file {name} was not found. Looked in: {looked}. Fix: put the file in one of "
        f"these folders, set ${ENV_VAR} (or pass --root / root=) to the folder that holds it, or "
        "enable `download: true` when the network allows."
    )


def load_medmnist(
    flag: str,
    split: Split,
    *,
    size: int = 28,
    root: str | Path | None = None,
    download: bool = False,
) -> SampleSet:
    """Load one split of a MedMNIST dataset as a uint8 :class:`SampleSet`.

    Args:
        flag: dataset name, a key of ``medmnist.INFO`` (``"pneumoniamnist"``, ``"vesselmnist3d"``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: image side, 28 (default) or a larger published size (64/128/224; 3D: 64).
        root: data folder; see :func:`resolve_data_root` (every candidate folder is searched).
        download: fetch the file from the official source into the data root when missing.

    Returns:
        images uint8 ``(N, C, H, W)`` (2D; RGB becomes ``C=3``) or ``(N, 1, H, W, D)`` (3D);
        labels int64 ``(N,)``; meta with ``dataset`` (``"flag"`` or ``"flag@size"``), empty
        ``site``/``patient_id``, ``index`` (position in the original split) and ``split``.

    Raises:
        ConfigError: unknown flag, unsupported size or split.
        DataError: multi-label dataset, missing file (naming every folder searched) or bad MD5.
    """
    info = medmnist_info(flag)
    if "multi-label" in info["task"]:
        raise DataError(
            f"MedMNIST {flag!r} is {info['task']!r}: multi-label is not supported for "
            "classification scenarios (each sample needs exactly one class). Pick a "
            "multi-class or binary-class dataset."
        )
    _check_size(flag, size)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {list(SPLITS)}; got {split!r}.")
    folder = _locate(flag, size, root, download)
    ds = _dataset_class(flag)(split=split, root=str(folder), size=size, download=False)
    imgs = np.asarray(ds.imgs)
    images = torch.from_numpy(np.ascontiguousarray(imgs)).to(torch.uint8)
    if _is_3d(flag) or imgs.ndim == 3:
        images = images.unsqueeze(1)  # (N, H, W[, D]) -> (N, 1, H, W[, D])
    else:
        images = images.permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)
    labels = torch.from_numpy(np.asarray(ds.labels).reshape(len(imgs)).astype(np.int64))
    name = flag if size == 28 else f"{flag}@{size}"
    return SampleSet(images, labels, make_meta(len(imgs), dataset=name, split=split))


def _row(flag: str, size: int, path: Path) -> dict[str, Any]:
    info = medmnist_info(flag)
    expected, got = _expected_md5(flag, size), _md5(path)
    ok = got == expected
    return {
        "flag": flag,
        "size": size,
        "file": str(path),
        "verified": ok,
        "md5_ok": "ok" if ok else f"mismatch: expected {expected}, got {got}; re-download it",
        "n_train": info["n_samples"]["train"],
        "n_val": info["n_samples"]["val"],
        "n_test": info["n_samples"]["test"],
        "task": info["task"],
        "n_classes": len(info["label"]),
        "dims": "3D" if _is_3d(flag) else "2D",
    }


def check_medmnist(root: str | Path | None = None) -> pd.DataFrame:
    """Inventory of the MedMNIST files present in the data root, each MD5-verified.

    Args:
        root: data folder (default: :func:`resolve_data_root`).

    Returns:
        One row per (flag, size) file present, columns ``flag, size, file, verified, md5_ok,
        n_train, n_val, n_test, task, n_classes, dims`` (split sizes and task from ``INFO``).
    """
    folder = resolve_data_root(root)
    rows = [
        _row(flag, size, folder / medmnist_filename(flag, size))
        for flag in _info()
        for size in medmnist_sizes(flag)
        if (folder / medmnist_filename(flag, size)).is_file()
    ]
    columns = [
        "flag",
        "size",
        "file",
        "verified",
        "md5_ok",
        "n_train",
        "n_val",
        "n_test",
        "task",
        "n_classes",
        "dims",
    ]
    return pd.DataFrame(rows, columns=columns)


def missing_medmnist(
    root: str | Path | None = None, *, sizes: tuple[int, ...] = (28,)
) -> list[str]:
    """File names of known MedMNIST datasets (at ``sizes``) absent from the data root."""
    folder = resolve_data_root(root)
    return [
        medmnist_filename(flag, s)
        for flag in _info()
        for s in sizes
        if s in medmnist_sizes(flag) and not (folder / medmnist_filename(flag, s)).is_file()
    ]
