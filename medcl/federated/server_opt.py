"""FedAvgM's server step (``federation.aggregation: fedavgm``): :class:`ServerSGD`.

With the cohort split across ``K`` hospitals, each local epoch covers one hospital's share, and
the weighted mean of the hospitals' models moves the global model about as far as one share
would (the mean of ``K`` updates, not their sum). FedAvgM treats the mean's update as a
pseudo-gradient and takes an SGD step with momentum on the server (Hsu, Qi & Brown 2019,
"Measuring the effects of non-identical data distribution for federated visual
classification", arXiv:1909.06335; the server learning rate of Reddi et al., ICLR 2021,
"Adaptive federated optimization"), as Flower's ``flwr.serverapp.strategy.FedAvgM`` computes it::

    g = current - mean                   # pseudo-gradient
    m = momentum * m + g  (m = g at first; no m when momentum is 0)
    new = current - server_lr * m

The step applies to floating-point **parameters** only. Buffers (BatchNorm's ``running_mean``,
``running_var``, ``num_batches_tracked``) take the plain weighted mean: extrapolated with
``server_lr > 1``, a running variance can turn negative. This is why medcl does not call
``FedAvgM.aggregate_train``, which steps every array alike.
"""

from __future__ import annotations

__all__ = ["ServerSGD"]

from collections.abc import Collection, Mapping

import numpy as np
import torch
from torch import Tensor

#: prefix of the momentum tensors in the server's saved state
_PREFIX = "momentum."


class ServerSGD:
    """Server-side SGD with momentum on the pseudo-gradient ``current - mean`` (FedAvgM).

    The momentum is kept per tensor name across the training rounds of one experience;
    :meth:`reset` starts a new experience (grown heads change shapes).

    Args:
        lr: the server learning rate (1: the mean itself when ``momentum`` is 0).
        momentum: the momentum factor, in ``[0, 1)``.
    """

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.0) -> None:
        self.lr, self.momentum = float(lr), float(momentum)
        self.velocity_: dict[str, np.ndarray] = {}  # name -> float64 momentum, per experience

    @property
    def active(self) -> bool:
        """Whether the step changes anything (Flower's ``server_opt``): else the mean is kept."""
        return self.lr != 1.0 or self.momentum != 0.0

    def reset(self) -> None:
        """Forget the momentum (a new experience begins)."""
        self.velocity_.clear()

    def step(
        self,
        current: Mapping[str, np.ndarray],
        mean: Mapping[str, np.ndarray],
        params: Collection[str],
    ) -> dict[str, np.ndarray]:
        """The round's new global tensors: ``mean`` with the server step on ``params``.

        A parameter that no site sent this round (absent from ``mean``: nothing trained it)
        keeps its value and its momentum; Flower's FedAvgM, which always sends every array,
        would still move it by ``momentum * m``.

        Args:
            current: the global tensors before the round, at least those of ``mean`` that are
                in ``params``, each of its own shape.
            mean: the sites' tensors averaged with their weights (Flower's FedAvg), by name.
            params: names of the floating-point parameters; every other key of ``mean`` is
                returned as averaged.

        Returns:
            Name -> array: float64 for the stepped parameters, ``mean``'s own for the rest.
        """
        out = dict(mean)
        if not self.active:
            return out
        for k in [k for k in mean if k in params]:
            old = np.asarray(current[k], dtype=np.float64)
            g = old - np.asarray(mean[k], dtype=np.float64).reshape(old.shape)
            if self.momentum > 0:
                v = self.velocity_.get(k)
                g = g if v is None else self.momentum * v + g
                self.velocity_[k] = g
            out[k] = old - self.lr * g
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return {_PREFIX + k: torch.from_numpy(v.copy()) for k, v in self.velocity_.items()}

    def load_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict`'s momentum; other keys are ignored."""
        self.velocity_ = {
            k.removeprefix(_PREFIX): t.double().numpy().copy()
            for k, t in tensors.items()
            if k.startswith(_PREFIX)
        }
