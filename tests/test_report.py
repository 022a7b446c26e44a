"""Clinical report: results API, what-changed flags, failure cases, privacy, the report itself."""

from __future__ import annotations

import json
import re
import warnings
from html import unescape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medcl.cli import main
from medcl.config import validate_config
from medcl.engine.run import run
from medcl.errors import DataError
from medcl.metrics.calibration import expected_calibration_error
from medcl.reports import (
    Predictions,
    RunResults,
    align_rows,
    build_report,
    compare_tables,
    confident_errors,
    thumbnail_png,
    write_report,
)

SECTIONS = (
    "summary",
    "model",
    "data",
    "discrimination",
    "calibration",
    "confusion",
    "sites",
    "continual",
    "changes",
    "compute",
    "failures",
    "notes",
    "checklist",
)
# Tiny on purpose: the report is under test, not the training (no accuracy is asserted).
TRAIN = {
    "epochs": 1,
    "batch_size": 16,
    "max_updates": 4,
    "lr": 0.05,
    "augment": "none",
    "eval_every": 2,
    "num_threads": 1,  # a tiny net on a shared machine: one thread avoids spin-wait contention
}
FAST = {"max_updates": 2, "eval_every": 0}


def _run(out: Path, name: str, scenario: dict, *, seed: int = 0, train: dict | None = None) -> Path:
    cfg = validate_config(
        {
            "name": name,
            "seed": seed,
            "output_dir": str(out),
            "scenario": scenario,
            "strategy": {"name": "finetune"},
            "train": TRAIN | (train or {}),
            "eval": {"curve_subset": 16},
            "memory": {"size": 0},
            "model": {"backbone": "test_resnet", "small_input": True},
        }
    )
    threads = torch.get_num_threads()
    try:
        return run(cfg, quiet=True)
    finally:
        torch.set_num_threads(threads)  # run() sets train.num_threads process-wide


@pytest.fixture(scope="module")
def sites_run(tmp_path_factory) -> Path:
    """A real 3-site domain-incremental run (synthetic images)."""
    return _run(
        tmp_path_factory.mktemp("runs"),
        "sites",
        {
            "name": "synthetic-sites",
            "num_classes": 3,
            "n_sites": 3,
            "n_train": 12,
            "n_val": 4,
            "n_test": 12,
            "image_size": 16,
        },
    )


@pytest.fixture(scope="module")
def sites_report(sites_run: Path) -> tuple[str, dict]:
    html = write_report(sites_run, sites_run, n_resamples=200, seed=1)
    return html.read_text(), json.loads((sites_run / "report.json").read_text())


def _without_images(html: str) -> str:
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)


# -- the report of a real run ------------------------------------------------------------------


def test_report_of_real_run_has_every_section(sites_report):
    html, data = sites_report
    for section in SECTIONS:
        assert f'<section id="{section}">' in html, section
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert html.count("data:image/png;base64,") >= 7  # ROC, reliability, confusion, sites, ...
    for key in (
        "report",
        "model",
        "data",
        "discrimination",
        "calibration",
        "confusion",
        "sites",
        "continual",
        "changes",
        "compute",
        "failures",
        "summary",
        "notes",
    ):
        assert key in data, key
    assert [e["name"] for e in data["data"]["experiences"]] == ["site-0", "site-1", "site-2"]
    assert data["data"]["sources"], "data sources (with licence) come from the rebuilt scenario"
    assert {"train", "val", "test"} == set(data["data"]["totals"])
    assert data["continual"]["stability"], "eval_every=2 gives stability-gap rows"
    assert data["compute"]["parameters"] > 0 and data["compute"]["macs"] > 0
    labels = [c["label"] for c in data["changes"]]
    assert labels[0].startswith("previous model") and labels[1].startswith("run sites")


