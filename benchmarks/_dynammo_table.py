"""Issue 22's DynaMMo table: the arms, a run directory read back as a row, and how rows become
summaries, paired differences, targets and the markdown page (``dynammo_pretrained.py`` trains)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPORTED_SEEDS, SELECTION_SEED, markdown_table, paired_difference

from medcl.metrics.continual import final_accuracy

#: label -> (strategy, options over the config's, lr family); run order: key comparisons first
METHODS: dict[str, tuple[str, dict[str, Any], str]] = {
    "dynammo-mean": ("dynammo", {"merge": "mean"}, "adapters"),
    "acl": ("acl", {}, "adapters"),
    "replay": ("replay", {}, "full"),
    "no-adapters": ("dynammo", {"merge": "mean", "use_adapters": False}, "adapters"),
    "dynammo-ties": ("dynammo", {"merge": "ties"}, "adapters"),
    "der": ("der", {}, "full"),
    "finetune": ("finetune", {}, "full"),
    "joint": ("joint", {}, "full"),
    # the labelled extra row: BreastMNIST from its native 64-px file, the others upsampled
    "dynammo-mean-native64": ("dynammo", {"merge": "mean"}, "adapters"),
}
KEY = ("dynammo-mean", "acl", "replay", "no-adapters")
#: extra rows -> the one stream they apply to (the only one with a native 64-px file)
NATIVE = {"dynammo-mean-native64": "medmnist-cross3"}
#: the arm whose validation accuracy picks each family's learning rate (selection seed)
SELECT_WITH = {"adapters": "dynammo-mean", "full": "replay"}
PAPER_GAP = -2.76  # DynaMMo - best dynamic method, average accuracy (paper's abstract)
MAX_LOSS_RATIO = 5.0
COMPARED = ("acl", "replay", "no-adapters")
ACCURACIES = ("average_accuracy", "final_accuracy", "forgetting", "val_accuracy")
NAN = float("nan")


def _num(x: float | None) -> float:
    """A metrics.json number (``null`` where undefined) as a float (NaN)."""
    return NAN if x is None else float(x)


def _worst(values: list[float]) -> float:
    """The largest value that is not NaN (NaN: none; ``inf`` counts: a diverged run)."""
    return max((v for v in values if not math.isnan(v)), default=NAN)


def _ratio(loss: dict[str, float | None]) -> float:
    first, high = loss.get("first"), loss.get("max")
    return NAN if first is None or high is None or first <= 0 else high / first


def _max_alpha(fit: list[dict[str, Any]]) -> float:
    sets = fit[-1].get("diagnostics", {}).get("adapter_sets", []) if fit else []
    return max((abs(a) for s in sets for a in s["alpha"].values()), default=NAN)


def row(run_dir: Path, **meta: Any) -> dict[str, Any]:
    """One finished (or diverged) run as a table row: accuracies in points, the epochs each
    experience ran and kept, the loss ratios, the deployable model's measured cost, times."""
    bench = json.loads((run_dir / "bench.json").read_text())
    metrics = run_dir / "metrics.json"
    m = json.loads(metrics.read_text()) if metrics.is_file() else {"fit": []}
    fit = m["fit"]
    out: dict[str, Any] = {
        **meta,
        "device": bench.get("device"),
        "threads": bench.get("threads"),
        "diverged": bench.get("diverged"),
        "epochs": [f["epochs"] for f in fit],
        "best_epochs": [f["best_epoch"] for f in fit],
        "loss_ratios": [_ratio(f["loss"]) for f in fit],
        "max_abs_alpha": _max_alpha(fit),
        "routing_stage2": fit[-1].get("diagnostics", {}).get("routing_stage2") if fit else None,
    }
    if bench.get("diverged"):  # NaN accuracies: every mean, difference and target it enters fails
        return out | dict.fromkeys(ACCURACIES, NAN) | {"max_loss_ratio": math.inf}
    sizes = [e["test"] for e in json.loads((run_dir / "scenario.json").read_text())["experiences"]]
    R = np.array(m["accuracy_matrix"], dtype=float)
    return out | {
        "average_accuracy": 100 * _num(m["summary"]["average_accuracy"]),
        "final_accuracy": 100 * final_accuracy(R, weights=sizes),  # all test images
        "forgetting": 100 * _num(m["summary"]["forgetting"]),
        "val_accuracy": 100 * statistics.fmean(bench["val_accuracy"]),
        "max_loss_ratio": _worst(out["loss_ratios"]),
        # measured on the trained run's deployable model (restored from its final checkpoint)
        "parameters": bench["deployable"]["parameters"],
        "macs": bench["deployable"]["macs"],
        "macs_metrics_json": m["compute"]["macs"],  # what the run itself wrote after training
        "latency_ms_b1": m["compute"].get("latency_ms_b1", NAN),
        "train_seconds": sum(f["seconds"] for f in fit),
        "wall_seconds": m["timing"]["total"] + bench["seconds"],
    }


