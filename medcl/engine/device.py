"""Device choice and mixed precision, shared by training, evaluation and ``medcl predict``.

``resolve_device`` turns the ``auto|cpu|cuda`` option into a ``torch.device`` (asking for CUDA
without one is a clear error), and ``autocast`` is the one mixed-precision rule: bf16 autocast on
a CUDA device that supports bf16, nothing elsewhere (CPUs here have no fast bf16; it is ~40x
slower than fp32). Callers cast outputs back to float32 before they leave the model.
``use_layout`` is the one memory-layout rule (``train.channels_last``).
"""

from __future__ import annotations

__all__ = ["DEVICES", "autocast", "bf16_available", "resolve_device", "use_layout"]

import contextlib
import re
from typing import Literal

import torch
from torch import nn

from medcl.errors import ConfigError

#: Values of every ``device`` option (config ``train.device``, ``medcl predict --device``).
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(
    name: Literal["auto", "cpu", "cuda"] | str, *, option: str = "device"
) -> torch.device:
    """The device an ``auto|cpu|cuda`` option names.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        option: how the user set it (``"train.device"``, ``"--device"``), to word the error.

    Raises:
        ConfigError: an unknown name, or CUDA asked for on a machine without a CUDA device.
    """
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and re.fullmatch(r"cuda(:\d+)?", name) is None:
        raise ConfigError(f"{option} must be one of {list(DEVICES)}; got {name!r}.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"{option} is {name!r} but no CUDA device is available (torch "
            f"{torch.__version__}, torch.cuda.is_available() is False); use 'auto' or 'cpu'."
        )
    if name.startswith("cuda:") and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(
            f"{option} is {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
            "use 'cuda' or 'cuda:0'."
        )
    return torch.device(name)


def bf16_available(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 autocast fast: a CUDA device with bf16 support."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def autocast(
    device: torch.device | str, enabled: bool = True
) -> torch.autocast | contextlib.nullcontext:
    """bf16 autocast on ``device`` when ``enabled`` and :func:`bf16_available`, else a no-op.

    Outputs computed under it may be bf16: cast them with ``.float()`` before using them.
    """
    device = torch.device(device)
    if enabled and bf16_available(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_layout(module: nn.Module, channels_last: bool, spatial_dims: int) -> bool:
    """Put a 2D model's weights in NHWC (``channels_last``) or back in the contiguous layout.

    The same values in another memory layout: checkpoints store contiguous tensors, so neither
    a checkpoint nor an export depends on it; scores differ in the last float bits. A run
    trains and scores in NHWC and restores the contiguous layout before it checkpoints and
    measures latency (what an export runs). Volumes (3D) keep the contiguous layout.

    Returns:
        Whether the module is now in NHWC (batches should then be NHWC too).
    """
    nhwc = channels_last and spatial_dims == 2
    module.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    return nhwc
