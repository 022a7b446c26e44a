"""Simulated acquisition shifts: how the same anatomy looks when imaged at another site.

Each shift is a small MONAI ``Transform`` over a whole float batch ``(B, C, *spatial)`` in
[0, 1] (2D ``(B, C, H, W)`` or 3D ``(B, C, H, W, D)``). A :class:`SiteShift` bundles the shifts of
one simulated site (which ones, how strong) and is derived deterministically from
``(seed, site index)``; :func:`apply_site_shift` applies it once, at scenario build time, to a
``uint8`` :class:`~medcl.data.samples.SampleSet` in memory-bounded chunks and returns ``uint8``.

Order of operations follows the imaging chain: acquisition resolution -> point-spread blur ->
coil/illumination bias field -> display contrast and gamma -> detector noise.
"""

from __future__ import annotations

__all__ = [
    "AddGaussianNoise",
    "AdjustGamma",
    "ApplyBiasField",
    "GaussianBlur",
    "ScaleContrast",
    "SimulateResolution",
    "SiteShift",
    "apply_site_shift",
    "default_site_shifts",
    "site_seed",
]

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from monai.transforms import Compose, Transform
from numpy.polynomial import legendre
from torch import Tensor

from medcl.data.samples import SampleSet
from medcl.errors import ConfigError


class AdjustGamma(Transform):
    """Gamma curve ``x ** gamma`` (>1 darkens mid-tones, <1 brightens).

    Shapes: float ``(B, C, *spatial)`` in [0, 1] -> same.
    """

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def __call__(self, x: Tensor) -> Tensor:
        return x.clamp(0, 1).pow(self.gamma)


class ScaleContrast(Transform):
    """Scale each image's contrast about its own mean by ``factor`` (<1 flattens, >1 sharpens).

    Shapes: float ``(B, C, *spatial)`` -> same.
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)  # (B, 1, 1, 1[, 1])
        return mean + (x - mean) * self.factor


class AddGaussianNoise(Transform):
    """Additive Gaussian detector noise with standard deviation ``std`` (in [0, 1] units).

    Args:
        std: noise standard deviation.
        seed: seeds a private ``torch.Generator``: the same call sequence gives the same noise.

    Shapes: float ``(B, C, *spatial)`` -> same.
    """

    def __init__(self, std: float, *, seed: int = 0) -> None:
        self.std = std
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype)
        return x + noise * self.std


class GaussianBlur(Transform):
    """Isotropic Gaussian blur (point-spread function), MONAI ``GaussianFilter`` in 2D or 3D.

    Shapes: float ``(B, C, *spatial)`` -> same.
    """

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, x: Tensor) -> Tensor:
        return GaussianFilter(x.ndim - 2, self.sigma)(x)


class SimulateResolution(Transform):
    """Lower acquisition resolution: area-downsample by ``factor``, then resize back (bilinear).

    Shapes: float ``(B, C, *spatial)`` -> same.
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, x: Tensor) -> Tensor:
        size = x.shape[2:]
        low = [max(1, round(s / self.factor)) for s in size]
        mode = "bilinear" if x.ndim == 4 else "trilinear"
        x = F.interpolate(x, size=low, mode="area")
        return F.interpolate(x, size=size, mode=mode, align_corners=False)


