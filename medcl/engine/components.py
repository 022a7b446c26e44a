"""What a run is built from: its scenario, strategy and replay memory, from a validated config."""

from __future__ import annotations

__all__ = ["build_components"]

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


def build_components(cfg: RunConfig) -> tuple[Scenario, Strategy, ReplayMemory]:
    """Scenario, strategy and memory from a validated config (no training)."""
    from medcl.data.scenarios import build_scenario

    with run_file_cache(cfg):  # data.cache / cache_dir / workers
        scenario = build_scenario(
            cfg.scenario.name,
            root=cfg.data.root,
            download=cfg.data.download,
            seed=cfg.seed,
            **cfg.scenario.options,
        )
    seed_everything(cfg.seed)  # model initialisation
    shape = scenario.input_shape
    backbone = create_backbone(
        cfg.model.backbone,
        in_chans=shape[0],
        spatial_dims=len(shape) - 1,
        small_input=cfg.model.small_input,
        pretrained=cfg.model.pretrained,
        checkpoint_path=cfg.model.checkpoint_path,
        width=cfg.model.width,
    )
    strategy = create_strategy(
        cfg.strategy.name, backbone, scenario_kind=scenario.kind, **cfg.strategy.options
    )
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
