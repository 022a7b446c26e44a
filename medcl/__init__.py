"""medcl: continual learning for medical images.

The main entry points, imported lazily so ``import medcl`` stays cheap::

    medcl.build_scenario("medmnist-cross3")      # a stream of experiences
    medcl.create_backbone("resnet18", in_chans=3, small_input=True)
    medcl.create_strategy("replay", backbone)
    medcl.run(medcl.load_config("configs/medmnist-cross3-replay.yaml"))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_scenario": "medcl.data.scenarios",
    "list_scenarios": "medcl.data.scenarios",
    "load_source": "medcl.data.sources",
    "create_backbone": "medcl.models.backbones",
    "list_backbones": "medcl.models.backbones",
    "create_strategy": "medcl.strategies",
    "list_strategies": "medcl.strategies",
    "load_config": "medcl.config",
    "run": "medcl.engine.run",
    "update": "medcl.engine.update",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medcl' has no attribute {name!r}")
