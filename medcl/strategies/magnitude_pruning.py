"""Magnitude pruning on a sparsity schedule: the sparse baseline, and the masks EsaCL builds on.

The weights of the backbone's feature stages are masked; every ``prune_every`` updates the mask
is recomputed, by weight magnitude, to the scheduled sparsity. No regrowth and no fine-tuning
phase after pruning. EsaCL (:mod:`medcl.strategies.esacl`, a reconstruction of Ren & Honavar,
"EsaCL: Efficient Continual Learning of Sparse Models", arXiv 2401.05667, 2024) is this strategy
plus sharpness-aware training, sharpness-informed pruning scores and data selection; this one is
the comparison that shows what those add.

Choices with their source (shared with EsaCL):
- Masking scope: conv/linear weights inside the backbone's feature stages; stem, shortcuts,
  BatchNorm and head dense (official code of ``neu-spiral/SparCL``). Per-layer sparsity (same).
- Initial mask: magnitude pruning of the initial weights to ``init_sparsity`` (SparCL prunes the
  random init once to its target; here the target is then reached gradually).
- Sparsity schedule (reconstruction): cubic ramp ``s(t) = s + (s0 - s)(1 - t/T)^3`` (Zhu & Gupta
  2017) over the first ``ramp_updates`` updates of the stream, counted across experiences.
- Replay: unknown for EsaCL; the trainer mixes memory samples in with plain cross-entropy (ER)
  when ``memory.size > 0``. Measure with and without.
- ``structure="channel"`` (medcl addition): whole output channels of the residual blocks' inner
  convs, with their BatchNorm scale/shift, so the deployable model is physically smaller.
"""

from __future__ import annotations

__all__ = ["MagnitudePruning", "PruningOptions"]

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.errors import ConfigError
from medcl.metrics.compute import TrainingFlops
from medcl.models.backbones import Backbone
from medcl.models.pruning import WeightMasks, slim_copy
from medcl.strategies.base import Batch, Classifier, Strategy, register_strategy
from medcl.strategies.options import StrategyOptions

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory


@dataclass(frozen=True, kw_only=True)
class PruningOptions(StrategyOptions):
    """Options of :class:`MagnitudePruning`: the masks and their schedule (EsaCL's extend them)."""

    sparsity: float = 0.8
    init_sparsity: float = 0.5
    prune_every: int = 50
    ramp_updates: int = 500
    structure: Literal["unstructured", "channel"] = "unstructured"

    def check(self, component: str) -> None:
        s, s0, every, ramp = self.sparsity, self.init_sparsity, self.prune_every, self.ramp_updates
        if not (0 <= s0 <= s < 1) or every < 1 or ramp < 0:
            raise ConfigError(
                f"{component}: need 0 <= init_sparsity <= sparsity < 1, prune_every >= 1 and "
                f"ramp_updates >= 0; got init_sparsity={s0}, sparsity={s}, "
                f"prune_every={every}, ramp_updates={ramp}."
            )


@register_strategy("magnitude-pruning")
class MagnitudePruning(Strategy):
    """Plain magnitude pruning on the same schedule and masks as EsaCL (no SAM, SDP or IDS).

    Args:
        backbone: the feature extractor (its stage convs are pruned).
        sparsity: target fraction of pruned weights per masked layer.
        init_sparsity: sparsity of the initial magnitude-pruned mask.
        prune_every: updates between pruning steps.
        ramp_updates: updates (across experiences) to reach ``sparsity``.
        structure: ``"unstructured"`` or ``"channel"`` (whole filters, physically removed on export).
    """

    uses_memory = True
    Options = PruningOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        stages = [f"net.{s.name}" for s in backbone.stages()]
        self.masks = WeightMasks(self.backbone, stages, structure=self.structure)
        self.masks.attach()
        self.register_buffer("updates_", torch.zeros((), dtype=torch.long))
        self.register_buffer("flops_", torch.zeros((), dtype=torch.float64))
        self.register_buffer("images_", torch.zeros((), dtype=torch.long))
        self.counter: TrainingFlops | None = None
        self.events: list[dict[str, float]] = []  # pruning steps: update, sparsity, density
        self.prune_observer = None  # optional callable(stage: "before"|"after"), for benchmarks
        self._prune_to(self.sparsity_at(0), scores=self._magnitude())

    # -- schedule and scores ---------------------------------------------------------------------
    def sparsity_at(self, t: int) -> float:
        """Scheduled sparsity after ``t`` updates (cubic ramp from ``init_sparsity``)."""
        if self.ramp_updates == 0 or t >= self.ramp_updates:
            return self.sparsity
        frac = 1 - t / self.ramp_updates
        return self.sparsity + (self.init_sparsity - self.sparsity) * frac**3

    def _prune_due(self, t: int) -> bool:
        """Whether update ``t`` is a pruning step of the schedule."""
        return t % self.prune_every == 0 and t <= self.ramp_updates + self.prune_every - 1

    def _magnitude(self) -> dict[str, Tensor]:
        return {p: self.masks._weight(p).detach().abs() for p in self.masks.layers}

    def _scores(self) -> dict[str, Tensor]:
        """The pruning scores: ``|w|``."""
        return self._magnitude()

    def _prune_to(self, s: float, scores: dict[str, Tensor]) -> None:
        before = 1 - self.masks.density()
        if self.prune_observer is not None:
            self.prune_observer("before")
        self.masks.prune_(scores, s)
        self.events.append(
            {"update": int(self.updates_), "sparsity_before": before, "target": s,
             "sparsity_after": 1 - self.masks.density()}
        )  # fmt: skip
        if self.prune_observer is not None:
            self.prune_observer("after")

    # -- training ----------------------------------------------------------------------------
    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        model = Classifier(self.backbone, self.head)
        self.counter = TrainingFlops.refreshed(
            self.counter, model, tuple(exp.train.images.shape[1:])
        )
        self.masks.apply_()

    def _count(self, examples: int, *, backward: bool = True) -> None:
        if self.counter is None:
            return
        d = {f"backbone.{k}": v for k, v in self.masks.layer_density().items()}
        self.flops_ += self.counter.add(examples, backward=backward, weight_density=d)

    def _example_losses(self, logits: Tensor, batch: Batch) -> Tensor:
        """``(B,)`` cross-entropy per example; counts the images and the pass's FLOPs."""
        per = F.cross_entropy(logits, batch.y, reduction="none")  # (B,) l_i(w)
        self.images_ += len(per)
        self._count(len(per))  # forward + backward on every example
        return per

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        return self._example_losses(logits, batch).mean()

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        self.updates_ += 1
        t = int(self.updates_)
        self.masks.apply_()
        if self._prune_due(t):
            s = self.sparsity_at(t)
            if s > 1 - self.masks.density() + 1e-9:
                self._prune_to(s, self._scores())

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return Classifier(self.backbone, self.head)(x)  # same outputs as the slim export

    def deployable_model(self) -> nn.Module:
        """The masked model (zeros in its weights); channel-pruned layers physically removed."""
        if self.masks.structure == "channel":
            return Classifier(slim_copy(self.backbone, self.masks), self.head)
        return Classifier(self.backbone, self.head)
