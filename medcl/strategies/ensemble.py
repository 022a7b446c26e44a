"""Ensembles of independently initialised members: vanilla (replay) and Ensemble MC-SGD.

The reference points of the subspace methods (Doan et al., "Continual Learning Beyond a Single
Model", arXiv 2202.09826): a vanilla ensemble is the most accurate but costs ``n`` times the
inference FLOPs, and S-C is compared with **Ensemble MC-SGD**, ``n`` independent MC-SGD chains
whose logits are averaged. Member 0 is the configured backbone as built (pretrained weights
included); members ``1..n-1`` are copies re-initialised independently with the rule of the
subspace's extra endpoints (:func:`medcl.models.subspace.reinitialise`: Kaiming-normal weights,
seeded by ``seed``), so the methods start from the same kind of diversity.

``member="replay"`` (``ensemble``): every member sees the same batches (current experience +
replay memory, as ``replay``); the loss is the sum of the members' cross-entropies, whose
gradients do not interact, so this is ``n`` independent trainings in one loop (one difference:
``train.grad_clip_norm`` clips the members' joint gradient norm).

``member="mcsgd"`` (``ensemble-mcsgd``): every member is a whole
:class:`~medcl.strategies.mcsgd.MCSGD` (its own sequential chain, connectivity step and
BatchNorm re-estimation; ``member_options`` are its options). The members' sequential chains
see the same batches and sum their losses as above; each member's connectivity step draws its
own subsets and batch orders. Only the initialisation is made to differ on purpose, the
diversity the paper credits.

Inference averages the members' probabilities (``average="probabilities"``, the default of
``ensemble``) or their logits (``"logits"``, the paper's Ensemble MC-SGD and the default of
``ensemble-mcsgd``); the deployable model holds all ``n`` networks (``n`` × parameters and MACs).
"""

from __future__ import annotations

__all__ = ["EnsembleOptions", "MCSGDEnsemble", "MeanEnsemble", "VanillaEnsemble"]

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.errors import ConfigError, check_options
from medcl.models.backbones import Backbone
from medcl.models.deployable import DeployableModel
from medcl.models.heads import ExpandableHead
from medcl.models.subspace import reinitialise
from medcl.strategies.base import (
    Batch,
    Classifier,
    ExperienceInfo,
    Strategy,
    create_strategy,
    register_strategy,
)
from medcl.strategies.options import StrategyOptions

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory


class MeanEnsemble(DeployableModel):
    """Average of the members' class probabilities (as log-probabilities) or of their logits.

    The members share no feature space, so the ensemble's features are its averaged scores
    ``(B, K)`` (what the OOD guard is fitted on) and its head is the identity.

    Args:
        members: modules mapping ``(B, C, H, W[, D])`` to logits ``(B, K)``.
        average: ``"probabilities"`` (``log mean softmax``) or ``"logits"`` (mean logits).
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        average: Literal["probabilities", "logits"] = "probabilities",
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.average = average

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W[, D])`` -> ``log(mean_m softmax(logits_m))`` or ``mean_m logits_m``
        ``(B, K)``."""
        if self.average == "logits":
            return torch.stack([m(x) for m in self.members]).mean(0)
        logp = torch.stack([F.log_softmax(m(x), dim=1) for m in self.members])  # (M, B, K)
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return features


@dataclass(frozen=True, kw_only=True)
class EnsembleOptions(StrategyOptions):
    """Options of :class:`VanillaEnsemble`."""

    n_models: int = 3
    seed: int = 0
    member: Literal["replay", "mcsgd"] = "replay"
    member_options: dict[str, Any] | None = None
    average: Literal["probabilities", "logits"] = "probabilities"

    def check(self, component: str) -> None:
        check_options(component, "n_models >= 1", [("n_models", self.n_models, self.n_models >= 1)])
        if self.member == "replay" and self.member_options:
            raise ConfigError(
                f"{component}: member 'replay' has no options; got member_options="
                f"{self.member_options!r}. Remove member_options or set member: mcsgd."
            )


