"""Continual-learning strategies: one file per method, all registered by name."""

from __future__ import annotations

from medcl.strategies import der as _der  # noqa: F401
from medcl.strategies import dynammo as _dynammo  # noqa: F401
from medcl.strategies import ensemble as _ensemble  # noqa: F401
from medcl.strategies import esacl as _esacl  # noqa: F401
from medcl.strategies import ewc as _ewc  # noqa: F401
from medcl.strategies import finetune as _finetune  # noqa: F401  (registers baselines)
from medcl.strategies import lwf as _lwf  # noqa: F401
from medcl.strategies import mcsgd as _mcsgd  # noqa: F401
from medcl.strategies import sgm as _sgm  # noqa: F401
from medcl.strategies import sparcl as _sparcl  # noqa: F401
from medcl.strategies import subspace as _subspace  # noqa: F401
from medcl.strategies.base import (
    STRATEGIES,
    Batch,
    Classifier,
    ExperienceInfo,
    Strategy,
    create_strategy,
    list_strategies,
    register_strategy,
)

__all__ = [
    "STRATEGIES",
    "Batch",
    "Classifier",
    "ExperienceInfo",
    "Strategy",
    "create_strategy",
    "list_strategies",
    "register_strategy",
]