def test_report_numbers_match_sklearn_on_saved_predictions(sites_run, sites_report):
    _, data = sites_report
    with np.load(sites_run / "predictions" / "after-002.npz") as z:
        probs, y = z["probs"].astype(np.float64), z["labels"]
    pred = probs.argmax(1)
    k = probs.shape[1]
    names = data["confusion"]["class_names"]
    disc = {(r["metric"], r["class"]): r for r in data["discrimination"]}
    for r in disc.values():  # JSON null is NaN
        r["value"] = np.nan if r["value"] is None else r["value"]
    for c, name in enumerate(names):
        assert disc["auroc", name]["value"] == pytest.approx(roc_auc_score(y == c, probs[:, c]))
    labels = list(range(k))
    for metric, fn in (("sensitivity", recall_score), ("ppv", precision_score), ("f1", f1_score)):
        ref = fn(y, pred, labels=labels, average=None, zero_division=np.nan)
        for c, name in enumerate(names):
            assert disc[metric, name]["value"] == pytest.approx(ref[c], nan_ok=True)
    spec = [recall_score(y != c, pred != c) for c in labels]
    for c, name in enumerate(names):
        assert disc["specificity", name]["value"] == pytest.approx(spec[c])
    assert disc["accuracy", "overall"]["value"] == pytest.approx(accuracy_score(y, pred))
    assert disc["balanced_accuracy", "overall"]["value"] == pytest.approx(
        balanced_accuracy_score(y, pred)
    )
    ece, mce = expected_calibration_error(y, probs, n_bins=15)
    assert data["calibration"]["ece"] == pytest.approx(ece)
    assert data["calibration"]["mce"] == pytest.approx(mce)
    counts = np.array(data["confusion"]["counts"])
    assert counts.sum() == len(y) and np.trace(counts) == (pred == y).sum()
    assert all(r["ci_low"] <= r["ci_high"] for r in data["discrimination"] if r["ci_low"])


def _numbers(text: str) -> set[str]:
    return {t.replace(",", "") for t in re.findall(r"\d[\d,]*(?:\.\d+)?", text)}


def test_every_number_on_the_page_is_in_report_json(sites_report):
    html, data = sites_report
    tags = re.sub(r"<style>.*?</style>|<[^>]+>", " ", _without_images(html), flags=re.S)
    visible = unescape(tags)
    known: set[str] = set()

    def collect(x):
        if isinstance(x, dict | list):
            for v in x.values() if isinstance(x, dict) else x:
                collect(v)
        elif isinstance(x, bool) or x is None:
            return
        elif isinstance(x, int | float):
            known.update(f"{abs(x):.{d}f}" for d in range(5))
        else:
            known.update(_numbers(str(x)))

    collect(data)
    missing = _numbers(visible) - known
    assert not missing, f"numbers on the page that report.json lacks: {sorted(missing)[:20]}"


def test_comparing_a_run_with_itself_flags_nothing(sites_report):
    _, data = sites_report
    itself = data["changes"][1]
    assert itself["n_dropped"] == 0 and itself["n_improved"] == 0
    assert all(r["delta"] in (0.0, None) for r in itself["table"])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")  # tiny model
def test_results_api_gives_tidy_frames(sites_run):
    res = RunResults(sites_run)
    assert res.snapshots == [0, 1, 2] and res.previous == 1
    table = res.clinical(n_resamples=50)
    assert list(table.columns) == [
        "after",
        "group",
        "experience",
        "site",
        "n",
        "metric",
        "class",
        "value",
        "ci_low",
        "ci_high",
        "se",
    ]
    assert list(dict.fromkeys(table["group"])) == ["site-0", "site-1", "site-2", "overall"]
    one = table[(table["metric"] == "accuracy") & (table["group"] != "overall")]
    assert one["n"].sum() == len(res.predictions())
    acc = res.accuracy_frame()
    assert len(acc) == 9 and set(acc.columns) >= {"after_name", "eval_name", "value"}
    assert len(res.forgetting()) == 2
    assert res.stability() is not None and len(res.stability()) == 2
    assert res.heterogeneity(table)["metric"].tolist()[0] == "auroc"


# -- what changed --------------------------------------------------------------------------------


def _preds(probs, labels, exp) -> Predictions:
    meta = pd.DataFrame({"site": [f"s{e}" for e in exp], "experience": exp})
    return Predictions(0, np.asarray(probs, float), np.asarray(labels), np.asarray(exp), meta)


