"""One small registry mechanism, used for backbones, strategies and scenarios (like timm's)."""

from __future__ import annotations

__all__ = ["Registry"]

import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

from medcl.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map with ``register`` decorator, glob ``list`` and helpful lookup errors.

    Args:
        kind: what the registry holds, used only to word messages ("strategy", "scenario").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name is an error."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ConfigError(
                    f"{self.kind} {name!r} is already registered (by {self._items[name]!r}); "
                    "pick another name."
                )
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object registered as ``name``.

        Raises:
            ConfigError: unknown name, with the closest match and every valid choice.
        """
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; {did_you_mean(name, self._items)}"
            ) from None

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a glob ``pattern`` (``list("*replay*")``)."""
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
