"""``benchmarks/federated.py``'s killed-site check: a deployment run (SuperLink + three
SuperNodes as processes, tiny synthetic model) whose SuperNode ``site-1`` is killed (SIGKILL) in
its first round and restarted at once under a new node id."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from medcl.config import resolved_yaml, validate_config
from medcl.federated.launch import site_nodes


def kill_check(work: Path, quiet: bool) -> dict[str, Any]:
    """A deployment run whose SuperNode site-1 is killed in experience 0 and restarted later."""
    from medcl.federated.flower_runtime import LocalFederation
    from medcl.federated.launch import CLIENT_APP, SERVER_APP

    raw = {
        "seed": 0, "output_dir": str(work / "kill"),
        "scenario": {"name": "synthetic-ci", "num_classes": 4, "classes_per_experience": 2,
                     "n_train": 32, "n_test": 16, "image_size": 16},
        "strategy": {"name": "replay"}, "model": {"backbone": "test_resnet", "small_input": True},
        "train": {"epochs": 1, "batch_size": 32, "augment": "none", "num_threads": 1},
        "memory": {"size": 8}, "logging": {"tensorboard": False},
        "federation": {"sites": 3, "rounds": 3, "round_timeout": 90, "retries": 0},
    }  # fmt: skip
    shutil.rmtree(work / "kill", ignore_errors=True)
    cfg = validate_config(raw)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    resolved = resolved_yaml(cfg)
    run_config = {"medcl-config": resolved, "run-dir": str(run_dir.resolve())}
    run_dir.mkdir(parents=True)
    events: list[str] = []
    start = time.perf_counter()
    with LocalFederation(sites=site_nodes(cfg), workdir=run_dir / "federated" / "flower") as fl:
        fl.submit(SERVER_APP, CLIENT_APP, run_config)
        work1 = run_dir / "sites" / "site-1" / "federated" / "work" / "work.json"

        def chaos() -> None:
            while fl.running and not work1.is_file():  # site-1 received its first round
                time.sleep(0.2)
            fl.kill_site("site-1")  # that round waits round_timeout for it in vain
            events.append(f"killed site-1 at {time.perf_counter() - start:.1f} s")
            fl.start_site("site-1")  # back under a new node id, it rejoins the next round
            events.append(f"restarted site-1 at {time.perf_counter() - start:.1f} s")

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        result = fl.wait()
        thread.join(timeout=5)
    record = json.loads((run_dir / "federation.json").read_text())
    last = str(len(record["experiences"]) - 1)
    rows = {n: record["site_accuracy"].get(n, {}).get(last) for n in record["sites"]}
    failed = [r for r in record["rounds"] if r["failed"]]
    return {
        "status": result.status,
        "events": events,
        "rounds_with_failures": [
            {k: r[k] for k in ("experience", "kind", "round", "failed")} for r in failed
        ],
        "final_rows": rows,
        "seconds": time.perf_counter() - start,
        "survived": result.status == "finished:completed"
        and bool(failed)
        and all(v is not None and len(v) == len(record["experiences"]) for v in rows.values()),
    }
