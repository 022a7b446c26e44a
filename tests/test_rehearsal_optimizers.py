"""Vanilla rehearsal's two optimisers: SGM's OneCycle set-up (tuned) and the authors' constant rate.

The authors' vanilla baseline (``model_vanilla.py``) is AdamW with no scheduler: every update
runs at ``train.lr``. ``layer_decay`` defaults to 1 (one rate for every layer: what the authors'
SGM schedule ran); 0.9 is the tuned ablation.
"""

from __future__ import annotations

import pytest
import torch
from test_sgm import CFG, LoggedLrs, fit, make, start, toy_experience

from medcl.config import TrainConfig
from medcl.data.memory import ReplayMemory
from medcl.engine.trainer import fit_experience
from medcl.errors import ConfigError
from medcl.strategies.rehearsal import RehearsalOptions

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def stream():
    return [toy_experience(0, [0, 1]), toy_experience(1, [2, 3])]


def adapted(stream, **options):
    """A rehearsal arm after experience 0, at the start of experience 1."""
    r, memory = make("rehearsal", **options), ReplayMemory(8)
    fit(r, stream, memory, 0)
    return r, memory


def test_layer_decay_defaults_to_one_rate():
    assert RehearsalOptions().layer_decay == 1.0
    assert make().layer_decay == 1.0 and make("rehearsal").layer_decay == 1.0


def test_adamw_constant_keeps_train_lr_for_every_group_and_update(stream):
    r, memory = adapted(stream, optimizer="adamw_constant")
    log = LoggedLrs()
    cfg = TrainConfig(epochs=10, batch_size=8, max_updates=6, lr=0.01, weight_decay=0.05,
                      augment="none")  # fmt: skip
    start(r, stream[1], memory)
    opt, sched = r.configure_optimizers(cfg, list(r.trainable_parameters()), 6)
    assert isinstance(opt, torch.optim.AdamW) and sched is None
    assert {g["lr"] for g in opt.param_groups} == {0.01}  # full fine-tuning at one rate
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05}
    r, memory = adapted(stream, optimizer="adamw_constant")
    fit_experience(r, stream[1], past=stream[:1], num_seen_classes=4, memory=memory, cfg=cfg,
                   seed=1, quiet=True, logger=log)  # fmt: skip
    assert log.lrs == [0.01] * 6  # no warm-up, no annealing


def test_adamw_constant_with_layer_decay_decays_per_unit(stream):
    r, memory = adapted(stream, optimizer="adamw_constant", layer_decay=0.5)
    start(r, stream[1], memory)
    opt, sched = r.configure_optimizers(CFG, list(r.trainable_parameters()), 10)
    assert sched is None
    assert {g["depth"]: g["lr"] for g in opt.param_groups} == {
        d: pytest.approx(CFG.lr * 0.5**d) for d in (0, 1, 2, 3, 4)
    }


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="optimizer"):
        make("rehearsal", optimizer="adamw_cosine")
