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
]

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medcl.errors import ConfigError, MedclError
from medcl.export.loading import ExportModule, load_run_strategy, run_metadata

FORMATS = ("torchscript", "onnx", "safetensors", "bundle")
ATOL = 1e-4


def _example(meta: dict[str, Any], batch: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((batch, *meta["input_shape"]), generator=g)


def _check(ref: nn.Module, fn, x: Tensor, what: str) -> float:
    """Max abs difference of probabilities between ``ref`` and ``fn`` on ``x``; raises if > ATOL."""
    with torch.no_grad():
        want, got = ref(x)[0], fn(x)[0]
    diff = float((want - got).abs().max())
    if diff > ATOL:
        raise MedclError(f"{what} differs from the PyTorch model by {diff:.2e} (> {ATOL}).")
    return diff


def export_torchscript(module: ExportModule, meta: dict[str, Any], path: str | Path) -> Path:
    """Script (or trace, then verify) ``module`` and save it with ``metadata.json`` embedded."""
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


def export_onnx(module: ExportModule, meta: dict[str, Any], path: str | Path) -> Path:
    """ONNX with a dynamic batch axis, checked by ``onnx.checker`` and run with onnxruntime."""
    import onnx

    module.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(meta)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(path),
            input_names=["image"],
            output_names=["probabilities", "route"],
            dynamic_axes={
                "image": {0: "batch"},
                "probabilities": {0: "batch"},
                "route": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,  # the TorchScript exporter handles the forward hooks of the adapters
        )
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"medcl_metadata": json.dumps(meta)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    sess = _onnx_session(path)
    _check(
        module,
        lambda t: [torch.from_numpy(sess.run(None, {"image": t.numpy()})[0])],
        _example(meta, batch=5),
        "ONNX model (onnxruntime)",
    )
    return path


def _onnx_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


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


def load_safetensors_model(path: str | Path) -> tuple[ExportModule, dict[str, Any]]:
    """Rebuild the module from the header's JSON config and load the tensors (no pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from medcl.models.backbones import create_backbone
    from medcl.strategies import create_strategy
    from medcl.strategies.base import ExperienceInfo

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if "medcl_config" not in header:
        raise ConfigError(f"{path}: not a medcl safetensors export (no medcl_config in header).")
    meta, cfg = json.loads(header["medcl_metadata"]), json.loads(header["medcl_config"])
    shape, m = meta["input_shape"], cfg["model"]
    backbone = create_backbone(
        m["backbone"],
        in_chans=shape[0],
        spatial_dims=len(shape) - 1,
        small_input=m["small_input"],
        pretrained=False,
        checkpoint_path=None,
        width=m["width"],
    )
    opts = {k: v for k, v in cfg["strategy"].items() if k != "name"}
    strategy = create_strategy(
        cfg["strategy"]["name"], backbone, scenario_kind=cfg["scenario_kind"], **opts
    )
    strategy.rebuild([ExperienceInfo.from_dict(d) for d in cfg["seen"]])
    module = ExportModule(strategy.deployable_model()).eval()
    load_model(module, str(path), strict=True)
    return module, meta


def _write_bundle(module: ExportModule, meta: dict[str, Any], out: Path) -> Path:
    from medcl.export.bundle import write_bundle

    return write_bundle(module, meta, out)


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Export the deployable model of ``run_dir`` in ``fmt`` (one of :data:`FORMATS`).

    Args:
        run_dir: a finished run directory.
        fmt: ``torchscript``, ``onnx``, ``safetensors`` or ``bundle``.
        out: output file (folder for ``bundle``); default ``RUN_DIR/export/model.<ext>``
            or ``RUN_DIR/export/bundle``.

    Returns:
        The written file or bundle folder.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}.")
    run_dir = Path(run_dir)
    scenario, strategy = load_run_strategy(run_dir)
    meta = run_metadata(run_dir, scenario, strategy)
    module = ExportModule(strategy.deployable_model()).eval()
    ext = {"torchscript": "ts", "onnx": "onnx", "safetensors": "safetensors"}
    default = run_dir / "export" / ("bundle" if fmt == "bundle" else f"model.{ext.get(fmt)}")
    out = Path(out) if out is not None else default
    if fmt == "torchscript":
        return export_torchscript(module, meta, out)
    if fmt == "onnx":
        return export_onnx(module, meta, out)
    if fmt == "bundle":
        return _write_bundle(module, meta, out)
    import yaml

    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    config = {
        "model": raw["model"],
        "strategy": raw["strategy"],
        "scenario_kind": scenario.kind,
        "seen": [i.to_dict() for i in strategy.seen],
    }
    return export_safetensors(module, meta, config, out)
