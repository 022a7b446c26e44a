"""Scoring fixed images through the plastic back only (the curves of the stability benchmark).

From experience 1 on, every arm of ``benchmarks/stability_gap.py`` keeps the front (stem and
early blocks) at the pretrained weights, with BatchNorm in eval mode: base ``head`` trains only
the head in experience 0, and later experiences train the back and the head. The front's output
on a fixed image is therefore the same in every arm, seed and update, so the curves compute it
once per worker process and each evaluation runs the back and the head only (at 64 px the back
works on 2x2 maps: a small part of the forward pass). The first use in each run checks the
shortcut against the strategy's own :meth:`predict` and raises when they disagree.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from medcl.data.transforms import to_model_input
from medcl.models.plasticity import split_units
from medcl.strategies.base import Strategy

_FRONT: dict[tuple, Tensor] = {}  # (key, experience) -> front output of its fixed test subset


class _Stop(Exception):
    """Raised by the pre-hook once the back's input is captured: the rest is not computed."""


@torch.no_grad()
def front_output(s: Strategy, images: Tensor, trainable_stages: int) -> Tensor:
    """``(N, C, h, w)`` input of the back's first unit for raw ``images`` (eval mode)."""
    first = split_units(s.backbone, trainable_stages)[1][0].module
    got: list[Tensor] = []

    def hook(_module, args) -> None:
        got.append(args[0].detach())
        raise _Stop

    was_training, dev = s.training, s.head.weight.device
    s.eval()
    handle = first.register_forward_pre_hook(hook)
    try:
        for i in range(0, len(images), 256):
            with contextlib.suppress(_Stop):
                s.backbone(to_model_input(images[i : i + 256].to(dev)))
    finally:
        handle.remove()
        s.train(was_training)
    return torch.cat(got)


@torch.no_grad()
def back_scores(s: Strategy, front: Tensor, trainable_stages: int) -> Tensor:
    """``(N, K)`` scores from front outputs: the back's units in order, pooling, the head."""
    back = [u.module for u in split_units(s.backbone, trainable_stages)[1]]
    was_training = s.training
    s.eval()
    out = []
    for i in range(0, len(front), 256):
        x = front[i : i + 256]
        for m in back:
            x = m(x)
        out.append(s.head(s.backbone.net.forward_head(x)).float())
    s.train(was_training)
    return torch.cat(out)


def cached_front(key: tuple, s: Strategy, images: Tensor, trainable_stages: int) -> Tensor:
    """:func:`front_output`, once per ``key`` in this process."""
    if key not in _FRONT:
        _FRONT[key] = front_output(s, images, trainable_stages)
    return _FRONT[key]


@torch.no_grad()
def check_shortcut(s: Strategy, images: Tensor, front: Tensor, trainable_stages: int) -> None:
    """Raise when back-only scores from ``front`` (e.g. cached outputs of the front for
    ``images``) differ from :meth:`Strategy.predict` on ``images``."""
    s_was = s.training
    s.eval()
    full = s.predict(to_model_input(images.to(s.head.weight.device))).float()
    s.train(s_was)
    fast = back_scores(s, front, trainable_stages)
    if not torch.allclose(fast, full, rtol=1e-4, atol=1e-4):
        raise RuntimeError(
            "back-only scores differ from the strategy's predict (max abs difference "
            f"{(fast - full).abs().max():.3g}): the front is not frozen or the back's units do "
            "not form a chain; rerun with --no-front-cache (the full forward pass)."
        )
