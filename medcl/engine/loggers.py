"""Experiment logging through standard loggers: TensorBoard by default, MLflow when configured.

The run logs, on rank 0 only (see :mod:`medcl.engine.distributed`):

| tag | what | step |
|---|---|---|
| ``train/loss`` | mean training loss of the global batch (over ranks) | global update |
| ``train/lr`` | learning rate of the first parameter group | global update |
| ``train/images_per_s`` | training throughput per experience | global update at its end |
| ``curve/{old,new,all}`` | old/new/all accuracy (``train.eval_every``) | global update |
| ``accuracy/exp_J`` | test accuracy on experience J | experiences learned - 1 |
| ``accuracy/seen`` | mean over the experiences seen | experiences learned - 1 |
| ``summary/<metric>`` | metrics.json's summary (final accuracy, BWT, ...) | experiences learned - 1 |

``logging.tensorboard: false`` (and ``logging.mlflow: false``, the default) turns logging off;
``--quiet`` only silences the console. MLflow is imported only when ``logging.mlflow`` is true,
and is not a dependency of medcl (``pip install mlflow``).
"""

from __future__ import annotations

__all__ = [
    "ExperimentLogger",
    "MLflowBackend",
    "TensorBoardBackend",
    "check_logging",
    "create_logger",
]

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from medcl.engine.layout import RunLayout
from medcl.errors import ConfigError

if TYPE_CHECKING:
    from medcl.config import LoggingConfig


class _Backend(Protocol):
    def log(self, values: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardBackend:
    """Scalars into TensorBoard event files (``torch.utils.tensorboard.SummaryWriter``).

    Args:
        log_dir: folder of the event files (``RUN_DIR/tensorboard``); a resumed run appends a new
            event file there, which TensorBoard reads as one continuing run.
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboard is a dependency
            raise ConfigError(
                f"logging.tensorboard is true but tensorboard cannot be imported ({e}); "
                "`pip install tensorboard` or set logging.tensorboard: false."
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


_NO_MLFLOW = (
    "logging.mlflow is true but MLflow is not installed; `pip install mlflow`, or set "
    "logging.mlflow: false (TensorBoard logging does not need it)."
)


def check_logging(cfg: LoggingConfig) -> None:
    """Refuse, before a run writes anything, a logging backend that cannot start.

    Raises:
        ConfigError: ``logging.mlflow`` is true and MLflow is not installed.
    """
    import importlib.util

    if cfg.mlflow and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(_NO_MLFLOW)


class MLflowBackend:
    """Metrics into an MLflow run named after the medcl run (imported only when configured).

    Args:
        run_name: the MLflow run's name (the medcl run's name).
        experiment: MLflow experiment.
        tracking_uri: MLflow tracking URI (None: MLflow's default).
        params: flat ``key -> value`` parameters to record (the resolved config).
    """

    def __init__(
        self,
        run_name: str,
        *,
        experiment: str,
        tracking_uri: str | None,
        params: Mapping[str, object],
    ) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError(_NO_MLFLOW) from None
        self.mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, values: Mapping[str, float], step: int) -> None:
        # MLflow metric names may not contain '/' on every store; keep them readable
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class ExperimentLogger:
    """Fan-out of scalars to the configured backends; without backends it only keeps time.

    Every rank of a DDP job holds one built from the same config, so all ranks agree on when
    the training loss is averaged over ranks (a collective) for a log point; only rank 0 has
    backends.

    Args:
        backends: where scalars go (none: logging is off, or this is not rank 0).
        every: log the training loss and lr every this many updates.
        enabled: whether logging is configured at all (default: any backend); on ranks other
            than 0 it is the config's answer, so that they join the loss averaging.
    """

    def __init__(
        self, backends: Sequence[_Backend] = (), *, every: int = 10, enabled: bool | None = None
    ) -> None:
        self.backends, self.every = list(backends), every
        self.enabled = bool(self.backends) if enabled is None else enabled

    def due(self, update: int) -> bool:
        """Whether update ``update`` (1-based, within the experience) is a training log point."""
        return self.enabled and self.every > 0 and update % self.every == 0

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Write finite ``values`` at ``step`` to every backend (NaN: undefined, not logged)."""
        finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
        if finite:
            for b in self.backends:
                b.log(finite, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


def _flatten(tree: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def create_logger(
    cfg: LoggingConfig,
    run_dir: Path,
    *,
    run_name: str,
    params: Mapping[str, object] | None = None,
    main: bool = True,
) -> ExperimentLogger:
    """The run's logger: backends from ``cfg`` on the main process, none elsewhere.

    Args:
        cfg: the ``logging`` section.
        run_dir: the run directory (TensorBoard writes to ``run_dir/tensorboard``).
        run_name: names the MLflow run.
        params: the resolved config (nested mapping), recorded as MLflow parameters.
        main: rank 0 (or a single process); other ranks get a logger without backends.

    Raises:
        ConfigError: ``logging.mlflow`` is true and MLflow is not installed.
    """
    backends: list[_Backend] = []
    if main and cfg.tensorboard:
        backends.append(TensorBoardBackend(RunLayout(run_dir).tensorboard))
    if main and cfg.mlflow:
        backends.append(
            MLflowBackend(
                run_name,
                experiment=cfg.mlflow_experiment,
                tracking_uri=cfg.mlflow_tracking_uri,
                params=_flatten(params or {}),
            )
        )
    return ExperimentLogger(backends, every=cfg.every, enabled=cfg.tensorboard or cfg.mlflow)
