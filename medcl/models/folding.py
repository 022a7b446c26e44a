"""Convolution + BatchNorm folding for scoring passes: :func:`folded_batchnorm`.

In eval mode a BatchNorm with running statistics is a per-channel affine map,
``bn(y) = s * y + t`` with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. When
``y`` is a convolution's output, the map folds into the convolution (``W' = s W``,
``b' = s b + t``), which saves one pass over every activation: on this repository's 2-core CPU,
the main job's EfficientNet-Lite0 at 64 px in NHWC scores 1.15x as many images per second
folded at ``eval.batch_size`` 64, and the main job takes 1.8 s less
(``benchmarks/results/end_to_end.md``). The same rewrite is what
``torch.ao.quantization.fuse_modules`` and ONNX runtimes do; here it is done for the duration
of a pass, so the folded modules are never trained, checkpointed or exported (what is computed
from scoring passes, e.g. herding's and DynaMMo's stage-2 features, differs from unfolded
passes in the last float bits).

Which pairs fold, decided from the network's graph, not from names: each
:class:`~medcl.models.backbones.Backbone`'s network is traced once with ``torch.fx``
(convolutions and norms as leaves), and a BatchNorm folds into a convolution when its only
input is that convolution's output and the output has no other user (so nothing, not even an
adapter's forward pre-hook on a stage, sits between them), neither module is reachable under
a second name, and both sit on the same side of every stage boundary (adapters and LoRA hook a
stage's input during a forward, which the trace does not see). A network that ``torch.fx``
cannot trace is scored unfolded. Folded: ``nn.BatchNorm1d/2d/3d`` (to an identity) and timm's
``BatchNormAct2d`` (to its dropout + activation), in eval mode with running statistics, after a
``nn.Conv1d/2d/3d``, a ``nn.ConvTranspose1d/2d/3d`` without groups or timm's ``Conv2dSame``
(exactly these classes: a subclass may rewrite its weight in ``forward``, as timm's
``StdConv2d`` does); never a module with forward hooks or parametrizations.

The originals are not written: the folded convolution is a copy of the module with new
tensors, swapped into the network for the pass and swapped back after, so every original
tensor keeps its version and :class:`~medcl.models.feature_cache.FeatureCache`'s rule holds.
Outputs equal the unfolded ones up to float rounding (``tests/test_folding.py`` bounds it).
"""

from __future__ import annotations

__all__ = ["batchnorm_pairs", "folded_batchnorm"]

import collections
import copy
import logging
import sys
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from medcl.models.adapters import ConvAdapter
from medcl.models.backbones import Backbone

_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_log = logging.getLogger(__name__)


def _timm(name: str) -> type | None:
    """A class of ``timm.layers`` when timm is loaded (a network without timm has none)."""
    return getattr(sys.modules.get("timm.layers"), name, None)


def _norm_types() -> tuple[type, ...]:
    return tuple(t for t in (*_PLAIN_NORMS, _timm("BatchNormAct2d")) if t is not None)


def _conv_types() -> tuple[type, ...]:
    return tuple(t for t in (*_CONVS, _timm("Conv2dSame")) if t is not None)


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
    names = collections.Counter(id(m) for _, m in net.named_modules(remove_duplicate=False))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _LeafTracer().trace(net)
    except Exception as e:  # any network fx cannot trace is scored unfolded
        _log.debug("scored unfolded: torch.fx cannot trace %s (%s)", type(net).__name__, e)
        graph = None
    nodes = list(graph.nodes) if graph is not None else []
    calls = collections.Counter(n.target for n in nodes if n.op == "call_module")
    norms, convs = _norm_types(), _conv_types()
    pairs = []
    for node in nodes:
        norm = modules.get(node.target) if node.op == "call_module" else None
        src = node.args[0] if norm is not None and len(node.args) == 1 else None
        if type(norm) not in norms or not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        conv = modules.get(src.target)
        if (
            type(conv) in convs
            and (conv.groups == 1 or not isinstance(conv, _ConvTransposeNd))
            and calls[src.target] == calls[node.target] == 1  # a shared module stays as it is
            and names[id(conv)] == names[id(norm)] == 1  # and so does one with two names
            and len(src.users) == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    _PAIRS[net] = (ids, pairs)
    return pairs


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    """Both of the traced types, ``norm`` in eval mode with running statistics, neither
    hooked."""
    hooked = any(
        m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m)
        for m in (conv, norm)
    )
    return (
        type(norm) in _norm_types()
        and type(conv) in _conv_types()
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
    timm_norm = _timm("BatchNormAct2d")
    if timm_norm is not None and isinstance(norm, timm_norm):
        return nn.Sequential(norm.drop, norm.act)
    return nn.Identity()


def _traced_parts(model: nn.Module) -> list[tuple[nn.Module, set[str]]]:
    """The networks of ``model``'s backbones with their stage paths, and its residual adapters."""
    return [
        (m.net, {s.name for s in m.stages()}) if isinstance(m, Backbone) else (m, set())
        for m in model.modules()
        if isinstance(m, Backbone | ConvAdapter)
    ]


def _across_a_stage(conv_path: str, norm_path: str, stages: set[str]) -> bool:
    """Whether a stage starts between the two: one of them is in (or is) a stage the other is
    not in. A stage's input hook (adapters, LoRA) would then see the folded output."""

    def inside(path: str, stage: str) -> bool:
        return path == stage or path.startswith(stage + ".")

    return any(inside(conv_path, s) != inside(norm_path, s) or norm_path == s for s in stages)


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
                    if _across_a_stage(conv_path, norm_path, stages) or not _foldable(conv, norm):
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
