"""Evaluation of a strategy on experiences: scores, accuracies, and every-k-updates curves."""

from __future__ import annotations

__all__ = ["CurveMonitor", "ExperienceEval", "evaluate", "predict_proba"]

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from medcl.data.samples import SampleSet
from medcl.data.transforms import to_model_input
from medcl.engine.device import autocast

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.strategies.base import Strategy


@torch.no_grad()
def predict_proba(
    model: Strategy | nn.Module, images: Tensor, *, batch_size: int = 256, amp: bool = False
) -> Tensor:
    """Class probabilities of a strategy (its :meth:`Strategy.predict`) or a plain module.

    Args:
        model: a strategy, or any module mapping model input to scores.
        images: ``(N, C, H, W[, D])`` raw images (uint8 or float in [0, 1]), on any device;
            each batch is moved to the model's device before it is scaled.
        batch_size: images per forward pass.
        amp: bf16 autocast where the model's device supports it (``train.amp``); see
            :func:`medcl.engine.device.autocast`.

    Returns:
        ``(N, K)`` float32 probabilities on the CPU (softmax of the fp32-cast scores).
    """
    from medcl.strategies.base import Strategy

    fn = model.predict if isinstance(model, Strategy) else model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = []
        for i in range(0, len(images), batch_size):
            x = to_model_input(images[i : i + batch_size].to(device))  # (B, C, H, W[, D])
            with autocast(device, amp):
                scores = fn(x)  # (B, K), bf16 under autocast
            out.append(torch.softmax(scores.float(), 1).cpu())
    model.train(was_training)
    return torch.cat(out)


@dataclass(frozen=True)
class ExperienceEval:
    """Predictions on one experience's split.

    Attributes:
        probs: ``(N, K)`` probabilities over the classes seen by the model.
        labels: ``(N,)`` global labels.
        accuracy: task-agnostic accuracy (argmax over all seen classes).
        task_accuracy: task-aware accuracy (argmax within the experience's classes); NaN when
            some of those classes are not yet known to the model.
    """

    probs: Tensor
    labels: Tensor
    accuracy: float
    task_accuracy: float


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
    batch_size: int = 256,
    amp: bool = False,
) -> list[ExperienceEval]:
    """Evaluate on ``split`` of every experience (also future ones: FWT needs them); ``amp`` as
    in :func:`predict_proba`."""
    out = []
    for exp in experiences:
        data: SampleSet = getattr(exp, split)
        probs = predict_proba(strategy, data.images, batch_size=batch_size, amp=amp)
        acc, tacc = _accuracies(probs, data.labels, exp.classes)
        out.append(ExperienceEval(probs, data.labels, acc, tacc))
    return out


class CurveMonitor:
    """Old/new/all accuracy every ``every`` updates: the curves that expose the stability gap.

    "Old" is the union of the test sets of experiences before the current one, "new" the current
    one's; each is sub-sampled to at most ``max_samples`` per experience with a fixed seed, so
    every point of a curve is measured on the same images.

    Args:
        experiences: the scenario's experiences.
        every: evaluate every this many updates (0 disables the curve).
        max_samples: cap per experience (keeps frequent evaluation cheap).
        seed: fixes the sub-samples.
        amp: bf16 autocast where supported, as in :func:`predict_proba`.
    """

    def __init__(
        self,
        experiences: Sequence[Experience],
        *,
        every: int,
        max_samples: int = 200,
        seed: int = 0,
        amp: bool = False,
    ) -> None:
        self.every, self.amp = every, amp
        self.rows: list[dict[str, float | int | str]] = []
        g = torch.Generator().manual_seed(seed)
        self._subsets: list[SampleSet] = []
        for exp in experiences:
            n = len(exp.test)
            idx = (
                torch.randperm(n, generator=g)[:max_samples] if n > max_samples else torch.arange(n)
            )
            self._subsets.append(exp.test.subset(idx))

    def _acc(self, strategy: Strategy, ids: Sequence[int]) -> float:
        if not ids:
            return float("nan")
        data = SampleSet.concat([self._subsets[i] for i in ids])
        probs = predict_proba(strategy, data.images, amp=self.amp)
        return float((probs.argmax(1) == data.labels).float().mean())

    def record(self, strategy: Strategy, experience: int, update: int, offset: int) -> None:
        """Evaluate now; ``update`` is the global update count, ``offset`` within the experience."""
        old = list(range(experience))
        self.rows.append(
            {
                "experience": experience,
                "update": update,
                "offset": offset,
                "old_acc": self._acc(strategy, old),
                "new_acc": self._acc(strategy, [experience]),
                "all_acc": self._acc(strategy, [*old, experience]),
            }
        )

    def due(self, offset: int) -> bool:
        return self.every > 0 and offset % self.every == 0
