"""The interface every deployable model implements, so export never special-cases a method.

A strategy's :meth:`~medcl.strategies.base.Strategy.deployable_model` returns a
:class:`DeployableModel`. Its methods carry timm's names:

- ``forward_features(x)``: ``(B, C, H, W[, D])`` -> the features the head consumes (``(B, F)``
  for one feature extractor; a model may keep more, e.g. ``(B, S, F)`` for S adapter sets);
- ``forward_head(features)``: -> class scores ``(B, K)``; ``forward_head(features,
  pre_logits=True)``: the ``(B, F)`` embedding (what the OOD guard is fitted on);
- ``route(features)``: ``(B,)`` int64, the head each sample is routed to; ``-1`` for a model
  that does not route (:attr:`DeployableModel.routed` says which; head ``j`` is the head of the
  ``j``-th learned experience);
- ``forward(x) = forward_head(forward_features(x))``.

:class:`~medcl.export.module.ExportModule` calls these four and nothing else.
"""

from __future__ import annotations

__all__ = ["DeployableModel"]

from typing import ClassVar

import torch
from torch import Tensor, nn


class DeployableModel(nn.Module):
    """Base class of deployable models: features, head (or embedding) and routing.

    Subclasses implement :meth:`forward_features` and :meth:`forward_head`; a model that routes
    samples to one of several heads also overrides :meth:`route` and sets :attr:`routed`.
    """

    #: Whether :meth:`route` picks a head per sample (head ``j``: the ``j``-th experience's).
    routed: ClassVar[bool] = False

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W[, D])`` -> the features :meth:`forward_head` consumes."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_features")

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Features -> class scores ``(B, K)``, or with ``pre_logits`` the ``(B, F)`` embedding."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_head")

    def route(self, features: Tensor) -> Tensor:
        """``(B,)`` int64 index of the head each sample goes to; ``-1``: the model does not route."""
        return torch.full_like(features.flatten(1)[:, 0], -1, dtype=torch.long)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W[, D])`` -> class scores ``(B, K)``."""
        return self.forward_head(self.forward_features(x))
