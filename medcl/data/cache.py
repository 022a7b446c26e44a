"""How file cohorts are held: in RAM (``memory``) or decoded once to disk (``persistent``).

``memory`` decodes every file through MONAI's ``CacheDataset`` into one in-RAM tensor (fast,
bounded by RAM). ``persistent`` decodes through MONAI's ``PersistentDataset`` (each preprocessed
image saved under ``cache_dir``, so later runs skip decoding) with DataLoader workers, into a
disk-backed tensor (:mod:`medcl.data.disk`): the cohort may be larger than RAM. ``auto`` picks
``persistent`` when the float32 images would take more than half of the RAM available now.
Either way the same images and labels reach the trainer.

A run sets its choice (config ``data.cache``, ``data.cache_dir``, ``data.workers``) for every
file source it loads with :func:`file_cache`; a source mapping can still set its own
(``{"manifest": "cohort.csv", "cache": "persistent"}``).
"""

from __future__ import annotations

__all__ = [
    "CACHE_MODES",
    "CacheMode",
    "FileCache",
    "choose_cache",
    "current_file_cache",
    "file_cache",
    "run_file_cache",
]

import contextlib
import logging
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from medcl.config import CacheMode
from medcl.data.disk import available_memory
from medcl.errors import ConfigError

if TYPE_CHECKING:
    from medcl.config import RunConfig

#: Values of ``data.cache`` / a file source's ``cache`` option.
CACHE_MODES: tuple[str, ...] = get_args(CacheMode)
#: ``auto`` goes to disk above this fraction of the RAM available.
AUTO_FRACTION = 0.5
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileCache:
    """Where and how file cohorts are decoded.

    Attributes:
        mode: ``"auto"``, ``"memory"`` or ``"persistent"`` (see the module docstring).
        cache_dir: folder of the persistent cache (default ``$XDG_CACHE_HOME/medcl/data``,
            i.e. ``~/.cache/medcl/data``; a run uses ``<output_dir>/.cache/data``).
        workers: DataLoader / CacheDataset worker processes (default ``min(4, CPUs)``).
    """

    mode: CacheMode = "auto"
    cache_dir: Path | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise ConfigError(
                f"cache must be one of {list(CACHE_MODES)}; got {self.mode!r}. Use 'persistent' "
                "for cohorts larger than RAM, 'memory' to keep every image in RAM."
            )
        if self.workers is not None and (
            not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0
        ):
            raise ConfigError(f"workers must be an int >= 0; got {self.workers!r}.")

    @property
    def folder(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "medcl" / "data"

    @property
    def num_workers(self) -> int:
        return self.workers if self.workers is not None else min(4, os.cpu_count() or 1)


_CURRENT: ContextVar[FileCache] = ContextVar("medcl_file_cache", default=FileCache())  # noqa: B039


def current_file_cache() -> FileCache:
    """The setting in force (the innermost :func:`file_cache`, else ``FileCache()``)."""
    return _CURRENT.get()


@contextlib.contextmanager
def file_cache(
    mode: CacheMode = "auto", *, cache_dir: str | Path | None = None, workers: int | None = None
) -> Iterator[FileCache]:
    """Load the file sources of this block with ``mode`` / ``cache_dir`` / ``workers``.

    Example::

        with file_cache("persistent", cache_dir="runs/.cache/data"):
            scenario = build_scenario("domain-incremental", sites=[...])
    """
    setting = FileCache(mode, Path(cache_dir) if cache_dir is not None else None, workers)
    token = _CURRENT.set(setting)
    try:
        yield setting
    finally:
        _CURRENT.reset(token)


def run_file_cache(cfg: RunConfig) -> contextlib.AbstractContextManager[FileCache]:
    """The :func:`file_cache` block a run loads its file sources in: the config's
    ``data.cache`` / ``data.cache_dir`` (default ``<output_dir>/.cache/data``) / ``data.workers``.
    """
    folder = cfg.data.cache_folder(cfg.output_dir)
    return file_cache(cfg.data.cache, cache_dir=folder, workers=cfg.data.workers)


def choose_cache(setting: FileCache, nbytes: int, *, where: str) -> FileCache:
    """Resolve ``auto`` from the size estimate ``nbytes`` of the decoded float32 images."""
    if setting.mode != "auto":
        return setting
    free = available_memory()
    mode = "persistent" if nbytes > AUTO_FRACTION * free else "memory"
    log.info(
        "%s: about %.2f GiB of float32 images, %.2f GiB RAM available -> cache=%s "
        "(set data.cache to choose)",
        where,
        nbytes / 2**30,
        free / 2**30,
        mode,
    )
    return replace(setting, mode=mode)
