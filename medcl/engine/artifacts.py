"""What a run writes besides checkpoints: environment, predictions and metrics files.

``metrics.json`` is strict JSON: an undefined value (forgetting or BWT with one experience,
a metric over an empty set) is written as ``null``, never as bare ``NaN`` (see
:func:`medcl.engine.checkpoint.json_dumps`).
"""

from __future__ import annotations

__all__ = ["environment", "save_predictions", "untrained_baseline", "write_metrics"]

import platform
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from medcl.data.experience import Experience, Scenario
from medcl.engine.checkpoint import atomic_write_text, json_dumps
from medcl.engine.evaluate import predict_proba
from medcl.metrics.compute import compute_profile
from medcl.metrics.continual import summarize
from medcl.models.heads import ExpandableHead
from medcl.strategies.base import Classifier, Strategy

if TYPE_CHECKING:
    from medcl.config import RunConfig
    from medcl.engine.run import RunState


def environment(cfg: RunConfig) -> dict[str, Any]:
    import monai
    import timm

    import medcl

    return {
        "medcl": medcl.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "cuda": torch.cuda.is_available(),
    }


def untrained_baseline(strategy: Strategy, scenario: Scenario) -> list[float]:
    """b[j]: accuracy of the initial backbone with a fresh full head (for FWT)."""
    head = ExpandableHead(strategy.backbone.num_features, scenario.num_classes)
    model = Classifier(strategy.backbone, head.to(next(strategy.backbone.parameters()).device))
    out = []
    for exp in scenario:
        probs = predict_proba(model, exp.test.images)
        out.append(float((probs.argmax(1) == exp.test.labels).float().mean()))
    return out


_IDENTIFYING = re.compile(r"patient|name|birth|mrn|accession|path|file", re.IGNORECASE)


def save_predictions(run_dir: Path, after: int, scenario_exps: list[Experience], evals) -> None:
    pred_dir = run_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    probs = torch.cat([e.probs for e in evals]).numpy().astype(np.float32)
    labels = torch.cat([e.labels for e in evals]).numpy()
    experience = np.concatenate(
        [np.full(len(e.labels), x.index) for x, e in zip(scenario_exps, evals, strict=True)]
    )
    np.savez_compressed(
        pred_dir / f"after-{after:03d}.npz", probs=probs, labels=labels, experience=experience
    )
    # no identifiers in the run directory: file paths and identifier-like manifest columns
    # (patient, name, birth, MRN, accession) are dropped; other extra columns are kept
    meta = pd.concat(
        [x.test.meta.assign(experience=x.index) for x in scenario_exps], ignore_index=True
    )
    meta = meta[[c for c in meta.columns if not _IDENTIFYING.search(c)]]
    meta.to_csv(pred_dir / f"after-{after:03d}.csv", index=False)


def write_metrics(
    run_dir: Path, cfg: RunConfig, scenario: Scenario, state: RunState, strategy: Strategy
) -> dict[str, Any]:
    """metrics.json (matrices, summaries, timing, compute) and curves.csv, after each experience.

    Returns:
        What ``metrics.json`` holds (NaN where the file has ``null``).
    """
    T = len(state.accuracy)
    R = np.array(state.accuracy, dtype=float)[:, :T]  # evaluated on every experience: keep T×T
    Rt = np.array(state.task_accuracy, dtype=float)[:, :T]
    b = np.array(state.baseline[:T], dtype=float)
    with warnings.catch_warnings():  # T=1 leaves forgetting/BWT/FWT undefined: NaN, no warning
        warnings.simplefilter("ignore")
        summary = summarize(R, b)
        task_summary = summarize(Rt) if not np.isnan(Rt).all() else {}
    finished = state.completed == len(scenario) - 1
    metrics = {
        "run": cfg.run_name,
        "strategy": cfg.strategy.name,
        "scenario": scenario.name,
        "kind": scenario.kind,
        "experiences": [e.name for e in scenario],
        "accuracy_matrix": state.accuracy,
        "task_accuracy_matrix": state.task_accuracy,
        "baseline_accuracy": state.baseline,
        "summary": summary,
        "task_aware_summary": task_summary,
        "fit": state.fit,
        "compute": compute_profile(
            strategy.deployable_model(), scenario.input_shape, latency=finished
        ),
    }
    # undefined values (forgetting with one experience, ...) are written as null, not NaN
    atomic_write_text(run_dir / "metrics.json", json_dumps(metrics))
    if state.curves:
        atomic_write_text(run_dir / "curves.csv", pd.DataFrame(state.curves).to_csv(index=False))
    return metrics
