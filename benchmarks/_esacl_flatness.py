"""How flat a trained model's loss is around its weights (issue 23, EsaCL's mechanism).

EsaCL's claim is that a sharpness-aware (SAM) solution is flat, so pruning it needs no
retraining. ``../shared/docs/methods/esacl.md`` §7 asks for flatness "with and without SAM",
measured as the loss increase within a ρ-ball or the top Hessian eigenvalue. Both, at the end of
the stream, on a fixed set of rows (the seen experiences' validation splits), BatchNorm in eval
mode, over every trainable parameter of a dense model:

- ``sam_sharpness``: ``L(w + ρ g/‖g‖) - L(w)``, ``g = ∇L(w)`` on the whole set: SAM's
  first-order inner maximum (Foret et al., ICLR 2021, eq. 2), at the ρ EsaCL trains with;
- ``hessian_top``: the top eigenvalue of ``∇²L(w)`` by power iteration on Hessian-vector
  products (Pearlmutter 1994; the measure of Keskar et al. 2017 and Foret et al. 2021).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.data.transforms import to_model_input

#: yields ``(mean loss of a batch, its rows)``; the set's loss is their row-weighted mean
Losses = Callable[[], Iterator[tuple[Tensor, int]]]


def _weighted(params: Sequence[Tensor], losses: Losses, grads_of) -> list[Tensor]:
    out, total = [torch.zeros_like(p) for p in params], 0
    for loss, n in losses():
        for o, g in zip(out, grads_of(loss), strict=True):
            o.add_(g.detach(), alpha=n)
        total += n
    return [o / total for o in out]


def gradient(params: Sequence[Tensor], losses: Losses) -> list[Tensor]:
    """``∇L`` of the whole set, ``L`` the row-weighted mean of the batches' losses."""
    return _weighted(params, losses, lambda loss: torch.autograd.grad(loss, params))


def hessian_vector(params: Sequence[Tensor], losses: Losses, v: Sequence[Tensor]) -> list[Tensor]:
    """``∇²L · v`` of the whole set (double back-propagation, batch by batch)."""

    def hv(loss: Tensor) -> tuple[Tensor, ...]:
        g = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(g, params, grad_outputs=list(v))

    return _weighted(params, losses, hv)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def hessian_top(params: Sequence[Tensor], losses: Losses, iters: int = 20, seed: int = 0) -> float:
    """The eigenvalue of ``∇²L`` largest in magnitude (the top one near a minimum): power
    iteration from a seeded random direction, the last Rayleigh quotient."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    lam = torch.tensor(0.0)
    for _ in range(iters):
        norm = torch.sqrt(_dot(v, v))
        v = [x / norm for x in v]
        hv = hessian_vector(params, losses, v)
        lam = _dot(v, hv)
        v = hv
    return float(lam)


@torch.no_grad()
def _loss(losses: Losses) -> float:
    total, n_all = 0.0, 0
    for loss, n in losses():
        total, n_all = total + float(loss) * n, n_all + n
    return total / n_all


def sam_sharpness(params: Sequence[Tensor], losses: Losses, rho: float) -> tuple[float, float]:
    """``(L(w), L(w + ρ g/‖g‖) - L(w))``; the weights are restored afterwards."""
    g = gradient(params, losses)
    base = _loss(losses)
    scale = rho / (torch.sqrt(_dot(g, g)) + 1e-12)
    with torch.no_grad():
        for p, d in zip(params, g, strict=True):
            p.add_(d, alpha=float(scale))
        try:
            up = _loss(losses)
        finally:
            for p, d in zip(params, g, strict=True):
                p.sub_(d, alpha=float(scale))
    return base, up - base


def batch_losses(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> Losses:
    """The cross-entropy of ``model`` (eval mode) over ``(N, C, H, W)`` images, batch by batch."""

    def losses() -> Iterator[tuple[Tensor, int]]:
        for i in range(0, len(images), batch_size):
            x = to_model_input(images[i : i + batch_size])
            yield F.cross_entropy(model(x), labels[i : i + batch_size]), len(x)

    return losses


def flatness(model: nn.Module, images: Tensor, labels: Tensor, rho: float) -> dict[str, float]:
    """``{"loss", "sam_sharpness", "hessian_top"}`` of ``model`` on these rows (eval mode)."""
    was = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    losses = batch_losses(model, images, labels)
    try:
        loss, sharp = sam_sharpness(params, losses, rho)
        top = hessian_top(params, losses)
    finally:
        model.train(was)
    return {"loss": loss, "sam_sharpness": sharp, "hessian_top": top}
