"""A ``path,label[,...]`` table of image files -> validated, split, decoded :class:`SampleSet` s.

The one path a CSV manifest and a class-folder tree share (:mod:`medcl.data.files` builds the
table). Every row is checked (columns, files, labels, formats, dimensionality) from headers
before any pixel is decoded, and all problems are reported together in one
:class:`~medcl.errors.DataError`; then the pixels are decoded once
(:func:`~medcl.data.decode.load_image_files`).
"""

from __future__ import annotations

__all__ = ["FileOptions", "LabelledSplits", "load_table"]

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from medcl.data.cache import CacheMode, FileCache, choose_cache, current_file_cache
from medcl.data.decode import load_image_files, spatial_size
from medcl.data.disk import disk_folder
from medcl.data.labels import label_problems, normalise_label
from medcl.data.readers import FileInfo, inspect_file
from medcl.data.samples import META_COLUMNS, SampleSet
from medcl.data.splitting import SPLITS, assign_splits
from medcl.errors import ConfigError, DataError, did_you_mean

log = logging.getLogger(__name__)


class LabelledSplits(NamedTuple):
    """What a file source yields: class names (local id -> name) and the three splits."""

    class_names: tuple[str, ...]
    splits: dict[str, SampleSet]


@dataclass(frozen=True)
class FileOptions:
    """How a file cohort is read, split and held: the keyword options of
    :func:`~medcl.data.files.load_manifest` and :func:`~medcl.data.files.load_folder`.

    Attributes:
        image_size: resize spatial dims to this (int or per-axis); None keeps the native size.
        channels: 1 or 3 (convert), or None (keep; then all files must agree).
        spatial_dims: 2 (PNG/JPEG/DICOM/2D NIfTI) or 3 (NIfTI volumes, DICOM series folders).
        class_names: fixed class order; labels outside it are errors (integer labels index it
            when none is a class name). Default: the sorted labels, checked for suspicious
            ones (see :mod:`medcl.data.labels`).
        split_fractions: (train, val, test) fractions for the automatic split.
        seed: seed of the automatic split.
        progress: show a progress bar while loading.
        min_class_samples: without ``class_names``, a class with fewer rows than this, next
            to a class with at least this many, is an error (usually a typo).
        cache: ``"memory"`` (decode into RAM), ``"persistent"`` (decode once to ``cache_dir``
            and hold the images in a disk-backed tensor: cohorts larger than RAM) or
            ``"auto"`` (persistent when the images would fill half the available RAM).
            Default: the run's ``data.cache`` (:func:`medcl.data.cache.file_cache`), else auto.
        cache_dir: folder of the persistent cache (default: the run's ``data.cache_dir``).
        workers: decoding worker processes (default: the run's ``data.workers``, else
            ``min(4, CPUs)``).
        size: ``image_size`` per spatial axis (set from it).
        file_cache: the run's cache setting overridden by this source's own (set at creation).

    Raises:
        ConfigError: an option out of range.
    """

    image_size: int | Sequence[int] | None = None
    channels: int | None = None
    spatial_dims: int = 2
    class_names: Sequence[str] | None = None
    split_fractions: Sequence[float] = (0.7, 0.1, 0.2)
    seed: int = 0
    progress: bool = False
    min_class_samples: int = 2
    cache: CacheMode | None = None
    cache_dir: str | Path | None = None
    workers: int | None = None
    size: tuple[int, ...] | None = field(init=False)
    file_cache: FileCache = field(init=False)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3; got {self.spatial_dims!r}.")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1, 3 or None (keep); got {self.channels!r}.")
        m = self.min_class_samples
        if not isinstance(m, int) or m < 1:
            raise ConfigError(f"min_class_samples must be an int >= 1; got {m!r}.")
        object.__setattr__(self, "size", spatial_size(self.image_size, self.spatial_dims))
        run = current_file_cache()  # the run's data.cache, overridden by the source's own options
        setting = FileCache(
            self.cache if self.cache is not None else run.mode,
            Path(self.cache_dir) if self.cache_dir is not None else run.cache_dir,
            self.workers if self.workers is not None else run.workers,
        )
        object.__setattr__(self, "file_cache", setting)

    @classmethod
    def from_keywords(cls, options: Mapping[str, Any], *, what: str) -> FileOptions:
        """The options of a ``what`` source (``"manifest"``); an unknown key is an error."""
        valid = [f.name for f in fields(cls) if f.init]
        for key in options:
            if key not in valid:
                raise ConfigError(
                    f"unknown option {key!r} for a {what} source; {did_you_mean(key, valid)}"
                )
        return cls(**options)


