"""A finished run's model, restored for export and inference, and the metadata that travels with it.

:func:`load_run_model` restores the model from the run directory alone (``config.yaml``,
``model.json``, the checkpoint: :func:`medcl.engine.model_record.restore_model`); a run written
before medcl recorded its data facts is restored with its data (:func:`load_run_strategy`).
:func:`run_metadata` says how inference must preprocess inputs and where the model came from;
:func:`guarded_module` wraps the model with its OOD guard (:mod:`medcl.export.ood`) and its
post-hoc temperature; the conformal thresholds travel in the metadata (:func:`calibration_meta`).
"""

from __future__ import annotations

__all__ = [
    "RunModel",
    "calibration_meta",
    "guarded_module",
    "load_run_model",
    "load_run_strategy",
    "run_metadata",
]

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from medcl.data.experience import Scenario
from medcl.data.preprocessing import Preprocessing
from medcl.data.transforms import INPUT_MEAN, INPUT_STD
from medcl.engine.checkpoint import atomic_file
from medcl.engine.layout import RunLayout
from medcl.engine.model_record import DataFacts, restore_model
from medcl.engine.posthoc import PostHoc, read_posthoc
from medcl.engine.resume import restore_run
from medcl.engine.rundir import run_progress
from medcl.errors import ConfigError
from medcl.export.module import ExportModule
from medcl.export.ood import (
    DEFAULT_FALSE_ALARM_RATE,
    MahalanobisScore,
    acquisition_facts,
    fit_mahalanobis,
)
from medcl.models.backbones import find_backbone
from medcl.strategies.base import Strategy

FORMAT_VERSION = 1


def _check_run_dir(run_dir: Path) -> None:
    files = RunLayout(run_dir)
    if not files.config.is_file() or not files.latest.is_file():
        raise ConfigError(
            f"{run_dir} is not a finished run directory (needs config.yaml and "
            "checkpoints/latest.json); pass the folder `medcl run` printed."
        )


def load_run_strategy(
    run_dir: str | Path, *, experience: int | None = None, allow_partial: bool = False
) -> tuple[Scenario, Strategy]:
    """The scenario (data loaded) and the strategy of ``run_dir`` restored from a checkpoint.

    Args:
        run_dir: the run directory.
        experience: the model after this experience; default the final one.
        allow_partial: for an unfinished run, accept the last completed experience (without it,
            or ``experience``, an unfinished run is an error).
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    _, scenario, strategy, _, _ = restore_run(
        run_dir, experience, allow_partial=allow_partial, command="export or predict"
    )
    strategy.cpu().eval()
    return scenario, strategy


@dataclass
class RunModel:
    """A run's model after one experience and the facts about its data.

    Attributes:
        run_dir: the run directory.
        experience: the model is the one after this experience.
        strategy: the restored strategy (CPU, eval mode).
        data: what export needs to know about the data (no images).
    """

    run_dir: Path
    experience: int
    strategy: Strategy
    data: DataFacts
    _scenario: Scenario | None = field(default=None, repr=False)

    def scenario(self) -> Scenario:
        """The run's data, loaded on first use (only fitting the OOD guard needs images)."""
        if self._scenario is None:
            self._scenario, _ = load_run_strategy(self.run_dir, experience=self.experience)
        return self._scenario


