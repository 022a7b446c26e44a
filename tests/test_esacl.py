"""Sparse continual learning: EsaCL (reconstruction), SparCL, magnitude pruning, shared masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medcl.config import TrainConfig
from medcl.data.experience import Experience, Scenario
from medcl.data.memory import ReplayMemory
from medcl.data.synthetic import make_synthetic
from medcl.data.transforms import to_model_input
from medcl.engine.checkpoint import load_checkpoint, save_checkpoint
from medcl.engine.trainer import fit_experience
from medcl.errors import ConfigError
from medcl.metrics.compute import TrainingFlops
from medcl.models.backbones import Backbone, create_backbone
from medcl.models.pruning import WeightMasks, channel_groups
from medcl.strategies import Batch, ExperienceInfo, create_strategy
from medcl.strategies.data_removal import DataRemoval


def tiny_stream(n_train: int = 32, n_test: int = 16) -> Scenario:
    """Two class-incremental experiences of learnable synthetic images (classes {0,1}, {2,3})."""
    data = make_synthetic(
        num_classes=4, image_size=16, n_train=4 * n_train, n_val=0, n_test=4 * n_test, seed=0
    )

    def experience(i: int, classes: tuple[int, ...]) -> Experience:
        keep = {k: torch.nonzero(torch.isin(s.labels, torch.tensor(classes))).flatten()
                for k, s in data.items()}  # fmt: skip
        return Experience(i, f"exp{i}", i, classes, "site", **{k: data[k].subset(v) for k, v in keep.items()})  # fmt: skip

    return Scenario(
        "tiny", "class", ("a", "b", "c", "d"), (experience(0, (0, 1)), experience(1, (2, 3)))
    )


STREAM = tiny_stream()
CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, scheduler="none", augment="none")


def new(name: str, **params):
    torch.manual_seed(0)
    bb = create_backbone("test_resnet", in_chans=1, small_input=False)
    return create_strategy(name, bb, scenario_kind="class", **params)


def fit(s, exp, memory, cfg=CFG):
    return fit_experience(s, exp, past=STREAM.experiences[: exp.index], memory=memory, cfg=cfg,
                          num_seen_classes=STREAM.num_seen_classes(exp.index), seed=exp.index,
                          quiet=True)  # fmt: skip


def assert_masked(s) -> None:
    """Every pruned weight is exactly zero."""
    for path in s.masks.layers:
        w = s.masks._weight(path).detach()
        assert torch.all(w[~s.masks.weight_mask(path)] == 0), path


@pytest.mark.slow
def test_masks_hold_through_training_checkpoint_resume_and_export(tmp_path):
    s = new("esacl", init_sparsity=0.5, sparsity=0.8, prune_every=2, ramp_updates=4)
    memory = ReplayMemory(16)
    before = {p: s.masks.kept(p).clone() for p in s.masks.layers}
    fit(s, STREAM[0], memory)
    assert_masked(s)
    assert s.masks.density() == pytest.approx(0.2, abs=0.01)
    for p in s.masks.layers:  # no regrowth: the mask only shrinks
        assert not torch.any(s.masks.kept(p) & ~before[p])
    ckpt = save_checkpoint(tmp_path / "c", strategy=s.state_dict(), memory=memory.state_dict(), state={})  # fmt: skip
    tensors, mem, _ = load_checkpoint(ckpt)
    r = new("esacl", init_sparsity=0.5, sparsity=0.8, prune_every=2, ramp_updates=4)
    r.rebuild([ExperienceInfo.from_dict(i.to_dict()) for i in s.seen])
    r.load_state_dict(tensors)
    for p in s.masks.layers:
        assert torch.equal(r.masks.kept(p), s.masks.kept(p))
    x = to_model_input(STREAM[0].test.images)
    r.eval(), s.eval()
    assert torch.equal(r.predict(x), s.predict(x))
    memory2 = ReplayMemory(16)
    memory2.load_state_dict(mem)
    memory2.attach(STREAM.experiences[:1])
    fit(r, STREAM[1], memory2)  # resumed training keeps the pruned weights at zero
    assert_masked(r)
    for p in s.masks.layers:
        assert not torch.any(r.masks.kept(p) & ~s.masks.kept(p))
    # the exported weights carry the zeros (safetensors and ONNX)
    from safetensors.torch import load_file, save_model

    save_model(r.deployable_model(), str(tmp_path / "m.safetensors"))
    saved = load_file(str(tmp_path / "m.safetensors"))
    for p in r.masks.layers:
        w = saved[f"backbone.{p}.weight"]
        assert int((w == 0).sum()) >= int((~r.masks.kept(p)).sum()) > 0
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    path = tmp_path / "m.onnx"
    torch.onnx.export(r.deployable_model().eval(), (x[:2],), str(path), dynamo=False)
    inits = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    pruned = int(sum((~r.masks.kept(p)).sum() for p in r.masks.layers))
    assert sum(int((a == 0).sum()) for a in inits if a.ndim == 4) >= pruned


def test_density_follows_the_schedule():
    s = new("esacl", init_sparsity=0.3, sparsity=0.9, prune_every=3, ramp_updates=9, ids=False)
    assert s.sparsity_at(0) == pytest.approx(0.3)
    assert s.sparsity_at(9) == s.sparsity_at(100) == pytest.approx(0.9)
    assert s.sparsity_at(3) < s.sparsity_at(6) < s.sparsity_at(9)
    assert 1 - s.masks.density() == pytest.approx(0.3, abs=1e-3)
    cfg = CFG.model_copy(update={"max_updates": 7})
    fit(s, STREAM[0], ReplayMemory(0), cfg)
    # last pruning step at update 6: every masked layer is at the scheduled sparsity
    for p, d in s.masks.layer_density().items():
        n = s.masks.kept(p).numel()
        assert d == pytest.approx(round((1 - s.sparsity_at(6)) * n) / n), p
    assert [e["update"] for e in s.events] == [0, 3, 6]


class _Toy(nn.Module):
    """``(B, 1, 1, 2) -> (B, 2)`` through one bias-free linear layer (the pruned "stage")."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.stage(x.flatten(1))


