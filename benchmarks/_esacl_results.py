"""Issue 23's EsaCL benchmark: its arms, and how their rows become tables and targets."""

from __future__ import annotations

import json
import statistics
from typing import Any

from _common import REPORTED_SEEDS, SELECTION_SEEDS, markdown_table

SCENARIO = "medmnist-cross3"
MEMORY, SEEDS, MAIN = 200, REPORTED_SEEDS, 0.9
#: method -> (strategy, extra options, uses the memory, lr family)
METHODS: dict[str, tuple[str, dict[str, Any], bool, str]] = {
    "esacl": ("esacl", {}, True, "esacl"),
    "sparcl": ("sparcl", {}, True, "sparcl"),
    "magnitude": ("magnitude-pruning", {}, True, "magnitude"),
    "replay": ("replay", {}, True, "replay"),
    "esacl-support-only": ("esacl", {"ids_removal": False}, True, "esacl"),
    "esacl-removal-only": ("esacl", {"ids_support": False}, True, "esacl"),
    "esacl-random": ("esacl", {"ids_random": True}, True, "esacl"),
    "esacl-nomem": ("esacl", {}, False, "esacl"),
    "esacl-noids": ("esacl", {"ids": False}, True, "esacl"),
    "esacl-dense": ("esacl", {"sparsity": 0.0, "init_sparsity": 0.0}, True, "esacl"),
    # the component ladder, every rung at EsaCL's lr: |w| pruning, + SDP, + SAM, + IDS (= esacl)
    "esacl-plain": ("esacl", {"sdp": False, "sam_rho": 0.0, "ids": False}, True, "esacl"),
    "esacl-sdp-only": ("esacl", {"sam_rho": 0.0, "ids": False}, True, "esacl"),
    "esacl-nosdp": ("esacl", {"sdp": False}, True, "esacl"),  # SAM + IDS, |w| scores
    # the no-retraining control at EsaCL's lr: plain SGD, dense, every example (no SAM, no IDS)
    "replay-esacl-lr": ("replay", {}, True, "esacl"),
}
FAMILIES = ("esacl", "sparcl", "magnitude", "replay")
CONTROLS = ("esacl-support-only", "esacl-removal-only", "esacl-random", "esacl-nomem")
LADDER = ("esacl-plain", "esacl-sdp-only", "esacl-noids", "esacl")  # one component added a rung
ONE_SHOT = ("esacl-dense", "replay", "replay-esacl-lr")  # pruned once: SAM-trained vs plain SGD
#: the runs that remove examples (the chosen ``removal_fraction`` applies to these)
REMOVES = ("esacl", "esacl-removal-only", "esacl-random", "esacl-nomem", "esacl-dense",
           "esacl-nosdp")  # fmt: skip


def is_dense_replay(method: str) -> bool:
    return METHODS[method][0] == "replay"


def pick(rows, method: str, sparsity: float, key: str, seeds=SEEDS) -> list[float]:
    sp = 0.0 if is_dense_replay(method) else sparsity
    by = {r["seed"]: r[key] for r in rows if r["method"] == method and r["sparsity"] == sp}
    return [by[s] for s in seeds if s in by]


def pm(vals: list[float]) -> str:
    if not vals:
        return ""
    sd = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
    return f"{statistics.fmean(vals):.1f}{sd}"


def drops(rows, method: str, sparsity: float, k: int = -1) -> list[float]:
    return [r["one_shot"][k][f"drop_{sparsity:g}"] for s in SEEDS for r in rows
            if r["method"] == method and r["seed"] == s and -len(r.get("one_shot", [])) <= k < len(r.get("one_shot", []))]  # fmt: skip


def flat(rows, method: str) -> list[dict[str, float]]:
    """The flatness records of ``method`` at 0.9, seed by seed (reported seeds)."""
    by = {r["seed"]: r["flatness"] for r in rows if r["method"] == method and "flatness" in r}
    return [by[s] for s in SEEDS if s in by]


