"""Stage 2 of DynaMMo and ACL: the class-balanced set, herding, what re-tuning changes, routing."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from test_dynammo import CI, _backbone, _train

import medcl.strategies.acl as acl_module
from medcl.data.memory import ReplayMemory, herding_order
from medcl.data.transforms import to_model_input
from medcl.models.routing import balanced_retune_set
from medcl.strategies import create_strategy

MEMORY = 8  # 4 exemplars per class of experience 0: herding picks 4 of each new class's 12


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=["dynammo", "acl"])
def stage2(request):
    """A strategy after two experiences, with stage 2's balanced set and the strategy's state
    just before and just after stage 2 (recorded by wrapping the stage-2 calls)."""
    s = create_strategy(request.param, _backbone(), backbone_init="checkpoint", retune_epochs=3)
    rec = {}
    build, retune = acl_module.balanced_retune_set, s._retune_heads

    def recording_build(*args, **kwargs):
        rec["balanced"] = build(*args, **kwargs)
        return rec["balanced"]

    def recording_retune(exp, memory):
        rec["before"] = copy.deepcopy(s.state_dict())
        rec["groups"] = len(set(zip(memory.exp_.tolist(), memory.label_.tolist(), strict=True)))
        retune(exp, memory)
        rec["after"] = copy.deepcopy(s.state_dict())
        rec["diagnostics"] = s.diagnostics()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(acl_module, "balanced_retune_set", recording_build)
        mp.setattr(s, "_retune_heads", recording_retune)
        _train(s, CI, memory_size=MEMORY)
    return s, rec


def _memory_after_first(size):
    memory = ReplayMemory(size, seed=0)  # random selection
    memory.update(CI[0])
    return memory


def _pixels(images, rows):
    """A deterministic stand-in for features: the flattened pixels."""
    return images[rows].flatten(1).float()


@pytest.mark.parametrize(
    ("size", "old", "new"),
    [
        (8, [4, 4], 4),  # 8 // 2 groups
        (9, [5, 4], 4),  # the memory gives the remainder to its first group; the quota is 9 // 2
        (40, [12, 12], 12),  # quota 20, but every class has only 12 training samples
    ],
)
def test_balanced_set_quota_is_memory_size_over_groups(size, old, new):
    memory = _memory_after_first(size)
    data = balanced_retune_set(CI[1], memory, _pixels)
    counts = Counter(data.labels.tolist())
    assert [counts[0], counts[1]] == old and [counts[2], counts[3]] == [new, new]
    assert len(data) == len(memory) + 2 * new
    # memory rows first, every one of them, with their experience; then the new experience's
    assert sorted(data.labels[: len(memory)].tolist()) == sorted(memory.label_.tolist())
    assert data.exps.tolist() == [0] * len(memory) + [1] * 2 * new


def test_balanced_set_new_samples_are_the_herding_ones():
    memory = _memory_after_first(MEMORY)
    data = balanced_retune_set(CI[1], memory, _pixels)
    train = CI[1].train
    for (images, rows), c in zip(data.parts[-2:], CI[1].classes, strict=True):
        assert images is train.images
        pool = torch.nonzero(train.labels == c).flatten()  # (12,) rows of class c
        want = pool[herding_order(_pixels(train.images, pool), MEMORY // 2)]
        assert rows.tolist() == want.tolist()
        assert rows.tolist() != pool[: MEMORY // 2].tolist()  # not simply the first rows


@pytest.mark.numerics  # trained features and heads
def test_stage2_set_has_the_quota_and_herds_on_the_deployed_features(stage2):
    s, rec = stage2
    data = rec["balanced"]
    quota = MEMORY // rec["groups"]
    assert rec["groups"] == 2 and quota == 4
    assert Counter(data.labels.tolist()) == {0: quota, 1: quota, 2: quota, 3: quota}
    # new-class exemplars: herding on the newest deployed set's features (DynaMMo: the merged
    # set; ACL: set 1), recomputed here in eval mode without the feature cache
    train = CI[1].train
    s.eval()
    for (_, rows), c in zip(data.parts[-2:], CI[1].classes, strict=True):
        pool = torch.nonzero(train.labels == c).flatten()
        with torch.no_grad():
            feats = s.features(to_model_input(train.images[pool]))
        assert rows.tolist() == pool[herding_order(feats, quota)].tolist()


@pytest.mark.numerics  # trained features and heads
def test_stage2_changes_every_head_and_nothing_else(stage2):
    s, rec = stage2
    before, after = rec["before"], rec["after"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    head_params = {f"heads.{k}" for k, _ in s.heads.named_parameters()}
    assert changed == head_params  # every head's weight and bias, "others" row included
    frozen = [k for k in before if k.split(".")[0] in ("backbone", "adapter_sets", "merged_set")]
    assert any(k.startswith("adapter_sets.1.") for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # bit-identical, BN stats too
    for j in range(len(s.heads)):  # the "others" output itself was re-tuned in every head
        others = f"heads.{j}.weight"
        assert not torch.equal(before[others][-1], after[others][-1])


@pytest.mark.numerics  # trained features and heads
def test_stage2_records_routing_accuracy(stage2):
    s, rec = stage2
    routing = rec["diagnostics"]["routing_stage2"]
    assert s.diagnostics()["routing_stage2"] == routing  # what the run records after the exp.
    json.dumps(routing, allow_nan=False)  # strategy.json stays valid JSON
    data = rec["balanced"]
    assert routing["samples"] == len(data)
    assert 0.0 <= routing["accuracy"] <= 1.0
    assert all(0.0 <= a <= 1.0 for a in routing["per_experience"])
    # independent recomputation with the deployable model's route() on the same images
    model = s.eval().deployable_model()
    with torch.no_grad():
        routes = torch.cat(
            [model.route(model.forward_features(to_model_input(im[r]))) for im, r in data.parts]
        )
    owners = [info.index for info in s.seen]
    truth = torch.tensor([owners.index(e) for e in data.exps.tolist()])
    hit = (routes == truth).float()
    assert routing["accuracy"] == pytest.approx(hit.mean().item(), abs=1e-12)
    per = [hit[data.exps == j].mean().item() for j in owners]
    assert routing["per_experience"] == pytest.approx(per, abs=1e-12)


def test_routing_is_not_recorded_without_stage2():
    s = create_strategy("dynammo", _backbone(), backbone_init="checkpoint", retune_epochs=0)
    _train(s, CI, memory_size=MEMORY)
    assert "routing_stage2" not in s.diagnostics()
    assert "adapter_sets" in s.diagnostics()
