"""``model.width`` for timm's ResNet family: channel counts passed to ``timm.create_model``.

timm builds a ResNet from keyword arguments that ``create_model`` forwards to the class and
that override the variant's own (``dict(model_args, **kwargs)``): ``channels`` (the planes of
each stage; a Bottleneck stage outputs ``4 ×`` them) and ``stem_width`` (deep stems only; the
plain 7×7 stem is always 64 channels in timm). A wider ResNet is therefore the variant with
those two scaled, as a timm user writes ``create_model("resnet18", channels=(96, 192, 384, 768))``.
The variant's own values are read from one default-width build, so any registered ResNet works
(``resnet18``, ``resnet50d``, ``test_resnet`` with its mixed blocks, ...).
"""

from __future__ import annotations

__all__ = ["timm_width_kwargs"]

from typing import Any

from torch import nn

from medcl.errors import ConfigError


def timm_width_kwargs(
    name: str, width: float, *, in_chans: int, pretrained: bool
) -> dict[str, Any]:
    """``timm.create_model`` keywords that multiply the channels of ResNet ``name`` by ``width``.

    Args:
        name: a timm model name.
        width: channel multiplier (1: no keywords, the unchanged model).
        in_chans: input channels (for the default-width build that reads the variant).
        pretrained: whether pretrained weights were asked for (they exist for width 1 only).

    Returns:
        ``{"channels": ..., "stem_width": ...}`` (``stem_width`` for deep stems), or ``{}``.

    Raises:
        ConfigError: ``width != 1`` with pretrained weights or a model outside the ResNet family.
    """
    if width == 1:
        return {}
    import timm
    from timm.models.resnet import ResNet

    if pretrained:
        raise ConfigError(
            f"model.width {width} changes every layer's shape, so no pretrained weights fit "
            f"{name!r}; set model.width: 1 or model.pretrained: false."
        )
    net = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0)
    if not isinstance(net, ResNet):
        raise ConfigError(
            f"model.width is supported for timm ResNet-family backbones (resnet18, test_resnet, "
            f"resnet50d, ...) and medcl's 3D ResNets; got {name!r} ({type(net).__name__}). Set "
            "model.width: 1 or choose a ResNet."
        )
    stages = [getattr(net, f["module"]) for f in net.feature_info[1:]]  # layer1..layer4
    planes = [f["num_chs"] // type(s[0]).expansion for f, s in zip(net.feature_info[1:], stages,
                                                                      strict=True)]  # fmt: skip
    out: dict[str, Any] = {"channels": tuple(max(1, round(c * width)) for c in planes)}
    if isinstance(net.conv1, nn.Sequential):  # deep stem: conv, bn, act, conv(stem_width), ...
        out["stem_width"] = max(4, round(net.conv1[3].out_channels * width))
    return out
