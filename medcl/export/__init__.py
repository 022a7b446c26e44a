"""Deployment: export a run's model (ONNX, TorchScript, safetensors, MONAI bundle), predict with
the OOD guard. The bundle runtime (:mod:`medcl.export.bundle_runtime`) and the OOD guard
(:mod:`medcl.export.ood`) are imported from their modules."""

from __future__ import annotations

from medcl.export.exporters import (
    FORMATS,
    export_onnx,
    export_run,
    export_safetensors,
    export_torchscript,
    load_safetensors_model,
    onnx_providers,
    rebuild_module,
)
from medcl.export.loading import ExportModule, guarded_module, load_run_strategy, run_metadata
from medcl.export.predict import (
    BACKENDS,
    Predictor,
    expand_inputs,
    input_problem,
    load_predictor,
    predict_files,
    prediction_rows,
)

__all__ = [
    "BACKENDS",
    "FORMATS",
    "ExportModule",
    "Predictor",
    "expand_inputs",
    "export_onnx",
    "export_run",
    "export_safetensors",
    "export_torchscript",
    "guarded_module",
    "input_problem",
    "load_predictor",
    "load_run_strategy",
    "load_safetensors_model",
    "onnx_providers",
    "predict_files",
    "prediction_rows",
    "rebuild_module",
    "run_metadata",
]
