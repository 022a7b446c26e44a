"""Out-of-distribution guard: AUROC of held-out in-distribution vs out-of-distribution inputs.

A real run is trained on PneumoniaMNIST over 2 simulated sites (chest X-ray), exported as a
MONAI bundle (which fits the guard on training/validation data), and ``medcl predict`` (the
deployment path: files -> MONAI preprocessing -> ONNX Runtime) scores:

- in distribution, held out: PneumoniaMNIST **test** images written as PNG files;
- out of distribution: BreastMNIST test (ultrasound), RetinaMNIST test (fundus photographs,
  RGB), the 2D pixel-bearing DICOM samples shipped with pydicom (CT, MR, ...), axial slices of
  nibabel's sample volumes, and scikit-image's natural photographs.

Reported per OOD set: AUROC of the feature score (ID vs that set), the share flagged by the
guard (feature threshold + acquisition facts), and the false-alarm rate on the held-out ID
images (the threshold was set at 5 % on validation images).

    nice python benchmarks/ood.py [--updates 200] [--n 300]

Writes benchmarks/results/ood.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_root, markdown_table, write_results

from medcl.config import validate_config
from medcl.data.medmnist_source import load_medmnist
from medcl.engine.run import run
from medcl.export import export_run, load_predictor, predict_files


def _pngs(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        arr = img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0]
        Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"{i:04d}.png")
    return folder


def _dicom_samples(folder: Path) -> Path:
    """pydicom's test files with 2D pixel data that decode without optional codecs."""
    import shutil

    import pydicom
    import pydicom.data

    folder.mkdir(parents=True)
    for name in pydicom.data.get_testdata_files("*.dcm"):
        try:
            ds = pydicom.dcmread(name)
            arr = ds.pixel_array
        except Exception:  # compressed without a codec, no pixels, ...
            continue
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames == 1 and arr.ndim == 2 and int(ds.get("SamplesPerPixel", 1)) == 1:
            shutil.copy(name, folder / Path(name).name)
    return folder


