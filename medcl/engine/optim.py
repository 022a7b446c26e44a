"""The run's optimiser (``train.optimizer``) and learning-rate schedule (``train.scheduler``)."""

from __future__ import annotations

__all__ = ["make_optimizer", "make_scheduler"]

from collections.abc import Iterable

import torch
from torch import nn

from medcl.config import TrainConfig
from medcl.strategies.base import Strategy


def make_optimizer(
    cfg: TrainConfig, params: Iterable[nn.Parameter], strategy: Strategy | None = None
) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``params``, in the strategy's :meth:`Strategy.optimizer_groups`."""
    params = [p for p in params if p.requires_grad]
    groups = strategy.optimizer_groups(params) if strategy is not None else [{"params": params}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    cfg: TrainConfig, opt: torch.optim.Optimizer, total: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``train.scheduler`` over ``total`` updates (stepped after each); None for ``none``."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    return None
