"""DynaMMo on a pretrained backbone, as its paper ran it: vs ACL, DER, replay, fine-tune, joint.

Every method runs through :func:`medcl.engine.run.run` on ImageNet-pretrained EfficientNet-Lite0
(offline weights, ``model.pretrained: efficientnet_lite0``) at 64 px, with the same epochs,
batch size, memory (200, herding) and augmentation. Adapter methods (DynaMMo, ACL, "no adapters")
freeze the backbone from experience 0 on (``backbone_init: pretrained``); replay, fine-tune, DER
and joint train the whole pretrained network.

Hyper-parameters are chosen on the **validation** splits, never on test: for each stream, the
learning rate of the adapter family (DynaMMo-mean) and of the full-network family (replay) is
picked from ``--lr-grid`` by the final model's mean validation accuracy over experiences (seed
0), and shared by every method of that family. ``--seeds`` (3 by default) run DynaMMo-mean, ACL
and replay; the other rows run the first seed only.

Columns: average accuracy (ACC: mean over experiences of the final model's test accuracy),
final accuracy (all test images), forgetting, deployable parameters and MACs (FlopCounterMode),
batch-1 CPU latency, training-loop time and wall time. Runs are resumable: finished run
directories are read back, so ``--scenarios`` can be split over processes and a last call
without training (same arguments) writes the combined results.

Targets (issue 10), computed from the rows:
- DynaMMo ACC within 1.0 point of ACL's, at <= ACL's MACs / T plus one adapter set's MACs;
- DynaMMo ACC >= replay's on both streams;
- DynaMMo ACC - "no adapters" ACC > the sd of DynaMMo's seeds (the adapters matter);
- deployable MACs growth T = 1 -> 10 <= 5 % (EfficientNet-Lite0, 64 px).

    nice python benchmarks/dynammo_pretrained.py [--scenarios medmnist-cross3 pneumonia-sites]
        [--seeds 0 1 2] [--epochs 1] [--threads 2] [--quiet]
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results

from medcl.config import RunConfig
from medcl.engine.evaluate import evaluate
from medcl.engine.resume import restore_run
from medcl.engine.run import run
from medcl.metrics.compute import count_macs
from medcl.models.backbones import create_backbone
from medcl.strategies import ExperienceInfo, create_strategy

BACKBONE, WEIGHTS, SIZE = "tf_efficientnet_lite0", "efficientnet_lite0", 64
FROZEN = {"backbone_init": "pretrained"}
#: label -> (strategy, options, family, all seeds?), in run order (key comparisons first)
METHODS: dict[str, tuple[str, dict[str, Any], str, bool]] = {
    "dynammo-mean": ("dynammo", {"merge": "mean", **FROZEN}, "adapters", True),
    "acl": ("acl", FROZEN, "adapters", True),
    "replay": ("replay", {}, "full", True),
    "no-adapters": ("dynammo", {"use_adapters": False, **FROZEN}, "adapters", False),
    "dynammo-weighted": ("dynammo", {"merge": "weighted", **FROZEN}, "adapters", False),
    "dynammo-ties": ("dynammo", {"merge": "ties", **FROZEN}, "adapters", False),
    "finetune": ("finetune", {}, "full", False),
    "der": ("der", {}, "full", False),
    "joint": ("joint", {}, "full", False),
}
SELECT_WITH = {"adapters": "dynammo-mean", "full": "replay"}


def make_config(scenario: str, label: str, lr: float, seed: int, args) -> RunConfig:
    name, options, _, _ = METHODS[label]
    return RunConfig.model_validate(
        {
            "name": f"{scenario}-{label}-lr{lr:g}-s{seed}",
            "seed": seed,
            "output_dir": str(args.work_dir),
            "scenario": {"name": scenario, "image_size": SIZE},
            "strategy": {"name": name, **options},
            "model": {"backbone": BACKBONE, "pretrained": WEIGHTS, "small_input": False},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": lr,
                "optimizer": "sgd",
                "augment": "light",
                "num_threads": args.threads,
                "max_updates": args.max_updates,
            },
            "memory": {"size": args.memory, "selection": "herding"},
            "data": {"root": args.data_root},
        }
    )


def train(scenario: str, label: str, lr: float, seed: int, args) -> Path:
    """Run (or resume, or read back) one configuration; cache its validation accuracy."""
    start = time.perf_counter()
    run_dir = run(make_config(scenario, label, lr, seed, args), resume=True, quiet=args.quiet)
    val_file = run_dir / "bench_val.json"
    if not val_file.is_file():
        _, sc, strategy, _, _ = restore_run(run_dir)
        val = [e.accuracy for e in evaluate(strategy, sc.experiences, split="val")]
        wall = time.perf_counter() - start
        val_file.write_text(json.dumps({"val_accuracy": val, "wall_seconds": wall}))
    return run_dir


def row(run_dir: Path) -> dict[str, Any]:
    m = json.loads((run_dir / "metrics.json").read_text())
    bench = json.loads((run_dir / "bench_val.json").read_text())
    sizes = np.array(
        [e["test"] for e in json.loads((run_dir / "scenario.json").read_text())["experiences"]]
    )
    R = np.array(m["accuracy_matrix"], dtype=float)
    return {
        "average_accuracy": 100 * m["summary"]["average_accuracy"],
        "final_accuracy": 100 * float((R[-1] * sizes).sum() / sizes.sum()),
        "forgetting": 100 * m["summary"]["forgetting"],
        "val_accuracy": 100 * float(np.mean(bench["val_accuracy"])),
        "parameters": m["compute"]["parameters"],
        "macs": m["compute"]["macs"],
        "latency_ms_b1": m["compute"].get("latency_ms_b1", float("nan")),
        "train_seconds": sum(f["seconds"] for f in m["fit"]),
        "wall_seconds": bench["wall_seconds"],
        "experiences": len(R),
    }


def select_lr(scenario: str, family: str, args) -> tuple[float, dict[str, float]]:
    """The grid's learning rate with the best mean validation accuracy (seed ``seeds[0]``)."""
    label, seed = SELECT_WITH[family], args.seeds[0]
    scores = {
        lr: row(train(scenario, label, lr, seed, args))["val_accuracy"] for lr in args.lr_grid
    }
    return max(scores, key=scores.get), {f"{k:g}": v for k, v in scores.items()}


