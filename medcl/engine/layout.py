"""A run directory's layout: the one place the name of each file in it is spelled.

::

    config.yaml, scenario.json, model.json         what was run (written once, never on resume)
    environment.json                               software and machine, one entry per start
    metrics.json                                   accuracy matrices, summary, timing, compute
    curves.csv                                     old/new/all accuracy every k updates
    predictions/after-NNN.npz + .csv               test probabilities after each experience
    checkpoints/exp-NNN/ + latest.json             resumable state (atomic, safetensors)
    calibration/after-NNN.json                     temperature + conformal thresholds per model
    tensorboard/                                   experiment log (``logging``; rank 0 only)
    report.html, report.json, model_card.md        ``medcl report`` / ``medcl card``
    gate/after-NNN.json, deployed.json             ``medcl gate``: decisions, the deployed model
    export/                                        ``medcl export`` (default output folder)
    ood/after-NNN.safetensors                      out-of-distribution statistics (cached)

Every module that reads or writes a run goes through :class:`RunLayout`; ``RunLayout(Path())``
gives the names relative to the run directory (as stored in ``deployed.json``).
"""

from __future__ import annotations

__all__ = ["RunLayout", "checkpoint_name"]

from pathlib import Path


def checkpoint_name(k: int) -> str:
    """``"exp-003"``: the checkpoint folder of the model after experience ``k``."""
    return f"exp-{k:03d}"


def _after(k: int) -> str:
    return f"after-{k:03d}"


class RunLayout:
    """The paths of one run directory's files (see the module docstring for what each holds).

    Attributes:
        root: the run directory (``<output_dir>/<run name>``).
        config, scenario, model, environment: what was run.
        metrics, curves, predictions, tensorboard: results (``predictions`` is a folder).
        checkpoints, latest: the checkpoint folders and the pointer to the newest one.
        report_html, report_json, model_card, gate, deployed, export, ood: what later
            commands add (``gate``, ``export`` and ``ood`` are folders).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = root = Path(root)
        # what was run: written by the first start, never rewritten on resume
        self.config = root / "config.yaml"
        self.scenario = root / "scenario.json"
        self.model = root / "model.json"
        self.environment = root / "environment.json"  # one entry per start
        # results, after each experience
        self.metrics = root / "metrics.json"
        self.curves = root / "curves.csv"
        self.predictions = root / "predictions"
        self.tensorboard = root / "tensorboard"
        # resumable state
        self.checkpoints = root / "checkpoints"
        self.latest = self.checkpoints / "latest.json"  # {"checkpoint": "exp-NNN", "completed"}
        self.calibration = root / "calibration"  # post-hoc calibration after each experience
        # the clinical report and the model card
        self.report_html = root / "report.html"
        self.report_json = root / "report.json"
        self.model_card = root / "model_card.md"
        # deployment: gate decisions, the deployed pointer, exports, OOD statistics
        self.gate = root / "gate"
        self.deployed = root / "deployed.json"
        self.export = root / "export"
        self.ood = root / "ood"

    def checkpoint(self, k: int) -> Path:
        """``checkpoints/exp-NNN``: the state after experience ``k``."""
        return self.checkpoints / checkpoint_name(k)

    def predictions_after(self, k: int, suffix: str = ".npz") -> Path:
        """``predictions/after-NNN.npz`` (probabilities) or ``.csv`` (per-row metadata)."""
        return self.predictions / f"{_after(k)}{suffix}"

    def calibration_after(self, k: int) -> Path:
        """``calibration/after-NNN.json``: temperature and conformal thresholds of the model
        after experience ``k`` (:mod:`medcl.engine.posthoc`)."""
        return self.calibration / f"{_after(k)}.json"

    def gate_after(self, k: int) -> Path:
        """``gate/after-NNN.json``: the gate's decision on the model after experience ``k``."""
        return self.gate / f"{_after(k)}.json"

    def ood_after(self, k: int) -> Path:
        """``ood/after-NNN.safetensors``: OOD statistics of the model after experience ``k``."""
        return self.ood / f"{_after(k)}.safetensors"
