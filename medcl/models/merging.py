"""Merging models that share one architecture: one function, three operators.

- ``"mean"``: uniform weight average (model soups; DynaMMo's operator, Qazi et al. MIUA 2024).
- ``"weighted"``: ``sum_t w_t θ_t / sum_t w_t`` with non-negative weights.
- ``"ties"``: TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging
  Models", NeurIPS 2023): task vectors ``τ_t = θ_t − θ_base``; *trim* each to its top
  ``density`` fraction by magnitude; *elect* a sign per entry (sign of the sum of the trimmed,
  weighted vectors); *disjoint mean* over the vectors that agree with it;
  ``θ = θ_base + scale · τ_merged``.

Choices not fixed by the TIES paper: trimming is per tensor (as peft's and mergekit's ``ties``),
not over the whole flattened model, and keeps at least one entry per tensor (so a one-element
tensor such as an adapter's ``alpha`` is never silently reset to the base); without ``base``
the task vectors are the tensors themselves (zero base).

Buffers are not task vectors. Whatever the method, BatchNorm running statistics
(``running_mean``, ``running_var``; any key named in ``statistics``) are merged by a plain
average, weighted when weights are given, of the states' values: never trimmed or sign-elected
(TIES on a ``running_var`` relative to the initial 1.0 would reset most channels to 1.0). Only
the other floating-point entries, the learnable parameters, go through TIES. As DynaMMo's
reference averages them, averaged statistics describe the inputs' activations, not those of the
merged weights (re-estimating them on data is the caller's choice). Integer buffers (BatchNorm's
``num_batches_tracked``, a counter) are not averaged: the last state's value is kept.
"""

from __future__ import annotations

__all__ = ["BATCHNORM_STATISTICS", "merge_state_dicts"]

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from medcl.errors import ConfigError

MergeMethod = Literal["mean", "weighted", "ties"]
BATCHNORM_STATISTICS = ("running_mean", "running_var")  # buffer names averaged, never TIES-merged


def _check(states: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None) -> None:
    if not states:
        raise ConfigError("merge_state_dicts needs at least one state dict; got none.")
    keys = list(states[0])
    for i, s in enumerate(states[1:] if base is None else [*states[1:], base], start=1):
        which = "base" if i == len(states) else f"states[{i}]"
        if set(s) != set(keys):
            raise ConfigError(
                f"merge_state_dicts: {which} has keys {sorted(set(s) ^ set(keys))} "
                "that the others lack; merge models of one architecture only."
            )
        for k in keys:
            if s[k].shape != states[0][k].shape:
                raise ConfigError(
                    f"merge_state_dicts: {k!r} has shape {tuple(s[k].shape)} in "
                    f"{which} but {tuple(states[0][k].shape)} in states[0]."
                )


def _weights(weights: Sequence[float] | Tensor | None, n: int) -> Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if len(w) != n or (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ConfigError(
            f"merge weights must be {n} finite non-negative numbers with a positive "
            f"sum (one per state); got {w.tolist()}."
        )
    return (w / w.sum()).float()


def _trim(tau: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries of largest magnitude (at least one), zero the rest."""
    flat = tau.flatten()
    k = max(1, math.ceil(density * flat.numel()))
    if k >= flat.numel():
        return tau
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(tau)


def _ties(taus: Tensor, w: Tensor, density: float) -> Tensor:
    """``(T, *shape)`` task vectors -> ``(*shape)`` merged vector (trim, elect, disjoint mean)."""
    trimmed = torch.stack([_trim(t, density) for t in taus])
    weighted = trimmed * w.view(-1, *[1] * (taus.ndim - 1)) * len(w)  # uniform w -> unchanged
    sign = torch.sign(weighted.sum(0))  # elected sign per entry
    agree = (torch.sign(weighted) == sign) & (weighted != 0)
    count = agree.sum(0).clamp_min(1)
    return (weighted * agree).sum(0) / count


def merge_state_dicts(
    states: Sequence[Mapping[str, Tensor]],
    *,
    method: MergeMethod = "mean",
    weights: Sequence[float] | Tensor | None = None,
    density: float = 0.2,
    base: Mapping[str, Tensor] | None = None,
    scale: float = 1.0,
    statistics: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """Merge state dicts of one architecture into one.

    Args:
        states: ``T`` state dicts with identical keys and shapes.
        method: ``"mean"``, ``"weighted"`` or ``"ties"`` (see the module docstring).
        weights: ``T`` non-negative weights (normalised to sum 1); required for ``"weighted"``,
            optional for ``"ties"`` (scales each task vector before sign election), ignored by
            ``"mean"``.
        density: fraction of each task-vector tensor kept by TIES trimming, in ``(0, 1]``.
        base: TIES's reference model (task vectors are ``θ_t − base``); zero when omitted.
        scale: TIES's ``λ`` applied to the merged task vector.
        statistics: keys that are statistics, not learnable parameters (e.g. a module's
            ``named_buffers()``): averaged (with ``weights`` if given) under every method, never
            TIES-merged. None: the keys whose last dotted name is in
            :data:`BATCHNORM_STATISTICS`.

    Returns:
        A new state dict (fresh tensors) with the inputs' keys, shapes and dtypes.

    Raises:
        ConfigError: empty input, mismatched keys/shapes, bad weights, method or density.
    """
    if method not in ("mean", "weighted", "ties"):
        raise ConfigError(f"merge method must be 'mean', 'weighted' or 'ties'; got {method!r}.")
    if method == "weighted" and weights is None:
        raise ConfigError(
            "merge method 'weighted' needs `weights` (one per state); use "
            "method='mean' for a uniform average."
        )
    if method == "ties" and not 0 < density <= 1:
        raise ConfigError(f"TIES density must be in (0, 1]; got {density}.")
    _check(states, base)
    w = _weights(None if method == "mean" else weights, len(states))
    if statistics is None:
        statistics = {k for k in states[0] if k.rsplit(".", 1)[-1] in BATCHNORM_STATISTICS}
    out: dict[str, Tensor] = {}
    for k, ref in states[0].items():
        if not ref.is_floating_point():
            out[k] = states[-1][k].clone()  # counters (num_batches_tracked): no meaningful mean
            continue
        stacked = torch.stack([s[k].detach().float() for s in states])  # (T, *shape)
        wk = w.to(stacked.device)  # (T,) beside the states (a model on CUDA merges there)
        if method == "ties" and k not in statistics:  # task vectors only; statistics: averaged
            b = (
                base[k].detach().float().to(stacked.device)
                if base is not None
                else torch.zeros_like(stacked[0])
            )
            merged = b + scale * _ties(stacked - b, wk, density)
        else:
            merged = torch.einsum("t,t...->...", wk, stacked)
        out[k] = merged.to(ref.dtype)
    return out
