"""Shared helpers for benchmark scripts: data root, result writing, a markdown table."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: the seed that chooses hyper-parameters (never reported) and the reported seeds
SELECTION_SEED, REPORTED_SEEDS = 100, (0, 1, 2)
#: two selection seeds: a choice is made on the mean of their validation scores (never reported)
SELECTION_SEEDS = (SELECTION_SEED, SELECTION_SEED + 1)
#: ``--quick`` smoke streams: small synthetic images, class-incremental (no data files needed)
SMOKE_SCENARIO = {"name": "synthetic-ci", "num_classes": 4, "classes_per_experience": 2,
                  "n_train": 96, "n_test": 48, "n_val": 32, "image_size": 16}  # fmt: skip


def data_root(arg: str | None) -> Path:
    """--root, else $MEDCL_DATA_ROOT, else ../shared/data/medmnist beside the repository."""
    return Path(arg or os.environ.get("MEDCL_DATA_ROOT") or REPO.parent / "shared/data/medmnist")


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def paired_difference(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean, sd and t-based 95 % CI of the paired differences ``a - b`` (same seeds); NaN
    throughout when a value is not finite (e.g. a target never reached: ``inf``)."""
    import numpy as np
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return {"mean": math.nan, "sd": None, "ci95": None}
    d = x - y
    if len(d) < 2:  # no pair (NaN, without numpy's empty-mean warning) or one
        return {"mean": float(d[0]) if len(d) else math.nan, "sd": None, "ci95": None}
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return {"mean": float(d.mean()), "sd": float(d.std(ddof=1)), "ci95": [float(d.mean() - half), float(d.mean() + half)]}  # fmt: skip


def choose_from_grid(
    score: Callable[[float], float], grid: list[float], *, key: str = "score", widenings: int = 2
) -> dict[str, Any]:
    """The grid value with the best ``score`` (higher is better), the grid widened ×3 on the side
    where the best value sits at an edge (at most ``widenings`` times), so the choice brackets
    the optimum. Returns ``{"chosen", "grid", key: {value: score}, "at_edge"}``."""
    grid, widened = sorted(grid), 0
    while True:
        scores = {v: score(v) for v in grid}
        best = max(grid, key=scores.__getitem__)
        edge = best in (grid[0], grid[-1])
        if not edge or widened == widenings:
            return {"chosen": best, "grid": grid, key: scores, "at_edge": edge}
        grid = [grid[0] / 3, *grid] if best == grid[0] else [*grid, grid[-1] * 3]
        widened += 1


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None: bare ``NaN`` is not JSON (jq, JavaScript reject it)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def json_text(payload: Any) -> str:
    """Strict JSON of a results payload (NaN -> null)."""
    return json.dumps(json_safe(payload), indent=1, default=float, allow_nan=False)


def write_results(
    name: str, payload: dict[str, Any], markdown: str, *, out: Path | None = None
) -> Path:
    """Write ``<out>/<name>.json`` (strict JSON) and ``.md`` (``out``: default
    ``benchmarks/results``); return the JSON path."""
    out = Path(out) if out is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **payload}
    (out / f"{name}.json").write_text(json_text(payload))
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return out / f"{name}.json"
