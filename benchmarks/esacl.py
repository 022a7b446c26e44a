"""EsaCL (reconstruction) against SparCL, magnitude pruning and dense replay, with its controls.

Issue 23's benchmark, on ``medmnist-cross3`` at 28 px (PneumoniaMNIST → BreastMNIST →
RetinaMNIST, class-incremental, 9 classes) with timm's ``test_resnet`` (small input, 0.37 M
parameters), SGD at a constant lr, batch 32, no momentum or weight decay (SparCL's optimiser),
``--epochs`` per experience (default 3: the whole plan takes about an hour alone on 2 cores),
memory 200 (random) where used. Protocol:

- **lr** per method family (EsaCL and its controls, SparCL, magnitude, replay), chosen at
  sparsity 0.9 by the selection seed 100 (never reported) on the validation splits (mean over
  experiences of the final model's accuracy) from ``--lr-grid``, widened ×3 on the side where
  the best value sits at an edge (at most twice); then, at that lr, the share of each experience
  IDS removes (``removal_fraction``, the paper's 30 % is the default) from ``--removal-grid``,
  widened ×3 once at an edge, the same way; every run that removes examples uses it;
- **reported** seeds 0-2 at sparsity 0.9: EsaCL, SparCL, magnitude pruning, dense replay, and
  EsaCL's controls — support selection only, example removal only, a random subset of the same
  sizes instead of IDS, no replay, and EsaCL trained dense (sparsity 0, SAM + IDS); seed 0:
  EsaCL without IDS (the FLOPs comparison) and the three sparse methods at 0.75 and 0.95;
- **no retraining** (the paper's claim): after each experience, EsaCL's dense SAM-trained model
  and replay's plain-SGD model are pruned once by ``|w|`` (``one_shot_prune``) to each sparsity,
  with no training and no BatchNorm re-estimation; the accuracy drop of each (ACC over the seen
  experiences' test splits), paired over seeds;
- **cost**: training FLOPs counted update by update (``TrainingFlops``: both SAM passes, the
  examples actually used) and training seconds side by side. IDS cannot reach 2× by design: per
  example, SAM without IDS costs 3F + 3F, with support selection 3F + F + 3γF (a forward over
  the batch at ``w + ε``, then forward and backward over the top γ), so the per-batch bound is
  6 / (4 + 3γ) = 1.09 at γ = 0.5, times the share of examples that removal skips (30 % by the
  last epoch). The target is that the FLOPs saving shows in wall time.

Resumable: each run's row is cached in ``--work`` (default ``runs/esacl``); ``--fresh`` starts
over. Every run uses ``--threads`` torch threads (rows record it: the count changes float sums).
Writes ``<out>/esacl.{json,md}`` with ``"targets"``. ``--quick``: a smoke run (synthetic
stream, a few updates, one seed, no selection).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    REPORTED_SEEDS,
    RESULTS,
    SELECTION_SEED,
    SMOKE_SCENARIO,
    choose_from_grid,
    data_root,
    markdown_table,
    paired_difference,
    write_results,
)

from medcl.config import validate_config
from medcl.engine.evaluate import evaluate
from medcl.engine.resume import restore_run
from medcl.engine.run import run
from medcl.engine.threads import first_environment
from medcl.metrics.compute import TrainingFlops
from medcl.models.pruning import one_shot_prune
from medcl.strategies import Classifier
from medcl.strategies.esacl import EsaCLOptions

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
}
FAMILIES = ("esacl", "sparcl", "magnitude", "replay")
CONTROLS = ("esacl-support-only", "esacl-removal-only", "esacl-random", "esacl-nomem")
ONE_SHOT = ("esacl-dense", "replay")  # dense models pruned once: SAM-trained vs plain SGD
#: the runs that remove examples (the chosen ``removal_fraction`` applies to these)
REMOVES = ("esacl", "esacl-removal-only", "esacl-random", "esacl-nomem", "esacl-dense")
PAPER_REMOVAL = EsaCLOptions.removal_fraction  # 0.3: a run at it keeps the lr selection's key


def plan(quick: bool) -> list[tuple[str, float, int]]:
    """The reported ``(method, sparsity, seed)`` runs."""
    if quick:
        return [(m, MAIN, 0) for m in METHODS]
    runs = [(m, MAIN, s) for m in (*FAMILIES, *CONTROLS, "esacl-dense") for s in SEEDS]
    runs.append(("esacl-noids", MAIN, 0))
    return runs + [(m, sp, 0) for sp in (0.75, 0.95) for m in ("esacl", "sparcl", "magnitude")]


def config(args, method: str, sparsity: float, seed: int, lr: float, out: Path,
           removal: float = PAPER_REMOVAL) -> Any:  # fmt: skip
    name, opts, mem, _ = METHODS[method]
    strategy: dict[str, Any] = {"name": name}
    if name != "replay":
        strategy["sparsity"] = sparsity
    if name in ("esacl", "sparcl"):
        strategy["seed"] = seed
    if name in ("esacl", "magnitude-pruning"):
        strategy.update(prune_every=args.prune_every, ramp_updates=args.ramp_updates)
    if name in ("esacl", "sparcl"):
        strategy["removal_epochs"] = args.removal_epochs
    if name == "sparcl":  # the official code freezes the mask for the last 10 % of epochs
        strategy["freeze_from"] = max(1, round(0.9 * args.epochs))
    if method in REMOVES and removal != PAPER_REMOVAL:
        strategy["removal_fraction"] = removal
    strategy.update(opts)
    train = {"epochs": args.epochs, "batch_size": 32, "lr": lr, "momentum": 0.0,
             "weight_decay": 0.0, "scheduler": "none", "num_threads": args.threads}  # fmt: skip
    if args.max_updates:
        train["max_updates"] = args.max_updates
    scenario = SMOKE_SCENARIO if args.quick else {"name": SCENARIO}
    return validate_config({
        "seed": seed, "name": f"{method}-{sparsity}-s{seed}-lr{lr:g}", "output_dir": str(out),
        "scenario": scenario, "strategy": strategy, "train": train,
        "model": {"backbone": args.backbone, "small_input": True},
        "memory": {"size": MEMORY if mem else 0, "selection": "random"},
        "data": {"root": str(data_root(args.root))},
    })  # fmt: skip


def _acc(strategy, experiences) -> float:
    """ACC in points: mean test accuracy over ``experiences``."""
    return 100 * statistics.fmean(e.accuracy for e in evaluate(strategy, experiences, quiet=True))


@torch.no_grad()
def one_shot(run_dir: Path, sparsities: tuple[float, ...]) -> list[dict[str, float]]:
    """After each experience: ACC of the dense model and of its one-shot ``|w|``-pruned copies."""
    out = []
    for k in range(len(json.loads((run_dir / "metrics.json").read_text())["accuracy_matrix"])):
        _, sc, strategy, _, _ = restore_run(run_dir, experience=k, command="benchmarks/esacl.py")
        strategy.eval()
        seen, bb = sc.experiences[: k + 1], strategy.backbone
        stages = [f"net.{s.name}" for s in bb.stages()]
        saved = [p.detach().clone() for p in bb.parameters()]
        rec = {"experience": k, "dense": _acc(strategy, seen)}
        for s in sparsities:
            pruned, _ = one_shot_prune(bb, stages, s)
            for p, q in zip(bb.parameters(), pruned.parameters(), strict=True):
                p.copy_(q)
            rec[f"pruned_{s:g}"] = _acc(strategy, seen)
            rec[f"drop_{s:g}"] = rec["dense"] - rec[f"pruned_{s:g}"]
            for p, q in zip(bb.parameters(), saved, strict=True):
                p.copy_(q)
        out.append(rec)
    return out


def one_run(args, method: str, sparsity: float, seed: int, lr: float,
            removal: float = PAPER_REMOVAL) -> dict[str, Any]:  # fmt: skip
    """Train (or read back the cached row of) one run: accuracy, validation, cost, one-shot."""
    cfg = config(args, method, sparsity, seed, lr, args.work / "runs", removal)
    # the key names the experiment; the threads a row ran with are in the row (they change the
    # float sums, so a run is bit-identical only at the same count: rows before `--threads`
    # existed ran at `auto`, which follows the machine's load)
    dump = cfg.model_dump(mode="json", exclude={"output_dir": True, "train": {"num_threads"}})
    settings = json.dumps(dump, sort_keys=True)
    key = (
        f"{method}-{sparsity:g}-s{seed}-lr{lr:g}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}"
    )
    cache = args.work / f"{key}.json"  # a changed setting (epochs, backbone, ...) is a new run
    if cache.is_file():
        return json.loads(cache.read_text())
    t0 = time.perf_counter()
    run_dir = run(cfg, quiet=True)
    wall = time.perf_counter() - t0
    m = json.loads((run_dir / "metrics.json").read_text())
    _, scen, strategy, _, _ = restore_run(run_dir, command="benchmarks/esacl.py")
    strategy.eval()
    val = [e.accuracy for e in evaluate(strategy, scen.experiences, split="val", quiet=True)]
    model = strategy.deployable_model()
    row: dict[str, Any] = {
        "method": method, "sparsity": sparsity if method != "replay" else 0.0, "seed": seed,
        "lr": lr, "removal": removal if method in REMOVES else 0.0,
        "average_accuracy": 100 * m["summary"]["average_accuracy"],
        "final_accuracy": 100 * m["summary"]["final_accuracy"],
        "forgetting": 100 * m["summary"]["forgetting"],
        "val_accuracy": 100 * statistics.fmean(val), "wall_s": wall,
        "train_s": sum(f["seconds"] for f in m["fit"]), "epochs": args.epochs,
        "threads": (first_environment(run_dir) or {}).get("threads"),
        "nonzero": sum(int((p != 0).sum()) for p in model.parameters()),
    }  # fmt: skip
    if hasattr(strategy, "masks"):
        row.update(density=strategy.masks.density(), train_gflops=float(strategy.flops_) / 1e9,
                   images=int(strategy.images_))  # fmt: skip
    else:  # dense replay: every image of the trainer's batches (current + replay), fwd + bwd
        per = TrainingFlops(Classifier(strategy.backbone, strategy.head), tuple(scen.input_shape))
        images = sum(
            len(e.train) * args.epochs + (f["updates"] * 32 if e.index else 0)
            for e, f in zip(scen.experiences, m["fit"], strict=True)
        )  # + replay batches
        row.update(density=1.0, train_gflops=per.per_example() * images / 1e9, images=images)
    if method in ONE_SHOT and sparsity == MAIN and seed != SELECTION_SEED:
        row["one_shot"] = one_shot(run_dir, (0.75, 0.9, 0.95))
    cache.write_text(json.dumps(row))
    print(f"  {key}: ACC {row['average_accuracy']:.1f}, val {row['val_accuracy']:.1f}, "
          f"{wall:.0f} s", flush=True)  # fmt: skip
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


def choose_lr(args, family: str) -> dict[str, Any]:
    """The family's lr: best mean validation accuracy at sparsity 0.9, selection seed."""

    def val(lr: float) -> float:
        return one_run(args, family, MAIN, SELECTION_SEED, lr)["val_accuracy"]

    return choose_from_grid(val, args.lr_grid, key="val_accuracy")


