"""What every ``medcl`` command shares: option types, logging set-up and the console."""

from __future__ import annotations

__all__ = [
    "AllowPartial",
    "Experience",
    "Quiet",
    "Root",
    "console",
    "engine_imports",
    "verbosity",
]

import gc
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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

#: True in the ``medcl`` executable (:func:`medcl.cli.entry_point`), whose process ends with
#: the command; in-process callers (tests, notebooks) keep their collector as it is.
EXECUTABLE = False


@contextmanager
def engine_imports() -> Iterator[None]:
    """Import the engine with CPython's cyclic collector paused, then freeze what is alive
    (``gc.freeze``), in the ``medcl`` executable only.

    torch, timm and MONAI leave about a million objects that live as long as the process; the
    collector re-scans them on every full collection while they are imported and after: about
    1 s of a run's start-up on 2 cores (``benchmarks/end_to_end.py``). Frozen objects are never
    collected, which is what they would be anyway (modules).
    """
    paused = EXECUTABLE and gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.freeze()
            gc.enable()


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
