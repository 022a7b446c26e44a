"""SGM: stability-gap mitigation, four components on vanilla rehearsal's set-up.

Harun & Kanan, "Overcoming the Stability Gap in Continual Learning", TMLR 2024 (arXiv
2306.01904; authors' code github.com/yousuf907/SGM at 05aa8a6). SGM is vanilla rehearsal
(:mod:`medcl.strategies.rehearsal`: frozen front and plastic back, replay in every batch, the
BatchNorm policy, the optimiser, the base model, and their deviations from the paper) plus four
components, each switchable for ablations:

1. ``data_driven_init``: each new output unit's row is the mean of the L2-normalised
   penultimate features of its class (new experience's training set, before any update).
2. ``soft_targets``: cross-entropy against dynamic soft targets. Per class ``c``, a running mean
   ``m_c`` of the softmax of the samples of class ``c`` predicted correctly so far in the
   experience (uniform ``1/C`` until there is one) is the base target of old-class samples;
   new-class samples use the model's current (detached) softmax. In both, the wrongly predicted
   class is set to ``1/C``, the true class to 1, and the vector is renormalised.
3. ``lora``: LoRA (``peft``) on the pointwise (1x1) convolutions of the plastic blocks, rank 48,
   ``alpha`` 1 (scale 1/48) as the authors'; only the adapters and the head train. After each
   experience the adapters are merged and re-initialised (A: Kaiming, B: 0), so module
   structure and checkpoint keys never change.
4. ``freeze_old_units``: no gradient reaches the head rows of classes learned before.

Deviations and reconstructions (source in brackets):
- LoRA targets are the 1x1 convolutions of the back's blocks (timm ``conv_pw``/``conv_pwl``),
  the analogue of ConvNeXt's ``pwconv1``/``pwconv2`` [official code: convnext_v2_lora.py];
  ``conv_head`` is no block and stays frozen, like the authors' downsample layers. The rank is
  capped at a layer's narrowest width (narrow CNN layers have fewer than 48 channels)
  [reconstruction]. ``lora_targets: all`` adapts every ungrouped conv (and ``conv_head``).
- ``init_scale: old_rows`` (default) rescales each new row to the old rows' mean norm and sets its
  bias so that it outranks the old classes' top logit on only ``init_quantile`` (5%) of the
  replay memory's old exemplars (old biases' mean without a memory) [reconstruction: the literal
  rule, ``none``, puts rows of norm <= 1 next to trained rows and positive ReLU features share
  one direction, so new units win or lose on every input before any update; norm matching alone
  made new units win on every old input in a smoke run; the benchmark measures ``init_drop``].
  ``init_centering`` first centres each feature vector over its entries (the authors' features
  leave a LayerNorm with zero mean per sample) [reconstruction].
- ``C`` in the soft-target rule is the number of classes seen so far: medcl's head grows with the
  classes seen, while the authors' head has every class of the stream from the start and its
  future-class rows take part in the softmax and get gradients [reconstruction].
- Frozen rows are also restored after each step, so weight decay cannot move them (the authors'
  gradient hook alone lets AdamW's decoupled decay shrink old rows and biases, by about 4-5% per
  experience under their schedule) [reconstruction].
- In domain-incremental streams every class is old after experience 0: data-driven init is a
  no-op, every sample uses the running-mean targets, and freezing fixes the whole head.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.data.transforms import to_model_input
from medcl.errors import ConfigError
from medcl.models.backbones import Backbone
from medcl.models.heads import FrozenRows, class_mean_init, match_old_rows
from medcl.models.plasticity import inject_lora, merge_lora, split_units
from medcl.models.plasticity import lora_targets as find_lora_targets
from medcl.strategies.base import Batch, Classifier, register_strategy
from medcl.strategies.rehearsal import Rehearsal, RehearsalOptions

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory

__all__ = ["SGM", "SGMOptions", "class_mean_init", "dynamic_soft_targets", "merge_lora"]


def dynamic_soft_targets(probs: Tensor, labels: Tensor, class_means: Tensor, n_old: int) -> Tensor:
    """SGM's soft targets (the authors' ``soft_cross_entropy`` rule).

    Args:
        probs: ``(B, C)`` current softmax of the batch (detached).
        labels: ``(B,)`` true classes.
        class_means: ``(C, C)`` running mean softmax of correctly predicted samples per class.
        n_old: classes ``< n_old`` are old (base: ``class_means``); others use ``probs``.

    Returns:
        ``(B, C)`` targets: rows sum to 1 and the true class has the largest value.
    """
    C = probs.shape[1]
    rows = torch.arange(len(labels), device=labels.device)
    old = (labels < n_old)[:, None]
    target = torch.where(old, class_means[labels], probs).clone()
    target[rows, probs.argmax(1)] = 1.0 / C  # damp the (wrongly) predicted class
    target[rows, labels] = 1.0
    return target / target.sum(1, keepdim=True)


@dataclass(frozen=True, kw_only=True)
class SGMOptions(RehearsalOptions):
    """Options of :class:`SGM`: vanilla rehearsal's set-up plus the four components."""

    data_driven_init: bool = True
    init_centering: bool = True
    init_scale: Literal["old_rows", "none"] = "old_rows"
    init_quantile: float = 0.05
    soft_targets: bool = True
    lora: bool = True
    freeze_old_units: bool = True
    lora_rank: int = 48
    lora_alpha: float = 1.0
    lora_targets: Literal["pointwise", "all"] = "pointwise"

    def check(self, component: str) -> None:
        """The set-up's ranges and ``init_quantile``'s, stated in one message."""
        d, w, q = self.layer_decay, self.warmup, self.init_quantile
        if not (0 < d <= 1 and 0 < w < 1 and 0 <= q <= 1):
            raise ConfigError(
                f"strategy.layer_decay must be in (0, 1], strategy.warmup in (0, 1) and "
                f"strategy.init_quantile in [0, 1]; got layer_decay={d}, warmup={w}, "
                f"init_quantile={q}."
            )


