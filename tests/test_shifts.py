"""Simulated acquisition shifts: shapes, determinism per site, and that they change images."""

from __future__ import annotations

import pytest
import torch

from medcl.data.samples import SampleSet, make_meta
from medcl.data.shifts import (
    AddGaussianNoise,
    AdjustGamma,
    ApplyBiasField,
    GaussianBlur,
    ScaleContrast,
    SimulateResolution,
    SiteShift,
    apply_site_shift,
    default_site_shifts,
    site_seed,
)
from medcl.errors import ConfigError


def _samples(shape: tuple[int, ...], seed: int = 0) -> SampleSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    n = shape[0]
    return SampleSet(images, torch.arange(n) % 2, make_meta(n, dataset="toy", split="train"))


@pytest.mark.parametrize("spatial", [(12, 12), (8, 8, 8)])
@pytest.mark.parametrize(
    "transform",
    [
        AdjustGamma(1.5),
        ScaleContrast(0.5),
        AddGaussianNoise(0.05, seed=1),
        GaussianBlur(1.0),
        SimulateResolution(2.0),
        ApplyBiasField(0.3, seed=2),
    ],
    ids=lambda t: type(t).__name__,
)
def test_transforms_keep_batch_shape_2d_and_3d(transform, spatial):
    x = torch.rand(3, 2, *spatial)  # (B, C, *spatial)
    y = transform(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert not torch.allclose(y, x)


def test_resolution_and_blur_remove_high_frequencies():
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2  # (H, W) in {0, 1}
    x = checker.float().expand(2, 1, 16, 16)
    for t in (SimulateResolution(2.0), GaussianBlur(1.0)):
        assert t(x).std() < 0.25 * x.std()


def test_bias_field_is_smooth_positive_and_seeded():
    field = ApplyBiasField(0.3, seed=0).field((32, 32))
    assert field.shape == (32, 32) and field.min() > 0
    assert (field[1:] - field[:-1]).abs().max() < 0.1  # smooth: small neighbour steps
    assert torch.equal(field, ApplyBiasField(0.3, seed=0).field((32, 32)))
    assert not torch.equal(field, ApplyBiasField(0.3, seed=1).field((32, 32)))


def test_default_site_shifts_are_deterministic_distinct_and_scalable():
    a = default_site_shifts(6, seed=0)
    assert a == default_site_shifts(6, seed=0)
    assert a != default_site_shifts(6, seed=1)
    assert a[0].is_identity and a[0].describe() == "none"
    assert all(not s.is_identity for s in a[1:])
    assert len({s.describe() for s in a}) == 6
    assert [s.name for s in a] == [f"site-{i}" for i in range(6)]
    assert all(s.is_identity for s in default_site_shifts(4, seed=0, strength=0))
    assert a[1].seed == site_seed(0, 1)
    with pytest.raises(ConfigError, match="strength must be >= 0"):
        default_site_shifts(2, strength=-1)


def test_site_shift_rejects_invalid_values():
    with pytest.raises(ConfigError, match=r"blur_sigma must be >= 0.0; got -1"):
        SiteShift("s", blur_sigma=-1)
    with pytest.raises(ConfigError, match=r"gamma must be > 0"):
        SiteShift("s", gamma=0)


@pytest.mark.parametrize("shape", [(40, 1, 16, 16), (6, 1, 8, 8, 8)])
def test_apply_site_shift_keeps_uint8_labels_meta_and_is_deterministic(shape):
    samples = _samples(shape)
    for shift in default_site_shifts(5, seed=3)[1:]:
        out = apply_site_shift(samples, shift, chunk_size=7)
        assert out.images.dtype == torch.uint8 and out.images.shape == samples.images.shape
        assert torch.equal(out.labels, samples.labels) and out.meta.equals(samples.meta)
        assert (out.images.float() - samples.images.float()).abs().mean() > 2
        again = apply_site_shift(samples, shift, chunk_size=7)
        assert torch.equal(out.images, again.images)


def test_apply_site_shift_identity_and_noise_streams():
    samples = _samples((8, 1, 16, 16))
    assert apply_site_shift(samples, SiteShift("ref")) is samples
    noisy = SiteShift("n", seed=5, noise_std=0.1)
    a = apply_site_shift(samples, noisy, stream=0).images
    b = apply_site_shift(samples, noisy, stream=1).images
    assert not torch.equal(a, b)  # another split gets another noise draw, same site character


def test_apply_site_shift_on_float_images_stays_in_unit_range():
    x = torch.rand(4, 1, 12, 12)
    samples = SampleSet(
        x, torch.zeros(4, dtype=torch.long), make_meta(4, dataset="f", split="test")
    )
    out = apply_site_shift(samples, SiteShift("s", contrast=2.0, noise_std=0.2, seed=1))
    assert out.images.dtype == torch.float32
    assert out.images.min() >= 0 and out.images.max() <= 1
