"""DynaMMo (merged adapters, flat inference cost) and ACL (one adapter set per experience).

Papers: M. A. Qazi et al., "DynaMMo: Dynamic Model Merging for Efficient Class Incremental
Learning for Medical Images", MIUA 2024 (arXiv:2404.14099); W. Zhang et al., "Adapter Learning in
Pretrained Feature Extractor for Continual Learning of Diseases" (ACL), MICCAI 2023.

Per experience ``t`` (``grow``): a residual conv adapter set at the stage inputs of the frozen
backbone (:mod:`medcl.models.adapters`), initialised from set ``t-1``, and a head over ``t``'s
classes plus one "others" output. Stage 1 (the trainer's loop): set ``t`` and head ``t`` learn
``t``'s data + replay memory, every sample of another experience labelled "others". Merge
(``after_experience``, DynaMMo only): all sets -> one (:func:`merge_state_dicts`; ``"mean"`` is
the paper's). Stage 2: with the adapters frozen, all heads are re-tuned on a class-balanced set
(memory + as many new samples per class as the memory holds per group); head ``j``'s targets
are its classes for experience ``j``'s samples and "others" for the rest. Inference
(:class:`RoutedAdapterModel`): features once with the merged set (ACL: once per set), every
head, route to the head with the lowest "others" probability, predict within it.

Ablations: ``acl`` (no merge), ``merge``, ``init_from_previous=False``, ``retune_epochs=0`` (no
stage 2), ``backbone_init``.

Deviations (everything else follows the paper and its reference code):

- Backbone: the paper freezes an ImageNet ResNet. ``backbone_init="checkpoint"`` does that with
  the backbone as built (``model.checkpoint_path``); offline without weights,
  ``"first_experience"`` trains the backbone during experience 0 *jointly* with adapter set 0
  and head 0 (no "others" samples exist yet: plain supervised training), then freezes its
  weights and BatchNorm statistics for good.
- Head ``t`` is trained in stage 1 and re-tuned in stage 2 (the reference trains a temporary
  head in stage 1 and a fresh head ``t`` in stage 2). Stage 2 uses Adam on features cached once
  (no augmentation: the heads are linear, so re-tuning costs one forward pass over the set) and
  sums the cross-entropy of every head (the reference skips heads absent from a batch). Its
  defaults (30 epochs, lr 1e-2) are ours: with 10 epochs at 1e-3 the stage-2 loss of head 0,
  whose "others" output never fired in experience 0, stayed high and routing failed. As in the
  reference, stage 2 is skipped after the first experience and without a replay memory.
- "others" means "from another experience", so domain-incremental streams (same classes at
  every site) get one head per site and routing picks the site.
- Scores (the paper only needs the argmax): ``predict`` returns the log of
  ``sum_j s_j p_j(c | not others)`` normalised over the seen classes, ``s_j = 1`` for the routed
  head and ``1e-6`` for the others: the routed head's within-head distribution up to 1e-6 (also
  when heads share classes, domain-incremental), while non-routed heads keep their rankings
  (task-aware accuracy, AUROC).
- ``merge="weighted"`` weights each set by its experience's training-set size; ``"ties"`` uses
  the adapters' initialisation as the base. Adapter convolutions are padded and have no bias
  (see :mod:`medcl.models.adapters`).
"""

from __future__ import annotations

__all__ = ["ACL", "DynaMMo", "OthersHead", "RoutedAdapterModel", "route_min_others"]

