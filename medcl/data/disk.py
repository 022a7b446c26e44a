"""Disk-backed image tensors: cohorts larger than RAM keep the one-tensor :class:`SampleSet`.

A disk-backed tensor is an ordinary ``torch.Tensor`` whose storage is a memory-mapped file
(``torch.from_file(..., shared=True)``): indexing a batch reads only those rows, and the kernel
pages images in and out as memory allows, so the trainer, replay memory and evaluation work on it
unchanged. The file is unlinked as soon as it is mapped (it lives while the tensor does and
leaves nothing behind); selecting rows of such a tensor (:func:`take`) writes them to a new
disk-backed tensor in the same folder, chunk by chunk, instead of copying them into RAM.
"""

from __future__ import annotations

__all__ = ["available_memory", "disk_folder", "disk_tensor", "take"]

import contextlib
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

#: Rows copied at a time by :func:`take` (bounds the RAM a selection needs).
_CHUNK_BYTES = 64 * 2**20


def disk_tensor(shape: Sequence[int], dtype: torch.dtype, folder: str | Path) -> Tensor:
    """An uninitialised tensor of ``shape`` whose storage is a memory-mapped file in ``folder``.

    Args:
        shape: e.g. ``(N, C, H, W)``.
        dtype: element type.
        folder: where the (immediately unlinked) backing file is created; made if missing.

    Returns:
        The tensor (a plain in-memory tensor when it has no elements).
    """
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tensor-{uuid.uuid4().hex}.bin"
    t = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
    with contextlib.suppress(OSError):  # Windows cannot unlink a mapped file: it stays
        os.unlink(path)
    return t.view(tuple(shape))


def disk_folder(t: Tensor) -> Path | None:
    """The folder of ``t``'s backing file, or None for an in-memory tensor."""
    name = t.untyped_storage().filename
    return Path(name).parent if name else None


def take(images: Tensor, index: Tensor) -> Tensor:
    """``images[index]``; rows of a disk-backed tensor go to a new disk-backed tensor.

    Args:
        images: ``(N, ...)``.
        index: ``(M,)`` int64 row indices.

    Returns:
        ``(M, ...)``, in memory for an in-memory ``images``, else disk-backed in the same folder.
    """
    folder = disk_folder(images)
    if folder is None:
        return images[index]
    out = disk_tensor((len(index), *images.shape[1:]), images.dtype, folder)
    row = max(1, images[0].numel() * images.element_size()) if len(images) else 1
    step = max(1, _CHUNK_BYTES // row)
    for i in range(0, len(index), step):
        out[i : i + step] = images[index[i : i + step]]
    return out


def available_memory() -> int:
    """Bytes of RAM available now (``MemAvailable`` on Linux; total RAM / 2 where unknown)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return 8 * 2**30
