"""The pieces a medcl MONAI bundle's ``configs/inference.json`` references by ``_target_``.

- :class:`BundleNetwork`: the bundle's ``network_def``. It rebuilds the exported architecture
  from ``configs/metadata.json`` (weights come from ``models/model.pt`` through MONAI's
  ``CheckpointLoader``); ``forward`` returns the class probabilities only, one tensor, as
  ``verify_net_in_out`` and MONAI inferers expect; :meth:`BundleNetwork.outputs` adds the
  routed head and the OOD score.
- :class:`ReadableDataset` + :func:`collate_readable`: the input files through the bundle's
  preprocessing; a file that cannot be read (the check of ``medcl predict``, then decoding) is
  skipped with its reason instead of stopping the run.
- :class:`GuardedInferer`: the inferer that asks the network for all three outputs.
- :class:`PredictionWriter`: an ignite handler writing ``predictions.csv`` with the columns
  of ``medcl predict`` (probabilities, class, prediction set, route, ``ood`` and its reason; a
  skipped file gets ``status=error`` and the reason, and is listed in the log).

Everything else in ``inference.json`` is stock MONAI (``LoadImaged``, ``Resized``,
``DataLoader``, ``CheckpointLoader``, ``SupervisedEvaluator``).
"""

from __future__ import annotations

__all__ = [
    "BundleNetwork",
    "GuardedInferer",
    "PredictionWriter",
    "ReadableDataset",
    "collate_readable",
    "read_bundle_metadata",
]

import json
import logging
from pathlib import Path
from typing import Any

import torch
from monai.data import Dataset
from monai.inferers import Inferer
from torch import Tensor, nn

from medcl.errors import ConfigError
from medcl.export.extras import require
from medcl.export.predict import input_problem, prediction_rows
from medcl.export.prediction_sets import check_site
from medcl.export.rebuild import rebuild_module

logger = logging.getLogger(__name__)


def read_bundle_metadata(bundle: str | Path) -> dict[str, Any]:
    """The ``medcl`` section of ``BUNDLE/configs/metadata.json``."""
    path = Path(bundle) / "configs" / "metadata.json"
    if not path.is_file():
        raise ConfigError(f"{bundle} is not a medcl bundle: {path} is missing.")
    meta = json.loads(path.read_text())
    if "medcl" not in meta:
        raise ConfigError(f"{path} has no 'medcl' section; re-export with `medcl export`.")
    return meta["medcl"]


class BundleNetwork(nn.Module):
    """The bundle's network: ``(B, C, H, W[, D])`` in [0, 1] -> probabilities ``(B, K)``.

    Args:
        bundle_root: the bundle folder (its ``configs/metadata.json`` holds the architecture).
        module: an :class:`~medcl.export.module.ExportModule` to wrap instead (export time).
    """

    def __init__(self, bundle_root: str = ".", module: nn.Module | None = None) -> None:
        super().__init__()
        if module is None:
            meta = read_bundle_metadata(bundle_root)
            if "rebuild" not in meta:
                raise ConfigError(
                    f"{bundle_root}: configs/metadata.json has no medcl.rebuild section; "
                    "export the bundle again with `medcl export -f bundle`."
                )
            module = rebuild_module(meta, meta["rebuild"])
        self.module = module

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Probabilities ``(B, K)``, route ``(B,)`` (-1: none), OOD score ``(B,)``."""
        return self.module(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)[0]


def _root_cause(e: BaseException) -> str:
    """The innermost error's first line: MONAI wraps a reader's error in "applying transform"."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class ReadableDataset(Dataset):
    """``[{"image": path, "path": path}]`` through ``transform``; unreadable files are marked.

    Each item gains ``error``: empty when the file was read, else why not, in the words of
    ``medcl predict`` (:func:`~medcl.export.predict.input_problem`, then ``could not decode``);
    a marked item has ``image=None`` and :func:`collate_readable` leaves it out of the batch.

    Args:
        data: the datalist.
        transform: the bundle's ``preprocessing``.
        bundle_root: the bundle folder (the model's input dimensions and channels).
    """

    def __init__(self, data, transform, bundle_root: str = ".") -> None:
        super().__init__(data, transform)
        self.meta = read_bundle_metadata(bundle_root)

    def _transform(self, index: int) -> dict[str, Any]:
        path = self.data[index]["path"]
        problem = input_problem(path, self.meta)
        if problem is None:
            try:
                return {**super()._transform(index), "error": ""}
            except Exception as e:  # a header that reads but pixels that do not decode
                problem = f"could not decode: {_root_cause(e)}"
        return {"image": None, "path": path, "error": problem}


