"""Image files on disk (PNG/JPEG, DICOM, NIfTI) -> float32 :class:`SampleSet` splits.

Pixels go through MONAI: ``LoadImaged`` (PILReader / PydicomReader / NibabelReader, picked by
format), ``EnsureChannelFirstd``, channel conversion, ``ScaleIntensityd`` to [0, 1] and ``Resized``,
composed with ``Compose`` and run once through ``CacheDataset`` into one in-RAM tensor, or, for a
cohort larger than RAM, through ``PersistentDataset`` (decoded once to a cache folder, reused by
later runs) with DataLoader workers into a disk-backed tensor (see :mod:`medcl.data.cache`).
Every row of a manifest is checked (columns, files, labels, formats, dimensionality) before any
pixel is decoded, and all problems are reported together in one :class:`DataError`.
"""

from __future__ import annotations

__all__ = [
    "SUPPORTED_SUFFIXES",
    "LabelledSplits",
    "load_folder",
    "load_image_files",
    "load_manifest",
    "split_by_patient",
]

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import monai
import numpy as np
import pandas as pd
import torch
from monai.data import CacheDataset, PersistentDataset
from monai.transforms import Compose
from torch import Tensor

from medcl.data.cache import CacheMode, FileCache, choose_cache, current_file_cache
from medcl.data.disk import disk_folder, disk_tensor
from medcl.data.labels import label_problems, normalise_label
from medcl.data.preprocessing import Preprocessing
from medcl.data.samples import META_COLUMNS, SampleSet
from medcl.errors import ConfigError, DataError, did_you_mean

SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz")
SPLITS = ("train", "val", "test")
_KINDS = {".png": "pil", ".jpg": "pil", ".jpeg": "pil", ".dcm": "dicom", ".nii": "nifti"}
_GRAY_MODES = ("L", "I", "F")
log = logging.getLogger(__name__)


class LabelledSplits(NamedTuple):
    """What a file source yields: class names (local id -> name) and the three splits."""

    class_names: tuple[str, ...]
    splits: dict[str, SampleSet]


class _FileInfo(NamedTuple):
    spatial_dims: int = 0
    channels: int = 0
    shape: tuple[int, ...] = ()
    problem: str | None = None


def _kind(path: Path) -> str | None:
    if path.is_dir():
        return "dicom"  # a DICOM series folder
    name = path.name.lower()
    return "nifti" if name.endswith(".nii.gz") else _KINDS.get(Path(name).suffix)


def _inspect(path: Path) -> _FileInfo:
    """Format, dimensionality, channels and shape from headers; ``problem`` says what is wrong."""
    if not path.exists():
        return _FileInfo(problem="file not found")
    kind = _kind(path)
    if kind is None:
        expected = ", ".join(SUPPORTED_SUFFIXES)
        return _FileInfo(problem=f"unsupported extension; expected {expected} or a DICOM folder")
    try:
        if kind == "pil":
            from PIL import Image

            with Image.open(path) as im:
                mode, (w, h) = im.mode, im.size
                im.verify()
            gray = mode in ("1", "LA", "La") or mode.startswith(_GRAY_MODES)
            return _FileInfo(2, 1 if gray else 3, (h, w))
        if kind == "nifti":
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(path).shape)
            if len(shape) not in (2, 3, 4):
                return _FileInfo(problem=f"{len(shape)}-dimensional NIfTI {shape} is not supported")
            return _FileInfo(min(len(shape), 3), shape[3] if len(shape) == 4 else 1, shape[:3])
        import pydicom

        files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
        if not files:
            return _FileInfo(problem="empty folder; expected the files of one DICOM series")
        for f in files:
            ds = pydicom.dcmread(f)  # pixels included: a header-only read cannot see PixelData
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                return _FileInfo(problem=f"DICOM {f.name} has no pixel data (no PixelData element)")
        frames = len(files) if path.is_dir() else int(ds.get("NumberOfFrames", 1) or 1)
        shape = (int(ds.Rows), int(ds.Columns)) + ((frames,) if frames > 1 else ())
        return _FileInfo(len(shape), int(ds.get("SamplesPerPixel", 1)), shape)
    except Exception as e:  # any reader failure means the same thing here: unreadable file
        what = {"pil": "PNG/JPEG", "dicom": "DICOM", "nifti": "NIfTI"}[kind]
        return _FileInfo(problem=f"unreadable {what} file ({type(e).__name__}: {e})")


def _pipeline(
    size: tuple[int, ...] | None,
    channels: int | None,
    intensity: Literal["minmax", "uint8"] = "minmax",
) -> Compose:
    """The one MONAI pipeline shared with ``medcl predict`` and the bundle (see
    :mod:`medcl.data.preprocessing`)."""
    return Preprocessing(image_size=size, channels=channels, intensity=intensity).compose()


