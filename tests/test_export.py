"""Export (TorchScript, ONNX, safetensors, MONAI bundle) and `medcl predict` on real files."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import nibabel.testing
import numpy as np
import onnx
import pandas as pd
import pydicom
import pydicom.data
import pytest
import torch
import yaml
from PIL import Image
from test_cli_errors import snapshot
from test_engine import _write_cohort_manifest, tiny_config

import medcl.data.scenarios
from medcl.cli import main
from medcl.config import validate_config
from medcl.data.decode import load_image_files
from medcl.engine.evaluate import predict_proba
from medcl.engine.posthoc import read_posthoc
from medcl.engine.run import run
from medcl.engine.update import update
from medcl.errors import ConfigError, MedclError
from medcl.export import (
    ExportModule,
    Predictor,
    export_run,
    input_problem,
    load_predictor,
    load_run_strategy,
    load_safetensors_model,
    predict_files,
    run_metadata,
)
from medcl.export.bundle import read_bundle_metadata
from medcl.metrics.conformal import apply_temperature

CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
ANATOMICAL = Path(nibabel.testing.data_path) / "anatomical.nii"  # (33, 41, 25) volume
STRATEGIES = ("finetune", "dynammo")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root) -> dict[str, dict]:
    """Tiny real runs on BreastMNIST over 2 simulated sites, each exported as a bundle."""
    out = tmp_path_factory.mktemp("export")
    result = {}
    for name in STRATEGIES:
        strategy = {"name": name} | ({"retune_epochs": 2} if name == "dynammo" else {})
        cfg = validate_config(
            {
                "name": name,
                "output_dir": str(out / "runs"),
                "scenario": {"name": "breast-sites", "dataset": "breastmnist", "n_sites": 2},
                "strategy": strategy,
                "model": {"backbone": "test_resnet", "small_input": True},
                "train": {
                    "max_updates": 3,
                    "epochs": 1,
                    "batch_size": 16,
                    "augment": "none",
                    "eval_every": 0,
                    "num_threads": 1,
                },
                "memory": {"size": 20},
                "data": {"root": str(data_root)},
            }
        )
        run_dir = run(cfg, quiet=True)
        scenario, strat = load_run_strategy(run_dir)
        module = ExportModule(strat.deployable_model()).eval()
        module.temperature = torch.tensor(read_posthoc(run_dir, 1).temperatures)  # as exports
        result[name] = {
            "dir": run_dir,
            "scenario": scenario,
            "strategy": strat,
            "module": module,
            "bundle": export_run(run_dir, "bundle"),
        }
    return result


def _real_images(r: dict, n: int = 12) -> torch.Tensor:
    """Real MedMNIST test images of both sites as float [0, 1]."""
    exps = r["scenario"].experiences
    x = torch.cat([e.test.images[: n // 2] for e in exps])
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@pytest.mark.parametrize("name", STRATEGIES)
def test_exported_models_match_pytorch_on_medmnist(runs, name):
    r = runs[name]
    x = _real_images(r)
    with torch.no_grad():
        want, route, _ = r["module"](x)
    # the wrapper is exactly the evaluated model: softmax of the strategy's scores / T
    t = r["module"].temperature.numpy()  # (1,) or one per class
    calibrated = apply_temperature(predict_proba(r["strategy"], x).double().numpy(), t)
    assert np.abs(want.numpy() - calibrated).max() <= 1e-5
    for backend in ("torchscript", "onnx"):
        pred = load_predictor(r["bundle"], backend=backend)
        for batch in (x[:1], x):  # dynamic batch axis
            probs, got_route, _ = pred.fn(batch)
            assert np.abs(probs - want[: len(batch)].numpy()).max() <= 1e-4, backend
            assert (got_route == route[: len(batch)].numpy()).all()
    if name == "dynammo":  # routes to one of the two sites' heads
        assert set(route.tolist()) <= {0, 1}
    else:
        assert (route == -1).all()


@pytest.mark.parametrize("name", STRATEGIES)
def test_safetensors_rebuilds_without_unpickling(runs, name, tmp_path, monkeypatch):
    r = runs[name]
    path = export_run(r["dir"], "safetensors", tmp_path / "m.safetensors")

    def forbidden(*a, **k):
        raise AssertionError("safetensors loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    module, meta = load_safetensors_model(path)
    x = _real_images(r)
    with torch.no_grad():
        assert (module(x)[0] - r["module"](x)[0]).abs().max() <= 1e-6
    want = json.loads(json.dumps(run_metadata(r["dir"], r["scenario"], r["strategy"])))
    assert {k: meta[k] for k in want} == want and meta["ood"]["threshold"] > 0


def _forbid_loading_data(monkeypatch) -> None:
    def no_data(*args, **kwargs):
        raise AssertionError("the training data was loaded")

    monkeypatch.setattr(medcl.data.scenarios, "build_scenario", no_data)


def _without_data(run_dir: Path, folder: Path, monkeypatch) -> Path:
    """A copy of ``run_dir`` whose data root (config and ``$MEDCL_DATA_ROOT``) is an empty folder."""
    dst = folder / run_dir.name
    shutil.copytree(run_dir, dst)
    (folder / "empty").mkdir()
    raw = yaml.safe_load((dst / "config.yaml").read_text())
    raw["data"]["root"] = str(folder / "empty")
    (dst / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("MEDCL_DATA_ROOT", str(folder / "empty"))
    return dst


@pytest.mark.parametrize("name", STRATEGIES)
def test_export_and_predict_load_the_model_without_the_data(runs, name, tmp_path, monkeypatch):
    r = runs[name]  # its bundle export fitted and cached the OOD guard
    run_dir = _without_data(r["dir"], tmp_path, monkeypatch)
    _forbid_loading_data(monkeypatch)
    module, meta = load_safetensors_model(export_run(run_dir, "safetensors", tmp_path / "m.st"))
    pred = load_predictor(run_dir)
    x = _real_images(r)
    with torch.no_grad():
        want, route, _ = r["module"](x)  # the model restored with its data
        got = module(x)
    assert (got[0] - want).abs().max() <= 1e-6 and torch.equal(got[1], route)
    probs, got_route, _ = pred.fn(x)
    assert np.abs(probs - want.numpy()).max() <= 1e-6 and (got_route == route.numpy()).all()
    # the same metadata as the export made with the data: preprocessing, classes, guard, sources
    exported = read_bundle_metadata(r["bundle"])
    for m in (meta, pred.meta):
        assert {k: v for k, v in m.items() if k != "run"} == {
            k: v for k, v in exported.items() if k not in ("run", "rebuild")
        }
    want_meta = json.loads(json.dumps(run_metadata(r["dir"], r["scenario"], r["strategy"])))
    assert {k: meta[k] for k in want_meta if k != "run"} == {
        k: v for k, v in want_meta.items() if k != "run"
    }


def test_without_data_or_a_fitted_guard_export_says_where_it_looked(
    runs, tmp_path, monkeypatch, capsys
):
    run_dir = _without_data(runs["finetune"]["dir"], tmp_path, monkeypatch)
    shutil.rmtree(run_dir / "ood")  # fitting the guard needs training images
    before = snapshot(run_dir)
    assert main(["export", str(run_dir), "-f", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "breastmnist.npz" in err and "MEDCL_DATA_ROOT" in err, err
    assert str(tmp_path / "empty") in err
    assert snapshot(run_dir) == before


def test_a_run_directory_without_data_facts_is_restored_with_its_data(runs, tmp_path, monkeypatch):
    r = runs["dynammo"]
    run_dir = tmp_path / r["dir"].name
    shutil.copytree(r["dir"], run_dir)
    record = json.loads((run_dir / "model.json").read_text())
    del record["scenario"]  # as written before medcl recorded the data facts
    (run_dir / "model.json").write_text(json.dumps(record))
    calls = []
    build = medcl.data.scenarios.build_scenario
    monkeypatch.setattr(
        medcl.data.scenarios, "build_scenario", lambda *a, **k: calls.append(1) or build(*a, **k)
    )
    module, meta = load_safetensors_model(export_run(run_dir, "safetensors", tmp_path / "m.st"))
    assert calls  # the old path: the data was loaded to restore the model
    x = _real_images(r)
    with torch.no_grad():
        assert (module(x)[0] - r["module"](x)[0]).abs().max() <= 1e-6
    exported = read_bundle_metadata(r["bundle"])
    assert {k: v for k, v in meta.items() if k != "run"} == {
        k: v for k, v in exported.items() if k not in ("run", "rebuild")
    }


def test_a_run_updated_with_a_cohort_exports_without_the_data(tmp_path, monkeypatch):
    raw = tiny_config(tmp_path, strategy={"name": "dynammo", "retune_epochs": 1})
    run_dir = run(validate_config(raw), quiet=True)
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    names = json.loads((run_dir / "scenario.json").read_text())["class_names"]
    update(
        run_dir, str(_write_cohort_manifest(cohort, names)), site="b", new_classes=True, quiet=True
    )
    x = torch.rand((4, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    want = {}
    for k in (0, 2):  # before and after the cohort joined (class names, sources, routes differ)
        module, meta = load_safetensors_model(
            export_run(run_dir, "safetensors", tmp_path / f"with-{k}.st", experience=k)
        )
        with torch.no_grad():
            want[k] = (module(x), meta)
    shutil.rmtree(cohort)  # the cohort's files are gone
    _forbid_loading_data(monkeypatch)
    for k in (0, 2):
        module, meta = load_safetensors_model(
            export_run(run_dir, "safetensors", tmp_path / f"without-{k}.st", experience=k)
        )
        with torch.no_grad():
            got = module(x)
        assert all(torch.equal(a, b) for a, b in zip(got, want[k][0], strict=True))
        assert meta == want[k][1]
    assert len(want[2][1]["class_names"]) == len(want[0][1]["class_names"]) + 1
    assert [h["site"] for h in want[2][1]["history"]][-1] == "b"


def test_bundle_layout_and_metadata_round_trip(runs):
    r = runs["dynammo"]
    b = r["bundle"]
    for rel in (
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.pt",
        "models/model.ts",
        "models/model.onnx",
        "docs/README.md",
        "LICENSE",
    ):
        assert (b / rel).is_file(), rel
    run_meta = json.loads(json.dumps(run_metadata(r["dir"], r["scenario"], r["strategy"])))
    meta = read_bundle_metadata(b)
    assert {k: meta[k] for k in run_meta} == run_meta  # plus the guard and the architecture
    want = {k: v for k, v in meta.items() if k != "rebuild"}
    assert meta["class_names"] == list(r["scenario"].class_names)
    assert meta["input_shape"] == [1, 28, 28] and meta["channels"] == 1
    assert meta["intensity"]["normalise"] == {"mean": 0.5, "std": 0.5, "inside_model": True}
    assert meta["run"]["name"] == "dynammo" and meta["routes"] == ["site-0", "site-1"]
    # the same metadata travels inside the TorchScript and ONNX files
    with zipfile.ZipFile(b / "models" / "model.ts") as z:
        name = next(n for n in z.namelist() if n.endswith("extra/metadata.json"))
        assert json.loads(z.read(name)) == want
    props = {p.key: p.value for p in onnx.load(str(b / "models" / "model.onnx")).metadata_props}
    assert json.loads(props["medcl_metadata"]) == want
    monai_meta = json.loads((b / "configs" / "metadata.json").read_text())
    inputs = monai_meta["network_data_format"]["inputs"]["image"]
    assert inputs["num_channels"] == 1 and inputs["spatial_shape"] == [28, 28]


def _write_inputs(r: dict, folder: Path) -> dict[str, Path]:
    """PNGs from MedMNIST arrays + the bad cases of the issue, next to pydicom's CT_small."""
    folder.mkdir()
    pngs = []
    for i, img in enumerate(r["scenario"].experiences[0].test.images[:3]):
        path = folder / f"breast-{i}.png"
        Image.fromarray(img[0].numpy().astype(np.uint8)).save(path)
        pngs.append(path)
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    ds = pydicom.dcmread(CT_SMALL)
    del ds.PixelData
    nopix = folder / "no-pixels.dcm"
    ds.save_as(nopix)
    ct = folder / "ct.dcm"
    shutil.copy(CT_SMALL, ct)
    return {
        "pngs": pngs,
        "ct": ct,
        "volume": ANATOMICAL,
        "broken": bad,
        "nopix": nopix,
        "missing": folder / "missing.png",
    }