import copy
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.data.transforms import to_model_input
from medcl.errors import ConfigError
from medcl.models.adapters import AdapterSet, forward_with_adapters
from medcl.models.backbones import Backbone
from medcl.models.merging import merge_state_dicts
from medcl.strategies.base import Batch, ExperienceInfo, Strategy, register_strategy

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.engine.memory import ReplayMemory

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
    backbone runs once per head).
    """

    def __init__(
        self,
        backbone: Backbone,
        adapter_sets: Sequence[AdapterSet],
        heads: Sequence[OthersHead],
        num_classes: int,
    ) -> None:
        super().__init__()
        if not heads or len(adapter_sets) not in (1, len(heads)):
            raise ConfigError(
                f"RoutedAdapterModel needs >= 1 head and 1 or {len(heads)} adapter "
                f"sets; got {len(heads)} heads, {len(adapter_sets)} sets."
            )
        self.backbone, self.num_classes = backbone, num_classes
        self.adapter_sets, self.heads = nn.ModuleList(adapter_sets), nn.ModuleList(heads)

    def head_logits(self, x: Tensor) -> list[Tensor]:
        """``(B, C, H, W[, D])`` -> one ``(B, K_j + 1)`` tensor per head."""
        if len(self.adapter_sets) == 1:
            f = forward_with_adapters(self.backbone, self.adapter_sets[0], x)  # (B, F)
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


@register_strategy("acl")
class ACL(Strategy):
    """ACL: per-experience adapters and "others" heads, no merging (inference grows with T).

    Args:
        backbone: feature extractor (frozen; see ``backbone_init``).
        backbone_init: ``"first_experience"`` trains it during experience 0 then freezes it;
            ``"checkpoint"`` freezes it as built (pretrained or ``model.checkpoint_path``).
        alpha_init: initial adapter scale.
        init_from_previous: initialise set ``t`` from set ``t-1`` (False: from the initial set).
        retune_epochs: stage-2 epochs over the balanced set (0 switches stage 2 off).
        retune_lr: stage-2 Adam learning rate.
        retune_batch_size: stage-2 batch size.
    """

    uses_memory = True

    def __init__(
        self,
        backbone: Backbone,
        *,
        backbone_init: Literal["first_experience", "checkpoint"] = "first_experience",
        alpha_init: float = 0.02,
        init_from_previous: bool = True,
        retune_epochs: int = 30,
        retune_lr: float = 1e-2,
        retune_batch_size: int = 64,
    ) -> None:
        super().__init__(backbone)
        del self.head  # replaced by one OthersHead per experience
        if retune_epochs < 0 or retune_lr <= 0 or retune_batch_size < 1:
            raise ConfigError(
                f"strategy {self.name!r}: retune_epochs must be >= 0, retune_lr > 0 and "
                f"retune_batch_size >= 1; got {retune_epochs}, {retune_lr}, "
                f"{retune_batch_size}."
            )
        self.backbone_init, self.init_from_previous = backbone_init, init_from_previous
        self.retune_epochs, self.retune_lr, self.retune_batch_size = (
            retune_epochs,
            retune_lr,
            retune_batch_size,
        )
        self.init_set = AdapterSet.for_backbone(backbone, alpha_init=alpha_init).requires_grad_(
            False
        )
        self.adapter_sets, self.heads = nn.ModuleList(), nn.ModuleList()
        self.register_buffer("train_sizes_", torch.zeros(0))  # (T,) samples per experience
        self._train_backbone = False
        backbone.requires_grad_(False)

    # -- structure -------------------------------------------------------------------------
    def grow(self, info: ExperienceInfo) -> None:
        self.seen.append(info)
        first = not self.adapter_sets
        src = self.adapter_sets[-1] if self.init_from_previous and not first else self.init_set
        for m in (*self.adapter_sets, *self.heads):
            m.requires_grad_(False)
        self.adapter_sets.append(copy.deepcopy(src).requires_grad_(True))
        device = next(self.backbone.parameters()).device
        self.heads.append(OthersHead(self.backbone.num_features, info.classes).to(device))
        self.train_sizes_ = torch.cat([self.train_sizes_, self.train_sizes_.new_zeros(1)])
        self._train_backbone = first and self.backbone_init == "first_experience"
        self.backbone.requires_grad_(self._train_backbone)

    def train(self, mode: bool = True) -> ACL:
        super().train(mode)
        if not self._train_backbone:  # frozen: BatchNorm statistics too
            self.backbone.eval()
        return self

    def deploy_sets(self) -> list[AdapterSet]:
        """The adapter sets inference runs: one per experience (ACL)."""
        return list(self.adapter_sets)

    # -- stage 1 ---------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        yield from self.adapter_sets[-1].parameters()
        yield from self.heads[-1].parameters()
        if self._train_backbone:
            yield from self.backbone.parameters()

    def forward(self, x: Tensor) -> Tensor:
        """Stage-1 logits of the current head ``(B, K_t + 1)`` with the current adapter set."""
        return self.heads[-1](forward_with_adapters(self.backbone, self.adapter_sets[-1], x))

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(
            logits, self.heads[-1].targets(batch.y, batch.exp == self.seen[-1].index)
        )

    # -- merge + stage 2 ---------------------------------------------------------------------
    def after_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        self.train_sizes_[-1] = len(exp.train)
        self._train_backbone = False
        self.backbone.requires_grad_(False).eval()
        self.merge_adapters()
        if self.retune_epochs and len(memory) and len(self.heads) > 1:
            self._retune_heads(exp, memory)

    def _balanced_set(self, exp: Experience, memory: ReplayMemory) -> tuple[Tensor, Tensor, Tensor]:
        """Memory + per class of ``exp`` as many samples as the memory holds per group."""
        x, y, e = memory.gather(torch.arange(len(memory)))
        quota = math.ceil(len(memory) / len(torch.unique(e * (int(y.max()) + 1) + y)))
        g = torch.Generator().manual_seed(exp.index)
        rows = [
            r[torch.randperm(len(r), generator=g)[:quota]]
            for c in exp.classes
            if len(r := torch.nonzero(exp.train.labels == c).flatten())
        ]
        idx = torch.cat(rows)
        return (
            torch.cat([x, exp.train.images[idx]]),
            torch.cat([y, exp.train.labels[idx]]),
            torch.cat([e, torch.full_like(idx, exp.index)]),
        )

    def merge_adapters(self) -> None:
        """Combine the experiences' adapter sets (ACL keeps them apart: nothing to do)."""

    @torch.no_grad()
    def _cached_features(self, aset: AdapterSet, images: Tensor) -> Tensor:
        """Raw images ``(N, C, ...)`` -> frozen features ``(N, F)``, in chunks of 256."""
        device = next(self.backbone.parameters()).device
        chunks = [
            to_model_input(images[i : i + 256]).to(device) for i in range(0, len(images), 256)
        ]
        return torch.cat([forward_with_adapters(self.backbone, aset, x) for x in chunks])

    def _retune_heads(self, exp: Experience, memory: ReplayMemory) -> None:
        images, labels, exps = self._balanced_set(exp, memory)
        device = next(self.backbone.parameters()).device
        labels, exps = labels.to(device), exps.to(device)
        self.eval()
        feats = [self._cached_features(s, images) for s in self.deploy_sets()]
        feats = feats * len(self.heads) if len(feats) == 1 else feats  # DynaMMo: one for all
        targets = [
            h.targets(labels, exps == info.index)
            for h, info in zip(self.heads, self.seen, strict=True)
        ]
        params = [p for h in self.heads for p in h.requires_grad_(True).parameters()]
        opt = torch.optim.Adam(params, lr=self.retune_lr)
        g = torch.Generator().manual_seed(exp.index)
        with torch.enable_grad():
            for _ in range(self.retune_epochs):
                for idx in torch.randperm(len(labels), generator=g).split(self.retune_batch_size):
                    loss = sum(
                        F.cross_entropy(h(f[idx]), t[idx])
                        for h, f, t in zip(self.heads, feats, targets, strict=True)
                    )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

    # -- inference ---------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """``(B, F)`` features with the newest deployed adapter set."""
        return forward_with_adapters(self.backbone, self.deploy_sets()[-1], x)

    def deployable_model(self) -> RoutedAdapterModel:
        if not self.heads:
            raise ConfigError(
                f"strategy {self.name!r} has learned no experience yet; there is "
                "no model to deploy."
            )
        return RoutedAdapterModel(
            self.backbone, self.deploy_sets(), list(self.heads), self.num_seen_classes
        )


