"""Options of ACL and DynaMMo (:mod:`medcl.strategies.acl`, :mod:`medcl.strategies.dynammo`):
declared once, with their ranges; what each means is in :class:`~medcl.strategies.acl.ACL`."""

from __future__ import annotations

__all__ = ["ACLOptions", "BackboneInit"]

from dataclasses import dataclass
from typing import Literal

from medcl.errors import ConfigError
from medcl.strategies.options import StrategyOptions

BackboneInit = Literal["pretrained", "first_experience", "checkpoint"]


@dataclass(frozen=True, kw_only=True)
class ACLOptions(StrategyOptions):
    """Options of :class:`ACL` (DynaMMo's extend them)."""

    backbone_init: BackboneInit = "first_experience"
    alpha_init: float = 0.02
    adapter_width: float = 1.0
    init_from_previous: bool = True
    use_adapters: bool = True
    stage1_memory: Literal["join", "batch"] = "join"
    others_fraction: float | None = None
    retune_epochs: int = 30
    retune_lr: float = 1e-2
    retune_batch_size: int = 64
    head_lr: float | None = None

    def check(self, component: str) -> None:
        if self.retune_epochs < 0 or self.retune_lr <= 0 or self.retune_batch_size < 1:
            raise ConfigError(
                f"{component}: retune_epochs must be >= 0, retune_lr > 0 and "
                f"retune_batch_size >= 1; got {self.retune_epochs}, {self.retune_lr}, "
                f"{self.retune_batch_size}."
            )
        if not 0 < self.adapter_width <= 1:  # also refuses NaN
            raise ConfigError(
                f"{component}: adapter_width must be in (0, 1] (each adapter's hidden "
                f"channels as a share of its stage's channels); got {self.adapter_width}. "
                "Use 1.0 for the reference's full-width adapters or e.g. 0.5 for half-width "
                "ones."
            )
        if self.head_lr is not None and not self.head_lr > 0:
            raise ConfigError(f"{component}: head_lr must be > 0 or null; got {self.head_lr}.")
        if self.others_fraction is not None and not 0 < self.others_fraction < 1:
            raise ConfigError(
                f"{component}: others_fraction must be in (0, 1) or null; got "
                f"{self.others_fraction}."
            )
        if not self.use_adapters and self.backbone_init == "first_experience":
            raise ConfigError(
                f"{component}: use_adapters false needs a frozen pretrained backbone "
                "(backbone_init: pretrained)."
            )