def _toy_strategy(**params):
    net = _Toy()
    bb = Backbone(net, name="toy", num_features=2, stage_specs=[("stage", 2)], spatial_dims=2, in_chans=1)  # fmt: skip
    s = create_strategy("esacl", bb, init_sparsity=0.0, **params)
    s.grow(ExperienceInfo(0, "toy", 0, (0, 1), 2))
    with torch.no_grad():
        s.head.weight.copy_(torch.eye(2))
        s.head.bias.zero_()
    return s


def test_sdp_prunes_a_large_weight_in_a_flat_direction_that_magnitude_keeps():
    # input 0 is always 0: the large weights on it lie in an exactly flat direction of the loss;
    # input 1 carries the class, through small weights the loss is very sensitive to
    torch.manual_seed(0)
    x1 = torch.randn(64).sign() * 20
    x = torch.stack([torch.zeros(64), x1], 1).view(64, 1, 1, 2)
    y = (x1 < 0).long()
    s = _toy_strategy(sparsity=0.5, ids=False)
    w = s.backbone.net.stage.weight
    with torch.no_grad():
        w.copy_(torch.tensor([[3.0, 0.1], [-3.0, 0.05]]))
    batch = Batch(x=x, y=y, exp=torch.zeros(64, dtype=torch.long), replay=torch.zeros(64, dtype=torch.bool))  # fmt: skip
    s.train()
    s.loss(s(x), batch).backward()  # gradient at the SAM-perturbed point, as the trainer does
    sdp = s.masks.candidates(s._scores(), 0.5)["net.stage"]
    mag = s.masks.candidates(s._magnitude(), 0.5)["net.stage"]
    assert mag[:, 0].all() and not mag[:, 1].any()  # magnitude keeps the flat, large weights
    assert sdp[:, 1].all() and not sdp[:, 0].any()  # SDP keeps the sensitive ones instead

    def loss_with(mask):
        with torch.no_grad():
            return float(F.cross_entropy(s.head(F.linear(x.flatten(1), w * mask)), y))

    full = loss_with(torch.ones_like(w))
    assert loss_with(sdp.float()) == pytest.approx(full)  # pruning a flat direction costs nothing
    assert loss_with(mag.float()) > full + 0.1


