"""Weight masks for sparse training, shared by the pruning strategies (EsaCL, SparCL, magnitude).

What is pruned (the scope of SparCL's official code, ``neu-spiral/SparCL``): the conv and linear
weights *inside the feature stages* of a backbone (``Backbone.stages()``, e.g. ``layer1..layer4``
of a ResNet); the stem, the shortcut (``downsample``) convs, BatchNorm and the head stay dense.

Two structures, one mechanism (:class:`WeightMasks`):

- ``"unstructured"``: one boolean mask per weight tensor; each layer is pruned to the same
  sparsity (per-layer, as SparCL).
- ``"channel"``: whole output channels of the first conv(s) of each residual block
  (``conv{k}`` -> ``bn{k}`` -> ``conv{k+1}``, :func:`channel_groups`). A pruned channel zeroes
  the producer's filter, its BatchNorm scale and shift (so the channel outputs exactly 0 in train
  and eval mode) and the consumer's input slice; :func:`slim_copy` then removes those channels
  physically, giving a smaller module that computes the same outputs.

Masks are real: weights are multiplied by their mask (:meth:`WeightMasks.apply_`), gradients are
multiplied by it in a tensor hook (so the optimiser never moves a pruned weight and SAM's
perturbation ``ε ∝ g`` never touches one), and masks are buffers, saved with the checkpoint.
"""

from __future__ import annotations

__all__ = [
    "ChannelGroup",
    "WeightMasks",
    "channel_groups",
    "one_shot_prune",
    "prunable_layers",
    "slim_copy",
]

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from medcl.errors import ConfigError

Structure = Literal["unstructured", "channel"]
_SHORTCUT_NAMES = frozenset({"downsample", "shortcut", "skip"})


def _stage_paths(model: nn.Module, stages: Sequence[str]) -> list[tuple[str, nn.Module]]:
    out = []
    for stage in stages:
        for sub, m in model.get_submodule(stage).named_modules():
            if not _SHORTCUT_NAMES.intersection(sub.split(".")):
                out.append((f"{stage}.{sub}" if sub else stage, m))
    return out


