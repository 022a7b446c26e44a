"""SGM: stability-gap mitigation with rehearsal, and the vanilla rehearsal it is compared with.

Harun & Kanan, "Overcoming the Stability Gap in Continual Learning", TMLR 2024 (arXiv
2306.01904; authors' code github.com/yousuf907/SGM at 05aa8a6; "pitfall N" below refers to the
project's method notes, shared/docs/methods/sgm.md, section 6). The backbone is split into a
frozen front and a plastic back (:func:`medcl.models.plasticity.split_units`: from the
``trainable_stages``-th last stage to the end); every batch mixes new data with replay. SGM adds
four components, each switchable for ablations:

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

``rehearsal`` is the paper's vanilla baseline: same base model, memory, plastic back, optimiser
and BatchNorm policy; hard targets, full fine-tuning of the back, Linear-default new units.

**BatchNorm policy (both arms, ``bn``).** Default ``"frozen"``: every BatchNorm runs in eval mode
with its statistics fixed, in the front and in the back, for SGM and vanilla alike (vanilla still
trains the back's affine parameters, as full fine-tuning does). ``"train"`` (ablation) lets the
back's BatchNorms update their statistics from the mixed batches in both arms.

**Optimiser (both arms, ``optimizer: adamw_onecycle``).** AdamW (``train.lr`` is the peak rate,
``train.weight_decay`` the decoupled decay), OneCycle with ``warmup`` of the steps rising
(PyTorch's defaults otherwise) and layer-wise decay: the head gets ``lr``, the ``d``-th unit from
the end ``lr * layer_decay ** d``. ``optimizer: run`` uses the run's optimiser and schedule.

**Base model (``base``).** ``head``: experience 0 fits only the head on the pretrained backbone
(the paper's converged base network; benchmarks/stability_gap.py picks its budget on
validation). ``full``: experience 0 trains everything (from-scratch backbones); ``plastic``: the
back and head; ``none``: the SGM set-up applies from experience 0.

Deviations and reconstructions (source in brackets):
- Backbones are timm CNNs with BatchNorm (EfficientNet-Lite0 in the benchmark), not
  ConvNeXt-V2 with LayerNorm [reconstruction]; hence the BatchNorm policy above
  [docs/methods/sgm.md pitfall 1].
- LoRA targets are the 1x1 convolutions of the back's blocks (timm ``conv_pw``/``conv_pwl``),
  the analogue of ConvNeXt's ``pwconv1``/``pwconv2`` [official code: convnext_v2_lora.py];
  ``conv_head`` is no block and stays frozen, like the authors' downsample layers. The rank is
  capped at a layer's narrowest width [pitfall 2]. ``lora_targets: all`` adapts every
  ungrouped conv (and ``conv_head``).
- Layer-wise decay is per unit (a block or a trailing layer), not per parameter tensor, and it is
  applied by default [issue 14]: the authors' scalar OneCycle ``max_lr`` silently made it
  uniform, so what they ran is ``layer_decay: 1`` [pitfall 3].
- Vanilla rehearsal uses the same AdamW + OneCycle + layer-wise decay as SGM [issue 14]; the
  authors' vanilla baseline has no scheduler [official code: model_vanilla.py].
- ``init_scale: old_rows`` (default) rescales each new row to the old rows' mean norm and sets its
  bias so that it outranks the old classes' top logit on only ``init_quantile`` (5%) of the
  replay memory's old exemplars (old biases' mean without a memory) [reconstruction: the literal
  rule, ``none``, puts rows of norm <= 1 next to trained rows and positive ReLU features share
  one direction, so new units win or lose on every input before any update; norm matching alone
  made new units win on every old input in a smoke run; the benchmark measures ``init_drop``].
  ``init_centering`` first centres each feature vector over its entries (the authors' features
  leave a LayerNorm with zero mean per sample) [reconstruction].
- ``C`` in the soft-target rule is the number of classes seen so far (the authors' head has all
  classes of the stream from the start) [pitfall 5].
- Frozen rows are also restored after each step, so weight decay cannot move them (the authors'
  gradient hook alone lets AdamW's decoupled decay shrink them) [pitfall 4].
- The new-class data is cycled to reach the run's update budget [pitfall 6]; no augmentation in
  the benchmark, as the authors'.
- In domain-incremental streams every class is old after experience 0: data-driven init is a
  no-op, every sample uses the running-mean targets, and freezing fixes the whole head.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.data.transforms import to_model_input
from medcl.errors import ConfigError
from medcl.models.backbones import Backbone
from medcl.models.plasticity import (
    apply_bn_policy,
    inject_lora,
    layerwise_param_groups,
    merge_lora,
    onecycle,
    split_units,
)
from medcl.models.plasticity import lora_targets as find_lora_targets
from medcl.strategies.base import Batch, Classifier, Strategy, register_strategy

if TYPE_CHECKING:
    from medcl.config import TrainConfig
    from medcl.data.experience import Experience
    from medcl.engine.memory import ReplayMemory

__all__ = ["SGM", "Rehearsal", "class_mean_init", "dynamic_soft_targets", "merge_lora"]


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


@torch.no_grad()
def class_mean_init(
    features: Tensor, labels: Tensor, classes: list[int], *, center: bool = True
) -> Tensor:
    """Rows for new output units: mean L2-normalised feature of each class.

    Args:
        features: ``(N, F)`` penultimate features; labels: ``(N,)``; classes: the new classes.
        center: subtract each feature vector's mean over its ``F`` entries first (what the
            authors' ConvNeXt LayerNorm features already are; see the module docstring).

    Returns:
        ``(len(classes), F)``; a class without samples gets a zero row.
    """
    f = features.float()
    f = F.normalize(f - f.mean(1, keepdim=True) if center else f, dim=1)
    out = f.new_zeros(len(classes), f.shape[1])
    for i, c in enumerate(classes):
        mask = labels == c
        if mask.any():
            out[i] = f[mask].mean(0)
    return out


@register_strategy("sgm")
class SGM(Strategy):
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
        trainable_stages: the plastic back starts at this many stages from the end.
        lora_rank: LoRA rank ``r`` (capped per layer at its narrowest width).
        lora_alpha: LoRA ``alpha`` (the delta is scaled by ``alpha / r``).
        lora_targets: ``pointwise`` (1x1 convs of the back's blocks) or ``all`` conv/linear.
        bn: BatchNorm policy of the back, ``frozen`` or ``train`` (the front is always frozen).
        base: what experience 0 trains: ``head``, ``plastic``, ``full``, or ``none`` (SGM's
            set-up from experience 0).
        optimizer: ``adamw_onecycle`` (AdamW, OneCycle, layer-wise decay) or ``run`` (the run's
            ``train.optimizer`` and ``train.scheduler``).
        layer_decay: layer-wise learning-rate decay per unit from the head backwards.
        warmup: fraction of each experience's updates in OneCycle's rising phase.
    """

    uses_memory = True

    def __init__(
        self,
        backbone: Backbone,
        *,
        data_driven_init: bool = True,
        init_centering: bool = True,
        init_scale: Literal["old_rows", "none"] = "old_rows",
        init_quantile: float = 0.05,
        soft_targets: bool = True,
        lora: bool = True,
        freeze_old_units: bool = True,
        trainable_stages: int = 2,
        lora_rank: int = 48,
        lora_alpha: float = 1.0,
        lora_targets: Literal["pointwise", "all"] = "pointwise",
        bn: Literal["frozen", "train"] = "frozen",
        base: Literal["head", "plastic", "full", "none"] = "full",
        optimizer: Literal["adamw_onecycle", "run"] = "adamw_onecycle",
        layer_decay: float = 0.9,
        warmup: float = 0.3,
    ) -> None:
        super().__init__(backbone)
        if not (0 < layer_decay <= 1 and 0 < warmup < 1 and 0 <= init_quantile <= 1):
            raise ConfigError(
                f"strategy.layer_decay must be in (0, 1], strategy.warmup in (0, 1) and "
                f"strategy.init_quantile in [0, 1]; got layer_decay={layer_decay}, "
                f"warmup={warmup}, init_quantile={init_quantile}."
            )
        self._front, self._back = split_units(backbone, trainable_stages)
        targets = find_lora_targets(self._back, kind=lora_targets) if lora else []
        if lora and (lora_rank < 1 or not targets):
            raise ConfigError(
                f"strategy.lora needs lora_rank >= 1 and layers to adapt in the plastic back; got "
                f"lora_rank={lora_rank}, trainable_stages={trainable_stages}, {len(targets)} "
                f"{lora_targets} layers. Raise trainable_stages, use lora_targets: all, or set "
                "lora: false."
            )
        self.data_driven_init, self.init_centering = data_driven_init, init_centering
        self.init_scale, self.init_quantile, self.soft_targets = (
            init_scale,
            init_quantile,
            soft_targets,
        )
        self.lora, self.freeze_old_units, self.bn = lora, freeze_old_units, bn
        self.trainable_stages, self.base, self.optimizer = trainable_stages, base, optimizer
        self.layer_decay, self.warmup = layer_decay, warmup
        self.lora_targets_ = list(targets)
        if lora:
            inject_lora(backbone, targets, rank=lora_rank, alpha=lora_alpha)
            # a unit that is itself a target (``lora_targets: all``: conv_head) is now wrapped
            self._front, self._back = split_units(backbone, trainable_stages)
        self._adapting = False  # True while an experience is learned with the SGM set-up
        self._n_old = 0
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._frozen_rows: tuple[Tensor, Tensor] | None = None
        self._st_sum = self._st_count = torch.zeros(0)
        self._diag: list[dict] = []
        self._set_trainable()

    # -- set-up ------------------------------------------------------------------------------
    def _trained_units(self) -> list:
        """Units whose weights train now: the back while adapting, else what ``base`` says."""
        if self._adapting or self.base == "plastic":
            return self._back
        return [*self._front, *self._back] if self.base == "full" else []

    def _set_trainable(self) -> None:
        """requires_grad for the current phase: LoRA only (SGM) or the trained units' weights."""
        trained = {id(p) for u in self._trained_units() for p in u.module.parameters()}
        for name, p in self.backbone.named_parameters():
            is_lora = "lora_" in name
            want_lora = self._adapting and self.lora
            p.requires_grad_(id(p) in trained and (is_lora if want_lora else not is_lora))
        self.head.requires_grad_(True)

    def train(self, mode: bool = True) -> SGM:
        """The BatchNorm policy (front always eval; the back per ``bn``) while training."""
        super().train(mode)
        if mode and not (self.base == "full" and not self._adapting):
            apply_bn_policy(self.backbone, self._trained_units(), self.bn)
        return self

    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        self._n_old = self.seen[-2].num_seen_classes if len(self.seen) > 1 else 0
        self._adapting = self._n_old > 0 or self.base == "none"
        self._set_trainable()
        if not self._adapting:
            return
        num_classes = self.head.num_classes
        if self.data_driven_init and num_classes > self._n_old:
            self._init_new_units(exp, list(range(self._n_old, num_classes)), memory)
        if self.freeze_old_units and self._n_old:
            self._freeze_rows(self._n_old)
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
        if self.init_scale == "old_rows" and n_old:
            old_norm = w[:n_old].norm(dim=1).mean()
            rows = F.normalize(rows, dim=1) * old_norm  # (K, F)
            bias = b[:n_old].mean().expand(len(classes))
            if len(memory):  # each new unit outranks the old prediction on few old exemplars
                mf = self._eval_features(memory.gather(torch.arange(len(memory)))[0])  # (M, F)
                top_old = (mf @ w[:n_old].T + b[:n_old]).max(1).values  # (M,)
                margin = top_old[:, None] - mf @ rows.T  # (M, K): bias at which unit k ties
                bias = torch.quantile(margin, self.init_quantile, dim=0)  # (K,)
            b[classes] = bias
            info["old_row_norm"] = float(old_norm)
        w[classes] = rows
        info["new_row_norm"] = w[classes].norm(dim=1).tolist()
        self._diag.append(info)

    def _freeze_rows(self, n_old: int) -> None:
        """Zero the gradient of rows ``< n_old``; keep a copy to undo weight decay."""
        mask = torch.ones(self.head.num_classes, 1, device=self.head.weight.device)
        mask[:n_old] = 0
        self._hooks = [
            self.head.weight.register_hook(lambda g: g * mask.to(g)),
            self.head.bias.register_hook(lambda g: g * mask[:, 0].to(g)),
        ]
        self._frozen_rows = (
            self.head.weight[:n_old].detach().clone(),
            self.head.bias[:n_old].detach().clone(),
        )

    def configure_optimizers(
        self, cfg: TrainConfig, params: list[nn.Parameter], total: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None] | None:
        """AdamW + OneCycle with layer-wise decay (``optimizer: adamw_onecycle``), else None."""
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
        return opt, onecycle(opt, total, warmup=self.warmup)

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

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        if self._frozen_rows is not None:
            w, b = self._frozen_rows
            self.head.weight[: len(w)] = w
            self.head.bias[: len(b)] = b

    def after_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._frozen_rows = [], None
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


@register_strategy("rehearsal")
class Rehearsal(SGM):
    """Vanilla rehearsal (the paper's baseline): SGM's set-up without any of its components.

    Args:
        backbone: the feature extractor.
        trainable_stages: the plastic back starts at this many stages from the end.
        bn: BatchNorm policy of the back (the same rule as SGM's).
        base: what experience 0 trains (as SGM's).
        optimizer: ``adamw_onecycle`` or ``run`` (as SGM's).
        layer_decay: layer-wise learning-rate decay (as SGM's).
        warmup: OneCycle warm-up fraction (as SGM's).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        trainable_stages: int = 2,
        bn: Literal["frozen", "train"] = "frozen",
        base: Literal["head", "plastic", "full", "none"] = "full",
        optimizer: Literal["adamw_onecycle", "run"] = "adamw_onecycle",
        layer_decay: float = 0.9,
        warmup: float = 0.3,
    ) -> None:
        super().__init__(
            backbone,
            data_driven_init=False,
            soft_targets=False,
            lora=False,
            freeze_old_units=False,
            trainable_stages=trainable_stages,
            bn=bn,
            base=base,
            optimizer=optimizer,
            layer_decay=layer_decay,
            warmup=warmup,
        )