def _class_ids(raw: pd.Series, class_names: Sequence[str] | None) -> tuple[tuple[str, ...], dict]:
    """Class names (given, sorted ints, or sorted strings) and a label -> local id map.

    ``raw`` holds normalised labels (:func:`~medcl.data.labels.normalise_label`). With declared
    ``class_names`` and integer labels none of which is a declared name, the labels index the
    list (``"1"`` -> ``class_names[1]``).
    """
    values = sorted(set(raw) - {""})
    numeric = bool(values) and all(v.lstrip("-").isdigit() for v in values)
    if class_names is not None:
        names = tuple(str(c) for c in class_names)
    else:
        names = (
            tuple(str(v) for v in sorted({int(v) for v in values})) if numeric else tuple(values)
        )
    ids = {normalise_label(n): i for i, n in enumerate(names)}
    if class_names is not None and numeric and not set(values) & set(ids):
        ids = {str(i): i for i in range(len(names))}  # integer labels index class_names
    return names, ids


def _row_problem(
    info: FileInfo, label: str, split: str | None, ids: dict, *, dims: int, channels: int | None
) -> str | None:
    if label == "":
        return "empty label"
    if label not in ids:
        if label.lstrip("-").isdigit() and all(k.isdigit() for k in ids):
            return f"label {label} is outside the declared range 0..{len(ids) - 1} (class_names)"
        return (
            f"unknown label {label!r} (not in class_names); {did_you_mean(label, ids, quote=True)}"
        )
    if split is not None and split not in SPLITS:
        return f"split {split!r} is not one of {list(SPLITS)}"
    if info.problem:
        return info.problem
    if info.spatial_dims != dims:
        return (
            f"{info.spatial_dims}D image of shape {info.shape} in a {dims}D source; "
            f"set spatial_dims={info.spatial_dims} or remove the row"
        )
    if channels == 3 and info.channels not in (1, 3):
        return f"{info.channels} channels cannot be converted to 3; use channels=1"
    return None


def _validate(
    df: pd.DataFrame,
    paths: list[Path],
    ids: dict,
    opt: FileOptions,
    where: str,
    first_line: int,
    label_issues: Sequence[str] = (),
) -> list[FileInfo]:
    """Check every row from headers only; one DataError lists all bad rows and label issues.

    Returns:
        Each row's header facts (shape, channels), for the size estimate.
    """
    splits = df["split"] if "split" in df.columns else [None] * len(df)
    infos, problems = [], []
    rows = zip(df["path"], paths, df["label"], splits, strict=True)
    for i, (p, path, label, split) in enumerate(rows):
        info = inspect_file(path) if p else FileInfo(problem="empty path")
        why = _row_problem(info, label, split, ids, dims=opt.spatial_dims, channels=opt.channels)
        if why:
            row = f"line {i + first_line}: " if first_line >= 0 else ""
            problems.append(f"  {row}{p or '(empty path)'}: {why}")
        infos.append(info)
    if problems or label_issues:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        listed = "\n".join(problems[:10]) + more
        rows = f"{len(problems)} row(s) are invalid:\n{listed}\n" if problems else ""
        labels = "".join(f"  {m}\n" for m in label_issues)
        labels = (
            f"suspicious labels (class list inferred from the labels):\n{labels}" if labels else ""
        )
        raise DataError(f"{where}: {rows}{labels}Fix or remove these rows and load again.")
    mixes = [
        ("channel counts", "channels", opt.channels, "pass channels=1 or channels=3"),
        ("image shapes", "shape", opt.size, "pass image_size"),
    ]
    for what, attr, chosen, fix in mixes:
        seen = {getattr(info, attr): i for i, info in enumerate(infos)}
        if chosen is None and len(seen) > 1:
            ex = "; ".join(f"{k} (e.g. {df['path'][i]})" for k, i in seen.items())
            raise DataError(f"{where} mixes {what}: {ex}. To stack them into one tensor, {fix}.")
    return infos