def _nifti_slices(folder: Path) -> Path:
    import nibabel as nib
    import nibabel.testing

    folder.mkdir(parents=True)
    for path in sorted(Path(nibabel.testing.data_path).glob("*.nii*")):
        try:
            vol = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        except Exception:
            continue
        if vol.ndim >= 3 and min(vol.shape[:2]) >= 8 and np.ptp(vol) > 0:
            sl = vol[:, :, vol.shape[2] // 2] if vol.ndim == 3 else vol[:, :, vol.shape[2] // 2, 0]
            nib.save(
                nib.Nifti1Image(np.ascontiguousarray(sl), np.eye(4)),
                folder / f"{path.stem.split('.')[0]}.nii.gz",
            )
    return folder


def _photos(folder: Path) -> Path:
    from skimage import data

    folder.mkdir(parents=True)
    for name in (
        "astronaut",
        "camera",
        "coffee",
        "chelsea",
        "rocket",
        "moon",
        "page",
        "coins",
        "horse",
        "text",
    ):
        img = np.asarray(getattr(data, name)())
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        Image.fromarray(img[..., :3] if img.ndim == 3 else img).save(folder / f"{name}.png")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--updates", type=int, default=200, help="training updates per experience")
    p.add_argument("--n", type=int, default=300, help="images per MedMNIST set")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = data_root(args.root)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = validate_config(
            {
                "name": "ood-bench",
                "output_dir": str(tmp / "runs"),
                "scenario": {"name": "pneumonia-sites", "n_sites": 2},
                "strategy": {"name": "finetune"},
                "model": {"backbone": args.backbone, "small_input": True},
                "train": {
                    "max_updates": args.updates,
                    "epochs": 5,
                    "batch_size": 32,
                    "augment": "none",
                    "eval_every": 0,
                    "num_threads": args.threads,
                },
                "data": {"root": str(root)},
            }
        )
        run_dir = run(cfg, quiet=True)
        bundle = export_run(run_dir, "bundle")
        pred = load_predictor(bundle, backend="onnx")
        sets = {
            "pneumoniamnist test (ID, held out)": _pngs(
                load_medmnist("pneumoniamnist", "test", root=root).images[: args.n].numpy(),
                tmp / "id",
            ),
            "breastmnist test (ultrasound)": _pngs(
                load_medmnist("breastmnist", "test", root=root).images[: args.n].numpy(),
                tmp / "breast",
            ),
            "retinamnist test (fundus, RGB)": _pngs(
                load_medmnist("retinamnist", "test", root=root).images[: args.n].numpy(),
                tmp / "retina",
            ),
            "pydicom samples (CT, MR, ...)": _dicom_samples(tmp / "dicom"),
            "nibabel sample slices": _nifti_slices(tmp / "nifti"),
            "scikit-image photographs": _photos(tmp / "photos"),
        }
        scores = {}
        for name, folder in sets.items():
            df = predict_files(pred, [folder])
            ok = df[df["status"] == "ok"]
            if ok.empty:
                continue
            scores[name] = ok
        raw = {name: ok["ood_score"].to_numpy(np.float64) for name, ok in scores.items()}
    id_name = "pneumoniamnist test (ID, held out)"
    id_scores, id_df = raw[id_name], scores[id_name]
    threshold = pred.meta["ood"]["threshold"]
    rows = []
    for name, s in raw.items():
        flagged = float(scores[name]["ood"].mean())
        row = {"set": name, "n": len(s), "flagged": flagged, "score_median": float(np.median(s))}
        if name != id_name:
            y = np.r_[np.zeros(len(id_scores)), np.ones(len(s))]
            row["auroc"] = float(roc_auc_score(y, np.r_[id_scores, s]))
            row["score_flagged"] = float((s > threshold).mean())
        else:
            row["auroc"] = float("nan")
            row["score_flagged"] = float((s > threshold).mean())
        rows.append(row)
    ood_rows = [r for r in rows if r["set"] != id_name]
    all_ood = np.concatenate([raw[r["set"]] for r in ood_rows])
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(all_ood))]
    pooled = float(roc_auc_score(y, np.r_[id_scores, all_ood]))
    mr = scores["pydicom samples (CT, MR, ...)"]
    mr = mr[mr["input"].str.endswith("MR_small.dcm")]
    targets = [
        {
            "name": "pooled AUROC, held-out ID vs all OOD sets",
            "value": pooled,
            "goal": ">= 0.9",
            "met": pooled >= 0.9,
        },
        {
            "name": "false-alarm rate on held-out ID test images",
            "value": float(id_df["ood"].mean()),
            "goal": "<= 0.10 (threshold set at 0.05 on validation)",
            "met": float(id_df["ood"].mean()) <= 0.10,
        },
        {
            "name": "pydicom MR_small.dcm flagged",
            "value": bool(len(mr) and mr["ood"].all()),
            "goal": "True",
            "met": bool(len(mr) and mr["ood"].all()),
        },
    ]
    md = (
        f"# OOD guard: held-out ID vs OOD ({args.backbone}, PneumoniaMNIST 2 sites, "
        f"{args.updates} updates/experience)\n\n"
        f"Threshold {threshold:.2f} = 95th percentile of validation feature scores (5 % false "
        "alarms). `flagged`: share flagged by the guard (feature threshold or acquisition "
        "facts); `score_flagged`: by the feature threshold alone.\n\n"
        + markdown_table(rows, ["set", "n", "auroc", "flagged", "score_flagged", "score_median"])
        + "\n\n## Targets\n\n"
        + markdown_table(targets, ["name", "value", "goal", "met"])
        + f"\n\nPooled AUROC {pooled:.3f}. Total time {time.perf_counter() - t0:.0f} s on a shared, "
        "loaded 2-core machine.\n"
    )
    path = write_results(
        "ood", {"args": vars(args), "threshold": threshold, "rows": rows, "targets": targets}, md
    )
    if not args.quiet:
        print(md)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
