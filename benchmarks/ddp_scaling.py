"""DDP scaling: training throughput with 1 process vs N processes (torch DDP), same global batch.

Each configuration trains the same small-input ResNet on the same synthetic 28 px images
(``medcl.data.synthetic``, so no data files are needed) with medcl's ``fit_experience`` for the
same number of SGD updates of the same *global* batch; with N processes each rank computes
1/N of every batch and DDP averages the gradients (gloo on CPU, NCCL on CUDA unless
``$MEDCL_DIST_BACKEND`` says otherwise). Processes are started with ``torch.multiprocessing``
(spawn) on a free local port, one CPU thread each; the clock runs inside ``fit_experience``
(process start-up and imports excluded). Rounds alternate 1, N, 1, N, ... so that machine noise
hits both; the figure is the ratio of the median images/s of the N-process rounds to that of the
1-process rounds of the same invocation.

On CPU this is a CPU measurement: N processes need N free cores to scale (the JSON records the
machine's core count and load average).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, json_text, machine, markdown_table

#: Speed-up of N processes over one that the job should reach (a goal; the JSON reports the
#: measured value and whether it was met).
SPEEDUP_GOAL = {2: 1.6, 4: 3.0, 8: 5.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(args.threads)
    from medcl.config import TrainConfig
    from medcl.data.experience import Experience
    from medcl.data.memory import ReplayMemory
    from medcl.data.synthetic import make_synthetic
    from medcl.engine.distributed import session
    from medcl.engine.trainer import fit_experience
    from medcl.models.backbones import create_backbone
    from medcl.strategies import create_strategy

    splits = make_synthetic(num_classes=2, image_size=28, n_train=args.n_train, n_val=0, n_test=0)
    exp = Experience(0, "synthetic", 0, (0, 1), "", splits["train"], splits["val"], splits["test"])
    cfg = TrainConfig(
        epochs=10**6,
        batch_size=args.batch_size,
        max_updates=args.updates,
        lr=0.01,
        scheduler="none",
        augment="none",
        amp=False,
    )
    with session(device=args.device) as job:
        torch.manual_seed(0)
        backbone = create_backbone(args.backbone, in_chans=1, small_input=True)
        strategy = create_strategy("finetune", backbone).to(
            "cuda" if args.device == "cuda" else "cpu"
        )
        stats = fit_experience(
            strategy,
            exp,
            past=[],
            num_seen_classes=2,
            memory=ReplayMemory(0),
            cfg=cfg,
            quiet=True,
            dist=job,
        )
        if args.device == "cuda":
            torch.cuda.synchronize()
        if job.is_main:
            Path(out).write_text(f"{stats.images_per_s}\n")


def measure(world: int, args: argparse.Namespace) -> float:
    """Images/s (global batch images per second, rank 0's clock) of one ``world``-process run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rate")
        mp.start_processes(
            _worker,
            args=(world, _free_port(), args, out),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return float(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes of the DDP configuration")
    ap.add_argument("--rounds", type=int, default=3, help="alternating 1/N rounds (median)")
    ap.add_argument("--updates", type=int, default=30, help="SGD updates per round")
    ap.add_argument("--batch-size", type=int, default=64, help="global batch")
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for ddp_scaling.{json,md}")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    rates: dict[int, list[float]] = {1: [], args.nproc: []}
    for r in range(args.rounds):
        for world in (1, args.nproc):
            rates[world].append(measure(world, args))
            if not args.quiet:
                print(f"round {r}: {world} process(es): {rates[world][-1]:.1f} img/s", flush=True)
    med = {w: statistics.median(v) for w, v in rates.items()}
    speedup = med[args.nproc] / med[1]
    goal = SPEEDUP_GOAL.get(args.nproc, 0.75 * args.nproc)
    load = os.getloadavg()
    where = (
        f"CUDA ({torch.cuda.get_device_name(0)}; all processes on the visible GPUs)"
        if args.device == "cuda"
        else f"CPU ({os.cpu_count()} cores, {args.threads} thread(s) per process)"
    )
    rows = [
        {
            "processes": w,
            "median_images_per_s": med[w],
            "rounds": ", ".join(f"{x:.1f}" for x in rates[w]),
        }
        for w in rates
    ]
    targets = [
        {
            "name": f"{args.nproc}-process speed-up over 1 process (median images/s ratio)",
            "goal": f">= {goal}",
            "value": speedup,
            "met": speedup >= goal,
        }
    ]
    md = (
        f"# DDP scaling\n\nA {where} measurement: `{args.backbone}` (small-input stem), synthetic "
        f"28 px images, global batch {args.batch_size}, {args.updates} updates per round, "
        f"{args.rounds} alternating rounds; load average at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.\n\n"
        + markdown_table(rows, ["processes", "median_images_per_s", "rounds"])
        + f"\n\n**Speed-up {args.nproc} processes / 1: {speedup:.3f}** (goal {goal}: "
        + ("met" if speedup >= goal else "not met")
        + ").\n"
    )
    if args.device == "cpu" and load[0] > (os.cpu_count() or 1):
        md += (
            f"\nThe machine was loaded (load average {load[0]:.1f} on {os.cpu_count()} cores, "
            "other jobs running): the rounds of one configuration vary by up to "
            f"{max(max(v) / min(v) for v in rates.values()):.1f}x, so the ratio is indicative.\n"
        )
    payload = {
        "machine": machine() | {"load_average": load, "device": args.device},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rates": {str(w): v for w, v in rates.items()},
        "median": {str(w): v for w, v in med.items()},
        "speedup": speedup,
        "targets": targets,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddp_scaling.json").write_text(json_text(payload))
    (args.out / "ddp_scaling.md").write_text(md)
    if not args.quiet:
        print(md)


if __name__ == "__main__":
    main()
