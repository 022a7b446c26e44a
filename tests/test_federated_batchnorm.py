"""``federation.batchnorm: local``: each site scores and exports the global model with BatchNorm
statistics re-estimated on its own rows (SiloBN), anchored where it holds only its memory; they
never leave the site."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from _federation import LocalLink
from _tiny import tiny_raw
from safetensors.torch import load_file
from torch import nn

from medcl.config import validate_config
from medcl.data.transforms import to_model_input
from medcl.engine.resume import restore_run
from medcl.errors import ConfigError
from medcl.federated.launch import check_federation
from medcl.federated.local_stats import LocalStatistics
from medcl.federated.server import serve
from medcl.models.norm_stats import anchor_statistics, norm_statistics, reestimate_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    """A trained conv + BatchNorm after a frozen one (its ``train`` keeps the first in eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        self.conv, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def train(self, mode: bool = True) -> _Net:
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.frozen(x)))


def test_reestimate_gives_the_statistics_of_the_rows_and_keeps_frozen_norms():
    torch.manual_seed(0)
    net = _Net()
    net.frozen[1].running_mean.fill_(0.3)
    frozen = {k: v.clone() for k, v in net.frozen.state_dict().items()}
    x = torch.randint(0, 256, (65, 1, 12, 12), dtype=torch.uint8)  # 64 + 1: one batch of 65
    assert reestimate_batchnorm(net, [x], batch_size=64) == 65
    assert not net.training and not net.bn.training
    with torch.no_grad():
        h = net.conv(net.frozen(to_model_input(x)))  # (N, 4, 8, 8)
    torch.testing.assert_close(net.bn.running_mean, h.mean((0, 2, 3)))
    torch.testing.assert_close(net.bn.running_var, h.var((0, 2, 3)))  # unbiased, as torch's
    for k, v in net.frozen.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert net.bn.momentum == 0.1  # restored


def test_groups_are_mixed_and_every_row_counts_once():
    """A small dark group and a large bright one: the statistics are those of all rows, not
    an average over batches or over groups (which would miss the difference between them)."""
    torch.manual_seed(0)
    net = _Net()
    dark = torch.randint(0, 40, (40, 1, 12, 12), dtype=torch.uint8)
    bright = torch.randint(180, 256, (170, 1, 12, 12), dtype=torch.uint8)
    assert reestimate_batchnorm(net, [dark, bright], batch_size=32) == 210
    with torch.no_grad():
        h = net.conv(net.frozen(to_model_input(torch.cat([dark, bright]))))  # (N, 4, 8, 8)
        within = torch.stack([g.var((0, 2, 3)) for g in (h[:40], h[40:])]).max(0).values
    torch.testing.assert_close(net.bn.running_mean, h.mean((0, 2, 3)))  # exact: by rows
    assert (net.bn.running_var > within).all()  # above either group's: the between part is in
    torch.testing.assert_close(net.bn.running_var, h.var((0, 2, 3)), rtol=0.1, atol=0)


def _cfg(tmp, **federation):
    fed = {"sites": 2, "rounds": 1, "partition": "experience", "retries": 0} | federation
    raw = tiny_raw(strategy={"name": "replay"}, federation=fed, output_dir=str(tmp / "fed"))
    raw["logging"] = {"tensorboard": False}
    return validate_config(raw)


def _checkpoint(run_dir, k: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"exp-{k:03d}" / "strategy.safetensors"))


def _stats(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.endswith(("running_mean", "running_var"))]


