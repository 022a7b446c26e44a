"""The sections of a run configuration: one pydantic model per top-level key, and the whole.

Strict sections reject unknown keys; the scenario and strategy sections are open (their extra
keys are options of the named component, checked against its signature when the run is built).
Load and validate configs through :mod:`medcl.config`, which re-exports these models.
"""

from __future__ import annotations

__all__ = [
    "CacheMode",
    "CalibrationConfig",
    "DataConfig",
    "EvalConfig",
    "EvalFuture",
    "FederationConfig",
    "LoggingConfig",
    "MemoryConfig",
    "ModelConfig",
    "RunConfig",
    "ScenarioConfig",
    "StrategyConfig",
    "TrainConfig",
]

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: How file cohorts are held (``data.cache``, a file source's ``cache``; see medcl.data.cache).
CacheMode = Literal["auto", "memory", "persistent"]
#: Which later experiences' test splits are scored after each experience (``eval.future``).
EvalFuture = Literal["next", "all"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """A section whose extra keys are options of the named component."""

    model_config = ConfigDict(extra="allow")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ScenarioConfig(_Open):
    name: str = Field(description="registered scenario, see `medcl scenarios list`")


class StrategyConfig(_Open):
    name: str = Field(description="registered strategy, see `medcl strategies list`")


class ModelConfig(_Strict):
    backbone: str = "resnet18"
    small_input: bool = True
    pretrained: bool | str = Field(
        False,
        description="false; 'hub' (timm's weights, online); or an offline weight source such as "
        "'efficientnet_lite0' (medcl.models.weights.list_weight_sources())",
    )
    checkpoint_path: Path | None = Field(
        None, description="local weights: .safetensors or a torch.save state dict"
    )
    width: float = Field(
        1.0, gt=0, description="channel multiplier (timm ResNets and MONAI 3D backbones)"
    )


class TrainConfig(_Strict):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    max_updates: int | None = Field(None, ge=1, description="cap on updates per experience")
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="stop an experience after this many epochs without a better mean accuracy "
        "on the seen experiences' validation splits and keep the best epoch's weights "
        "(train.epochs is then a cap; null = train every epoch; medcl.engine.early_stopping)",
    )
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    scheduler: Literal["none", "cosine"] = "cosine"
    grad_clip_norm: float | None = Field(
        None, gt=0, description="clip the gradient norm (None = off)"
    )
    augment: Literal["none", "light", "standard"] = "light"
    eval_every: int = Field(
        0, ge=0, description="old/new/all accuracy curves every k updates (0 = off; see eval)"
    )
    compile: bool = Field(
        False,
        description="torch.compile the training step (same weights and checkpoints; off by "
        "default: see benchmarks/results/end_to_end.md)",
    )
    channels_last: bool = Field(
        True,
        description="train and score 2D models in the NHWC memory format (same weights; "
        "checkpoints and exports are contiguous): faster on every 2D backbone measured on CPU "
        "(benchmarks/results/end_to_end.md); 3D models ignore it",
    )
    num_threads: int | Literal["auto"] = Field(
        "auto",
        description="torch CPU threads: a count, or 'auto' = the cores other processes leave "
        "free at the run's start (kept on --resume; see medcl.engine.threads)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 autocast on CUDA (never on CPU: no fast bf16 there)")
    dist_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto",
        description="process-group backend under torchrun: auto = NCCL on CUDA, gloo on CPU "
        "($MEDCL_DIST_BACKEND overrides it)",
    )

    @field_validator("num_threads", mode="before")
    @classmethod
    def _threads(cls, value: Any) -> int | str:
        if value is None:  # older runs wrote null for "torch's default": resume keeps it
            return "auto"
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise ValueError(
            "must be 'auto' (the cores other processes leave free) or a whole number of threads "
            ">= 1; write e.g. `num_threads: 1` under `train:` (--set train.num_threads=1)",
        )


class EvalConfig(_Strict):
    """Evaluation: the every-k curves (``train.eval_every``) and the test sets after each
    experience."""

    curve_subset: int | None = Field(
        200,
        ge=1,
        description="rows of each test set on the every-k curves: a fixed, seeded, "
        "class-stratified subset (null = whole test sets). 200 bounds a point's 95% CI "
        "half-width by 7 accuracy points (5 with two experiences pooled); the test sets are "
        "evaluated in full after each experience",
    )
    future: EvalFuture = Field(
        "next",
        description="after experience i the test splits of experiences 0..i+1 are scored "
        "('next': the one FWT needs), or of every experience ('all': the full upper triangle, "
        "e.g. zero-shot accuracy on every later site; costs a pass over every future test set "
        "after each experience). Entries not scored are NaN (null in metrics.json) in the "
        "accuracy matrices",
    )
    batch_size: int = Field(
        128,
        ge=1,
        description="images per forward pass when scoring (evaluation, curves, herding "
        "features), separate from train.batch_size",
    )


