"""Rebuild a finished run's strategy and wrap its deployable model for export and inference.

:class:`ExportModule` is what every format stores: ``[0, 1]`` images -> class probabilities and
the routed head (``-1`` for models that do not route), so an exported file needs nothing but
the intensity scaling recorded in its metadata.
"""

from __future__ import annotations

__all__ = ["ExportModule", "guarded_module", "load_run_strategy", "run_metadata"]

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medcl.data.experience import Scenario
from medcl.data.transforms import INPUT_MEAN, INPUT_STD
from medcl.errors import ConfigError
from medcl.export.ood import (
    DEFAULT_FALSE_ALARM_RATE,
    MahalanobisScore,
    acquisition_facts,
    fit_mahalanobis,
)
from medcl.models.adapters import forward_with_adapters
from medcl.models.backbones import find_backbone
from medcl.strategies.base import Strategy
from medcl.strategies.dynammo import RoutedAdapterModel, route_min_others

FORMAT_VERSION = 1


def load_run_strategy(
    run_dir: str | Path, *, experience: int | None = None, allow_partial: bool = False
) -> tuple[Scenario, Strategy]:
    """The scenario and the strategy of ``run_dir`` restored from a checkpoint.

    Args:
        run_dir: the run directory.
        experience: the model after this experience; default the final one.
        allow_partial: for an unfinished run, accept the last completed experience (without it,
            or ``experience``, an unfinished run is an error).
    """
    from medcl.engine.run import restore_run

    run_dir = Path(run_dir)
    latest = run_dir / "checkpoints" / "latest.json"
    if not (run_dir / "config.yaml").is_file() or not latest.is_file():
        raise ConfigError(
            f"{run_dir} is not a finished run directory (needs config.yaml and "
            "checkpoints/latest.json); pass the folder `medcl run` printed."
        )
    _, scenario, strategy, _, _ = restore_run(
        run_dir, experience, allow_partial=allow_partial, command="export or predict"
    )
    strategy.cpu().eval()
    return scenario, strategy


class ExportModule(nn.Module):
    """Deployable model + input normalisation + softmax + OOD score, routed head when it routes.

    Args:
        model: the strategy's :meth:`~medcl.strategies.base.Strategy.deployable_model`.
        ood: the fitted feature-space score (:class:`~medcl.export.ood.MahalanobisScore`);
            ``None`` returns a score of 0 (no guard).
    """

    def __init__(self, model: nn.Module, ood: MahalanobisScore | None = None) -> None:
        super().__init__()
        self.model = model
        self.routed = isinstance(model, RoutedAdapterModel)
        self.ood = ood

    def _features_scores(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised ``x`` -> features ``(B, F)``, class scores ``(B, K)``, route ``(B,)``."""
        m = self.model
        if self.routed:
            sets = m.adapter_sets
            f = forward_with_adapters(m.backbone, sets[0] if len(sets) else None, x)  # (B, F)
            logits = [h(f) for h in m.heads] if len(sets) <= 1 else m.head_logits(x)
            scores = route_min_others(logits, [h.classes for h in m.heads], m.num_classes)
            others = torch.stack([torch.softmax(z, 1)[:, -1] for z in logits], 1)  # (B, H)
            return f, scores, others.argmin(1)
        if hasattr(m, "forward_features") and hasattr(m, "forward_head"):
            f = m.forward_features(x)
            scores = m.forward_head(f)
        else:  # a model without timm's interface: the guard works on its scores
            scores = m(x)
            f = scores
        return f, scores, torch.full_like(scores[:, 0], -1, dtype=torch.long)

    def features(self, x: Tensor) -> Tensor:
        """``(B, C, *spatial)`` in [0, 1] -> ``(B, F)`` features the OOD score is fitted on."""
        return self._features_scores((x - INPUT_MEAN) / INPUT_STD)[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, C, H, W[, D])`` float in [0, 1] -> probabilities ``(B, K)``, route ``(B,)``,
        OOD score ``(B,)``.

        ``route`` is the index of the head each sample was routed to (int64), ``-1`` when the
        model has no routing; the OOD score is the feature distance compared with the
        threshold in the metadata (``ood.threshold``), 0 without a guard.
        """
        x = (x - INPUT_MEAN) / INPUT_STD  # medcl.data.transforms.to_model_input on [0, 1] floats
        f, scores, route = self._features_scores(x)
        score = self.ood(f) if self.ood is not None else torch.zeros_like(scores[:, 0])
        return torch.softmax(scores.float(), 1), route, score.float()


def run_metadata(
    run_dir: str | Path, scenario: Scenario, strategy: Strategy, *, experience: int | None = None
) -> dict[str, Any]:
    """What inference needs to reproduce training preprocessing, and where the model came from.

    ``experience`` is the experience the model was restored after (default: the last completed
    one); ``model_after_experience`` records it, with whether it is the run's final model.
    """
    from medcl.engine.rundir import run_progress

    run_dir = Path(run_dir).resolve()
    progress = run_progress(run_dir)
    after = progress.completed if experience is None else experience
    shape = list(scenario.input_shape)
    mode = "uint8" if scenario[0].train.images.dtype == torch.uint8 else "minmax"
    model = strategy.deployable_model()
    routes = [i.to_dict() for i in strategy.seen] if isinstance(model, RoutedAdapterModel) else []
    metrics = run_dir / "metrics.json"
    summary = json.loads(metrics.read_text()).get("summary", {}) if metrics.is_file() else {}
    if after != progress.completed:  # metrics.json summarises the last completed experience
        summary = {}
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
            # [0, 1] -> (x - 0.5) / 0.5, then the backbone re-normalises to its weights' mean/std
            "normalise": {"mean": INPUT_MEAN, "std": INPUT_STD, "inside_model": True},
            "weights": find_backbone(strategy).preprocessing.to_dict(),
        },
        "outputs": {
            "probabilities": "(B, K) softmax",
            "route": "(B,) head index, -1: none",
            "ood_score": "(B,) feature distance; > ood.threshold: out of distribution",
        },
        "routes": [r.get("name", str(r.get("index"))) for r in routes],
        "model_after_experience": {
            "index": after,
            "name": progress.names[after] if after < progress.total else "",
            "experiences_in_run": progress.total,
            "final": after == progress.total - 1,
        },
        "strategy": strategy.name,
        "scenario": scenario.name,
        "run": {"dir": str(run_dir), "name": run_dir.name, "summary": summary},
    }