def _size(image_size: int | Sequence[int] | None, spatial_dims: int) -> tuple[int, ...] | None:
    if image_size is None:
        return None
    size = (int(image_size),) * spatial_dims if isinstance(image_size, int) else tuple(image_size)
    if len(size) != spatial_dims or min(size) < 1:
        raise ConfigError(
            f"image_size must be a positive int or {spatial_dims} positive ints; got {image_size!r}."
        )
    return size


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
    preprocessing = (_size(image_size, spatial_dims), channels, intensity)
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


def split_by_patient(
    groups: Sequence[str],
    labels: Sequence[int],
    *,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> np.ndarray:
    """Seeded train/val/test assignment of whole groups (patients), stratified by label.

    Each patient goes wholly to one split. Patients are stratified by their most frequent label
    and each stratum is cut by ``fractions`` (largest remainder), so small classes reach test.

    Returns:
        ``(N,)`` array of ``"train"``, ``"val"`` or ``"test"``, one entry per sample.
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or abs(f.sum() - 1) > 1e-6 or f[0] <= 0:
        raise ConfigError(
            "split fractions must be 3 non-negative numbers (train, val, test) summing to 1 "
            f"with train > 0; got {list(fractions)}. Example: (0.7, 0.1, 0.2)."
        )
    df = pd.DataFrame({"g": list(groups), "y": list(labels)})
    strata = df.groupby("g")["y"].agg(lambda y: y.value_counts().index[0])
    rng = np.random.default_rng(seed)
    assign: dict[str, str] = {}
    for _, pats in sorted(strata.groupby(strata).groups.items()):
        pats = rng.permutation(sorted(pats))
        raw = f * len(pats)
        n = np.floor(raw).astype(int)
        n[np.argsort(-(raw - n), kind="stable")[: len(pats) - n.sum()]] += 1
        for name, chunk in zip(SPLITS, np.split(pats, np.cumsum(n)[:2]), strict=True):
            assign.update(dict.fromkeys(chunk, name))
    return df["g"].map(assign).to_numpy()


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
    info: _FileInfo, label: str, split: str | None, ids: dict, *, dims: int, channels: int | None
) -> str | None:
    if label == "":
        return "empty label"
    if label not in ids:
        if label.lstrip("-").isdigit() and all(k.isdigit() for k in ids):
            return f"label {label} is outside the declared range 0..{len(ids) - 1} (class_names)"
        return f"unknown label {label!r} (not in class_names); {did_you_mean(label, ids)}"
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


class _Options(NamedTuple):
    """Validated options shared by :func:`load_manifest` and :func:`load_folder`."""

    size: tuple[int, ...] | None
    channels: int | None
    dims: int
    class_names: Sequence[str] | None
    fractions: Sequence[float]
    seed: int
    progress: bool
    min_class_samples: int = 2
    cache: FileCache = FileCache()

    @classmethod
    def make(
        cls,
        image_size,
        channels,
        spatial_dims,
        class_names,
        fractions,
        seed,
        progress,
        min_class_samples=2,
        cache=None,
        cache_dir=None,
        workers=None,
    ):
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3; got {spatial_dims!r}.")
        if channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1, 3 or None (keep); got {channels!r}.")
        if not isinstance(min_class_samples, int) or min_class_samples < 1:
            raise ConfigError(f"min_class_samples must be an int >= 1; got {min_class_samples!r}.")
        size = _size(image_size, spatial_dims)
        run = current_file_cache()  # the run's data.cache, overridden by the source's own options
        setting = FileCache(
            cache if cache is not None else run.mode,
            Path(cache_dir) if cache_dir is not None else run.cache_dir,
            workers if workers is not None else run.workers,
        )
        return cls(
            size,
            channels,
            spatial_dims,
            class_names,
            fractions,
            seed,
            progress,
            min_class_samples,
            setting,
        )


def _validate(
    df: pd.DataFrame,
    paths: list[Path],
    ids: dict,
    opt: _Options,
    where: str,
    first_line: int,
    label_issues: Sequence[str] = (),
) -> list[_FileInfo]:
    """Check every row from headers only; one DataError lists all bad rows and label issues.

    Returns:
        Each row's header facts (shape, channels), for the size estimate.
    """
    splits = df["split"] if "split" in df.columns else [None] * len(df)
    infos, problems = [], []
    rows = zip(df["path"], paths, df["label"], splits, strict=True)
    for i, (p, path, label, split) in enumerate(rows):
        info = _inspect(path) if p else _FileInfo(problem="empty path")
        why = _row_problem(info, label, split, ids, dims=opt.dims, channels=opt.channels)
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


def _splits(
    df: pd.DataFrame, labels: list[int], *, where: str, fractions: Sequence[float], seed: int
) -> np.ndarray:
    """The given split column (no patient in two splits) or a seeded patient-level split."""
    patients = df["patient_id"]
    if "split" not in df.columns:
        groups = [p or f"\0row{i}" for i, p in enumerate(patients)]  # no id: each row its own
        return split_by_patient(groups, labels, fractions=fractions, seed=seed)
    known = patients != ""
    per = df["split"][known].groupby(patients[known]).nunique()
    bad = list(per[per > 1].index)
    if bad:
        raise DataError(
            f"{where}: patient_id {bad[:10]}{' ...' if len(bad) > 10 else ''} appear in more "
            "than one split, which leaks patients between training and testing. Put all rows of "
            "a patient in one split, or drop the split column for a seeded patient-level split."
        )
    return df["split"].to_numpy()


def _load_table(
    df: pd.DataFrame, base: Path, opt: _Options, *, name: str, where: str, first_line: int
) -> LabelledSplits:
    """Validate a ``path,label[,...]`` table, split it, then load the pixels once.

    ``first_line`` is the file line of row 0 in messages (-1: files have no line numbers).
    """
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing or df.empty:
        raise DataError(
            f"{where} must have columns 'path' and 'label' and at least one row; got columns "
            f"{list(df.columns)} and {len(df)} rows. Add the missing columns {missing}."
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
            ", ".join(f"{n} ({counts.get(n, 0)} rows)" for n in names),
        )
    labels = [ids[v] for v in df["label"]]
    split = _splits(df, labels, where=where, fractions=opt.fractions, seed=opt.seed)
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
        spatial_dims=opt.dims,
        progress=opt.progress,
        cache=choose_cache(opt.cache, nbytes, where=where),
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


def load_manifest(
    path: str | Path,
    *,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    spatial_dims: int = 2,
    class_names: Sequence[str] | None = None,
    split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    progress: bool = False,
    min_class_samples: int = 2,
    cache: CacheMode | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
) -> LabelledSplits:
    """Load the images listed in a CSV manifest.

    Columns: ``path`` (relative to the CSV's folder, or absolute) and ``label`` (class name or
    int, normalised by the rule of :mod:`medcl.data.labels`), optional ``site``, ``patient_id``,
    ``split`` (train/val/test) and any others (carried into ``meta``). Without ``split``, a seeded patient-level split by ``split_fractions`` is made
    (each row is its own patient when ``patient_id`` is absent); with it, no patient may appear
    in two splits. Every row is checked before pixels are read.

    Args:
        path: the CSV file.
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

    Returns:
        Class names and ``{"train", "val", "test"}`` float32 sample sets in [0, 1], images
        ``(N, C, H, W)`` or ``(N, C, H, W, D)``, local labels ``0..K-1``.

    Raises:
        DataError: one error listing every invalid row (line number, path, reason) and every
            suspicious label (missing-value markers, integers out of range, case-only
            duplicates, rare classes), or a file with NaN/Inf pixels.
    """
    opt = _Options.make(
        image_size,
        channels,
        spatial_dims,
        class_names,
        split_fractions,
        seed,
        progress,
        min_class_samples,
        cache,
        cache_dir,
        workers,
    )
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"manifest {path} does not exist; pass the path of a CSV with columns path,label."
        )
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise DataError(
            f"manifest {path} is not a readable CSV ({e}); expected columns path,label."
        ) from e
    return _load_table(df, path.parent, opt, name=path.stem, where=f"manifest {path}", first_line=2)


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


def load_folder(
    path: str | Path,
    *,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    spatial_dims: int = 2,
    class_names: Sequence[str] | None = None,
    split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    progress: bool = False,
    min_class_samples: int = 2,
    cache: CacheMode | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
) -> LabelledSplits:
    """Load a folder with one sub-folder per class (``root/<class>/<image>``).

    A folder whose sub-folders are ``train``/``val``/``test`` (``root/<split>/<class>/<image>``)
    keeps that split; otherwise a seeded stratified split by ``split_fractions`` is made. Class
    names are the sorted class-folder names. Arguments and returns as :func:`load_manifest`.
    """
    opt = _Options.make(
        image_size,
        channels,
        spatial_dims,
        class_names,
        split_fractions,
        seed,
        progress,
        min_class_samples,
        cache,
        cache_dir,
        workers,
    )
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
        for f in _entries(c, spatial_dims)
    ]
    if not rows:
        raise DataError(
            f"image folder {root} holds no class sub-folders with images; expected "
            "root/<class>/<image> or root/<split>/<class>/<image>."
        )
    where = f"image folder {root}"
    return _load_table(pd.DataFrame(rows), root, opt, name=root.name, where=where, first_line=-1)
