"""The figure of ``benchmarks/stability_gap.py``: curves of the three arms and their dip metrics.

Left: old-class (solid) and new-class (dashed) accuracy against the update count, mean over the
reported seeds. Right: per arm, the stability gap beside the dip it is meant to show
(``max_drop``, ``init_drop``), with the updates to recover in the legend; error bars are the sd
over seeds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

COLORS = {"vanilla-authors": "tab:red", "vanilla-tuned": "tab:orange", "sgm": "tab:blue"}
BARS = ("stability_gap", "max_drop", "init_drop")


def _curves(ax, block: dict) -> None:
    starts: set[float] = set()
    for v, color in COLORS.items():
        by_seed = block["curves"].get(v)
        if not by_seed:
            continue
        frame = pd.concat([pd.DataFrame(c) for c in by_seed.values()])
        mean = frame.groupby(["experience", "update"], as_index=False)[["old_acc", "new_acc"]]
        mean = mean.mean()
        for i, (_, g) in enumerate(mean.groupby("experience")):
            first = i == 0
            ax.plot(g["update"], g["old_acc"], color=color, label=f"{v} old" if first else None)
            ax.plot(g["update"], g["new_acc"], color=color, ls="--", lw=0.9,
                    label=f"{v} new" if first else None)  # fmt: skip
        starts |= set(mean.groupby("experience")["update"].min().to_numpy()[1:].tolist())
    for x in sorted(starts):
        ax.axvline(x, color="0.6", ls=":", lw=0.8)
    ax.set(xlabel="update", ylabel="accuracy", ylim=(0, 1.02))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small", ncols=2, loc="lower left")


def _bars(ax, block: dict) -> None:
    arms = [v for v in COLORS if v in block["summary"]]
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(BARS))
    for i, v in enumerate(arms):
        mean, sd = block["summary"][v], block["sd"][v]
        rec = mean.get("updates_to_recover", math.nan)
        label = (
            f"{v} (recovers in {rec:.3g} updates)" if math.isfinite(rec) else f"{v} (no recovery)"
        )
        err = [sd.get(k, math.nan) for k in BARS]
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, [mean.get(k, math.nan) for k in BARS],
               width, color=COLORS[v], label=label,
               yerr=[e if math.isfinite(e) else 0.0 for e in err], capsize=2)  # fmt: skip
    ax.set_xticks(x, list(BARS), fontsize="small")
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set(ylabel="accuracy (fraction)")
    if arms:
        ax.legend(fontsize="x-small", loc="best")


def figure(block: dict, scenario: str, k: int, path: Path) -> None:
    """Write the two-panel figure of one stream to ``path``."""
    fig = Figure(figsize=(11.0, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[2.2, 1])
    _curves(left, block)
    _bars(right, block)
    kind = block.get("kind", "")
    left.set_title(f"{scenario} ({kind}): accuracy every {k} updates (dotted: new experience)",
                   fontsize=9)  # fmt: skip
    right.set_title("gap vs dip (mean ± sd over seeds)", fontsize=9)
    fig.savefig(path, dpi=110)
