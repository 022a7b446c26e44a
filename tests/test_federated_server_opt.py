"""FedAvgM's server step and FedNova's normalised average (``federation.aggregation``), and
the pooled validation accuracy.

The server is driven through :class:`_federation.LocalLink`; :class:`Recording` keeps the global
model as site-0 receives it (every tensor the server sent it, over the initial model) and every
training round's weighted mean, so each round's step can be checked against Flower's formula
``new = current - server_lr * m``, ``m = momentum * m + (current - mean)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from _federation import LocalLink
from _tiny import tiny_raw
from safetensors.torch import load_file

from medcl.config import validate_config
from medcl.errors import ConfigError
from medcl.federated.arrays import LeakError, audit
from medcl.federated.launch import check_federation
from medcl.federated.server import Reply, Request, serve
from medcl.federated.server_opt import normalizing_factor
from medcl.federated.site import Site

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = np.float64


def _cfg(tmp: Path, **federation):
    fed = {"sites": 2, "rounds": 2} | federation
    raw = tiny_raw(federation=fed, output_dir=str(tmp / "fed"))  # finetune: BatchNorm trains
    raw["logging"] = {"tensorboard": False}
    return validate_config(raw)


class Recording(LocalLink):
    """A LocalLink that records site-0's view of the global model and every round's mean.

    ``before[(t, kind, round)]`` is the global model as site-0 holds it once that request's
    tensors are loaded: before training round ``r`` for ``("train", r)``, after the last training
    round for ``"train.consolidate"``. ``means[t * rounds + r]`` is round ``r``'s weighted mean.
    """

    def __init__(self, cfg, folders: Path) -> None:
        super().__init__(cfg, folders)
        probe = Site(cfg, "site-0", folders.parent / "probe").strategy  # the initial model
        self.view = {k: v.numpy().copy() for k, v in probe.state_dict().items()}
        self.params = {n for n, p in probe.named_parameters() if p.is_floating_point()}
        self.before: dict[tuple, dict[str, np.ndarray]] = {}
        self.means: list[dict[str, np.ndarray]] = []

    def exchange(self, requests: Sequence[Request], timeout: float) -> list[Reply]:
        for q in requests:
            if q.node == self.node_of["site-0"] and q.kind != "query.describe":
                self.view.update({k: np.asarray(a).copy() for k, a in q.arrays.items()})
                key = (q.config["experience"], q.kind, q.config.get("round"))
                self.before[key] = dict(self.view)
        return super().exchange(requests, timeout)

    def aggregate(self, replies: Sequence[Reply], round_: int) -> dict[str, np.ndarray]:
        mean = super().aggregate(replies, round_)
        self.means.append({k: np.asarray(a).copy() for k, a in mean.items()})
        return mean


def _serve(cfg, tmp: Path, link: LocalLink | None = None) -> tuple[Path, LocalLink]:
    link = link or LocalLink(cfg, tmp / "sites")
    return serve(cfg, tmp / "fed" / cfg.run_name, link), link


def _tensors(run_dir: Path, k: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"exp-{k:03d}" / "strategy.safetensors"))


def _step(current: np.ndarray, mean: np.ndarray, lr: float) -> np.ndarray:
    """Flower's FedAvgM step without momentum, in float64, cast to the model's dtype."""
    old = current.astype(F64)
    return (old - lr * (old - mean.astype(F64).reshape(old.shape))).astype(current.dtype)


def _known(cur: dict, new: dict, mean: dict) -> list[str]:
    """Keys of ``mean`` whose tensor site-0 saw before the round (a head grown at the start of
    an experience reaches it only after round 0, so its pre-round value is not in the view)."""
    return [k for k in mean if k in cur and cur[k].shape == new[k].shape]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a, np.asarray(b).reshape(a.shape).astype(a.dtype))


def test_fedavgm_without_a_server_step_is_fedavg_bit_for_bit(tmp_path):
    """server_lr 1 and momentum 0 (the defaults): the mean itself, and no proximal term."""
    plain, _ = _serve(_cfg(tmp_path / "a"), tmp_path / "a")
    cfg = _cfg(tmp_path / "b", aggregation="fedavgm")
    fedavgm, link = _serve(cfg, tmp_path / "b")
    for k in (0, 1):
        a, b = _tensors(plain, k), _tensors(fedavgm, k)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    train = [q for q, _, _ in link.sent if q.kind == "train"]
    assert train and all(q.config["proximal-mu"] == 0.0 for q in train)


def test_server_lr_doubles_the_parameters_step_and_keeps_the_buffer_means(tmp_path):
    """server_lr 2: each trained parameter lands twice as far from the previous global model as
    the sites' mean; BatchNorm statistics are the plain weighted mean, never extrapolated."""
    cfg = _cfg(tmp_path, aggregation="fedavgm", server_lr=2.0)
    link = Recording(cfg, tmp_path / "sites")
    _serve(cfg, tmp_path, link)
    last = (0, "train.consolidate", None)  # what site-0 holds after the last training round
    for r, after in ((0, (0, "train", 1)), (1, last)):
        cur, mean, new = link.before[(0, "train", r)], link.means[r], link.before[after]
        known = _known(cur, new, mean)
        params = [k for k in known if k in link.params]
        buffers = [k for k in known if k not in link.params]
        assert any(k.endswith("conv1.0.weight") for k in params)
        assert any(k.endswith("running_var") for k in buffers)
        for k in params:
            assert _same(new[k], _step(cur[k], mean[k], 2.0)), k
        assert any(not _same(new[k], mean[k]) for k in params), (
            "the step left every parameter at the mean"
        )
        for k in buffers:
            want = np.round(mean[k]) if not np.issubdtype(new[k].dtype, np.floating) else mean[k]
            assert _same(new[k], want), k
        var = [k for k in buffers if k.endswith("running_var")]
        assert all((new[k] > 0).all() for k in var)
        # the check is not vacuous: a doubled step would have changed these statistics
        assert any(not _same(_step(cur[k], mean[k], 2.0), mean[k]) for k in var)


