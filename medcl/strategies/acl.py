"""ACL (one adapter set per experience), the mechanics DynaMMo merges (flat inference cost).

Papers: W. Zhang et al., "Adapter Learning in Pretrained Feature Extractor for Continual Learning
of Diseases" (ACL), MICCAI 2023; M. A. Qazi et al., "DynaMMo: Dynamic Model Merging for Efficient
Class Incremental Learning for Medical Images", MIUA 2024 (arXiv:2404.14099), whose reference
code implements both methods and is followed here. DynaMMo (:mod:`medcl.strategies.dynammo`) is
this module's :class:`ACL` plus the merge step.

Per experience ``t`` (``grow``): a residual conv adapter set at the stage inputs of the frozen
backbone (:mod:`medcl.models.adapters`), initialised from set ``t-1``, and a head over ``t``'s
classes plus one "others" output. Stage 1 (the trainer's loop): set ``t`` and head ``t`` learn
``t``'s data + replay memory, every sample of another experience labelled "others". Merge
(``after_experience``, DynaMMo only): all sets -> one (:mod:`medcl.models.merging`). Stage 2:
with the adapters frozen, all heads are re-tuned on a class-balanced set; head ``j``'s targets
are its classes for experience ``j``'s samples and "others" for the rest. Inference
(:class:`RoutedAdapterModel`): features once with the merged set (ACL: once per set), every
head, route to the head with the lowest "others" probability, predict within it.

Ablations: ``acl`` (no merge), ``merge``, ``init_from_previous``, ``retune_epochs=0`` (no stage
2), ``use_adapters=False`` (frozen features + heads), ``stage1_memory``, ``others_fraction``,
``adapter_width`` (narrower adapters; see :mod:`medcl.strategies.dynammo`).

Stage-1 "others" samples (``stage1_memory="join"``, default): the replay memory is joined to the
experience's training set and shuffled with it, as the reference code builds stage 1's data set
(``ReplayBank`` exemplars appended to the new task's training set, ``methods/multi_steps/acl.py``
at c8b2d5d), so "others" make up ``|M| / (|M| + |D_t|)`` of the samples; ``others_fraction``
resamples the memory to another share, and ``"batch"`` instead adds ``memory.replay_batch_size``
memory samples to every batch (medcl's replay convention; not the reference's).

Stage 2's class-balanced set: the memory plus, per new class, ``memory.size // G`` samples (``G``
(experience, class) groups in the memory; the reference's ``memory_size // old classes``) chosen
by iCaRL herding on the merged-adapter features in eval mode (the reference's ``ReplayBank``,
whose ``_extract_vectors`` calls ``model.eval()``); the memory update that follows herds on the
same features, read from :attr:`Strategy.feature_cache`.

Deviations (everything else follows the paper and its reference code):

- Backbone: the paper freezes an ImageNet ResNet-18 (torchvision). ``backbone_init="pretrained"``
  freezes the backbone as built, weights and BatchNorm statistics, from experience 0 on
  (``model.pretrained``, e.g. the offline ImageNet EfficientNet-Lite0, or
  ``model.checkpoint_path``). Offline without weights, ``"first_experience"`` trains the backbone
  during experience 0 *jointly* with adapter set 0 and head 0 (no "others" samples exist yet:
  plain supervised training), then freezes it for good.
- Adapters sit at the inputs of the backbone's feature stages after the first (ResNet:
  ``layer1..4``, as the reference; EfficientNet: ``blocks.1, .2, .4, .6``, the stride changes
  timm reports; the reference's MobileNet-V2 uses the same rule), with input channels measured
  on a dry forward pass. Inputs are 64 px by default on CPU (the paper: 224; see
  ``configs/*-dynammo.yaml``).
- Head ``t`` is trained in stage 1 and re-tuned in stage 2 (the reference trains a temporary
  head in stage 1 and a fresh head ``t`` in stage 2). Stage 2 uses Adam on features cached once
  (no augmentation: the heads are linear, so re-tuning costs one forward pass over the set) and
  sums the cross-entropy of every head (the reference skips heads absent from a batch). Its
  defaults (30 epochs, lr 1e-2) are ours: with 10 epochs at 1e-3 the stage-2 loss of head 0,
  whose "others" output never fired in experience 0, stayed high and routing failed. As in the
  reference, stage 2 is skipped after the first experience and without a replay memory.
- "others" means "from another experience", so domain-incremental streams (same classes at
  every site) get one head per site and routing picks the site.
- Scores (the paper only needs the argmax): ``predict`` returns the log of
  ``sum_j s_j p_j(c | not others)`` normalised over the seen classes, ``s_j = 1`` for the routed
  head and ``1e-6`` for the others: the routed head's within-head distribution up to 1e-6 (also
  when heads share classes, domain-incremental), while non-routed heads keep their rankings
  (task-aware accuracy, AUROC).
- Adapter convolutions are padded and have no bias (see :mod:`medcl.models.adapters`).
- ``head_lr``: the head's own stage-1 rate. SGD on a linear head is stable only below
  ``2(1 + momentum) / lambda`` (``lambda``: top Hessian eigenvalue, ~half the features' second
  moment along their mean): ~0.0025 for EfficientNet-Lite0's 1280 features, under the paper's
  0.01 (set for ResNet-18's 512); see ``benchmarks/dynammo_recipe.py``.
"""

