"""Scoring and writing for ``benchmarks/stability_gap.py`` (pure functions of the finished runs).

Runs are looked up by id, so the result does not depend on the order they finished in; every
missing piece (a seed, the joint bound) is reported as missing, never filled in.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from _common import json_text, markdown_table, paired_difference
from _stability_arms import (
    DOMAIN_STREAMS,
    MAIN,
    STREAMS,
    arm_of,
    run_id,
    select_lr,
    variants,
)
from _stability_plot import figure

from medcl.metrics.stability import stability_metrics, summarize_stability, updates_to_reach

COLUMNS = [
    "variant",
    "n_seeds",
    "lr",
    "stability_gap",
    "max_drop",
    "init_drop",
    "updates_to_recover",
    "plasticity_gap",
    "continual_knowledge_gap",
    "final_acc",
    "avg_acc",
    "updates_to_joint_old",
    "updates_to_vanilla_final",
    "tflops_to_vanilla_final",
    "total_updates",
    "total_tflops",
]
#: metrics compared per seed (SGM minus each vanilla arm)
PAIRED = ["max_drop", "init_drop", "stability_gap", "updates_to_recover", "final_acc"]


def _last_all(curves: pd.DataFrame) -> dict[int, float]:
    last = curves.sort_values("update").groupby("experience").tail(1)
    return {
        int(e): float(a) for e, a in zip(last["experience"], last["all_acc"], strict=True) if e >= 1
    }


def _reach(curves: pd.DataFrame, targets: dict[int, float], column: str) -> float:
    """Updates summed over experiences to reach ``targets`` (inf when one never does)."""
    return float(sum(updates_to_reach(curves, targets, column=column).values()))


def score(run: dict, bounds: Any, vanilla: dict | None) -> dict[str, Any]:
    """Gap and dip metrics, accuracies, and updates to reach the joint model's old-class
    accuracy and the tuned vanilla's final accuracy (same seed), of one run."""
    curves = pd.DataFrame(run["curves"])
    row: dict[str, Any] = summarize_stability(curves, upper_bound=bounds, tol=0.01)
    R = run["accuracy_matrix"]  # row t: after the base (t = 0) or experience t, on 0..t
    row["final_acc"] = float(np.mean(R[-1]))
    row["avg_acc"] = float(np.mean([np.mean(R[t][: t + 1]) for t in range(len(R))]))
    flops = run["flops_per_update"]
    row["total_updates"] = float(run["updates"])
    row["total_tflops"] = run["updates"] * flops / 1e12
    joint_old = bounds["old"] if isinstance(bounds, dict) else None
    row["updates_to_joint_old"] = _reach(curves, joint_old, "old_acc") if joint_old else math.nan
    total = math.nan
    if vanilla is not None:
        total = _reach(curves, _last_all(pd.DataFrame(vanilla["curves"])), "all_acc")
    row["updates_to_vanilla_final"] = total
    row["tflops_to_vanilla_final"] = total * flops / 1e12
    row["per_experience"] = stability_metrics(curves, upper_bound=bounds).to_dict("records")
    row["train_seconds"] = run["train_seconds"]
    return row


