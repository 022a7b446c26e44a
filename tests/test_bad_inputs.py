"""Bad inputs to run, resume, gate, update and config (issue 28, part C).

Each mistake is one ``error:`` line naming the file or key, what was expected and the fix, with
exit code 2; where a refused command could change a run directory, the directory is hashed
before and after.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_cli_errors import TINY, _one_error_line, snapshot
from test_reliability import _copy

from medcl.cli import main
from medcl.config import validate_config
from medcl.engine.cohort import match_classes
from medcl.engine.run import run
from medcl.engine.rundir import read_environments
from medcl.errors import ConfigError, DataError
from medcl.gate import load_criteria
from medcl.metrics.clinical import METRICS as CLINICAL_METRICS

RECORD = ("config.yaml", "scenario.json", "model.json")


def _tiny(folder: Path) -> dict:
    return json.loads(json.dumps(TINY)) | {"output_dir": str(folder / "runs")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-experience run (synthetic, 1 channel); tests change only copies of it."""
    return run(validate_config(_tiny(tmp_path_factory.mktemp("finished"))), quiet=True)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """The same run interrupted after experience 0 of 2."""
    folder = tmp_path_factory.mktemp("stopped")
    return run(validate_config(_tiny(folder)), quiet=True, stop_after=0)


def _criteria(path: Path, criteria: list[dict], **top) -> Path:
    path.write_text(yaml.safe_dump({"n_resamples": 200, "criteria": criteria, **top}))
    return path


# -- 1. gate criteria -----------------------------------------------------------------------------

