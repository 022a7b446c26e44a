"""EsaCL (reconstruction) vs SparCL, magnitude pruning, dense replay and fine-tuning.

Runs every method with ``medcl.engine.run.run`` on medmnist-cross3 and pneumonia-sites:

- sparsity 0.8, seeds 0-2 (mean ± sd): EsaCL with memory, SparCL, dense replay;
- sparsity 0.8, seed 0: EsaCL without memory, EsaCL without IDS, magnitude pruning, fine-tune;
- sparsity 0.5 and 0.9, seed 0: EsaCL, SparCL, magnitude pruning.

Columns: average/final accuracy, forgetting, density, training FLOPs (counted by the
strategies with :class:`medcl.metrics.compute.TrainingFlops`; dense methods: the same counter
times the images their trainer passes), images used, wall time, parameters and non-zeros.
Two side measurements:

- accuracy right before vs right after each pruning step on the first experience (EsaCL and
  magnitude pruning, seed 0, 500 test images of that experience);
- deployable latency at batch 1 on CPU (onnxruntime) and size, dense vs channel-structured
  EsaCL at 0.8 (``--only latency`` runs just this; it needs no data).

Writes ``<out>/esacl.{json,md}`` (default ``benchmarks/results``) with
``"targets": [{"name", "value", "goal", "met"}]`` computed from the measurements.
``--quick`` is a smoke run (tiny backbone, a few updates, one seed, a small synthetic stream
unless ``--scenarios`` names real ones).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, data_root, json_text, machine, markdown_table

from medcl.config import validate_config
from medcl.data.transforms import to_model_input
from medcl.engine.components import build_components
from medcl.engine.resume import restore_run
from medcl.engine.run import run
from medcl.engine.trainer import fit_experience
from medcl.metrics.compute import TrainingFlops
from medcl.models.backbones import create_backbone
from medcl.strategies import Classifier, ExperienceInfo, create_strategy

SCENARIOS = ["medmnist-cross3", "pneumonia-sites"]
#: --quick's default stream: small synthetic images, class-incremental (no data files needed)
QUICK_SCENARIO = {"name": "synthetic-ci", "num_classes": 4, "classes_per_experience": 2,
                  "n_train": 96, "n_test": 48, "image_size": 16}  # fmt: skip
MEMORY = 200
#: method -> (strategy name, extra options, uses the memory)
METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "esacl": ("esacl", {}, True),
    "esacl-nomem": ("esacl", {}, False),
    "esacl-noids": ("esacl", {"ids": False}, True),
    "sparcl": ("sparcl", {}, True),
    "magnitude": ("magnitude-pruning", {}, True),
    "replay": ("replay", {}, True),
    "finetune": ("finetune", {}, False),
}
SPARSE = {"esacl", "esacl-nomem", "esacl-noids", "sparcl", "magnitude"}


def plan(quick: bool) -> list[tuple[str, float, int]]:
    """``(method, sparsity, seed)`` runs (sparsity is ignored by dense methods)."""
    if quick:
        return [(m, 0.8, 0) for m in METHODS]
    runs = [(m, 0.8, s) for m in ("esacl", "sparcl", "replay") for s in range(3)]
    runs += [(m, 0.8, 0) for m in ("esacl-nomem", "esacl-noids", "magnitude", "finetune")]
    runs += [(m, sp, 0) for sp in (0.5, 0.9) for m in ("esacl", "sparcl", "magnitude")]
    return runs


def config(args, scenario: str, method: str, sparsity: float, seed: int, out: Path) -> Any:
    name, opts, mem = METHODS[method]
    strategy: dict[str, Any] = {"name": name, **opts}
    if method in SPARSE:
        strategy["sparsity"] = sparsity
    if name in ("esacl", "magnitude-pruning"):
        strategy.update(prune_every=args.prune_every, ramp_updates=args.ramp_updates)
    if name in ("esacl", "sparcl"):
        strategy["removal_epochs"] = args.removal_epochs
    if name == "sparcl":
        # the official code freezes the mask for the last 10% of epochs; at least one TDM update
        strategy.update(freeze_from=max(1, round(0.9 * args.epochs)))
    train: dict[str, Any] = {
        "epochs": args.epochs,
        "batch_size": 32,
        "lr": 0.03,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "scheduler": "none",
    }
    if args.max_updates:
        train["max_updates"] = args.max_updates
    return validate_config(
        {
            "seed": seed,
            "name": f"{scenario}-{method}-{sparsity}-{seed}",
            "output_dir": str(out),
            "scenario": QUICK_SCENARIO
            if scenario == QUICK_SCENARIO["name"]
            else {"name": scenario},
            "strategy": strategy,
            "model": {"backbone": args.backbone, "small_input": True},
            "train": train,
            "memory": {"size": MEMORY if mem else 0, "selection": "random"},
            "data": {"root": str(data_root(args.root))},
        }
    )


def one_run(args, scenario: str, method: str, sparsity: float, seed: int, out: Path) -> dict:
    cfg = config(args, scenario, method, sparsity, seed, out)
    t0 = time.perf_counter()
    run_dir = run(cfg, quiet=True)
    wall = time.perf_counter() - t0
    m = json.loads((run_dir / "metrics.json").read_text())
    s = m["summary"]
    _, scen, strategy, _, _ = restore_run(run_dir, command="benchmarks/esacl.py")
    model = strategy.deployable_model()
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    row = {
        "scenario": scenario,
        "method": method,
        "sparsity": sparsity if method in SPARSE else 0.0,
        "seed": seed,
        "average_accuracy": s["average_accuracy"],
        "final_accuracy": s["final_accuracy"],
        "forgetting": s["forgetting"],
        "wall_s": wall,
        "parameters": params,
        "nonzero": nonzero,
    }
    if hasattr(strategy, "masks"):
        row["density"] = strategy.masks.density()
        row["train_gflops"] = float(strategy.flops_) / 1e9
        row["images"] = int(strategy.images_)
    else:  # dense: every image of the trainer's batches, forward + backward at density 1
        shape = tuple(scen.input_shape)
        per = TrainingFlops(Classifier(strategy.backbone, strategy.head), shape).per_example()
        images = 0
        for e in scen.experiences:
            n = len(e.train)
            steps = math.ceil(n / 32) * args.epochs
            if args.max_updates:
                steps = min(steps, args.max_updates)
            images += min(n * args.epochs, steps * 32)
            if METHODS[method][2] and e.index > 0:
                images += steps * 32  # replay samples, one replay batch per update
        row.update(density=1.0, train_gflops=per * images / 1e9, images=images)
    return row


def pruning_steps(args, scenario: str, method: str, out: Path) -> dict:
    """Accuracy on experience 0's test images right before and after each pruning step."""
    cfg = config(args, scenario, method, 0.8, 0, out)
    scen, strategy, memory = build_components(cfg)
    exp = scen.experiences[0]
    x = to_model_input(exp.test.images[:500])
    y = exp.test.labels[:500]
    acc: dict[str, list[float]] = {"before": [], "after": []}

    def observe(stage: str) -> None:
        if not strategy.seen:  # the initial mask, before any training
            return
        was = strategy.training
        strategy.eval()
        with torch.no_grad():
            pred = torch.cat(
                [strategy.predict(x[i : i + 250]).argmax(1) for i in range(0, len(x), 250)]
            )
        acc[stage].append(float((pred == y).float().mean()))
        strategy.train(was)

    strategy.prune_observer = observe
    fit_experience(strategy, exp, past=[], num_seen_classes=scen.num_seen_classes(0),
                   memory=memory, cfg=cfg.train, seed=0, quiet=True)  # fmt: skip
    drops = [100 * (b - a) for b, a in zip(acc["before"], acc["after"], strict=True)]
    return {
        "scenario": scenario,
        "method": method,
        "steps": len(drops),
        "mean_drop_points": statistics.fmean(drops) if drops else float("nan"),
        "worst_drop_points": max(drops) if drops else float("nan"),
        "before": acc["before"],
        "after": acc["after"],
    }


