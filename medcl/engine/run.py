"""A continual-learning run: build everything from a config, train the stream, save results.

A run directory holds::

    config.yaml, environment.json, scenario.json   what was run
    metrics.json                                   accuracy matrices, summary, timing, compute
    curves.csv                                     old/new/all accuracy every k updates
    predictions/after-NNN.npz + .csv               test probabilities after each experience
    checkpoints/exp-NNN/ + latest.json             resumable state (atomic, safetensors)
    tensorboard/                                   experiment log (``logging``; rank 0 only)

Each experience is seeded from (seed, experience index), so ``--resume`` after a crash repeats
exactly what the uninterrupted run would have done. Under ``torchrun`` every process trains
(DDP, :mod:`medcl.engine.distributed`) and rank 0 alone evaluates and writes.
"""

from __future__ import annotations

__all__ = ["RunState", "build_components", "check_run", "restore_run", "run", "update"]

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medcl.config import RunConfig, validate_config
from medcl.data.experience import Experience, Scenario
from medcl.engine.artifacts import (
    environment,
    save_predictions,
    untrained_baseline,
    write_metrics,
)
from medcl.engine.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from medcl.engine.cohort import extend_scenario
from medcl.engine.distributed import SINGLE, DistContext, check_strategy, session
from medcl.engine.evaluate import CurveMonitor, evaluate
from medcl.engine.loggers import ExperimentLogger, check_logging, create_logger
from medcl.engine.memory import ReplayMemory
from medcl.engine.rundir import (
    RunLock,
    check_output_dir,
    readable_checkpoints,
    run_progress,
    select_experience,
)
from medcl.engine.trainer import fit_experience, seed_everything
from medcl.errors import ConfigError, DataError
from medcl.models.backbones import create_backbone, find_backbone
from medcl.strategies import create_strategy
from medcl.strategies.base import ExperienceInfo, Strategy


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

    with cfg.data.file_cache(cfg.output_dir):  # data.cache / cache_dir / workers
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


def run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    resume_from: int | None = None,
    quiet: bool = False,
    stop_after: int | None = None,
) -> Path:
    """Train the configured stream and write the run directory.

    The run directory is locked (:class:`~medcl.engine.rundir.RunLock`) while it is written: a
    second ``run`` or ``update`` of the same directory is refused.

    Started by ``torchrun`` (``WORLD_SIZE > 1``), the processes train one model with DDP and
    rank 0 alone writes the run directory (see :mod:`medcl.engine.distributed`).

    Args:
        cfg: validated configuration.
        resume: continue from the last completed experience of an existing run.
        resume_from: continue after this experience instead (its checkpoint must be readable),
            e.g. when the latest checkpoint was damaged; implies ``resume``.
        quiet: no progress bars or per-experience lines.
        stop_after: stop after this experience index (simulates an interruption in tests).

    Returns:
        The run directory.

    Raises:
        ConfigError: the directory exists (without ``resume``), is locked, the config differs
            from the one it was started with, or ``output_dir`` is not a writable folder.
        DataError: the checkpoint to resume from is unreadable (the message names the newest
            readable one).
    """
    run_dir = Path(cfg.output_dir) / cfg.run_name
    resume = resume or resume_from is not None
    check_output_dir(cfg.output_dir)
    with (
        session(backend=cfg.train.dist_backend, device=cfg.train.device) as job,
        RunLock(run_dir) if job.is_main else contextlib.nullcontext(),
    ):
        check_run(cfg, resume=resume, resume_from=resume_from, world_size=job.world_size)
        job.barrier()  # every rank checked the directory before rank 0 writes to it
        return _locked_run(cfg, run_dir, resume, resume_from, quiet, stop_after, job)


