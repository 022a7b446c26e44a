"""The arms, ablations and learning-rate search of ``benchmarks/stability_gap.py``.

Shared by the planner (which runs to launch) and the report (which runs to read back), so a run
id and an arm's options are written in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: the three reported arms: variant -> (strategy, options); each gets its own lr selection
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    # Harun & Kanan's vanilla: hard CE, full fine-tuning, AdamW at a constant rate, no warm-up
    "vanilla-authors": ("rehearsal", {"optimizer": "adamw_constant", "layer_decay": 1.0}),
    # medcl's tuned vanilla: SGM's OneCycle warm-up plus layer-wise decay
    "vanilla-tuned": ("rehearsal", {"optimizer": "adamw_onecycle", "layer_decay": 0.9}),
    "sgm": ("sgm", {"optimizer": "adamw_onecycle", "layer_decay": 1.0}),
}
MAIN = tuple(ARMS)
#: one change each (variant -> (arm it modifies and whose lr it uses, options changed))
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgm-no-init": ("sgm", {"data_driven_init": False}),
    "sgm-no-soft": ("sgm", {"soft_targets": False}),
    "sgm-no-lora": ("sgm", {"lora": False}),
    "sgm-no-freeze": ("sgm", {"freeze_old_units": False}),
    "sgm-literal-init": ("sgm", {"init_scale": "none"}),  # the authors' literal new rows
    "sgm-init-q0": ("sgm", {"init_quantile": 0.0}),  # new units outrank no old exemplar
    "sgm-layer-decay": ("sgm", {"layer_decay": 0.9}),  # the tuned decay
    "sgm-bn-train": ("sgm", {"bn": "train"}),
    "vanilla-bn-train": ("vanilla-tuned", {"bn": "train"}),
}
#: no-ops where every class is old after experience 0 (domain-incremental streams)
NEW_CLASSES_ONLY = {"sgm-no-init", "sgm-literal-init", "sgm-init-q0"}
#: experiences per supported stream, and the domain-incremental ones
STREAMS = {"medmnist-cross3": 3, "pneumonia-sites": 4}
DOMAIN_STREAMS = {"pneumonia-sites"}


def run_id(scenario: str, variant: str, seed: int, lr: float) -> str:
    return f"{scenario}/{variant}/s{seed}/lr{lr:g}"


def arm_of(variant: str) -> str:
    """The main arm a variant is (or modifies): its strategy, base options and lr."""
    return variant if variant in ARMS else ABLATIONS[variant][0]


def options_of(variant: str) -> tuple[str, dict[str, Any]]:
    """``(strategy, options)`` of a main arm or an ablation."""
    strategy, options = ARMS[arm_of(variant)]
    return strategy, options | (ABLATIONS[variant][1] if variant in ABLATIONS else {})


def lr_search(
    result_of: Callable[[float], dict | None], lrs: list[float], extend: int
) -> tuple[list[float], float | None, bool]:
    """The learning-rate grid, extended until the best final validation accuracy is inside it.

    Starts from ``lrs``; while the best rate (ties: the smaller) sits at an edge, adds one rate
    beyond that edge (the edge's own ratio to its neighbour), at most ``extend`` times in all.

    Args:
        result_of: the finished selection run of a learning rate (None: not run yet).
        lrs: the initial grid (>= 2 rates to extend).
        extend: how many rates may be added.

    Returns:
        ``(grid, chosen, bracketed)``: the rates to run, the chosen one (None until every rate of
        the grid ran) and whether it has a rate on either side.
    """
    grid = sorted(lrs)
    while True:
        got = [result_of(lr) for lr in grid]
        if any(r is None for r in got):
            return grid, None, False
        best = max(range(len(grid)), key=lambda i: (got[i]["val_acc"], -grid[i]))
        inside = 0 < best < len(grid) - 1
        if inside or len(grid) < 2 or len(grid) >= len(lrs) + extend:
            return grid, grid[best], inside
        low = best == 0
        edge = grid[0] ** 2 / grid[1] if low else grid[-1] ** 2 / grid[-2]
        edge = float(f"{edge:.3g}")  # 3 significant digits: readable run ids
        grid = [edge, *grid] if low else [*grid, edge]


def select_lr(
    done: dict[str, dict], scenario: str, variant: str, args: Any
) -> tuple[list[float], float | None, bool]:
    """:func:`lr_search` over ``variant``'s runs on ``args.selection_seed`` in ``done``."""
    seed = args.selection_seed
    return lr_search(
        lambda lr: done.get(run_id(scenario, variant, seed, lr)), args.lrs, args.lr_extend
    )


def variants(args: Any, scenario: str) -> list[str]:
    """The ablations that differ from SGM on ``scenario``."""
    skip = NEW_CLASSES_ONLY if scenario in DOMAIN_STREAMS else set()
    return [v for v in args.ablations if v not in skip]
