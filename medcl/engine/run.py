"""A continual-learning run: build everything from a config, train the stream, save results.

What a run directory holds, and where, is :mod:`medcl.engine.layout`. Each experience is seeded
from (seed, experience index), so ``--resume`` after a crash repeats exactly what the
uninterrupted run would have done. Under ``torchrun`` every process trains (DDP,
:mod:`medcl.engine.distributed`) and rank 0 alone evaluates and writes.

One experience is :func:`learn_experience`: train, evaluate (the test splits ``eval.future``
asks for: up to the next experience by default), recalibrate (:mod:`medcl.engine.posthoc`),
write predictions, checkpoint, write metrics, log. Resuming is :mod:`medcl.engine.resume`;
adding a cohort to a finished run is :mod:`medcl.engine.update`.
"""

from __future__ import annotations

__all__ = ["check_run", "curve_monitor", "finish_experience", "learn_experience", "run"]

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medcl.config import EvalFuture, RunConfig, resolved_yaml
from medcl.data.experience import Experience, Scenario
from medcl.data.memory import ReplayMemory
from medcl.engine.artifacts import (
    record_start,
    save_predictions,
    untrained_baseline,
    write_metrics,
    write_timing,
)
from medcl.engine.checkpoint import atomic_write_text, save_checkpoint
from medcl.engine.components import build_components
from medcl.engine.device import use_layout
from medcl.engine.distributed import (
    SINGLE,
    DistContext,
    env_local_world_size,
    session,
)
from medcl.engine.evaluate import CurveMonitor, ExperienceEval, evaluate, num_scored
from medcl.engine.layout import RunLayout, checkpoint_name
from medcl.engine.loggers import ExperimentLogger, create_logger
from medcl.engine.posthoc import fit_posthoc, write_posthoc
from medcl.engine.resume import restore_checkpoint
from medcl.engine.run_checks import check_run
from medcl.engine.rundir import RunLock, check_output_dir
from medcl.engine.state import RunState
from medcl.engine.threads import first_environment, log_threads, resolve_threads, use_threads
from medcl.engine.timing import PhaseTimer
from medcl.engine.trainer import FitStats, fit_experience
from medcl.progress import progress_bar, show_progress
from medcl.strategies.base import Strategy


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
    return resolved_yaml(cfg)


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
    # CPU threads, once per start: `auto` measures the free cores (or, on resume, keeps the
    # first start's count); on resume a count or kernel path unlike the first start's is said
    recorded = first_environment(run_dir) if resume else None
    ranks = env_local_world_size() if job.enabled else 1
    threads = resolve_threads(cfg.train.num_threads, local_ranks=ranks, recorded=recorded)
    with use_threads(threads.threads), show_progress(not quiet and job.is_main):
        if job.is_main:
            log_threads(threads, recorded)
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


