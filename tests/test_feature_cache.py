"""FeatureCache: forward passes are reused while the weights that made them are unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medcl.config import TrainConfig
from medcl.data.experience import Experience
from medcl.data.memory import ReplayMemory
from medcl.data.samples import SampleSet, make_meta
from medcl.engine.evaluate import CurveMonitor, evaluate, stratified_rows
from medcl.engine.trainer import fit_experience
from medcl.models.backbones import create_backbone
from medcl.models.feature_cache import FeatureCache
from medcl.strategies import create_strategy


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Counter:
    """Rows through ``module`` in passes without gradients (the cache's passes, not training)."""

    def __init__(self, module: nn.Module) -> None:
        self.rows = 0
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, out) -> None:
        if not torch.is_grad_enabled():
            self.rows += len(args[0])


def _toy():
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    root = nn.ModuleDict({"body": body, "head": nn.Linear(4, 2)})
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    return root, body, images


def test_reused_while_unchanged_and_recomputed_after_each_kind_of_change() -> None:
    root, body, images = _toy()
    count = Counter(body)
    cache = FeatureCache(batch_size=4)

    def feats(rows=None):
        return cache.outputs("features", root, body, images, rows)

    first = feats(torch.arange(5))
    assert count.rows == 5
    full = feats()  # only the 5 rows not computed yet
    assert count.rows == 10 and torch.equal(full[:5], first)
    assert torch.equal(feats(torch.tensor([7, 2, 7])), full[[7, 2, 7]]) and count.rows == 10
    with torch.no_grad():  # the head is not on the features' path: they stay valid
        root["head"].weight.add_(1.0)
    feats()
    assert count.rows == 10

    changes = {
        "optimizer step": lambda: _sgd_step(body),
        "load_state_dict": lambda: body.load_state_dict(_toy()[1].state_dict()),
        "BatchNorm statistics": lambda: body.train()(torch.randn(4, 1, 8, 8)),
        "a replaced parameter": lambda: setattr(
            root["head"], "weight", nn.Parameter(torch.zeros(2, 4))
        ),
    }
    for what, change in changes.items():
        before = count.rows
        change()
        body.train()  # the cache computes in eval mode and restores the modes
        again = feats()
        assert count.rows == before + len(images), what
        assert body.training and all(m.training for m in body.modules()), what
    assert torch.equal(again, body.eval()(_scaled(images)))
    # the same pixels in another tensor are another sample set
    before = count.rows
    cache.outputs("features", root, body, images.clone())
    assert count.rows == before + len(images)


def _sgd_step(module: nn.Module) -> None:
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()


def _scaled(images: torch.Tensor) -> torch.Tensor:
    from medcl.data.transforms import to_model_input

    with torch.no_grad():
        return to_model_input(images)


def test_disabled_cache_computes_every_time(monkeypatch) -> None:
    root, body, images = _toy()
    count = Counter(body)
    monkeypatch.setattr(FeatureCache, "enabled", False)
    cache = FeatureCache()
    a = cache.outputs("features", root, body, images)
    b = cache.outputs("features", root, body, images)
    assert count.rows == 2 * len(images) and torch.equal(a, b) and len(cache) == 0


# -- the consumers: herding, DynaMMo's stage 2, evaluation ---------------------------------------