def _resolved(cfg: RunConfig) -> str:
    """The config as written to ``config.yaml`` (and compared on ``--resume``)."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def _same_config(saved: str, resolved: str) -> bool:
    """Whether a run's ``config.yaml`` is ``resolved`` once this version's defaults fill it in.

    A run started by an earlier medcl lacks keys added since (e.g. ``logging``); their
    defaults change nothing, so it resumes.
    """
    if saved == resolved:
        return True
    try:
        return _resolved(validate_config(yaml.safe_load(saved))) == resolved
    except (ConfigError, yaml.YAMLError, TypeError):
        return False


def check_run(
    cfg: RunConfig, *, resume: bool, resume_from: int | None = None, world_size: int = 1
) -> None:
    """Every refusal :func:`run` can make before training, without writing anything.

    ``medcl run --nproc N`` calls it before it starts the processes, so that a mistake is one
    message rather than N failing processes.

    Raises:
        ConfigError: ``output_dir`` is not a writable folder, the strategy cannot train with
            ``world_size`` processes, a configured logger cannot start (MLflow not installed),
            the run exists (without ``resume``), the checkpoint
            ``resume_from`` does not exist, or the config differs from the run's.
    """
    run_dir = Path(cfg.output_dir) / cfg.run_name
    resume = resume or resume_from is not None
    check_output_dir(cfg.output_dir)
    check_strategy(cfg.strategy.name, world_size)
    check_logging(cfg.logging)
    resolved = _resolved(cfg)
    if (
        resume_from is not None
        and not (run_dir / "checkpoints" / f"exp-{resume_from:03d}").is_dir()
    ):
        have = (
            list(run_progress(run_dir).checkpoints) if (run_dir / "scenario.json").is_file() else []
        )
        raise ConfigError(
            f"--resume-from {resume_from}: {run_dir} has no checkpoint for experience "
            f"{resume_from} (checkpoints: {have or 'none'}); choose one of them or use --resume."
        )
    if run_dir.exists() and (run_dir / "config.yaml").exists():
        if not resume:
            raise ConfigError(
                f"run directory {run_dir} already exists; pass --resume to continue it, "
                "or choose another `name` (--set name=...) to start a new run."
            )
        if not _same_config((run_dir / "config.yaml").read_text(), resolved):
            raise ConfigError(
                f"--resume: the config differs from the one {run_dir} was started with "
                f"({run_dir / 'config.yaml'}); resume with the same config."
            )


def _locked_run(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool,
    resume_from: int | None,
    quiet: bool,
    stop_after: int | None,
    job: DistContext,
) -> Path:
    resolved = _resolved(cfg)
    threads = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        return _run(
            cfg,
            run_dir,
            resolved,
            resume=resume,
            resume_from=resume_from,
            quiet=quiet,
            stop_after=stop_after,
            job=job,
        )
    finally:
        torch.set_num_threads(threads)  # a library call must not change the caller's setting


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


def _run(
    cfg: RunConfig,
    run_dir: Path,
    resolved: str,
    *,
    resume: bool,
    resume_from: int | None,
    quiet: bool,
    stop_after: int | None,
    job: DistContext = SINGLE,
) -> Path:
    latest = run_dir / "checkpoints" / "latest.json"
    scenario, strategy, memory = build_components(cfg)
    if job.is_main:  # rank 0 alone writes; every rank reads checkpoints
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", resolved)
        env = environment(cfg) | {"world_size": job.world_size, "dist_backend": job.backend}
        atomic_write_text(run_dir / "environment.json", json.dumps(env, indent=1))
        atomic_write_text(run_dir / "scenario.json", json.dumps(scenario.describe(), indent=1))
        summary = model_summary(cfg, strategy)
        atomic_write_text(run_dir / "model.json", json.dumps(summary, indent=1))

    state = RunState()
    if resume and (latest.exists() or resume_from is not None):
        state = _restore(run_dir, strategy, memory, experience=resume_from)
        job.barrier()  # every rank has read `latest` before rank 0 may rewrite it
        if resume_from is not None and job.is_main:  # the run continues from this checkpoint
            atomic_write_text(
                latest,
                json.dumps({"checkpoint": f"exp-{resume_from:03d}", "completed": resume_from}),
            )
        if not quiet and job.is_main:
            print(f"resuming {run_dir} after experience {state.completed}")
    elif job.is_main:
        state.baseline = untrained_baseline(strategy, scenario)

    monitor = CurveMonitor(
        scenario.experiences,
        every=cfg.train.eval_every,
        max_samples=cfg.train.eval_max_samples,
        seed=cfg.seed,
        amp=cfg.train.amp,
    )
    monitor.rows = state.curves
    params = json.loads(cfg.model_dump_json())
    logger = create_logger(
        cfg.logging, run_dir, run_name=cfg.run_name, params=params, main=job.is_main
    )
    try:
        for exp in scenario:
            if exp.index <= state.completed:
                continue
            _learn(
                run_dir, cfg, scenario, strategy, memory, state, monitor, exp,
                quiet=quiet, job=job, logger=logger,
            )  # fmt: skip
            if stop_after is not None and exp.index >= stop_after:
                break
    finally:
        logger.close()
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
    job: DistContext = SINGLE,
    logger: ExperimentLogger | None = None,
) -> None:
    """Train one experience, evaluate every experience, then checkpoint and write metrics.

    In a DDP job every rank trains; rank 0 alone evaluates, logs and writes.
    """
    curves_before = len(monitor.rows)
    stats = fit_experience(
        strategy,
        exp,
        past=scenario.experiences[: exp.index],
        num_seen_classes=scenario.num_seen_classes(exp.index),
        memory=memory,
        cfg=cfg.train,
        replay_batch_size=cfg.memory.replay_batch_size,
        monitor=monitor if job.is_main else None,
        global_update=state.global_update,
        seed=cfg.seed * 1000 + exp.index,
        quiet=quiet,
        dist=job,
        logger=logger,
    )
    if not job.is_main:  # only the progress the loop needs
        state.global_update += stats.updates
        state.completed = exp.index
        return
    # fp32 always: the accuracy matrix, predictions and clinical report must not depend on the
    # device (bf16 autocast is for training and the every-k curves only)
    evals = evaluate(strategy, scenario.experiences)
    state.accuracy.append([e.accuracy for e in evals])
    state.task_accuracy.append([e.task_accuracy for e in evals])
    state.fit.append(
        {
            "experience": exp.index,
            "updates": stats.updates,
            "seconds": stats.seconds,
            "images_per_s": stats.images_per_s,
            "diagnostics": strategy.diagnostics(),  # method-specific (e.g. DynaMMo's adapters)
        }
    )
    state.global_update += stats.updates
    state.completed = exp.index
    state.seen = [i.to_dict() for i in strategy.seen]
    state.curves = monitor.rows
    save_predictions(run_dir, exp.index, list(scenario.experiences), evals)
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
    metrics = write_metrics(run_dir, cfg, scenario, state, strategy)
    seen_acc = float(np.mean(state.accuracy[-1][: exp.index + 1]))
    if logger is not None:
        _log_experience(logger, state, monitor.rows[curves_before:], metrics, seen_acc)
    if not quiet:
        print(
            f"[{exp.index + 1}/{len(scenario)}] {exp.name}: {stats.updates} updates in "
            f"{stats.seconds:.1f}s ({stats.images_per_s:.0f} img/s); accuracy on seen "
            f"experiences {seen_acc:.3f}"
        )


def _log_experience(
    logger: ExperimentLogger,
    state: RunState,
    curves: list[dict[str, Any]],
    metrics: dict[str, Any],
    seen_acc: float,
) -> None:
    """Throughput, the experience's curve points and the accuracies after it (rank 0)."""
    fit = state.fit[-1]
    logger.log({"train/images_per_s": fit["images_per_s"]}, state.global_update)
    for row in curves:
        logger.log({f"curve/{k[:-4]}": row[k] for k in ("old_acc", "new_acc", "all_acc")}, row["update"])  # fmt: skip
    after = len(state.accuracy) - 1  # experiences learned - 1
    accs = {f"accuracy/exp_{j}": a for j, a in enumerate(state.accuracy[-1])}
    summary = {f"summary/{k}": v for k, v in metrics["summary"].items() if isinstance(v, float)}
    logger.log(accs | {"accuracy/seen": seen_acc} | summary, after)


