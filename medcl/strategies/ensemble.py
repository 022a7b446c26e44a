"""Vanilla ensemble: ``n`` independently initialised models, each trained with replay.

The reference point of the subspace methods (Doan et al., "Continual Learning Beyond a Single
Model", arXiv 2202.09826: a vanilla ensemble is the most accurate but costs ``n`` times the
inference FLOPs). Member 0 is the configured backbone as built (pretrained weights included);
members ``1..n-1`` are copies re-initialised independently with the rule of the subspace's extra
endpoints (:func:`medcl.models.subspace.reinitialise`: Kaiming-normal weights), so the two methods
start from the same kind of diversity.

Every member sees the same batches (current experience + replay memory, as ``replay``); the
loss is the sum of the members' cross-entropies, whose gradients do not interact, so this is
``n`` independent trainings in one loop (one difference: ``train.grad_clip_norm`` clips the
members' joint gradient norm). Inference averages the members' probabilities; the deployable
model holds all ``n`` networks (``n`` × parameters and MACs).
"""

from __future__ import annotations

__all__ = ["MeanEnsemble", "VanillaEnsemble"]

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.errors import ConfigError
from medcl.models.backbones import Backbone
from medcl.models.deployable import DeployableModel
from medcl.models.heads import ExpandableHead
from medcl.models.subspace import reinitialise
from medcl.strategies.base import Batch, Classifier, ExperienceInfo, Strategy, register_strategy
from medcl.strategies.options import StrategyOptions


class MeanEnsemble(DeployableModel):
    """Average of the members' class probabilities, returned as log-probabilities.

    The members share no feature space, so the ensemble's features are its averaged
    log-probabilities ``(B, K)`` (what the OOD guard is fitted on) and its head is the identity.

    Args:
        members: modules mapping ``(B, C, H, W[, D])`` to logits ``(B, K)``.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W[, D])`` -> ``log(mean_m softmax(logits_m))`` ``(B, K)``."""
        logp = torch.stack([F.log_softmax(m(x), dim=1) for m in self.members])  # (M, B, K)
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return features


@dataclass(frozen=True, kw_only=True)
class EnsembleOptions(StrategyOptions):
    """Options of :class:`VanillaEnsemble`."""

    n_models: int = 3
    seed: int = 0

    def check(self, component: str) -> None:
        if self.n_models < 1:
            raise ConfigError(f"{component}: n_models must be >= 1; got {self.n_models}.")


@register_strategy("ensemble")
class VanillaEnsemble(Strategy):
    """``n_models`` independent networks trained side by side with replay; probabilities averaged.

    Args:
        backbone: member 0's feature extractor (copied for the other members).
        n_models: ensemble size (≥ 1).
        seed: seeds the independent initialisation of members ``1..n-1``.
    """

    uses_memory = True
    Options = EnsembleOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        self.others = nn.ModuleList()
        for i in range(1, self.n_models):
            member = Classifier(copy.deepcopy(backbone), ExpandableHead(backbone.num_features))
            self.others.append(reinitialise(member, seed=self.seed * 1000 + i))
        self._member_logits: list[Tensor] = []

    @property
    def members(self) -> list[nn.Module]:
        """Every member as a :class:`Classifier` (member 0 shares ``backbone`` and ``head``)."""
        return [Classifier(self.backbone, self.head), *self.others]

    def grow(self, info: ExperienceInfo) -> None:
        super().grow(info)
        for m in self.others:
            m.head.expand(info.num_seen_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Mean logits ``(B, num_seen_classes)``; the members' logits are kept for :meth:`loss`."""
        self._member_logits = [m(x) for m in self.members]
        return torch.stack(self._member_logits).mean(0)

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Sum of the members' cross-entropies (independent trainings)."""
        out = sum(F.cross_entropy(z, batch.y) for z in self._member_logits)
        self._member_logits = []
        return out

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.deployable_model()(x)

    def deployable_model(self) -> nn.Module:
        return MeanEnsemble(self.members)
