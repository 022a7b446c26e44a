"""S-C's baselines from the paper: Ensemble MC-SGD (n chains, logits averaged) and Scaled
MC-SGD (an MC-SGD network widened to S-C's trained parameters, ``model.width``)."""

from __future__ import annotations

import pytest
import torch
from test_baselines import STREAM
from test_subspace import CFG, fit, images_of, new_strategy, plain_classifier

from medcl.data.memory import ReplayMemory
from medcl.engine.checkpoint import load_checkpoint, save_checkpoint
from medcl.errors import ConfigError
from medcl.metrics.compute import count_macs, count_parameters
from medcl.models.backbones import create_backbone
from medcl.models.widths import width_for_parameters
from medcl.strategies.mcsgd import MCSGD

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ONE_EPOCH = CFG.model_copy(update={"epochs": 1})


@pytest.fixture(scope="module")
def ensemble():
    """``ensemble-mcsgd`` (3 chains) trained one epoch per experience."""
    strategy, memory = new_strategy("ensemble-mcsgd", n_models=3), ReplayMemory(16, seed=0)
    for exp in STREAM:
        fit(strategy, exp, memory, ONE_EPOCH)
    return strategy


def test_ensemble_mcsgd_is_n_independent_mcsgd_chains_with_logits_averaged(ensemble):
    chains = list(ensemble.chains)
    assert len(chains) == 3 and all(isinstance(c, MCSGD) for c in chains)
    assert not ensemble.others and ensemble.average == "logits"
    key = "backbone.net.conv1.0.weight"
    w = [c.midpoint()[key] for c in chains]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])  # own inits
    # every chain ran its own connectivity step after experience 1 (MC-SGD's K + 1 points)
    losses = [d["connectivity_loss"] for d in ensemble.diagnostics()["members"]]
    assert all(len(v) > 0 for v in losses) and losses[0] != losses[1]
    # inference: the mean of the chains' logits; the deployable model folds each chain
    ensemble.eval()
    x = images_of(STREAM[1])
    logits = torch.stack([c.predict(x) for c in chains]).mean(0)
    torch.testing.assert_close(ensemble.predict(x), logits)
    model = ensemble.deployable_model().eval()
    torch.testing.assert_close(model(x), logits)
    plain = plain_classifier(STREAM.num_classes)
    assert count_macs(model, (1, 16, 16)) == 3 * count_macs(plain, (1, 16, 16))
    assert count_parameters(model) == 3 * count_parameters(plain)


def test_ensemble_mcsgd_checkpoint_round_trip(ensemble, tmp_path):
    path = save_checkpoint(tmp_path / "c", strategy=ensemble.state_dict(), memory={},
                           state={"seen": [i.to_dict() for i in ensemble.seen]})  # fmt: skip
    tensors, _, state = load_checkpoint(path)
    fresh = new_strategy("ensemble-mcsgd", n_models=3, seed=5)  # other inits: all is loaded
    fresh.rebuild([type(ensemble.seen[0]).from_dict(d) for d in state["seen"]])
    fresh.load_state_dict(tensors)
    x = images_of(STREAM[0])
    torch.testing.assert_close(fresh.eval().predict(x), ensemble.eval().predict(x))


def test_ensemble_member_options_are_validated_as_the_members():
    with pytest.raises(ConfigError, match="p=2"):
        new_strategy("ensemble-mcsgd", member_options={"p": 2.0})
    with pytest.raises(ConfigError, match="member_options"):
        new_strategy("ensemble", member_options={"p": 0.1})
    chains = new_strategy("ensemble", member="mcsgd", n_models=2,
                          member_options={"stage1_replay": True}).chains  # fmt: skip
    assert [c.uses_memory for c in chains] == [True, True]


# -- Scaled MC-SGD: model.width for timm ResNets -------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_width_one_is_the_unchanged_timm_model(name):
    torch.manual_seed(0)
    a = create_backbone(name, in_chans=1, small_input=True)
    torch.manual_seed(0)
    b = create_backbone(name, in_chans=1, small_input=True, width=1.0)
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, msg=k)


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_width_scales_a_timm_resnets_channels_and_parameters(name):
    base = create_backbone(name, in_chans=1, small_input=True)
    wide = create_backbone(name, in_chans=1, small_input=True, width=1.5)
    assert wide.num_features == round(1.5 * base.num_features)
    # the stages after the first (its input is the stem: timm's plain stem is always 64 wide)
    assert [s.in_channels for s in wide.stages()[1:]] == [round(1.5 * s.in_channels)
                                                          for s in base.stages()[1:]]  # fmt: skip
    ratio = count_parameters(wide) / count_parameters(base)
    assert 1.5**2 * 0.93 < ratio < 1.5**2 * 1.02  # conv weights grow with width squared
    assert wide(torch.zeros(2, 1, 28, 28)).shape == (2, wide.num_features)


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_width_for_parameters_matches_the_target_ratio(name):
    """Scaled MC-SGD: the width whose network (backbone + head) has S-C's trained parameters,
    two endpoints of every tensor."""
    kw = {"in_chans": 1, "small_input": True, "num_classes": 9}
    width = width_for_parameters(name, ratio=2.0, **kw)
    base = create_backbone(name, in_chans=1, small_input=True)
    wide = create_backbone(name, in_chans=1, small_input=True, width=width)
    head = base.num_features * 9 + 9, wide.num_features * 9 + 9
    ratio = (count_parameters(wide) + head[1]) / (count_parameters(base) + head[0])
    assert 1.3 < width < 1.5 and abs(ratio - 2.0) < 0.03


def test_width_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match=r"model\.width"):
        create_backbone("efficientnet_lite0", in_chans=1, width=2.0)
    with pytest.raises(ConfigError, match=r"model\.width"):
        create_backbone("resnet18", in_chans=3, width=2.0, pretrained="hub")
