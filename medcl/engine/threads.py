"""CPU threads of a run: ``train.num_threads`` chosen once at start, recorded, checked on resume.

Why it matters. PyTorch's CPU kernels split each operation over an OpenMP team of
``torch.get_num_threads()`` threads that meet at a barrier when it ends. On a shared machine a
thread whose core another process holds loses whole time slices while the rest of the team
waits for it: with torch's default 2 threads beside one busy process, 40 training updates took
62 s; with 1 thread, 0.93 s. Reductions are also split by thread, so the thread count, like
the kernel path (``ATEN_CPU_CAPABILITY``), is part of what makes two runs bit-identical.

``train.num_threads: auto`` (the default) therefore uses the cores that are free *now*:

* **usable cores**: the CPUs this process may run on (``os.sched_getaffinity``: taskset, SLURM
  and container cpusets), at most the container's CPU quota (cgroup v2 ``cpu.max``: ``docker
  --cpus``), at most one thread per physical core (hyperthread siblings share a core's
  arithmetic units) and at most torch's setting when the run starts (its default is one thread
  per physical core, or ``OMP_NUM_THREADS``; a caller's ``torch.set_num_threads`` lowers it).
  Under torchrun that setting is ignored: torchrun sets ``OMP_NUM_THREADS=1`` for every job
  whose user did not;
* **busy cores**: how much of those CPUs other processes used over 0.1 s, from the per-CPU
  counters in ``/proc/stat``. The 1-minute load average (``os.getloadavg``) is no substitute: it
  is an exponential average (a process started 5 s ago counts as 0.08 of a core, one that stopped
  30 s ago as 0.6) over the whole host, CPUs outside the affinity mask included; it is the
  fallback where ``/proc/stat`` does not exist. The run is idle while it samples, so the busy
  time is other processes'; sampling costs 0.1 s once per start;
* a usable core counts as free when it was at least 75% idle. This errs towards fewer threads
  on purpose: a thread too many costs barrier stalls (the 60x above), a thread too few at most
  that core's share;
* under torchrun the free cores are split over the ranks on the machine (``LOCAL_WORLD_SIZE``);
  every rank gets at least 1.

On ``--resume``, ``auto`` keeps the thread count of the run's first start (when this machine
still has that many usable cores), so the resumed run stays bit-identical to an uninterrupted
one; an explicit ``train.num_threads`` is used as given, and when it (or the kernel path)
differs from the first start :func:`resume_warning` says so in one line.

Not set here: ``OMP_WAIT_POLICY`` is read once, when ``import torch`` loads the OpenMP runtime,
so a run cannot change it for itself (see ``benchmarks/threads.py`` for its measured effect);
``torch.set_num_interop_threads`` sizes the pool for ``torch.jit.fork`` and inter-op
parallelism, which the training loop does not use, and may be called once per process only.
"""

from __future__ import annotations

__all__ = [
    "ThreadChoice",
    "busy_cores",
    "first_environment",
    "log_threads",
    "resolve_threads",
    "resume_warning",
    "thread_environment",
    "usable_cores",
    "use_threads",
]

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from medcl.engine.rundir import read_environments
from medcl.errors import MedclError

log = logging.getLogger(__name__)
#: A usable core counts as free when other processes left at least this much of it idle.
FREE_IF_IDLE = 0.75
#: How long :func:`busy_cores` watches the CPU counters.
SAMPLE_SECONDS = 0.1


@dataclass(frozen=True)
class ThreadChoice:
    """The CPU threads a run uses and why.

    Attributes:
        threads: the count passed to ``torch.set_num_threads``.
        requested: ``train.num_threads`` as configured (``"auto"`` or a count).
        reason: how ``threads`` was chosen, in words (logged when the run starts).
    """

    threads: int
    requested: int | Literal["auto"]
    reason: str


def _affinity() -> list[int]:
    """CPUs this process may run on (all of them where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cgroup_quota() -> int | None:
    """Cores allowed by a cgroup v2 CPU quota (``docker --cpus 2``), or ``None`` when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2, or "max" (no quota)
        return None


