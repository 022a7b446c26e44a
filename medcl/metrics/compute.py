"""Compute cost of a deployable model: parameters, MACs (PyTorch's FlopCounterMode), latency."""

from __future__ import annotations

__all__ = ["compute_profile", "count_macs", "count_parameters", "measure_latency"]

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a single input of ``input_shape`` (C, H, W[, D]).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2), not by hand.
    """
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *input_shape))
    model.train(was)
    return counter.get_total_flops() // 2


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    repeats: int = 20,
    warmup: int = 3,
) -> float:
    """Median seconds per forward pass of a batch (CPU wall clock)."""
    was = model.training
    model.eval()
    x = torch.zeros(batch_size, *input_shape)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    model.train(was)
    return float(sorted(times)[len(times) // 2])


def compute_profile(
    model: nn.Module, input_shape: tuple[int, ...], *, latency: bool = True
) -> dict[str, float]:
    """Parameters, MACs and (optionally) batch-1 latency in ms of ``model``."""
    out: dict[str, float] = {
        "parameters": count_parameters(model),
        "macs": count_macs(model, input_shape),
    }
    if latency:
        out["latency_ms_b1"] = 1000 * measure_latency(model, input_shape)
    return out
