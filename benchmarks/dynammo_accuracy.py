"""Accuracy and inference cost of DynaMMo vs ACL, DER, replay, fine-tune and joint.

Every method runs through :func:`medcl.engine.run.run` with the same backbone, epochs, batch size,
optimiser and replay memory (configs built in code, see :func:`make_config`); each row reports
average accuracy (ACC, last row of R), final accuracy (all test images of the final model),
average incremental accuracy, forgetting, and the final deployable model's parameters, MACs
(FlopCounterMode) and batch-1 CPU latency from the run's ``metrics.json``.

Runs are resumable: a finished run directory is read back instead of retrained, an unfinished
one is resumed, and the results files are rewritten after every run, so a grid cut short still
reports what finished. Writes ``benchmarks/results/dynammo_accuracy.{json,md}``.

Targets (issue 4): DynaMMo within 1.0 point of ACL's average accuracy at <= 1/T of ACL's MACs;
DynaMMo above replay and fine-tune.

    nice python benchmarks/dynammo_accuracy.py [--scenarios medmnist-cross3 pneumonia-sites]
        [--methods dynammo acl ...] [--backbone test_resnet] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import UndefinedMetricWarning

from medcl.config import RunConfig
from medcl.engine.run import run

#: label -> (strategy name, strategy options)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {  # in run order: key comparisons first
    "dynammo-mean": ("dynammo", {"merge": "mean"}),
    "acl": ("acl", {}),
    "replay": ("replay", {}),
    "finetune": ("finetune", {}),
    "der": ("der", {}),
    "dynammo-weighted": ("dynammo", {"merge": "weighted"}),
    "dynammo-ties": ("dynammo", {"merge": "ties"}),
    "joint": ("joint", {}),
}


def make_config(scenario: str, label: str, args: argparse.Namespace) -> RunConfig:
    """The one config shared by every method, but for the strategy section."""
    name, options = METHODS[label]
    return RunConfig.model_validate(
        {
            "name": f"{scenario}-{label}-s{args.seed}",
            "seed": args.seed,
            "output_dir": str(args.work_dir),
            "scenario": {"name": scenario},  # both presets are 28 px
            "strategy": {"name": name, **options},
            "model": {"backbone": args.backbone, "small_input": True},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "optimizer": "sgd",
                "augment": "light",
                "max_updates": args.max_updates,
                "num_threads": args.threads,
            },
            "memory": {"size": args.memory, "selection": "random"},
            "data": {"root": args.data_root},
        }
    )


def row_from_run(run_dir: Path, scenario: str, label: str) -> dict[str, Any]:
    m = json.loads((run_dir / "metrics.json").read_text())
    sizes = np.array(
        [e["test"] for e in json.loads((run_dir / "scenario.json").read_text())["experiences"]]
    )
    R = np.array(m["accuracy_matrix"], dtype=float)
    T = len(R)
    s = m["summary"]
    return {
        "scenario": scenario,
        "method": label,
        "experiences_done": T,
        "complete": len(sizes) == T,
        "average_accuracy": 100 * s["average_accuracy"],
        "final_accuracy": 100 * float((R[-1, :T] * sizes[:T]).sum() / sizes[:T].sum()),
        "average_incremental_accuracy": 100 * s["average_incremental_accuracy"],
        "forgetting": 100 * s["forgetting"] if T > 1 else float("nan"),
        "parameters": m["compute"]["parameters"],
        "macs": m["compute"]["macs"],
        "latency_ms_b1": m["compute"].get("latency_ms_b1", float("nan")),
        "train_seconds": sum(f["seconds"] for f in m["fit"]),
    }


def check_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets per scenario, from whatever rows are complete."""
    out: dict[str, Any] = {}
    for sc in sorted({r["scenario"] for r in rows}):
        by = {r["method"]: r for r in rows if r["scenario"] == sc and r["complete"]}
        if "dynammo-mean" not in by:
            continue
        d, t = by["dynammo-mean"], by["dynammo-mean"]["experiences_done"]
        res: dict[str, Any] = {}
        if "acl" in by:
            res["acc_gap_vs_acl"] = d["average_accuracy"] - by["acl"]["average_accuracy"]
            res["within_1pt_of_acl"] = res["acc_gap_vs_acl"] >= -1.0
            res["macs_ratio_acl_over_dynammo"] = by["acl"]["macs"] / d["macs"]
            # both run all T heads, so DynaMMo = ACL / T up to the heads' few MACs
            res["dynammo_macs_x_T_over_acl"] = d["macs"] * t / by["acl"]["macs"]
            res["macs_le_acl_over_T_within_0.1pct"] = res["dynammo_macs_x_T_over_acl"] <= 1.001
        for base in ("replay", "finetune"):
            if base in by:
                res[f"above_{base}"] = d["average_accuracy"] > by[base]["average_accuracy"]
        out[sc] = res
    return out


