"""Scenario invariants: label maps, disjoint class groups, seeds, sites and every bad-param error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medcl.data.experience import Scenario
from medcl.data.scenarios import (
    SCENARIOS,
    build_scenario,
    list_scenarios,
    register_scenario,
    scenario_description,
    scenario_params,
)
from medcl.data.sources import load_source
from medcl.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
BUILT_IN = [
    "adrenal-vessel-3d",
    "breast-sites",
    "class-incremental",
    "cross-dataset",
    "domain-incremental",
    "medmnist-cross3",
    "pneumonia-sites",
    "retina-ci",
    "synthetic-ci",
    "synthetic-sites",
    "task-incremental",
]
TINY = {"n_train": 6, "n_val": 2, "n_test": 3, "image_size": 16}
SMALL = {"synthetic": {"n_train": 12, "n_val": 6, "n_test": 6, "image_size": 16}}


@pytest.fixture(scope="module")
def root() -> Path:
    """The real MedMNIST folder ($MEDCL_DATA_ROOT, else ../shared/data/medmnist)."""
    path = Path(os.environ.get("MEDCL_DATA_ROOT") or REPO.parent / "shared/data/medmnist")
    if not (path / "pneumoniamnist.npz").is_file():
        pytest.skip(f"MedMNIST files not found in {path}; set MEDCL_DATA_ROOT")
    return path


@pytest.fixture(scope="module")
def pneumonia_sites(root: Path) -> Scenario:
    return build_scenario("pneumonia-sites", root=root, seed=0)


def _labels(s: Scenario) -> list[list[int]]:
    return [e.train.labels.tolist() + e.test.labels.tolist() for e in s]


# --- registry and entry point -----------------------------------------------------------------


def test_registry_lists_built_ins_with_descriptions():
    assert set(BUILT_IN) <= set(list_scenarios())
    assert list_scenarios("*sites*") == ["breast-sites", "pneumonia-sites", "synthetic-sites"]
    assert all(scenario_description(n) for n in BUILT_IN)
    assert "classes_per_experience" in scenario_params("retina-ci")
    assert not {"root", "download", "seed"} & set(scenario_params("retina-ci"))


def test_register_custom_scenario_and_duplicate_name(monkeypatch):
    monkeypatch.setattr(SCENARIOS, "_items", dict(SCENARIOS._items))  # restored after the test

    @register_scenario("tiny-two")
    def tiny_two(*, k: int = 2, root=None, download: bool = False, seed: int = 0) -> Scenario:
        """Two synthetic classes, one per experience."""
        return build_scenario(
            "synthetic-ci", num_classes=k, classes_per_experience=1, seed=seed, **TINY
        )

    s = build_scenario("tiny-two", seed=1, k="2")  # "2" is coerced to int like a YAML value
    assert s.name == "tiny-two" and len(s) == 2
    with pytest.raises(ConfigError, match="already registered"):
        register_scenario("tiny-two")(tiny_two)

    @register_scenario("no-context")
    def no_context(*, k: int = 2) -> Scenario:
        """Forgets root/download/seed."""
        raise AssertionError("never called")

    with pytest.raises(ConfigError, match=r"must accept the keyword arguments .* lacks \['root'"):
        build_scenario("no-context")


def test_unknown_scenario_suggests_closest():
    with pytest.raises(
        ConfigError, match=r"unknown scenario 'pneumonia-site'; did you mean 'pneumonia-sites'\?"
    ):
        build_scenario("pneumonia-site")


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        (
            "synthetic-ci",
            {"n_trian": 4},
            r"has no option 'n_trian'; did you mean 'n_train'\? available: ",
        ),
        (
            "synthetic-ci",
            {"order": "abc"},
            r"`scenario.order` must be list\[int\] \| None; got 'abc'",
        ),
        ("synthetic-ci", {"n_train": "many"}, r"`scenario.n_train` must be int; got 'many'"),
        ("class-incremental", {}, r"needs option\(s\) \['dataset'\]"),
        (
            "synthetic-ci",
            {"num_classes": 5, "order": [0, 1, 1, 3, 4]},
            r"^`scenario.order` must list each of the 5 classes once; got \[0, 1, 1, 3, 4\] \(class 1 twice, "
            r"class 2 missing\)\. Remove the duplicate, add the missing class or omit `order` to use the seeded default\.$",
        ),
        ("synthetic-ci", {"num_classes": 3, "order": [0, 1, 5]}, r"class 5 out of range 0..2"),
        (
            "synthetic-ci",
            {"num_classes": 5, "classes_per_experience": [2, 2]},
            r"must be positive group sizes summing to the 5 classes; got \[2, 2\] \(sum 4\)",
        ),
        ("synthetic-ci", {"classes_per_experience": 0}, r"must be >= 1; got 0"),
        ("synthetic-sites", {"shift_strength": -1}, r"strength must be >= 0"),
    ],
)
def test_bad_params_are_clear_config_errors(name, params, message):
    with pytest.raises(ConfigError, match=message):
        build_scenario(name, **({**TINY, **params} if name.startswith("synthetic") else params))


def test_splits_param_errors():
    src = load_source(
        {"synthetic": {"num_classes": 4, "n_train": 8, "n_val": 4, "n_test": 4, "image_size": 16}}
    )
    with pytest.raises(
        ConfigError, match=r"`scenario.splits` must list each of the 4 classes once"
    ):
        build_scenario("class-incremental", dataset=src, splits=[[0, 1], [1, 2]])
    with pytest.raises(ConfigError, match="drop `order` and `classes_per_experience`"):
        build_scenario(
            "class-incremental", dataset=src, splits=[[0, 1], [2, 3]], order=[0, 1, 2, 3]
        )
    s = build_scenario("task-incremental", dataset=src, splits=[[3], [0, 2], [1]])
    assert [e.classes for e in s] == [(0,), (1, 2), (3,)]
    assert s.kind == "task" and [e.task_id for e in s] == [0, 1, 2]
    assert s.class_names == tuple(src.class_names[c] for c in (3, 0, 2, 1))


# --- class-incremental ------------------------------------------------------------------------


def test_class_incremental_label_map_and_disjoint_classes():
    s = build_scenario(
        "synthetic-ci", num_classes=5, classes_per_experience=[2, 2, 1], seed=3, **TINY
    )
    assert s.kind == "class" and len(s) == 3 and s.num_classes == 5
    seen: list[int] = []
    for e, labels in zip(s, _labels(s), strict=True):
        assert e.classes == tuple(
            range(len(seen), len(seen) + len(e.classes))
        )  # order of appearance
        assert set(labels) == set(e.classes)
        assert not set(e.classes) & set(seen)
        seen += e.classes
        assert (e.train.meta["site"] == e.site).all()
    assert sum(len(e.train) for e in s) == 5 * TINY["n_train"]
    # names follow the relabelling: global id g carries the name of the g-th class in the order
    names = [n for e in s for n in e.name.split(":", 1)[1].split("+")]
    assert tuple(names) == s.class_names


def test_class_incremental_relabels_images_consistently():
    src = load_source(
        {"synthetic": {"num_classes": 4, "n_train": 8, "n_val": 4, "n_test": 4, "image_size": 16}}
    )
    s = build_scenario("class-incremental", dataset=src, order=[2, 0, 3, 1])
    assert s.class_names == tuple(src.class_names[c] for c in (2, 0, 3, 1))
    e = s[0]
    first = e.train.meta["index"].iloc[0]
    original = src.splits["train"]
    row = int(np.flatnonzero(original.meta["index"].to_numpy() == first)[0])
    assert torch.equal(e.train.images[0], original.images[row])
    assert {2: 0, 0: 1}[int(original.labels[row])] == int(e.train.labels[0])


def test_same_seed_same_stream_other_seed_other_order():
    a = build_scenario("synthetic-ci", num_classes=6, seed=7, **TINY)
    b = build_scenario("synthetic-ci", num_classes=6, seed=7, **TINY)
    c = build_scenario("synthetic-ci", num_classes=6, seed=8, **TINY)
    assert a.class_names == b.class_names and _labels(a) == _labels(b)
    assert all(
        ea.train.meta["index"].equals(eb.train.meta["index"]) for ea, eb in zip(a, b, strict=True)
    )
    assert all(torch.equal(ea.train.images, eb.train.images) for ea, eb in zip(a, b, strict=True))
    assert a.class_names != c.class_names


def test_retina_ci_on_real_files(root: Path):
    s = build_scenario("retina-ci", root=root, seed=0)
    assert [len(e.classes) for e in s] == [2, 2, 1] and s.num_classes == 5
    assert s.input_shape == (3, 28, 28)
    assert sum(len(e.train) for e in s) == 1080 and sum(len(e.test) for e in s) == 400
    fixed = build_scenario("retina-ci", root=root, order=[0, 1, 2, 3, 4])
    assert fixed.class_names == ("0", "1", "2", "3", "4") != s.class_names
    assert s.sources[0]["dataset"] == "retinamnist" and "CC BY 4.0" in str(s.sources[0])


# --- cross-dataset ----------------------------------------------------------------------------


def test_medmnist_cross3_offsets_shapes_and_sources(root: Path):
    s = build_scenario("medmnist-cross3", root=root)
    assert s.kind == "cross-dataset" and s.num_classes == 9 and s.input_shape == (3, 28, 28)
    assert [e.classes for e in s] == [(0, 1), (2, 3), (4, 5, 6, 7, 8)]
    assert [e.name for e in s] == ["pneumoniamnist", "breastmnist", "retinamnist"]
    assert s.class_names[:4] == (
        "pneumoniamnist:normal",
        "pneumoniamnist:pneumonia",
        "breastmnist:malignant",
        "breastmnist:normal, benign",
    )
    assert s.class_names[4].startswith("retinamnist:")
    for e, n in zip(s, (4708, 546, 1080), strict=True):
        assert len(e.train) == n and e.train.images.dtype == torch.uint8
        assert set(e.train.labels.tolist()) == set(e.classes)
        assert (e.test.meta["site"] == e.name).all()
    gray = s[0].train.images[:4]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 0], gray[:, 2])
    assert [src["dataset"] for src in s.sources] == ["pneumoniamnist", "breastmnist", "retinamnist"]
    assert all("CC BY 4.0" in str(src) and "Yang" in str(src) for src in s.sources)


def test_adrenal_vessel_3d(root: Path):
    s = build_scenario("adrenal-vessel-3d", root=root)
    assert s.input_shape == (1, 28, 28, 28) and s.num_classes == 4
    assert [e.classes for e in s] == [(0, 1), (2, 3)]


def test_cross_dataset_errors(root: Path):
    with pytest.raises(ConfigError, match=r"different input shapes .* set `image_size`"):
        build_scenario("cross-dataset", root=root, datasets=["breastmnist", "breastmnist@64"])
    with pytest.raises(ConfigError, match="lists 'breastmnist' twice"):
        build_scenario("cross-dataset", root=root, datasets=["breastmnist", "breastmnist"])
    s = build_scenario(
        "cross-dataset", root=root, datasets=["breastmnist", "breastmnist@64"], image_size=28
    )
    assert s.input_shape == (1, 28, 28) and s.num_classes == 4


def test_native_size_false_puts_every_dataset_on_the_28px_path(root: Path):
    if not (root / "breastmnist_64.npz").is_file():
        pytest.skip("breastmnist_64.npz not present: nothing native to turn off")
    two = ["breastmnist", "retinamnist"]
    mixed = build_scenario("cross-dataset", root=root, datasets=two, image_size=64)
    same = build_scenario(
        "cross-dataset", root=root, datasets=two, image_size=64, native_size=False
    )
    assert [e.name for e in mixed] == ["breastmnist@64", "retinamnist"]
    assert [e.name for e in same] == ["breastmnist", "retinamnist"]  # both upsampled from 28 px
    assert same.input_shape == mixed.input_shape == (3, 64, 64)
    up = load_source("breastmnist", root=root, image_size=64, channels=3, native_size=False)
    assert torch.equal(same[0].test.images, up.splits["test"].images)
    # a size written in the spec is loaded as given; the presets take the option too
    pinned = build_scenario(
        "cross-dataset", root=root, datasets=["breastmnist@64"], image_size=64, native_size=False
    )
    assert pinned[0].name == "breastmnist@64"
    assert "native_size" in scenario_params("medmnist-cross3")
    assert "native_size" in scenario_params("pneumonia-sites")
    with pytest.raises(ConfigError, match=r"`scenario.native_size` must be bool; got 'maybe'"):
        build_scenario("medmnist-cross3", root=root, image_size=64, native_size="maybe")
    with pytest.raises(ConfigError, match="native_size must be true or false; got 'no'"):
        load_source("breastmnist", root=root, image_size=64, native_size="no")


# --- domain-incremental -----------------------------------------------------------------------


def test_pneumonia_sites_partition_and_classes(root: Path, pneumonia_sites: Scenario):
    s = pneumonia_sites
    assert (
        s.kind == "domain"
        and len(s) == 4
        and [e.site for e in s] == [f"site-{i}" for i in range(4)]
    )
    assert all(e.classes == (0, 1) and e.task_id == 0 for e in s)
    source = load_source("pneumoniamnist", root=root)
    for split in ("train", "val", "test"):
        parts = [getattr(e, split) for e in s]
        idx = np.concatenate([p.meta["index"].to_numpy() for p in parts])
        assert len(idx) == len(set(idx)) == len(source.splits[split])  # disjoint and covering
        counts = np.array([[(p.labels == c).sum().item() for c in (0, 1)] for p in parts])
        assert (counts.max(0) - counts.min(0) <= 1).all()  # class-stratified
        for e, p in zip(s, parts, strict=True):
            assert (p.meta["site"] == e.site).all() and (p.meta["split"] == split).all()


def test_pneumonia_sites_shifts_change_images_deterministically(
    root: Path, pneumonia_sites: Scenario
):
    original = load_source("pneumoniamnist", root=root).splits["train"].images
    diffs = []
    for e in pneumonia_sites:
        before = original[torch.tensor(e.train.meta["index"].to_numpy())]
        diffs.append((e.train.images.float() - before.float()).abs().mean().item())
    assert diffs[0] == 0 and min(diffs[1:]) > 3  # site 0 is the reference acquisition
    again = build_scenario("pneumonia-sites", root=root, seed=0)
    assert all(
        torch.equal(a.train.images, b.train.images)
        for a, b in zip(again, pneumonia_sites, strict=True)
    )
    other = build_scenario("pneumonia-sites", root=root, seed=1)
    assert not np.array_equal(other[1].train.meta["index"], pneumonia_sites[1].train.meta["index"])
    assert other.sources[0]["sites"] != pneumonia_sites.sources[0]["sites"]


def test_domain_custom_shifts_and_errors():
    s = build_scenario(
        "domain-incremental",
        dataset={"synthetic": {"n_train": 12, "image_size": 16}},
        sites=["a", "b"],
        shifts=[{}, {"noise_std": 0.1}],
    )
    assert [e.site for e in s] == ["a", "b"] and "noise" in s.sources[0]["sites"]
    with pytest.raises(ConfigError, match=r"unknown field 'noise'; did you mean 'noise_std'\?"):
        build_scenario("domain-incremental", dataset=SMALL, n_sites=2, shifts=[{}, {"noise": 0.1}])
    with pytest.raises(ConfigError, match=r"one shift per site \(2\); got 1"):
        build_scenario("domain-incremental", dataset=SMALL, n_sites=2, shifts=[{}])
    with pytest.raises(ConfigError, match="has 2 names but n_sites=3"):
        build_scenario("domain-incremental", dataset=SMALL, sites=["a", "b"], n_sites=3)


def test_synthetic_sites_is_tiny_and_configurable():
    s = build_scenario("synthetic-sites", num_classes=2, n_sites=2, **TINY)
    assert s.input_shape == (1, 16, 16) and len(s) == 2
    assert sum(len(e.train) for e in s) == 2 * TINY["n_train"]


def _png_manifest(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        label, site = ("benign", "malignant")[i % 2], ("north", "south", "east")[i % 3]
        split = ("train", "train", "val", "test")[i % 4] if i < 12 else ("train", "test")[i % 2]
        img = (rng.random((12, 12)) * 100 + 100 * (i % 2)).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"img{i}.png")
        rows.append(
            {
                "path": f"img{i}.png",
                "label": label,
                "site": site,
                "split": split,
                "patient_id": f"p{i}",
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
    return tmp_path / "cohort.csv"


def test_domain_sites_from_manifest_site_column(tmp_path: Path):
    csv = _png_manifest(tmp_path)
    s = build_scenario("domain-incremental", dataset=str(csv))
    assert [e.site for e in s] == ["north", "south", "east"]
    assert all(e.classes == (0, 1) for e in s)
    for e in s:
        for part in (e.train, e.val, e.test):
            assert (part.meta["site"] == e.site).all()
    assert sum(len(e.train) + len(e.val) + len(e.test) for e in s) == 24
    picked = build_scenario("domain-incremental", dataset=str(csv), sites=["east", "north"])
    assert [e.site for e in picked] == ["east", "north"]
    with pytest.raises(ConfigError, match=r"unknown site 'west'"):
        build_scenario("domain-incremental", dataset=str(csv), sites=["west"])
    with pytest.raises(ConfigError, match="n_sites` applies to simulated sites"):
        build_scenario("domain-incremental", dataset=str(csv), n_sites=2)
    with pytest.raises((ConfigError, DataError)):
        build_scenario("domain-incremental", dataset=str(tmp_path / "missing.csv"))
