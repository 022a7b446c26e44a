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
    "LoggingConfig",
    "MemoryConfig",
    "ModelConfig",
    "RunConfig",
    "ScenarioConfig",
    "StrategyConfig",
    "TrainConfig",
]

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medcl.config_federation import FederationConfig

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
        64,
        ge=1,
        description="images per forward pass when scoring (evaluation, curves, herding "
        "features), separate from train.batch_size; 64 scores fastest on a 2-core CPU "
        "(benchmarks/results/end_to_end.md)",
    )
    fold_batchnorm: bool = Field(
        True,
        description="fold each backbone and adapter BatchNorm into the convolution before it "
        "while scoring (eval mode: an affine map; outputs equal up to float rounding, one pass "
        "over the activations fewer); the folded modules are never trained, checkpointed or "
        "exported, what scoring computes (herding, stage-2 features) is computed folded",
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
