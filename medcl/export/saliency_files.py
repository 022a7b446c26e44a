"""``medcl predict --saliency DIR``: one Grad-CAM overlay PNG per input file.

The maps explain the predicted class (:func:`medcl.models.saliency.grad_cam` on the PyTorch
deployable model); 3D inputs show their middle axial slice. Saliency is not localisation: the
map's resolution is the last feature stage's, upsampled to the image.
"""

from __future__ import annotations

__all__ = ["SaliencyWriter"]

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medcl.errors import ConfigError
from medcl.models.saliency import grad_cam, overlay_png

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SUFFIXES = (".nii.gz", ".png", ".jpg", ".jpeg", ".nii", ".dcm")


class SaliencyWriter:
    """Writes ``DIR/<input name>.png`` overlays; two inputs never share a file.

    Args:
        model: the PyTorch deployable model (``Predictor.model``); ``None`` for TorchScript and
            ONNX, which cannot give the gradients Grad-CAM needs.
        out_dir: the folder (created); an existing PNG of the same name is replaced.
        source: what ``model`` was loaded from, to word the error.
        size: long side of each PNG, px (at least the image's own size).

    Raises:
        ConfigError: ``model`` is ``None``.
    """

    def __init__(
        self, model: nn.Module | None, out_dir: str | Path, *, source: str, size: int = 256
    ) -> None:
        if model is None:
            raise ConfigError(
                f"--saliency needs the PyTorch model to compute Grad-CAM gradients; got a "
                f"{source} model. Pass the run directory, or a .safetensors export (`medcl "
                "export RUN_DIR -f safetensors`), as the model."
            )
        self.model = model.eval()
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.size = size
        self._taken: set[str] = set()

    def _name(self, source: str) -> Path:
        """A safe, unused file name after ``source``'s (``a/b/scan.nii.gz`` -> ``scan.png``)."""
        name = Path(source.rstrip("/\\")).name or "input"
        for suffix in _SUFFIXES:
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        stem = _UNSAFE.sub("_", name).strip("._") or "input"
        candidate, n = stem, 1
        while candidate.lower() in self._taken:  # same name in two folders: scan-1.png, ...
            candidate, n = f"{stem}-{n}", n + 1
        self._taken.add(candidate.lower())
        return self.dir / f"{candidate}.png"

    def write(self, rows: Sequence[dict[str, Any]], x: torch.Tensor) -> None:
        """Write the overlay of each image and set ``row["saliency"]`` to its path.

        Args:
            rows: the prediction rows of ``x``'s images (their ``input`` names the file).
            x: ``(B, C, H, W[, D])`` float in [0, 1], as the model gets it.
        """
        maps = grad_cam(self.model, x)  # (B, H, W[, D]), the predicted class
        for row, image, cam in zip(rows, x, maps, strict=True):
            path = self._name(str(row["input"]))
            size = max(self.size, *image.shape[1:3])
            path.write_bytes(overlay_png(image, cam, size=size))
            row["saliency"] = str(path)
