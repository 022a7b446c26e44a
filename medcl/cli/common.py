"""What every ``medcl`` command shares: option types, logging set-up and the console."""

from __future__ import annotations

__all__ = ["AllowPartial", "Experience", "Quiet", "Root", "console", "verbosity"]

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or chatter.")]
Experience = Annotated[
    int | None,
    typer.Option(
        "--experience", help="Use the model after experience K (default: the run's final model)."
    ),
]
AllowPartial = Annotated[
    bool,
    typer.Option(
        "--allow-partial",
        help="Accept an unfinished run: use its last completed experience.",
    ),
]
Root = Annotated[
    Path | None,
    typer.Option("--root", help="MedMNIST data root (else $MEDCL_DATA_ROOT, else ~/.medmnist)."),
]


def verbosity(quiet: bool) -> None:
    """Library messages (``logging``, e.g. the class list inferred from a manifest) on stderr."""
    log = logging.getLogger("medcl")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def console():  # rich is imported lazily: `medcl --help` stays fast
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=120)