@register_strategy("sgm")
class SGM(Rehearsal):
    """Stability-gap mitigation (see the module docstring).

    Args:
        backbone: the feature extractor.
        data_driven_init: initialise new output units from class-mean features.
        init_centering: centre each feature vector before the class means.
        init_scale: ``old_rows``: scale new rows to the old rows' mean norm and calibrate their
            biases on the memory; ``none``: the authors' literal rows (bias untouched).
        init_quantile: with ``old_rows``, the fraction of old exemplars on which each new unit
            may outrank the old classes' top logit right after initialisation.
        soft_targets: train against dynamic soft targets instead of hard labels.
        lora: train LoRA adapters on the back's pointwise convs instead of the back's weights.
        freeze_old_units: block gradients (and weight decay) to old classes' head rows.
        lora_rank: LoRA rank ``r`` (capped per layer at its narrowest width).
        lora_alpha: LoRA ``alpha`` (the delta is scaled by ``alpha / r``).
        lora_targets: ``pointwise`` (1x1 convs of the back's blocks) or ``all`` conv/linear.
        Others: the set-up, as :class:`~medcl.strategies.rehearsal.Rehearsal`.
    """

    Options = SGMOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        targets = find_lora_targets(self._back, kind=self.lora_targets) if self.lora else []
        if self.lora and (self.lora_rank < 1 or not targets):
            raise ConfigError(
                f"strategy.lora needs lora_rank >= 1 and layers to adapt in the plastic back; got "
                f"lora_rank={self.lora_rank}, trainable_stages={self.trainable_stages}, "
                f"{len(targets)} {self.lora_targets} layers. Raise trainable_stages, use "
                "lora_targets: all, or set lora: false."
            )
        self.lora_targets_ = list(targets)
        if self.lora:
            inject_lora(backbone, targets, rank=self.lora_rank, alpha=self.lora_alpha)
            # a unit that is itself a target (``lora_targets: all``: conv_head) is now wrapped
            self._front, self._back = split_units(backbone, self.trainable_stages)
        self._frozen: FrozenRows | None = None
        self._st_sum = self._st_count = torch.zeros(0)
        self._diag: list[dict] = []
        self._set_trainable()

    # -- set-up ------------------------------------------------------------------------------
    def _trains(self, name: str) -> bool:
        """LoRA adapters only while adapting with ``lora``; otherwise the weights, not LoRA."""
        is_lora = "lora_" in name
        return is_lora if self._adapting and self.lora else not is_lora

    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        super().before_experience(exp, memory)
        if not self._adapting:
            return
        num_classes = self.head.num_classes
        if self.data_driven_init and num_classes > self._n_old:
            self._init_new_units(exp, list(range(self._n_old, num_classes)), memory)
        if self.freeze_old_units and self._n_old:
            self._frozen = FrozenRows(self.head, self._n_old)
        self._st_sum = self.head.weight.new_zeros(num_classes, num_classes).float()
        self._st_count = self.head.weight.new_zeros(num_classes).float()

    @torch.no_grad()
    def _eval_features(self, images: Tensor) -> Tensor:
        """``(N, F)`` float32 penultimate features (eval mode) on the head's device."""
        was_training, device = self.training, self.head.weight.device
        self.eval()
        feats = torch.cat(
            [
                self.features(to_model_input(images[i : i + 256].to(device))).float()
                for i in range(0, len(images), 256)
            ]
        )
        self.train(was_training)
        return feats

    @torch.no_grad()
    def _init_new_units(self, exp: Experience, classes: list[int], memory: ReplayMemory) -> None:
        keep = torch.isin(exp.train.labels, torch.tensor(classes))
        feats = self._eval_features(exp.train.images[keep]).cpu()  # (N, F)
        rows = class_mean_init(feats, exp.train.labels[keep], classes, center=self.init_centering)
        w, b, n_old = self.head.weight, self.head.bias, self._n_old
        info = {"experience": exp.index, "new_classes": classes}
        info |= {"literal_row_norm": rows.norm(dim=1).tolist()}
        rows = rows.to(w)
        if self.init_scale == "old_rows" and n_old:  # old exemplars calibrate the new biases
            gathered = memory.gather(torch.arange(len(memory)))[0] if len(memory) else None
            old = self._eval_features(gathered) if gathered is not None else None  # (M, F)
            rows, b[classes] = match_old_rows(rows, w, b, n_old, old, self.init_quantile)
            info["old_row_norm"] = float(w[:n_old].norm(dim=1).mean())
        w[classes] = rows
        info["new_row_norm"] = w[classes].norm(dim=1).tolist()
        self._diag.append(info)

    # -- training ----------------------------------------------------------------------------
    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        if not (self.soft_targets and self._adapting):
            return F.cross_entropy(logits, batch.y)
        with torch.no_grad():
            probs = logits.detach().float().softmax(1)  # (B, C)
            C = probs.shape[1]
            means = torch.where(
                self._st_count[:, None] > 0,
                self._st_sum / self._st_count.clamp(min=1)[:, None],
                torch.full_like(self._st_sum, 1.0 / C),
            )  # (C, C)
            target = dynamic_soft_targets(probs, batch.y, means, self._n_old)
            # running means over the experience use this batch from the next update on
            correct = (probs.argmax(1) == batch.y).float()  # (B,)
            self._st_sum.index_add_(0, batch.y, probs * correct[:, None])
            self._st_count.index_add_(0, batch.y, correct)
        return -(target * logits.float().log_softmax(1)).sum(1).mean()

    def after_update(self, step: int) -> None:
        if self._frozen is not None:
            self._frozen.restore()  # undo what decoupled weight decay did to the old rows

    def after_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        if self._frozen is not None:
            self._frozen.release()
            self._frozen = None
        if self.lora:
            merge_lora(self.backbone)

    def diagnostics(self) -> dict:
        """Data-driven init per experience: new classes, literal/new/old row norms."""
        return {"init": list(self._diag)}

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))  # LoRA active: same outputs as the merged model

    def deployable_model(self) -> nn.Module:
        """Backbone with every LoRA delta merged and the adapters removed, plus the head."""
        if not self.lora:
            return super().deployable_model()
        backbone = copy.deepcopy(self.backbone)
        merge_lora(backbone, unload=True)
        return Classifier(backbone, copy.deepcopy(self.head))
