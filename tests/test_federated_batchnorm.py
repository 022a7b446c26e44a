"""``federation.batchnorm: local``: each site scores and exports the global model with BatchNorm
statistics re-estimated on its own rows (SiloBN); they never leave the site."""

from __future__ import annotations

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
from medcl.federated.server import serve
from medcl.models.norm_stats import reestimate_batchnorm

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


@pytest.mark.parametrize("batchnorm", ["local", "mean"])
def test_local_scores_each_site_with_statistics_of_its_own_rows(tmp_path, batchnorm):
    """Experience 1: site-1 holds the new cohort, site-0 only its memory of experience 0."""
    cfg = _cfg(tmp_path, batchnorm=batchnorm)
    link = LocalLink(cfg, tmp_path / "sites")
    run_dir = serve(cfg, tmp_path / "fed" / cfg.run_name, link)
    glob = _checkpoint(run_dir, 1)
    stats = [k for k in glob if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in glob if k.endswith("conv1.weight")]
    assert stats and weights
    evaluated = [r for q, r, _ in link.sent if q.kind == "evaluate" and r is not None]
    assert evaluated and all(r.arrays == {} for r in evaluated)  # statistics stay at the site
    for name in ("site-0", "site-1"):
        site = _checkpoint(tmp_path / "sites" / name, 1)
        assert all(torch.equal(site[k], glob[k]) for k in weights)  # the global weights
        same = [torch.equal(site[k], glob[k]) for k in stats]
        if batchnorm == "mean":
            assert all(same)
            continue
        assert not any(same)
        # exactly the global model's statistics re-estimated on the site's rows
        _, scenario, strategy, memory, _ = restore_run(tmp_path / "sites" / name)
        strategy.load_state_dict(glob)
        # its cohort and its exemplars of experience 0 (a site's memory of experience 0 is the
        # same before and after experience 1 here: one of the two sites holds each experience)
        rows = [scenario[1].train.images, memory.exemplars(exclude=1)]
        n = reestimate_batchnorm(strategy, rows, batch_size=cfg.eval.batch_size)
        assert n == len(scenario[1].train) + len(rows[1]) > 0
        state = strategy.state_dict()
        for k in stats:
            torch.testing.assert_close(site[k], state[k])


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
