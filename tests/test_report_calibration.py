"""The report's calibration (temperature scaling) and prediction-set (conformal coverage) parts.

One tiny 3-site run with the default ``calibration`` section; every number the report shows is
recomputed here from the run's files (test predictions + the calibration record), never from
the report's own code. No accuracy-like value is asserted: only invariants and agreement.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import _run

from medcl.engine.layout import RunLayout
from medcl.metrics.calibration import expected_calibration_error
from medcl.metrics.conformal import ConformalSets, apply_temperature, fit_conformal
from medcl.reports import build_report, write_report
from medcl.reports.card import model_card

SITES = {
    "name": "synthetic-sites",
    "num_classes": 3,
    "n_sites": 3,
    "n_train": 12,
    "n_val": 24,  # 12 per conformal half: a finite threshold per site at alpha 0.1
    "n_test": 24,
    "image_size": 16,
}


@pytest.fixture(scope="module")
def cal_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("runs"), "calibrated", SITES, train={"eval_every": 0})


@pytest.fixture(scope="module")
def cal_report(cal_run: Path) -> tuple[str, dict]:
    html = write_report(cal_run, n_resamples=200, seed=1, thumbnails=False)
    return html.read_text(), json.loads(RunLayout(cal_run).report_json.read_text())


def _final(run_dir: Path, data: dict) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """The calibration record and the test predictions (probs, labels, experience) of the
    reported model, read straight from the run directory."""
    after = data["report"]["model_after_experience"]
    files = RunLayout(run_dir)
    record = json.loads(files.calibration_after(after).read_text())
    with np.load(files.predictions_after(after, ".npz")) as z:
        probs, labels, exp = z["probs"], z["labels"].astype(np.int64), z["experience"]
    keep = labels < probs.shape[1]
    return record, probs[keep], labels[keep], exp[keep]


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / run_dir.name
    shutil.copytree(run_dir, out)
    return out


def test_report_has_temperature_and_ece_per_site_before_and_after(cal_run, cal_report):
    _, data = cal_report
    cal = data["calibration"]
    record, probs, labels, exp = _final(cal_run, data)
    assert cal["temperature"] == pytest.approx(record["temperature"]) and cal["temperature"] > 0
    assert cal["n_temperature"] == record["n_temperature"] and cal["fitted_on"] == "validation"
    names = json.loads(RunLayout(cal_run).scenario.read_text())["experiences"]
    groups = [r["group"] for r in cal["table"]]
    assert groups == [e["name"] for e in names] + ["overall"]
    for row in cal["table"]:
        mask = np.ones(len(labels), bool) if row["experience"] is None else exp == row["experience"]
        assert row["n"] == mask.sum()
        # independent recomputation from the npz and the record's temperature
        raw = expected_calibration_error(labels[mask], probs[mask], n_bins=15)[0]
        scaled = apply_temperature(probs[mask], record["temperature"])
        after = expected_calibration_error(labels[mask], scaled, n_bins=15)[0]
        assert row["ece"] == pytest.approx(raw, abs=1e-9)
        assert row["ece_after"] == pytest.approx(after, abs=1e-9)
        for key in ("ece", "ece_after"):
            assert 0 <= row[f"{key}_ci_low"] <= row[f"{key}_ci_high"] <= 1
    scaled = apply_temperature(probs, record["temperature"])
    ece, mce = expected_calibration_error(labels, scaled, n_bins=15)
    assert cal["ece_after"] == pytest.approx(ece, abs=1e-9)
    assert cal["mce_after"] == pytest.approx(mce, abs=1e-9)
    assert data["summary"]["ece_calibrated"]["value"] == cal["ece_after"]
    assert not any("calibration record" in n for n in data["notes"])


def test_report_has_coverage_per_site_with_intervals(cal_run, cal_report):
    _, data = cal_report
    ps = data["prediction_sets"]
    record, probs, labels, exp = _final(cal_run, data)
    assert ps["available"] and ps["alpha"] == 0.1 and ps["mondrian"] == "site_class"
    assert ps["target_coverage"] == pytest.approx(0.9)
    sites = record["sites"]
    rows = {r["group"]: r for r in ps["table"]}
    assert list(rows) == [*sites, "overall"]
    assert [t["qhat"] for t in ps["thresholds"]] == [
        q for g in record["conformal"]["groups"] for q in g["qhat"]
    ]
    # recomputed from the npz and the record: the calibrated sets, each row with its site
    sets = ConformalSets.from_dict(record["conformal"]).sets(
        apply_temperature(probs, record["temperature"]), [sites[e] for e in exp]
    )
    covered = sets[np.arange(len(labels)), labels]
    for name, r in rows.items():
        m = np.ones(len(labels), bool) if name == "overall" else exp == sites.index(name)
        assert r["n"] == m.sum()
        assert r["coverage"] == pytest.approx(covered[m].mean())
        assert r["mean_size"] == pytest.approx(sets[m].sum(1).mean())
        assert 0 <= r["coverage_low"] <= r["coverage"] <= r["coverage_high"] <= 1
        assert r["mean_size"] >= 1 and r["size_low"] <= r["mean_size"] <= r["size_high"]
        assert r["empty"] == 0  # the top class is always in the set
        assert r["below_target"] == (r["coverage_high"] < 0.9)
    assert ps["n_empty"] == 0


def test_html_has_both_reliability_diagrams_and_the_coverage_table(cal_report):
    html, data = cal_report
    m = re.search(
        r'<img alt="reliability diagrams before and after temperature scaling" '
        r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"',
        html,
    )
    assert m, "the before/after reliability figure is missing"
    width, height = Image.open(io.BytesIO(base64.b64decode(m.group(1)))).size
    assert width > 1.5 * height  # two panels side by side
    assert 'id="calibration-sites"' in html and 'id="coverage"' in html
    table = html[html.index('id="coverage"') : html.index("</table>", html.index('id="coverage"'))]
    for row in data["prediction_sets"]["table"]:
        assert f'<td class="l">{row["group"]}</td>' in table
    assert "marginal over the calibration distribution" in html
    assert "not a guarantee for each patient" in html
    assert 'href="#prediction-sets"' in html


def test_card_states_temperature_and_coverage_range(cal_run, cal_report):
    _, data = cal_report
    card = model_card(cal_run)
    cov = [r["coverage"] for r in data["prediction_sets"]["table"] if r["group"] != "overall"]
    line = next(x for x in card.splitlines() if x.startswith("Post-hoc calibration"))
    assert f"T = {data['calibration']['temperature']:.2f}" in line
    assert f"{min(cov):.3f}-{max(cov):.3f}" in line and "90% target coverage" in line


def test_report_without_calibration_record_says_so(cal_run, tmp_path):
    run = _copy(cal_run, tmp_path)
    shutil.rmtree(RunLayout(run).calibration)
    report = build_report(run, n_resamples=50, thumbnails=False)
    data, html = report.data, report.html()
    assert data["calibration"]["temperature"] is None
    assert "calibration/after-" in data["calibration"]["note"]
    assert data["calibration"]["ece"] is not None  # the raw calibration is still reported
    assert data["prediction_sets"] == {"available": False, "note": data["calibration"]["note"]}
    assert data["summary"]["ece_calibrated"] is None
    assert sum("calibration/after-" in n for n in data["notes"]) == 1
    assert "reliability_before_after" not in report.figures
    assert '<img alt="reliability diagram" src="data:image/png' in html
    assert "No post-hoc calibration record" in html and 'id="coverage"' not in html
    report.write(run)
    assert "none recorded" in model_card(run)


def _rewrite_record(run: Path, after: int, change) -> None:
    path = RunLayout(run).calibration_after(after)
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def test_report_of_other_calibration_records(cal_run, cal_report, tmp_path):
    """Conformal off, class-conditional thresholds, thresholds too few images could fix."""
    _, data = cal_report
    after = data["report"]["model_after_experience"]
    _, probs, labels, _ = _final(cal_run, data)
    run = _copy(cal_run, tmp_path)

    def no_sets(record):
        record["conformal"] = None

    _rewrite_record(run, after, no_sets)
    report = build_report(run, n_resamples=50, thumbnails=False)
    assert report.data["calibration"]["temperature"] is not None
    assert report.data["prediction_sets"]["available"] is False
    assert "calibration.conformal" in report.data["prediction_sets"]["note"]
    assert 'id="coverage"' not in report.html()

    def per_class(record):  # thresholds fitted on the test rows: only the page is under test
        record["conformal"] = fit_conformal(labels, probs, mondrian="class").to_dict()

    _rewrite_record(run, after, per_class)
    report = build_report(run, n_resamples=50, thumbnails=False)
    ps = report.data["prediction_sets"]
    assert ps["mondrian"] == "class" and len(ps["thresholds"]) == probs.shape[1]
    assert "one threshold per class" in report.html()

    def too_few(record):
        record["conformal"] = fit_conformal(
            labels[:3], probs[:3], alpha=0.1, mondrian="site", sites=[record["sites"][0]] * 3
        ).to_dict()
        k = probs.shape[1]
        record["conformal"]["groups"] += [
            {"site": s, "qhat": [None] * k, "n": [3] * k} for s in record["sites"][1:]
        ]

    _rewrite_record(run, after, too_few)
    report = build_report(run, n_resamples=50, thumbnails=False)
    ps = report.data["prediction_sets"]
    assert all(t["qhat"] is None for t in ps["thresholds"])
    assert all(r["coverage"] == 1.0 for r in ps["table"])  # every class in every set
    assert any("too few calibration images" in n for n in report.data["notes"])
    report.html()


def test_report_shows_per_experience_temperatures(cal_run, cal_report, tmp_path):
    """A record with one temperature per class group: the report lists them per site and its
    ECE after scaling is recomputed with each row's top-class temperature."""
    _, data = cal_report
    after = data["report"]["model_after_experience"]
    _, probs, labels, _ = _final(cal_run, data)
    run = _copy(cal_run, tmp_path)
    k = probs.shape[1]
    per_class = [0.5 if c < k // 2 else 3.0 for c in range(k)]

    def per_experience(record):
        record["temperatures"] = per_class

    _rewrite_record(run, after, per_experience)
    report = build_report(run, n_resamples=50, thumbnails=False)
    cal = report.data["calibration"]
    assert [t["temperature"] for t in cal["temperatures"]] == per_class
    assert "their own temperature" in report.html()
    scored = labels < k
    ece, _ = expected_calibration_error(
        labels[scored], apply_temperature(probs[scored], per_class), n_bins=15
    )
    assert cal["ece_after"] == pytest.approx(ece, abs=1e-9)


def test_report_states_a_training_conditional_guarantee(cal_run, cal_report, tmp_path):
    """A record fitted with ``calibration.confidence``: the page states the per-calibration
    guarantee instead of the marginal one, and names the rows a finite threshold needs."""
    _, data = cal_report
    after = data["report"]["model_after_experience"]
    _, probs, labels, _ = _final(cal_run, data)
    run = _copy(cal_run, tmp_path)

    def conditional(record):  # 21 rows: one short of a finite threshold at 0.9 and alpha 0.1
        record["conformal"] = fit_conformal(
            labels[:21], probs[:21], alpha=0.1, mondrian="none", confidence=0.9
        ).to_dict()

    _rewrite_record(run, after, conditional)
    report = build_report(run, n_resamples=50, thumbnails=False)
    html = report.html()
    assert report.data["prediction_sets"]["training_conditional_percent"] == 90
    assert "training-conditional (Vovk, 2012): with probability 90%" in html
    assert "marginal over the calibration distribution" not in html
    assert any("confidence 0.9" in n and "needs n >= 22" in n for n in report.data["notes"])
    assert "marginal over the calibration distribution" in cal_report[0]