def _restore(
    run_dir: Path, strategy: Strategy, memory: ReplayMemory, *, experience: int | None = None
) -> RunState:
    """Load the checkpoint after ``experience`` (default: the latest) into strategy and memory.

    Raises:
        DataError: the checkpoint is unreadable; the message names the newest readable one and
            the ``--resume-from`` that continues from it.
    """
    if experience is None:
        latest = run_dir / "checkpoints" / "latest.json"
        name = json.loads(latest.read_text())["checkpoint"]
    else:
        name = f"exp-{experience:03d}"
    ckpt = run_dir / "checkpoints" / name
    try:
        tensors, mem, raw = load_checkpoint(ckpt)
    except DataError as e:
        k = int(name[4:])
        good = readable_checkpoints(run_dir, below=k)
        cmd = f"medcl run {run_dir / 'config.yaml'}"
        hint = (
            f"The newest readable checkpoint is after experience {good[0]}: continue from it "
            f"with `{cmd} --resume-from {good[0]}` (experiences {good[0] + 1}..{k} are trained "
            "again, with the same seeds), or use that model with --experience "
            f"{good[0]} in report/export/predict."
            if good
            else f"No earlier checkpoint is readable; start again under a new name: `{cmd} "
            "--set name=NEW_NAME`."
        )
        raise DataError(f"{e} {hint}") from None
    state = RunState(**raw)
    strategy.rebuild([ExperienceInfo.from_dict(d) for d in state.seen])
    strategy.load_state_dict(tensors)
    memory.load_state_dict(mem)
    return state