@pytest.mark.parametrize(
    "federation",
    [{"batchnorm": "local"}, {"batchnorm": "local", "batchnorm_anchor": False}, {}],
    ids=["local", "local-unanchored", "mean"],
)
def test_local_scores_each_site_with_statistics_of_its_own_rows(tmp_path, federation):
    """Experience 1: site-1 holds the new cohort, site-0 only its memory of experience 0."""
    cfg = _cfg(tmp_path, **federation)
    link = LocalLink(cfg, tmp_path / "sites")
    run_dir = serve(cfg, tmp_path / "fed" / cfg.run_name, link)
    glob = _checkpoint(run_dir, 1)
    stats = _stats(glob)
    weights = [k for k in glob if k.endswith("conv1.weight")]
    assert stats and weights
    replies = [r for q, r, _ in link.sent if q.kind != "train" and r is not None]
    assert replies and not any(_stats(r.arrays) for r in replies)  # statistics stay at the site
    for name in ("site-0", "site-1"):
        site = _checkpoint(tmp_path / "sites" / name, 1)
        assert all(torch.equal(site[k], glob[k]) for k in weights)  # the global weights
        same = [torch.equal(site[k], glob[k]) for k in stats]
        if not federation:
            assert all(same)
            continue
        assert not any(same)
        # the global model's statistics re-estimated on the site's rows: its cohort and its
        # exemplars of experience 0 (a site's memory of experience 0 is the same before and
        # after experience 1 here: one of the two sites holds each experience)
        _, scenario, strategy, memory, _ = restore_run(tmp_path / "sites" / name)
        strategy.load_state_dict(glob)
        rows = [scenario[1].train.images, memory.exemplars(exclude=1)]
        n = reestimate_batchnorm(strategy, rows, batch_size=cfg.eval.batch_size)
        assert n == len(scenario[1].train) + len(rows[1]) > 0
        plain = strategy.state_dict()
        expected = dict(plain)
        if name == "site-0" and federation.get("batchnorm_anchor", True):
            assert len(rows[0]) == 0  # memory only: moved by the anchor of experience 0
            cohort, mem = _anchor(tmp_path / "sites" / name, memory, cfg.eval.batch_size)
            for k in stats:  # the cohort's statistics, moved as the memory's moved since
                if k.endswith("running_mean"):
                    expected[k] = cohort[k] + plain[k] - mem[k]
                else:
                    expected[k] = plain[k] * cohort[k] / mem[k]
            assert not any(torch.allclose(site[k], plain[k]) for k in stats)
        for k in stats:
            torch.testing.assert_close(site[k], expected[k])
    for name in ("site-0", "site-1"):  # both held a cohort
        held = (tmp_path / "sites" / name / "federated" / "norm_anchor.safetensors").is_file()
        assert held == federation.get("batchnorm_anchor", bool(federation))


def _anchor(site_dir, memory, batch_size: int) -> tuple[dict, dict]:
    """The anchor site-0 recorded in experience 0, checked against that experience's own
    checkpoint (the statistics it scored with) and its memory under that experience's weights."""
    anchor = load_file(str(site_dir / "federated" / "norm_anchor.safetensors"))
    then = _checkpoint(site_dir, 0)
    cohort = {k: anchor[f"cohort/{k}"] for k in _stats(then)}
    mem = {k: anchor[f"memory/{k}"] for k in _stats(then)}
    assert {k for k in anchor if k.startswith("rows/")} == {
        f"rows/{k}" for k in memory.state_dict()
    }
    assert len(anchor) == 2 * len(cohort) + len(memory.state_dict())
    for k in cohort:
        assert torch.equal(cohort[k], then[k]), k
    _, _, old, _, _ = restore_run(site_dir, 0)
    reestimate_batchnorm(old, [memory.exemplars()], batch_size=batch_size)
    for k, v in norm_statistics(old).items():
        torch.testing.assert_close(mem[k], v)
    return cohort, mem


def test_anchoring_recovers_the_cohort_statistics_from_a_typical_memory():
    """A memory of the cohort's most typical rows (as herding keeps) under-states its spread;
    after the weights move a little, the anchored statistics are far closer to the whole
    cohort's than the memory's own (the difference estimator's error is the weights' change
    times the memory's bias, the memory's own is the new weights times it)."""
    torch.manual_seed(0)
    net = _Net()
    level = torch.randint(0, 200, (400, 1, 1, 1))  # rows differ in brightness
    cohort = (level + torch.randint(0, 56, (400, 1, 12, 12))).to(torch.uint8)
    typical = (level.flatten() - level.float().median()).abs().argsort()[:40]
    memory = cohort[typical]
    reestimate_batchnorm(net, [cohort])
    then = norm_statistics(net)
    reestimate_batchnorm(net, [memory])
    mem_then = norm_statistics(net)
    with torch.no_grad():  # the weights move a little (later rounds)
        net.conv.weight.mul_(1.1).add_(0.02 * torch.randn_like(net.conv.weight))
    reestimate_batchnorm(net, [cohort])
    truth = norm_statistics(net)
    reestimate_batchnorm(net, [memory])
    plain = norm_statistics(net)
    frozen = {k: v for k, v in plain.items() if k.startswith("frozen.")}
    then = then | {k: v + 1 for k, v in then.items() if k.startswith("frozen.")}  # would move it
    assert anchor_statistics(net, then, mem_then) == 1  # the trained norm; not the frozen one
    anchored = norm_statistics(net)
    assert all(torch.equal(anchored[k], v) for k, v in frozen.items())
    for k in ("bn.running_mean", "bn.running_var"):
        err_plain = (plain[k] - truth[k]).abs().max()
        err_anchor = (anchored[k] - truth[k]).abs().max()
        assert err_anchor < 0.25 * err_plain, (k, err_anchor, err_plain)
    # a norm the anchor does not hold (another shape) keeps the memory's statistics
    short = {k: v[:2] for k, v in then.items()}
    reestimate_batchnorm(net, [memory])
    assert anchor_statistics(net, short, mem_then) == 0
    assert all(torch.equal(v, plain[k]) for k, v in norm_statistics(net).items())


