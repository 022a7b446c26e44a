"""Subspace layers: any network's conv, linear and norm weights become a line or simplex of weights.

Wortsman et al., "Learning Neural Network Subspaces", ICML 2021 (official code
``apple/learning-subspaces``). A network with ``n`` endpoints ``w_1..w_n`` per weight tensor is
evaluated at a point ``w(α) = Σ_i α_i w_i`` with ``α`` on the simplex ``Δ_n`` (``n = 2``: a line).

The layers are made by wrapping modules, not by copying timm/MONAI code: :func:`to_subspace`
registers a :mod:`torch.nn.utils.parametrize` parametrization on the ``weight`` and ``bias`` of
every convolution, linear layer, :class:`~medcl.models.heads.ExpandableHead` and affine norm
layer. The module keeps its type and its own ``forward``; the parametrization returns the point's
tensor. All parametrizations of one network read one shared :class:`SubspacePoint`, so a single
``α`` is used by every layer (official code: one ``α`` per batch, shared by all layers).

Beyond the endpoints, a point may include an extra, fixed **anchor** vertex (a detached tensor per
weight, never trained): ``w = Σ_i α_i w_i + α_{n+1} a``. The connectivity stage of
Subspace-Connectivity and MC-SGD use it for the previous solution's midpoint.

:func:`fold` returns a plain copy (no parametrizations, one tensor per weight) evaluated at the
current point: the deployable network has exactly the plain network's parameters and MACs.

BatchNorm: the affine ``γ, β`` are subspace parameters; the running statistics are one shared
buffer, which is wrong for any particular point, so :func:`recompute_batchnorm` resets them and
re-estimates them at the evaluated point with a cumulative average over data in train mode (official
code: ``update_bn``). The alternative, :func:`use_batch_statistics`, keeps no running statistics at
all (``track_running_stats=False``, the MC-SGD research code's choice), so every prediction uses the
statistics of its own batch.
"""

from __future__ import annotations

__all__ = [
    "SubspacePoint",
    "cosine_penalty",
    "endpoint_values",
    "fold",
    "point_values",
    "recompute_batchnorm",
    "reinitialise",
    "sample_alpha",
    "set_anchor",
    "subspace_tensors",
    "to_subspace",
    "unwrap_subspace",
    "use_batch_statistics",
]

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from medcl.errors import ConfigError
from medcl.models.heads import ExpandableHead

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear, ExpandableHead, *_NORMS)


class SubspacePoint:
    """The point at which a subspace network is evaluated (shared by all its layers).

    Args:
        n: number of trainable endpoints (2: a line; 3: a triangle; 1: a single network).

    Attributes:
        alpha: ``(n,)`` weights of the endpoints, or ``(n + 1,)`` when ``anchor`` names an anchor
            vertex (its weight is the last entry). Entries are ≥ 0 and sum to 1.
        anchor: the name of the anchor vertex in use (see :func:`set_anchor`), or None.
        straight_through: give every endpoint the gradient of the point's tensor itself, without
            autograd's factor ``α_i`` (the MC-SGD research code's update).
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.alpha = torch.full((n,), 1.0 / max(n, 1))
        self.anchor: str | None = None
        self.straight_through = False

    def set(self, alpha: Tensor, anchor: str | None = None) -> None:
        """Move to ``alpha`` (``(n,)``, or ``(n + 1,)`` with an ``anchor`` name)."""
        want = self.n + (anchor is not None)
        if alpha.shape != (want,):
            raise ValueError(f"alpha must have shape ({want},); got {tuple(alpha.shape)}.")
        self.alpha, self.anchor = alpha.detach().float(), anchor

    def set_midpoint(self) -> None:
        """The centre of the endpoints' simplex, ``α = (1/n, …, 1/n)``, no anchor."""
        self.set(torch.full((self.n,), 1.0 / self.n))

    @contextmanager
    def at_midpoint(self) -> Iterator[None]:
        """Within the block the point is the midpoint; the previous point is restored after."""
        alpha, anchor = self.alpha, self.anchor
        self.set_midpoint()
        try:
            yield
        finally:
            self.set(alpha, anchor)

    def __repr__(self) -> str:
        return f"SubspacePoint(n={self.n}, alpha={self.alpha.tolist()}, anchor={self.anchor!r})"


