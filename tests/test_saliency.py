"""Saliency (issue 26): Grad-CAM on the last feature stage, the randomisation sanity check,
``medcl predict --saliency`` and the report's per-site gallery."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _tiny import tiny_raw
from PIL import Image

from medcl.cli import main
from medcl.config import validate_config
from medcl.data.scenarios import build_scenario
from medcl.engine.model_record import build_strategy
from medcl.engine.run import run
from medcl.export import export_run, load_run_model
from medcl.models.saliency import (
    feature_stage,
    grad_cam,
    model_randomization_check,
    overlay_png,
    randomized_copy,
    rank_correlation,
)
from medcl.reports import RunResults, build_report

# 32 px: test_resnet's last stage keeps a 4 x 4 map; 96 images x 6 epochs per experience learn
# the synthetic classes (measured on default and avx2, run seeds 0-2: final-model accuracy on
# the last experience 0.91-1.0).
RAW = tiny_raw(scenario={"image_size": 32, "n_train": 96}, train={"epochs": 6})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny class-incremental run (2 experiences of 2 synthetic classes)."""
    out = tmp_path_factory.mktemp("saliency")
    return run(validate_config(RAW | {"output_dir": str(out / "runs")}), quiet=True)


@pytest.fixture(scope="module")
def last_test_images(trained) -> torch.Tensor:
    """``(16, 1, 32, 32)`` uint8 test images of the last experience (classes the model knows)."""
    cfg = validate_config(RAW)
    scenario = build_scenario(
        cfg.scenario.name, root=None, download=False, seed=cfg.seed, **cfg.scenario.options
    )
    return scenario[1].test.images[:16]


def _untrained(backbone: str, shape: tuple[int, ...], *, small_input: bool) -> torch.nn.Module:
    strategy = build_strategy(
        backbone,
        "finetune",
        {},
        input_shape=shape,
        small_input=small_input,
        width=0.25 if backbone.endswith("_3d") else 1.0,  # a small 3D net; timm models as named
        scenario_kind="class",
    )
    strategy.head.expand(3)
    return strategy.deployable_model().eval()


def _output_shape(model: torch.nn.Module, layer: str, x: torch.Tensor) -> tuple[int, ...]:
    seen = []
    h = model.get_submodule(layer).register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with torch.no_grad():
        model(x * 2 - 1)
    h.remove()
    return tuple(seen[0])


# -- Grad-CAM on the last feature stage ---------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "shape", "small_input", "stage"),
    [
        ("test_resnet", (1, 32, 32), True, "backbone.net.layer4"),  # timm ResNet: its last stage
        ("test_efficientnet", (3, 64, 64), False, "backbone.net.bn2"),  # timm EfficientNet head
        ("resnet10_3d", (1, 16, 16, 16), True, "backbone.net.layer4"),  # MONAI 3D ResNet
    ],
)
def test_grad_cam_on_the_last_spatial_stage(backbone, shape, small_input, stage):
    torch.manual_seed(0)
    model = _untrained(backbone, shape, small_input=small_input)
    x = torch.rand(3, *shape)
    assert feature_stage(model, x * 2 - 1) == stage
    out = _output_shape(model, stage, x)
    assert len(out) == len(shape) + 1 and all(s > 1 for s in out[2:])  # a map, not pooled
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    maps = grad_cam(model, x, class_idx=[0, 1, 2])
    assert maps.shape == (3, *shape[1:]) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert (maps.reshape(3, -1).max(1) == 1.0).any()  # min-max scaled, high = salient
    # the model is untouched: weights, requires_grad flags, no hook left behind
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert flags == [p.requires_grad for p in model.parameters()]
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_feature_stage_skips_a_stage_pooled_to_one_cell():
    # EfficientNet at 28 px: the head (bn2) is 1 x 1, so the last stage with a 2 x 2 map wins
    model = _untrained("test_efficientnet", (3, 28, 28), small_input=False)
    x = torch.rand(2, 3, 28, 28)
    assert _output_shape(model, "backbone.net.bn2", x)[2:] == (1, 1)
    stage = feature_stage(model, x * 2 - 1)
    assert stage != "backbone.net.bn2" and all(s > 1 for s in _output_shape(model, stage, x)[2:])


