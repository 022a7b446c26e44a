"""The deployable model of adapter methods: "others" heads and min-"others" routing.

ACL and DynaMMo (:mod:`medcl.strategies.acl`, :mod:`medcl.strategies.dynammo`) give each
experience a linear head over its classes plus one "others" output; at inference every head
scores the features and the sample is routed to the head with the lowest "others" probability
(the reference code's ``min_others_test``). :class:`RoutedAdapterModel` is what ``medcl export``
writes. Stage 2 of those methods, re-tuning every head on a class-balanced set, is here too
(:func:`balanced_retune_set`, :func:`retune_heads`, :func:`routing_accuracy`).
"""

from __future__ import annotations

__all__ = [
    "OthersHead",
    "RetuneSet",
    "RoutedAdapterModel",
    "balanced_retune_set",
    "retune_heads",
    "route_min_others",
    "routing_accuracy",
]

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.data.memory import herding_order
from medcl.errors import ConfigError
from medcl.models.adapters import AdapterSet, forward_with_adapters
from medcl.models.backbones import Backbone
from medcl.models.deployable import DeployableModel
from medcl.progress import progress_bar

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory

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


class RoutedAdapterModel(DeployableModel):
    """The deployable model: frozen backbone + adapter set(s) + "others" heads, routed.

    One adapter set: DynaMMo (features computed once for all heads). One set per head: ACL (the
    backbone runs once per head). None: the "no adapters" ablation (frozen features + heads).
    Features are ``(B, S, F)``, one row per adapter set (``S = 1`` when the heads share one set or
    there is none); the embedding (``forward_head(..., pre_logits=True)``) is the first set's.
    """

    routed = True

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

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W[, D])`` -> ``(B, S, F)``: the features of each adapter set."""
        sets = list(self.adapter_sets) or [None]  # DynaMMo: one set, ACL: one per head
        return torch.stack([forward_with_adapters(self.backbone, a, x) for a in sets], 1)

    def head_logits(self, features: Tensor) -> list[Tensor]:
        """``(B, S, F)`` -> one ``(B, K_j + 1)`` tensor per head (head j on set j, or the shared)."""
        if len(self.adapter_sets) <= 1:
            f = features[:, 0]  # (B, F)
            return [h(f) for h in self.heads]
        return [h(f.contiguous()) for h, f in zip(self.heads, features.unbind(1), strict=True)]

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """``(B, S, F)`` -> ``(B, num_classes)`` log-probabilities of the routed head (see
        :func:`route_min_others`), or with ``pre_logits`` the first set's features ``(B, F)``."""
        if pre_logits:
            return features[:, 0]
        return route_min_others(
            self.head_logits(features), [h.classes for h in self.heads], self.num_classes
        )

    def route(self, features: Tensor) -> Tensor:
        """``(B, S, F)`` -> ``(B,)`` the head with the lowest "others" probability."""
        logits = self.head_logits(features)
        return torch.stack([F.softmax(z, 1)[:, -1] for z in logits], 1).argmin(1)  # (B, H) -> (B,)


