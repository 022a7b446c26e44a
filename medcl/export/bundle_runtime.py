"""The pieces a medcl MONAI bundle's ``configs/inference.json`` references by ``_target_``.

- :class:`BundleNetwork`: the bundle's ``network_def``. It rebuilds the exported architecture
  from ``configs/metadata.json`` (weights come from ``models/model.pt`` through MONAI's
  ``CheckpointLoader``); ``forward`` returns the class probabilities only, one tensor, as
  ``verify_net_in_out`` and MONAI inferers expect; :meth:`BundleNetwork.outputs` adds the
  routed head and the OOD score.
- :class:`GuardedInferer`: the inferer that asks the network for all three outputs.
- :class:`PredictionWriter`: an ignite handler writing ``predictions.csv`` with the columns
  of ``medcl predict`` (probabilities, class, route, ``ood`` and its reason).

Everything else in ``inference.json`` is stock MONAI (``LoadImaged``, ``Resized``,
``Dataset``, ``DataLoader``, ``CheckpointLoader``, ``SupervisedEvaluator``).
"""

from __future__ import annotations

__all__ = ["BundleNetwork", "GuardedInferer", "PredictionWriter", "read_bundle_metadata"]

import json
from pathlib import Path
from typing import Any

import torch
from monai.inferers import Inferer
from torch import Tensor, nn

from medcl.errors import ConfigError


def read_bundle_metadata(bundle: str | Path) -> dict[str, Any]:
    """The ``medcl`` section of ``BUNDLE/configs/metadata.json``."""
    path = Path(bundle) / "configs" / "metadata.json"
    if not path.is_file():
        raise ConfigError(f"{bundle} is not a medcl bundle: {path} is missing.")
    meta = json.loads(path.read_text())
    if "medcl" not in meta:
        raise ConfigError(f"{path} has no 'medcl' section; re-export with `medcl export`.")
    return meta["medcl"]


class BundleNetwork(nn.Module):
    """The bundle's network: ``(B, C, H, W[, D])`` in [0, 1] -> probabilities ``(B, K)``.

    Args:
        bundle_root: the bundle folder (its ``configs/metadata.json`` holds the architecture).
        module: an :class:`~medcl.export.loading.ExportModule` to wrap instead (export time).
    """

    def __init__(self, bundle_root: str = ".", module: nn.Module | None = None) -> None:
        super().__init__()
        if module is None:
            from medcl.export.exporters import rebuild_module

            meta = read_bundle_metadata(bundle_root)
            if "rebuild" not in meta:
                raise ConfigError(
                    f"{bundle_root}: configs/metadata.json has no medcl.rebuild section; "
                    "export the bundle again with `medcl export -f bundle`."
                )
            module = rebuild_module(meta, meta["rebuild"])
        self.module = module

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Probabilities ``(B, K)``, route ``(B,)`` (-1: none), OOD score ``(B,)``."""
        return self.module(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)[0]


class GuardedInferer(Inferer):
    """Run :meth:`BundleNetwork.outputs`: ``{"probabilities", "route", "ood_score"}``."""

    def __call__(self, inputs: Tensor, network: nn.Module, *args: Any, **kwargs: Any):
        probs, route, score = network.outputs(inputs)
        return {"probabilities": probs, "route": route, "ood_score": score}


class PredictionWriter:
    """Ignite handler: collect each batch's outputs, write ``output_dir/predictions.csv``.

    Args:
        output_dir: where ``predictions.csv`` goes.
        bundle_root: the bundle folder (class names, routes, OOD threshold, training facts).
        reject_ood: leave ``predicted_class`` empty for out-of-distribution rows.
        path_key: batch key holding each input's path.
    """

    def __init__(
        self,
        output_dir: str,
        bundle_root: str = ".",
        reject_ood: bool = False,
        path_key: str = "path",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.meta = read_bundle_metadata(bundle_root)
        self.reject_ood, self.path_key = reject_ood, path_key
        self.paths: list[str] = []
        self.outputs: list[dict[str, Tensor]] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine) -> None:
        self.paths, self.outputs = [], []

    def _collect(self, engine) -> None:
        self.paths.extend(str(p) for p in engine.state.batch[self.path_key])
        pred = engine.state.output["pred"]
        self.outputs.append({k: v.detach().cpu() for k, v in pred.items()})

    def _write(self, engine) -> None:
        from medcl.export.predict import prediction_rows

        cat = {
            k: torch.cat([o[k] for o in self.outputs])
            for k in ("probabilities", "route", "ood_score")
        }
        rows = [{"input": p, "status": "ok", "error": ""} for p in self.paths]
        df = prediction_rows(
            rows,
            list(range(len(rows))),
            cat["probabilities"].numpy(),
            cat["route"].numpy(),
            cat["ood_score"].numpy(),
            self.meta,
            reject_ood=self.reject_ood,
        )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        df.to_csv(self.output_dir / "predictions.csv", index=False)