def _pm(values: list[float]) -> tuple[float, float | None]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def _per_experience(runs: list[list[int]]) -> list[float]:
    """Median over seeds of each experience's value (runs cut short: the experiences they have)."""
    n = min(len(r) for r in runs)
    return [float(np.median([r[k] for r in runs])) for k in range(n)]


def summarise(rows: list[dict[str, Any]], streams: list[str], seeds: list[int]) -> list[dict]:
    """Mean ± sd over the reported seeds per (stream, method), in run order; an arm with fewer
    seeds than asked is marked ``incomplete``."""
    out = []
    for sc in streams:
        for method in METHODS:
            rs = [r for r in rows if r["scenario"] == sc and r["method"] == method]
            if not rs:
                continue
            agg: dict[str, Any] = {
                "scenario": sc,
                "method": method,
                "seeds": [r["seed"] for r in rs],
                "incomplete": len(rs) < len(seeds),
                "lr": rs[0]["lr"],
                "diverged": sum(bool(r["diverged"]) for r in rs),
                "devices": sorted({str(r["device"]) for r in rs}),
                "epochs": _per_experience([r["epochs"] for r in rs]),
                "best_epochs": _per_experience([r["best_epochs"] for r in rs]),
                "max_loss_ratio": _worst([r["max_loss_ratio"] for r in rs]),
            }
            for k in ACCURACIES:
                agg[k], agg[f"{k}_sd"] = _pm([r[k] for r in rs])
            for k in ("parameters", "macs", "train_seconds", "wall_seconds", "max_abs_alpha"):
                agg[k] = float(np.median([r.get(k, NAN) for r in rs]))
            out.append(agg)
    return out


def differences(rows: list[dict[str, Any]], streams: list[str]) -> list[dict[str, Any]]:
    """Paired ACC differences DynaMMo-mean - each of :data:`COMPARED`, per stream, over the
    reported seeds both arms have (t-based 95 % CI)."""
    out = []
    for sc in streams:
        by = {(r["method"], r["seed"]): r["average_accuracy"] for r in rows if r["scenario"] == sc}
        for other in COMPARED:
            common = [s for s in REPORTED_SEEDS if ("dynammo-mean", s) in by and (other, s) in by]
            a = [by["dynammo-mean", s] for s in common]
            diff = paired_difference(a, [by[other, s] for s in common]) if common else {}
            out.append({"scenario": sc, "comparison": f"dynammo-mean - {other}",
                        "seeds": common, "mean": diff.get("mean", NAN), "sd": diff.get("sd"),
                        "ci95": diff.get("ci95")})  # fmt: skip
    return out


def _t(name: str, value: float, goal: str, met: bool) -> dict[str, Any]:
    return {"name": name, "value": float(value), "goal": goal, "met": bool(met)}


