"""The deployable model of adapter methods: "others" heads and min-"others" routing.

DynaMMo and ACL (:mod:`medcl.strategies.dynammo`) give each experience a linear head over its
classes plus one "others" output; at inference every head scores the features and the sample is
routed to the head with the lowest "others" probability (the reference code's
``min_others_test``). :class:`RoutedAdapterModel` is what ``medcl export`` writes.
"""

from __future__ import annotations

__all__ = ["OthersHead", "RoutedAdapterModel", "retune_heads", "route_min_others"]

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.errors import ConfigError
from medcl.models.adapters import AdapterSet, forward_with_adapters
from medcl.models.backbones import Backbone

_OFF_ROUTE = 1e-6  # share of a non-routed head's distribution kept in the scores


class OthersHead(nn.Linear):
    """Linear head over ``classes`` (global ids, buffer) plus a last "others" output."""

    def __init__(self, in_features: int, classes: Sequence[int]) -> None:
        super().__init__(in_features, len(classes) + 1)
        self.register_buffer("classes", torch.as_tensor(list(classes), dtype=torch.long))

    def targets(self, y: Tensor, own: Tensor) -> Tensor:
        """Local targets: the class's position for ``own`` samples, "others" for the rest."""
        local = (y[:, None] == self.classes[None]).float().argmax(1)  # (B,)
        return torch.where(own, local, torch.full_like(local, len(self.classes)))


def route_min_others(
    logits: Sequence[Tensor], classes: Sequence[Tensor], num_classes: int
) -> Tensor:
    """Route each sample to the head with the lowest "others" probability.

    Args:
        logits: one ``(B, K_j + 1)`` tensor per head ("others" last).
        classes: one ``(K_j,)`` tensor of global class ids per head.
        num_classes: width of the output.

    Returns:
        ``(B, num_classes)`` log-probabilities: the routed head's within-head distribution on its
        classes; every other head keeps ``1e-6`` of its own (argmax is the routed head's).
    """
    others = torch.stack([F.softmax(z, 1)[:, -1] for z in logits], 1)  # (B, H)
    route = others.argmin(1)  # (B,)
    mix = torch.zeros_like(others[:, :1])  # (B, 1), broadcast to (B, num_classes) below
    for j, (z, cls) in enumerate(zip(logits, classes, strict=True)):
        share = torch.where(route == j, 1.0, _OFF_ROUTE)  # (B,)
        known = F.softmax(z[:, :-1], 1)  # p_j(c | not others), (B, K_j)
        # one-hot matmul instead of index assignment: traceable with a dynamic batch size
        mix = mix + (share[:, None] * known) @ F.one_hot(cls, num_classes).to(known.dtype)
    return torch.log(mix / mix.sum(1, keepdim=True))  # (B, num_classes)


class RoutedAdapterModel(nn.Module):
    """The deployable model: frozen backbone + adapter set(s) + "others" heads, routed.

    One adapter set: DynaMMo (features computed once for all heads). One set per head: ACL (the
    backbone runs once per head). None: the "no adapters" ablation (frozen features + heads).
    """

    def __init__(
        self,
        backbone: Backbone,
        adapter_sets: Sequence[AdapterSet],
        heads: Sequence[OthersHead],
        num_classes: int,
    ) -> None:
        super().__init__()
        if not heads or len(adapter_sets) not in (0, 1, len(heads)):
            raise ConfigError(
                f"RoutedAdapterModel needs >= 1 head and 0, 1 or {len(heads)} adapter "
                f"sets; got {len(heads)} heads, {len(adapter_sets)} sets."
            )
        self.backbone, self.num_classes = backbone, num_classes
        self.adapter_sets, self.heads = nn.ModuleList(adapter_sets), nn.ModuleList(heads)

    def head_logits(self, x: Tensor) -> list[Tensor]:
        """``(B, C, H, W[, D])`` -> one ``(B, K_j + 1)`` tensor per head."""
        if len(self.adapter_sets) <= 1:  # DynaMMo (or no adapters): features once for all heads
            aset = self.adapter_sets[0] if len(self.adapter_sets) else None
            f = forward_with_adapters(self.backbone, aset, x)  # (B, F)
            return [h(f) for h in self.heads]
        return [
            h(forward_with_adapters(self.backbone, a, x))
            for a, h in zip(self.adapter_sets, self.heads, strict=True)
        ]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W[, D])`` -> ``(B, num_classes)`` log-probabilities."""
        return route_min_others(
            self.head_logits(x), [h.classes for h in self.heads], self.num_classes
        )


def retune_heads(
    heads: Sequence[OthersHead],
    feats: Sequence[Tensor],
    targets: Sequence[Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> None:
    """DynaMMo's stage 2: re-tune every head on cached features with Adam.

    Args:
        heads: the heads (trained in place).
        feats: one ``(N, F)`` feature tensor per head (the same tensor for all with one set).
        targets: one ``(N,)`` local-target tensor per head (:meth:`OthersHead.targets`).
        epochs, lr, batch_size: the optimisation.
        seed: seeds the shuffling.
    """
    params = [p for h in heads for p in h.requires_grad_(True).parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(targets[0]), generator=g).split(batch_size):
                loss = sum(
                    F.cross_entropy(h(f[idx]), t[idx])
                    for h, f, t in zip(heads, feats, targets, strict=True)
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
