"""The exported architecture, rebuilt from JSON: what safetensors and bundle exports carry.

:func:`rebuild_config` is written into the export (the run's ``model`` and ``strategy`` config,
the scenario kind and the learned experiences); :func:`rebuild_module` makes an
:class:`~medcl.export.module.ExportModule` of that architecture with untrained weights, ready for
``load_state_dict``, so loading an export never unpickles.
"""

from __future__ import annotations

__all__ = ["rebuild_config", "rebuild_module"]

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from medcl.engine.layout import RunLayout
from medcl.engine.model_record import build_strategy
from medcl.export.module import ExportModule
from medcl.export.ood import MahalanobisScore
from medcl.strategies.base import ExperienceInfo


def rebuild_config(
    run_dir: str | Path, *, scenario_kind: str, seen: Sequence[ExperienceInfo]
) -> dict[str, Any]:
    """``{"model", "strategy", "scenario_kind", "seen"}``: how to rebuild the run's model.

    Args:
        run_dir: the run directory (its ``config.yaml``).
        scenario_kind: the kind of the scenario the model was restored with.
        seen: the strategy's learned experiences.
    """
    raw = yaml.safe_load(RunLayout(run_dir).config.read_text())
    return {
        "model": raw["model"],
        "strategy": raw["strategy"],
        "scenario_kind": scenario_kind,
        "seen": [i.to_dict() for i in seen],
    }


def rebuild_module(meta: dict[str, Any], config: dict[str, Any]) -> ExportModule:
    """An :class:`ExportModule` of the exported architecture with untrained weights.

    Args:
        meta: the export's metadata (input shape; ``ood`` sizes when it has a guard).
        config: what :func:`rebuild_config` wrote.

    Returns:
        The module in eval mode, ready for ``load_state_dict``.
    """
    m = config["model"]
    strategy = build_strategy(
        m["backbone"],
        config["strategy"]["name"],
        {k: v for k, v in config["strategy"].items() if k != "name"},
        input_shape=meta["input_shape"],
        small_input=m["small_input"],
        width=m["width"],
        scenario_kind=config["scenario_kind"],
    )
    strategy.rebuild([ExperienceInfo.from_dict(d) for d in config["seen"]])
    ood = meta.get("ood")
    guard = MahalanobisScore.empty(ood["n_means"], ood["n_features"]) if ood else None
    return ExportModule(strategy.deployable_model(), guard).eval()