def flat_rows(rows) -> list[dict[str, Any]]:
    """Flatness of each one-shot model at the end of the stream (mean ± sd over seeds)."""
    out = []
    for m in ONE_SHOT:
        if got := flat(rows, m):
            cell = {k: [g[k] for g in got] for k in ("loss", "sam_sharpness", "hessian_top")}
            out.append({"model": m, "seeds": len(got), **{
                k: f"{statistics.fmean(v):.4g}" + (f" ± {statistics.stdev(v):.2g}" if len(v) > 1 else "")
                for k, v in cell.items()}})  # fmt: skip
    return out


def _t(name: str, value: float, goal: str, met: bool) -> dict[str, Any]:
    return {"name": name, "value": float(value), "goal": goal, "met": bool(met)}


def targets(rows, diffs: dict[str, dict]) -> list[dict[str, Any]]:
    mean = {m: statistics.fmean(pick(rows, m, MAIN, "average_accuracy") or [float("nan")])
            for m in METHODS}  # fmt: skip
    gap = mean["replay"] - mean["esacl"]
    out = [_t("dense replay - EsaCL ACC at 0.9 (points)", gap, "<= 1.5", gap <= 1.5)]
    for other in ("sparcl", "magnitude"):
        d = diffs[f"esacl - {other}"]["mean"]
        out.append(_t(f"EsaCL - {other} ACC at 0.9 (points, paired)", d, ">= 0", d >= 0))
    ci = diffs["esacl - magnitude"]["ci95"] or [0.0, 0.0]
    sep = ci[0] > 0 or ci[1] < 0
    out.append(_t("budget separates EsaCL from magnitude: 95 % CI of the paired difference "
                  "excludes 0 (CI width, points)", ci[1] - ci[0], "excludes 0", sep))  # fmt: skip
    d = diffs["esacl - esacl-random"]["mean"]
    out.append(_t("IDS - random subset of the same size, ACC (points, paired)", d, ">= 0", d >= 0))
    a, b = drops(rows, "esacl-dense", MAIN), drops(rows, "replay", MAIN)
    if a and b:
        da, db = statistics.fmean(a), statistics.fmean(b)
        out.append(_t("no retraining: one-shot drop of EsaCL's dense SAM model at 0.9, end of "
                      "stream (points)", da, "<= 1", da <= 1))  # fmt: skip
        out.append(_t("one-shot drop of plain SGD (replay) - of EsaCL's SAM model at 0.9 "
                      "(points)", db - da, ">= 3", db - da >= 3))  # fmt: skip
    fl = {m: pick(rows, m, MAIN, "train_gflops", (0,)) for m in ("esacl", "esacl-noids", "sparcl")}
    ts = {m: pick(rows, m, MAIN, "train_s", (0,)) for m in ("esacl", "esacl-noids")}
    if all(fl.values()) and all(ts.values()):
        ratio, wall = fl["esacl-noids"][0] / fl["esacl"][0], ts["esacl-noids"][0] / ts["esacl"][0]
        out.append(_t(f"IDS saving shows in wall time: train-seconds ratio without/with IDS vs "
                      f"the FLOPs ratio {ratio:.3f}", wall / ratio, ">= 0.9", wall / ratio >= 0.9))  # fmt: skip
        r = fl["esacl"][0] / fl["sparcl"][0]
        out.append(_t("EsaCL training FLOPs / SparCL's at 0.9", r, "<= 1", r <= 1))
    return out