class CalibrationConfig(_Strict):
    """Post-hoc calibration after every experience (:mod:`medcl.engine.posthoc`): a temperature
    and split-conformal prediction sets, fitted on the validation splits of the seen experiences
    (seeded parts: a third fits the temperature, the rest calibrates the sets)."""

    temperature: bool = Field(True, description="fit a temperature (off: T = 1)")
    per_experience: bool | Literal["auto"] = Field(
        "auto",
        description="also one temperature per experience's classes, applied by the predicted "
        "class (class-incremental streams; one for all when every experience has the same "
        "classes); auto: only where their 5-fold cross-validated NLL on the temperature's "
        "rows is lower than one temperature's",
    )
    conformal: bool = Field(True, description="calibrate conformal prediction sets")
    alpha: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="miscoverage: sets hold the label with probability >= 1 - alpha",
    )
    score: Literal["lac", "aps"] = Field(
        "lac",
        description="non-conformity score: lac (1 - p, smallest sets; adapts on two-class "
        "tasks) or aps (ranked mass; three or more classes)",
    )
    confidence: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="null: marginal coverage (>= 1 - alpha on average over calibration draws); "
        "e.g. 0.9: training-conditional thresholds, so that these sets cover >= 1 - alpha with "
        "probability 0.9 over the calibration rows (larger sets; a group needs >= 22 rows at "
        "0.9 and alpha 0.1)",
    )
    mondrian: Literal["none", "site", "class", "site_class"] = Field(
        "site_class",
        description="set thresholds for all rows, per site (experience), per class (keeps "
        "coverage under prevalence shift) or per (site, class)",
    )
    memory: bool = Field(
        False,
        description="also fit the temperature on the replay memory; off by default: the model "
        "was trained on those images, so they are over-confident and pull T down",
    )

    @field_validator("per_experience", mode="before")
    @classmethod
    def _per_experience(cls, value: Any) -> bool | str:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
            return {"auto": "auto", "true": True, "false": False}[value.lower()]
        raise ValueError(
            "must be true, false or 'auto' (one temperature per experience's classes only where "
            "cross-validation prefers it); write e.g. `per_experience: auto` under "
            "`calibration:` (--set calibration.per_experience=auto)"
        )


class MemoryConfig(_Strict):
    size: int = Field(200, ge=0)
    selection: Literal["random", "herding"] = "random"
    replay_batch_size: int | None = Field(None, ge=1, description="default: train.batch_size")


class LoggingConfig(_Strict):
    """Experiment logging (rank 0 only): loss, lr, throughput, curves, per-experience metrics."""

    tensorboard: bool = Field(True, description="TensorBoard event files in RUN_DIR/tensorboard")
    mlflow: bool = Field(False, description="also log to MLflow (needs `pip install mlflow`)")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLflow's own, ./mlruns)"
    )
    mlflow_experiment: str = "medcl"
    every: int = Field(10, ge=1, description="log training loss and lr every k updates")


class DataConfig(_Strict):
    """Where the data comes from and how file cohorts are held (see docs/gpu.md).

    Attributes:
        root: MedMNIST folder (default ``$MEDCL_DATA_ROOT``, else ``~/.medmnist``).
        download: fetch missing MedMNIST files.
        cache: ``memory`` (MONAI ``CacheDataset`` into RAM), ``persistent`` (MONAI
            ``PersistentDataset`` under ``cache_dir``, DataLoader workers, a disk-backed tensor:
            cohorts larger than RAM) or ``auto`` (persistent when the decoded images would
            take more than half of the available RAM).
        cache_dir: the persistent cache (default ``<output_dir>/.cache/data``).
        workers: decoding worker processes (default ``min(4, CPUs)``).
    """

    root: Path | None = None
    download: bool = False
    cache: CacheMode = Field(
        "auto",
        description="file cohorts: 'memory' (decode into RAM), 'persistent' (MONAI "
        "PersistentDataset under cache_dir + a disk-backed tensor: larger than RAM), or 'auto' "
        "(persistent when the images would fill half the available RAM)",
    )
    cache_dir: Path | None = Field(
        None, description="persistent cache folder (default: <output_dir>/.cache/data)"
    )
    workers: int | None = Field(
        None, ge=0, description="decoding worker processes (default: min(4, CPUs))"
    )

    def cache_folder(self, output_dir: Path) -> Path:
        """The persistent cache folder of a run writing to ``output_dir``."""
        return self.cache_dir if self.cache_dir is not None else output_dir / ".cache" / "data"


class TLSConfig(_Strict):
    """Flower's TLS files (PEM): the CA everyone trusts; the SuperLink's certificate and key."""

    ca_certificate: Path
    certificate: Path | None = Field(None, description="SuperLink certificate (started here)")
    private_key: Path | None = Field(None, description="SuperLink private key (started here)")


