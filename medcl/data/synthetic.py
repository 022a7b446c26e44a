"""Seeded synthetic medical-looking images whose classes are learnable through structure.

Every image is a textured body-like ellipse (ellipsoid in 3D) holding a lesion-like structure.
The class is encoded twice: by the lesion's *morphology* (nodule, cyst with a dark core, streak,
dot cluster; large and paired variants) - which translation-invariant CNNs pick up - and by its
*location* (angle around the body centre) - which even a linear model on raw pixels picks up.
Position, size, orientation, intensity jitter, a class-independent distractor blob, smooth
texture and noise keep it from being trivial: a 3-layer CNN reaches ~97% on 3 classes at 28 px
after about ten epochs of 900 images; a label-permuted copy stays at chance. This replaces random
noise wherever a test needs data with volume and real class structure.

Everything is vectorised over the batch (numpy/torch, no per-pixel Python) and determined by
``seed``; each split has its own random stream, so changing ``n_test`` leaves ``train`` alone.
"""

from __future__ import annotations

__all__ = ["make_synthetic", "synthetic_class_names"]

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from medcl.data.samples import SampleSet, make_meta
from medcl.errors import ConfigError

SPLITS = ("train", "val", "test")
FAMILIES = ("nodule", "cyst", "streak", "cluster")  # disk, ring, elongated rod, three dots
VARIANTS = ("", "large ", "paired ")
MAX_CLASSES = len(FAMILIES) * len(VARIANTS)


def synthetic_class_names(num_classes: int) -> tuple[str, ...]:
    """What class ``k`` looks like, e.g. ``("nodule", "cyst", "streak")`` or ``"large cyst"``."""
    return tuple(f"{VARIANTS[k // 4]}{FAMILIES[k % 4]}" for k in range(num_classes))


def _soft(d: np.ndarray, edge: float | np.ndarray) -> np.ndarray:
    """Soft indicator of ``d < 0`` with an edge of width ``edge`` (anti-aliased shapes)."""
    return 1.0 / (1.0 + np.exp(np.clip(d / edge, -30, 30)))


def _smooth_noise(
    rng: np.random.Generator, n: int, size: int, dims: int, coarse: int
) -> np.ndarray:
    """``(n, *[size] * dims)`` zero-mean, spatially smooth noise of unit-ish amplitude."""
    low = torch.from_numpy(rng.standard_normal((n, 1) + (coarse,) * dims).astype(np.float32))
    mode = "bicubic" if dims == 2 else "trilinear"
    return F.interpolate(low, size=(size,) * dims, mode=mode, align_corners=False)[:, 0].numpy()


