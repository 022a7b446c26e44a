"""Residual convolutional adapters at the input of each backbone stage (2D and 3D).

The adapter is the one of DynaMMo's reference code (Qazi et al., MIUA 2024) and of ACL
(Zhang et al., MICCAI 2023): ``conv k×k → BN → ReLU → transposed conv k×k → BN → ReLU``, scaled
by a learnable ``alpha`` initialised small (0.02), and added to the stage input::

    x_stage = x + alpha * g(x)

Both convolutions are padded by ``k // 2``, so the output has the input's shape at any size
(the reference pads neither, the transposed convolution undoing the shrink; that fails on stage
inputs smaller than the kernel, e.g. 2×2 in a ResNet at 28 px without ``small_input``). The
convolutions have no bias: a BatchNorm follows each. An :class:`AdapterSet` holds one adapter per stage of a
:class:`~medcl.models.backbones.Backbone` and attaches itself through forward *pre*-hooks on
``Backbone.stages()`` for the duration of a forward pass (:meth:`AdapterSet.attached`), so no
timm/MONAI code is copied and several sets can share one frozen backbone (ACL runs it once per
set, DynaMMo once with the merged set).

Between the two convolutions the reference keeps the stage's channels (no bottleneck); an
:class:`AdapterSet` built with ``width < 1`` narrows them to ``round(width * channels)``, so
each adapter has about ``width`` times the parameters (the strategies' ``adapter_width``).
"""

from __future__ import annotations

__all__ = [
    "AdapterSet",
    "ConvAdapter",
    "adapter_drift",
    "adapter_hidden",
    "forward_with_adapters",
]

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from medcl.errors import ConfigError
from medcl.models.backbones import Backbone, Stage

_CONV = {
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d),
}


class ConvAdapter(nn.Module):
    """``alpha * ReLU(BN(convT(ReLU(BN(conv(x))))))``: the residual branch (not added to ``x``).

    Args:
        channels: input (= output) channels.
        spatial_dims: 2 or 3.
        hidden: channels between the two convolutions (default: ``channels``, as the reference).
        kernel_size: odd size of both kernels (padded by ``kernel_size // 2``).
        alpha_init: initial value of the learnable scale (small: the adapter starts near identity).

    Shapes: ``(B, C, H, W[, D])`` -> same.
    """

    def __init__(
        self,
        channels: int,
        *,
        spatial_dims: int = 2,
        hidden: int | None = None,
        kernel_size: int = 3,
        alpha_init: float = 0.02,
    ) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise ConfigError(f"ConvAdapter supports spatial_dims 2 or 3; got {spatial_dims}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(
                f"ConvAdapter kernel_size must be odd and >= 1 (so padding keeps the "
                f"shape); got {kernel_size}."
            )
        conv, convt, bn = _CONV[spatial_dims]
        hidden = hidden or channels
        pad = kernel_size // 2
        self.conv = conv(channels, hidden, kernel_size, padding=pad, bias=False)
        self.bn1 = bn(hidden)
        self.convt = convt(hidden, channels, kernel_size, padding=pad, bias=False)
        self.bn2 = bn(channels)
        self.act = nn.ReLU()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.bn1(self.conv(x)))  # (B, hidden, H, W[, D])
        return self.alpha * self.act(self.bn2(self.convt(h)))  # (B, C, H, W[, D])


def adapter_hidden(channels: int, width: float) -> int:
    """Hidden channels of an adapter on ``channels`` at ``width``: ``max(1, round(width * c))``.

    Raises:
        ConfigError: ``width`` is not > 0.
    """
    if not width > 0:  # also refuses NaN
        raise ConfigError(
            f"adapter width must be > 0 (a share of the stage's channels; 1.0 is the "
            f"reference); got {width}."
        )
    return max(1, round(width * channels))


def _key(stage_name: str) -> str:
    return stage_name.replace(".", "_")  # ModuleDict keys may not contain dots


