"""Continual-learning strategies: one file per method, all registered by name.

Every public module of this package is imported here, so a new ``strategies/<method>.py``
whose class carries ``@register_strategy("name")`` is available without editing this file.
"""

from __future__ import annotations

import importlib
import pkgutil

from medcl.strategies import base
from medcl.strategies.base import (  # noqa: F401  (listed in __all__ through base.__all__)
    STRATEGIES,
    Batch,
    Classifier,
    ExperienceInfo,
    Strategy,
    create_strategy,
    list_strategies,
    register_strategy,
)
from medcl.strategies.options import StrategyOptions

# The package's names: the strategy interface (all of base's, imported above) and the options.
__all__ = ["StrategyOptions"]
__all__ += base.__all__

# A strategy registers by being a module of this package: import every public module once.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
