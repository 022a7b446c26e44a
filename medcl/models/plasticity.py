"""Frozen front / plastic back: the split, LoRA on the back's pointwise convs, BatchNorm policy,
layer-wise learning rates and the OneCycle schedule (used by SGM and vanilla rehearsal).

A network is read as an ordered list of *units*: the children of ``backbone.net`` in registration
(= forward) order, with every ``nn.Sequential`` expanded into its children, so a unit is a stem
layer, one block (``blocks.4.0``, ``layer3.1``) or a trailing layer (``conv_head``, ``bn2``).
The plastic back starts at the first unit inside a chosen stage and runs to the end; the front
(stem and earlier blocks) is everything before it.
"""

from __future__ import annotations

__all__ = [
    "Unit",
    "apply_bn_policy",
    "inject_lora",
    "layerwise_param_groups",
    "lora_targets",
    "merge_lora",
    "onecycle",
    "split_units",
]

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medcl.errors import ConfigError
from medcl.models.backbones import Backbone

ADAPTER = "default"
BNPolicy = Literal["frozen", "train"]


@dataclass(frozen=True)
class Unit:
    """One block-level piece of a network: its path in ``backbone`` and the module."""

    name: str
    module: nn.Module


def _units(module: nn.Module, prefix: str) -> list[Unit]:
    out: list[Unit] = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}"
        out += _units(child, path) if isinstance(child, nn.Sequential) else [Unit(path, child)]
    return out


def split_units(backbone: Backbone, trainable_stages: int) -> tuple[list[Unit], list[Unit]]:
    """Split the backbone's parametrised units into a frozen front and a plastic back.

    Args:
        backbone: the network.
        trainable_stages: the back starts at the first unit of the ``trainable_stages``-th last
            stage of :meth:`Backbone.stages` and includes every later unit (e.g. EfficientNet's
            ``conv_head`` and ``bn2``); 0 makes the whole backbone frozen.

    Returns:
        ``(front, back)``: lists of units that hold parameters, in forward order.

    Raises:
        ConfigError: ``trainable_stages`` outside ``0..len(stages)``.
    """
    stages = backbone.stages()
    if not 0 <= trainable_stages <= len(stages):
        raise ConfigError(
            f"strategy.trainable_stages must be in 0..{len(stages)} (backbone {backbone.name!r} "
            f"has stages {[s.name for s in stages]}); got {trainable_stages}."
        )
    units = [u for u in _units(backbone.net, "net") if any(True for _ in u.module.parameters())]
    if trainable_stages == 0:
        return units, []
    first = f"net.{stages[len(stages) - trainable_stages].name}"
    start = next(
        i for i, u in enumerate(units) if u.name == first or u.name.startswith(first + ".")
    )
    return units[:start], units[start:]


def lora_targets(
    units: Iterable[Unit], *, kind: Literal["pointwise", "all"] = "pointwise"
) -> list[str]:
    """Module paths to adapt: the 1x1 convolutions of ``units`` (or every conv/linear layer).

    ``pointwise`` takes the ungrouped 1x1 convs inside blocks (units with sub-modules), outside
    squeeze-excitation modules (timm's ``conv_pw``/``conv_pwl``, ResNet bottleneck
    ``conv1``/``conv3`` and ``downsample``): the analogue of ConvNeXt's ``pwconv1``/``pwconv2``
    that SGM adapts; a trailing single layer such as ``conv_head`` is not a block. ``all``
    takes every linear and ungrouped conv layer (peft cannot adapt a depthwise conv at these
    ranks, nor merge one).
    """
    out = []
    for u in units:
        if kind == "pointwise" and next(u.module.children(), None) is None:
            continue  # a single layer (EfficientNet's conv_head), not a block
        for name, m in u.module.named_modules():
            path = f"{u.name}.{name}" if name else u.name
            if isinstance(m, nn.Linear) and kind == "all":
                out.append(path)
            elif isinstance(m, nn.Conv2d | nn.Conv3d | nn.Conv1d):
                pointwise = all(k == 1 for k in m.kernel_size) and m.groups == 1
                in_se = any(part in ("se", "attn") for part in path.split("."))
                if m.groups == 1 and (kind == "all" or (pointwise and not in_se)):
                    out.append(path)
    return out


