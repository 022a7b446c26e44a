"""Federated continual learning (medcl.federated): the protocol in one process, against a central run.

Flower's own processes (SuperLink, SuperNodes) are tested in test_federated_flower.py; here the
server talks to sites through :class:`_federation.LocalLink`, which builds a fresh site for
every message as a SuperNode's ClientApp process does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _federation import LocalLink
from _tiny import tiny_raw
from safetensors.torch import load_file

from medcl.config import validate_config
from medcl.data.partition import site_rows
from medcl.engine.resume import restore_run
from medcl.engine.run import run
from medcl.errors import ConfigError
from medcl.federated.arrays import METRIC_KEYS, LeakError, audit, model_keys
from medcl.federated.server import FederationError, serve
from medcl.federated.site import Site, check_federated_strategy

pytestmark = pytest.mark.usefixtures("one_thread")

DYNAMMO = {"name": "dynammo", "backbone_init": "first_experience", "retune_epochs": 2}


def _cfg(tmp: Path, strategy: dict, **federation):
    fed = {"sites": 2, "rounds": 2} | federation
    raw = tiny_raw(strategy=strategy, federation=fed, output_dir=str(tmp / "fed"))
    raw["logging"] = {"tensorboard": False}
    return validate_config(raw)


def _serve(cfg, tmp: Path, link: LocalLink | None = None) -> tuple[Path, LocalLink]:
    link = link or LocalLink(cfg, tmp / "sites")
    return serve(cfg, tmp / "fed" / cfg.run_name, link), link


def _tensors(run_dir: Path, k: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"exp-{k:03d}" / "strategy.safetensors"))


@pytest.mark.parametrize(
    "strategy", [{"name": "finetune"}, {"name": "replay"}, {"name": "ewc"}, DYNAMMO],
    ids=["finetune", "replay", "ewc", "dynammo"],
)  # fmt: skip
def test_one_site_one_round_is_the_central_run_bit_for_bit(tmp_path, strategy):
    """One site, one round: the same updates as `medcl run`, so every tensor must be equal."""
    raw = tiny_raw(strategy=strategy, output_dir=str(tmp_path / "central"))
    raw["logging"] = {"tensorboard": False}
    central = run(validate_config(raw), quiet=True)
    cfg = _cfg(tmp_path, strategy, sites=1, rounds=1)
    fed, _ = _serve(cfg, tmp_path)
    site = tmp_path / "sites" / "site-0"
    for k in (0, 1):
        a, s, g = _tensors(central, k), _tensors(site, k), _tensors(fed, k)
        assert a.keys() == s.keys()
        assert all(torch.equal(a[n], s[n]) for n in a), "the site's checkpoint differs"
        # the server holds the deployable tensors (local state such as EWC's Fisher stays home)
        keys = [n for n in a if not n.startswith("terms.") and n != "train_sizes_"]
        assert all(torch.equal(a[n], g[n]) for n in keys), "the global model differs"
    metrics = json.loads((central / "metrics.json").read_text())["accuracy_matrix"]
    record = json.loads((fed / "federation.json").read_text())
    assert record["accuracy_matrix"] == metrics
    assert json.loads((site / "metrics.json").read_text())["accuracy_matrix"] == metrics


def test_two_sites_average_and_record_every_round(tmp_path):
    cfg = _cfg(tmp_path, {"name": "replay"})
    fed, _ = _serve(cfg, tmp_path)
    record = json.loads((fed / "federation.json").read_text())
    train = [r for r in record["rounds"] if r["kind"] == "train"]
    assert len(train) == 2 * 2  # experiences x rounds
    assert all(r["sites"] == ["site-0", "site-1"] and r["failed"] == [] for r in train)
    assert all(r["bytes_up"] > 0 for r in train)
    assert set(record["site_accuracy"]) == {"site-0", "site-1"}
    assert len(record["accuracy_matrix"]) == 2
    # each site's run directory is a medcl run with its report
    for name in ("site-0", "site-1"):
        assert (tmp_path / "sites" / name / "report.html").is_file()
    # the global model is the average: it equals neither site's trained tensors
    g = _tensors(fed, 1)
    s0, s1 = _tensors(tmp_path / "sites" / "site-0", 1), _tensors(tmp_path / "sites" / "site-1", 1)
    w = "head.weight"
    assert torch.equal(g[w], s0[w]) and torch.equal(g[w], s1[w])  # both hold the final aggregate


def test_split_partition_is_disjoint_stratified_and_complete():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    parts = [site_rows(labels, s, 3, seed=5) for s in range(3)]
    joined = torch.cat(parts).sort().values
    assert torch.equal(joined, torch.arange(20))
    for c, n in ((0, 10), (1, 7), (2, 3)):
        counts = [int((labels[p] == c).sum()) for p in parts]
        assert max(counts) - min(counts) <= 1 and sum(counts) == n


@pytest.mark.parametrize("strategy", [{"name": "replay"}, DYNAMMO], ids=["replay", "dynammo"])
def test_experience_partition_gives_each_site_its_own_cohorts(tmp_path, strategy):
    """Each site holds whole cohorts; a site without the current one sits training out and
    still consolidates (DynaMMo: merge + stage 2 on its memory) and evaluates."""
    cfg = _cfg(tmp_path, strategy, partition="experience", retries=0)
    a, b = Site(cfg, "site-0", tmp_path / "a"), Site(cfg, "site-1", tmp_path / "b")
    assert len(a.scenario[0].train) > 0 and len(a.scenario[1].train) == 0
    assert len(b.scenario[0].train) == 0 and len(b.scenario[1].train) > 0
    fed, _ = _serve(cfg, tmp_path)
    record = json.loads((fed / "federation.json").read_text())
    assert all(r["sites"] == ["site-0", "site-1"] and not r["errors"] for r in record["rounds"])
    # site-0 has no test rows of experience 1: its matrix says so (null), the pooled one does not
    assert record["site_accuracy"]["site-0"]["1"][1] is None
    assert all(v is not None for v in record["accuracy_matrix"][-1])


def test_dynammo_sends_one_adapter_set_and_head_never_the_backbone(tmp_path):
    """From experience 1 on (the backbone trains in experience 0 with backbone_init:
    first_experience), a site's training reply is the newest adapter set and head only."""
    cfg = _cfg(tmp_path, DYNAMMO)
    _, link = _serve(cfg, tmp_path)
    later = [(q, r) for q, r, _ in link.sent if r is not None and q.config.get("experience") == 1]
    train = [set(r.arrays) for q, r in later if q.kind == "train"]
    assert len(train) == 2 * 2  # two sites, two rounds
    for keys in train:
        assert {".".join(k.split(".")[:2]) for k in keys} == {"adapter_sets.1", "heads.1"}
    for _, r in later:
        assert not any(k.startswith("backbone.") for k in r.arrays)


