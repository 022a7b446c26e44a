"""File cohorts beyond RAM: MONAI PersistentDataset + DataLoader workers into disk-backed tensors,
the `data.cache` switch and its automatic choice; the same samples reach the trainer either way."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import nibabel.testing
import numpy as np
import pandas as pd
import pydicom.data
import pytest
import torch
from PIL import Image

from medcl.config import validate_config
from medcl.data import cache as cache_mod
from medcl.data.cache import file_cache
from medcl.data.disk import disk_folder, disk_tensor
from medcl.data.files import load_manifest
from medcl.data.samples import SampleSet, make_meta
from medcl.engine.components import build_components
from medcl.errors import ConfigError

CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
ANATOMICAL = Path(nibabel.testing.data_path) / "anatomical.nii"  # (33, 41, 25) volume


@pytest.fixture
def cohort_2d(tmp_path: Path) -> Path:
    """24 rows: random PNGs, 2D NIfTI slices and copies of pydicom's CT_small.dcm, 2 sites."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        kind = ("png", "nii", "dcm")[i % 3]
        path = tmp_path / f"img{i}.{kind}"
        if kind == "png":
            Image.fromarray(rng.integers(0, 256, (20, 18), dtype=np.uint8)).save(path)
        elif kind == "nii":
            nib.save(nib.Nifti1Image(rng.normal(size=(22, 22)).astype(np.float32), np.eye(4)), path)
        else:
            shutil.copy(CT_SMALL, path)
        rows.append({"path": path.name, "label": "ab"[i % 2], "site": f"S{i % 2}"})
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
    return tmp_path / "cohort.csv"


def _same(a: dict[str, SampleSet], b: dict[str, SampleSet]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].images, b[k].images), k
        assert torch.equal(a[k].labels, b[k].labels), k
        pd.testing.assert_frame_equal(a[k].meta, b[k].meta)


def test_persistent_cache_gives_the_same_samples_as_memory(cohort_2d, tmp_path):
    mem = load_manifest(cohort_2d, image_size=16, channels=1, cache="memory")
    disk = load_manifest(
        cohort_2d, image_size=16, channels=1, cache="persistent", cache_dir=tmp_path / "c"
    )
    _same(mem.splits, disk.splits)
    assert mem.class_names == disk.class_names
    assert all(disk_folder(s.images) == tmp_path / "c" / "tensors" for s in disk.splits.values())
    assert all(disk_folder(s.images) is None for s in mem.splits.values())
    assert len(list((tmp_path / "c").rglob("*.pt"))) == 24  # one decoded image per file
    assert not list((tmp_path / "c" / "tensors").iterdir())  # mapped files are unlinked


def test_persistent_cache_on_3d_volumes_with_workers(tmp_path):
    rng = np.random.default_rng(1)
    rows = [{"path": str(ANATOMICAL), "label": "0"}, {"path": str(ANATOMICAL), "label": "1"}]
    for i in range(4):
        path = tmp_path / f"vol{i}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(size=(12, 10, 9)).astype(np.float32), np.eye(4)), path)
        rows.append({"path": str(path), "label": str(i % 2)})
    pd.DataFrame(rows).to_csv(tmp_path / "vols.csv", index=False)
    opts = {"image_size": 8, "spatial_dims": 3, "split_fractions": (0.5, 0.0, 0.5)}
    mem = load_manifest(tmp_path / "vols.csv", cache="memory", **opts)
    disk = load_manifest(
        tmp_path / "vols.csv", cache="persistent", cache_dir=tmp_path / "c", workers=2, **opts
    )
    _same(mem.splits, disk.splits)
    assert disk.splits["train"].images.shape[1:] == (1, 8, 8, 8)


