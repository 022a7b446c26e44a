"""Error types. Every message states the rule, the value received and the fix."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "MedclError", "check_options", "did_you_mean"]

import difflib
from collections.abc import Iterable
from typing import Any


class MedclError(Exception):
    """Base class of every error medcl raises on purpose (the CLI prints it and exits 2)."""


class ConfigError(MedclError, ValueError):
    """A configuration key, value or name is invalid."""


class DataError(MedclError, ValueError):
    """A data file, manifest or array is missing, corrupt or malformed."""


def check_options(component: str, rule: str, checks: Iterable[tuple[str, Any, bool]]) -> None:
    """Raise one :class:`ConfigError` naming every ``(name, value, ok)`` check that failed.

    ``rule`` states what every option needs (e.g. ``"lr > 0 and batch_size >= 1"``).
    """
    bad = [f"{name}={value}" for name, value, ok in checks if not ok]
    if bad:
        raise ConfigError(
            f"{component}: need {rule}; got {', '.join(bad)}. Fix these options in the strategy "
            "section of the config."
        )


def did_you_mean(
    name: str, choices: Iterable[str], *, max_listed: int = 25, quote: bool = False
) -> str:
    """Return ``"did you mean 'x'? available: a, b"`` for an unknown ``name``.

    Long choice lists (e.g. every timm model) show only the closest matches. ``quote`` lists
    each choice as ``'a', 'b'``: for names from data (class names) that may hold a comma.
    """
    choices = sorted(set(choices))
    close = difflib.get_close_matches(
        name, choices, n=5 if len(choices) > max_listed else 1, cutoff=0.5
    )
    hint = f"did you mean {close[0]!r}? " if close else ""
    show = repr if quote else str
    if len(choices) > max_listed:
        near = f" (closest: {', '.join(map(show, close))})" if len(close) > 1 else ""
        return f"{hint}{len(choices)} choices{near}"
    return f"{hint}available: {', '.join(map(show, choices)) if choices else '(none)'}"