def test_predict_good_and_bad_files_each_get_a_row(runs, tmp_path):
    r = runs["dynammo"]
    files = _write_inputs(r, tmp_path / "in")
    pred = load_predictor(r["bundle"])
    items = [*files["pngs"], files["ct"], files["volume"], files["broken"], files["nopix"]]
    df = predict_files(pred, [*items, files["missing"]], batch_size=2)
    assert len(df) == len(items) + 1
    ok = df[df["status"] == "ok"]
    assert list(ok["input"]) == [str(p) for p in [*files["pngs"], files["ct"]]]
    probs = ok[[f"p_{c}" for c in pred.meta["class_names"]]].to_numpy()
    # same preprocessing as training (MONAI pipeline from the metadata), same model outputs
    # a MedMNIST-trained model: files are mapped 0..255 -> [0, 1] as its uint8 arrays were
    x = load_image_files(
        [*files["pngs"], files["ct"]], image_size=28, channels=1, intensity="uint8"
    )
    with torch.no_grad():
        want, route, _ = r["module"](x)
    assert np.abs(probs - want.numpy()).max() <= 1e-4
    assert list(ok["route"]) == [pred.meta["routes"][i] for i in route.tolist()]
    assert list(ok["predicted_class"]) == [pred.meta["class_names"][i] for i in want.argmax(1)]
    err = df.set_index("input")["error"]
    assert "3D image" in err[str(files["volume"])] and "2D" in err[str(files["volume"])]
    assert "unreadable PNG/JPEG" in err[str(files["broken"])]
    assert "no pixel data" in err[str(files["nopix"])]
    assert "not found" in err[str(files["missing"])]
    assert (df.loc[df["status"] == "error", "predicted_class"] == "").all()