def test_second_load_reuses_the_cache_and_a_changed_file_is_decoded_again(
    cohort_2d, tmp_path, monkeypatch
):
    opts = {"image_size": 16, "channels": 1, "cache": "persistent", "cache_dir": tmp_path / "c"}
    first = load_manifest(cohort_2d, workers=0, **opts)
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*.pt")}
    from monai.transforms import LoadImaged

    def no_decoding(self, data, reader=None):
        raise AssertionError(f"decoded {data['image']} again")

    with monkeypatch.context() as m:
        m.setattr(LoadImaged, "__call__", no_decoding)
        second = load_manifest(cohort_2d, workers=0, **opts)
    _same(first.splits, second.splits)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*.pt")} == cached
    png = cohort_2d.parent / "img0.png"  # a file replaced in place gets a new cache entry
    Image.fromarray(np.zeros((20, 18), np.uint8)).save(png)
    os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))
    third = load_manifest(cohort_2d, workers=0, **opts)
    assert len(list((tmp_path / "c").rglob("*.pt"))) == 25
    row = int(np.flatnonzero(third.splits["train"].meta["path"] == str(png))[0])
    assert float(third.splits["train"].images[row].abs().max()) == 0.0


@pytest.mark.parametrize(("free", "on_disk"), [(1, True), (2**50, False)])
def test_auto_goes_to_disk_when_the_images_would_fill_half_the_ram(
    cohort_2d, tmp_path, monkeypatch, free, on_disk
):
    monkeypatch.setattr(cache_mod, "available_memory", lambda: free)
    with file_cache("auto", cache_dir=tmp_path / "c"):
        splits = load_manifest(cohort_2d, image_size=16, channels=1).splits
    assert (disk_folder(splits["train"].images) is not None) == on_disk


def test_selecting_and_joining_disk_backed_rows_stays_on_disk(tmp_path):
    x = disk_tensor((6, 1, 4, 4), torch.float32, tmp_path)
    x.copy_(torch.arange(96, dtype=torch.float32).view(6, 1, 4, 4))
    s = SampleSet(x, torch.arange(6), make_meta(6, dataset="d", split="train"))
    sub = s.subset([4, 1])
    assert disk_folder(sub.images) == tmp_path and torch.equal(sub.images, x[[4, 1]])
    mem = SampleSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), sub.meta)
    both = SampleSet.concat([mem, sub])
    assert disk_folder(both.images) == tmp_path
    assert torch.equal(both.images, torch.cat([mem.images, x[[4, 1]]]))


def _run_config(tmp_path: Path, manifest: Path, cache: str) -> dict:
    return {
        "output_dir": str(tmp_path / "runs"),
        "scenario": {
            "name": "domain-incremental",
            "dataset": {"manifest": str(manifest), "image_size": 16, "channels": 1},
        },
        "strategy": {"name": "finetune"},
        "model": {"backbone": "test_resnet", "small_input": True},
        "data": {"cache": cache, "workers": 0},
    }


def test_run_config_switch_reaches_every_experience(cohort_2d, tmp_path):
    """`data.cache: persistent` puts every site's split on disk, under the output folder;
    the scenario is the one `memory` builds."""
    mem, _, _ = build_components(validate_config(_run_config(tmp_path, cohort_2d, "memory")))
    disk, _, _ = build_components(validate_config(_run_config(tmp_path, cohort_2d, "persistent")))
    assert [e.name for e in disk] == [e.name for e in mem] == ["S0", "S1"]
    folder = tmp_path / "runs" / ".cache" / "data" / "tensors"
    for a, b in zip(mem, disk, strict=True):
        _same({"train": a.train, "test": a.test}, {"train": b.train, "test": b.test})
        assert disk_folder(b.train.images) == folder and disk_folder(a.train.images) is None


def test_bad_cache_settings_are_config_errors(tmp_path, cohort_2d):
    with pytest.raises(ConfigError, match=r"data.cache"):
        validate_config(_run_config(tmp_path, cohort_2d, "disk"))
    with pytest.raises(ConfigError, match=r"cache must be one of \['auto', 'memory', "):
        load_manifest(cohort_2d, image_size=16, cache="disk")
    with pytest.raises(ConfigError, match=r"workers must be an int >= 0; got -1"):
        load_manifest(cohort_2d, image_size=16, workers=-1)
