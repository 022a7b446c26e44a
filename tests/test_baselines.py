"""Regularisation and expansion baselines: EWC, LwF, DER."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medcl.config import RunConfig, TrainConfig, validate_config
from medcl.data.experience import Experience, Scenario
from medcl.data.memory import ReplayMemory
from medcl.data.synthetic import make_synthetic
from medcl.data.transforms import to_model_input
from medcl.engine.checkpoint import load_checkpoint, save_checkpoint
from medcl.engine.run import run
from medcl.engine.trainer import experience_info, fit_experience
from medcl.errors import ConfigError
from medcl.metrics.compute import count_macs, count_parameters
from medcl.models.backbones import create_backbone
from medcl.strategies import Batch, create_strategy
from medcl.strategies.ewc import per_sample_fisher

CFG = TrainConfig(epochs=5, batch_size=16, lr=0.05, augment="none")


def tiny_stream(n_train: int = 64, n_test: int = 32) -> Scenario:
    """Two class-incremental experiences of learnable synthetic images (classes {0,1}, {2,3})."""
    data = make_synthetic(
        num_classes=4, image_size=16, n_train=4 * n_train, n_val=0, n_test=4 * n_test, seed=0
    )

    def experience(i: int, classes: tuple[int, ...]) -> Experience:
        split = {k: s.subset(torch.nonzero(torch.isin(s.labels, torch.tensor(classes))).flatten())
                 for k, s in data.items()}  # fmt: skip
        return Experience(i, f"exp{i}", i, classes, "site", **split)

    return Scenario(
        "tiny", "class", ("a", "b", "c", "d"), (experience(0, (0, 1)), experience(1, (2, 3)))
    )


STREAM = tiny_stream()


OPTIONS = {"ewc": {"fisher_samples": 64}}


def new_strategy(name: str, **params):
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", in_chans=1, small_input=False)
    return create_strategy(name, backbone, scenario_kind="class", **params)


def accuracy(strategy, exp: Experience) -> float:
    strategy.eval()
    with torch.no_grad():
        pred = strategy.predict(to_model_input(exp.test.images)).argmax(1)
    return float((pred == exp.test.labels).float().mean())


def fit(strategy, exp: Experience, memory: ReplayMemory) -> None:
    fit_experience(strategy, exp, past=STREAM.experiences[: exp.index], memory=memory, cfg=CFG,
                   num_seen_classes=STREAM.num_seen_classes(exp.index), seed=exp.index, quiet=True)  # fmt: skip


def grown(name: str, upto: int = 1, **params):
    """A fresh strategy grown (no training) through experiences ``0..upto`` of the stream."""
    s = new_strategy(name, **params)
    for exp in STREAM.experiences[: upto + 1]:
        s.grow(experience_info(exp, STREAM.num_seen_classes(exp.index)))
    return s


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained():
    """``trained(name) -> (strategy, accuracies, state after experience 0)``, each trained once."""
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            strategy = new_strategy(name, **OPTIONS.get(name, {}))
            memory = ReplayMemory(40 if name == "der" else 0, seed=0)
            accs, first = [], None
            for exp in STREAM:
                fit(strategy, exp, memory)
                accs.append([accuracy(strategy, e) for e in STREAM.experiences[: exp.index + 1]])
                if first is None:
                    first = copy.deepcopy(strategy)
            cache[name] = strategy, accs, first
        return cache[name]

    return get


def batch_of(exp: Experience, n: int = 8) -> Batch:
    x, y = to_model_input(exp.train.images[:n]), exp.train.labels[:n]
    return Batch(
        x=x, y=y, exp=torch.full_like(y, exp.index), replay=torch.zeros_like(y, dtype=torch.bool)
    )


# -- every method: learns, and survives a checkpoint ---------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["ewc", "lwf", "der"])
def test_learns_synthetic_stream(name, trained):
    _, accs, _ = trained(name)
    # 4 classes in all (chance 0.25; 0.5 between one experience's 2 classes); each experience
    # is learned well right after training on it. Measured over seeds 0-2 on default and avx2:
    # experience 0 0.97-0.98, experience 1 0.86-0.98 (all three methods)
    assert accs[0][0] > 0.8, accs
    assert accs[1][1] > 0.7, accs
    if name == "der":  # replay + frozen extractors keep the first experience
        assert accs[1][0] > 0.6, accs  # measured 0.86-0.94; EWC, LwF: 0.0


@pytest.mark.parametrize("name", ["ewc", "lwf", "der"])
def test_checkpoint_round_trip(name, trained, tmp_path):
    strategy, _, _ = trained(name)
    seen = {"seen": [i.to_dict() for i in strategy.seen]}
    path = save_checkpoint(tmp_path / "c", strategy=strategy.state_dict(), memory={}, state=seen)
    tensors, _, state = load_checkpoint(path)
    fresh = new_strategy(name, **OPTIONS.get(name, {}))
    fresh.rebuild([type(strategy.seen[0]).from_dict(d) for d in state["seen"]])
    fresh.load_state_dict(tensors)
    x = to_model_input(STREAM[0].test.images[:16])
    torch.testing.assert_close(fresh.eval().predict(x), strategy.eval().predict(x))
    for k, v in strategy.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, msg=k)


@pytest.mark.parametrize("name", ["ewc", "lwf", "der"])
def test_run_resumed_after_interruption_matches_uninterrupted(name, tmp_path):
    """Through ``medcl.engine.run``: checkpoint after experience 0, rebuild, resume."""

    def config(out: str) -> RunConfig:
        return validate_config({
            "scenario": {"name": "synthetic-ci", "num_classes": 4, "classes_per_experience": 2,
                         "n_train": 16, "n_test": 8, "image_size": 16},
            "strategy": {"name": name, **OPTIONS.get(name, {})},
            "model": {"backbone": "test_resnet", "small_input": False},
            "train": {"epochs": 2, "batch_size": 16, "augment": "none", "num_threads": 1},
            "memory": {"size": 16}, "output_dir": str(tmp_path / out),
        })  # fmt: skip

    full_dir = run(config("a"), quiet=True)
    run(config("b"), quiet=True, stop_after=0)
    resumed_dir = run(config("b"), resume=True, quiet=True)
    # the test probabilities after the resumed experience are those of the uninterrupted run
    full, resumed = (
        np.load(d / "predictions" / "after-001.npz")["probs"] for d in (full_dir, resumed_dir)
    )
    np.testing.assert_allclose(resumed, full, rtol=0, atol=1e-6)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (full_dir, resumed_dir)]
    assert metrics[0]["compute"]["parameters"] == metrics[1]["compute"]["parameters"]


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="mode"):
        new_strategy("ewc", mode="bogus")
    with pytest.raises(ConfigError, match="temperature"):
        new_strategy("lwf", temperature=0.0)


# -- EWC -----------------------------------------------------------------------------------------


def test_ewc_penalty_is_zero_at_anchor_and_matches_hand_value():
    s = grown("ewc", upto=0, ewc_lambda=3.0)
    term = s.terms[0]
    params = dict(s.named_parameters())
    g = torch.Generator().manual_seed(0)
    fishers = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    for n, p in params.items():
        term.set(n, fishers[n], p)
    s.grow(experience_info(STREAM[1], 4))  # term 0 becomes active; head grows to 4 rows
    b = batch_of(STREAM[1])
    assert s.penalty(b, torch.zeros(1, 4)).item() == 0.0
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    expected = sum(
        (fishers[n] * (p[tuple(slice(0, d) for d in fishers[n].shape)] - term.anchor(n)) ** 2).sum()
        for n, p in dict(s.named_parameters()).items()
    )
    got = s.penalty(b, torch.zeros(1, 4))
    assert got.item() > 0
    torch.testing.assert_close(got, 0.5 * 3.0 * expected)
    # the new classes' head rows are not consolidated: changing them leaves the penalty alone
    with torch.no_grad():
        s.head.weight[2:] += 5.0
    torch.testing.assert_close(s.penalty(b, torch.zeros(1, 4)), got)


def test_per_sample_fisher_matches_a_slow_loop():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).eval()
    x, y = torch.randn(10, 1, 6, 6), torch.randint(0, 3, (10,))
    params = dict(model.named_parameters())
    fast = per_sample_fisher(model, params, x, y, batch_size=4)
    slow = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        grads = torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(params.values())
        )
        for n, g in zip(params, grads, strict=True):
            slow[n] += g**2 / len(x)
    for n in params:
        torch.testing.assert_close(fast[n], slow[n], msg=n)


def test_ewc_online_accumulates_decayed_fisher():
    s = new_strategy("ewc", mode="online", gamma=0.5, fisher_samples=8)
    small = [dataclasses.replace(e, train=e.train.subset(range(8))) for e in STREAM]
    s.grow(experience_info(small[0], 2))
    s.after_experience(small[0], ReplayMemory(0))
    f0 = s.terms[0].fisher("head.weight").clone()  # (2, F)
    s.grow(experience_info(small[1], 4))
    assert len(s.terms) == 1 and s.terms[0].fisher("head.weight").shape[0] == 4
    s.eval()
    x, y = s._fisher_data(small[1])
    params = dict(s.named_parameters())
    f1 = per_sample_fisher(s, params, x, y)["head.weight"]
    s.after_experience(small[1], ReplayMemory(0))
    expected = f1.clone()
    expected[:2] += 0.5 * f0
    torch.testing.assert_close(s.terms[0].fisher("head.weight"), expected)
    torch.testing.assert_close(s.terms[0].anchor("head.weight"), s.head.weight.detach())


@pytest.mark.numerics
def test_ewc_pulls_consolidated_weights_towards_the_anchor(trained):
    # same start (the state after experience 0) and seed, with and without the penalty
    ewc, _, first = trained("ewc")
    free = copy.deepcopy(first)
    free.ewc_lambda = 0.0
    fit(free, STREAM[1], ReplayMemory(0))
    drift = [
        sum(t.penalty(dict(s.named_parameters())) for t in s._active_terms()).item()
        for s in (ewc, free)
    ]
    assert drift[0] < 0.5 * drift[1], drift  # ratio measured 0.02-0.05, seeds 0-2, both paths


# -- LwF -----------------------------------------------------------------------------------------


def test_lwf_distils_from_a_frozen_snapshot():
    s = new_strategy("lwf", alpha=2.0, temperature=2.0)
    s.grow(experience_info(STREAM[0], 2))
    s.before_experience(STREAM[0], ReplayMemory(0))
    b = batch_of(STREAM[1])
    assert s.teacher is None and s.penalty(b, s(b.x)).item() == 0.0
    s.grow(experience_info(STREAM[1], 4))
    s.before_experience(STREAM[1], ReplayMemory(0))
    assert not any(k.startswith("teacher") for k in s.state_dict())  # not checkpointed
    assert not s.teacher.training and not any(p.requires_grad for p in s.teacher.parameters())
    s.eval()  # same mode as the snapshot: identical model -> zero distillation loss
    assert abs(s.penalty(b, s(b.x)).item()) < 1e-6
    target = s.teacher(b.x).detach().clone()
    s.train()
    opt = torch.optim.SGD(s.parameters(), lr=0.5)
    for _ in range(2):
        logits = s(b.x)
        loss = F.cross_entropy(logits, b.y) + s.penalty(b, logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(s.teacher(b.x), target)  # the snapshot did not move
    s.eval()
    logits = s(b.x)
    p_old = torch.softmax(target[:, :2] / 2, 1)
    kl = (p_old * (p_old.log() - torch.log_softmax(logits[:, :2] / 2, 1))).sum(1).mean()
    got = s.penalty(b, logits)
    assert got.item() > 1e-4
    torch.testing.assert_close(got, 2.0 * kl)


def test_lwf_warmup_trains_only_new_rows():
    s = grown("lwf", warmup_epochs=2)
    before = copy.deepcopy(s.state_dict())
    s.before_experience(STREAM[1], ReplayMemory(0))
    after = s.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    torch.testing.assert_close(after["head.weight"][:2], before["head.weight"][:2])
    assert not torch.equal(after["head.weight"][2:], before["head.weight"][2:])


# -- DER -----------------------------------------------------------------------------------------


def test_der_grows_one_extractor_per_experience():
    s = new_strategy("der")
    sizes, macs = [], []
    for i, k in enumerate([2, 4, 6]):
        s.grow(
            experience_info(
                Experience(i, f"e{i}", i, tuple(range(k - 2, k)), "", *[STREAM[0].train] * 3), k
            )
        )
        sizes.append(count_parameters(s.deployable_model()))
        macs.append(count_macs(s.deployable_model(), (1, 16, 16)))
    per_extractor, f = count_parameters(s.extractors[0]), s.extractors[0].num_features
    assert len(s.extractors) == 3
    head = [2 * (f + 1), 4 * (2 * f + 1), 6 * (3 * f + 1)]  # K rows over k·F features + bias
    assert sizes[1] - sizes[0] == per_extractor + head[1] - head[0]
    assert sizes[2] - sizes[1] == per_extractor + head[2] - head[1]
    assert macs[0] < macs[1] < macs[2]


def test_der_freezes_old_extractors_and_keeps_old_outputs():
    s = grown("der", upto=0)
    x = to_model_input(STREAM[0].test.images[:8])
    old_logits = s.eval()(x)
    old_state = copy.deepcopy(s.extractors[0].state_dict())
    s.grow(experience_info(STREAM[1], 4))
    # initialised from the previous extractor, old head block copied, new columns zero
    torch.testing.assert_close(s.eval()(x)[:, :2], old_logits)
    assert not any(p.requires_grad for p in s.extractors[0].parameters())
    assert all(p.requires_grad for p in s.extractors[1].parameters())
    s.train()
    assert not s.extractors[0].training and s.extractors[1].training
    s(to_model_input(STREAM[1].train.images[:16]))  # a training forward pass
    for k, v in s.extractors[0].state_dict().items():  # BatchNorm statistics untouched
        torch.testing.assert_close(v, old_state[k], msg=k)


def test_der_auxiliary_loss_maps_old_classes_to_one_label():
    s = grown("der", aux_weight=0.5)
    assert s.aux.num_classes == 3  # two new classes + "old"
    s.train()
    y = torch.tensor([0, 1, 2, 3])
    b = Batch(x=to_model_input(STREAM[1].train.images[:4]), y=y, exp=y, replay=y < 2)
    logits = s(b.x)
    aux_logits = s._aux_logits
    expected = F.cross_entropy(logits, y) + 0.5 * F.cross_entropy(
        aux_logits, torch.tensor([0, 0, 1, 2])
    )
    torch.testing.assert_close(s.loss(logits, b), expected)
    # an experience without new classes (a new site): no auxiliary classifier, plain CE
    s.grow(experience_info(STREAM[1], 4))
    assert s.aux is None and len(s.extractors) == 3
    logits = s(b.x)
    torch.testing.assert_close(s.loss(logits, b), F.cross_entropy(logits, y))
