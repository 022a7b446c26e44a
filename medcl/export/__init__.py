"""Deployment: export a run's model (ONNX, TorchScript, safetensors, MONAI bundle), predict with
the OOD guard. The bundle runtime (:mod:`medcl.export.bundle_runtime`) and the OOD guard
(:mod:`medcl.export.ood`) are imported from their modules.

Modules, each importing only those listed after it: ``run_export`` (``export_run``) ->
``bundle`` -> ``bundle_runtime`` -> ``predict`` -> ``loading`` | ``exporters`` (the file formats)
| ``saliency_files`` (``predict --saliency``) -> ``rebuild`` -> ``module`` (:class:`ExportModule`)
-> ``ood`` | ``extras`` |
``prediction_sets`` (conformal sets of ``medcl predict``).
"""

from __future__ import annotations

from medcl.export.exporters import (
    export_onnx,
    export_safetensors,
    export_torchscript,
    load_safetensors_model,
    onnx_providers,
)
from medcl.export.loading import (
    RunModel,
    guarded_module,
    load_run_model,
    load_run_strategy,
    run_metadata,
)
from medcl.export.module import ExportModule
from medcl.export.predict import (
    BACKENDS,
    Predictor,
    expand_inputs,
    input_problem,
    load_predictor,
    predict_files,
    prediction_rows,
)
from medcl.export.rebuild import rebuild_module
from medcl.export.run_export import FORMATS, export_run

__all__ = [
    "BACKENDS",
    "FORMATS",
    "ExportModule",
    "Predictor",
    "RunModel",
    "expand_inputs",
    "export_onnx",
    "export_run",
    "export_safetensors",
    "export_torchscript",
    "guarded_module",
    "input_problem",
    "load_predictor",
    "load_run_model",
    "load_run_strategy",
    "load_safetensors_model",
    "onnx_providers",
    "predict_files",
    "prediction_rows",
    "rebuild_module",
    "run_metadata",
]
