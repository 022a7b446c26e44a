"""A MONAI bundle that MONAI itself accepts and runs, offline.

Layout (MONAI bundle specification)::

    BUNDLE/
      LICENSE                   licence of the model and of its training data
      configs/metadata.json     every key the bundle schema requires + ``medcl`` (preprocessing,
                                OOD guard, training facts, the architecture to rebuild)
      configs/inference.json    a complete ``monai.bundle run`` pipeline (below)
      models/model.pt           state dict of ``network_def`` (loaded with weights_only=True)
      models/model.ts           TorchScript (deprecated by PyTorch; kept while torch ships it)
      models/model.onnx         ONNX (torch.export / dynamo exporter), checked with onnxruntime
      docs/README.md            the model card (:mod:`medcl.reports.card`)
      docs/license.txt          same text as LICENSE

``inference.json``: ``datalist`` (every PNG/JPEG/DICOM/NIfTI file under ``dataset_dir``) ->
``preprocessing`` (:meth:`medcl.data.preprocessing.Preprocessing.config`, the exact list
training and ``medcl predict`` instantiate) -> ``ReadableDataset`` / ``DataLoader`` (an
unreadable file is skipped, with an error row and a log line, as in ``medcl predict``) ->
``network`` (:class:`~medcl.export.bundle_runtime.BundleNetwork`, weights from ``model.pt`` by
``CheckpointLoader``) -> ``GuardedInferer`` -> ``PredictionWriter`` (``output_dir/
predictions.csv`` with the columns of ``medcl predict``), driven by ``SupervisedEvaluator``::

    cd BUNDLE && python -m monai.bundle run --config_file configs/inference.json \\
        --dataset_dir /path/to/images

``model.ts`` / ``model.onnx`` return ``(probabilities, route, ood_score)`` for
``medcl predict``; ``network_def`` returns the probabilities alone (one tensor, as
``verify_net_in_out`` requires).
"""

from __future__ import annotations

__all__ = [
    "METADATA_SCHEMA",
    "REQUIRED_METADATA_KEYS",
    "REQUIRED_TENSOR_KEYS",
    "read_bundle_metadata",
    "write_bundle",
]

import json
import shutil
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

import medcl
from medcl.data.preprocessing import Preprocessing
from medcl.engine.checkpoint import atomic_dir
from medcl.errors import DataError
from medcl.export.bundle_runtime import BundleNetwork, read_bundle_metadata
from medcl.export.exporters import export_onnx, export_torchscript
from medcl.export.module import ExportModule
from medcl.reports.card import model_card

#: The bundle metadata schema MONAI's ``verify_metadata`` downloads (not reachable offline).
METADATA_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20240725.json"
)
#: Top-level keys that schema requires.
REQUIRED_METADATA_KEYS = (
    "schema",
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
#: Keys every tensor format specifier needs (inputs and outputs).
REQUIRED_TENSOR_KEYS = (
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)
_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz")


def _version(name: str) -> str:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "not installed"


def _monai_metadata(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    shape = meta["input_shape"]
    after = meta.get("model_after_experience", {})
    index = int(after.get("index", 0))
    version = f"0.{index + 1}.0"
    history = meta.get("history", [])
    changelog = {
        f"0.{h['index'] + 1}.0": f"trained on experience {h['index']}: {h['name']}" for h in history
    }
    changelog[version] = (
        changelog.get(version, "exported") + f" (exported by medcl {medcl.__version__})"
    )
    modalities = meta.get("acquisition", {}).get("modalities", [])
    channel_def = {0: "grey"} if shape[0] == 1 else {0: "R", 1: "G", 2: "B"}
    sources = ", ".join(s["dataset"] for s in meta.get("acquisition", {}).get("sources", []))
    return {
        "schema": METADATA_SCHEMA,
        "version": version,
        "changelog": dict(sorted(changelog.items(), reverse=True)),
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {
            "medcl": medcl.__version__,
            "pytorch-ignite": _version("pytorch-ignite"),
            "pydicom": _version("pydicom"),
            "nibabel": _version("nibabel"),
            "pillow": _version("pillow"),
        },
        "name": f"medcl {meta['strategy']} on {meta['scenario']}",
        "task": f"{meta['num_classes']}-class image classification ({meta['scenario']})",
        "description": (
            f"Continual-learning classifier ({meta['strategy']}) exported by `medcl export` "
            f"after experience {index}; inputs unlike the training cohorts are flagged (ood)."
        ),
        "authors": "the team that ran this medcl run (set before distribution)",
        "copyright": "Copyright (c) the run's authors; see LICENSE for the training data terms",
        "intended_use": "Research use; decision support only after local validation. See docs/README.md.",
        "data_source": sources,
        "data_type": "PNG/JPEG, DICOM, NIfTI",
        "references": ["medcl model card: docs/README.md"],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "/".join(modalities) or "n/a",
                    "num_channels": shape[0],
                    "spatial_shape": shape[1:],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": channel_def,
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "modality": "n/a",
                    "num_channels": meta["num_classes"],
                    "spatial_shape": [],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": dict(enumerate(meta["class_names"])),
                }
            },
        },
        "medcl": meta | {"rebuild": config},
    }


