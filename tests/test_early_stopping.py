"""``train.early_stopping_patience``: epochs chosen on the validation splits, best weights kept."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_raw

from medcl.config import validate_config
from medcl.config_sections import TrainConfig
from medcl.engine.components import build_components
from medcl.engine.early_stopping import EarlyStopping
from medcl.engine.run import run
from medcl.engine.run_checks import check_run
from medcl.engine.trainer import fit_experience
from medcl.errors import ConfigError, DataError

RAW = tiny_raw(scenario={"n_val": 8}, train={"epochs": 12, "lr": 0.05})


def _components(**scenario):
    return build_components(validate_config(tiny_raw(scenario={"n_val": 8, **scenario})))


def test_stops_after_patience_epochs_without_improvement_and_restores_the_best():
    scenario, strategy, _ = _components()
    stopper = EarlyStopping(scenario.experiences[:1], patience=2)
    scores = iter([0.5, 0.7, 0.6, 0.7, 0.9])  # epoch 2 best; 3 and 4 do not beat it
    stopper.score = lambda s: next(scores)
    states, stops = [], []
    for _ in range(4):
        with torch.no_grad():
            next(strategy.parameters()).add_(1.0)  # each epoch changes the weights
        states.append({k: v.clone() for k, v in strategy.state_dict().items()})
        stops.append(stopper.should_stop(strategy))
    # stop after epoch 4: two epochs without beating epoch 2
    assert stops == [False, False, False, True]
    assert stopper.best_epoch == 2 and stopper.scores == [0.5, 0.7, 0.6, 0.7]
    stopper.restore_best(strategy)
    for k, v in strategy.state_dict().items():
        assert torch.equal(v, states[1][k]), k  # epoch 2's weights, not the last ones


def test_trainer_records_epochs_and_keeps_the_best_validation_score():
    scenario, strategy, memory = _components()
    exp = scenario.experiences[0]
    cfg = TrainConfig(
        epochs=12, batch_size=32, lr=0.05, augment="none", early_stopping_patience=2,
        channels_last=False,
    )  # fmt: skip
    stats = fit_experience(
        strategy, exp, past=[], num_seen_classes=2, memory=memory, cfg=cfg, quiet=True, seed=0
    )
    assert 1 <= stats.best_epoch <= stats.epochs <= 12
    assert len(stats.val_scores) == stats.epochs
    # stopped by patience, or ran to the cap
    assert stats.epochs == 12 or stats.epochs - stats.best_epoch == 2
    assert stats.val_scores[stats.best_epoch - 1] == max(stats.val_scores)
    # the model kept is the best epoch's: its validation score is the best one (finetune's
    # consolidation and memory update leave the weights as they are)
    assert EarlyStopping([exp], 2).score(strategy) == pytest.approx(max(stats.val_scores))


def test_run_records_the_epochs_used(tmp_path):
    raw = json.loads(json.dumps(RAW))
    raw["output_dir"] = str(tmp_path)
    raw["train"]["early_stopping_patience"] = 1
    run_dir = run(validate_config(raw), quiet=True)
    fit = json.loads((run_dir / "metrics.json").read_text())["fit"]
    for rec in fit:
        assert 1 <= rec["best_epoch"] <= rec["epochs"] <= 12
        assert len(rec["val_scores"]) == rec["epochs"]
    without = json.loads(json.dumps(RAW)) | {"output_dir": str(tmp_path / "b")}
    fit = json.loads((run(validate_config(without), quiet=True) / "metrics.json").read_text())
    assert all(r["epochs"] == 12 and r["val_scores"] == [] for r in fit["fit"])


def test_no_validation_images_and_several_processes_are_refused(tmp_path):
    scenario, _, _ = _components(n_val=0)
    with pytest.raises(DataError, match="no validation images"):
        EarlyStopping(scenario.experiences[:1], patience=2)
    raw = json.loads(json.dumps(RAW)) | {"output_dir": str(tmp_path)}
    raw["train"]["early_stopping_patience"] = 2
    with pytest.raises(ConfigError, match="several processes"):
        check_run(validate_config(raw), resume=False, world_size=2)
