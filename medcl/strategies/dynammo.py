"""DynaMMo: ACL's adapter sets merged into one after each experience (flat inference cost).

Paper: M. A. Qazi et al., "DynaMMo: Dynamic Model Merging for Efficient Class Incremental
Learning for Medical Images", MIUA 2024 (arXiv:2404.14099).

DynaMMo is ACL (:mod:`medcl.strategies.acl`: a residual adapter set and an "others" head per
experience on a frozen backbone, stage 1, stage 2's head re-tuning, min-"others" routing, and
the deviations from the paper and its reference code) plus one step: after each experience every
adapter set is merged into one (:func:`~medcl.models.merging.merge_state_dicts`; ``"mean"`` is
the paper's) before stage 2, so the deployed model runs the backbone once, with the merged set,
whatever the number of experiences. ``acl`` is the ablation without the merge.

Deviations of the merge: ``merge="weighted"`` weights each set by its experience's training-set
size; ``"ties"`` uses the adapters' initialisation as the base and merges only the learnable
parameters: the BatchNorm running statistics are averaged (weighted with ``"weighted"``), as
``"mean"`` does and the reference does, never trimmed; ``num_batches_tracked`` is the newest
set's (see :mod:`medcl.models.merging`).

A deviation offered as an option, off by default (1.0: the paper's full-width adapters):
``adapter_width`` narrows the channels between each adapter's two convolutions to
``max(1, round(adapter_width * c))`` of its stage's ``c`` (the reference has no bottleneck), so
every adapter set, the merged one and the deployed model's carry about ``adapter_width`` times
the adapter parameters. It exists for bandwidth in federation, where the newest adapter set and
its head are what a site sends each round (:mod:`medcl.federated.arrays`; the bytes per round
at widths 1.0, 0.5 and 0.25 against full-model FedAvg are in ``benchmarks/federated.py``'s
results), and for a smaller deployable model. Its accuracy cost is measured, not assumed: on the
README main job (``benchmarks/results/adapter_width.md``, seeds 0-2, the recipe's rates chosen at
width 1) widths 0.5 and 0.25 differ from 1.0 by +0.7 and +0.2 points, within seed noise (95 % CIs
about ±5 points); another stream may differ.
"""

from __future__ import annotations

__all__ = ["DynaMMo", "DynaMMoOptions", "OthersHead", "RoutedAdapterModel", "route_min_others"]

import copy
from dataclasses import dataclass
from typing import Any, Literal

from medcl.errors import ConfigError
from medcl.models.adapters import AdapterSet
from medcl.models.backbones import Backbone
from medcl.models.merging import merge_state_dicts
from medcl.models.routing import OthersHead, RoutedAdapterModel, route_min_others
from medcl.strategies.acl import ACL, ACLOptions
from medcl.strategies.base import register_strategy


@dataclass(frozen=True, kw_only=True)
class DynaMMoOptions(ACLOptions):
    """Options of :class:`DynaMMo`: ACL's plus how the adapter sets are merged."""

    merge: Literal["mean", "weighted", "ties"] = "mean"
    ties_density: float = 0.2

    def check(self, component: str) -> None:
        super().check(component)
        if not 0 < self.ties_density <= 1:
            raise ConfigError(
                f"{component}: ties_density must be in (0, 1]; got {self.ties_density}."
            )


@register_strategy("dynammo")
class DynaMMo(ACL):
    """DynaMMo: ACL whose adapter sets are merged into one after each experience (flat cost).

    Args:
        merge: ``"mean"`` (the paper's), ``"weighted"`` (by training-set size) or ``"ties"``.
        ties_density: fraction of each adapter task-vector tensor kept by TIES trimming.
        adapter_width: adapters' hidden channels as a share of the stage's (1.0: the paper's).
        Others: as :class:`ACL`.
    """

    Options = DynaMMoOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        self.merged_set = copy.deepcopy(self.init_set)  # loaded by every merge

    def merge_adapters(self) -> None:
        """Merge every experience's adapter set into :attr:`merged_set`."""
        if len(self.adapter_sets) > 1:
            merged = merge_state_dicts(
                [s.state_dict() for s in self.adapter_sets],
                method=self.merge,
                weights=self.train_sizes_.tolist() if self.merge == "weighted" else None,
                density=self.ties_density,
                base=self.init_set.state_dict(),  # used by "ties"
                statistics={k for k, _ in self.init_set.named_buffers()},  # averaged, not TIES
            )
            self.merged_set.load_state_dict(merged)

    def deploy_sets(self) -> list[AdapterSet]:
        """One set: the merged one (set 0 itself until a second experience is merged in)."""
        if not self.use_adapters:
            return []
        return [self.adapter_sets[0] if len(self.adapter_sets) == 1 else self.merged_set]
