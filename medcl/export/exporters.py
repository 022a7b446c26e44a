"""Export a run's deployable model: TorchScript, ONNX, safetensors (+ JSON config), MONAI bundle.

Every format stores :class:`~medcl.export.loading.ExportModule` (``[0, 1]`` images ->
probabilities, routed head) and carries its metadata inside the file: TorchScript as the extra
file ``metadata.json``, ONNX as the model property ``medcl_metadata``, safetensors in the header
``__metadata__``. TorchScript first tries ``torch.jit.script``; where the model's Python control
flow does not script it is traced and the trace is checked against eager outputs (the batch
size stays free: the routing is written without data-dependent Python branches). Loading a
safetensors export never unpickles: the module is rebuilt from the JSON run config and filled
with the tensors.
"""

from __future__ import annotations

__all__ = [
    "FORMATS",
    "export_onnx",
    "export_run",
    "export_safetensors",
    "export_torchscript",
    "load_safetensors_model",
    "onnx_providers",
    "rebuild_module",
]

import functools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medcl.errors import ConfigError, MedclError
from medcl.export.loading import ExportModule, guarded_module, load_run_strategy, run_metadata

FORMATS = ("torchscript", "onnx", "safetensors", "bundle")
ATOL = 1e-4


def _example(meta: dict[str, Any], batch: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((batch, *meta["input_shape"]), generator=g)


def _check(ref: nn.Module, fn, x: Tensor, what: str) -> float:
    """Max abs difference of probabilities between ``ref`` and ``fn`` on ``x``; raises if > ATOL.

    The OOD score (third output) must agree to ``ATOL`` relative to its magnitude.
    """
    with torch.no_grad():
        want, got = ref(x), fn(x)
    want = want if isinstance(want, tuple | list) else (want,)
    got = got if isinstance(got, tuple | list) else (got,)
    diff = float((want[0] - torch.as_tensor(got[0])).abs().max())
    if diff > ATOL:
        raise MedclError(f"{what} differs from the PyTorch model by {diff:.2e} (> {ATOL}).")
    if len(want) > 2 and len(got) > 2:
        w, g = want[2], torch.as_tensor(got[2])
        rel = float(((w - g).abs() / w.abs().clamp_min(1.0)).max())
        if rel > ATOL * 10:
            raise MedclError(f"{what}: OOD score differs from PyTorch by {rel:.2e} (relative).")
    return diff


TORCHSCRIPT_DEPRECATION = (
    "TorchScript export is deprecated in PyTorch and kept only while torch ships torch.jit; "
    "deploy the ONNX export (`medcl export -f onnx`) or the MONAI bundle instead."
)


def export_torchscript(module: nn.Module, meta: dict[str, Any], path: str | Path) -> Path:
    """Script (or trace, then verify) ``module`` and save it with ``metadata.json`` embedded.

    Warns:
        FutureWarning: TorchScript is deprecated by PyTorch; ONNX is the lasting format.
    """
    warnings.warn(TORCHSCRIPT_DEPRECATION, FutureWarning, stacklevel=2)
    if not hasattr(torch, "jit") or not hasattr(torch.jit, "trace"):
        raise ConfigError(
            f"this PyTorch ({torch.__version__}) no longer ships TorchScript; export with "
            "`--format onnx` or `--format bundle`."
        )
    module.eval()
    x = _example(meta)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarning; FutureWarning: torch.jit deprecation
        try:
            ts = torch.jit.script(module)
            _check(module, ts, x, "scripted model")
        except Exception:  # Python-only constructs (timm, adapter hooks): a verified trace
            ts = torch.jit.trace(module, x, check_trace=False)
            _check(module, ts, _example(meta, batch=5), "traced model (other batch size)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(ts, str(path), _extra_files={"metadata.json": json.dumps(meta)})
    return path


def export_onnx(module: nn.Module, meta: dict[str, Any], path: str | Path) -> Path:
    """ONNX through ``torch.export`` (``dynamo=True``) with a dynamic batch axis, checked by
    ``onnx.checker`` and against PyTorch with onnxruntime on another batch size."""
    import onnx

    module.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(meta)
    with torch.no_grad():
        out = module(x)
    n_out = len(out) if isinstance(out, tuple) else 1
    names = ["probabilities", "route", "ood_score"][:n_out]
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)  # the exporter's progress messages
        try:
            program = torch.onnx.export(
                module,
                (x,),
                input_names=["image"],
                output_names=names,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                dynamo=True,
                verbose=False,
            )
        finally:
            logger.setLevel(level)
    model = program.model_proto
    onnx.helper.set_model_props(model, {"medcl_metadata": json.dumps(meta)})
    onnx.checker.check_model(model)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    sess = _onnx_session(path)
    _check(
        module,
        lambda t: [torch.from_numpy(o) for o in sess.run(None, {"image": t.numpy()})],
        _example(meta, batch=5),
        "ONNX model (onnxruntime)",
    )
    return path


def onnx_providers(device: torch.device | str = "cpu") -> list[str]:
    """ONNX Runtime execution providers for ``device``: CUDA first when ``device`` is a CUDA
    device and ``CUDAExecutionProvider`` is installed (``onnxruntime-gpu``), else the CPU one
    (for a CUDA device, a warning says so once per process)."""
    import onnxruntime as ort

    device = torch.device(device)
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        _warn_no_cuda_provider(tuple(ort.get_available_providers()))
    return ["CPUExecutionProvider"]


@functools.cache
def _warn_no_cuda_provider(available: tuple[str, ...]) -> None:
    warnings.warn(
        f"onnxruntime has no CUDAExecutionProvider (available: {list(available)}); ONNX models "
        "run on the CPU. Install onnxruntime-gpu for ONNX on CUDA, or use --backend torchscript.",
        RuntimeWarning,
        stacklevel=3,
    )


def _onnx_session(path: Path, device: torch.device | str = "cpu"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    providers = onnx_providers(device)
    if providers[0] == "CUDAExecutionProvider":
        index = torch.device(device).index or 0
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), opts, providers=providers)