def load_table(
    df: pd.DataFrame, base: Path, opt: FileOptions, *, name: str, where: str, first_line: int
) -> LabelledSplits:
    """Validate a ``path,label[,...]`` table, split it, then load the pixels once.

    Args:
        df: the table (string cells): ``path`` (relative to ``base``, or absolute), ``label``,
            optional ``site``, ``patient_id``, ``split`` and any others (carried into ``meta``).
        base: the folder relative paths start from.
        opt: the source's options.
        name: the ``dataset`` of rows without one.
        where: the table's name in messages (``"manifest cohort.csv"``).
        first_line: the file line of row 0 in messages (-1: files have no line numbers).
    """
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise DataError(
            f"{where} must have columns 'path' and 'label'; got columns {list(df.columns)}. "
            f"Add the missing column(s) {missing} to the header."
        )
    if df.empty:
        raise DataError(
            f"{where} has no rows (only the header {','.join(df.columns)}): there are no images "
            "to load. Add one row per image (path,label), or point at the file that lists them."
        )
    df = df.reset_index(drop=True).map(lambda v: v.strip() if isinstance(v, str) else v)
    if "split" in df.columns:
        df["split"] = df["split"].str.lower()
    df["patient_id"] = df["patient_id"].astype(str) if "patient_id" in df.columns else ""
    df["label"] = df["label"].map(normalise_label)  # the rule of medcl.data.labels
    names, ids = _class_ids(df["label"], opt.class_names)
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in df["path"]]
    issues = []
    if opt.class_names is None:
        lines = [i + first_line for i in range(len(df))] if first_line >= 0 else list(df["path"])
        issues = label_problems(
            list(df["label"]),
            lines,
            min_class_samples=opt.min_class_samples,
            row_word="line" if first_line >= 0 else "file",
        )
    infos = _validate(df, paths, ids, opt, where, first_line, issues)
    if opt.class_names is None:
        counts = df["label"].value_counts()
        log.info(
            "%s: %d classes inferred from the labels: %s (pass class_names to fix the list)",
            where,
            len(names),
            ", ".join(f"{n!r} ({counts.get(n, 0)} rows)" for n in names),
        )
    labels = [ids[v] for v in df["label"]]
    split = assign_splits(df, labels, where=where, fractions=opt.split_fractions, seed=opt.seed)
    # decoded split by split (file order kept within each), so every split is a slice of one
    # tensor: no copy, and a disk-backed tensor stays on disk
    order = np.concatenate([np.flatnonzero(split == s) for s in SPLITS])
    nbytes = sum(
        4 * (opt.channels or info.channels) * int(np.prod(opt.size or info.shape)) for info in infos
    )
    images = load_image_files(
        [paths[i] for i in order],
        image_size=opt.size,
        channels=opt.channels,
        spatial_dims=opt.spatial_dims,
        progress=opt.progress,
        cache=choose_cache(opt.file_cache, nbytes, where=where),
    )
    meta = df.drop(columns=["label", "split"], errors="ignore").assign(
        dataset=df["dataset"] if "dataset" in df.columns else name,
        site=df["site"] if "site" in df.columns else "",
        index=np.arange(len(df)),
        split=split,
        path=[str(p) for p in paths],
    )
    meta = meta[[*META_COLUMNS, *(c for c in meta.columns if c not in META_COLUMNS)]]
    y = torch.tensor(labels, dtype=torch.int64)
    out, start, on_disk = {}, 0, disk_folder(images) is not None
    for s in SPLITS:
        idx = torch.from_numpy(np.flatnonzero(split == s))
        part = images[start : start + len(idx)]  # a view; in RAM, an own copy as before
        start += len(idx)
        out[s] = SampleSet(
            part if on_disk else part.clone(),
            y[idx],
            meta.iloc[idx.numpy()].reset_index(drop=True),
        )
    return LabelledSplits(names, out)
