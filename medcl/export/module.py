"""What every export format stores: ``[0, 1]`` images -> probabilities, route, OOD score.

:class:`ExportModule` wraps a strategy's deployable model through its
:class:`~medcl.models.deployable.DeployableModel` interface only (``forward_features``,
``forward_head``, ``route``), so an exported file needs nothing but the intensity scaling recorded
in its metadata, and no method needs code of its own here. The post-hoc temperature
(:mod:`medcl.engine.posthoc`) is the buffer ``temperature``, so every format divides the scores
by it; an export written before it existed loads with ``T = 1``.
"""

from __future__ import annotations

__all__ = ["ExportModule"]

import torch
from torch import Tensor, nn

from medcl.data.transforms import INPUT_MEAN, INPUT_STD
from medcl.errors import ConfigError
from medcl.export.ood import MahalanobisScore
from medcl.models.deployable import DeployableModel


class ExportModule(nn.Module):
    """Deployable model + input normalisation + softmax + OOD score + routed head.

    Args:
        model: the strategy's :meth:`~medcl.strategies.base.Strategy.deployable_model`.
        ood: the fitted feature-space score (:class:`~medcl.export.ood.MahalanobisScore`);
            ``None`` returns a score of 0 (no guard).

    Raises:
        ConfigError: ``model`` does not implement the deployable-model interface.
    """

    def __init__(self, model: nn.Module, ood: MahalanobisScore | None = None) -> None:
        super().__init__()
        if not isinstance(model, DeployableModel):
            raise ConfigError(
                f"cannot export a {type(model).__name__}: a strategy's deployable_model() must "
                "return a medcl.models.deployable.DeployableModel (forward_features, "
                "forward_head and, when it routes, route)."
            )
        self.model = model
        self.ood = ood
        #: post-hoc temperature ``(1,)`` or one per class ``(K,)``: probabilities are
        #: ``softmax(scores / T[top class])`` (1: uncalibrated)
        self.register_buffer("temperature", torch.ones(1, dtype=torch.float32))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # an export written before calibration has no temperature (T = 1), one before the
        # per-class temperatures a 0-d one; the buffer takes the saved shape
        key = prefix + "temperature"
        saved = state_dict.get(key, torch.ones(1, dtype=torch.float32)).reshape(-1)
        state_dict[key] = saved
        self.temperature = torch.ones_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _features_scores(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised ``x`` -> embedding ``(B, F)``, class scores ``(B, K)``, route ``(B,)``."""
        z = self.model.forward_features(x)
        embedding = self.model.forward_head(z, pre_logits=True)
        return embedding, self.model.forward_head(z), self.model.route(z)

    def features(self, x: Tensor) -> Tensor:
        """``(B, C, *spatial)`` in [0, 1] -> ``(B, F)`` features the OOD score is fitted on."""
        return self._features_scores((x - INPUT_MEAN) / INPUT_STD)[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, C, H, W[, D])`` float in [0, 1] -> probabilities ``(B, K)``
        (``softmax(scores / T)``, ``T`` the temperature of each row's top class), route
        ``(B,)``, OOD score ``(B,)``.

        ``route`` is the index of the head each sample was routed to (int64), ``-1`` when the
        model has no routing; the OOD score is the feature distance compared with the
        threshold in the metadata (``ood.threshold``), 0 without a guard.
        """
        x = (x - INPUT_MEAN) / INPUT_STD  # medcl.data.transforms.to_model_input on [0, 1] floats
        f, scores, route = self._features_scores(x)
        score = self.ood(f) if self.ood is not None else torch.zeros_like(scores[:, 0])
        t = self.temperature.expand(scores.shape[1])[scores.argmax(1)].unsqueeze(1)  # (B, 1)
        return torch.softmax(scores.float() / t, 1), route, score.float()