def choose_removal(args, lr: float) -> dict[str, Any]:
    """EsaCL's removal share at its lr: best validation accuracy at 0.9, selection seed (widened
    once: ×3 of the largest grid value must stay below 1)."""

    def val(fraction: float) -> float:
        return one_run(args, "esacl", MAIN, SELECTION_SEED, lr, fraction)["val_accuracy"]

    return choose_from_grid(val, args.removal_grid, key="val_accuracy", widenings=1)


def pick(rows, method: str, sparsity: float, key: str, seeds=SEEDS) -> list[float]:
    sp = 0.0 if method == "replay" else sparsity
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--root")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for esacl.{json,md}")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "esacl", help="cached runs")
    ap.add_argument("--fresh", action="store_true", help="discard the cached runs first")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's directory")
    ap.add_argument("--quick", action="store_true", help="smoke run: synthetic, a few updates")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--backbone", default="test_resnet")
    ap.add_argument("--lr-grid", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    ap.add_argument("--prune-every", type=int, default=30)
    ap.add_argument("--ramp-updates", type=int, default=300)
    ap.add_argument("--removal-epochs", type=int, nargs="+", default=[1, 2],
                    help="epochs (0-based) at whose start IDS/DDR remove an equal share")  # fmt: skip
    ap.add_argument("--removal-grid", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                    help="IDS removal shares to choose from (each < 1/3 if it may widen)")  # fmt: skip
    ap.add_argument("--max-updates", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    args = ap.parse_args()
    if not all(0 < f < 1 for f in args.removal_grid):
        ap.error(f"--removal-grid: shares must be in (0, 1); got {args.removal_grid}")
    if args.quick:
        args.epochs, args.max_updates, args.prune_every, args.ramp_updates = 2, 6, 2, 8
        args.removal_epochs = [1]
        args.work = args.work.with_name(args.work.name + "-quick")
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    lrs = {f: {"chosen": args.lr_grid[0]} if args.quick else choose_lr(args, f) for f in FAMILIES}
    removal = (
        {"chosen": PAPER_REMOVAL} if args.quick else choose_removal(args, lrs["esacl"]["chosen"])
    )
    rows = []
    for i, (method, sp, seed) in enumerate(plan(args.quick)):
        lr = lrs[METHODS[method][3]]["chosen"]
        rows.append(one_run(args, method, sp, seed, lr, removal["chosen"]))
        print(f"[{i + 1}/{len(plan(args.quick))}] {method} {sp} s{seed}: ACC "
              f"{rows[-1]['average_accuracy']:.1f}", flush=True)  # fmt: skip
    seeds = (0,) if args.quick else SEEDS
    diffs = {f"esacl - {m}": paired_difference(pick(rows, "esacl", MAIN, "average_accuracy", seeds),
                                               pick(rows, m, MAIN, "average_accuracy", seeds))
             for m in ("replay", "sparcl", "magnitude", *CONTROLS)}  # fmt: skip
    a, b = drops(rows, "esacl-dense", MAIN), drops(rows, "replay", MAIN)
    diffs["one-shot drop: replay - esacl-dense (0.9, end)"] = paired_difference(b, a)
    tg = targets(rows, diffs)
    write_results("esacl", {"args": {k: str(v) for k, v in vars(args).items()}, "lr": lrs,
                            "removal": removal, "rows": rows, "paired_differences": diffs,
                            "targets": tg},
                  report(args, rows, lrs, removal, diffs, tg), out=args.out)  # fmt: skip


def report(args, rows, lrs, removal, diffs, tg) -> str:
    cols = ("average_accuracy", "final_accuracy", "forgetting", "val_accuracy", "density",
            "train_gflops", "images", "train_s")  # fmt: skip
    table = []
    for sp, methods in ((MAIN, METHODS), (0.75, FAMILIES[:3]), (0.95, FAMILIES[:3])):
        for m in methods:
            if vals := pick(rows, m, sp, "average_accuracy", (*SEEDS,)):
                table.append({"method": m, "sparsity": 0.0 if m in ("replay", "esacl-dense") else sp,
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
    total = sum(r["wall_s"] for r in rows) + sum(
        one_run(args, f, MAIN, SELECTION_SEED, lr)["wall_s"] for f in FAMILIES for lr in lrs[f].get("grid", [])) + sum(
        one_run(args, "esacl", MAIN, SELECTION_SEED, lrs["esacl"]["chosen"], r)["wall_s"]
        for r in removal.get("grid", []) if r != PAPER_REMOVAL)  # fmt: skip
    chosen = {f: {k: v.get(k) for k in ("chosen", "grid", "at_edge")} for f, v in lrs.items()}
    head = (
        f"`{SCENARIO}` at 28 px, backbone `{args.backbone}` (small input), {args.epochs} epochs "
        f"per experience for every run, batch 32, SGD constant lr, memory {MEMORY} (random) where "
        f"used. Reported seeds {list(SEEDS)} (mean ± sd; 0.75 and 0.95: seed 0); lr per family "
        f"chosen at 0.9 by seed {SELECTION_SEED} on the validation splits: {json.dumps(chosen)}; "
        f"then EsaCL's removal share at that lr: {removal['chosen']:g} of "
        f"{removal.get('grid', [removal['chosen']])} (at an edge: {removal.get('at_edge')}). "
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
        "## Targets",
        markdown_table(tg, ["name", "value", "goal", "met"]),
    ]
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
