"""What an image file's header says, per format (PNG/JPEG, DICOM, NIfTI), without its pixels.

Every row of a manifest is checked with :func:`inspect_file` before any pixel is decoded; the
same facts decide whether ``medcl predict`` can feed a file to a model.
"""

from __future__ import annotations

__all__ = ["SUPPORTED_SUFFIXES", "FileInfo", "inspect_file"]

from pathlib import Path
from typing import NamedTuple

SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz")
_KINDS = {".png": "pil", ".jpg": "pil", ".jpeg": "pil", ".dcm": "dicom", ".nii": "nifti"}
_GRAY_MODES = ("L", "I", "F")


class FileInfo(NamedTuple):
    """Header facts of one file; ``problem`` says what is wrong (None: the file is usable)."""

    spatial_dims: int = 0
    channels: int = 0
    shape: tuple[int, ...] = ()
    problem: str | None = None


def _kind(path: Path) -> str | None:
    if path.is_dir():
        return "dicom"  # a DICOM series folder
    name = path.name.lower()
    return "nifti" if name.endswith(".nii.gz") else _KINDS.get(Path(name).suffix)


def inspect_file(path: Path) -> FileInfo:
    """Format, dimensionality, channels and shape from headers; ``problem`` says what is wrong."""
    if not path.exists():
        return FileInfo(problem="file not found")
    kind = _kind(path)
    if kind is None:
        expected = ", ".join(SUPPORTED_SUFFIXES)
        return FileInfo(problem=f"unsupported extension; expected {expected} or a DICOM folder")
    try:
        if kind == "pil":
            from PIL import Image

            with Image.open(path) as im:
                mode, (w, h) = im.mode, im.size
                im.verify()
            gray = mode in ("1", "LA", "La") or mode.startswith(_GRAY_MODES)
            return FileInfo(2, 1 if gray else 3, (h, w))
        if kind == "nifti":
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(path).shape)
            if len(shape) not in (2, 3, 4):
                return FileInfo(problem=f"{len(shape)}-dimensional NIfTI {shape} is not supported")
            return FileInfo(min(len(shape), 3), shape[3] if len(shape) == 4 else 1, shape[:3])
        import pydicom

        files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
        if not files:
            return FileInfo(problem="empty folder; expected the files of one DICOM series")
        for f in files:
            ds = pydicom.dcmread(f)  # pixels included: a header-only read cannot see PixelData
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                return FileInfo(problem=f"DICOM {f.name} has no pixel data (no PixelData element)")
        frames = len(files) if path.is_dir() else int(ds.get("NumberOfFrames", 1) or 1)
        shape = (int(ds.Rows), int(ds.Columns)) + ((frames,) if frames > 1 else ())
        return FileInfo(len(shape), int(ds.get("SamplesPerPixel", 1)), shape)
    except Exception as e:  # any reader failure means the same thing here: unreadable file
        what = {"pil": "PNG/JPEG", "dicom": "DICOM", "nifti": "NIfTI"}[kind]
        return FileInfo(problem=f"unreadable {what} file ({type(e).__name__}: {e})")
