"""MC-SGD: Mode-Connectivity SGD, the linear-mode-connectivity baseline.

Mirzadeh, Farajtabar, Gorur, Pascanu & Ghasemzadeh, "Linear Mode Connectivity in Multitask and
Continual Learning", ICLR 2021. Mechanics from the author's research code
``imirzadeh/CL-LinearModeConnectivity`` (``core/train_methods.py``, ``core/mode_connectivity.py``).

Two chains of weights:

- the **sequential** chain ``ŵ_t``: plain SGD on experience ``t`` alone (the trainer's loop, no
  replay), starting from ``ŵ_{t-1}`` (``continue_from="sequential"``, the research code and
  ``sequel``) or from ``w̄_{t-1}`` (``"connectivity"``, CL-Gym);
- the **connectivity** chain ``w̄_t`` (the deployed model; ``w̄_1 = ŵ_1``): for ``t ≥ 2`` start at
  ``w = w̄_{t-1} + p (ŵ_t - w̄_{t-1})`` and run one epoch in which every step sums, over
  ``s ∈ {0, 1/K, …, 1}`` (K = 5), the memory loss at ``w̄_{t-1} + s (w - w̄_{t-1})`` and the
  current-subset loss at ``ŵ_t + s (w - ŵ_t)``. The research code applies the gradient at each
  interpolated point to ``w`` directly (no chain-rule factor ``s``, ``s = 0`` included): that is
  the default here (``chain_rule=False``); ``chain_rule=True`` uses autograd's gradient.
- The episodic memory of the connectivity step **includes the current experience**: medcl's
  replay memory (earlier experiences) plus ``current_per_class`` random samples per class of the
  current experience (default: the memory's per-group quota after adding it), as in the research
  code; the current subset is 500 random samples; SGD momentum 0.8, lr 0.005, batch 64.

The segments are evaluated by the same subspace machinery as Subspace-Connectivity
(:func:`medcl.models.subspace_connectivity.connectivity_stage` with one endpoint ``w`` and a
fixed vertex): S-C with ``n = 1`` is MC-SGD's pair of lines. Deviations: the task-wise lr decay of
the sequential chain (``lr_0 × decay^(t-1)``) is left to the config's ``train`` section (one lr for
every experience); losses are computed with BatchNorm in train mode (batch statistics, which the
research code's ``track_running_stats=False`` networks also use); running statistics are then re-
estimated at ``w̄_t`` (see ``bn`` of :class:`~medcl.strategies.subspace_base.SubspaceStrategy`).
"""

from __future__ import annotations

__all__ = ["MCSGD", "MCSGDOptions"]

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from medcl.data.samples import SampleSet
from medcl.errors import check_options
from medcl.models.backbones import Backbone
from medcl.models.subspace import subspace_tensors
from medcl.models.subspace_connectivity import connectivity_stage
from medcl.strategies.base import ExperienceInfo, register_strategy
from medcl.strategies.subspace_base import SubspaceOptions, SubspaceStrategy

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory


def _name(key: str) -> str:
    return key.replace(".", "__")


@dataclass(frozen=True, kw_only=True)
class MCSGDOptions(SubspaceOptions):
    """Options of :class:`MCSGD`: the subspace's (one endpoint, ``w``) plus the two chains'."""

    n_endpoints: int = field(default=1, init=False)
    seed: int = field(default=0, init=False)
    p: float = 0.01
    chain_rule: bool = False
    continue_from: Literal["sequential", "connectivity"] = "sequential"
    current_per_class: int = 0

    def check(self, component: str) -> None:
        p, per_class = self.p, self.current_per_class
        check_options(
            component,
            "0 <= p <= 1, 0 <= connect_momentum < 1, current_per_class >= 0, connect_epochs >= 0 "
            "and positive grid_points, connect_lr, connect_batch_size and subset_size",
            [("p", p, 0 <= p <= 1), ("current_per_class", per_class, per_class >= 0),
             *self.connectivity_checks()],
        )  # fmt: skip
        super().check(component)