def export_safetensors(
    module: ExportModule, meta: dict[str, Any], config: dict[str, Any], path: str | Path
) -> Path:
    """Weights as safetensors; metadata and the config to rebuild the module in its header."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"medcl_metadata": json.dumps(meta), "medcl_config": json.dumps(config)}
    save_model(module, str(path), metadata=header)
    return path


def rebuild_module(meta: dict[str, Any], config: dict[str, Any]) -> ExportModule:
    """An :class:`ExportModule` of the exported architecture with untrained weights.

    Args:
        meta: the export's metadata (input shape; ``ood`` sizes when it has a guard).
        config: ``{"model", "strategy", "scenario_kind", "seen"}`` as written by
            :func:`export_run`.

    Returns:
        The module in eval mode, ready for ``load_state_dict``.
    """
    from medcl.export.ood import MahalanobisScore
    from medcl.models.backbones import create_backbone
    from medcl.strategies import create_strategy
    from medcl.strategies.base import ExperienceInfo

    shape, m = meta["input_shape"], config["model"]
    backbone = create_backbone(
        m["backbone"],
        in_chans=shape[0],
        spatial_dims=len(shape) - 1,
        small_input=m["small_input"],
        pretrained=False,
        checkpoint_path=None,
        width=m["width"],
    )
    opts = {k: v for k, v in config["strategy"].items() if k != "name"}
    strategy = create_strategy(
        config["strategy"]["name"], backbone, scenario_kind=config["scenario_kind"], **opts
    )
    strategy.rebuild([ExperienceInfo.from_dict(d) for d in config["seen"]])
    ood = meta.get("ood")
    guard = MahalanobisScore.empty(ood["n_means"], ood["n_features"]) if ood else None
    return ExportModule(strategy.deployable_model(), guard).eval()


def load_safetensors_model(path: str | Path) -> tuple[ExportModule, dict[str, Any]]:
    """Rebuild the module from the header's JSON config and load the tensors (no pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if "medcl_config" not in header:
        raise ConfigError(f"{path}: not a medcl safetensors export (no medcl_config in header).")
    meta, cfg = json.loads(header["medcl_metadata"]), json.loads(header["medcl_config"])
    module = rebuild_module(meta, cfg)
    load_model(module, str(path), strict=True)
    return module, meta


def _write_bundle(
    module: ExportModule, meta: dict[str, Any], config: dict[str, Any], out: Path
) -> Path:
    from medcl.export.bundle import write_bundle

    return write_bundle(module, meta, config, out)


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
        experience: export the model after this experience instead of the final one.
        allow_partial: for an unfinished run, export the last completed experience's model.
        fmt: ``torchscript``, ``onnx``, ``safetensors`` or ``bundle``.
        out: output file (folder for ``bundle``); default ``RUN_DIR/export/model.<ext>``
            or ``RUN_DIR/export/bundle``.

    Returns:
        The written file or bundle folder.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}.")
    from medcl.engine.rundir import select_experience

    run_dir = Path(run_dir)
    after = select_experience(
        run_dir, experience, allow_partial=allow_partial, command="medcl export"
    )
    scenario, strategy = load_run_strategy(run_dir, experience=after)
    meta = run_metadata(run_dir, scenario, strategy, experience=after)
    module = guarded_module(run_dir, scenario, strategy, meta)
    ext = {"torchscript": "ts", "onnx": "onnx", "safetensors": "safetensors"}
    default = run_dir / "export" / ("bundle" if fmt == "bundle" else f"model.{ext.get(fmt)}")
    out = Path(out) if out is not None else default
    if fmt == "torchscript":
        return export_torchscript(module, meta, out)
    if fmt == "onnx":
        return export_onnx(module, meta, out)
    import yaml

    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    config = {
        "model": raw["model"],
        "strategy": raw["strategy"],
        "scenario_kind": scenario.kind,
        "seen": [i.to_dict() for i in strategy.seen],
    }
    if fmt == "bundle":
        return _write_bundle(module, meta, config, out)
    return export_safetensors(module, meta, config, out)
