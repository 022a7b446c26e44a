"""End-to-end speed (issue 25): the README main job, the raw-loop reference, a 10-site stream.

Parts, each saved as soon as it finishes (a rerun skips finished parts; ``--fresh`` starts
over; a part that was interrupted is run again from scratch):

- ``main`` / ``main_contiguous`` / ``main_unfolded``: ``medcl run
  configs/medmnist-cross3-dynammo.yaml`` as a subprocess (the user's command, report included)
  at seeds 0-5 (accuracy reported at the README's 0, 1, 2 and over all), as shipped (NHWC,
  BatchNorm folded while scoring), with ``train.channels_last=false`` and with
  ``eval.fold_batchnorm=false``, the variants alternating seed by seed: wall time, accuracy, and
  the phase split ``metrics.json`` records under ``timing`` (train = stage 1; consolidation =
  merge + stage-2 head re-tuning; features = the forward passes for herding and the stage-2
  set, each once; memory = exemplar selection; eval, curves, calibration, predictions,
  checkpoint, metrics; setup = data, model, untrained baseline; report). "Training" in the
  targets is train + consolidation.
- ``loop``: medcl's training loop vs a plain PyTorch loop on the same model and seeded
  batches, contiguous, NHWC and compiled; scoring throughput (``_loop_reference.py``).
- ``stream``: ``configs/pneumonia-sites-dynammo.yaml`` with 10 simulated sites (small
  cohorts): wall time of every experience T = 1..10 and its split.

Run alone on the machine (the numbers are wall times):
``MEDCL_DATA_ROOT=... .venv/bin/python benchmarks/end_to_end.py``; ``--smoke`` checks that the
script works in a few minutes (tiny budgets; not results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, data_root, json_text, write_results
from _end_to_end_report import MAIN, MAIN_VARIANTS, SEEDS, accuracy_difference, markdown
from _loop_reference import loop_part

STREAM = REPO / "configs" / "pneumonia-sites-dynammo.yaml"
LAYOUT_SEEDS = (0, 1, 2, 3, 4, 5)  # variants: time and the paired accuracy difference


# -- the medcl command as a user runs it ------------------------------------------------------


def medcl_run(config: Path, out: Path, name: str, overrides: list[str], root: Path) -> dict:
    """``medcl run CONFIG`` in a subprocess (fresh directory): wall seconds + metrics.json."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted attempt is started over
    cmd = [str(Path(sys.executable).with_name("medcl")), "run", str(config), "--quiet"]
    for item in [f"output_dir={out}", f"name={name}", *overrides]:
        cmd += ["--set", item]
    env = os.environ | {"MEDCL_DATA_ROOT": str(root)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"wall_s": wall, "stderr": done.stderr.strip().splitlines()[-5:], "metrics": metrics}


