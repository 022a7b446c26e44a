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
- **fedavgm** (the two pneumonia-sites streams): the federated arm with FedAvgM's server step
  (Hsu et al. 2019, arXiv:1909.06335; ``federation.server_lr``): the mean of K hospitals' updates
  moves the global model about as far as one hospital's share of the cohort would, so plain
  FedAvg under-trains at equal total updates. The server learning rate is chosen per stream on
  the validation splits (mean validation accuracy of the final global model) at seed 100, which
  is never reported, from 1 (= FedAvg), 2, 4, widened x3 where the best is at an edge. The
  targets use this arm; FedAvg's rows stay beside it.

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
    markdown_table,
    paired_difference,
    write_results,
)
from _federated_bytes import bytes_table, bytes_targets, dynammo_bytes, ratios

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


def _fedavgm(extra, lr: float, seed, root, work, quiet) -> dict[str, Any]:
    """The federated arm with FedAvgM's server step (``server_lr``), in its own folder."""
    fed = extra.get("federation", {}) | {"aggregation": "fedavgm", "server_lr": lr}
    return _federated(extra | {"federation": fed}, seed, root, work / f"fedavgm-lr{lr:g}", quiet)


def _select_server_lr(extra, root, work, quiet) -> dict[str, Any]:
    """FedAvgM's server learning rate with the best mean validation accuracy of the final
    global model (pooled over hospitals), at the selection seed (1.0 is plain FedAvg)."""

    seconds = []

    def score(lr: float) -> float:
        if not quiet:
            print(f"  selection: server_lr {lr:g}, seed {SELECTION_SEED}", flush=True)
        run = _fedavgm(extra, lr, SELECTION_SEED, root, work / "selection", quiet)
        seconds.append(run["seconds"])
        val = np.array(run["final_val"], dtype=float)
        if not np.isfinite(val).any():  # a choice among NaNs would be arbitrary
            raise SystemExit(f"server_lr {lr:g}: the run recorded no validation accuracy")
        return float(np.nanmean(val))

    return choose_from_grid(score, SERVER_LR_GRID, key="val_accuracy") | {"seconds": seconds}


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
        arms: dict[str, list] = {"central": [], "federated": []}
        chosen = _select_server_lr(extra, root, work, args.quiet) if name in FEDAVGM else None
        for seed in SEEDS:
            if not args.quiet:
                print(f"{name}, seed {seed}: centralised, then federated", flush=True)
            arms["central"].append(_central(extra, seed, root, work, args.quiet))
            arms["federated"].append(_federated(extra, seed, root, work, args.quiet))
            if chosen is not None:
                lr = chosen["chosen"]
                run = _fedavgm(extra, lr, seed, root, work, args.quiet)
                arms.setdefault("fedavgm", []).append(run)
        mean = {a: [float(np.nanmean(r["final"])) for r in runs] for a, runs in arms.items()}
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
            "difference": paired_difference(mean["federated"], mean["central"]),
            "server_lr": chosen,
        }
        if chosen is not None:
            streams[name]["difference_fedavgm"] = paired_difference(
                mean["fedavgm"], mean["central"]
            )
    pneumonia, shared = list(STREAMS)[:2]
    dyn = dynammo_bytes(_federated, root, work, args.quiet)  # adapter width -> run
    full = streams[pneumonia]["runs"]["federated"][0]
    ratio = ratios(full, dyn)  # adapter width -> full-model / adapter-only bytes
    kill = _kill_check(work, args.quiet)
    gaps = {k: streams[k]["difference_fedavgm"]["mean"] * 100 for k in (pneumonia, shared)}
    targets = [
        {
            "name": f"federated (FedAvgM, server lr on validation) - centralised final "
            f"accuracy, {k} (points, mean over 3 seeds)",
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
        "seeds": list(SEEDS),
        "budget": "per experience: central 2 epochs; federated 2 rounds x 1 local epoch",
        "selection_seed": SELECTION_SEED,
        "wall_seconds": time.perf_counter() - begin,
        "targets": targets,
    }
    lines = ["# Federated continual learning (issue 27)", ""]
    lines.append("Accuracy of the final global model on each experience's test rows (pooled over "
                 "the hospitals holding them), mean ± sd over seeds 0-2; difference = federated - "
                 "centralised, paired by seed (95 % t CI). Budget per experience: central 2 epochs; "
                 "federated 2 rounds x 1 local epoch; updates summed over hospitals. Wall s: the "
                 "central run's total, the federated run's rounds (Ray simulation engine).")  # fmt: skip
    rows = []
    for name, s in streams.items():
        for arm in s["runs"]:
            fm = s["final_mean"][arm]
            runs = s["runs"][arm]
            label = f"fedavgm (server lr {s['server_lr']['chosen']:g})" if arm == "fedavgm" else arm
            rows.append({
                "stream": name, "arm": label,
                "mean accuracy": f"{fm['mean']:.3f} ± {fm['sd']:.3f}",
                "per experience": ", ".join(f"{a:.3f}" for a in s["per_site"][arm]),
                "updates": int(np.mean([r["updates"] for r in runs])),
                "wall s": round(float(np.mean([r["seconds"] for r in runs])), 1),
            })  # fmt: skip
        for key, what in (("difference", "fedavg"), ("difference_fedavgm", "fedavgm")):
            if key in s:
                d = s[key]
                rows.append({"stream": name, "arm": f"{what} - central",
                             "mean accuracy": f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"})  # fmt: skip
    lines += ["", markdown_table(rows, ["stream", "arm", "mean accuracy", "per experience", "updates", "wall s"])]  # fmt: skip
    lines += ["", "Learned, then kept: accuracy on each experience right after learning it -> "
              "after the last one (mean over seeds):", ""]  # fmt: skip
    kept = [{"stream": n, "arm": a, "learned -> final": ", ".join(
                f"{x:.3f} -> {y:.3f}" for x, y in zip(s["per_site_learned"][a], s["per_site"][a], strict=True))}
            for n, s in streams.items() for a in s["runs"]]  # fmt: skip
    lines += [markdown_table(kept, ["stream", "arm", "learned -> final"])]
    lines += ["", "FedAvgM's server learning rate (Hsu et al. 2019; `federation.server_lr`), chosen "
              f"per stream on the validation splits at seed {SELECTION_SEED} (mean validation "
              "accuracy of the final global model over experiences):", ""]  # fmt: skip
    sel = [{"stream": n, "grid": ", ".join(f"{v:g}" for v in s["server_lr"]["grid"]),
            "val accuracy": ", ".join(f"{v:g}: {a:.3f}" for v, a in s["server_lr"]["val_accuracy"].items()),
            "chosen": s["server_lr"]["chosen"], "at edge": s["server_lr"]["at_edge"]}
           for n, s in streams.items() if s.get("server_lr")]  # fmt: skip
    lines += [markdown_table(sel, ["stream", "grid", "val accuracy", "chosen", "at edge"])]
    lines += ["", "## Bytes per training round (pneumonia-sites, 4 hospitals, seed 0)", ""]
    lines += [bytes_table(full, dyn), "", "The target is read at the reference adapter width "
              "(1.0: the paper's, no bottleneck); `adapter_width` 0.5 and 0.25 are an option, "
              "their lines are separate and their accuracy is not measured here."]  # fmt: skip
    lines += ["", "## A SuperNode killed mid-run (deployment engine)", "",
              f"status {kill['status']}; {'; '.join(kill['events'])}; rounds with a failed site: "
              f"{len(kill['rounds_with_failures'])}; {kill['seconds']:.0f} s."]  # fmt: skip
    lines += ["", "## Targets", "", markdown_table(targets, ["name", "value", "goal", "met"])]
    total = sum(r["seconds"] for s in streams.values() for a in s["runs"].values() for r in a)
    total += sum(sum(s["server_lr"]["seconds"]) for s in streams.values() if s["server_lr"])
    dyn_seconds = sum(d["seconds"] for d in dyn.values())
    lines += [
        "",
        f"Runs' own wall time {(total + dyn_seconds + kill['seconds']) / 60:.0f} min "
        f"(this invocation: {payload['wall_seconds'] / 60:.1f} min; finished runs are read "
        "back), on this machine, alone.",
    ]
    write_results("federated", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