def curve_monitor(cfg: RunConfig, scenario: Scenario, state: RunState) -> CurveMonitor:
    """The every-k old/new/all accuracy monitor, continuing the curves already in ``state``."""
    monitor = CurveMonitor(
        scenario.experiences,
        every=cfg.train.eval_every,
        subset=cfg.eval.curve_subset,
        seed=cfg.seed,
        amp=cfg.train.amp,
    )
    monitor.rows = state.curves
    return monitor


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
    start = time.perf_counter()
    latest = RunLayout(run_dir).latest
    scenario, strategy, memory = build_components(cfg)
    state = RunState()
    restoring = resume and (latest.exists() or resume_from is not None)
    if restoring:  # the checkpoint is read (a damaged one refused) before anything is written
        state = restore_checkpoint(run_dir, strategy, memory, experience=resume_from)
        job.barrier()  # every rank has read `latest` before rank 0 may rewrite it
    if job.is_main:  # rank 0 alone writes; every rank reads checkpoints
        record_start(cfg, run_dir, resolved, scenario, strategy, job, resume, state.completed)
    if restoring:
        if resume_from is not None and job.is_main:  # the run continues from this checkpoint
            pointer = {"checkpoint": checkpoint_name(resume_from), "completed": resume_from}
            atomic_write_text(latest, json.dumps(pointer))
        if not quiet and job.is_main:
            print(f"resuming {run_dir} after experience {state.completed}")
    elif job.is_main:
        with _scoring_layout(cfg, scenario, strategy):
            state.baseline = untrained_baseline(strategy, scenario, batch_size=cfg.eval.batch_size)
    state.timing["setup"].append(round(time.perf_counter() - start, 4))

    monitor = curve_monitor(cfg, scenario, state)
    params = json.loads(cfg.model_dump_json())
    logger = create_logger(
        cfg.logging, run_dir, run_name=cfg.run_name, params=params, main=job.is_main
    )
    try:
        for exp in scenario:
            if exp.index <= state.completed:
                continue
            learn_experience(
                run_dir, cfg, scenario, strategy, memory, state, monitor, exp,
                quiet=quiet, job=job, logger=logger,
            )  # fmt: skip
            if stop_after is not None and exp.index >= stop_after:
                break
    finally:
        logger.close()
    return run_dir


def learn_experience(
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
    """Train one experience, evaluate (``eval.future``), then checkpoint and write metrics.

    In a DDP job every rank trains; rank 0 alone evaluates, logs and writes.
    """
    # 1. train (every rank), seeded from (seed, experience index)
    curves_before = len(monitor.rows)
    timer = PhaseTimer()
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
        timer=timer,
    )
    state.global_update += stats.updates
    state.completed = exp.index
    if job.is_main:  # only the progress the loop needs on the other ranks
        finish_experience(
            run_dir, cfg, scenario, strategy, memory, state, monitor, exp, stats, timer,
            curves_before=curves_before, quiet=quiet, logger=logger,
        )  # fmt: skip


def finish_experience(
    run_dir: Path,
    cfg: RunConfig,
    scenario: Scenario,
    strategy: Strategy,
    memory: ReplayMemory,
    state: RunState,
    monitor: CurveMonitor,
    exp: Experience,
    stats: FitStats,
    timer: PhaseTimer,
    *,
    curves_before: int,
    quiet: bool,
    logger: ExperimentLogger | None = None,
) -> None:
    """Steps 2-7 of :func:`learn_experience` once ``exp`` is learned (a federated site's too)."""
    # 2. evaluate the experiences learned and the next one (all with eval.future: all), then
    # 3. recalibrate: temperature + conformal thresholds on the seen validation splits
    with _scoring_layout(cfg, scenario, strategy):
        with timer("eval"):
            evals = _evaluate(
                strategy, scenario, state, monitor, exp, stats, future=cfg.eval.future
            )
        with timer("calibration"):
            seen = scenario.experiences[: exp.index + 1]
            posthoc = fit_posthoc(strategy, seen, cfg.calibration, seed=cfg.seed, memory=memory)
    # 4. write its predictions (the scored experiences' rows)
    bar = progress_bar(total=3, desc=f"exp {exp.index} {exp.name}: writing results", unit="file")
    with timer("predictions"):
        save_predictions(run_dir, exp.index, list(scenario.experiences[: len(evals)]), evals)
    bar.update(1)
    timing = {"experience": exp.index} | timer.record()
    state.timing["experiences"].append(timing)  # checkpointed; completed once written
    # 5. calibration record + checkpoint, 6. metrics (+ scenario.json after `medcl update`)
    with timer("checkpoint"):
        write_posthoc(run_dir, posthoc)  # before the pointer: a checkpoint never lacks it
        _checkpoint(run_dir, strategy, memory, state, exp)
    bar.update(1)
    with timer("metrics"):
        _record_scenario(run_dir, scenario)
        metrics = write_metrics(run_dir, cfg, scenario, state, strategy)
    bar.close()
    timing.clear()
    timing.update({"experience": exp.index} | timer.record())  # + checkpoint, metrics
    write_timing(run_dir, state)
    # 7. log and print
    seen_acc = float(np.mean(state.accuracy[-1][: exp.index + 1]))
    if logger is not None:
        _log_experience(logger, state, monitor.rows[curves_before:], metrics, seen_acc)
    if not quiet:
        print(
            f"[{exp.index + 1}/{len(scenario)}] {exp.name}: {stats.updates} updates in "
            f"{stats.seconds:.1f}s ({stats.images_per_s:.0f} img/s) + "
            f"{timing['total'] - stats.seconds:.1f}s for the rest; accuracy on seen "
            f"experiences {seen_acc:.3f}"
        )


