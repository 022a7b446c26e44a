"""Baselines that need nothing beyond the base strategy: fine-tune, replay, joint.

- ``finetune``: train on each experience in turn; the lower bound (catastrophic forgetting).
- ``replay``: experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual
  Learning"): each batch is concatenated with an equal-size batch from the replay memory
  (random or herding selection, ``memory:`` section of the config).
- ``joint``: the upper bound. At experience ``t`` it trains on the union of the training sets of
  experiences ``0..t`` ("cumulative" training); with ``from_scratch=True`` the model is
  re-initialised first, which is joint training in the strict sense.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medcl.data.samples import SampleSet
from medcl.models.backbones import Backbone
from medcl.strategies.base import Strategy, register_strategy
from medcl.strategies.options import StrategyOptions

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory


@register_strategy("finetune")
class Finetune(Strategy):
    """Plain sequential fine-tuning (lower bound)."""


@register_strategy("replay")
class Replay(Strategy):
    """Experience replay: every batch mixes in memory samples."""

    uses_memory = True


@dataclass(frozen=True, kw_only=True)
class JointOptions(StrategyOptions):
    """Options of :class:`Joint`."""

    from_scratch: bool = False


@register_strategy("joint")
class Joint(Strategy):
    """Cumulative/joint training on all data seen so far (upper bound).

    Args:
        from_scratch: re-initialise backbone and head before each experience.
    """

    Options = JointOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        self._init_state = copy.deepcopy(backbone.state_dict()) if self.from_scratch else None

    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        if self._init_state is not None:
            self.backbone.load_state_dict(self._init_state)
            self.head.reset_parameters()

    def training_set(self, exp: Experience, past: Sequence[Experience]) -> SampleSet:
        return SampleSet.concat([e.train for e in (*past, exp)])
