"""Scenario registry and its one entry point, :func:`build_scenario` (timm-style).

A scenario builder is a plain function with keyword-only, typed parameters that returns a
:class:`~medcl.data.experience.Scenario`. Every builder also receives ``root``, ``download`` and
``seed`` from :func:`build_scenario`; everything else is a scenario parameter, validated against
the builder's signature before any data is loaded::

    @register_scenario("my-sites")
    def my_sites(*, dataset: str = "pneumoniamnist", n_sites: int = 3, root=None, download=False,
                 seed: int = 0) -> Scenario:
        \"\"\"PneumoniaMNIST over three simulated sites.\"\"\"
        return domain_incremental(dataset=dataset, n_sites=n_sites, root=root, download=download,
                                  seed=seed)

    build_scenario("my-sites", n_sites=4, seed=1)
"""

from __future__ import annotations

__all__ = [
    "CONTEXT_PARAMS",
    "SCENARIOS",
    "build_scenario",
    "list_scenarios",
    "register_scenario",
    "scenario_description",
    "scenario_params",
]

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medcl.data import scenario_builders as _builders
from medcl.data import scenario_presets as _presets
from medcl.data import scenario_sites as _sites
from medcl.data.experience import Scenario
from medcl.errors import ConfigError
from medcl.registry import Registry
from medcl.validation import validated_kwargs

ScenarioBuilder = Callable[..., Scenario]

SCENARIOS: Registry[ScenarioBuilder] = Registry("scenario")
register_scenario = SCENARIOS.register

#: Keyword arguments every builder receives from :func:`build_scenario` itself.
CONTEXT_PARAMS = ("root", "download", "seed")


def list_scenarios(pattern: str = "*") -> list[str]:
    """Sorted names of registered scenarios matching a glob ``pattern`` (``"*sites*"``)."""
    return SCENARIOS.list(pattern)


def scenario_description(name: str) -> str:
    """First line of the builder's docstring (used by ``medcl scenarios list``)."""
    doc = inspect.getdoc(SCENARIOS.get(name)) or ""
    return doc.splitlines()[0] if doc else ""


def scenario_params(name: str) -> dict[str, inspect.Parameter]:
    """The parameters a scenario accepts (without ``root``/``download``/``seed``), in order."""
    sig = inspect.signature(SCENARIOS.get(name))
    return {k: p for k, p in sig.parameters.items() if k not in CONTEXT_PARAMS}


def _validate_params(name: str, builder: ScenarioBuilder, params: dict[str, Any]) -> dict[str, Any]:
    """Check names, required parameters and types of ``params`` against ``builder``'s signature."""
    sig = inspect.signature(builder)
    lacking = [k for k in CONTEXT_PARAMS if k not in sig.parameters]
    if lacking and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        raise ConfigError(
            f"scenario builder {builder.__qualname__} (registered as {name!r}) must accept the "
            f"keyword arguments {list(CONTEXT_PARAMS)}; it lacks {lacking}. Add them to its signature."
        )
    return validated_kwargs(
        builder, params, component=f"scenario {name!r}", section="scenario", skip=CONTEXT_PARAMS
    )


def build_scenario(
    name: str,
    *,
    root: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
    **params: Any,
) -> Scenario:
    """Build the registered scenario ``name``: the one entry point for every stream.

    Args:
        name: registered name (see :func:`list_scenarios`), e.g. ``"medmnist-cross3"``.
        root: data root (else ``$MEDCL_DATA_ROOT``, else medmnist's default ``~/.medmnist``).
        download: fetch missing MedMNIST files from the official source when possible.
        seed: fixes class orders, site partitions and simulated shifts; the same seed always
            gives the same stream.
        **params: the builder's own keyword parameters (see :func:`scenario_params`).

    Returns:
        The scenario, named ``name``.

    Raises:
        ConfigError: unknown scenario or parameter (with the closest match), missing or
            ill-typed parameter, or an invalid value (e.g. a class order with a duplicate).
    """
    builder = SCENARIOS.get(name)
    kwargs = _validate_params(name, builder, params)
    scenario = builder(root=root, download=download, seed=seed, **kwargs)
    return scenario if scenario.name == name else dataclasses.replace(scenario, name=name)


for _name, _fn in {
    "class-incremental": _builders.class_incremental,
    "task-incremental": _builders.task_incremental,
    "cross-dataset": _builders.cross_dataset,
    "domain-incremental": _sites.domain_incremental,
    **_presets.PRESETS,
}.items():
    register_scenario(_name)(_fn)
