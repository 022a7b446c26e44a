"""Validate keyword options from a config against a callable's keyword-only signature."""

from __future__ import annotations

__all__ = ["format_validation_error", "validated_kwargs"]

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, get_type_hints

import pydantic

from medcl.errors import ConfigError, did_you_mean


def validated_kwargs(
    fn: Callable[..., Any],
    params: Mapping[str, Any],
    *,
    component: str,
    skip: Iterable[str] = ("self",),
) -> dict[str, Any]:
    """Check ``params`` against ``fn``'s parameters and coerce them to the annotated types.

    Args:
        fn: the constructor or builder.
        params: options from the config.
        component: name used only to word messages (``"strategy 'ewc'"``).
        skip: parameters supplied by medcl itself, not by the user.

    Raises:
        ConfigError: unknown option (with the closest valid name) or a value of the wrong type.
    """
    sig = inspect.signature(fn)
    skip = set(skip)
    accepted = {
        n: p
        for n, p in sig.parameters.items()
        if n not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    for key in params:
        if key not in accepted:
            raise ConfigError(f"{component} has no option {key!r}; {did_you_mean(key, accepted)}")
    missing = [n for n, p in accepted.items() if p.default is p.empty and n not in params]
    if missing:
        raise ConfigError(f"{component} needs option(s) {missing}; add them to the config.")
    hints = get_type_hints(fn)
    fields = {
        n: (hints.get(n, Any), p.default if p.default is not p.empty else ...)
        for n, p in accepted.items()
    }
    model = pydantic.create_model(
        f"{component}_options",
        __config__=pydantic.ConfigDict(arbitrary_types_allowed=True, extra="forbid"),
        **fields,
    )
    try:
        validated = model(**params)
    except pydantic.ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix=component)) from None
    return {k: getattr(validated, k) for k in params}


def format_validation_error(e: pydantic.ValidationError, *, prefix: str = "") -> str:
    """One line per problem: ``key.path: message (got value)``."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        got = f" (got {err['input']!r})" if "input" in err and err["type"] != "missing" else ""
        lines.append(f"{prefix + ': ' if prefix else ''}`{loc}`: {err['msg']}{got}")
    return "\n".join(lines)
