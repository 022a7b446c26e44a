"""``medcl update``: add one experience (a new cohort) to a finished run, keeping what it learned.

The run is rebuilt at its final model (:func:`medcl.engine.resume.restore_run`), the cohort's
classes are matched to the run's by name (:mod:`medcl.engine.cohort`) and the new experience is
learned like any other (:func:`medcl.engine.run.learn_experience`).
"""

from __future__ import annotations

__all__ = ["update"]

import contextlib
from pathlib import Path

from medcl.engine.artifacts import append_environment, start_fields
from medcl.engine.cohort import extend_scenario
from medcl.engine.distributed import SINGLE
from medcl.engine.layout import RunLayout
from medcl.engine.loggers import create_logger
from medcl.engine.model_record import data_facts
from medcl.engine.resume import restore_run
from medcl.engine.run import curve_monitor, learn_experience
from medcl.engine.rundir import RunLock, run_progress
from medcl.engine.threads import first_environment, resolve_threads, use_threads
from medcl.errors import ConfigError
from medcl.progress import show_progress


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
    files = RunLayout(run_dir)
    if not files.latest.is_file():
        raise ConfigError(
            f"{run_dir} is not a medcl run with a checkpoint (no "
            "checkpoints/latest.json); give the directory `medcl run` printed."
        )
    with RunLock(run_dir), contextlib.ExitStack() as threads:
        progress = run_progress(run_dir)
        if not progress.finished:
            raise ConfigError(
                f"{run_dir} is unfinished: it {progress.describe()}. `medcl update` adds a "
                "cohort after the whole stream; finish the run first with "
                f"`medcl run {files.config} --resume`."
            )
        cfg, scenario, strategy, memory, state = restore_run(run_dir, command="medcl update")
        # the run's threads: `auto` keeps the first start's count, as a resume does
        choice = resolve_threads(cfg.train.num_threads, recorded=first_environment(run_dir))
        threads.enter_context(use_threads(choice.threads))
        scenario = extend_scenario(scenario, data, site, cfg=cfg, new_classes=new_classes)
        if not quiet:
            exp = scenario[-1]
            print(
                f"cohort {exp.name}: classes "
                + ", ".join(f"{scenario.class_names[c]!r} ({c})" for c in exp.classes)
            )
        append_environment(run_dir, start_fields(cfg, "update", state.completed, SINGLE))
        cohort = {"data": data, "site": site, "new_classes": new_classes}
        state.extra_experiences.append(cohort | {"scenario": data_facts(scenario)})
        memory.attach(scenario.experiences)
        for row in state.accuracy:  # earlier rows had no entry for the new experience
            row.append(float("nan"))
        for row in state.task_accuracy:
            row.append(float("nan"))
        state.baseline.append(float("nan"))  # FWT is undefined for a cohort added afterwards
        monitor = curve_monitor(cfg, scenario, state)
        logger = create_logger(cfg.logging, run_dir, run_name=cfg.run_name)
        try:
            with show_progress(not quiet):
                learn_experience(
                    run_dir, cfg, scenario, strategy, memory, state, monitor, scenario[-1],
                    quiet=quiet, logger=logger,
                )  # fmt: skip
        finally:
            logger.close()
    return run_dir
