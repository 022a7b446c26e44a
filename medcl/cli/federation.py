"""``medcl federate``: train one model across sites that keep their images (Flower)."""

from __future__ import annotations

__all__ = ["federate_cmd"]

import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from medcl.cli.common import Quiet, engine_imports, verbosity


def federate_cmd(
    config: Annotated[
        Path, typer.Argument(help="YAML config with a `federation` section (see configs/).")
    ],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue after the server's last completed round.")
    ] = False,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: federation.rounds=3")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Federated continual learning: a SuperLink and a SuperNode per site (Flower), each site's
    data, memory and report staying in its own run directory."""
    from medcl.config import load_config

    verbosity(quiet)
    cfg = load_config(config, overrides or [])  # a config mistake is refused before torch loads
    with engine_imports():
        from medcl.federated.launch import check_federation, federate

    check_federation(cfg, resume=resume)
    # SIGTERM as an exit, so that the Flower processes started here are stopped with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_dir = federate(cfg, resume=resume, quiet=quiet)
    record = json.loads((run_dir / "federation.json").read_text())
    final = [a for a in record["accuracy_matrix"][-1] if a is not None]
    typer.echo(f"results: {run_dir}")
    if final:
        mean = sum(final) / len(final)
        typer.echo(
            f"  accuracy (pooled over sites, mean over experiences)={mean:.3f}, "
            f"bytes per training round={record['bytes_per_train_round']:.0f}"
        )
    for name in record["sites"]:
        typer.echo(f"report ({name}): {run_dir / 'sites' / name / 'report.html'}")
