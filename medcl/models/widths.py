"""The ``model.width`` whose network has a given parameter budget (Scaled MC-SGD).

Doan et al. compare Subspace-Connectivity with **Scaled MC-SGD**: MC-SGD on a network widened
until it has as many trained parameters as S-C, whose every tensor has ``n`` endpoints
(``ratio = n``; the deployed midpoint has one). :func:`width_for_parameters` finds that width.
"""

from __future__ import annotations

__all__ = ["network_parameters", "width_for_parameters"]

from medcl.models.backbones import create_backbone


def network_parameters(
    name: str, width: float, *, in_chans: int, num_classes: int, small_input: bool = True,
    spatial_dims: int = 2,
) -> int:  # fmt: skip
    """Parameters of backbone ``name`` at ``width`` plus a linear head of ``num_classes``."""
    bb = create_backbone(name, in_chans=in_chans, spatial_dims=spatial_dims,
                         small_input=small_input, width=width)  # fmt: skip
    return sum(p.numel() for p in bb.parameters()) + (bb.num_features + 1) * num_classes


def width_for_parameters(
    name: str, *, ratio: float, in_chans: int, num_classes: int, small_input: bool = True,
    spatial_dims: int = 2, steps: int = 14,
) -> float:  # fmt: skip
    """The width (rounded to 3 decimals) whose backbone + head has ``ratio`` × the parameters of
    width 1.

    Bisection on ``[1/4, 4]`` (the count grows with the width, about quadratically; channel
    counts are rounded, so the count is a step function); the evaluated width closest to the
    target is returned.

    Args:
        name: a timm ResNet or medcl 3D backbone (:func:`~medcl.models.backbones.create_backbone`).
        ratio: parameter multiple wanted (2 for S-C's line, 3 for its triangle).
        in_chans, num_classes, small_input, spatial_dims: the network's input and head.
        steps: bisection steps.
    """
    kw = {"in_chans": in_chans, "num_classes": num_classes, "small_input": small_input,
          "spatial_dims": spatial_dims}  # fmt: skip
    target = ratio * network_parameters(name, 1.0, **kw)
    lo, hi, best = 0.25, 4.0, (float("inf"), 1.0)
    for _ in range(steps):
        mid = round((lo + hi) / 2, 3)
        n = network_parameters(name, mid, **kw)
        best = min(best, (abs(n - target), mid))
        lo, hi = (mid, hi) if n < target else (lo, mid)
    return best[1]