AUROC_NI = {"metric": "auroc", "rule": "non_inferiority", "margin": 0.02}


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [
        (
            {"metric": "ece", "rule": "ceiling", "value": 10},
            "criteria[1] (ece): `value`: got 10; ECE is a fraction in [0, 1]: write 0.10 for 10 %",
        ),
        (
            {"metric": "sensitivity", "rule": "floor", "value": -0.2},
            "criteria[1] (sensitivity): `value`: got -0.2; sensitivity is a fraction in [0, 1]",
        ),
        (
            {"metric": "auroc", "rule": "non_inferiority", "margin": 2},
            "criteria[1] (auroc): `margin`: got 2; a margin is the largest drop in AUROC "
            "accepted, a fraction in [0, 0.5]: write 0.02 for 2 %",
        ),
        (
            {"metric": "auroc", "rule": "non_inferiority", "margn": 0.02},
            "unknown key `margn` in criteria[1] (auroc); did you mean 'margin'?",
        ),
        (
            {"metric": "aucroc", "rule": "floor", "value": 0.8},
            "criteria[1] (aucroc).metric: unknown metric 'aucroc'; did you mean 'auroc'?",
        ),
        (
            {"metric": "auroc", "rule": "flor", "value": 0.8},
            "criteria[1] (auroc).rule: unknown rule 'flor'; did you mean 'floor'?",
        ),
        (
            {"metric": "auroc", "rule": "floor", "margin": 0.02},
            "rule floor takes `value`, not `margin`",
        ),
    ],
)
def test_bad_gate_criteria_are_refused_before_the_gate_runs(
    finished, tmp_path, capsys, criterion, expected
):
    run_dir, _ = _copy(finished, tmp_path)
    bad = _criteria(tmp_path / "criteria.yaml", [AUROC_NI, criterion])
    before = snapshot(run_dir)
    assert main(["gate", str(run_dir), "--criteria", str(bad)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{bad}: invalid gate criteria" in line and expected in line, line
    assert "configs/gate/criteria.yaml" in line  # where a valid example is
    assert snapshot(run_dir) == before  # no decision recorded, the pointer not moved


def test_unknown_top_level_gate_key_is_refused(tmp_path):
    bad = _criteria(tmp_path / "c.yaml", [AUROC_NI], n_resample=500)
    with pytest.raises(ConfigError, match=r"unknown key `n_resample`; did you mean 'n_resamples'"):
        load_criteria(bad)


@pytest.mark.parametrize("metric", [*CLINICAL_METRICS, "forgetting"])
def test_gate_accepts_every_clinical_metric_name(tmp_path, metric):
    """The gate takes its metric names from medcl.metrics.clinical (one list)."""
    criteria = load_criteria(
        _criteria(tmp_path / "c.yaml", [{"metric": metric, "rule": "ceiling", "value": 0.1}])
    )
    assert criteria.criteria[0].metric == metric


# -- 2. a refused resume writes nothing; a resume keeps the record and appends the environment --


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_from_a_truncated_checkpoint_writes_nothing(stopped, tmp_path, capsys):
    run_dir, cfg = _copy(stopped, tmp_path)
    ckpt = run_dir / "checkpoints" / "exp-000"
    _truncate(ckpt / "strategy.safetensors")
    before = snapshot(run_dir)
    assert main(["run", str(cfg), "--resume", "--quiet", "--no-report"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"checkpoint {ckpt} could not be read" in line and "--set name=" in line, line
    assert snapshot(run_dir) == before  # config.yaml, environment.json, ... untouched


def test_resume_keeps_the_record_and_appends_the_environment(stopped, tmp_path):
    run_dir, cfg = _copy(stopped, tmp_path)
    [first] = read_environments(run_dir)
    assert first["command"] == "run" and first["completed_before"] == -1
    # a run written before environment.json was a list holds one mapping: read as a list of one
    (run_dir / "environment.json").write_text(json.dumps(first))
    record = {name: (run_dir / name).read_bytes() for name in RECORD}
    assert main(["run", str(cfg), "--resume", "--quiet", "--no-report"]) == 0
    assert {name: (run_dir / name).read_bytes() for name in RECORD} == record
    envs = read_environments(run_dir)
    assert len(envs) == 2 and envs[0] == first
    assert envs[1]["command"] == "run --resume" and envs[1]["completed_before"] == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 2  # the resumed run finished


# -- 4. --resume with another config names the keys -------------------------------------------


def test_resume_with_a_changed_config_names_the_keys(stopped, tmp_path, capsys):
    run_dir, cfg = _copy(stopped, tmp_path)
    before = snapshot(run_dir)
    argv = ["run", str(cfg), "--resume", "--quiet", "--no-report"]
    assert main([*argv, "--set", "train.lr=0.1", "--set", "memory.size=16"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"the config differs from the one {run_dir} was started with" in line
    assert "train.lr: 0.05 -> 0.1" in line and "memory.size: 8 -> 16" in line, line
    assert f"`medcl run {run_dir / 'config.yaml'} --resume`" in line and "--set name=" in line
    assert snapshot(run_dir) == before


# -- 3 and 5. cohorts that `medcl update` refuses ------------------------------------------------


def _cohort(folder: Path, class_names: list[str], mode: str) -> Path:
    """A manifest of 16x16 PNGs in PIL ``mode``, 4 per class (2 train, 1 val, 1 test)."""
    folder.mkdir()
    rows = []
    for k, name in enumerate(class_names):
        for i, split in enumerate(("train", "train", "val", "test")):
            path = folder / f"{k}-{i}.png"
            Image.new(mode, (16, 16), color=(40 * k,) * len(mode)).save(path)
            rows.append(f"{path.name},{name},{split}")
    manifest = folder / "cohort.csv"
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return manifest


def test_update_with_an_empty_cohort_says_it_has_no_rows(finished, tmp_path, capsys):
    run_dir, _ = _copy(finished, tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label,split\n")
    before = snapshot(run_dir)
    assert main(["update", str(run_dir), "--data", str(empty), "--quiet", "--no-report"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"manifest {empty} has no rows" in line and "Add one row per image" in line, line
    assert "missing columns" not in line
    assert snapshot(run_dir) == before
    blank = tmp_path / "blank.csv"
    blank.write_text("")
    assert main(["update", str(run_dir), "--data", str(blank), "--quiet", "--no-report"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"manifest {blank} is empty" in line and "header path,label" in line, line
    assert snapshot(run_dir) == before


def test_update_refuses_an_rgb_cohort_for_a_grey_run(finished, tmp_path, capsys):
    run_dir, _ = _copy(finished, tmp_path)
    names = json.loads((run_dir / "scenario.json").read_text())["class_names"]
    manifest = _cohort(tmp_path / "rgb", names, "RGB")
    before = snapshot(run_dir)
    assert main(["update", str(run_dir), "--data", str(manifest), "--quiet", "--no-report"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--data '{manifest}': the cohort's images have 3 channels (RGB" in line, line
    assert "trained on 1-channel (greyscale) images" in line
    assert "convert('L')" in line  # the fix
    assert snapshot(run_dir) == before


# -- 6. the gate reports undefined metrics as null with a reason, without raw warnings ----------


def test_gate_reports_undefined_metrics_without_warnings(finished, tmp_path, capsys):
    run_dir, _ = _copy(finished, tmp_path)
    info = json.loads((run_dir / "scenario.json").read_text())
    first, second = info["experiences"][:2]
    absent = info["class_names"][first["classes"][0]]  # a class of experience 0 only
    crit = _criteria(
        tmp_path / "c.yaml",
        [
            {
                "metric": "sensitivity",
                "class": absent,
                "rule": "floor",
                "value": 0.0,
                "where": "sites",
            }
        ],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["gate", str(run_dir), "--criteria", str(crit)]) == 1  # undefined fails
    assert not [w for w in caught if "undefined" in str(w.message).lower()], caught
    captured = capsys.readouterr()
    assert "Warning" not in captured.err, captured.err
    why = "undefined on this group: no sample of this class in y_true (TP+FN = 0)"
    assert f"@ {second['name']}: n/a [n/a, n/a]" in captured.out and why in captured.out
    record = json.loads((run_dir / "gate" / "after-001.json").read_text())
    [row] = [r for r in record["table"] if r["group"] == second["name"]]
    assert row["estimate"] is None and row["ci_low"] is None and row["note"] == why


# -- 7 and 10. start-up: no CUDA_HOME notice; config errors before torch loads ------------------


def _python(code: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


def test_a_config_mistake_is_reported_before_torch_is_imported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_tiny(tmp_path) | {"train": {"epoch": 1}}))
    criteria = _criteria(tmp_path / "c.yaml", [{"metric": "ece", "rule": "ceiling", "value": 10}])
    done = _python(
        "import sys\n"
        "from medcl.config import load_config\n"
        "from medcl.errors import ConfigError\n"
        "try:\n"
        f"    load_config({str(bad)!r})\n"
        "except ConfigError:\n"
        "    print('refused', 'torch' in sys.modules)\n"
        "from medcl.cli import main\n"
        f"print('run', main(['run', {str(bad)!r}]), 'torch' in sys.modules)\n"
        f"print('update', main(['update', 'x', '--data', 'y', '--gate', {str(criteria)!r}]),"
        " 'torch' in sys.modules)\n"
    )
    assert done.stdout.split("\n")[:3] == ["refused False", "run 2 False", "update 2 False"]
    assert "unknown key `train.epoch`. did you mean 'epochs'?" in done.stderr


def test_start_up_does_not_print_the_cuda_home_notice():
    done = _python(
        "import sys\n"
        "import medcl.engine.run, medcl.gate, medcl.reports\n"
        "print('torch.utils.cpp_extension' in sys.modules)\n"
    )
    assert done.stdout.strip() == "False"
    assert "CUDA_HOME" not in done.stderr


def test_the_executable_freezes_the_engine_imports_and_in_process_calls_do_not(tmp_path):
    """`medcl` (entry_point) imports the engine with the collector paused, then freezes what is
    alive and resumes it; main() called in-process (tests, notebooks) leaves the collector
    alone."""
    cfg = tmp_path / "cfg.yaml"  # valid; --resume-from 3 is refused after the imports
    cfg.write_text(yaml.safe_dump(_tiny(tmp_path)))
    probe = (
        "import gc, sys\n"
        "import medcl.cli.common as common\n"
        "from medcl.cli import {fn}\n"
        "seen = []\n"
        "real = common.engine_imports\n"
        "def spy():\n"
        "    cm = real()\n"
        "    class Wrap:\n"
        "        def __enter__(self):\n"
        "            cm.__enter__(); seen.append(gc.isenabled())\n"
        "        def __exit__(self, *exc):\n"
        "            cm.__exit__(*exc); seen.append((gc.isenabled(), gc.get_freeze_count() > 0))\n"
        "    return Wrap()\n"
        "import medcl.cli.training as training\n"
        "training.engine_imports = spy\n"
        "sys.argv = ['medcl', 'run', {cfg!r}, '--resume-from', '3', '--quiet']\n"
        "rc = {fn}({args})\n"
        "print(rc, seen, gc.isenabled(), gc.get_freeze_count() > 0)\n"
    )
    exe = _python(probe.format(fn="entry_point", cfg=str(cfg), args=""))
    assert exe.stdout.split("\n")[0] == "2 [False, (True, True)] True True", exe.stderr
    lib = _python(probe.format(fn="main", cfg=str(cfg), args="sys.argv[1:]"))
    assert lib.stdout.split("\n")[0] == "2 [True, (True, False)] True False", lib.stderr


def test_latency_still_measured_after_the_lazy_import():
    import torch

    from medcl.metrics.compute import measure_latency

    assert measure_latency(torch.nn.Linear(4, 2), (4,), repeats=3, warmup=1) > 0


# -- 8. YAML errors name the file and line -----------------------------------------------------


def test_yaml_errors_name_the_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("scenario:\n  name: synthetic-ci\nstrategy: {name: finetune\nseed: 0\n")
    assert main(["run", str(cfg), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{cfg} is not valid YAML" in line and "line 4" in line, line
    assert "<unicode string>" not in line and "Fix the syntax" in line
    assert not (tmp_path / "runs").exists()
    crit = tmp_path / "criteria.yaml"
    crit.write_text("criteria:\n  - metric: auroc\n    rule: floor\n   value: 0.8\n")
    assert main(["gate", str(tmp_path), "--criteria", str(crit)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{crit} is not valid YAML" in line and "line 4" in line, line
    assert "<unicode string>" not in line
    assert not (tmp_path / "gate").exists()


# -- 9. class names that hold a comma are quoted -------------------------------------------------


def test_class_names_with_commas_are_quoted_in_messages(tmp_path):
    run_names = ["normal, benign", "malignant"]
    with pytest.raises(ConfigError) as e:
        match_classes(run_names, ["normal"], [5], new_classes=False, what="--data c.csv")
    assert "available: 'malignant', 'normal, benign'" in str(e.value), e.value
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,tumour\nb.png,malignant\n")
    from medcl.data.files import load_manifest

    with pytest.raises(DataError) as e:
        load_manifest(manifest, class_names=run_names)
    assert "unknown label 'tumour'" in str(e.value)
    assert "available: 'malignant', 'normal, benign'" in str(e.value), e.value


def test_bad_yaml_in_an_override_value_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_tiny(tmp_path)))
    assert main(["run", str(cfg), "--set", "train.lr=[1,", "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--set train.lr: the value '[1,' is not valid YAML" in line and "quote it" in line
    assert not (tmp_path / "runs").exists()
    assert main(["scenarios", "show", "synthetic-ci", "--param", "n_train=[1,"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--param n_train: the value '[1,' is not valid YAML" in line
