"""Grad-CAM saliency maps of a deployable model, and the sanity check they must pass.

:func:`grad_cam` runs MONAI's :class:`~monai.visualize.GradCAM` (Selvaraju et al., ICCV 2017)
on the deployable model's last feature stage (:func:`feature_stage`), for timm CNNs and MONAI 3D
networks alike; :func:`overlay_png` draws a map over its image (3D: the middle axial slice).

A saliency map is only worth showing if it depends on what the model learned.
:func:`model_randomization_check` is the model-parameter randomisation test of Adebayo et al.,
"Sanity Checks for Saliency Maps" (NeurIPS 2018): maps of the trained model are compared with
maps of a copy whose every weight is re-initialised (:func:`randomized_copy`), by Spearman rank
correlation (:func:`rank_correlation`); a method whose maps barely change (an edge detector,
the image's own intensity) fails.

Caveat: saliency is not localisation. Grad-CAM's resolution is the feature stage's (2x2 for
EfficientNet-Lite0 at 64 px), upsampled linearly to the image.
"""

from __future__ import annotations

__all__ = [
    "RandomizationCheck",
    "display_slice",
    "feature_stage",
    "grad_cam",
    "model_randomization_check",
    "overlay_png",
    "randomized_copy",
    "rank_correlation",
    "scaled_png",
]

import copy
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.visualize import GradCAM
from monai.visualize.class_activation_maps import ModelWithHooks
from torch import Tensor, nn

from medcl.data.transforms import to_model_input
from medcl.errors import ConfigError, DataError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

#: Default ceiling on the trained-vs-randomised rank correlation (see
#: :func:`model_randomization_check`; tests/test_saliency.py records measured values).
MAX_RANDOMIZED_CORRELATION = 0.5


def feature_stage(model: nn.Module, example: Tensor) -> str:
    """The dotted name of ``model``'s last spatial feature stage, where Grad-CAM looks.

    Rule: run ``example`` through ``model`` once with a forward hook on every submodule; among
    the modules whose output is a tensor ``(B, C, *spatial)`` of the input's rank with every
    spatial size > 1, take the one that finishes last. Hooks fire as modules finish, so a stage
    wins over the blocks inside it (``layer4`` of a ResNet, not ``layer4.1.conv2``), modules that
    pool to ``(B, F)`` are skipped, and a stage pooled to ``1 x 1`` (EfficientNet at 28 px)
    gives way to the last stage that still has a map. Adapters applied through forward hooks
    (DynaMMo) are inside the chosen output; with several extractors (DER) or ensemble members,
    the last one is used.

    Args:
        model: a deployable model, ``(B, C, H, W[, D])`` in [-1, 1] -> class scores ``(B, K)``.
        example: ``(B, C, H, W[, D])`` model input (``medcl.data.transforms.to_model_input``).

    Returns:
        The module name, as :meth:`torch.nn.Module.named_modules` spells it.

    Raises:
        ConfigError: no submodule outputs a spatial map at this input size.
    """
    names = {id(m): n for n, m in model.named_modules() if n}
    finished: list[str] = []

    def hook(module: nn.Module, _args: tuple, out: object) -> None:
        if (
            isinstance(out, Tensor)
            and out.ndim == example.ndim
            and out.shape[0] == example.shape[0]
            and all(s > 1 for s in out.shape[2:])
        ):
            finished.append(names[id(module)])

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not finished:
        raise ConfigError(
            f"{type(model).__name__} has no layer with a spatial feature map for inputs of shape "
            f"{tuple(example.shape[1:])}, so Grad-CAM has nothing to show; use a larger "
            "image_size or a backbone that keeps a map of at least 2 x 2."
        )
    return finished[-1]


class _Scores(nn.Module):
    """``[0, 1]`` images -> the deployable model's class scores ``(B, K)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(to_model_input(x))


class _PerSampleClass(ModelWithHooks):
    """MONAI's hooks with one ``class_idx`` per sample (MONAI's ``logits[:, idx]`` would, for a
    batch of indices, sum every sample's class into every score)."""

    def __init__(self, net: nn.Module, layer: str) -> None:
        super().__init__(net, layer, register_forward=True, register_backward=True)

    def class_score(self, logits: Tensor, class_idx) -> Tensor:
        idx = torch.as_tensor(class_idx, device=logits.device).long().reshape(-1)
        return logits.gather(1, idx.expand(len(logits)).view(-1, 1))[:, 0]


