"""DDP under torchrun (gloo, CPU) and experiment logging.

The slow tests start real ``torchrun`` jobs (2 processes, gloo, OMP_NUM_THREADS=1, a free port
chosen by ``--standalone``) on a tiny synthetic stream and compare them with a single-process run
of the same config. The backbone is BatchNorm-free (``test_efficientnet_gn``): BatchNorm
normalises each rank's half of the batch, which a single process never sees, so only a BN-free
network can match one process to rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medcl.cli import main
from medcl.config import LoggingConfig, validate_config
from medcl.engine.distributed import (
    REFUSED,
    SINGLE,
    DistContext,
    check_strategy,
    resolve_backend,
)
from medcl.engine.loggers import create_logger
from medcl.engine.run import run
from medcl.engine.rundir import read_environments
from medcl.errors import ConfigError
from medcl.strategies import list_strategies

REPO = Path(__file__).resolve().parents[1]

CONFIG = {
    "seed": 0,
    "scenario": {
        "name": "synthetic-ci",
        "num_classes": 4,
        "classes_per_experience": 2,
        "n_train": 64,
        "n_test": 24,
        "image_size": 16,
    },
    "strategy": {"name": "replay"},
    "model": {"backbone": "test_efficientnet_gn", "small_input": False},
    "train": {
        "epochs": 4,
        "batch_size": 32,
        "lr": 0.05,
        "augment": "none",
        "eval_every": 4,
        "device": "cpu",
    },
    "eval": {"curve_subset": 32},
    "memory": {"size": 40, "selection": "random"},
    "logging": {"every": 2},
}

# Tolerance of the 1-process vs 2-process comparison. Not exact: the two ranks' gradients are
# summed by gloo's all-reduce and each rank's half-batch loss is a separate float32 reduction,
# so sums are taken in a different order than in one process (~1e-7 relative per update), and
# 32 SGD updates with momentum carry that rounding into the weights, by an amount that depends on
# the seed. Measured max |difference| of the final probabilities (config seeds 0, 1, 2): default
# kernels 4e-6, 8e-5, 4e-4; avx2 2e-6, 4e-5, 1.5e-3. A real difference is far larger: doubling
# the gradient (as a missing average does) moves them by 0.10-0.12 (seeds 0-2). 1e-2 lies
# between the two, about 7x above the largest rounding and 10x below that error.
PROB_ATOL = 1e-2


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _write_config(tmp: Path, **changes) -> Path:
    raw = json.loads(json.dumps(CONFIG)) | {"output_dir": str(tmp / "runs")}
    raw.update(changes)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _medcl(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "medcl", *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _files(run_dir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()
        and "tensorboard" not in p.parts
    )  # fmt: skip


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One process; two processes; the two-process run cut back to experience 0, resumed."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg_path = _write_config(tmp)
    out = tmp / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run(
            validate_config({**yaml.safe_load(cfg_path.read_text()), "name": "one"}), quiet=True
        )
    finally:
        torch.set_num_threads(threads)
    _medcl("run", str(cfg_path), "--nproc", "2", "--set", "name=two", "--no-report", "--quiet")
    # the DDP run as a crash after experience 0 leaves it: its checkpoint, nothing after it
    resumed = out / "resumed"
    shutil.copytree(out / "two", resumed)
    config = resumed / "config.yaml"
    config.write_text(config.read_text().replace("name: two", "name: resumed"))
    shutil.rmtree(resumed / "checkpoints/exp-001")
    for name in (
        "metrics.json",
        "curves.csv",
        "predictions/after-001.npz",
        "predictions/after-001.csv",
    ):
        (resumed / name).unlink()
    (resumed / "checkpoints/latest.json").write_text('{"checkpoint": "exp-000", "completed": 0}')
    _medcl(
        "run", str(cfg_path), "--nproc", "2", "--resume", "--set", "name=resumed", "--no-report",
        "--quiet",
    )  # fmt: skip
    return {"one": one, "two": out / "two", "resumed": out / "resumed"}


@pytest.mark.slow
@pytest.mark.numerics
def test_two_processes_match_one_process(runs):
    one = json.loads((runs["one"] / "metrics.json").read_text())
    two = json.loads((runs["two"] / "metrics.json").read_text())
    # same global batch -> same number of updates and images per experience
    assert [f["updates"] for f in two["fit"]] == [f["updates"] for f in one["fit"]] == [16, 16]
    p1 = np.load(runs["one"] / "predictions/after-001.npz")["probs"]
    p2 = np.load(runs["two"] / "predictions/after-001.npz")["probs"]
    assert p1.shape == p2.shape
    np.testing.assert_allclose(p2, p1, atol=PROB_ATOL)
    # accuracies: a test image whose top-2 probabilities lie within the rounding may flip
    np.testing.assert_allclose(two["accuracy_matrix"], one["accuracy_matrix"], atol=1 / 24 + 1e-9)
    [env] = read_environments(runs["two"])  # one start
    assert (env["world_size"], env["dist_backend"]) == (2, "gloo")


@pytest.mark.slow
def test_only_rank_zero_writes_one_set_of_files(runs):
    assert _files(runs["two"]) == _files(runs["one"])
    for name in ("one", "two"):
        events = list((runs[name] / "tensorboard").iterdir())
        assert len(events) == 1 and events[0].name.startswith("events.out.tfevents"), events
    # nothing half-written or left behind by another rank
    assert not [p for p in runs["two"].rglob(".*")]


@pytest.mark.slow
def test_resume_under_ddp_repeats_the_uninterrupted_run(runs):
    full = json.loads((runs["two"] / "metrics.json").read_text())
    resumed = json.loads((runs["resumed"] / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    for k in (0, 1):
        a = np.load(runs["two"] / f"predictions/after-{k:03d}.npz")["probs"]
        b = np.load(runs["resumed"] / f"predictions/after-{k:03d}.npz")["probs"]
        np.testing.assert_array_equal(b, a)  # same seeds, same checkpoint: bitwise
    assert _files(runs["resumed"]) == _files(runs["two"])


@pytest.mark.slow
def test_tensorboard_holds_the_logged_scalars(runs):
    metrics = json.loads((runs["two"] / "metrics.json").read_text())
    s = _scalars(runs["two"])
    assert {"train/loss", "train/lr", "train/images_per_s", "curve/old", "curve/new", "curve/all",
            "accuracy/exp_0", "accuracy/exp_1", "accuracy/seen"} <= set(s)  # fmt: skip
    assert [step for step, _ in s["train/loss"]] == list(range(2, 33, 2))  # every 2 of 32 updates
    assert all(np.isfinite(v) and v > 0 for _, v in s["train/loss"])
    lrs = [v for _, v in s["train/lr"]]
    assert lrs[0] <= CONFIG["train"]["lr"] and lrs[-1] < lrs[0]  # the cosine schedule
    for j in (0, 1):  # per-experience accuracies: step i = after experience i
        got = [v for _, v in s[f"accuracy/exp_{j}"]]
        np.testing.assert_allclose(got, [row[j] for row in metrics["accuracy_matrix"]], atol=1e-6)
    assert s["summary/final_accuracy"][-1][1] == pytest.approx(metrics["summary"]["final_accuracy"])
    curves = pd.read_csv(runs["two"] / "curves.csv")
    assert [st for st, _ in s["curve/all"]] == curves["update"].tolist()
    np.testing.assert_allclose([v for _, v in s["curve/all"]], curves["all_acc"], atol=1e-6)


# -- fast checks ------------------------------------------------------------------------------


def test_shards_and_loss_weights_rebuild_the_global_batch_gradient():
    """Strided shards cover each row once; weighted rank gradients average to the global one."""
    torch.manual_seed(0)
    x, y = torch.randn(7, 3), torch.tensor([0, 1, 1, 0, 1, 0, 0])  # 7 rows: shards of 4 and 3
    w = torch.randn(3, 2, requires_grad=True)

    def grad(xb, yb, scale=1.0):
        w.grad = None
        (torch.nn.functional.cross_entropy(xb @ w, yb) * scale).backward()
        return w.grad.clone()

    ranks = [DistContext(rank=r, world_size=2) for r in range(2)]
    shards = [r.shard(x, y) for r in ranks]
    assert sorted(torch.cat([s[1] for s in shards]).tolist()) == sorted(y.tolist())
    assert [len(s[0]) for s in shards] == [4, 3]
    averaged = (
        sum(
            grad(xs, ys, r.loss_weight(len(ys), len(y)))
            for r, (xs, ys) in zip(ranks, shards, strict=True)
        )
        / 2
    )  # what DDP's all-reduce average computes
    torch.testing.assert_close(averaged, grad(x, y))
    assert DistContext().shard(x)[0] is x and DistContext().loss_weight(3, 7) == 1.0


def test_every_strategy_trains_under_ddp_or_refuses_with_the_reason(tmp_path, capsys):
    assert set(REFUSED) <= set(list_strategies())
    for name in list_strategies():
        check_strategy(name, 1)  # one process: always fine
        if name in REFUSED:
            with pytest.raises(ConfigError, match=f"strategy '{name}' cannot train with 2 proc"):
                check_strategy(name, 2)
        else:
            check_strategy(name, 2)
    # the CLI refuses before it starts any process, and writes nothing
    cfg = _write_config(tmp_path, strategy={"name": "sparcl"})
    assert main(["run", str(cfg), "--nproc", "2", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "cannot train with 2 processes (DDP)" in err and "dynamic data removal" in err
    assert "Traceback" not in err and not (tmp_path / "runs" / "synthetic-ci-sparcl-s0").exists()


def test_backend_choice_and_override(monkeypatch):
    monkeypatch.delenv("MEDCL_DIST_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda")) == "nccl"
    with pytest.raises(ConfigError, match="NCCL needs CUDA"):
        resolve_backend("nccl", torch.device("cpu"))
    monkeypatch.setenv("MEDCL_DIST_BACKEND", "gloo")  # e.g. two ranks sharing one GPU
    assert resolve_backend("auto", torch.device("cuda")) == "gloo"
    monkeypatch.setenv("MEDCL_DIST_BACKEND", "mpi")
    with pytest.raises(ConfigError, match=r"\$MEDCL_DIST_BACKEND must be one of"):
        resolve_backend("auto", torch.device("cpu"))


def test_nproc_inside_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _write_config(tmp_path)
    assert main(["run", str(cfg), "--nproc", "2"]) == 2
    assert "inside a torchrun job" in capsys.readouterr().err


def test_logging_off_writes_nothing_and_tensorboard_reads_back(tmp_path):
    off = create_logger(LoggingConfig(tensorboard=False), tmp_path / "off", run_name="x")
    assert not off.backends and not off.due(10)
    off.log({"a": 1.0}, 0)
    off.close()
    assert not (tmp_path / "off").exists()
    # rank != 0: no backend, but the same schedule (it joins the loss averaging)
    other = create_logger(LoggingConfig(every=5), tmp_path / "other", run_name="x", main=False)
    assert not other.backends and other.due(10) and not other.due(11)
    assert not (tmp_path / "other").exists()
    on = create_logger(LoggingConfig(every=5), tmp_path, run_name="x")
    on.log({"train/loss": 0.5, "undefined": float("nan")}, 3)
    on.log({"train/loss": 0.25}, 7)
    on.close()
    s = _scalars(tmp_path)
    assert s == {"train/loss": [(3, 0.5), (7, 0.25)]}  # NaN (undefined metric) is not logged


def test_mlflow_is_optional(tmp_path):
    pytest.importorskip("tensorboard")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install mlflow"):
            create_logger(LoggingConfig(mlflow=True), tmp_path, run_name="x")
    else:  # pragma: no cover - mlflow installed: it logs to a local file store
        log = create_logger(
            LoggingConfig(tensorboard=False, mlflow=True, mlflow_tracking_uri=f"file://{tmp_path}"),
            tmp_path,
            run_name="x",
        )
        log.log({"train/loss": 1.0}, 1)
        log.close()


# -- the training step under DDP, in this process ---------------------------------------------


def _stream():
    """Two class-incremental experiences of 16x16 synthetic images (classes {0,1}, {2,3})."""
    from medcl.data.experience import Experience, Scenario
    from medcl.data.synthetic import make_synthetic

    data = make_synthetic(num_classes=4, image_size=16, n_train=64, n_val=0, n_test=8, seed=0)

    def experience(i: int, classes: tuple[int, ...]) -> Experience:
        split = {k: s.subset(torch.nonzero(torch.isin(s.labels, torch.tensor(classes))).flatten())
                 for k, s in data.items()}  # fmt: skip
        return Experience(i, f"exp{i}", i, classes, "site", **split)

    return Scenario("tiny", "class", tuple("abcd"), (experience(0, (0, 1)), experience(1, (2, 3))))


def _strategy(name: str):
    from medcl.models.backbones import create_backbone
    from medcl.strategies import create_strategy

    torch.manual_seed(0)
    backbone = create_backbone("test_efficientnet_gn", in_chans=1, small_input=False)
    return create_strategy(name, backbone, scenario_kind="class")


def _fit(strategy, stream, index: int, job: DistContext, cfg, memory=None):
    from medcl.data.memory import ReplayMemory
    from medcl.engine.trainer import fit_experience

    exp = stream[index]
    return fit_experience(
        strategy, exp, past=stream.experiences[:index], memory=memory or ReplayMemory(0, seed=0),
        cfg=cfg, num_seen_classes=stream.num_seen_classes(index), seed=index, quiet=True, dist=job,
    )  # fmt: skip


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank: DDP's reducer runs, in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        dist.destroy_process_group()


def test_a_parameter_used_only_by_the_loss_trains_under_ddp(one_rank_group):
    """DER's auxiliary classifier appears only in its loss: DDP wraps forward + loss, so the
    reducer sees it as used (wrapping the forward alone: "marked ready twice" at the first
    backward of experience 1)."""
    from medcl.config import TrainConfig

    cfg = TrainConfig(epochs=1, batch_size=16, max_updates=2, augment="none", device="cpu")
    stream, der = _stream(), _strategy("der")
    _fit(der, stream, 0, SINGLE, cfg)
    job = DistContext(rank=0, world_size=2, backend="gloo")  # shards as rank 0 of 2
    stats = _fit(der, stream, 1, job, cfg)
    assert stats.updates == 2 and der.aux is not None
    assert der.aux.weight.grad is not None and der.aux.weight.grad.abs().sum() > 0


@dataclass(frozen=True)
class _NoCollectives(DistContext):
    """A rank's view of a job without a process group: sharding only (the data path)."""

    def wrap(self, module):
        return module

    def sync(self, module, memory=None) -> None:
        return None