def test_predict_backends_agree_and_manifest_and_folder_inputs(runs, tmp_path):
    r = runs["finetune"]
    files = _write_inputs(r, tmp_path / "in")
    ts = export_run(r["dir"], "torchscript", tmp_path / "m.ts")
    onnx_path = export_run(r["dir"], "onnx", tmp_path / "m.onnx")
    st = export_run(r["dir"], "safetensors", tmp_path / "m.safetensors")
    manifest = tmp_path / "in" / "list.csv"
    pd.DataFrame({"path": [p.name for p in files["pngs"]]}).to_csv(manifest, index=False)
    cols = [f"p_{c}" for c in r["scenario"].class_names]
    ref = predict_files(load_predictor(r["dir"]), [manifest])
    assert list(ref["input"]) == [str(p) for p in files["pngs"]]
    for model in (ts, onnx_path, st):
        df = predict_files(load_predictor(model), files["pngs"], batch_size=64)
        assert np.abs(df[cols].to_numpy() - ref[cols].to_numpy()).max() <= 1e-4, model
    folder = predict_files(load_predictor(ts), [tmp_path / "in"])  # every image in the folder
    assert set(folder["input"]) >= {str(p) for p in files["pngs"]} | {str(files["broken"])}
    assert (folder["route"] == "").all()  # fine-tuning does not route


