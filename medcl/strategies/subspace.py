"""Subspace-Connectivity (S-C): an ensemble in a weight subspace, deployed as one network.

Doan, Mirzadeh & Farajtabar, "Continual Learning Beyond a Single Model" (arXiv 2202.09826, v1:
"Efficient Continual Learning Ensembles in Neural Network Subspaces"), CoLLAs 2023, PMLR v232.
No public code exists; every detail below is labelled with its source: *(summary)* a secondary
summary of the paper's objective, *(Wortsman)* the official code of ``apple/learning-subspaces``,
*(MC-SGD)* the research code ``imirzadeh/CL-LinearModeConnectivity``, *(medcl)* a reconstruction
with no source.

Per experience τ:

1. **Subspace learning** *(summary)*: endpoints ``w_1..w_n`` of every conv/linear/norm tensor
   (:mod:`medcl.models.subspace`); each batch trains the point ``Σ α_i w_i`` with one
   ``α ~ Dirichlet(1)`` shared by all layers *(Wortsman)*, cross-entropy on experience τ only,
   plus ``beta · cos²`` of a random pair of endpoints *(Wortsman, Eq. 3, beta = 1)*.
2. **Connectivity** *(summary)*: with ``α ~ Dirichlet(1)`` over ``n + 1`` vertices, minimise
   ``CE(buffer; Σ α_i w_i + α_{n+1} w*_{τ-1,mid}) + CE(subset; Σ α_i w_i + α_{n+1} ŵ_{τ,mid})``;
   the two extra vertices (the previous experience's final midpoint and this experience's
   stage-1 midpoint) are constants. The buffer holds only earlier experiences (medcl's memory
   is updated after this stage). Gradients by autograd (each endpoint's scaled by its ``α_i``).
3. **Inference at the midpoint** ``w_mid = mean_i w_i`` *(summary)*: :meth:`deployable_model`
   folds it into one plain network (the backbone's own modules, one tensor each).

Reconstructions and deviations:

- Endpoints ``2..n`` start Kaiming-normal *(Wortsman)*; endpoint 1 keeps the backbone's own
  initialisation (timm's, or pretrained weights) *(medcl; Wortsman draws all independently)*.
- For τ > 1 the endpoints start from τ-1's final endpoints *(medcl)*; ``init="fresh"``
  re-draws them all (ablation).
- The cosine penalty covers linear/head weights as well as convs *(medcl; Wortsman: convs)*.
- The stage-2 optimiser is MC-SGD's: SGD momentum 0.8, lr 0.005, batch 64, epochs over
  ``max(#buffer batches, #subset batches)`` (the shorter cycles), a current subset of 500
  random samples *(MC-SGD)*, but **12 epochs** by default, not MC-SGD's one *(medcl, measured)*:
  on medmnist-cross3 (test_resnet, memory 200, 8 steps per epoch) the stage-2 loss, averaged
  over 4-epoch windows, fell 2.15 → 1.85 → 1.79 → 1.74 after experience 1 and 3.20 → 3.01 →
  2.85 → 2.89 after experience 2 (epochs 1-4, 5-8, 9-12, 13-16): one epoch (8 steps) stops
  far from the plateau, which is reached by about epoch 12 (96 steps; a 4-epoch window then
  moves < 3 %). ``connect_epochs`` sets it (1 is MC-SGD's schedule); no augmentation and BatchNorm in train mode (batch statistics,
  as MC-SGD's ``track_running_stats=False`` networks) *(medcl)*. ``sampling="grid"`` replaces
  the random ``α`` by MC-SGD's ``K + 1`` points ``s ∈ {0, 1/K, …, 1}`` on the segment from the
  fixed vertex to the endpoints' midpoint, losses summed.
- ``stage1_replay=True`` mixes the replay memory into stage 1 (ER, the trainer's replay batches,
  as ``replay`` does) *(medcl)*. The paper's stage 1 sees experience τ only, which suits its
  task-incremental benchmarks; in a class-incremental stream one short connectivity epoch cannot
  restore the old classes' logits after stage 1 has trained them away (medmnist-cross3, 2 epochs:
  midpoint A_T 0.17 without it vs 0.60 for replay; ``benchmarks/results/subspace.md``). The
  benchmark chooses it on the validation splits.
- The previous midpoint has no rows for classes new at τ: its head rows for them are taken from
  ŵ_{τ,mid} *(medcl)*.
- **BatchNorm** ``bn="recompute"`` (default): ``γ, β`` are subspace tensors; the running
  statistics are reset and re-estimated at the midpoint after stage 2, with a cumulative
  average over a class-balanced set, the buffer plus as many samples of the experience
  (``bn_set="balanced"``; ``"experience"``, up to ``bn_samples`` current samples plus the
  buffer, is the ablation: about 84 % current data, which biased the old classes' statistics)
  *(Wortsman's update_bn; the data is medcl's)*, so the deployable network is an ordinary
  eval-mode network.
  Curve points recorded *during* an experience (stability-gap monitor) use the running
  statistics accumulated while training at random points. ``bn="batch"`` uses batch statistics
  always (MC-SGD's networks): no buffers, but predictions then depend on the batch.
- ``inference="endpoints"``/``"sampled"`` deploys the ensemble of the ``n`` endpoints or of
  ``ensemble_size`` seeded Dirichlet points (each with its own recomputed BatchNorm statistics;
  probabilities averaged; ``k`` × MACs) instead of the midpoint: the sampled-point ensemble.

Ablation switches: ``n_endpoints`` (2 line, 3 simplex), ``beta=0`` (no cosine penalty),
``connect=False`` (stage 1 only), ``init``, ``bn``, ``sampling``, ``stage1_replay``; the buffer size is the
``memory.size`` of the config.
"""

