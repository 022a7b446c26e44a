"""The report's saliency gallery: per site, the most confident errors with their Grad-CAM maps.

The final model is restored from the run directory
(:func:`medcl.engine.model_record.restore_model`) and explained on the test images of the
rebuilt scenario (pixels only, as the thumbnails): the map shows what drove the *predicted*
(wrong) class, at the resolution of the model's last feature stage
(:func:`medcl.models.saliency.feature_stage`). The model-randomisation check of Adebayo et al.
(2018) runs on the same images and is reported with the maps.
"""

from __future__ import annotations

__all__ = ["saliency_gallery"]

import warnings
from typing import Any

import numpy as np
import torch

from medcl.data.transforms import to_model_input
from medcl.engine.model_record import restore_model
from medcl.errors import MedclError
from medcl.models.saliency import (
    feature_stage,
    grad_cam,
    model_randomization_check,
    overlay_png,
)
from medcl.reports import plots
from medcl.reports.failures import images_of_rows, thumbnail_png
from medcl.reports.predictions import Predictions
from medcl.reports.results import RunResults

METHOD = "Grad-CAM (Selvaraju et al., ICCV 2017) via monai.visualize.GradCAM"


def _site_errors(final: Predictions, threshold: float | None, per_site: int) -> np.ndarray:
    """Rows of the ``per_site`` most confident errors of every experience, in experience order."""
    predicted = final.predict(threshold)
    confidence = final.probs[np.arange(len(final)), predicted]
    wrong = final.scorable() & (predicted != final.labels)
    rows = []
    for e in np.unique(final.experience):
        idx = np.flatnonzero(wrong & (final.experience == e))
        rows.extend(idx[np.argsort(-confidence[idx], kind="stable")[:per_site]].tolist())
    return np.asarray(rows, dtype=np.int64)


def saliency_gallery(
    res: RunResults,
    scenario: Any | None,
    *,
    per_site: int = 3,
    threshold: float | None = None,
    notes: list[str],
) -> tuple[dict[str, Any], dict[int, str], dict[int, str]]:
    """Per site (experience) the ``per_site`` most confident errors and their Grad-CAM overlays.

    Args:
        res: the run's results (final model = the reported one).
        scenario: the rebuilt scenario (``None``: thumbnails are off, nothing is shown).
        per_site: errors shown per experience.
        threshold: binary operating point (as the rest of the report).
        notes: why maps are missing, when they are.

    Returns:
        ``report.json``'s ``saliency`` entry (``shown``, method, layer, feature-map size, the
        sanity check, and per site the rows ``row, true, predicted, confidence``), then
        ``row -> PNG data URI`` of each image thumbnail and of each overlay.
    """
    data: dict[str, Any] = {"shown": False, "method": METHOD, "sites": []}
    if scenario is None:
        notes.append(
            "Saliency maps are omitted: they need the test images, which were not loaded "
            "(thumbnails off, or the data could not be loaded again)."
        )
        return data, {}, {}
    final = res.predictions()
    rows = _site_errors(final, threshold, per_site)
    images = images_of_rows(scenario, final, rows)
    if not len(rows):
        return data, {}, {}
    if images is None:
        notes.append("Saliency maps are omitted: the data loaded again does not match the run.")
        return data, {}, {}
    rows = np.asarray([r for r in rows if int(r) in images], dtype=np.int64)
    x = torch.stack([images[int(r)] for r in rows])  # (N, C, H, W[, D]) as stored (uint8)
    predicted = final.predict(threshold)[rows]
    try:
        restored = restore_model(res.run_dir, res.final)
        if restored is None:
            raise MedclError("the run directory was written by an older medcl")
        model = restored[1].deployable_model().eval()
        example = to_model_input(x[:1])
        layer = feature_stage(model, example)
        maps = grad_cam(model, x, class_idx=torch.as_tensor(predicted), layer=layer)
        check = model_randomization_check(
            lambda m, imgs: grad_cam(m, imgs, class_idx=torch.as_tensor(predicted), layer=layer),
            model,
            x,
        )
    except (MedclError, OSError, RuntimeError) as e:  # the message may quote paths: console
        warnings.warn(f"report: no saliency maps: {e}", stacklevel=2)
        notes.append(
            f"Saliency maps are omitted: the final model could not be restored or explained "
            f"({type(e).__name__}; details on the console)."
        )
        return data, {}, {}
    grid = _feature_map_size(model, layer, example)
    names = res.class_names(final.n_classes)
    thumbs = {int(r): plots.png_data_uri(thumbnail_png(x[i])) for i, r in enumerate(rows)}
    overlays = {int(r): plots.png_data_uri(overlay_png(x[i], maps[i])) for i, r in enumerate(rows)}
    confidence = final.probs[rows, predicted]
    for e in np.unique(final.experience[rows]):
        picked = [i for i, r in enumerate(rows) if final.experience[r] == e]
        data["sites"].append(
            {
                "experience": int(e),
                "name": res.experience_names[int(e)],
                "errors": [
                    {
                        "row": int(rows[i]),
                        "true": names[int(final.labels[rows[i]])],
                        "predicted": names[int(predicted[i])],
                        "confidence": float(confidence[i]),
                    }
                    for i in picked
                ],
            }
        )
    data.update(
        shown=True,
        layer=layer,
        feature_map=grid,
        explains="the predicted class",
        sanity={
            "test": "model-parameter randomisation (Adebayo et al., NeurIPS 2018)",
            "rank_correlation": check.correlation,
            "threshold": check.threshold,
            "passed": check.passed,
            "n_images": len(rows),
            "random_copies": len(check.per_copy),
        },
    )
    if not check.passed:
        notes.append(
            f"Saliency sanity check failed: the maps of the trained model and of a copy with "
            f"random weights have rank correlation {check.correlation:.2f} (>= "
            f"{check.threshold}), so these maps say little about what the model learned."
        )
    return data, thumbs, overlays


def _feature_map_size(model: torch.nn.Module, layer: str, example: torch.Tensor) -> list[int]:
    """Spatial size of ``layer``'s output: the resolution of the maps before upsampling."""
    seen: list[list[int]] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _a, out: seen.append(list(out.shape[2:]))
    )
    try:
        with torch.no_grad():
            model(example)
    finally:
        handle.remove()
    return seen[-1]