def _inference_config(meta: dict[str, Any]) -> dict[str, Any]:
    pre = Preprocessing.from_meta(meta)
    pre_items = pre.config()
    suffixes = repr(_SUFFIXES)
    return {
        "imports": ["$import glob", "$import os", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/sample'",
        "datalist": "$sorted(f for f in glob.glob(os.path.join(@dataset_dir, '**', '*'), "
        f"recursive=True) if f.lower().endswith({suffixes}))",
        "device": "$torch.device('cpu')",
        "reject_ood": False,
        "site": None,  # the inputs' site: its conformal threshold (None: covers every site)
        "network_def": {
            "_target_": "medcl.export.bundle_runtime.BundleNetwork",
            "bundle_root": "@bundle_root",
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": pre_items},
        "dataset": {  # an unreadable file is skipped and reported, not fatal
            "_target_": "medcl.export.bundle_runtime.ReadableDataset",
            "data": "$[{'image': f, 'path': f} for f in @datalist]",
            "transform": "@preprocessing",
            "bundle_root": "@bundle_root",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 64,
            "shuffle": False,
            "num_workers": 0,
            "collate_fn": {
                "_target_": "medcl.export.bundle_runtime.collate_readable",
                "_mode_": "callable",
            },
        },
        "inferer": {"_target_": "medcl.export.bundle_runtime.GuardedInferer"},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {
                "_target_": "medcl.export.bundle_runtime.PredictionWriter",
                "output_dir": "@output_dir",
                "bundle_root": "@bundle_root",
                "reject_ood": "@reject_ood",
                "site": "@site",
            },
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "val_handlers": "@handlers",
            "decollate": False,
        },
        "run": ["$@evaluator.run()"],
    }


def _licence_text(meta: dict[str, Any]) -> str:
    sources = meta.get("sources_info", [])
    lines = [
        "Model weights and configuration exported by medcl (Apache-2.0 software).",
        "",
        "The weights were trained on the data sources below; their terms apply to the model:",
        "",
    ]
    lines += [f"- {s.get('dataset', '?')}: {s.get('licence', 'unknown')}" for s in sources]
    if any("CC BY" in s.get("licence", "") for s in sources):
        lines += [
            "",
            "CC BY 4.0 sources require attribution: cite MedMNIST v2 (Yang et al., Scientific "
            "Data 2023) and the original dataset papers when you share this model.",
        ]
    lines += [
        "",
        "Not a medical device. Validate locally before any clinical use.",
    ]
    return "\n".join(lines) + "\n"


def write_bundle(
    module: ExportModule, meta: dict[str, Any], config: dict[str, Any], out: str | Path
) -> Path:
    """Write the bundle folder ``out``; an existing folder is replaced only once all is written.

    The bundle is assembled in a hidden ``.NAME.partial`` folder beside ``out`` that is removed
    if the export fails or is interrupted (a later export also removes one left by ``kill -9``),
    so nothing that looks like a bundle is left half-written.

    Args:
        module: the guarded export module.
        meta: export metadata (:func:`~medcl.export.loading.run_metadata` + guard).
        config: how to rebuild the architecture (:func:`~medcl.export.rebuild.rebuild_config`).
        out: the bundle folder.

    Returns:
        ``out``.
    """
    out = Path(out)
    legacy = out.with_name(out.name + ".partial")  # left by medcl versions before the fix
    if (legacy / "configs" / "inference.json").is_file():
        shutil.rmtree(legacy, ignore_errors=True)
    with atomic_dir(out) as tmp:
        _fill_bundle(tmp, module, meta, config)
    return out


def _fill_bundle(
    tmp: Path, module: ExportModule, meta: dict[str, Any], config: dict[str, Any]
) -> None:
    (tmp / "configs").mkdir(parents=True)
    (tmp / "docs").mkdir()
    (tmp / "models").mkdir()
    network = BundleNetwork(module=module).eval()
    torch.save(network.state_dict(), tmp / "models" / "model.pt")
    with warnings.catch_warnings():  # the bundle keeps model.ts while torch ships TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        export_torchscript(module, meta, tmp / "models" / "model.ts")
    export_onnx(module, meta, tmp / "models" / "model.onnx")
    monai_meta = _monai_metadata(meta, config)
    (tmp / "configs" / "metadata.json").write_text(json.dumps(monai_meta, indent=1))
    (tmp / "configs" / "inference.json").write_text(json.dumps(_inference_config(meta), indent=1))
    licence = _licence_text(meta)
    (tmp / "LICENSE").write_text(licence)
    (tmp / "docs" / "license.txt").write_text(licence)
    run_dir = Path(meta["run"]["dir"])
    try:
        card = model_card(run_dir, meta=meta, bundle=True)
    except DataError:  # no report.json yet: say so instead of inventing numbers
        card = (
            f"# {meta['strategy']} on {meta['scenario']}\n\nThe run has no clinical report, so "
            "this bundle has no model card yet: run `medcl report RUN` and export again.\n\n"
            f"Classes: {', '.join(meta['class_names'])}. Run the bundle with\n"
            "`python -m monai.bundle run --config_file configs/inference.json "
            "--dataset_dir DIR`.\n"
        )
    (tmp / "docs" / "README.md").write_text(card)
