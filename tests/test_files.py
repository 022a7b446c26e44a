"""Files on disk: manifests, folders, PNG/DICOM/NIfTI readers, up-front validation, splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import nibabel.testing
import numpy as np
import pandas as pd
import pydicom
import pydicom.data
import pytest
import torch
from PIL import Image

from medcl.data.files import load_folder, load_manifest
from medcl.data.samples import META_COLUMNS
from medcl.data.sources import load_source
from medcl.data.splitting import split_by_patient
from medcl.errors import ConfigError, DataError

CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
ANATOMICAL = Path(nibabel.testing.data_path) / "anatomical.nii"  # (33, 41, 25) volume


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


@pytest.fixture(scope="module")
def breast(data_root: Path) -> tuple[np.ndarray, np.ndarray]:
    path = data_root / "breastmnist.npz"
    if not path.is_file():
        pytest.skip(f"breastmnist.npz is not in {data_root}")
    z = np.load(path)
    return z["train_images"][:48], z["train_labels"][:48, 0]


@pytest.fixture
def pngs(tmp_path: Path, breast) -> tuple[Path, np.ndarray]:
    """48 PNGs from real BreastMNIST images, 2 per patient, 2 sites; returns (folder, images)."""
    images, labels = breast
    names = ("malignant", "benign")
    rows = []
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(tmp_path / f"img{i}.png")
        rows.append(
            {
                "path": f"img{i}.png",
                "label": names[y],
                "site": f"S{i % 2}",
                "patient_id": f"P{i // 2:03d}",
                "age": str(40 + i),
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
    return tmp_path, images


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_manifest_loads_pixels_labels_and_meta(pngs):
    folder, images = pngs
    names, splits = load_manifest(folder / "cohort.csv")
    assert names == ("benign", "malignant")
    assert sum(len(s) for s in splits.values()) == 48
    train = splits["train"]
    assert train.images.dtype == torch.float32 and train.images.shape[1:] == (1, 28, 28)
    assert set(META_COLUMNS) <= set(train.meta.columns) and "age" in train.meta.columns
    assert set(train.meta["dataset"]) == {"cohort"} and set(train.meta["site"]) <= {"S0", "S1"}
    i = int(train.meta["index"][0])  # same pixels, same orientation as the array we saved
    np.testing.assert_allclose(train.images[0, 0].numpy(), _minmax(images[i]), atol=1e-5)
    resized = load_manifest(folder / "cohort.csv", image_size=32, channels=3).splits["test"]
    assert resized.images.shape[1:] == (3, 32, 32)
    assert float(resized.images.min()) >= 0.0 and float(resized.images.max()) <= 1.0


def test_patient_level_split_is_disjoint_and_seeded(pngs):
    folder, _ = pngs
    a = load_manifest(folder / "cohort.csv", seed=1).splits
    b = load_manifest(folder / "cohort.csv", seed=1).splits
    c = load_manifest(folder / "cohort.csv", seed=2).splits
    patients = {k: set(s.meta["patient_id"]) for k, s in a.items()}
    assert not (
        patients["train"] & patients["val"]
        or patients["train"] & patients["test"]
        or patients["val"] & patients["test"]
    )
    assert all(len(p) for p in patients.values())
    assert all(a[k].meta["index"].tolist() == b[k].meta["index"].tolist() for k in a)
    assert a["test"].meta["index"].tolist() != c["test"].meta["index"].tolist()


def test_split_column_is_kept_and_checked(pngs):
    folder, _ = pngs
    df = pd.read_csv(folder / "cohort.csv", dtype=str)
    df["split"] = ["train"] * 30 + ["val"] * 6 + ["test"] * 12
    df.to_csv(folder / "split.csv", index=False)
    splits = load_manifest(folder / "split.csv").splits
    assert [len(splits[k]) for k in ("train", "val", "test")] == [30, 6, 12]

    df.loc[31, "split"] = "test"  # patient P015 now in val and test
    df.to_csv(folder / "leak.csv", index=False)
    with pytest.raises(DataError, match=r"P015.*more than one split"):
        load_manifest(folder / "leak.csv")
    df.loc[3, "split"] = "training"
    df.to_csv(folder / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"line 5: img3.png: split 'training'"):
        load_manifest(folder / "bad.csv")


def test_every_bad_row_is_listed_in_one_error(pngs):
    folder, _ = pngs
    (folder / "garbage.png").write_bytes(b"\x89PNG but not really")
    ds = pydicom.dcmread(CT_SMALL)
    del ds.PixelData
    ds.save_as(folder / "nopixels.dcm")
    shutil.copy(ANATOMICAL, folder / "volume.nii")
    (folder / "scan.tif").write_bytes(b"II*\x00")
    csv = _write(
        folder / "bad.csv",
        "path,label\n"
        "img0.png,benign\nmissing.png,benign\nimg1.png,tumour\ngarbage.png,benign\n"
        "nopixels.dcm,benign\nvolume.nii,malignant\nimg2.png,\nscan.tif,benign\n",
    )
    with pytest.raises(DataError) as e:
        load_manifest(csv, class_names=["benign", "malignant"])
    msg = str(e.value)
    assert "7 row(s) are invalid" in msg
    for line, text in [
        (3, "missing.png: file not found"),
        (4, "unknown label 'tumour'"),
        (5, "garbage.png: unreadable PNG/JPEG"),
        (6, "no pixel data"),
        (7, "3D image of shape (33, 41, 25) in a 2D source"),
        (8, "empty label"),
        (9, "scan.tif: unsupported extension"),
    ]:
        assert f"line {line}: " in msg and text in msg
    assert "line 2:" not in msg


def test_long_error_lists_are_truncated(tmp_path):
    csv = _write(tmp_path / "m.csv", "path,label\n" + "".join(f"x{i}.png,a\n" for i in range(14)))
    with pytest.raises(DataError, match=r"14 row\(s\)[\s\S]*\.\.\. and 4 more"):
        load_manifest(csv)


def test_missing_columns_and_files(tmp_path):
    with pytest.raises(DataError, match=r"'path' and 'label'.*\['label'\]"):
        load_manifest(_write(tmp_path / "m.csv", "path,site\na.png,A\n"))
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match="spatial_dims"):
        load_manifest(_write(tmp_path / "ok.csv", "path,label\na.png,x\n"), spatial_dims=4)


def test_mixed_channels_need_a_choice(pngs):
    folder, images = pngs
    Image.fromarray(np.stack([images[0]] * 3, -1)).save(folder / "rgb.png")
    csv = _write(folder / "mixed.csv", "path,label\nimg0.png,a\nrgb.png,b\n")
    with pytest.raises(DataError, match=r"mixes channel counts.*channels=1 or channels=3"):
        load_manifest(csv)
    x = load_manifest(csv, channels=3, split_fractions=(1, 0, 0)).splits["train"].images
    assert x.shape == (2, 3, 28, 28)
    torch.testing.assert_close(x[0, 0], x[0, 2])  # grey repeated
    torch.testing.assert_close(x[1, 0], x[0, 0])  # the RGB copy of the same image


def test_dicom_and_nifti_load_through_the_manifest(tmp_path):
    shutil.copy(CT_SMALL, tmp_path / "ct.dcm")
    shutil.copy(ANATOMICAL, tmp_path / "anat.nii")
    two_d = load_manifest(
        _write(tmp_path / "ct.csv", "path,label\nct.dcm,0\nct.dcm,1\n"), split_fractions=(1, 0, 0)
    ).splits["train"]
    ct = pydicom.dcmread(CT_SMALL).pixel_array  # (Rows, Columns)
    assert two_d.images.shape == (2, 1, 128, 128)
    np.testing.assert_allclose(two_d.images[0, 0].numpy(), _minmax(ct), atol=1e-5)

    csv = _write(tmp_path / "vol.csv", "path,label,split\nanat.nii,a,train\nanat.nii,b,test\n")
    vol = load_manifest(csv, spatial_dims=3).splits
    assert vol["train"].images.shape == (1, 1, 33, 41, 25)
    data = np.asarray(nib.load(ANATOMICAL).dataobj)
    np.testing.assert_allclose(vol["train"].images[0, 0].numpy(), _minmax(data), atol=1e-5)
    assert load_manifest(csv, spatial_dims=3, image_size=16).splits["test"].images.shape == (
        1,
        1,
        16,
        16,
        16,
    )
    with pytest.raises(DataError, match=r"line 2: ct.dcm: 2D image .* in a 3D source"):
        load_manifest(tmp_path / "ct.csv", spatial_dims=3)


def test_dicom_series_folder_is_a_volume(tmp_path):
    series = tmp_path / "case1"
    series.mkdir()
    for z in range(3):
        ds = pydicom.dcmread(CT_SMALL)
        ds.SOPInstanceUID, ds.InstanceNumber = pydicom.uid.generate_uid(), z + 1
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * z]
        ds.save_as(series / f"{z}.dcm")
    csv = _write(tmp_path / "m.csv", "path,label\ncase1,a\n")
    x = load_manifest(csv, spatial_dims=3, image_size=(32, 32, 3), split_fractions=(1, 0, 0))
    assert x.splits["train"].images.shape == (1, 1, 32, 32, 3)


def test_folder_source_with_and_without_split_folders(tmp_path, breast):
    images, labels = breast
    for i, (img, y) in enumerate(zip(images[:24], labels[:24], strict=True)):
        for root in (tmp_path / "flat", tmp_path / "split" / ("train" if i < 16 else "test")):
            (root / f"class{y}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / f"class{y}" / f"{i}.png")
    (tmp_path / "flat" / "class0" / ".DS_Store").write_bytes(b"junk")
    flat = load_folder(tmp_path / "flat", image_size=20)
    assert flat.class_names == ("class0", "class1")
    assert sum(len(s) for s in flat.splits.values()) == 24
    assert flat.splits["train"].images.shape[1:] == (1, 20, 20)
    split = load_folder(tmp_path / "split")
    assert [len(split.splits[k]) for k in ("train", "val", "test")] == [16, 0, 8]
    src = load_source(tmp_path / "split", image_size=16, channels=3)
    assert src.name == "split" and src.splits["test"].images.shape == (8, 3, 16, 16)
    with pytest.raises(DataError, match="no class sub-folders"):
        load_folder(tmp_path / "flat" / "class0")


def test_load_source_manifest_forms(pngs):
    folder, _ = pngs
    a = load_source(str(folder / "cohort.csv"), image_size=16, seed=3)
    b = load_source({"manifest": str(folder / "cohort.csv"), "seed": 3}, image_size=16)
    assert a.name == "cohort" and a.class_names == ("benign", "malignant")
    assert torch.equal(a.splits["val"].images, b.splits["val"].images)
    assert a.info["task"] == "binary-class" and a.info["dims"] == "2D"
    with pytest.raises(ConfigError, match="did you mean 'image_size'"):
        load_source({"manifest": str(folder / "cohort.csv"), "image_sise": 16})


def test_split_by_patient_fractions():
    groups = [f"p{i // 3}" for i in range(300)]
    labels = [i // 150 for i in range(300)]
    split = split_by_patient(groups, labels, seed=0)
    counts = pd.Series(split).value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (210, 30, 60)
    with pytest.raises(ConfigError, match="summing to 1"):
        split_by_patient(groups, labels, fractions=(0.5, 0.5, 0.5))