def inject_lora(backbone: Backbone, targets: list[str], *, rank: int, alpha: float) -> None:
    """Add ``peft`` LoRA adapters to ``targets`` (A: Kaiming, B: 0, so outputs are unchanged).

    The rank is capped at each layer's ``min(in, out)`` channels; the delta is scaled by
    ``alpha / rank`` of that layer.
    """
    from peft import LoraConfig, inject_adapter_in_model

    ranks = {}
    for t in targets:
        m = backbone.get_submodule(t)
        width = (
            min(m.in_channels, m.out_channels)
            if not isinstance(m, nn.Linear)
            else min(m.in_features, m.out_features)
        )
        if width < rank:
            ranks[f"^{t}$"] = width  # peft matches rank_pattern keys as regexes on the full name
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, rank_pattern=ranks)
    inject_adapter_in_model(cfg, backbone)


@torch.no_grad()
def merge_lora(module: nn.Module, *, unload: bool = False) -> int:
    """Fold every LoRA delta into its base layer; re-initialise the adapter or remove it.

    Args:
        module: a module with ``peft`` LoRA layers (modified in place).
        unload: replace each LoRA layer by its (merged) base layer instead of re-initialising.

    Returns:
        The number of layers merged.
    """
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        base = layer.get_base_layer()
        base.weight += layer.get_delta_weight(ADAPTER).to(base.weight.dtype)
        if unload:
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, base)
        else:
            layer.reset_lora_parameters(ADAPTER, True)  # A: Kaiming, B: 0 -> output unchanged
    return len(layers)


def apply_bn_policy(backbone: Backbone, back: list[Unit], policy: BNPolicy) -> None:
    """Put the network in the policy's mode; call after ``backbone.train()``.

    Every norm layer of the front runs in eval mode (its statistics are part of the frozen
    front). ``frozen``: the back's BatchNorms run in eval mode too (statistics fixed at their
    loaded values). ``train``: they update their running statistics from the training batches.
    """
    plastic = {id(m) for u in back for m in u.module.modules()}
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.train(policy == "train" and id(m) in plastic)


def layerwise_param_groups(
    params: Iterable[nn.Parameter],
    depth_of: dict[int, int],
    *,
    lr: float,
    decay: float,
    weight_decay: float,
) -> list[dict]:
    """One optimiser group per depth with ``lr * decay ** depth`` (the head is depth 0).

    Args:
        params: the trainable parameters.
        depth_of: ``id(param) -> depth`` (0 for the head, 1 for the last unit, ...).
        lr: the head's (maximum) learning rate.
        decay: layer-wise decay factor in ``(0, 1]``.
        weight_decay: decoupled weight decay for every group.

    Returns:
        Groups ordered by depth, each with ``params``, ``lr``, ``weight_decay``, ``depth``.
    """
    by_depth: dict[int, list[nn.Parameter]] = {}
    for p in params:
        by_depth.setdefault(depth_of.get(id(p), 0), []).append(p)
    return [
        {"params": ps, "lr": lr * decay**d, "weight_decay": weight_decay, "depth": d}
        for d, ps in sorted(by_depth.items())
    ]


def onecycle(
    opt: torch.optim.Optimizer, total: int, *, warmup: float
) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycle schedule whose peak is each group's own ``lr`` (so layer-wise decay survives).

    The authors' scalar ``max_lr`` resets every group to one rate (docs/methods/sgm.md,
    pitfall 3); a per-group list keeps the decayed rates.
    """
    return torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=[g["lr"] for g in opt.param_groups],
        total_steps=max(total, 2),
        pct_start=warmup,
    )