def test_what_changed_flags_a_real_drop_and_not_noise():
    from medcl.metrics.clinical import per_group_metrics

    rng = np.random.default_rng(0)
    n = 2000
    y = rng.integers(0, 2, n)
    good = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.2, n), 0.01, 0.99)  # AUROC ~0.98
    bad = np.clip(0.5 + (y - 0.5) * 0.1 + rng.normal(0, 0.2, n), 0.01, 0.99)  # AUROC ~0.63
    same_quality = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.2, n), 0.01, 0.99)

    def table(p):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return per_group_metrics(y, p, None, ["auroc", "accuracy", "ece"], n_resamples=300)

    ref = table(good)
    dropped = compare_tables(ref, table(bad)).set_index(["metric", "class"])
    assert dropped.loc[("auroc", "macro"), "change"] == "dropped"
    assert dropped.loc[("accuracy", "overall"), "change"] == "dropped"
    assert dropped.loc[("auroc", "macro"), "delta"] < -0.2
    improved = compare_tables(table(bad), ref).set_index(["metric", "class"])
    assert improved.loc[("auroc", "macro"), "change"] == "improved"
    # An equally good model on fresh noise stays within the reference CI for AUROC.
    steady = compare_tables(ref, table(same_quality)).set_index(["metric", "class"])
    assert steady.loc[("auroc", "macro"), "change"] == "within CI"


def test_what_changed_calibration_error_is_lower_is_better():
    ref = pd.DataFrame(
        {
            "group": ["overall"],
            "metric": ["ece"],
            "class": ["overall"],
            "value": [0.05],
            "ci_low": [0.04],
            "ci_high": [0.06],
        }
    )
    worse = ref.assign(value=[0.10], ci_low=[0.09], ci_high=[0.11])
    better = ref.assign(value=[0.01], ci_low=[0.005], ci_high=[0.02])
    assert compare_tables(ref, worse)["change"].item() == "dropped"
    assert compare_tables(ref, better)["change"].item() == "improved"
    assert compare_tables(ref, ref.assign(ci_low=[np.nan]))["change"].item() == "n/a"


def test_align_rows_matches_experiences_and_rejects_other_scenarios():
    before = _preds(np.full((4, 2), 0.5), [0, 1, 0, 1], [0, 0, 1, 1])
    after = _preds(np.full((6, 3), 1 / 3), [0, 1, 0, 1, 2, 2], [0, 0, 1, 1, 2, 2])
    mb, ma = align_rows(before, after)
    assert mb.tolist() == [True] * 4 and ma.tolist() == [True] * 4 + [False] * 2
    other = _preds(np.full((4, 2), 0.5), [1, 1, 0, 1], [0, 0, 1, 1])
    with pytest.raises(DataError, match="experience 0 has different test rows"):
        align_rows(before, other)


# -- failure analysis ---------------------------------------------------------------------------


def test_confident_errors_are_the_most_confident_wrong_rows_per_class():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.05, 0.95], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([0, 0, 0, 0, 1, 1])
    errs = confident_errors(_preds(probs, labels, [0] * 6), ["neg", "pos"], per_class=2)
    assert errs["row"].tolist() == [3, 1, 4, 5]
    assert errs["true"].tolist() == ["neg", "neg", "pos", "pos"]
    assert errs["confidence"].tolist() == pytest.approx([0.95, 0.8, 0.7, 0.6])
    assert errs["p_true"].tolist() == pytest.approx([0.05, 0.2, 0.3, 0.4])
    at_035 = confident_errors(_preds(probs, labels, [0] * 6), ["neg", "pos"], threshold=0.35)
    assert at_035["row"].tolist() == [3, 1, 2, 4]  # p1 >= 0.35 moves row 2 and row 5
    assert at_035["confidence"].tolist() == pytest.approx([0.95, 0.8, 0.6, 0.7])
    with pytest.raises(DataError, match="threshold applies to binary models"):
        _preds(np.full((2, 3), 1 / 3), [0, 1], [0, 0]).predict(0.5)


def test_thumbnails_of_2d_rgb_and_3d_images():
    import io

    from PIL import Image

    for img, mode in (
        (np.random.rand(1, 8, 8), "L"),
        (np.random.rand(3, 8, 12), "RGB"),
        (np.random.rand(1, 6, 6, 5), "L"),
    ):
        png = Image.open(io.BytesIO(thumbnail_png(img, size=24)))
        assert png.mode == mode and max(png.size) == 24
    with pytest.raises(DataError, match="thumbnail needs"):
        thumbnail_png(np.zeros((8, 8)))


# -- privacy -------------------------------------------------------------------------------------


DICOM_SAMPLES = (
    ("ct", "CT_small.dcm"),
    ("mr", "MR_small.dcm"),
    ("xray", "examples_overlay.dcm"),
    ("dose", "rtdose_1frame.dcm"),
)


