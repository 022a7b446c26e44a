"""Vanilla rehearsal: the stability-gap paper's baseline, and the set-up SGM builds on.

Harun & Kanan, "Overcoming the Stability Gap in Continual Learning", TMLR 2024 (arXiv
2306.01904; authors' code github.com/yousuf907/SGM at 05aa8a6). The backbone is split into a
frozen front and a plastic back (:func:`medcl.models.plasticity.split_units`: from the
``trainable_stages``-th last stage to the end); every batch mixes new data with replay.

``rehearsal`` is the paper's vanilla baseline: same base model, memory, plastic back and
BatchNorm policy as SGM; hard targets, full fine-tuning of the back, Linear-default new units;
SGM's optimiser (tuned vanilla) or the authors' unscheduled one (``optimizer: adamw_constant``).
SGM (:mod:`medcl.strategies.sgm`) is this set-up plus four components.

**BatchNorm policy (both arms, ``bn``).** Default ``"frozen"``: every BatchNorm runs in eval mode
with its statistics fixed, in the front and in the back, for SGM and vanilla alike (vanilla still
trains the back's affine parameters, as full fine-tuning does). ``"train"`` (ablation) lets the
back's BatchNorms update their statistics from the mixed batches in both arms.

**Optimiser (``optimizer``).** ``adamw_onecycle`` (default, SGM's): AdamW (``train.lr`` is the
peak rate, ``train.weight_decay`` the decoupled decay), OneCycle with ``warmup`` of the steps
rising (PyTorch's defaults otherwise). ``adamw_constant``: the same AdamW at the constant rate
``train.lr`` (no warm-up, no schedule): with hard targets, the authors' vanilla baseline.
``run``: the run's ``train.optimizer`` and ``train.scheduler``. Layer-wise decay applies to both
AdamW variants: the head gets ``lr``, the ``d``-th unit from the end ``lr * layer_decay ** d``;
the default ``layer_decay: 1`` is a uniform rate (what the authors' SGM ran; 0.9 is the tuned
ablation).

**Base model (``base``).** ``head``: experience 0 fits only the head on the pretrained backbone
(the paper's converged base network; benchmarks/stability_gap.py picks its budget on
validation). ``full``: experience 0 trains everything (from-scratch backbones); ``plastic``: the
back and head; ``none``: the SGM set-up applies from experience 0.

Deviations and reconstructions (source in brackets):
- Backbones are timm CNNs with BatchNorm (EfficientNet-Lite0 in the benchmark), not
  ConvNeXt-V2 with LayerNorm [reconstruction]; hence the BatchNorm policy above: LayerNorm has
  no running statistics and the authors freeze every norm layer of the front, so fixed
  BatchNorm statistics are the analogue of "only LoRA and the head move" [reconstruction].
- ``layer_decay`` defaults to 1 (a uniform rate): the authors' SGM code builds per-tensor 0.9
  groups but passes OneCycle a scalar ``max_lr``, which resets every group to one rate, so what
  ran is uniform [official code: train_sgm.py; PyTorch semantics]. With ``layer_decay < 1``
  (an ablation) the decay is per unit (a block or a trailing layer), not per parameter tensor
  (per tensor, the earliest LoRA tensors would get about 0.9^109 of the head's rate).
- Two vanilla arms: ``optimizer: adamw_constant`` is the authors' vanilla (hard CE, full
  fine-tuning of the back, AdamW at a constant rate, no warm-up) [official code:
  model_vanilla.py]; the default ``adamw_onecycle`` with ``layer_decay: 0.9`` is medcl's tuned
  vanilla, which differs from SGM only in SGM's components and the decay. The authors' vanilla
  code also builds per-tensor 0.9 groups and, having no scheduler, keeps them (the earliest
  tensors of their plastic part train at about 0.9^87 = 1e-4 of the head's rate); medcl's
  authors' arm uses the uniform rate of "full fine-tuning" [reconstruction; ``layer_decay``
  sets the per-unit analogue].
- The new-class data is cycled to reach the run's update budget (the authors' loader is not, so
  an experience runs min(1200, new-data batches) updates: few on small medical data sets)
  [reconstruction]; no augmentation in the benchmark, as the authors'.
"""

from __future__ import annotations

__all__ = ["Rehearsal", "RehearsalOptions"]

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from medcl.errors import ConfigError
from medcl.models.backbones import Backbone
from medcl.models.plasticity import (
    Unit,
    apply_bn_policy,
    layerwise_param_groups,
    onecycle,
    split_units,
)
from medcl.strategies.base import Strategy, register_strategy
from medcl.strategies.options import StrategyOptions