def prunable_layers(model: nn.Module, stages: Sequence[str]) -> list[str]:
    """Paths of the conv/linear modules inside ``stages`` of ``model``, shortcuts excluded.

    Args:
        model: the network (paths are relative to it).
        stages: paths of its feature stages (e.g. ``["net.layer1", ..., "net.layer4"]``).
    """
    return [p for p, m in _stage_paths(model, stages) if isinstance(m, (_ConvNd, nn.Linear))]


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels of ``producer`` (normalised by ``norm``) read only by ``consumer``."""

    producer: str
    norm: str
    consumer: str


def channel_groups(model: nn.Module, stages: Sequence[str]) -> list[ChannelGroup]:
    """Residual-block convs whose output channels can be removed: ``conv{k}, bn{k} -> conv{k+1}``.

    Found by attribute names shared by timm and MONAI ResNet blocks (``conv1``/``bn1``/``conv2``
    and, in bottlenecks, ``conv2``/``bn2``/``conv3``), with matching channel counts and no groups.
    """
    groups = []
    for path, block in _stage_paths(model, stages):
        for k in (1, 2):
            a, bn, b = (getattr(block, f"{n}{j}", None) for n, j in (("conv", k), ("bn", k), ("conv", k + 1)))  # fmt: skip
            if (
                isinstance(a, _ConvNd)
                and isinstance(b, _ConvNd)
                and isinstance(bn, _BatchNorm)
                and a.groups == b.groups == 1
                and a.out_channels == bn.num_features == b.in_channels
            ):
                groups.append(
                    ChannelGroup(f"{path}.conv{k}", f"{path}.bn{k}", f"{path}.conv{k + 1}")
                )
    return groups


def _key(path: str) -> str:
    return "m_" + path.replace(".", "__")


class WeightMasks(nn.Module):
    """Boolean masks over the prunable weights of ``model``, kept as buffers (checkpointed).

    Args:
        model: the network whose weights are masked (not registered as a submodule).
        stages: paths of its feature stages (the pruning scope).
        structure: ``"unstructured"`` (per weight) or ``"channel"`` (whole output channels).

    Raises:
        ConfigError: nothing to prune in ``stages`` for the requested structure.
    """

    def __init__(
        self, model: nn.Module, stages: Sequence[str], *, structure: Structure = "unstructured"
    ) -> None:
        super().__init__()
        if structure not in ("unstructured", "channel"):
            raise ConfigError(f"structure must be 'unstructured' or 'channel'; got {structure!r}.")
        self.structure = structure
        self._model = {"root": model}  # a plain dict: the model is not a submodule of the masks
        if structure == "unstructured":
            self.layers = prunable_layers(model, stages)
            for p in self.layers:
                self.register_buffer(_key(p), torch.ones_like(self._weight(p), dtype=torch.bool))
            self.groups: list[ChannelGroup] = []
        else:
            self.groups = channel_groups(model, stages)
            self.layers = list(
                dict.fromkeys(p for g in self.groups for p in (g.producer, g.consumer))
            )
            for g in self.groups:
                n = model.get_submodule(g.producer).out_channels
                self.register_buffer(_key(g.producer), torch.ones(n, dtype=torch.bool))
        if not self.layers:
            raise ConfigError(
                f"no {structure} pruning targets found in stages {list(stages)} of "
                f"{type(model).__name__}; use a ResNet-family backbone or structure='unstructured'."
            )
        self._handles: list = []
        self.grad_masks: dict[str, Tensor] = {}  # optional extra gradient masks (SparCL's DGM)
        self.grad_observer: Callable[[str, Tensor], None] | None = None

    # -- access ----------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model["root"]

    def _weight(self, path: str) -> nn.Parameter:
        return self.model.get_submodule(path).weight

    def weight_mask(self, path: str) -> Tensor:
        """The mask of layer ``path``'s weight, same shape as the weight."""
        w = self._weight(path)
        if self.structure == "unstructured":
            return getattr(self, _key(path))
        mask = torch.ones_like(w, dtype=torch.bool)
        for g in self.groups:  # a bottleneck's conv2 consumes one group and produces the next
            ch = getattr(self, _key(g.producer))
            if path == g.producer:
                mask = mask & ch.view(-1, *[1] * (w.ndim - 1))
            if path == g.consumer:
                mask = mask & ch.view(1, -1, *[1] * (w.ndim - 2))
        return mask

    def masked_parameters(self) -> list[tuple[str, nn.Parameter, Callable[[], Tensor]]]:
        """``(name, parameter, mask getter)`` for every parameter the masks act on."""
        out = [(p, self._weight(p), lambda p=p: self.weight_mask(p)) for p in self.layers]
        for g in self.groups:  # the producer's bias and BatchNorm scale/shift follow its channels
            ch = lambda g=g: getattr(self, _key(g.producer))  # noqa: E731
            bn = self.model.get_submodule(g.norm)
            conv = self.model.get_submodule(g.producer)
            for name, t in ((f"{g.norm}.weight", bn.weight), (f"{g.norm}.bias", bn.bias), (f"{g.producer}.bias", conv.bias)):  # fmt: skip
                if isinstance(t, nn.Parameter):
                    out.append((name, t, ch))
        return out

    def kept(self, path: str) -> Tensor:
        """The mask buffer of ``path``: its weight's mask, or (channels) its ``(C,)`` channel mask."""
        return getattr(self, _key(path))

    def channel_mask(self, group: ChannelGroup) -> Tensor:
        """``(C,)`` bool: the kept output channels of ``group.producer``."""
        return getattr(self, _key(group.producer))

    def density(self) -> float:
        """Fraction of the masked layers' weights that are kept."""
        kept = sum(int(self.weight_mask(p).sum()) for p in self.layers)
        return kept / sum(self._weight(p).numel() for p in self.layers)

    def layer_density(self) -> dict[str, float]:
        """Kept fraction of each masked layer's weight."""
        return {p: float(self.weight_mask(p).float().mean()) for p in self.layers}

    # -- keeping masks real -------------------------------------------------------------------
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every pruned weight (and, for channels, its BatchNorm scale/shift and bias)."""
        for _, t, mask in self.masked_parameters():
            t.mul_(mask())

    def attach(self) -> None:
        """Mask gradients in a hook, so optimisers and SAM see zeros at pruned positions."""
        self.detach_hooks()
        for name, t, mask in self.masked_parameters():
            self._handles.append(
                t.register_hook(lambda g, n=name, m=mask: self._mask_grad(n, g, m))
            )

    def _mask_grad(self, name: str, g: Tensor, mask: Callable[[], Tensor]) -> Tensor:
        g = g * mask()
        if self.grad_observer is not None:
            self.grad_observer(name, g)
        extra = self.grad_masks.get(name)
        return g if extra is None else g * extra

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- pruning ------------------------------------------------------------------------------
    @torch.no_grad()
    def candidates(self, scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
        """The masks :meth:`prune_` would produce for ``sparsity`` (without changing anything).

        Args:
            scores: importance per layer, the weight's shape (higher = keep).
            sparsity: target fraction of pruned weights (channels) per layer (group).

        Returns:
            ``{path: kept}`` keyed like the buffers (weights or channels). Pruned entries stay
            pruned (no regrowth): their score is ``-inf``.
        """
        out = {}
        if self.structure == "unstructured":
            for p in self.layers:
                out[p] = _top_fraction(scores[p], getattr(self, _key(p)), 1 - sparsity)
        else:
            for g in self.groups:
                s = scores[g.producer].abs().flatten(1).mean(1)  # (C,) mean score per filter
                out[g.producer] = _top_fraction(s, self.channel_mask(g), 1 - sparsity)
        return out

    @torch.no_grad()
    def prune_(self, scores: Mapping[str, Tensor], sparsity: float) -> None:
        """Prune each layer (group) to ``sparsity`` by ``scores`` and zero the pruned weights."""
        for p, kept in self.candidates(scores, sparsity).items():
            getattr(self, _key(p)).copy_(kept)
        self.apply_()

    @torch.no_grad()
    def regrow_(self, sparsity: float, generator: torch.Generator) -> None:
        """Re-enable random pruned weights (value 0) until each layer is at ``sparsity``.

        SparCL's task-aware dynamic masking (official code): prune to a lower bound, regrow at
        random to an upper bound. Unstructured masks only; positions in logical (NCHW) order.
        """
        for p in self.layers:
            m = getattr(self, _key(p))
            flat = m.flatten().clone()  # logical order, whatever the layout (train.channels_last)
            if (need := round((1 - sparsity) * flat.numel()) - int(flat.sum())) > 0:
                off = torch.nonzero(~flat.cpu()).flatten()
                pick = off[torch.randperm(len(off), generator=generator)[:need]]
                flat[pick.to(flat.device)] = True
                m.copy_(flat.view(m.shape))


def _top_fraction(score: Tensor, kept: Tensor, fraction: float) -> Tensor:
    """Bool mask keeping the ``fraction`` highest-scoring entries among those ``kept`` (>= 1)."""
    k = max(1, round(fraction * kept.numel()))
    k = min(k, int(kept.sum()))
    s = score.detach().float().flatten().clone()
    s[~kept.flatten()] = float("-inf")
    out = torch.zeros_like(kept.flatten())
    out[torch.topk(s, k).indices] = True
    return out.view_as(kept)


@torch.no_grad()
def one_shot_prune(
    model: nn.Module, stages: Sequence[str], sparsity: float, *,
    scores: Mapping[str, Tensor] | None = None, structure: Structure = "unstructured",
) -> tuple[nn.Module, WeightMasks]:  # fmt: skip
    """A copy of ``model`` pruned once to ``sparsity``, with no training ("no re-training").

    Args:
        model: the network (dense, or trained sparse); left unchanged.
        stages: paths of its feature stages (the pruning scope, as :class:`WeightMasks`).
        sparsity: fraction of each masked layer's weights (channels) to prune, in [0, 1).
        scores: per layer path (``WeightMasks.layers``), the weight's shape, higher = keep;
            default ``|w|`` (magnitude). Another run's final mask applies as ``kept.float()``.
        structure: ``"unstructured"`` or ``"channel"``.

    Returns:
        ``(copy, its masks)``: pruned weights zero, all else the original's; no gradient hooks.

    Raises:
        ConfigError: ``sparsity`` outside [0, 1), or ``scores`` missing a masked layer.
    """
    if not 0 <= sparsity < 1:
        raise ConfigError(f"one_shot_prune: sparsity must be in [0, 1); got {sparsity}.")
    pruned = copy.deepcopy(model)
    masks = WeightMasks(pruned, stages, structure=structure)
    need = [g.producer for g in masks.groups] if structure == "channel" else masks.layers
    scores = scores if scores is not None else {p: masks._weight(p).abs() for p in need}
    if missing := [p for p in need if p not in scores]:
        raise ConfigError(f"one_shot_prune: scores has no entry for layers {missing}; give one "
                          "per masked layer path, or scores=None for magnitude.")  # fmt: skip
    masks.prune_(scores, sparsity)
    return pruned, masks


@torch.no_grad()
def slim_copy(model: nn.Module, masks: WeightMasks) -> nn.Module:
    """A copy of ``model`` with the pruned channels of ``masks`` physically removed.

    The copy computes the same outputs as the masked ``model`` (pruned channels output exactly 0:
    their filter, BatchNorm scale and shift are zero), with smaller convs and BatchNorms. It
    resizes its slimmed layers to the shapes of a state dict loaded into it, so a safetensors
    export rebuilt from the config (with a different mask) loads without pickled structure.

    Args:
        model: the masked network (``masks.model`` or a module holding it at the same paths).
        masks: channel masks (``structure="channel"``).

    Raises:
        ValueError: ``masks`` is not channel-structured.
    """
    if masks.structure != "channel":
        raise ValueError("slim_copy needs channel masks (structure='channel').")
    slim = copy.deepcopy(model)
    paths = [
        ChannelGroup(
            *(_path_prefix(model, masks.model) + p for p in (g.producer, g.norm, g.consumer))
        )
        for g in masks.groups
    ]
    for g, path in zip(masks.groups, paths, strict=True):
        _slim_group(slim, path, torch.nonzero(masks.channel_mask(g).cpu()).flatten())

    def fit_shapes(module, state, prefix, *args) -> None:  # load_state_dict pre-hook
        for g in paths:
            w = state.get(f"{prefix}{g.producer}.weight")
            if w is not None and w.shape[0] != module.get_submodule(g.producer).out_channels:
                _slim_group(module, g, w.shape[0])  # values come from the state dict

    slim.register_load_state_dict_pre_hook(fit_shapes)
    return slim


def _slim_group(root: nn.Module, g: ChannelGroup, keep: Tensor | int) -> None:
    """Replace ``g``'s producer, norm and consumer in ``root`` by copies keeping channels ``keep``
    (indices), or by fresh layers of ``keep`` channels (an int: weights to be loaded)."""
    a, bn, b = (root.get_submodule(p) for p in (g.producer, g.norm, g.consumer))
    n = keep if isinstance(keep, int) else len(keep)
    new_a = _conv_like(a, in_channels=a.in_channels, out_channels=n)
    new_b = _conv_like(b, in_channels=n, out_channels=b.out_channels)
    new_bn = type(bn)(n, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                      track_running_stats=bn.track_running_stats)  # fmt: skip
    if not isinstance(keep, int):
        new_a.weight.copy_(a.weight[keep])
        new_b.weight.copy_(b.weight[:, keep])
        for new, old, idx in ((new_a, a, keep), (new_b, b, slice(None))):
            if old.bias is not None:
                new.bias.copy_(old.bias[idx])
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, name)
            if t is not None:
                getattr(new_bn, name).copy_(t[keep])
        if bn.num_batches_tracked is not None:
            new_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
    for path, new in ((g.producer, new_a), (g.norm, new_bn), (g.consumer, new_b)):
        root.set_submodule(path, new.to(a.weight.device))


def _path_prefix(model: nn.Module, masked_root: nn.Module) -> str:
    """Path of ``masked_root`` inside ``model`` plus a dot (``""`` when they are the same)."""
    if model is masked_root:
        return ""
    for name, m in model.named_modules():
        if m is masked_root:
            return name + "."
    raise ValueError("the masked network is not part of the model given to slim_copy.")


def _conv_like(conv: _ConvNd, *, in_channels: int, out_channels: int) -> _ConvNd:
    return type(conv)(
        in_channels,
        out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
