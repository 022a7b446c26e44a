"""Convolution + BatchNorm folding for scoring passes: :func:`folded_batchnorm`.

In eval mode a BatchNorm with running statistics is a per-channel affine map,
``bn(y) = s * y + t`` with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. When
``y`` is a convolution's output, the map folds into the convolution (``W' = s W``,
``b' = s b + t``), which saves one pass over every activation: on this repository's 2-core CPU,
EfficientNet-Lite0 at 64 px in NHWC scores about 1.4x as many images per second folded
(``benchmarks/end_to_end.py`` measures the run's phases with and without it). The same
rewrite is what ``torch.ao.quantization.fuse_modules`` and ONNX runtimes do; here it is done
for the duration of a pass, so training, checkpoints and exports never see it.

Which pairs fold, decided from the network's graph, not from names: each
:class:`~medcl.models.backbones.Backbone`'s network is traced once with ``torch.fx``
(convolutions and norms as leaves), and a BatchNorm folds into a convolution when its only
input is that convolution's output and the output has no other user (so nothing, not even an
adapter's forward pre-hook on a stage, sits between them). A network that ``torch.fx`` cannot
trace is scored unfolded. Folded: ``nn.BatchNorm1d/2d/3d`` (to an identity) and timm's
``BatchNormAct2d`` (to its dropout + activation), in eval mode with running statistics, after a
``nn.Conv1d/2d/3d`` (any subclass, e.g. timm's ``Conv2dSame``: the copy keeps its forward);
never a module with forward hooks or parametrizations (LoRA, pruning reparametrisations).

The originals are not written: the folded convolution is a copy of the module with new
tensors, swapped into the network for the pass and swapped back after, so every original
tensor keeps its version and :class:`~medcl.models.feature_cache.FeatureCache`'s rule holds.
Outputs equal the unfolded ones up to float rounding (``tests/test_folding.py`` bounds it).
"""

from __future__ import annotations

__all__ = ["batchnorm_pairs", "folded_batchnorm"]

import collections
import copy
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.layers import BatchNormAct2d
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from medcl.models.adapters import ConvAdapter
from medcl.models.backbones import Backbone

_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# network -> (the ids of its modules when traced, its (conv path, norm path) pairs)
_PAIRS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], list[tuple[str, str]]]]
_PAIRS = weakref.WeakKeyDictionary()


class _LeafTracer(fx.Tracer):
    """Convolutions and norms stay single nodes (timm's norm+act modules too)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _ConvNd | _BatchNorm) or super().is_leaf_module(
            m, module_qualified_name
        )


def batchnorm_pairs(net: nn.Module) -> list[tuple[str, str]]:
    """``(convolution path, norm path)`` of every foldable pair of ``net`` (see the module),
    from one ``torch.fx`` trace, remembered while ``net``'s modules stay the same objects.
    Empty when ``net`` cannot be traced."""
    ids = tuple(id(m) for m in net.modules())
    known = _PAIRS.get(net)
    if known is not None and known[0] == ids:
        return known[1]
    modules = dict(net.named_modules())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _LeafTracer().trace(net)
    except Exception:  # any network fx cannot trace is scored unfolded
        graph = None
    nodes = list(graph.nodes) if graph is not None else []
    calls = collections.Counter(n.target for n in nodes if n.op == "call_module")
    pairs = []
    for node in nodes:
        norm = modules.get(node.target) if node.op == "call_module" else None
        src = node.args[0] if norm is not None and len(node.args) == 1 else None
        if type(norm) not in (*_PLAIN_NORMS, BatchNormAct2d) or not isinstance(src, fx.Node):
            continue
        conv = modules.get(src.target) if src.op == "call_module" else None
        if (
            isinstance(conv, _ConvNd)
            and (conv.groups == 1 or not isinstance(conv, _ConvTransposeNd))
            and calls[src.target] == calls[node.target] == 1  # a shared module stays as it is
            and len(src.users) == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    _PAIRS[net] = (ids, pairs)
    return pairs


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    """Both as traced, ``norm`` in eval mode with running statistics, neither hooked."""
    hooked = any(
        m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m)
        for m in (conv, norm)
    )
    return (
        isinstance(norm, _BatchNorm)
        and not norm.training
        and norm.running_mean is not None
        and norm.running_var is not None
        and norm.num_features == conv.out_channels
        and not hooked
    )


def _folded_conv(conv: _ConvNd, norm: _BatchNorm) -> _ConvNd:
    """A copy of ``conv`` computing ``norm(conv(x))`` (eval mode); ``conv`` is not written."""
    scale = torch.rsqrt(norm.running_var + norm.eps)  # (C,)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    view = [1] * conv.weight.dim()  # output channels: dim 0, or 1 of a transposed convolution
    view[1 if isinstance(conv, _ConvTransposeNd) else 0] = -1
    weight = torch.empty_like(conv.weight)  # keeps the weight's memory format (NHWC or not)
    torch.mul(conv.weight, scale.view(view), out=weight)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    folded = copy.copy(conv)  # same class and forward; its own parameter and hook tables
    folded._parameters = {
        "weight": nn.Parameter(weight, requires_grad=False),
        "bias": nn.Parameter(bias.detach().clone(), requires_grad=False),
    }
    folded._forward_hooks, folded._forward_pre_hooks = (
        type(conv._forward_hooks)(),
        type(conv._forward_pre_hooks)(),
    )
    return folded


def _rest_of(norm: _BatchNorm) -> nn.Module:
    """What ``norm`` computes after its normalisation: nothing, or timm's dropout + act."""
    return nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()


def _traced_parts(model: nn.Module) -> list[tuple[nn.Module, set[str]]]:
    """The networks of ``model``'s backbones with their stage paths, and its residual adapters.

    A norm that starts a stage keeps its own module: adapters and LoRA hook the stage's input
    during a forward, which for that norm is the convolution's output, not the folded one's."""
    return [
        (m.net, {s.name for s in m.stages()}) if isinstance(m, Backbone) else (m, set())
        for m in model.modules()
        if isinstance(m, Backbone | ConvAdapter)
    ]


def _swap(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@contextmanager
def folded_batchnorm(
    model: nn.Module, *, enabled: bool = True
) -> Iterator[dict[int, list[nn.Module]]]:
    """Fold every foldable BatchNorm of ``model``'s backbones into its convolution for the
    duration (no gradients; the norms in eval mode).

    Yields:
        ``id(module swapped in) -> [the original modules it computes for]``: a pass that
        records which modules ran (the feature cache) maps them back to the originals.
        Empty (nothing swapped) when ``enabled`` is false or gradients are on.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    originals: dict[int, list[nn.Module]] = {}
    try:
        if enabled and not torch.is_grad_enabled():
            for net, stages in _traced_parts(model):
                for conv_path, norm_path in batchnorm_pairs(net):
                    conv, norm = net.get_submodule(conv_path), net.get_submodule(norm_path)
                    if norm_path in stages or not _foldable(conv, norm):
                        continue
                    folded, rest = _folded_conv(conv, norm), _rest_of(norm)
                    _swap(net, conv_path, folded)
                    swapped.append((net, conv_path, conv))
                    _swap(net, norm_path, rest)
                    swapped.append((net, norm_path, norm))
                    originals[id(folded)], originals[id(rest)] = [conv, norm], [norm]
        yield originals
    finally:
        for net, path, module in reversed(swapped):
            _swap(net, path, module)
