"""EsaCL (reconstruction): sparse continual learning, pruned without re-training.

Ren & Honavar, "EsaCL: Efficient Continual Learning of Sparse Models", arXiv 2401.05667 (2024).

The paper states that EsaCL prunes redundant parameters "without adversely impacting the model's
predictive power" and without re-training, through a sharpness-informed directional pruning
(SDP) and an intelligent data selection (IDS) that keeps "critical instances for estimating loss
landscape". No code is public and the paper body (equations, hyper-parameters) was not
available, so **this is a documented reconstruction, not a reimplementation**. Each update:

1. per-example losses ``l_i(w)`` on the batch (current data plus replay samples when the memory
   is on) and ``g = ∇ mean l_i(w)`` (masked: pruned weights get zero gradient);
2. SAM perturbation ``ε = ρ g / ‖g‖`` with the global norm, ``ρ = sam_rho`` (official code of
   ``davda54/sam``); ``ε`` is zero on pruned weights (reconstruction) because ``g`` is masked;
3. IDS support selection: ``sharpness_i = l_i(w + ε) - l_i(w)`` (forward only) and the second
   pass back-propagates ``mean l_i(w + ε)`` over the top ``select_fraction`` examples (official
   code of ``dydjw9/Efficient_SAM``, ESAM's sharpness-sensitive data selection);
4. the optimiser steps with that gradient; the masks are re-applied;
5. SDP: the weights that the next pruning step will remove (the lowest by
   ``|w| + score_grad_weight·|g_SAM|``, scored at the perturbed point; reconstruction) are shrunk
   towards zero every update, with gRDA's threshold increment ``c·lr^(0.5+μ)·(n^μ - (n-1)^μ)``
   (official code of ``donlan2710/gRDA-Optimizer``; applying it to a candidate set is a
   reconstruction), or linearly to reach zero exactly at the pruning step (``shrink="linear"``);
6. every ``prune_every`` updates, the mask is recomputed by the same score to the scheduled
   sparsity. No regrowth and **no fine-tuning phase after pruning** (paper). The masks, their
   scope and schedule, and replay are those of ``magnitude-pruning``
   (:mod:`medcl.strategies.magnitude_pruning`, with their sources), which EsaCL extends.

IDS redundant-example elimination: at the start of the epochs in ``removal_epochs`` (counted
within an experience) an equal share of ``removal_fraction`` of the experience is dropped, the
examples with the lowest mean sharpness (or SparCL's forgetting count, ``removal_score``);
shares and epochs follow SparCL's official code (30% in 4 rounds at epochs 5-20 of 50), scaled to
short CPU runs (reconstruction).

Deviations:
- DER++'s logit terms (the recipe's replay option) are not used: medcl's memory stores indices,
  not logits; replay is ER.
- SAM's second pass runs with BatchNorm running statistics frozen (momentum 0), so statistics are
  updated once per batch, at the unperturbed point.
- ``sdp=False`` scores by ``|w|`` and does not shrink (magnitude pruning); with ``sam_rho=0`` and
  ``ids=False`` too it is the ``magnitude-pruning`` baseline, the same machinery.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from medcl.errors import ConfigError
from medcl.models.backbones import Backbone
from medcl.strategies.base import Batch, register_strategy
from medcl.strategies.data_removal import DataRemoval
from medcl.strategies.magnitude_pruning import MagnitudePruning, PruningOptions

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory

__all__ = ["EsaCL", "EsaCLOptions", "frozen_bn_stats"]


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module):
    """BatchNorm layers keep their running statistics (momentum 0) inside the block."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom


@dataclass(frozen=True, kw_only=True)
class EsaCLOptions(PruningOptions):
    """Options of :class:`EsaCL`: magnitude pruning's plus SAM, SDP and IDS."""

    sdp: bool = True
    score_grad_weight: float = 0.5
    shrink: Literal["grda", "linear", "none"] = "grda"
    shrink_c: float = 5e-4
    shrink_mu: float = 0.51
    shrink_lr: float = 0.05
    sam_rho: float = 0.05
    ids: bool = True
    select_fraction: float = 0.5
    removal_fraction: float = 0.3
    removal_epochs: tuple[int, ...] = (1, 2, 3)
    removal_score: Literal["sharpness", "forgetting"] = "sharpness"

    def check(self, component: str) -> None:
        super().check(component)
        if self.sam_rho < 0 or not 0 < self.select_fraction <= 1:
            raise ConfigError(
                f"{component}: need sam_rho >= 0 and 0 < select_fraction <= 1; got "
                f"sam_rho={self.sam_rho}, select_fraction={self.select_fraction}."
            )
        if self.ids and self.sam_rho == 0:
            raise ConfigError(
                f"{component}: ids=True scores examples by their loss change under the SAM "
                "perturbation, which needs sam_rho > 0. Set sam_rho (e.g. 0.05) or ids: false."
            )


