"""EsaCL's sharpness-informed directional pruning (SDP): the pruning score and gRDA shrinkage.

Both parts are reconstructions (no EsaCL code is public); :mod:`medcl.strategies.esacl` states
what the paper says. Measured in medcl: the earlier score ``|w| + 0.5|g_SAM|`` chose the same
weights as ``|w|`` on real data (``|g|/|w|`` ~ 1e-5), and gRDA's published constants moved the
candidates by ~0.3 % of their magnitude over a pruning window (``benchmarks/esacl_score.py``).

**Score** (``"taylor_sam"``, reconstruction). Per layer,
``|w| / mean|w| + λ · s / mean(s)`` with ``s = |w| · sqrt(E[g_SAM²])``: Molchanov et al.'s
first-order Taylor importance ("Importance Estimation for Neural Network Pruning", CVPR 2019),
which squares ``w·g`` per mini-batch before averaging because the mean gradient vanishes near a
minimum, taken at the SAM point ``w + ε`` and averaged with an exponential moving average over
the pruning window (span ``prune_every`` updates, bias-corrected as Adam's). ``w² E[g²]`` is also
the diagonal-Fisher estimate of the loss increase ``½ H_ii w_i²`` from zeroing ``w_i`` (Optimal
Brain Damage with the Fisher for the Hessian); at ``w + ε`` it measures the curvature along
``w_i`` inside SAM's neighbourhood, which is what makes the score sharpness-aware: a large weight
in a flat direction can be pruned. Normalising both terms by their layer mean puts them on one
scale, so ``λ`` weighs them (``λ = 1``: equal). Rejected alternative: ``|w ⊙ (g(w+ε) − g(w))|``
(the issue's suggestion) is ``ρ |w ⊙ H ĝ|`` to first order, a Hessian-vector product along the
global gradient direction only, and is the difference of two noisy single-batch gradients.

**Shrinkage** (``"grda"``, reconstruction). gRDA (Chao et al., "Directional Pruning of Deep
Neural Networks", NeurIPS 2020; official code ``donlan2710/gRDA-Optimizer``) soft-thresholds a
dual-averaging accumulator, ``w = sign(a)·max(|a| − Σ_n c·lr_n^(0.5+μ)(n^μ − (n−1)^μ), 0)``,
with ``a`` the weight without shrinkage (here: ``a`` starts at ``w`` and takes every optimiser
step). Applied to the candidate set of a pruning window (``n`` counted within the window), with
``c`` set per tensor at the window's first update so that with a constant lr the cumulative
threshold at the pruning step is ``shrink_scale × median|w|`` of that tensor's candidates;
``lr_n`` is the optimiser's current lr. ``"grda_fixed"`` keeps gRDA's published ``c`` instead
(inert at these scales; kept to show it).
"""

from __future__ import annotations

__all__ = ["GradientMoment", "GrdaShrink", "legacy_scores", "taylor_sam_scores"]

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor


def taylor_sam_scores(
    weights: Mapping[str, Tensor], grad_rms: Mapping[str, Tensor], weight: float
) -> dict[str, Tensor]:
    """``|w| / mean|w| + weight · s / mean(s)``, ``s = |w| · grad_rms``, per layer.

    A layer without gradient statistics (or with ``s = 0`` everywhere) is scored by ``|w|``.
    """
    out = {}
    for p, w in weights.items():
        a = w.detach().abs()
        score = a / a.mean().clamp_min(1e-30)
        rms = grad_rms.get(p)
        if rms is not None and weight > 0:
            s = a * rms
            if float(s.mean()) > 0:
                score = score + weight * s / s.mean()
        out[p] = score
    return out


def legacy_scores(
    weights: Mapping[str, Tensor], grads: Mapping[str, Tensor | None], weight: float
) -> dict[str, Tensor]:
    """The earlier score ``|w| + weight·|g|`` with the last update's gradient (unnormalised)."""
    return {
        p: w.detach().abs() + (weight * g.abs() if (g := grads.get(p)) is not None else 0.0)
        for p, w in weights.items()
    }


class GradientMoment:
    """Bias-corrected exponential moving average of squared gradients, per layer.

    Args:
        span: updates the average spans (``β = 1 − 1/span``).
    """

    def __init__(self, span: int) -> None:
        self.beta = 1.0 - 1.0 / max(span, 1)
        self.sq_: dict[str, Tensor] = {}
        self.count_ = 0

    @torch.no_grad()
    def update(self, grads: Mapping[str, Tensor | None]) -> None:
        self.count_ += 1
        for p, g in grads.items():
            if g is None:
                continue
            sq = self.sq_.setdefault(p, torch.zeros_like(g))
            sq.mul_(self.beta).addcmul_(g, g, value=1 - self.beta)

    def rms(self) -> dict[str, Tensor]:
        """``sqrt(E[g²])`` per layer (empty before the first update)."""
        if self.count_ == 0:
            return {}
        corr = 1 - self.beta**self.count_
        return {p: (sq / corr).sqrt() for p, sq in self.sq_.items()}


class GrdaShrink:
    """Shrink a candidate set towards zero over one pruning window.

    Args:
        mode: ``"grda"`` (threshold scaled to the candidates), ``"grda_fixed"`` (``c`` as given),
            ``"linear"`` (multiplicative decay reaching zero at the pruning step) or ``"none"``.
        scale: ``"grda"``: cumulative threshold at the pruning step / median candidate ``|w|``.
        c, mu: gRDA's ``c`` (``"grda_fixed"``) and ``μ``.
    """

    def __init__(
        self,
        *,
        mode: Literal["grda", "grda_fixed", "linear", "none"],
        scale: float,
        c: float,
        mu: float,
    ) -> None:
        self.mode, self.scale, self.c, self.mu = mode, scale, c, mu
        self.start([], 0)

    @torch.no_grad()
    def start(self, targets: Sequence[tuple[Tensor, Tensor]], window: int) -> None:
        """A new window of ``window`` updates over ``(tensor, bool candidate mask)`` pairs."""
        self.targets = [(w, m) for w, m in targets if bool(m.any())]
        self.window, self.n = window, 0
        self.offset_ = [torch.zeros(int(m.sum()), dtype=w.dtype, device=w.device) for w, m in self.targets]  # fmt: skip
        self.l1_ = [0.0] * len(self.targets)  # cumulative threshold per tensor
        self.c_ = [self.c] * len(self.targets)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One update of the window (after the optimiser's step), at learning rate ``lr``."""
        if self.n >= self.window or self.mode == "none":
            return
        self.n += 1
        n, a = self.n, 0.5 + self.mu
        if self.mode == "linear":
            left = self.window - n + 1
            for w, m in self.targets:
                w[m] *= (left - 1) / left
            return
        if n == 1 and self.mode == "grda":  # c so that Σ threshold = scale × median|w| at the end
            self.c_ = [
                self.scale * float(w[m].abs().median()) / (lr**a * self.window**self.mu)
                for w, m in self.targets
            ]
        for i, (w, m) in enumerate(self.targets):
            self.l1_[i] += self.c_[i] * lr**a * (n**self.mu - (n - 1) ** self.mu)
            acc = w[m] + self.offset_[i]  # the accumulator: the weight without shrinkage
            new = torch.sign(acc) * (acc.abs() - self.l1_[i]).clamp(min=0)
            w[m] = new
            self.offset_[i] = acc - new
