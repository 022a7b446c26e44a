"""SGM: stability-gap mitigation with rehearsal, and the vanilla rehearsal it is compared with.

Harun & Kanan, "Overcoming the Stability Gap in Continual Learning", TMLR 2024 (arXiv
2306.01904; authors' code github.com/yousuf907/SGM). The network is split into a frozen early
part and plastic later blocks (``trainable_stages``); every batch mixes new data with replay.
SGM adds four components, each switchable for ablations:

1. ``data_driven_init``: each new output unit's weights are set to the mean of the L2-normalised
   penultimate features of its class (new experience's training set, before any update).
   With ``init_centering`` (default) each feature vector is first centred over its entries.
2. ``soft_targets``: cross-entropy against dynamic soft targets. Per class ``c``, a running mean
   ``m_c`` of the softmax of the samples of class ``c`` predicted correctly so far in the
   experience (uniform ``1/C`` until there is one) is the base target of old-class samples;
   new-class samples use the model's current (detached) softmax. In both, the wrongly predicted
   class is set to ``1/C``, the true class to 1, and the vector is renormalised.
3. ``lora``: LoRA (``peft``) on every conv/linear layer of the plastic blocks; only the adapters
   train. After each experience the adapters are merged into the weights and re-initialised
   (A: Kaiming, B: 0), so the module structure, and thus checkpoint keys, never change.
4. ``freeze_old_units``: no gradient reaches the head rows of classes learned before.

``rehearsal`` is the paper's vanilla baseline: same memory, same plastic blocks, hard targets,
full fine-tuning, Linear-default initialisation of new units.

Deviations from the paper (all documented choices):
- The paper starts from an ImageNet-pretrained network; here experience 0 plays that part: with
  ``full_first_experience`` (default) it trains the whole network with hard targets, and SGM's
  components act from experience 1 on. Set it False to adapt a pretrained backbone from the start.
- ``init_centering``: the authors' penultimate features come out of ConvNeXt's final LayerNorm
  (zero mean per sample). ResNet features (ReLU + pooling) are all positive, so every class mean
  shares their common direction and a new unit wins on every input: on medmnist-cross3 the
  literal rule (``init_centering: false``) cut old accuracy from 0.825 to 0.10 before any
  update, centring to 0.685 (random rows: 0.66; 200 test images, test_resnet). Centred rows sum
  to 0, so their logits are the same for raw and centred features.
- Backbones are timm/MONAI ResNets, not ConvNeXt-V2 (LayerNorm). With LoRA every BatchNorm of
  the backbone runs in eval mode (frozen statistics): the analogue of "only LoRA weights change".
  Frozen stages run in eval mode for every variant, as the paper's frozen part does.
- LoRA covers every conv/linear layer of the plastic stages (the authors': the two pointwise
  linears of each ConvNeXt block); rank/alpha default to 8/8 (their merge scales by 1/48)
  because these layers are narrow. The optimiser and schedule are the run's (paper: AdamW,
  OneCycle, layer-wise LR decay 0.9).
- ``C`` in the soft-target rule is the number of classes seen so far (the authors' head has all
  classes of the stream from the start).
- Frozen rows are also restored after each step, so weight decay cannot move them (the authors'
  gradient hook alone lets AdamW's decoupled decay shrink them).
- In domain-incremental streams every class is old after experience 0: data-driven init is a
  no-op, every sample uses the running-mean targets, and freezing fixes the whole head.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.data.transforms import to_model_input
from medcl.errors import ConfigError
from medcl.models.backbones import Backbone
from medcl.strategies.base import Batch, Classifier, Strategy, register_strategy

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.engine.memory import ReplayMemory

__all__ = ["SGM", "Rehearsal", "class_mean_init", "dynamic_soft_targets", "merge_lora"]

_ADAPTER = "default"
_LORA_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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


@torch.no_grad()
def merge_lora(module: nn.Module, *, unload: bool = False) -> int:
    """Fold every LoRA delta into its base layer; re-initialise the adapter or remove it.

    Args:
        module: a module with ``peft`` LoRA layers (modified in place).
        unload: replace each LoRA layer by its (merged) base layer instead of re-initialising.

    Returns:
        The number of layers merged.
    """
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        base = layer.get_base_layer()
        base.weight += layer.get_delta_weight(_ADAPTER).to(base.weight.dtype)
        if unload:
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, base)
        else:
            layer.reset_lora_parameters(_ADAPTER, True)  # A: Kaiming, B: 0 -> output unchanged
    return len(layers)


@register_strategy("sgm")
class SGM(Strategy):
    """Stability-gap mitigation (see the module docstring).

    Args:
        backbone: the feature extractor.
        data_driven_init: initialise new output units from class-mean features.
        init_centering: centre each feature vector before the class means (ResNet features).
        soft_targets: train against dynamic soft targets instead of hard labels.
        lora: train LoRA adapters on the plastic blocks instead of their weights.
        freeze_old_units: block gradients (and weight decay) to old classes' head rows.
        trainable_stages: how many of the backbone's last stages are plastic (the rest and the
            stem are frozen after experience 0); the head always trains.
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA ``alpha`` (the delta is scaled by ``alpha / r``).
        full_first_experience: experience 0 trains the whole network with hard targets (the
            paper's pretrained base model); False applies the SGM set-up from experience 0.
    """

    uses_memory = True

    def __init__(
        self,
        backbone: Backbone,
        *,
        data_driven_init: bool = True,
        init_centering: bool = True,
        soft_targets: bool = True,
        lora: bool = True,
        freeze_old_units: bool = True,
        trainable_stages: int = 2,
        lora_rank: int = 8,
        lora_alpha: float = 8.0,
        full_first_experience: bool = True,
    ) -> None:
        super().__init__(backbone)
        stages = backbone.stages()
        if not 0 <= trainable_stages <= len(stages):
            raise ConfigError(
                f"strategy.trainable_stages must be in 0..{len(stages)} (backbone "
                f"{backbone.name!r} has stages {[s.name for s in stages]}); got {trainable_stages}."
            )
        if lora and (trainable_stages == 0 or lora_rank < 1):
            raise ConfigError(
                f"strategy.lora needs trainable_stages >= 1 and lora_rank >= 1; got "
                f"trainable_stages={trainable_stages}, lora_rank={lora_rank}. Raise them or set "
                "lora: false."
            )
        self.data_driven_init, self.init_centering = data_driven_init, init_centering
        self.soft_targets = soft_targets
        self.lora, self.freeze_old_units = lora, freeze_old_units
        self.trainable_stages, self.full_first_experience = trainable_stages, full_first_experience
        self._plastic = [s.module for s in stages[len(stages) - trainable_stages :]]
        if lora:
            from peft import LoraConfig, inject_adapter_in_model

            targets = [
                f"net.{s.name}.{n}"
                for s in stages[len(stages) - trainable_stages :]
                for n, m in s.module.named_modules()
                if isinstance(m, _LORA_TYPES)
            ]
            inject_adapter_in_model(
                LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=targets), backbone
            )
        self._adapting = False  # True while an experience is learned with the SGM set-up
        self._n_old = 0
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._frozen_rows: tuple[Tensor, Tensor] | None = None
        self._st_sum = self._st_count = torch.zeros(0)
        self._set_trainable()

    # -- set-up ------------------------------------------------------------------------------
    def _set_trainable(self) -> None:
        """requires_grad for the current phase: everything but LoRA (base) or the plastic part."""
        plastic = {id(p) for m in self._plastic for p in m.parameters()}
        for name, p in self.backbone.named_parameters():
            is_lora = "lora_" in name
            if not self._adapting:
                p.requires_grad_(not is_lora)
            else:
                p.requires_grad_(id(p) in plastic and (is_lora if self.lora else True))
        self.head.requires_grad_(True)

    def train(self, mode: bool = True) -> SGM:
        """Frozen parts keep eval mode (BatchNorm statistics fixed) while adapting."""
        super().train(mode)
        if mode and self._adapting:
            if self.lora:
                self.backbone.eval()
            else:
                plastic = {id(m) for s in self._plastic for m in s.modules()}
                for m in self.backbone.modules():
                    if id(m) not in plastic and not list(m.children()):
                        m.eval()
        return self

    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        self._n_old = self.seen[-2].num_seen_classes if len(self.seen) > 1 else 0
        self._adapting = self._n_old > 0 or not self.full_first_experience
        self._set_trainable()
        if not self._adapting:
            return
        num_classes = self.head.num_classes
        if self.data_driven_init and num_classes > self._n_old:
            self._init_new_units(exp, list(range(self._n_old, num_classes)))
        if self.freeze_old_units and self._n_old:
            self._freeze_rows(self._n_old)
        self._st_sum = self.head.weight.new_zeros(num_classes, num_classes).float()
        self._st_count = self.head.weight.new_zeros(num_classes).float()

    @torch.no_grad()
    def _init_new_units(self, exp: Experience, classes: list[int]) -> None:
        keep = torch.isin(exp.train.labels, torch.tensor(classes))
        images, labels = exp.train.images[keep], exp.train.labels[keep]
        was_training, device = self.training, self.head.weight.device
        self.eval()
        feats = torch.cat(
            [
                self.features(to_model_input(images[i : i + 256]).to(device)).cpu()
                for i in range(0, len(images), 256)
            ]
        )  # (N, F)
        self.train(was_training)
        rows = class_mean_init(feats, labels, classes, center=self.init_centering)
        self.head.weight[classes] = rows.to(self.head.weight)

    def _freeze_rows(self, n_old: int) -> None:
        """Zero the gradient of rows ``< n_old``; keep a copy to undo weight decay."""
        mask = torch.ones(self.head.num_classes, 1)
        mask[:n_old] = 0
        self._hooks = [
            self.head.weight.register_hook(lambda g: g * mask.to(g)),
            self.head.bias.register_hook(lambda g: g * mask[:, 0].to(g)),
        ]
        self._frozen_rows = (
            self.head.weight[:n_old].detach().clone(),
            self.head.bias[:n_old].detach().clone(),
        )

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
        return -(target * logits.log_softmax(1)).sum(1).mean()

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
        trainable_stages: how many of the backbone's last stages train after experience 0.
        full_first_experience: experience 0 trains the whole network.
    """

    def __init__(
        self, backbone: Backbone, *, trainable_stages: int = 2, full_first_experience: bool = True
    ) -> None:
        super().__init__(
            backbone,
            data_driven_init=False,
            soft_targets=False,
            lora=False,
            freeze_old_units=False,
            trainable_stages=trainable_stages,
            full_first_experience=full_first_experience,
        )
