"""No silent misuse of a user's data (issue 11): labels, pixels, sites, unfinished runs, partial
artefacts, damaged checkpoints, interrupted checkpoint writes.

Every refusal is checked for its exit code (2), for a message that names the file / row / key and
the fix, and for leaving what was already written unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from test_cli_errors import TINY, snapshot

from medcl.cli import main
from medcl.config import validate_config
from medcl.data.files import load_manifest
from medcl.data.labels import normalise_label
from medcl.data.scenarios import build_scenario
from medcl.data.synthetic import make_synthetic, synthetic_class_names
from medcl.engine.run import run
from medcl.errors import ConfigError, DataError


def _png(path: Path, value: int = 0) -> None:
    rng = np.random.default_rng(value)
    Image.fromarray((rng.random((8, 8)) * 200 + value % 50).astype(np.uint8)).save(path)


def _manifest(folder: Path, labels: list[str], name: str = "m.csv") -> Path:
    """``path,label`` manifest of small real PNGs, one per label (line i + 2 is labels[i])."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(labels)):
        _png(folder / f"img{i}.png", i)
    csv = folder / name
    pd.DataFrame({"path": [f"img{i}.png" for i in range(len(labels))], "label": labels}).to_csv(
        csv, index=False
    )
    return csv


# -- 1. labels ----------------------------------------------------------------------------------


def test_label_normalisation_rule():
    assert normalise_label("  pleural   effusion ") == "pleural effusion"
    assert normalise_label("01") == "1" and normalise_label("+2") == "2"
    assert normalise_label("Normal") == "Normal"  # case is kept, never merged silently


def test_whitespace_and_leading_zeros_are_one_class(tmp_path):
    csv = _manifest(
        tmp_path, ["normal", " normal", "normal ", "pneumonia", "pneumonia", "pneumonia"]
    )
    assert load_manifest(csv, split_fractions=(1, 0, 0)).class_names == ("normal", "pneumonia")
    ints = _manifest(tmp_path / "i", ["0", "00", "1", "01", "1"])
    assert load_manifest(ints, split_fractions=(1, 0, 0)).class_names == ("0", "1")


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (
            ["normal", "normal", "Normal", "pneumonia", "pneumonia", "Normal"],
            r"'normal' \(lines 2, 3\), 'Normal' \(lines 4, 7\) differ only in case",
        ),
        (
            ["normal", "normal", "NaN", "pneumonia", "pneumonia", "nan"],
            r"label 'NaN' looks like a missing value \(lines 4\)[\s\S]*'nan' looks like",
        ),
        (
            ["covid-19", "covid-19", "normal", "normal", "covid"],
            r"class 'covid' has only 1 row\(s\) \(lines 6\).*typo",
        ),
        (
            ["0", "1", "0", "1", "7", "-1"],
            r"label -1 is outside the range 0\.\.1[\s\S]*label 7 is outside the range 0\.\.1",
        ),
    ],
    ids=["case", "nan", "typo", "out-of-range"],
)
def test_suspicious_labels_are_errors_naming_the_rows(tmp_path, labels, expected):
    csv = _manifest(tmp_path, labels)
    with pytest.raises(DataError, match=expected) as e:
        load_manifest(csv)
    assert str(csv) in str(e.value) and "Fix or remove these rows" in str(e.value)


def test_declared_class_names_fix_the_range(tmp_path):
    csv = _manifest(tmp_path, ["0", "1", "0", "1", "7"])
    with pytest.raises(DataError, match=r"line 6: img4\.png: label 7 is outside the declared"):
        load_manifest(csv, class_names=["normal", "pneumonia"])
    ok = _manifest(tmp_path / "ok", ["0", "1", "1"])  # integers index the declared list
    src = load_manifest(ok, class_names=["normal", "pneumonia"], split_fractions=(1, 0, 0))
    assert src.class_names == ("normal", "pneumonia")
    assert src.splits["train"].labels.tolist() == [0, 1, 1]
    rare = _manifest(tmp_path / "rare", ["a", "a", "b"])  # declared: a rare class is intended
    assert load_manifest(rare, class_names=["a", "b"], split_fractions=(1, 0, 0)).class_names == (
        "a",
        "b",
    )


