"""``medcl predict``: class probabilities for image files with the training preprocessing.

A model is a run directory, a bundle folder, or an exported ``.ts`` / ``.onnx`` /
``.safetensors`` file; the metadata inside it fixes channels, spatial size and intensity scaling,
and files go through the same MONAI pipeline as training (:func:`medcl.data.decode.load_image_files`).
Inputs are PNG/JPEG, DICOM files, DICOM series folders (3D models), NIfTI volumes, folders of
images and CSV manifests (a ``path`` column, relative to the CSV). Every input gets one row:
probabilities, predicted class and routed experience, or an ``error`` saying what is wrong with
that file; a bad file never costs the other files their results. Models run on the device
``load_predictor(device=...)`` names (``medcl predict --device auto|cpu|cuda``; ONNX through ONNX
Runtime's CUDA provider when it is installed).

Intensity follows the metadata's ``intensity.mode``: runs trained on files (manifests, class
folders) rescale each image to [0, 1] exactly as training did ("minmax"); runs trained on 8-bit
arrays (MedMNIST) map 0..255 to [0, 1] ("uint8"), so a PNG written from a MedMNIST array gets
the very input the model was evaluated on.
"""

from __future__ import annotations

__all__ = [
    "BACKENDS",
    "Predictor",
    "expand_inputs",
    "input_problem",
    "load_predictor",
    "predict_files",
    "prediction_rows",
]

import json
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from medcl.data.decode import load_image_files
from medcl.data.readers import inspect_file
from medcl.engine.device import autocast, resolve_device
from medcl.engine.layout import RunLayout
from medcl.engine.rundir import select_experience
from medcl.errors import ConfigError, DataError
from medcl.export.exporters import load_safetensors_model, onnx_session
from medcl.export.extras import require
from medcl.export.loading import guarded_module, load_run_model, run_metadata
from medcl.export.ood import acquisition_problems, ood_reason
from medcl.export.prediction_sets import check_site, set_cells
from medcl.export.saliency_files import SaliencyWriter

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".nii", ".nii.gz", ".dcm")
#: Which file of a bundle ``load_predictor`` runs.
BACKENDS = ("onnx", "torchscript")
_CPU = torch.device("cpu")


@dataclass
class Predictor:
    """A loaded model: ``fn`` maps ``(B, *input_shape)`` [0, 1] floats -> (probs ``(B, K)``,
    route ``(B,)``, OOD score ``(B,)``); exports older than the OOD guard return two arrays.
    ``model``: the PyTorch deployable model (run directory, safetensors), for saliency."""

    fn: Callable[[torch.Tensor], tuple[np.ndarray, ...]]
    meta: dict[str, Any]
    source: str
    model: torch.nn.Module | None = None


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A model output as a CPU array; floating outputs (bf16 under autocast) as float32."""
    return (t.float() if t.is_floating_point() else t).cpu().numpy()


def _torch_fn(module, device: torch.device = _CPU, amp: bool = False) -> Callable:
    """``fn(x)`` running ``module`` on ``device`` (inputs moved there, outputs back to NumPy),
    under bf16 autocast when ``amp`` and the device supports it."""
    module = module.to(device)

    def fn(x: torch.Tensor) -> tuple[np.ndarray, ...]:
        with torch.no_grad(), autocast(device, amp):
            return tuple(_numpy(t) for t in module(x.to(device)))

    return fn


def _pickled(path: Path) -> bool:
    """Whether ``path`` is a ``torch.save`` archive or a raw pickle rather than TorchScript."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n.split("/", 1)[-1] for n in z.namelist()]
        return "data.pkl" in names and "constants.pkl" not in names
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # pickle protocol 2+ opcode


