"""Bad inputs around checkpoints, export and predict (issue 28, part D).

Each refusal is one clear line (exit 2, no traceback) naming the file and the fix, and whatever
was already on disk is hashed before and after: a failed or interrupted write changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from _tiny import tiny_raw
from PIL import Image
from torch import nn

from medcl.cli import main
from medcl.config import validate_config
from medcl.engine.checkpoint import atomic_file, atomic_write_text, load_checkpoint, save_checkpoint
from medcl.engine.run import run
from medcl.errors import ConfigError, DataError
from medcl.export import export_run, load_predictor, predict_files
from medcl.models.weights import read_state_dict

TINY = tiny_raw(train={"epochs": 1, "max_updates": 2, "batch_size": 16}, memory={"size": 8})
NO_UNPICKLING_ADVICE = ("weights_only=False", "will likely succeed")


def _config(tmp_path: Path, **top) -> Path:
    raw = json.loads(json.dumps(TINY)) | {"output_dir": str(tmp_path / "runs")} | top
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every entry under ``folder`` (hidden ones included;
    folders map to ``"dir"``), so a stray temporary folder shows up too."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(folder.rglob("*"))
    }


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Payload:
    """A pickle that would create ``marker`` if anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A tiny synthetic run and its MONAI bundle (written under the umask of the test)."""
    out = tmp_path_factory.mktemp("bad_export")
    raw = json.loads(json.dumps(TINY)) | {"output_dir": str(out / "runs")}
    run_dir = run(validate_config(raw), quiet=True)
    bundle = export_run(run_dir, "bundle")
    return {"dir": run_dir, "bundle": bundle, "out": out, "umask": _current_umask()}


# -- 1. disk full / file-size limit while writing a checkpoint -----------------------------------

_LIMITED = """
import json, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
{body}
"""


def _limited(tmp_path: Path, limit: int, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a Python whose files cannot grow past ``limit`` bytes."""
    script = tmp_path / "limited.py"
    script.write_text(_LIMITED.format(limit=limit, body=body))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, check=False
    )


def test_checkpoint_write_past_the_file_size_limit_keeps_the_previous_one(tmp_path):
    folder = tmp_path / "checkpoints"
    small = {"w": torch.arange(8.0)}
    save_checkpoint(folder / "exp-000", strategy=small, memory={}, state={"completed": 0})
    before = snapshot(folder)
    body = f"""
import torch
from medcl.engine.checkpoint import save_checkpoint
from medcl.errors import MedclError
big = {{"w": torch.zeros(200_000)}}  # 800 kB > the limit
messages = []
for name in ("exp-000", "exp-001"):  # rewrite the existing one, then write a new one
    try:
        save_checkpoint(Path({str(folder)!r}) / name, strategy=big, memory={{}}, state={{}})
    except MedclError as e:
        messages.append(str(e))
print(json.dumps(messages))
"""
    done = _limited(tmp_path, 64_000, body)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    messages = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(messages) == 2
    for name, msg in zip(("exp-000", "exp-001"), messages, strict=True):
        assert f"could not write checkpoint {folder / name}" in msg
        assert "disk full / file too large" in msg and "ulimit -f" in msg
        assert "earlier checkpoints are kept" in msg and "--resume" in msg
    assert snapshot(folder) == before  # old bytes intact; no .partial / .old folder left
    strategy, _, state = load_checkpoint(folder / "exp-000")
    assert torch.equal(strategy["w"], small["w"]) and state == {"completed": 0}


def test_cli_run_that_hits_the_file_size_limit_is_one_line_with_the_fix(tmp_path):
    cfg = _config(tmp_path)
    body = f"""
from medcl.cli import main
sys.exit(main(["run", {str(cfg)!r}, "--quiet", "--no-report"]))
"""
    done = _limited(tmp_path, 500_000, body)  # the config files fit, the 1.5 MB checkpoint not
    assert done.returncode == 2, done.stderr
    err = "\n".join(line for line in done.stderr.splitlines() if "cpp_extension" not in line)
    line = _one_error_line(err)
    run_dir = tmp_path / "runs" / "synthetic-ci-finetune-s0"
    assert f"could not write checkpoint {run_dir / 'checkpoints' / 'exp-000'}" in line
    assert "file too large" in line.lower() and "--resume" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == []  # no partial


