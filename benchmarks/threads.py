"""CPU threads on a shared machine: training updates/s with 1, 2 and ``auto`` threads.

The issue (28): with torch's default 2 threads beside one busy process, 40 updates took 62 s;
with 1 thread 0.93 s. ``train.num_threads: auto`` (:mod:`medcl.engine.threads`) counts the cores
other processes leave free when the run starts. This measures it where it matters:

* **alone**: nothing else started by the benchmark (other users of the machine are recorded as
  ``busy_cpus_before``: run it on an otherwise idle machine);
* **busy**: one CPU-burning process (``--burners``) started first, pinned to the last usable
  CPU (``--unpinned``: wherever the scheduler puts it), bounded by a deadline and killed at the
  end of the condition.

The loop is medcl's trainer (``fit_experience``, fine-tune) on a timm ResNet-18 (standard stem)
at 28 px PneumoniaMNIST, batch 32: per setting, 2 warm-up updates, then ``--updates`` timed ones
or as many as fit in ``--budget`` seconds (so a stalled setting still ends; its rate is over the
updates it made). Settings alternate order between repeats. Before each setting torch's default
thread count is restored, so ``auto`` chooses as a fresh run does (sampling the CPUs for 0.1 s).

``2 passive`` (2 threads with ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of
spinning) runs in a second process, since torch reads that variable only when it is imported; it
is shown for information and is not among the settings ``auto`` is compared with.

Target: in both conditions auto reaches >= 0.8x the updates/s of the best of 1 and 2 threads.

    .venv/bin/python benchmarks/threads.py          # < 3 min on 2 idle cores; run it alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_root, markdown_table, write_results

SETTINGS = ("1", "2", "auto")  # measured in this process
COMPARED = ("1", "2")  # auto is held against the best of these
PASSIVE = "2 passive"  # 2 threads, OMP_WAIT_POLICY=PASSIVE, in a second process


def build_fit(args: argparse.Namespace) -> Callable[[int], tuple[int, float]]:
    """``fit(n)``: n training updates with medcl's trainer -> (updates, seconds in the loop)."""
    import pandas as pd
    import torch

    from medcl.config import TrainConfig
    from medcl.data.experience import Experience
    from medcl.data.medmnist_source import load_medmnist
    from medcl.data.memory import ReplayMemory
    from medcl.data.samples import SampleSet
    from medcl.engine.trainer import fit_experience
    from medcl.models.backbones import create_backbone
    from medcl.strategies import create_strategy

    train = load_medmnist("pneumoniamnist", "train", root=data_root(args.root))
    empty = SampleSet(train.images[:0], train.labels[:0], pd.DataFrame(columns=train.meta.columns))
    exp = Experience(0, "pneumoniamnist", 0, (0, 1), "", train, empty, empty)
    torch.manual_seed(0)
    strategy = create_strategy("finetune", create_backbone(args.model, in_chans=1))

    def fit(n: int) -> tuple[int, float]:
        cfg = TrainConfig(
            epochs=10**6,
            batch_size=args.batch_size,
            max_updates=n,
            lr=0.01,
            scheduler="none",
            augment="none",
            eval_every=0,
            amp=False,
            device="cpu",
        )
        stats = fit_experience(
            strategy, exp, past=[], num_seen_classes=2, memory=ReplayMemory(0), cfg=cfg, quiet=True
        )
        return stats.updates, stats.seconds

    return fit