class AdapterSet(nn.Module):
    """One :class:`ConvAdapter` per backbone stage, attachable to a backbone via pre-hooks.

    Args:
        stages: the backbone's stages (``Backbone.stages()``): names and input channels.
        spatial_dims: 2 or 3.
        width: each adapter's hidden channels as a share of its stage's input channels,
            ``max(1, round(width * channels))`` (:func:`adapter_hidden`); 1.0 is the reference
            (no bottleneck), and builds exactly the modules it always did.
        **adapter_kwargs: forwarded to :class:`ConvAdapter` (``alpha_init``, ``kernel_size``...).

    Raises:
        ConfigError: no stages, or ``width`` not > 0.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        spatial_dims: int = 2,
        width: float = 1.0,
        **adapter_kwargs: Any,
    ) -> None:
        super().__init__()
        if not stages:
            raise ConfigError(
                "AdapterSet needs at least one backbone stage; the backbone reports "
                "none (Backbone.stages() is empty)."
            )
        self.stage_names = [s.name for s in stages]
        self.adapters = nn.ModuleDict(
            {
                _key(s.name): ConvAdapter(
                    s.in_channels,
                    spatial_dims=spatial_dims,
                    hidden=adapter_hidden(s.in_channels, width),
                    **adapter_kwargs,
                )
                for s in stages
            }
        )

    @classmethod
    def for_backbone(cls, backbone: Backbone, **adapter_kwargs: Any) -> AdapterSet:
        """An adapter set matching ``backbone``'s stages and dimensionality."""
        return cls(backbone.stages(), spatial_dims=backbone.spatial_dims, **adapter_kwargs)

    def _hook(self, key: str):
        adapter = self.adapters[key]

        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]  # (B, C, H, W[, D]) stage input
            return (x + adapter(x), *args[1:])

        return pre_hook

    @contextmanager
    def attached(self, backbone: Backbone) -> Iterator[None]:
        """Within the block, ``backbone(x)`` runs with these adapters at its stage inputs.

        Raises:
            ConfigError: the backbone's stages differ from the ones this set was built for.
        """
        stages = backbone.stages()
        if [s.name for s in stages] != self.stage_names:
            raise ConfigError(
                f"adapter set built for stages {self.stage_names} cannot attach to "
                f"backbone {backbone.name!r} with stages {[s.name for s in stages]}."
            )
        handles = [s.module.register_forward_pre_hook(self._hook(_key(s.name))) for s in stages]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def forward_with_adapters(backbone: Backbone, adapters: AdapterSet | None, x: Tensor) -> Tensor:
    """``(B, C, H, W[, D])`` -> ``(B, num_features)`` features with ``adapters`` (None: plain)."""
    if adapters is None:
        return backbone(x)
    with adapters.attached(backbone):
        return backbone(x)


def _flat(aset: AdapterSet) -> Tensor:
    """All learnable tensors of an adapter set, flattened ``(P,)``."""
    return torch.cat([p.detach().flatten() for p in aset.parameters()])


def adapter_drift(
    sets: Sequence[AdapterSet], sources: Sequence[AdapterSet]
) -> list[dict[str, Any]]:
    """Per adapter set: ``alpha`` of each stage and the relative L2 distance from its source.

    Args:
        sets: the adapter sets, in order.
        sources: for each set, the set it was initialised from.

    Returns:
        One ``{"set", "alpha", "distance_from_init"}`` record per set (JSON-serialisable).
    """
    rows = []
    for t, (aset, src) in enumerate(zip(sets, sources, strict=True)):
        now, ref = _flat(aset), _flat(src)
        rows.append(
            {
                "set": t,
                "alpha": {k: a.alpha.item() for k, a in aset.adapters.items()},
                "distance_from_init": float((now - ref).norm() / ref.norm().clamp_min(1e-12)),
            }
        )
    return rows