def _dicom_manifest(folder: Path) -> tuple[Path, list[str]]:
    """Noisy copies of 4 pydicom sample files; file names and a column carry the patient name."""
    import pydicom
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(0)
    rows, phi = [], []
    for label, name in DICOM_SAMPLES:
        ds = pydicom.dcmread(get_testdata_file(name))
        phi += [str(ds.PatientName), str(ds.PatientName).replace("^", "_"), str(ds.PatientID)]
        pixels = ds.pixel_array
        for i in range(8):
            noisy = pixels + rng.integers(0, 3, pixels.shape).astype(pixels.dtype)
            ds.PixelData = noisy.tobytes()
            path = folder / f"{str(ds.PatientName).replace('^', '_')}_{i}.dcm"
            ds.save_as(path)
            rows.append(
                {
                    "path": path.name,
                    "label": label,
                    "split": "train" if i < 4 else "val" if i == 4 else "test",
                    "patient_id": f"{ds.PatientID}-{i}",
                    "patient_name": str(ds.PatientName),
                    "study": f"S{len(rows):03d}",
                }
            )
    csv = folder / "cohort.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, phi


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A real class-incremental run over DICOM files (2 experiences of 2 classes)."""
    folder = tmp_path_factory.mktemp("dicom")
    csv, phi = _dicom_manifest(folder)
    scenario = {
        "name": "class-incremental",
        "dataset": str(csv),
        "classes_per_experience": 2,
        "image_size": 16,
        "channels": 1,
    }
    return _run(folder / "runs", "dicom", scenario, train=FAST), phi


def test_dicom_sourced_report_shows_no_patient_identifiers(dicom_run, tmp_path):
    run_dir, phi = dicom_run
    predictions_csv = (run_dir / "predictions" / "after-001.csv").read_text()
    assert "CompressedSamples^CT1" in phi
    # the run directory itself keeps no identifiers (file paths, extra manifest columns)
    assert not any(value in predictions_csv for value in phi if len(value) > 3)
    out = write_report(run_dir, n_resamples=50, out_dir=tmp_path, safe_id_columns=["study"])
    html = out.read_text()
    text = _without_images(html) + (tmp_path / "report.json").read_text()
    for ident in phi:
        assert ident not in text, f"patient identifier {ident!r} leaked into the report"
    assert "patient_name" not in text and ".dcm" not in text
    assert "cohort.csv" in text and str(run_dir.parent.parent) not in text  # no folder paths
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["report"]["safe_id_columns"] == ["study"]
    assert data["failures"] and all(re.fullmatch(r"S\d{3}", r["study"]) for r in data["failures"])
    assert html.count('alt="test image') == len(data["failures"])  # thumbnails: DICOM pixels
    with pytest.raises(DataError, match="can never be marked safe"):
        RunResults(run_dir, safe_id_columns=["patient_id"])
    with pytest.raises(DataError, match=r"not in after-001\.csv"):
        RunResults(run_dir, safe_id_columns=["studdy"]).predictions()


def test_class_incremental_previous_model_is_compared_on_the_classes_it_knew(dicom_run):
    run_dir, _ = dicom_run
    res = RunResults(run_dir)
    assert res.predictions(0).n_classes == 2 and res.predictions(1).n_classes == 4
    report = build_report(run_dir, n_resamples=50, thumbnails=False)
    change = report.data["changes"][0]
    assert change["rows"] == 6  # the 2 classes x 3 test images of experience 0
    assert {r["class"] for r in change["table"]} <= set(res.class_names(2)) | {"macro", "overall"}
    assert report.data["confusion"]["class_names"] == res.class_names(4)
    counts = report.data["data"]["counts"]  # thumbnails off: test counts only
    assert len(counts) == 4 and sum(r["n"] for r in counts) == 12
    assert report.data["continual"]["stability"] is None  # eval_every = 0: no curves
    assert report.data["sites"]["heterogeneity"] == []  # one site: not computed, with a note
    assert any("heterogeneity across sites is not computed" in n for n in report.data["notes"])


# -- command line and errors ---------------------------------------------------------------------


def test_cli_report_writes_both_files(sites_run, tmp_path, capsys):
    code = main(
        [
            "report",
            str(sites_run),
            "--resamples",
            "20",
            "--no-thumbnails",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")
    assert json.loads((tmp_path / "report.json").read_text())["report"]["n_resamples"] == 20


def test_clear_errors_for_bad_run_directories(tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist"):
        RunResults(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"config\.yaml is missing"):
        RunResults(tmp_path / "empty")
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
