"""Batched tensor transforms for the training hot path, composable with MONAI's ``Compose``.

Sources apply their deterministic prefix (load, channel-first, intensity scaling, resize) once,
when the sample set is built (MONAI ``LoadImaged``/``CacheDataset`` for files). What runs per
batch is only what must: conversion to the model's input range and random augmentation, each a
small transform over a whole batch ``(B, C, H, W[, D])`` so two CPU cores stay busy training.

Augmentation runs on the batch's device (the trainer moves the raw batch first): the random
parameters are drawn per sample from each transform's seeded NumPy state (``B`` numbers, so a
CPU run gives exactly the same batches as before and a GPU run draws the same parameters), sent
to the device as small tensors, and masks, affine matrices and the resampling are built there.

Input convention (recorded in exported bundles): images are ``uint8`` in [0, 255] or float in
[0, 1]; the model sees ``(x01 - 0.5) / 0.5`` in [-1, 1] (MedMNIST's own normalisation).
"""

from __future__ import annotations

__all__ = [
    "INPUT_MEAN",
    "INPUT_STD",
    "BatchRandAffine",
    "BatchRandFlip",
    "BatchRandIntensity",
    "ToModelInput",
    "build_batch_augment",
    "to_model_input",
]

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, RandomizableTransform, Transform
from torch import Tensor

INPUT_MEAN = 0.5
INPUT_STD = 0.5


def to_model_input(x: Tensor) -> Tensor:
    """Scale a batch to the model's input range.

    Args:
        x: ``(B, C, H, W[, D])`` uint8 in [0, 255] or float in [0, 1].

    Returns:
        float32 ``(B, C, H, W[, D])`` in [-1, 1].
    """
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return (x - INPUT_MEAN) / INPUT_STD


def _param(values: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """Per-sample random parameters drawn on the host, as a tensor on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(values))
    return t.to(device=device, dtype=dtype or t.dtype, non_blocking=True)


class ToModelInput(Transform):
    """Transform form of :func:`to_model_input` (for ``Compose`` pipelines)."""

    def __call__(self, x: Tensor) -> Tensor:
        return to_model_input(x)


class BatchRandFlip(RandomizableTransform):
    """Flip each sample of a batch along ``spatial_axis`` with probability ``prob``.

    Args:
        prob: per-sample flip probability.
        spatial_axis: spatial axis (0 = H, 1 = W, 2 = D).

    Shapes: ``(B, C, *spatial)`` -> same.
    """

    def __init__(self, prob: float = 0.5, spatial_axis: int = 1) -> None:
        RandomizableTransform.__init__(self, prob)
        self.spatial_axis = spatial_axis

    def __call__(self, x: Tensor) -> Tensor:
        on = self.R.random_sample(x.shape[0]) < self.prob  # (B,) drawn on the host: no sync
        if not on.any():
            return x
        mask = _param(on, x.device).view((-1,) + (1,) * (x.ndim - 1))  # (B, 1, ...)
        # a select, not boolean indexing: no data-dependent shape, so no device sync
        return torch.where(mask, torch.flip(x, dims=(2 + self.spatial_axis,)), x)


class BatchRandAffine(RandomizableTransform):
    """Random rotation, scaling and translation, one affine matrix per sample (2D or 3D).

    Args:
        prob: per-sample probability of being transformed (others get the identity).
        rotate: max absolute rotation in radians (about the in-plane axis for 3D).
        scale: max relative zoom (e.g. 0.1 -> factor in [0.9, 1.1]).
        translate: max shift as a fraction of the image side.

    Shapes: float ``(B, C, *spatial)`` -> same; bilinear, zero (i.e. -1 after scaling) padding is
    avoided by ``padding_mode="border"``.
    """

    def __init__(
        self, prob: float = 0.8, rotate: float = 0.17, scale: float = 0.1, translate: float = 0.05
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.rotate, self.scale, self.translate = rotate, scale, translate

    def __call__(self, x: Tensor) -> Tensor:
        b, nd = x.shape[0], x.ndim - 2
        on = self.R.random_sample(b) < self.prob
        ang = self.R.uniform(-self.rotate, self.rotate, b) * on
        zoom = 1.0 + self.R.uniform(-self.scale, self.scale, b) * on
        shift = self.R.uniform(-self.translate, self.translate, (b, nd)) * on[:, None] * 2
        # per-sample parameters (B numbers each) go to the device; the (B, nd, nd + 1) matrices
        # are assembled there (float64, as NumPy did, then cast: CPU results are unchanged)
        cos, sin = _param(np.cos(ang) / zoom, x.device), _param(np.sin(ang) / zoom, x.device)
        theta = torch.zeros((b, nd, nd + 1), dtype=torch.float64, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        if nd == 3:
            theta[:, 2, 2] = _param(1.0 / zoom, x.device)
        theta[:, :, nd] = _param(shift, x.device)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class BatchRandIntensity(RandomizableTransform):
    """Random per-sample contrast and brightness jitter (in model-input units).

    Args:
        prob: per-sample probability.
        contrast: max relative contrast change.
        brightness: max additive shift.

    Shapes: float ``(B, C, *spatial)`` -> same.
    """

    def __init__(self, prob: float = 0.5, contrast: float = 0.2, brightness: float = 0.1) -> None:
        RandomizableTransform.__init__(self, prob)
        self.contrast, self.brightness = contrast, brightness

    def __call__(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        on = self.R.random_sample(b) < self.prob
        c = 1.0 + self.R.uniform(-self.contrast, self.contrast, b) * on
        s = self.R.uniform(-self.brightness, self.brightness, b) * on
        view = (b,) + (1,) * (x.ndim - 1)
        return x * _param(c, x.device, x.dtype).view(view) + _param(s, x.device, x.dtype).view(view)


def build_batch_augment(
    spatial_dims: int,
    level: Literal["none", "light", "standard"] = "light",
    *,
    seed: int = 0,
    flip_axes: Sequence[int] = (1,),
) -> Compose:
    """The per-batch training pipeline: model-input scaling, then random augmentation.

    Args:
        spatial_dims: 2 or 3.
        level: ``"none"`` (scaling only), ``"light"`` (flips + small affine) or ``"standard"``
            (also intensity jitter).
        seed: seeds every random transform (per-object random state).
        flip_axes: spatial axes to flip randomly (W by default; anatomy is rarely up/down symmetric).

    Returns:
        A MONAI ``Compose`` mapping uint8/float ``(B, C, *spatial)`` to float32 model input.
    """
    ts: list[Transform] = [ToModelInput()]
    if level != "none":
        ts += [BatchRandFlip(0.5, a) for a in flip_axes if a < spatial_dims]
        ts.append(BatchRandAffine(prob=0.8))
    if level == "standard":
        ts.append(BatchRandIntensity())
    pipeline = Compose(ts)
    pipeline.set_random_state(seed=seed)
    return pipeline
