"""Subspace-Connectivity vs replay, MC-SGD and ensembles on medmnist-cross3 and pneumonia-sites.

Rows (every one a ``medcl.engine.run.run`` with the same backbone, epochs, batch size, learning
rate, gradient clip and replay budget; the budget is the subspace's stage-2 buffer, MC-SGD's
episodic memory and the replay of ``replay``/``ensemble``):

- ``replay``: single-model experience replay;
- ``mcsgd``: MC-SGD (linear-mode-connectivity baseline);
- ``subspace-line`` / ``subspace-simplex``: S-C, midpoint inference, n = 2 / n = 3 endpoints;
- ``subspace-sampled``: S-C (line), inference by the ensemble of ``--n-models`` sampled points;
- ``ensemble``: ``--n-models`` independently initialised networks, each trained with replay.

``replay``, ``subspace-line`` and ``ensemble`` run ``--seeds`` seeds (mean ± sd), the others the
first seed only. Columns: average accuracy A_T (mean of the last row of the accuracy matrix),
final accuracy, forgetting, inference MACs, batch-1 latency of the deployable model, and time:
``fit_s`` is the trainer's loop, ``wall_s`` the whole run (including S-C's connectivity stage,
BatchNorm re-estimation and the evaluations). Targets (computed from these numbers):

- midpoint ≥ replay (A_T, seed means) on each stream;
- midpoint within 1 point of the vanilla ensemble (A_T, seed means), at 1/n of its MACs;
- midpoint ≥ MC-SGD (A_T, first seed).

Writes ``<out>/subspace.{json,md}`` (default ``benchmarks/results``). ``--quick`` is a smoke run
(3 updates per experience, one seed, memory ≤ 40, small stage-2 sets); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, data_root, json_text, machine, markdown_table

from medcl.config import validate_config
from medcl.engine.run import run

SCENARIOS = ["medmnist-cross3", "pneumonia-sites"]
MULTI_SEED = {"replay", "subspace-line", "ensemble"}
COLUMNS = ["scenario", "method", "seeds", "average_accuracy", "final_accuracy", "forgetting",
           "macs", "latency_ms", "fit_s", "wall_s"]  # fmt: skip


def methods(n_models: int) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "replay": ("replay", {}),
        "mcsgd": ("mcsgd", {}),
        "subspace-line": ("subspace", {"n_endpoints": 2}),
        "subspace-simplex": ("subspace", {"n_endpoints": 3}),
        "subspace-sampled": (
            "subspace",
            {"n_endpoints": 2, "inference": "sampled", "ensemble_size": n_models},
        ),
        "ensemble": ("ensemble", {"n_models": n_models}),
    }


def one_run(
    args: argparse.Namespace, out: Path, scenario: str, method: str, strategy: dict, seed: int
) -> dict:
    train = {"epochs": args.epochs, "batch_size": 64, "lr": 0.05, "grad_clip_norm": 5.0}
    memory = min(args.memory, 40) if args.quick else args.memory
    if args.quick:
        train["max_updates"] = 3
        if strategy["name"] in ("subspace", "mcsgd"):
            strategy = {**strategy, "subset_size": 64, "bn_samples": 64}
    cfg = validate_config(
        {
            "name": f"{scenario}-{method}-s{seed}",
            "seed": seed,
            "output_dir": str(out),
            "scenario": {"name": scenario},
            "strategy": strategy,
            "model": {"backbone": args.backbone, "small_input": True},
            "train": train,
            "memory": {"size": memory, "selection": "herding"},
            "data": {"root": str(data_root(args.root))},
        }
    )
    t0 = time.perf_counter()
    run_dir = run(cfg, quiet=True)
    wall = time.perf_counter() - t0
    m = json.loads((run_dir / "metrics.json").read_text())
    s, c = m["summary"], m["compute"]
    return {
        "average_accuracy": s["average_accuracy"],
        "final_accuracy": s["final_accuracy"],
        "forgetting": s["forgetting"],
        "macs": c["macs"],
        "parameters": c["parameters"],
        "latency_ms": c.get("latency_ms_b1"),
        "fit_s": sum(f["seconds"] for f in m["fit"]),
        "wall_s": wall,
    }


def aggregate(runs: list[dict]) -> dict[str, Any]:
    """Mean (and sd over seeds, when more than one) of every measured column."""
    out: dict[str, Any] = {"seeds": len(runs)}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        if not values:
            out[key] = None
            continue
        out[key] = statistics.fmean(values)
        if len(values) > 1 and key in ("average_accuracy", "final_accuracy", "forgetting"):
            out[f"{key}_sd"] = statistics.stdev(values)
    return out


def targets(rows: list[dict], n_models: int) -> list[dict]:
    by = {(r["scenario"], r["method"]): r for r in rows}
    out = []
    for scenario in sorted({r["scenario"] for r in rows}):
        mid, rep, ens = (by.get((scenario, k)) for k in ("subspace-line", "replay", "ensemble"))
        mc = by.get((scenario, "mcsgd"))
        if mid and rep:
            gap = mid["average_accuracy"] - rep["average_accuracy"]
            out.append({"name": f"{scenario}: midpoint A_T - replay A_T", "value": gap,
                        "goal": ">= 0", "met": gap >= 0})  # fmt: skip
        if mid and ens:
            gap = 100 * (ens["average_accuracy"] - mid["average_accuracy"])
            out.append({"name": f"{scenario}: ensemble A_T - midpoint A_T (points)", "value": gap,
                        "goal": "<= 1", "met": gap <= 1})  # fmt: skip
            ratio = ens["macs"] / mid["macs"]
            out.append({"name": f"{scenario}: ensemble MACs / midpoint MACs", "value": ratio,
                        "goal": f">= {n_models}", "met": ratio >= n_models})  # fmt: skip
        if mid and mc:
            gap = mid["seed0_average_accuracy"] - mc["average_accuracy"]
            out.append({"name": f"{scenario}: midpoint A_T - MC-SGD A_T (first seed)",
                        "value": gap, "goal": ">= 0", "met": gap >= 0})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for subspace.{json,md}")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--backbone", default="test_resnet")
    ap.add_argument("--memory", type=int, default=200)
    ap.add_argument("--n-models", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scenarios", nargs="*", default=SCENARIOS)
    ap.add_argument("--methods", nargs="*", default=None, help="subset of the rows")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 updates, one seed")
    args = ap.parse_args()
    seeds = list(range(1 if args.quick else args.seeds))

    tmp = Path(tempfile.mkdtemp(prefix="medcl-subspace-"))
    rows = []
    try:
        for scenario in args.scenarios:
            for method, (name, opts) in methods(args.n_models).items():
                if args.methods and method not in args.methods:
                    continue
                runs = [
                    one_run(args, tmp, scenario, method, {"name": name, **opts}, seed)
                    for seed in (seeds if method in MULTI_SEED else seeds[:1])
                ]
                row = {"scenario": scenario, "method": method, **aggregate(runs)}
                row["seed0_average_accuracy"] = runs[0]["average_accuracy"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    goals = targets(rows, args.n_models)
    memory = min(args.memory, 40) if args.quick else args.memory  # as in one_run
    table = [
        {**r, **{k: f"{r[k]:.4f} ± {r[k + '_sd']:.4f}" for k in
                 ("average_accuracy", "final_accuracy", "forgetting") if k + "_sd" in r}}
        for r in rows
    ]  # fmt: skip
    md = (
        "# Subspace ensembles (Subspace-Connectivity) vs replay, MC-SGD, vanilla ensemble\n\n"
        f"Backbone {args.backbone} (small input), {args.epochs} epoch(s) per experience, batch 64, "
        f"SGD lr 0.05 cosine, gradient clip 5, memory {memory} (herding), ensembles of "
        f"{args.n_models}; seeds {seeds} for replay, subspace-line and ensemble, seed 0 for the "
        "rest (mean ± sd). Accuracy is task-agnostic; MACs and latency (ms, batch 1) are the "
        "deployable model's; fit_s is the training loop, wall_s the whole run."
        + (" **Smoke run (--quick): the numbers mean nothing.**" if args.quick else "")
        + "\n\n"
        + markdown_table(table, COLUMNS)
        + "\n\n## Targets\n\n"
        + markdown_table(goals, ["name", "value", "goal", "met"])
    )
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "args": {**vars(args), "out": str(args.out)},
               "rows": rows, "targets": goals}  # fmt: skip
    (args.out / "subspace.json").write_text(json_text(payload))
    (args.out / "subspace.md").write_text(md.rstrip() + "\n")
    print(md)


if __name__ == "__main__":
    main()