def test_ids_back_propagates_the_most_sensitive_examples():
    torch.manual_seed(1)
    s = _toy_strategy(sparsity=0.5, ids=True, select_fraction=0.25, sam_rho=0.5)
    with torch.no_grad():
        s.backbone.net.stage.weight.copy_(torch.randn(2, 2))
    x, y = torch.randn(16, 1, 1, 2) * 3, torch.randint(0, 2, (16,))
    batch = Batch(x=x, y=y, exp=torch.zeros(16, dtype=torch.long), replay=torch.zeros(16, dtype=torch.bool),
                  index=torch.arange(16))  # fmt: skip
    s.removal.start(16)
    s.train()
    got = s.loss(s(x), batch)
    # independent SAM step: ε = ρ g/‖g‖, per-example loss change, top 25%
    params = [p for p in s.parameters() if p.requires_grad]
    before = F.cross_entropy(s(x), y, reduction="none")
    g = torch.autograd.grad(before.mean(), params)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g, strict=True):
            p.add_(0.5 * gi / norm)
        after = F.cross_entropy(s(x), y, reduction="none")
        sharp = after - before.detach()
        top = torch.topk(sharp, 4).indices
        low = torch.topk(-sharp, 4).indices
        want = F.cross_entropy(s(x[top]), y[top])
        other = F.cross_entropy(s(x[low]), y[low])
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    assert abs(float(want) - float(other)) > 1e-3  # the choice matters on this batch
    assert torch.allclose(s.removal.sum_.float(), sharp.float(), atol=1e-5)  # removal statistics


def test_data_removal_drops_the_lowest_scores_in_shares():
    r = DataRemoval(fraction=0.5, epochs=(1, 2), score="sharpness", component="test")
    r.start(8)
    r.observe(torch.arange(8), sharpness=torch.tensor([5.0, 1, 7, 0, 3, 6, 2, 4]))
    assert r.rows(0).tolist() == list(range(8))
    assert r.rows(1).tolist() == [0, 2, 4, 5, 6, 7]  # 2 lowest (rows 3, 1) dropped
    assert len(r.rows(2)) == 4 and r.removed_ == 4  # second share
    f = DataRemoval(fraction=0.25, epochs=(1,), score="forgetting", component="test")
    f.start(4)
    for c in (
        [1, 1, 0, 1],
        [0, 1, 0, 1],
        [1, 1, 0, 0],
    ):  # row 0 forgotten once, row 2 never learned
        f.observe(torch.arange(4), correct=torch.tensor(c, dtype=torch.bool))
    assert f.rows(1).tolist() == [0, 2, 3]  # row 1: learned, never forgotten -> easiest


def test_ids_uses_fewer_images_and_counts_flops():
    on = new("esacl", ids=True, removal_epochs=(1,), removal_fraction=0.5, prune_every=4)
    off = new("esacl", ids=False, prune_every=4)
    st_on, st_off = fit(on, STREAM[0], ReplayMemory(0)), fit(off, STREAM[0], ReplayMemory(0))
    assert st_off.images == 2 * 64 and st_on.images == 64 + 32
    assert int(on.images_) == st_on.images
    assert 0 < float(on.flops_) < float(off.flops_)


