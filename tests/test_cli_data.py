"""`medcl datasets check` and `medcl scenarios list|show`: exit codes and content."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from medcl.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def root(monkeypatch) -> Path:
    """The real MedMNIST folder, also exported as $MEDCL_DATA_ROOT."""
    path = Path(os.environ.get("MEDCL_DATA_ROOT") or REPO.parent / "shared/data/medmnist")
    if not (path / "pneumoniamnist.npz").is_file():
        pytest.skip(f"MedMNIST files not found in {path}; set MEDCL_DATA_ROOT")
    monkeypatch.setenv("MEDCL_DATA_ROOT", str(path))
    return path


def test_datasets_check_lists_verified_files(root: Path, capsys):
    assert main(["datasets", "check"]) == 0
    out = capsys.readouterr().out
    assert f"data root: {root} (from $MEDCL_DATA_ROOT)" in out
    for name in (
        "pneumoniamnist.npz",
        "breastmnist_64.npz",
        "retinamnist.npz",
        "vesselmnist3d.npz",
    ):
        assert name in out
    assert "4708 / 524 / 624" in out and "all verified" in out


def test_datasets_check_fails_on_corrupt_file(tmp_path: Path, root: Path, capsys):
    shutil.copy(root / "breastmnist.npz", tmp_path / "breastmnist.npz")
    shutil.copy(root / "retinamnist.npz", tmp_path / "retinamnist.npz")
    with (tmp_path / "breastmnist.npz").open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00corrupt\x00")
    assert main(["datasets", "check", "--root", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "(from --root)" in captured.out and "retinamnist.npz" in captured.out
    assert "1 of 2 MedMNIST file(s) failed MD5 verification" in captured.err
    assert "breastmnist.npz (mismatch: expected 750601b1f35ba3300ea97c75c52ff8f6" in captured.err


def test_datasets_check_empty_root_says_where_it_looked(tmp_path: Path, capsys):
    assert main(["datasets", "check", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no MedMNIST files found" in out and str(tmp_path) in out


def test_scenarios_list(capsys):
    assert main(["scenarios", "list"]) == 0
    out = capsys.readouterr().out
    assert "medmnist-cross3" in out and "PneumoniaMNIST -> BreastMNIST -> RetinaMNIST" in out
    assert main(["scenarios", "list", "retina*"]) == 0
    out = capsys.readouterr().out
    assert "retina-ci" in out and "pneumonia-sites" not in out


def test_scenarios_show_with_seed_and_params(capsys):
    args = [
        "scenarios",
        "show",
        "synthetic-ci",
        "--seed",
        "2",
        "-p",
        "num_classes=4",
        "-p",
        "n_train=4",
        "-p",
        "order=[3, 2, 1, 0]",
        "-p",
        "image_size=16",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "synthetic-ci (kind class, seed 2): 2 experiences, 4 classes" in out
    assert "site" in out and "class names" in out and "│ 8 " in out  # 2 classes x 4 train images
    assert main([*args, "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["seed"] == 2 and [e["classes"] for e in desc["experiences"]] == [[0, 1], [2, 3]]
    assert desc["experiences"][0]["train"] == 8


def test_scenarios_show_real_sites(root: Path, capsys):
    assert main(["scenarios", "show", "breast-sites", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 experiences, 2 classes, input (1, 64, 64)" in out
    assert "site-2" in out and "malignant" in out and "licence CC BY 4.0" in out
    assert "simulated site-1:" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scenarios", "show", "retina-cii"], "did you mean 'retina-ci'?"),
        (["scenarios", "show", "synthetic-ci", "-p", "n_trian=3"], "did you mean 'n_train'?"),
        (
            ["scenarios", "show", "synthetic-ci", "-p", "n_train"],
            "--param must look like KEY=VALUE",
        ),
        (
            ["scenarios", "show", "synthetic-ci", "-p", "num_classes=3", "-p", "order=[0, 0, 1]"],
            "class 0 twice",
        ),
    ],
)
def test_scenarios_show_errors_exit_2(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err