@register_strategy("esacl")
class EsaCL(MagnitudePruning):
    """EsaCL (reconstruction): SAM-informed directional pruning + intelligent data selection.

    Args:
        backbone: the feature extractor (its stage convs are pruned).
        sparsity, init_sparsity, prune_every, ramp_updates, structure: the masks and their
            schedule, as :class:`~medcl.strategies.magnitude_pruning.MagnitudePruning`.
        sdp: sharpness-informed scores and shrinkage (False: magnitude scores, no shrinkage).
        score_grad_weight: ``λ`` in the score ``|w| + λ|g_SAM|``.
        shrink: ``"grda"`` threshold increments, ``"linear"`` decay to zero, or ``"none"``.
        shrink_c, shrink_mu, shrink_lr: gRDA's ``c``, ``μ`` and learning rate in its threshold.
        sam_rho: SAM radius (0 disables the second pass).
        ids: intelligent data selection (support selection + redundant-example removal).
        select_fraction: share of each batch back-propagated in the second pass.
        removal_fraction: share of an experience removed in total.
        removal_epochs: epochs (0-based, within an experience) at whose start a share is removed.
        removal_score: ``"sharpness"`` (reconstruction) or ``"forgetting"`` (SparCL's DDR).
    """

    Options = EsaCLOptions

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(backbone, **options)
        self.removal = DataRemoval(
            fraction=self.removal_fraction if self.ids else 0.0,
            epochs=self.removal_epochs,
            score=self.removal_score,
            component=f"strategy {self.name!r}",
        )
        self.candidates_: dict[str, Tensor] = {}  # kept-after-next-prune masks (SDP shrinkage)

    # -- scores ----------------------------------------------------------------------------------
    def _scores(self) -> dict[str, Tensor]:
        """``|w| + λ|g_SAM|`` (SDP; ``g_SAM`` is the last update's gradient) or ``|w|``."""
        scores = super()._scores()
        if self.sdp:
            for p in scores:
                g = self.masks._weight(p).grad
                if g is not None:
                    scores[p] = scores[p] + self.score_grad_weight * g.abs()
        return scores

    # -- training ----------------------------------------------------------------------------
    def before_experience(self, exp: Experience, memory: ReplayMemory) -> None:
        super().before_experience(exp, memory)
        if self.sdp and self.shrink != "none":
            self._next_candidates()

    def epoch_rows(self, epoch: int, num_rows: int) -> Tensor:
        if epoch == 0:
            self.removal.start(num_rows)
        return self.removal.rows(epoch)

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """SAM objective ``mean l_i(w + ε)`` over the IDS-selected examples (plain CE without SAM)."""
        per = self._example_losses(logits, batch)  # (B,) l_i(w); first pass counted
        b = len(per)
        if self.removal.score == "forgetting" and batch.index is not None:
            self.removal.observe(batch.index, correct=logits.argmax(1) == batch.y)
        if self.sam_rho == 0:
            return per.mean()
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(per.mean(), [p for _, p in named], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads, strict=True)]  # fmt: skip
        scale = self.sam_rho / (torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) + 1e-12)  # fmt: skip
        perturbed = {n: p + scale * g for (n, p), g in zip(named, grads, strict=True)}  # w + ε
        x, y = batch.x, batch.y
        with frozen_bn_stats(self):
            if self.ids:  # score every example at w + ε, back-propagate the most sensitive ones
                with torch.no_grad():
                    out = functional_call(self, {k: v.detach() for k, v in perturbed.items()}, (x,))
                    sharp = F.cross_entropy(out, y, reduction="none") - per.detach()  # (B,)
                self._count(b, backward=False)
                if self.removal.score == "sharpness" and batch.index is not None:
                    self.removal.observe(batch.index, sharpness=sharp)
                sel = torch.topk(sharp, max(1, math.ceil(self.select_fraction * b))).indices
                x, y = x[sel], y[sel]
            out = functional_call(self, perturbed, (x,))  # gradient at w + ε flows to w
        self._count(len(y))
        return F.cross_entropy(out, y)

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        t = int(self.updates_) + 1  # this update (counted by the base class)
        if self.sdp and self.candidates_:
            self._shrink_candidates(t)
        super().after_update(step)  # masks re-applied, pruned on schedule
        if self._prune_due(t) and self.sdp and self.shrink != "none":
            self._next_candidates()

    def _next_candidates(self) -> None:
        """Weights (channels) that the next pruning step would remove, for SDP's shrinkage."""
        t = int(self.updates_)
        nxt = self.sparsity_at((t // self.prune_every + 1) * self.prune_every)
        if t >= self.ramp_updates or nxt <= 1 - self.masks.density() + 1e-9:
            self.candidates_ = {}
            return
        kept = self.masks.candidates(self._scores(), nxt)
        self.candidates_ = {p: self.masks.kept(p) & ~k for p, k in kept.items()}  # fmt: skip

    def _shrink_candidates(self, t: int) -> None:
        if self.shrink == "linear":  # reach exactly zero at the next pruning step
            left = self.prune_every - (t - 1) % self.prune_every
            factor, delta = (left - 1) / left, 0.0
        else:
            c, mu = self.shrink_c * self.shrink_lr ** (0.5 + self.shrink_mu), self.shrink_mu
            factor, delta = 1.0, c * (t**mu - (t - 1) ** mu)
        for path, cand in self.candidates_.items():
            tensors = [self.masks._weight(path)]
            if self.masks.structure == "channel":
                g = next(g for g in self.masks.groups if g.producer == path)
                bn = self.masks.model.get_submodule(g.norm)
                tensors += [t_ for t_ in (bn.weight, bn.bias) if t_ is not None]
            for w in tensors:
                c_ = (
                    cand.view(-1, *[1] * (w.ndim - 1)).expand_as(w)
                    if cand.shape != w.shape
                    else cand
                )
                w[c_] = torch.sign(w[c_]) * ((w[c_].abs() - delta).clamp(min=0) * factor)
