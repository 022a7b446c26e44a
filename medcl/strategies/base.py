"""The strategy interface: a model plus what a continual-learning method adds to training.

The trainer (:mod:`medcl.engine.trainer`) calls these hooks by name, in this order, for each
experience (nothing else; a strategy never edits the trainer):

    grow(info)                     structural, data-free: expand heads, add adapters/extractors
    before_experience(exp, memory) data-dependent set-up: snapshots, initialisation from data
    training_set(exp, past)        the samples to train on (default: the experience's train split)
    trainable_parameters()         what the optimiser updates (optimizer_groups: at which rates)
    configure_optimizers(cfg, ...) the method's own optimiser/schedule (default: the run's)
    per epoch:  epoch_rows(epoch, n)  which rows of the training set to visit (default: all)
    per batch:  logits = forward(x);  loss = loss(logits, batch) + penalty(batch, logits)
                after_update(step)
    after_experience(exp, memory)  consolidation: Fisher, merging, re-tuning heads
    (the trainer then updates the replay memory)

Evaluation calls :meth:`predict` and herding :meth:`features`, both through
:attr:`Strategy.feature_cache` (each forward pass once per model state); export calls
:meth:`deployable_model`. Checkpoints store
:meth:`state_dict` tensors (safetensors) plus ``self.seen`` (JSON); :meth:`rebuild` replays
:meth:`grow` so the tensors fit on load.
"""

from __future__ import annotations

__all__ = [
    "STRATEGIES",
    "Batch",
    "Classifier",
    "ExperienceInfo",
    "Strategy",
    "create_strategy",
    "list_strategies",
    "register_strategy",
]

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.errors import ConfigError
from medcl.models.backbones import Backbone
from medcl.models.deployable import DeployableModel
from medcl.models.feature_cache import FeatureCache
from medcl.models.heads import ExpandableHead
from medcl.registry import Registry
from medcl.strategies.options import StrategyOptions, option_defaults, sign_constructor
from medcl.validation import validated_kwargs

if TYPE_CHECKING:
    from medcl.config import TrainConfig
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory
    from medcl.data.samples import SampleSet

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register_strategy(name: str):
    """Class decorator: register a :class:`Strategy` subclass under ``name`` (sets ``cls.name``)."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        return STRATEGIES.register(name)(cls)

    return deco


def list_strategies(pattern: str = "*") -> list[str]:
    return STRATEGIES.list(pattern)


@dataclass(frozen=True)
class ExperienceInfo:
    """What a strategy remembers of an experience (JSON-serialisable, enough to rebuild)."""

    index: int
    name: str
    task_id: int
    classes: tuple[int, ...]
    num_seen_classes: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperienceInfo:
        return cls(**{**d, "classes": tuple(d["classes"])})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "classes": list(self.classes)}


@dataclass
class Batch:
    """One training batch.

    Attributes:
        x: ``(B, C, H, W[, D])`` model input (augmented, scaled).
        y: ``(B,)`` global labels.
        exp: ``(B,)`` index of the experience each sample came from.
        replay: ``(B,)`` bool, True for samples drawn from the replay memory.
        index: ``(B,)`` row of each sample in the experience's training set (``-1`` for replay
            samples); lets data-selection methods keep per-example statistics.
    """

    x: Tensor
    y: Tensor
    exp: Tensor
    replay: Tensor
    index: Tensor | None = None


class Classifier(DeployableModel):
    """Backbone + linear head: the plain deployable model (features ``(B, F)``, no routing)."""

    def __init__(self, backbone: Backbone, head: ExpandableHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward_head(self, f: Tensor, pre_logits: bool = False) -> Tensor:
        return f if pre_logits else self.head(f)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W[, D])`` -> logits ``(B, num_classes)``."""
        return self.head(self.backbone(x))


