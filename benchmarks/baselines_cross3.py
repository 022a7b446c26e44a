"""Every baseline on medmnist-cross3 and pneumonia-sites: accuracy, forgetting, wall time.

Each (scenario, strategy) pair is one ``medcl.engine.run.run`` with the same backbone, epochs,
batch size, learning rate and replay budget (memory is used only by strategies that replay).
Writes ``benchmarks/results/baselines_cross3.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_root, markdown_table, write_results

from medcl.config import validate_config
from medcl.engine.run import run

STRATEGIES = ["finetune", "ewc", "lwf", "replay", "der", "joint"]
SCENARIOS = ["medmnist-cross3", "pneumonia-sites"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--memory", type=int, default=200)
    ap.add_argument("--strategies", nargs="*", default=STRATEGIES)
    ap.add_argument("--scenarios", nargs="*", default=SCENARIOS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad-clip", type=float, default=5.0, help="gradient-norm clip, all methods")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    out = Path(tempfile.mkdtemp(prefix="medcl-bench-"))
    rows = []
    for scenario in args.scenarios:
        for strategy in args.strategies:
            cfg = validate_config(
                {
                    "seed": args.seed,
                    "output_dir": str(out),
                    "scenario": {"name": scenario},
                    "strategy": {"name": strategy},
                    "model": {"backbone": args.backbone, "small_input": True},
                    "train": {
                        "epochs": args.epochs,
                        "batch_size": 64,
                        "lr": 0.05,
                        "grad_clip_norm": args.grad_clip,
                    },
                    "memory": {"size": args.memory, "selection": "herding"},
                    "data": {"root": str(data_root(args.root))},
                }
            )
            t0 = time.perf_counter()
            try:
                run_dir = run(cfg, quiet=args.quiet)
            except FloatingPointError as e:  # report a diverged method instead of hiding it
                rows.append({"scenario": scenario, "strategy": strategy, "error": str(e)})
                continue
            m = json.loads((run_dir / "metrics.json").read_text())
            s = m["summary"]
            rows.append(
                {
                    "scenario": scenario,
                    "strategy": strategy,
                    "average_accuracy": s["average_accuracy"],
                    "average_incremental_accuracy": s["average_incremental_accuracy"],
                    "final_accuracy": s["final_accuracy"],
                    "forgetting": s["forgetting"],
                    "bwt": s["bwt"],
                    "wall_s": time.perf_counter() - t0,
                    "parameters": m["compute"]["parameters"],
                    "macs": m["compute"]["macs"],
                }
            )
            if not args.quiet:
                print(rows[-1])
    shutil.rmtree(out, ignore_errors=True)
    md = (
        f"# Baselines on medmnist-cross3 and pneumonia-sites\n\nBackbone {args.backbone} "
        f"(small input), {args.epochs} epoch(s) per experience, batch 64, SGD lr 0.05 cosine, "
        f"replay memory {args.memory} (herding) for replay/DER, gradient-norm clip {args.grad_clip}, "
        f"seed {args.seed}; each method's default hyper-parameters. Accuracy is task-agnostic.\n\n"
        + markdown_table(
            rows,
            [
                "scenario",
                "strategy",
                "average_accuracy",
                "final_accuracy",
                "forgetting",
                "bwt",
                "wall_s",
                "error",
            ],
        )
    )
    write_results("baselines_cross3", {"args": vars(args), "rows": rows}, md)
    if not args.quiet:
        print(md)


if __name__ == "__main__":
    main()