def latency(args, out: Path) -> list[dict]:
    """Dense vs channel-structured (EsaCL, ``sparsity`` of channels) ONNX models at batch 1."""
    import onnxruntime as ort

    rows = []
    shape = (1, 28, 28)
    for structure in ("dense", "channel"):
        torch.manual_seed(0)
        bb = create_backbone(args.backbone, in_chans=1, small_input=True)
        s = create_strategy("esacl", bb, structure="channel", init_sparsity=0.0 if structure == "dense" else 0.8,
                            sparsity=0.8)  # fmt: skip
        s.grow(ExperienceInfo(0, "e", 0, tuple(range(9)), 9))
        model = s.deployable_model().eval()
        path = out / f"latency-{structure}.onnx"
        with torch.no_grad():
            torch.onnx.export(model, (torch.zeros(1, *shape),), str(path), dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: torch.rand(1, *shape).numpy()}
        for _ in range(20):
            sess.run(None, feed)
        times = []
        for _ in range(args.latency_repeats):
            t = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t)
        rows.append(
            {
                "model": structure,
                "latency_ms_b1": 1000 * statistics.median(times),
                "size_mb": path.stat().st_size / 1e6,
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        )
    return rows


def summarise(rows: list[dict], scenario: str, method: str, sparsity: float, key: str) -> tuple[float, float]:  # fmt: skip
    vals = [r[key] for r in rows if r["scenario"] == scenario and r["method"] == method and r["sparsity"] == (sparsity if method in SPARSE else 0.0)]  # fmt: skip
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def targets(rows, steps, lat, scenarios) -> list[dict]:
    out = []
    for sc in scenarios:
        acc = {m: summarise(rows, sc, m, 0.8, "average_accuracy")[0] for m in METHODS}
        gap = 100 * (acc["replay"] - acc["esacl"])
        out.append({"name": f"{sc}: dense replay minus EsaCL average accuracy at 0.8 (points)",
                    "value": gap, "goal": "<= 1.5", "met": bool(gap <= 1.5)})  # fmt: skip
        best = max(acc["sparcl"], acc["magnitude"])
        out.append({"name": f"{sc}: EsaCL minus max(SparCL, magnitude) average accuracy at 0.8 (points)",
                    "value": 100 * (acc["esacl"] - best), "goal": ">= 0", "met": bool(acc["esacl"] >= best)})  # fmt: skip
        fl = {m: summarise(rows, sc, m, 0.8, "train_gflops")[0] for m in ("esacl", "esacl-noids")}
        ratio = fl["esacl-noids"] / fl["esacl"]
        cost = 100 * (acc["esacl-noids"] - acc["esacl"])
        out.append({"name": f"{sc}: training FLOPs without IDS / with IDS", "value": ratio,
                    "goal": ">= 2", "met": bool(ratio >= 2)})  # fmt: skip
        out.append({"name": f"{sc}: accuracy cost of IDS (points)", "value": cost,
                    "goal": "<= 1", "met": bool(cost <= 1)})  # fmt: skip
    for st in steps:
        if st["method"] == "esacl":
            w = st["worst_drop_points"]
            out.append({"name": f"{st['scenario']}: worst accuracy drop at an EsaCL pruning step (points)",
                        "value": w, "goal": "<= 1", "met": bool(w <= 1)})  # fmt: skip
    if lat:
        d = {r["model"]: r for r in lat}
        sp = d["dense"]["latency_ms_b1"] / d["channel"]["latency_ms_b1"]
        out.append({"name": "structured EsaCL export speed-up at batch 1 (ONNX, CPU)", "value": sp,
                    "goal": ">= 1.5", "met": bool(sp >= 1.5)})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for esacl.{json,md}")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, few updates")
    ap.add_argument("--only", choices=["all", "latency"], default="all")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--backbone", default="test_resnet")
    ap.add_argument("--prune-every", type=int, default=20)
    ap.add_argument("--ramp-updates", type=int, default=200)
    ap.add_argument("--removal-epochs", type=int, nargs="+", default=[1],
                    help="epochs (0-based) at whose start IDS/DDR remove an equal share")  # fmt: skip
    ap.add_argument("--max-updates", type=int, default=None)
    ap.add_argument("--scenarios", nargs="*", default=SCENARIOS)
    ap.add_argument("--latency-repeats", type=int, default=200)
    args = ap.parse_args()
    if args.quick:
        args.backbone, args.epochs, args.max_updates = "test_resnet", 2, 6
        args.prune_every, args.ramp_updates, args.latency_repeats = 2, 8, 20
        args.removal_epochs = [1]
        if args.scenarios == SCENARIOS:
            args.scenarios = [QUICK_SCENARIO["name"]]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="medcl-esacl-"))
    rows, steps = [], []
    if args.only == "all":
        for sc in args.scenarios:
            for method, sp, seed in plan(args.quick):
                rows.append(one_run(args, sc, method, sp, seed, work))
                print(rows[-1], flush=True)
            for method in ("esacl", "magnitude"):
                steps.append(pruning_steps(args, sc, method, work))
                print(steps[-1], flush=True)
    lat = latency(args, work)
    print(lat, flush=True)
    tg = targets(rows, steps, lat, args.scenarios if rows else [])
    payload = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
               "rows": rows, "pruning_steps": steps, "latency": lat, "targets": tg}  # fmt: skip
    (args.out / "esacl.json").write_text(json_text(payload))
    table = []
    for sc in args.scenarios if rows else []:
        for method in METHODS:
            for sp in (0.5, 0.8, 0.9):
                if method not in SPARSE and sp != 0.8:
                    continue
                r = {"scenario": sc, "method": method, "sparsity": sp if method in SPARSE else 0.0}
                for key in ("average_accuracy", "final_accuracy", "forgetting", "density", "train_gflops", "images", "wall_s"):  # fmt: skip
                    mu, sd = summarise(rows, sc, method, sp, key)
                    r[key] = f"{mu:.4g} ± {sd:.2g}" if sd else mu
                if not math.isnan(summarise(rows, sc, method, sp, "wall_s")[0]):
                    table.append(r)
    md = (
        "# EsaCL (reconstruction) vs SparCL, magnitude pruning, replay, fine-tune\n\n"
        f"Backbone {args.backbone} (small input), {args.epochs} epochs per experience, batch 32, "
        f"SGD lr 0.03 constant (SparCL's optimiser), memory {MEMORY} (random) where used. "
        "mean ± sd over 3 seeds where given, else seed 0.\n\n"
        + markdown_table(
            table,
            [
                "scenario",
                "method",
                "sparsity",
                "average_accuracy",
                "final_accuracy",
                "forgetting",
                "density",
                "train_gflops",
                "images",
                "wall_s",
            ],
        )
        + "\n\n## Accuracy before / after each pruning step (experience 0)\n\n"
        + markdown_table(
            steps, ["scenario", "method", "steps", "mean_drop_points", "worst_drop_points"]
        )
        + "\n\n## Deployable model, batch 1, ONNX Runtime on CPU (1 thread)\n\n"
        + markdown_table(lat, ["model", "latency_ms_b1", "size_mb", "parameters"])
        + "\n\n## Targets\n\n"
        + markdown_table(tg, ["name", "value", "goal", "met"])
    )
    (args.out / "esacl.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
