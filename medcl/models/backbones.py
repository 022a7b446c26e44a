"""Backbone factory: any timm model (2D) or a MONAI 3D network behind one interface.

Every backbone returned by :func:`create_backbone` is a :class:`Backbone`:
``forward(x) -> (B, num_features)`` pooled features, plus :meth:`Backbone.stages` naming the
modules at which feature stages start (where adapters and LoRA attach, through forward hooks,
without copying any timm/MONAI code).
"""

from __future__ import annotations

__all__ = [
    "BACKBONES",
    "Backbone",
    "Stage",
    "create_backbone",
    "list_backbones",
    "register_backbone",
]

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from medcl.errors import ConfigError, did_you_mean
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
    ) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.num_features = num_features
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self._stage_specs = stage_specs

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W[, D])`` -> ``(B, num_features)``."""
        return self.net(x)

    forward_features = forward

    def stages(self) -> list[Stage]:
        """The feature stages in order (e.g. ``layer1..layer4`` of a ResNet)."""
        return [Stage(n, self.net.get_submodule(n), c) for n, c in self._stage_specs]


def _timm_backbone(name: str, *, in_chans: int, small_input: bool, pretrained: bool) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise ConfigError(
            f"model.backbone {name!r} is neither a timm model nor a medcl backbone; "
            f"{did_you_mean(name, [*timm.list_models(), *BACKBONES.list()])}"
        )
    try:
        net = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=0)
    except Exception as e:  # hub unreachable, missing weights, ...
        if not pretrained:
            raise
        raise ConfigError(
            f"could not fetch pretrained weights for {name!r} ({type(e).__name__}: {e}). Without "
            "network access, set model.checkpoint_path to a local weights file (.safetensors/.pth) "
            "and model.pretrained to false."
        ) from e
    if small_input:
        _make_small_input(net, name)
    info = net.feature_info
    specs = [(f["module"], info[i - 1]["num_chs"]) for i, f in enumerate(info) if i > 0]
    return Backbone(
        net,
        name=name,
        num_features=net.num_features,
        stage_specs=specs,
        spatial_dims=2,
        in_chans=in_chans,
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


def create_backbone(
    name: str,
    *,
    in_chans: int,
    spatial_dims: int = 2,
    small_input: bool = False,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    width: float = 1.0,
) -> Backbone:
    """Build a backbone by name.

    Args:
        name: a timm model name (``"resnet18"``) or a medcl 3D name (``"resnet18_3d"``).
        in_chans: input channels.
        spatial_dims: 2 (timm) or 3 (MONAI); must match the family.
        small_input: 3×3 stride-1 stem without max-pool, for 28–64 px inputs.
        pretrained: fetch timm's pretrained weights (needs network access).
        checkpoint_path: local weights (``.safetensors`` or a ``torch.save`` state dict, loaded with
            ``weights_only=True``); classifier keys are dropped and shape mismatches skipped with
            a warning.
        width: channel multiplier (MONAI 3D families only), for small test models.

    Returns:
        A :class:`Backbone` producing ``(B, num_features)``.

    Raises:
        ConfigError: unknown name, wrong dimensionality, weights unreachable.
    """
    if name in BACKBONES:
        if spatial_dims != 3:
            raise ConfigError(
                f"model.backbone {name!r} is a 3D network but the data is {spatial_dims}D; "
                "use a 2D timm model such as 'resnet18'."
            )
        bb = BACKBONES.get(name)(in_chans=in_chans, small_input=small_input, width=width)
    else:
        if spatial_dims != 2:
            raise ConfigError(
                f"model.backbone {name!r} is a 2D timm model but the data is 3D; "
                f"choose one of {BACKBONES.list()}."
            )
        bb = _timm_backbone(
            name,
            in_chans=in_chans,
            small_input=small_input,
            pretrained=pretrained and checkpoint_path is None,
        )
    if checkpoint_path is not None:
        load_backbone_weights(bb, checkpoint_path)
    return bb


def load_backbone_weights(bb: Backbone, path: str | Path) -> None:
    """Load local weights into ``bb.net`` safely (no pickled code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"model.checkpoint_path {str(path)!r} does not exist; give a local "
            ".safetensors or .pth file."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    for prefix in ("backbone.net.", "net.", "module.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    own = bb.net.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(keep))
    missing = sorted(set(own) - set(keep))
    if not keep:
        raise ConfigError(
            f"{path} has no weights matching backbone {bb.name!r}; is it the same architecture?"
        )
    if skipped or missing:
        warnings.warn(
            f"{path}: loaded {len(keep)} tensors; skipped {len(skipped)} "
            f"(e.g. {skipped[:3]}), left {len(missing)} at init (e.g. {missing[:3]}).",
            stacklevel=2,
        )
    bb.net.load_state_dict(keep, strict=False)
