"""BatchNorm folding for scoring passes (medcl.models.folding): same outputs up to float
rounding, originals untouched, only pairs the graph proves foldable, and the feature cache uses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medcl.models.adapters import AdapterSet, forward_with_adapters
from medcl.models.backbones import Backbone, create_backbone
from medcl.models.feature_cache import FeatureCache
from medcl.models.folding import batchnorm_pairs, folded_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_norms(module: nn.Module) -> None:
    """Statistics and affine parameters far from the identity, as after training."""
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def _versions(module: nn.Module) -> list[int]:
    return [t._version for t in [*module.parameters(), *module.buffers()]]


class _Holder(nn.Module):
    """A backbone with an adapter set, as a strategy holds them."""

    def __init__(self, backbone: Backbone, adapters: AdapterSet | None) -> None:
        super().__init__()
        self.backbone, self.adapters = backbone, adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_with_adapters(self.backbone, self.adapters, x)


@pytest.mark.parametrize(
    ("name", "kwargs", "pairs", "shape"),
    [
        ("tf_efficientnet_lite0", {"in_chans": 3}, 49, (3, 32, 32)),  # BatchNormAct2d, same-pad
        ("resnet18", {"in_chans": 1, "small_input": True}, 20, (1, 28, 28)),
        ("resnet10_3d", {"in_chans": 1, "spatial_dims": 3}, 12, (1, 16, 16, 16)),  # MONAI
    ],
)
def test_outputs_equal_up_to_rounding_and_originals_are_untouched(name, kwargs, pairs, shape):
    torch.manual_seed(0)
    backbone = create_backbone(name, **kwargs)
    adapters = AdapterSet(backbone.stages(), spatial_dims=kwargs.get("spatial_dims", 2))
    model = _Holder(backbone, adapters).eval()
    _randomise_norms(model)
    assert len(batchnorm_pairs(backbone.net)) == pairs  # every norm of these nets follows a conv
    x = torch.randn(3, *shape)
    modules, versions = list(model.modules()), _versions(model)
    with torch.no_grad():
        plain = model(x)
        with folded_batchnorm(model) as originals:
            folded = model(x)
            assert len(originals) == 2 * (pairs + 2 * len(adapters.adapters))  # conv + norm each
        after = model(x)
    scale = plain.abs().max()
    assert 0 < (folded - plain).abs().max() <= 1e-5 * scale  # folded (not identical), and equal
    assert torch.equal(after, plain)
    assert list(model.modules()) == modules and _versions(model) == versions


def test_nothing_is_folded_with_gradients_in_training_or_when_hooked():
    torch.manual_seed(0)
    model = _Holder(create_backbone("resnet18", in_chans=1, small_input=True), None)
    with folded_batchnorm(model) as originals:  # gradients on: training, not scoring
        assert originals == {}
    with torch.no_grad():
        with folded_batchnorm(model) as originals:  # train mode: batch statistics
            assert originals == {}
        model.eval()
        with folded_batchnorm(model, enabled=False) as originals:
            assert originals == {}
        model.backbone.net.bn1.register_forward_hook(lambda *a: None)  # e.g. a user's probe
        with folded_batchnorm(model) as originals:
            assert len(originals) == 2 * (20 - 1)
            assert model.backbone.net.bn1 not in [m for ms in originals.values() for m in ms]


class _Branchy(nn.Module):
    """Four norms that must not fold: the conv output is also added (two users), one conv
    called twice, one norm after a pooling, one after a transposed conv with groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.shared, self.bn_s1, self.bn_s2 = (
            nn.Conv2d(2, 2, 1),
            nn.BatchNorm2d(2),
            nn.BatchNorm2d(2),
        )
        self.bn_pool = nn.BatchNorm2d(2)
        self.t, self.bn_t = nn.ConvTranspose2d(2, 2, 3, padding=1, groups=2), nn.BatchNorm2d(2)
        self.ok, self.bn_ok = nn.Conv2d(2, 2, 3, padding=1, bias=True), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        x = self.bn_a(y) + y  # the conv output has two users
        x = self.bn_s1(self.shared(x)) + self.bn_s2(self.shared(x))
        x = self.bn_pool(nn.functional.avg_pool2d(x, 1))
        x = self.bn_t(self.t(x))
        return self.bn_ok(self.ok(x)).mean((2, 3))