def test_every_message_is_model_tensors_and_known_metrics(tmp_path):
    """What leaves a site, inspected message by message: named model tensors of their own shape
    and the scalars medcl sends; never a uint8 array, never a key about images or labels."""
    cfg = _cfg(tmp_path, {"name": "replay"})
    _, link = _serve(cfg, tmp_path)
    site = Site(cfg, "site-0", tmp_path / "sites" / "site-0")
    state = site.strategy.state_dict()
    replies = [r for _, r, _ in link.sent if r is not None]
    assert sum(len(r.arrays) for r in replies) > 0
    for r in replies:
        for k, a in r.arrays.items():
            assert k in state and a.ndim == state[k].ndim, k  # heads grow: rows may differ
            assert a.dtype != np.uint8
        assert not any(w in k for k in (*r.metrics, *r.config) for w in ("image", "label", "index"))
        assert set(r.metrics) <= METRIC_KEYS and set(r.config) <= {"describe"}
        for v in r.metrics.values():
            assert all(isinstance(x, int | float) for x in (v if isinstance(v, list) else [v]))


def test_audit_refuses_images_labels_and_indices(tmp_path):
    cfg = _cfg(tmp_path, {"name": "replay"})
    strategy = Site(cfg, "site-0", tmp_path / "s").strategy
    x = np.zeros((8, 3, 16, 16), dtype=np.float32)
    with pytest.raises(LeakError, match="'images' is not a tensor of the model"):
        audit(strategy, {"images": x}, {}, where="site-0")
    name = sorted(model_keys(strategy))[0]
    with pytest.raises(LeakError, match="shape"):
        audit(strategy, {name: x}, {}, where="site-0")
    with pytest.raises(LeakError, match="'labels' is not one medcl sends"):
        audit(strategy, {}, {"labels": [0, 1, 1]}, where="site-0")
    with pytest.raises(LeakError, match="list"):
        audit(strategy, {}, {"updates": [3, 4, 5]}, where="site-0", num_experiences=2)


@pytest.mark.parametrize("selection", ["random", "herding"])
def test_a_dead_site_is_left_out_and_catches_up_when_it_returns(tmp_path, selection):
    cfg = _cfg(tmp_path, {"name": "replay"}, retries=0)
    cfg = cfg.model_copy(update={"memory": cfg.memory.model_copy(update={"selection": selection})})

    class Flaky(LocalLink):
        def exchange(self, requests, timeout):
            train = [q for q in requests if q.kind == "train"]
            if train and train[0].config["experience"] == 0 and train[0].config["round"] == 1:
                self.dead = {"site-1"}  # killed mid-experience 0
            elif train and train[0].config["experience"] == 1 and self.dead:
                self.dead = set()  # back, as a new SuperNode
                self.renumber("site-1")
            return super().exchange(requests, timeout)

    fed, _ = _serve(cfg, tmp_path, Flaky(cfg, tmp_path / "sites"))
    record = json.loads((fed / "federation.json").read_text())
    train = [r for r in record["rounds"] if r["kind"] == "train"]
    assert train[1]["failed"] == ["site-1"] and train[1]["sites"] == ["site-0"]
    assert train[-1]["sites"] == ["site-0", "site-1"]  # rejoined
    assert len(record["site_accuracy"]["site-1"]) >= 1
    _, _, _, memory, _ = restore_run(tmp_path / "sites" / "site-1")
    assert (memory.exp_ == 0).sum() > 0  # its images of the missed experience were kept
    # not corrupted: the rejoined site received every tensor it missed and holds the aggregate
    g = _tensors(fed, 1)
    s1 = _tensors(tmp_path / "sites" / "site-1", 1)
    assert all(
        torch.equal(g[k], s1[k])
        for k in model_keys(Site(cfg, "site-0", tmp_path / "x").strategy)
        if k in g and k in s1
    )