@register_strategy("mcsgd")
class MCSGD(SubspaceStrategy):
    """MC-SGD (Mirzadeh et al. 2021): sequential SGD, then a connectivity step to the last solution.

    Args:
        backbone: the feature extractor.
        p: start of the connectivity step, ``w̄_{t-1} + p (ŵ_t - w̄_{t-1})``.
        grid_points: K, the segments are evaluated at ``K + 1`` points.
        chain_rule: use autograd's gradient (factor ``s``) instead of the research code's.
        continue_from: where experience ``t`` starts: ``"sequential"`` (ŵ_{t-1}) or
            ``"connectivity"`` (w̄_{t-1}).
        current_per_class: current-experience samples per class added to the memory for the
            connectivity step (0: the memory's per-group quota).
        connect_epochs, connect_lr, connect_momentum, connect_batch_size: connectivity SGD.
        subset_size: random current-experience samples of the connectivity step.
        bn, bn_samples, stage1_replay: see
            :class:`~medcl.strategies.subspace_base.SubspaceStrategy`.
    """

    Options = MCSGDOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        self.sequential_ = nn.Module()  # ŵ_t as buffers (checkpointed: the next start point)
        self._previous: dict[str, Tensor] | None = None
        self._connect_losses: list[float] = []

    # -- the sequential chain's state --------------------------------------------------------
    def grow(self, info: ExperienceInfo) -> None:
        """Widen the head; keep ŵ's buffers shaped like the weights (new rows: current values)."""
        super().grow(info)
        if self.continue_from != "sequential":
            return
        for key, value in self.midpoint().items():
            old = getattr(self.sequential_, _name(key), None)
            if old is not None and old.shape[0] <= value.shape[0]:
                value[: old.shape[0]] = old
            self.sequential_.register_buffer(_name(key), value)

    def _load(self, values: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for key, ws in self._endpoints().items():
                ws[0].copy_(values[key])

    def _endpoints(self) -> dict[str, list[nn.Parameter]]:
        return subspace_tensors(self.network())

    # -- training ----------------------------------------------------------------------------
    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        """Remember w̄_{t-1}; start from ŵ_{t-1} (``continue_from="sequential"``)."""
        self._previous = self.midpoint() if len(self.seen) > 1 else None
        if self._previous is not None and self.continue_from == "sequential":
            self._load({k: getattr(self.sequential_, _name(k)) for k in self._previous})

    def after_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        """The connectivity step from w̄_{t-1} (skipped at t = 1: w̄_1 = ŵ_1)."""
        seq = self.midpoint()  # ŵ_t
        if self.continue_from == "sequential":
            for key, value in seq.items():
                getattr(self.sequential_, _name(key)).copy_(value)
        prev, self._connect_losses = self._previous, []
        if prev is not None and self.connect_epochs > 0:
            old_rows = self.seen[-2].num_seen_classes
            for key in prev:  # rows of classes new at t: no previous solution, take ŵ_t's
                if key.startswith("head."):
                    prev[key] = torch.cat([prev[key][:old_rows], seq[key][old_rows:]])
            self._load({k: prev[k] + self.p * (seq[k] - prev[k]) for k in seq})
            connectivity_stage(
                self.network(),
                self.point,
                old=self._episodic_memory(exp, memory),
                new=exp.train.subset(torch.randperm(len(exp.train))[: self.subset_size]),
                old_vertex=prev,
                new_vertex=seq,
                sampling="grid",
                straight_through=not self.chain_rule,
                losses=self._connect_losses,
                **self.connectivity_sgd(),
            )
        self._previous = None
        self.recompute_statistics(exp, memory)

    def diagnostics(self) -> dict[str, Any]:
        """The connectivity step's per-step loss (summed over its K + 1 points and both sets)."""
        return {"connectivity_loss": [round(v, 5) for v in self._connect_losses]}

    def _episodic_memory(self, exp: Experience, memory: ReplayMemory) -> SampleSet:
        """The replay memory plus ``current_per_class`` samples per class of ``exp``."""
        classes = torch.unique(exp.train.labels).tolist()
        groups = len({(int(e), int(y)) for e, y in zip(memory.exp_, memory.label_, strict=True)})
        per_class = self.current_per_class or max(1, memory.size // (groups + len(classes)))
        rows = [
            idx[torch.randperm(len(idx))[:per_class]]
            for c in classes
            for idx in [torch.nonzero(exp.train.labels == c).flatten()]
        ]
        current = exp.train.subset(torch.cat(rows))
        return SampleSet.concat([memory.as_sampleset(), current]) if len(memory) else current
