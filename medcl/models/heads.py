"""Classifier heads, and the data-driven initialisation of new output units (SGM's)."""

from __future__ import annotations

__all__ = ["ExpandableHead", "FrozenRows", "class_mean_init", "match_old_rows"]

import torch
import torch.nn.functional as F
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


class FrozenRows:
    """The first ``n`` rows of a head held fixed while the other rows train.

    Gradient hooks zero the rows' gradients; :meth:`restore`, called after each optimiser step,
    writes the saved rows back, so decoupled weight decay (AdamW) cannot move them either.

    Args:
        head: the head (its rows ``< n`` are frozen).
        n: number of leading rows to hold.
    """

    def __init__(self, head: ExpandableHead, n: int) -> None:
        self.head = head
        mask = torch.ones(head.num_classes, 1, device=head.weight.device)
        mask[:n] = 0
        self._hooks = [
            head.weight.register_hook(lambda g: g * mask.to(g)),
            head.bias.register_hook(lambda g: g * mask[:, 0].to(g)),
        ]
        self._rows = (head.weight[:n].detach().clone(), head.bias[:n].detach().clone())

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved rows back."""
        w, b = self._rows
        self.head.weight[: len(w)] = w
        self.head.bias[: len(b)] = b

    def release(self) -> None:
        """Remove the gradient hooks (the rows train again)."""
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def class_mean_init(
    features: Tensor, labels: Tensor, classes: list[int], *, center: bool = True
) -> Tensor:
    """Rows for new output units: mean L2-normalised feature of each class.

    Args:
        features: ``(N, F)`` penultimate features; labels: ``(N,)``; classes: the new classes.
        center: subtract each feature vector's mean over its ``F`` entries first (what the
            authors' ConvNeXt LayerNorm features already are; see :mod:`medcl.strategies.sgm`).

    Returns:
        ``(len(classes), F)``; a class without samples gets a zero row.
    """
    f = features.float()
    f = F.normalize(f - f.mean(1, keepdim=True) if center else f, dim=1)
    out = f.new_zeros(len(classes), f.shape[1])
    for i, c in enumerate(classes):
        mask = labels == c
        if mask.any():
            out[i] = f[mask].mean(0)
    return out


@torch.no_grad()
def match_old_rows(
    rows: Tensor,
    weight: Tensor,
    bias: Tensor,
    n_old: int,
    old_features: Tensor | None,
    quantile: float,
) -> tuple[Tensor, Tensor]:
    """New rows scaled like the old ones, with biases calibrated on old exemplars.

    Each row gets the old rows' mean norm; its bias is set so that the new unit outranks the old
    classes' top logit on only a ``quantile`` of the old exemplars (the old biases' mean when
    there are none).

    Args:
        rows: ``(K, F)`` new rows (e.g. :func:`class_mean_init`).
        weight: ``(C, F)`` head weights, the ``n_old`` old rows first.
        bias: ``(C,)`` head biases.
        n_old: number of old rows (> 0).
        old_features: ``(M, F)`` features of old-class exemplars, or None.
        quantile: the share of old exemplars on which a new unit may win, in ``[0, 1]``.

    Returns:
        ``(rows, biases)``: ``(K, F)`` and ``(K,)``.
    """
    old_norm = weight[:n_old].norm(dim=1).mean()
    rows = F.normalize(rows, dim=1) * old_norm  # (K, F)
    new_bias = bias[:n_old].mean().expand(len(rows))
    if old_features is not None:
        top_old = (old_features @ weight[:n_old].T + bias[:n_old]).max(1).values  # (M,)
        margin = top_old[:, None] - old_features @ rows.T  # (M, K): bias at which unit k ties
        new_bias = torch.quantile(margin, quantile, dim=0)  # (K,)
    return rows, new_bias