def collate_readable(items: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader collate: ``image`` ``(B_ok, C, *spatial)`` of the readable items; ``path`` and
    ``error`` of every item, in order (``error`` empty for the readable ones)."""
    ok = [torch.as_tensor(it["image"]) for it in items if not it["error"]]
    return {
        "image": torch.stack(ok) if ok else torch.empty(0),
        "path": [str(it["path"]) for it in items],
        "error": [it["error"] for it in items],
    }


class GuardedInferer(Inferer):
    """Run :meth:`BundleNetwork.outputs`: ``{"probabilities", "route", "ood_score"}``.

    A batch whose files were all unreadable (no images) gives empty outputs without running the
    network.
    """

    def __call__(self, inputs: Tensor, network: nn.Module, *args: Any, **kwargs: Any):
        if inputs.numel() == 0:
            return {}
        probs, route, score = network.outputs(inputs)
        return {"probabilities": probs, "route": route, "ood_score": score}


class PredictionWriter:
    """Ignite handler: collect each batch's outputs, write ``output_dir/predictions.csv``.

    Args:
        output_dir: where ``predictions.csv`` goes.
        bundle_root: the bundle folder (class names, routes, OOD threshold, training facts).
        reject_ood: leave ``predicted_class`` empty for out-of-distribution rows.
        path_key: batch key holding each input's path.
        site: the site the inputs come from: its conformal threshold for ``prediction_set``
            (``medcl predict --site``); ``None``: the threshold that covers every site.
    """

    def __init__(
        self,
        output_dir: str,
        bundle_root: str = ".",
        reject_ood: bool = False,
        path_key: str = "path",
        site: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.meta = read_bundle_metadata(bundle_root)
        self.reject_ood, self.path_key, self.site = reject_ood, path_key, site
        check_site(self.meta, site)
        self.rows: list[dict[str, Any]] = []
        self.done: list[int] = []
        self.outputs: list[dict[str, Tensor]] = []

    def attach(self, engine) -> None:
        events = require("ignite.engine", purpose="running a MONAI bundle").Events
        engine.add_event_handler(events.STARTED, self._reset)
        engine.add_event_handler(events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(events.COMPLETED, self._write)

    def _reset(self, engine) -> None:
        self.rows, self.done, self.outputs = [], [], []

    def _collect(self, engine) -> None:
        batch = engine.state.batch
        paths = [str(p) for p in batch[self.path_key]]
        errors = batch.get("error", [""] * len(paths))  # "": read (see ReadableDataset)
        for p, err in zip(paths, errors, strict=True):
            if not err:
                self.done.append(len(self.rows))
            self.rows.append({"input": p, "status": "error" if err else "ok", "error": err})
        pred = engine.state.output["pred"]
        if pred:  # empty when every file of the batch was unreadable
            self.outputs.append({k: v.detach().cpu() for k, v in pred.items()})

    def _write(self, engine) -> None:
        k = len(self.meta["class_names"])  # outputs of no files: every file was unreadable
        empty = {"probabilities": torch.zeros(0, k), "route": torch.zeros(0), "ood_score": []}
        cat = {
            key: torch.cat([o[key] for o in self.outputs] or [torch.as_tensor(none)]).numpy()
            for key, none in empty.items()
        }
        df = prediction_rows(
            self.rows,
            self.done,
            cat["probabilities"],
            cat["route"],
            cat["ood_score"],
            self.meta,
            reject_ood=self.reject_ood,
            site=self.site,
        )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        out = self.output_dir / "predictions.csv"
        df.to_csv(out, index=False)
        skipped = [r for r in self.rows if r["status"] == "error"]
        if skipped:
            listed = "\n".join(f"  {r['input']}: {r['error']}" for r in skipped)
            logger.warning(
                "skipped %d of %d input file(s) that could not be read (their rows in %s have "
                "status=error and the reason):\n%s",
                len(skipped),
                len(self.rows),
                out,
                listed,
            )
