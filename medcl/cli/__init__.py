"""The ``medcl`` command line. Each command is a thin shell over the library API.

The commands live by what they do: :mod:`~medcl.cli.catalog` (``datasets``, ``scenarios``,
``strategies``), :mod:`~medcl.cli.training` (``run``, ``update``), :mod:`~medcl.cli.federation` (``federate``),
:mod:`~medcl.cli.evaluation` (``report``, ``gate``, ``card``) and
:mod:`~medcl.cli.deployment` (``export``, ``predict``); this module puts them on one Typer app
and holds :func:`main`. Heavy libraries (torch, rich) are imported inside the commands, so
``medcl --help`` stays fast and a config mistake is refused before torch loads.

Errors raised on purpose (:class:`medcl.errors.MedclError`) and usage errors (unknown command
or option, missing argument, bad value) are printed as one clear line and exit with code 2;
a file-system refusal (permission, read-only disk) too. No user mistake shows a traceback.
Nothing here reads ``sys.argv`` except :func:`main`. See docs/errors.md.
"""

from __future__ import annotations

__all__ = ["Backend", "Device", "ExportFormat", "app", "entry_point", "main"]

import gc
import sys
from typing import Annotated

import typer

from medcl.cli import catalog, common, deployment, evaluation, federation, training
from medcl.cli.deployment import Backend, Device, ExportFormat
from medcl.errors import MedclError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Continual learning for medical images."
)
datasets_app = typer.Typer(no_args_is_help=True, help="Inspect and verify data sources.")
scenarios_app = typer.Typer(no_args_is_help=True, help="List and describe built-in scenarios.")
strategies_app = typer.Typer(no_args_is_help=True, help="List continual-learning strategies.")
app.add_typer(datasets_app, name="datasets")
app.add_typer(scenarios_app, name="scenarios")
app.add_typer(strategies_app, name="strategies")

# the order here is the order of `medcl --help` and of docs/reference/cli.md
app.command("run")(training.run_cmd)
app.command("update")(training.update_cmd)
app.command("federate")(federation.federate_cmd)
app.command("report")(evaluation.report_cmd)
app.command("export")(deployment.export_cmd)
app.command("predict")(deployment.predict_cmd)
app.command("gate")(evaluation.gate_cmd)
app.command("card")(evaluation.card_cmd)
datasets_app.command("check")(catalog.datasets_check)
scenarios_app.command("list")(catalog.scenarios_list)
scenarios_app.command("show")(catalog.scenarios_show)
strategies_app.command("list")(catalog.strategies_list)


def _version(value: bool) -> None:
    if value:
        import medcl

        typer.echo(f"medcl {medcl.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Continual learning for medical images."""


def _usage_error_types() -> tuple[type[Exception], ...]:
    """Usage-error classes: typer >= 0.2x bundles its own click (``typer._click``), whose
    exceptions derive from ``typer.TyperException`` and not from an installed ``click``."""
    types: list[type[Exception]] = []
    if hasattr(typer, "TyperException"):  # typer < 0.2x (e.g. beside Flower) uses click's
        types.append(typer.TyperException)
    try:
        import click

        types.append(click.ClickException)
    except ImportError:  # pragma: no cover - typer without a separate click
        pass
    return tuple(types)


def _show_usage_error(e: Exception) -> int:
    """One line on stderr for a usage error (the full help only for a bare ``medcl``)."""
    ctx = getattr(e, "ctx", None)
    command = getattr(ctx, "command_path", None) or "medcl"
    if type(e).__name__ == "NoArgsIsHelpError":  # `medcl` / `medcl datasets` alone: the help
        if e.format_message().strip():  # (typer's rich help is printed already)
            typer.echo(e.format_message(), err=True)
        return 2
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    message = " ".join(message.split())
    typer.secho(f"error: {message} (see `{command} --help`)", fg=typer.colors.RED, err=True)
    return int(getattr(e, "exit_code", 2) or 2)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app; user errors become one message and exit code 2.

    * :class:`~medcl.errors.MedclError` (bad config, data, run directory): its message.
    * usage errors (unknown command/option, missing argument, bad value): one line naming the
      problem and ``--help``.
    * a file system that refuses a write or read (permission, read-only, not a folder): the
      path and the reason.
    """
    try:
        args = argv if argv is not None else sys.argv[1:]
        rc = app(args=args, prog_name="medcl", standalone_mode=False)
    except MedclError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.secho("aborted.", fg=typer.colors.RED, err=True)
        return 130
    except _usage_error_types() as e:
        return _show_usage_error(e)
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        where = f" {e.filename}" if e.filename else ""
        typer.secho(
            f"error: cannot use{where}: {e.strerror or e}. Check the path and its permissions.",
            fg=typer.colors.RED,
            err=True,
        )
        return 2
    except OSError as e:
        import errno

        if e.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        typer.secho(
            f"error: cannot write {e.filename or ''}: {e.strerror}. Free space or choose "
            "another folder; the run can be continued with --resume.",
            fg=typer.colors.RED,
            err=True,
        )
        return 2
    return rc if isinstance(rc, int) else 0  # click returns typer.Exit's code here


def entry_point() -> int:
    """The ``medcl`` executable (``[project.scripts]``, ``python -m medcl``): :func:`main` in a
    process that ends with the command.

    The engine's imports are frozen for the collector (:func:`medcl.cli.common.engine_imports`),
    and so is everything else once the command returns: the interpreter's exit then skips a
    last scan of every object (about 1.3 s of a run's wall on 2 cores). Every file the command
    wrote is closed by then; the operating system frees the memory.
    """
    common.EXECUTABLE = True
    try:
        return main()
    finally:
        gc.freeze()