def test_a_channel_constant_over_the_memory_takes_the_difference_for_its_variance():
    net = _Net()
    net.bn.running_var.fill_(2.0)
    cohort = {"bn.running_mean": torch.zeros(4), "bn.running_var": torch.tensor([5.0, 5, 5, 1])}
    memory = {"bn.running_mean": torch.zeros(4), "bn.running_var": torch.tensor([0.0, 1, 1, 4])}
    assert anchor_statistics(net, cohort, memory) == 1
    torch.testing.assert_close(net.bn.running_var, torch.tensor([7.0, 10, 10, 0.5]))
    net.bn.running_var.fill_(2.0)
    anchor_statistics(net, cohort | {"bn.running_var": torch.tensor([5.0, 5, 5, 1])},
                      memory | {"bn.running_var": torch.tensor([1e-6, 1, 1, 4])})  # fmt: skip
    torch.testing.assert_close(net.bn.running_var[0], torch.tensor(2.0 + 5.0 - 1e-6))  # below eps


class _Memory:
    """What :class:`LocalStatistics` reads of a replay memory: its images and its rows."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.rows = images, {"index": torch.arange(len(images))}

    def exemplars(self, *, exclude: int | None = None) -> torch.Tensor:
        return self.images

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.rows)


def test_site_statistics_record_then_anchor_while_the_memory_holds_the_same_rows(tmp_path):
    torch.manual_seed(0)
    level = torch.randint(0, 200, (300, 1, 1, 1))
    cohort = (level + torch.randint(0, 56, (300, 1, 12, 12))).to(torch.uint8)
    memory = _Memory(cohort[(level.flatten() - 100).abs().argsort()[:30]])
    cfg = SimpleNamespace(federation=SimpleNamespace(batchnorm="local", batchnorm_anchor=True),
                          eval=SimpleNamespace(batch_size=64))  # fmt: skip
    net = _Net()
    site = LocalStatistics(cfg, net, memory, tmp_path)
    site.estimate(0, cohort)  # experience 0: its cohort (the memory of earlier ones is the same)
    scored = {k: v.clone() for k, v in net.state_dict().items()}
    site.record(cohort[:0])  # no rows of its own: nothing recorded
    assert not site.file.is_file()
    site.record(cohort)
    assert site.file.is_file()
    assert all(torch.equal(v, scored[k]) for k, v in net.state_dict().items())  # left as it was
    with torch.no_grad():
        net.conv.weight.mul_(1.1)
    reestimate_batchnorm(net, [memory.images])
    plain = norm_statistics(net)
    site.estimate(1, cohort[:0])
    anchored = norm_statistics(net)
    assert not torch.allclose(anchored["bn.running_var"], plain["bn.running_var"])
    memory.rows["index"] = memory.rows["index"] + 1  # the memory changed since (caught up)
    site.estimate(1, cohort[:0])
    assert all(torch.equal(v, plain[k]) for k, v in norm_statistics(net).items())
    cfg.federation.batchnorm_anchor = False  # the ablation: never records
    LocalStatistics(cfg, net, memory, tmp_path / "off").record(cohort)
    assert not (tmp_path / "off" / "norm_anchor.safetensors").exists()


def test_anchor_option_is_checked(tmp_path):
    match = ("batchnorm_anchor applies to batchnorm 'local' only (it corrects each site's own "
             "BatchNorm statistics); got batchnorm 'mean'. Set batchnorm: local, or remove "
             "batchnorm_anchor")  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(match)):
        _cfg(tmp_path, batchnorm_anchor=False)


def test_training_starts_from_the_global_statistics_again(tmp_path):
    """After scoring with its own statistics, a site gets the global ones back for training."""
    for batchnorm in ("local", "mean"):
        cfg = _cfg(tmp_path / batchnorm, batchnorm=batchnorm)
        link = LocalLink(cfg, tmp_path / batchnorm / "sites")
        run_dir = serve(cfg, tmp_path / batchnorm / "fed" / cfg.run_name, link)
        first = [q for q, _, _ in link.sent if q.kind == "train" and q.config["experience"] == 1]
        sent = {k for q in first for k in q.arrays if k.endswith("running_var")}
        if batchnorm == "mean":  # nothing changed since the site scored: nothing to resend
            assert sent == set()
            continue
        glob = _checkpoint(run_dir, 0)
        assert sent == {k for k in glob if k.endswith("running_var")}
        for q in first:
            for k in sent:
                assert torch.equal(torch.as_tensor(q.arrays[k]), glob[k])


def test_adapter_strategies_are_refused_with_local_statistics(tmp_path):
    raw = tiny_raw(
        strategy={"name": "dynammo"},
        federation={"sites": 2, "batchnorm": "local"},
        output_dir=str(tmp_path),
    )
    with pytest.raises(ConfigError, match=r"batchnorm 'local'.*frozen backbone"):
        check_federation(validate_config(raw), resume=False)
