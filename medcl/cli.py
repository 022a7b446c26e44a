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

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Continual learning for medical images."
)
datasets_app = typer.Typer(no_args_is_help=True, help="Inspect and verify data sources.")
scenarios_app = typer.Typer(no_args_is_help=True, help="List and describe built-in scenarios.")
strategies_app = typer.Typer(no_args_is_help=True, help="List continual-learning strategies.")
app.add_typer(datasets_app, name="datasets")
app.add_typer(scenarios_app, name="scenarios")
app.add_typer(strategies_app, name="strategies")

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or chatter.")]
Root = Annotated[
    Path | None,
    typer.Option("--root", help="MedMNIST data root (else $MEDCL_DATA_ROOT, else ~/.medmnist)."),
]


# --- datasets / scenarios (Foundation) -------------------------------------------------------


def _console():  # rich is imported lazily: `medcl --help` stays fast
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=120)


@datasets_app.command("check")
def datasets_check(root: Root = None) -> None:
    """Verify the MedMNIST files in the data root (MD5 against medmnist.INFO); exit 2 if one fails."""
    import os

    from rich.table import Table

    from medcl.data.medmnist_source import ENV_VAR, check_medmnist, resolve_data_root
    from medcl.errors import DataError

    folder = resolve_data_root(root)
    how = (
        "--root"
        if root is not None
        else f"${ENV_VAR}"
        if os.environ.get(ENV_VAR)
        else "medmnist default"
    )
    df = check_medmnist(root)
    console = _console()
    console.print(f"data root: {folder} (from {how})")
    if df.empty:
        console.print(
            f"no MedMNIST files found in {folder}. Put the .npz files there, point ${ENV_VAR} or "
            "--root at the folder that holds them, or load with download: true."
        )
        return
    table = Table("dataset", "size", "file", "dims", "task", "classes", "train / val / test", "MD5")
    for r in df.itertuples():
        table.add_row(
            r.flag,
            str(r.size),
            Path(r.file).name,
            r.dims,
            r.task,
            str(r.n_classes),
            f"{r.n_train} / {r.n_val} / {r.n_test}",
            "[green]verified[/]" if r.verified else f"[red]{r.md5_ok}[/]",
        )
    console.print(table)
    bad = df[~df["verified"].astype(bool)]
    if len(bad):  # a MedclError: main() prints it and exits 2
        raise DataError(
            f"{len(bad)} of {len(df)} MedMNIST file(s) failed MD5 verification: "
            + "; ".join(f"{f} ({why})" for f, why in zip(bad["file"], bad["md5_ok"], strict=True))
            + ". Delete them and download again (download: true) or replace them with the official files."
        )
    console.print(f"{len(df)} file(s) present, all verified.")


@scenarios_app.command("list")
def scenarios_list(
    pattern: Annotated[str, typer.Argument(help="Glob over names, e.g. '*sites*'.")] = "*",
) -> None:
    """List registered scenarios with a one-line description."""
    from rich.table import Table

    from medcl.data.scenarios import list_scenarios, scenario_description

    table = Table("scenario", "description")
    for name in list_scenarios(pattern):
        table.add_row(name, scenario_description(name))
    _console().print(table)


def _parse_params(items: list[str]) -> dict[str, object]:
    """``["order=[0,1,2]", "n_sites=3"]`` -> ``{"order": [0, 1, 2], "n_sites": 3}`` (YAML values)."""
    import yaml

    from medcl.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param must look like KEY=VALUE (e.g. n_sites=3); got {item!r}.")
        out[key.strip()] = yaml.safe_load(value)
    return out