from __future__ import annotations

__all__ = ["SubspaceConnectivity", "SubspaceConnectivityOptions"]

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from medcl.errors import check_options
from medcl.models.backbones import Backbone
from medcl.models.subspace import cosine_penalty, fold, reinitialise, sample_alpha
from medcl.models.subspace_connectivity import connectivity_stage
from medcl.strategies.base import Batch, ExperienceInfo, register_strategy
from medcl.strategies.ensemble import MeanEnsemble
from medcl.strategies.subspace_base import SubspaceOptions, SubspaceStrategy

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory


@dataclass(frozen=True, kw_only=True)
class SubspaceConnectivityOptions(SubspaceOptions):
    """Options of :class:`SubspaceConnectivity`: the subspace's plus S-C's stages and inference."""

    connect_epochs: int = 12  # the measured convergence (module docstring); MC-SGD: 1
    beta: float = 1.0
    connect: bool = True
    init: Literal["previous", "fresh"] = "previous"
    sampling: Literal["dirichlet", "grid"] = "dirichlet"
    inference: Literal["midpoint", "endpoints", "sampled"] = "midpoint"
    ensemble_size: int = 5

    def check(self, component: str) -> None:
        n, beta, k = self.n_endpoints, self.beta, self.ensemble_size
        check_options(
            component,
            "n_endpoints >= 2, beta >= 0, 0 <= connect_momentum < 1, connect_epochs >= 0 and "
            "positive grid_points, connect_lr, connect_batch_size, subset_size and ensemble_size",
            [("n_endpoints", n, n >= 2), ("beta", beta, beta >= 0),
             *self.connectivity_checks(), ("ensemble_size", k, k >= 1)],
        )  # fmt: skip
        super().check(component)


