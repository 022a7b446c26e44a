"""Progress bars for long phases, and the one switch that hides them all (``--quiet``).

Every phase of a run that can take more than a couple of seconds (training, stage-2 re-tuning,
memory selection, evaluation, writing predictions, checkpoints, the report) shows a tqdm line
made by :func:`progress_bar`. :func:`show_progress` turns them off for a block, e.g. a run
started with ``quiet=True`` or a process other than rank 0; the setting is a context variable,
so library code deep in a strategy needs no ``quiet`` argument.
"""

from __future__ import annotations

__all__ = ["progress_bar", "progress_shown", "show_progress"]

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm.auto import tqdm

_SHOWN: ContextVar[bool] = ContextVar("medcl_progress_shown", default=True)


@contextmanager
def show_progress(shown: bool) -> Iterator[None]:
    """Within the block, progress bars are shown only if ``shown`` (and not hidden outside)."""
    token = _SHOWN.set(_SHOWN.get() and shown)
    try:
        yield
    finally:
        _SHOWN.reset(token)


def progress_shown() -> bool:
    """Whether progress bars are shown here."""
    return _SHOWN.get()


def progress_bar(
    *, total: int | None, desc: str | None, unit: str = "it", hide: bool = False
) -> tqdm:
    """A transient tqdm bar (cleared when closed); disabled under ``show_progress(False)``.

    Args:
        total: steps expected.
        desc: what is being done, e.g. ``"exp 2 retinamnist: evaluate"``.
        unit: what a step is (``"img"``, ``"epoch"``).
        hide: also hide it (a phase too short to need one).
    """
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=hide or not _SHOWN.get(),
        leave=False,
        dynamic_ncols=True,
    )