@scenarios_app.command("show")
def scenarios_show(
    name: Annotated[str, typer.Argument(help="Registered scenario (see `medcl scenarios list`).")],
    root: Root = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed fixing orders, sites and shifts.")] = 0,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", help="Scenario parameter KEY=VALUE (YAML value), repeatable."
        ),
    ] = None,
    download: Annotated[
        bool, typer.Option("--download", help="Fetch missing MedMNIST files.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    """Build a scenario and describe its experiences: classes, class names, site, split sizes."""
    import json

    from rich.table import Table

    from medcl.data.scenarios import build_scenario

    scenario = build_scenario(
        name, root=root, download=download, seed=seed, **_parse_params(param or [])
    )
    if as_json:
        typer.echo(json.dumps(scenario.describe() | {"sources": list(scenario.sources)}, indent=2))
        return
    console = _console()
    console.print(
        f"[bold]{scenario.name}[/] (kind {scenario.kind}, seed {scenario.seed}): "
        f"{len(scenario)} experiences, {scenario.num_classes} classes, input "
        f"{tuple(scenario.input_shape)}"
    )
    table = Table(
        "#", "experience", "site", "task", "classes", "class names", "train", "val", "test"
    )
    for e in scenario:
        table.add_row(
            str(e.index),
            e.name,
            e.site,
            str(e.task_id),
            ", ".join(map(str, e.classes)),
            "; ".join(scenario.class_names[c] for c in e.classes),
            str(len(e.train)),
            str(len(e.val)),
            str(len(e.test)),
        )
    console.print(table)
    for src in scenario.sources:
        console.print(f"source {src.get('dataset', '?')}: licence {src.get('licence', 'unknown')}")
        for site in filter(None, src.get("sites", "").split("; ")):
            console.print(f"  simulated {site}")


# --- strategies / run / update (Engine) -----------------------------------------------------


@strategies_app.command("list")
def strategies_list(
    pattern: Annotated[str, typer.Argument(help="glob, e.g. '*replay*'")] = "*",
) -> None:
    """List registered strategies with their hyper-parameters and defaults."""
    from medcl.strategies import STRATEGIES
    from medcl.strategies.base import strategy_params

    for name in STRATEGIES.list(pattern):
        cls = STRATEGIES.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        params = ", ".join(f"{k}={v!r}" for k, v in strategy_params(name).items())
        typer.echo(f"{name:<12} {doc}")
        if params:
            typer.echo(f"{'':<12} options: {params}")


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="YAML experiment config (see configs/).")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue after the last completed experience.")
    ] = False,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: train.epochs=2")
    ] = None,
    report: Annotated[bool, typer.Option(help="Write the clinical report at the end.")] = True,
    quiet: Quiet = False,
) -> None:
    """Train a continual-learning stream end to end and write a run directory."""
    from medcl.config import load_config
    from medcl.engine.run import run

    cfg = load_config(config, overrides or [])
    run_dir = run(cfg, resume=resume, quiet=quiet)
    _finish(run_dir, report=report, quiet=quiet)


@app.command("update")
def update_cmd(
    run_dir: Annotated[Path, typer.Argument(help="An existing run directory.")],
    data: Annotated[
        str,
        typer.Option("--data", help="New cohort: MedMNIST flag, CSV manifest or class folders."),
    ],
    site: Annotated[
        str | None, typer.Option("--site", help="Site/cohort name of the new data.")
    ] = None,
    report: Annotated[bool, typer.Option(help="Rewrite the clinical report.")] = True,
    quiet: Quiet = False,
) -> None:
    """Add one experience (a new cohort) to a run, keeping what it learned; re-evaluate all."""
    from medcl.engine.run import update

    _finish(update(run_dir, data, site=site, quiet=quiet), report=report, quiet=quiet)


def _finish(run_dir: Path, *, report: bool, quiet: bool) -> None:
    """Print the summary and where the results (and report) are."""
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = metrics.get("summary", {})
    typer.echo(f"results: {run_dir}")
    if not quiet and summary:
        typer.echo(
            "  " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items() if isinstance(v, float))
        )
    if report:
        from medcl.reports import write_report

        typer.echo(f"report: {write_report(run_dir)}")


@app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (what `medcl run` printed).")],
    compare: Annotated[
        Path | None,
        typer.Option(
            "--compare", help="Another run of the same scenario to compare the final model with."
        ),
    ] = None,
    resamples: Annotated[
        int, typer.Option("--resamples", help="Bootstrap resamples per CI.")
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    alpha: Annotated[float, typer.Option("--alpha", help="1 - CI level (0.05: 95% CIs).")] = 0.05,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Binary only: predict positive when p1 >= threshold (default arg-max).",
        ),
    ] = None,
    bins: Annotated[int, typer.Option("--bins", help="Confidence bins for ECE/MCE.")] = 15,
    errors: Annotated[
        int, typer.Option("--errors-per-class", help="Confident errors shown per class.")
    ] = 4,
    safe_id_column: Annotated[
        list[str] | None,
        typer.Option(
            "--safe-id-column",
            help="Per-row column free of patient identifiers to show (repeatable).",
        ),
    ] = None,
    thumbnails: Annotated[
        bool,
        typer.Option(help="Reload the data for error thumbnails, train/val counts and sources."),
    ] = True,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: RUN_DIR).")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Write the clinical evaluation report (report.html + report.json) of a run."""
    from medcl.reports import write_report

    path = write_report(
        run_dir,
        compare,
        n_resamples=resamples,
        seed=seed,
        out_dir=out,
        alpha=alpha,
        threshold=threshold,
        n_bins=bins,
        errors_per_class=errors,
        safe_id_columns=safe_id_column or (),
        thumbnails=thumbnails,
    )
    typer.echo(str(path) if quiet else f"report: {path}\ndata:   {path.with_suffix('.json')}")


# --- export / predict (Deployment) ---------------------------------------------------------


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="torchscript | onnx | safetensors | bundle")
    ] = "bundle",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output file (folder for bundle); default RUN_DIR/export/."),
    ] = None,
) -> None:
    """Export the run's deployable model (outputs checked against PyTorch to 1e-4)."""
    from medcl.export import export_run

    typer.echo(str(export_run(run_dir, fmt, out)))


@app.command("predict")
def predict_cmd(
    model: Annotated[
        Path, typer.Argument(help="Run dir, bundle folder, or .ts/.onnx/.safetensors.")
    ],
    inputs: Annotated[
        list[Path], typer.Argument(help="Image files/folders, DICOM series, NIfTI, CSV manifests.")
    ],
    out: Annotated[Path | None, typer.Option("--out", help="Write the rows as CSV here.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    backend: Annotated[
        str, typer.Option("--backend", help="For bundles: torchscript | onnx.")
    ] = "torchscript",
    quiet: Quiet = False,
) -> None:
    """Class probabilities per input file; exit code 1 when any file failed (its row says why)."""
    from medcl.export import load_predictor, predict_files

    df = predict_files(
        load_predictor(model, backend=backend), inputs, batch_size=batch_size, progress=not quiet
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
    if out is None or not quiet:
        typer.echo(df.to_csv(index=False) if out is None else f"predictions: {out}")
    bad = df[df["status"] == "error"]
    for row in bad.itertuples():
        typer.secho(f"error: {row.input}: {row.error}", fg=typer.colors.RED, err=True)
    if len(bad):
        raise typer.Exit(code=1)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning medcl errors into a message and exit code 2."""
    try:
        rc = app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
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
    return rc if isinstance(rc, int) else 0  # click returns typer.Exit's code here


if __name__ == "__main__":
    raise SystemExit(main())