# -- 2. a pickle renamed .safetensors ------------------------------------------------------------


def test_pickle_renamed_safetensors_is_refused_cleanly_everywhere(tmp_path, capsys):
    marker = tmp_path / "executed"
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    image = tmp_path / "x.png"
    Image.new("L", (16, 16)).save(image)
    before = snapshot(tmp_path)

    assert main(["predict", str(fake), str(image), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{fake} is not a valid safetensors file" in line
    assert "medcl export" in line and "header" in line

    with pytest.raises(ConfigError, match=r"not a valid safetensors file.*save_file") as e:
        read_state_dict(fake)
    assert str(fake) in str(e.value)

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("strategy.safetensors", "memory.safetensors"):
        (ckpt / name).write_bytes(fake.read_bytes())
    (ckpt / "state.json").write_text("{}")
    with pytest.raises(DataError, match="could not be read") as e:
        load_checkpoint(ckpt)
    assert str(ckpt) in str(e.value)
    assert not marker.exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("ckpt")} == before


def test_safetensors_without_medcl_header_names_the_export_command(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    image = tmp_path / "x.png"
    Image.new("L", (16, 16)).save(image)
    assert main(["predict", str(path), str(image), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and "medcl export RUN_DIR -f safetensors" in line


# -- 3. the bundle's own pipeline skips unreadable files ------------------------------------------


def _inputs(folder: Path, *, good: int = 2) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.dcm").write_text("a text file, not DICOM")
    return folder


def _bundle_run(bundle: Path, inputs: Path, out: Path) -> pd.DataFrame:
    from monai.bundle import run as bundle_run

    bundle_run(
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        dataset_dir=str(inputs),
        output_dir=str(out),
    )
    return pd.read_csv(out / "predictions.csv", keep_default_na=False)


def test_monai_bundle_run_skips_an_unreadable_file_and_lists_it(exported, tmp_path, caplog):
    inputs = _inputs(tmp_path / "in")
    bad = inputs / "notes.dcm"
    before = snapshot(exported["bundle"])
    with caplog.at_level(logging.WARNING, logger="medcl"):
        got = _bundle_run(exported["bundle"], inputs, tmp_path / "out")
    assert list(got["input"]) == [str(p) for p in sorted(inputs.iterdir())]
    by_input = got.set_index("input")
    assert by_input.loc[str(bad), "status"] == "error"
    assert "unreadable DICOM file" in by_input.loc[str(bad), "error"]
    assert by_input.loc[str(bad), "predicted_class"] == ""
    ok = got[got["status"] == "ok"]
    assert len(ok) == 2 and (ok["predicted_class"] != "").all()
    log = caplog.text
    assert "skipped 1 of 3 input file(s)" in log and f"{bad}: unreadable DICOM file" in log
    # the same rows, errors and probabilities as `medcl predict` on that folder
    want = predict_files(load_predictor(exported["bundle"]), [inputs])
    assert list(want["status"]) == list(got["status"])
    assert list(want["error"]) == list(got["error"])
    cols = [c for c in got.columns if c.startswith("p_")]
    diff = np.abs(ok[cols].to_numpy(float) - want[want["status"] == "ok"][cols].to_numpy(float))
    assert diff.max() <= 1e-4
    assert snapshot(exported["bundle"]) == before


def test_bundle_run_with_files_that_fail_to_decode_or_only_bad_files(
    exported, tmp_path, monkeypatch
):
    import medcl.export.bundle_runtime as runtime

    monkeypatch.setattr(runtime, "input_problem", lambda path, meta: None)  # header check passes
    inputs = _inputs(tmp_path / "in", good=0)
    got = _bundle_run(exported["bundle"], inputs, tmp_path / "out")
    assert list(got["status"]) == ["error"]
    assert got["error"][0].startswith("could not decode: ")
    assert "applying transform" not in got["error"][0]  # the reader's reason, not MONAI's wrapper


# -- 4. files medcl writes are as readable as the umask allows ------------------------------------


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_atomic_writes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        text = tmp_path / "run" / "config.yaml"
        atomic_write_text(text, "a: 1\n")
        atomic_write_text(text, "a: 2\n")  # replacing keeps the mode too
        with atomic_file(tmp_path / "run" / "model.onnx") as tmp:
            tmp.write_bytes(b"x")
        ckpt = save_checkpoint(
            tmp_path / "run" / "checkpoints" / "exp-000",
            strategy={"w": torch.zeros(2)},
            memory={"i": torch.zeros(2, dtype=torch.long)},
            state={},
        )
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").rglob("*")}
    assert mode.pop("exp-000") == dir_mode and mode.pop("checkpoints") == dir_mode
    assert set(mode) == {
        "config.yaml",
        "model.onnx",
        "strategy.safetensors",
        "memory.safetensors",
        "state.json",
    }
    assert all(m == file_mode for m in mode.values()), mode
    assert ckpt.is_dir()


def test_run_and_bundle_files_are_as_readable_as_the_umask_allows(exported):
    root = exported["dir"]  # config.yaml, metrics.json, checkpoints/, export/bundle/, ...
    assert (root / "export" / "bundle" / "models" / "model.onnx").is_file()
    for p in [root, *root.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~exported["umask"]
        assert stat.S_IMODE(p.stat().st_mode) == want, p


# -- 5. no advice to load untrusted pickles ------------------------------------------------------


def test_pickle_refusals_never_suggest_unpickling(tmp_path, capsys):
    marker = tmp_path / "executed"
    module_file = tmp_path / "whole_model.pth"
    torch.save(nn.Linear(2, 2), module_file)  # a pickled module, not a state dict
    raw_pickle = tmp_path / "payload.pth"
    raw_pickle.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    messages = []
    for path in (module_file, raw_pickle):
        with pytest.raises(ConfigError) as e:
            read_state_dict(path)
        messages.append(str(e.value))
    cfg = _config(tmp_path, model={"backbone": "test_resnet", "checkpoint_path": str(module_file)})
    assert main(["run", str(cfg), "--quiet", "--no-report"]) == 2
    messages.append(_one_error_line(capsys.readouterr().err))
    as_ts = tmp_path / "whole_model.pt"
    as_ts.write_bytes(module_file.read_bytes())
    image = tmp_path / "x.png"
    Image.new("L", (16, 16)).save(image)
    assert main(["predict", str(as_ts), str(image), "--quiet"]) == 2
    messages.append(_one_error_line(capsys.readouterr().err))
    for msg in messages:
        assert not any(bad in msg for bad in NO_UNPICKLING_ADVICE), msg
        assert "never unpickles" in msg and "safetensors" in msg, msg
    for msg in messages[:3]:
        assert "torch.save(model.state_dict(), path)" in msg and "pickled Python objects" in msg
    assert str(as_ts) in messages[3] and "medcl export" in messages[3]
    assert not marker.exists()


# -- 6. interrupted exports leave nothing behind -------------------------------------------------


def _half_written(path) -> None:
    """Stands for Ctrl-C in the middle of writing ``path``."""
    Path(path).write_bytes(b"half a model")
    raise KeyboardInterrupt


def _interrupt(*args, **kwargs) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "safetensors", "bundle"])
def test_interrupted_export_leaves_no_partial_or_stray_folder(exported, fmt, monkeypatch):
    import safetensors.torch

    import medcl.export.bundle as bundle_module
    import medcl.export.exporters as exporters

    export_dir = exported["dir"] / "export"
    if fmt == "bundle":  # what a killed export left: ours, and the pre-fix `bundle.partial`
        (export_dir / ".bundle.partial").mkdir()
        (export_dir / ".bundle.partial" / "junk").write_text("x")
        (export_dir / "bundle.partial" / "configs").mkdir(parents=True)
        (export_dir / "bundle.partial" / "configs" / "inference.json").write_text("{}")
        before = {k: v for k, v in snapshot(export_dir).items() if "bundle.partial" not in k}
    else:
        before = snapshot(export_dir)
    patches = {
        "torchscript": (torch.jit, "save", lambda ts, path, **kw: _half_written(path)),
        "onnx": (exporters, "onnx_session", lambda path, *a: _half_written(path)),
        "safetensors": (safetensors.torch, "save_model", lambda m, path, **kw: _half_written(path)),
        "bundle": (bundle_module, "_monai_metadata", _interrupt),  # model files already written
    }
    monkeypatch.setattr(*patches[fmt])
    with pytest.raises(KeyboardInterrupt):
        export_run(exported["dir"], fmt)
    monkeypatch.undo()
    assert snapshot(export_dir) == before  # the earlier bundle intact, nothing new, no temp
