"""Dynamic data removal during an experience: drop the examples that contribute least.

Shared by SparCL's DDR and EsaCL's redundant-example elimination (one mechanism, two scores):

- ``"forgetting"`` (SparCL, official code of ``neu-spiral/SparCL``): an example's number of
  correct -> wrong transitions since the last removal; an example never classified correctly
  counts its number of presentations. The lowest counts ("easy", never forgotten) are dropped.
- ``"sharpness"`` (medcl's reconstruction for EsaCL's IDS): the mean increase of the example's
  loss under the SAM perturbation, ``l_i(w + ε) - l_i(w)``, since the last removal. The least
  sensitive examples shape the loss landscape least and are dropped.
- ``"random"`` (the control for both): the same numbers of examples, drawn uniformly at random.

At the start of each epoch listed in ``epochs`` (0-based, counted within the experience), an
equal share of ``fraction`` × (experience size) is removed; statistics are then reset (as SparCL).
"""

from __future__ import annotations

__all__ = ["DataRemoval"]

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from medcl.errors import ConfigError


class DataRemoval:
    """Per-example statistics of one experience and the rows still used.

    Args:
        fraction: share of the experience's examples removed in total (0 disables removal).
        epochs: epochs (0-based) at whose start a share is removed.
        score: ``"forgetting"``, ``"sharpness"`` or ``"random"``.
        component: the owning strategy's name, to word errors.
        generator: the random draws of ``score="random"`` (default: seeded with 0).
    """

    def __init__(
        self,
        *,
        fraction: float,
        epochs: Sequence[int],
        score: Literal["forgetting", "sharpness", "random"],
        component: str,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 <= fraction < 1:
            raise ConfigError(f"{component}: removal fraction must be in [0, 1); got {fraction}.")
        if fraction > 0 and (not epochs or min(epochs) < 1):
            raise ConfigError(
                f"{component}: removal epochs must be >= 1 (the first epoch gathers the "
                f"statistics); got {list(epochs)}."
            )
        if score not in ("forgetting", "sharpness", "random"):
            raise ConfigError(
                f"{component}: removal score must be 'forgetting', 'sharpness' or 'random'; got "
                f"{score!r}."
            )
        self.fraction, self.epochs, self.score = fraction, tuple(sorted(set(epochs))), score
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.start(0)

    def start(self, n: int) -> None:
        """Begin an experience of ``n`` training examples: all rows active, statistics reset."""
        self.n = n
        self.active_ = torch.arange(n)
        self.removed_ = 0
        self._reset()

    def _reset(self) -> None:
        self.sum_ = torch.zeros(self.n, dtype=torch.float64)  # sharpness sum or forgetting count
        self.count_ = torch.zeros(self.n, dtype=torch.long)  # presentations
        self.correct_ = torch.zeros(self.n, dtype=torch.bool)  # last outcome
        self.learned_ = torch.zeros(self.n, dtype=torch.bool)  # ever correct

    @torch.no_grad()
    def observe(self, rows: Tensor, *, correct: Tensor | None = None, sharpness: Tensor | None = None) -> None:  # fmt: skip
        """Record one presentation of ``rows`` (``(B,)``, ``-1`` = replay sample, ignored)."""
        keep = rows >= 0
        r = rows[keep].cpu()
        self.count_[r] += 1
        if self.score == "forgetting" and correct is not None:
            c = correct[keep].cpu()
            self.sum_[r] += (self.correct_[r] & ~c).double()  # correct -> wrong transitions
            self.correct_[r], self.learned_[r] = c, self.learned_[r] | c
        elif sharpness is not None:
            self.sum_[r] += sharpness[keep].detach().double().cpu()

    def rows(self, epoch: int) -> Tensor:
        """The rows to visit in ``epoch``; removes a share first when ``epoch`` is listed."""
        if self.fraction > 0 and epoch in self.epochs and len(self.active_) > 1:
            k = round(self.fraction * self.n / len(self.epochs))
            k = min(k, len(self.active_) - 1)
            score = self._scores()[self.active_]
            order = torch.argsort(score, stable=True)  # lowest first
            self.active_ = torch.sort(self.active_[order[k:]]).values
            self.removed_ += k
            self._reset()
        return self.active_

    def _scores(self) -> Tensor:
        if self.score == "random":  # a uniformly random order: a random subset is dropped
            return torch.rand(self.n, generator=self.generator, dtype=torch.float64)
        if self.score == "forgetting":  # never learned: count the presentations instead
            return torch.where(self.learned_, self.sum_, self.count_.double())
        return self.sum_ / self.count_.clamp(min=1)
