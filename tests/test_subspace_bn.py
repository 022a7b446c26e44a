"""The deployed midpoint's BatchNorm statistics are the ones re-estimated at the midpoint.

Subspace-Connectivity and MC-SGD (``bn="recompute"``) train their BatchNorm buffers at random
points; after the consolidation they must reset them and re-estimate them at the deployed point
(Wortsman et al.'s ``update_bn``; docs/methods/subspace.md § 4, § 7). Here the statistics are
measured independently: forward hooks read each BatchNorm's input while the batches the strategy
used run through a train-mode copy of the deployed network, and the per-channel mean and unbiased
variance are averaged over batches with equal weights (``momentum=None``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_baselines import STREAM
from test_subspace import CFG, fit, new_strategy
from torch import Tensor, nn

import medcl.strategies.subspace_base as subspace_base
from medcl.data.memory import ReplayMemory
from medcl.data.transforms import to_model_input
from medcl.models.subspace import fold

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ONE_EPOCH = CFG.model_copy(update={"epochs": 1})


def batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


@torch.no_grad()
def input_statistics(model: nn.Module, batches: list[Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per BatchNorm of ``model``: the batch-averaged per-channel mean and unbiased variance of
    its input, with ``batches`` run through a train-mode copy (batch statistics downstream)."""
    net = copy.deepcopy(model).train()
    stats: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in batchnorms(net)}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].double().transpose(0, 1).flatten(1)  # (channels, samples x positions)
            stats[name].append((x.mean(1), x.var(1, correction=1)))

        return record

    for name, m in batchnorms(net).items():
        m.register_forward_pre_hook(hook(name))
    for x in batches:
        net(x)
    return {n: tuple(torch.stack(v).mean(0).float() for v in zip(*s, strict=True))
            for n, s in stats.items()}  # fmt: skip


def assert_statistics(model: nn.Module, want: dict[str, tuple[Tensor, Tensor]]) -> None:
    bns = batchnorms(model)
    assert bns.keys() == want.keys() and bns
    for name, (mean, var) in want.items():
        torch.testing.assert_close(bns[name].running_mean, mean, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(bns[name].running_var, var, rtol=1e-4, atol=1e-5, msg=name)


def consolidate(name: str, monkeypatch, *, skip: bool = False, **options):
    """Train ``name`` on both experiences; return the strategy, the memory as it was during
    experience 1's consolidation, and the batches given to the last re-estimation (and, with
    ``skip``, not used: the re-estimation is a no-op)."""
    calls: list[list[Tensor]] = []
    original = subspace_base.recompute_batchnorm

    def spy(net: nn.Module, batches) -> None:
        calls.append([x.detach().clone() for x in batches])
        if not skip:
            original(net, calls[-1])

    monkeypatch.setattr(subspace_base, "recompute_batchnorm", spy)
    strategy, memory = new_strategy(name, **options), ReplayMemory(16, seed=0)
    fit(strategy, STREAM[0], memory, ONE_EPOCH)
    buffer = copy.deepcopy(memory)  # the memory is updated after the consolidation
    fit(strategy, STREAM[1], memory, ONE_EPOCH)
    assert len(calls) == 2  # once per experience
    return strategy, buffer, calls[-1]


@pytest.mark.parametrize("name", ["subspace", "mcsgd"])
def test_deployed_midpoint_has_the_statistics_reestimated_at_the_midpoint(name, monkeypatch):
    strategy, buffer, batches = consolidate(name, monkeypatch)
    deployed = strategy.deployable_model()
    want = input_statistics(deployed, batches)
    assert_statistics(deployed, want)
    # predictions use them too (eval mode: running statistics, not the batch's)
    x = batches[0][:8]
    torch.testing.assert_close(strategy.eval().predict(x), deployed.eval()(x))
    # the re-estimation saw the whole buffer and samples of the current experience
    rows = {bytes(r.numpy()) for b in batches for r in b}
    memory_rows = to_model_input(buffer.as_sampleset().images)
    assert len(buffer) and all(bytes(r.numpy()) in rows for r in memory_rows)
    current = to_model_input(STREAM[1].train.images)
    assert any(bytes(r.numpy()) in rows for r in current)
    if name == "subspace":  # the test tells points apart: endpoint 0 has other statistics
        strategy.point.set(torch.eye(strategy.point.n)[0])
        endpoint = fold(strategy.network())
        strategy.point.set_midpoint()
        at_endpoint = input_statistics(endpoint, batches)
        with pytest.raises(AssertionError):
            assert_statistics(deployed, at_endpoint)


@pytest.mark.parametrize("name", ["subspace", "mcsgd"])
def test_skipping_the_reestimation_deploys_other_statistics(name, monkeypatch):
    """The check above fails when the re-estimation is skipped: the deployed buffers are then
    the running averages of training (random points, experience 1 only), not the midpoint's."""
    strategy, _, batches = consolidate(name, monkeypatch, skip=True)
    deployed = strategy.deployable_model()
    with pytest.raises(AssertionError):
        assert_statistics(deployed, input_statistics(deployed, batches))


def composition(batches: list[Tensor], buffer) -> tuple[int, dict[int, int]]:
    """Rows of ``batches`` from the buffer, and per class of experience 1 the rows from its
    training split (the two sets share no class)."""
    rows = [bytes(r.numpy()) for b in batches for r in b]
    memory_rows = {bytes(r.numpy()) for r in to_model_input(buffer.as_sampleset().images)}
    train = STREAM[1].train
    label = {bytes(r.numpy()): int(y) for r, y in zip(to_model_input(train.images), train.labels,
                                                         strict=True)}  # fmt: skip
    current: dict[int, int] = {}
    for r in rows:
        if r in label:
            current[label[r]] = current.get(label[r], 0) + 1
    assert sum(r in memory_rows for r in rows) + sum(current.values()) == len(rows)
    return sum(r in memory_rows for r in rows), current


@pytest.mark.parametrize("name", ["subspace", "mcsgd"])
def test_reestimation_set_is_the_memory_plus_as_many_class_balanced_current_samples(
    name, monkeypatch
):
    """Default ``bn_set="balanced"``: old and new data weigh alike in the midpoint's statistics
    (the memory plus an equal number of current samples, equal per class); the ablation
    ``"experience"`` is the earlier mix, dominated by the current experience."""
    _, buffer, batches = consolidate(name, monkeypatch)
    n_memory, current = composition(batches, buffer)
    assert n_memory == len(buffer) == 16
    assert current == {2: 8, 3: 8}  # 16 current samples, 8 per class (128 available)
    _, buffer, batches = consolidate(name, monkeypatch, bn_set="experience")
    n_memory, current = composition(batches, buffer)
    assert n_memory == 16 and sum(current.values()) == len(STREAM[1].train) == 128
