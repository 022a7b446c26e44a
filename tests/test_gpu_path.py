"""The GPU path: device-side augmentation, FLOPs/latency on the model's device, device choice,
bf16 autocast, `medcl predict --device`, ONNX Runtime's CUDA provider.

Tests marked ``gpu`` need a CUDA device and skip cleanly without one
(``benchmarks/gpu_check.sh`` runs them with ``pytest -m gpu`` on a GPU machine).
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medcl.cli import main
from medcl.config import validate_config
from medcl.data.transforms import (
    BatchRandAffine,
    BatchRandFlip,
    BatchRandIntensity,
    build_batch_augment,
)
from medcl.engine.device import autocast, bf16_available, resolve_device
from medcl.engine.evaluate import predict_proba
from medcl.engine.run import run
from medcl.errors import ConfigError
from medcl.export import load_predictor, load_run_strategy, predict_files
from medcl.metrics.compute import count_macs, layer_flops, measure_latency
from medcl.models.backbones import create_backbone

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- the host-side reference: the augmentation as it was before it moved to the device -------


def _reference(pipeline, x: torch.Tensor) -> torch.Tensor:
    """The pre-device implementation (NumPy masks and matrices on the host), step by step."""
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    x = (x - 0.5) / 0.5
    for t in pipeline.transforms[1:]:
        b = x.shape[0]
        if isinstance(t, BatchRandFlip):
            mask = torch.from_numpy(t.R.random_sample(b) < t.prob)
            if mask.any():
                out = x.clone()
                out[mask] = torch.flip(x[mask], dims=(2 + t.spatial_axis,))
                x = out
        elif isinstance(t, BatchRandAffine):
            nd = x.ndim - 2
            on = t.R.random_sample(b) < t.prob
            ang = t.R.uniform(-t.rotate, t.rotate, b) * on
            zoom = 1.0 + t.R.uniform(-t.scale, t.scale, b) * on
            shift = t.R.uniform(-t.translate, t.translate, (b, nd)) * on[:, None] * 2
            theta = np.zeros((b, nd, nd + 1))
            cos, sin = np.cos(ang) / zoom, np.sin(ang) / zoom
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
            if nd == 3:
                theta[:, 2, 2] = 1.0 / zoom
            theta[:, :, nd] = shift
            grid = F.affine_grid(
                torch.as_tensor(theta, dtype=x.dtype), list(x.shape), align_corners=False
            )
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        elif isinstance(t, BatchRandIntensity):
            on = t.R.random_sample(b) < t.prob
            c = 1.0 + t.R.uniform(-t.contrast, t.contrast, b) * on
            s = t.R.uniform(-t.brightness, t.brightness, b) * on
            view = (b,) + (1,) * (x.ndim - 1)
            x = x * torch.as_tensor(c, dtype=x.dtype).view(view) + torch.as_tensor(
                s, dtype=x.dtype
            ).view(view)
        else:
            raise AssertionError(f"no reference for {type(t).__name__}")
    return x


@pytest.mark.parametrize(
    ("shape", "dtype"), [((12, 1, 20, 20), torch.uint8), ((6, 3, 10, 12, 8), torch.float32)]
)
def test_augmentation_on_cpu_is_unchanged_bit_for_bit(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g)
    x = (x * 255).to(torch.uint8) if dtype == torch.uint8 else x
    dims = len(shape) - 2
    new = build_batch_augment(dims, "standard", seed=7, flip_axes=(0, 1, 2))
    ref = copy.deepcopy(new)  # same random states, consumed by the reference
    for _ in range(4):  # several batches: the random streams stay in step
        got, want = new(x), _reference(ref, x)
        assert got.dtype == torch.float32
        assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(4, 1, 16, 16), (2, 1, 8, 8, 8)])
def test_augmentation_runs_on_the_tensors_device(shape):
    """On the 'meta' device nothing can be computed on the host: every mask, matrix and
    resampling must be built where the batch is."""
    x = torch.empty(shape, dtype=torch.uint8, device="meta")
    out = build_batch_augment(len(shape) - 2, "standard", seed=0, flip_axes=(0, 1))(x)
    assert out.device.type == "meta" and out.shape == shape and out.dtype == torch.float32


def test_flops_are_counted_on_the_models_device():
    model = create_backbone("test_resnet", in_chans=1, small_input=True)
    macs, layers = count_macs(model, (1, 16, 16)), layer_flops(model, (1, 16, 16))
    assert macs > 0 and sum(layers.values()) > 0
    moved = copy.deepcopy(model).to("meta")  # an input on the CPU would fail here
    assert count_macs(moved, (1, 16, 16)) == macs
    assert layer_flops(moved, (1, 16, 16)) == layers


def test_latency_is_timed_on_the_models_device():
    model = create_backbone("test_resnet", in_chans=1, small_input=True)
    seconds = measure_latency(model, (1, 16, 16), repeats=3, warmup=1)
    assert (
        math.isfinite(seconds) and seconds > 0
    )  # measured, never a limit (no time limits in unit tests)


@pytest.mark.skipif(CUDA, reason="checks the no-CUDA behaviour")
def test_device_choice_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"--device is 'cuda' but no CUDA device is available"):
        resolve_device("cuda", option="--device")
    assert not bf16_available("cpu")


def test_unknown_device_names_the_choices():
    with pytest.raises(ConfigError, match=r"must be one of \['auto', 'cpu', 'cuda'\]; got 'gpu'"):
        resolve_device("gpu")


def test_amp_never_changes_cpu_results():
    """bf16 autocast is for CUDA only: on the CPU `amp=True` must give the fp32 numbers."""
    torch.manual_seed(0)
    model = create_backbone("test_resnet", in_chans=1, small_input=True)
    x = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    assert torch.equal(predict_proba(model, x, amp=True), predict_proba(model, x, amp=False))
    with autocast("cpu", True):
        assert not torch.is_autocast_enabled("cpu")


# --- a tiny real run, predicted with `medcl predict --device` ----------------------------------


def _config(out: Path, device: str = "cpu") -> dict:
    return {
        "name": f"gpu-path-{device}",
        "output_dir": str(out),
        "scenario": {
            "name": "synthetic-ci",
            "num_classes": 4,
            "n_train": 8,
            "n_val": 2,
            "n_test": 4,
        },
        "strategy": {"name": "finetune"},
        "model": {"backbone": "test_resnet", "small_input": True},
        "train": {
            "max_updates": 2,
            "batch_size": 8,
            "augment": "standard",
            "eval_every": 0,
            "num_threads": 1,
            "device": device,
        },
        "memory": {"size": 8},
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A 2-experience synthetic run (CPU) and 6 of its test images as PNG files."""
    out = tmp_path_factory.mktemp("gpu-path")
    run_dir = run(validate_config(_config(out / "runs")), quiet=True)
    scenario, _ = load_run_strategy(run_dir)
    files = []
    for i, img in enumerate(torch.cat([e.test.images[:3] for e in scenario])):
        files.append(out / f"img{i}.png")
        Image.fromarray(img[0].numpy()).save(files[-1])
    return run_dir, files