def _physical_cores(cpus: list[int]) -> int:
    """Distinct physical cores among ``cpus`` (``len(cpus)`` where topology is unreadable)."""
    cores = set()
    for cpu in cpus:
        top = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((top / "physical_package_id").read_text(), (top / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return len(cores)


def usable_cores(*, under_torchrun: bool = False) -> tuple[int, list[int]]:
    """The most threads worth running, and the CPUs this process may use.

    Args:
        under_torchrun: ignore torch's current setting, which torchrun's ``OMP_NUM_THREADS=1``
            made 1 unless the user set it.

    Returns:
        ``(cores, cpus)``: the count is the smallest of the affinity mask's physical cores, the
        cgroup quota and, outside torchrun, ``torch.get_num_threads()`` (torch's default: one
        per physical core, or ``OMP_NUM_THREADS``; or what the caller set).
    """
    cpus = _affinity()
    limits = [_physical_cores(cpus)]
    quota = _cgroup_quota()
    if quota is not None:
        limits.append(quota)
    if not under_torchrun:
        limits.append(torch.get_num_threads())
    return max(1, min(limits)), cpus


def _cpu_times(cpus: list[int]) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (busy, total)}`` jiffies from ``/proc/stat``, or ``None`` where it is unreadable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted, out = set(cpus), {}
    for line in lines:
        name, *fields = line.split() or [""]
        if not name[3:].isdigit() or not name.startswith("cpu") or int(name[3:]) not in wanted:
            continue
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        ticks = [int(v) for v in fields[:8]]
        total = sum(ticks)
        out[int(name[3:])] = (total - ticks[3] - ticks[4], total)
    return out or None


def busy_cores(cpus: list[int], seconds: float = SAMPLE_SECONDS) -> list[float]:
    """The fraction of each CPU in ``cpus`` that other processes used over ``seconds``.

    This process sleeps while it samples, so the busy time is other processes' (and time a
    hypervisor stole). Where ``/proc/stat`` is unreadable, the 1-minute load average is spread
    over the CPUs instead.
    """
    before = _cpu_times(cpus)
    if before is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        return [min(1.0, max(0.0, load - i)) for i in range(len(cpus))]
    time.sleep(seconds)
    after = _cpu_times(cpus) or {}
    out = []
    for cpu, (busy0, total0) in before.items():
        busy1, total1 = after.get(cpu, (busy0, total0))
        out.append((busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0)
    return out


def _free_cores(under_torchrun: bool) -> tuple[int, str]:
    cores, cpus = usable_cores(under_torchrun=under_torchrun)
    busy = busy_cores(cpus)
    free = sum(1 for b in busy if 1.0 - b >= FREE_IF_IDLE)
    cap = f" (threads at most {cores})" if cores < len(cpus) else ""
    why = f"{len(cpus)} usable CPUs{cap}, {sum(busy):.1f} busy with other processes"
    return max(1, min(cores, free)), why


def resolve_threads(
    requested: int | Literal["auto"],
    *,
    local_ranks: int = 1,
    recorded: Mapping[str, Any] | None = None,
) -> ThreadChoice:
    """The thread count for ``train.num_threads``: a count as given, ``auto`` from free cores.

    Args:
        requested: ``"auto"`` or a count >= 1 (validated by :class:`medcl.config.TrainConfig`).
        local_ranks: processes of this job on this machine (torchrun's ``LOCAL_WORLD_SIZE``;
            1 outside torchrun): ``auto`` gives each its share of the free cores.
        recorded: the environment of the run's first start (on ``--resume``): ``auto`` keeps its
            thread count, so that the resumed run stays bit-identical.

    Returns:
        The :class:`ThreadChoice`; nothing is changed (see :func:`use_threads`).
    """
    if requested != "auto":
        return ThreadChoice(int(requested), requested, "train.num_threads")
    under_torchrun = local_ranks > 1
    before = recorded.get("threads") if recorded is not None else None
    if isinstance(before, int) and before >= 1:
        cores, _ = usable_cores(under_torchrun=under_torchrun)
        if before * local_ranks <= cores or before == 1:
            return ThreadChoice(before, "auto", "as the run's first start: kept on resume")
    free, why = _free_cores(under_torchrun)
    if local_ranks > 1:
        share = max(1, free // local_ranks)
        return ThreadChoice(share, "auto", f"{why}, shared by {local_ranks} ranks")
    return ThreadChoice(free, "auto", why)


@contextlib.contextmanager
def use_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block; the caller's setting after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)  # a library call must not change the caller's setting


def thread_environment(requested: int | Literal["auto"]) -> dict[str, Any]:
    """The ``environment.json`` fields that decide CPU results: threads and the kernel path.

    Args:
        requested: ``train.num_threads`` as configured; the thread count recorded is the one
            torch uses now (set by :func:`use_threads`).

    ``cpu_capability`` is the instruction set torch's CPU kernels dispatch to (``AVX2``,
    ``AVX512``, ``DEFAULT``); ``aten_cpu_capability`` the ``ATEN_CPU_CAPABILITY`` that chose it,
    when set.
    """
    return {
        "threads": torch.get_num_threads(),
        "threads_requested": requested,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY") or None,
    }


def first_environment(run_dir: str | Path) -> dict[str, Any] | None:
    """The environment recorded at a run's first start; ``None`` when there is none to read.

    Reads both forms of ``environment.json`` (:func:`~medcl.engine.rundir.read_environments`):
    one mapping, written by earlier medcl versions, and a list with one mapping per start. A
    damaged file gives ``None`` here (the run refuses it when it records this start).
    """
    try:
        envs = read_environments(run_dir)
    except MedclError:
        return None
    return envs[0] if envs else None


def log_threads(choice: ThreadChoice, recorded: Mapping[str, Any] | None) -> None:
    """Say how the threads were chosen (info) and, on resume, what differs (one warning line).

    Call it with the threads in use (inside :func:`use_threads`). Messages go to the ``medcl``
    logger, which the command line prints on stderr.
    """
    log.info("CPU threads: %d (%s)", choice.threads, choice.reason)
    if recorded is not None:
        message = resume_warning(recorded, thread_environment(choice.requested))
        if message:
            log.warning(message)


def resume_warning(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """One line when the threads or kernel path differ from the run's first start, else ``None``.

    Args:
        recorded: the first start's environment (:func:`first_environment`).
        current: this start's :func:`thread_environment`.
    """
    differ, fixes = [], []
    was, now = recorded.get("threads"), current.get("threads")
    if isinstance(was, int) and was != now:
        differ.append(f"{now} CPU thread{'s' * (now != 1)} where the first start used {was}")
        fixes.append(f"train.num_threads: {was} (--set train.num_threads={was})")
    was, now = recorded.get("cpu_capability"), current.get("cpu_capability")
    if isinstance(was, str) and was != now:
        differ.append(f"CPU kernels {now} where the first start used {was}")
        fixes.append(f"ATEN_CPU_CAPABILITY={was.lower()} in the environment")
    if not differ:
        return None
    return (
        f"warning: --resume runs with {' and '.join(differ)}: the results are not guaranteed "
        "bit-identical to an uninterrupted run. To match it, resume with "
        f"{' and '.join(fixes)}."
    )