def phase_totals(timing: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase summed over experiences, plus set-up and report."""
    out: dict[str, float] = {"setup": sum(timing.get("setup", []))}
    for rec in timing.get("experiences", []):
        for k, v in rec.items():
            if k not in ("experience", "total"):
                out[k] = out.get(k, 0.0) + v
    out["report"] = timing.get("report", 0.0)
    return out


def main_run(args, root: Path, work: Path, variant: str, seed: int) -> dict:
    """One main-job run of ``variant`` (:data:`MAIN_VARIANTS`; kept in ``work`` as JSON: a
    rerun reuses it unless ``--fresh``)."""
    layout, variant_over = MAIN_VARIANTS[variant]
    saved = work / f"main-{layout}-s{seed}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    over = ["train.max_updates=3", "strategy.retune_epochs=2"] if args.smoke else []
    over += variant_over
    res = medcl_run(MAIN, work, f"main-{layout}-s{seed}", [*over, f"seed={seed}"], root)
    phases = phase_totals(res["metrics"]["timing"])
    training = phases.get("train", 0.0) + phases.get("consolidation", 0.0)
    record = {
        "seed": seed,
        "wall_s": res["wall_s"],
        "phases_s": phases,
        "untimed_s": res["wall_s"] - sum(phases.values()),  # imports, start-up, exit
        "training_s": training,
        "outside_training_share": 1 - training / res["wall_s"],
        "final_accuracy": res["metrics"]["summary"].get("final_accuracy"),
        "fit": res["metrics"]["fit"],
        "stderr_tail": res["stderr"],
    }
    saved.write_text(json_text(record))
    say(args, f"main ({layout}, seed {seed}): {res['wall_s']:.1f} s")
    return record


def main_seeds(args) -> tuple[int, ...]:
    return SEEDS[:1] if args.smoke else LAYOUT_SEEDS


def main_part(args, root: Path, work: Path, variant: str) -> dict:
    """The main job as ``variant`` (:data:`MAIN_VARIANTS`) at every seed of
    :data:`LAYOUT_SEEDS`: per-run records; time as the mean over all runs, accuracy at the
    README's seeds and over all."""
    runs = [main_run(args, root, work, variant, s) for s in main_seeds(args)]
    layout = MAIN_VARIANTS[variant][0]
    keys = list(dict.fromkeys(p for r in runs for p in r["phases_s"]))
    reported = [r["final_accuracy"] for r in runs if r["seed"] in SEEDS]
    every = [r["final_accuracy"] for r in runs]
    return {
        "layout": layout,
        "runs": runs,
        "wall_s": statistics.mean(r["wall_s"] for r in runs),
        "phases_s": {k: statistics.mean(r["phases_s"].get(k, 0.0) for r in runs) for k in keys},
        "untimed_s": statistics.mean(r["untimed_s"] for r in runs),
        "training_s": statistics.mean(r["training_s"] for r in runs),
        "outside_training_share": statistics.mean(r["outside_training_share"] for r in runs),
        "final_accuracy": statistics.mean(reported),
        "final_accuracy_sd": statistics.stdev(reported) if len(reported) > 1 else None,
        "final_accuracy_all_seeds": statistics.mean(every),
        "final_accuracy_all_seeds_sd": statistics.stdev(every) if len(every) > 1 else None,
    }


# -- cost as the stream grows ----------------------------------------------------------------


def stream_part(args, root: Path, work: Path) -> dict:
    sites = 3 if args.smoke else 10
    over = [f"scenario.n_sites={sites}"]
    over += ["train.max_updates=2", "strategy.retune_epochs=2"] if args.smoke else []
    res = medcl_run(STREAM, work, "stream", over, root)
    rows = []
    for rec in res["metrics"]["timing"]["experiences"]:
        total = rec["total"]
        rows.append(
            {"T": rec["experience"] + 1, "total_s": total}
            | {f"{k}_s": v for k, v in rec.items() if k not in ("experience", "total")}
            | {"eval_share": (rec.get("eval", 0.0) + rec.get("curves", 0.0)) / total}
        )
    return {"sites": sites, "wall_s": res["wall_s"], "experiences": rows}


# -- bookkeeping -------------------------------------------------------------------------------


def say(args, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def targets(parts: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    if "main" in parts:
        m = parts["main"]
        out.append(target("main job wall time (s)", m["wall_s"], "<= 50", m["wall_s"] <= 50))
        share = m["outside_training_share"]
        out.append(
            target("time outside stage-1 + stage-2 training", share, "<= 0.20", share <= 0.2)
        )
    variants = {
        "main_contiguous": "NHWC (default) - contiguous layout",
        "main_unfolded": "BatchNorm folded (default) - unfolded scoring",
    }
    for other, what in variants.items():
        if "main" in parts and other in parts:
            d = accuracy_difference(parts, other)
            name = f"final accuracy, {what}, paired over seeds (points)"
            out.append(target(name, d["mean"], "abs(value) <= 1.0", abs(d["mean"]) <= 1.0))
    if "loop" in parts:
        med = parts["loop"]["median"]
        ratio = med["medcl eager"] / med["raw eager"]
        out.append(target("medcl eager / raw eager throughput", ratio, ">= 0.95", ratio >= 0.95))
        if "medcl compile (incl. compilation)" in med:
            c = med["medcl compile (incl. compilation)"] / med["raw eager"]
            out.append(target("medcl train.compile / raw eager throughput", c, ">= 1.2", c >= 1.2))
    if "stream" in parts and parts["stream"]["experiences"]:
        rows = parts["stream"]["experiences"]
        worst = max(rows, key=lambda r: r["eval_share"])
        goal = f"evaluation share of an experience's wall time, worst of T = 1..{rows[-1]['T']}"
        out.append(target(goal, worst["eval_share"], "<= 0.25", worst["eval_share"] <= 0.25))
    return out


def target(name: str, value: float, goal: str, met: bool) -> dict[str, Any]:
    return {"name": name, "value": value, "goal": goal, "met": bool(met)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", help="MedMNIST root (default $MEDCL_DATA_ROOT)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default results/)")
    ap.add_argument(
        "--work", type=Path, default=None, help="run directories (default runs/end_to_end)"
    )
    ap.add_argument(
        "--parts",
        default="main,main_contiguous,main_unfolded,loop,stream",
        help="comma-separated subset",
    )
    ap.add_argument("--updates", type=int, default=None, help="loop updates (default 74)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="loop threads (default: all)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes)")
    ap.add_argument("--smoke", action="store_true", help="tiny budgets: check the script works")
    ap.add_argument("--fresh", action="store_true", help="ignore saved partial results")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    args.no_compile = args.no_compile or args.smoke

    root = data_root(args.root)
    out = args.out or RESULTS
    name = "end_to_end_smoke" if args.smoke else "end_to_end"
    work = args.work or REPO / "runs" / name  # run directories stay out of results/
    work.mkdir(parents=True, exist_ok=True)
    partial = work / "partial.json"
    if args.fresh:  # the main job's per-run records too
        for saved in work.glob("main-*.json"):
            saved.unlink()
    parts: dict[str, Any] = (
        {} if args.fresh or not partial.is_file() else json.loads(partial.read_text())
    )
    todo = [p for p in args.parts.split(",") if p not in parts]
    for seed in main_seeds(args):  # the variants alternate: machine noise reaches each alike
        for variant in (v for v in MAIN_VARIANTS if v in todo):
            main_run(args, root, work, variant, seed)
    runners = {
        **{v: (lambda v=v: main_part(args, root, work, v)) for v in MAIN_VARIANTS},
        "loop": lambda: loop_part(args, root, lambda text: say(args, text)),
        "stream": lambda: stream_part(args, root, work),
    }
    for part in args.parts.split(","):
        if part in parts:
            say(args, f"{part}: done before (in {partial}); --fresh to measure again")
            continue
        say(args, f"{part}: running")
        parts[part] = runners[part]()
        partial.write_text(json_text(parts))  # partial-safe: a finished part is never redone
    parts["targets"] = targets(parts)
    payload = {"smoke": args.smoke, "complete": all(p in parts for p in runners), **parts}
    write_results(name, payload, markdown(parts, args.smoke), out=out)
    say(args, markdown(parts, args.smoke))


if __name__ == "__main__":
    main()
