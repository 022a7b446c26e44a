"""Deployment: export a run's model (TorchScript, ONNX, safetensors, MONAI bundle) and predict."""

from __future__ import annotations

from medcl.export.exporters import (
    FORMATS,
    export_onnx,
    export_run,
    export_safetensors,
    export_torchscript,
    load_safetensors_model,
)
from medcl.export.loading import ExportModule, load_run_strategy, run_metadata
from medcl.export.predict import (
    Predictor,
    expand_inputs,
    input_problem,
    load_predictor,
    predict_files,
)

__all__ = [
    "FORMATS",
    "ExportModule",
    "Predictor",
    "expand_inputs",
    "export_onnx",
    "export_run",
    "export_safetensors",
    "export_torchscript",
    "input_problem",
    "load_predictor",
    "load_run_strategy",
    "load_safetensors_model",
    "predict_files",
    "run_metadata",
]
