"""Checkpoints: safetensors tensors + JSON state, written atomically, loaded without pickle.

Layout of one checkpoint directory::

    strategy.safetensors   the strategy's state_dict (model, adapters, Fisher, ...)
    memory.safetensors     replay-memory indices
    state.json             everything else (experiences seen, metrics so far, config hash)

A directory is first written under a temporary name and then renamed, so a crash (even
``kill -9``) leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

__all__ = ["atomic_write_text", "json_dumps", "load_checkpoint", "save_checkpoint"]

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from medcl.errors import DataError


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file + ``os.replace`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return _finite_or_none(obj.item())
    return obj


def json_dumps(obj: Any, *, indent: int | None = 1) -> str:
    """Strict JSON: NaN and +/-Inf (undefined metrics) become ``null``, never bare ``NaN``.

    ``json.dumps`` would write ``NaN``, which is not JSON (jq, JavaScript and strict parsers
    reject it). Readers turn ``null`` back into NaN: ``np.array(values, dtype=float)``.
    """
    return json.dumps(_finite_or_none(obj), indent=indent, allow_nan=False, default=float)


def _tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # clone: safetensors refuses shared or non-contiguous storage
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    path: Path, *, strategy: dict[str, Tensor], memory: dict[str, Tensor], state: dict[str, Any]
) -> Path:
    """Write a checkpoint directory atomically and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_file(_tensors(strategy), str(tmp / "strategy.safetensors"))
        save_file(_tensors(memory), str(tmp / "memory.safetensors"))
        (tmp / "state.json").write_text(json_dumps(state))
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """Read ``(strategy tensors, memory tensors, state)`` from a checkpoint directory.

    Raises:
        DataError: missing or unreadable files (with the path and how to recover).
    """
    path = Path(path)
    files = [path / n for n in ("strategy.safetensors", "memory.safetensors", "state.json")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"checkpoint {path} is incomplete (missing {missing}); resume from an "
            "earlier checkpoint or start the run again without --resume."
        )
    try:
        return load_file(str(files[0])), load_file(str(files[1])), json.loads(files[2].read_text())
    except Exception as e:
        raise DataError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}).") from e
