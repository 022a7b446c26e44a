"""MONAI bundle layout for a medcl model.

``configs/metadata.json`` (MONAI's metadata schema fields plus ``medcl``: classes, input shape,
channels, intensity scaling, the run it came from), ``configs/inference.json`` (a MONAI
``ConfigParser`` pipeline with the same transforms as training: LoadImaged, EnsureChannelFirstd,
ScaleIntensityd, Resized), ``models/model.ts``, ``models/model.onnx`` and ``docs/README.md``.
Deviation: MONAI's ``ConfigParser`` cannot express medcl's grey->RGB channel repeat as a plain
transform, so ``inference.json`` records it in ``medcl.channels`` and ``medcl predict`` applies it
through :func:`medcl.data.files.load_image_files`.
"""

from __future__ import annotations

__all__ = ["read_bundle_metadata", "write_bundle"]

import json
from pathlib import Path
from typing import Any

from medcl.errors import ConfigError
from medcl.export.exporters import export_onnx, export_torchscript
from medcl.export.loading import ExportModule


def _monai_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    import monai
    import torch

    import medcl

    shape = meta["input_shape"]
    return {
        "version": "0.1.0",
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__,
        "medcl_version": medcl.__version__,
        "name": f"medcl {meta['strategy']} on {meta['scenario']}",
        "task": "classification",
        "description": "Continual-learning classifier exported by `medcl export`.",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": shape[0],
                    "spatial_shape": shape[1:],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                }
            },
            "outputs": {
                "probabilities": {
                    "type": "probabilities",
                    "num_channels": meta["num_classes"],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "channel_def": dict(enumerate(meta["class_names"])),
                }
            },
        },
        "medcl": meta,
    }


def _inference_config(meta: dict[str, Any]) -> dict[str, Any]:
    size = meta["image_size"]
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts')",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0},
                {
                    "_target_": "Resized",
                    "keys": "image",
                    "spatial_size": size,
                    "mode": "bilinear" if len(size) == 2 else "trilinear",
                    "anti_aliasing": True,
                },
            ],
        },
        "medcl": {"channels": meta["channels"], "note": "convert channels: mean 3->1, repeat 1->3"},
    }


def write_bundle(module: ExportModule, meta: dict[str, Any], out: str | Path) -> Path:
    """Write the bundle folder ``out`` (TorchScript and ONNX are both verified on export)."""
    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    export_torchscript(module, meta, out / "models" / "model.ts")
    export_onnx(module, meta, out / "models" / "model.onnx")
    (out / "configs" / "metadata.json").write_text(json.dumps(_monai_metadata(meta), indent=1))
    (out / "configs" / "inference.json").write_text(json.dumps(_inference_config(meta), indent=1))
    shape = "x".join(map(str, meta["input_shape"]))
    (out / "docs" / "README.md").write_text(
        f"# {meta['strategy']} on {meta['scenario']}\n\n"
        f"Exported by `medcl export` from run `{meta['run']['name']}`.\n\n"
        f"- classes: {', '.join(meta['class_names'])}\n"
        f"- input: float32 (B, {shape}) in [0, 1] (per-image min-max scaling, resize, "
        f"{meta['channels']} channel(s)); normalisation is inside the model\n"
        "- outputs: `probabilities` (B, K) and `route` (B,) (routed head, -1 when none)\n\n"
        "Run `medcl predict <this folder> IMAGES...` for the exact training preprocessing.\n"
    )
    return out


def read_bundle_metadata(bundle: str | Path) -> dict[str, Any]:
    """The medcl metadata of a bundle folder (``configs/metadata.json`` -> ``medcl``)."""
    path = Path(bundle) / "configs" / "metadata.json"
    if not path.is_file():
        raise ConfigError(f"{bundle} is not a medcl bundle: {path} is missing.")
    meta = json.loads(path.read_text())
    if "medcl" not in meta:
        raise ConfigError(f"{path} has no 'medcl' section; re-export with `medcl export`.")
    return meta["medcl"]