class ApplyBiasField(Transform):
    """Smooth multiplicative bias field ``exp(s * L / max|L|)``, ``L`` a random Legendre polynomial.

    ``L = sum c_ij P_i(x) P_j(y)`` (``c_ijk``, ``P_k(z)`` in 3D) over total degree ``1..degree``,
    so the field has no global gain and lies in ``[exp(-s), exp(s)]``. It is fixed per site (one
    set of coefficients), like a coil-sensitivity or illumination profile.

    Args:
        strength: maximum absolute log-gain ``s`` (0.3 gives gains of about 0.74 to 1.35).
        degree: maximum total polynomial degree.
        seed: draws the coefficients.

    Shapes: float ``(B, C, *spatial)`` -> same.
    """

    def __init__(self, strength: float, *, degree: int = 3, seed: int = 0) -> None:
        self.strength, self.degree, self.seed = strength, degree, seed

    def field(self, spatial: tuple[int, ...]) -> Tensor:
        """The multiplicative field, shape ``spatial``."""
        rng = np.random.default_rng(self.seed)
        c = rng.uniform(-1, 1, (self.degree + 1,) * len(spatial))
        total = np.indices(c.shape).sum(0)
        c[(total == 0) | (total > self.degree)] = 0.0  # no constant term, bounded smoothness
        grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in spatial], indexing="ij")
        log_field = (
            legendre.legval2d(*grid, c) if len(spatial) == 2 else legendre.legval3d(*grid, c)
        )
        log_field *= self.strength / max(np.abs(log_field).max(), 1e-12)
        return torch.from_numpy(np.exp(log_field)).float()

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.field(tuple(x.shape[2:])).to(x.dtype)


@dataclass(frozen=True)
class SiteShift:
    """The acquisition shift of one simulated site (identity values switch a shift off).

    Attributes:
        name: site name, e.g. ``"site-1"``.
        seed: seeds the bias field and the noise of this site.
        resolution: downsampling factor (1 = native, 2 = half resolution).
        blur_sigma: Gaussian blur sigma in pixels (0 = none).
        bias_field: maximum absolute log-gain of the bias field (0 = none).
        contrast: contrast factor about each image's mean (1 = unchanged).
        gamma: gamma exponent (1 = unchanged).
        noise_std: Gaussian noise std in [0, 1] intensity units (0 = none).
    """

    name: str
    seed: int = 0
    resolution: float = 1.0
    blur_sigma: float = 0.0
    bias_field: float = 0.0
    contrast: float = 1.0
    gamma: float = 1.0
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        for key, low in (
            ("resolution", 1.0),
            ("blur_sigma", 0.0),
            ("bias_field", 0.0),
            ("noise_std", 0.0),
        ):
            if getattr(self, key) < low:
                raise ConfigError(
                    f"SiteShift({self.name!r}).{key} must be >= {low}; got {getattr(self, key)}."
                )
        for key in ("contrast", "gamma"):
            if getattr(self, key) <= 0:
                raise ConfigError(
                    f"SiteShift({self.name!r}).{key} must be > 0; got {getattr(self, key)}."
                )

    @property
    def is_identity(self) -> bool:
        """True when no shift is active."""
        return not self._parts()

    def _parts(self) -> list[str]:
        parts = []
        if self.resolution > 1:
            parts.append(f"resolution 1/{self.resolution:.2g}")
        if self.blur_sigma > 0:
            parts.append(f"blur σ={self.blur_sigma:.2g}")
        if self.bias_field > 0:
            parts.append(f"bias field {self.bias_field:.2g}")
        if self.contrast != 1:
            parts.append(f"contrast ×{self.contrast:.2g}")
        if self.gamma != 1:
            parts.append(f"gamma {self.gamma:.2g}")
        if self.noise_std > 0:
            parts.append(f"noise σ={self.noise_std:.2g}")
        return parts

    def describe(self) -> str:
        """One line, e.g. ``"blur σ=1, noise σ=0.04"`` (``"none"`` for the reference site)."""
        return ", ".join(self._parts()) or "none"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def transform(self, *, stream: int = 0) -> Compose:
        """The shift as a MONAI ``Compose`` over float batches in [0, 1], clamped to [0, 1].

        Args:
            stream: varies the noise realisation (e.g. one stream per split) without changing
                the site's characteristics.
        """
        ts: list[Transform] = []
        if self.resolution > 1:
            ts.append(SimulateResolution(self.resolution))
        if self.blur_sigma > 0:
            ts.append(GaussianBlur(self.blur_sigma))
        if self.bias_field > 0:
            ts.append(ApplyBiasField(self.bias_field, seed=self.seed))
        if self.contrast != 1:
            ts.append(ScaleContrast(self.contrast))
        if self.gamma != 1:
            ts.append(AdjustGamma(self.gamma))
        if self.noise_std > 0:
            ts.append(AddGaussianNoise(self.noise_std, seed=site_seed(self.seed, stream)))
        return Compose([*ts, _clamp01])


