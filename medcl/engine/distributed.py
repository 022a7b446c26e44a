"""Data-parallel training with ``torchrun``: process group, sharding, DDP wrap, rank-0 writes.

``torchrun --nproc-per-node N -m medcl run CONFIG`` (or ``medcl run CONFIG --nproc N``, which execs
exactly that) starts N copies of the run. Each copy builds the same scenario, model and replay
memory from the same seeds; :func:`session` joins them into one process group (NCCL on CUDA, gloo
on CPU). Per experience:

* every rank draws the same global order of the training rows and the same replay samples (the
  generator is seeded from ``(seed, experience)``, as in a single-process run), and keeps the rows
  ``rank, rank + N, ...`` of each global batch (:meth:`DistContext.shard`): ``train.batch_size``
  and ``memory.replay_batch_size`` are **global**;
* the training step (forward *and* loss, :class:`~medcl.engine.trainer.LossStep`, so that DDP
  sees every parameter the loss uses) is wrapped in
  :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the gradients over ranks;
  each rank's loss is weighted by its share of the global batch
  (:meth:`DistContext.loss_weight`), so the averaged gradient is the gradient of the global-batch
  mean loss, as in one process;
* consolidation (``after_experience``) and the memory update run on every rank from identical
  state; rank 0's result is then broadcast (:meth:`DistContext.sync`), so every rank continues
  from bitwise the same model and memory;
* rank 0 alone evaluates and writes checkpoints, curves, metrics, logs and reports.

Strategies whose training needs every example of the experience on one rank refuse up front
(:data:`REFUSED`, :func:`check_strategy`).
"""

from __future__ import annotations

__all__ = [
    "REFUSED",
    "SINGLE",
    "DistContext",
    "check_strategy",
    "current",
    "env_local_world_size",
    "env_world_size",
    "is_main_process",
    "resolve_backend",
    "session",
    "torchrun_argv",
]

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from medcl.errors import ConfigError

if TYPE_CHECKING:
    from medcl.data.memory import ReplayMemory

#: Strategies that cannot train under DDP, and why (checked before any training).
REFUSED: dict[str, str] = {
    "sparcl": "its dynamic data removal (DDR) ranks every training example by statistics "
    "gathered batch by batch; under DDP each rank sees only its shard of each batch, so the "
    "ranks would drop different examples and their models would diverge",
    "esacl": "its intelligent data selection (IDS) scores every training example (sharpness or "
    "forgetting) batch by batch, and its SAM step back-propagates through a second forward "
    "pass (torch.func.functional_call) that DDP's gradient averaging does not see",
}