@register_strategy("subspace")
class SubspaceConnectivity(SubspaceStrategy):
    """Subspace-Connectivity (Doan et al.): subspace learning, connectivity, midpoint inference.

    Args:
        backbone: the feature extractor.
        n_endpoints: 2 (a line) or more (a simplex).
        beta: weight of the endpoints' cosine penalty (0 disables it).
        connect: run the connectivity stage (False: stage 1 only, an ablation).
        init: ``"previous"`` endpoints for τ > 1, or ``"fresh"`` (re-drawn).
        sampling: stage-2 points, ``"dirichlet"`` (random) or ``"grid"`` (MC-SGD's K + 1).
        grid_points: K for ``"grid"``.
        connect_epochs, connect_lr, connect_momentum, connect_batch_size: stage-2 SGD.
        subset_size: random samples of the current experience used in stage 2.
        bn, bn_samples, stage1_replay: see :class:`SubspaceStrategy`.
        inference: ``"midpoint"``, ``"endpoints"`` or ``"sampled"`` (an ensemble, k × MACs).
        ensemble_size: points of the ``"sampled"`` ensemble.
        seed: seeds endpoint initialisation and the sampled ensemble's points.
    """

    Options = SubspaceConnectivityOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        #: folded ensemble members (``inference != "midpoint"``), one per point
        self.members_: nn.ModuleList | None = None
        self._prev_mid: dict[str, Tensor] | None = None
        self._num_old_classes, self._members_stale = 0, False
        self._connect_steps, self._connect_losses = 0, []

    def grow(self, info: ExperienceInfo) -> None:
        super().grow(info)
        if self.inference != "midpoint":  # placeholders of the right shapes, filled after training
            k = self.point.n if self.inference == "endpoints" else self.ensemble_size
            plain = SubspaceStrategy.deployable_model(self)
            self.members_ = nn.ModuleList(fold(plain) for _ in range(k))

    def ensemble_points(self) -> list[Tensor]:
        """The ``α`` of each ensemble member (endpoints, or seeded Dirichlet draws)."""
        n = self.point.n
        if self.inference == "endpoints":
            return list(torch.eye(n))
        g = torch.Generator().manual_seed(self.seed)
        return [sample_alpha(n, g) for _ in range(self.ensemble_size)]

    # -- training ----------------------------------------------------------------------------
    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        self._members_stale = True
        has_past = len(self.seen) > 1
        self._num_old_classes = self.seen[-2].num_seen_classes if has_past else 0
        self._prev_mid = self.midpoint() if has_past else None  # w*_{τ-1,mid}
        if has_past and self.init == "fresh":
            reinitialise(self.network(), seed=self.seed + 7919 * len(self.seen))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_seen_classes)``; in training at a new ``α ~ Dirichlet(1)`` per call."""
        if self.training:
            self.point.set(sample_alpha(self.point.n))
        return self.head(self.backbone(x))

    def penalty(self, batch: Batch, logits: Tensor) -> Tensor:
        """``beta · cos²(w_i, w_j)`` for a random pair of distinct endpoints."""
        if self.beta == 0:
            return logits.new_zeros(())
        i, j = torch.randperm(self.point.n)[:2].tolist()
        return self.beta * cosine_penalty(self.network(), i, j)

    def after_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        """Stage 2 (connectivity), then BatchNorm statistics and ensemble members."""
        stage1 = self.midpoint()  # ŵ_{τ,mid}
        self._connect_steps, self._connect_losses = 0, []
        if self.connect and self._prev_mid is not None and len(memory) > 0:
            prev = dict(self._prev_mid)
            for key in prev:  # classes new at τ: take their head rows from ŵ_{τ,mid}
                if key.startswith("head."):
                    prev[key] = torch.cat([prev[key][: self._num_old_classes],
                                           stage1[key][self._num_old_classes :]])  # fmt: skip
            subset = exp.train.subset(torch.randperm(len(exp.train))[: self.subset_size])
            self._connect_steps = connectivity_stage(
                self.network(),
                self.point,
                old=memory.as_sampleset(),
                new=subset,
                old_vertex=prev,
                new_vertex=stage1,
                sampling=self.sampling,
                losses=self._connect_losses,
                **self.connectivity_sgd(),
            )
        self._prev_mid = None
        if self.members_ is not None:
            for alpha, member in zip(self.ensemble_points(), self.members_, strict=True):
                self.point.set(alpha)
                self.recompute_statistics(exp, memory)
                member.load_state_dict(fold(self.network()).state_dict())
        self.point.set_midpoint()
        self.recompute_statistics(exp, memory)
        self._members_stale = False

    def diagnostics(self) -> dict[str, Any]:
        """Endpoints' squared cosine (pairs ``i < j``), the connectivity stage's step count and
        its per-step loss (the convergence of stage 2)."""
        with torch.no_grad():
            n, net = self.point.n, self.network()
            cos = {f"{i}-{j}": float(cosine_penalty(net, i, j)) for i in range(n)
                   for j in range(i + 1, n)}  # fmt: skip
        return {"endpoint_cos2": cos, "connectivity_steps": self._connect_steps,
                "connectivity_loss": [round(v, 5) for v in self._connect_losses]}  # fmt: skip

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        if self.members_ is None or self._members_stale:
            return super().predict(x)
        return MeanEnsemble(self.members_)(x)

    def deployable_model(self) -> nn.Module:
        """The midpoint as one plain network, or (``inference != "midpoint"``) the ensemble."""
        if self.members_ is not None and not self._members_stale:
            return MeanEnsemble(self.members_)
        return super().deployable_model()