def _digest(model: nn.Module) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _subset(images: Tensor, n: int, seed: int) -> Tensor:
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return idx.sort().values


def _as01(x: Tensor) -> Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def guarded_module(
    run_dir: str | Path,
    scenario: Scenario,
    strategy: Strategy,
    meta: dict[str, Any],
    *,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    per_experience: int = 500,
) -> ExportModule:
    """The run's :class:`ExportModule` with its OOD guard; ``meta`` gains ``ood``,
    ``acquisition`` and ``preprocessing``.

    The guard is fitted on up to ``per_experience`` training and validation images of every
    experience the model has learned (seeded subsample) and cached in
    ``RUN_DIR/ood/after-NNN.safetensors`` (written atomically), so export and predict use the
    same threshold.
    """
    import os

    from safetensors.torch import load_file, save_file

    from medcl.data.preprocessing import Preprocessing

    after = int(meta["model_after_experience"]["index"])
    module = ExportModule(strategy.deployable_model()).eval()
    cache = Path(run_dir) / "ood" / f"after-{after:03d}.safetensors"
    wanted = {
        "false_alarm_rate": false_alarm_rate,
        "per_experience": per_experience,
        "model": _digest(module.model),  # a retrained model in the same folder refits
    }
    record = None
    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("medcl_ood", "{}"))
        if header.get("options") == wanted:
            tensors = load_file(str(cache))
            score = MahalanobisScore(tensors["means"], tensors["precision"])
            record = header["record"]
    if record is None:
        exps = [e for e in scenario.experiences if e.index <= after]
        train = [(e.train, _subset(e.train.images, per_experience, e.index)) for e in exps]
        val = [(e.val, _subset(e.val.images, per_experience, e.index)) for e in exps]
        images = torch.cat([_as01(s.images[i]) for s, i in train])
        labels = torch.cat([s.labels[i] for s, i in train])
        held_out = [_as01(s.images[i]) for s, i in val if len(i)]
        score, record = fit_mahalanobis(
            module.features,
            (images, labels),
            torch.cat(held_out) if held_out else images,
            false_alarm_rate=false_alarm_rate,
        )
        record["threshold_on"] = "validation" if held_out else "training (no validation split)"
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tensors = {"means": score.means.contiguous(), "precision": score.precision.contiguous()}
        save_file(
            tensors, str(tmp), {"medcl_ood": json.dumps({"options": wanted, "record": record})}
        )
        os.replace(tmp, cache)
    module.ood = score.eval()
    meta["ood"] = record
    meta["acquisition"] = acquisition_facts(
        scenario.sources, channels=meta["channels"], spatial_dims=meta["spatial_dims"]
    )
    meta["preprocessing"] = Preprocessing.from_meta(meta).to_dict()
    keep = ("dataset", "modality", "licence", "citation", "task", "dims")  # no paths
    meta["sources_info"] = [{k: str(s[k]) for k in keep if k in s} for s in scenario.sources]
    meta["history"] = [
        {"index": e.index, "name": e.name, "site": e.site}
        for e in scenario.experiences
        if e.index <= after
    ]
    return module