def to_markdown(
    rows: list[dict[str, Any]], targets: dict[str, Any], args: argparse.Namespace
) -> str:
    lines = [
        f"# DynaMMo accuracy ({args.backbone}, 28 px, {args.epochs} epoch(s)/experience, "
        f"batch {args.batch_size}, memory {args.memory}, seed {args.seed})",
        "",
        "| scenario | method | ACC % | final % | AIA % | forgetting | params (M) | MMACs | "
        "latency ms | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = "" if r["complete"] else f" (after {r['experiences_done']} exp.)"
        lines.append(
            f"| {r['scenario']} | {r['method']}{flag} | {r['average_accuracy']:.1f} | "
            f"{r['final_accuracy']:.1f} | {r['average_incremental_accuracy']:.1f} | "
            f"{r['forgetting']:.1f} | {r['parameters'] / 1e6:.2f} | {r['macs'] / 1e6:.1f} | "
            f"{r['latency_ms_b1']:.1f} | {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "MACs: exact counts (FlopCounterMode). Latency: batch-1 CPU wall clock on a shared "
        "machine, noisy. train s: the training loops' time (stage 1), from metrics.json.",
        "",
        "Targets (DynaMMo = dynammo-mean):",
        "",
    ]
    for sc, res in targets.items():
        lines.append(
            f"- {sc}: "
            + ", ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
            )
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=["medmnist-cross3", "pneumonia-sites"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--backbone", default="test_resnet")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--max-updates", type=int, default=None, help="cap on updates per experience")
    p.add_argument("--memory", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", type=Path, default=None, help="default: $MEDCL_DATA_ROOT")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench-dynammo"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.quiet:
        warnings.filterwarnings("ignore", category=UndefinedMetricWarning)  # T=1 forgetting etc.
    rows: list[dict[str, Any]] = []
    for label in args.methods:  # method-major: a grid cut short still covers every scenario
        for scenario in args.scenarios:
            cfg = make_config(scenario, label, args)
            run_dir = run(cfg, resume=True, quiet=args.quiet)
            rows.append(row_from_run(run_dir, scenario, label))
            targets = check_targets(rows)
            result = {
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "rows": rows,
                "targets": targets,
            }
            (args.out / "dynammo_accuracy.json").write_text(
                json.dumps(result, indent=1, default=float)
            )
            (args.out / "dynammo_accuracy.md").write_text(to_markdown(rows, targets, args))
            if not args.quiet:
                r = rows[-1]
                print(
                    f"== {scenario} {label}: ACC {r['average_accuracy']:.1f} final "
                    f"{r['final_accuracy']:.1f} forgetting {r['forgetting']:.1f} "
                    f"MACs {r['macs'] / 1e6:.1f}M (trained in {r['train_seconds']:.0f}s)",
                    flush=True,
                )
    if not args.quiet:
        print((args.out / "dynammo_accuracy.md").read_text())


if __name__ == "__main__":
    main()
