"""Backbone factory: any timm model (2D) or a MONAI 3D network behind one interface.

Every backbone returned by :func:`create_backbone` is a :class:`Backbone`:
``forward(x) -> (B, num_features)`` pooled features, plus :meth:`Backbone.stages` naming the
modules at which feature stages start (where adapters and LoRA attach, through forward hooks,
without copying any timm/MONAI code).

Weights (``pretrained`` / ``checkpoint_path``) load through :mod:`medcl.models.weights`; the input
normalisation they expect is applied inside the backbone (``x`` arrives in medcl's [-1, 1]
convention and is re-normalised to the weights' mean/std), so every path that runs the model
(training, evaluation, export, ``medcl predict``) sees the same numbers.
"""

from __future__ import annotations

__all__ = [
    "BACKBONES",
    "Backbone",
    "Stage",
    "create_backbone",
    "find_backbone",
    "list_backbones",
    "register_backbone",
]

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from medcl.errors import ConfigError, did_you_mean
from medcl.models.timm_width import timm_width_kwargs
from medcl.models.weights import (
    CHECKPOINT_PREFIXES,
    WEIGHT_SOURCES,
    Preprocessing,
    load_pretrained,
    read_state_dict,
)
from medcl.registry import Registry

#: medcl's own families (MONAI 3D networks); any other name is looked up in timm.
BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
register_backbone = BACKBONES.register


@dataclass(frozen=True)
class Stage:
    """A feature stage: ``module`` is the stage, ``in_channels`` what enters it."""

    name: str
    module: nn.Module
    in_channels: int


class Backbone(nn.Module):
    """Uniform wrapper: pooled features and named stages of a timm or MONAI network.

    Args:
        net: the network; ``net(x)`` must return pooled features ``(B, num_features)``.
        name: the factory name, recorded in checkpoints and exports.
        num_features: feature width.
        stage_specs: ``(module path, input channels)`` of each stage, in order.
        spatial_dims: 2 or 3.
        in_chans: input channels.
        preprocessing: the normalisation the weights expect (default: medcl's [-1, 1]).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str,
        num_features: int,
        stage_specs: list[tuple[str, int]],
        spatial_dims: int,
        in_chans: int,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.num_features = num_features
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self._stage_specs = stage_specs
        # x in [-1, 1] (x01 = 0.5 x + 0.5) -> (x01 - mean) / std = x * scale + shift, per channel;
        # buffers, so checkpoints and exports carry them
        self.register_buffer("input_scale", torch.ones(in_chans))
        self.register_buffer("input_shift", torch.zeros(in_chans))
        self.set_preprocessing(preprocessing or Preprocessing())

    def set_preprocessing(self, prep: Preprocessing) -> None:
        """Normalise inputs as ``prep`` says (mean/std of [0, 1] images, per channel)."""
        self.preprocessing = prep.for_channels(self.in_chans)
        mean = torch.tensor(self.preprocessing.mean, dtype=torch.float32)
        std = torch.tensor(self.preprocessing.std, dtype=torch.float32)
        self.input_scale.copy_(0.5 / std)
        self.input_shift.copy_((0.5 - mean) / std)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W[, D])`` in [-1, 1] -> ``(B, num_features)``."""
        view = (1, self.in_chans) + (1,) * self.spatial_dims
        x = x * self.input_scale.view(view) + self.input_shift.view(view)
        return self.net(x)

    forward_features = forward

    def stages(self) -> list[Stage]:
        """The feature stages in order (e.g. ``layer1..layer4`` of a ResNet)."""
        return [Stage(n, self.net.get_submodule(n), c) for n, c in self._stage_specs]


def find_backbone(module: nn.Module) -> Backbone:
    """The first :class:`Backbone` inside ``module`` (a strategy's, or a deployable model's).

    Raises:
        ConfigError: ``module`` holds none.
    """
    found = next((m for m in module.modules() if isinstance(m, Backbone)), None)
    if found is None:
        raise ConfigError(f"{type(module).__name__} holds no medcl Backbone.")
    return found


def _stage_inputs(net: nn.Module, modules: list[str], in_chans: int) -> list[int]:
    """Channels entering each of ``modules``, measured with pre-hooks on one dry forward pass.

    timm's ``feature_info`` gives stage *outputs*; the input of a stage is not always the previous
    listed stage's output (EfficientNet's ``blocks.4`` takes ``blocks.3``'s 80 channels).
    """
    seen: dict[str, int] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen.setdefault(name, args[0].shape[1])  # (B, C, H, W): C

        return hook

    hooks = [net.get_submodule(m).register_forward_pre_hook(record(m)) for m in modules]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, in_chans, 64, 64))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return [seen[m] for m in modules]