def report(args, rows, lrs, removal, select, diffs, tg, total: float) -> str:
    """The markdown page: the table, paired differences, one-shot drops and targets."""
    cols = ("average_accuracy", "final_accuracy", "forgetting", "val_accuracy", "density",
            "train_gflops", "images", "train_s")  # fmt: skip
    table = []
    for sp, methods in ((MAIN, METHODS), (0.75, FAMILIES[:3]), (0.95, FAMILIES[:3])):
        for m in methods:
            if vals := pick(rows, m, sp, "average_accuracy", (*SEEDS,)):
                table.append({"method": m, "sparsity": 0.0 if is_dense_replay(m) or m == "esacl-dense" else sp,
                              "seeds": len(vals), "lr": lrs[METHODS[m][3]]["chosen"],
                              **{c: pm(pick(rows, m, sp, c)) for c in cols}})  # fmt: skip
    shots = []
    for m in ONE_SHOT:
        for k in range(3):
            for sp in (0.75, 0.9, 0.95):
                if d := drops(rows, m, sp, k):
                    shots.append({"model": m, "after experience": k, "sparsity": sp,
                                  "drop (points)": pm(d)})  # fmt: skip
    dif = [{"comparison": k, "mean": v["mean"], "sd": v["sd"], "ci95": v["ci95"]} for k, v in diffs.items()]  # fmt: skip
    chosen = {f: {k: v.get(k) for k in ("chosen", "grid", "at_edge")} for f, v in lrs.items()}
    head = (
        f"`{SCENARIO}` at 28 px, backbone `{args.backbone}` (small input), {args.epochs} epochs "
        f"per experience for every run, batch 32, SGD, lr schedule `{args.scheduler}` (per experience), "
        f"memory {MEMORY} (random) where "
        f"used. Reported seeds {list(SEEDS)} (mean ± sd; 0.75 and 0.95: seed 0); lr per family "
        f"chosen at 0.9 on the validation splits, the mean of selection seeds "
        f"{list(SELECTION_SEEDS)} (never reported): {json.dumps(chosen)}; "
        f"then EsaCL's removal share at that lr: {removal['chosen']:g} of "
        f"{removal.get('grid', [removal['chosen']])} (at an edge: {removal.get('at_edge')}); then its "
        f"support share (`select_fraction`, 1 = no support selection, the bound): "
        f"{select['chosen']:g} of {select.get('grid', [select['chosen']])} (validation accuracy "
        f"{json.dumps(select.get('val_accuracy', {}))}). "
        f"Sum of the runs' wall times, selection included (2-core CPU): {total / 60:.0f} min. "
        "Generated by `benchmarks/esacl.py`."
    )
    notes = (
        "ACC (`average_accuracy`), final, forgetting and val in points; `train_gflops`: training "
        "FLOPs counted update by update (both SAM passes); `images`: examples passed; `train_s`: "
        "training seconds. `esacl-dense`: EsaCL at sparsity 0 (SAM + IDS), the model of the "
        "no-retraining test."
    )
    parts = [
        "# EsaCL (reconstruction) vs SparCL, magnitude pruning and dense replay",
        head,
        markdown_table(table, ["method", "sparsity", "seeds", "lr", *cols]),
        notes,
        "## Paired differences of ACC over the reported seeds (points)",
        markdown_table(dif, ["comparison", "mean", "sd", "ci95"]),
        "## No retraining: one-shot |w| pruning of a dense model, no training (ACC drop, points)",
        markdown_table(shots, ["model", "after experience", "sparsity", "drop (points)"]),
        "## Flatness at the end of the stream (the seen experiences' validation rows)",
        "Cross-entropy `loss`; `sam_sharpness`: L(w + ρ g/‖g‖) - L(w) at ρ = 0.05 (SAM's inner "
        "maximum, first order); `hessian_top`: the top eigenvalue of the loss's Hessian (power "
        "iteration, 20 steps); every parameter of the dense model, BatchNorm in eval mode "
        "(`benchmarks/_esacl_flatness.py`).",
        markdown_table(flat_rows(rows), ["model", "seeds", "loss", "sam_sharpness", "hessian_top"]),
        "## Targets",
        markdown_table(tg, ["name", "value", "goal", "met"]),
    ]
    return "\n\n".join(parts)
