"""End-to-end speed (issue 25): the README main job, the raw-loop reference, a 10-site stream.

Three parts, each saved as soon as it finishes (a rerun skips finished parts; ``--fresh``
starts over; a part that was interrupted is run again from scratch):

- ``main``: ``medcl run configs/medmnist-cross3-dynammo.yaml`` as a subprocess (the user's
  command, report included): its wall time and the phase split ``metrics.json`` records under
  ``timing`` (train = stage 1; consolidation = merge + stage-2 head re-tuning; features = the
  forward passes for herding and the stage-2 set, each once; memory = exemplar selection; eval,
  curves, predictions, checkpoint, metrics; setup = data, model, untrained baseline; report).
  "Training" in the targets is train + consolidation.
- ``loop``: the main job's first experience (DynaMMo stage 1 on the frozen pretrained
  EfficientNet-Lite0, 64 px, batch 64) for the same number of updates, same seeded batches,
  alternating repeats: medcl's ``fit_experience`` vs a plain PyTorch loop on the same model,
  eager and with ``train.channels_last``; and ``train.compile`` (first-step compilation
  included, as a user pays it) next to a raw compiled loop's steady state.
- ``stream``: ``configs/pneumonia-sites-dynammo.yaml`` with 10 simulated sites (small
  cohorts): wall time of every experience T = 1..10 and its split.

Run alone on the machine (the numbers are wall times):
``MEDCL_DATA_ROOT=... .venv/bin/python benchmarks/end_to_end.py``; ``--smoke`` checks that the
script works in a few minutes (tiny budgets; not results).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, data_root, json_text, markdown_table, write_results

MAIN = REPO / "configs" / "medmnist-cross3-dynammo.yaml"
STREAM = REPO / "configs" / "pneumonia-sites-dynammo.yaml"


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


def main_part(args, root: Path, work: Path, *extra: str) -> dict:
    over = ["train.max_updates=3", "strategy.retune_epochs=2"] if args.smoke else []
    res = medcl_run(MAIN, work, "main" + "-".join(("", *extra)), [*over, *extra], root)
    phases = phase_totals(res["metrics"]["timing"])
    training = phases.get("train", 0.0) + phases.get("consolidation", 0.0)
    return {
        "wall_s": res["wall_s"],
        "phases_s": phases,
        "untimed_s": res["wall_s"] - sum(phases.values()),  # imports, start-up, exit
        "training_s": training,
        "outside_training_share": 1 - training / res["wall_s"],
        "final_accuracy": res["metrics"]["summary"].get("final_accuracy"),
        "fit": res["metrics"]["fit"],
        "stderr_tail": res["stderr"],
    }


# -- medcl's loop vs a plain PyTorch loop on the same model and batches ------------------------


def loop_part(args, root: Path) -> dict:
    from medcl.config import TrainConfig, load_config
    from medcl.data.memory import ReplayMemory
    from medcl.data.transforms import to_model_input
    from medcl.engine.components import build_components
    from medcl.engine.trainer import experience_info, fit_experience

    os.environ["MEDCL_DATA_ROOT"] = str(root)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg = load_config(MAIN, [])
    scenario, fresh, _ = build_components(cfg)
    exp = scenario.experiences[0]
    updates = args.updates or (4 if args.smoke else 74)  # 74: the main job's experience 0
    base = {"epochs": 1, "batch_size": 64, "lr": 0.05, "augment": "none", "amp": False}

    def medcl(**opts: bool) -> float:
        strategy = copy.deepcopy(fresh)
        tc = TrainConfig(**base, max_updates=updates, **opts)
        stats = fit_experience(
            strategy, exp, past=[], num_seen_classes=2, memory=ReplayMemory(0), cfg=tc,
            quiet=True, seed=0,
        )  # fmt: skip
        return stats.images_per_s

    def raw(channels_last: bool = False, compiled: bool = False, updates: int = updates) -> float:
        model = copy.deepcopy(fresh)
        model.grow(experience_info(exp, 2))
        params = list(model.trainable_parameters())
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=updates)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        step_fn = torch.compile(model) if compiled else model
        g = torch.Generator().manual_seed(0)  # fit_experience's batches for seed 0
        order = torch.randperm(len(exp.train), generator=g)
        model.train()
        warm = 2 if compiled else 0  # compiled: steady state after compilation
        start, images = 0.0, 0
        for step in range(updates + warm):
            if step == warm:
                start, images = time.perf_counter(), 0
            idx = order[(step % (len(order) // 64)) * 64 :][:64]
            x = to_model_input(exp.train.images[idx])  # (64, 3, 64, 64)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = model.heads[-1].targets(exp.train.labels[idx], torch.ones(len(idx), dtype=bool))
            loss = F.cross_entropy(step_fn(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            images += len(idx)
        return images / (time.perf_counter() - start)

    raw(updates=2)  # warm-up (kernel selection, allocator): not measured
    runs: dict[str, list[float]] = {}
    variants = {
        "raw eager": lambda: raw(),
        "medcl eager": lambda: medcl(),
        "raw channels_last": lambda: raw(channels_last=True),
        "medcl channels_last": lambda: medcl(channels_last=True),
    }
    if not args.no_compile:
        variants |= {
            "raw compiled (steady state)": lambda: raw(compiled=True),
            "medcl compile (incl. compilation)": lambda: medcl(compile=True),
        }
    for r in range(1 if args.smoke else args.repeats):
        for name, fn in variants.items():  # alternating: machine noise hits every variant
            if r and "compil" in name:
                continue  # compilation once is enough (minutes on a 2-core CPU)
            runs.setdefault(name, []).append(fn())
            say(args, f"loop repeat {r}: {name} {runs[name][-1]:.1f} img/s")
    median = {k: statistics.median(v) for k, v in runs.items()}
    scoring = eval_sweep(fresh, exp, n=128 if args.smoke else 1024)
    say(args, f"scoring images/s by (layout, eval.batch_size): {scoring}")
    return {
        "updates": updates,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "median": median,
        "scoring": scoring,
    }


def eval_sweep(fresh, exp, n: int) -> list[dict[str, Any]]:
    """Scoring throughput of the trained-structure model by layout and ``eval.batch_size``."""
    from medcl.engine.evaluate import predict_proba
    from medcl.engine.trainer import experience_info

    model = copy.deepcopy(fresh)
    model.grow(experience_info(exp, 2))
    images = exp.test.images[:n]
    rows = []
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model.to(memory_format=fmt)
        for batch in (64, 128, 256, 512):
            model.feature_cache.clear()
            start = time.perf_counter()
            predict_proba(model, images, batch_size=batch)
            rows.append(
                {
                    "layout": layout,
                    "batch": batch,
                    "images_per_s": n / (time.perf_counter() - start),
                }
            )
    return rows


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
    if "main_channels_last" in parts:
        w = parts["main_channels_last"]["wall_s"]
        out.append(target("main job wall time, train.channels_last (s)", w, "<= 50", w <= 50))
    if "loop" in parts:
        med = parts["loop"]["median"]
        ratio = med["medcl eager"] / med["raw eager"]
        out.append(target("medcl eager / raw eager throughput", ratio, ">= 0.95", ratio >= 0.95))
        if "medcl compile (incl. compilation)" in med:
            c = med["medcl compile (incl. compilation)"] / med["raw eager"]
            out.append(target("medcl train.compile / raw eager throughput", c, ">= 1.2", c >= 1.2))
    if "stream" in parts and parts["stream"]["experiences"]:
        last = parts["stream"]["experiences"][-1]
        share = last["eval_share"]
        goal = f"evaluation share of experience {last['T']}'s wall time"
        out.append(target(goal, share, "<= 0.25", share <= 0.25))
    return out


def target(name: str, value: float, goal: str, met: bool) -> dict[str, Any]:
    return {"name": name, "value": value, "goal": goal, "met": bool(met)}


def markdown(parts: dict[str, Any], smoke: bool) -> str:
    lines = ["# End-to-end speed (issue 25)", ""]
    if smoke:
        lines += ["**Smoke run (tiny budgets): these numbers are not results.**", ""]
    mains = [k for k in ("main", "main_channels_last") if k in parts]
    if mains:
        phases = list(dict.fromkeys(p for k in mains for p in parts[k]["phases_s"]))
        rows = [{"phase": p} | {k: parts[k]["phases_s"].get(p, 0.0) for k in mains} for p in phases]
        rows += [
            {"phase": "untimed (imports, start-up, exit)"}
            | {k: parts[k]["untimed_s"] for k in mains},
            {"phase": "**wall**"} | {k: parts[k]["wall_s"] for k in mains},
            {"phase": "stage-1 + stage-2 training"} | {k: parts[k]["training_s"] for k in mains},
            {"phase": "share outside training"}
            | {k: parts[k]["outside_training_share"] for k in mains},
            {"phase": "final accuracy"} | {k: parts[k]["final_accuracy"] for k in mains},
        ]
        lines += [
            f"## Main job: `medcl run {MAIN.relative_to(REPO)}` (seconds per phase)",
            "",
            "`main_channels_last` adds `--set train.channels_last=true`.",
            "",
            markdown_table(rows, ["phase", *mains]),
            "",
        ]
    if "loop" in parts:
        loop = parts["loop"]
        rows = [
            {
                "loop": k,
                "median_images_per_s": v,
                "runs": ", ".join(f"{x:.1f}" for x in loop["runs"][k]),
            }
            for k, v in loop["median"].items()
        ]
        lines += [
            f"## Training loop: {loop['updates']} updates, batch 64, {loop['threads']} threads",
            "",
            markdown_table(rows, ["loop", "median_images_per_s", "runs"]),
            "",
            "Scoring (evaluation, herding features) by layout and `eval.batch_size`:",
            "",
            markdown_table(loop.get("scoring", []), ["layout", "batch", "images_per_s"]),
            "",
        ]
    if "stream" in parts:
        s = parts["stream"]
        cols = ["T", "total_s", "train_s", "curves_s", "consolidation_s", "features_s"]
        cols += ["memory_s", "eval_s"]
        cols += ["predictions_s", "checkpoint_s", "metrics_s", "eval_share"]
        lines += [
            f"## Stream of {s['sites']} sites: wall {s['wall_s']:.1f} s",
            "",
            markdown_table(s["experiences"], cols),
            "",
        ]
    rows = parts.get("targets", [])
    lines += ["## Targets", "", markdown_table(rows, ["name", "value", "goal", "met"])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", help="MedMNIST root (default $MEDCL_DATA_ROOT)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default results/)")
    ap.add_argument(
        "--work", type=Path, default=None, help="run directories (default runs/end_to_end)"
    )
    ap.add_argument(
        "--parts", default="main,main_channels_last,loop,stream", help="comma-separated subset"
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
    parts: dict[str, Any] = (
        {} if args.fresh or not partial.is_file() else json.loads(partial.read_text())
    )
    runners = {
        "main": lambda: main_part(args, root, work),
        "main_channels_last": lambda: main_part(args, root, work, "train.channels_last=true"),
        "loop": lambda: loop_part(args, root),
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