BACKENDS = ("auto", "nccl", "gloo")
#: Environment variable that overrides ``train.dist_backend`` (e.g. gloo on a single GPU).
BACKEND_ENV = "MEDCL_DIST_BACKEND"


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_local_world_size() -> int:
    """``LOCAL_WORLD_SIZE`` set by torchrun: this job's processes on this machine (1 outside it).

    They share the machine's cores: ``train.num_threads: auto`` gives each its share
    (:func:`medcl.engine.threads.resolve_threads`).
    """
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """True on rank 0 of a torchrun job, and in a plain single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def check_strategy(name: str, world_size: int) -> None:
    """Refuse, before any training, a strategy that cannot train with ``world_size`` ranks.

    Raises:
        ConfigError: ``world_size > 1`` and the strategy is in :data:`REFUSED`.
    """
    if world_size > 1 and name in REFUSED:
        raise ConfigError(
            f"strategy {name!r} cannot train with {world_size} processes (DDP): "
            f"{REFUSED[name]}. Run it in one process (without --nproc / torchrun), or choose a "
            "strategy that supports DDP (docs/distributed.md lists them)."
        )


def resolve_backend(backend: str, device: torch.device) -> str:
    """The process-group backend: ``$MEDCL_DIST_BACKEND``, else ``backend``; ``auto`` is NCCL on
    CUDA and gloo on CPU.

    Raises:
        ConfigError: an unknown backend, or NCCL without CUDA.
    """
    chosen = os.environ.get(BACKEND_ENV) or backend
    where = f"${BACKEND_ENV}" if os.environ.get(BACKEND_ENV) else "train.dist_backend"
    if chosen not in BACKENDS:
        raise ConfigError(f"{where} must be one of {list(BACKENDS)}; got {chosen!r}.")
    if chosen == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if chosen == "nccl" and device.type != "cuda":
        raise ConfigError(
            f"{where} is 'nccl' but the run trains on {device.type}; NCCL needs CUDA devices. "
            "Use 'gloo' (or 'auto') on CPU."
        )
    return chosen


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel job (``world_size == 1``: no job).

    Attributes:
        rank: global rank (0 writes every file).
        world_size: number of processes.
        backend: the process group's backend (``None`` outside a job).
    """

    rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """This rank's rows ``rank, rank + world_size, ...`` of each global-batch tensor.

        Args:
            tensors: ``(B, ...)`` tensors of one global batch, identical on every rank.

        Returns:
            ``(ceil((B - rank) / world_size), ...)`` slices; together the ranks hold each row once.
        """
        if not self.enabled:
            return tensors
        return tuple(t[self.rank :: self.world_size] for t in tensors)

    def loss_weight(self, local: int, total: int) -> float:
        """Factor on this rank's mean loss so that DDP's gradient *average* over ranks equals the
        gradient of the mean loss over the ``total`` samples of the global batch
        (``sum_r local_r / total * grad(mean_r)``); 1 in a single process."""
        return local * self.world_size / total if self.enabled else 1.0

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in DDP (its parameters broadcast from rank 0), or itself.

        ``find_unused_parameters``: strategies own parameters that a given forward may not use
        (adapters of other experiences, frozen members), which DDP must not wait for.
        """
        if not self.enabled or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        return DistributedDataParallel(
            module,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks (a collective: every rank must call it)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def sync(self, module: nn.Module, memory: ReplayMemory | None = None) -> None:
        """Overwrite every rank's parameters, buffers and replay memory with rank 0's."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)
        if memory is not None:
            state = [memory.state_dict() if self.is_main else None]
            dist.broadcast_object_list(state, src=0)
            memory.load_state_dict(state[0])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = DistContext()


def current() -> DistContext:
    """The job this process belongs to (the process group :func:`session` started)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return SINGLE


@contextlib.contextmanager
def session(*, backend: str = "auto", device: str = "auto") -> Iterator[DistContext]:
    """Join the torchrun job this process was started in (nothing outside torchrun).

    Reads torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR/PORT``), binds
    the process to ``cuda:LOCAL_RANK`` (modulo the visible devices) when it trains on CUDA, and
    starts the process group; the group is destroyed on exit if this call started it.

    Args:
        backend: ``train.dist_backend`` (``auto``, ``nccl``, ``gloo``; ``$MEDCL_DIST_BACKEND``
            overrides it).
        device: ``train.device`` (``auto``, ``cpu``, ``cuda``).

    Yields:
        The :class:`DistContext` (``SINGLE`` when not started by torchrun).
    """
    world = env_world_size()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise ConfigError("this torch build has no torch.distributed; run in one process.")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    name = resolve_backend(backend, torch.device("cuda" if use_cuda else "cpu"))
    local_world = env_local_world_size()
    if name == "nccl" and local_world > torch.cuda.device_count():
        raise ConfigError(
            f"{local_world} processes on this machine but {torch.cuda.device_count()} CUDA "
            "device(s): NCCL needs a device per process. Start at most one process per GPU "
            f"(--nproc / --nproc-per-node), or set {BACKEND_ENV}=gloo to share devices."
        )
    if use_cuda and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(backend=name, timeout=datetime.timedelta(minutes=30))
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def torchrun_argv(nproc: int, args: Sequence[str]) -> list[str]:
    """The command ``medcl run --nproc N`` execs: one node, N processes, a free local port.

    Args:
        nproc: processes on this machine.
        args: the ``medcl`` arguments each process runs (``["run", CONFIG, ...]``).
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "medcl",
        *args,
    ]