@register_strategy("dynammo")
class DynaMMo(ACL):
    """DynaMMo: ACL whose adapter sets are merged into one after each experience (flat cost).

    Args:
        merge: ``"mean"`` (the paper's), ``"weighted"`` (by training-set size) or ``"ties"``.
        ties_density: fraction of each adapter task-vector tensor kept by TIES trimming.
        Others: as :class:`ACL`.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        merge: Literal["mean", "weighted", "ties"] = "mean",
        ties_density: float = 0.2,
        backbone_init: Literal["first_experience", "checkpoint"] = "first_experience",
        alpha_init: float = 0.02,
        init_from_previous: bool = True,
        retune_epochs: int = 30,
        retune_lr: float = 1e-2,
        retune_batch_size: int = 64,
    ) -> None:
        super().__init__(
            backbone,
            backbone_init=backbone_init,
            alpha_init=alpha_init,
            init_from_previous=init_from_previous,
            retune_epochs=retune_epochs,
            retune_lr=retune_lr,
            retune_batch_size=retune_batch_size,
        )
        if not 0 < ties_density <= 1:
            raise ConfigError(
                f"strategy 'dynammo': ties_density must be in (0, 1]; got {ties_density}."
            )
        self.merge, self.ties_density = merge, ties_density
        self.merged_set = copy.deepcopy(self.init_set)  # loaded by every merge

    def merge_adapters(self) -> None:
        """Merge every experience's adapter set into :attr:`merged_set`."""
        if len(self.adapter_sets) > 1:
            merged = merge_state_dicts(
                [s.state_dict() for s in self.adapter_sets],
                method=self.merge,
                weights=self.train_sizes_.tolist() if self.merge == "weighted" else None,
                density=self.ties_density,
                base=self.init_set.state_dict(),  # used by "ties"
            )
            self.merged_set.load_state_dict(merged)

    def deploy_sets(self) -> list[AdapterSet]:
        """One set: the merged one (set 0 itself until a second experience is merged in)."""
        return [self.adapter_sets[0] if len(self.adapter_sets) == 1 else self.merged_set]
