"""DER: Dynamically Expandable Representation (the dynamic-expansion baseline).

Yan, Xie & He, "DER: Dynamically Expandable Representation for Class Incremental Learning",
CVPR 2021.

At every experience after the first a new feature extractor (same architecture, initialised from
the previous one) is added; all earlier extractors are frozen, BatchNorm statistics included.
The classifier sees the concatenation of all extractors' features (``(B, k·F)`` after ``k``
extractors) and is re-created over all seen classes, its old block initialised from the previous
head. An auxiliary classifier on the new extractor's features alone predicts the new classes plus
one "old" label (all earlier classes mapped to it), which pushes the new extractor towards
features for what is new:

    loss = CE(head(concat features), y) + aux_weight · CE(aux(new features), y_aux)

Training mixes in the replay memory. After each experience the classifier is optionally re-trained
on a class-balanced set ("classifier learning" stage) to remove the bias towards new classes.

The deployable model holds every extractor: parameters and MACs grow linearly with the number of
experiences. That growth is what DynaMMo's merged adapters are compared against.

Deviations from the paper and choices it leaves open:
- **No channel-level mask pruning** (the paper's sparsity loss and masks that shrink each new
  extractor): not implemented, so the extractors are not pruned. This makes the growth of this
  baseline an upper bound of the paper's (which reports 20–60% fewer parameters after pruning).
- **Head initialisation.** Old rows × old extractors' columns copy the previous head; old rows ×
  the new extractor's columns start at zero (the expanded model initially reproduces the old
  logits); new rows use ``nn.Linear``'s default initialisation.
- **Classifier learning** (``balanced_finetune``): the head is re-trained from its current weights
  (not re-initialised) for ``finetune_epochs`` epochs of SGD (``finetune_lr``) on features,
  computed once with every extractor frozen in eval mode, of the memory's exemplars plus an equal
  number per class of randomly chosen new-experience samples (raw images, no augmentation). No
  softmax temperature. It is skipped when the memory is empty (first experience, or no memory).
- **Streams without new classes** (domain-incremental): an extractor is still added per
  experience, and the auxiliary loss is skipped (an "old" label alone carries no signal).
- ``init_from_previous=False`` re-initialises the copied extractor with each module's
  ``reset_parameters`` (the architecture's own initialisation scheme may differ slightly).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.data.samples import SampleSet
from medcl.data.transforms import to_model_input
from medcl.errors import ConfigError
from medcl.models.backbones import Backbone
from medcl.models.heads import ExpandableHead
from medcl.strategies.base import Batch, ExperienceInfo, Strategy, register_strategy
from medcl.strategies.options import StrategyOptions

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory

__all__ = ["DER", "ConcatExtractors"]


class ConcatExtractors(nn.Module):
    """Several feature extractors side by side: ``(B, C, ...) -> (B, Σ_k F_k)``.

    Args:
        first: the initial extractor; more are appended to :attr:`extractors`.
    """

    def __init__(self, first: Backbone) -> None:
        super().__init__()
        self.extractors = nn.ModuleList([first])
        self.name, self.in_chans, self.spatial_dims = first.name, first.in_chans, first.spatial_dims

    @property
    def num_features(self) -> int:
        return sum(e.num_features for e in self.extractors)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W[, D])`` -> ``(B, num_features)`` (extractor 0's features first)."""
        return torch.cat([e(x) for e in self.extractors], dim=1)


@dataclass(frozen=True, kw_only=True)
class DEROptions(StrategyOptions):
    """Options of :class:`DER`."""

    aux_weight: float = 1.0
    init_from_previous: bool = True
    balanced_finetune: bool = True
    finetune_epochs: int = 10
    finetune_lr: float = 0.01

    def check(self, component: str) -> None:
        if self.aux_weight < 0 or self.finetune_epochs < 0 or self.finetune_lr <= 0:
            raise ConfigError(
                f"{component}: need aux_weight >= 0, finetune_epochs >= 0 and "
                f"finetune_lr > 0; got aux_weight={self.aux_weight}, finetune_epochs="
                f"{self.finetune_epochs}, finetune_lr={self.finetune_lr}."
            )