def _split(classes, n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat(n)
    x = torch.rand(len(y), 1, 16, 16, generator=g) * 0.3 + 0.1
    for i, c in enumerate(y.tolist()):
        x[i, :, 2 * c : 2 * c + 2] += 0.6
    images = (x.clamp(0, 1) * 255).to(torch.uint8)
    return SampleSet(images, y, make_meta(len(y), dataset="toy", split="s"))


def _exp(index, classes):
    tr, te = _split(classes, 12, index), _split(classes, 6, 100 + index)
    return Experience(index, f"e{index}", index, tuple(classes), "", tr, te, te)


EXPS = [_exp(0, [0, 1]), _exp(1, [2, 3])]


def _dynammo_stream():
    """DynaMMo over two experiences with a herding memory; rows computed after experience 1's
    updates (stage 2 + memory update) counted on the backbone."""
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", in_chans=1, small_input=True)
    strategy = create_strategy("dynammo", backbone, retune_epochs=2)
    memory = ReplayMemory(8, selection="herding", seed=0)
    cfg = TrainConfig(epochs=1, batch_size=8, max_updates=2, augment="none", lr=0.01)
    count = Counter(strategy.backbone)
    for e in EXPS:
        count.rows = 0
        fit_experience(
            strategy, e, past=EXPS[: e.index], num_seen_classes=2 * (e.index + 1),
            memory=memory, cfg=cfg, quiet=True, seed=e.index,
        )  # fmt: skip
    return strategy, memory, count.rows


def test_stage2_and_herding_share_features_and_results_do_not_change(monkeypatch) -> None:
    strategy, memory, rows = _dynammo_stream()
    monkeypatch.setattr(FeatureCache, "enabled", False)
    strategy_off, memory_off, rows_off = _dynammo_stream()
    # experience 1: stage 2 herds its 24 training rows (quota 4 per class < 12) and needs the
    # 8 memory rows; the memory update herds the same 24 rows again -- from the cache
    assert rows == 24 + 8
    # without the cache: the 8 herded rows again for the stage-2 features, and the memory
    # update's features (all rows in one pass, then per class) twice more
    assert rows_off == 24 + (8 + 8) + 24 + 24
    assert torch.equal(memory.index_, memory_off.index_)
    assert torch.equal(memory.exp_, memory_off.exp_)
    for a, b in zip(
        strategy.state_dict().values(), strategy_off.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    x = torch.cat([e.test.images for e in EXPS])
    with torch.no_grad():
        assert torch.equal(strategy.predict(_scaled(x)), strategy_off.predict(_scaled(x)))


def test_evaluation_scores_each_row_once_per_model_state() -> None:
    strategy, _, _ = _dynammo_stream()
    count = Counter(strategy.backbone)
    first = evaluate(strategy, EXPS)
    assert count.rows == sum(len(e.test) for e in EXPS)
    again = evaluate(strategy, EXPS)  # e.g. the predictions written after the evaluation
    assert count.rows == sum(len(e.test) for e in EXPS)
    assert all(torch.equal(a.probs, b.probs) for a, b in zip(first, again, strict=True))
    # the curves' subsets are rows of the same test sets: already scored
    monitor = CurveMonitor(EXPS, every=1, subset=5, seed=0)
    monitor.record(strategy, 1, 0, 0)
    assert count.rows == sum(len(e.test) for e in EXPS)
    row = monitor.rows[-1]
    correct = [
        (a.probs[r].argmax(1) == a.labels[r]).float()
        for a, r in zip(first, monitor.subset_rows, strict=True)
    ]
    assert row["old_acc"] == pytest.approx(float(correct[0].mean()))
    assert row["all_acc"] == pytest.approx(float(torch.cat(correct).mean()))


def test_curve_point_scores_old_and_new_once() -> None:
    strategy, _, _ = _dynammo_stream()
    count = Counter(strategy.backbone)
    monitor = CurveMonitor(EXPS, every=1, subset=5, seed=0)
    monitor.record(strategy, 1, 0, 0)
    assert count.rows == 5 + 5  # "all" is old + new, not a third pass
    assert monitor.subset_sizes == [5, 5]


def test_stratified_rows_keep_class_shares_and_are_seeded() -> None:
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    rows = stratified_rows(labels, 20, seed=3)
    assert len(rows) == 20 and torch.equal(rows, rows.sort().values)
    assert torch.bincount(labels[rows]).tolist() == [12, 6, 2]
    assert torch.equal(rows, stratified_rows(labels, 20, seed=3))
    assert not torch.equal(rows, stratified_rows(labels, 20, seed=4))
    assert torch.equal(stratified_rows(labels, None, seed=0), torch.arange(100))
    assert torch.equal(stratified_rows(labels, 500, seed=0), torch.arange(100))


class Batches:
    """Forward passes (batches) through ``module`` without gradients."""

    def __init__(self, module: nn.Module) -> None:
        self.sizes: list[int] = []
        module.register_forward_hook(lambda m, a, o: self.sizes.append(len(a[0])))


def test_outputs_many_shares_batches_and_equals_one_set_at_a_time() -> None:
    root, body, images = _toy()
    sets = [images[:3].clone(), images[3:6].clone(), images[6:].clone()]  # 3 + 3 + 4 rows
    alone = [FeatureCache(batch_size=4).outputs("f", root, body, x) for x in sets]
    cache, batches = FeatureCache(batch_size=4), Batches(body)
    many = cache.outputs_many("f", root, body, [(x, None) for x in sets])
    assert batches.sizes == [4, 4, 2]  # 10 rows in shared batches, not 3 + 3 + 4
    for a, b in zip(alone, many, strict=True):
        torch.testing.assert_close(a, b)
    rows = torch.tensor([2, 0])  # cached rows are served per set, in the order asked
    again = cache.outputs_many("f", root, body, [(sets[0], rows), (sets[2], None)])
    assert batches.sizes == [4, 4, 2] and torch.equal(again[0], many[0][rows])


def test_outputs_many_batches_shapes_apart_and_answers_empty_sets() -> None:
    root, body, images = _toy()
    big = torch.randint(0, 256, (3, 1, 12, 12), dtype=torch.uint8)  # another image size
    empty = images[:0]
    batches = Batches(body)
    out = FeatureCache(batch_size=8).outputs_many(
        "f", root, body, [(images, None), (big, None), (empty, None)]
    )
    assert batches.sizes[:3] == [8, 2, 3] and [len(x) for x in out] == [10, 3, 0]
    assert out[2].shape == (0, 4)


def test_outputs_many_keeps_sets_apart_under_batch_statistics_and_computes_a_set_once() -> None:
    root, body, images = _toy()
    body[1].track_running_stats = False  # MC-SGD's BatchNorm: each batch's own statistics
    body[1].running_mean = body[1].running_var = body[1].num_batches_tracked = None
    sets = [images[:3].clone(), images[3:].clone()]
    alone = [FeatureCache(batch_size=8).outputs("f", root, body, x) for x in sets]
    batches = Batches(body)
    many = FeatureCache(batch_size=8).outputs_many("f", root, body, [(x, None) for x in sets])
    assert batches.sizes == [3, 7]  # not one batch of 8 + 2 mixing the two sets
    for a, b in zip(alone, many, strict=True):
        torch.testing.assert_close(a, b)
    root2, body2, images2 = _toy()
    batches2, cache = Batches(body2), FeatureCache(batch_size=8)
    twice = cache.outputs_many("f", root2, body2, [(images2, None), (images2, torch.tensor([1]))])
    assert batches2.sizes == [8, 2] and cache.computed == 10  # the tensor given twice: once
    assert torch.equal(twice[1], twice[0][[1]])