def _ts(path: Path, device: torch.device = _CPU, amp: bool = False) -> Predictor:
    if path.is_file() and _pickled(path):
        raise DataError(
            f"{path} is a torch.save / pickle file, not a TorchScript export; medcl never "
            "unpickles user files (unpickling can run code). Export the model with `medcl "
            "export RUN_DIR` (-f onnx, safetensors or torchscript) and predict with that file."
        )
    extra = {"metadata.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as e:  # torch raises RuntimeError/ValueError for any damaged archive
            raise DataError(
                f"{path} could not be loaded as TorchScript ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); it is damaged or not a "
                "`medcl export` file. Export the model again with `medcl export RUN_DIR`."
            ) from None
    if not extra["metadata.json"]:
        raise ConfigError(f"{path}: TorchScript file without medcl metadata; export it again.")
    meta = json.loads(extra["metadata.json"])
    return Predictor(_torch_fn(module.eval(), device, amp), meta, f"torchscript ({device.type})")


def _onnx(path: Path, device: torch.device = _CPU) -> Predictor:
    onnx = require("onnx", purpose="predicting with an ONNX model")
    fix = "it is damaged or not a `medcl export` file. Export it again with `medcl export -f onnx`."
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise DataError(f"{path} could not be loaded as ONNX ({type(e).__name__}); {fix}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "medcl_metadata" not in props:
        raise ConfigError(f"{path}: ONNX file without medcl metadata; export it again.")
    try:
        sess = onnx_session(path, device)
    except Exception as e:  # onnxruntime's InvalidGraph / Fail
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataError(
            f"{path} could not be opened by onnxruntime ({type(e).__name__}: {msg}); {fix}"
        ) from None
    return Predictor(
        lambda x: tuple(sess.run(None, {"image": x.numpy()})),
        json.loads(props["medcl_metadata"]),
        f"onnxruntime ({sess.get_providers()[0]})",
    )


def load_predictor(
    model: str | Path,
    *,
    backend: str = "torchscript",
    experience: int | None = None,
    allow_partial: bool = False,
    device: str = "cpu",
    amp: bool = False,
) -> Predictor:
    """Load a run directory, bundle folder or ``.ts`` / ``.onnx`` / ``.safetensors`` file.

    ``backend`` (``torchscript`` or ``onnx``) picks the file used from a bundle. For a run
    directory, ``experience`` / ``allow_partial`` choose the model as in
    :func:`~medcl.export.run_export.export_run` (an unfinished run is otherwise an error).

    Args:
        model: the run directory, bundle folder or exported file.
        backend: which file of a bundle runs.
        experience: for a run directory, the model after this experience.
        allow_partial: accept an unfinished run's last completed experience.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (see
            :func:`medcl.engine.device.resolve_device`). PyTorch and TorchScript models run on
            it; ONNX runs with ONNX Runtime's ``CUDAExecutionProvider`` when that is installed
            (``onnxruntime-gpu``), else on the CPU provider (said once, as a warning).
        amp: bf16 autocast for PyTorch / TorchScript models on a CUDA device that supports it
            (outputs cast back to float32). Off by default: the OOD threshold was fitted on
            float32 features.

    Raises:
        ConfigError: an unknown backend or device, or ``cuda`` without a CUDA device.
        DataError: a TorchScript / ONNX file that cannot be loaded (damaged, not an export).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {list(BACKENDS)}; got {backend!r}.")
    dev = resolve_device(device, option="device")
    path = Path(model)
    if path.is_dir() and (path / "configs" / "metadata.json").is_file():
        return (
            _onnx(path / "models" / "model.onnx", dev)
            if backend == "onnx"
            else _ts(path / "models" / "model.ts", dev, amp)
        )
    if path.is_dir() and RunLayout(path).config.is_file():
        after = select_experience(
            path, experience, allow_partial=allow_partial, command="medcl predict"
        )
        run_model = load_run_model(path, experience=after)  # no data, unless the guard is fitted
        meta = run_metadata(path, run_model.data, run_model.strategy, experience=after)
        module = guarded_module(run_model, meta)
        return Predictor(_torch_fn(module, dev, amp), meta, f"pytorch ({dev.type})", module.model)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".ts", ".pt"):
        return _ts(path, dev, amp)
    if path.is_file() and suffix == ".onnx":
        return _onnx(path, dev)
    if path.is_file() and suffix == ".safetensors":
        module, meta = load_safetensors_model(path)
        source = f"pytorch ({dev.type}, safetensors)"
        return Predictor(_torch_fn(module, dev, amp), meta, source, module.model)
    raise ConfigError(
        f"model {model}: expected a run directory, a bundle folder (configs/metadata.json) or a "
        ".ts/.onnx/.safetensors file from `medcl export`."
    )


def _is_image(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and name.endswith(_IMAGE_SUFFIXES)


def expand_inputs(inputs: Sequence[str | Path], *, spatial_dims: int) -> list[str]:
    """Files to predict, in order: folders expand to their images (a folder of DICOM files is
    one series for a 3D model), CSV manifests to their ``path`` column; other paths stay as they
    are (checked later, so a missing file gets its own error row)."""
    out: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file())
            dicom = [p for p in files if p.suffix.lower() in (".dcm", "")]
            if spatial_dims == 3 and dicom and len(dicom) == len(files):
                out.append(str(item))  # a DICOM series
            else:
                out.extend(str(p) for p in files if _is_image(p))
        elif item.suffix.lower() == ".csv" and item.is_file():
            df = pd.read_csv(item, dtype=str, keep_default_na=False)
            if "path" not in df.columns:
                raise ConfigError(f"manifest {item}: no 'path' column; found {list(df.columns)}.")
            out.extend(str(p if Path(p).is_absolute() else item.parent / p) for p in df["path"])
        else:
            out.append(str(item))
    return out


def input_problem(path: str | Path, meta: dict[str, Any]) -> str | None:
    """Why ``path`` cannot go into a model with ``meta``, or None when it can."""
    info = inspect_file(Path(path))
    if info.problem:
        return info.problem
    dims, channels = meta["spatial_dims"], meta["channels"]
    if info.spatial_dims != dims:
        return (
            f"{info.spatial_dims}D image of shape {info.shape}, but the model takes {dims}D "
            f"images of shape {tuple(meta['input_shape'])}; give {dims}D files"
        )
    if info.channels != channels and info.channels not in (1, 3):
        return (
            f"{info.channels} channels cannot be converted to the model's {channels} "
            "(only grey <-> RGB is supported)"
        )
    return None


def _load(paths: list[str], meta: dict[str, Any]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI reader notices (e.g. missing nvImageCodec)
        return load_image_files(
            paths,
            image_size=meta["image_size"],
            channels=meta["channels"],
            spatial_dims=meta["spatial_dims"],
            intensity=meta.get("intensity", {}).get("mode", "minmax"),
        )


def prediction_rows(
    rows: list[dict[str, Any]],
    done: Sequence[int],
    probs: np.ndarray,
    route: np.ndarray,
    score: np.ndarray | None,
    meta: dict[str, Any],
    *,
    reject_ood: bool = False,
    site: str | None = None,
) -> pd.DataFrame:
    """Fill ``rows[done]`` with the model's outputs and the OOD verdict; return the table.

    Shared by :func:`predict_files` and the bundle's
    :class:`~medcl.export.bundle_runtime.PredictionWriter`, so both write the same columns:
    ``input, status, error, predicted_class, p_<class>..., route, ood, ood_score, ood_reason``
    (``ood_score``: the feature distance compared with ``meta["ood"]["threshold"]``), and
    ``prediction_set, set_size`` after ``predicted_class`` when the model has conformal
    thresholds (:mod:`medcl.export.prediction_sets`; ``site`` picks a per-site threshold).
    """
    names, routes = meta["class_names"], meta.get("routes", [])
    facts, guard = meta.get("acquisition", {}), meta.get("ood", {})
    if score is None:
        score = np.full(len(done), np.nan)
    sets = set_cells(probs, meta, site)  # None: no conformal thresholds in the metadata
    for j, (i, p, r, s) in enumerate(zip(done, probs, route, score, strict=True)):
        row = rows[i]
        row.update(sets[j] if sets is not None else {})
        row.update({f"p_{n}": float(v) for n, v in zip(names, p, strict=True)})
        row["predicted_class"] = names[int(np.argmax(p))]
        row["route"] = routes[int(r)] if 0 <= int(r) < len(routes) else ""
        reason = ood_reason(float(s), guard, acquisition_problems(row["input"], facts))
        row["ood"], row["ood_score"], row["ood_reason"] = bool(reason), float(s), reason
        if reject_ood and reason:
            row["predicted_class"] = ""  # flagged: no class, probabilities kept for audit
            row.update(prediction_set="", set_size=None)
    cols = [
        "input",
        "status",
        "error",
        "predicted_class",
        *(["prediction_set", "set_size"] if sets is not None else []),
        *(f"p_{n}" for n in names),
        "route",
        "ood",
        "ood_score",
        "ood_reason",
    ]
    df = pd.DataFrame(rows).reindex(columns=cols)
    if sets is not None:  # "" for rows without a set (errors, rejected), not NaN or 2.0
        df["set_size"] = df["set_size"].astype("Int64")
    return df.fillna({"predicted_class": "", "prediction_set": "", "route": "", "ood_reason": ""})


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    *,
    batch_size: int = 64,
    progress: bool = False,
    reject_ood: bool = False,
    site: str | None = None,
    saliency: str | Path | None = None,
) -> pd.DataFrame:
    """One row per input file: ``input``, ``status`` (ok/error), ``error``, ``predicted_class``,
    ``prediction_set`` and ``set_size`` (models with conformal thresholds), ``p_<class>`` per
    class, ``route`` (routed experience, empty when the model does not route), ``ood`` (True:
    unlike the training cohorts) and ``ood_reason``. Files are checked one by one, then loaded
    and predicted in batches. ``reject_ood`` leaves flagged rows without a class or set;
    ``site`` (the site/experience name the inputs come from) selects that site's conformal
    threshold (default: the one that covers every calibrated site). ``saliency``: a folder for
    one Grad-CAM overlay PNG per file (PyTorch models), its path in a ``saliency`` column."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}.")
    meta = predictor.meta
    check_site(meta, site)  # before any file is read
    writer = (
        SaliencyWriter(predictor.model, saliency, source=predictor.source) if saliency else None
    )
    files = expand_inputs(inputs, spatial_dims=meta["spatial_dims"])
    if not files:
        raise ConfigError(f"no input files found in {list(map(str, inputs))}.")
    rows: list[dict[str, Any]] = [{"input": f, "status": "ok", "error": ""} for f in files]
    for row in rows:
        if why := input_problem(row["input"], meta):
            row.update(status="error", error=why)
    good = [i for i, r in enumerate(rows) if r["status"] == "ok"]
    chunks = [good[i : i + batch_size] for i in range(0, len(good), batch_size)]
    if progress:
        chunks = tqdm(chunks, desc="predict", unit="batch")
    done: list[int] = []
    outputs: list[tuple[np.ndarray, ...]] = []
    for chunk in chunks:
        try:
            x = _load([files[i] for i in chunk], meta)
        except Exception:  # isolate the file(s) that fail to decode; keep the rest
            ok, parts = [], []
            for i in chunk:
                try:
                    parts.append(_load([files[i]], meta))
                    ok.append(i)
                except Exception as e:
                    rows[i].update(status="error", error=f"could not decode: {e}")
            chunk, x = ok, (torch.cat(parts) if parts else None)
        if x is None:
            continue
        done.extend(chunk)
        outputs.append(tuple(predictor.fn(x.float())))
        if writer is not None:  # a Grad-CAM PNG per file, path in the row's `saliency`
            writer.write([rows[i] for i in chunk], x.float())
    k = len(meta["class_names"])
    cat = [np.concatenate(o) for o in zip(*outputs, strict=True)] if outputs else []
    probs = cat[0] if cat else np.zeros((0, k))
    route = cat[1] if cat else np.zeros(0, np.int64)
    score = cat[2] if len(cat) > 2 else None
    df = prediction_rows(rows, done, probs, route, score, meta, reject_ood=reject_ood, site=site)
    return df if writer is None else df.assign(saliency=[r.get("saliency", "") for r in rows])
