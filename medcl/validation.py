"""Validate keyword options from a config against a callable's signature (strategies, scenarios)."""

from __future__ import annotations

__all__ = ["format_validation_error", "validated_kwargs"]

import inspect
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pydantic
from pydantic import ConfigDict, TypeAdapter, ValidationError

from medcl.errors import ConfigError, did_you_mean

_ADAPTER_CONFIG = ConfigDict(arbitrary_types_allowed=True)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or re.sub(r"\b(?:[a-z_]\w*\.)+", "", str(hint))


def validated_kwargs(
    fn: Callable[..., Any],
    params: Mapping[str, Any],
    *,
    component: str,
    section: str,
    skip: Iterable[str] = ("self",),
) -> dict[str, Any]:
    """Check ``params`` against ``fn``'s keyword parameters and coerce them to the annotated types.

    Args:
        fn: the constructor or builder.
        params: options from the config.
        component: what is being configured, only to word messages (``"strategy 'ewc'"``).
        section: the config section holding the options (``"strategy"``), to name keys.
        skip: parameters supplied by medcl itself, not by the user.

    Raises:
        ConfigError: unknown option (with the closest valid name), a missing required option or
            a value of the wrong type.
    """
    sig = inspect.signature(fn)
    skip = set(skip)
    valid = {
        n: p
        for n, p in sig.parameters.items()
        if n not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    for key in params:
        if key not in valid:
            raise ConfigError(f"{component} has no option {key!r}; {did_you_mean(key, valid)}")
    missing = [k for k, p in valid.items() if p.default is p.empty and k not in params]
    if missing:
        raise ConfigError(
            f"{component} needs option(s) {missing}; add them under `{section}:` in the config."
        )
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # unresolvable annotation: check what can be checked
        hints = {k: p.annotation for k, p in valid.items() if not isinstance(p.annotation, str)}
    out = {}
    for key, value in params.items():
        hint = hints.get(key, Any)
        hint = Any if hint is inspect.Parameter.empty else hint
        try:
            out[key] = TypeAdapter(hint, config=_ADAPTER_CONFIG).validate_python(value)
        except ValidationError as e:
            first = e.errors()[0]
            where = "".join(f"[{p!r}]" for p in first["loc"] if not isinstance(p, str))
            raise ConfigError(
                f"`{section}.{key}` must be {_type_name(hint)}; got {value!r} "
                f"({first['msg'].lower()}{' at ' + where if where else ''}). Fix the value of "
                f"{key!r} for {component}."
            ) from None
    return out


def format_validation_error(e: pydantic.ValidationError, *, prefix: str = "") -> str:
    """One line per problem: ``key.path: message (got value)``."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        got = f" (got {err['input']!r})" if "input" in err and err["type"] != "missing" else ""
        lines.append(f"{prefix + ': ' if prefix else ''}`{loc}`: {err['msg']}{got}")
    return "\n".join(lines)
