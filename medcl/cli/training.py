"""``medcl run`` and ``medcl update``: train a stream, or add a cohort to a trained run."""

from __future__ import annotations

__all__ = ["finish", "run_cmd", "update_cmd"]

import sys
from pathlib import Path
from typing import Annotated

import typer

from medcl.cli.common import Quiet, engine_imports, verbosity
from medcl.cli.evaluation import gate_run
from medcl.engine.layout import RunLayout


def run_cmd(
    config: Annotated[Path, typer.Argument(help="YAML experiment config (see configs/).")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue after the last completed experience.")
    ] = False,
    resume_from: Annotated[
        int | None,
        typer.Option(
            "--resume-from",
            help="Continue after experience K (e.g. when the latest checkpoint is damaged).",
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: train.epochs=2")
    ] = None,
    report: Annotated[bool, typer.Option(help="Write the clinical report at the end.")] = True,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Train with N processes on this machine (DDP): execs `torchrun "
            "--standalone --nproc-per-node N -m medcl run ...`. train.batch_size is global.",
        ),
    ] = 1,
    quiet: Quiet = False,
) -> None:
    """Train a continual-learning stream end to end and write a run directory."""
    from medcl.config import load_config

    verbosity(quiet)
    cfg = load_config(config, overrides or [])  # a config mistake is refused before torch loads
    with engine_imports():
        from medcl.engine.distributed import is_main_process
        from medcl.engine.run import check_run, run

    if nproc > 1:  # refuse what would fail in every process, then hand over to torchrun
        check_run(cfg, resume=resume, resume_from=resume_from, world_size=nproc)
        args = ["run", str(config), *(["--resume"] if resume else [])]
        args += ["--resume-from", str(resume_from)] if resume_from is not None else []
        args += [a for item in overrides or [] for a in ("--set", item)]
        args += ["--report" if report else "--no-report", *(["--quiet"] if quiet else [])]
        _exec_torchrun(nproc, args)
    run_dir = run(cfg, resume=resume, resume_from=resume_from, quiet=quiet)
    if is_main_process():  # under torchrun, rank 0 reports
        finish(run_dir, report=report, quiet=quiet)


def _exec_torchrun(nproc: int, args: list[str]) -> None:
    """Replace this process with torchrun running ``medcl ARGS`` in ``nproc`` processes."""
    import os

    from medcl.engine.distributed import env_world_size, torchrun_argv
    from medcl.errors import ConfigError

    if env_world_size() > 1:
        raise ConfigError(
            "--nproc was given inside a torchrun job (WORLD_SIZE is set); either launch with "
            "torchrun or use --nproc, not both."
        )
    argv = torchrun_argv(nproc, args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


def update_cmd(
    run_dir: Annotated[Path, typer.Argument(help="An existing run directory.")],
    data: Annotated[
        str,
        typer.Option("--data", help="New cohort: MedMNIST flag, CSV manifest or class folders."),
    ],
    site: Annotated[
        str | None, typer.Option("--site", help="Site/cohort name of the new data.")
    ] = None,
    new_classes: Annotated[
        bool,
        typer.Option(
            "--new-classes",
            help="Accept classes the run has not seen (the output layer grows).",
        ),
    ] = False,
    report: Annotated[bool, typer.Option(help="Rewrite the clinical report.")] = True,
    gate: Annotated[
        Path | None,
        typer.Option(
            "--gate",
            help="Acceptance criteria YAML: check the updated model against the deployed one; "
            "exit 1 on FAIL (the deployed pointer moves only on PASS).",
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Add one experience (a new cohort) to a run, keeping what it learned; re-evaluate all."""
    verbosity(quiet)
    criteria = None
    if gate is not None:  # a bad criteria file is refused before any training (and torch)
        from medcl.gate import load_criteria

        criteria = load_criteria(gate)
    with engine_imports():
        from medcl.engine.update import update

    run_dir = update(run_dir, data, site=site, new_classes=new_classes, quiet=quiet)
    finish(run_dir, report=report, quiet=quiet)
    if criteria is not None:
        gate_run(run_dir, criteria, None)


def finish(run_dir: Path, *, report: bool, quiet: bool) -> None:
    """Print the summary and where the results (and report) are."""
    import json

    metrics = json.loads(RunLayout(run_dir).metrics.read_text())
    summary = metrics.get("summary", {})
    typer.echo(f"results: {run_dir}")
    if not quiet and summary:
        typer.echo(
            "  " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items() if isinstance(v, float))
        )
    if report:
        import time

        from medcl.engine.artifacts import write_timing
        from medcl.progress import show_progress
        from medcl.reports import write_report

        start = time.perf_counter()
        with show_progress(not quiet):
            path = write_report(run_dir)
        write_timing(run_dir, report=round(time.perf_counter() - start, 4))  # metrics.json
        typer.echo(f"report: {path}")