def test_only_pairs_the_graph_proves_foldable():
    net = _Branchy()
    assert batchnorm_pairs(net) == [("ok", "bn_ok")]
    model = Backbone(
        net, name="branchy", num_features=2, stage_specs=[], spatial_dims=2, in_chans=2
    )
    _randomise_norms(model)
    model.eval()
    x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        plain = model(x)
        with folded_batchnorm(model) as originals:
            assert len(originals) == 2
            folded = model(x)
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-6)
    # a norm that starts a stage keeps its module (adapters hook the stage's input in a forward)
    staged = Backbone(
        net, name="b", num_features=2, stage_specs=[("bn_ok", 2)], spatial_dims=2, in_chans=2
    )
    with torch.no_grad(), folded_batchnorm(staged.eval()) as originals:
        assert originals == {}


class _StdConv(nn.Conv2d):
    """Rewrites its weight in forward (as timm's StdConv2d): a folded scale would be undone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight / self.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return self._conv_forward(x, w, self.bias)


class _Staged(nn.Module):
    """A stage whose first operation is a norm fed by a convolution outside it; a subclass of
    a convolution; a convolution reachable under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 2, 3, padding=1)
        self.stage = nn.Sequential(nn.BatchNorm2d(2), nn.ReLU())
        self.std, self.bn_std = _StdConv(2, 2, 1), nn.BatchNorm2d(2)
        self.twice, self.bn_twice = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.alias = self.twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage(self.stem(x))
        x = self.bn_std(self.std(x))
        return self.bn_twice(self.alias(x)).mean((2, 3))


def test_pairs_across_a_stage_subclasses_and_aliases_stay_unfolded():
    net = _Staged()
    assert batchnorm_pairs(net) == [("stem", "stage.0")]  # the graph alone cannot see stages
    model = Backbone(
        net, name="s", num_features=2, stage_specs=[("stage", 2)], spatial_dims=2, in_chans=2
    )
    _randomise_norms(model)
    with torch.no_grad(), folded_batchnorm(model.eval()) as originals:
        assert originals == {}


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x)).mean((2, 3))


def test_a_network_fx_cannot_trace_is_scored_unfolded():
    net = _Untraceable()
    assert batchnorm_pairs(net) == []
    model = Backbone(net, name="u", num_features=2, stage_specs=[], spatial_dims=2, in_chans=1)
    with torch.no_grad(), folded_batchnorm(model.eval()) as originals:
        assert originals == {}


def test_the_feature_cache_scores_folded_and_keeps_its_reuse_rule():
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", in_chans=1, small_input=True)
    model = _Holder(backbone, None)
    model.head = nn.Linear(backbone.num_features, 2)  # not on the features' path
    _randomise_norms(model)
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    ran: list[nn.Module] = []
    seen = nn.modules.module.register_module_forward_pre_hook(lambda m, a: ran.append(m))
    try:
        folded = FeatureCache(batch_size=4)
        out = folded.outputs("features", model, backbone, images)
        assert backbone.net.bn1 not in ran  # the norms did not run: folded into their convs
        ran.clear()
        plain = FeatureCache(batch_size=4, fold_batchnorm=False).outputs(
            "features", model, backbone, images
        )
        assert backbone.net.bn1 in ran
    finally:
        seen.remove()
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # off the path: still cached
    folded.outputs("features", model, backbone, images)
    assert folded.computed == 10 and folded.reused == 10
    with torch.no_grad():
        backbone.net.bn1.running_mean.add_(0.1)  # a folded norm changed: recomputed
    folded.outputs("features", model, backbone, images)
    assert folded.computed == 20
