"""The ``medcl`` command line. Each command is a thin shell over the library API.

Errors raised on purpose (:class:`medcl.errors.MedclError`) are printed as one clear message and
exit with code 2; nothing here reads ``sys.argv`` except :func:`main`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from medcl.errors import MedclError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continual learning for medical images.")
datasets_app = typer.Typer(no_args_is_help=True, help="Inspect and verify data sources.")
scenarios_app = typer.Typer(no_args_is_help=True, help="List and describe built-in scenarios.")
strategies_app = typer.Typer(no_args_is_help=True, help="List continual-learning strategies.")
app.add_typer(datasets_app, name="datasets")
app.add_typer(scenarios_app, name="scenarios")
app.add_typer(strategies_app, name="strategies")

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or chatter.")]
Root = Annotated[Path | None, typer.Option("--root", help="MedMNIST data root (else $MEDCL_DATA_ROOT, else ~/.medmnist).")]


# --- datasets / scenarios (Foundation) -------------------------------------------------------


# --- strategies / run / update (Engine) -----------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning medcl errors into a message and exit code 2."""
    try:
        app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
    except MedclError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        return 1
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
