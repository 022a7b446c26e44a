"""Trainer overhead: medcl's ``fit_experience`` vs a plain PyTorch loop, same work, one process.

Both train the same small-input ResNet-18 on the same PneumoniaMNIST (28 px) tensors for the same
number of SGD updates (batch 64, no augmentation, no replay, no evaluation), alternating
A/B/A/B so machine noise hits both; the reported figure is the ratio of median images/s
(medcl / plain). Target: >= 0.9.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_root, markdown_table, write_results

from medcl.config import TrainConfig
from medcl.data.experience import Experience
from medcl.data.medmnist_source import load_medmnist
from medcl.data.memory import ReplayMemory
from medcl.data.samples import SampleSet
from medcl.data.transforms import to_model_input
from medcl.engine.trainer import fit_experience
from medcl.models.backbones import create_backbone
from medcl.strategies import create_strategy


def plain_loop(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    updates: int,
    batch_size: int,
) -> float:
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    model.train()
    start, step = time.perf_counter(), 0
    while step < updates:
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), batch_size):
            if step >= updates:
                break
            idx = order[i : i + batch_size]
            x = to_model_input(images[idx].to(device))
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return updates * batch_size / (time.perf_counter() - start)


def medcl_loop(strategy, exp: Experience, updates: int, batch_size: int) -> float:
    cfg = TrainConfig(
        epochs=10**6,
        batch_size=batch_size,
        max_updates=updates,
        lr=0.01,
        scheduler="none",
        augment="none",
        eval_every=0,
        amp=False,  # the plain loop runs fp32 too
    )
    stats = fit_experience(
        strategy, exp, past=[], num_seen_classes=2, memory=ReplayMemory(0), cfg=cfg, quiet=True
    )
    return stats.images_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root")
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default results/)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    train = load_medmnist("pneumoniamnist", "train", root=data_root(args.root))
    empty = SampleSet(train.images[:0], train.labels[:0], pd.DataFrame(columns=train.meta.columns))
    exp = Experience(0, "pneumoniamnist", 0, (0, 1), "", train, empty, empty)
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", in_chans=1, small_input=True)
    rates: dict[str, list[float]] = {"plain": [], "medcl": []}
    for r in range(args.repeats):
        strategy = create_strategy("finetune", copy.deepcopy(backbone)).to(args.device)
        rates["medcl"].append(medcl_loop(strategy, exp, args.updates, args.batch_size))
        plain = torch.nn.Sequential(
            copy.deepcopy(backbone), torch.nn.Linear(backbone.num_features, 2)
        ).to(args.device)
        rates["plain"].append(
            plain_loop(plain, train.images, train.labels, args.updates, args.batch_size)
        )
        if not args.quiet:
            print(
                f"repeat {r}: medcl {rates['medcl'][-1]:.1f} img/s, plain {rates['plain'][-1]:.1f} img/s"
            )
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["medcl"] / med["plain"]
    rows = [
        {"loop": k, "median_images_per_s": med[k], "runs": ", ".join(f"{x:.1f}" for x in rates[k])}
        for k in ("plain", "medcl")
    ]
    md = (
        f"# Trainer overhead\n\nDevice {args.device}. ResNet-18 (3×3 stride-1 stem), "
        f"PneumoniaMNIST 28 px, batch "
        f"{args.batch_size}, {args.updates} updates × {args.repeats} alternating repeats.\n\n"
        + markdown_table(rows, ["loop", "median_images_per_s", "runs"])
        + f"\n\n**Throughput ratio medcl / plain: {ratio:.3f}** (target ≥ 0.9).\n"
    )
    write_results(
        "trainer_overhead",
        {
            "updates": args.updates,
            "batch_size": args.batch_size,
            "rates": rates,
            "median": med,
            "ratio": ratio,
            "device": args.device,
            "targets": [
                {
                    "name": "medcl / plain PyTorch throughput (median)",
                    "value": ratio,
                    "goal": ">= 0.9",
                    "met": bool(ratio >= 0.9),
                }
            ],
        },
        md,
        out=args.out,
    )
    if not args.quiet:
        print(md)


if __name__ == "__main__":
    main()