@register_strategy("der")
class DER(Strategy):
    """Dynamic expansion: one frozen extractor per past experience, one trainable new one.

    Args:
        backbone: the first feature extractor.
        aux_weight: weight of the auxiliary loss (``0`` disables the auxiliary classifier).
        init_from_previous: initialise each new extractor from the previous one (paper) instead
            of re-initialising it.
        balanced_finetune: re-train the head on a class-balanced set after each experience.
        finetune_epochs: epochs of that re-training.
        finetune_lr: its SGD learning rate.
    """

    uses_memory = True
    Options = DEROptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        self.backbone = ConcatExtractors(backbone)  # the engine's "backbone": all extractors
        self.aux: ExpandableHead | None = None
        self.num_old_classes = 0
        self._aux_logits: Tensor | None = None

    @property
    def extractors(self) -> nn.ModuleList:
        return self.backbone.extractors

    # -- structure -------------------------------------------------------------------------
    def grow(self, info: ExperienceInfo) -> None:
        """Add a trainable extractor (all but the first experience) and widen the head."""
        self.num_old_classes = self.num_seen_classes
        if self.seen:
            self.extractors.requires_grad_(False)  # freeze every existing extractor
            new = copy.deepcopy(self.extractors[-1]).requires_grad_(True)
            if not self.init_from_previous:
                for m in new.modules():
                    if m is not new and hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            self.extractors.append(new)
            self._widen_head()
        super().grow(info)  # records the experience, adds the new classes' rows
        n_new = info.num_seen_classes - self.num_old_classes
        if self.num_old_classes and n_new and self.aux_weight > 0:
            self.aux = ExpandableHead(self.extractors[-1].num_features, n_new + 1).to(
                self.head.weight.device
            )
        else:
            self.aux = None

    def _widen_head(self) -> None:
        old = self.head
        new = ExpandableHead(self.backbone.num_features, old.num_classes).to(old.weight.device)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, : old.in_features] = old.weight
            new.bias.copy_(old.bias)
        self.head = new

    def train(self, mode: bool = True) -> DER:
        """Frozen extractors always stay in eval mode (their BatchNorm statistics are kept)."""
        super().train(mode)
        for e in list(self.extractors)[:-1]:
            e.eval()
        return self

    # -- training ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        feats = [e(x) for e in self.extractors]  # k × (B, F)
        if self.training and self.aux is not None:
            self._aux_logits = self.aux(feats[-1])  # (B, |new| + 1), used by loss()
        return self.head(torch.cat(feats, dim=1))

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """``CE(logits, y) + aux_weight · CE(aux logits, y_aux)`` (old classes -> label 0)."""
        loss = F.cross_entropy(logits, batch.y)
        if self.aux is not None and self._aux_logits is not None:
            y_aux = (batch.y - self.num_old_classes + 1).clamp(min=0)  # old -> 0, new c -> c-old+1
            loss = loss + self.aux_weight * F.cross_entropy(self._aux_logits, y_aux)
            self._aux_logits = None
        return loss

    def after_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        """Classifier learning: re-train the head on a class-balanced set (if enabled)."""
        self._aux_logits = None
        if self.balanced_finetune and self.finetune_epochs and len(memory) > 0:
            self._retrain_head(self._balanced_set(exp, memory), seed=exp.index)

    def _balanced_set(self, exp: Experience, memory: ReplayMemory) -> SampleSet:
        """Memory exemplars + the same number per class of the experience's new samples."""
        old = memory.as_sampleset()
        per_class = max(1, min(old.class_counts().values()))
        g = torch.Generator().manual_seed(exp.index)
        rows = []
        for c in torch.unique(exp.train.labels).tolist():
            idx = torch.nonzero(exp.train.labels == c).flatten()
            rows.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        return SampleSet.concat([old, exp.train.subset(torch.cat(rows))])

    def _retrain_head(self, data: SampleSet, *, seed: int, batch_size: int = 64) -> None:
        device = self.head.weight.device
        was_training = self.training
        self.eval()
        with torch.no_grad():
            feats = torch.cat(
                [
                    self.backbone(to_model_input(data.images[i : i + 256]).to(device))
                    for i in range(0, len(data), 256)
                ]
            )  # (N, k·F)
        labels = data.labels.to(device)
        opt = torch.optim.SGD(self.head.parameters(), lr=self.finetune_lr, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        for _ in range(self.finetune_epochs):
            for idx in torch.randperm(len(feats), generator=g).split(batch_size):
                loss = F.cross_entropy(self.head(feats[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.train(was_training)
