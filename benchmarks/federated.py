"""Federated vs centralised continual learning, bytes per round, and a killed site (issue 27).

Streams (``configs/federated-pneumonia-sites-replay.yaml``: EfficientNet-Lite0, ImageNet
weights, 64 px, replay, a 200-image memory per hospital):

- **pneumonia-sites as four hospitals, one acquisition site each** (``partition: experience``:
  hospital i holds site i's cohort and joins with it; the others rehearse their own memory);
- **pneumonia-sites as three hospitals, every site shared** (``partition: split``: each
  acquisition site's cohort arrives at all three hospitals, a class-stratified third each);
- **medmnist-cross3 as three hospitals, one dataset each** (pneumonia, breast, retina).

Arms, seeds 0, 1, 2 (every arm uses the config's local lr 0.01, not tuned, the same for all):

- **centralised**: ``medcl run`` of the same config without ``federation``, ``train.epochs =
  rounds x local epochs`` (2), all images in one place, one 200-image memory;
- **federated**: ``federation.rounds = 2`` rounds of FedAvg per experience, one local epoch each,
  on Flower's simulation engine (Ray; a deployment run costs a process per message, measured in
  the kill check below); each hospital keeps its own memory and rehearses it when it has no new
  cohort. Updates are counted and reported for both arms (summed over hospitals).
- **federated-local** (every stream): the federated arm with ``federation.batchnorm: local``
  (SiloBN, Andreux et al. 2020, arXiv:2008.07424): each hospital scores, herds and calibrates
  the global weights with BatchNorm statistics re-estimated on its own rows, which never leave
  it; every batch a hospital trains on comes from that hospital, so averaged statistics match
  none of them (``docs/federated.md``).
- **fedavgm / fedavgm-local** (the two pneumonia-sites streams): FedAvgM's server step (Hsu et
  al. 2019, arXiv:1909.06335; ``federation.server_lr``): the mean of K hospitals' updates moves
  the global model about as far as one hospital's share of the cohort would, so plain FedAvg
  under-trains at equal total updates. The server learning rate is chosen per stream and per
  ``federation.batchnorm`` on the validation splits (mean validation accuracy of the final
  global model) at seed 100, which is never reported, from 1 (= FedAvg), 2, 4, widened x3
  where the best is at an edge; then the statistics whose chosen rate scored better. The
  targets use that selected arm; the others stay beside it (an arm whose chosen rate is 1 is
  the FedAvg arm itself).

Reported: the final global model's accuracy on each experience's test rows (pooled over the
hospitals that hold them) and its mean, paired federated - centralised differences over the seeds with a 95 % t interval, updates,
wall time. **Bytes per round**: full-model FedAvg (replay above) against adapter-only DynaMMo
(``configs/pneumonia-sites-dynammo.yaml`` as four hospitals, seed 0, two updates per round:
the tensors that travel do not depend on the seed or on how long a site trains), both per
training round and per site message, at the reference adapter width (1.0, the target's) and
at ``adapter_width`` 0.5 and 0.25, each on its own line (``benchmarks/_federated_bytes.py``).
**Killed site**: a deployment run (SuperLink + three SuperNodes as processes, tiny synthetic
model) whose SuperNode ``site-1`` is killed (SIGKILL) in its first round and restarted at once
(a new node id); the round completes without it, the run must complete and every site's
accuracy row of the final experience be present.

    MEDCL_DATA_ROOT=../shared/data/medmnist python benchmarks/federated.py [--quiet]

Writes benchmarks/results/federated.{json,md}. Runs live in ``--work-dir`` (default
``runs/bench-federated``); finished runs are read back, so an interrupted benchmark continues.
Run alone (2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    choose_from_grid,
    data_root,
    paired_difference,
    write_results,
)
from _federated_bytes import bytes_targets, dynammo_bytes, ratios
from _federated_report import arm_name, render
from _federated_stats import statistics_ablation

from medcl.config import resolved_yaml, validate_config
from medcl.engine.run import run
from medcl.federated.launch import federate, site_nodes

CONFIG = REPO / "configs/federated-pneumonia-sites-replay.yaml"
STREAMS = {
    "pneumonia-sites (4 hospitals, one site each)": {},
    "pneumonia-sites (3 hospitals, every site shared)": {
        "federation": {"sites": ["hospital-a", "hospital-b", "hospital-c"], "partition": "split"},
        "name": "pneumonia-sites-split",  # its own federated runs; the central ones are shared
    },
    "medmnist-cross3 (3 hospitals, one dataset each)": {
        "scenario": {"name": "medmnist-cross3", "image_size": 64},
        "federation": {"sites": ["hospital-a", "hospital-b", "hospital-c"]},
    },
}
SEEDS = (0, 1, 2)
SELECTION_SEED = 100  # chooses FedAvgM's server learning rate; never reported
SERVER_LR_GRID = [1.0, 2.0, 4.0]  # widened x3 where the best sits at an edge
BATCHNORM = ("mean", "local")  # federation.batchnorm: averaged, or each site's own (SiloBN)
FEDAVGM = ("pneumonia-sites (4 hospitals, one site each)",
           "pneumonia-sites (3 hospitals, every site shared)")  # fmt: skip
GAP_GOAL = 2.0


def _merge(raw: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    for k, v in extra.items():
        out[k] = out.get(k, {}) | v if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _raw(extra: dict[str, Any], seed: int, root: Path, out: Path) -> dict[str, Any]:
    raw = _merge(yaml.safe_load(CONFIG.read_text()), extra)
    return raw | {"seed": seed, "output_dir": str(out), "data": {"root": str(root)}}


def _central(extra, seed, root, work, quiet) -> dict[str, Any]:
    raw = _raw(extra, seed, root, work / "central")
    raw.pop("name", None)  # one central run per scenario and seed, whatever the partition
    fed = raw.pop("federation")
    raw["train"] = raw["train"] | {"epochs": fed["rounds"] * raw["train"]["epochs"]}
    raw["train"]["num_threads"] = "auto"
    cfg = validate_config(raw)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if not (run_dir / "metrics.json").is_file() or _unfinished(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        run(cfg, quiet=quiet)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "final": metrics["accuracy_matrix"][-1],
        "learned": _learned(metrics["accuracy_matrix"]),
        "updates": sum(f["updates"] for f in metrics["fit"]),
        "seconds": metrics["timing"]["total"],  # the run's own record (also when read back)
    }


def _learned(matrix: list[list[float | None]]) -> list[float | None]:
    """Accuracy on each experience right after it was learned (the matrix's diagonal)."""
    return [row[j] for j, row in enumerate(matrix)]


def _unfinished(run_dir: Path) -> bool:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return len(metrics["accuracy_matrix"]) < len(metrics["experiences"])


def _federated(extra, seed, root, work, quiet, engine="simulation") -> dict[str, Any]:
    raw = _raw(extra, seed, root, work / "federated")
    if "name" in raw:
        raw["name"] = f"{raw['name']}-s{seed}"
    raw["federation"] = raw["federation"] | {"engine": engine}
    cfg = validate_config(raw)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    record_file = run_dir / "federation.json"
    done = record_file.is_file() and len(
        json.loads(record_file.read_text())["accuracy_matrix"]
    ) == (len(json.loads(record_file.read_text())["experiences"]))
    if not done:
        federate(cfg, resume=run_dir.is_dir(), quiet=quiet)
    record = json.loads(record_file.read_text())
    updates = 0
    for node in site_nodes(cfg):
        metrics = Path(node.node_config["site-dir"]) / "metrics.json"
        updates += sum(f["updates"] for f in json.loads(metrics.read_text())["fit"])
    train = [r for r in record["rounds"] if r["kind"] == "train"]
    return {
        "run_dir": str(run_dir),
        "final": record["accuracy_matrix"][-1],
        "learned": _learned(record["accuracy_matrix"]),
        "final_val": (record.get("pooled_val") or [[]])[-1],
        "site_accuracy": record["site_accuracy"],
        "updates": updates,
        "seconds": sum(r["seconds"] for r in record["rounds"]),  # rounds, without start-up
        "bytes_per_round": float(np.mean([r["bytes_down"] + r["bytes_up"] for r in train])),
        "bytes_per_site_message": float(
            np.mean([(r["bytes_down"] + r["bytes_up"]) / max(len(r["sites"]), 1) for r in train])
        ),
    }


def _arm(extra, lr: float, batchnorm: str, seed, root, work, quiet) -> dict[str, Any]:
    """The federated run with server learning rate ``lr`` (1: plain FedAvg, else FedAvgM's
    server step) and ``federation.batchnorm``, each combination in its own folder."""
    fed = dict(extra.get("federation", {}))
    if batchnorm != "mean":
        fed, work = fed | {"batchnorm": batchnorm}, work / f"bn-{batchnorm}"
    if lr != 1:
        fed, work = fed | {"aggregation": "fedavgm", "server_lr": lr}, work / f"fedavgm-lr{lr:g}"
    return _federated(extra | {"federation": fed}, seed, root, work, quiet)


def _select_server_lr(extra, batchnorm: str, root, work, quiet) -> dict[str, Any]:
    """FedAvgM's server learning rate with the best mean validation accuracy of the final
    global model (pooled over hospitals), at the selection seed (1.0 is plain FedAvg), for
    one ``federation.batchnorm``."""

    seconds = []

    def score(lr: float) -> float:
        if not quiet:
            print(f"  selection: server_lr {lr:g}, batchnorm {batchnorm}", flush=True)
        run = _arm(extra, lr, batchnorm, SELECTION_SEED, root, work / "selection", quiet)
        seconds.append(run["seconds"])
        val = np.array(run["final_val"], dtype=float)
        if not np.isfinite(val).any():  # a choice among NaNs would be arbitrary
            raise SystemExit(f"server_lr {lr:g}: the run recorded no validation accuracy")
        return float(np.nanmean(val))

    return choose_from_grid(score, SERVER_LR_GRID, key="val_accuracy") | {"seconds": seconds}


def _val(selection: dict[str, Any]) -> float:
    """The validation accuracy of a selection's chosen value."""
    return selection["val_accuracy"][selection["chosen"]]


def _kill_check(work: Path, quiet: bool) -> dict[str, Any]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench-federated"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    root, work = data_root(args.root), Path(args.work_dir)
    begin = time.perf_counter()
    streams: dict[str, Any] = {}
    for name, extra in STREAMS.items():
        chosen = (
            {bn: _select_server_lr(extra, bn, root, work, args.quiet) for bn in BATCHNORM}
            if name in FEDAVGM
            else {}
        )
        configs = dict.fromkeys([(1.0, "mean"), (1.0, "local")])  # FedAvg, FedAvg + SiloBN
        configs |= dict.fromkeys((c["chosen"], bn) for bn, c in chosen.items())
        arms: dict[str, list] = {"central": []} | {arm_name(*c): [] for c in configs}
        for seed in SEEDS:
            if not args.quiet:
                print(f"{name}, seed {seed}: centralised, then {', '.join(arms)}", flush=True)
            arms["central"].append(_central(extra, seed, root, work, args.quiet))
            for lr, bn in configs:
                arms[arm_name(lr, bn)].append(_arm(extra, lr, bn, seed, root, work, args.quiet))
        mean = {a: [float(np.nanmean(r["final"])) for r in runs] for a, runs in arms.items()}
        best = max(chosen, key=lambda bn: _val(chosen[bn]), default=None)
        streams[name] = {
            "runs": arms,
            "final_mean": {
                a: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))}
                for a, v in mean.items()
            },
            "per_site": {
                a: np.mean([r["final"] for r in runs], axis=0).tolist() for a, runs in arms.items()
            },
            "per_site_learned": {
                a: np.mean([r["learned"] for r in runs], axis=0).tolist()
                for a, runs in arms.items()
            },
            "differences": {
                a: paired_difference(mean[a], mean["central"]) for a in arms if a != "central"
            },
            "server_lr": chosen,  # batchnorm -> the selection record
            "selected_arm": None if best is None else arm_name(chosen[best]["chosen"], best),
        }
    ablations = {  # the statistics a hospital without the final cohort scores with
        name: statistics_ablation([r["run_dir"] for r in s["runs"]["federated-local"]])
        for name, s in streams.items()
    }
    pneumonia, shared = list(STREAMS)[:2]
    dyn = dynammo_bytes(_federated, root, work, args.quiet)  # adapter width -> run
    full = streams[pneumonia]["runs"]["federated"][0]
    ratio = ratios(full, dyn)  # adapter width -> full-model / adapter-only bytes
    kill = _kill_check(work, args.quiet)
    picked = {k: streams[k]["selected_arm"] for k in (pneumonia, shared)}
    gaps = {k: streams[k]["differences"][a]["mean"] * 100 for k, a in picked.items()}
    targets = [
        {
            "name": f"federated ({picked[k]}: server lr and BatchNorm statistics chosen on "
            f"validation) - centralised final accuracy, {k} (points, mean over 3 seeds)",
            "value": round(g, 2),
            "goal": f"abs(value) <= {GAP_GOAL}",
            "met": abs(g) <= GAP_GOAL,
        }
        for k, g in gaps.items()
    ]
    targets += bytes_targets(full, dyn)  # the reference width, then each narrow width
    targets.append(
        {
            "name": "a SuperNode killed mid-run: run completes, final accuracy rows of every site",
            "value": kill["survived"],
            "goal": True,
            "met": kill["survived"],
        }
    )
    payload = {
        "streams": streams,
        "bytes": {
            "replay_full_model": full,
            "dynammo_adapters": dyn["1"],
            "ratio": ratio["1"],
            "dynammo_adapters_by_width": dyn,
            "ratio_by_width": ratio,
        },
        "kill": kill,
        "batchnorm_statistics": ablations,
        "seeds": list(SEEDS),
        "budget": "per experience: central 2 epochs; federated 2 rounds x 1 local epoch",
        "selection_seed": SELECTION_SEED,
        "wall_seconds": time.perf_counter() - begin,
        "targets": targets,
    }
    write_results("federated", payload, render(payload, streams, full, dyn, kill))


if __name__ == "__main__":
    main()
