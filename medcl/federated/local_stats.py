"""``federation.batchnorm: local`` at a site: BatchNorm statistics of its own rows, anchored.

SiloBN (Andreux et al., MICCAI DCL 2020, arXiv:2008.07424) keeps each centre's BatchNorm
statistics at the centre. A continual site re-estimates them for the global weights it receives,
on the rows it holds (:func:`~medcl.models.norm_stats.reestimate_batchnorm`): experience ``t``'s
cohort, if it has one, and its memory's exemplars of earlier experiences.

In an experience without a cohort of its own only the memory is left, and a herded memory is no
sample of the cohorts it stands for: herding keeps typical images, the same number per class.
Measured on pneumonia-sites (one site per hospital, seed 0, the final model at the hospital of
site 1): the same weights scored 0.67 with statistics of its 200 exemplars, 0.78 with those of
200 random training rows of the site and 0.79 with all of them (``docs/federated.md``).

So a site that held a cohort records, after that experience's memory update, two sets of
statistics under the same weights: those it scores with (cohort and memory) and its memory's
alone, with the memory's rows they were computed on (``SITE_DIR/federated/norm_anchor.
safetensors``, written atomically). In a later experience without new images, while its memory
still holds those rows, it corrects its memory's statistics by their recorded difference
(:func:`~medcl.models.norm_stats.anchor_statistics`, double sampling's difference estimator);
a memory changed since (an experience caught up after the site was offline) is used as it is.
``federation.batchnorm_anchor: false`` leaves the memory's statistics as they are (the ablation).
Nothing of it leaves the site.
"""

from __future__ import annotations

__all__ = ["LocalStatistics"]

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from medcl.config import RunConfig
from medcl.data.memory import ReplayMemory
from medcl.engine.checkpoint import atomic_file
from medcl.models.norm_stats import (
    anchor_statistics,
    norm_buffer_keys,
    norm_statistics,
    reestimate_batchnorm,
)
from medcl.strategies.base import Strategy

_PARTS = ("cohort", "memory", "rows")  # statistics, and the memory rows they describe


class LocalStatistics:
    """A site's BatchNorm statistics with ``federation.batchnorm: local`` (else it does nothing).

    Args:
        cfg: the federated run's config.
        strategy: the site's strategy (its statistics are changed in place).
        memory: the site's replay memory.
        folder: where the anchor is kept (``SITE_DIR/federated``).
    """

    def __init__(
        self, cfg: RunConfig, strategy: Strategy, memory: ReplayMemory, folder: Path
    ) -> None:
        fed = cfg.federation
        self.local = fed is not None and fed.batchnorm == "local"
        self.anchored = self.local and fed.batchnorm_anchor
        self.strategy, self.memory = strategy, memory
        self.batch_size = cfg.eval.batch_size
        self.file = Path(folder) / "norm_anchor.safetensors"

    def estimate(self, t: int, own: Tensor) -> None:
        """Statistics for experience ``t`` from its rows here, ``own`` ``(N, C, ...)`` (may be
        empty), and the memory's exemplars of earlier experiences; anchored when ``own`` is
        empty and the memory holds the rows of the site's last anchor."""
        if not self.local:
            return
        anchor = self._read() if self.anchored and len(own) == 0 else None
        rows = [own, self.memory.exemplars(exclude=t)]
        if reestimate_batchnorm(self.strategy, rows, batch_size=self.batch_size) and anchor:
            anchor_statistics(self.strategy, anchor["cohort"], anchor["memory"])

    def record(self, own: Tensor) -> None:
        """After an experience's memory update, when the site held ``own`` rows ``(N, C, ...)``
        of it: keep the statistics it scores with and its memory's, both under the current
        weights (nothing when the memory has fewer than two rows). The strategy's statistics
        are left as they were."""
        if not self.anchored or len(own) == 0:
            return
        state = self.strategy.state_dict()
        kept = {k: state[k].clone() for k in norm_buffer_keys(self.strategy)}
        cohort = {k: v for k, v in kept.items() if k.endswith(("running_mean", "running_var"))}
        bs = self.batch_size
        if not reestimate_batchnorm(self.strategy, [self.memory.exemplars()], batch_size=bs):
            return  # nothing was changed
        memory = norm_statistics(self.strategy)
        with torch.no_grad():
            for k, v in kept.items():
                state[k].copy_(v)
        parts = dict(zip(_PARTS, (cohort, memory, self.memory.state_dict()), strict=True))
        tensors = {f"{p}/{k}": v.cpu() for p, d in parts.items() for k, v in d.items()}
        with atomic_file(self.file) as tmp:
            save_file(tensors, str(tmp))

    def _read(self) -> dict[str, dict[str, Tensor]] | None:
        """The last anchor, ``{part: {key: tensor}}``; None without one, or when the memory no
        longer holds the rows it was recorded on."""
        if not self.file.is_file():
            return None
        out: dict[str, dict[str, Tensor]] = {p: {} for p in _PARTS}
        for key, value in load_file(str(self.file)).items():
            part, _, name = key.partition("/")
            out[part][name] = value
        rows = self.memory.state_dict()
        if rows.keys() != out["rows"].keys() or not all(
            torch.equal(v, out["rows"][k]) for k, v in rows.items()
        ):
            return None
        return out
