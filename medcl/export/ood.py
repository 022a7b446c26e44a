"""Out-of-distribution guard: acquisition facts + a feature-space score with a chosen threshold.

Two independent checks flag an input as unlike the training cohorts:

1. **Acquisition facts** read from the file header before any pixel reaches the model: DICOM
   ``Modality`` and ``BodyPartExamined`` against the modalities and body parts of the
   training sources, the number of image channels against the sources' native channels, and
   the dimensionality. A fact is only checked where the training sources state it (a manifest
   of unspecified modality checks channels and dimensionality only).
2. **Feature-space score**: the Mahalanobis distance of the penultimate features to the
   nearest class mean, with a shared covariance (Lee et al., NeurIPS 2018, "A simple unified
   framework for detecting out-of-distribution samples"). Means and covariance (Ledoit-Wolf
   shrinkage, so a few hundred images suffice) are fitted on the training split; the
   threshold is the ``1 - false_alarm_rate`` quantile of the scores of the validation split,
   i.e. the stated share of in-distribution validation images that would be flagged.

The score is computed inside every exported model (:class:`MahalanobisScore` is part of
:class:`~medcl.export.loading.ExportModule`), so PyTorch, TorchScript, ONNX Runtime and the
MONAI bundle all return it.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_FALSE_ALARM_RATE",
    "MahalanobisScore",
    "acquisition_facts",
    "acquisition_problems",
    "fit_mahalanobis",
    "ood_reason",
]

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import medmnist
import numpy as np
import pydicom
import torch
from sklearn.covariance import LedoitWolf
from torch import Tensor, nn

from medcl.data.readers import inspect_file
from medcl.errors import ConfigError

#: Share of in-distribution validation images the threshold flags by default.
DEFAULT_FALSE_ALARM_RATE = 0.05

# Descriptive source modality (medcl.data.sources) -> DICOM (0008,0060) Modality codes.
_DICOM_MODALITY = (
    (r"x-ray|radiograph", ("CR", "DX", "RG")),
    (r"\bct\b", ("CT",)),
    (r"\bmr\b|\bmri\b|magnetic", ("MR",)),
    (r"ultrasound", ("US",)),
    (r"fundus|oct\b|retina", ("OP", "OPT")),
    (r"microscop|patholog", ("SM", "GM")),
    (r"dermatoscop", ("XC",)),
)
# Descriptive source modality -> DICOM (0018,0015) BodyPartExamined values.
_BODY_PART = (
    (r"chest|lung|pneumonia", ("CHEST", "LUNG", "THORAX")),
    (r"breast", ("BREAST",)),
    (r"abdom|adrenal|kidney|liver", ("ABDOMEN",)),
    (r"retin|fundus|oct\b", ("EYE",)),
    (r"brain|head", ("BRAIN", "HEAD")),
)


def _lookup(table, text: str) -> list[str]:
    out: list[str] = []
    for pattern, codes in table:
        if re.search(pattern, text.lower()):
            out.extend(c for c in codes if c not in out)
    return out


def acquisition_facts(
    sources: Sequence[Mapping[str, Any]], *, channels: int, spatial_dims: int
) -> dict[str, Any]:
    """What the training cohorts looked like, from the scenario's source descriptions.

    Args:
        sources: :attr:`medcl.data.experience.Scenario.sources` (``dataset``, ``modality``).
        channels: channels the model takes.
        spatial_dims: 2 or 3.

    Returns:
        ``{"modalities", "body_parts", "native_channels", "spatial_dims", "sources"}``; an empty
        list means "not stated by the sources: not checked".
    """
    modalities: list[str] = []
    body_parts: list[str] = []
    native: list[int] = []
    stated = True
    for src in sources:
        text = f"{src.get('modality', '')} {src.get('dataset', '')}"
        mods = _lookup(_DICOM_MODALITY, src.get("modality", ""))
        stated &= bool(mods)
        modalities += [m for m in mods if m not in modalities]
        body_parts += [b for b in _lookup(_BODY_PART, text) if b not in body_parts]
        n = _native_channels(str(src.get("dataset", "")))
        if n is not None and n not in native:
            native.append(n)
    unknown = any(_native_channels(str(s.get("dataset", ""))) is None for s in sources)
    return {
        # a fact is only checked when every source states it
        "modalities": sorted(modalities) if stated and sources else [],
        "body_parts": sorted(body_parts) if stated and sources else [],
        "native_channels": [] if unknown or not sources else sorted(native),
        "channels": channels,
        "spatial_dims": spatial_dims,
        "sources": [
            {"dataset": str(s.get("dataset", "")), "modality": str(s.get("modality", ""))}
            for s in sources
        ],
    }


def _native_channels(dataset: str) -> int | None:
    """Channels of a MedMNIST flag (``"retinamnist@64"`` -> 3), None for other sources."""
    info = medmnist.INFO.get(dataset.split("@")[0])
    return int(info["n_channels"]) if info is not None else None


def acquisition_problems(path: str | Path, facts: Mapping[str, Any]) -> list[str]:
    """Header facts of ``path`` that no training cohort had (empty when none, or unknown)."""
    path = Path(path)
    out: list[str] = []
    info = inspect_file(path)
    native = facts.get("native_channels")
    if info.problem is None and native and info.channels not in native:
        out.append(
            f"{info.channels} channel(s); the training cohorts had "
            f"{'/'.join(map(str, facts['native_channels']))}"
        )
    dicom = path.is_dir() or path.name.lower().endswith(".dcm")
    if not dicom or info.problem is not None:
        return out
    first = sorted(p for p in path.iterdir() if p.is_file())[0] if path.is_dir() else path
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    modality = str(ds.get("Modality", "") or "").upper()
    part = str(ds.get("BodyPartExamined", "") or "").upper()
    if modality and facts.get("modalities") and modality not in facts["modalities"]:
        out.append(
            f"DICOM Modality {modality}; the training cohorts were {'/'.join(facts['modalities'])}"
        )
    if part and facts.get("body_parts") and part not in facts["body_parts"]:
        out.append(
            f"DICOM BodyPartExamined {part}; the training cohorts were "
            f"{'/'.join(facts['body_parts'])}"
        )
    return out


def ood_reason(score: float, ood: Mapping[str, Any], facts: Sequence[str] = ()) -> str:
    """Why an input is out of distribution ("" when it is not)."""
    parts = list(facts)
    threshold = float(ood.get("threshold", float("inf")))
    if np.isfinite(score) and score > threshold:
        parts.append(
            f"feature distance {score:.1f} > {threshold:.1f} (threshold flags "
            f"{100 * float(ood['false_alarm_rate']):g}% of in-distribution validation images)"
        )
    return "; ".join(parts)


class MahalanobisScore(nn.Module):
    """Minimum Mahalanobis distance of features to the class means (shared covariance).

    Args:
        means: ``(M, F)`` class means.
        precision: ``(F, F)`` inverse covariance.

    Shapes: features ``(B, F)`` -> score ``(B,)`` (larger: less like the training data).
    """

    def __init__(self, means: Tensor, precision: Tensor) -> None:
        super().__init__()
        self.register_buffer("means", means.float())
        self.register_buffer("precision", precision.float())
        self.register_buffer(
            "mean_terms", torch.einsum("mf,fg,mg->m", self.means, self.precision, self.means)
        )

    @classmethod
    def empty(cls, n_means: int, n_features: int) -> MahalanobisScore:
        """Placeholder of the right shapes, filled by ``load_state_dict``."""
        return cls(torch.zeros(n_means, n_features), torch.eye(n_features))

    def forward(self, f: Tensor) -> Tensor:
        f = f.float().flatten(1)  # (B, F)
        fp = f @ self.precision  # (B, F)
        d = (fp * f).sum(1, keepdim=True) - 2 * fp @ self.means.T + self.mean_terms  # (B, M)
        return d.clamp_min(0).min(1).values.sqrt()


def fit_mahalanobis(
    features: Callable[[Tensor], Tensor],
    train: tuple[Tensor, Tensor],
    val: Tensor,
    *,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    batch_size: int = 256,
) -> tuple[MahalanobisScore, dict[str, Any]]:
    """Fit class means + shared covariance on ``train``, choose the threshold on ``val``.

    Args:
        features: ``(B, C, *spatial)`` [0, 1] images -> ``(B, F)`` penultimate features.
        train: ``(images (N, C, *spatial) in [0, 1], labels (N,))``.
        val: ``(N_val, C, *spatial)`` in-distribution validation images in [0, 1].
        false_alarm_rate: share of ``val`` scores above the threshold, in (0, 1).
        batch_size: images per forward pass.

    Returns:
        The score module and its record ``{"score", "false_alarm_rate", "threshold", "n_fit",
        "n_val", "n_features", "n_means"}``.
    """
    if not 0.0 < false_alarm_rate < 1.0:
        raise ConfigError(
            f"false_alarm_rate must lie in (0, 1), e.g. 0.05; got {false_alarm_rate!r}."
        )
    images, labels = train
    if len(images) < 2 or len(val) < 1:
        raise ConfigError(
            f"the OOD guard needs >= 2 training and >= 1 validation images; got {len(images)} "
            f"and {len(val)}."
        )

    def embed(x: Tensor) -> np.ndarray:
        with torch.no_grad():
            parts = [features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat(parts).flatten(1).double().numpy()

    f = embed(images)  # (N, F)
    y = labels.numpy()
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(0) for c in classes])  # (M, F)
    centred = f - means[np.searchsorted(classes, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    score = MahalanobisScore(torch.from_numpy(means), torch.from_numpy(precision)).eval()
    with torch.no_grad():
        val_scores = score(torch.from_numpy(embed(val))).numpy()
    threshold = float(np.quantile(val_scores, 1.0 - false_alarm_rate))
    record = {
        "score": "mahalanobis (min over class means, shared Ledoit-Wolf covariance)",
        "false_alarm_rate": false_alarm_rate,
        "threshold": threshold,
        "n_fit": len(images),
        "n_val": len(val),
        "n_features": int(f.shape[1]),
        "n_means": len(classes),
    }
    return score, record
