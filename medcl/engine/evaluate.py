"""Evaluation of a strategy on experiences: scores, accuracies, and every-k-updates curves."""

from __future__ import annotations

__all__ = [
    "CurveMonitor",
    "ExperienceEval",
    "evaluate",
    "num_scored",
    "predict_proba",
    "predict_proba_sets",
    "stratified_rows",
]

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from medcl.config_sections import EvalFuture
from medcl.data.samples import SampleSet
from medcl.data.transforms import to_model_input
from medcl.engine.device import autocast, bf16_available
from medcl.models.feature_cache import DEFAULT_BATCH_SIZE
from medcl.progress import progress_bar

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.strategies.base import Strategy


@torch.no_grad()
def predict_proba(
    model: Strategy | nn.Module,
    images: Tensor,
    *,
    rows: Tensor | None = None,
    batch_size: int | None = None,
    amp: bool = False,
    desc: str | None = None,
) -> Tensor:
    """Class probabilities of a strategy (its :meth:`Strategy.predict`) or a plain module.

    A strategy's scores come from its :attr:`~medcl.strategies.base.Strategy.feature_cache`:
    rows already scored under the same weights are not scored again.

    Args:
        model: a strategy, or any module mapping model input to scores.
        images: ``(N, C, H, W[, D])`` raw images (uint8 or float in [0, 1]), on any device;
            each batch is moved to the model's device before it is scaled.
        rows: ``(n,)`` rows of ``images`` to score (default: all).
        batch_size: images per forward pass (default: the strategy cache's, which the run sets
            to ``eval.batch_size``; 64 for a plain module).
        amp: bf16 autocast where the model's device supports it (``train.amp``); see
            :func:`medcl.engine.device.autocast`.
        desc: progress-bar label (None: no bar).

    Returns:
        ``(n, K)`` float32 probabilities on the CPU (softmax of the fp32-cast scores).
    """
    from medcl.strategies.base import Strategy

    if isinstance(model, Strategy):
        sets = [(images, rows)]
        return predict_proba_sets(model, sets, batch_size=batch_size, amp=amp, desc=desc)[0]
    device = next(model.parameters()).device
    images = images if rows is None else images[rows]
    size = batch_size or DEFAULT_BATCH_SIZE
    was_training = model.training
    model.eval()
    out = []
    bar = progress_bar(total=len(images), desc=desc, unit="img", hide=desc is None)
    for i in range(0, len(images), size):
        x = to_model_input(images[i : i + size].to(device))  # (B, C, H, W[, D])
        with autocast(device, amp):
            scores = model(x)  # (B, K), bf16 under autocast
        out.append(torch.softmax(scores.float(), 1).cpu())
        bar.update(len(x))
    bar.close()
    if not out:  # no rows (a federated site without this cohort): (0, K) from one blank input
        with torch.no_grad():
            blank = torch.zeros((1, *images.shape[1:]), device=device)
            out = [torch.softmax(model(to_model_input(blank)).float(), 1).cpu()[:0]]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def predict_proba_sets(
    strategy: Strategy,
    sets: Sequence[tuple[Tensor, Tensor | None]],
    *,
    batch_size: int | None = None,
    amp: bool = False,
    desc: str | None = None,
) -> list[Tensor]:
    """:func:`predict_proba` of a strategy on several ``(images, rows)`` sets in one pass: the
    sets share full batches (:meth:`~medcl.models.feature_cache.FeatureCache.outputs_many`),
    so ten 60-image site test sets cost five batches, not ten.

    Returns:
        one ``(n_i, K)`` float32 CPU probability tensor per set.
    """
    bf16 = amp and bf16_available(next(strategy.parameters()).device)
    scores = strategy.feature_cache.outputs_many(
        "scores", strategy, strategy.predict, sets, bf16=bf16, batch_size=batch_size, desc=desc
    )
    return [torch.softmax(x, 1) for x in scores]


@dataclass(frozen=True)
class ExperienceEval:
    """Predictions on one experience's split.

    Attributes:
        probs: ``(N, K)`` probabilities over the classes seen by the model.
        labels: ``(N,)`` global labels.
        accuracy: task-agnostic accuracy (argmax over all seen classes).
        task_accuracy: task-aware accuracy (argmax within the experience's classes); NaN when
            some of those classes are not yet known to the model.
        balanced_accuracy: (property) task-agnostic recall averaged over the present classes.
    """

    probs: Tensor
    labels: Tensor
    accuracy: float
    task_accuracy: float

    @property
    def balanced_accuracy(self) -> float:
        """Task-agnostic recall averaged over the classes present in ``labels`` (scikit-learn's
        ``balanced_accuracy_score``; the report's ``overall/balanced_accuracy``,
        :mod:`medcl.metrics.clinical.discrimination`): unlike :attr:`accuracy`, it does not move
        with the split's class prior. NaN when there are no rows."""
        if len(self.labels) == 0:
            return float("nan")
        pred = self.probs.argmax(1) if self.probs.shape[1] else torch.full_like(self.labels, -1)
        recalls = [(pred[self.labels == c] == c).float().mean() for c in self.labels.unique()]
        return float(torch.stack(recalls).mean())


