"""The page of ``benchmarks/end_to_end.py`` (issue 25): tables and findings from its parts."""

from __future__ import annotations

from typing import Any

from _common import REPO, markdown_table, paired_difference

MAIN = REPO / "configs" / "medmnist-cross3-dynammo.yaml"
SEEDS = (0, 1, 2)  # the README's reported seeds
#: main-job variant -> (run-name tag, the overrides that make it)
MAIN_VARIANTS = {
    "main": ("nhwc", []),
    "main_contiguous": ("contiguous", ["train.channels_last=false"]),
    "main_unfolded": ("unfolded", ["eval.fold_batchnorm=false"]),
}


def accuracy_difference(parts: dict[str, Any], other: str) -> dict[str, Any]:
    """Final accuracy of the main job as shipped minus the variant ``other``, paired by seed,
    in points."""
    a, b = ([100 * r["final_accuracy"] for r in parts[k]["runs"]] for k in ("main", other))
    return paired_difference(a, b)


def markdown(parts: dict[str, Any], smoke: bool) -> str:
    lines = ["# End-to-end speed (issue 25)", ""]
    if smoke:
        lines += ["**Smoke run (tiny budgets): these numbers are not results.**", ""]
    mains = [k for k in MAIN_VARIANTS if k in parts]
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
            {"phase": "final accuracy (mean)"} | {k: parts[k]["final_accuracy"] for k in mains},
            {"phase": "final accuracy (sd)"} | {k: parts[k]["final_accuracy_sd"] for k in mains},
            {"phase": "final accuracy, all seeds (mean)"}
            | {k: parts[k].get("final_accuracy_all_seeds") for k in mains},
            {"phase": "final accuracy, all seeds (sd)"}
            | {k: parts[k].get("final_accuracy_all_seeds_sd") for k in mains},
        ]
        seeds = [
            {
                "run": k,
                "seed": r["seed"],
                "wall_s": r["wall_s"],
                "final_accuracy": r["final_accuracy"],
            }
            for k in mains
            for r in parts[k]["runs"]
        ]
        lines += [
            f"## Main job: `medcl run {MAIN.relative_to(REPO)}` (seconds per phase, mean over "
            f"seeds {', '.join(str(r['seed']) for r in parts[mains[0]]['runs'])}; accuracy at "
            f"the README's seeds {', '.join(map(str, SEEDS))} and over all)",
            "",
            "`main` is the command as shipped (`train.channels_last: true`: 2D models train and "
            "score in NHWC; `eval.fold_batchnorm: true`: scoring passes fold each BatchNorm into "
            "its convolution); `main_contiguous` adds `--set train.channels_last=false`, "
            "`main_unfolded` `--set eval.fold_batchnorm=false`. Each run alone, as a user runs "
            "it (a subprocess: imports and report included); the variants alternate seed by "
            "seed, so machine noise reaches each alike.",
            "",
            markdown_table(rows, ["phase", *mains]),
            "",
            markdown_table(seeds, ["run", "seed", "wall_s", "final_accuracy"]),
            "",
        ]
        for other in mains[1:] if mains[0] == "main" else []:
            d = accuracy_difference(parts, other)
            ci = d["ci95"]
            ci_text = f", 95 % CI [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            wall = parts["main"]["wall_s"] - parts[other]["wall_s"]
            lines += [
                f"`main` − `{other}` (paired by seed): final accuracy {d['mean']:+.2f} points"
                f"{ci_text}; wall {wall:+.1f} s.",
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
            "Scoring (evaluation, herding features) by layout, `eval.batch_size` and "
            "`eval.fold_batchnorm`:",
            "",
            markdown_table(
                loop.get("scoring", []), ["layout", "batch", "fold_batchnorm", "images_per_s"]
            ),
            "",
        ]
    if "stream" in parts:
        s = parts["stream"]
        cols = ["T", "total_s", "train_s", "curves_s", "consolidation_s", "features_s"]
        cols += ["memory_s", "eval_s", "calibration_s"]
        cols += ["predictions_s", "checkpoint_s", "metrics_s", "eval_share"]
        lines += [
            f"## Stream of {s['sites']} sites: wall {s['wall_s']:.1f} s",
            "",
            markdown_table(s["experiences"], cols),
            "",
        ]
    rows = parts.get("targets", [])
    lines += ["## Targets", "", markdown_table(rows, ["name", "value", "goal", "met"]), ""]
    return "\n".join(lines + findings(parts))


def findings(parts: dict[str, Any]) -> list[str]:
    """What the measurements say about the targets (numbers from this run only)."""
    out = []
    if "main" in parts:
        m, ph = parts["main"], parts["main"]["phases_s"]
        fixed = m["untimed_s"] + ph.get("report", 0.0)
        out.append(
            f"- Main job: {m['wall_s']:.1f} s, of which {m['training_s']:.1f} s training. Two "
            f"costs are paid whatever the training: {m['untimed_s']:.1f} s before and after the "
            f"run (Python start-up and imports, MONAI's eager import of all its submodules the "
            f"largest) and {ph.get('report', 0.0):.1f} s for the report; together "
            f"{fixed / m['wall_s']:.0%} of the wall, so the 20 % share cannot be met by "
            f"evaluation work alone. The herding features (every training image of each "
            f"experience, once: {ph.get('features', 0.0):.1f} s) are the largest scoring cost."
        )
    if "main" in parts and "main_unfolded" in parts:
        scoring = ("setup", "features", "eval", "calibration", "curves")
        a, b = parts["main"]["phases_s"], parts["main_unfolded"]["phases_s"]
        split = ", ".join(f"{k} {b.get(k, 0.0):.1f} -> {a.get(k, 0.0):.1f}" for k in scoring)
        out.append(
            f"- Folding BatchNorm into the convolutions while scoring (`eval.fold_batchnorm`): "
            f"wall {parts['main_unfolded']['wall_s']:.1f} -> {parts['main']['wall_s']:.1f} s "
            f"({split} s; setup includes the untrained baseline's pass)."
        )
    if "loop" in parts and "raw compiled (steady state)" in parts["loop"]["median"]:
        med = parts["loop"]["median"]
        steady = med["raw compiled (steady state)"] / med["raw eager"]
        out.append(
            f"- `torch.compile`: even after compilation the compiled loop runs at {steady:.2f}x "
            f"the eager loop on this CPU (inductor's CPU kernels for this network), so no "
            f"amortisation of the compile time reaches 1.2x; it stays off by default."
        )
    if "stream" in parts and parts["stream"]["experiences"]:
        rows = parts["stream"]["experiences"]
        first, last = rows[0], rows[-1]
        out.append(
            f"- Stream: evaluation after experience T scores the test sets of experiences "
            f"1..T+1 (`eval.future: next`, the default; `all` scores all {len(rows)} every time): "
            f"{first['eval_s']:.2f} s at T = 1 and {last['eval_s']:.2f} s at T = {last['T']}, "
            f"growing with the experiences seen as the curves do ({first['curves_s']:.2f} -> "
            f"{last['curves_s']:.2f} s: each point scores every seen test subset)."
        )
    return ["## Findings", "", *out] if out else []