def macs_growth() -> dict[str, float]:
    """Deployable MACs of DynaMMo at T = 1 and 10 (one class per experience) on the backbone."""
    backbone = create_backbone(BACKBONE, in_chans=3, pretrained=WEIGHTS)
    s = create_strategy("dynammo", backbone, **FROZEN)
    macs = {}
    for t in range(10):
        s.grow(ExperienceInfo(t, f"e{t}", t, (t,), t + 1))
        if t in (0, 9):
            macs[t + 1] = count_macs(s.deployable_model(), (3, SIZE, SIZE))
    return {"macs_T1": macs[1], "macs_T10": macs[10], "growth": macs[10] / macs[1] - 1}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd over seeds per (scenario, method)."""
    out = []
    keys = sorted({(r["scenario"], r["method"]) for r in rows}, key=lambda k: (k[0], 0))
    order = list(METHODS)
    keys.sort(key=lambda k: (k[0], order.index(k[1])))
    for sc, method in keys:
        rs = [r for r in rows if r["scenario"] == sc and r["method"] == method]
        agg: dict[str, Any] = {
            "scenario": sc,
            "method": method,
            "seeds": len(rs),
            "lr": rs[0]["lr"],
        }
        for k in ("average_accuracy", "final_accuracy", "forgetting", "val_accuracy"):
            v = np.array([r[k] for r in rs])
            agg[k] = float(v.mean())
            agg[f"{k}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else None
        for k in ("parameters", "macs", "latency_ms_b1", "train_seconds", "wall_seconds"):
            agg[k] = float(np.median([r[k] for r in rs]))
        agg["experiences"] = rs[0]["experiences"]
        out.append(agg)
    return out


def targets(summary: list[dict[str, Any]], growth: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for sc in sorted({s["scenario"] for s in summary}):
        by = {s["method"]: s for s in summary if s["scenario"] == sc}
        if "dynammo-mean" not in by:
            continue
        d = by["dynammo-mean"]
        if "acl" in by:
            gap = d["average_accuracy"] - by["acl"]["average_accuracy"]
            out.append(_t(f"{sc}: DynaMMo ACC - ACL ACC (points)", gap, ">= -1.0", gap >= -1.0))
            if "no-adapters" in by:
                one_set = d["macs"] - by["no-adapters"]["macs"]  # the merged adapter set's MACs
                bound = by["acl"]["macs"] / d["experiences"] + one_set
                out.append(
                    _t(
                        f"{sc}: DynaMMo MACs / (ACL MACs / T + one adapter set)",
                        d["macs"] / bound,
                        "<= 1",
                        d["macs"] <= bound,
                    )
                )
        if "replay" in by:
            gap = d["average_accuracy"] - by["replay"]["average_accuracy"]
            out.append(_t(f"{sc}: DynaMMo ACC - replay ACC (points)", gap, ">= 0", gap >= 0))
        if "no-adapters" in by:
            gain = d["average_accuracy"] - by["no-adapters"]["average_accuracy"]
            sd = d["average_accuracy_sd"] or 0.0
            out.append(
                _t(
                    f"{sc}: DynaMMo ACC - no-adapters ACC (points), vs DynaMMo sd {sd:.2f}",
                    gain,
                    f"> {sd:.2f}",
                    bool(gain > sd),
                )
            )
    out.append(
        _t(
            "deployable MACs growth T=1 -> 10",
            growth["growth"],
            "<= 0.05",
            growth["growth"] <= 0.05,
        )
    )
    return out


def _t(name: str, value: float, goal: str, met: bool) -> dict[str, Any]:
    return {"name": name, "value": float(value), "goal": goal, "met": bool(met)}


def to_markdown(summary, tg, growth, lrs, args) -> str:
    def pm(s, k):
        sd = s[f"{k}_sd"]
        return f"{s[k]:.1f}" + ("" if sd is None else f" ± {sd:.1f}")

    table = [
        {
            "scenario": s["scenario"],
            "method": s["method"],
            "seeds": s["seeds"],
            "lr": f"{s['lr']:g}",
            "ACC %": pm(s, "average_accuracy"),
            "final %": pm(s, "final_accuracy"),
            "forgetting": pm(s, "forgetting"),
            "val %": pm(s, "val_accuracy"),
            "params (M)": f"{s['parameters'] / 1e6:.2f}",
            "MMACs": f"{s['macs'] / 1e6:.1f}",
            "latency ms": f"{s['latency_ms_b1']:.1f}",
            "train s": f"{s['train_seconds']:.0f}",
            "wall s": f"{s['wall_seconds']:.0f}",
        }
        for s in summary
    ]
    lines = [
        f"# DynaMMo on a pretrained backbone ({BACKBONE}, ImageNet weights `{WEIGHTS}`, {SIZE} px)",
        "",
        f"{args.epochs} epoch(s)/experience, batch {args.batch_size}, SGD + cosine, memory "
        f"{args.memory} (herding), light augmentation, {args.threads} thread(s). Mean ± sd over "
        f"seeds {args.seeds} where seeds = {len(args.seeds)}. Learning rate per family chosen on "
        f"the validation splits from {args.lr_grid}: {json.dumps(lrs)}.",
        "",
        markdown_table(table, list(table[0])),
        "",
        "ACC: mean over experiences of the final model's test accuracy; final: accuracy on all "
        "test images; val: the same as ACC on the validation splits (used for selection). MACs: "
        "FlopCounterMode on the deployable model. Latency, train s and wall s: medians, measured "
        "on a shared 2-core machine while other jobs ran (noisy).",
        "",
        f"DynaMMo deployable MACs at T=1: {growth['macs_T1'] / 1e6:.2f} M, at T=10: "
        f"{growth['macs_T10'] / 1e6:.2f} M (growth {100 * growth['growth']:.3f} %).",
        "",
        "## Targets",
        "",
        markdown_table(tg, ["name", "value", "goal", "met"]),
    ]
    return "\n".join(lines) + "\n"


def adapters_markdown(diagnostics: dict[str, list[dict[str, Any]]]) -> str:
    """DynaMMo's adapter sets after each experience: alpha per stage, drift from their init."""
    lines = ["", "## DynaMMo adapter sets (first seed)", ""]
    for sc, per_exp in diagnostics.items():
        rows = [
            {
                "after experience": t,
                "set": a["set"],
                **{f"alpha {k}": f"{v:.4f}" for k, v in a["alpha"].items()},
                "distance from init": f"{a['distance_from_init']:.4f}",
            }
            for t, d in enumerate(per_exp)
            for a in d.get("adapter_sets", [])
        ]
        if rows:
            lines += [f"### {sc}", "", markdown_table(rows, list(rows[0])), ""]
    lines.append(
        "distance from init: relative L2 distance of the set's weights from the set it was "
        "initialised from (set t-1, or the initial set for set 0)."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=["medmnist-cross3", "pneumonia-sites"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr-grid", nargs="+", type=float, default=[0.01, 0.05])
    p.add_argument("--memory", type=int, default=200)
    p.add_argument("--max-updates", type=int, default=None, help="smoke runs only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-root", type=Path, default=None, help="default: $MEDCL_DATA_ROOT")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench-dynammo-pretrained"))
    p.add_argument("--no-write", action="store_true", help="train only (parallel parts)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    rows, lrs = [], {}
    for sc in args.scenarios:
        chosen = {}
        for family in SELECT_WITH:
            chosen[family], scores = select_lr(sc, family, args)
            lrs[f"{sc}/{family}"] = {"chosen": chosen[family], "val_accuracy": scores}
        for label in args.methods:
            _, _, family, all_seeds = METHODS[label]
            for seed in args.seeds if all_seeds else args.seeds[:1]:
                run_dir = train(sc, label, chosen[family], seed, args)
                rows.append(
                    {"scenario": sc, "method": label, "seed": seed, "lr": chosen[family]}
                    | row(run_dir)
                )
                if not args.quiet:
                    r = rows[-1]
                    print(
                        f"== {sc} {label} s{seed}: ACC {r['average_accuracy']:.1f} final "
                        f"{r['final_accuracy']:.1f} val {r['val_accuracy']:.1f}",
                        flush=True,
                    )
    if args.no_write:
        return
    diagnostics = {
        sc: [f["diagnostics"] for f in json.loads((d / "metrics.json").read_text())["fit"]]
        for sc in args.scenarios
        if (
            d := args.work_dir
            / f"{sc}-dynammo-mean-lr{lrs[f'{sc}/adapters']['chosen']:g}-s{args.seeds[0]}"
        ).is_dir()
    }
    growth = macs_growth()
    summary = summarise(rows)
    tg = targets(summary, growth)
    payload = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "learning_rates": lrs,
        "macs_growth": growth,
        "adapter_diagnostics": diagnostics,
        "rows": rows,
        "summary": summary,
        "targets": tg,
    }
    md = to_markdown(summary, tg, growth, lrs, args) + adapters_markdown(diagnostics)
    write_results("dynammo_pretrained", payload, md)
    if not args.quiet:
        print(md)


if __name__ == "__main__":
    main()
