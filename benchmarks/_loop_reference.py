"""The training-loop reference of ``end_to_end.py`` (issue 25): medcl's loop vs a plain one.

The main job's first experience (DynaMMo stage 1 on the frozen pretrained EfficientNet-Lite0,
64 px, batch 64) for the same number of updates and the same seeded batches, in alternating
repeats: medcl's ``fit_experience`` vs a plain PyTorch loop on the same model, contiguous and
NHWC (``train.channels_last``), and ``train.compile`` (compilation included, as a user pays it)
next to a raw compiled loop's steady state; then scoring throughput by layout and batch size.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import REPO

MAIN = REPO / "configs" / "medmnist-cross3-dynammo.yaml"


def loop_part(args, root: Path, say: Callable[[str], None]) -> dict:
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
    base |= {"channels_last": False}  # eager = the contiguous layout; NHWC is its own variant

    def medcl(**opts: bool) -> float:
        strategy = copy.deepcopy(fresh)
        tc = TrainConfig(**(base | {"max_updates": updates} | opts))
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
            say(f"loop repeat {r}: {name} {runs[name][-1]:.1f} img/s")
    median = {k: statistics.median(v) for k, v in runs.items()}
    scoring = eval_sweep(fresh, exp, n=128 if args.smoke else 1024)
    say(f"scoring images/s by (layout, eval.batch_size): {scoring}")
    return {
        "updates": updates,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "median": median,
        "scoring": scoring,
    }


def eval_sweep(fresh, exp, n: int) -> list[dict[str, Any]]:
    """Scoring throughput of the trained-structure model by layout, ``eval.batch_size`` and
    ``eval.fold_batchnorm``."""
    from medcl.engine.evaluate import predict_proba
    from medcl.engine.trainer import experience_info

    model = copy.deepcopy(fresh)
    model.grow(experience_info(exp, 2))
    images = exp.test.images[:n]
    predict_proba(model, images[:8])  # untimed: the one-off torch.fx trace of the folding
    rows = []
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model.to(memory_format=fmt)
        for batch in (32, 64, 128, 256):
            for fold in (False, True):
                model.feature_cache.clear()
                model.feature_cache.fold_batchnorm = fold
                start = time.perf_counter()
                predict_proba(model, images, batch_size=batch)
                rows.append(
                    {
                        "layout": layout,
                        "batch": batch,
                        "fold_batchnorm": fold,
                        "images_per_s": n / (time.perf_counter() - start),
                    }
                )
    return rows