def test_server_momentum_carries_the_last_step_and_restarts_each_experience(tmp_path):
    """Round 1 steps by ``lr * (beta * g0 + g1)``; experience 1 starts without momentum."""
    lr, beta = 1.5, 0.5
    cfg = _cfg(tmp_path, aggregation="fedavgm", server_lr=lr, server_momentum=beta)
    link = Recording(cfg, tmp_path / "sites")
    _serve(cfg, tmp_path, link)
    momentum = {}  # experience 0's last momentum, per parameter
    cur0, m0, new0 = link.before[(0, "train", 0)], link.means[0], link.before[(0, "train", 1)]
    cur1, m1, new1 = new0, link.means[1], link.before[(0, "train.consolidate", None)]
    params = [k for k in _known(cur0, new1, m0) if k in link.params and k in m1]
    assert params
    for k in params:
        g0 = cur0[k].astype(F64) - m0[k].astype(F64).reshape(cur0[k].shape)
        assert _same(new0[k], cur0[k].astype(F64) - lr * g0), k  # round 0: no momentum yet
        g1 = cur1[k].astype(F64) - m1[k].astype(F64).reshape(cur1[k].shape)
        m = beta * g0 + g1
        assert _same(new1[k], cur1[k].astype(F64) - lr * m), k
        momentum[k] = m
    # experience 1, round 0: the plain server step; momentum from experience 0 would move it
    cur, mean, new = link.before[(1, "train", 0)], link.means[2], link.before[(1, "train", 1)]
    same_shape = [k for k in _known(cur, new, mean) if k in link.params]
    assert any(k.startswith("backbone.") for k in same_shape)
    for k in same_shape:
        assert _same(new[k], _step(cur[k], mean[k], lr)), k

    def carried(k: str) -> np.ndarray:  # the step had experience 0's momentum been kept
        old = cur[k].astype(F64)
        return old - lr * (beta * momentum[k] + (old - mean[k].astype(F64).reshape(old.shape)))

    kept = [k for k in same_shape if k in momentum and momentum[k].shape == cur[k].shape]
    assert any(not _same(new[k], carried(k)) for k in kept), "the check must be able to fail"


