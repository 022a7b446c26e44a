"""Compute cost: parameters, MACs (PyTorch's FlopCounterMode) and latency of a deployable model;
training FLOPs counted per update (:class:`TrainingFlops`), for every method alike.

Inputs are created on the model's device, so a model on a GPU is counted and timed there;
latency is measured with ``torch.utils.benchmark.Timer``, whose clock synchronises the
accelerator (CUDA kernels run asynchronously: a plain wall clock would time only the launch).
"""

from __future__ import annotations

__all__ = [
    "TrainingFlops",
    "compute_profile",
    "count_macs",
    "count_parameters",
    "layer_flops",
    "measure_latency",
    "model_device",
]

import logging
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (CPU for a stateless module)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _flop_counter(model: nn.Module, input_shape: tuple[int, ...]) -> FlopCounterMode:
    """``FlopCounterMode`` after one eval-mode forward pass of a zero input ``(1, *input_shape)``."""
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *input_shape, device=model_device(model)))
    model.train(was)
    return counter


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a single input of ``input_shape`` (C, H, W[, D]).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2), not by hand, on an
    input placed on the model's device.
    """
    return _flop_counter(model, input_shape).get_total_flops() // 2


def _timer_class() -> type:
    """``torch.utils.benchmark.Timer``, imported when first needed.

    Importing it pulls in ``torch.utils.cpp_extension``, which logs "No CUDA runtime is found,
    using CUDA_HOME=..." on a machine without CUDA: imported at start-up, every command printed
    it. The notice says nothing about medcl's latency (no extension is built), so it is muted.
    """
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        log.setLevel(level)
    return Timer


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    repeats: int = 20,
    warmup: int = 3,
) -> float:
    """Median seconds per forward pass of a batch on the model's device.

    Each of ``repeats`` passes is timed by ``torch.utils.benchmark.Timer`` (wall clock,
    synchronised with CUDA when a GPU is present; the torch thread count of the caller), after
    ``warmup`` untimed passes (cuDNN autotuning, allocator growth).
    """
    was = model.training
    model.eval()
    x = torch.zeros(batch_size, *input_shape, device=model_device(model))
    for _ in range(warmup):
        model(x)
    timer = _timer_class()(
        "model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads()
    )
    times = [timer.timeit(number=1).median for _ in range(repeats)]
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


@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Dense forward FLOPs of each conv/linear module for one input of ``input_shape``.

    Counted by ``FlopCounterMode`` (which counts matmuls and convolutions only; BatchNorm,
    activations and pooling are not counted), keyed by module path inside ``model``.
    """
    counts = _flop_counter(model, input_shape).get_flop_counts()
    root = type(model).__name__
    out = {}
    for name, m in model.named_modules():
        if name and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            out[name] = int(sum(counts.get(f"{root}.{name}", {}).values()))
    return out


class TrainingFlops:
    """Training FLOPs counted update by update, not estimated from epochs.

    Per example and per layer ``l`` with dense forward FLOPs ``F_l`` (:func:`layer_flops`),
    weight density ``d_w`` and gradient density ``d_g`` (1 for dense training)::

        forward  = sum_l F_l * d_w(l)
        backward = sum_l F_l * d_w(l)      (gradient w.r.t. activations)
                 + sum_l F_l * d_g(l)      (gradient w.r.t. weights)

    :meth:`add` multiplies by the number of examples actually passed. A method that runs a
    second pass (SAM) or a forward-only scoring pass adds it separately. This is the accounting
    of SparCL's paper made explicit (its exact formula is not published; medcl's reconstruction).

    Args:
        model: the network trained (its conv/linear layers are profiled).
        input_shape: one example's shape ``(C, H, W[, D])``.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.input_shape = tuple(input_shape)
        self.layers_ = layer_flops(model, self.input_shape)
        self.total_ = 0.0

    @classmethod
    def refreshed(
        cls, counter: TrainingFlops | None, model: nn.Module, input_shape: tuple[int, ...]
    ) -> TrainingFlops:
        """``counter`` re-profiled for ``model`` (its head may have grown), or a new counter when
        there is none or the input shape changed (called before each experience)."""
        if counter is None or counter.input_shape != tuple(input_shape):
            return cls(model, input_shape)
        counter.reprofile(model)
        return counter

    def reprofile(self, model: nn.Module) -> None:
        """Re-measure the per-layer FLOPs (after a head grew, for instance)."""
        self.layers_ = layer_flops(model, self.input_shape)

    def per_example(
        self,
        *,
        backward: bool = True,
        weight_density: Mapping[str, float] | None = None,
        grad_density: Mapping[str, float] | None = None,
    ) -> float:
        """FLOPs of one example's forward (+ backward) pass at the given densities.

        Args:
            backward: include the backward pass.
            weight_density: kept fraction per layer path (missing layers: 1).
            grad_density: fraction of weight gradients computed per layer (default: the
                weight density).
        """
        wd = weight_density or {}
        gd = grad_density if grad_density is not None else wd
        fwd = sum(f * wd.get(n, 1.0) for n, f in self.layers_.items())
        if not backward:
            return float(fwd)
        return float(2 * fwd + sum(f * gd.get(n, wd.get(n, 1.0)) for n, f in self.layers_.items()))

    def add(self, examples: int, **density: object) -> float:
        """Count ``examples`` passes (keywords of :meth:`per_example`); returns the FLOPs added."""
        flops = examples * self.per_example(**density)  # type: ignore[arg-type]
        self.total_ += flops
        return flops
