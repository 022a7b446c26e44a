"""Rebuild a finished run's strategy and wrap its deployable model for export and inference.

:class:`ExportModule` is what every format stores: ``[0, 1]`` images -> class probabilities and
the routed head (``-1`` for models that do not route), so an exported file needs nothing but
the intensity scaling recorded in its metadata.
"""

from __future__ import annotations

__all__ = ["ExportModule", "load_run_strategy", "run_metadata"]

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medcl.data.experience import Scenario
from medcl.data.transforms import INPUT_MEAN, INPUT_STD
from medcl.errors import ConfigError
from medcl.strategies.base import Strategy
from medcl.strategies.dynammo import RoutedAdapterModel, route_min_others

FORMAT_VERSION = 1


def load_run_strategy(run_dir: str | Path) -> tuple[Scenario, Strategy]:
    """The scenario and the strategy of ``run_dir`` restored from its latest checkpoint."""
    from medcl.config import load_config
    from medcl.engine.run import _restore, build_components

    run_dir = Path(run_dir)
    latest = run_dir / "checkpoints" / "latest.json"
    if not (run_dir / "config.yaml").is_file() or not latest.is_file():
        raise ConfigError(
            f"{run_dir} is not a finished run directory (needs config.yaml and "
            "checkpoints/latest.json); pass the folder `medcl run` printed."
        )
    cfg = load_config(run_dir / "config.yaml")
    scenario, strategy, memory = build_components(cfg)
    _restore(run_dir, strategy, memory)
    strategy.cpu().eval()
    return scenario, strategy


class ExportModule(nn.Module):
    """Deployable model + input normalisation + softmax, with the routed head when it routes.

    Args:
        model: the strategy's :meth:`~medcl.strategies.base.Strategy.deployable_model`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.routed = isinstance(model, RoutedAdapterModel)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W[, D])`` float in [0, 1] -> probabilities ``(B, K)``, route ``(B,)``.

        ``route`` is the index of the head each sample was routed to (int64), ``-1`` when the
        model has no routing.
        """
        x = (x - INPUT_MEAN) / INPUT_STD  # medcl.data.transforms.to_model_input on [0, 1] floats
        if self.routed:
            m = self.model
            logits = m.head_logits(x)
            classes = [h.classes for h in m.heads]
            scores = route_min_others(logits, classes, m.num_classes)
            others = torch.stack([torch.softmax(z, 1)[:, -1] for z in logits], 1)  # (B, H)
            route = others.argmin(1)
        else:
            scores = self.model(x)
            route = torch.full_like(scores[:, 0], -1, dtype=torch.long)
        return torch.softmax(scores.float(), 1), route


def run_metadata(run_dir: str | Path, scenario: Scenario, strategy: Strategy) -> dict[str, Any]:
    """What inference needs to reproduce training preprocessing, and where the model came from."""
    run_dir = Path(run_dir).resolve()
    shape = list(scenario.input_shape)
    mode = "uint8" if scenario[0].train.images.dtype == torch.uint8 else "minmax"
    model = strategy.deployable_model()
    routes = [i.to_dict() for i in strategy.seen] if isinstance(model, RoutedAdapterModel) else []
    metrics = run_dir / "metrics.json"
    summary = json.loads(metrics.read_text()).get("summary", {}) if metrics.is_file() else {}
    return {
        "medcl_export_version": FORMAT_VERSION,
        "class_names": list(scenario.class_names),
        "num_classes": len(scenario.class_names),
        "input_shape": shape,  # (C, H, W[, D])
        "channels": shape[0],
        "spatial_dims": len(shape) - 1,
        "image_size": shape[1:],
        "intensity": {
            # how the training images reached [0, 1]: 8-bit arrays (MedMNIST) were divided by 255,
            # file sources were rescaled per image; predict must do the same
            "mode": mode,
            "scale": "0..255 -> [0, 1] (MONAI ScaleIntensityRange)"
            if mode == "uint8"
            else "per-image min-max to [0, 1] (MONAI ScaleIntensity)",
            "resize": "bilinear/trilinear with anti-aliasing (MONAI Resize)",
            "channels": "mean for 3->1, repeat for 1->3",
            "normalise": {"mean": INPUT_MEAN, "std": INPUT_STD, "inside_model": True},
        },
        "outputs": {"probabilities": "(B, K) softmax", "route": "(B,) head index, -1: none"},
        "routes": [r.get("name", str(r.get("index"))) for r in routes],
        "strategy": strategy.name,
        "scenario": scenario.name,
        "run": {"dir": str(run_dir), "name": run_dir.name, "summary": summary},
    }