class Strategy(nn.Module):
    """Base strategy: plain fine-tuning of backbone + expandable head with cross-entropy.

    Subclasses override only the hooks their method changes. Hyper-parameters are the fields of
    the class's :attr:`Options` dataclass, passed to the constructor as keywords (validated from
    the config by :func:`create_strategy`); each becomes an attribute of the same name
    (scikit-learn's convention). A method that extends another extends its ``Options`` too.

    Args:
        backbone: the feature extractor.
        **options: the fields of :attr:`Options` (the constructor's signature lists them).
    """

    name: ClassVar[str] = "base"
    #: scenario kinds the method is defined for (checked before training starts)
    scenario_kinds: ClassVar[frozenset[str]] = frozenset(
        {"class", "domain", "task", "cross-dataset"}
    )
    #: whether the trainer mixes replay-memory samples into each batch
    uses_memory: ClassVar[bool] = False
    #: the method's hyper-parameters (config keys under ``strategy:``)
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        sign_constructor(cls)  # its options become its constructor's keyword signature

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__()
        opts = self.Options(**options)
        opts.check(f"strategy {self.name!r}")
        for f in fields(opts):  # scikit-learn's convention: one attribute per option
            setattr(self, f.name, getattr(opts, f.name))
        self.backbone = backbone
        self.head = ExpandableHead(backbone.num_features)
        self.seen: list[ExperienceInfo] = []
        #: features and scores of sample sets under the current weights, shared by herding,
        #: stage-2 sets and evaluation (computed once; see medcl.models.feature_cache)
        self.feature_cache = FeatureCache()

    # -- structure -------------------------------------------------------------------------
    def grow(self, info: ExperienceInfo) -> None:
        """Structural change for a new experience (no data): default expands the head."""
        self.seen.append(info)
        self.head.expand(info.num_seen_classes)

    def rebuild(self, infos: Sequence[ExperienceInfo]) -> None:
        """Replay :meth:`grow` for each completed experience so a checkpoint's tensors fit."""
        for info in infos:
            self.grow(info)

    @property
    def num_seen_classes(self) -> int:
        return self.seen[-1].num_seen_classes if self.seen else 0

    # -- training hooks --------------------------------------------------------------------
    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        """Data-dependent set-up before training on ``exp``."""

    def training_set(self, exp: Experience, past: Sequence[Experience]) -> SampleSet:
        """The samples to train on for ``exp`` (``past``: earlier experiences, in order)."""
        return exp.train

    def epoch_rows(self, epoch: int, num_rows: int) -> Tensor:
        """Rows of the training set visited in ``epoch`` (0-based; default: all of them).

        Data-removal methods (SparCL's DDR, EsaCL's IDS) return a shrinking subset, so fewer
        images are used and fewer updates are made.
        """
        return torch.arange(num_rows)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def optimizer_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """torch parameter groups of ``params`` for ``train.optimizer`` (no ``lr``: train.lr)."""
        return [{"params": params}]

    def configure_optimizers(
        self, cfg: TrainConfig, params: list[nn.Parameter], total: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None] | None:
        """The method's own optimiser and per-update schedule for an experience.

        Args:
            cfg: the run's optimisation settings.
            params: :meth:`trainable_parameters` (non-empty).
            total: updates this experience will make (the scheduler is stepped after each).

        Returns:
            ``(optimizer, scheduler or None)``; None (default): the run's optimiser and schedule.
        """
        return None

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(B, F)`` (used by herding and data-driven initialisation)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """Training-time logits ``(B, num_seen_classes)``."""
        return self.head(self.backbone(x))

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """The method's base objective for a batch (default: cross-entropy on hard labels)."""
        return F.cross_entropy(logits, batch.y)

    def penalty(self, batch: Batch, logits: Tensor) -> Tensor:
        """A regulariser the trainer adds to :meth:`loss` (default: none)."""
        return logits.new_zeros(())

    def after_update(self, step: int) -> None:
        """Called after every optimiser step (``step`` counts updates in this experience)."""

    def after_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        """Consolidation after training on ``exp`` (before the memory is updated)."""

    def diagnostics(self) -> dict[str, Any]:
        """Method-specific facts to record after each experience (JSON; default: none).

        The run writes them to ``strategy.json`` (e.g. DynaMMo's adapter scales and drift).
        """
        return {}

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Evaluation scores ``(B, num_seen_classes)``: logits or log-probabilities."""
        return self.deployable_model()(x)

    def deployable_model(self) -> DeployableModel:
        """The single module to export: ``forward(x) -> (B, num_seen_classes)`` scores, with the
        :class:`~medcl.models.deployable.DeployableModel` interface export relies on."""
        return Classifier(self.backbone, self.head)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, experiences={len(self.seen)}"


sign_constructor(Strategy)  # ``Strategy(backbone)``: no options of its own


def create_strategy(
    name: str, backbone: Backbone, *, scenario_kind: str | None = None, **params: Any
) -> Strategy:
    """Build a registered strategy, validating ``params`` against its options' types.

    Raises:
        ConfigError: unknown strategy or parameter, wrong type, unsupported scenario kind.
    """
    cls = STRATEGIES.get(name)
    if scenario_kind is not None and scenario_kind not in cls.scenario_kinds:
        raise ConfigError(
            f"strategy {name!r} supports scenario kinds {sorted(cls.scenario_kinds)}; the scenario "
            f"is {scenario_kind!r}. Choose another strategy (`medcl strategies list`) or scenario."
        )
    kwargs = validated_kwargs(
        cls.Options, params, component=f"strategy {name!r}", section="strategy", skip=()
    )
    return cls(backbone, **kwargs)


def strategy_params(name: str) -> dict[str, Any]:
    """Hyper-parameters of a strategy and their defaults (for ``medcl strategies list``)."""
    return option_defaults(STRATEGIES.get(name).Options)
