"""Synthetic generator: seeded, shaped right, and its classes carry learnable structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier

from medcl.data.samples import META_COLUMNS
from medcl.data.sources import load_source
from medcl.data.synthetic import make_synthetic, synthetic_class_names
from medcl.errors import ConfigError


def _xy(s) -> tuple[np.ndarray, np.ndarray]:
    x = s.images.flatten(1).float().numpy()
    return x / 255.0 if s.images.dtype == torch.uint8 else x, s.labels.numpy()


def _nearest_class_mean(train, test, *, permute: bool = False) -> float:
    """Test accuracy of a nearest-class-mean classifier on raw pixels."""
    x, y = _xy(train)
    if permute:
        y = np.random.default_rng(0).permutation(y)
    xt, yt = _xy(test)
    means = np.stack([x[y == k].mean(0) for k in np.unique(y)])
    pred = ((xt[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yt).mean())


def test_same_seed_same_data_other_seed_other_data():
    a, b = make_synthetic(seed=5), make_synthetic(seed=5)
    c = make_synthetic(seed=6)
    for k in ("train", "val", "test"):
        assert torch.equal(a[k].images, b[k].images) and torch.equal(a[k].labels, b[k].labels)
    assert not torch.equal(a["train"].images, c["train"].images)
    more_test = make_synthetic(seed=5, n_test=200)  # each split has its own stream
    assert torch.equal(more_test["train"].images, a["train"].images)


@pytest.mark.parametrize(
    ("kwargs", "shape", "dtype"),
    [
        ({}, (1, 28, 28), torch.uint8),
        ({"channels": 3, "image_size": 32}, (3, 32, 32), torch.uint8),
        ({"spatial_dims": 3, "image_size": 16}, (1, 16, 16, 16), torch.uint8),
        ({"dtype": "float32", "num_classes": 12}, (1, 28, 28), torch.float32),
    ],
)
def test_shapes_dtypes_labels_and_meta(kwargs, shape, dtype):
    splits = make_synthetic(n_train=48, n_val=12, n_test=24, site="A", **kwargs)
    k = kwargs.get("num_classes", 3)
    for name, n in (("train", 48), ("val", 12), ("test", 24)):
        s = splits[name]
        assert s.images.shape == (n, *shape) and s.images.dtype == dtype
        assert s.labels.dtype == torch.int64 and set(s.labels.tolist()) <= set(range(k))
        assert set(META_COLUMNS) <= set(s.meta.columns)
        assert set(s.meta["dataset"]) == {"synthetic"} and set(s.meta["site"]) == {"A"}
    counts = torch.bincount(splits["train"].labels, minlength=k)
    assert int(counts.max() - counts.min()) <= 1  # balanced
    if dtype == torch.float32:
        assert (
            0.0 <= float(splits["train"].images.min()) <= float(splits["train"].images.max()) <= 1
        )


def test_classes_are_learnable_from_structure_not_noise():
    splits = make_synthetic(num_classes=4, n_train=400, n_test=200, seed=0)
    acc = _nearest_class_mean(splits["train"], splits["test"])
    permuted = _nearest_class_mean(splits["train"], splits["test"], permute=True)
    assert acc > 0.75, acc  # chance is 0.25
    assert permuted < 0.45, permuted


def test_3d_classes_are_learnable():
    splits = make_synthetic(
        num_classes=3, spatial_dims=3, image_size=16, n_train=150, n_test=90, seed=2
    )
    x, y = _xy(splits["train"])
    xt, yt = _xy(splits["test"])
    acc = RidgeClassifier(alpha=10.0).fit(x, y).score(xt, yt)
    chance = (
        RidgeClassifier(alpha=10.0).fit(x, np.random.default_rng(0).permutation(y)).score(xt, yt)
    )
    assert acc > 0.75 and chance < 0.55, (acc, chance)


def test_site_shift_changes_appearance_not_classes():
    plain = make_synthetic(seed=3, n_train=300, n_test=150)
    shifted = make_synthetic(seed=3, n_train=300, n_test=150, site_shift=1.0)
    assert torch.equal(plain["train"].labels, shifted["train"].labels)
    gap = (plain["test"].images.float() - shifted["test"].images.float()).abs().mean()
    assert gap > 10  # grey levels
    assert _nearest_class_mean(shifted["train"], shifted["test"]) > 0.8


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"num_classes must be in 2\.\.12; got 1"):
        make_synthetic(num_classes=1)
    with pytest.raises(ConfigError, match="site_shift"):
        make_synthetic(site_shift=2.0)
    with pytest.raises(ConfigError, match="split sizes"):
        make_synthetic(n_val=-1)


def test_class_names_and_load_source():
    assert synthetic_class_names(5) == ("nodule", "cyst", "streak", "cluster", "large nodule")
    src = load_source("synthetic", seed=4)
    assert src.name == "synthetic" and src.class_names == synthetic_class_names(3)
    assert torch.equal(src.splits["train"].images, make_synthetic(seed=4)["train"].images)
    spec = {"synthetic": {"num_classes": 4, "n_train": 40, "n_val": 4, "n_test": 8}}
    src = load_source(spec, image_size=20, channels=3)
    assert src.splits["train"].images.shape == (40, 3, 20, 20)
    assert src.info["modality"] == "synthetic" and src.info["task"] == "multi-class"
    with pytest.raises(ConfigError, match="did you mean 'num_classes'"):
        load_source({"synthetic": {"num_clases": 3}})