def sample_alpha(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``α ~ Dirichlet(1, …, 1)`` on ``Δ_n``: normalised Exp(1) draws (official code's sampler).

    For ``n = 2`` the first coordinate is ``U[0, 1]`` (the line). Returns ``(n,)`` float32.
    """
    e = -torch.log(1.0 - torch.rand(n, generator=generator))  # Exp(1), finite: rand < 1
    return e / e.sum()


class _SubspaceTensor(nn.Module):
    """Parametrization of one tensor: ``original`` is endpoint 0, :attr:`ends` the others."""

    def __init__(self, point: SubspacePoint, ends: list[Tensor]) -> None:
        super().__init__()
        self.point = point
        self.ends = nn.ParameterList([nn.Parameter(e.detach().clone()) for e in ends])
        self.anchors: dict[str, Tensor] = {}  # fixed vertices: never trained nor checkpointed

    def forward(self, w0: Tensor) -> Tensor:
        p = self.point
        a = p.alpha.to(w0.device, w0.dtype)
        ws = [w0, *self.ends]
        out = sum(a[i] * w for i, w in enumerate(ws))
        if p.anchor is not None:
            out = out + a[-1] * self.anchors[p.anchor].to(w0.device, w0.dtype)
        if p.straight_through:  # value of the point, gradient 1 to every endpoint
            out = out.detach() + sum(w - w.detach() for w in ws)
        return out


def _fresh(module: nn.Module, name: str, like: Tensor, generator: torch.Generator) -> Tensor:
    """An independent initial value for a new endpoint (official code: Kaiming-normal weights)."""
    if isinstance(module, _NORMS):  # second endpoint of γ, β: 1 and 0, as in the official code
        return torch.ones_like(like) if name == "weight" else torch.zeros_like(like)
    if name == "bias" or like.dim() < 2 or like.numel() == 0:
        return torch.zeros_like(like)
    out = torch.empty(like.shape, dtype=like.dtype)
    nn.init.kaiming_normal_(out, generator=generator)  # fan_in, gain sqrt(2)
    return out.to(like.device)


def _targets(net: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module path, module, tensor name)`` of every tensor a subspace covers."""
    for path, m in net.named_modules():
        if isinstance(m, _WEIGHTED):
            for name in ("weight", "bias"):
                if parametrize.is_parametrized(m, name) or isinstance(
                    getattr(m, name, None), nn.Parameter
                ):
                    yield path, m, name


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def to_subspace(
    net: nn.Module,
    point: SubspacePoint,
    *,
    endpoints: dict[str, list[Tensor]] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Turn ``net`` (in place) into a subspace network with ``point.n`` endpoints per tensor.

    Args:
        net: any module; its conv, linear, head and affine norm tensors are covered.
        point: the shared point (its ``n`` is the number of endpoints).
        endpoints: values for endpoints ``1..n-1`` by tensor key (``"layer1.0.conv1.weight"``),
            as returned by :func:`unwrap_subspace`. A stored tensor with fewer rows than the
            module's (a head that grew) fills the first rows; the rest are initialised fresh.
        seed: seeds the independent initialisation of new endpoints.

    Returns:
        ``net`` itself. Endpoint 0 keeps the module's current values.
    """
    if point.n < 1:
        raise ConfigError(f"a subspace needs at least 1 endpoint; got n={point.n}.")
    g = torch.Generator().manual_seed(seed)
    for path, m, name in list(_targets(net)):
        if parametrize.is_parametrized(m, name):
            raise ConfigError(f"{_key(path, name)} is already a subspace tensor.")
        w0 = getattr(m, name).detach()
        stored = (endpoints or {}).get(_key(path, name), [])
        ends = []
        for i in range(point.n - 1):
            e = _fresh(m, name, w0, g)
            if i < len(stored):
                e[: stored[i].shape[0]] = stored[i].to(e.device, e.dtype)
            ends.append(e)
        parametrize.register_parametrization(m, name, _SubspaceTensor(point, ends))
    return net


@torch.no_grad()
def reinitialise(net: nn.Module, *, seed: int = 0) -> nn.Module:
    """Give every covered tensor (every endpoint, in a subspace network) an independent fresh value.

    The rule of new endpoints (Kaiming-normal weights, zero biases, norm ``γ = 1, β = 0``); used
    for independently initialised ensemble members and the "fresh endpoints" ablation.
    """
    g = torch.Generator().manual_seed(seed)
    for _, m, name in list(_targets(net)):
        if parametrize.is_parametrized(m, name):
            tensors = [m.parametrizations[name].original, *m.parametrizations[name][0].ends]
        else:
            tensors = [getattr(m, name)]
        for t in tensors:
            t.copy_(_fresh(m, name, t, g))
    return net


def _remove(m: nn.Module, name: str, *, keep_value: bool) -> None:
    """Remove a parametrization without touching other modules.

    ``parametrize`` gives a module a dynamically created class; a deep copy of the module shares
    that class, and removal deletes the tensor's property from it, which would break the copy.
    So the module first gets a private copy of its class.
    """
    cls = type(m)
    m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    parametrize.remove_parametrizations(m, name, leave_parametrized=keep_value)


def unwrap_subspace(net: nn.Module) -> dict[str, list[Tensor]]:
    """Remove the parametrizations (``net`` keeps endpoint 0); return the others' values."""
    out = {}
    for path, m, name in list(_targets(net)):
        if parametrize.is_parametrized(m, name):
            out[_key(path, name)] = [e.detach().clone() for e in m.parametrizations[name][0].ends]
            _remove(m, name, keep_value=False)
    return out


def _parametrizations(net: nn.Module) -> Iterator[tuple[str, nn.Module, str, _SubspaceTensor]]:
    for path, m, name in _targets(net):
        if parametrize.is_parametrized(m, name):
            yield path, m, name, m.parametrizations[name][0]


def subspace_tensors(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every covered tensor's endpoints ``[w_1, …, w_n]`` (the trainable parameters) by key."""
    return {
        _key(path, name): [m.parametrizations[name].original, *p.ends]
        for path, m, name, p in _parametrizations(net)
    }


@torch.no_grad()
def endpoint_values(net: nn.Module, i: int) -> dict[str, Tensor]:
    """Detached copies of endpoint ``i`` of every covered tensor."""
    return {k: ws[i].detach().clone() for k, ws in subspace_tensors(net).items()}


@torch.no_grad()
def point_values(net: nn.Module) -> dict[str, Tensor]:
    """Detached values of every covered tensor at the current point."""
    return {_key(path, name): getattr(m, name).detach().clone() for path, m, name, _ in
            _parametrizations(net)}  # fmt: skip


def set_anchor(net: nn.Module, name: str, values: dict[str, Tensor] | None) -> None:
    """Store (or with None, drop) the fixed anchor vertex ``name``: one tensor per covered key."""
    for path, _m, pname, p in _parametrizations(net):
        if values is None:
            p.anchors.pop(name, None)
        else:
            p.anchors[name] = values[_key(path, pname)].detach()


def fold(net: nn.Module) -> nn.Module:
    """A plain copy of ``net`` at its current point: one tensor per weight, no parametrizations.

    The copy has the plain network's parameters and MACs and exports like any module.
    """
    out = copy.deepcopy(net)
    for _, m, name, p in list(_parametrizations(out)):
        p.anchors.clear()
        with torch.no_grad():
            _remove(m, name, keep_value=True)
    return out.requires_grad_(False)


def cosine_penalty(net: nn.Module, i: int, j: int) -> Tensor:
    """Squared cosine similarity of endpoints ``i`` and ``j`` over all weight matrices/kernels.

    Wortsman et al., Eq. 3: ``(Σ⟨v_i, v_j⟩)² / (Σ‖v_i‖² Σ‖v_j‖²)`` over the concatenation of every
    conv (and here also linear/head) weight; norm layers and biases are excluded.
    """
    dot = ni = nj = None
    for key, ws in subspace_tensors(net).items():
        if not key.endswith("weight") or ws[i].dim() < 2:
            continue
        vi, vj = ws[i], ws[j]
        d, a, b = (vi * vj).sum(), (vi * vi).sum(), (vj * vj).sum()
        dot, ni, nj = (d, a, b) if dot is None else (dot + d, ni + a, nj + b)
    if dot is None:
        raise ConfigError("the network has no conv/linear weights to compare.")
    return dot**2 / (ni * nj + 1e-12)


def _batchnorms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_batchnorm(net: nn.Module, batches: Iterable[Tensor]) -> None:
    """Re-estimate BatchNorm running statistics at the current point (official ``update_bn``).

    Resets mean/variance, sets ``momentum=None`` (cumulative average), runs ``batches`` (model
    input, ``(B, C, H, W[, D])``) through ``net`` in train mode, then restores momentum and mode.
    """
    bns = [m for m in _batchnorms(net) if m.track_running_stats]
    if not bns:
        return
    was, momenta = net.training, [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    for x in batches:
        net(x)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    net.train(was)


def use_batch_statistics(net: nn.Module) -> None:
    """Make every BatchNorm use batch statistics always (no running buffers; MC-SGD's code)."""
    for m in _batchnorms(net):
        m.track_running_stats = False
        m.running_mean = m.running_var = m.num_batches_tracked = None
