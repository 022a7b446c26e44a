"""Stability gap of vanilla rehearsal (two arms) vs SGM on a pretrained EfficientNet-Lite0.

Harun & Kanan, TMLR 2024 report the stability gap falling from 0.300 (vanilla rehearsal) to 0.006
with SGM, and SGM needing up to 16.7x fewer updates than joint retraining. This script measures
both on medmnist-cross3 (class-incremental) and pneumonia-sites (domain-incremental: every class
is old after site 0, so the new-unit mechanisms are no-ops) at 64 px (issues 14 and 24):

- **Base model** (per stream and seed): offline ImageNet EfficientNet-Lite0 + a head trained on
  experience 0 (learning rate and epochs chosen on experience 0's validation split). Every arm
  and ablation of a seed starts from the same base.
- **Arms** (:mod:`_stability_arms`), all with the same frozen front / plastic back, memory,
  data mixture and BatchNorm policy: ``vanilla-authors`` (the paper's baseline: hard CE, full
  fine-tuning, AdamW at a constant rate, no warm-up), ``vanilla-tuned`` (hard CE, OneCycle
  warm-up, layer-wise decay 0.9) and ``sgm`` (OneCycle, one rate for every layer). Each arm's
  peak rate is chosen on the *validation* splits (final mean accuracy) of ``--selection-seed``,
  which is never reported, from ``--lrs``, grown by up to ``--lr-extend`` rates while the best
  is at an edge; the reported ``--seeds`` use it. Ablations (first reported seed, the arm's
  rate) change one thing each: an SGM component off, the authors' literal or ``init_quantile:
  0`` head init, the tuned layer decay, BatchNorm in train mode.
- **Upper bound** (seed 0): for each experience ``t``, the same network with back + head trained on
  the union of experiences ``0..t`` to convergence (epoch kept by validation accuracy); its
  updates to the kept model are joint retraining's cost in the 16.7x comparison.
- **Curves**: old/new/all accuracy every ``--eval-every`` updates on fixed test subsets of at most
  ``--eval-samples`` images per experience; gap and dip metrics from
  :mod:`medcl.metrics.stability`; paired differences (SGM minus each vanilla, 95 % CIs) over
  the reported seeds.

Independent runs go to ``--jobs`` worker processes (``--threads`` torch threads each); results
are merged by run id, so the order they finish in does not matter. Each finished run is stored
in ``--work-dir`` (reused when re-run with identical settings) and the results files are
rewritten: a run killed at a time limit still leaves a usable JSON. Writes ``stability_gap.json``,
``stability_gap.md`` and ``stability_gap_<stream>.png`` to ``--out``.

    nice python benchmarks/stability_gap.py [--device auto] [--jobs 2] [--out DIR] [--quick]

Cost at the defaults, measured (2026-12-05, this 2-core machine, alone, ``--jobs 2 --threads
1``): 8 bases, 5 joint models (147-369 s each: full epochs over every experience's data), 61
continual runs (selection grids grown by up to 3 rates: the authors' vanilla needs a constant
rate 9-27x below the others'); 74 runs, 105 worker-minutes, 59 minutes of wall time (50 + 9: the
grids were widened in a second invocation). A continual run costs 45-120 s: 30 updates per
experience of 64 + 64 images, curves every 3 updates on cached front outputs
(``--no-front-cache``: through the full network, about 3x the curve cost). On one GPU
``--device cuda --jobs 8 --threads 2`` runs every independent job at once. ``--quick --out
DIR`` is a smoke test (minutes; numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from sklearn.exceptions import UndefinedMetricWarning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, data_root, json_text, machine
from _stability_arms import (
    ABLATIONS,
    ARMS,
    STREAMS,
    arm_of,
    options_of,
    run_id,
    select_lr,
    variants,
)
from _stability_report import report
from _stability_tasks import init_worker, run_task

QUICK = {
    "seeds": [0, 1],
    "lrs": [1.5e-3, 4.5e-3],
    "lr_extend": 0,
    "updates": 6,
    "eval_every": 3,
    "eval_samples": 40,
    "base_epochs": 2,
    "joint_epochs": 1,
    "joint_max_updates": 6,
}


def common(args: argparse.Namespace, scenario: str, seed: int) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "image_size": args.image_size,
        "root": str(data_root(args.root)),
        "device": args.device,
        "seed": seed,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "memory": args.memory,
        "eval_every": args.eval_every,
        "eval_samples": args.eval_samples,
        "updates": args.updates,
        "head_path": str(args.work_dir / f"base-{scenario}-s{seed}.pt"),
    }


def shared_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"trainable_stages": args.trainable_stages, "base": "head"}


def arm(args: argparse.Namespace, sc: str, variant: str, seed: int, lr: float) -> dict[str, Any]:
    """A continual run of a main arm or an ablation from the base model of (``sc``, ``seed``);
    on the selection seed, a learning-rate selection run (final validation accuracy only).

    The options name the optimiser and ``layer_decay`` explicitly, so a stored run made under
    other defaults is never reused for this one.
    """
    strategy, options = options_of(variant)
    return common(args, sc, seed) | {
        "id": run_id(sc, variant, seed, lr),
        "kind": "arm",
        "variant": variant,
        "strategy": strategy,
        "options": shared_options(args) | options,
        "lr": lr,
        "select": seed == args.selection_seed,
        "front_cache": args.front_cache,
        "needs": [f"{sc}/base/s{seed}"],
    }


def plan(args: argparse.Namespace, done: dict[str, dict]) -> list[dict[str, Any]]:
    """Every task that can be defined from the results so far, with the ids it needs."""
    tasks: list[dict[str, Any]] = []
    for sc in args.scenarios:
        for seed in [args.selection_seed, *args.seeds]:
            tasks.append(
                common(args, sc, seed)
                | {
                    "id": f"{sc}/base/s{seed}",
                    "kind": "base",
                    "options": shared_options(args),
                    "base_epochs": args.base_epochs,
                    "base_lrs": args.base_lrs,
                    "needs": [],
                }
            )
        for t in range(1, STREAMS[sc]):
            tasks.append(
                common(args, sc, 0)
                | {
                    "id": f"{sc}/joint/t{t}",
                    "kind": "joint",
                    "upto": t,
                    "strategy": "rehearsal",
                    "options": shared_options(args) | {"base": "plastic"},
                    "lr": args.joint_lr,
                    "joint_epochs": args.joint_epochs,
                    "joint_max_updates": args.joint_max_updates,
                    "needs": [],
                }
            )

        # each main arm: its lr grid on the selection seed (never reported), extended until the
        # best rate is inside it; then the reported seeds at the chosen rate
        lr_of: dict[str, float | None] = {}
        for name in ARMS:
            grid, lr_of[name], _ = select_lr(done, sc, name, args)
            tasks += [arm(args, sc, name, args.selection_seed, lr) for lr in grid]
            if lr_of[name] is not None:
                tasks += [arm(args, sc, name, s, lr_of[name]) for s in args.seeds]
        for v in variants(args, sc):  # ablations: the first reported seed, the arm's rate
            lr = lr_of[arm_of(v)]
            if lr is not None:
                tasks.append(arm(args, sc, v, args.seeds[0], lr))
    return tasks


def _cache_path(args: argparse.Namespace, task: dict) -> Path:
    return args.work_dir / (task["id"].replace("/", "__") + ".json")


def _cached(args: argparse.Namespace, task: dict) -> dict | None:
    path = _cache_path(args, task)
    if args.fresh or not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("task") != json.loads(json.dumps(task)):
        return None
    if task["kind"] == "base" and not Path(task["head_path"]).is_file():
        return None
    return stored["result"]


def _store(args: argparse.Namespace, task: dict, result: dict) -> None:
    path = _cache_path(args, task)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json_text({"task": task, "result": result}))
    tmp.replace(path)


def execute(args: argparse.Namespace) -> tuple[dict[str, dict], dict[str, str]]:
    """Run the plan to completion, re-planning as selections finish; write results as we go.

    Returns:
        ``(done, failed)``: results by run id, and the error of each run that raised.
    """
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}
    submitted: set[str] = set()
    start = time.perf_counter()
    pool = (
        ProcessPoolExecutor(
            max_workers=args.jobs,
            mp_context=mp.get_context("spawn"),  # CUDA cannot be forked
            initializer=init_worker,
            initargs=(args.threads,),
        )
        if args.jobs > 1
        else None
    )
    if pool is None:
        init_worker(args.threads)
    running: dict[Any, dict] = {}
    try:
        while True:
            tasks = plan(args, done)
            ready = [
                t for t in tasks if t["id"] not in submitted and all(n in done for n in t["needs"])
            ]
            ready.sort(key=lambda t: ("base", "joint", "arm").index(t["kind"]))
            for t in ready:
                submitted.add(t["id"])
                cached = _cached(args, t)
                if cached is not None:
                    done[t["id"]] = cached
                    print(f"reused {t['id']}", flush=True)
                elif pool is not None:
                    running[pool.submit(run_task, t)] = t
                else:
                    running[t["id"]] = t
            if ready and any(t["id"] in done for t in ready):
                continue  # reused results may unlock more tasks
            if not running:
                break
            if pool is not None:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                pairs = [(running.pop(f), f) for f in finished]
            else:
                task = running.pop(next(iter(running)))
                pairs = [(task, None)]
            for task, future in pairs:
                try:
                    result = future.result() if future is not None else run_task(task)
                except Exception as e:  # one failed run must not lose the others
                    failed[task["id"]] = f"{type(e).__name__}: {e}"
                    print(f"FAILED {task['id']}: {failed[task['id']]}", flush=True)
                    continue
                done[task["id"]] = result
                _store(args, task, result)
                total = len({t["id"] for t in plan(args, done)})
                print(
                    f"[{len(done)}/{total}] {task['id']}: {result['seconds']:.0f} s "
                    f"(elapsed {time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
            report(args, done, machine(), partial=True, failed=failed)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return done, failed


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=["medmnist-cross3", "pneumonia-sites"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="reported seeds")
    p.add_argument("--selection-seed", type=int, default=100, help="lr selection (unreported)")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1.5e-3, 4.5e-3])
    p.add_argument("--lr-extend", type=int, default=3, help="rates the grid may grow by")
    p.add_argument("--updates", type=int, default=30, help="updates per experience >= 1")
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--eval-samples", type=int, default=500, help="test images per experience")
    p.add_argument("--batch-size", type=int, default=64, help="new images; as many replayed")
    p.add_argument("--memory", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--trainable-stages", type=int, default=2)
    p.add_argument("--base-epochs", type=int, default=30)
    p.add_argument("--base-lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--joint-lr", type=float, default=1.5e-3)
    p.add_argument("--joint-epochs", type=int, default=6)
    p.add_argument("--joint-max-updates", type=int, default=None)
    p.add_argument(
        "--no-front-cache",
        dest="front_cache",
        action="store_false",
        help="curves through the full network (default: cached front outputs, back only)",
    )
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--out", type=Path, default=None, help=f"default {RESULTS}")
    p.add_argument("--work-dir", type=Path, default=None, help="default runs/stability_gap")
    p.add_argument("--root", default=None, help="MedMNIST folder (default: $MEDCL_DATA_ROOT)")
    p.add_argument("--fresh", action="store_true", help="ignore stored runs")
    p.add_argument("--quick", action="store_true", help="smoke scale (needs --out)")
    args = p.parse_args(argv)
    if args.quick:
        if args.out is None:
            p.error("--quick needs --out (benchmarks/results holds the full-scale numbers)")
        for k, v in QUICK.items():
            setattr(args, k, v)
    unknown = [s for s in args.scenarios if s not in STREAMS]
    if unknown:
        p.error(f"--scenarios: {unknown} not supported; choose from {list(STREAMS)}")
    if args.updates < 1 or args.eval_every < 1 or args.eval_samples < 1:
        p.error("--updates, --eval-every and --eval-samples must be >= 1")
    if args.updates % args.eval_every:
        p.error("--updates must be a multiple of --eval-every (the last update is evaluated)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use auto or cpu)")
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    if args.selection_seed in args.seeds:
        p.error(f"--selection-seed {args.selection_seed} is among --seeds {args.seeds}: the "
                "seed that picks the learning rate must not be reported; choose another")  # fmt: skip
    if args.lr_extend < 0:
        p.error("--lr-extend must be >= 0")
    args.out = args.out or RESULTS
    args.work_dir = args.work_dir or (
        args.out / "runs" if args.quick else REPO / "runs" / "stability_gap"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
    done, failed = execute(args)
    missing = {t["id"] for t in plan(args, done)} - set(done)
    print(report(args, done, machine(), partial=bool(missing), failed=failed))
    if missing:
        print(f"{len(missing)} run(s) missing: {sorted(missing)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
