"""What a run writes besides checkpoints: its start records, predictions and metrics files.

Where each file lives is :class:`medcl.engine.layout.RunLayout`.

``metrics.json`` is strict JSON: an undefined value (forgetting or BWT with one experience,
a metric over an empty set) is written as ``null``, never as bare ``NaN`` (see
:func:`medcl.engine.checkpoint.json_dumps`).
"""

from __future__ import annotations

__all__ = [
    "append_environment",
    "environment",
    "model_summary",
    "record_start",
    "save_predictions",
    "start_fields",
    "timing_record",
    "untrained_baseline",
    "write_metrics",
    "write_timing",
]

import json
import platform
import re
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from medcl.data.experience import Experience, Scenario
from medcl.engine.checkpoint import atomic_write_text, json_dumps
from medcl.engine.evaluate import predict_proba
from medcl.engine.layout import RunLayout
from medcl.engine.model_record import data_facts
from medcl.engine.rundir import read_environments
from medcl.engine.state import RunState
from medcl.engine.threads import thread_environment
from medcl.metrics.compute import compute_profile
from medcl.metrics.continual import summarize
from medcl.models.backbones import find_backbone
from medcl.models.heads import ExpandableHead
from medcl.strategies.base import Classifier, Strategy

if TYPE_CHECKING:
    from medcl.config import RunConfig
    from medcl.engine.distributed import DistContext


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


def append_environment(run_dir: Path, env: dict[str, Any], *, first: bool = False) -> None:
    """Add this start's ``env`` to ``environment.json`` (one entry per start, oldest first).

    Earlier entries are kept, so the file records what trained each part of a resumed or
    updated run; ``first`` starts a new list (a new run). The old single-mapping file becomes
    the list's first entry.
    """
    envs = [] if first else read_environments(run_dir)
    atomic_write_text(RunLayout(run_dir).environment, json.dumps([*envs, env], indent=1))


def start_fields(cfg: RunConfig, command: str, completed: int, job: DistContext) -> dict:
    """This start's ``environment.json`` entry: :func:`environment` plus how the run started."""
    return (
        environment(cfg)
        | thread_environment(cfg.train.num_threads)
        | {
            "command": command,
            "completed_before": completed,  # experiences already learned when this start began
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "world_size": job.world_size,
            "dist_backend": job.backend,
        }
    )


def model_summary(cfg: RunConfig, strategy: Strategy) -> dict[str, Any]:
    """``model.json``: the backbone, where its weights came from and the input they expect."""
    bb = find_backbone(strategy)  # DER wraps its extractors: the first one is the base
    return {
        "backbone": cfg.model.backbone,
        "pretrained": cfg.model.pretrained,
        "checkpoint_path": str(cfg.model.checkpoint_path) if cfg.model.checkpoint_path else None,
        "in_chans": bb.in_chans,
        "preprocessing": bb.preprocessing.to_dict(),
    }


