"""MedMNIST through the medmnist package: shapes, labels, root resolution, MD5, load_source."""

from __future__ import annotations

import shutil
from pathlib import Path

import medmnist
import pytest
import torch

import medcl.data.medmnist_source as ms
from medcl.data.samples import META_COLUMNS
from medcl.data.sources import load_source, resize_and_convert
from medcl.errors import ConfigError, DataError

REAL = [  # (flag, size, file)
    ("pneumoniamnist", 28, "pneumoniamnist.npz"),
    ("breastmnist", 28, "breastmnist.npz"),
    ("breastmnist", 64, "breastmnist_64.npz"),
    ("retinamnist", 28, "retinamnist.npz"),
    ("adrenalmnist3d", 28, "adrenalmnist3d.npz"),
    ("vesselmnist3d", 28, "vesselmnist3d.npz"),
]


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch) -> Path:
    """No $MEDCL_DATA_ROOT and an empty medmnist default folder (never the user's ~/.medmnist)."""
    monkeypatch.delenv(ms.ENV_VAR, raising=False)
    default = tmp_path / "default"
    default.mkdir()
    monkeypatch.setattr(ms, "_default_root", lambda: default)
    return default


@pytest.mark.parametrize(("flag", "size", "file"), REAL)
def test_real_files_load_with_info_shapes_and_labels(flag, size, file, medmnist_file, isolated):
    root = medmnist_file(file).parent
    info = medmnist.INFO[flag]
    for split in ("train", "val", "test"):
        s = ms.load_medmnist(flag, split, size=size, root=root)
        n = info["n_samples"][split]
        spatial = (size,) * (3 if flag.endswith("3d") else 2)
        assert s.images.shape == (n, info["n_channels"], *spatial)
        assert s.images.dtype == torch.uint8 and s.labels.dtype == torch.int64
        assert s.labels.shape == (n,)
        assert int(s.labels.min()) >= 0 and int(s.labels.max()) == len(info["label"]) - 1
        assert set(META_COLUMNS) <= set(s.meta.columns)
        assert set(s.meta["dataset"]) == {flag if size == 28 else f"{flag}@{size}"}
        assert set(s.meta["split"]) == {split} and s.meta["index"].tolist() == list(range(n))


def test_rgb_is_channel_first_and_matches_the_file(medmnist_file, isolated):
    import numpy as np

    path = medmnist_file("retinamnist.npz")
    s = ms.load_medmnist("retinamnist", "val", root=path.parent)
    raw = np.load(path)["val_images"]  # (N, H, W, 3)
    assert torch.equal(s.images, torch.from_numpy(raw).permute(0, 3, 1, 2))


def test_root_resolution_order(tmp_path, monkeypatch, isolated):
    assert ms.resolve_data_root() == isolated
    monkeypatch.setenv(ms.ENV_VAR, str(tmp_path / "env"))
    assert ms.resolve_data_root() == tmp_path / "env"
    assert ms.resolve_data_root(tmp_path / "arg") == tmp_path / "arg"


def test_env_var_is_used_when_no_root_is_given(medmnist_file, monkeypatch, isolated):
    monkeypatch.setenv(ms.ENV_VAR, str(medmnist_file("breastmnist.npz").parent))
    assert len(ms.load_medmnist("breastmnist", "val")) == 78


