"""Replay memory: a fixed budget of exemplars, balanced over (experience, class) groups.

Exemplars are stored as indices into the experiences' training sets (never as copies), so the
memory's state is three small integer tensors; images are gathered when a batch is sampled.
Balancing over (experience, class) groups is class balance in class-incremental streams and
(site, class) balance in domain-incremental ones.

Selection:
    random: a seeded random subset of each group (Chaudhry et al. 2019, "On tiny episodic memories").
    herding: iCaRL's greedy choice of samples whose running feature mean best approximates the
        group mean (Rebuffi et al. 2017, Alg. 4), on L2-normalised features; the order is the
        priority, so shrinking a group keeps its first exemplars.
"""

from __future__ import annotations

__all__ = ["ReplayMemory", "herding_order"]

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from medcl.data.samples import SampleSet
from medcl.errors import ConfigError

if TYPE_CHECKING:
    from medcl.data.experience import Experience


def herding_order(features: Tensor, m: int) -> Tensor:
    """iCaRL herding: indices of ``m`` samples whose running mean tracks the mean feature.

    Args:
        features: ``(N, F)`` features of one group.
        m: how many to pick (``m <= N``).

    Returns:
        ``(m,)`` indices into ``features`` in selection order.
    """
    f = F.normalize(features.float(), dim=1)
    mu = f.mean(0)
    chosen: list[int] = []
    acc = torch.zeros_like(mu)
    available = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, min(m, len(f)) + 1):
        # distance of the mean after adding each candidate, to the class mean
        dist = ((mu - (acc + f) / k) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        acc += f[i]
    return torch.tensor(chosen, dtype=torch.long)


class ReplayMemory:
    """Fixed-size exemplar memory over the experiences seen so far.

    Args:
        size: total number of exemplars (0 disables replay).
        selection: ``"random"`` or ``"herding"``.
        seed: seeds random selection.
    """

    def __init__(
        self, size: int, *, selection: Literal["random", "herding"] = "random", seed: int = 0
    ) -> None:
        if size < 0:
            raise ConfigError(f"memory.size must be >= 0; got {size}.")
        if selection not in ("random", "herding"):
            raise ConfigError(f"memory.selection must be 'random' or 'herding'; got {selection!r}.")
        self.size, self.selection, self.seed = size, selection, seed
        self.exp_ = torch.zeros(0, dtype=torch.long)  # (M,) experience index of each exemplar
        self.index_ = torch.zeros(0, dtype=torch.long)  # (M,) row in that experience's train set
        self.label_ = torch.zeros(0, dtype=torch.long)  # (M,) global label
        self._sources: dict[int, SampleSet] = {}

    def __len__(self) -> int:
        return int(self.exp_.numel())

    def attach(self, experiences: Sequence[Experience]) -> None:
        """Give the memory access to the training sets its indices point into."""
        self._sources.update({e.index: e.train for e in experiences})

    # -- selection -------------------------------------------------------------------------
    @property
    def needs_features(self) -> bool:
        """Whether :meth:`update` selects on features (herding): the caller must pass them."""
        return self.size > 0 and self.selection == "herding"

    def update(self, exp: Experience, features: Callable[[Tensor], Tensor] | None = None) -> None:
        """Add ``exp``'s exemplars and shrink older groups to the new per-group budget.

        Args:
            exp: the experience just learned.
            features: ``(n,)`` rows of ``exp.train`` -> ``(n, F)`` features of those rows;
                required for herding (the trainer serves them from the strategy's
                :class:`~medcl.models.feature_cache.FeatureCache`, so features another step
                already computed are not computed again).
        """
        if self.size == 0:
            return
        self.attach([exp])
        new_classes = torch.unique(exp.train.labels).tolist()
        groups = sorted(
            {(int(e), int(y)) for e, y in zip(self.exp_, self.label_, strict=True)}
            | {(exp.index, c) for c in new_classes}
        )
        if not groups:  # nothing held and nothing new (a federated site without this cohort)
            return
        budget = self.size // len(groups)
        extra = self.size - budget * len(groups)  # spread the remainder over the first groups
        keep_e, keep_i, keep_y = [], [], []
        for g, (e, y) in enumerate(groups):
            quota = budget + (1 if g < extra else 0)
            if e == exp.index:
                idx = self._select(exp.train, y, quota, features)
            else:  # existing group: selection order is priority order
                mask = (self.exp_ == e) & (self.label_ == y)
                idx = self.index_[mask][:quota]
            keep_e.append(torch.full_like(idx, e))
            keep_i.append(idx)
            keep_y.append(torch.full_like(idx, y))
        self.exp_, self.index_, self.label_ = (
            torch.cat(keep_e),
            torch.cat(keep_i),
            torch.cat(keep_y),
        )

    def _select(
        self, data: SampleSet, label: int, quota: int, features: Callable[[Tensor], Tensor] | None
    ) -> Tensor:
        rows = torch.nonzero(data.labels == label).flatten()
        if quota >= len(rows):
            quota = len(rows)
        if self.selection == "random":
            g = torch.Generator().manual_seed(self.seed * 7919 + label * 104729 + len(data))
            return rows[torch.randperm(len(rows), generator=g)[:quota]]
        if features is None:
            raise ConfigError(
                "memory.selection 'herding' needs features; the trainer must pass "
                "features to ReplayMemory.update."
            )
        return rows[herding_order(features(rows), quota)]

    # -- access ------------------------------------------------------------------------------
    def gather(self, which: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images, labels and experience ids of memory slots ``which`` (``(n,)`` positions)."""
        e, i = self.exp_[which], self.index_[which]
        first = self._sources[int(e[0])].images
        images = first.new_empty((len(which), *first.shape[1:]))
        for ex in torch.unique(e).tolist():
            m = e == ex
            images[m] = self._sources[ex].images[i[m]]
        return images, self.label_[which], e

    def sources(self) -> list[tuple[SampleSet, Tensor, Tensor]]:
        """Where the exemplars live: per source experience ``(its training set, rows of it,
        positions of those exemplars in the memory)`` (e.g. to look their features up)."""
        out = []
        for ex in torch.unique(self.exp_).tolist():
            pos = torch.nonzero(self.exp_ == ex).flatten()
            out.append((self._sources[ex], self.index_[pos], pos))
        return out

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` exemplars drawn uniformly with replacement: ``(images, labels, exp ids)``."""
        which = torch.randint(len(self), (n,), generator=generator)
        return self.gather(which)

    def joined(
        self, train: SampleSet, exp_index: int, *, fraction: float | None = None, seed: int = 0
    ) -> SampleSet:
        """``train`` plus the memory's exemplars, each row's experience in column ``experience``.

        Args:
            train: the current experience's training split.
            exp_index: its experience index.
            fraction: resample the memory so that its rows make up this share of the result
                (None: every exemplar once).
            seed: seeds the resampling.

        Returns:
            The joined set (``train`` alone, with the column, when the memory is empty).
        """
        own = train.with_meta(experience=exp_index)
        if not len(self):
            return own
        which = torch.arange(len(self))
        if fraction is not None:
            n = round(fraction / (1 - fraction) * len(own))
            g = torch.Generator().manual_seed(seed)
            which = (
                torch.randperm(len(self), generator=g)[:n]
                if n <= len(self)
                else torch.randint(len(self), (n,), generator=g)
            )
        images, labels, exps = self.gather(which)
        rows = SampleSet(
            images.to(own.images.dtype), labels, own.meta.iloc[:0].reindex(range(len(which)))
        )
        return SampleSet.concat([own, rows.with_meta(experience=exps.numpy())])

    def exemplars(self, *, exclude: int | None = None) -> Tensor:
        """Images ``(M, C, ...)`` of every exemplar, or of those not from experience ``exclude``
        (no row when there is none; the dtype of the experiences' training images)."""
        which = torch.nonzero(self.exp_ != exclude if exclude is not None else self.exp_ >= 0)
        if len(which) == 0:
            first = next(iter(self._sources.values()), None)
            return first.images[:0] if first is not None else torch.zeros(0, dtype=torch.uint8)
        return self.gather(which.flatten())[0]

    def as_sampleset(self) -> SampleSet:
        """All exemplars as one :class:`SampleSet` (metadata of the source rows)."""
        images, labels, exps = self.gather(torch.arange(len(self)))
        parts, order = [], []
        for ex in torch.unique(exps).tolist():
            pos = torch.nonzero(exps == ex).flatten()
            parts.append(self._sources[ex].meta.iloc[self.index_[pos].numpy()])
            order.append(pos)
        meta = pd.concat(parts, ignore_index=True).iloc[torch.cat(order).argsort().numpy()]
        return SampleSet(images, labels, meta.reset_index(drop=True))

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {
            "exp": self.exp_.clone(),
            "index": self.index_.clone(),
            "label": self.label_.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.exp_, self.index_, self.label_ = (
            state["exp"].long(),
            state["index"].long(),
            state["label"].long(),
        )