def test_predict_device_cpu(tiny_run, tmp_path):
    run_dir, files = tiny_run
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run_dir), *map(str, files), "--device", "cpu", "--out", str(out), "-q"]) == 0  # fmt: skip
    default = predict_files(load_predictor(run_dir), files)  # the library default: CPU
    import pandas as pd

    got = pd.read_csv(out, keep_default_na=False)
    cols = [c for c in got.columns if c.startswith("p_")]
    assert len(got) == len(files) and (got["status"] == "ok").all()
    np.testing.assert_allclose(got[cols].to_numpy(), default[cols].to_numpy(), atol=1e-6)


@pytest.mark.skipif(CUDA, reason="checks the error without CUDA")
def test_predict_device_cuda_without_cuda_is_a_clear_error(tiny_run, capsys):
    run_dir, files = tiny_run
    assert main(["predict", str(run_dir), str(files[0]), "--device", "cuda", "-q"]) == 2
    err = capsys.readouterr().err
    assert "device is 'cuda' but no CUDA device is available" in err and "'cpu'" in err
    assert "Traceback" not in err


def test_onnx_without_cuda_provider_falls_back_to_cpu_and_says_so_once(monkeypatch):
    import onnxruntime as ort

    from medcl.export import exporters

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    exporters._warn_no_cuda_provider.cache_clear()
    assert exporters.onnx_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.warns(RuntimeWarning, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        assert exporters.onnx_providers("cuda") == ["CPUExecutionProvider"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        assert exporters.onnx_providers("cuda") == ["CPUExecutionProvider"]
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert exporters.onnx_providers("cuda")[0] == "CUDAExecutionProvider"
    assert exporters.onnx_providers("cpu") == ["CPUExecutionProvider"]


# --- on a CUDA device (skipped without one) ----------------------------------------------------


@gpu
@needs_cuda
def test_augmentation_on_cuda_matches_cpu():
    x = (torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).byte()
    cpu = build_batch_augment(2, "standard", seed=3)(x)
    cuda = build_batch_augment(2, "standard", seed=3)(x.cuda())
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)  # same random parameters


@gpu
@needs_cuda
def test_training_run_on_cuda_with_bf16(tmp_path):
    cfg = _config(tmp_path / "runs", device="cuda")
    cfg["train"]["amp"] = True
    run_dir = run(validate_config(cfg), quiet=True)
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    acc = np.array(metrics["accuracy_matrix"], dtype=float)
    assert acc.shape == (2, 2) and np.isfinite(acc).all()
    assert metrics["compute"]["macs"] > 0 and metrics["compute"]["latency_ms_b1"] > 0
    _, strategy = load_run_strategy(run_dir)  # the checkpoint loads back on the CPU
    assert next(strategy.parameters()).device.type == "cpu"


@gpu
@needs_cuda
def test_bf16_autocast_in_evaluation_on_cuda():
    if not bf16_available("cuda"):
        pytest.skip("this CUDA device has no bf16")
    torch.manual_seed(0)
    model = create_backbone("test_resnet", in_chans=1, small_input=True).cuda()
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    p16, p32 = predict_proba(model, x, amp=True), predict_proba(model, x, amp=False)
    assert seen == [torch.bfloat16, torch.float32]  # autocast really ran, then it did not
    assert p16.dtype == torch.float32 and p16.device.type == "cpu"  # cast back to fp32
    torch.testing.assert_close(p16, p32, atol=3e-2, rtol=0)


@gpu
@needs_cuda
def test_flops_and_latency_on_cuda():
    model = create_backbone("test_resnet", in_chans=1, small_input=True)
    macs = count_macs(model, (1, 16, 16))
    model = model.cuda()
    assert count_macs(model, (1, 16, 16)) == macs
    assert measure_latency(model, (1, 16, 16), repeats=5) > 0


@gpu
@needs_cuda
def test_predict_on_cuda_matches_cpu(tiny_run, tmp_path):
    run_dir, files = tiny_run
    cols = lambda df: [c for c in df.columns if c.startswith("p_")]  # noqa: E731
    cpu = predict_files(load_predictor(run_dir, device="cpu"), files)
    cuda_pred = load_predictor(run_dir, device="cuda")
    assert "cuda" in cuda_pred.source
    cuda = predict_files(cuda_pred, files)
    np.testing.assert_allclose(cuda[cols(cuda)], cpu[cols(cpu)], atol=1e-4)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run_dir), *map(str, files), "--device", "cuda", "--out", str(out), "-q"]) == 0  # fmt: skip