def _evaluate(
    strategy: Strategy,
    scenario: Scenario,
    state: RunState,
    monitor: CurveMonitor,
    exp: Experience,
    stats: FitStats,
    *,
    future: EvalFuture,
) -> list[ExperienceEval]:
    """Evaluate the first :func:`~medcl.engine.evaluate.num_scored` experiences; add the
    accuracy rows (NaN for the experiences not scored), the fit record, seen tasks, curves."""
    n = num_scored(exp.index, len(scenario), future)
    # fp32 always: the accuracy matrix, predictions and report must not depend on the device
    evals = evaluate(strategy, scenario.experiences[:n])  # the cache's batch: eval.batch_size
    unscored = [float("nan")] * (len(scenario) - n)
    state.accuracy.append([e.accuracy for e in evals] + unscored)
    state.task_accuracy.append([e.task_accuracy for e in evals] + unscored)
    state.fit.append(
        {
            "experience": exp.index,
            "updates": stats.updates,
            "epochs": stats.epochs,  # run; best_epoch: the weights kept (early stopping)
            "best_epoch": stats.best_epoch,
            "val_scores": list(stats.val_scores),
            "seconds": stats.seconds,
            "images_per_s": stats.images_per_s,
            # first / highest / last update's loss: a highest far above the first is divergence
            "loss": {"first": stats.loss_first, "max": stats.loss_max, "last": stats.loss_last},
            "diagnostics": strategy.diagnostics(),  # method-specific (e.g. DynaMMo's adapters)
        }
    )
    state.seen = [i.to_dict() for i in strategy.seen]
    state.curves = monitor.rows
    return evals


@contextlib.contextmanager
def _scoring_layout(cfg: RunConfig, scenario: Scenario, strategy: Strategy) -> Iterator[None]:
    """Score (test sets, calibration) in the layout the run trains in (``train.channels_last``),
    then contiguous: what checkpoints, latency and exports use. A calibration refitted from a
    checkpoint reproduces the record exactly in the run's layout."""
    dims = scenario.experiences[0].train.spatial_dims
    use_layout(strategy, cfg.train.channels_last, dims)
    try:
        yield
    finally:
        use_layout(strategy, False, dims)


def _checkpoint(
    run_dir: Path, strategy: Strategy, memory: ReplayMemory, state: RunState, exp: Experience
) -> None:
    """Save strategy, memory and state after ``exp``, then point ``latest.json`` at them."""
    files = RunLayout(run_dir)
    save_checkpoint(
        files.checkpoint(exp.index),
        strategy=strategy.state_dict(),
        memory=memory.state_dict(),
        state=state.to_json(),
    )
    pointer = {"checkpoint": checkpoint_name(exp.index), "completed": exp.index}
    atomic_write_text(files.latest, json.dumps(pointer))


def _record_scenario(run_dir: Path, scenario: Scenario) -> None:
    """Rewrite ``scenario.json`` when ``medcl update`` added a cohort to the scenario."""
    described = json.dumps(scenario.describe(), indent=1)
    path = RunLayout(run_dir).scenario
    if path.read_text() != described:
        atomic_write_text(path, described)


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
