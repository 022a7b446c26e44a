"""SGM and vanilla rehearsal: each component does what it claims, on constructed inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medcl.config import TrainConfig
from medcl.data.experience import Experience
from medcl.data.samples import SampleSet, make_meta
from medcl.engine.memory import ReplayMemory
from medcl.engine.trainer import experience_info, fit_experience
from medcl.errors import ConfigError
from medcl.models.backbones import create_backbone
from medcl.strategies import create_strategy
from medcl.strategies.sgm import SGM, class_mean_init, dynamic_soft_targets, merge_lora

CFG = TrainConfig(
    epochs=1,
    batch_size=8,
    max_updates=3,
    lr=0.05,
    weight_decay=0.01,
    augment="none",
    scheduler="none",
)


def toy_experience(index: int, classes: list[int], n: int = 8, seed: int = 0) -> Experience:
    """``n`` 8x8 images per class: a bright quadrant chosen by the class, plus noise."""
    g = torch.Generator().manual_seed(seed + 100 * index)
    x = torch.randint(0, 60, (n * len(classes), 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.tensor(classes).repeat_interleave(n)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c % 4, 2)
        x[i, 0, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 180
    s = SampleSet(x, y, make_meta(len(y), dataset="toy", split="train"))
    return Experience(index, f"e{index}", index, tuple(classes), "", s, s, s)


def make(name: str = "sgm", **params) -> SGM:
    torch.manual_seed(0)
    bb = create_backbone("test_resnet", in_chans=1, small_input=True)
    return create_strategy(name, bb, **params)


def learn(strategy: SGM, exps: list[Experience], memory: ReplayMemory, upto: int) -> None:
    for e in exps[: upto + 1]:
        seen = len({c for x in exps[: e.index + 1] for c in x.classes})
        fit_experience(
            strategy,
            e,
            past=exps[: e.index],
            num_seen_classes=seen,
            memory=memory,
            cfg=CFG,
            seed=e.index,
            quiet=True,
        )


@pytest.fixture(scope="module")
def stream() -> list[Experience]:
    return [toy_experience(0, [0, 1]), toy_experience(1, [2, 3])]


@pytest.fixture(scope="module")
def trained(stream) -> tuple[SGM, ReplayMemory]:
    """SGM (last stage plastic) after experience 0; tests work on deep copies."""
    s, memory = make(trainable_stages=1), ReplayMemory(8)
    learn(s, stream, memory, upto=0)
    return s, memory


@pytest.fixture
def sgm0(trained) -> tuple[SGM, ReplayMemory]:
    return copy.deepcopy(trained)


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
    assert torch.allclose(centred.sum(1), torch.zeros(1), atol=1e-6)


def test_data_driven_init_sets_new_rows_to_class_means(stream, sgm0):
    s, memory = sgm0
    exp = stream[1]
    s.grow(experience_info(exp, 4))
    old = s.head.weight[:2].detach().clone()
    s.before_experience(exp, memory)
    s.eval()
    with torch.no_grad():
        feats = s.features((exp.train.images.float() / 255 - 0.5) / 0.5)
    assert torch.allclose(
        s.head.weight[2:], class_mean_init(feats, exp.train.labels, [2, 3]), atol=1e-5
    )
    assert torch.equal(s.head.weight[:2], old)


def test_old_rows_unchanged_and_get_no_gradient(stream, sgm0):
    s, memory = sgm0
    w_old, b_old = s.head.weight[:2].detach().clone(), s.head.bias[:2].detach().clone()
    s.grow(experience_info(stream[1], 4))
    s.before_experience(stream[1], memory)
    s.train()
    x = (stream[1].train.images[:4].float() / 255 - 0.5) / 0.5
    s(x).sum().backward()
    assert torch.all(s.head.weight.grad[:2] == 0) and torch.all(s.head.bias.grad[:2] == 0)
    assert s.head.weight.grad[2:].abs().sum() > 0
    s.after_experience(stream[1], memory)  # drop hooks; now train through the trainer loop
    s.seen.pop()
    w_new = s.head.weight[2:].detach().clone()
    fit_experience(
        s,
        stream[1],
        past=stream[:1],
        num_seen_classes=4,
        memory=memory,
        cfg=CFG,
        seed=1,
        quiet=True,
    )  # weight_decay > 0 would move unprotected rows
    assert torch.equal(s.head.weight[:2], w_old) and torch.equal(s.head.bias[:2], b_old)
    assert not torch.equal(s.head.weight[2:], w_new)


def test_lora_trains_only_adapters_and_merge_keeps_outputs(stream, sgm0):
    s, memory = sgm0
    frozen = {k: v.clone() for k, v in s.backbone.state_dict().items() if "lora_" not in k}
    s.grow(experience_info(stream[1], 4))
    s.before_experience(stream[1], memory)
    names = {n for n, p in s.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith("head.") for n in names)
    assert all(".layer4." in n for n in names if "lora_" in n)
    s.seen.pop()
    fit_experience(
        s,
        stream[1],
        past=stream[:1],
        num_seen_classes=4,
        memory=memory,
        cfg=CFG,
        seed=1,
        quiet=True,
    )  # merges after the experience
    after = s.backbone.state_dict()
    changed = [k for k, v in frozen.items() if not torch.equal(v, after[k])]
    # only the LoRA-adapted base weights moved (by the merge); BatchNorm statistics stayed fixed
    assert changed and all(".layer4." in k and k.endswith("base_layer.weight") for k in changed)
    # merge leaves outputs unchanged: perturb the adapters, then merge and compare
    for n, p in s.backbone.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    x = (stream[1].train.images.float() / 255 - 0.5) / 0.5
    before = s.predict(x)
    deploy = s.deployable_model()
    assert merge_lora(s.backbone) > 0
    assert torch.allclose(s.predict(x), before, atol=1e-4)
    assert torch.allclose(deploy.eval()(x), before, atol=1e-4)
    assert not any("lora" in k for k in deploy.state_dict())  # plain timm modules for export


def test_checkpoint_round_trip(stream, sgm0):
    s, memory = sgm0
    fit_experience(
        s,
        stream[1],
        past=stream[:1],
        num_seen_classes=4,
        memory=memory,
        cfg=CFG,
        seed=1,
        quiet=True,
    )
    fresh = make(trainable_stages=1)
    fresh.rebuild(s.seen)
    fresh.load_state_dict(s.state_dict())  # strict: same keys and shapes
    fresh.eval(), s.eval()
    x = (stream[1].train.images.float() / 255 - 0.5) / 0.5
    assert torch.equal(fresh.predict(x), s.predict(x))


def test_rehearsal_fine_tunes_same_blocks_with_hard_targets(stream):
    s = make("rehearsal", trainable_stages=1)
    memory = ReplayMemory(8)
    s.grow(experience_info(stream[0], 2))  # structure of a run after experience 0
    s.grow(experience_info(stream[1], 4))
    s.before_experience(stream[1], memory)
    trainable = {n for n, p in s.backbone.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in s.backbone.net.layer4.named_parameters(prefix="net.layer4")}
    s.train()
    assert s.backbone.net.layer4.training and not s.backbone.net.layer3[0].bn1.training
    logits = torch.randn(3, 4)
    batch = type("B", (), {"y": torch.tensor([0, 2, 3])})()
    assert torch.allclose(s.loss(logits, batch), nn.functional.cross_entropy(logits, batch.y))


def test_validation_errors():
    with pytest.raises(ConfigError, match=r"trainable_stages must be in 0\.\.4"):
        make(trainable_stages=5)
    with pytest.raises(ConfigError, match="lora needs trainable_stages >= 1"):
        make(trainable_stages=0)
    with pytest.raises(ConfigError, match="lora"):
        make("rehearsal", lora=True)  # the baseline has no SGM switches
