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


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``"did you mean 'x'? available: a, b"`` for an unknown ``name``."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}available: {', '.join(choices) if choices else '(none)'}"
