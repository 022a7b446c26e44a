"""Strategy hyper-parameters, declared once: a frozen keyword-only dataclass per family.

A strategy's options are the fields of its ``Options`` dataclass, with types and defaults; the
range rules sit beside them (:meth:`StrategyOptions.check`). A method built on another extends
that method's options instead of repeating them (``DynaMMoOptions(ACLOptions)``). The
strategy's constructor takes the options as keywords and :func:`sign_constructor` states them
as its signature, so ``inspect.signature``, ``help()`` and the documentation show typed keyword
arguments with defaults, written in one place.
"""

from __future__ import annotations

__all__ = ["StrategyOptions", "keyword_signature", "option_defaults", "sign_constructor"]

import inspect
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, kw_only=True)
class StrategyOptions:
    """Base of every strategy's options (it has none itself).

    A field declared with ``init=False`` is fixed by the method (e.g. MC-SGD's single
    endpoint), not an option a config can set.
    """

    def check(self, component: str) -> None:
        """Raise :class:`~medcl.errors.ConfigError` for values outside their ranges.

        Args:
            component: the strategy, only to word messages (``"strategy 'acl'"``).
        """


def option_defaults(options: type[StrategyOptions]) -> dict[str, Any]:
    """``{name: default}`` of the options a config can set, in declaration order."""
    return {f.name: f.default for f in fields(options) if f.init}


def keyword_signature(options: type[StrategyOptions]) -> inspect.Signature:
    """``(self, backbone, *, <option>: <type> = <default>, ...)``: a strategy constructor's.

    Annotations are kept as written in the dataclass (``"Literal['mean', 'ties']"``).
    """
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    leading = [
        inspect.Parameter("self", positional),
        inspect.Parameter("backbone", positional, annotation="Backbone"),
    ]
    keywords = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
        )
        for f in fields(options)
        if f.init
    ]
    return inspect.Signature([*leading, *keywords])


def sign_constructor(cls: type) -> None:
    """Give a strategy class's ``__init__`` the keyword signature of its ``Options``.

    A class that declares ``Options`` but no constructor gets one that forwards to its parent's
    (the signature is an attribute of the function, so each class needs its own); a class that
    declares neither keeps its parent's constructor and signature.
    """
    if "__init__" not in vars(cls):
        if "Options" not in vars(cls):
            return

        def __init__(self: Any, backbone: Any, **options: Any) -> None:
            super(cls, self).__init__(backbone, **options)

        cls.__init__ = __init__
    cls.__init__.__signature__ = keyword_signature(cls.Options)