def test_wrong_channels_and_dimensions_are_explained(tmp_path):
    path = tmp_path / "two-channel.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), path)
    meta3d = {"spatial_dims": 3, "channels": 1, "input_shape": [1, 16, 16, 16]}
    assert "2 channels cannot be converted" in input_problem(path, meta3d)
    meta2d = {"spatial_dims": 2, "channels": 3, "input_shape": [3, 28, 28]}
    assert "3D image" in input_problem(path, meta2d)
    assert input_problem(CT_SMALL, meta2d) is None  # grey -> 3 channels is preprocessing


def test_cli_export_and_predict_exit_codes(runs, tmp_path):
    r = runs["finetune"]
    files = _write_inputs(r, tmp_path / "in")
    onnx_path = tmp_path / "cli.onnx"
    assert main(["export", str(r["dir"]), "--format", "onnx", "--out", str(onnx_path)]) == 0
    out = tmp_path / "preds.csv"
    good = [str(p) for p in files["pngs"]]
    assert main(["predict", str(onnx_path), *good, "--out", str(out), "-q"]) == 0
    assert (pd.read_csv(out)["status"] == "ok").all()
    rc = main(["predict", str(onnx_path), *good, str(files["broken"]), "--out", str(out), "-q"])
    assert rc == 1  # a file failed; the others' rows are still written
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df["status"]) == ["ok"] * 3 + ["error"]
    assert main(["export", str(r["dir"]), "--format", "pickle"]) == 2


def test_export_rejects_what_is_not_a_run(tmp_path):
    with pytest.raises(MedclError, match=r"not a (finished|medcl) run directory"):
        export_run(tmp_path, "onnx")
    with pytest.raises(ConfigError, match="expected a run directory"):
        load_predictor(tmp_path / "model.bin")


def test_grey_dicom_becomes_three_channels_for_an_rgb_model():
    seen = []

    def fn(x: torch.Tensor):
        seen.append(x)
        return np.full((len(x), 2), 0.5, np.float32), np.full(len(x), -1)

    meta = {
        "class_names": ["a", "b"],
        "input_shape": [3, 32, 32],
        "channels": 3,
        "spatial_dims": 2,
        "image_size": [32, 32],
    }
    df = predict_files(Predictor(fn, meta, "test"), [CT_SMALL])
    assert list(df["status"]) == ["ok"] and seen[0].shape == (1, 3, 32, 32)
    x = seen[0][0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey repeated, as in training
    want = load_image_files([CT_SMALL], image_size=32, channels=3)  # the training pipeline
    assert torch.equal(seen[0], want) and 0.0 <= float(x.min()) < float(x.max()) <= 1.0