def targets(
    rows: list[dict[str, Any]],
    diffs: list[dict[str, Any]],
    lrs: dict[str, dict[str, Any]],
    streams: list[str],
) -> list[dict[str, Any]]:
    """Issue 22's targets, each computed from measured rows (missing data: NaN, not met)."""
    d = {(x["scenario"], x["comparison"].rsplit(" - ", 1)[1]): x for x in diffs}
    out = []
    for sc in streams:
        gap = d[sc, "acl"]["mean"]
        out.append(_t(f"{sc}: DynaMMo - ACL ACC (points, paired)", gap,
                      f">= {PAPER_GAP} (the paper's own gap)", gap >= PAPER_GAP))  # fmt: skip
    gaps = {sc: d[sc, "replay"]["mean"] for sc in streams}
    finite = {sc: g for sc, g in gaps.items() if math.isfinite(g)}
    best = max(finite, key=finite.__getitem__) if finite else None
    value = finite[best] if best else NAN
    out.append(_t(f"DynaMMo - replay ACC (points, paired) on its best stream ({best})",
                  value, ">= 0 on at least one stream", value >= 0))  # fmt: skip
    for sc in streams:
        ci = d[sc, "no-adapters"]["ci95"]
        low = ci[0] if ci else NAN
        out.append(_t(f"{sc}: adapters matter: lower end of the 95 % CI of DynaMMo - "
                      f"no-adapters ACC (points; CI {_ci(ci)})", low, "> 0 (CI excludes 0)",
                      low > 0))  # fmt: skip
    ratios = [r["max_loss_ratio"] for r in rows]
    worst = _worst(ratios)
    out.append(_t(f"highest stage-1 loss / its experience's first loss, over {len(ratios)} "
                  "reported runs", worst, f"<= {MAX_LOSS_RATIO:g}",
                  bool(ratios) and worst <= MAX_LOSS_RATIO))  # fmt: skip
    for key, sel in lrs.items():
        grid, lr = sel.get("grid") or [], sel.get("chosen")
        inside = lr is not None and grid[0] < lr < grid[-1]
        out.append(_t(f"{key}: chosen lr strictly inside its final grid {_grid(grid)}",
                      NAN if lr is None else lr, "inside", inside))  # fmt: skip
    return out


def _ci(ci: list[float] | None) -> str:
    return "n/a" if not ci else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _grid(grid: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in grid) + "]"


def _cell(s: dict[str, Any], k: str, scale: float = 1.0) -> str:
    sd = s[f"{k}_sd"]
    if not math.isfinite(s[k]):
        return "diverged" if s["diverged"] else "n/a"
    return f"{s[k] / scale:.1f}" + ("" if sd is None else f" ± {sd / scale:.1f}")


def _epochs(values: list[float]) -> str:
    return "/".join(f"{v:g}" for v in values)