def restore_run(
    run_dir: str | Path,
    experience: int | None = None,
    *,
    allow_partial: bool = False,
    command: str = "this command",
) -> tuple[RunConfig, Scenario, Strategy, ReplayMemory, RunState]:
    """Rebuild a run's components and load the model after one experience.

    Args:
        run_dir: the run directory.
        experience: which model (``--experience K``); default the final one.
        allow_partial: for an unfinished run, accept the last completed experience.
        command: only to word the message (``"medcl export"``).

    Returns:
        ``(cfg, scenario, strategy, memory, state)``; the scenario includes the cohorts that
        ``medcl update`` added up to that experience.

    Raises:
        ConfigError: not a run, or an unfinished run without ``experience``/``allow_partial``.
        DataError: the checkpoint is unreadable (the message offers the newest readable one).
    """
    from medcl.config import load_config

    run_dir = Path(run_dir)
    k = select_experience(run_dir, experience, allow_partial=allow_partial, command=command)
    cfg = load_config(run_dir / "config.yaml")
    scenario, strategy, memory = build_components(cfg)
    state = _restore(run_dir, strategy, memory, experience=k)
    for extra in state.extra_experiences:
        scenario = extend_scenario(
            scenario,
            extra["data"],
            extra["site"],
            cfg=cfg,
            new_classes=extra.get("new_classes", True),
        )
    return cfg, scenario, strategy, memory, state


def update(
    run_dir: str | Path,
    data: str,
    *,
    site: str | None = None,
    new_classes: bool = False,
    quiet: bool = False,
) -> Path:
    """Add one experience (a new cohort) to a finished run and re-evaluate every experience.

    The cohort's classes are matched to the run's by name (see :mod:`medcl.engine.cohort`);
    classes the run has not seen are refused unless ``new_classes``. The run directory is locked
    while it is written, and nothing in it changes when the cohort is refused.

    Args:
        run_dir: an existing run directory.
        data: a source spec: MedMNIST flag, CSV manifest or class-folder path.
        site: the cohort's site name (default: the source's name).
        new_classes: accept classes the run has not seen (the output layer grows).
        quiet: no progress output.

    Returns:
        ``run_dir``, with metrics, predictions and a checkpoint for the new experience.

    Raises:
        ConfigError: not a run, an unfinished run, a locked run, or unmatched classes.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / "latest.json").is_file():
        raise ConfigError(
            f"{run_dir} is not a medcl run with a checkpoint (no "
            "checkpoints/latest.json); give the directory `medcl run` printed."
        )
    with RunLock(run_dir):
        progress = run_progress(run_dir)
        if not progress.finished:
            raise ConfigError(
                f"{run_dir} is unfinished: it {progress.describe()}. `medcl update` adds a "
                "cohort after the whole stream; finish the run first with "
                f"`medcl run {run_dir / 'config.yaml'} --resume`."
            )
        cfg, scenario, strategy, memory, state = restore_run(run_dir, command="medcl update")
        scenario = extend_scenario(scenario, data, site, cfg=cfg, new_classes=new_classes)
        if not quiet:
            exp = scenario[-1]
            print(
                f"cohort {exp.name}: classes "
                + ", ".join(f"{scenario.class_names[c]} ({c})" for c in exp.classes)
            )
        state.extra_experiences.append({"data": data, "site": site, "new_classes": new_classes})
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
            amp=cfg.train.amp,
        )
        monitor.rows = state.curves
        logger = create_logger(cfg.logging, run_dir, run_name=cfg.run_name)
        try:
            _learn(
                run_dir, cfg, scenario, strategy, memory, state, monitor, scenario[-1],
                quiet=quiet, logger=logger,
            )  # fmt: skip
        finally:
            logger.close()
    return run_dir