def _timm_backbone(
    name: str, *, in_chans: int, small_input: bool, pretrained: str | None, width: float = 1.0
) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise ConfigError(
            f"model.backbone {name!r} is neither a timm model nor a medcl backbone; "
            f"{did_you_mean(name, [*timm.list_models(), *BACKBONES.list()])}"
        )
    hub = pretrained == "hub"
    wide = timm_width_kwargs(name, width, in_chans=in_chans, pretrained=pretrained is not None)
    try:
        net = timm.create_model(name, pretrained=hub, in_chans=in_chans, num_classes=0, **wide)
    except Exception as e:  # hub unreachable, missing weights, ...
        if not hub:
            raise
        raise ConfigError(
            f"could not fetch pretrained weights for {name!r} from timm's hub "
            f"({type(e).__name__}: {e}). Without network access, use packaged weights "
            f"(model.pretrained: one of {WEIGHT_SOURCES.list()}, with a matching backbone) or a "
            "local file (model.checkpoint_path)."
        ) from e
    if small_input:
        _make_small_input(net, name)
    info = net.feature_info
    modules = [f["module"] for f in info][1:]  # stage inputs after the first feature stage
    specs = list(zip(modules, _stage_inputs(net, modules, in_chans), strict=True))
    cfg = net.pretrained_cfg
    prep = (
        Preprocessing(
            tuple(cfg["mean"]), tuple(cfg["std"]), cfg["input_size"][-1], f"timm hub ({name})"
        )
        if hub
        else None
    )
    return Backbone(
        net,
        name=name,
        num_features=net.num_features,
        stage_specs=specs,
        spatial_dims=2,
        in_chans=in_chans,
        preprocessing=prep,
    )


def _make_small_input(net: nn.Module, name: str) -> None:
    """3×3 stride-1 stem and no max-pool, as MedMNIST's ResNet (28) baseline."""
    stem = getattr(net, "conv1", None)
    if stem is None or not hasattr(net, "maxpool"):
        raise ConfigError(
            f"model.small_input is supported for ResNet-family backbones (conv1 + maxpool); "
            f"{name!r} has no such stem. Set small_input: false or resize images (image_size)."
        )
    if isinstance(stem, nn.Conv2d):
        net.conv1 = nn.Conv2d(stem.in_channels, stem.out_channels, 3, 1, 1, bias=False)
    else:  # deep stem: Sequential whose first conv carries the stride
        first = next(m for m in stem.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    net.maxpool = nn.Identity()


_MONAI_LAYERS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}


def _monai_resnet(depth: int) -> Callable[..., Backbone]:
    def build(*, in_chans: int, small_input: bool, width: float = 1.0) -> Backbone:
        from monai.networks.nets import ResNet

        widths = [max(8, int(c * width)) for c in (64, 128, 256, 512)]
        net = ResNet(
            block="bottleneck" if depth >= 50 else "basic",
            layers=_MONAI_LAYERS[depth],
            spatial_dims=3,
            n_input_channels=in_chans,
            feed_forward=False,
            block_inplanes=widths,
            conv1_t_size=3 if small_input else 7,
            conv1_t_stride=1 if small_input else 2,
            no_max_pool=small_input,
        )
        exp = 4 if depth >= 50 else 1
        ins = [widths[0], widths[0] * exp, widths[1] * exp, widths[2] * exp]
        specs = [(f"layer{i + 1}", c) for i, c in enumerate(ins)]
        return Backbone(
            net,
            name=f"resnet{depth}_3d",
            num_features=widths[3] * exp,
            stage_specs=specs,
            spatial_dims=3,
            in_chans=in_chans,
        )

    return build


for _d in (10, 18, 34, 50):
    register_backbone(f"resnet{_d}_3d")(_monai_resnet(_d))


def list_backbones(pattern: str = "*") -> list[str]:
    """medcl's 3D backbones plus every timm model matching ``pattern``."""
    import timm

    return sorted({*BACKBONES.list(pattern), *timm.list_models(pattern)})


def _pretrained_name(pretrained: bool | str | None) -> str | None:
    """``False``/``None``/``"none"`` -> None, ``True`` -> ``"hub"``, else the name."""
    if pretrained is None or pretrained is False or pretrained in ("none", "false"):
        return None
    return "hub" if pretrained is True else str(pretrained)


