"""Back to a saved model: load a checkpoint, or rebuild a whole run at one experience.

``medcl run --resume`` loads the latest checkpoint (:func:`restore_checkpoint`);
``medcl update``, ``report`` and the export of an older run rebuild the run's components
and load the model after one experience (:func:`restore_run`).
"""

from __future__ import annotations

__all__ = ["restore_checkpoint", "restore_run"]

import json
from pathlib import Path

from medcl.config import RunConfig, load_config
from medcl.data.experience import Scenario
from medcl.data.memory import ReplayMemory
from medcl.data.partition import read_site_part
from medcl.engine.checkpoint import load_checkpoint
from medcl.engine.cohort import extend_scenario
from medcl.engine.components import build_components
from medcl.engine.layout import RunLayout, checkpoint_name
from medcl.engine.rundir import readable_checkpoints, select_experience
from medcl.engine.state import RunState
from medcl.errors import DataError
from medcl.strategies.base import ExperienceInfo, Strategy


def restore_checkpoint(
    run_dir: Path, strategy: Strategy, memory: ReplayMemory, *, experience: int | None = None
) -> RunState:
    """Load the checkpoint after ``experience`` (default: the latest) into strategy and memory.

    Raises:
        DataError: the checkpoint is unreadable; the message names the newest readable one and
            the ``--resume-from`` that continues from it.
    """
    files = RunLayout(run_dir)
    if experience is None:
        latest = files.latest
        try:
            name = str(json.loads(latest.read_text())["checkpoint"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            have = sorted(p.name for p in latest.parent.glob("exp-*") if p.is_dir())
            raise DataError(
                f"{latest} could not be read ({type(e).__name__}: {e}), so the last checkpoint "
                f"is unknown. Continue after experience K of one of {have or 'no checkpoints'} "
                f"with `medcl run {files.config} --resume-from K`, or start again "
                "under another name (--set name=NEW_NAME)."
            ) from None
    else:
        name = checkpoint_name(experience)
    try:
        tensors, mem, raw = load_checkpoint(files.checkpoints / name)
    except DataError as e:
        k = int(name[4:])
        good = readable_checkpoints(run_dir, below=k)
        cmd = f"medcl run {files.config}"
        hint = (
            f"The newest readable checkpoint is after experience {good[0]}: continue from it "
            f"with `{cmd} --resume-from {good[0]}` (experiences {good[0] + 1}..{k} are trained "
            "again, with the same seeds), or use that model with --experience "
            f"{good[0]} in report/export/predict."
            if good
            else f"No earlier checkpoint is readable; start again under a new name: `{cmd} "
            "--set name=NEW_NAME`."
        )
        raise DataError(f"{e} {hint}") from None
    state = RunState.from_json(raw)
    strategy.rebuild([ExperienceInfo.from_dict(d) for d in state.seen])
    strategy.load_state_dict(tensors)
    memory.load_state_dict(mem)
    return state


def restore_run(
    run_dir: str | Path,
    experience: int | None = None,
    *,
    allow_partial: bool = False,
    command: str = "this command",
) -> tuple[RunConfig, Scenario, Strategy, ReplayMemory, RunState]:
    """Rebuild a run's components and load the model after one experience.

    Args:
        run_dir: the run directory.
        experience: which model (``--experience K``); default the final one.
        allow_partial: for an unfinished run, accept the last completed experience.
        command: only to word the message (``"medcl export"``).

    Returns:
        ``(cfg, scenario, strategy, memory, state)``; the scenario includes the cohorts that
        ``medcl update`` added up to that experience.

    Raises:
        ConfigError: not a run, or an unfinished run without ``experience``/``allow_partial``.
        DataError: the checkpoint is unreadable (the message offers the newest readable one).
    """
    run_dir = Path(run_dir)
    k = select_experience(run_dir, experience, allow_partial=allow_partial, command=command)
    cfg = load_config(RunLayout(run_dir).config)
    scenario, strategy, memory = build_components(cfg)
    scenario = read_site_part(run_dir, scenario)  # a federated site's directory: its rows only
    memory.attach(scenario.experiences)
    state = restore_checkpoint(run_dir, strategy, memory, experience=k)
    for extra in state.extra_experiences:
        scenario = extend_scenario(
            scenario,
            extra["data"],
            extra["site"],
            cfg=cfg,
            new_classes=extra.get("new_classes", True),
            replay=True,
        )
    return cfg, scenario, strategy, memory, state