def measure(
    setting: str, fit: Callable, default_threads: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Updates/s of one setting: threads chosen as a run chooses them, then the timed loop."""
    import torch

    from medcl.engine.threads import resolve_threads

    torch.set_num_threads(default_threads)  # as in a fresh process: auto starts from torch's own
    requested = "auto" if setting == "auto" else int(setting.split()[0])
    choice = resolve_threads(requested)
    torch.set_num_threads(choice.threads)
    fit(args.warmup)
    updates, seconds = 0, 0.0
    while updates < args.updates and seconds < args.budget:
        n, t = fit(min(args.chunk, args.updates - updates))
        updates, seconds = updates + n, seconds + t
    rate = updates / seconds
    return {
        "threads": choice.threads,
        "updates": updates,
        "updates_per_s": rate,
        "why": choice.reason,
    }


def _burner(seconds: float, cpu: int | None) -> subprocess.Popen:
    """A process that spins one CPU for at most ``seconds`` (pinned to ``cpu`` when given)."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(proc.pid, {cpu})
    return proc


def run_conditions(args: argparse.Namespace, settings: list[str]) -> list[dict[str, Any]]:
    """Every condition x setting x repeat, in this process."""
    import torch

    from medcl.engine.threads import busy_cores, usable_cores

    default_threads = torch.get_num_threads()
    fit = build_fit(args)
    cpus = usable_cores()[1]
    rows: list[dict[str, Any]] = []
    for cond in args.conditions:
        burners = []
        try:
            if cond == "busy":
                deadline = len(settings) * args.repeats * (args.budget * 4 + 30)
                for i in range(args.burners):
                    pin = None if args.unpinned else cpus[-1 - i % len(cpus)]
                    burners.append(_burner(deadline, pin))
                time.sleep(0.5)  # the burners run before the first setting starts
            other = sum(busy_cores(cpus, seconds=0.5))
            for r in range(args.repeats):
                for setting in settings if r % 2 == 0 else settings[::-1]:
                    res = measure(setting, fit, default_threads, args)
                    rows.append(
                        {"condition": cond, "setting": setting, "repeat": r, **res}
                        | {"busy_cpus_before": other}
                    )
                    if not args.quiet:
                        print(
                            f"{cond:5} {setting:9} threads={res['threads']} "
                            f"{res['updates_per_s']:.2f} updates/s ({res['why']})",
                            file=sys.stderr if args.passive_worker else sys.stdout,
                            flush=True,
                        )
        finally:
            for b in burners:
                b.kill()
                b.wait()
    torch.set_num_threads(default_threads)
    return rows


def run_passive(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``2 passive`` in a second process started with ``OMP_WAIT_POLICY=PASSIVE``."""
    cmd = [sys.executable, __file__, "--passive-worker", "--conditions", ",".join(args.conditions)]
    for key in (
        "updates",
        "budget",
        "chunk",
        "warmup",
        "batch_size",
        "model",
        "repeats",
        "burners",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--root", str(args.root)] if args.root else []
    cmd += ["--unpinned"] if args.unpinned else []
    cmd += ["--quiet"] if args.quiet else []
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}
    hard = 120 + len(args.conditions) * args.repeats * (args.budget * 4 + 30)
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=hard)
    if done.returncode != 0:
        raise SystemExit(f"the {PASSIVE!r} process failed (exit {done.returncode})")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return [r | {"setting": PASSIVE} for r in rows]


def summarize(rows: list[dict[str, Any]], conditions: list[str]) -> tuple[list, list]:
    table, targets = [], []
    for cond in conditions:
        mine = {
            s: [r for r in rows if r["condition"] == cond and r["setting"] == s]
            for s in (*SETTINGS, PASSIVE)
        }
        rate = {s: statistics.median(r["updates_per_s"] for r in v) for s, v in mine.items() if v}
        best = max(COMPARED, key=rate.__getitem__)
        for s, v in mine.items():
            if v:
                table.append(
                    {
                        "condition": cond,
                        "setting": s,
                        "threads": ", ".join(str(r["threads"]) for r in v),
                        "updates": ", ".join(str(r["updates"]) for r in v),
                        "updates_per_s": rate[s],
                        "vs_best": rate[s] / rate[best],
                    }
                )
        ratio = rate["auto"] / rate[best]
        targets.append(
            {
                "name": f"auto / best of 1 and 2 threads ({cond}, updates/s)",
                "value": ratio,
                "goal": ">= 0.8",
                "met": bool(ratio >= 0.8),
            }
        )
    return table, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="MedMNIST folder (default $MEDCL_DATA_ROOT)")
    ap.add_argument("--model", default="resnet18", help="timm backbone (standard stem)")
    ap.add_argument("--updates", type=int, default=16, help="timed updates per setting (at most)")
    ap.add_argument("--budget", type=float, default=8.0, help="timed seconds per setting (at most)")
    ap.add_argument("--chunk", type=int, default=2, help="updates per fit_experience call")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="alternating repeats (median)")
    ap.add_argument("--conditions", default="alone,busy", help="alone, busy or both")
    ap.add_argument("--burners", type=int, default=1, help="CPU-burning processes when busy")
    ap.add_argument("--unpinned", action="store_true", help="do not pin the burners")
    ap.add_argument("--no-passive", action="store_true", help="skip the OMP_WAIT_POLICY run")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default results/)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--passive-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = set(args.conditions) - {"alone", "busy"}
    if unknown or not args.conditions:
        ap.error(f"--conditions takes 'alone' and/or 'busy'; got {args.conditions}")
    if args.passive_worker:  # stdout: one JSON line for the parent
        rows = run_conditions(args, ["2"])
        print(json.dumps(rows))
        return

    start = time.perf_counter()
    rows = run_conditions(args, list(SETTINGS))
    if not args.no_passive:
        rows += run_passive(args)
    table, targets = summarize(rows, args.conditions)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    pin = "unpinned" if args.unpinned else "pinned to the last CPUs"
    busy_before = {
        c: next(r["busy_cpus_before"] for r in rows if r["condition"] == c) for c in args.conditions
    }
    md = (
        f"# CPU threads on a shared machine\n\n{cpus} usable CPUs. medcl's trainer, {args.model} "
        f"(standard stem), PneumoniaMNIST 28 px, batch {args.batch_size}, at most {args.updates} "
        f"timed updates or {args.budget:g} s per setting after {args.warmup} warm-up, "
        f"{args.repeats} repeat(s). busy = {args.burners} CPU-burning process(es), {pin}. "
        f"`{PASSIVE}` = 2 threads with OMP_WAIT_POLICY=PASSIVE (for information). CPUs busy "
        "with other processes before each condition: "
        + ", ".join(f"{c} {v:.1f}" for c, v in busy_before.items())
        + ".\n\n"
        + markdown_table(
            table, ["condition", "setting", "threads", "updates", "updates_per_s", "vs_best"]
        )
        + "\n\n"
        + "\n".join(
            f"- **{t['name']}: {t['value']:.2f}** (target {t['goal']}: "
            f"{'met' if t['met'] else 'NOT met'})"
            for t in targets
        )
        + f"\n\nWall time {time.perf_counter() - start:.0f} s.\n"
    )
    write_results(
        "threads",
        {
            "model": args.model,
            "updates": args.updates,
            "budget_s": args.budget,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "burners": args.burners,
            "pinned": not args.unpinned,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "rows": rows,
            "table": table,
            "targets": targets,
        },
        md,
        out=args.out,
    )
    if not args.quiet:
        print(md)


if __name__ == "__main__":
    main()
