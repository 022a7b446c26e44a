"""The shared base of the subspace strategies (Subspace-Connectivity and MC-SGD).

A subspace network holds ``n`` endpoints per tensor (:mod:`medcl.models.subspace`) and is
evaluated at one point of their simplex. This base owns the structure (head growth with
independently initialised rows), the connectivity stage's options
(:func:`~medcl.models.subspace_connectivity.connectivity_stage`), the BatchNorm statistics
(re-estimated at the evaluated point, or batch statistics) and midpoint inference, folded into
one plain network for export. The methods, their papers and deviations:
:mod:`medcl.strategies.subspace` and :mod:`medcl.strategies.mcsgd`.
"""

from __future__ import annotations

__all__ = ["SubspaceOptions", "SubspaceStrategy", "balanced_rows"]

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from medcl.data.transforms import to_model_input
from medcl.errors import ConfigError
from medcl.models.backbones import Backbone
from medcl.models.subspace import (
    SubspacePoint,
    fold,
    point_values,
    recompute_batchnorm,
    to_subspace,
    unwrap_subspace,
    use_batch_statistics,
)
from medcl.strategies.base import Classifier, ExperienceInfo, Strategy
from medcl.strategies.options import StrategyOptions

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory


@dataclass(frozen=True, kw_only=True)
class SubspaceOptions(StrategyOptions):
    """Options of the subspace strategies (S-C, MC-SGD): structure, connectivity SGD, BatchNorm."""

    n_endpoints: int = 2
    grid_points: int = 5
    connect_epochs: int = 1
    connect_lr: float = 0.005
    connect_momentum: float = 0.8
    connect_batch_size: int = 64
    subset_size: int = 500
    bn: Literal["recompute", "batch"] = "recompute"
    bn_samples: int = 1024
    bn_set: Literal["balanced", "experience"] = "balanced"
    stage1_replay: bool = False
    seed: int = 0

    def connectivity_checks(self) -> list[tuple[str, Any, bool]]:
        """``(name, value, ok)`` of the connectivity stage's options (for ``check_options``)."""
        return [("grid_points", self.grid_points, self.grid_points >= 1),
                ("connect_epochs", self.connect_epochs, self.connect_epochs >= 0),
                ("connect_lr", self.connect_lr, self.connect_lr > 0),
                ("connect_momentum", self.connect_momentum, 0 <= self.connect_momentum < 1),
                ("connect_batch_size", self.connect_batch_size, self.connect_batch_size >= 1),
                ("subset_size", self.subset_size, self.subset_size >= 1)]  # fmt: skip

    def check(self, component: str) -> None:
        if self.n_endpoints < 1 or self.bn_samples < 1:
            raise ConfigError(
                f"{component}: need n_endpoints >= 1 and bn_samples >= 1; got "
                f"n_endpoints={self.n_endpoints}, bn_samples={self.bn_samples}."
            )


def balanced_rows(labels: Tensor, size: int) -> Tensor:
    """``size`` random rows (the global RNG) whose classes are as equal as the data allow.

    Rows are shuffled, ranked within their class and taken rank by rank, so every class gives
    ``size // #classes`` rows (one more for some) unless it has fewer, the rest coming from the
    others. Returns ``(min(size, N),)`` row indices.
    """
    perm = torch.randperm(len(labels))
    shuffled, rank = labels[perm], torch.empty(len(labels), dtype=torch.long)
    for c in torch.unique(shuffled):
        rows = torch.nonzero(shuffled == c).flatten()
        rank[rows] = torch.arange(len(rows))
    return perm[torch.argsort(rank, stable=True)[:size]]


class SubspaceStrategy(Strategy):
    """Base of strategies whose network is a subspace (S-C, MC-SGD): structure, BN, inference.

    Args:
        backbone: the feature extractor (turned into a subspace network in place).
        n_endpoints: endpoints per tensor.
        grid_points, connect_epochs, connect_lr, connect_momentum, connect_batch_size,
            subset_size: the connectivity stage (:meth:`connectivity_sgd`).
        bn: ``"recompute"`` (statistics re-estimated at the evaluated point) or ``"batch"``.
        bn_samples: at most this many samples of the current experience re-estimate them.
        bn_set: the re-estimation set. ``"balanced"`` (default): the whole replay memory plus as
            many current samples as it holds (classes as equal as the data allow; up to
            ``bn_samples`` when the memory is empty), so old and new data weigh alike.
            ``"experience"`` (ablation, the earlier behaviour): ``bn_samples`` random current
            samples plus the memory (about 84 % current data with 1024 and a memory of 200).
        stage1_replay: mix the replay memory into the trainer's batches (stage 1 / the
            sequential chain); False trains on the experience alone, as the papers do.
        seed: seeds the endpoints' independent initialisation.
    """

    Options = SubspaceOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        self.uses_memory = self.stage1_replay  # the trainer samples the memory only when True
        if self.bn == "batch":
            use_batch_statistics(backbone)
        self.point = SubspacePoint(self.n_endpoints)
        to_subspace(self.backbone, self.point, seed=self.seed)

    def network(self) -> Classifier:
        """Backbone + head as one module (the subspace network; no copy)."""
        return Classifier(self.backbone, self.head)

    def grow(self, info: ExperienceInfo) -> None:
        """Widen the head; the new rows of every endpoint are initialised independently."""
        ends = unwrap_subspace(self.head)
        super().grow(info)
        to_subspace(self.head, self.point, endpoints=ends, seed=self.seed + len(self.seen))

    def midpoint(self) -> dict[str, Tensor]:
        """Every subspace tensor's value at the midpoint (detached)."""
        with self.point.at_midpoint():
            return point_values(self.network())

    def connectivity_sgd(self) -> dict[str, Any]:
        """The connectivity stage's SGD keywords, for
        :func:`~medcl.models.subspace_connectivity.connectivity_stage`."""
        return {
            "grid_points": self.grid_points,
            "epochs": self.connect_epochs,
            "lr": self.connect_lr,
            "momentum": self.connect_momentum,
            "batch_size": self.connect_batch_size,
        }

    def statistics_rows(self, exp: Experience, memory: ReplayMemory) -> Tensor:
        """Rows of ``exp.train`` that join the memory in the BatchNorm re-estimation (``bn_set``)."""
        if self.bn_set == "experience":
            return torch.randperm(len(exp.train))[: self.bn_samples]
        n = min(self.bn_samples, len(memory)) if len(memory) else self.bn_samples
        return balanced_rows(exp.train.labels, n)

    def recompute_statistics(self, exp: Experience, memory: ReplayMemory) -> None:
        """Re-estimate BatchNorm statistics at the current point on ``bn_set``'s samples."""
        if self.bn != "recompute":
            return
        idx = self.statistics_rows(exp, memory)
        parts = [exp.train.images[idx]] + ([memory.as_sampleset().images] if len(memory) else [])
        images = torch.cat(parts)
        device = next(self.parameters()).device
        chunks = torch.tensor_split(images, math.ceil(len(images) / 256))  # no 1-sample batch
        recompute_batchnorm(self.network(), (to_model_input(c).to(device) for c in chunks))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Scores at the midpoint ``(B, num_seen_classes)`` (no copy of the network)."""
        with self.point.at_midpoint():
            return self.network()(x)

    def deployable_model(self) -> nn.Module:
        """One plain network with the midpoint's weights (the plain network's MACs)."""
        with self.point.at_midpoint():
            return fold(self.network())
