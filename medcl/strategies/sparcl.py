"""SparCL: sparse continual learning on the edge (the comparison method for EsaCL).

Wang et al., "SparCL: Sparse Continual Learning on the Edge", NeurIPS 2022, arXiv 2209.09476.
Mechanics follow its official code (``neu-spiral/SparCL``, commit 3f983f3), whose README says
it "made some slight changes from the paper":

- **Masks** (scope, per-layer sparsity): conv weights inside the residual stages; stem,
  shortcuts, BatchNorm and head dense. The initial weights are magnitude-pruned once to
  ``sparsity`` before training.
- **TDM, task-aware dynamic masking**: every ``mask_every`` epochs (the epoch counter restarts
  each experience), per layer, importance ``|w| + λ|grad|`` with ``λ = score_grad_weight`` and the
  gradient of the last mini-batch (as the code, which skips ``zero_grad`` for it); prune to
  ``sparsity + regrow_gap`` and regrow random zero positions (value 0) back to ``sparsity``. From
  epoch ``freeze_from`` on the mask is frozen (the code's last 10% of epochs).
- **DDR, dynamic data removal**: at the start of the epochs in ``removal_epochs``, remove an
  equal share of ``removal_fraction`` of the experience, the examples with the fewest
  correct -> wrong transitions (never-learned ones count their presentations); statistics reset
  after each removal (:mod:`medcl.strategies.data_removal`).
- **DGM, dynamic gradient masking**: every ``grad_mask_every`` updates, per layer, the weight
  gradients below the ``grad_sparsity`` quantile of ``|grad|`` are zeroed and the pattern is kept
  for the following updates.

Scaled to short CPU runs (the code's 50 epochs per task, masks every 5 epochs, frozen after 45,
removal at epochs 5/10/15/20): the defaults are a mask update every epoch, removal at epochs
1/2/3 and a frozen mask from epoch ``freeze_from``. Set them from the config.

Deviations:
- Replay is ER (cross-entropy on the memory samples mixed into each batch), i.e. SparCL-ER, not
  SparCL-DER++: medcl's memory stores indices, not the logits DER++ needs.
- The current-batch cross-entropy does not mask other tasks' logits (the code does for
  ``seq-cifar10``); medcl's streams include domain-incremental ones where that is undefined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medcl.errors import ConfigError
from medcl.metrics.compute import TrainingFlops
from medcl.models.backbones import Backbone
from medcl.models.pruning import WeightMasks
from medcl.strategies.base import Batch, Classifier, Strategy, register_strategy
from medcl.strategies.data_removal import DataRemoval
from medcl.strategies.options import StrategyOptions

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory

__all__ = ["SparCL"]


@dataclass(frozen=True, kw_only=True)
class SparCLOptions(StrategyOptions):
    """Options of :class:`SparCL`."""

    sparsity: float = 0.8
    score_grad_weight: float = 0.5
    mask_every: int = 1
    regrow_gap: float = 0.01
    freeze_from: int = 9
    removal_fraction: float = 0.3
    removal_epochs: tuple[int, ...] = (1, 2, 3)
    grad_sparsity: float = 0.8
    grad_mask_every: int = 30
    seed: int = 0

    def check(self, component: str) -> None:
        s, gap, gs = self.sparsity, self.regrow_gap, self.grad_sparsity
        if not (0 <= s < 1 and 0 <= s + gap < 1 and 0 <= gs < 1):
            raise ConfigError(
                f"{component}: need sparsity, sparsity + regrow_gap and grad_sparsity in "
                f"[0, 1); got sparsity={s}, regrow_gap={gap}, grad_sparsity={gs}."
            )
        if self.mask_every < 1 or self.grad_mask_every < 1:
            raise ConfigError(
                f"{component}: mask_every and grad_mask_every must be >= 1; got "
                f"{self.mask_every} and {self.grad_mask_every}."
            )


@register_strategy("sparcl")
class SparCL(Strategy):
    """SparCL (TDM + DDR + DGM) with experience replay.

    Args:
        backbone: the feature extractor.
        sparsity: weight sparsity per masked layer.
        score_grad_weight: ``λ`` in TDM's importance ``|w| + λ|grad|``.
        mask_every: epochs between TDM mask updates.
        regrow_gap: TDM prunes to ``sparsity + regrow_gap`` and regrows to ``sparsity``.
        freeze_from: epoch (0-based) from which the mask stays fixed in an experience.
        removal_fraction: DDR's share of each experience removed in total (0 disables DDR).
        removal_epochs: epochs at whose start DDR removes a share.
        grad_sparsity: DGM's fraction of weight gradients zeroed (0 disables DGM).
        grad_mask_every: updates between DGM pattern refreshes.
        seed: seeds TDM's random regrowth.
    """

    uses_memory = True
    Options = SparCLOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        self.removal = DataRemoval(
            fraction=self.removal_fraction, epochs=self.removal_epochs, score="forgetting",
            component="strategy 'sparcl'",
        )  # fmt: skip
        stages = [f"net.{s.name}" for s in backbone.stages()]
        self.masks = WeightMasks(self.backbone, stages, structure="unstructured")
        self.masks.attach()
        self.masks.grad_observer = self._observe_grad
        self.register_buffer("flops_", torch.zeros((), dtype=torch.float64))
        self.register_buffer("images_", torch.zeros((), dtype=torch.long))
        self.counter: TrainingFlops | None = None
        self._generator = torch.Generator().manual_seed(self.seed)
        self._last_grad: dict[str, Tensor] = {}
        self._refresh = True
        self._step = 0
        self.masks.prune_({p: w.abs() for p, w in self._weights().items()}, self.sparsity)

    def _weights(self) -> dict[str, Tensor]:
        return {p: self.masks._weight(p).detach() for p in self.masks.layers}

    def _observe_grad(self, name: str, g: Tensor) -> None:
        """Hook: keep the last (weight-masked) gradient; refresh DGM's pattern when due."""
        self._last_grad[name] = g.detach()
        if self._refresh and self.grad_sparsity > 0:
            a = g.detach().abs().flatten().float()
            k = max(1, int(self.grad_sparsity * a.numel()))
            thresh = a.kthvalue(k).values
            self.masks.grad_masks[name] = g.detach().abs() > thresh

    # -- training ----------------------------------------------------------------------------
    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        model = Classifier(self.backbone, self.head)
        self.counter = TrainingFlops.refreshed(
            self.counter, model, tuple(exp.train.images.shape[1:])
        )
        self._step, self._refresh = 0, True

    def epoch_rows(self, epoch: int, num_rows: int) -> Tensor:
        """DDR removal, then TDM's mask update at the start of every ``mask_every``-th epoch."""
        if epoch == 0:
            self.removal.start(num_rows)
        elif epoch % self.mask_every == 0 and epoch < self.freeze_from and self._last_grad:
            scores = {
                p: w.abs() + self.score_grad_weight * self._last_grad.get(p, torch.zeros_like(w)).abs()
                for p, w in self._weights().items()
            }  # fmt: skip
            self.masks.prune_(scores, self.sparsity + self.regrow_gap)
            self.masks.regrow_(self.sparsity, self._generator)
        return self.removal.rows(epoch)

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Cross-entropy on the batch (current + replay samples); counts the pass's FLOPs."""
        if batch.index is not None:
            self.removal.observe(batch.index, correct=logits.argmax(1) == batch.y)
        self._refresh = self.grad_sparsity > 0 and self._step % self.grad_mask_every == 0
        if self._refresh:
            self.masks.grad_masks = {}
        self.images_ += len(batch.y)
        if self.counter is not None:
            wd = self.masks.layer_density()
            gd = dict(wd)
            if self.grad_sparsity > 0:  # at most (1 - grad_sparsity) of each layer's gradients
                gd = {p: min(d, 1 - self.grad_sparsity) for p, d in wd.items()}
            self.flops_ += self.counter.add(
                len(batch.y),
                weight_density={f"backbone.{k}": v for k, v in wd.items()},
                grad_density={f"backbone.{k}": v for k, v in gd.items()},
            )
        return F.cross_entropy(logits, batch.y)

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        self._step += 1
        self._refresh = False
        self.masks.apply_()

    def after_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        self._last_grad = {}
        self.masks.grad_masks = {}
