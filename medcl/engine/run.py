"""A continual-learning run: build everything from a config, train the stream, save results.

A run directory holds::

    config.yaml, environment.json, scenario.json   what was run
    metrics.json                                   accuracy matrices, summary, timing, compute
    curves.csv                                     old/new/all accuracy every k updates
    predictions/after-NNN.npz + .csv               test probabilities after each experience
    checkpoints/exp-NNN/ + latest.json             resumable state (atomic, safetensors)

Each experience is seeded from (seed, experience index), so ``--resume`` after a crash repeats
exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

__all__ = ["RunState", "build_components", "run", "update"]

import json
import platform
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from medcl.config import RunConfig
from medcl.data.experience import Experience, Scenario
from medcl.engine.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from medcl.engine.evaluate import CurveMonitor, evaluate, predict_proba
from medcl.engine.memory import ReplayMemory
from medcl.engine.trainer import fit_experience, seed_everything
from medcl.errors import ConfigError
from medcl.metrics.compute import compute_profile
from medcl.metrics.continual import summarize
from medcl.models.backbones import create_backbone
from medcl.models.heads import ExpandableHead
from medcl.strategies import create_strategy
from medcl.strategies.base import Classifier, ExperienceInfo, Strategy


@dataclass
class RunState:
    """Everything about a run's progress that is not a tensor (stored in ``state.json``)."""

    completed: int = -1
    global_update: int = 0
    accuracy: list[list[float]] = field(default_factory=list)  # R[i][j], task-agnostic
    task_accuracy: list[list[float]] = field(default_factory=list)  # R[i][j], task-aware
    baseline: list[float] = field(default_factory=list)  # b[j]: untrained model
    fit: list[dict[str, float]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    extra_experiences: list[dict[str, Any]] = field(default_factory=list)  # from `medcl update`

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_components(cfg: RunConfig) -> tuple[Scenario, Strategy, ReplayMemory]:
    """Scenario, strategy and memory from a validated config (no training)."""
    from medcl.data.scenarios import build_scenario

    scenario = build_scenario(
        cfg.scenario.name,
        root=cfg.data.root,
        download=cfg.data.download,
        seed=cfg.seed,
        **cfg.scenario.options,
    )
    seed_everything(cfg.seed)  # model initialisation
    shape = scenario.input_shape
    backbone = create_backbone(
        cfg.model.backbone,
        in_chans=shape[0],
        spatial_dims=len(shape) - 1,
        small_input=cfg.model.small_input,
        pretrained=cfg.model.pretrained,
        checkpoint_path=cfg.model.checkpoint_path,
        width=cfg.model.width,
    )
    strategy = create_strategy(
        cfg.strategy.name, backbone, scenario_kind=scenario.kind, **cfg.strategy.options
    )
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'."
        )
    strategy.to(device)
    memory = ReplayMemory(cfg.memory.size, selection=cfg.memory.selection, seed=cfg.seed)
    memory.attach(scenario.experiences)
    return scenario, strategy, memory


def _environment(cfg: RunConfig) -> dict[str, Any]:
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


def _untrained_baseline(strategy: Strategy, scenario: Scenario) -> list[float]:
    """b[j]: accuracy of the initial backbone with a fresh full head (for FWT)."""
    model = Classifier(
        strategy.backbone, ExpandableHead(strategy.backbone.num_features, scenario.num_classes)
    )
    out = []
    for exp in scenario:
        probs = predict_proba(model, exp.test.images)
        out.append(float((probs.argmax(1) == exp.test.labels).float().mean()))
    return out


_IDENTIFYING = re.compile(r"patient|name|birth|mrn|accession|path|file", re.IGNORECASE)


def _save_predictions(run_dir: Path, after: int, scenario_exps: list[Experience], evals) -> None:
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


def _write_metrics(
    run_dir: Path, cfg: RunConfig, scenario: Scenario, state: RunState, strategy: Strategy
) -> None:
    """metrics.json (matrices, summaries, timing, compute) and curves.csv, after each experience."""
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
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1, default=float))
    if state.curves:
        atomic_write_text(run_dir / "curves.csv", pd.DataFrame(state.curves).to_csv(index=False))


