"""Early stopping on the validation splits: the epochs of an experience chosen, not fixed.

``train.early_stopping_patience: P`` makes ``train.epochs`` a cap. After every epoch the model is
scored on the validation splits of the experiences seen so far (this one included: the mean of
their task-agnostic accuracies, so that forgetting counts as well as learning); training stops
when ``P`` epochs in a row did not beat the best score, and the parameters and buffers of the
best epoch are restored (Keras' ``EarlyStopping(restore_best_weights=True)``; PyTorch Lightning's
``EarlyStopping`` with the best checkpoint reloaded). The learning-rate schedule spans the cap,
as when the epochs are fixed. What the strategy keeps outside its parameters and buffers
(Python-side statistics) is not rolled back. The epochs run and the best one are recorded in
``metrics.json`` → ``fit``.

The score is the strategy's prediction as it stands after the epoch, before its consolidation
(``after_experience``). For a method whose prediction changes only at consolidation this sees
part of the model: DynaMMo from its second experience on predicts with the merged adapters of
the earlier experiences and the new head, so the new adapter set's epochs are judged through the
head alone until it is merged.
"""

from __future__ import annotations

__all__ = ["EarlyStopping"]

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from medcl.engine.evaluate import predict_proba
from medcl.errors import DataError

if TYPE_CHECKING:
    from medcl.data.experience import Experience
    from medcl.strategies.base import Strategy


class EarlyStopping:
    """Stop an experience's training when its validation score stops improving.

    Args:
        experiences: the experiences seen so far, the current one last (their ``val`` splits).
        patience: epochs without a better score before stopping.

    Attributes:
        best_epoch: 1-based epoch of the best score so far (0: none yet).
        scores: the score after each epoch.

    Raises:
        DataError: none of the experiences has validation images.
    """

    def __init__(self, experiences: Sequence[Experience], patience: int) -> None:
        self.vals = [exp.val for exp in experiences if len(exp.val)]
        if not self.vals:
            names = ", ".join(exp.name for exp in experiences)
            raise DataError(
                f"train.early_stopping_patience is set but the experiences seen so far ({names}) "
                "have no validation images to score; give the scenario a validation split or "
                "remove train.early_stopping_patience (then train.epochs is used as is)."
            )
        self.patience = patience
        self.best_epoch = 0
        self.scores: list[float] = []
        self._best: dict[str, torch.Tensor] | None = None

    def score(self, strategy: Strategy) -> float:
        """Mean task-agnostic accuracy over the validation splits (eval mode, restored after)."""
        was = strategy.training
        accs = []
        for val in self.vals:
            probs = predict_proba(strategy, val.images)  # (N, K)
            accs.append(float((probs.argmax(1) == val.labels).float().mean()))
        strategy.train(was)
        return sum(accs) / len(accs)

    def should_stop(self, strategy: Strategy) -> bool:
        """Score the epoch just finished; keep its state when best; True when patience is spent."""
        self.scores.append(self.score(strategy))
        epoch = len(self.scores)
        if self._best is None or self.scores[-1] > self.scores[self.best_epoch - 1]:
            self.best_epoch = epoch
            self._best = {k: v.detach().clone() for k, v in strategy.state_dict().items()}
        return epoch - self.best_epoch >= self.patience

    def restore_best(self, strategy: Strategy) -> None:
        """Load the best epoch's parameters and buffers (nothing when the last was best)."""
        if self._best is not None and self.best_epoch < len(self.scores):
            strategy.load_state_dict(self._best)