def _clamp01(x: Tensor) -> Tensor:
    return x.clamp(0, 1)


def site_seed(*keys: int) -> int:
    """A 31-bit seed derived from integers such as ``(seed, site index)`` (stable everywhere)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] & 0x7FFFFFFF)


#: Site profiles cycled by :func:`default_site_shifts`: site 0 is the reference acquisition.
_PROFILES: tuple[dict[str, tuple[float, float]], ...] = (
    {},
    {"contrast": (0.55, 0.7), "noise_std": (0.03, 0.05)},
    {"resolution": (1.8, 2.2), "blur_sigma": (0.6, 0.9)},
    {"bias_field": (0.35, 0.5), "gamma": (1.4, 1.7)},
    {"gamma": (0.6, 0.75), "blur_sigma": (0.8, 1.1), "noise_std": (0.02, 0.03)},
)


def default_site_shifts(
    n_sites: int, *, seed: int = 0, strength: float = 1.0, names: list[str] | None = None
) -> list[SiteShift]:
    """Distinct, deterministic acquisition shifts for ``n_sites`` simulated sites.

    Site 0 is the reference acquisition (no shift); sites 1, 2, ... cycle through four profiles
    (low contrast + noise; low resolution + blur; bias field + dark gamma; bright gamma + blur +
    noise), their strengths drawn from the profile's ranges with
    ``numpy.random.default_rng((seed, i))``, then scaled by ``strength``.

    Args:
        n_sites: number of sites.
        seed: scenario seed.
        strength: 0 switches every shift off, 1 is the default severity, 2 doubles it.
        names: site names (default ``"site-0"``, ``"site-1"``, ...).

    Returns:
        One :class:`SiteShift` per site.
    """
    if strength < 0:
        raise ConfigError(
            f"shift strength must be >= 0; got {strength}. Use 0 to switch shifts off."
        )
    names = names or [f"site-{i}" for i in range(n_sites)]
    out = []
    for i, name in enumerate(names):
        rng = np.random.default_rng((seed, i))
        profile = _PROFILES[0 if i == 0 else 1 + (i - 1) % (len(_PROFILES) - 1)]
        params = {}
        for key, (lo, hi) in profile.items():
            value = float(rng.uniform(lo, hi))
            if key in ("contrast", "gamma", "resolution"):  # multiplicative: scale the log
                value = float(np.exp(np.log(value) * strength))
            else:
                value *= strength
            params[key] = round(value, 3)
        out.append(SiteShift(name=name, seed=site_seed(seed, i), **params))
    return out


def apply_site_shift(
    samples: SampleSet, shift: SiteShift, *, stream: int = 0, chunk_size: int = 1024
) -> SampleSet:
    """Apply ``shift`` to every image of ``samples`` (batched, in chunks of ``chunk_size``).

    Args:
        samples: images ``(N, C, *spatial)``, ``uint8`` or float in [0, 1].
        shift: the site's shift.
        stream: noise stream (use a different one per split so noise is not repeated).
        chunk_size: images per batch (bounds peak memory: ``chunk_size * C * H * W * 4`` bytes).

    Returns:
        A new sample set with the same labels and metadata and images of the same dtype.
    """
    if shift.is_identity or len(samples) == 0:
        return samples
    pipeline = shift.transform(stream=stream)
    out = torch.empty_like(samples.images)
    is_uint8 = samples.images.dtype == torch.uint8
    for start in range(0, len(samples), chunk_size):
        chunk = samples.images[start : start + chunk_size]
        x = chunk.float().div_(255.0) if is_uint8 else chunk.float()  # (b, C, *spatial) in [0, 1]
        y = pipeline(x)
        out[start : start + chunk_size] = y.mul_(255.0).round_().to(torch.uint8) if is_uint8 else y
    return SampleSet(out, samples.labels, samples.meta)
