"""The optional packages of export (``pip install "medcl[export]"``), imported when first used."""

from __future__ import annotations

__all__ = ["EXPORT_EXTRA", "require"]

import importlib
from types import ModuleType

from medcl.errors import ConfigError

#: What ``pip install "medcl[export]"`` installs, by import name.
EXPORT_EXTRA = {
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "ignite": "pytorch-ignite",
}


def require(module: str, *, purpose: str) -> ModuleType:
    """Import ``module`` (one of :data:`EXPORT_EXTRA` or a submodule of one).

    Args:
        module: the import name, e.g. ``"onnxruntime"`` or ``"ignite.engine"``.
        purpose: what needs it, only to word the message (``"ONNX export"``).

    Raises:
        ConfigError: the package is not installed; the message says how to install it.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = EXPORT_EXTRA.get(module.split(".")[0], module.split(".")[0])
        raise ConfigError(
            f"{purpose} needs the package {package!r}, which is not installed; install the "
            f'export extra: pip install "medcl[export]" (or pip install {package}).'
        ) from None
