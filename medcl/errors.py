"""Error types. Every message states the rule, the value received and the fix."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "MedclError", "did_you_mean"]

import difflib
from collections.abc import Iterable


class MedclError(Exception):
    """Base class of every error medcl raises on purpose (the CLI prints it and exits 2)."""


class ConfigError(MedclError, ValueError):
    """A configuration key, value or name is invalid."""


class DataError(MedclError, ValueError):
    """A data file, manifest or array is missing, corrupt or malformed."""


def did_you_mean(name: str, choices: Iterable[str], *, max_listed: int = 25) -> str:
    """Return ``"did you mean 'x'? available: a, b"`` for an unknown ``name``.

    Long choice lists (e.g. every timm model) show only the closest matches.
    """
    choices = sorted(set(choices))
    close = difflib.get_close_matches(
        name, choices, n=5 if len(choices) > max_listed else 1, cutoff=0.5
    )
    hint = f"did you mean {close[0]!r}? " if close else ""
    if len(choices) > max_listed:
        near = f" (closest: {', '.join(close)})" if len(close) > 1 else ""
        return f"{hint}{len(choices)} choices{near}"
    return f"{hint}available: {', '.join(choices) if choices else '(none)'}"