def load_run_model(run_dir: str | Path, *, experience: int) -> RunModel:
    """The model of ``run_dir`` after ``experience``, restored without loading its data.

    A run directory written before medcl recorded its data facts (``model.json["scenario"]``)
    is restored with its data, as :func:`load_run_strategy` does.

    Args:
        run_dir: the run directory.
        experience: a completed experience (:func:`medcl.engine.rundir.select_experience`).

    Raises:
        ConfigError: not a run directory with a checkpoint.
        DataError: the checkpoint is unreadable (the message names the newest readable one).
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    restored = restore_model(run_dir, experience)
    if restored is not None:
        data, strategy = restored
        return RunModel(run_dir, experience, strategy, data)
    scenario, strategy = load_run_strategy(run_dir, experience=experience)
    return RunModel(run_dir, experience, strategy, DataFacts.of(scenario), scenario)


def run_metadata(
    run_dir: str | Path,
    scenario: Scenario | DataFacts,
    strategy: Strategy,
    *,
    experience: int | None = None,
) -> dict[str, Any]:
    """What inference needs to reproduce training preprocessing, and where the model came from.

    Args:
        run_dir: the run directory.
        scenario: the run's scenario, or its facts (:attr:`RunModel.data`: no images needed).
        strategy: the restored strategy.
        experience: the experience the model was restored after (default: the last completed
            one); ``model_after_experience`` records it, with whether it is the final model.
    """
    data = scenario if isinstance(scenario, DataFacts) else DataFacts.of(scenario)
    run_dir = Path(run_dir).resolve()
    progress = run_progress(run_dir)
    after = progress.completed if experience is None else experience
    shape = list(data.input_shape)
    mode = data.intensity
    routed = strategy.deployable_model().routed
    routes = [i.to_dict() for i in strategy.seen] if routed else []
    metrics = RunLayout(run_dir).metrics
    summary = json.loads(metrics.read_text()).get("summary", {}) if metrics.is_file() else {}
    if after != progress.completed:  # metrics.json summarises the last completed experience
        summary = {}
    return {
        "medcl_export_version": FORMAT_VERSION,
        "class_names": list(data.class_names),
        "num_classes": len(data.class_names),
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
            "probabilities": "(B, K) softmax(scores / T), T = calibration.temperatures[top class]",
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
        "scenario": data.name,
        "run": {"dir": str(run_dir), "name": run_dir.name, "summary": summary},
    }


def _digest(model: nn.Module) -> str:
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


def calibration_meta(post: PostHoc | None) -> dict[str, Any]:
    """``meta["calibration"]``: the temperature inside the module and the conformal thresholds
    ``medcl predict`` turns into prediction sets (:mod:`medcl.engine.posthoc`)."""
    if post is None:
        return {
            "temperature": 1.0,
            "temperatures": [1.0],
            "conformal": None,
            "sites": [],
            "fitted_on": None,
            "held_out": None,
            "note": "the run predates post-hoc calibration (no calibration/after-NNN.json): "
            "probabilities are the uncalibrated softmax (T = 1) and there are no prediction sets",
        }
    return {
        "temperature": post.temperature,
        "temperatures": post.temperatures,  # per class (by the top class), or [T]
        "conformal": post.conformal.to_dict() if post.conformal is not None else None,
        "sites": list(post.sites),
        "fitted_on": post.record.get("fitted_on"),
        "held_out": post.record.get("held_out"),
        "note": post.record.get("note", ""),
    }


def guarded_module(
    model: RunModel,
    meta: dict[str, Any],
    *,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    per_experience: int = 500,
) -> ExportModule:
    """The run's :class:`ExportModule` with its OOD guard and temperature; ``meta`` gains
    ``calibration`` (:func:`calibration_meta`), ``ood``, ``acquisition``, ``preprocessing``,
    ``sources_info`` and ``history``.

    The guard is fitted on up to ``per_experience`` training and validation images of every
    experience the model has learned (seeded subsample) and cached in
    ``RUN_DIR/ood/after-NNN.safetensors`` (written atomically), so export and predict use the
    same threshold; only that first fit loads the run's data (:meth:`RunModel.scenario`).
    """
    data = model.data
    after = int(meta["model_after_experience"]["index"])
    module = ExportModule(model.strategy.deployable_model()).eval()
    cache = RunLayout(model.run_dir).ood_after(after)
    wanted = {
        "false_alarm_rate": false_alarm_rate,
        "per_experience": per_experience,
        "model": _digest(module.model),  # a retrained model in the same folder refits
    }
    record = None
    if cache.is_file():
        try:
            with safe_open(str(cache), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("medcl_ood", "{}"))
            if header.get("options") == wanted:
                tensors = load_file(str(cache))
                score = MahalanobisScore(tensors["means"], tensors["precision"])
                record = header["record"]
        except (SafetensorError, OSError, ValueError, KeyError):
            record = None  # a damaged cache is refitted and rewritten
    if record is None:
        exps = [e for e in model.scenario().experiences if e.index <= after]
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
        tensors = {"means": score.means.contiguous(), "precision": score.precision.contiguous()}
        header = {"medcl_ood": json.dumps({"options": wanted, "record": record})}
        with atomic_file(cache) as tmp:
            save_file(tensors, str(tmp), header)
    module.ood = score.eval()
    post = read_posthoc(model.run_dir, after)  # None: a run written before calibration
    module.temperature = torch.tensor(post.temperatures if post is not None else [1.0])
    meta["calibration"] = calibration_meta(post)
    meta["ood"] = record
    meta["acquisition"] = acquisition_facts(
        data.sources, channels=meta["channels"], spatial_dims=meta["spatial_dims"]
    )
    meta["preprocessing"] = Preprocessing.from_meta(meta).to_dict()
    meta["sources_info"] = [dict(s) for s in data.sources]  # no paths (DataFacts.of)
    meta["history"] = [dict(e) for e in data.experiences if e["index"] <= after]
    return module
