"""Server steps on the sites' updates: FedAvgM (:class:`ServerSGD`) and FedNova (:func:`fednova`).

**FedAvgM** (``federation.aggregation: fedavgm``).

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

**FedNova** (``federation.aggregation: fednova``; Wang, Liu, Liang, Joshi & Poor, NeurIPS 2020,
"Tackling the objective inconsistency problem in heterogeneous federated optimization",
arXiv:2007.07481). Sites that take different numbers of local steps ``tau_i`` in a round (with
``partition: experience``, the hospital holding the new cohort takes an epoch of it, the others
an epoch of their 200-image memory) make FedAvg's weighted mean minimise an objective weighted
by ``p_i * tau_i`` instead of ``p_i`` (the paper's objective inconsistency). FedNova divides
each site's update by the norm of its gradients' coefficients ``a_i`` and scales the result by
their mean::

    p_i = n_i / sum(n)                            (n_i: the site's training images)
    a_i = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)   (SGD, momentum rho; tau_i if 0)
    tau_eff = sum_i p_i a_i
    new = current - tau_eff * sum_i p_i (current - x_i) / a_i

``a_i`` is the paper's value for heavy-ball momentum restarted each round (medcl's sites build
their optimiser per round), the sum the authors' optimiser accumulates step by step
(github.com/JYWa/FedNova, ``FedNova.step``: ``counter = counter * momentum + 1``, ``a += counter``).
As there, the steps are counted whatever the learning-rate schedule (a cosine round weights its
late gradients less; not corrected). BatchNorm buffers take the plain weighted mean, as above.
"""

from __future__ import annotations

__all__ = ["ServerSGD", "fednova", "normalizing_factor"]

from collections.abc import Collection, Mapping, Sequence

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


def normalizing_factor(steps: int, momentum: float) -> float:
    """FedNova's ``a_i = ||a_i||_1`` for ``steps`` SGD steps with heavy-ball ``momentum`` (from 0).

    The sum of the coefficients with which the ``steps`` gradients enter the site's update, in
    units of the learning rate: ``steps`` without momentum.
    """
    if steps < 0 or not 0.0 <= momentum < 1.0:
        raise ValueError(f"steps >= 0 and momentum in [0, 1) expected; got {steps}, {momentum}")
    if momentum == 0.0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


def fednova(
    current: Mapping[str, np.ndarray],
    mean: Mapping[str, np.ndarray],
    sites: Sequence[tuple[Mapping[str, np.ndarray], float, int]],
    params: Collection[str],
    momentum: float,
) -> dict[str, np.ndarray]:
    """FedNova's new global tensors: ``mean`` with each parameter of ``params`` replaced by the
    normalised average of the sites' updates (the module's formula).

    Args:
        current: the global tensors before the round, at least the parameters in ``mean``.
        mean: the sites' tensors averaged with their weights (Flower's FedAvg), by name.
        sites: per replying site, ``(tensors, training images, local steps)``; a parameter's
            ``p_i`` and ``tau_eff`` are taken over the sites that sent it.
        params: names of the floating-point parameters; every other key of ``mean`` (BatchNorm
            buffers) is returned as averaged.
        momentum: the sites' SGD momentum (``train.momentum``).

    Returns:
        Name -> array: float64 for the parameters, ``mean``'s own for the rest.
    """
    out = dict(mean)
    factor = [normalizing_factor(int(steps), momentum) for _, _, steps in sites]
    for k in [k for k in mean if k in params]:
        old = np.asarray(current[k], dtype=np.float64)
        have = [i for i, (arrays, n, _) in enumerate(sites) if k in arrays and n > 0]
        p = np.array([sites[i][1] for i in have], dtype=np.float64)
        a = np.array([factor[i] for i in have])
        if not have or (a <= 0).any():  # a site that sent a parameter took no step: the mean
            continue
        p /= p.sum()
        tau_eff = float(p @ a)
        step = np.zeros_like(old)
        for i, w in zip(have, p * tau_eff / a, strict=True):
            step += w * (old - np.asarray(sites[i][0][k], dtype=np.float64).reshape(old.shape))
        out[k] = old - step
    return out