def _mean_sd(rows: list[dict]) -> tuple[dict, dict]:
    """Seed mean and sd per numeric metric; a metric that is ``inf`` (never reached) in any seed
    has mean ``inf`` and sd NaN, a NaN in any seed gives NaN (no numpy warnings either way)."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], int | float)]
    mean, sd = {}, {}
    for k in keys:
        x = np.asarray([r[k] for r in rows], dtype=float)
        if np.isnan(x).any():
            mean[k], sd[k] = math.nan, math.nan
        elif np.isinf(x).any():
            mean[k], sd[k] = math.inf, math.nan
        else:
            mean[k] = float(x.mean())
            sd[k] = float(x.std(ddof=1)) if len(x) > 1 else math.nan
    return mean, sd


def selection(args: Any, done: dict, scenario: str) -> dict[str, dict[str, Any]]:
    """Per main arm: the lr grid run on the selection seed, its validation accuracies, the
    chosen rate (None while a run is missing) and whether the grid brackets it."""
    out = {}
    for v in MAIN:
        grid, lr, inside = select_lr(done, scenario, v, args)
        runs = {g: done.get(run_id(scenario, v, args.selection_seed, g)) for g in grid}
        val = {f"{g:g}": r["val_acc"] for g, r in runs.items() if r}
        out[v] = {"grid": grid, "chosen": lr, "bracketed": inside, "val_acc": val}
    return out


def _paired(scored: dict[str, dict[int, dict]], a: str, b: str) -> dict[str, Any]:
    """``a - b`` per metric over the seeds both ran: mean, sd and 95 % CI."""
    seeds = sorted(set(scored.get(a, {})) & set(scored.get(b, {})))
    out: dict[str, Any] = {"seeds": seeds}
    for k in PAIRED:
        x = [scored[a][s][k] for s in seeds]
        y = [scored[b][s][k] for s in seeds]
        out[k] = paired_difference(x, y) if seeds else None
    return out


def stream_block(args: Any, done: dict, scenario: str, variants: list[str]) -> dict[str, Any]:
    joint = [done.get(f"{scenario}/joint/t{t}") for t in range(1, STREAMS[scenario])]
    bounds: Any = 1.0
    if all(joint):
        bounds = {k: {j["upto"]: j[k] for j in joint} for k in ("old", "new", "all")}
    joint_updates = float(sum(j["updates_kept"] for j in joint)) if all(joint) else math.nan
    select = selection(args, done, scenario)
    chosen = {v: select[v]["chosen"] for v in MAIN}
    runs: dict[str, dict[int, dict]] = {}
    for v in [*MAIN, *variants]:
        lr = chosen[arm_of(v)]
        if lr is None:
            continue
        seeds = args.seeds if v in MAIN else args.seeds[:1]
        got = {s: done.get(run_id(scenario, v, s, lr)) for s in seeds}
        runs[v] = {s: r for s, r in got.items() if r is not None}
    scored: dict[str, dict[int, dict]] = {}
    for v, by_seed in runs.items():
        tuned = runs.get("vanilla-tuned", {})
        scored[v] = {
            s: score(r, bounds, tuned.get(s)) | {"lr": chosen[arm_of(v)]}
            for s, r in by_seed.items()
        }
    summary, spread = {}, {}
    for v, by_seed in scored.items():
        if by_seed:
            summary[v], spread[v] = _mean_sd(list(by_seed.values()))
            summary[v]["n_seeds"] = len(by_seed)
    seed0 = args.seeds[0]
    return {
        "kind": "domain-incremental" if scenario in DOMAIN_STREAMS else "class-incremental",
        "upper_bound": bounds,
        "joint": [j for j in joint if j],
        "joint_updates": joint_updates,
        "selection": select,
        "chosen_lr": chosen,
        "bases": {s: done.get(f"{scenario}/base/s{s}") for s in [args.selection_seed, *args.seeds]},
        "summary": summary,
        "sd": spread,
        "paired": {f"sgm - {v}": _paired(scored, "sgm", v) for v in MAIN if v != "sgm"},
        "runs": {v: {str(s): r for s, r in by.items()} for v, by in scored.items()},
        "curves": {v: {str(s): r["curves"] for s, r in by.items()} for v, by in runs.items()},
        "init": {v: by[seed0].get("init", []) for v, by in runs.items() if seed0 in by},
        "group_sizes": next((r["group_sizes"] for by in runs.values() for r in by.values()), []),
    }


def targets(scenario: str, block: dict) -> list[dict[str, Any]]:
    """The issue's three targets from the seed means (value NaN while a run is missing)."""
    summary, nan = block["summary"], math.nan
    s, a, t = (summary.get(v) for v in ("sgm", "vanilla-authors", "vanilla-tuned"))
    drop = s["max_drop"] / a["max_drop"] if s and a and a["max_drop"] > 0 else nan
    drop_met = bool(s and a and s["max_drop"] <= a["max_drop"] / 3)
    acc = s["final_acc"] - t["final_acc"] if s and t else nan
    # joint retraining's updates: to its kept (best-validation) model, summed over experiences
    joint = block.get("joint_updates", nan)
    reach = s["updates_to_joint_old"] / joint if s and joint > 0 else nan
    return [
        {
            "name": f"{scenario}: max_drop SGM / authors' vanilla",
            "value": drop,
            "goal": "<= 1/3",
            "met": drop_met,
        },
        {
            "name": f"{scenario}: final accuracy SGM - tuned vanilla",
            "value": acc,
            "goal": ">= -0.01",
            "met": bool(acc >= -0.01),
        },
        {
            "name": f"{scenario}: SGM updates to joint's old-class accuracy / joint's updates",
            "value": reach,
            "goal": "<= 1/3",
            "met": bool(reach <= 1 / 3),
        },
    ]


