"""Checkpoints: safetensors tensors + JSON state, written atomically, loaded without pickle.

Layout of one checkpoint directory::

    strategy.safetensors   the strategy's state_dict (model, adapters, Fisher, ...)
    memory.safetensors     replay-memory indices
    state.json             everything else (experiences seen, metrics so far, config hash)

A directory is first written under a temporary name and then renamed, so a crash (even
``kill -9``) leaves either the previous checkpoint or the new one, never a half-written one.

The atomic-write helpers here (:func:`atomic_write_text`, :func:`atomic_file`,
:func:`atomic_dir`) are the only way medcl writes result files: what they leave has the mode a
plain ``open()`` / ``mkdir`` would give (``0o666`` / ``0o777`` minus the umask, not the private
``0o600`` / ``0o700`` of ``tempfile``), and an interrupted write leaves no temporary file.
"""

from __future__ import annotations

__all__ = [
    "atomic_dir",
    "atomic_file",
    "atomic_write_text",
    "json_dumps",
    "load_checkpoint",
    "save_checkpoint",
    "set_default_mode",
    "write_error",
]

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from medcl.errors import DataError

#: errno values that mean "no room": disk full, quota exceeded, file-size limit (``ulimit -f``).
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: Path) -> None:
    """Give ``path`` (and a folder's contents) the mode a plain ``open()``/``mkdir`` would.

    ``tempfile`` creates private files (0o600) and folders (0o700), and safetensors writes
    through such a file; after the rename they must be as readable as the umask allows.
    """
    mask = _umask()
    paths = [path, *Path(path).rglob("*")] if Path(path).is_dir() else [path]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def write_error(
    what: str, path: Path, e: Exception, *, kept: str = "", then: str = ""
) -> DataError:
    """A :class:`DataError` for a write that failed with ``e`` (``OSError`` or safetensors').

    Args:
        what: what was being written (``"checkpoint"``, ``"exported model"``).
        path: the file or folder.
        e: the error; safetensors reports the OS error only in its text (``os error 28``).
        kept: what survived, e.g. ``"the previous checkpoint is kept"``.
        then: what to do after the fix, e.g. ``"continue the run with --resume"``.
    """
    text = str(e)
    code = e.errno if isinstance(e, OSError) else None
    reason = e.strerror if isinstance(e, OSError) and e.strerror else text.split("I/O error: ")[-1]
    no_room = code in _NO_ROOM or any(f"os error {n})" in text for n in _NO_ROOM)
    fix = (
        "free disk space or raise the file-size limit (`ulimit -f`), or write to another folder"
        if no_room
        else "check that the folder exists and is writable, or write to another folder"
    )
    why = "disk full / file too large: " if no_room else ""
    kept = f"; {kept}" if kept else ""
    then = f"; then {then}" if then else ""
    return DataError(f"could not write {what} {path} ({why}{reason}){kept}. Fix: {fix}{then}.")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file + ``os.replace`` (atomic on POSIX).

    Raises:
        DataError: the disk is full or the file-size limit is reached (the old file is kept).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        set_default_mode(Path(tmp))
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in _NO_ROOM:  # permissions etc.: the CLI names the path and the reason
            raise
        kept = "the previous version is kept" if path.exists() else ""
        raise write_error("file", path, e, kept=kept) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it replaces ``path`` only on success.

    On any error or interrupt (``KeyboardInterrupt`` included) the temporary file is removed and
    an existing ``path`` is left as it was. Its hidden name (``.NAME.partial``) is fixed, so a
    write killed with ``kill -9`` leaves a file the next write of ``path`` removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        set_default_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` only on success.

    As :func:`atomic_file`, for folders (a checkpoint, a bundle): on any error or interrupt the
    temporary folder (``.NAME.partial``) is removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed write
    if old.is_dir() and not path.exists():  # killed between the two renames below
        os.replace(old, path)
    tmp.mkdir()
    try:
        yield tmp
        set_default_mode(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Write a checkpoint directory atomically and return its path.

    Raises:
        DataError: the write failed (disk full, file-size limit, permissions); the message says
            why, and any previous checkpoint is left as it was.
    """
    path = Path(path)
    try:
        with atomic_dir(path) as tmp:
            save_file(_tensors(strategy), str(tmp / "strategy.safetensors"))
            save_file(_tensors(memory), str(tmp / "memory.safetensors"))
            (tmp / "state.json").write_text(json_dumps(state))
    except (OSError, SafetensorError) as e:
        kept = "earlier checkpoints are kept" if _others(path) else "no checkpoint was saved"
        then = "continue the run with --resume"
        raise write_error("checkpoint", path, e, kept=kept, then=then) from None
    return path


def _others(path: Path) -> bool:
    """Whether ``path``'s folder holds other (non-hidden) entries, e.g. earlier checkpoints."""
    folder = path.parent
    return folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())


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
