"""A run directory on disk: how far it got, which model a command may use, and its lock.

Every command that reads a run (``report``, ``export``, ``predict``, ``update``) asks
:func:`select_experience` which model to use. A finished run gives its final model. An
unfinished run (interrupted, or still training) is an error unless the user names a model
(``--experience K``) or accepts the last completed one (``--allow-partial``): a half-trained
stream must never be reported or deployed as if it were the final model.

Writers (``run``, ``update``) hold :class:`RunLock`, an exclusive ``fcntl`` lock on
``<output_dir>/.<run name>.lock``, for as long as they write; a second writer is refused with a
message naming the process that holds it. The lock is released by the operating system when the
holder exits, even after ``kill -9``.
"""

from __future__ import annotations

__all__ = [
    "RunLock",
    "RunProgress",
    "check_output_dir",
    "read_environments",
    "readable_checkpoints",
    "run_progress",
    "select_experience",
]

import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medcl.engine.layout import RunLayout
from medcl.errors import ConfigError, DataError


@dataclass(frozen=True)
class RunProgress:
    """How far a run got.

    Attributes:
        run_dir: the run directory.
        completed: index of the last completed experience (``-1``: none yet).
        names: names of every experience of the stream, completed or not.
        checkpoints: indices that have a checkpoint directory (``checkpoints/exp-NNN``).
    """

    run_dir: Path
    completed: int
    names: tuple[str, ...]
    checkpoints: tuple[int, ...]

    @property
    def total(self) -> int:
        return len(self.names)

    @property
    def finished(self) -> bool:
        return self.total > 0 and self.completed == self.total - 1

    def describe(self) -> str:
        """``"completed 2 of 4 experiences (last: site-1)"``."""
        last = f" (last: {self.names[self.completed]})" if 0 <= self.completed < self.total else ""
        return f"completed {self.completed + 1} of {self.total} experiences{last}"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path} could not be read ({type(e).__name__}: {e}); the run directory is damaged. "
            "Resume it with `medcl run CONFIG --resume`, or start it again."
        ) from e


def read_environments(run_dir: str | Path) -> list[dict]:
    """The environment of every start of a run (``environment.json``), the first start first.

    The file holds a JSON list: the software and machine of each start, oldest first.

    A run written before medcl kept one entry per start holds a single mapping: it is read as a
    list of one. No file (nothing started yet): ``[]``.

    Raises:
        DataError: the file is unreadable or holds something else.
    """
    path = RunLayout(run_dir).environment
    if not path.is_file():
        return []
    data = _json(path)
    envs = data if isinstance(data, list) else [data]
    if not all(isinstance(e, dict) for e in envs):
        raise DataError(
            f"{path} must hold a list of mappings (one per start of the run); got "
            f"{type(data).__name__}. Restore it from a backup, or delete it to start a new record."
        )
    return envs


def run_progress(run_dir: str | Path) -> RunProgress:
    """Read ``scenario.json`` and ``checkpoints/latest.json`` (else ``metrics.json``) of a run.

    Raises:
        DataError: ``run_dir`` is not a run directory, or its state files are unreadable.
    """
    run_dir = Path(run_dir)
    files = RunLayout(run_dir)
    if not files.config.is_file() or not files.scenario.is_file():
        raise DataError(
            f"{run_dir} is not a medcl run directory (no config.yaml and scenario.json); "
            "pass the folder `medcl run` printed (runs/<name>)."
        )
    names = tuple(str(e["name"]) for e in _json(files.scenario).get("experiences", []))
    if files.latest.is_file():
        completed = int(_json(files.latest)["completed"])
    elif files.metrics.is_file():  # checkpoints deleted to save space
        completed = len(_json(files.metrics).get("accuracy_matrix") or []) - 1
    else:
        completed = -1
    ckpts = sorted(
        int(p.name[4:])
        for p in files.checkpoints.glob("exp-*")
        if p.is_dir() and p.name[4:].isdigit()
    )
    return RunProgress(run_dir, completed, names, tuple(ckpts))


def select_experience(
    run_dir: str | Path,
    experience: int | None = None,
    *,
    allow_partial: bool = False,
    command: str = "this command",
) -> int:
    """The experience whose model ``command`` should use.

    Args:
        run_dir: the run directory.
        experience: an explicit choice (``--experience K``); must be completed.
        allow_partial: for an unfinished run, use the last completed experience.
        command: the command's name, only to word the message (``"medcl export"``).

    Returns:
        The experience index: the final one of a finished run, or the one chosen.

    Raises:
        ConfigError: an unfinished run without a choice, or a choice that is not completed.
    """
    p = run_progress(run_dir)
    if p.completed < 0:
        raise ConfigError(
            f"{p.run_dir} has not completed any experience yet, so it has no model for "
            f"{command}; let `medcl run` finish at least one experience (or resume it with "
            "`medcl run CONFIG --resume`)."
        )
    if experience is not None:
        if not 0 <= experience <= p.completed:
            raise ConfigError(
                f"--experience {experience}: {p.run_dir} {p.describe()}; choose one of "
                f"0..{p.completed}."
            )
        return int(experience)
    if p.finished or allow_partial:
        return p.completed
    raise ConfigError(
        f"{p.run_dir} is unfinished: it {p.describe()}, so it has no final model for {command}. "
        f"Finish it with `medcl run {RunLayout(p.run_dir).config} --resume`, or pass "
        f"--experience {p.completed} (or --allow-partial) to use the model after experience "
        f"{p.completed}."
    )


def readable_checkpoints(run_dir: str | Path, below: int | None = None) -> list[int]:
    """Indices of checkpoints that load completely (newest first), optionally only ``< below``."""
    from medcl.engine.checkpoint import load_checkpoint

    good = []
    for k in sorted(run_progress(run_dir).checkpoints, reverse=True):
        if below is not None and k >= below:
            continue
        try:
            load_checkpoint(RunLayout(run_dir).checkpoint(k))
        except DataError:
            continue
        good.append(k)
    return good


def check_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` if needed and prove it is a writable folder.

    Raises:
        ConfigError: it is a file, cannot be created, or is not writable (read-only).
    """
    path = Path(output_dir)
    fix = "Set `output_dir` (--set output_dir=PATH) to a writable folder."
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {str(path)!r} exists but is not a folder. {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(
            f"output_dir {str(path)!r} is not writable ({e.strerror or type(e).__name__}). {fix}"
        ) from None
    return path


class RunLock:
    """Exclusive lock on a run directory for the lifetime of a writer (``with RunLock(dir):``).

    The lock file is ``<parent>/.<run name>.lock`` (beside, not inside, the run directory, so a
    refused or failed start leaves no half-made run directory). It records the holder's pid and
    host for the message a second writer sees.

    Raises:
        ConfigError: another process holds the lock.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.parent / f".{self.run_dir.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"run directory {self.run_dir} is in use by another medcl process ({holder}); "
                f"wait for it to finish, or choose another `name` (--set name=...). Lock: {self.path}."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
