"""The runs of ``benchmarks/federated.py`` (issue 27): a centralised or a federated run of the
benchmark's config with a stream's changes, in its own folder, read back when finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from _common import REPO

from medcl.config import validate_config
from medcl.engine.evaluate import evaluate
from medcl.engine.resume import restore_run
from medcl.engine.run import run
from medcl.engine.rundir import read_environments
from medcl.federated.launch import federate, site_nodes

CONFIG = REPO / "configs/federated-pneumonia-sites-replay.yaml"


def _merge(raw: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    for k, v in extra.items():
        out[k] = out.get(k, {}) | v if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def raw_config(extra: dict[str, Any], seed: int, root: Path, out: Path) -> dict[str, Any]:
    raw = _merge(yaml.safe_load(CONFIG.read_text()), extra)
    return raw | {"seed": seed, "output_dir": str(out), "data": {"root": str(root)}}


def central_run(extra, seed, root, work, quiet, scheduler="cosine", val=False) -> dict[str, Any]:
    """The centralised run (read back when finished); ``val``: also its final model's mean
    validation accuracy and balanced accuracy over the experiences (the scheduler's selection)."""
    work, extra = scheduled(work, extra, scheduler)
    raw = raw_config(extra, seed, root, work / "central")
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
    score = balanced = None
    if val:
        _, scenario, strategy, _, _ = restore_run(run_dir, command="benchmarks/federated.py")
        strategy.eval()
        rows = evaluate(strategy, scenario.experiences, split="val", quiet=True)
        score = float(np.mean([e.accuracy for e in rows]))
        balanced = float(np.mean([e.balanced_accuracy for e in rows]))
    return {
        "val": score,
        "val_balanced": balanced,
        "final": metrics["accuracy_matrix"][-1],
        "learned": _learned(metrics["accuracy_matrix"]),
        "updates": sum(f["updates"] for f in metrics["fit"]),
        "seconds": metrics["timing"]["total"],  # the run's own record (also when read back)
        "cpu": kernel_paths(run_dir),
    }


def scheduled(work: Path, extra: dict[str, Any], scheduler: str) -> tuple[Path, dict[str, Any]]:
    """``train.scheduler`` for a run: the config's (cosine) as it is, else in its own folder."""
    if scheduler == "cosine":
        return work, extra
    train = extra.get("train", {}) | {"scheduler": scheduler}
    return work / f"sched-{scheduler}", extra | {"train": train}


def _learned(matrix: list[list[float | None]]) -> list[float | None]:
    """Accuracy on each experience right after it was learned (the matrix's diagonal)."""
    return [row[j] for j, row in enumerate(matrix)]


def kernel_paths(run_dir: Path) -> list[str]:
    """torch's CPU kernel path (``cpu_capability``: AVX2, AVX512, ...) of every process that
    wrote to ``run_dir`` (its own ``environment.json`` and its sites'), as recorded: the same
    run on another path gives other trained numbers."""
    envs = Path(run_dir).rglob("environment.json")
    return sorted({str(e.get("cpu_capability")) for f in envs for e in read_environments(f.parent)})


def _unfinished(run_dir: Path) -> bool:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return len(metrics["accuracy_matrix"]) < len(metrics["experiences"])


def federated_run(extra, seed, root, work, quiet, engine="simulation") -> dict[str, Any]:
    raw = raw_config(extra, seed, root, work / "federated")
    if "name" in raw:
        raw["name"] = f"{raw['name']}-s{seed}"
    raw["federation"] = raw["federation"] | {"engine": engine}
    cfg = validate_config(raw)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    record_file = run_dir / "federation.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    if record is None or len(record["accuracy_matrix"]) < len(record["experiences"]):
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
        "final_val_balanced": (record.get("pooled_val_balanced") or [[]])[-1],
        "site_accuracy": record["site_accuracy"],
        "updates": updates,
        "cpu": kernel_paths(run_dir),
        "seconds": sum(r["seconds"] for r in record["rounds"]),  # rounds, without start-up
        "bytes_per_round": float(np.mean([r["bytes_down"] + r["bytes_up"] for r in train])),
        "bytes_per_site_message": float(
            np.mean([(r["bytes_down"] + r["bytes_up"]) / max(len(r["sites"]), 1) for r in train])
        ),
    }


def arm_run(
    extra, lr: float, batchnorm: str, seed, root, work, quiet, scheduler="cosine", nova=False
):
    """The federated run with server learning rate ``lr`` (1: plain FedAvg, else FedAvgM's
    server step) or FedNova (``nova``), ``federation.batchnorm`` and ``train.scheduler``, each
    in its own folder."""
    work, extra = scheduled(work, extra, scheduler)
    fed = dict(extra.get("federation", {}))
    if batchnorm != "mean":
        fed, work = fed | {"batchnorm": batchnorm}, work / f"bn-{batchnorm}"
    if nova:
        fed, work = fed | {"aggregation": "fednova"}, work / "fednova"
    elif lr != 1:
        fed, work = fed | {"aggregation": "fedavgm", "server_lr": lr}, work / f"fedavgm-lr{lr:g}"
    return federated_run(extra | {"federation": fed}, seed, root, work, quiet)
