"""Issue 27's bytes per round (``benchmarks/federated.py``): full-model FedAvg against
adapter-only DynaMMo at the reference adapter width and at narrower ``adapter_width``.

The reference adapters are full width (no bottleneck; ``docs/methods/dynammo.md``), so the
target is read at width 1.0; the narrow widths get their own line beside it, never in its
place. Bytes do not depend on training: each width is one seed-0 run of two updates per round.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from _common import REPO, markdown_table

DYNAMMO_CONFIG = REPO / "configs/pneumonia-sites-dynammo.yaml"
WIDTHS = (1.0, 0.5, 0.25)  # 1.0: the reference (paper and its code)
BYTES_GOAL = 10.0


def dynammo_bytes(
    federated: Callable[..., dict[str, Any]], root: Path, work: Path, quiet: bool
) -> dict[str, dict[str, Any]]:
    """``{"1", "0.5", "0.25"}`` -> the adapter-only DynaMMo run's record at that width.

    Args:
        federated: ``benchmarks/federated.py``'s ``_federated(extra, seed, root, work, quiet)``.
        root: the data root.
        work: the benchmark's work folder (width 1.0 keeps the run folder it always had).
        quiet: no progress output.
    """
    strategy = yaml.safe_load(DYNAMMO_CONFIG.read_text())["strategy"]
    out = {}
    for width in WIDTHS:
        narrow = {} if width == 1.0 else {"adapter_width": width}  # 1.0: the config as it was
        extra = {
            "scenario": {"name": "pneumonia-sites", "image_size": 64},
            "strategy": strategy | narrow,
            "train": {"lr": 0.05, "max_updates": 2},  # bytes per round do not depend on it
        }
        folder = work / ("dynammo" if width == 1.0 else f"dynammo-width{width:g}")
        out[f"{width:g}"] = federated(extra, 0, root, folder, quiet)
    return out


def ratios(full: dict[str, Any], dyn: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Full-model bytes per site message over DynaMMo's, per adapter width."""
    return {w: full["bytes_per_site_message"] / r["bytes_per_site_message"] for w, r in dyn.items()}


def bytes_targets(full: dict[str, Any], dyn: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's target at the reference width, then one line per narrow width."""
    rows = []
    for w, ratio in ratios(full, dyn).items():
        which = (
            "reference adapter width (1.0, no bottleneck)"
            if w == "1"
            else f"narrow adapters (adapter_width {w}; not the paper's)"
        )
        rows.append(
            {
                "name": f"full-model FedAvg / adapter-only DynaMMo bytes per site message, {which}",
                "value": round(ratio, 1),
                "goal": f">= {BYTES_GOAL}",
                "met": ratio >= BYTES_GOAL,
            }
        )
    return rows


def bytes_table(full: dict[str, Any], dyn: dict[str, dict[str, Any]]) -> str:
    """Markdown: bytes per round and per site message, full model and each adapter width."""
    rows = [
        {
            "model": "replay, full model (FedAvg)",
            "per round": full["bytes_per_round"],
            "per site message": full["bytes_per_site_message"],
            "full model / this": 1.0,
        }
    ]
    for w, ratio in ratios(full, dyn).items():
        label = "reference width 1.0" if w == "1" else f"adapter_width {w}"
        rows.append(
            {
                "model": f"DynaMMo, adapter set + head ({label})",
                "per round": dyn[w]["bytes_per_round"],
                "per site message": dyn[w]["bytes_per_site_message"],
                "full model / this": round(ratio, 1),
            }
        )
    return markdown_table(rows, ["model", "per round", "per site message", "full model / this"])