def test_ranks_augment_their_rows_as_one_process_would():
    """Each row gets the augmentation draws it gets in one process: the shards of every
    augmented global batch interleave back into the single-process batch (no two ranks share
    draws)."""
    from medcl.config import TrainConfig

    cfg = TrainConfig(epochs=1, batch_size=16, max_updates=2, augment="standard", device="cpu")
    stream = _stream()
    seen: dict[int, list[torch.Tensor]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for key, job in ((-1, SINGLE), (0, _NoCollectives(0, 2)), (1, _NoCollectives(1, 2))):
            strategy, xs = _strategy("finetune"), []
            loss = strategy.loss
            strategy.loss = lambda logits, batch, xs=xs, loss=loss: (
                xs.append(batch.x) or loss(logits, batch)
            )
            _fit(strategy, stream, 0, job, cfg)
            seen[key] = xs
    finally:
        torch.set_num_threads(threads)
    assert len(seen[-1]) == len(seen[0]) == len(seen[1]) == 2
    for full, r0, r1 in zip(seen[-1], seen[0], seen[1], strict=True):
        torch.testing.assert_close(r0, full[0::2])
        torch.testing.assert_close(r1, full[1::2])
        assert not torch.equal(r0, r1)


def test_every_strategy_not_refused_takes_ddp_steps(one_rank_group):
    """Each strategy that DDP does not refuse trains two experiences through DDP's reducer
    (2 updates each, with a replay memory): no parameter is missed or marked ready twice."""
    from medcl.config import TrainConfig
    from medcl.data.memory import ReplayMemory

    cfg = TrainConfig(epochs=1, batch_size=16, max_updates=2, augment="none", device="cpu")
    job = DistContext(rank=0, world_size=2, backend="gloo")
    stream = _stream()
    for name in sorted(set(list_strategies()) - set(REFUSED)):
        strategy, memory = _strategy(name), ReplayMemory(20, seed=0)
        for index in (0, 1):
            stats = _fit(strategy, stream, index, job, cfg, memory=memory)
            assert stats.updates == 2 or not list(strategy.trainable_parameters()), name


def test_more_ranks_than_gpus_with_nccl_is_refused(monkeypatch):
    """NCCL cannot put two ranks on one device: a clear error before the process group starts."""
    from medcl.engine.distributed import session

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("MEDCL_DIST_BACKEND", raising=False)
    for k, v in {
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
    }.items():
        monkeypatch.setenv(k, v)
    job = session(backend="auto", device="cuda")
    with pytest.raises(ConfigError, match="2 processes on this machine but 1 CUDA device"):
        job.__enter__()


def test_mlflow_missing_is_refused_before_the_run_writes(tmp_path, monkeypatch):
    """A logger that cannot start is refused up front: no half-made run directory."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    raw = yaml.safe_load(_write_config(tmp_path).read_text())
    cfg = validate_config(raw | {"logging": {"mlflow": True}})
    with pytest.raises(ConfigError, match="pip install mlflow"):
        run(cfg, quiet=True)
    assert not (tmp_path / "runs" / cfg.run_name).exists()
