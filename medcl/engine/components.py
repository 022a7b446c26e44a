"""What a run is built from: its scenario, strategy and replay memory, from a validated config."""

from __future__ import annotations

__all__ = ["build_components", "initial_strategy"]

from collections.abc import Sequence

import torch

from medcl.config import RunConfig
from medcl.data.cache import run_file_cache
from medcl.data.experience import Scenario
from medcl.data.memory import ReplayMemory
from medcl.engine.trainer import seed_everything
from medcl.errors import ConfigError
from medcl.models.backbones import create_backbone
from medcl.strategies import create_strategy
from medcl.strategies.base import Strategy


def build_components(
    cfg: RunConfig, scenario: Scenario | None = None
) -> tuple[Scenario, Strategy, ReplayMemory]:
    """Scenario, strategy and memory from a validated config (no training).

    ``scenario``: the config's scenario, already built (a federated site keeps it between
    messages in one process); built from the config when None.
    """
    from medcl.data.scenarios import build_scenario

    if scenario is None:
        with run_file_cache(cfg):  # data.cache / cache_dir / workers
            scenario = build_scenario(
                cfg.scenario.name,
                root=cfg.data.root,
                download=cfg.data.download,
                seed=cfg.seed,
                **cfg.scenario.options,
            )
    strategy = initial_strategy(cfg, scenario.input_shape, scenario.kind)
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'."
        )
    strategy.to(device)
    memory = ReplayMemory(cfg.memory.size, selection=cfg.memory.selection, seed=cfg.seed)
    memory.attach(scenario.experiences)
    return scenario, strategy, memory


def initial_strategy(cfg: RunConfig, input_shape: Sequence[int], scenario_kind: str) -> Strategy:
    """The config's untrained strategy for inputs ``(C, *spatial)``, seeded as every run is
    (a federated server builds the same initial model as its sites, without their data); its
    feature cache scores as ``eval`` says (``batch_size``, ``fold_batchnorm``)."""
    seed_everything(cfg.seed)  # model initialisation
    backbone = create_backbone(
        cfg.model.backbone,
        in_chans=input_shape[0],
        spatial_dims=len(input_shape) - 1,
        small_input=cfg.model.small_input,
        pretrained=cfg.model.pretrained,
        checkpoint_path=cfg.model.checkpoint_path,
        width=cfg.model.width,
    )
    strategy = create_strategy(
        cfg.strategy.name, backbone, scenario_kind=scenario_kind, **cfg.strategy.options
    )
    strategy.feature_cache.batch_size = cfg.eval.batch_size  # scoring passes
    strategy.feature_cache.fold_batchnorm = cfg.eval.fold_batchnorm
    return strategy
