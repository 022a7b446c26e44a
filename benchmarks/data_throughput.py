"""Images/s delivered by the training data pipeline, against plain indexing and a training step.

For PneumoniaMNIST (28 px) and BreastMNIST (64 px) training splits held in memory as uint8
``(N, 1, H, W)`` tensors, measures per shuffled batch of 64:

* ``index``: plain tensor indexing ``images[idx], labels[idx]`` (the floor);
* ``pipeline_<level>``: indexing + :func:`medcl.data.transforms.build_batch_augment` at the
  ``light`` (trainer default) and ``standard`` levels, i.e. what the trainer feeds the model;
* ``train_step``: one ResNet-18 step (timm ``resnet18``, ``in_chans=1``, conv1 replaced by a
  3x3 stride-1 conv, ``maxpool=Identity``): forward + backward + SGD step on the same batch.

The ratio ``pipeline time / train-step time`` says how much of an epoch the data side costs (the
pipeline runs in the training process, no workers). Writes ``benchmarks/results/
data_throughput.{json,md}``.

Usage::

    python benchmarks/data_throughput.py [--root DIR] [--batches 50] [--steps 3] [--quiet]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from medcl.data.medmnist_source import load_medmnist
from medcl.data.transforms import build_batch_augment

REPO = Path(__file__).resolve().parents[1]
BATCH = 64
DATASETS = (("pneumoniamnist", 28), ("breastmnist", 64))


def small_input_resnet18(num_classes: int) -> nn.Module:
    """timm ResNet-18 for small grayscale inputs: 3x3 stride-1 stem, no max-pool."""
    import timm

    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _seconds(fn, *, number: int, repeats: int) -> float:
    """Seconds per call of ``fn``: the best of ``repeats`` timings of ``number`` calls each.

    The minimum (as in :mod:`timeit`) estimates the uncontended cost; on a shared machine the
    mean mostly measures the other processes.
    """
    fn()  # warm-up (allocations, lazy init)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def bench_dataset(
    flag: str, size: int, *, root: Path, batches: int, steps: int
) -> dict[str, object]:
    train = load_medmnist(flag, "train", size=size, root=root)
    images, labels = train.images, train.labels  # (N, 1, H, W) uint8, (N,) int64
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=g)
    batch_ids = [order[(i * BATCH) % (len(train) - BATCH) :][:BATCH] for i in range(batches + 1)]
    it = iter(range(10**9))

    def next_idx() -> torch.Tensor:
        return batch_ids[next(it) % len(batch_ids)]

    def plain() -> None:
        idx = next_idx()
        images[idx], labels[idx]

    results: dict[str, float] = {"index": _seconds(plain, number=batches, repeats=5)}
    for level in ("light", "standard"):
        augment = build_batch_augment(2, level, seed=0)

        def pipeline(augment=augment) -> None:
            idx = next_idx()
            augment(images[idx]), labels[idx]

        results[f"pipeline_{level}"] = _seconds(pipeline, number=batches, repeats=5)

    torch.manual_seed(0)
    model = small_input_resnet18(int(labels.max()) + 1).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = build_batch_augment(2, "light", seed=0)(images[batch_ids[0]]), labels[batch_ids[0]]

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    results["train_step"] = _seconds(train_step, number=1, repeats=steps)
    row: dict[str, object] = {"dataset": flag, "size": size, "n_train": len(train)}
    for key, sec in results.items():
        row[f"{key}_img_per_s"] = round(BATCH / sec, 1)
    for level in ("light", "standard"):
        row[f"ratio_pipeline_{level}_to_train_step"] = round(
            results[f"pipeline_{level}"] / results["train_step"], 5
        )
    return row


def to_markdown(rows: list[dict[str, object]], meta: dict[str, object]) -> str:
    lines = [
        "# Data throughput",
        "",
        f"Batch {BATCH}, {meta['threads']} torch threads on {meta['cpu_count']} CPUs ({meta['cpu']}), "
        f"torch {meta['torch']}, 1-min load average {meta['load_average_1min']} at the end. "
        "Images/s from the best of repeated timings (higher is better); ratio = pipeline time / "
        "ResNet-18 training-step time (forward + backward + SGD step).",
        "",
        "| dataset | px | indexing | pipeline light | pipeline standard | ResNet-18 train step "
        "| ratio light | ratio standard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['size']} | {r['index_img_per_s']:,.0f} | "
            f"{r['pipeline_light_img_per_s']:,.0f} | {r['pipeline_standard_img_per_s']:,.0f} | "
            f"{r['train_step_img_per_s']:,.1f} | {r['ratio_pipeline_light_to_train_step']:.4f} | "
            f"{r['ratio_pipeline_standard_to_train_step']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="MedMNIST folder (default $MEDCL_DATA_ROOT, else ../shared/data/medmnist)",
    )
    parser.add_argument("--batches", type=int, default=50, help="batches per timing (best of 5)")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed (best of)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.root or Path(
        os.environ.get("MEDCL_DATA_ROOT") or REPO.parent / "shared/data/medmnist"
    )
    rows = []
    for flag, size in DATASETS:
        rows.append(bench_dataset(flag, size, root=root, batches=args.batches, steps=args.steps))
        if not args.quiet:
            print(json.dumps(rows[-1]))
    meta = {
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "batch_size": BATCH,
        "batches": args.batches,
        "steps": args.steps,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_throughput.json").write_text(
        json.dumps({"meta": meta, "results": rows}, indent=2) + "\n"
    )
    md = to_markdown(rows, meta)
    (args.out / "data_throughput.md").write_text(md)
    if not args.quiet:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