def _fmt(mean: dict, sd: dict, key: str) -> Any:
    m = mean.get(key, math.nan)
    if not isinstance(m, float) or key == "lr":
        return m
    s = sd.get(key, math.nan)
    return f"{m:.3g} ± {s:.2g}" if math.isfinite(s) else f"{m:.3g}"


PER_EXP = ["variant", "experience", "pre_old_acc", "start_old_acc", "init_drop", "max_drop"]
PER_EXP += ["updates_to_min", "updates_to_recover", "stability_gap"]
PER_EXP_VARIANTS = (*MAIN, "sgm-literal-init", "sgm-init-q0", "sgm-no-init")


def _per_experience(block: dict, seed: int) -> list[dict]:
    rows = []
    for v in PER_EXP_VARIANTS:
        run = block["runs"].get(v, {}).get(str(seed))
        rows += [{"variant": v} | r for r in run["per_experience"]] if run else []
    return rows


def _paired_rows(block: dict) -> list[dict]:
    rows = []
    for name, diff in block["paired"].items():
        row: dict[str, Any] = {"difference": name, "seeds": diff["seeds"]}
        for k in PAIRED:
            d = diff[k]
            ci = d["ci95"] if d else None
            row[k] = (
                "" if not d else f"{d['mean']:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
            )
        rows.append(row)
    return rows


def _selection_text(block: dict) -> str:
    parts = []
    for v, sel in block["selection"].items():
        val = ", ".join(f"{lr}: {a:.3f}" for lr, a in sel["val_acc"].items())
        mark = "" if sel["bracketed"] or sel["chosen"] is None else " (at the grid's edge)"
        chosen = "pending" if sel["chosen"] is None else f"{sel['chosen']:g}{mark}"
        parts.append(f"{v}: {{{val}}} -> {chosen}")
    return "; ".join(parts)


def _header(args: Any, partial: bool) -> list[str]:
    return [
        "# Stability gap: vanilla rehearsal (two arms) vs SGM on pretrained EfficientNet-Lite0"
        + (" (PARTIAL: runs still missing)" if partial else ""),
        "",
        f"64 px, front frozen / back = last {args.trainable_stages} stages + conv_head; base = "
        "pretrained network + head fitted to experience 0 (epochs and lr on validation); "
        f"{args.updates} updates per later experience of {args.batch_size} new + "
        f"{args.batch_size} replayed images (memory {args.memory}); AdamW (wd "
        f"{args.weight_decay}) and frozen BatchNorm statistics in every arm. Arms: "
        "**vanilla-authors** (Harun & Kanan's baseline: hard CE, full fine-tuning of the back, "
        "constant lr, no warm-up, uniform lr), **vanilla-tuned** (hard CE, OneCycle warm-up, "
        "layer-wise decay 0.9), **sgm** (OneCycle, uniform lr: `layer_decay` 1; "
        "`sgm-layer-decay` is the tuned 0.9). Each arm's peak lr is chosen from a grid starting "
        f"at {args.lrs} (extended by up to {args.lr_extend} rate(s) until the best is inside "
        f"it) by final validation accuracy on selection seed {args.selection_seed}, never "
        f"reported. Evaluation every {args.eval_every} updates on <= {args.eval_samples} test "
        "images per experience. Gaps relative to a joint model trained to convergence on "
        "experiences 0..t (seed 0). Main arms: mean ± sd over seeds "
        f"{args.seeds}; ablations: seed {args.seeds[0]}. Accuracies are fractions. The "
        "stability gap averages old-class accuracy over the experience, so it counts the level "
        "as well as the dip; the dip itself: `max_drop` (pre-experience old accuracy minus the "
        "minimum), `init_drop` (the part before the first update: the set-up's, e.g. new "
        "units' init) and `updates_to_recover` (to within 0.01 of the pre-experience level). "
        "`updates_to_joint_old`: SGM's updates until old-class accuracy reaches the joint "
        "model's (the paper's comparison), summed over experiences >= 1, against joint "
        "retraining's updates to its kept model (batches of "
        f"{args.batch_size}, no replay); `updates_to_vanilla_final`: updates to reach the tuned "
        "vanilla's final all-class accuracy per experience, same seed (inf: never reached).",
    ]


