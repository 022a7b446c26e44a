"""The ``medcl`` command line. Each command is a thin shell over the library API.

Errors raised on purpose (:class:`medcl.errors.MedclError`) and usage errors (unknown command
or option, missing argument, bad value) are printed as one clear line and exit with code 2;
a file-system refusal (permission, read-only disk) too. No user mistake shows a traceback.
Nothing here reads ``sys.argv`` except :func:`main`. See docs/errors.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Literal

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


def _verbosity(quiet: bool) -> None:
    """Library messages (``logging``, e.g. the class list inferred from a manifest) on stderr."""
    log = logging.getLogger("medcl")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


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
    from medcl.engine.distributed import is_main_process
    from medcl.engine.run import check_run, run

    _verbosity(quiet)
    cfg = load_config(config, overrides or [])
    if nproc > 1:  # refuse what would fail in every process, then hand over to torchrun
        check_run(cfg, resume=resume, resume_from=resume_from, world_size=nproc)
        args = ["run", str(config), *(["--resume"] if resume else [])]
        args += ["--resume-from", str(resume_from)] if resume_from is not None else []
        args += [a for item in overrides or [] for a in ("--set", item)]
        args += ["--report" if report else "--no-report", *(["--quiet"] if quiet else [])]
        _exec_torchrun(nproc, args)
    run_dir = run(cfg, resume=resume, resume_from=resume_from, quiet=quiet)
    if is_main_process():  # under torchrun, rank 0 reports
        _finish(run_dir, report=report, quiet=quiet)


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
    from medcl.engine.run import update

    _verbosity(quiet)
    criteria = None
    if gate is not None:  # a bad criteria file is refused before any training
        from medcl.gate import load_criteria

        criteria = load_criteria(gate)
    run_dir = update(run_dir, data, site=site, new_classes=new_classes, quiet=quiet)
    _finish(run_dir, report=report, quiet=quiet)
    if criteria is not None:
        _gate(run_dir, criteria, None)


def _gate(run_dir: Path, criteria, against: Path | None) -> None:
    """Run the gate, print PASS/FAIL per criterion; exit 1 on FAIL."""
    from medcl.gate import run_gate

    def num(v) -> str:
        return "n/a" if v is None or v != v else f"{v:.3f}"

    result = run_gate(run_dir, criteria, against=against)
    for r in result.table.itertuples():
        color = typer.colors.GREEN if r.decision == "PASS" else typer.colors.RED
        typer.secho(
            f"{r.decision}  {r.criterion} @ {r.group}: {num(r.estimate)} "
            f"[{num(r.ci_low)}, {num(r.ci_high)}] limit {r.limit:g}"
            + (f" ({r.note})" if r.note else ""),
            fg=color,
        )
    rec = result.record
    typer.echo(
        f"gate {result.decision}: {rec['n_pass']}/{rec['n_criteria']} criteria met against "
        f"{rec['deployed']}; "
        + ("deployed pointer moved" if result.decision == "PASS" else "deployed model unchanged")
    )
    if result.decision != "PASS":
        raise typer.Exit(code=1)


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
    experience: Experience = None,
    allow_partial: AllowPartial = False,
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
        experience=experience,
        allow_partial=allow_partial,
    )
    typer.echo(str(path) if quiet else f"report: {path}\ndata:   {path.with_suffix('.json')}")


# --- export / predict / gate / card (Deployment) ---------------------------------------------

ExportFormat = Literal["torchscript", "onnx", "safetensors", "bundle"]  # = export.FORMATS
Backend = Literal["torchscript", "onnx"]  # = export.predict.BACKENDS
Device = Literal["auto", "cpu", "cuda"]  # = engine.device.DEVICES


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="Export format.")] = "bundle",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output file (folder for bundle); default RUN_DIR/export/."),
    ] = None,
    experience: Experience = None,
    allow_partial: AllowPartial = False,
) -> None:
    """Export the run's deployable model (outputs checked against PyTorch to 1e-4)."""
    from medcl.export import export_run

    path = export_run(run_dir, fmt, out, experience=experience, allow_partial=allow_partial)
    typer.echo(str(path))


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
        Backend, typer.Option("--backend", help="Which file of a bundle runs.")
    ] = "torchscript",
    reject_ood: Annotated[
        bool,
        typer.Option(
            "--reject-ood", help="Leave inputs flagged out-of-distribution without a class."
        ),
    ] = False,
    device: Annotated[
        Device,
        typer.Option(
            "--device",
            help="auto (CUDA when available), cpu or cuda. ONNX uses ONNX Runtime's CUDA "
            "provider when onnxruntime-gpu is installed, else the CPU.",
        ),
    ] = "auto",
    amp: Annotated[
        bool,
        typer.Option(
            "--amp/--no-amp",
            help="bf16 autocast on a CUDA device that supports it (PyTorch/TorchScript; "
            "probabilities cast back to fp32). Off: the OOD threshold was fitted in fp32.",
        ),
    ] = False,
    experience: Experience = None,
    allow_partial: AllowPartial = False,
    quiet: Quiet = False,
) -> None:
    """Class probabilities per input file, with an `ood` flag and its reason per row; exit code
    1 when any file failed (its row says why)."""
    from medcl.export import load_predictor, predict_files

    predictor = load_predictor(
        model,
        backend=backend,
        experience=experience,
        allow_partial=allow_partial,
        device=device,
        amp=amp,
    )
    df = predict_files(
        predictor, inputs, batch_size=batch_size, progress=not quiet, reject_ood=reject_ood
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


@app.command("gate")
def gate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run holding the candidate (its final model).")],
    criteria: Annotated[Path, typer.Option("--criteria", help="Acceptance criteria YAML.")],
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            help="Run holding the deployed model (default: RUN_DIR's deployed.json, else its "
            "previous model).",
        ),
    ] = None,
) -> None:
    """Check a candidate model against the deployed one (paired bootstrap); PASS moves the
    run's deployed pointer, FAIL exits 1 and leaves it."""
    from medcl.gate import load_criteria

    _gate(run_dir, load_criteria(criteria), against)


@app.command("card")
def card_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with report.json.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Default RUN_DIR/model_card.md.")
    ] = None,
) -> None:
    """Write the model card (Markdown) generated from the run's report.json."""
    from medcl.card import write_card

    typer.echo(str(write_card(run_dir, out)))


def _usage_error_types() -> tuple[type[Exception], ...]:
    """Usage-error classes: typer >= 0.2x bundles its own click (``typer._click``), whose
    exceptions derive from ``typer.TyperException`` and not from an installed ``click``."""
    types: list[type[Exception]] = [typer.TyperException]
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

        if e.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        typer.secho(
            f"error: cannot write {e.filename or ''}: {e.strerror}. Free space or choose "
            "another folder; the run can be continued with --resume.",
            fg=typer.colors.RED,
            err=True,
        )
        return 2
    return rc if isinstance(rc, int) else 0  # click returns typer.Exit's code here


if __name__ == "__main__":
    raise SystemExit(main())
