"""``medcl export`` and ``medcl predict``: ship a run's model and run it on new images."""

from __future__ import annotations

__all__ = ["Backend", "Device", "ExportFormat", "export_cmd", "predict_cmd"]

from pathlib import Path
from typing import Annotated, Literal

import typer

from medcl.cli.common import AllowPartial, Experience, Quiet, engine_imports

ExportFormat = Literal["torchscript", "onnx", "safetensors", "bundle"]  # = export.FORMATS
Backend = Literal["torchscript", "onnx"]  # = export.predict.BACKENDS
Device = Literal["auto", "cpu", "cuda"]  # = engine.device.DEVICES


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
    with engine_imports():
        from medcl.export import export_run

    path = export_run(run_dir, fmt, out, experience=experience, allow_partial=allow_partial)
    typer.echo(str(path))


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
    site: Annotated[
        str | None,
        typer.Option(
            "--site",
            help="Site (experience name) the inputs come from: selects its conformal threshold "
            "for prediction_set. Default: the threshold that covers every calibrated site.",
        ),
    ] = None,
    saliency: Annotated[
        Path | None,
        typer.Option(
            "--saliency",
            help="Write a Grad-CAM overlay PNG per input into this folder (the predicted "
            "class; needs the run directory or a .safetensors export).",
        ),
    ] = None,
    experience: Experience = None,
    allow_partial: AllowPartial = False,
    quiet: Quiet = False,
) -> None:
    """Class probabilities per input file (calibrated), the conformal prediction set and its size
    when the model has one, an `ood` flag and its reason per row; exit code 1 when any file
    failed (its row says why)."""
    with engine_imports():
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
        predictor,
        inputs,
        batch_size=batch_size,
        progress=not quiet,
        reject_ood=reject_ood,
        site=site,
        saliency=saliency,
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