def test_structured_pruning_gives_a_smaller_module_with_the_same_outputs(tmp_path):
    s = new("esacl", structure="channel", init_sparsity=0.5, sparsity=0.5)
    fit(s, STREAM[0], ReplayMemory(0), CFG.model_copy(update={"max_updates": 3}))
    s.eval()
    slim = s.deployable_model().eval()
    x = to_model_input(STREAM[0].test.images)
    torch.testing.assert_close(slim(x), s.predict(x), atol=1e-5, rtol=1e-4)
    n_full = sum(p.numel() for p in s.backbone.parameters())
    n_slim = sum(p.numel() for p in slim.backbone.parameters())
    assert n_slim < 0.8 * n_full
    # a safetensors export rebuilt from the config loads into the slim shapes
    from safetensors.torch import load_model, save_model

    save_model(slim, str(tmp_path / "s.safetensors"))
    fresh = new("esacl", structure="channel", init_sparsity=0.0, sparsity=0.5)
    fresh.rebuild(s.seen)
    rebuilt = fresh.deployable_model()
    load_model(rebuilt, str(tmp_path / "s.safetensors"))
    torch.testing.assert_close(rebuilt.eval()(x), slim(x))


def test_channel_groups_cover_resnet_blocks_and_skip_shortcuts():
    bb = create_backbone("test_resnet", in_chans=1, small_input=False)
    stages = [f"net.{s.name}" for s in bb.stages()]
    groups = channel_groups(bb, stages)
    assert ("net.layer1.0.conv1", "net.layer1.0.bn1", "net.layer1.0.conv2") in [
        (g.producer, g.norm, g.consumer) for g in groups
    ]
    masks = WeightMasks(bb, stages)
    assert not any("downsample" in p for p in masks.layers)
    assert "net.conv1.0" not in masks.layers  # stem stays dense


def test_sparcl_keeps_sparsity_masks_gradients_and_removes_data():
    s = new("sparcl", sparsity=0.75, grad_sparsity=0.8, grad_mask_every=2, removal_epochs=(1,),
            freeze_from=5)  # fmt: skip
    cfg = CFG.model_copy(update={"epochs": 3})
    before = {p: s.masks.kept(p).clone() for p in s.masks.layers}
    st = fit(s, STREAM[0], ReplayMemory(0), cfg)
    assert st.images == 64 + 2 * (64 - round(0.3 * 64))  # DDR removed 30% after epoch 0
    assert_masked(s)
    for p, d in s.masks.layer_density().items():
        n = s.masks.kept(p).numel()
        assert d == pytest.approx(round(0.25 * n) / n, abs=1 / n), p
    assert any(not torch.equal(s.masks.kept(p), before[p]) for p in before)  # TDM moved the mask
    for p, gm in s.masks.grad_masks.items():  # DGM's stored pattern keeps <= 20% of gradients
        assert gm.float().mean() <= 0.2 + 1e-6, p


def test_training_flops_counter_scales_with_density():
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 5, bias=False))
    c = TrainingFlops(model, (10,))
    assert c.layers_ == {"1": 100}
    assert c.per_example(backward=False) == 100
    assert c.per_example() == 300
    assert c.per_example(weight_density={"1": 0.5}) == 150
    assert c.per_example(weight_density={"1": 0.5}, grad_density={"1": 0.1}) == 50 + 50 + 10
    assert c.add(4, backward=False) == 400 and c.total_ == 400


def test_invalid_options_are_clear_errors():
    with pytest.raises(ConfigError, match="sam_rho"):
        new("esacl", ids=True, sam_rho=0.0)
    with pytest.raises(ConfigError, match="init_sparsity"):
        new("esacl", sparsity=0.3, init_sparsity=0.5)
    with pytest.raises(ConfigError, match="removal epochs"):
        new("esacl", removal_epochs=(0,))
    with pytest.raises(ConfigError, match="grad_sparsity"):
        new("sparcl", grad_sparsity=1.0)
    assert math.isclose(new("magnitude-pruning").masks.density(), 0.5, abs_tol=1e-3)
    assert not np.isnan(new("magnitude-pruning", sparsity=0.9).sparsity_at(10))
