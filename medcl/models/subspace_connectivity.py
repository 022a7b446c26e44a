"""The connectivity stage: endpoints trained so that their simplex with a fixed vertex has low loss.

Shared by Subspace-Connectivity (stage 2, random ``α ~ Dirichlet(1)``; Doan et al.) and MC-SGD
(``K + 1`` grid points on a segment, the research code's gradient; Mirzadeh et al. 2021), on a
subspace network of :mod:`medcl.models.subspace` (MC-SGD's is a one-endpoint subspace).
"""

from __future__ import annotations

__all__ = ["connectivity_stage"]

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medcl.data.samples import SampleSet
from medcl.data.transforms import to_model_input
from medcl.models.subspace import SubspacePoint, sample_alpha, set_anchor, subspace_tensors


def _batches(data: SampleSet, size: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """Model-input batches of ``data`` in a random order (the global RNG, seeded by the trainer)."""
    order = torch.randperm(len(data))
    return [
        (to_model_input(data.images[i]).to(device), data.labels[i].to(device))
        for i in order.split(size)
    ]


def connectivity_stage(
    net: nn.Module,
    point: SubspacePoint,
    *,
    old: SampleSet,
    new: SampleSet,
    old_vertex: dict[str, Tensor],
    new_vertex: dict[str, Tensor],
    sampling: Literal["dirichlet", "grid"] = "dirichlet",
    grid_points: int = 5,
    straight_through: bool = False,
    epochs: int = 1,
    lr: float = 0.005,
    momentum: float = 0.8,
    batch_size: int = 64,
    losses: list[float] | None = None,
) -> int:
    """Train the endpoints so that the simplex they span with a fixed vertex has low loss.

    Per step: ``CE(old batch)`` at ``Σ α_i w_i + α_{n+1} old_vertex`` plus ``CE(new batch)`` at
    ``Σ α_i w_i + α_{n+1} new_vertex``, for one ``α ~ Dirichlet(1)`` on ``Δ_{n+1}``
    (``sampling="dirichlet"``) or summed over ``α = (s/n, …, s/n, 1 - s)``, ``s ∈ {0, 1/K, …, 1}``
    (``"grid"``, MC-SGD's ``K + 1`` points). ``epochs`` passes of
    ``max(#old batches, #new batches)`` steps (the shorter set cycles).

    Args:
        net: a subspace network (:func:`~medcl.models.subspace.to_subspace`), in train mode here.
        point: its shared point; left at the midpoint afterwards.
        old, new: the two sets (raw images, global labels).
        old_vertex, new_vertex: fixed vertices, one tensor per subspace key (detached).
        straight_through: MC-SGD's update (the gradient at the point applied to the endpoints).
        losses: if given, each step's loss (summed over its points and both sets) is appended.

    Returns:
        The number of optimiser steps.
    """
    device = next(net.parameters()).device
    params = [p for ws in subspace_tensors(net).values() for p in ws]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    n = point.n
    grid = [torch.cat([torch.full((n,), s / n), torch.tensor([1.0 - s])])
            for s in torch.linspace(0, 1, grid_points + 1).tolist()]  # fmt: skip
    set_anchor(net, "old", old_vertex)
    set_anchor(net, "new", new_vertex)
    point.straight_through, steps = straight_through, 0
    net.train()
    try:
        for _ in range(epochs):
            ob, nb = _batches(old, batch_size, device), _batches(new, batch_size, device)
            for i in range(max(len(ob), len(nb))):
                (xo, yo), (xn, yn) = ob[i % len(ob)], nb[i % len(nb)]
                loss = torch.zeros((), device=device)
                for alpha in [sample_alpha(n + 1)] if sampling == "dirichlet" else grid:
                    point.set(alpha, "old")
                    loss = loss + F.cross_entropy(net(xo), yo)
                    point.set(alpha, "new")
                    loss = loss + F.cross_entropy(net(xn), yn)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                if losses is not None:
                    losses.append(float(loss.detach()))
    finally:
        point.straight_through = False
        set_anchor(net, "old", None)
        set_anchor(net, "new", None)
        point.set_midpoint()
    return steps