def test_class_idx_per_image_matches_one_image_at_a_time():
    # MONAI's own class_score indexes logits[:, idx], mixing every image's class into each score
    torch.manual_seed(1)
    model = _untrained("test_resnet", (1, 32, 32), small_input=True)
    x = torch.rand(3, 1, 32, 32)
    batch = grad_cam(model, x, class_idx=[2, 0, 1])
    single = np.concatenate(
        [grad_cam(model, x[i : i + 1], class_idx=c) for i, c in enumerate([2, 0, 1])]
    )
    np.testing.assert_allclose(batch, single, atol=1e-5)
    predicted = model(x * 2 - 1).argmax(1)
    np.testing.assert_allclose(
        grad_cam(model, x), grad_cam(model, x, class_idx=predicted), atol=1e-6
    )


def test_randomized_copy_resets_every_parameter_and_keeps_the_original():
    model = _untrained("test_resnet", (1, 32, 32), small_input=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    copy = randomized_copy(model, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    for (name, p), q in zip(model.named_parameters(), copy.parameters(), strict=True):
        assert torch.equal(p, before[name])
        if p.numel() > 1 and p.std() > 0:
            assert not torch.equal(p, q), name
    same = randomized_copy(model, seed=3)
    pairs = zip(copy.parameters(), same.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)  # seeded


def test_rank_correlation_and_overlay():
    a = np.random.default_rng(0).random((2, 8, 8))
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    flat = np.zeros_like(a)
    assert rank_correlation(a, flat) == 0.0 and rank_correlation(flat, flat) == 1.0
    image = (np.random.default_rng(1).random((1, 8, 8, 6)) * 255).astype(np.uint8)
    png = Image.open(io.BytesIO(overlay_png(image, a[0, :, :, None].repeat(6, -1), size=32)))
    assert png.mode == "RGB" and png.size == (32, 32)


# -- the sanity check (Adebayo et al., 2018) ----------------------------------------------------


@pytest.mark.numerics
def test_maps_of_the_trained_model_fail_to_survive_weight_randomisation(trained, last_test_images):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["accuracy_matrix"][1][1] > 0.75  # the model learned (chance: 0.5)
    model = load_run_model(trained, experience=1).strategy.deployable_model().eval()
    check = model_randomization_check(grad_cam, model, last_test_images)
    # Mean over 3 random copies, 16 images. Measured over run seeds 0-2 (copies 0-2 and 3-5):
    # default -0.10 to -0.02, avx2 -0.22 to -0.01 (one copy alone: -0.24 to 0.06 on default,
    # -0.52 to 0.58 on avx2); the intensity control below: 1.0.
    assert check.passed and check.correlation < 0.3, check
    assert len(check.per_copy) == 3

    def intensity(_model, images):  # a "saliency map" that ignores the model
        return images[:, 0].float().numpy() / 255.0

    control = model_randomization_check(intensity, model, last_test_images)
    assert not control.passed and control.correlation == pytest.approx(1.0)


# -- medcl predict --saliency -------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _pngs(folder: Path, images: torch.Tensor) -> list[Path]:
    """a/scan 0.png, b/scan 0.png (the same name twice), a/scan 2.png, a/scan 3.png."""
    paths = [folder / "a" / "scan 0.png", folder / "b" / "scan 0.png"]
    paths += [folder / "a" / f"scan {i}.png" for i in range(2, len(images))]
    for path, img in zip(paths, images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(path)
    return paths


def test_predict_writes_one_overlay_per_input(trained, last_test_images, tmp_path, capsys):
    inputs = _pngs(tmp_path / "in", last_test_images[:4])
    cams, table = tmp_path / "cams", tmp_path / "pred.csv"
    assert main(["predict", str(trained), *map(str, inputs), "--out", str(table), "-q"]) == 0
    before = _tree(trained)  # after the first predict (which caches the OOD guard)
    args = ["predict", str(trained), *map(str, inputs), "--saliency", str(cams)]
    assert main([*args, "--out", str(table), "-q", "--device", "cpu"]) == 0
    assert _tree(trained) == before  # the run directory is not written to
    df = pd.read_csv(table)
    assert list(df["input"]) == list(map(str, inputs)) and (df["status"] == "ok").all()
    written = [Path(p) for p in df["saliency"]]
    assert len(set(written)) == 4 and sorted(cams.iterdir()) == sorted(written)
    assert [p.name for p in written] == ["scan_0.png", "scan_0-1.png", "scan_2.png", "scan_3.png"]
    for p in written:
        png = Image.open(p)
        assert png.mode == "RGB" and png.size == (256, 256)


@pytest.mark.filterwarnings("ignore:TorchScript export is deprecated:FutureWarning")
def test_predict_saliency_from_safetensors_and_refused_for_torchscript(
    trained, last_test_images, tmp_path, capsys
):
    image = tmp_path / "x.png"
    Image.fromarray(last_test_images[0, 0].numpy()).save(image)
    st = export_run(trained, "safetensors", tmp_path / "model.safetensors")
    assert main(["predict", str(st), str(image), "--saliency", str(tmp_path / "st"), "-q"]) == 0
    assert (tmp_path / "st" / "x.png").is_file()
    ts = export_run(trained, "torchscript", tmp_path / "model.ts")
    capsys.readouterr()
    cams = tmp_path / "ts"
    assert main(["predict", str(ts), str(image), "--saliency", str(cams), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--saliency" in err and "torchscript" in err
    assert "run directory" in err and ".safetensors" in err and "medcl export" in err
    assert "Traceback" not in err and not cams.exists()


# -- the report's per-site gallery --------------------------------------------------------------


def test_report_shows_confident_errors_per_site_with_their_maps(trained, tmp_path):
    report = build_report(trained, n_resamples=50)
    sal = report.data["saliency"]
    assert sal["shown"] and sal["layer"] == "backbone.net.layer4" and sal["feature_map"] == [4, 4]
    assert 0 < len(sal["sites"]) <= 2
    rows = [r["row"] for site in sal["sites"] for r in site["errors"]]
    assert rows and all(1 <= len(site["errors"]) <= 3 for site in sal["sites"])
    for site in sal["sites"]:
        assert site["name"] == RunResults(trained).experience_names[site["experience"]]
        conf = [r["confidence"] for r in site["errors"]]
        assert conf == sorted(conf, reverse=True) and all(
            r["true"] != r["predicted"] for r in site["errors"]
        )
    assert set(report.saliency) == set(rows) and set(rows) <= set(report.thumbnails)
    html = report.html()
    for r in rows:
        assert f'alt="misclassified image {r}" src="{report.thumbnails[r]}"' in html
        assert f'alt="Grad-CAM of image {r}" src="{report.saliency[r]}"' in html
    assert sal["sanity"]["random_copies"] == 3 and sal["sanity"]["n_images"] == len(rows)
    assert "Saliency is not localisation" in html
    report.write(tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())["saliency"]
    assert [s["name"] for s in on_disk["sites"]] == [s["name"] for s in sal["sites"]]
    off = build_report(trained, n_resamples=50, saliency=False)
    assert not off.data["saliency"]["shown"] and not off.saliency
    no_data = build_report(trained, n_resamples=50, thumbnails=False)
    assert not no_data.saliency
    assert any(n.startswith("Saliency maps are omitted") for n in no_data.data["notes"])
