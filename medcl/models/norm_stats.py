"""BatchNorm running statistics, re-estimated for a model's current weights on given images.

A BatchNorm's running statistics are an exponential average of the batches it was trained on,
under the weights it had then. Where that is not the data the model will be scored on, the
statistics are computed again, as ``torch.optim.swa_utils.update_bn`` does for averaged weights:
reset, then forward passes in training mode. Here the rows are shuffled together (each batch
mixes every group given, as a replay batch mixes cohort and memory) and every batch counts by
its rows. A federated site does this with ``federation.batchnorm: local`` (SiloBN).

When the rows at hand are a replay memory (herded exemplars: typical images, class-balanced)
rather than a sample of the cohort they stand for, their statistics are biased. Where the
whole cohort was once measured under earlier weights and the memory under those same weights,
:func:`anchor_statistics` corrects the memory's current statistics by that measured difference:
the difference estimator of double sampling (Cochran, *Sampling Techniques*, 3rd ed., 1977,
ch. 12), for each channel's mean, and its ratio form for the variance.
"""

from __future__ import annotations

__all__ = [
    "anchor_statistics",
    "norm_buffer_keys",
    "norm_statistics",
    "reestimate_batchnorm",
    "trained_norms",
]

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from medcl.data.transforms import to_model_input

_BN = nn.modules.batchnorm._BatchNorm


def norm_buffer_keys(model: nn.Module) -> list[str]:
    """State keys of every BatchNorm's buffers (running statistics, batch count)."""
    return [
        f"{name}.{b}" if name else b
        for name, m in model.named_modules()
        if isinstance(m, _BN)
        for b, _ in m.named_buffers(recurse=False)
    ]


def trained_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the BatchNorms that ``model.train()`` puts in training mode (those
    training updates; a frozen backbone's are not); ``model`` is left in eval mode."""
    model.train()
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, _BN) and m.training]
    model.eval()  # everything else (dropout, frozen norms) as when scoring
    return norms


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module, images: Sequence[Tensor], *, batch_size: int = 64, seed: int = 0
) -> int:
    """Recompute the running statistics of the BatchNorms that ``model.train()`` puts in
    training mode (those training updates; a frozen backbone's stay as they are).

    Args:
        model: a strategy or network; left in eval mode.
        images: ``(N, C, H, W[, D])`` tensors of one dtype (uint8 in [0, 255] or float in
            [0, 1]) and shape; their rows are shuffled together (``seed``) and scored
            ``batch_size`` at a time.
        batch_size: rows per forward pass (a last batch of one row joins the one before).
        seed: the shuffle's seed.

    Returns:
        The number of rows the statistics were computed on (0 and nothing changed: fewer than
        two rows, or no such BatchNorm).
    """
    images = [x for x in images if len(x)]
    n = sum(len(x) for x in images)
    norms = [m for _, m in trained_norms(model)]
    if n < 2 or not norms:
        return 0
    x = torch.cat(list(images))  # (N, C, ...)
    x = x[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    starts = list(range(0, n, batch_size))
    if n - starts[-1] == 1:  # training-mode BatchNorm needs two rows: join the batch before
        starts.pop()
    momenta = [m.momentum for m in norms]
    device = next(model.parameters()).device
    try:
        for m in norms:
            m.reset_running_stats()
            m.train()
        seen = 0
        for i, j in zip(starts, [*starts[1:], n], strict=True):
            for m in norms:  # every batch counts by its rows: a running mean over rows
                m.momentum = (j - i) / (seen + j - i)
            model(to_model_input(x[i:j].to(device)))  # (B, C, H, W[, D])
            seen += j - i
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            m.eval()
    return n


def norm_statistics(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every BatchNorm's running mean and variance (each ``(C,)``), by state key."""
    return {
        f"{name}.{b}" if name else b: getattr(m, b).detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, _BN) and m.running_mean is not None
        for b in ("running_mean", "running_var")
    }


@torch.no_grad()
def anchor_statistics(
    model: nn.Module, cohort: Mapping[str, Tensor], memory: Mapping[str, Tensor]
) -> int:
    """Correct statistics just estimated on a memory by how the memory differed from its cohort.

    ``model``'s running statistics are the memory's under the current weights (``m_now``,
    ``v_now``: :func:`reestimate_batchnorm` on the memory); ``cohort`` and ``memory`` hold the
    whole cohort's and the memory's, both under the weights of the time the cohort was at hand.
    Each channel of each BatchNorm that :func:`reestimate_batchnorm` re-estimates (a frozen one
    keeps its statistics) becomes ``mean = cohort_mean + (m_now - memory_mean)`` and ``var =
    v_now * cohort_var / memory_var``: the cohort's statistics, moved as far as the weights have
    moved the memory's. A channel whose memory variance is at most the norm's ``eps`` (nearly
    constant over the memory) takes the difference for its variance too, floored at 0. A norm
    whose entries are missing from either mapping, or of another shape, keeps the memory's
    statistics.

    Args:
        model: a strategy or network whose BatchNorm statistics were re-estimated on a memory.
        cohort: ``{state key: (C,)}``, :func:`norm_statistics` of the cohort (with the memory of
            earlier ones) then.
        memory: the same of the memory, under the same weights.

    Returns:
        The number of BatchNorms corrected.
    """
    done = 0
    for name, m in trained_norms(model):
        if m.running_mean is None:
            continue
        keys = [f"{name}.{b}" if name else b for b in ("running_mean", "running_var")]
        then = [d.get(k) for d in (cohort, memory) for k in keys]  # mean/var of each
        if any(t is None or t.shape != m.running_mean.shape for t in then):
            continue
        c_mean, c_var, k_mean, k_var = (t.to(m.running_mean) for t in then)
        m.running_mean.add_(c_mean - k_mean)
        ratio = m.running_var * c_var / k_var.clamp_min(m.eps)
        shift = (m.running_var + c_var - k_var).clamp_min(0)
        m.running_var.copy_(torch.where(k_var > m.eps, ratio, shift))
        done += 1
    return done
