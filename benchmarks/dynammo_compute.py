"""Deployable-model cost of DynaMMo, ACL and DER after T = 1..N experiences.

Structure only (no training): each strategy grows through ``T`` synthetic class-incremental
experiences (``--classes-per-exp`` classes each) and its ``deployable_model()`` is measured:
parameters (:func:`medcl.metrics.compute.count_parameters`) and MACs of one forward pass
(:func:`medcl.metrics.compute.count_macs`, PyTorch's ``FlopCounterMode``), optionally batch-1
CPU latency. Writes ``benchmarks/results/dynammo_compute.{json,md}``.

Targets (issue 4): DynaMMo's MACs and parameters grow by <= 5 % from T=1 to T=10 (heads only);
ACL and DER grow about linearly; the ACL/DynaMMo and DER/DynaMMo ratios at T=10 (the paper
reports about 10x).

    python benchmarks/dynammo_compute.py [--backbone resnet18] [--max-experiences 10] [--latency]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from medcl.metrics.compute import count_macs, count_parameters, measure_latency
from medcl.models.backbones import create_backbone
from medcl.strategies import ExperienceInfo, create_strategy

METHODS = {
    "dynammo": {"backbone_init": "checkpoint"},
    "acl": {"backbone_init": "checkpoint"},
    "der": {},
}


def measure(method: str, args: argparse.Namespace) -> list[dict[str, float]]:
    """One row per T: parameters, MACs (and latency) of the deployable model."""
    torch.manual_seed(args.seed)
    shape = (args.channels, args.image_size, args.image_size)
    bb = create_backbone(args.backbone, in_chans=args.channels, small_input=args.small_input)
    strategy = create_strategy(method, bb, **METHODS[method])
    rows = []
    for t in range(args.max_experiences):
        k = args.classes_per_exp
        strategy.grow(
            ExperienceInfo(t, f"exp-{t}", t, tuple(range(k * t, k * (t + 1))), k * (t + 1))
        )
        model = strategy.deployable_model().eval()
        row = {
            "method": method,
            "T": t + 1,
            "parameters": count_parameters(model),
            "macs": count_macs(model, shape),
        }
        if args.latency:
            row["latency_ms_b1"] = 1000 * measure_latency(model, shape, repeats=args.repeats)
        rows.append(row)
        if not args.quiet:
            print(
                f"{method:8s} T={t + 1:2d} params={row['parameters'] / 1e6:7.2f}M "
                f"MACs={row['macs'] / 1e6:9.1f}M",
                flush=True,
            )
    return rows


def summarize(rows: list[dict[str, float]], backbone_macs: int) -> dict[str, float]:
    by = {(r["method"], r["T"]): r for r in rows}
    last = max(r["T"] for r in rows)
    out: dict[str, float] = {"backbone_only_macs": backbone_macs, "T_max": last}
    for m in METHODS:
        for key in ("parameters", "macs"):
            out[f"{m}_{key}_growth_pct"] = 100 * (by[m, last][key] / by[m, 1][key] - 1)
    for m in ("acl", "der"):
        for key in ("parameters", "macs"):
            out[f"{m}_over_dynammo_{key}_at_T{last}"] = by[m, last][key] / by["dynammo", last][key]
    out["dynammo_growth_target_met"] = bool(
        out["dynammo_macs_growth_pct"] <= 5 and out["dynammo_parameters_growth_pct"] <= 5
    )
    return out


def to_markdown(
    rows: list[dict[str, float]], summary: dict[str, float], args: argparse.Namespace
) -> str:
    last = int(summary["T_max"])
    lines = [
        f"# DynaMMo compute: deployable model after T experiences ({args.backbone}, "
        f"{args.channels}x{args.image_size}x{args.image_size}, small_input={args.small_input})",
        "",
        "MACs from PyTorch's FlopCounterMode (FLOPs/2), one image.",
        "",
        "| T | DynaMMo params (M) | DynaMMo GMACs | ACL params (M) | ACL GMACs | DER params (M) | DER GMACs |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r["method"], r["T"]): r for r in rows}
    for t in range(1, last + 1):
        cells = [
            f"{by[m, t]['parameters'] / 1e6:.2f} | {by[m, t]['macs'] / 1e9:.3f}" for m in METHODS
        ]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"- Backbone alone: {summary['backbone_only_macs'] / 1e9:.3f} GMACs.",
        f"- Growth T=1 -> T={last}: DynaMMo params {summary['dynammo_parameters_growth_pct']:+.2f} %, "
        f"MACs {summary['dynammo_macs_growth_pct']:+.3f} % (target <= 5 %: "
        f"{'met' if summary['dynammo_growth_target_met'] else 'MISSED'}); ACL MACs "
        f"{summary['acl_macs_growth_pct']:+.0f} %; DER MACs {summary['der_macs_growth_pct']:+.0f} %.",
        f"- At T={last}: ACL/DynaMMo = {summary[f'acl_over_dynammo_macs_at_T{last}']:.2f}x MACs, "
        f"{summary[f'acl_over_dynammo_parameters_at_T{last}']:.2f}x params; DER/DynaMMo = "
        f"{summary[f'der_over_dynammo_macs_at_T{last}']:.2f}x MACs, "
        f"{summary[f'der_over_dynammo_parameters_at_T{last}']:.2f}x params.",
    ]
    if args.latency:
        lines += ["", "| T | DynaMMo ms | ACL ms | DER ms |", "|---|---|---|---|"]
        lines += [
            f"| {t} | " + " | ".join(f"{by[m, t]['latency_ms_b1']:.1f}" for m in METHODS) + " |"
            for t in range(1, last + 1)
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-experiences", type=int, default=10)
    p.add_argument("--classes-per-exp", type=int, default=2)
    p.add_argument("--latency", action="store_true", help="also time batch-1 CPU forward passes")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    bb = create_backbone(args.backbone, in_chans=args.channels, small_input=args.small_input)
    backbone_macs = count_macs(bb, (args.channels, args.image_size, args.image_size))
    rows = [r for m in METHODS for r in measure(m, args)]
    summary = summarize(rows, backbone_macs)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {"torch": torch.__version__, "platform": platform.platform()},
        "rows": rows,
        "summary": summary,
    }
    (args.out / "dynammo_compute.json").write_text(json.dumps(result, indent=1))
    md = to_markdown(rows, summary, args)
    (args.out / "dynammo_compute.md").write_text(md)
    if not args.quiet:
        print(md)


if __name__ == "__main__":
    main()