def _normalise(maps: Tensor) -> Tensor:
    """Each map min-max scaled to [0, 1] (high: salient; a constant map -> 0).

    MONAI's default post-processing maps (min, max) to (1, 0), i.e. flips the ranking.
    """
    flat = maps.detach().flatten(1).float()
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return out.view_as(maps)


def grad_cam(
    model: nn.Module,
    images: Tensor,
    *,
    class_idx: int | Sequence[int] | Tensor | None = None,
    layer: str | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Grad-CAM maps of a deployable model, one per image, at the image's size.

    The maps come from a copy of ``model`` (MONAI keeps its hooks on the module it wraps and
    turns in-place activations off; the copy's parameters require gradients so frozen backbones
    still pass them), so ``model`` itself is left unchanged.

    Args:
        model: a deployable model, ``(B, C, H, W[, D])`` in [-1, 1] -> class scores ``(B, K)``.
        images: ``(N, C, H, W[, D])`` uint8, or float in [0, 1].
        class_idx: the class explained: ``None`` the predicted one, an int for every image, or
            ``(N,)`` one per image (e.g. the true class).
        layer: the module to look at (default :func:`feature_stage`).
        batch_size: images per forward/backward pass.

    Returns:
        float32 ``(N, H, W[, D])`` in [0, 1].

    Raises:
        ConfigError: no spatial feature stage, or an unknown ``layer``.
        DataError: ``images`` not ``(N, C, H, W[, D])``, or ``class_idx`` of another length.
    """
    if images.ndim not in (4, 5):
        raise DataError(
            f"grad_cam needs (N, C, H, W[, D]) images; got shape {tuple(images.shape)}."
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    net = _Scores(copy.deepcopy(model)).to(device).eval()
    if layer is None:
        layer = feature_stage(net.model, to_model_input(x[:1].to(device)))
    names = [n for n, _ in net.model.named_modules()]
    if layer not in names:
        raise ConfigError(f"layer {layer!r} is not a module of {type(model).__name__}.")
    for p in net.parameters():
        p.requires_grad_(True)
    for m in net.modules():  # in-place ops on a hooked output break its backward hook
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    hooked = _PerSampleClass(net, f"model.{layer}")
    cam = GradCAM(hooked, target_layers=f"model.{layer}", postprocessing=_normalise)
    targets = None if class_idx is None else torch.as_tensor(class_idx, dtype=torch.long)
    if targets is not None:
        targets = targets.reshape(-1).expand(len(x)) if targets.numel() == 1 else targets
        if targets.shape != (len(x),):
            raise DataError(
                f"class_idx must be an int or hold one class per image ({len(x)}); got "
                f"{tuple(targets.shape)}."
            )
    out = []
    with torch.enable_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device)
            cb = None if targets is None else targets[i : i + batch_size].to(device)
            out.append(cam(xb, class_idx=cb)[:, 0].detach().float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, *x.shape[2:]), np.float32)


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every parameter re-initialised (full-model randomisation).

    Adebayo et al., "Sanity Checks for Saliency Maps" (NeurIPS 2018), section 3.1: a module with
    ``reset_parameters()`` (convolutions, linear layers, norms: also their running statistics)
    is reset by it; any other parameter is drawn from ``N(0, 0.02^2)``. Buffers such as the
    backbone's input normalisation are kept. The global RNG is left as it was.

    Args:
        model: the trained model (unchanged).
        seed: seed of the new weights.

    Returns:
        The randomised copy, in eval mode.
    """
    out = copy.deepcopy(model)
    done: set[int] = set()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in out.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
                done.update(id(p) for p in m.parameters(recurse=False))
        for p in out.parameters():
            if id(p) not in done:
                p.normal_(0.0, 0.02)
    return out.eval()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Spearman rank correlation between paired maps.

    Args:
        a: ``(N, *spatial)`` maps.
        b: ``(N, *spatial)`` maps of the same images.

    Returns:
        The mean over the ``N`` pairs. A pair with one constant map counts as 0 (no monotone
        relation), two constant maps as 1.
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim < 2 or len(a) == 0:
        raise DataError(
            f"rank_correlation needs two (N, *spatial) arrays; got {a.shape}, {b.shape}."
        )
    values = []
    for x, y in zip(a.reshape(len(a), -1), b.reshape(len(b), -1), strict=True):
        flat_x, flat_y = np.ptp(x) == 0, np.ptp(y) == 0
        if flat_x or flat_y:
            values.append(1.0 if flat_x and flat_y else 0.0)
        else:
            values.append(float(spearmanr(x, y).statistic))
    return float(np.mean(values))


@dataclass(frozen=True)
class RandomizationCheck:
    """Outcome of :func:`model_randomization_check`.

    Attributes:
        correlation: mean Spearman rank correlation, trained vs randomised models.
        per_copy: the correlation with each randomised copy.
        threshold: the ceiling it was compared with.
        passed: ``correlation < threshold`` (the maps depend on the learned weights).
    """

    correlation: float
    per_copy: tuple[float, ...]
    threshold: float
    passed: bool


def model_randomization_check(
    saliency: Callable[[nn.Module, Tensor], np.ndarray],
    model: nn.Module,
    images: Tensor,
    *,
    seed: int = 0,
    copies: int = 3,
    threshold: float = MAX_RANDOMIZED_CORRELATION,
) -> RandomizationCheck:
    """Adebayo et al.'s model-parameter randomisation test of a saliency method.

    The maps of ``model`` are compared with those of ``copies`` randomised copies (seeds
    ``seed, seed + 1, ...``) and the rank correlations averaged: with a coarse feature map
    (4 x 4 cells) one random copy's correlation swings by about +-0.5 with its seed, the mean of
    three much less.

    Args:
        saliency: ``saliency(model, images) -> (N, *spatial)`` maps (e.g. :func:`grad_cam`).
        model: the trained model.
        images: ``(N, C, H, W[, D])`` images the maps explain.
        seed: seed of the first :func:`randomized_copy`.
        copies: randomised copies compared with.
        threshold: the check passes when the mean rank correlation is below it.

    Returns:
        The :class:`RandomizationCheck`.
    """
    if copies < 1:
        raise ConfigError(f"copies must be >= 1; got {copies}.")
    trained = saliency(model, images)
    rhos = tuple(
        rank_correlation(trained, saliency(randomized_copy(model, seed + i), images))
        for i in range(copies)
    )
    rho = float(np.mean(rhos))
    return RandomizationCheck(rho, rhos, threshold, bool(rho < threshold))


def display_slice(x: np.ndarray | Tensor, *, spatial_dims: int) -> np.ndarray:
    """What a 2D figure shows of ``x``: itself (2D) or its middle axial slice (3D).

    Args:
        x: ``(..., H, W)`` or ``(..., H, W, D)`` (a map, or an image with channels first).
        spatial_dims: 2 or 3.

    Returns:
        ``(..., H, W)``.
    """
    x = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return x[..., x.shape[-1] // 2] if spatial_dims == 3 else x


def overlay_png(
    image: np.ndarray | Tensor,
    cam: np.ndarray,
    *,
    size: int = 96,
    alpha: float = 0.45,
    cmap: str = "jet",
) -> bytes:
    """PNG of ``cam`` as a heat map over ``image``, ``size`` px on its long side.

    Args:
        image: ``(C, H, W)`` or ``(C, H, W, D)``, uint8 or float in [0, 1]; ``C`` 1 (grey) or 3
            (RGB; other counts show channel 0).
        cam: ``(H, W)`` or ``(H, W, D)`` in [0, 1] (:func:`grad_cam`); 3D: the middle slice.
        size: output size of the long side, px.
        alpha: opacity of the heat map.
        cmap: a matplotlib colormap name.

    Returns:
        Encoded PNG (RGB).
    """
    from matplotlib import colormaps
    from PIL import Image

    img = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    dims = img.ndim - 1
    if dims not in (2, 3) or np.asarray(cam).ndim != dims or img.shape[1:] != np.shape(cam):
        raise DataError(
            f"overlay_png needs an image (C, H, W[, D]) and a map of its spatial shape; got "
            f"{img.shape} and {np.shape(cam)}."
        )
    img, heat = display_slice(img, spatial_dims=dims), display_slice(cam, spatial_dims=dims)
    img = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
    rgb = np.moveaxis(img, 0, -1) if img.shape[0] == 3 else np.repeat(img[0, ..., None], 3, -1)
    colour = colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3]
    blend = (1 - alpha) * np.clip(rgb, 0.0, 1.0) + alpha * colour
    return scaled_png(Image.fromarray((blend * 255).round().astype(np.uint8)), size)


def scaled_png(image: PILImage, size: int) -> bytes:
    """``image`` with its longer side scaled to ``size`` px (nearest up, Lanczos down), as PNG."""
    from PIL import Image

    scale = size / max(image.size)
    image = image.resize(
        (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
        Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS,
    )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
