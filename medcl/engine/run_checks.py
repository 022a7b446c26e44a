"""What :func:`medcl.engine.run.run` refuses before it trains, checked without writing anything."""

from __future__ import annotations

__all__ = ["check_run"]

from pathlib import Path

from medcl.config import RunConfig, config_changes, read_yaml
from medcl.engine.distributed import check_strategy
from medcl.engine.layout import RunLayout
from medcl.engine.loggers import check_logging
from medcl.engine.rundir import check_output_dir, run_progress
from medcl.errors import ConfigError


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
    files = RunLayout(run_dir)
    resume = resume or resume_from is not None
    if cfg.federation is not None:
        raise ConfigError(
            "the config has a `federation` section: train it across sites with `medcl federate "
            "CONFIG`, or remove the section to train here with `medcl run`."
        )
    check_output_dir(cfg.output_dir)
    check_strategy(cfg.strategy.name, world_size)
    if world_size > 1 and cfg.train.early_stopping_patience is not None:
        raise ConfigError(
            "train.early_stopping_patience is not supported with several processes (each "
            "rank's BatchNorm statistics differ until the experience ends, so ranks could "
            "disagree on when to stop); remove it or run in one process."
        )
    check_logging(cfg.logging)
    if resume_from is not None and not files.checkpoint(resume_from).is_dir():
        have = list(run_progress(run_dir).checkpoints) if files.scenario.is_file() else []
        raise ConfigError(
            f"--resume-from {resume_from}: {run_dir} has no checkpoint for experience "
            f"{resume_from} (checkpoints: {have or 'none'}); choose one of them or use --resume."
        )
    if run_dir.exists() and files.config.exists():
        if not resume:
            raise ConfigError(
                f"run directory {run_dir} already exists; pass --resume to continue it, "
                "or choose another `name` (--set name=...) to start a new run."
            )
        # a run by an earlier medcl lacks keys added since: their defaults change nothing
        saved = files.config
        changes = config_changes(read_yaml(saved, what="run config"), cfg)
        if changes:
            more = f" (and {len(changes) - 10} more)" if len(changes) > 10 else ""
            raise ConfigError(
                f"--resume: the config differs from the one {run_dir} was started with "
                f"({saved}): {'; '.join(changes[:10])}{more}. Resume with the original config "
                f"(`medcl run {saved} --resume`), or start a new run with this one under "
                "another name (--set name=NEW_NAME)."
            )