def test_resume_keeps_the_server_momentum(tmp_path):
    """Stopped after experience 1's first round: the resumed run restores the momentum."""
    fed = {"aggregation": "fedavgm", "server_lr": 1.5, "server_momentum": 0.5}
    whole, _ = _serve(_cfg(tmp_path / "a", **fed), tmp_path / "a")
    cfg = _cfg(tmp_path / "b", **fed)
    with pytest.raises(KeyboardInterrupt):  # the 7th exchange is experience 1's round 1
        _serve(cfg, tmp_path / "b", LocalLink(cfg, tmp_path / "b" / "sites", fail_after=6))
    server = tmp_path / "b" / "fed" / cfg.run_name / "federated" / "server"
    assert json.loads((server / "state.json").read_text())["step"] == [1, 1]  # mid-experience
    saved = load_file(str(server / "memory.safetensors"))
    assert saved and all(k.startswith("momentum.") for k in saved)
    resumed, _ = _serve(cfg, tmp_path / "b")
    a, b = _tensors(whole, 1), _tensors(resumed, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("federation", "match"),
    [
        ({"server_lr": 2.0}, "server_lr=2.0: FedAvgM's server step, used by aggregation "
         "'fedavgm' only; got aggregation 'fedavg'. Set aggregation: fedavgm, or remove server_lr"),
        ({"aggregation": "fedprox", "server_momentum": 0.9}, "got aggregation 'fedprox'"),
        ({"aggregation": "fedavgm", "server_momentum": 1.0}, "server_momentum`: Input should be "
         "less than 1"),
        ({"aggregation": "fedavgm", "server_lr": 0.0}, "server_lr`: Input should be greater than 0"),
    ],
    ids=["lr-with-fedavg", "momentum-with-fedprox", "momentum-1", "lr-0"],
)  # fmt: skip
def test_server_step_options_are_checked(tmp_path, federation, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        _cfg(tmp_path, **federation)


@pytest.mark.parametrize(
    ("key", "metric"),
    [("pooled_val", "val-accuracy"), ("pooled_val_balanced", "val-balanced-accuracy")],
)
def test_federation_json_pools_the_sites_validation_accuracy(tmp_path, key, metric):
    """``pooled_val`` (``pooled_val_balanced``): per experience learned, the sites' validation
    accuracy (recall averaged over classes) on every experience weighted by their validation
    rows."""
    cfg = _cfg(tmp_path)
    fed, link = _serve(cfg, tmp_path)
    record = json.loads((fed / "federation.json").read_text())
    pooled = record[key]
    assert len(pooled) == 2 and all(len(row) == 2 for row in pooled)
    assert all(0.0 <= a <= 1.0 for row in pooled for a in row)
    for t, row in enumerate(pooled):
        replies = [
            r for q, r, _ in link.sent if q.kind == "evaluate" and q.config["experience"] == t
        ]
        acc = np.array([r.metrics[metric] for r in replies])
        n = np.array([r.metrics["val-examples"] for r in replies], dtype=float)
        assert (n > 0).all() and (acc >= 0).all()
        assert np.allclose(row, (acc * n).sum(0) / n.sum(0), rtol=0, atol=1e-12)
    strategy = Site(cfg, "site-0", tmp_path / "sites" / "site-0").strategy
    audit(strategy, {}, {metric: [0.5, -1.0], "val-examples": [8, 0]}, where="s",
          num_experiences=2)  # fmt: skip
    with pytest.raises(LeakError, match=f"'{metric}' is a list of 3"):
        audit(strategy, {}, {metric: [0.5, 0.5, 0.5]}, where="s", num_experiences=2)


# -- FedNova (federation.aggregation: fednova) ---------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_fednova_normalizing_factor_is_what_torch_sgd_travels(steps, momentum):
    """``a_i``: the distance PyTorch's SGD (heavy-ball, from a fresh optimiser) moves a weight
    whose gradient is 1 at every step, in units of the learning rate."""
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        w.sum().backward()
        opt.step()
    assert normalizing_factor(steps, momentum) == pytest.approx(-w.item(), rel=1e-12)


class Replies(Recording):
    """A Recording that also keeps every training round's replies."""

    def __init__(self, cfg, folders: Path) -> None:
        super().__init__(cfg, folders)
        self.replies: list[list[Reply]] = []

    def aggregate(self, replies: Sequence[Reply], round_: int) -> dict[str, np.ndarray]:
        self.replies.append(list(replies))
        return super().aggregate(replies, round_)


def test_fednova_divides_each_sites_update_by_its_local_steps(tmp_path):
    """partition experience, replay: in experience 1 site-1 trains on its cohort and site-0 on
    its 8-image memory (batch 8: 8 steps against 2). Each parameter lands at ``current -
    tau_eff * sum_i p_i (current - x_i) / a_i``; BatchNorm statistics are the weighted mean."""
    fed = {"sites": 2, "rounds": 2, "partition": "experience", "aggregation": "fednova"}
    raw = tiny_raw(strategy={"name": "replay"}, federation=fed, output_dir=str(tmp_path / "fed"))
    raw["logging"], raw["train"] = {"tensorboard": False}, raw["train"] | {"batch_size": 8}
    cfg = validate_config(raw)
    link = Replies(cfg, tmp_path / "sites")
    _serve(cfg, tmp_path, link)
    r = cfg.federation.rounds  # experience 1, round 0
    replies, mean = link.replies[r], link.means[r]
    cur, new = link.before[(1, "train", 0)], link.before[(1, "train", 1)]
    steps = [x.metrics["updates"] for x in replies]
    assert len(replies) == 2 and len(set(steps)) == 2, steps  # the case FedNova is for
    p = np.array([x.metrics["num-examples"] for x in replies], dtype=F64)
    p /= p.sum()
    a = np.array([normalizing_factor(s, cfg.train.momentum) for s in steps])
    known = _known(cur, new, mean)
    params = [k for k in known if k in link.params]
    assert any(k.startswith("backbone.") for k in params)
    for k in params:
        old = cur[k].astype(F64)
        moved = [old - x.arrays[k].astype(F64).reshape(old.shape) for x in replies]
        want = old - (p @ a) * sum(w * d for w, d in zip(p / a, moved, strict=True))
        assert _same(new[k], want), k
    assert any(not _same(new[k], mean[k]) for k in params), "FedNova left the mean unchanged"
    for k in [k for k in known if k not in link.params]:
        want = np.round(mean[k]) if not np.issubdtype(new[k].dtype, np.floating) else mean[k]
        assert _same(new[k], want), k


def test_fednova_is_refused_with_adam(tmp_path):
    raw = tiny_raw(
        federation={"sites": 2, "aggregation": "fednova"},
        train={"optimizer": "adam"},
        output_dir=str(tmp_path),
    )
    with pytest.raises(ConfigError, match=r"'fednova'.*got train.optimizer 'adam'"):
        check_federation(validate_config(raw), resume=False)
