"""Stability gap of vanilla rehearsal vs SGM and SGM minus each component (Harun & Kanan 2024).

For each scenario every variant is trained with ``medcl.engine.run.run`` from
``configs/<scenario>-sgm.yaml`` with the settings below (same backbone, memory, optimiser and
update budget for all), evaluating old/new/all accuracy every ``--eval-every`` updates. A joint
(cumulative) run gives the upper bound per experience: its old/new/all accuracy at the end of
that experience (``--upper-bound 1.0`` uses 1.0 instead). Metrics come from
:func:`medcl.metrics.stability.summarize_stability`, whose pre-update level is the previous
experience's last evaluation (exact here: the update budget is a multiple of ``--eval-every``),
so ``max_drop`` includes ``init_drop``, what growing/initialising the head costs before the
first update.

Targets (issue): SGM's stability gap <= 1/5 of vanilla's; SGM's final accuracy (ACC, mean over
experiences) >= vanilla's - 0.5 points. Writes ``benchmarks/results/stability_gap.{json,md}`` and
``stability_gap_<scenario>.png``; run directories (resumable) go to ``--work-dir``.

    nice python benchmarks/stability_gap.py [--scenarios medmnist-cross3 pneumonia-sites]
        [--variants vanilla sgm ...] [--max-updates 50] [--eval-every 5] [--quiet]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from sklearn.exceptions import UndefinedMetricWarning

from medcl.config import validate_config
from medcl.engine.run import run
from medcl.metrics.stability import plot_stability_curves, stability_metrics, summarize_stability

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, data_root, markdown_table, write_results

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vanilla": ("rehearsal", {}),
    "sgm": ("sgm", {}),
    "sgm-no-init": ("sgm", {"data_driven_init": False}),
    "sgm-no-soft": ("sgm", {"soft_targets": False}),
    "sgm-no-lora": ("sgm", {"lora": False}),
    "sgm-no-freeze": ("sgm", {"freeze_old_units": False}),
    # the paper's literal init (no feature centring); only differs where new classes arrive
    "sgm-literal-init": ("sgm", {"init_centering": False}),
}
NEW_CLASSES_ONLY = {"sgm-literal-init"}
SGM_SWITCHES = ("data_driven_init", "init_centering", "soft_targets", "lora", "freeze_old_units")


def config_for(scenario: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "configs" / f"{scenario}-sgm.yaml").read_text())
    name, options = ("joint", {}) if variant == "joint" else VARIANTS[variant]
    shared = {"trainable_stages": args.trainable_stages} if name != "joint" else {}
    lora = {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha} if name == "sgm" else {}
    switches = {k: raw["strategy"][k] for k in SGM_SWITCHES} if name == "sgm" else {}
    raw.update(
        name=variant,
        seed=args.seed,
        output_dir=str(args.work_dir / scenario),
        strategy={"name": name, **switches, **shared, **lora, **options},
        model={"backbone": args.backbone, "small_input": True},
        data={"root": str(data_root(args.root))},
        memory={"size": args.memory_size if name != "joint" else 0, "selection": "random"},
        train={
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "max_updates": args.max_updates,
            "optimizer": args.optimizer,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "scheduler": "cosine",
            "augment": "light",
            "eval_every": args.eval_every,
            "eval_max_samples": args.eval_max_samples,
            "num_threads": args.threads,
        },
    )
    return raw


def train(scenario: str, variant: str, args: argparse.Namespace) -> tuple[pd.DataFrame, dict]:
    """Run (or resume, or reuse) one variant; return its curves and metrics."""
    cfg = validate_config(config_for(scenario, variant, args))
    start = time.perf_counter()
    run_dir = run(cfg, resume=True, quiet=args.quiet)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["bench_seconds"] = time.perf_counter() - start
    metrics["kind"] = json.loads((run_dir / "scenario.json").read_text())["kind"]
    return pd.read_csv(run_dir / "curves.csv"), metrics


def upper_bounds(joint: pd.DataFrame) -> dict[str, dict[int, float]]:
    """Joint model's old/new/all accuracy at its last evaluation of each experience >= 1."""
    last = joint.sort_values("update").groupby("experience").tail(1).set_index("experience")
    last = last.loc[last.index >= 1]
    return {
        k: {int(e): float(v) for e, v in last[f"{k}_acc"].items()} for k in ("old", "new", "all")
    }


def score(curves: pd.DataFrame, metrics: dict, bounds: dict | float) -> dict[str, Any]:
    R = np.array(metrics["accuracy_matrix"])
    row = summarize_stability(curves, upper_bound=bounds, tol=0.01)
    row |= {
        "final_acc": float(R[-1].mean()),
        "train_seconds": float(sum(f["seconds"] for f in metrics["fit"])),
    }
    return row


