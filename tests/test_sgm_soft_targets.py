"""SGM's soft-target accumulator, on hand-built logits and through the trainer.

The rule (docs/methods/sgm.md § 3.2; authors' ``model_sgm.py``: ``accumulate_soft_targets``
before ``soft_cross_entropy``, ``update_soft_targets`` after the optimiser step): per experience,
class ``c``'s soft target at update ``i`` is the mean softmax of the samples of ``c`` predicted
correctly in updates ``1 .. i-1`` of that experience (uniform ``1/C`` while there is none). The
current batch's own predictions reach the targets only from update ``i + 1`` on; wrongly
predicted samples never do; a new experience starts from nothing.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_sgm import CFG, make, start, toy_experience

import medcl.strategies.sgm as sgm_module
from medcl.data.memory import ReplayMemory
from medcl.engine.trainer import fit_experience

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

UPDATES = CFG.model_copy(update={"epochs": 2})  # 3 updates (max_updates) of 8 + 8 replayed


@pytest.fixture
def means_seen(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Every call of SGM's ``dynamic_soft_targets``: its ``probs``, ``labels`` and ``means``."""
    calls: list[dict[str, torch.Tensor]] = []
    original = sgm_module.dynamic_soft_targets

    def spy(probs, labels, class_means, n_old):
        calls.append({"probs": probs.clone(), "labels": labels.clone(),
                      "means": class_means.clone(), "n_old": n_old})  # fmt: skip
        return original(probs, labels, class_means, n_old)

    monkeypatch.setattr(sgm_module, "dynamic_soft_targets", spy)
    return calls


def adapting_sgm(memory: ReplayMemory):
    """SGM at the start of experience 1 (old classes 0, 1; new 2, 3), with no training at all."""
    s = make()
    exps = [toy_experience(0, [0, 1]), toy_experience(1, [2, 3])]
    start(s, exps[0], memory, 2)  # base "full": experience 0 is plain training, no soft targets
    s.after_experience(exps[0], memory)
    start(s, exps[1], memory, 4)
    s.train()
    return s, exps


def soft_ce(logits: torch.Tensor, y: torch.Tensor, means: torch.Tensor, n_old: int) -> torch.Tensor:
    target = sgm_module.dynamic_soft_targets(logits.softmax(1), y, means, n_old)
    return -(target * logits.log_softmax(1)).sum(1).mean()


def test_accumulator_counts_correct_predictions_only_and_lags_one_update(means_seen):
    s, _ = adapting_sgm(ReplayMemory(8))
    C, u = 4, torch.full((4,), 0.25)
    # (logits, labels) of four updates; argmax per row in the comments
    updates = [
        ([[4.0, 0, 0, 0], [0, 3, 0, 0], [0, 0, 0, 2]], [0, 0, 3]),  # 0 right, 0 wrong (1), 3 right
        ([[0.0, 0, 5, 0], [1, 6, 0, 0]], [0, 1]),  # 0 wrong (2), 1 right
        ([[2.0, 1, 0, 0]], [0]),  # 0 right
        ([[0.0, 0, 1, 3]], [0]),  # 0 wrong (3)
    ]
    losses = []
    for logits, y in updates:
        losses.append(s.loss(torch.tensor(logits), SimpleNamespace(y=torch.tensor(y))))
    assert len(means_seen) == 4 and all(c["n_old"] == 2 for c in means_seen)
    p = [torch.tensor(lg).softmax(1) for lg, _ in updates]
    means = [c["means"] for c in means_seen]
    # update 1: nothing accumulated yet, although two of its samples are predicted correctly
    torch.testing.assert_close(means[0], torch.full((C, C), 1 / C))
    # update 2: the correct samples of update 1 only; the wrong class-0 sample is not counted
    torch.testing.assert_close(means[1], torch.stack([p[0][0], u, u, p[0][2]]))
    # update 3: update 2's wrong class-0 sample leaves class 0's mean as it was
    torch.testing.assert_close(means[2], torch.stack([p[0][0], p[1][1], u, p[0][2]]))
    # update 4: class 0's mean is over its two correct samples (updates 1 and 3)
    torch.testing.assert_close(means[3][0], (p[0][0] + p[2][0]) / 2)
    torch.testing.assert_close(means[3][1:], means[2][1:])
    # the loss trains against the targets built from those means (old classes: class means;
    # new classes: the sample's own softmax)
    for (logits, y), m, loss in zip(updates, means, losses, strict=True):
        torch.testing.assert_close(loss, soft_ce(torch.tensor(logits), torch.tensor(y), m, 2))


def test_accumulator_resets_at_each_experience(means_seen):
    memory = ReplayMemory(8)
    s, exps = adapting_sgm(memory)
    right = SimpleNamespace(y=torch.tensor([0, 1]))
    s.loss(torch.tensor([[5.0, 0, 0, 0], [0, 5, 0, 0]]), right)
    s.loss(torch.tensor([[5.0, 0, 0, 0], [0, 5, 0, 0]]), right)
    assert not torch.allclose(means_seen[-1]["means"], torch.full((4, 4), 0.25))  # accumulated
    s.after_experience(exps[1], memory)
    start(s, toy_experience(2, [4, 5]), memory, 6)
    s.train()
    s.loss(torch.tensor([[5.0, 0, 0, 0, 0, 0]]), SimpleNamespace(y=torch.tensor([0])))
    # experience 2 starts from uniform targets over its 6 classes, none of experience 1's
    torch.testing.assert_close(means_seen[-1]["means"], torch.full((6, 6), 1 / 6))
    assert means_seen[-1]["n_old"] == 4


def test_trainer_updates_use_the_statistics_of_earlier_updates_of_the_experience(means_seen):
    """Through fit_experience: update ``i``'s class means are exactly the mean softmax of the
    correct samples of updates ``1 .. i-1`` of the same experience; each experience restarts."""
    s, memory = make(), ReplayMemory(8)
    exps = [toy_experience(i, [2 * i, 2 * i + 1]) for i in range(3)]
    per_exp: list[list[dict[str, torch.Tensor]]] = []
    for i, exp in enumerate(exps):
        start_call = len(means_seen)
        fit_experience(s, exp, past=exps[:i], num_seen_classes=2 * i + 2, memory=memory,
                       cfg=UPDATES, seed=i, quiet=True)  # fmt: skip
        per_exp.append(means_seen[start_call:])
    assert not per_exp[0]  # experience 0 (base "full") trains with hard labels
    counted = 0
    for calls in per_exp[1:]:
        assert len(calls) == UPDATES.max_updates == 3  # one loss per update
        C = calls[0]["probs"].shape[1]
        total, count = torch.zeros(C, C), torch.zeros(C)
        for call in calls:
            expected = torch.where(count[:, None] > 0, total / count.clamp(min=1)[:, None],
                                   torch.full((C, C), 1 / C))  # fmt: skip
            torch.testing.assert_close(call["means"], expected)
            right = call["probs"].argmax(1) == call["labels"]
            total.index_add_(0, call["labels"][right], call["probs"][right])
            count.index_add_(0, call["labels"][right], torch.ones(int(right.sum())))
            counted += int(right.sum()) if call is not calls[-1] else 0
    # some sample of a non-final update (64 samples, 4-6 classes) is predicted correctly, so
    # the running means checked above are not all uniform (measured: 17 of 64)
    assert counted > 0
