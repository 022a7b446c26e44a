"""What travels between a site and the server: named model tensors, nothing else.

A site sends back the tensors its training changed (:func:`trainable_keys`: the strategy's
:meth:`~medcl.strategies.base.Strategy.trainable_parameters` and the buffers of the modules that
own them, e.g. BatchNorm statistics of an adapter) and, after consolidation, the deployable
model's tensors that consolidation changed (:func:`changed_keys`). A DynaMMo site therefore
sends one adapter set and its head, never the frozen backbone.

:func:`audit` is the check every message passes on the server: each array must be a tensor of
the strategy's state under its own name and shape, each scalar a known metric. Anything else
(an image batch, labels, sample indices) is refused with a :class:`LeakError`.
"""

from __future__ import annotations

__all__ = [
    "METRIC_KEYS",
    "PER_EXPERIENCE",
    "LeakError",
    "audit",
    "changed_keys",
    "from_numpy",
    "load_arrays",
    "model_keys",
    "nbytes",
    "to_numpy",
    "trainable_keys",
]

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from medcl.errors import DataError
from medcl.strategies.base import Strategy

#: scalar metrics a site may send (MetricRecord keys); every other key is refused by `audit`
METRIC_KEYS = frozenset(
    {
        "num-examples",
        "updates",
        "seconds",
        "loss-first",
        "loss-max",
        "loss-last",
        "accuracy",
        "test-examples",
        "val-accuracy",
        "val-balanced-accuracy",
        "val-examples",
        "synced-version",
        "completed",
    }
)

#: the metrics that are one number per experience (lists of ``num_experiences``)
PER_EXPERIENCE = frozenset(
    {"accuracy", "test-examples", "val-accuracy", "val-balanced-accuracy", "val-examples"}
)


class LeakError(DataError):
    """A message carried something other than model tensors and known scalar metrics."""


def model_keys(strategy: Strategy) -> set[str]:
    """State keys whose tensors the deployable model uses (matched by storage)."""
    deployed = {
        t.data_ptr() for t in strategy.deployable_model().state_dict().values() if t.numel()
    }
    return {k for k, t in strategy.state_dict().items() if t.numel() and t.data_ptr() in deployed}


def trainable_keys(strategy: Strategy) -> list[str]:
    """State keys of what training changes: trainable parameters and their modules' buffers."""
    params = {id(p) for p in strategy.trainable_parameters()}
    keys: list[str] = []
    for prefix, module in strategy.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if id(p) in params]
        if not own:
            continue
        names = own + [n for n, _ in module.named_buffers(recurse=False)]
        keys += [f"{prefix}.{n}" if prefix else n for n in names]
    state = strategy.state_dict()
    return [k for k in keys if k in state]


def changed_keys(before: Mapping[str, Tensor], strategy: Strategy) -> list[str]:
    """Deployable-model keys whose tensors differ from ``before`` (or are new)."""
    state = strategy.state_dict()
    keys = sorted(model_keys(strategy))
    return [k for k in keys if k not in before or not torch.equal(before[k], state[k])]


def to_numpy(strategy: Strategy, keys: list[str]) -> dict[str, np.ndarray]:
    state = strategy.state_dict()
    return {k: state[k].detach().cpu().numpy().copy() for k in keys}


def from_numpy(arrays: Mapping[str, np.ndarray], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Tensors of ``like``'s dtypes (an averaged ``num_batches_tracked`` is rounded back)."""
    out = {}
    for k, a in arrays.items():
        t = torch.as_tensor(np.asarray(a)).reshape(like[k].shape)
        dtype = like[k].dtype
        out[k] = t.round().to(dtype) if not dtype.is_floating_point else t.to(dtype)
    return out


def load_arrays(strategy: Strategy, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy received arrays into the strategy; an unknown name or shape is a DataError."""
    state = strategy.state_dict()
    audit(strategy, arrays, {}, where="the server's message")
    strategy.load_state_dict(from_numpy(arrays, state), strict=False)


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def audit(
    strategy: Strategy,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, object],
    *,
    where: str,
    num_experiences: int = 0,
) -> None:
    """Refuse a message that carries anything but the strategy's tensors and known metrics.

    Raises:
        LeakError: an array whose name is not a state key of the strategy, or whose shape is
            not that key's; a metric not in :data:`METRIC_KEYS`, or not a number (a list of
            ``num_experiences`` numbers only for the keys of :data:`PER_EXPERIENCE`).
    """
    state = strategy.state_dict()
    for k, a in arrays.items():
        if k not in state:
            raise LeakError(f"{where}: array {k!r} is not a tensor of the model; refused.")
        shape, want = tuple(np.shape(a)), tuple(state[k].shape)
        if shape != want and not (want == () and shape == (1,)):  # Flower sends 0-d as (1,)
            raise LeakError(
                f"{where}: array {k!r} has shape {shape}, the model's tensor has {want}; refused."
            )
    for k, v in metrics.items():
        if k not in METRIC_KEYS:
            raise LeakError(f"{where}: metric {k!r} is not one medcl sends; refused.")
        values = v if isinstance(v, list) else [v]
        if isinstance(v, list) and (k not in PER_EXPERIENCE or len(v) != num_experiences):
            raise LeakError(f"{where}: metric {k!r} is a list of {len(v)}; refused.")
        if not all(isinstance(x, int | float) for x in values):
            raise LeakError(f"{where}: metric {k!r} is not a number; refused.")
