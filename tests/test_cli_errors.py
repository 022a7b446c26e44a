"""The command line never shows a traceback for a user's mistake: one clear line, exit 2.

Each test also checks that nothing already on disk was changed by the refused command.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _tiny import TINY  # re-exported: other test modules import it from here

import medcl
from medcl.cli import main
from medcl.engine.checkpoint import json_dumps
from medcl.engine.rundir import RunLock


def _config(tmp_path: Path, **top) -> Path:
    raw = json.loads(json.dumps(TINY)) | {"output_dir": str(tmp_path / "runs")} | top
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (empty when it is absent)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# -- usage errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # typer < 0.21 (beside Flower) names the argument by its metavar, CONFIG
        (["run"], r"Missing argument '(config|CONFIG)'.*medcl run --help"),
        (["frobnicate"], r"No such command 'frobnicate'.*medcl --help"),
        (["run", "c.yaml", "--bogus"], r"No such option:? '?--bogus.*medcl run --help"),
        (["report", "x", "--resamples", "abc"], r"Invalid value for '--resamples'"),
        (["update", "runs/x"], r"Missing option '--data'"),
        (["export", "x", "--experience", "last"], r"Invalid value for '--experience'"),
        (["datasets", "chek"], r"No such command 'chek'.*medcl datasets --help"),
    ],
)
def test_usage_errors_print_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    import re

    line = _one_error_line(capsys.readouterr().err)
    assert re.search(expected, line), line


def test_bare_medcl_prints_the_help(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text and "run" in text and "report" in text


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"medcl {medcl.__version__}"


def test_console_script_has_no_traceback():
    """The real entry point (not only ``main``): typer's bundled click must not leak."""
    done = subprocess.run(
        [sys.executable, "-m", "medcl.cli", "frobnicate"], capture_output=True, text=True
    )
    assert done.returncode == 2
    _one_error_line(done.stderr)


# -- config and output_dir ----------------------------------------------------------------------


def test_duplicate_yaml_keys_are_an_error(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(
        "scenario: {name: synthetic-ci}\n"
        "strategy: {name: finetune}\n"
        f"output_dir: {tmp_path / 'runs'}\n"
        "train:\n"
        "  lr: 0.1\n"
        "  epochs: 1\n"
        "  lr: 0.01\n"
    )
    assert main(["run", str(path), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "key `train.lr` is given twice (lines 5 and 7)" in line and "Remove one" in line
    assert not (tmp_path / "runs").exists()  # nothing written


def test_output_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    assert main(["run", str(_config(tmp_path)), "--quiet", "--no-report"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"output_dir '{blocker}' exists but is not a folder" in line
    assert "--set output_dir=" in line
    assert blocker.read_text() == "not a folder"


def test_read_only_output_dir(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    out.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: simulate the refusal
        import medcl.engine.rundir as rundir

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(out))

        monkeypatch.setattr(rundir.tempfile, "TemporaryFile", refuse)
    else:
        out.chmod(0o555)
    try:
        assert main(["run", str(_config(tmp_path)), "--quiet", "--no-report"]) == 2
    finally:
        out.chmod(0o755)
    line = _one_error_line(capsys.readouterr().err)
    assert f"output_dir '{out}' is not writable (Permission denied)" in line
    assert list(out.iterdir()) == []


def test_a_locked_run_directory_is_refused(tmp_path, capsys):
    cfg = _config(tmp_path)
    run_dir = tmp_path / "runs" / "synthetic-ci-finetune-s0"
    with RunLock(run_dir):  # another writer holds it (flock conflicts across open files)
        assert main(["run", str(cfg), "--quiet", "--no-report"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"run directory {run_dir} is in use by another medcl process (pid {os.getpid()}" in line
    assert "choose another `name`" in line
    assert not run_dir.exists()


def test_lock_is_released_after_the_holder(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    with RunLock(run_dir):
        pass
    with RunLock(run_dir):  # re-acquired: the first one was released
        pass


def test_pickle_as_checkpoint_path_is_refused_cleanly(tmp_path, capsys):
    """A crafted pickle is never executed, and the refusal is one line, not a traceback."""
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "weights.pth"
    bad.write_bytes(pickle.dumps({"conv1.weight": Payload()}))
    cfg = _config(tmp_path, model={"backbone": "test_resnet", "checkpoint_path": str(bad)})
    assert main(["run", str(cfg), "--quiet", "--no-report"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".ts", ".onnx"])
def test_damaged_exported_model_in_predict(tmp_path, suffix, capsys):
    pytest.importorskip("onnx")
    model = tmp_path / f"model{suffix}"
    model.write_bytes(b"\x08\x07not a model at all" * 20)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(image)
    assert main(["predict", str(model), str(image), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(model) in line and "export" in line


def test_metrics_json_writes_null_not_nan():
    text = json_dumps({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON")) == {
        "a": None,
        "b": [1.0, None],
        "c": {"d": None},
    }