def test_missing_file_names_every_place_looked(tmp_path, monkeypatch, isolated):
    monkeypatch.setenv(ms.ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(DataError) as e:
        ms.load_medmnist("breastmnist", "train", root=tmp_path / "arg")
    msg = str(e.value)
    for where in (tmp_path / "arg", tmp_path / "env", isolated):
        assert str(where / "breastmnist.npz") in msg
    assert "MEDCL_DATA_ROOT" in msg and "download: true" in msg


def test_corrupt_file_fails_md5(tmp_path, medmnist_file, isolated):
    data = bytearray(medmnist_file("breastmnist.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "breastmnist.npz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="MD5") as e:
        ms.load_medmnist("breastmnist", "train", root=tmp_path)
    assert medmnist.INFO["breastmnist"]["MD5"] in str(e.value) and "download" in str(e.value)


def test_garbage_with_the_right_name_fails_md5(tmp_path, isolated):
    (tmp_path / "vesselmnist3d.npz").write_bytes(b"not an npz")
    with pytest.raises(DataError, match="MD5"):
        ms.load_medmnist("vesselmnist3d", "test", root=tmp_path)


def test_md5_is_cached_per_path_size_and_mtime(tmp_path, medmnist_file, monkeypatch, isolated):
    shutil.copy(medmnist_file("breastmnist.npz"), tmp_path / "breastmnist.npz")
    ms.load_medmnist("breastmnist", "val", root=tmp_path)

    def no_hashing(*args, **kwargs):
        raise AssertionError("the file was hashed again")

    monkeypatch.setattr(ms.hashlib, "md5", no_hashing)
    ms.load_medmnist("breastmnist", "test", root=tmp_path)  # cached: no hashing
    (tmp_path / "breastmnist.npz").write_bytes(b"changed")
    with pytest.raises(AssertionError, match="hashed again"):  # new size/mtime: hashed again
        ms.load_medmnist("breastmnist", "test", root=tmp_path)


def test_unknown_flag_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'pneumoniamnist'"):
        ms.load_medmnist("pneumonia_mnist", "train")


def test_multi_label_flag_is_rejected_before_any_file_is_needed(tmp_path, isolated):
    with pytest.raises(DataError, match="multi-label is not supported"):
        ms.load_medmnist("chestmnist", "train", root=tmp_path)


def test_unsupported_size_lists_valid_sizes():
    with pytest.raises(ConfigError, match=r"\[28, 64\]"):
        ms.load_medmnist("adrenalmnist3d", "train", size=128)
    with pytest.raises(ConfigError, match=r"\[28, 64, 128, 224\]"):
        ms.load_medmnist("breastmnist", "train", size=100)
    with pytest.raises(ConfigError, match="split"):
        ms.load_medmnist("breastmnist", "validation")


def test_every_flag_and_size_is_known():
    for flag, info in medmnist.INFO.items():
        sizes = ms.medmnist_sizes(flag)
        assert sizes == ((28, 64) if flag.endswith("3d") else (28, 64, 128, 224))
        for size in sizes:
            assert len(ms._expected_md5(flag, size)) == 32
            assert ms.medmnist_filename(flag, size).startswith(flag)
        assert len(ms.medmnist_class_names(flag)) == len(info["label"])
    assert ms.medmnist_class_names("breastmnist") == ("malignant", "normal, benign")


def test_check_medmnist_lists_present_files(tmp_path, data_root, isolated):
    df = ms.check_medmnist(data_root)
    present = {p.name for p in data_root.glob("*.npz")}
    assert set(df["file"].map(lambda f: Path(f).name)) == present
    assert df["verified"].all() and set(df["md5_ok"]) == {"ok"}
    row = df[(df.flag == "pneumoniamnist") & (df["size"] == 28)].iloc[0]
    assert (row.n_train, row.n_val, row.n_test, row.n_classes, row.dims) == (
        4708,
        524,
        624,
        2,
        "2D",
    )
    assert set(df[df.flag == "vesselmnist3d"]["dims"]) == {"3D"}
    assert "pneumoniamnist.npz" not in ms.missing_medmnist(data_root)
    assert "pathmnist.npz" in ms.missing_medmnist(data_root)

    (tmp_path / "breastmnist.npz").write_bytes(b"junk")
    bad = ms.check_medmnist(tmp_path)
    assert len(bad) == 1 and not bad["verified"][0] and "mismatch" in bad["md5_ok"][0]


# --- load_source with MedMNIST specs ---------------------------------------------------------


def test_load_source_spec_forms(medmnist_file, isolated):
    root = medmnist_file("breastmnist_64.npz").parent
    a = load_source("breastmnist@64", root=root)
    b = load_source({"medmnist": "breastmnist", "size": 64}, root=root)
    assert a.name == b.name == "breastmnist@64"
    assert torch.equal(a.splits["test"].images, b.splits["test"].images)
    assert a.splits["train"].images.shape == (546, 1, 64, 64)
    assert a.class_names == ("malignant", "normal, benign")
    assert a.info["licence"] == "CC BY 4.0" and "Scientific Data 10, 41" in a.info["citation"]
    assert a.info["modality"] == "breast ultrasound" and a.info["description"]


def test_load_source_resizes_and_converts_once(medmnist_file, isolated):
    root = medmnist_file("retinamnist.npz").parent
    src = load_source("retinamnist", root=root, image_size=64, channels=1)
    x = src.splits["val"].images
    assert x.shape == (120, 1, 64, 64) and x.dtype == torch.uint8
    orig = load_source("retinamnist", root=root).splits["val"].images.float().mean(1)
    assert abs(x.float().mean() - orig.mean()) < 1.0  # brightness kept by up-sampling

    down = load_source("breastmnist@64", root=root, image_size=28, channels=3)
    assert down.splits["train"].images.shape == (546, 3, 28, 28)
    vol = load_source("adrenalmnist3d", root=root, image_size=16)
    assert vol.splits["test"].images.shape == (298, 1, 16, 16, 16)


def test_resize_area_matches_block_mean():
    from medcl.data.samples import SampleSet, make_meta

    x = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4) * 10
    s = SampleSet(x, torch.zeros(1, dtype=torch.int64), make_meta(1, dataset="t", split="test"))
    out = resize_and_convert(s, image_size=2).images
    assert out.tolist() == [[[[25, 45], [105, 125]]]]
    assert resize_and_convert(s) is s
    with pytest.raises(ConfigError, match="channels"):
        resize_and_convert(s, channels=2)


def test_load_source_rejects_unknown_specs():
    with pytest.raises(ConfigError, match=r"did you mean 'breastmnist'.*Accepted source forms"):
        load_source("breastmnsit")
    with pytest.raises(ConfigError, match="no such folder"):
        load_source("no/such/folder")
    with pytest.raises(ConfigError, match="exactly one of"):
        load_source({"dataset": "breastmnist"})
    with pytest.raises(ConfigError, match="'sise'"):
        load_source({"medmnist": "breastmnist", "sise": 64})
