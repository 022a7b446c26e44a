"""Run configuration: YAML validated on load, with ``--set a.b=value`` overrides.

Unknown keys, wrong types and unknown names are errors that name the key and the valid choices.
Scenario and strategy sections are open (their options are checked against the chosen builder's
or strategy's own signature when the run is built).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from medcl import config_federation, config_sections
from medcl.config_federation import FederationConfig, TLSConfig  # noqa: F401  (listed in __all__)
from medcl.config_sections import (  # noqa: F401  (listed in __all__ through config_sections.__all__)
    CacheMode,
    CalibrationConfig,
    DataConfig,
    EvalConfig,
    EvalFuture,
    LoggingConfig,
    MemoryConfig,
    ModelConfig,
    RunConfig,
    ScenarioConfig,
    StrategyConfig,
    TrainConfig,
)
from medcl.errors import ConfigError
from medcl.validation import format_validation_error

# Loading, overrides and comparison (here) and the section models (config_sections, imported above).
__all__ = ["apply_overrides", "config_changes", "load_config", "read_yaml", "resolved_yaml"]
__all__ += config_sections.__all__ + config_federation.__all__


def _suggest_key(loc: Sequence[str | int]) -> str:
    """For an extra key, name the valid keys of its section."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
            return ""
        model = field.annotation
    valid = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f" {hint}valid keys: {', '.join(valid)}"


def validate_config(raw: Mapping[str, Any], *, source: str = "config") -> RunConfig:
    """Validate a config mapping into a :class:`RunConfig`."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"{source}: unknown key `{loc}`.{_suggest_key(err['loc'])}")
            elif err["type"] == "missing":
                lines.append(f"{source}: missing required key `{loc}`.")
            else:
                lines.append(
                    format_validation_error(
                        ValidationError.from_exception_data(e.title, [err]), prefix=source
                    )
                )
        raise ConfigError("\n".join(lines)) from None


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.1, ...}``: every value of a nested mapping under its dotted key."""
    if not isinstance(node, Mapping) or not node:
        return {prefix.removesuffix("."): node}
    return {
        k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()
    }


#: Settings a resumed run may change: they decide how fast it runs, not what it learns (a thread
#: count unlike the first start's is reported on resume, see medcl.engine.threads).
RESUMABLE = ("train.num_threads",)


def config_changes(saved: Any, current: RunConfig) -> list[str]:
    """The settings that differ between a run's saved config and ``current``.

    ``saved`` (a run's ``config.yaml``, parsed) is first filled in with this version's
    defaults, so a key added to medcl since the run was written changes nothing; the
    :data:`RESUMABLE` settings are not compared.

    Returns:
        ``["train.lr: 0.05 -> 0.1", ...]`` (dotted keys, JSON values, ``(not set)`` when a key
        is absent on one side); empty when the two configs are the same.
    """
    try:
        old = json.loads(validate_config(saved).model_dump_json())
    except ConfigError:  # written by another medcl version: compare it as it stands
        old = saved if isinstance(saved, Mapping) else {}
    a, b = _leaves(old), _leaves(json.loads(current.model_dump_json()))

    def show(key: str, side: dict[str, Any]) -> str:
        return json.dumps(side[key], default=str) if key in side else "(not set)"

    absent = object()
    keys = dict.fromkeys(k for k in [*b, *a] if k not in RESUMABLE)  # the current config's order
    return [
        f"{k}: {show(k, a)} -> {show(k, b)}" for k in keys if a.get(k, absent) != b.get(k, absent)
    ]


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML: ``3``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=2); got {item!r}.")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section.")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(
                f"--set {key}: the value {value!r} is not valid YAML ({problem}); quote it, "
                f"e.g. --set '{key}=\"{value}\"'."
            ) from None
    return raw


def _duplicate_keys(node: yaml.Node, path: tuple[str, ...] = ()):
    """Yield ``(dotted key, first line, repeated line)`` for every key given twice in a mapping.

    YAML itself keeps the last value silently; a config must never do that.
    """
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key != "<<" and key in seen:  # "<<" is a merge key, not a setting
                yield ".".join((*path, key)), seen[key], line
            seen.setdefault(key, line)
            yield from _duplicate_keys(value, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            yield from _duplicate_keys(value, (*path, str(i)))


def _yaml_syntax_error(path: Path, e: yaml.YAMLError) -> str:
    """One line naming the file and, for a marked error, the line and column."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        context = f" ({e.context}, line {e.context_mark.line + 1})" if e.context_mark else ""
        return (
            f"{path} is not valid YAML: {e.problem} at line {mark.line + 1}, column "
            f"{mark.column + 1}{context}. Fix the syntax there (e.g. a missing space after ':', "
            "a tab used for indentation, an unclosed bracket or quote)."
        )
    return f"{path} is not valid YAML ({' '.join(str(e).split())}). Fix the syntax."


def read_yaml(path: str | Path, *, what: str = "config file", example: str = "") -> Any:
    """Read a YAML file that holds settings (a run config, the gate's criteria).

    Args:
        path: the file.
        what: how messages name it (``"gate criteria file"``).
        example: where to find an example, for the message (default: ``configs/``).

    Returns:
        The parsed YAML (``None`` for an empty file).

    Raises:
        ConfigError: missing or unreadable file, bad YAML (the message names the file, line and
            column), or a key given twice.
    """
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"{what} {str(path)!r} {state}; {example or 'see configs/ for examples'}."
        )
    try:
        text = path.read_text()
        dups = list(_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader)))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_syntax_error(path, e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} could not be read ({e}).") from None
    if dups:
        raise ConfigError(
            "\n".join(
                f"{path}: key `{key}` is given twice (lines {first} and {again}); YAML would "
                "silently keep the last one. Remove one of them."
                for key, first, again in dups
            )
        )
    return raw


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config, apply overrides, validate.

    Nothing heavy is imported (no torch, MONAI or timm): a mistake is reported at once.

    Raises:
        ConfigError: missing/unreadable file, bad YAML, a key given twice, unknown key, wrong
            type.
    """
    path = Path(path)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} must be a YAML mapping at the top level; got {type(raw).__name__}."
        )
    return validate_config(apply_overrides(raw, overrides), source=str(path))


def resolved_yaml(cfg: RunConfig) -> str:
    """The config with every default filled in, as a run writes it to ``config.yaml``."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
