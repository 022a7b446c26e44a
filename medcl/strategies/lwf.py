"""LwF: Learning without Forgetting.

Li & Hoiem, "Learning without Forgetting", ECCV 2016 / IEEE TPAMI 40(12), 2018.

Before each experience the model is snapshotted (a frozen copy in eval mode). While learning the
new experience, the outputs of the old classes are kept close to the snapshot's on the CURRENT
batch (no stored data): the loss is

    CE(logits, y) + α · T^p · KL( softmax(z_old / T) ‖ softmax(ẑ_old / T) )

where ``z_old`` are the snapshot's logits of the classes known before the experience, ``ẑ_old``
the current model's, ``T = 2`` the paper's temperature, ``α = λ_o = 1`` the paper's weight and
``p = 2`` only if ``t_squared=True`` (Hinton et al.'s gradient rescaling; the paper does not use it).
Optionally the new head rows are first trained alone ("warm-up", the paper's Sec. 3 "first freeze
θ_s and θ_o and train θ_n to convergence").

Deviations from the paper and choices it leaves open:
- **KL instead of the "modified cross-entropy".** The paper minimises
  ``−Σ softmax(z/T) log softmax(ẑ/T)``; KL differs from it by the snapshot's entropy, a constant
  in the model's parameters, so the gradients (and the training) are identical; KL is reported
  because it is zero when the model matches its snapshot.
- **Single head.** The paper distils each old task's separate head (task-incremental). medcl's
  heads are one expanding linear layer, so the "old task outputs" are the old classes' logits
  (the LwF.MC form of Rebuffi et al., iCaRL 2017); in domain-incremental streams every logit is old.
- **Warm-up** trains only the new head rows on features of the raw (un-augmented) training images
  computed once with the frozen backbone in eval mode, for ``warmup_epochs`` epochs of SGD with
  ``warmup_lr`` (the paper trains to convergence with its own schedule). It is skipped when the
  experience brings no new class. ``warmup_epochs=0`` (default) disables it.
- **Targets on the fly.** The paper records the old model's responses once, before training;
  here the frozen snapshot is run on each (augmented) batch, which gives the same targets without
  augmentation and matching targets with it. The snapshot runs in eval mode (running BatchNorm
  statistics) while the model trains in train mode (batch statistics), so with BatchNorm the
  term is not zero at the first update when the new data's statistics differ from the old.
- The snapshot is not checkpointed: it is re-taken at the start of each experience, which is
  exactly the state a resumed run needs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.data.transforms import to_model_input
from medcl.errors import ConfigError
from medcl.models.backbones import Backbone
from medcl.strategies.base import Batch, Classifier, Strategy, register_strategy
from medcl.strategies.options import StrategyOptions

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory

__all__ = ["LwF", "distillation_kl"]


def distillation_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Mean over the batch of ``KL(softmax(teacher/T) ‖ softmax(student/T))``.

    Args:
        student: ``(B, K)`` logits of the model being trained.
        teacher: ``(B, K)`` logits of the snapshot (no gradient flows into them).
        temperature: ``T`` (> 0).

    Returns:
        A scalar; zero iff the two distributions agree on every sample.
    """
    log_p = F.log_softmax(teacher.detach() / temperature, dim=1)
    log_q = F.log_softmax(student / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


@dataclass(frozen=True, kw_only=True)
class LwFOptions(StrategyOptions):
    """Options of :class:`LwF`."""

    alpha: float = 1.0
    temperature: float = 2.0
    t_squared: bool = False
    warmup_epochs: int = 0
    warmup_lr: float = 0.01

    def check(self, component: str) -> None:
        if self.alpha < 0 or self.temperature <= 0 or self.warmup_epochs < 0 or self.warmup_lr <= 0:
            raise ConfigError(
                f"{component}: need alpha >= 0, temperature > 0, warmup_epochs >= 0 and "
                f"warmup_lr > 0; got alpha={self.alpha}, temperature={self.temperature}, "
                f"warmup_epochs={self.warmup_epochs}, warmup_lr={self.warmup_lr}."
            )


@register_strategy("lwf")
class LwF(Strategy):
    """Learning without Forgetting: distil the previous model's old-class outputs.

    Args:
        backbone: the feature extractor.
        alpha: ``λ_o``, weight of the distillation term (``0`` turns LwF into fine-tuning).
        temperature: ``T`` of the softened softmax.
        t_squared: multiply the term by ``T²`` (Hinton et al.); off in the paper.
        warmup_epochs: epochs of training only the new head rows before the experience (0: off).
        warmup_lr: SGD learning rate of the warm-up.
    """

    Options = LwFOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        # set via object.__setattr__: not a submodule, so neither trained nor checkpointed
        object.__setattr__(self, "teacher", None)
        self.num_old_classes = 0

    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        """Snapshot the model learned so far (frozen, eval mode), then optionally warm up."""
        if len(self.seen) < 2:  # first experience: nothing to preserve
            object.__setattr__(self, "teacher", None)
            self.num_old_classes = 0
            return
        self.num_old_classes = self.seen[-2].num_seen_classes
        teacher = copy.deepcopy(Classifier(self.backbone, self.head)).eval()
        teacher.requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)
        if self.warmup_epochs and self.num_seen_classes > self.num_old_classes:
            self._warm_up(exp)

    def penalty(self, batch: Batch, logits: Tensor) -> Tensor:
        """``α · [T²] · KL`` between the snapshot's and the model's old-class outputs on ``batch``."""
        if self.teacher is None or self.alpha == 0 or self.num_old_classes == 0:
            return logits.new_zeros(())
        k = self.num_old_classes
        with torch.no_grad():
            target = self.teacher(batch.x)[:, :k]  # (B, k) recorded responses of the old model
        scale = self.alpha * (self.temperature**2 if self.t_squared else 1.0)
        return scale * distillation_kl(logits[:, :k], target, self.temperature)

    def after_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        object.__setattr__(self, "teacher", None)  # free the copy; re-taken next experience

    def _warm_up(self, exp: Experience, batch_size: int = 64) -> None:
        """Train only the new head rows on frozen features (the paper's warm-up step)."""
        k, device = self.num_old_classes, self.head.weight.device
        was_training = self.training
        self.eval()
        with torch.no_grad():
            feats = torch.cat(
                [
                    self.backbone(to_model_input(exp.train.images[i : i + 256]).to(device))
                    for i in range(0, len(exp.train), 256)
                ]
            )  # (N, F)
        labels = exp.train.labels.to(device)
        w_new = nn.Parameter(self.head.weight.data[k:].clone())  # (K_new, F)
        b_new = nn.Parameter(self.head.bias.data[k:].clone())
        w_old, b_old = self.head.weight.data[:k], self.head.bias.data[:k]
        opt = torch.optim.SGD([w_new, b_new], lr=self.warmup_lr, momentum=0.9)
        g = torch.Generator().manual_seed(exp.index)
        for _ in range(self.warmup_epochs):
            for idx in torch.randperm(len(feats), generator=g).split(batch_size):
                f = feats[idx]
                logits = torch.cat([f @ w_old.T + b_old, f @ w_new.T + b_new], 1)  # (b, K)
                loss = F.cross_entropy(logits, labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            self.head.weight[k:] = w_new
            self.head.bias[k:] = b_new
        self.train(was_training)