def _unit(rng: np.random.Generator, n: int, dims: int) -> np.ndarray:
    v = rng.standard_normal((n, dims)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _lesion(
    diff: np.ndarray, fam: np.ndarray, r: np.ndarray, axis: np.ndarray, spread: list[np.ndarray]
) -> np.ndarray:
    """Lesion masks ``(N, *S)`` (about [0, 1]); ``diff`` is ``(N, dims, *S)``, voxel - centre.

    ``fam`` ``(N,)``: 0 nodule (bright disk), 1 cyst (bright rim, dark core), 2 streak (rod along
    ``axis``), 3 cluster (three dots offset by ``spread``); ``r`` ``(N,)`` radius. Each family
    is computed only for its own samples.
    """
    out = np.empty(diff.shape[:1] + diff.shape[2:], np.float32)
    for f in range(len(FAMILIES)):
        i = np.flatnonzero(fam == f)
        if not len(i):
            continue
        d, e = diff[i], (len(i), diff.shape[1]) + (1,) * (diff.ndim - 2)
        rr = r[i].reshape(e[:1] + e[2:])  # (n_f, 1, ...) against (n_f, *S)
        if f == 2:
            along = (d * axis[i].reshape(e)).sum(1)
            across = np.sqrt(np.maximum((d**2).sum(1) - along**2, 0))
            out[i] = _soft(np.sqrt((along / 2.2) ** 2 + (across / 0.4) ** 2) - rr, 0.02)
        elif f == 3:
            dots = [np.sqrt(((d - o[i].reshape(e) * rr[:, None]) ** 2).sum(1)) for o in spread]
            out[i] = np.max([_soft(x - 0.45 * rr, 0.015) for x in dots], axis=0)
        else:  # nodule; the cyst subtracts a dark core
            dist = np.sqrt((d**2).sum(1))
            out[i] = _soft(dist - rr, 0.02) - f * 1.6 * _soft(dist - 0.6 * rr, 0.02)
    return out


def _render(
    rng: np.random.Generator,
    labels: np.ndarray,
    *,
    k: int,
    dims: int,
    size: int,
    noise: float,
    site_shift: float,
    shift_dir: np.ndarray,
) -> np.ndarray:
    """Float images ``(N, *[size] * dims)`` in [0, 1] for ``labels``."""
    n = len(labels)
    vec = (n, dims) + (1,) * dims  # broadcast shape of per-sample vectors over (N, dims, *S)

    def u(lo: float, hi: float, *shape: int) -> np.ndarray:  # per-sample uniform draws
        return rng.uniform(lo, hi, (n, *shape)).astype(np.float32)

    def per(a: np.ndarray) -> np.ndarray:  # (N,) -> (N, 1, ...) against (N, *S)
        return np.asarray(a, np.float32).reshape((n,) + (1,) * dims)

    fam, var = labels % len(FAMILIES), labels // len(FAMILIES)
    # Per-sample parameters, drawn up front: body, lesion place/size/shape, distractor, intensity.
    centre, axes = u(-0.08, 0.08, dims), u(0.62, 0.82, dims)
    theta = 2 * np.pi * labels / k + u(-0.35, 0.35) * np.pi / k  # class-dependent location
    direction = np.zeros((n, dims), np.float32)
    direction[:, 0], direction[:, 1] = np.cos(theta), np.sin(theta)
    if dims == 3:
        direction[:, 2] = u(-0.3, 0.3)
    at = centre + direction * axes * u(0.35, 0.5)[:, None]
    twin = at + _unit(rng, n, dims) * 0.28  # second lesion of "paired" classes
    r = u(0.15, 0.2) * np.where(var == 1, 1.45, 1.0).astype(np.float32)
    axis, spread = _unit(rng, n, dims), [_unit(rng, n, dims) for _ in range(3)]
    distract, d_on, d_r = centre + u(-0.4, 0.4, dims) * axes, rng.random(n) < 0.6, u(0.05, 0.09)
    tissue, contrast, d_contrast = u(0.3, 0.45), u(0.4, 0.55), u(0.1, 0.2)
    texture = 0.05 * _smooth_noise(rng, n, size, dims, 5)
    texture += 0.02 * _smooth_noise(rng, n, size, dims, 11)

    grid = np.linspace(-1, 1, size, dtype=np.float32)
    coords = np.stack(np.meshgrid(*([grid] * dims), indexing="ij"))[None]  # (1, dims, *S)
    body = _soft(
        np.sqrt((((coords - centre.reshape(vec)) / axes.reshape(vec)) ** 2).sum(1)) - 1, 0.04
    )
    shape = _lesion(coords - at.reshape(vec), fam, r, axis, spread)  # (N, *S)
    paired = np.flatnonzero(var == 2)
    if len(paired):
        diff = coords - twin[paired].reshape((len(paired), *vec[1:]))
        second = _lesion(diff, fam[paired], r[paired], axis[paired], [s[paired] for s in spread])
        shape[paired] = np.maximum(shape[paired], second)
    d_dist = np.sqrt(((coords - distract.reshape(vec)) ** 2).sum(1))
    blob = per(d_on) * _soft(d_dist - per(d_r), 0.02)
    img = body * (per(tissue) + texture + per(contrast) * shape + per(d_contrast) * blob)
    img += rng.standard_normal(img.shape).astype(np.float32) * noise
    if site_shift:  # a scanner-like appearance change: gamma, contrast, offset, bias field
        bias = (coords[0] * shift_dir.reshape((dims,) + (1,) * dims)).sum(0)  # (*S)
        img = np.clip(img, 0, 1) ** (1 + 0.8 * site_shift)
        img = img * (1 - 0.3 * site_shift) + 0.12 * site_shift + 0.15 * site_shift * bias
    return np.clip(img, 0.0, 1.0)


def make_synthetic(
    *,
    num_classes: int = 3,
    spatial_dims: int = 2,
    image_size: int = 28,
    channels: int = 1,
    n_train: int = 300,
    n_val: int = 60,
    n_test: int = 120,
    seed: int = 0,
    noise: float = 0.05,
    site_shift: float = 0.0,
    site: str = "",
    dtype: Literal["uint8", "float32"] = "uint8",
) -> dict[str, SampleSet]:
    """Generate train/val/test splits of structured synthetic images.

    Args:
        num_classes: 2..12; class ``k`` has morphology ``FAMILIES[k % 4]`` (variant
            ``VARIANTS[k // 4]``) at angle ``360 k / num_classes`` degrees around the body centre
            (names: :func:`synthetic_class_names`).
        spatial_dims: 2 (images) or 3 (volumes).
        image_size: side length (>= 16).
        channels: 1, or 3 (grey repeated with a mild tint).
        n_train, n_val, n_test: samples per split (classes balanced, order shuffled).
        seed: fixes everything; each split draws from its own stream.
        noise: standard deviation of additive Gaussian noise (intensity units, image in [0, 1]).
        site_shift: strength in [0, 1] of a site/scanner appearance change (gamma, contrast,
            offset, bias field with a seeded direction); 0 means none.
        site: value of the ``site`` meta column.
        dtype: ``"uint8"`` (0..255) or ``"float32"`` ([0, 1]).

    Returns:
        ``{"train", "val", "test"}`` -> :class:`SampleSet` with images ``(N, C, S, S)`` or
        ``(N, C, S, S, S)``, labels int64 ``(N,)`` in ``0..num_classes-1``, meta dataset
        ``"synthetic"``.

    Raises:
        ConfigError: an option out of range.
    """
    checks = {
        "num_classes": (num_classes, 2 <= num_classes <= MAX_CLASSES, f"in 2..{MAX_CLASSES}"),
        "spatial_dims": (spatial_dims, spatial_dims in (2, 3), "2 or 3"),
        "image_size": (image_size, image_size >= 16, "an int >= 16"),
        "channels": (channels, channels in (1, 3), "1 or 3"),
        "noise": (noise, noise >= 0, "a number >= 0"),
        "site_shift": (site_shift, 0 <= site_shift <= 1, "a number in [0, 1]"),
        "dtype": (dtype, dtype in ("uint8", "float32"), "'uint8' or 'float32'"),
    }
    for key, (value, ok, rule) in checks.items():
        if not ok:
            raise ConfigError(f"make_synthetic: {key} must be {rule}; got {value!r}.")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if any(c < 0 for c in counts.values()):
        raise ConfigError(f"make_synthetic: split sizes must be >= 0; got {counts}.")
    shift_dir = np.random.default_rng([seed, 99]).standard_normal(spatial_dims).astype(np.float32)
    shift_dir /= np.linalg.norm(shift_dir)
    chunk = max(1, 2**21 // image_size**spatial_dims)  # bounds memory; fixed, so deterministic
    tint = torch.tensor([1.0, 0.85, 0.7] if channels == 3 else [1.0])
    out = {}
    for i, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, i])
        n = counts[split]
        labels = rng.permutation(np.arange(n) % num_classes)
        parts = [
            _render(
                rng,
                labels[s : s + chunk],
                k=num_classes,
                dims=spatial_dims,
                size=image_size,
                noise=noise,
                site_shift=site_shift,
                shift_dir=shift_dir,
            )
            for s in range(0, n, chunk)
        ]
        arr = np.concatenate(parts) if parts else np.zeros((0,) + (image_size,) * spatial_dims)
        x = torch.from_numpy(arr.astype(np.float32)).unsqueeze(1)  # (N, 1, *S)
        x = x * tint.view((1, channels) + (1,) * spatial_dims)  # (N, C, *S)
        if dtype == "uint8":
            x = x.mul(255).round_().to(torch.uint8)
        meta = make_meta(n, dataset="synthetic", split=split, site=site)
        out[split] = SampleSet(x, torch.from_numpy(labels.astype(np.int64)), meta)
    return out
