"""``ExperienceEval.balanced_accuracy``: scikit-learn's ``balanced_accuracy_score`` on the
task-agnostic argmax, which the federated benchmark selects recipes by."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from medcl.engine.evaluate import ExperienceEval


def _eval(probs: torch.Tensor, labels: torch.Tensor) -> ExperienceEval:
    acc = float((probs.argmax(1) == labels).float().mean()) if len(labels) else math.nan
    return ExperienceEval(probs, labels, acc, math.nan)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # on purpose
@pytest.mark.parametrize("seed", range(5))
def test_balanced_accuracy_is_scikit_learns(seed):
    """Classes absent from the labels (seen earlier, or never predicted) do not count; a class
    that is never predicted counts with recall 0."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, 6, (60,), generator=g)  # classes 2..5 of 7 seen ones
    probs = torch.softmax(torch.randn(60, 7, generator=g), 1)
    ev = _eval(probs, labels)
    want = balanced_accuracy_score(labels.numpy(), probs.argmax(1).numpy())
    assert ev.balanced_accuracy == pytest.approx(want, abs=1e-6)


def test_balanced_accuracy_ignores_the_class_prior_that_accuracy_follows():
    """A model that always says the majority class: accuracy is the prior, balanced accuracy
    is one recall of 1 among two classes."""
    labels = torch.tensor([1] * 74 + [0] * 26)
    probs = torch.tensor([[0.2, 0.8]]).repeat(100, 1)
    ev = _eval(probs, labels)
    assert ev.accuracy == pytest.approx(0.74)
    assert ev.balanced_accuracy == pytest.approx(0.5)


def test_balanced_accuracy_of_no_rows_is_nan():
    ev = _eval(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert math.isnan(ev.balanced_accuracy)


def test_balanced_accuracy_without_known_classes_is_zero_like_accuracy():
    """A model with no class scores yet ((N, 0) probabilities) gets nothing right."""
    ev = ExperienceEval(torch.zeros(5, 0), torch.tensor([0, 1, 1, 0, 1]), 0.0, math.nan)
    assert ev.balanced_accuracy == 0.0