def test_cli_run_with_bad_labels_exits_2(tmp_path, capsys):
    csv = _manifest(tmp_path / "data", ["normal", "normal", "Normal", "pneumonia", "pneumonia"])
    raw = json.loads(json.dumps(TINY)) | {"output_dir": str(tmp_path / "runs")}
    raw["scenario"] = {"name": "domain-incremental", "dataset": str(csv), "n_sites": 1}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["run", str(cfg), "--quiet", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "differ only in case" in err and "line" in err


# -- 2. NaN / Inf pixels ------------------------------------------------------------------------


def test_nan_and_inf_pixels_are_found_at_load(tmp_path):
    rng = np.random.default_rng(0)
    names = []
    for i in range(4):
        x = rng.random((6, 6)).astype(np.float32)
        if i == 1:
            x[2, 3] = np.nan
        if i == 2:
            x[0, 0] = np.inf
        nib.save(nib.Nifti1Image(x, np.eye(4)), tmp_path / f"s{i}.nii")
        names.append(f"s{i}.nii")
    csv = tmp_path / "m.csv"
    pd.DataFrame({"path": names, "label": ["a", "a", "b", "b"]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match="2 image file") as e:
        load_manifest(csv)
    msg = str(e.value)
    assert str(tmp_path / "s1.nii") in msg and str(tmp_path / "s2.nii") in msg
    assert "s0.nii" not in msg and "NaN or infinite" in msg and "Repair" in msg


# -- 6. sites per split -------------------------------------------------------------------------


def test_site_only_in_the_test_split_is_reported_per_split(tmp_path):
    rows = []
    for i in range(16):
        site = ("north", "south")[i % 2]
        split = ("train", "train", "val", "test")[(i // 2) % 4]
        rows.append((f"img{i}.png", ("a", "b")[(i // 4) % 2], site, split))
    rows += [("img16.png", "a", "west", "test"), ("img17.png", "b", "west", "test")]
    for i in range(len(rows)):
        _png(tmp_path / f"img{i}.png", i)
    csv = tmp_path / "sites.csv"
    pd.DataFrame(rows, columns=["path", "label", "site", "split"]).to_csv(csv, index=False)
    per_split = "train: north, south; val: north, south; test: north, south, west"
    with pytest.raises(DataError, match=r"site\(s\) \['west'\] have no training rows") as e:
        build_scenario("domain-incremental", dataset=str(csv))
    assert per_split in str(e.value) and "scenario.sites" in str(e.value)
    with pytest.raises(ConfigError, match=r"names site 'west', but it has no training rows") as e:
        build_scenario("domain-incremental", dataset=str(csv), sites=["west", "north"])
    assert per_split in str(e.value)
    picked = build_scenario("domain-incremental", dataset=str(csv), sites=["north", "south"])
    assert [x.site for x in picked] == ["north", "south"]  # an explicit choice is fine


# -- runs: a tiny finished run, shared ----------------------------------------------------------


def _tiny(folder: Path, **train) -> dict:
    raw = json.loads(json.dumps(TINY)) | {"output_dir": str(folder / "runs")}
    raw["strategy"] = {"name": "replay"}
    raw["train"] |= train
    return raw


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-experience run; tests copy it before changing anything."""
    folder = tmp_path_factory.mktemp("finished")
    return run(validate_config(_tiny(folder)), quiet=True)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """The same run interrupted after experience 0 of 2; tests copy it."""
    folder = tmp_path_factory.mktemp("stopped")
    return run(validate_config(_tiny(folder)), quiet=True, stop_after=0)


def _copy(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``run_dir`` in the same output_dir layout, and its config file."""
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "runs")
    dst = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, dst)
    (dst / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dst, cfg


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# -- 3. report of a run with a missing or partial predictions file -----------------------------


def test_report_refuses_a_missing_final_predictions_file(finished, tmp_path, capsys):
    run_dir, _ = _copy(finished, tmp_path)
    (run_dir / "predictions" / "after-001.npz").unlink()
    before = snapshot(run_dir)
    assert main(["report", str(run_dir), "--resamples", "20", "--no-thumbnails"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{run_dir / 'predictions' / 'after-001.npz'} is missing" in err
    assert "--experience 0" in err
    assert snapshot(run_dir) == before  # no report written about the wrong model
    assert (
        main(
            [
                "report",
                str(run_dir),
                "--resamples",
                "20",
                "--no-thumbnails",
                "--experience",
                "0",
                "-q",
            ]
        )
        == 0
    )
    report = json.loads((run_dir / "report.json").read_text())
    assert report["report"]["model_after_experience"] == 0


@pytest.mark.parametrize("damage", ["truncated", "fewer rows"])
def test_report_refuses_a_partial_predictions_file(finished, tmp_path, damage, capsys):
    run_dir, _ = _copy(finished, tmp_path)
    path = run_dir / "predictions" / "after-001.npz"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expected = "could not be read"
    else:
        with np.load(path) as z:
            kept = {k: z[k][: len(z[k]) - 3] for k in z.files}
        np.savez_compressed(path, **kept)
        expected = "is partial: it holds"
    before = snapshot(run_dir)
    assert main(["report", str(run_dir), "--resamples", "20", "--no-thumbnails"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(path) in err and expected in err
    assert "--experience 0" in err
    assert snapshot(run_dir) == before


# -- 4. unfinished runs -------------------------------------------------------------------------


def test_unfinished_run_is_not_reported_exported_predicted_or_updated(stopped, tmp_path, capsys):
    run_dir, _ = _copy(stopped, tmp_path)  # killed after 1 of 2 experiences
    image = tmp_path / "x.png"
    _png(image)
    cohort = _manifest(tmp_path / "cohort", ["class0", "class0", "class1", "class1"])
    before = snapshot(run_dir)
    for argv in (
        ["report", str(run_dir), "--resamples", "20", "--no-thumbnails"],
        ["export", str(run_dir), "-f", "torchscript"],
        ["predict", str(run_dir), str(image), "-q"],
        ["update", str(run_dir), "--data", str(cohort), "-q", "--no-report"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert f"{run_dir} is unfinished" in err and "completed 1 of 2 experiences" in err, err
        assert "--resume" in err
        if argv[0] != "update":
            assert "--experience 0" in err and "--allow-partial" in err
    assert snapshot(run_dir) == before

    out = tmp_path / "model.ts"
    assert (
        main(["export", str(run_dir), "-f", "torchscript", "--out", str(out), "--experience", "0"])
        == 0
    )
    from medcl.export import load_predictor

    meta = load_predictor(out).meta
    assert meta["model_after_experience"] == {
        "index": 0,
        "name": meta["model_after_experience"]["name"],
        "experiences_in_run": 2,
        "final": False,
    }
    assert (
        main(
            [
                "report",
                str(run_dir),
                "--resamples",
                "20",
                "--no-thumbnails",
                "--allow-partial",
                "-q",
            ]
        )
        == 0
    )
    assert main(["export", str(run_dir), "--experience", "1"]) == 2
    assert "--experience 1" in capsys.readouterr().err


# -- 1. update: new classes only when asked -----------------------------------------------------


def _cohort(folder: Path, names: list[str]) -> Path:
    """PNG cohort whose class k looks like the run's synthetic class k, labelled ``names[k]``."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = make_synthetic(
        num_classes=len(names), image_size=16, n_train=10, n_val=5, n_test=5, seed=7
    )
    rows = []
    for split, data in splits.items():
        for i, (img, y) in enumerate(zip(data.images, data.labels, strict=True)):
            path = folder / f"{split}-{i}.png"
            Image.fromarray(img[0].numpy()).save(path)
            rows.append((path.name, names[int(y)], split))
    csv = folder / "cohort.csv"
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(csv, index=False)
    return csv


def test_update_matches_case_and_refuses_unasked_new_classes(finished, tmp_path, capsys):
    run_dir, _ = _copy(finished, tmp_path)
    known = list(synthetic_class_names(4))  # the run's classes, in the generator's order
    run_order = json.loads((run_dir / "scenario.json").read_text())["class_names"]
    assert sorted(run_order) == sorted(known)
    before = snapshot(run_dir)
    new = _cohort(tmp_path / "new", [*known, "covid"])
    assert main(["update", str(run_dir), "--data", str(new), "-q", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "'covid'" in err and "--new-classes" in err
    assert snapshot(run_dir) == before  # refused: nothing changed, the head did not grow

    upper = _cohort(tmp_path / "upper", [n.upper() for n in known])
    assert main(["update", str(run_dir), "--data", str(upper), "-q", "--no-report"]) == 0
    after = json.loads((run_dir / "scenario.json").read_text())
    assert after["class_names"] == run_order  # matched, not appended as new classes
    assert sorted(after["experiences"][2]["classes"]) == [0, 1, 2, 3]
    # 10. metrics.json is strict JSON: the cells before the cohort existed are null, not NaN
    text = (run_dir / "metrics.json").read_text()
    m = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.json"))
    assert "NaN" not in text and m["accuracy_matrix"][0][2] is None
    assert m["accuracy_matrix"][2][2] is not None


# -- 7. damaged checkpoint ----------------------------------------------------------------------


def test_truncated_checkpoint_offers_resume_from(finished, tmp_path, capsys):
    run_dir, cfg = _copy(finished, tmp_path)
    want = _metrics(run_dir)["accuracy_matrix"]
    weights = run_dir / "checkpoints" / "exp-001" / "strategy.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["run", str(cfg), "--resume", "-q", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"checkpoint {weights.parent} could not be read" in err
    assert "--resume-from 0" in err
    assert main(["run", str(cfg), "--resume-from", "0", "-q", "--no-report"]) == 0
    assert _metrics(run_dir)["accuracy_matrix"] == want  # the uninterrupted run's result
    assert main(["run", str(cfg), "--resume-from", "5", "-q", "--no-report"]) == 2
    assert "no checkpoint for experience 5" in capsys.readouterr().err


# -- fault injection: interrupted checkpoint writes ---------------------------------------------


class _Crash(Exception):
    """Stands for the process dying at that point."""


@pytest.mark.parametrize("point", ["strategy", "memory", "rename", "latest", "debris"])
def test_resume_after_a_crash_while_checkpointing(finished, stopped, tmp_path, point, monkeypatch):
    """Crash at each step of writing experience 1's checkpoint; --resume gives the same run."""
    import medcl.engine.checkpoint as ckpt
    import medcl.engine.run as engine
    from medcl.config import load_config

    want = _metrics(finished)["accuracy_matrix"]
    run_dir, cfg_path = _copy(stopped, tmp_path)
    cfg = load_config(cfg_path)
    calls = {"save_file": 0}
    real_save, real_replace, real_write = ckpt.save_file, ckpt.os.replace, engine.atomic_write_text

    def save_file(tensors, path):
        calls["save_file"] += 1
        if (point, calls["save_file"]) in (("strategy", 1), ("memory", 2)):
            real_save(tensors, path)
            Path(path).write_bytes(Path(path).read_bytes()[:100])  # half-written, then dead
            raise _Crash(point)
        return real_save(tensors, path)

    def replace(src, dst):
        if point == "rename" and Path(dst).name == "exp-001":
            raise _Crash(point)
        return real_replace(src, dst)

    def write(path, text):
        if point in ("latest", "debris") and Path(path).name == "latest.json":
            raise _Crash(point)
        return real_write(path, text)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(engine, "atomic_write_text", write)
    with pytest.raises(_Crash):
        run(cfg, resume=True, quiet=True)
    monkeypatch.undo()
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["completed"] == 0
    if point == "debris":  # what kill -9 leaves behind: temporary and old directories
        for name in (".exp-001.tmp-dead", ".exp-000.old"):
            (run_dir / "checkpoints" / name).mkdir()
            (run_dir / "checkpoints" / name / "strategy.safetensors").write_bytes(b"\0" * 10)
    run(cfg, resume=True, quiet=True)
    assert _metrics(run_dir)["accuracy_matrix"] == want


def test_resume_accepts_a_run_written_before_new_config_keys_existed(stopped, tmp_path):
    """A config.yaml lacking a section added later (defaults) resumes; a changed value does not."""
    run_dir, cfg_path = _copy(stopped, tmp_path)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved.pop("logging")  # as written by medcl before the logging section existed
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    cfg = yaml.safe_load(cfg_path.read_text())
    resumed = run(validate_config(cfg), resume=True, quiet=True)
    assert len(_metrics(resumed)["accuracy_matrix"]) == 2
    cfg["train"]["lr"] = 2 * cfg["train"]["lr"]
    with pytest.raises(ConfigError, match="config differs"):
        run(validate_config(cfg), resume=True, quiet=True)