def record_start(
    cfg: RunConfig,
    run_dir: Path,
    resolved: str,
    scenario: Scenario,
    strategy: Strategy,
    job: DistContext,
    resume: bool,
    completed: int,
) -> None:
    """Write what this start runs with (rank 0).

    ``config.yaml`` (``resolved``), ``scenario.json`` and ``model.json`` record what trained
    the run: its first start writes them and a resume never rewrites them.
    ``environment.json`` gains one entry per start (read first: a damaged one is refused
    before anything is written).
    """
    command = "run --resume" if resume else "run"
    files = RunLayout(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fields = start_fields(cfg, command, completed, job)
    append_environment(run_dir, fields, first=not resume)
    record = {
        files.config: resolved,
        files.scenario: json.dumps(scenario.describe(), indent=1),
        # + the facts `medcl export` needs about the data (medcl.engine.model_record)
        files.model: json.dumps(
            model_summary(cfg, strategy) | {"scenario": data_facts(scenario)}, indent=1
        ),
    }
    for path, text in record.items():
        if not (resume and path.is_file()):
            atomic_write_text(path, text)


def untrained_baseline(
    strategy: Strategy, scenario: Scenario, *, batch_size: int | None = None
) -> list[float]:
    """b[j]: accuracy of the initial backbone with a fresh full head (for FWT)."""
    head = ExpandableHead(strategy.backbone.num_features, scenario.num_classes)
    model = Classifier(strategy.backbone, head.to(next(strategy.backbone.parameters()).device))
    out = []
    for exp in scenario:
        desc = f"untrained baseline: {exp.name}"
        probs = predict_proba(model, exp.test.images, batch_size=batch_size, desc=desc)
        out.append(float((probs.argmax(1) == exp.test.labels).float().mean()))
    return out


_IDENTIFYING = re.compile(r"patient|name|birth|mrn|accession|path|file", re.IGNORECASE)


def save_predictions(run_dir: Path, after: int, scenario_exps: list[Experience], evals) -> None:
    """``predictions/after-NNN.npz`` + ``.csv``: the test rows of the scored experiences.

    Args:
        run_dir: the run directory.
        after: the experience just learned (``NNN``).
        scenario_exps: the scored experiences, a prefix of the stream (``eval.future``: the
            experiences up to ``after + 1``, or all); later ones have no rows in the files.
        evals: one :class:`~medcl.engine.evaluate.ExperienceEval` per scored experience.
    """
    files = RunLayout(run_dir)
    files.predictions.mkdir(parents=True, exist_ok=True)
    probs = torch.cat([e.probs for e in evals]).numpy().astype(np.float32)
    labels = torch.cat([e.labels for e in evals]).numpy()
    experience = np.concatenate(
        [np.full(len(e.labels), x.index) for x, e in zip(scenario_exps, evals, strict=True)]
    )
    np.savez_compressed(
        files.predictions_after(after, ".npz"), probs=probs, labels=labels, experience=experience
    )
    # no identifiers in the run directory: file paths and identifier-like manifest columns
    # (patient, name, birth, MRN, accession) are dropped; other extra columns are kept
    meta = pd.concat(
        [x.test.meta.assign(experience=x.index) for x in scenario_exps], ignore_index=True
    )
    meta = meta[[c for c in meta.columns if not _IDENTIFYING.search(c)]]
    meta.to_csv(files.predictions_after(after, ".csv"), index=False)


def timing_record(state: RunState, **extra: float) -> dict[str, Any]:
    """``metrics.json``'s ``timing``: wall seconds per phase of each start's set-up and of each
    experience (:mod:`medcl.engine.timing`), ``extra`` phases (the report), and their total."""
    out: dict[str, Any] = {**state.timing, **extra}
    exps = sum(e.get("total", 0.0) for e in state.timing["experiences"])
    out["total"] = round(sum(state.timing["setup"]) + exps + sum(extra.values()), 4)
    return out


def write_timing(run_dir: Path, state: RunState | None = None, **extra: float) -> None:
    """Rewrite ``timing`` in ``metrics.json`` (phases timed after it was written).

    Args:
        run_dir: the run directory.
        state: the run's state (default: the timing already in the file).
        **extra: more run-level phases, e.g. ``report=3.2`` (kept on later rewrites).
    """
    path = RunLayout(run_dir).metrics
    metrics = json.loads(path.read_text())
    old = metrics.get("timing") or {}
    if state is None:
        state = RunState(timing={k: old.get(k, []) for k in ("setup", "experiences")})
    kept = {k: v for k, v in old.items() if k not in ("setup", "experiences", "total")}
    metrics["timing"] = timing_record(state, **(kept | extra))
    atomic_write_text(path, json_dumps(metrics))


def write_metrics(
    run_dir: Path, cfg: RunConfig, scenario: Scenario, state: RunState, strategy: Strategy
) -> dict[str, Any]:
    """metrics.json (matrices, summaries, timing, compute) and curves.csv, after each experience.

    Returns:
        What ``metrics.json`` holds (NaN where the file has ``null``).
    """
    T = len(state.accuracy)
    R = np.array(state.accuracy, dtype=float)[:, :T]  # NaN where not scored (eval.future)
    Rt = np.array(state.task_accuracy, dtype=float)[:, :T]
    b = np.array(state.baseline[:T], dtype=float)
    with warnings.catch_warnings():  # T=1 leaves forgetting/BWT/FWT undefined: NaN, no warning
        warnings.simplefilter("ignore")
        summary = summarize(R, b)
        task_summary = summarize(Rt) if not np.isnan(Rt).all() else {}
    finished = state.completed == len(scenario) - 1
    n = cfg.eval.curve_subset
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
        # the every-k curves' rows per test set (eval.curve_subset; curves.csv is measured on them)
        "curve_subset": {
            "per_experience": cfg.eval.curve_subset,
            "rows": [len(e.test) if n is None else min(n, len(e.test)) for e in scenario],
        },
        "timing": timing_record(state),
    }
    # undefined values (forgetting with one experience, ...) are written as null, not NaN
    files = RunLayout(run_dir)
    atomic_write_text(files.metrics, json_dumps(metrics))
    if state.curves:
        atomic_write_text(files.curves, pd.DataFrame(state.curves).to_csv(index=False))
    return metrics