@gpu
@needs_cuda
def test_exported_models_on_cuda(tiny_run):
    """TorchScript on CUDA; ONNX through ONNX Runtime's CUDA provider when it is installed."""
    import onnxruntime as ort

    from medcl.export import export_run

    run_dir, files = tiny_run
    bundle = export_run(run_dir, "bundle")
    cols = lambda df: [c for c in df.columns if c.startswith("p_")]  # noqa: E731
    ref = predict_files(load_predictor(bundle, device="cpu"), files)
    ts = predict_files(load_predictor(bundle, device="cuda"), files)
    np.testing.assert_allclose(ts[cols(ts)], ref[cols(ref)], atol=1e-4)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime without CUDA provider: {ort.get_available_providers()}")
    pred = load_predictor(bundle, backend="onnx", device="cuda")
    assert "CUDAExecutionProvider" in pred.source
    onnx = predict_files(pred, files)
    np.testing.assert_allclose(onnx[cols(onnx)], ref[cols(ref)], atol=1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize("method", ["mean", "weighted", "ties"])
def test_merging_state_dicts_on_cuda(method):
    from medcl.models.merging import merge_state_dicts

    states = [{"w": torch.full((3,), float(i), device="cuda")} for i in (1, 3)]
    base = {"w": torch.zeros(3, device="cuda")}
    out = merge_state_dicts(states, method=method, weights=[1.0, 1.0], base=base, density=1.0)
    assert out["w"].device.type == "cuda"
    want = torch.full((3,), 2.0, device="cuda")  # equal weights; TIES: agreeing signs, mean
    torch.testing.assert_close(out["w"], want)


@gpu
@needs_cuda
def test_every_strategy_trains_two_experiences_on_cuda():
    """Each strategy, on CUDA with bf16 autocast and device-side augmentation: two experiences
    (growth, consolidation, memory update, merging) and evaluation, without a device mismatch."""
    from medcl.config import TrainConfig
    from medcl.data.experience import Experience, Scenario
    from medcl.data.memory import ReplayMemory
    from medcl.data.synthetic import make_synthetic
    from medcl.engine.trainer import fit_experience
    from medcl.strategies import create_strategy, list_strategies

    data = make_synthetic(num_classes=4, image_size=16, n_train=64, n_val=0, n_test=16, seed=0)

    def experience(i: int, classes: tuple[int, ...]) -> Experience:
        split = {k: s.subset(torch.nonzero(torch.isin(s.labels, torch.tensor(classes))).flatten())
                 for k, s in data.items()}  # fmt: skip
        return Experience(i, f"exp{i}", i, classes, "site", **split)

    stream = Scenario(
        "tiny", "class", tuple("abcd"), (experience(0, (0, 1)), experience(1, (2, 3)))
    )
    cfg = TrainConfig(epochs=1, batch_size=16, max_updates=2, augment="light", device="cuda")
    failed = {}
    for name in list_strategies():
        torch.manual_seed(0)
        backbone = create_backbone("test_resnet", in_chans=1, small_input=False)
        strategy = create_strategy(name, backbone, scenario_kind="class").cuda()
        memory = ReplayMemory(20, seed=0)
        try:
            for i, exp in enumerate(stream):
                fit_experience(
                    strategy, exp, past=stream.experiences[:i], memory=memory, cfg=cfg,
                    num_seen_classes=stream.num_seen_classes(i), seed=i, quiet=True,
                )  # fmt: skip
            probs = predict_proba(strategy, stream[1].test.images, amp=True)
            assert probs.shape == (len(stream[1].test), 4) and torch.isfinite(probs).all()
        except Exception as e:  # collect every strategy's failure, then report them together
            failed[name] = f"{type(e).__name__}: {e}"[:400]
    assert not failed, failed
