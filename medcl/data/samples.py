"""Sample sets: the one container every source produces and the trainer consumes.

Images are kept preprocessed (deterministic prefix already applied) as one tensor, so a training
batch is a single index into it: no per-sample Python, PIL or collate on the hot path. For a
cohort larger than RAM the tensor is disk-backed (:mod:`medcl.data.disk`, a memory-mapped file);
selecting and concatenating rows then keeps the result on disk too.
"""

from __future__ import annotations

__all__ = ["META_COLUMNS", "SampleSet", "make_meta"]

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from medcl.data.disk import disk_folder, disk_tensor, take
from medcl.errors import DataError

#: Metadata columns every sample carries (more are allowed, e.g. from a CSV manifest).
META_COLUMNS = ("dataset", "site", "patient_id", "index", "split")


@dataclass(frozen=True)
class SampleSet:
    """A split of images with labels and per-sample metadata.

    Attributes:
        images: ``(N, C, H, W)`` or ``(N, C, H, W, D)``; ``uint8`` (scaled by 1/255 at batch time)
            or floating point (already scaled, typically to [0, 1]).
        labels: ``(N,)`` int64 global class ids.
        meta: ``N`` rows with at least :data:`META_COLUMNS` (``patient_id`` may be empty).
    """

    images: Tensor
    labels: Tensor
    meta: pd.DataFrame

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim not in (4, 5):
            raise DataError(
                f"SampleSet.images must be (N, C, H, W) or (N, C, H, W, D); got shape "
                f"{tuple(self.images.shape)}. Add a channel axis with images[:, None]."
            )
        if self.labels.shape != (n,) or self.labels.dtype != torch.int64:
            raise DataError(
                f"SampleSet.labels must be an int64 tensor of shape ({n},); got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}."
            )
        if len(self.meta) != n:
            raise DataError(
                f"SampleSet.meta must have {n} rows (one per image); got {len(self.meta)}."
            )
        missing = [c for c in META_COLUMNS if c not in self.meta.columns]
        if missing:
            raise DataError(
                f"SampleSet.meta is missing columns {missing}; expected {list(META_COLUMNS)}."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.images.ndim - 2

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def subset(self, index: Tensor | np.ndarray | Sequence[int]) -> SampleSet:
        """Rows ``index`` (a view-free copy of the selected samples, metadata re-indexed)."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return SampleSet(
            images=take(self.images, idx),
            labels=self.labels[idx],
            meta=self.meta.iloc[idx.numpy()].reset_index(drop=True),
        )

    def relabel(self, mapping: dict[int, int]) -> SampleSet:
        """Map every label through ``mapping`` (local -> global ids); unmapped labels are an error."""
        lut = torch.full((int(self.labels.max()) + 1 if len(self) else 1,), -1, dtype=torch.long)
        for src, dst in mapping.items():
            if src < len(lut):
                lut[src] = dst
        new = lut[self.labels] if len(self) else self.labels
        if (new < 0).any():
            bad = sorted(set(self.labels[new < 0].tolist()))
            raise DataError(f"labels {bad} have no entry in the label map {mapping}.")
        return SampleSet(self.images, new, self.meta)

    def to_dtype(self, dtype: torch.dtype) -> SampleSet:
        """Convert images between the two conventions: uint8 in [0, 255] and float in [0, 1]."""
        x = self.images
        if x.dtype == dtype:
            return self
        if dtype == torch.uint8:
            x = x.float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        elif x.dtype == torch.uint8:
            x = x.to(dtype).div_(255.0)
        else:
            x = x.to(dtype)
        return SampleSet(x, self.labels, self.meta)

    def with_meta(self, **columns: object) -> SampleSet:
        """A copy whose metadata has ``columns`` set (scalars broadcast), e.g. ``site="A"``."""
        meta = self.meta.copy()
        for k, v in columns.items():
            meta[k] = v
        return SampleSet(self.images, self.labels, meta)

    @staticmethod
    def concat(sets: Sequence[SampleSet]) -> SampleSet:
        """Stack sample sets with the same image shape and dtype."""
        if not sets:
            raise DataError("SampleSet.concat needs at least one sample set.")
        shapes = {tuple(s.images.shape[1:]) for s in sets}
        dtypes = {s.images.dtype for s in sets}
        if len(shapes) > 1 or len(dtypes) > 1:
            raise DataError(
                f"cannot concatenate sample sets with image shapes {sorted(shapes)} and dtypes "
                f"{sorted(map(str, dtypes))}; resize/convert them to one shape first "
                "(scenario option image_size / channels)."
            )
        folder = next((f for s in sets if (f := disk_folder(s.images)) is not None), None)
        if folder is None:
            images = torch.cat([s.images for s in sets])
        else:  # a disk-backed part: the result stays on disk, filled set by set
            images = disk_tensor((sum(map(len, sets)), *shapes.pop()), dtypes.pop(), folder)
            start = 0
            for s in sets:
                images[start : start + len(s)] = s.images
                start += len(s)
        return SampleSet(
            images=images,
            labels=torch.cat([s.labels for s in sets]),
            meta=pd.concat([s.meta for s in sets], ignore_index=True),
        )

    def class_counts(self) -> dict[int, int]:
        """``{class id: number of samples}``, sorted by class id."""
        ids, counts = torch.unique(self.labels, return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts, strict=True)}


def make_meta(
    n: int,
    *,
    dataset: str,
    split: str,
    site: str = "",
    patient_id: Sequence[str] | None = None,
    index: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Metadata frame with the standard columns for ``n`` samples."""
    return pd.DataFrame(
        {
            "dataset": [dataset] * n,
            "site": [site] * n,
            "patient_id": list(patient_id) if patient_id is not None else [""] * n,
            "index": list(index) if index is not None else list(range(n)),
            "split": [split] * n,
        }
    )