from __future__ import annotations

__all__ = ["ACL", "ACLOptions", "BackboneInit"]

import copy
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.data.samples import SampleSet
from medcl.errors import ConfigError
from medcl.models.adapters import AdapterSet, adapter_drift, forward_with_adapters
from medcl.models.backbones import Backbone
from medcl.models.routing import OthersHead, RoutedAdapterModel, balanced_retune_set, retune_heads
from medcl.strategies.acl_options import ACLOptions, BackboneInit
from medcl.strategies.base import Batch, ExperienceInfo, Strategy, register_strategy

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory


@register_strategy("acl")
class ACL(Strategy):
    """ACL: per-experience adapters and "others" heads, no merging (inference grows with T).

    Args:
        backbone: feature extractor (frozen; see ``backbone_init``).
        backbone_init: ``"pretrained"`` freezes it as built, from experience 0 on (needs
            ``model.pretrained`` or ``model.checkpoint_path``); ``"checkpoint"`` freezes it as
            built whatever its weights; ``"first_experience"`` trains it during experience 0,
            then freezes it.
        alpha_init: initial adapter scale.
        adapter_width: each adapter's hidden channels as a share of its stage's channels,
            ``max(1, round(adapter_width * c))``, in (0, 1]; 1.0 is the reference (full width).
        init_from_previous: initialise set ``t`` from set ``t-1`` (False: from the initial set).
        use_adapters: False is the "no adapters" ablation: frozen features, heads only.
        stage1_memory: ``"join"`` (the reference: memory joined to the training set) or
            ``"batch"`` (replay samples added to every batch).
        others_fraction: with ``"join"``, resample the memory so that "others" make up this
            share of stage 1's samples (None: the memory once, the reference's proportion).
        retune_epochs: stage-2 epochs over the balanced set (0 switches stage 2 off).
        retune_lr: stage-2 Adam learning rate.
        retune_batch_size: stage-2 batch size.
        head_lr: stage-1 learning rate of the head (None: ``train.lr``, as the adapters).
    """

    uses_memory = True
    Options = ACLOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        del self.head  # replaced by one OthersHead per experience
        if self.backbone_init == "pretrained" and backbone.preprocessing.source == "random":
            raise ConfigError(
                f"strategy {self.name!r}: backbone_init {self.backbone_init!r} freezes the "
                "backbone as built, but it has random weights. Set model.pretrained (e.g. "
                "'efficientnet_lite0' with model.backbone tf_efficientnet_lite0) or "
                "model.checkpoint_path, or use backbone_init: first_experience."
            )
        self.uses_memory = self.stage1_memory == "batch"  # "join": memory in the training set
        self._memory: ReplayMemory | None = None
        self.init_set = AdapterSet.for_backbone(
            backbone, alpha_init=self.alpha_init, width=self.adapter_width
        )  # every other set is a copy of it: grow, merged_set, a rebuilt checkpoint
        self.init_set.requires_grad_(False)
        self.adapter_sets, self.heads = nn.ModuleList(), nn.ModuleList()
        self.register_buffer("train_sizes_", torch.zeros(0))  # (T,) samples per experience
        self._routing: dict[str, Any] | None = None  # after stage 2: routing_accuracy's record
        self._train_backbone = False
        backbone.requires_grad_(False)

    # -- structure -------------------------------------------------------------------------
    def grow(self, info: ExperienceInfo) -> None:
        self.seen.append(info)
        first = not self.adapter_sets
        src = self.adapter_sets[-1] if self.init_from_previous and not first else self.init_set
        for m in (*self.adapter_sets, *self.heads):
            m.requires_grad_(False)
        self.adapter_sets.append(copy.deepcopy(src).requires_grad_(True))
        device = next(self.backbone.parameters()).device
        self.heads.append(OthersHead(self.backbone.num_features, info.classes).to(device))
        self.train_sizes_ = torch.cat([self.train_sizes_, self.train_sizes_.new_zeros(1)])
        self._train_backbone = first and self.backbone_init == "first_experience"
        self.backbone.requires_grad_(self._train_backbone)

    def train(self, mode: bool = True) -> ACL:
        super().train(mode)
        if not self._train_backbone:  # frozen: BatchNorm statistics too
            self.backbone.eval()
        return self

    def deploy_sets(self) -> list[AdapterSet]:
        """The adapter sets inference runs: one per experience (ACL); none without adapters."""
        return list(self.adapter_sets) if self.use_adapters else []

    # -- stage 1 ---------------------------------------------------------------------------
    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        self._memory = memory  # joined to the training set by training_set ("join")

    def training_set(self, exp: Experience, past: Sequence[Experience]) -> SampleSet:
        """``"join"``: the training split plus the memory's exemplars (column ``experience``)."""
        if self.stage1_memory != "join" or self._memory is None:
            return exp.train
        return self._memory.joined(
            exp.train, exp.index, fraction=self.others_fraction, seed=exp.index
        )

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        if self.use_adapters:
            yield from self.adapter_sets[-1].parameters()
        yield from self.heads[-1].parameters()
        if self._train_backbone:
            yield from self.backbone.parameters()

    def optimizer_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """Stage 1: the head at ``head_lr`` (when set), the rest at ``train.lr``."""
        if self.head_lr is None:
            return super().optimizer_groups(params)
        head = {id(p) for p in self.heads[-1].parameters()}
        rest, own = [p for p in params if id(p) not in head], [p for p in params if id(p) in head]
        return [{"params": rest}, {"params": own, "lr": self.head_lr}]

    def _stage1_set(self) -> AdapterSet | None:
        return self.adapter_sets[-1] if self.use_adapters else None

    def forward(self, x: Tensor) -> Tensor:
        """Stage-1 logits of the current head ``(B, K_t + 1)`` with the current adapter set."""
        return self.heads[-1](forward_with_adapters(self.backbone, self._stage1_set(), x))

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(
            logits, self.heads[-1].targets(batch.y, batch.exp == self.seen[-1].index)
        )

    # -- merge + stage 2 ---------------------------------------------------------------------
    def after_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        self.train_sizes_[-1] = len(exp.train)
        self._train_backbone = False
        self.backbone.requires_grad_(False).eval()
        self._routing = None  # set by stage 2 only
        self.merge_adapters()
        if self.retune_epochs and len(memory) and len(self.heads) > 1:
            self._retune_heads(exp, memory)

    def merge_adapters(self) -> None:
        """Combine the experiences' adapter sets (ACL keeps them apart: nothing to do)."""

    def _retune_heads(self, exp: Experience, memory: ReplayMemory) -> None:
        """Stage 2 on the class-balanced set, herded (eval mode) on the newest deployed set.

        Features come from :attr:`feature_cache`: the newest set's are :meth:`features`, which
        the memory update herds on next, so that pass reuses these.
        """
        sets = self.deploy_sets() or [None]
        balanced = balanced_retune_set(exp, memory, self._set_features(len(sets) - 1, exp))
        feats = [balanced.features(self._set_features(j, exp)) for j in range(len(sets))]
        self.eval()
        self._routing = retune_heads(
            list(self.heads),
            [info.index for info in self.seen],
            feats,
            balanced,
            epochs=self.retune_epochs,
            lr=self.retune_lr,
            batch_size=self.retune_batch_size,
            seed=exp.index,
        )

    def _set_features(self, j: int, exp: Experience) -> Callable[[Tensor, Tensor], Tensor]:
        """``(images, rows) -> (n, F)`` features with deployed set ``j``, from the cache."""
        sets = self.deploy_sets() or [None]
        if j == len(sets) - 1:  # the newest set: what `features` computes
            name, fn = "features", self.features
        else:
            name, fn = f"features/set{j}", partial(forward_with_adapters, self.backbone, sets[j])
        desc = f"exp {exp.index} {exp.name}: stage 2 features"
        return lambda images, rows: self.feature_cache.outputs(
            name, self, fn, images, rows, desc=desc
        )

    # -- inference ---------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """``(B, F)`` features with the newest deployed adapter set."""
        return forward_with_adapters(self.backbone, (self.deploy_sets() or [None])[-1], x)

    def diagnostics(self) -> dict[str, Any]:
        """``"adapter_sets"``: per set, ``alpha`` of each stage and the relative L2 distance of
        its weights from the set it was initialised from (set ``t-1``, or the initial set).
        ``"routing_stage2"`` (after a stage 2): task-id accuracy of min-"others" routing on the
        stage-2 balanced set after re-tuning (:func:`~medcl.models.routing.routing_accuracy`;
        the heads' training data, so an optimistic figure)."""
        routing = {} if self._routing is None else {"routing_stage2": self._routing}
        if not self.use_adapters:
            return routing
        sets = list(self.adapter_sets)
        sources = [self.init_set, *(s if self.init_from_previous else self.init_set for s in sets)]
        return {"adapter_sets": adapter_drift(sets, sources[: len(sets)]), **routing}

    def deployable_model(self) -> RoutedAdapterModel:
        if not self.heads:
            raise ConfigError(
                f"strategy {self.name!r} has learned no experience yet; there is "
                "no model to deploy."
            )
        return RoutedAdapterModel(
            self.backbone, self.deploy_sets(), list(self.heads), self.num_seen_classes
        )