def report(args, summary, diffs, tg, lrs, rows, backbone: str, size: int, missing=()) -> str:
    """The markdown page (``missing``: planned runs not trained yet, named at the top)."""
    table = [
        {"stream": s["scenario"], "method": s["method"],
         "seeds": f"{len(s['seeds'])}" + (f" of {len(args.seeds)}" if s["incomplete"] else ""),
         "lr": f"{s['lr']:g}", "ACC %": _cell(s, "average_accuracy"),
         "final %": _cell(s, "final_accuracy"), "forgetting": _cell(s, "forgetting"),
         "val %": _cell(s, "val_accuracy"), "epochs run": _epochs(s["epochs"]),
         "epochs kept": _epochs(s["best_epochs"]), "params (M)": f"{s['parameters'] / 1e6:.2f}",
         "MMACs": f"{s['macs'] / 1e6:.1f}", "max loss ratio": f"{s['max_loss_ratio']:.2f}",
         "max abs alpha": "" if math.isnan(s["max_abs_alpha"]) else f"{s['max_abs_alpha']:.3f}",
         "train s": f"{s['train_seconds']:.0f}", "wall s": f"{s['wall_seconds']:.0f}"}
        for s in summary
    ]  # fmt: skip
    sel = [
        {"stream-family": k, "picked by": SELECT_WITH[k.rsplit("/", 1)[1]],
         "grid": _grid(v.get("grid") or []),
         "val %": ", ".join(f"{lr:.3g}: {a:.2f}" for lr, a in v.get("val_accuracy", {}).items()),
         "chosen": "n/a" if v.get("chosen") is None else f"{v['chosen']:.3g}",
         "at edge": v.get("at_edge")}
        for k, v in lrs.items()
    ]  # fmt: skip
    same = all(r["macs"] == r["macs_metrics_json"] for r in rows if not r["diverged"])
    devices = sorted({str(r["device"]) for r in rows})
    prefix = (
        "**Smoke run** (`--quick`: synthetic stream, no pretrained weights; the numbers mean nothing). "
        if args.quick
        else ""
    )
    if missing:
        prefix += (f"**Incomplete**: {len(missing)} planned runs are not trained yet (JSON "
                  "`missing_runs`); arms without them are absent or marked, and every target "
                  "that needs them reads NaN / not met. ")  # fmt: skip
    head = prefix + (
        f"`{backbone}` (ImageNet weights, frozen for the adapter methods), {size} px: **every** "
        f"dataset upsampled from its 28-px file (`scenario.native_size: false`). Budget, the "
        f"same for every method: at most {args.cap} epochs per experience "
        f"(`train.epochs`), early stopping after {args.patience} epoch(s) without a better mean "
        "validation accuracy on the seen experiences, best epoch kept "
        "(`train.early_stopping_patience`); batch 64, SGD (momentum 0.9, wd 5e-4), cosine lr "
        f"over the cap, light augmentation, memory 200 (herding). Reported seeds {args.seeds} "
        f"(mean ± sd); learning rates chosen by seed {SELECTION_SEED} (never reported) on the "
        "validation splits, one per family: adapters (picked by DynaMMo-mean; shared by ACL, "
        "TIES, no-adapters; head_lr 0.004 from the config) and full network (picked by replay; "
        f"shared by DER, fine-tune, joint). Device(s): {devices}; {args.threads} thread(s). "
        "Generated by `benchmarks/dynammo_pretrained.py`."
    )
    notes = (
        "ACC: mean over experiences of the final model's test accuracy; final: accuracy on all "
        "test images; val: the same as ACC on the validation splits. Epochs run / kept: per "
        "experience, median over seeds. Params and MACs: the deployable model of each trained "
        "run, restored from its final checkpoint (FlopCounterMode, one image); equal to what "
        f"the run wrote in metrics.json for every row: {same}. Max loss ratio: highest stage-1 "
        "training loss of an experience / its first update's loss, worst experience and seed. "
        "Train s, wall s: medians (wall: the run's phases + read-back). "
        "`dynammo-mean-native64`: the mixed set-up of the earlier table (BreastMNIST from its "
        "native 64-px file, the others upsampled), at the adapters' chosen lr; an extra row, "
        "not a compared arm."
    )
    dif = [{"scenario": x["scenario"], "comparison": x["comparison"], "seeds": x["seeds"],
            "mean": f"{x['mean']:+.2f}" if math.isfinite(x["mean"]) else "n/a", "sd": "n/a" if x["sd"] is None else f"{x['sd']:.2f}",
            "ci95": _ci(x["ci95"])} for x in diffs]  # fmt: skip
    parts = [
        "# DynaMMo on a pretrained backbone: a fair table (issue 22)",
        head,
        markdown_table(table, list(table[0]) if table else ["stream"]),
        notes,
        "## Paired differences of ACC over the reported seeds (points)",
        markdown_table(dif, ["scenario", "comparison", "seeds", "mean", "sd", "ci95"]),
        "## Learning-rate selection (validation, selection seed)",
        markdown_table(sel, ["stream-family", "picked by", "grid", "val %", "chosen", "at edge"]),
        "## Targets",
        markdown_table(tg, ["name", "value", "goal", "met"]),
    ]
    return "\n\n".join(parts)