def report(
    args: Any, done: dict, machine: dict, *, partial: bool, failed: dict | None = None
) -> str:
    blocks = {sc: stream_block(args, done, sc, variants(args, sc)) for sc in args.scenarios}
    all_targets = []
    md = _header(args, partial)
    # every run's own seconds (a worker's wall time per run), selection and joint models included
    run_seconds = sum(float(r.get("seconds", 0.0)) for r in done.values())
    md += [
        "",
        f"Cost: the {len(done)} runs took {run_seconds / 60:.0f} worker-minutes in all "
        f"({args.jobs} worker(s) of {args.threads} thread(s) on {machine.get('cpus', '?')} "
        f"CPUs: about {run_seconds / 60 / args.jobs:.0f} min of wall time run alone).",
    ]
    for sc, b in blocks.items():
        tg = targets(sc, b)
        b["targets"] = tg
        all_targets += tg
        figure(b, sc, args.eval_every, args.out / f"stability_gap_{sc}.png")
        rows = [
            {c: _fmt(b["summary"][v] | {"variant": v}, b["sd"][v], c) for c in COLUMNS}
            for v in b["summary"]
        ]
        kind = b["kind"]
        if sc in DOMAIN_STREAMS:
            kind += (
                ": every class is old after experience 0, so data-driven init and the "
                "init ablations are no-ops and freezing old units fixes the whole head"
            )
        md += [
            "",
            f"## {sc} ({kind})",
            "",
            f"Joint model (upper bound): {b['upper_bound']}, trained for {b['joint_updates']:g} "
            f"updates to the kept models; test images per experience in the curves: "
            f"{b['group_sizes']}. LR selection (validation accuracy): {_selection_text(b)}.",
            "",
            markdown_table(rows, COLUMNS),
            "",
            markdown_table(tg, ["name", "value", "goal", "met"]),
            "",
            "Paired differences over seeds (mean [95 % CI], t-based):",
            "",
            markdown_table(_paired_rows(b), ["difference", "seeds", *PAIRED]),
            "",
            f"Per experience (seed {args.seeds[0]}): what the set-up costs before the first "
            "update (init_drop = pre_old_acc - start_old_acc) and the dip after it.",
            "",
            markdown_table(_per_experience(b, args.seeds[0]), PER_EXP),
            "",
            f"![{sc}](stability_gap_{sc}.png)",
        ]
    payload = {
        "machine": machine,
        "partial": partial,
        "failed": failed or {},
        "args": {k: str(v) for k, v in vars(args).items()},
        "targets": all_targets,
        "run_seconds_sum": run_seconds,
        "results": blocks,
    }
    text = "\n".join(md)
    for name, content in (("stability_gap.json", json_text(payload)), ("stability_gap.md", text)):
        tmp = args.out / (name + ".tmp")
        tmp.write_text(content.rstrip() + "\n")
        tmp.replace(args.out / name)
    return text