def scenario_block(scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    curves, metrics = {}, {}
    for variant in [*args.variants, "joint"]:  # joint last: SGM vs vanilla shows up first
        if (
            variant in NEW_CLASSES_ONLY
            and metrics
            and next(iter(metrics.values()))["kind"] == "domain"
        ):
            continue  # no new classes after experience 0: identical to "sgm"
        if not args.quiet:
            print(f"== {scenario} / {variant}", flush=True)
        curves[variant], metrics[variant] = train(scenario, variant, args)
    bounds = upper_bounds(curves["joint"]) if args.upper_bound == "joint" else 1.0
    rows = {v: score(curves[v], metrics[v], bounds) for v in curves}
    per_exp = {
        v: stability_metrics(curves[v], upper_bound=bounds).to_dict("records") for v in curves
    }
    fig = Figure(figsize=(4.2 * 4, 3.2 * 2), layout="constrained")
    for i, v in enumerate(curves):
        ax = fig.add_subplot(2, 4, i + 1)
        plot_stability_curves(curves[v], ax, title=v)
        ax.set_ylim(0, 1.02)
    fig.suptitle(f"{scenario}: accuracy every {args.eval_every} updates (dashed: new experience)")
    fig.savefig(RESULTS / f"stability_gap_{scenario}.png", dpi=110)
    van, sgm = rows.get("vanilla"), rows.get("sgm")
    targets = {}
    if van and sgm:
        targets = {
            "stability_gap_ratio": (
                sgm["stability_gap"] / van["stability_gap"] if van["stability_gap"] > 0 else np.nan
            ),
            "stability_gap_ratio_met": bool(sgm["stability_gap"] <= van["stability_gap"] / 5),
            "final_acc_delta_points": 100 * (sgm["final_acc"] - van["final_acc"]),
            "final_acc_met": bool(sgm["final_acc"] >= van["final_acc"] - 0.005),
        }
    return {
        "upper_bound": bounds,
        "summary": rows,
        "per_experience": per_exp,
        "targets": targets,
        "accuracy_matrix": {v: metrics[v]["accuracy_matrix"] for v in curves},
    }


COLUMNS = [
    "variant",
    "stability_gap",
    "plasticity_gap",
    "continual_knowledge_gap",
    "min_old_acc",
    "max_drop",
    "init_drop",
    "updates_to_recover",
    "n_not_recovered",
    "final_acc",
    "train_seconds",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=["medmnist-cross3", "pneumonia-sites"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--upper-bound", choices=["joint", "1.0"], default="joint")
    p.add_argument("--backbone", default="test_resnet")
    p.add_argument("--trainable-stages", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--epochs", type=int, default=20, help="high: --max-updates is the budget")
    p.add_argument("--max-updates", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--memory-size", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-max-samples", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="MedMNIST folder (default: $MEDCL_DATA_ROOT)")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "stability_gap")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.quiet:  # T = 1 summaries after the first experience warn that BWT etc. are undefined
        warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
    if args.max_updates % args.eval_every:
        p.error("--max-updates must be a multiple of --eval-every (the last update is evaluated)")
    if args.upper_bound == "1.0":
        args.upper_bound = 1.0
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {s: scenario_block(s, args) for s in args.scenarios}
    md = [
        f"# Stability gap: vanilla rehearsal vs SGM (seed {args.seed})",
        "",
        f"{args.backbone} (small input, 28 px), last {args.trainable_stages} stages plastic, "
        f"{args.max_updates} updates/experience of {args.batch_size} new + {args.batch_size} "
        f"replayed images, memory {args.memory_size}, {args.optimizer} lr {args.lr}; evaluation "
        f"every {args.eval_every} updates on <= {args.eval_max_samples} test images per "
        f"experience. Gaps are relative to the {args.upper_bound} upper bound; accuracies are "
        "fractions; updates_to_recover: mean over experiences that recovered to within 1 point.",
    ]
    for s, r in results.items():
        rows = [{"variant": v, **m} for v, m in r["summary"].items()]
        md += [
            "",
            f"## {s}",
            "",
            markdown_table(rows, COLUMNS),
            "",
            f"targets: {r['targets']}",
            "",
            f"![{s}](stability_gap_{s}.png)",
        ]
    write_results(
        "stability_gap",
        {"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
        "\n".join(md),
    )
    if not args.quiet:
        print("\n".join(md))


if __name__ == "__main__":
    main()