@dataclass(frozen=True)
class RetuneSet:
    """DynaMMo's stage-2 set as rows of training sets (the memory's rows first).

    Attributes:
        parts: ``(images of a training set, (n,) rows of it)`` per source, in order.
        labels: ``(N,)`` global labels of the set's rows, in the same order.
        exps: ``(N,)`` experience of each row.
    """

    parts: list[tuple[Tensor, Tensor]]
    labels: Tensor
    exps: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def features(self, features: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``(N, F)``: ``features(images, rows)`` of every part, concatenated."""
        return torch.cat([features(images, rows) for images, rows in self.parts])


def balanced_retune_set(
    exp: Experience, memory: ReplayMemory, features: Callable[[Tensor, Tensor], Tensor]
) -> RetuneSet:
    """DynaMMo's stage-2 set: the memory plus, per class of ``exp``, ``m`` samples chosen by
    iCaRL herding on ``features`` (all of the class's samples when it has ``m`` or fewer).

    ``m = memory.size // G``, ``G`` the number of (experience, class) groups in the memory: the
    memory's per-group budget, as the reference's ``memory_size // old classes``
    (``ReplayBank.get_unified_sample_dataset``). The memory holds ``m`` per group, or ``m + 1``
    for the first ``memory.size % G`` groups (:meth:`ReplayMemory.update`), fewer for a group
    with fewer training samples.

    Args:
        exp: the experience just learned.
        memory: the replay memory (earlier experiences; not empty).
        features: ``(images of a training set, (n,) rows)`` -> ``(n, F)`` features (the
            reference's ``ReplayBank`` herds on the merged-adapter features, in eval mode).

    Returns:
        The set, memory rows first.
    """
    sources = memory.sources()
    e, y = memory.exp_, memory.label_
    quota = memory.size // len(torch.unique(e * (int(y.max()) + 1) + y))  # G groups
    parts = [(data.images, rows) for data, rows, _ in sources]
    labels = [y[pos] for _, _, pos in sources]
    exps = [e[pos] for _, _, pos in sources]
    for c in exp.classes:
        r = torch.nonzero(exp.train.labels == c).flatten()
        if len(r) > quota:
            r = r[herding_order(features(exp.train.images, r), quota)]
        parts.append((exp.train.images, r))
        labels.append(exp.train.labels[r])
        exps.append(torch.full_like(r, exp.index))
    return RetuneSet(parts, torch.cat(labels), torch.cat(exps))


def retune_heads(
    heads: Sequence[OthersHead],
    owners: Sequence[int],
    features: Sequence[Tensor],
    data: RetuneSet,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> dict[str, float | int | list[float | None]]:
    """DynaMMo's stage 2: re-tune every head with Adam on the features of ``data``.

    Args:
        heads: the heads (trained in place).
        owners: each head's experience: its samples get class targets, every other "others".
        features: ``(N, F)`` features of ``data`` per head, or one tensor shared by every head
            (DynaMMo's merged set), computed once with the adapters frozen.
        data: the class-balanced set (:func:`balanced_retune_set`).
        epochs, lr, batch_size: the optimisation.
        seed: seeds the shuffling.

    Returns:
        The routing accuracy of the re-tuned heads on ``data`` (:func:`routing_accuracy`).
    """
    device = next(heads[0].parameters()).device
    labels, exps = data.labels.to(device), data.exps.to(device)
    feats = [f.to(device) for f in features]
    feats = feats * len(heads) if len(feats) == 1 else feats  # one set: shared by every head
    targets = [h.targets(labels, exps == j) for h, j in zip(heads, owners, strict=True)]
    params = [p for h in heads for p in h.requires_grad_(True).parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    bar = progress_bar(total=epochs, desc="stage 2: re-tune heads", unit="epoch")
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
            bar.update(1)
    bar.close()
    return routing_accuracy(heads, owners, features, data)


@torch.no_grad()
def routing_accuracy(
    heads: Sequence[OthersHead],
    owners: Sequence[int],
    features: Sequence[Tensor],
    data: RetuneSet,
) -> dict[str, float | int | list[float | None]]:
    """Task-id accuracy of min-"others" routing on ``data`` (the reference logs it as
    "task id predict acc"): the share of samples routed to the head of their experience.

    Args:
        heads: the heads, in order.
        owners: each head's experience.
        features: ``(N, F)`` features of ``data`` per head, or one tensor shared by every head.
        data: the samples (e.g. the stage-2 balanced set) with their experiences.

    Returns:
        ``{"accuracy", "samples", "per_experience"}`` (accuracy per head's experience, in
        ``owners`` order; None for an experience without samples).
    """
    device = next(heads[0].parameters()).device
    feats = [f.to(device) for f in features]
    feats = feats * len(heads) if len(feats) == 1 else feats
    others = torch.stack(
        [F.softmax(h(f), 1)[:, -1] for h, f in zip(heads, feats, strict=True)], 1
    )  # (N, H)
    exps = data.exps.to(device)
    truth = (exps[:, None] == torch.as_tensor(list(owners), device=device)[None]).float().argmax(1)
    hit = (others.argmin(1) == truth).float()  # (N,)
    per = [hit[exps == j].mean().item() if (exps == j).any() else None for j in owners]
    return {"accuracy": hit.mean().item(), "samples": len(hit), "per_experience": per}
