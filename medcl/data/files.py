"""Image files on disk (PNG/JPEG, DICOM, NIfTI) -> float32 :class:`SampleSet` splits.

Two ways to list a cohort, one path after that: a CSV manifest (:func:`load_manifest`) and a
folder with one sub-folder per class (:func:`load_folder`) both become a ``path,label[,...]``
table that :func:`medcl.data.tables.load_table` checks row by row (from headers, every problem
in one :class:`~medcl.errors.DataError`), splits by patient and decodes once through MONAI
(:mod:`medcl.data.decode`, cached in RAM or on disk: :mod:`medcl.data.cache`). Both take the
same keyword options, :class:`~medcl.data.tables.FileOptions`.
"""

from __future__ import annotations

__all__ = ["FileOptions", "LabelledSplits", "load_folder", "load_manifest"]

from pathlib import Path
from typing import Any

import pandas as pd

from medcl.data.splitting import SPLITS
from medcl.data.tables import FileOptions, LabelledSplits, load_table
from medcl.errors import DataError


def load_manifest(path: str | Path, **options: Any) -> LabelledSplits:
    """Load the images listed in a CSV manifest.

    Columns: ``path`` (relative to the CSV's folder, or absolute) and ``label`` (class name or
    int, normalised by the rule of :mod:`medcl.data.labels`), optional ``site``, ``patient_id``,
    ``split`` (train/val/test) and any others (carried into ``meta``). Without ``split``, a
    seeded patient-level split by ``split_fractions`` is made (each row is its own patient when
    ``patient_id`` is absent); with it, no patient may appear in two splits. Every row is
    checked before pixels are read.

    Args:
        path: the CSV file.
        **options: the keyword options of :class:`~medcl.data.tables.FileOptions`
            (``image_size``, ``channels``, ``spatial_dims``, ``class_names``,
            ``split_fractions``, ``seed``, ``progress``, ``min_class_samples``, ``cache``,
            ``cache_dir``, ``workers``).

    Returns:
        Class names and ``{"train", "val", "test"}`` float32 sample sets in [0, 1], images
        ``(N, C, H, W)`` or ``(N, C, H, W, D)``, local labels ``0..K-1``.

    Raises:
        ConfigError: an unknown or out-of-range option.
        DataError: one error listing every invalid row (line number, path, reason) and every
            suspicious label (missing-value markers, integers out of range, case-only
            duplicates, rare classes), or a file with NaN/Inf pixels.
    """
    opt = FileOptions.from_keywords(options, what="manifest")
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"manifest {path} does not exist; pass the path of a CSV with columns path,label."
        )
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"manifest {path} is empty (no header, no rows); expected a CSV with the header "
            "path,label and one row per image."
        ) from None
    except Exception as e:
        raise DataError(
            f"manifest {path} is not a readable CSV ({e}); expected columns path,label."
        ) from e
    return load_table(df, path.parent, opt, name=path.stem, where=f"manifest {path}", first_line=2)


def _entries(folder: Path, spatial_dims: int) -> list[Path]:
    """Images under a class folder; with 3D, a sub-folder is one DICOM series."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name.lower() in ("thumbs.db", "desktop.ini"):
            continue
        if p.is_dir() and spatial_dims == 2:
            out += [f for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")]
        else:
            out.append(p)
    return out


def load_folder(path: str | Path, **options: Any) -> LabelledSplits:
    """Load a folder with one sub-folder per class (``root/<class>/<image>``).

    A folder whose sub-folders are ``train``/``val``/``test`` (``root/<split>/<class>/<image>``)
    keeps that split; otherwise a seeded stratified split by ``split_fractions`` is made. Class
    names are the sorted class-folder names. Options, returns and errors as
    :func:`load_manifest`.
    """
    opt = FileOptions.from_keywords(options, what="folder")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; expected root/<class>/<image files>.")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    layout = [(s, root / s) for s in SPLITS if s in subdirs] if "train" in subdirs else []
    if not layout or set(subdirs) - set(SPLITS):
        layout = [("", root)]
    rows = [
        {"path": str(f), "label": c.name, **({"split": s} if s else {})}
        for s, top in layout
        for c in sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))
        for f in _entries(c, opt.spatial_dims)
    ]
    if not rows:
        raise DataError(
            f"image folder {root} holds no class sub-folders with images; expected "
            "root/<class>/<image> or root/<split>/<class>/<image>."
        )
    where = f"image folder {root}"
    return load_table(pd.DataFrame(rows), root, opt, name=root.name, where=where, first_line=-1)
