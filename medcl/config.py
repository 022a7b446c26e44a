"""Run configuration: YAML validated on load, with ``--set a.b=value`` overrides.

Unknown keys, wrong types and unknown names are errors that name the key and the valid choices.
Scenario and strategy sections are open (their options are checked against the chosen builder's
or strategy's own signature when the run is built).
"""

from __future__ import annotations

__all__ = [
    "CacheMode",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "MemoryConfig",
    "ModelConfig",
    "RunConfig",
    "ScenarioConfig",
    "StrategyConfig",
    "TrainConfig",
    "apply_overrides",
    "config_changes",
    "load_config",
    "read_yaml",
]

import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medcl.errors import ConfigError
from medcl.validation import format_validation_error

#: How file cohorts are held (``data.cache``, a file source's ``cache``; see medcl.data.cache).
CacheMode = Literal["auto", "memory", "persistent"]


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
    width: float = Field(1.0, gt=0, description="channel multiplier (MONAI 3D backbones)")


class TrainConfig(_Strict):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    max_updates: int | None = Field(None, ge=1, description="cap on updates per experience")
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
        False,
        description="NHWC memory format for 2D models and batches (same weights and "
        "checkpoints; off by default: see benchmarks/results/end_to_end.md)",
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
    batch_size: int = Field(
        128,
        ge=1,
        description="images per forward pass when scoring (evaluation, curves, herding "
        "features), separate from train.batch_size",
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
    data: DataConfig = DataConfig()
    logging: LoggingConfig = LoggingConfig()

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


def _suggest_key(loc: Sequence[str | int]) -> str:
    """For an extra key, name the valid keys of its section."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
            return ""
        model = field.annotation
    valid = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f" {hint}valid keys: {', '.join(valid)}"


def validate_config(raw: Mapping[str, Any], *, source: str = "config") -> RunConfig:
    """Validate a config mapping into a :class:`RunConfig`."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"{source}: unknown key `{loc}`.{_suggest_key(err['loc'])}")
            elif err["type"] == "missing":
                lines.append(f"{source}: missing required key `{loc}`.")
            else:
                lines.append(
                    format_validation_error(
                        ValidationError.from_exception_data(e.title, [err]), prefix=source
                    )
                )
        raise ConfigError("\n".join(lines)) from None


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.1, ...}``: every value of a nested mapping under its dotted key."""
    if not isinstance(node, Mapping) or not node:
        return {prefix.removesuffix("."): node}
    return {
        k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()
    }


#: Settings a resumed run may change: they decide how fast it runs, not what it learns (a thread
#: count unlike the first start's is reported on resume, see medcl.engine.threads).
RESUMABLE = ("train.num_threads",)


def config_changes(saved: Any, current: RunConfig) -> list[str]:
    """The settings that differ between a run's saved config and ``current``.

    ``saved`` (a run's ``config.yaml``, parsed) is first filled in with this version's
    defaults, so a key added to medcl since the run was written changes nothing; the
    :data:`RESUMABLE` settings are not compared.

    Returns:
        ``["train.lr: 0.05 -> 0.1", ...]`` (dotted keys, JSON values, ``(not set)`` when a key
        is absent on one side); empty when the two configs are the same.
    """
    try:
        old = json.loads(validate_config(saved).model_dump_json())
    except ConfigError:  # written by another medcl version: compare it as it stands
        old = saved if isinstance(saved, Mapping) else {}
    a, b = _leaves(old), _leaves(json.loads(current.model_dump_json()))

    def show(key: str, side: dict[str, Any]) -> str:
        return json.dumps(side[key], default=str) if key in side else "(not set)"

    absent = object()
    keys = dict.fromkeys(k for k in [*b, *a] if k not in RESUMABLE)  # the current config's order
    return [
        f"{k}: {show(k, a)} -> {show(k, b)}" for k in keys if a.get(k, absent) != b.get(k, absent)
    ]


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML: ``3``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=2); got {item!r}.")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section.")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(
                f"--set {key}: the value {value!r} is not valid YAML ({problem}); quote it, "
                f"e.g. --set '{key}=\"{value}\"'."
            ) from None
    return raw


def _duplicate_keys(node: yaml.Node, path: tuple[str, ...] = ()):
    """Yield ``(dotted key, first line, repeated line)`` for every key given twice in a mapping.

    YAML itself keeps the last value silently; a config must never do that.
    """
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key != "<<" and key in seen:  # "<<" is a merge key, not a setting
                yield ".".join((*path, key)), seen[key], line
            seen.setdefault(key, line)
            yield from _duplicate_keys(value, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            yield from _duplicate_keys(value, (*path, str(i)))


def _yaml_syntax_error(path: Path, e: yaml.YAMLError) -> str:
    """One line naming the file and, for a marked error, the line and column."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        context = f" ({e.context}, line {e.context_mark.line + 1})" if e.context_mark else ""
        return (
            f"{path} is not valid YAML: {e.problem} at line {mark.line + 1}, column "
            f"{mark.column + 1}{context}. Fix the syntax there (e.g. a missing space after ':', "
            "a tab used for indentation, an unclosed bracket or quote)."
        )
    return f"{path} is not valid YAML ({' '.join(str(e).split())}). Fix the syntax."


def read_yaml(path: str | Path, *, what: str = "config file", example: str = "") -> Any:
    """Read a YAML file that holds settings (a run config, the gate's criteria).

    Args:
        path: the file.
        what: how messages name it (``"gate criteria file"``).
        example: where to find an example, for the message (default: ``configs/``).

    Returns:
        The parsed YAML (``None`` for an empty file).

    Raises:
        ConfigError: missing or unreadable file, bad YAML (the message names the file, line and
            column), or a key given twice.
    """
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"{what} {str(path)!r} {state}; {example or 'see configs/ for examples'}."
        )
    try:
        text = path.read_text()
        dups = list(_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader)))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_syntax_error(path, e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} could not be read ({e}).") from None
    if dups:
        raise ConfigError(
            "\n".join(
                f"{path}: key `{key}` is given twice (lines {first} and {again}); YAML would "
                "silently keep the last one. Remove one of them."
                for key, first, again in dups
            )
        )
    return raw


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config, apply overrides, validate.

    Nothing heavy is imported (no torch, MONAI or timm): a mistake is reported at once.

    Raises:
        ConfigError: missing/unreadable file, bad YAML, a key given twice, unknown key, wrong
            type.
    """
    path = Path(path)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} must be a YAML mapping at the top level; got {type(raw).__name__}."
        )
    return validate_config(apply_overrides(raw, overrides), source=str(path))