if TYPE_CHECKING:
    from medcl.config import TrainConfig
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory


@dataclass(frozen=True, kw_only=True)
class RehearsalOptions(StrategyOptions):
    """Options of :class:`Rehearsal`: the set-up both arms share (SGM's extend them)."""

    trainable_stages: int = 2
    bn: Literal["frozen", "train"] = "frozen"
    base: Literal["head", "plastic", "full", "none"] = "full"
    optimizer: Literal["adamw_onecycle", "adamw_constant", "run"] = "adamw_onecycle"
    layer_decay: float = 1.0
    warmup: float = 0.3

    def check(self, component: str) -> None:
        if not (0 < self.layer_decay <= 1 and 0 < self.warmup < 1):
            raise ConfigError(
                f"strategy.layer_decay must be in (0, 1] and strategy.warmup in (0, 1); got "
                f"layer_decay={self.layer_decay}, warmup={self.warmup}."
            )


@register_strategy("rehearsal")
class Rehearsal(Strategy):
    """Vanilla rehearsal (the paper's baseline): SGM's set-up without any of its components.

    Args:
        backbone: the feature extractor.
        trainable_stages: the plastic back starts at this many stages from the end.
        bn: BatchNorm policy of the back, ``frozen`` or ``train`` (the front is always frozen).
        base: what experience 0 trains: ``head``, ``plastic``, ``full``, or ``none`` (the
            set-up from experience 0).
        optimizer: ``adamw_onecycle`` (AdamW + OneCycle), ``adamw_constant`` (AdamW at a
            constant rate: the authors' vanilla) or ``run`` (the run's ``train.optimizer`` and
            ``train.scheduler``).
        layer_decay: layer-wise learning-rate decay per unit from the head backwards (1:
            uniform).
        warmup: fraction of each experience's updates in OneCycle's rising phase.
    """

    uses_memory = True
    Options = RehearsalOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        self._front, self._back = split_units(backbone, self.trainable_stages)
        self._adapting = False  # True while an experience is learned with the set-up
        self._n_old = 0
        self._set_trainable()

    # -- set-up ------------------------------------------------------------------------------
    def _trained_units(self) -> list[Unit]:
        """Units whose weights train now: the back while adapting, else what ``base`` says."""
        if self._adapting or self.base == "plastic":
            return self._back
        return [*self._front, *self._back] if self.base == "full" else []

    def _trains(self, name: str) -> bool:
        """Whether backbone parameter ``name`` of a trained unit trains (vanilla: every one)."""
        return True

    def _set_trainable(self) -> None:
        """requires_grad for the current phase: the trained units' weights and the head."""
        trained = {id(p) for u in self._trained_units() for p in u.module.parameters()}
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(id(p) in trained and self._trains(name))
        self.head.requires_grad_(True)

    def train(self, mode: bool = True) -> Rehearsal:
        """The BatchNorm policy (front always eval; the back per ``bn``) while training."""
        super().train(mode)
        if mode and not (self.base == "full" and not self._adapting):
            apply_bn_policy(self.backbone, self._trained_units(), self.bn)
        return self

    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        """Experience 0 trains the base model (``base``); later ones, the back and the head."""
        self._n_old = self.seen[-2].num_seen_classes if len(self.seen) > 1 else 0
        self._adapting = self._n_old > 0 or self.base == "none"
        self._set_trainable()

    def configure_optimizers(
        self, cfg: TrainConfig, params: list[nn.Parameter], total: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None] | None:
        """AdamW with layer-wise decay, under OneCycle (``adamw_onecycle``) or at a constant
        rate (``adamw_constant``); None for ``run`` (the trainer builds the run's)."""
        if self.optimizer == "run":
            return None
        units = [*self._front, *self._back]
        depth_of = {
            id(p): len(units) - i for i, u in enumerate(units) for p in u.module.parameters()
        }
        groups = layerwise_param_groups(
            params, depth_of, lr=cfg.lr, decay=self.layer_decay, weight_decay=cfg.weight_decay
        )
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if self.optimizer == "adamw_constant":
            return opt, None
        return opt, onecycle(opt, total, warmup=self.warmup)

    def diagnostics(self) -> dict:
        """Data-driven initialisation records per experience (SGM's component; none here)."""
        return {"init": []}
