"""BatchNorm running statistics, re-estimated for a model's current weights on given images.

A BatchNorm's running statistics are an exponential average of the batches it was trained on,
under the weights it had then. Where that is not the data the model will be scored on, the
statistics are computed again, as ``torch.optim.swa_utils.update_bn`` does for averaged weights:
reset, then one forward pass in training mode with a cumulative average (``momentum=None``).
The federated server pools what each site computes (``federation.batchnorm: pooled``,
:func:`medcl.federated.arrays.pool_statistics`).
"""

from __future__ import annotations

__all__ = ["reestimate_batchnorm"]

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medcl.data.transforms import to_model_input

_BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: Sequence[Tensor], batch_size: int = 64) -> int:
    """Recompute the running statistics of the BatchNorms that ``model.train()`` puts in
    training mode (those training updates; a frozen backbone's stay as they are).

    Args:
        model: a strategy or network; left in eval mode.
        images: ``(N, C, H, W[, D])`` uint8 or float tensors; each batch holds rows of one
            tensor (one of a single row is left out).
        batch_size: rows per forward pass.

    Returns:
        The number of rows the statistics were computed on (0: nothing changed).
    """
    images = [x for x in images if len(x) > 1]  # training-mode BatchNorm needs 2 rows a batch
    n = sum(len(x) for x in images)
    model.train()
    norms = [m for m in model.modules() if isinstance(m, _BN) and m.training]
    if n == 0 or not norms:
        model.eval()
        return 0
    momenta = [m.momentum for m in norms]
    model.eval()  # everything else (dropout, frozen norms) as when scoring
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    device = next(model.parameters()).device
    for x in images:
        starts = list(range(0, len(x), batch_size))
        if len(x) - starts[-1] == 1:  # no batch of one row: the last one joins the one before
            starts.pop()
        for i, j in zip(starts, [*starts[1:], len(x)], strict=True):
            model(to_model_input(x[i:j].to(device)))  # (B, C, H, W[, D])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        m.eval()
    return n
