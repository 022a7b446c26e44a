"""SGM and vanilla rehearsal: each component does what it claims, on constructed inputs.

A tiny timm EfficientNet (``test_efficientnet``, 16 px) stands in for EfficientNet-Lite0: same
block types (``conv_pw``/``conv_dw``/``conv_pwl``), BatchNorm, ``conv_head``/``bn2``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from medcl.config import TrainConfig
from medcl.data.experience import Experience
from medcl.data.memory import ReplayMemory
from medcl.data.samples import SampleSet, make_meta
from medcl.engine.trainer import experience_info, fit_experience
from medcl.errors import ConfigError
from medcl.models.backbones import create_backbone
from medcl.models.plasticity import split_units
from medcl.strategies import create_strategy
from medcl.strategies.sgm import SGM, class_mean_init, dynamic_soft_targets, merge_lora

CFG = TrainConfig(epochs=1, batch_size=8, max_updates=3, lr=0.01, weight_decay=0.05, augment="none")
BACK = ("net.blocks.3.0", "net.blocks.4.0", "net.conv_head", "net.bn2")  # trainable_stages=2


def toy_experience(index: int, classes: list[int], n: int = 8, seed: int = 0) -> Experience:
    """``n`` 16x16 images per class: a bright quadrant chosen by the class, plus noise."""
    g = torch.Generator().manual_seed(seed + 100 * index)
    x = torch.randint(0, 60, (n * len(classes), 1, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.tensor(classes).repeat_interleave(n)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c % 4, 2)
        x[i, 0, 8 * r : 8 * r + 8, 8 * col : 8 * col + 8] += 180
    s = SampleSet(x, y, make_meta(len(y), dataset="toy", split="train"))
    return Experience(index, f"e{index}", index, tuple(classes), "", s, s, s)


def make(name: str = "sgm", **params) -> SGM:
    torch.manual_seed(0)
    bb = create_backbone("test_efficientnet", in_chans=1, small_input=False)
    return create_strategy(name, bb, **params)


def fit(strategy: SGM, exps: list[Experience], memory: ReplayMemory, index: int) -> None:
    seen = len({c for x in exps[: index + 1] for c in x.classes})
    fit_experience(
        strategy,
        exps[index],
        past=exps[:index],
        num_seen_classes=seen,
        memory=memory,
        cfg=CFG,
        seed=index,
        quiet=True,
    )


def inputs(exp: Experience) -> torch.Tensor:
    return (exp.train.images.float() / 255 - 0.5) / 0.5


def bn_modes(s: SGM) -> dict[str, bool]:
    return {
        n: m.training
        for n, m in s.backbone.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
    }


@pytest.fixture(scope="module")
def stream() -> list[Experience]:
    return [toy_experience(0, [0, 1]), toy_experience(1, [2, 3])]


@pytest.fixture(scope="module")
def trained(stream) -> tuple[SGM, ReplayMemory]:
    """SGM after a full-network experience 0; tests work on deep copies."""
    s, memory = make(), ReplayMemory(8)
    fit(s, stream, memory, 0)
    return s, memory


@pytest.fixture
def sgm0(trained) -> tuple[SGM, ReplayMemory]:
    return copy.deepcopy(trained)


def start(s: SGM, exp: Experience, memory: ReplayMemory, num_seen: int = 4) -> None:
    s.grow(experience_info(exp, num_seen))
    s.before_experience(exp, memory)


def test_soft_targets_sum_to_one_true_class_highest():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(6, 5) * 3, 1)
    means = torch.softmax(torch.randn(5, 5), 1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    t = dynamic_soft_targets(probs, labels, means, n_old=3)
    assert torch.allclose(t.sum(1), torch.ones(6))
    assert torch.equal(t.argmax(1), labels)
    # hand-computed rule for one old-class sample (label 1) and one new-class sample (label 4)
    for i, base in ((1, means[1]), (4, probs[4])):
        expected = base.clone()
        expected[probs[i].argmax()] = 1 / 5
        expected[labels[i]] = 1.0
        assert torch.allclose(t[i], expected / expected.sum())


def test_class_mean_init_equals_normalised_class_means():
    f = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0], [5.0, 5.0]])
    y = torch.tensor([7, 7, 8, 1])
    rows = class_mean_init(f, y, [7, 8, 9], center=False)  # the paper's literal rule
    assert torch.allclose(rows[0], torch.tensor([(0.6 + 0.0) / 2, (0.8 + 1.0) / 2]))
    assert torch.allclose(rows[1], torch.tensor([1.0, 0.0]))
    assert torch.equal(rows[2], torch.zeros(2))  # no samples: zero row
    # centred: [3, 4] -> [-0.5, 0.5], [0, 2] -> [-1, 1]: both normalise to [-1, 1] / sqrt(2)
    centred = class_mean_init(f, y, [7])
    assert torch.allclose(centred[0], torch.tensor([-1.0, 1.0]) / 2**0.5)


def test_split_puts_late_blocks_and_trailing_layers_in_the_back():
    s = make("rehearsal")
    front, back = split_units(s.backbone, 2)
    assert tuple(u.name for u in back) == BACK
    assert [u.name for u in front][:2] == ["net.conv_stem", "net.bn1"]
    assert [u.name for u in front][-1] == "net.blocks.2.0"
    with pytest.raises(ConfigError, match=r"trainable_stages must be in 0\.\.4"):
        split_units(s.backbone, 5)


@pytest.mark.parametrize("name", ["sgm", "rehearsal"])
def test_experience_changes_only_the_back_and_head(stream, trained, name):
    """Front weights and every BatchNorm statistic stay fixed (bn: frozen), in both arms."""
    s, memory = copy.deepcopy(trained)
    if name == "rehearsal":  # same base model, vanilla arm
        r = make("rehearsal")
        r.rebuild(s.seen)
        r.load_state_dict(
            {k.replace(".base_layer", ""): v for k, v in s.state_dict().items() if "lora_" not in k}
        )
        s = r
    before = {k: v.clone() for k, v in s.backbone.state_dict().items()}
    fit(s, stream, memory, 1)
    after = s.backbone.state_dict()
    # (LoRA A matrices are re-drawn by the merge: adapters, not weights of the network)
    changed = {k for k, v in before.items() if "lora_" not in k and not torch.equal(v, after[k])}
    assert changed, "nothing trained"
    assert all(k.startswith(BACK) for k in changed), sorted(changed)
    assert not any("running_" in k or "num_batches" in k for k in changed)
    if name == "sgm":  # only LoRA-adapted pointwise weights move (by the merge)
        assert all(k.endswith("base_layer.weight") for k in changed)
    else:  # full fine-tuning of the back, BatchNorm affine parameters included
        assert any(k.endswith("bn2.weight") for k in changed)


def test_bn_policy_is_the_same_in_both_arms(stream, trained):
    s, memory = copy.deepcopy(trained)
    modes = {}
    for bn in ("frozen", "train"):
        arms = [make(bn=bn), make("rehearsal", bn=bn)]
        for a in arms:
            a.rebuild(s.seen)
            start(a, stream[1], memory)
            a.train()
        modes[bn] = [bn_modes(a) for a in arms]
        assert modes[bn][0] == modes[bn][1]
    assert not any(modes["frozen"][0].values())  # every BatchNorm in eval mode
    trains = {n for n, t in modes["train"][0].items() if t}
    assert trains and all(n.startswith(BACK) for n in trains)
    # experience 0 of a pretrained base trains the head only: all statistics frozen
    h = make(base="head")
    h.grow(experience_info(stream[0], 2))
    h.before_experience(stream[0], memory)
    h.train()
    assert not any(bn_modes(h).values())
    assert {n for n, p in h.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_lora_sits_on_the_back_pointwise_convs_with_rank_and_scale():
    from peft.tuners.lora import LoraLayer

    s = make(lora_rank=48, lora_alpha=1.0)
    layers = {n: m for n, m in s.backbone.named_modules() if isinstance(m, LoraLayer)}
    expected = {f"net.blocks.{b}.0.{c}" for b in (3, 4) for c in ("conv_pw", "conv_pwl")}
    assert set(layers) == expected  # not conv_dw, not SE convs, not conv_head, not the front
    for layer in layers.values():
        base = layer.get_base_layer()
        assert base.kernel_size == (1, 1)
        r = min(48, base.in_channels, base.out_channels)  # capped at the narrowest width
        assert layer.r["default"] == r and layer.scaling["default"] == pytest.approx(1.0 / r)
    assert layers["net.blocks.3.0.conv_pw"].r["default"] == 32  # 32 -> 128: capped
    assert layers["net.blocks.4.0.conv_pwl"].r["default"] == 48  # 192 -> 64


def test_optimizer_groups_decay_per_unit_and_warm_up(stream, sgm0):
    s, memory = sgm0
    start(s, stream[1], memory)
    params = list(s.trainable_parameters())
    uniform, _ = s.configure_optimizers(CFG, params, 10)  # default layer_decay 1: one rate
    assert {g["max_lr"] for g in uniform.param_groups} == {CFG.lr}
    s.layer_decay = 0.9  # the tuned ablation
    opt, sched = s.configure_optimizers(CFG, params, 10)
    assert isinstance(opt, torch.optim.AdamW)
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)
    # the head is depth 0; the back's units are 10 .. 13 from the end of 14 parametrised units
    groups = {g["depth"]: g for g in opt.param_groups}
    assert sorted(groups) == [0, 3, 4]  # head, blocks.4.0, blocks.3.0 (LoRA only)
    for d, g in groups.items():
        assert g["max_lr"] == pytest.approx(CFG.lr * 0.9**d)
        assert g["lr"] == pytest.approx(CFG.lr * 0.9**d / 25)  # OneCycle starts at max / 25
        assert g["weight_decay"] == CFG.weight_decay
    assert {id(p) for p in groups[0]["params"]} == {id(s.head.weight), id(s.head.bias)}
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    peak = lrs.index(max(lrs))
    assert 0 < peak < 5 and max(lrs) == pytest.approx(CFG.lr, rel=0.05)  # warm-up, then down
    # vanilla gets the same rule over its (non-LoRA) back parameters
    r = make("rehearsal", layer_decay=0.9)
    r.rebuild(s.seen[:1])
    start(r, stream[1], memory)
    ropt, _ = r.configure_optimizers(CFG, list(r.trainable_parameters()), 10)
    assert sorted(g["depth"] for g in ropt.param_groups) == [0, 1, 2, 3, 4]
    assert r.configure_optimizers(CFG, params, 10) is not None
    assert make(optimizer="run").configure_optimizers(CFG, params, 10) is None


def test_init_scales_new_rows_to_old_norm_and_keeps_old_rows(stream, sgm0):
    s, memory = sgm0
    literal, loose = copy.deepcopy(s), copy.deepcopy(s)
    literal.init_scale, loose.init_quantile = "none", 0.5
    exp = stream[1]
    old_w, old_b = s.head.weight[:2].detach().clone(), s.head.bias[:2].detach().clone()
    start(s, exp, memory)
    start(literal, exp, memory)
    new = s.head.weight[2:].detach()
    assert torch.allclose(new.norm(dim=1), old_w.norm(dim=1).mean().expand(2), rtol=1e-5)
    assert torch.equal(s.head.weight[:2], old_w) and torch.equal(s.head.bias[:2], old_b)
    # biases calibrated on the memory: each new unit outranks the old classes' top logit on at
    # most init_quantile of the old exemplars (new units cannot take over old inputs wholesale)
    s.eval()
    with torch.no_grad():
        images = memory.gather(torch.arange(len(memory)))[0]
        logits = s.head(s.features((images.float() / 255 - 0.5) / 0.5))  # (M, 4)
        feats = s.features(inputs(exp))
    wins = (logits[:, 2:] > logits[:, :2].max(1, keepdim=True).values + 1e-5).float().mean(0)
    m = len(memory)  # quantiles interpolate: at most ceil(q (m - 1)) of m exemplars lie below
    assert m == 8 and bool((wins <= math.ceil(s.init_quantile * (m - 1)) / m).all())
    # ... and a looser quantile lets each new unit win on more of them
    start(loose, exp, memory)
    with torch.no_grad():
        lg = loose.eval().head(loose.features((images.float() / 255 - 0.5) / 0.5))
    assert (lg[:, 2:] > lg[:, :2].max(1, keepdim=True).values - 1e-5).float().mean(0).min() >= 0.5
    # same direction as the authors' literal rule (class means of normalised features)
    rows = class_mean_init(feats, exp.train.labels, [2, 3])
    assert torch.allclose(literal.head.weight[2:], rows, atol=1e-5)
    assert torch.allclose(nn.functional.normalize(new, dim=1), rows / rows.norm(dim=1)[:, None])
    # the scale rule is recorded per experience
    diag = s.diagnostics()["init"][-1]
    assert diag["experience"] == 1 and diag["new_classes"] == [2, 3]
    assert diag["new_row_norm"] == pytest.approx([diag["old_row_norm"]] * 2, rel=1e-5)


def test_ablation_switches_change_what_they_say(stream, trained):
    base_s, memory = trained
    exp = stream[1]

    def prepared(**params) -> SGM:
        s = make(**params)
        s.rebuild(base_s.seen)
        s.load_state_dict(base_s.state_dict(), strict=False)
        start(s, exp, memory)
        s.train()
        return s

    full = prepared()
    # init off: new rows keep nn.Linear's default initialisation
    no_init = make(data_driven_init=False)
    no_init.rebuild(base_s.seen)
    no_init.load_state_dict(base_s.state_dict(), strict=False)
    no_init.grow(experience_info(exp, 4))
    grown = no_init.head.weight[2:].detach().clone()
    no_init.before_experience(exp, memory)
    assert torch.equal(no_init.head.weight[2:], grown)
    assert not torch.allclose(full.head.weight[2:], grown)
    # soft targets off: plain cross-entropy during adaptation
    logits, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 3])
    batch = type("B", (), {"y": y})()
    ce = nn.functional.cross_entropy(logits, y)
    assert torch.allclose(prepared(soft_targets=False).loss(logits, batch), ce)
    assert not torch.allclose(full.loss(logits, batch), ce)
    # LoRA off: the back's own weights train, and there are no adapters
    trains = {n for n, p in prepared(lora=False).named_parameters() if p.requires_grad}
    assert "backbone.net.blocks.4.0.conv_dw.weight" in trains
    assert not any("lora_" in n for n in trains)
    assert all(
        "lora_" in n or n.startswith("head.") for n, p in full.named_parameters() if p.requires_grad
    )
    # freezing off: old rows get gradient
    for s, frozen in ((full, True), (prepared(freeze_old_units=False), False)):
        s.zero_grad()
        s(inputs(exp)[:4]).sum().backward()
        assert bool((s.head.weight.grad[:2] == 0).all()) is frozen
    # BN policy: the back's BatchNorms train only with bn: train
    assert not any(bn_modes(full).values()) and any(bn_modes(prepared(bn="train")).values())


def test_frozen_rows_survive_weight_decay(stream, sgm0):
    s, memory = sgm0
    w_old, b_old = s.head.weight[:2].detach().clone(), s.head.bias[:2].detach().clone()
    fit(s, stream, memory, 1)  # AdamW weight_decay 0.05 would move unprotected rows
    assert torch.equal(s.head.weight[:2], w_old) and torch.equal(s.head.bias[:2], b_old)


def test_merge_keeps_outputs_and_checkpoint_round_trip(stream, sgm0):
    s, memory = sgm0
    fit(s, stream, memory, 1)
    for n, p in s.backbone.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    x = inputs(stream[1])
    s.eval()
    before = s.predict(x)
    deploy = s.deployable_model()
    assert torch.allclose(deploy.eval()(x), before, atol=1e-4)
    assert not any("lora" in k for k in deploy.state_dict())  # plain timm modules for export
    fresh = make()
    fresh.rebuild(s.seen)
    fresh.load_state_dict(s.state_dict())  # strict: same keys and shapes
    assert torch.equal(fresh.eval().predict(x), before)
    assert merge_lora(s.backbone) == 4
    assert torch.allclose(s.predict(x), before, atol=1e-4)


def test_validation_errors():
    with pytest.raises(ConfigError, match="lora needs lora_rank >= 1 and layers to adapt"):
        make(trainable_stages=0)
    with pytest.raises(ConfigError, match="layer_decay must be in"):
        make(layer_decay=1.5)
    with pytest.raises(ConfigError, match="lora"):
        make("rehearsal", lora=True)  # the baseline has no SGM switches


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sgm_and_rehearsal_train_on_cuda(stream):
    """Every tensor SGM creates (masks, soft-target statistics, init rows) follows the model."""
    for name in ("sgm", "rehearsal"):
        s, memory = make(name).cuda(), ReplayMemory(8)
        fit(s, stream, memory, 0)
        w_old = s.head.weight[:2].detach().clone()
        fit(s, stream, memory, 1)
        assert s.head.weight.device.type == "cuda"
        assert torch.equal(s.head.weight[:2], w_old) is (name == "sgm")
        out = s.eval().predict(inputs(stream[1]).cuda())
        assert out.shape == (16, 4) and torch.isfinite(out).all()


def test_lora_targets_all_skips_grouped_convs_and_trains_conv_head(stream, trained):
    """``all`` must not hand depthwise convs to peft (it raises) and must train conv_head's LoRA."""
    base_s, memory = trained
    s = make(lora_targets="all")
    assert "net.conv_head" in s.lora_targets_
    assert all(s.backbone.get_submodule(t).get_base_layer().groups == 1 for t in s.lora_targets_)
    s.rebuild(base_s.seen)
    start(s, stream[1], memory)
    trains = {n for n, p in s.named_parameters() if p.requires_grad}
    assert "backbone.net.conv_head.lora_B.default.weight" in trains
    opt, _ = s.configure_optimizers(CFG, list(s.trainable_parameters()), 10)
    head_lora = s.backbone.get_submodule("net.conv_head").lora_B["default"].weight
    depth = next(g["depth"] for g in opt.param_groups if any(p is head_lora for p in g["params"]))
    assert depth == 2  # conv_head: second unit from the end (bn2 is 1), not the head's depth 0


class LoggedLrs:
    """A trainer logger that keeps the first group's (the head's) rate of every update."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def due(self, update: int) -> bool:
        return True

    def log(self, values, step: int) -> None:
        self.lrs.append(values["train/lr"])


def test_trainer_runs_the_strategys_onecycle_schedule(stream, sgm0):
    """fit_experience uses configure_optimizers: the logged head lr warms up, then anneals."""

    s, memory = sgm0
    log = LoggedLrs()
    cfg = TrainConfig(epochs=10, batch_size=8, max_updates=8, lr=0.01, augment="none")
    fit_experience(
        s,
        stream[1],
        past=stream[:1],
        num_seen_classes=4,
        memory=memory,
        cfg=cfg,
        seed=1,
        quiet=True,
        logger=log,
    )
    peak = log.lrs.index(max(log.lrs))
    assert len(log.lrs) == 8 and 0 < peak < 7
    assert max(log.lrs) == pytest.approx(0.01, rel=0.1) and log.lrs[-1] < 0.01 / 10