def test_too_few_sites_fail_the_round_with_a_clear_message(tmp_path):
    cfg = _cfg(tmp_path, {"name": "replay"}, retries=1, min_sites=2)

    class Dead(LocalLink):
        def exchange(self, requests, timeout):
            if any(q.kind == "train" for q in requests):
                self.dead = {"site-1"}
            return super().exchange(requests, timeout)

    with pytest.raises(FederationError, match="min_sites is 2, after 2 attempt"):
        _serve(cfg, tmp_path, Dead(cfg, tmp_path / "sites"))


def test_resume_after_the_server_stops_gives_the_same_model(tmp_path):
    cfg = _cfg(tmp_path / "a", {"name": "replay"})
    whole, _ = _serve(cfg, tmp_path / "a")
    cfg_b = _cfg(tmp_path / "b", {"name": "replay"})
    with pytest.raises(KeyboardInterrupt):
        _serve(cfg_b, tmp_path / "b", LocalLink(cfg_b, tmp_path / "b" / "sites", fail_after=6))
    resumed, _ = _serve(cfg_b, tmp_path / "b")
    a, b = _tensors(whole, 1), _tensors(resumed, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_strategies_sites_cannot_train_are_refused():
    with pytest.raises(ConfigError, match="cannot be trained federated; federation supports"):
        check_federated_strategy("esacl")


def test_medcl_run_refuses_a_federated_config(tmp_path):
    cfg = _cfg(tmp_path, {"name": "replay"})
    with pytest.raises(ConfigError, match="medcl federate"):
        run(cfg, quiet=True)


def test_a_site_directory_restores_with_the_site_rows_only(tmp_path):
    """`medcl export sites/NAME` fits its OOD guard on that site's images, not everyone's."""
    cfg = _cfg(tmp_path, {"name": "replay"})
    _serve(cfg, tmp_path)
    for name in ("site-0", "site-1"):
        folder = tmp_path / "sites" / name
        _, scenario, _, memory, _ = restore_run(folder)
        own = Site(cfg, name, tmp_path / "fresh" / name).scenario
        for a, b in zip(scenario, own, strict=True):
            assert torch.equal(a.train.labels, b.train.labels) and len(a.test) == len(b.test)
        assert len(memory) > 0


def test_a_site_of_another_federation_gets_its_own_part(tmp_path):
    """A process that hosts site-0 of a 2-site run, then site-0 of a 1-site run: the second
    holds the whole cohort, not the first one's half (the in-process scenario cache)."""
    half = Site(_cfg(tmp_path / "a", {"name": "finetune"}, sites=2), "site-0", tmp_path / "a")
    whole = Site(_cfg(tmp_path / "b", {"name": "finetune"}, sites=1), "site-0", tmp_path / "b")
    assert len(whole.scenario[0].train) > len(half.scenario[0].train)


def test_experiences_not_scored_are_null_in_the_pooled_matrices(tmp_path):
    """`eval.future: next` (the default): after experience 0 of 3 the sites score experiences 0
    and 1 only. A site answers -1 for experience 2 (also when it answers again from its
    checkpoint, where NaN is stored as null) and the pooled rows hold null there."""
    raw = tiny_raw(scenario={"num_classes": 6}, federation={"sites": 2, "rounds": 1})
    raw |= {"output_dir": str(tmp_path / "fed"), "logging": {"tensorboard": False}}
    cfg = validate_config(raw)
    stop = LocalLink(cfg, tmp_path / "sites", fail_after=4)  # describe, then experience 0
    with pytest.raises(KeyboardInterrupt):
        _serve(cfg, tmp_path, stop)
    site = Site(cfg, "site-0", tmp_path / "sites" / "site-0")  # restored from its checkpoint
    assert site.state.completed == 0
    again = site.evaluate(0, {}, site.work.synced_version)  # a repeated evaluate message
    for key in ("accuracy", "val-accuracy", "val-balanced-accuracy"):
        assert again[key][2] == -1.0 and min(again[key][:2]) >= 0, key
    fed, _ = _serve(cfg, tmp_path)  # resumed to the end
    record = json.loads((fed / "federation.json").read_text())
    for key in ("accuracy_matrix", "pooled_val", "pooled_val_balanced"):
        assert [row[2] is None for row in record[key]] == [True, False, False], key
        assert all(v is not None for row in record[key] for v in row[:2]), key
    assert record["site_accuracy"]["site-0"]["0"][2] is None
