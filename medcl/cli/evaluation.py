"""``medcl report``, ``medcl gate`` and ``medcl card``: judge and document a trained run."""

from __future__ import annotations

__all__ = ["card_cmd", "gate_cmd", "gate_run", "report_cmd"]

from pathlib import Path
from typing import Annotated

import typer

from medcl.cli.common import AllowPartial, Experience, Quiet, engine_imports


def report_cmd(
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
    saliency: Annotated[
        bool,
        typer.Option(help="Grad-CAM maps of the confident errors per site (needs thumbnails)."),
    ] = True,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: RUN_DIR).")
    ] = None,
    experience: Experience = None,
    allow_partial: AllowPartial = False,
    quiet: Quiet = False,
) -> None:
    """Write the clinical evaluation report (report.html + report.json) of a run."""
    with engine_imports():
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
        saliency=saliency,
        experience=experience,
        allow_partial=allow_partial,
    )
    typer.echo(str(path) if quiet else f"report: {path}\ndata:   {path.with_suffix('.json')}")


def gate_run(run_dir: Path, criteria, against: Path | None) -> None:
    """Run the gate, print PASS/FAIL per criterion; exit 1 on FAIL."""
    with engine_imports():
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

    gate_run(run_dir, load_criteria(criteria), against)


def card_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with report.json.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Default RUN_DIR/model_card.md.")
    ] = None,
) -> None:
    """Write the model card (Markdown) generated from the run's report.json."""
    with engine_imports():
        from medcl.export.run_export import run_bundle_metadata
        from medcl.reports.card import write_card

    meta = run_bundle_metadata(run_dir)  # the OOD guard and training facts, once exported
    typer.echo(str(write_card(run_dir, out, meta=meta)))
