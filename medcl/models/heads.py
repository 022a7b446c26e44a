"""Classifier heads."""

from __future__ import annotations

__all__ = ["ExpandableHead"]

import torch
from torch import Tensor, nn


class ExpandableHead(nn.Module):
    """A linear head whose outputs grow with new classes; existing rows are kept intact.

    Args:
        in_features: feature width.
        num_classes: initial number of outputs (may be 0).
    """

    def __init__(self, in_features: int, num_classes: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation of every row."""
        if self.weight.numel():
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)
            bound = 1 / self.in_features**0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def expand(self, num_classes: int) -> None:
        """Grow to ``num_classes`` outputs (no-op if already that size); new rows use Linear init."""
        old = self.num_classes
        if num_classes <= old:
            return
        new_w = torch.empty(num_classes - old, self.in_features, device=self.weight.device)
        nn.init.kaiming_uniform_(new_w, a=5**0.5)
        bound = 1 / self.in_features**0.5
        new_b = torch.empty(num_classes - old, device=self.bias.device).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.data, new_w]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, new_b]))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_features)`` -> ``(B, num_classes)``."""
        return nn.functional.linear(x, self.weight, self.bias)
