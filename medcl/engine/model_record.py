"""A run's model restored from its run directory alone, without loading any data.

``medcl export`` and ``medcl predict RUN_DIR`` need the trained network and a few facts about
the data it learned from (class names, input shape, intensity scaling, sources, experiences):
:class:`DataFacts`. A run records them beside the rest of what it records:

- ``model.json["scenario"]``: the scenario the run started with (written at the first start);
- each ``medcl update`` cohort's entry in the checkpoint state
  (``extra_experiences[i]["scenario"]``): the scenario once that cohort had joined.

:func:`restore_model` builds the strategy from ``config.yaml`` and those facts
(:func:`build_strategy`: no pretrained weights are fetched, the checkpoint holds every weight)
and loads the checkpoint. A run written
before medcl recorded the facts gives ``None``: restore it with its data
(:func:`medcl.engine.resume.restore_run`).
"""

from __future__ import annotations

__all__ = ["DataFacts", "build_strategy", "data_facts", "restore_model"]

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from medcl.config import load_config
from medcl.data.experience import Scenario
from medcl.data.memory import ReplayMemory
from medcl.engine.layout import RunLayout
from medcl.engine.resume import restore_checkpoint
from medcl.engine.trainer import seed_everything
from medcl.models.backbones import create_backbone
from medcl.models.weights import Preprocessing
from medcl.strategies import create_strategy
from medcl.strategies.base import Strategy

#: Keys of a source description that export keeps (descriptions of file sources hold paths).
SOURCE_KEYS = ("dataset", "modality", "licence", "citation", "task", "dims")


@dataclass(frozen=True)
class DataFacts:
    """What export needs to know about a scenario, without its images.

    Attributes:
        name: the scenario's name.
        kind: ``"class"``, ``"domain"``, ``"task"`` or ``"cross-dataset"``.
        class_names: the name of each global class id.
        input_shape: ``(C, H, W[, D])`` of the model's input.
        intensity: how training images reached [0, 1]: ``"uint8"`` (8-bit arrays divided by
            255, MedMNIST) or ``"minmax"`` (file sources, rescaled per image).
        sources: the source descriptions, :data:`SOURCE_KEYS` only (no paths).
        experiences: ``{"index", "name", "site"}`` of every experience.
    """

    name: str
    kind: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    intensity: Literal["uint8", "minmax"]
    sources: tuple[dict[str, str], ...]
    experiences: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, scenario: Scenario) -> DataFacts:
        """The facts of a loaded scenario."""
        uint8 = scenario[0].train.images.dtype == torch.uint8
        return cls(
            name=scenario.name,
            kind=scenario.kind,
            class_names=tuple(scenario.class_names),
            input_shape=tuple(int(n) for n in scenario.input_shape),
            intensity="uint8" if uint8 else "minmax",
            sources=tuple({k: str(s[k]) for k in SOURCE_KEYS if k in s} for s in scenario.sources),
            experiences=tuple(
                {"index": e.index, "name": e.name, "site": e.site} for e in scenario.experiences
            ),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataFacts:
        """Read what :meth:`to_dict` wrote."""
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            class_names=tuple(d["class_names"]),
            input_shape=tuple(d["input_shape"]),
            intensity=d["intensity"],
            sources=tuple(dict(s) for s in d["sources"]),
            experiences=tuple(dict(e) for e in d["experiences"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types."""
        return json.loads(json.dumps(asdict(self)))


def data_facts(scenario: Scenario) -> dict[str, Any]:
    """What a run records about ``scenario`` (``model.json["scenario"]``, update cohorts)."""
    return DataFacts.of(scenario).to_dict()


def build_strategy(
    backbone: str,
    strategy: str,
    options: Mapping[str, Any],
    *,
    input_shape: Sequence[int],
    small_input: bool,
    width: float,
    scenario_kind: str,
    preprocessing: Preprocessing | None = None,
) -> Strategy:
    """An untrained strategy of a recorded architecture, for a checkpoint or export to fill.

    The backbone is built without pretrained weights (every weight comes from the file loaded
    next).

    Args:
        backbone, small_input, width: the run's ``model`` config.
        strategy, options: the strategy's name and options (the run's ``strategy`` config).
        input_shape: ``(C, H, W[, D])`` of the model's input.
        scenario_kind: the kind of scenario the strategy was built for.
        preprocessing: what the run's pretrained weights expected (``model.json``); default
            that of random weights.
    """
    net = create_backbone(
        backbone,
        in_chans=input_shape[0],
        spatial_dims=len(input_shape) - 1,
        small_input=small_input,
        pretrained=False,
        checkpoint_path=None,
        width=width,
    )
    if preprocessing is not None:
        net.set_preprocessing(preprocessing)
    return create_strategy(strategy, net, scenario_kind=scenario_kind, **options)


def _model_record(files: RunLayout) -> dict[str, Any]:
    try:
        return json.loads(files.model.read_text())
    except (OSError, ValueError):  # absent or damaged: the caller restores the run with its data
        return {}


def restore_model(run_dir: str | Path, experience: int) -> tuple[DataFacts, Strategy] | None:
    """The strategy after ``experience`` (on the CPU, eval mode) and the facts of its data.

    Args:
        run_dir: the run directory.
        experience: a completed experience (see :func:`medcl.engine.rundir.select_experience`).

    Returns:
        ``(facts, strategy)``, or ``None`` when the run directory lacks the facts (written
        before medcl recorded them).

    Raises:
        DataError: the checkpoint is unreadable (the message names the newest readable one).
    """
    files = RunLayout(Path(run_dir))
    record = _model_record(files)
    if "scenario" not in record or "preprocessing" not in record:
        return None
    first = DataFacts.from_dict(record["scenario"])  # what the strategy was built for
    prep = record["preprocessing"]
    cfg = load_config(files.config)
    seed_everything(cfg.seed)  # as the run did before building the model
    strategy = build_strategy(
        cfg.model.backbone,
        cfg.strategy.name,
        cfg.strategy.options,
        input_shape=first.input_shape,
        small_input=cfg.model.small_input,
        width=cfg.model.width,
        scenario_kind=first.kind,
        preprocessing=Preprocessing(
            tuple(prep["mean"]), tuple(prep["std"]), prep["input_size"], prep["source"]
        ),
    )
    memory = ReplayMemory(cfg.memory.size, selection=cfg.memory.selection, seed=cfg.seed)
    state = restore_checkpoint(files.root, strategy, memory, experience=experience)
    cohorts = [c.get("scenario") for c in state.extra_experiences]
    if None in cohorts:  # a cohort added by a medcl that did not record it
        return None
    facts = DataFacts.from_dict(cohorts[-1]) if cohorts else first
    return facts, strategy.cpu().eval()