def create_backbone(
    name: str,
    *,
    in_chans: int,
    spatial_dims: int = 2,
    small_input: bool = False,
    pretrained: bool | str | None = False,
    checkpoint_path: str | Path | None = None,
    width: float = 1.0,
) -> Backbone:
    """Build a backbone by name, with its initial weights.

    Args:
        name: a timm model name (``"resnet18"``) or a medcl 3D name (``"resnet18_3d"``).
        in_chans: input channels (pretrained RGB stems are adapted as timm does).
        spatial_dims: 2 (timm) or 3 (MONAI); must match the family.
        small_input: 3×3 stride-1 stem without max-pool, for 28–64 px inputs (ResNets).
        pretrained: ``False``; ``"hub"`` (or ``True``): timm's weights, downloaded; or an offline
            weight source (:func:`~medcl.models.weights.list_weight_sources`).
        checkpoint_path: local weights (``.safetensors`` or a ``torch.save`` state dict, loaded with
            ``weights_only=True``), mapped, channel-adapted and shape-checked like the others.
        width: channel multiplier: MONAI 3D families, and timm ResNets through timm's own
            ``channels``/``stem_width`` (:mod:`medcl.models.timm_width`); 1 is the unchanged
            model.

    Returns:
        A :class:`Backbone` producing ``(B, num_features)``; ``backbone.preprocessing`` records
        where its weights came from and the normalisation they expect.

    Raises:
        ConfigError: unknown name or weight source, wrong dimensionality, weights unreachable or
            for another architecture.
    """
    source = _pretrained_name(pretrained)
    if source is not None and checkpoint_path is not None:
        raise ConfigError(
            f"model.pretrained ({source!r}) and model.checkpoint_path are both set; choose one "
            "(set model.pretrained: false to load the file)."
        )
    if source not in (None, "hub") and source not in WEIGHT_SOURCES:
        raise ConfigError(
            f"model.pretrained {source!r} is not a weight source: use false, 'hub' (timm's hub, "
            f"online) or an offline source; {did_you_mean(source, WEIGHT_SOURCES.list())}"
        )
    if name in BACKBONES:
        if spatial_dims != 3:
            raise ConfigError(
                f"model.backbone {name!r} is a 3D network but the data is {spatial_dims}D; "
                "use a 2D timm model such as 'resnet18'."
            )
        if source is not None:
            raise ConfigError(
                f"model.pretrained {source!r}: no pretrained weights exist for medcl's 3D "
                f"backbone {name!r}; set model.pretrained: false (or model.checkpoint_path)."
            )
        bb = BACKBONES.get(name)(in_chans=in_chans, small_input=small_input, width=width)
    else:
        if spatial_dims != 2:
            raise ConfigError(
                f"model.backbone {name!r} is a 2D timm model but the data is 3D; "
                f"choose one of {BACKBONES.list()}."
            )
        bb = _timm_backbone(
            name, in_chans=in_chans, small_input=small_input, pretrained=source, width=width
        )
    if source not in (None, "hub"):
        ws = WEIGHT_SOURCES.get(source)
        if name not in ws.architectures:
            raise ConfigError(
                f"model.pretrained {source!r} holds weights for {list(ws.architectures)}; got "
                f"model.backbone {name!r}. Set model.backbone: {ws.architectures[0]}."
            )
        _load_into(
            bb,
            read_state_dict(ws.path(), what=f"model.pretrained {source!r}"),
            what=source,
            key_map=ws.key_map,
            source_classifier=ws.source_classifier,
            small_input=small_input,
        )
        bb.set_preprocessing(ws.preprocessing)
    if checkpoint_path is not None:
        load_backbone_weights(bb, checkpoint_path, small_input=small_input)
    return bb


def _load_into(
    bb: Backbone,
    state: dict[str, Tensor],
    *,
    what: str,
    key_map,
    source_classifier: tuple[str, ...] = (),
    small_input: bool = False,
) -> None:
    cfg = getattr(bb.net, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv", "conv1")
    first = first[0] if isinstance(first, list | tuple) else first
    load_pretrained(
        bb.net,
        state,
        source=what,
        key_map=key_map,
        in_chans=bb.in_chans,
        first_conv=first,
        classifier=cfg.get("classifier", "fc"),
        source_classifier=source_classifier,
        replaced=[first] if small_input else [],
    )


def load_backbone_weights(bb: Backbone, path: str | Path, *, small_input: bool = False) -> None:
    """Load a local weights file into ``bb.net`` safely (no pickled code is executed).

    medcl's own checkpoints (a strategy's ``backbone.*`` tensors) and plain timm state dicts both
    work; wrapper prefixes are stripped, the input convolution is channel-adapted and every shape
    is checked (see :func:`medcl.models.weights.load_pretrained`).
    """
    state = read_state_dict(path)
    # medcl checkpoints also hold the backbone's normalisation buffers: restore them as well
    scale, shift = state.pop("backbone.input_scale", None), state.pop("backbone.input_shift", None)
    if any(k.startswith("backbone.") for k in state):  # a medcl checkpoint: its backbone only
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    _load_into(bb, state, what=str(path), key_map=CHECKPOINT_PREFIXES, small_input=small_input)
    bb.preprocessing = Preprocessing(
        bb.preprocessing.mean, bb.preprocessing.std, bb.preprocessing.input_size, str(path)
    )
    if scale is not None and shift is not None and scale.shape == bb.input_scale.shape:
        bb.input_scale.copy_(scale)
        bb.input_shift.copy_(shift)
