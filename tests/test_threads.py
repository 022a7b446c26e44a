"""CPU threads: ``train.num_threads`` (auto or a count), recorded per start, checked on resume."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _tiny import tiny_raw

import medcl.engine.threads as threads
from medcl.cli import main
from medcl.config import validate_config
from medcl.engine.run import run
from medcl.engine.threads import (
    first_environment,
    resolve_threads,
    resume_warning,
    thread_environment,
    usable_cores,
)
from medcl.errors import ConfigError

TINY = tiny_raw(
    name="threads",
    train={"epochs": 1, "batch_size": 16, "num_threads": "auto"},
    memory={"size": 0},
    logging={"tensorboard": False},
)


def tiny(tmp_path: Path, **train) -> dict:
    raw = json.loads(json.dumps(TINY))
    raw["train"].update(train)
    raw["output_dir"] = str(tmp_path / "runs")
    return raw


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- choosing the count ------------------------------------------------------------------------


def test_auto_is_at_least_one_and_at_most_the_usable_cores():
    cores, cpus = usable_cores()
    assert 1 <= cores <= len(cpus)
    choice = resolve_threads("auto")
    assert 1 <= choice.threads <= cores and choice.requested == "auto"
    assert "usable CPUs" in choice.reason
    busy = threads.busy_cores(cpus, seconds=0.05)
    assert len(busy) == len(cpus) and all(0.0 <= b <= 1.0 for b in busy)


def test_auto_leaves_busy_cpus_to_their_processes(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda **_: (4, [0, 1, 2, 3]))
    for busy, expected in [
        ([0.0, 0.0, 0.0, 0.0], 4),
        ([1.0, 0.0, 0.0, 0.0], 3),
        ([1.0, 0.5, 0.1, 0.0], 2),  # half a CPU taken is not free: a thread there would stall
        ([1.0, 1.0, 1.0, 1.0], 1),  # never fewer than one
    ]:
        monkeypatch.setattr(threads, "busy_cores", lambda cpus, b=busy: b)
        assert resolve_threads("auto").threads == expected, busy
    monkeypatch.setattr(threads, "busy_cores", lambda cpus: [1.0, 0.0, 0.0, 0.0])
    assert resolve_threads("auto", local_ranks=2).threads == 1  # 3 free cores over 2 ranks
    assert resolve_threads("auto", local_ranks=8).threads == 1
    # on resume `auto` keeps the first start's count while the machine has the cores for it
    assert resolve_threads("auto", recorded={"threads": 4}).threads == 4
    assert resolve_threads("auto", recorded={"threads": 16}).threads == 3
    assert resolve_threads(2, recorded={"threads": 4}).threads == 2  # a count is used as given


def test_auto_uses_at_most_torchs_setting_outside_torchrun(monkeypatch):
    monkeypatch.setattr(threads, "_affinity", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(threads, "_physical_cores", lambda cpus: 3)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    with threads.use_threads(1):  # a caller's setting (or OMP_NUM_THREADS=1)
        assert usable_cores()[0] == 1
        assert usable_cores(under_torchrun=True)[0] == 3  # torchrun sets 1 for everyone
    with threads.use_threads(8):
        assert usable_cores()[0] == 3  # one thread per physical core


@pytest.mark.parametrize("value", [0, -2, "two", 1.5, True, "4"])
def test_bad_num_threads_is_refused_with_the_fix(tmp_path, value):
    with pytest.raises(ConfigError) as err:
        validate_config(tiny(tmp_path, num_threads=value))
    msg = str(err.value)
    assert "`train.num_threads`" in msg and f"(got {value!r})" in msg
    assert "'auto'" in msg and "num_threads: 1" in msg


def test_bad_num_threads_on_the_command_line_exits_2_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path)))
    assert main(["run", str(path), "--quiet", "--set", "train.num_threads=0"]) == 2
    err = capsys.readouterr().err
    assert "train.num_threads" in err and "(got 0)" in err and "num_threads: 1" in err
    assert not (tmp_path / "runs").exists()


# -- recording and resuming --------------------------------------------------------------------


def test_explicit_count_is_used_recorded_and_restored(tmp_path):
    before = torch.get_num_threads()
    run_dir = run(validate_config(tiny(tmp_path, num_threads=1)), quiet=True)
    assert torch.get_num_threads() == before  # the caller's setting is back
    env = first_environment(run_dir)
    assert env is not None
    assert env["threads"] == 1 and env["threads_requested"] == 1
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "aten_cpu_capability" in env


def test_first_environment_reads_the_old_single_mapping_and_the_list(tmp_path):
    (tmp_path / "environment.json").write_text(json.dumps({"threads": 3, "torch": "2.0"}))
    assert first_environment(tmp_path) == {"threads": 3, "torch": "2.0"}
    (tmp_path / "environment.json").write_text(json.dumps([{"threads": 2}, {"threads": 5}]))
    assert first_environment(tmp_path) == {"threads": 2}
    (tmp_path / "environment.json").write_text("{not json")
    assert first_environment(tmp_path) is None
    assert first_environment(tmp_path / "absent") is None


def test_resume_warning_names_recorded_and_current_values_and_the_fix():
    now = thread_environment(1) | {"threads": 1}  # as inside use_threads(1)
    assert resume_warning({"threads": 1, "cpu_capability": now["cpu_capability"]}, now) is None
    assert resume_warning({"torch": "2.0"}, now) is None  # nothing recorded to compare
    msg = resume_warning(
        {"threads": 2, "cpu_capability": "AVX512"}, now | {"cpu_capability": "AVX2"}
    )
    assert msg is not None and "\n" not in msg and "bit-identical" in msg
    assert "1 CPU thread where the first start used 2" in msg
    assert "train.num_threads: 2" in msg and "--set train.num_threads=2" in msg
    assert "CPU kernels AVX2 where the first start used AVX512" in msg
    assert "ATEN_CPU_CAPABILITY=avx512" in msg


def test_resume_with_another_thread_count_prints_one_warning_line(tmp_path):
    raw = tiny(tmp_path, num_threads=1)
    run(validate_config(raw), quiet=True, stop_after=0)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "medcl.cli", "run", str(path), "--resume", "--quiet"]
    done = subprocess.run(
        [*cmd, "--no-report", "--set", "train.num_threads=2"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "bit-identical" in line]
    assert len(lines) == 1, done.stderr
    assert "2 CPU threads where the first start used 1" in lines[0]
    assert "--set train.num_threads=1" in lines[0]
    assert "Traceback" not in done.stderr and "UserWarning" not in done.stderr
    envs = json.loads((tmp_path / "runs" / "threads" / "environment.json").read_text())
    assert [e["threads"] for e in envs] == [1, 2]


def test_resume_with_the_same_threads_is_silent_and_auto_keeps_them(tmp_path, caplog):
    run(validate_config(tiny(tmp_path, num_threads=1)), quiet=True, stop_after=0)
    with caplog.at_level(logging.INFO, logger="medcl"):
        run_dir = run(validate_config(tiny(tmp_path, num_threads="auto")), resume=True, quiet=True)
    assert _warnings(caplog) == []
    assert any("kept on resume" in r.getMessage() for r in caplog.records)
    envs = json.loads((run_dir / "environment.json").read_text())
    assert [(e["threads"], e["threads_requested"]) for e in envs] == [(1, 1), (1, "auto")]