def run(
    cfg: RunConfig, *, resume: bool = False, quiet: bool = False, stop_after: int | None = None
) -> Path:
    """Train the configured stream and write the run directory.

    Args:
        cfg: validated configuration.
        resume: continue from the last completed experience of an existing run.
        quiet: no progress bars or per-experience lines.
        stop_after: stop after this experience index (simulates an interruption in tests).

    Returns:
        The run directory.
    """
    run_dir = Path(cfg.output_dir) / cfg.run_name
    resolved = yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
    if run_dir.exists() and (run_dir / "config.yaml").exists():
        if not resume:
            raise ConfigError(
                f"run directory {run_dir} already exists; pass --resume to continue it, "
                "or choose another `name` (--set name=...) to start a new run."
            )
        if (run_dir / "config.yaml").read_text() != resolved:
            raise ConfigError(
                f"--resume: the config differs from the one {run_dir} was started with "
                f"({run_dir / 'config.yaml'}); resume with the same config."
            )
    threads = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        return _run(cfg, run_dir, resolved, resume=resume, quiet=quiet, stop_after=stop_after)
    finally:
        torch.set_num_threads(threads)  # a library call must not change the caller's setting


def _run(
    cfg: RunConfig,
    run_dir: Path,
    resolved: str,
    *,
    resume: bool,
    quiet: bool,
    stop_after: int | None,
) -> Path:
    latest = run_dir / "checkpoints" / "latest.json"
    scenario, strategy, memory = build_components(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", resolved)
    atomic_write_text(run_dir / "environment.json", json.dumps(_environment(cfg), indent=1))
    atomic_write_text(run_dir / "scenario.json", json.dumps(scenario.describe(), indent=1))

    state = RunState()
    if resume and latest.exists():
        state = _restore(run_dir, strategy, memory)
        if not quiet:
            print(f"resuming {run_dir} after experience {state.completed}")
    else:
        state.baseline = _untrained_baseline(strategy, scenario)

    monitor = CurveMonitor(
        scenario.experiences,
        every=cfg.train.eval_every,
        max_samples=cfg.train.eval_max_samples,
        seed=cfg.seed,
    )
    monitor.rows = state.curves
    for exp in scenario:
        if exp.index <= state.completed:
            continue
        _learn(run_dir, cfg, scenario, strategy, memory, state, monitor, exp, quiet=quiet)
        if stop_after is not None and exp.index >= stop_after:
            break
    return run_dir


def _learn(
    run_dir: Path,
    cfg: RunConfig,
    scenario: Scenario,
    strategy: Strategy,
    memory: ReplayMemory,
    state: RunState,
    monitor: CurveMonitor,
    exp: Experience,
    *,
    quiet: bool,
) -> None:
    """Train one experience, evaluate every experience, then checkpoint and write metrics."""
    stats = fit_experience(
        strategy,
        exp,
        past=scenario.experiences[: exp.index],
        num_seen_classes=scenario.num_seen_classes(exp.index),
        memory=memory,
        cfg=cfg.train,
        replay_batch_size=cfg.memory.replay_batch_size,
        monitor=monitor,
        global_update=state.global_update,
        seed=cfg.seed * 1000 + exp.index,
        quiet=quiet,
    )
    evals = evaluate(strategy, scenario.experiences)
    state.accuracy.append([e.accuracy for e in evals])
    state.task_accuracy.append([e.task_accuracy for e in evals])
    state.fit.append(
        {
            "experience": exp.index,
            "updates": stats.updates,
            "seconds": stats.seconds,
            "images_per_s": stats.images_per_s,
        }
    )
    state.global_update += stats.updates
    state.completed = exp.index
    state.seen = [i.to_dict() for i in strategy.seen]
    state.curves = monitor.rows
    _save_predictions(run_dir, exp.index, list(scenario.experiences), evals)
    name = f"exp-{exp.index:03d}"
    save_checkpoint(
        run_dir / "checkpoints" / name,
        strategy=strategy.state_dict(),
        memory=memory.state_dict(),
        state=state.to_json(),
    )
    atomic_write_text(
        run_dir / "checkpoints" / "latest.json",
        json.dumps({"checkpoint": name, "completed": exp.index}),
    )
    atomic_write_text(run_dir / "scenario.json", json.dumps(scenario.describe(), indent=1))
    _write_metrics(run_dir, cfg, scenario, state, strategy)
    if not quiet:
        seen_acc = np.mean(state.accuracy[-1][: exp.index + 1])
        print(
            f"[{exp.index + 1}/{len(scenario)}] {exp.name}: {stats.updates} updates in "
            f"{stats.seconds:.1f}s ({stats.images_per_s:.0f} img/s); accuracy on seen "
            f"experiences {seen_acc:.3f}"
        )


def _restore(run_dir: Path, strategy: Strategy, memory: ReplayMemory) -> RunState:
    """Load the latest checkpoint of ``run_dir`` into ``strategy`` and ``memory``."""
    latest = run_dir / "checkpoints" / "latest.json"
    ckpt = run_dir / "checkpoints" / json.loads(latest.read_text())["checkpoint"]
    tensors, mem, raw = load_checkpoint(ckpt)
    state = RunState(**raw)
    strategy.rebuild([ExperienceInfo.from_dict(d) for d in state.seen])
    strategy.load_state_dict(tensors)
    memory.load_state_dict(mem)
    return state


def _extend(scenario: Scenario, spec: str, site: str | None, *, cfg: RunConfig) -> Scenario:
    """``scenario`` plus one experience from the source ``spec`` (a new cohort).

    Classes are matched to the scenario's by name (``"pneumonia"`` matches ``"pneumonia"`` or
    ``"<dataset>:pneumonia"``); unmatched classes become new global classes at the end.
    """
    from medcl.data.sources import load_source

    shape = scenario.input_shape
    src = load_source(
        spec,
        root=cfg.data.root,
        download=cfg.data.download,
        image_size=shape[1],
        channels=shape[0],
        seed=cfg.seed,
    )
    new_shape = tuple(src.splits["train"].images.shape[1:])
    if new_shape != shape:
        raise ConfigError(
            f"--data {spec!r} gives images of shape {new_shape}; the run was trained "
            f"on {shape}. Use data of the same dimensionality (2D/3D)."
        )
    names = list(scenario.class_names)
    mapping = {}
    for local, cname in enumerate(src.class_names):
        hits = [g for g, n in enumerate(names) if n == cname or n.split(":", 1)[-1] == cname]
        if len(hits) > 1:
            raise ConfigError(
                f"--data {spec!r}: class {cname!r} matches several of the run's "
                f"classes {[names[h] for h in hits]}; rename it in the manifest."
            )
        if not hits:
            names.append(cname)
            hits = [len(names) - 1]
        mapping[local] = hits[0]
    index = len(scenario)
    site_name = site or src.name
    dtype = scenario[0].train.images.dtype  # e.g. PNG files (float) joining a MedMNIST run (uint8)
    splits = {
        k: src.splits[k].relabel(mapping).with_meta(site=site_name).to_dtype(dtype)
        for k in ("train", "val", "test")
    }
    exp = Experience(
        index=index,
        name=site_name,
        task_id=index,
        classes=tuple(sorted(set(mapping.values()))),
        site=site_name,
        **splits,
    )
    kind = scenario.kind if len(names) == scenario.num_classes else "class"
    return Scenario(
        name=scenario.name,
        kind=kind,
        class_names=tuple(names),
        experiences=(*scenario.experiences, exp),
        seed=scenario.seed,
        sources=(*scenario.sources, {"dataset": src.name, **src.info}),
    )


def update(run_dir: str | Path, data: str, *, site: str | None = None, quiet: bool = False) -> Path:
    """Add one experience (a new cohort) to a finished run and re-evaluate every experience.

    Args:
        run_dir: an existing run directory.
        data: a source spec: MedMNIST flag, CSV manifest or class-folder path.
        site: the cohort's site name (default: the source's name).
        quiet: no progress output.

    Returns:
        ``run_dir``, with metrics, predictions and a checkpoint for the new experience.
    """
    from medcl.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / "latest.json").is_file():
        raise ConfigError(
            f"{run_dir} is not a medcl run with a checkpoint (no "
            "checkpoints/latest.json); give the directory `medcl run` printed."
        )
    cfg = load_config(run_dir / "config.yaml")
    scenario, strategy, memory = build_components(cfg)
    state = _restore(run_dir, strategy, memory)
    for extra in state.extra_experiences:
        scenario = _extend(scenario, extra["data"], extra["site"], cfg=cfg)
    if state.completed != len(scenario) - 1:
        raise ConfigError(
            f"{run_dir} stopped after experience {state.completed} of "
            f"{len(scenario)}; finish it first with `medcl run CONFIG --resume`."
        )
    scenario = _extend(scenario, data, site, cfg=cfg)
    state.extra_experiences.append({"data": data, "site": site})
    memory.attach(scenario.experiences)
    for row in state.accuracy:  # earlier rows had no entry for the new experience
        row.append(float("nan"))
    for row in state.task_accuracy:
        row.append(float("nan"))
    state.baseline.append(float("nan"))  # FWT is undefined for a cohort added afterwards
    monitor = CurveMonitor(
        scenario.experiences,
        every=cfg.train.eval_every,
        max_samples=cfg.train.eval_max_samples,
        seed=cfg.seed,
    )
    monitor.rows = state.curves
    _learn(run_dir, cfg, scenario, strategy, memory, state, monitor, scenario[-1], quiet=quiet)
    return run_dir
