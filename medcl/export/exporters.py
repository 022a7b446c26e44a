"""The file formats: TorchScript, ONNX and safetensors writers, and their low-level readers.

Every format stores :class:`~medcl.export.module.ExportModule` (``[0, 1]`` images ->
probabilities, routed head) and carries its metadata inside the file: TorchScript as the extra
file ``metadata.json``, ONNX as the model property ``medcl_metadata``, safetensors in the header
``__metadata__``. TorchScript first tries ``torch.jit.script``; where the model's Python control
flow does not script it is traced and the trace is checked against eager outputs (the batch
size stays free: the routing is written without data-dependent Python branches). Loading a
safetensors export never unpickles: the module is rebuilt from the JSON run config
(:mod:`medcl.export.rebuild`) and filled with the tensors. :func:`~medcl.export.run_export.export_run`
picks the format for a run directory; the MONAI bundle is :mod:`medcl.export.bundle`.
"""

from __future__ import annotations

__all__ = [
    "export_onnx",
    "export_safetensors",
    "export_torchscript",
    "load_safetensors_model",
    "onnx_providers",
    "onnx_session",
    "safetensors_header",
]

import functools
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from medcl.engine.checkpoint import atomic_file
from medcl.errors import ConfigError, DataError, MedclError
from medcl.export.extras import require
from medcl.export.module import ExportModule
from medcl.export.rebuild import rebuild_module

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
    with atomic_file(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(ts, str(tmp), _extra_files={"metadata.json": json.dumps(meta)})
    return path


def export_onnx(module: nn.Module, meta: dict[str, Any], path: str | Path) -> Path:
    """ONNX through ``torch.export`` (``dynamo=True``) with a dynamic batch axis, checked by
    ``onnx.checker`` and against PyTorch with onnxruntime on another batch size."""
    onnx = require("onnx", purpose="ONNX export")
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
    with atomic_file(path) as tmp:  # checked before it replaces an earlier export
        onnx.save(model, str(tmp))
        sess = onnx_session(tmp)
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
    ort = require("onnxruntime", purpose="running ONNX models")
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


def onnx_session(path: str | Path, device: torch.device | str = "cpu"):
    """An ONNX Runtime session for ``path`` on ``device`` (see :func:`onnx_providers`)."""
    ort = require("onnxruntime", purpose="running ONNX models")
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
    path = Path(path)
    header = {"medcl_metadata": json.dumps(meta), "medcl_config": json.dumps(config)}
    with atomic_file(path) as tmp:
        safetensors.torch.save_model(module, str(tmp), metadata=header)
    return path


def safetensors_header(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read without loading tensors or unpickling.

    Raises:
        DataError: ``path`` is not a safetensors file (e.g. a pickle renamed ``.safetensors``).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DataError(
            f"{path} is not a valid safetensors file ({str(e).strip() or type(e).__name__}); "
            "expected a file written by `medcl export -f safetensors` (or safetensors' "
            "save_file). medcl never unpickles user files: export the model again."
        ) from None


def load_safetensors_model(path: str | Path) -> tuple[ExportModule, dict[str, Any]]:
    """Rebuild the module from the header's JSON config and load the tensors (no pickle).

    Raises:
        DataError: not a safetensors file, or its tensors do not fit the recorded model.
        ConfigError: a safetensors file without medcl's header (not a ``medcl export`` file).
    """
    header = safetensors_header(path)
    if "medcl_config" not in header:
        raise ConfigError(
            f"{path}: not a medcl safetensors export (no medcl_config in its header); export "
            "the run with `medcl export RUN_DIR -f safetensors`."
        )
    meta, cfg = json.loads(header["medcl_metadata"]), json.loads(header["medcl_config"])
    module = rebuild_module(meta, cfg)
    try:
        safetensors.torch.load_model(module, str(path), strict=True)
    except (RuntimeError, SafetensorError) as e:  # missing/unexpected keys, wrong shapes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{path}: its tensors do not fit the model its header describes ({first}); the "
            "file was changed after `medcl export`. Export the run again."
        ) from None
    return module, meta
