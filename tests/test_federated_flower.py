"""`medcl federate` on real Flower processes: a SuperLink and a SuperNode per site on loopback.

The protocol is tested in one process (test_federated.py). Here the same stream runs on Flower's
deployment engine while SuperNode ``site-1`` is killed (SIGKILL) after the first training round
and restarted after the first evaluation: the run must complete, the restarted site must rejoin
and catch up, and the global model must equal, bit for bit, the in-process protocol's under the
same failure (no corruption, nothing Flower-specific in the numbers).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from _federation import LocalLink
from _tiny import tiny_raw
from safetensors.torch import load_file

from medcl.config import resolved_yaml, validate_config
from medcl.export.run_export import export_run
from medcl.federated.flower_runtime import LocalFederation
from medcl.federated.launch import CLIENT_APP, SERVER_APP, site_nodes
from medcl.federated.server import serve

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _cfg(tmp: Path):
    raw = tiny_raw(strategy={"name": "replay"}, output_dir=str(tmp / "runs"))
    raw["train"] = raw["train"] | {"epochs": 1}
    raw["logging"] = {"tensorboard": False}
    # a round takes ~15 s here (a ClientApp process per message); 35 s tells dead from slow
    raw["federation"] = {"sites": 2, "rounds": 1, "round_timeout": 35, "retries": 0}
    return validate_config(raw)


class _SameFailure(LocalLink):
    """In one process, the failure the Flower run goes through: site-1 misses experience 0's
    consolidation and is back (a new node) from the next round on."""

    def exchange(self, requests, timeout):
        if not any(q.kind == "train.consolidate" and q.config["experience"] == 0 for q in requests):
            return super().exchange(requests, timeout)
        self.dead = {"site-1"}
        out = super().exchange(requests, timeout)
        self.dead = set()
        self.renumber("site-1")
        return out


def test_killed_supernode_rejoins_and_the_run_matches_the_in_process_protocol(tmp_path):
    cfg = _cfg(tmp_path / "flower")
    run_dir = Path(cfg.output_dir) / cfg.run_name
    resolved = resolved_yaml(cfg)
    run_config = {"medcl-config": resolved, "run-dir": str(run_dir.resolve())}
    run_dir.mkdir(parents=True)
    server_state = run_dir / "federated" / "server" / "state.json"
    record = run_dir / "federation.json"
    events: list[str] = []
    with LocalFederation(sites=site_nodes(cfg), workdir=run_dir / "federated" / "flower") as fl:
        fl.submit(SERVER_APP, CLIENT_APP, run_config)

        def chaos() -> None:
            while fl.running and not server_state.is_file():  # round 0 is aggregated
                time.sleep(0.05)
            fl.kill_site("site-1")  # the consolidation round waits for it in vain
            events.append("killed")
            fl.start_site("site-1")  # back long before that round's timeout: a new node id
            events.append("restarted")

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        assert fl.wait().status == "finished:completed"
        thread.join(timeout=5)
    assert events == ["killed", "restarted"]
    rounds = json.loads(record.read_text())["rounds"]
    assert [(r["kind"], r["experience"], r["sites"], r["failed"]) for r in rounds] == [
        ("train", 0, ["site-0", "site-1"], []),
        ("train.consolidate", 0, ["site-0"], ["site-1"]),
        ("evaluate", 0, ["site-0", "site-1"], []),  # rejoined under a new node id
        ("train", 1, ["site-0", "site-1"], []),
        ("train.consolidate", 1, ["site-0", "site-1"], []),
        ("evaluate", 1, ["site-0", "site-1"], []),
    ]
    sites = json.loads(record.read_text())["site_accuracy"]
    assert all(len(sites[n][e]) == 2 for n in ("site-0", "site-1") for e in ("0", "1"))
    g = load_file(str(run_dir / "checkpoints" / "exp-001" / "strategy.safetensors"))
    s1 = load_file(str(run_dir / "sites/site-1/checkpoints/exp-001/strategy.safetensors"))
    assert all(torch.equal(g[k], s1[k]) for k in g)  # the rejoined site holds the global model
    # the same stream and failure in one process: the same global model, bit for bit
    ref = _cfg(tmp_path / "local")
    link = _SameFailure(ref, tmp_path / "local-sites")
    ref_dir = serve(ref, Path(ref.output_dir) / ref.run_name, link)
    b = load_file(str(ref_dir / "checkpoints" / "exp-001" / "strategy.safetensors"))
    assert g.keys() == b.keys() and all(torch.equal(g[k], b[k]) for k in g)
    assert export_run(run_dir, "safetensors").is_file()  # a deployable medcl model