def _accuracies(probs: Tensor, labels: Tensor, classes: Sequence[int]) -> tuple[float, float]:
    if len(labels) == 0:
        return float("nan"), float("nan")
    acc = float((probs.argmax(1) == labels).float().mean()) if probs.shape[1] else 0.0
    cls = torch.as_tensor(sorted(classes))
    if int(cls.max()) >= probs.shape[1]:
        return acc, float("nan")
    within = cls[probs[:, cls].argmax(1)]
    return acc, float((within == labels).float().mean())


def evaluate(
    strategy: Strategy,
    experiences: Sequence[Experience],
    *,
    split: str = "test",
    batch_size: int | None = None,
    amp: bool = False,
    quiet: bool = False,
) -> list[ExperienceEval]:
    """Evaluate on ``split`` of each of ``experiences``, all their images in shared batches
    (:func:`predict_proba_sets`). After an experience the engine passes the first
    :func:`num_scored` of the stream.

    ``batch_size`` and ``amp`` as in :func:`predict_proba`; ``quiet`` hides the progress bars.
    """
    data: list[SampleSet] = [getattr(exp, split) for exp in experiences]
    desc = None if quiet else f"evaluate {len(data)} experience(s) ({split})"
    sets = [(d.images, None) for d in data]
    probs = predict_proba_sets(strategy, sets, batch_size=batch_size, amp=amp, desc=desc)
    out = []
    for exp, d, p in zip(experiences, data, probs, strict=True):
        acc, tacc = _accuracies(p, d.labels, exp.classes)
        out.append(ExperienceEval(p, d.labels, acc, tacc))
    return out


def num_scored(after: int, total: int, future: EvalFuture) -> int:
    """How many experiences' test splits are scored after experience ``after`` (``eval.future``):
    ``0..after+1`` for ``"next"`` (``R[after, after+1]`` is the term of FWT that needs it), all
    ``total`` for ``"all"``. Always a prefix of the stream, so predictions stay in experience
    order.

    Args:
        after: index of the experience just learned.
        total: experiences in the stream.
        future: ``eval.future``.

    Returns:
        ``n``: experiences ``0..n-1`` are scored, ``n..total-1`` are not (NaN in the matrix).
    """
    return total if future == "all" else min(after + 2, total)


def stratified_rows(labels: Tensor, size: int | None, seed: int) -> Tensor:
    """A seeded, class-stratified sample of ``size`` rows (all rows when ``size`` is None or
    not smaller): each class keeps its share, largest remainders rounded up.

    Args:
        labels: ``(N,)`` class ids.
        size: rows wanted.
        seed: fixes the choice within each class.

    Returns:
        ``(n,)`` sorted row indices, ``n = min(size, N)``.
    """
    n = len(labels)
    if size is None or size >= n:
        return torch.arange(n)
    classes, counts = torch.unique(labels, return_counts=True)
    raw = counts.double() * size / n
    take = raw.floor().long()
    extra = size - int(take.sum())
    take[torch.argsort(raw - take, descending=True, stable=True)[:extra]] += 1
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        rows.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(rows).sort().values


class CurveMonitor:
    """Old/new/all accuracy every ``every`` updates: the curves that expose the stability gap.

    "Old" is the union of the test sets of experiences before the current one, "new" the current
    one's; each test set is represented by a fixed, seeded, class-stratified subset of at most
    ``subset`` rows (:func:`stratified_rows`, seeded by ``seed`` and the experience), so every
    point of a curve is measured on the same images. Each subset is scored once per point
    ("all" is old + new, not a third pass).

    Args:
        experiences: the scenario's experiences.
        every: evaluate every this many updates (0 disables the curve).
        subset: rows per experience (None: the whole test sets).
        seed: fixes the subsets.
        amp: bf16 autocast where supported, as in :func:`predict_proba`.
    """

    def __init__(
        self,
        experiences: Sequence[Experience],
        *,
        every: int,
        subset: int | None = 500,
        seed: int = 0,
        amp: bool = False,
    ) -> None:
        self.every, self.amp, self.subset = every, amp, subset
        self.rows: list[dict[str, float | int | str]] = []
        self._tests = [exp.test for exp in experiences]
        self.subset_rows = [
            stratified_rows(exp.test.labels, subset, seed * 1000 + exp.index) for exp in experiences
        ]

    @property
    def subset_sizes(self) -> list[int]:
        """Rows of each experience's test set on the curves."""
        return [len(r) for r in self.subset_rows]

    def record(self, strategy: Strategy, experience: int, update: int, offset: int) -> None:
        """Evaluate now; ``update`` is the global update count, ``offset`` within the experience.
        The subsets of experiences ``0..experience`` are scored in shared batches (short: no
        bar)."""
        seen = range(experience + 1)
        sets = [(self._tests[i].images, self.subset_rows[i]) for i in seen]
        probs = predict_proba_sets(strategy, sets, amp=self.amp)
        correct = [
            p.argmax(1) == self._tests[i].labels[self.subset_rows[i]]
            for i, p in zip(seen, probs, strict=True)
        ]

        def acc(parts: list[Tensor]) -> float:
            hits = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
            return float(hits.float().mean()) if len(hits) else float("nan")

        self.rows.append(
            {
                "experience": experience,
                "update": update,
                "offset": offset,
                "old_acc": acc(correct[:experience]),
                "new_acc": acc(correct[experience:]),
                "all_acc": acc(correct),
            }
        )

    def due(self, offset: int) -> bool:
        return self.every > 0 and offset % self.every == 0