@register_strategy("ensemble")
class VanillaEnsemble(Strategy):
    """``n_models`` independent members trained side by side; their scores averaged.

    Args:
        backbone: member 0's feature extractor (copied for the other members).
        n_models: ensemble size (≥ 1).
        seed: seeds the independent initialisation of members ``1..n-1``.
        member: ``"replay"`` (plain networks trained with replay) or ``"mcsgd"`` (MC-SGD chains).
        member_options: the options of each ``"mcsgd"`` member (validated as ``mcsgd``'s).
        average: what inference averages, ``"probabilities"`` or ``"logits"``.
    """

    uses_memory = True
    Options = EnsembleOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        self.others = nn.ModuleList()  # member="replay": members 1..n-1 as Classifiers
        self.chains = nn.ModuleList()  # member="mcsgd": every member's strategy
        copies = [reinitialise(copy.deepcopy(backbone), seed=self.seed * 1000 + i)
                  for i in range(1, self.n_models)]  # fmt: skip
        if self.member == "mcsgd":  # chain 0 trains ``backbone`` itself (``features`` reads it)
            for bb in (backbone, *copies):
                self.chains.append(create_strategy("mcsgd", bb, **(self.member_options or {})))
            self.uses_memory = self.chains[0].uses_memory  # MC-SGD's stage1_replay
        for bb in copies if self.member == "replay" else ():
            self.others.append(Classifier(bb, ExpandableHead(bb.num_features)))
        self._member_logits: list[Tensor] = []

    @property
    def members(self) -> list[nn.Module]:
        """Every member as a network mapping images to logits (no copy; member 0 shares
        ``backbone``)."""
        if self.member == "mcsgd":
            return [c.network() for c in self.chains]
        return [Classifier(self.backbone, self.head), *self.others]

    def grow(self, info: ExperienceInfo) -> None:
        if self.member == "mcsgd":
            self.seen.append(info)
        else:
            super().grow(info)
        for m in self.others:
            m.head.expand(info.num_seen_classes)
        for c in self.chains:
            c.grow(info)

    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        for c in self.chains:
            c.before_experience(exp, memory)

    def forward(self, x: Tensor) -> Tensor:
        """Mean logits ``(B, num_seen_classes)``; the members' logits are kept for :meth:`loss`."""
        self._member_logits = [m(x) for m in self.members]
        return torch.stack(self._member_logits).mean(0)

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Sum of the members' objectives (independent trainings)."""
        if self.member == "mcsgd":
            out = sum(c.loss(z, batch) + c.penalty(batch, z)
                      for c, z in zip(self.chains, self._member_logits, strict=True))  # fmt: skip
        else:
            out = sum(F.cross_entropy(z, batch.y) for z in self._member_logits)
        self._member_logits = []
        return out

    def after_update(self, step: int) -> None:
        for c in self.chains:
            c.after_update(step)

    def after_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        """Each MC-SGD member's connectivity step and BatchNorm re-estimation, in turn."""
        for c in self.chains:
            c.after_experience(exp, memory)

    def diagnostics(self) -> dict[str, Any]:
        return {"members": [c.diagnostics() for c in self.chains]} if self.chains else {}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return MeanEnsemble(self.members, self.average)(x)

    def deployable_model(self) -> nn.Module:
        if self.member == "mcsgd":  # each chain folded to one plain network
            return MeanEnsemble([c.deployable_model() for c in self.chains], self.average)
        return MeanEnsemble(self.members, self.average)


@dataclass(frozen=True, kw_only=True)
class MCSGDEnsembleOptions(EnsembleOptions):
    """:class:`EnsembleOptions` with MC-SGD members and averaged logits (the paper's)."""

    member: Literal["replay", "mcsgd"] = field(default="mcsgd", init=False)
    average: Literal["probabilities", "logits"] = "logits"


@register_strategy("ensemble-mcsgd")
class MCSGDEnsemble(VanillaEnsemble):
    """Ensemble MC-SGD (Doan et al.'s baseline): ``n_models`` independent MC-SGD chains, logits
    averaged. ``member_options`` are the chains' :class:`~medcl.strategies.mcsgd.MCSGD` options."""

    Options = MCSGDEnsembleOptions