class FederationConfig(_Strict):
    """``medcl federate``: sites, rounds, aggregation and the Flower runtime (docs/federated.md)."""

    sites: int | list[str] = Field(
        3, description="number of sites (named site-0, site-1, ...) or their names"
    )
    partition: Literal["split", "experience"] = Field(
        "split",
        description="'split': each experience divided among the sites (stratified); "
        "'experience': experience i held whole by site i mod n",
    )
    rounds: int = Field(
        2, ge=1, description="rounds per experience; train.epochs local epochs each"
    )
    aggregation: Literal["fedavg", "fedprox", "fedavgm"] = Field(
        "fedavg",
        description="'fedavg': weighted mean; 'fedprox': + a proximal term at the sites; "
        "'fedavgm': + a server step (server_lr, server_momentum) on the mean's update",
    )
    proximal_mu: float = Field(0.01, ge=0, description="FedProx's mu (aggregation: fedprox)")
    server_lr: float = Field(
        1.0, gt=0, description="FedAvgM's server learning rate (aggregation: fedavgm)"
    )
    server_momentum: float = Field(
        0.0, ge=0, lt=1, description="FedAvgM's server momentum (aggregation: fedavgm)"
    )
    min_sites: int = Field(1, ge=1, description="replies a round needs to be aggregated")
    retries: int = Field(1, ge=0, description="times a round with too few replies is repeated")
    round_timeout: float = Field(600.0, gt=0, description="seconds a round waits for replies")
    join_timeout: float = Field(300.0, gt=0, description="seconds to wait for the sites at start")
    engine: Literal["deployment", "simulation"] = Field(
        "deployment",
        description="'deployment': SuperLink + one SuperNode process per site (loopback unless "
        "`superlink` is set); 'simulation': Flower's simulation engine in one process",
    )
    superlink: str | None = Field(
        None, description="HOST:PORT of an existing SuperLink's Control API (default: start one)"
    )
    tls: TLSConfig | None = None

    @property
    def site_names(self) -> list[str]:
        if isinstance(self.sites, int):
            return [f"site-{i}" for i in range(self.sites)]
        return list(self.sites)

    @model_validator(mode="after")
    def _check_sites(self) -> FederationConfig:
        names = self.site_names
        if not names or len(set(names)) != len(names):
            raise ValueError(f"sites must be a positive count or distinct names; got {self.sites}")
        bad = [n for n in names if not re.fullmatch(r"[\w.-]+", n)]
        if bad:
            raise ValueError(f"site names are letters, digits, _ - . only; got {bad}")
        if self.min_sites > len(names):
            raise ValueError(
                f"min_sites ({self.min_sites}) is larger than the number of sites ({len(names)})"
            )
        server = {
            "server_lr": (self.server_lr, 1.0),
            "server_momentum": (self.server_momentum, 0.0),
        }
        changed = {k: v for k, (v, default) in server.items() if v != default}
        if changed and self.aggregation != "fedavgm":
            raise ValueError(
                f"{', '.join(f'{k}={v}' for k, v in changed.items())}: FedAvgM's server step, "
                f"used by aggregation 'fedavgm' only; got aggregation {self.aggregation!r}. Set "
                f"aggregation: fedavgm, or remove {' and '.join(changed)}"
            )
        if self.engine == "simulation" and (self.superlink or self.tls):
            raise ValueError("engine 'simulation' runs in one process: remove superlink and tls")
        host = (self.superlink or "").rpartition(":")[0].strip("[]")
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        if self.superlink is not None and self.tls is None and not loopback:
            raise ValueError(
                f"superlink {self.superlink!r} is not a loopback address: model updates would "
                "cross the network in clear; set federation.tls (ca_certificate, ...)"
            )
        return self


class RunConfig(_Strict):
    name: str | None = None
    seed: int = 0
    output_dir: Path = Path("runs")
    scenario: ScenarioConfig
    strategy: StrategyConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    memory: MemoryConfig = MemoryConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    data: DataConfig = DataConfig()
    logging: LoggingConfig = LoggingConfig()
    federation: FederationConfig | None = Field(None, description="`medcl federate` only")

    @property
    def run_name(self) -> str:
        return self.name or f"{self.scenario.name}-{self.strategy.name}-s{self.seed}"

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        """``train.eval_max_samples`` (runs written before ``eval``) is ``eval.curve_subset``."""
        train = raw.get("train") if isinstance(raw, Mapping) else None
        if isinstance(train, Mapping) and "eval_max_samples" in train:
            raw = dict(raw)
            raw["train"] = {k: v for k, v in train.items() if k != "eval_max_samples"}
            section = raw.get("eval")
            section = dict(section) if isinstance(section, Mapping) else {}
            section.setdefault("curve_subset", train["eval_max_samples"])
            raw["eval"] = section
        return raw
