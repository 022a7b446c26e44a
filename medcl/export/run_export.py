"""``medcl export``: a run directory's model in one format, written where the run keeps exports.

The model is restored from the run directory alone (:func:`~medcl.export.loading.load_run_model`:
no data is loaded unless the OOD guard has never been fitted for it), wrapped with its guard and
written by :mod:`medcl.export.exporters` (TorchScript, ONNX, safetensors) or
:mod:`medcl.export.bundle` (MONAI bundle). Default outputs live in ``RUN_DIR/export/``.
"""

from __future__ import annotations

__all__ = ["FORMATS", "default_output", "export_run", "run_bundle_metadata"]

from pathlib import Path
from typing import Any

from medcl.engine.layout import RunLayout
from medcl.engine.rundir import select_experience
from medcl.errors import ConfigError
from medcl.export.bundle import write_bundle
from medcl.export.bundle_runtime import read_bundle_metadata
from medcl.export.exporters import export_onnx, export_safetensors, export_torchscript
from medcl.export.loading import guarded_module, load_run_model, run_metadata
from medcl.export.rebuild import rebuild_config

FORMATS = ("torchscript", "onnx", "safetensors", "bundle")
_SUFFIX = {"torchscript": "ts", "onnx": "onnx", "safetensors": "safetensors"}


def default_output(run_dir: str | Path, fmt: str) -> Path:
    """``RUN_DIR/export/model.<ts|onnx|safetensors>``, or ``RUN_DIR/export/bundle``."""
    name = "bundle" if fmt == "bundle" else f"model.{_SUFFIX.get(fmt)}"
    return RunLayout(run_dir).export / name


def run_bundle_metadata(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``medcl`` metadata of the run's bundle (:func:`default_output`), None without one."""
    bundle = default_output(run_dir, "bundle")
    if not (bundle / "configs" / "metadata.json").is_file():
        return None
    return read_bundle_metadata(bundle)


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    experience: int | None = None,
    allow_partial: bool = False,
) -> Path:
    """Export the deployable model of ``run_dir`` in ``fmt`` (one of :data:`FORMATS`).

    The metadata records which experience the model was taken after
    (``model_after_experience``). An unfinished run is an error unless ``experience`` or
    ``allow_partial`` says which model to export.

    Args:
        run_dir: a finished run directory.
        fmt: ``torchscript``, ``onnx``, ``safetensors`` or ``bundle``.
        out: output file (folder for ``bundle``); default :func:`default_output`.
        experience: export the model after this experience instead of the final one.
        allow_partial: for an unfinished run, export the last completed experience's model.

    Returns:
        The written file or bundle folder.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}.")
    run_dir = Path(run_dir)
    after = select_experience(
        run_dir, experience, allow_partial=allow_partial, command="medcl export"
    )
    model = load_run_model(run_dir, experience=after)
    meta = run_metadata(run_dir, model.data, model.strategy, experience=after)
    module = guarded_module(model, meta)
    out = Path(out) if out is not None else default_output(run_dir, fmt)
    if fmt == "torchscript":
        return export_torchscript(module, meta, out)
    if fmt == "onnx":
        return export_onnx(module, meta, out)
    config = rebuild_config(run_dir, scenario_kind=model.data.kind, seen=model.strategy.seen)
    if fmt == "bundle":
        return write_bundle(module, meta, config, out)
    return export_safetensors(module, meta, config, out)
