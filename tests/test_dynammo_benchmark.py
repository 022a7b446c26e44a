"""benchmarks/dynammo_pretrained.py (issue 22): its configs, plan, rows and targets, no training."""

from __future__ import annotations

import importlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module(name)


def _rows(acc: dict[str, dict[str, list[float]]]) -> list[dict]:
    """Rows with ACC per (stream, method) over seeds 0-2 and a loss ratio of 1.5."""
    return [
        {"scenario": sc, "method": m, "seed": s, "average_accuracy": a, "max_loss_ratio": 1.5}
        for sc, by in acc.items()
        for m, values in by.items()
        for s, a in enumerate(values)
    ]


def test_targets_are_computed_from_the_rows_and_can_fail():
    table = _bench("_dynammo_table")
    streams = ["cross3", "sites"]
    good = {
        sc: {"dynammo-mean": [70, 72, 71], "acl": [71, 73, 72], "replay": [69, 70, 71],
             "no-adapters": [60, 61, 60]}
        for sc in streams
    }  # fmt: skip
    lrs = {"cross3/adapters": {"chosen": 0.03, "grid": [0.01, 0.03, 0.1]}}
    rows = _rows(good)
    tg = table.targets(rows, table.differences(rows, streams), lrs, streams)
    assert all(t["met"] for t in tg), tg
    acl = next(t for t in tg if t["name"].startswith("cross3: DynaMMo - ACL"))
    assert acl["value"] == pytest.approx(-1.0)  # paired mean over the seeds
    assert len(tg) == 2 + 1 + 2 + 1 + 1  # ACL gap x2, replay, adapters x2, loss ratio, lr

    bad = {
        sc: {"dynammo-mean": [70, 72, 71], "acl": [74, 76, 75], "replay": [72, 73, 74],
             "no-adapters": [71, 70, 72]}
        for sc in streams
    }  # fmt: skip
    rows = _rows(bad)
    rows[0]["max_loss_ratio"] = math.inf  # a diverged run
    edge = {"cross3/adapters": {"chosen": 0.1, "grid": [0.01, 0.03, 0.1]}}
    tg = table.targets(rows, table.differences(rows, streams), edge, streams)
    assert not any(t["met"] for t in tg), tg
    # no data: NaN and not met, never an error
    empty = table.targets([], table.differences([], streams), {}, streams)
    assert not any(t["met"] for t in empty)


def test_row_reads_epochs_loss_ratios_and_the_measured_model(tmp_path):
    table = _bench("_dynammo_table")
    fit = [
        {"epochs": e, "best_epoch": b, "seconds": 10.0, "diagnostics": {},
         "loss": {"first": 2.0, "max": top, "last": 1.0}}
        for e, b, top in ((3, 1, 2.0), (5, 3, 7.0))
    ]  # fmt: skip
    metrics = {"fit": fit, "summary": {"average_accuracy": 0.7, "forgetting": None},
               "accuracy_matrix": [[0.8, float("nan")], [0.6, 0.8]],
               "compute": {"parameters": 5, "macs": 100}, "timing": {"total": 40.0}}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    scenario = {"experiences": [{"test": 300}, {"test": 100}]}
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    bench = {"val_accuracy": [0.5, 0.7], "deployable": {"parameters": 5, "macs": 100},
             "device": "cpu", "threads": 2, "seconds": 2.0}  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    r = table.row(tmp_path, scenario="s", method="acl", seed=0, lr=0.01)
    assert r["epochs"] == [3, 5] and r["best_epochs"] == [1, 3]
    assert r["max_loss_ratio"] == pytest.approx(3.5) and r["train_seconds"] == 20.0
    assert r["final_accuracy"] == pytest.approx(65.0)  # weighted by test images
    assert math.isnan(r["forgetting"]) and r["val_accuracy"] == pytest.approx(60.0)
    assert r["macs"] == r["macs_metrics_json"] == 100 and r["wall_seconds"] == 42.0
    summary = table.summarise([r], ["s"], [0, 1, 2])
    assert summary[0]["incomplete"] and summary[0]["epochs"] == [3, 5]

    (tmp_path / "bench.json").write_text(json.dumps({"diverged": "loss became nan"}))
    d = table.row(tmp_path, scenario="s", method="acl", seed=0, lr=0.01)
    assert d["diverged"] and math.isnan(d["average_accuracy"]) and d["max_loss_ratio"] == math.inf


def test_configs_share_the_budget_rule_and_one_resolution_path(tmp_path):
    bench = _bench("dynammo_pretrained")
    args = bench.parse(["--cap", "6", "--patience", "3", "--work", str(tmp_path)])
    cfgs = {m: bench.make_config(args, "medmnist-cross3", m, 0.01, 0) for m in bench.METHODS}
    for m, cfg in cfgs.items():
        assert (cfg.train.epochs, cfg.train.early_stopping_patience) == (6, 3), m
        native = cfg.scenario.model_dump().get("native_size")
        assert native is (m == "dynammo-mean-native64"), m
    dyn = cfgs["dynammo-mean"].strategy.model_dump()
    assert dyn["head_lr"] == 0.004 and dyn["backbone_init"] == "pretrained"
    assert "merge" not in cfgs["acl"].strategy.model_dump()
    assert cfgs["no-adapters"].strategy.model_dump()["use_adapters"] is False
    # the run directory names the settings, not where they run
    name = cfgs["acl"].run_name
    gpu = bench.parse(["--cap", "6", "--patience", "3", "--device", "cuda", "--threads", "8"])
    gpu.work = tmp_path
    assert bench.make_config(gpu, "medmnist-cross3", "acl", 0.01, 0).run_name == name
    longer = bench.parse(["--cap", "7", "--patience", "3", "--work", str(tmp_path)])
    assert bench.make_config(longer, "medmnist-cross3", "acl", 0.01, 0).run_name != name


def test_plan_runs_the_key_comparisons_first_and_never_reports_the_selection_seed(capsys):

    bench = _bench("dynammo_pretrained")
    order = bench.plan(bench.parse([]))
    first = order[: 2 * 4 * 3]
    assert {m for _, m, _ in first} == {"dynammo-mean", "acl", "replay", "no-adapters"}
    assert [x for x in order if x[1] == "dynammo-mean-native64"] == [
        ("medmnist-cross3", "dynammo-mean-native64", s) for s in (0, 1, 2)
    ]
    assert order[-1][1] == "dynammo-mean-native64"
    with pytest.raises(SystemExit):
        bench.parse(["--seeds", "0", "100"])
    assert "selection seed 100" in capsys.readouterr().err
    quick = bench.parse(["--quick"])
    assert quick.out != bench.RESULTS and quick.work.is_relative_to(quick.out)
    shutil.rmtree(quick.out)


def test_report_only_names_every_run_it_lacks_and_meets_no_target(tmp_path):
    """--report-only over an empty work folder trains nothing: the page says it is incomplete,
    the JSON lists each missing run, and no target that needs them is met."""
    bench = _bench("dynammo_pretrained")
    args = ["--quick", "--report-only", "--out", str(tmp_path), "--quiet"]
    path = bench.main(args)
    payload = json.loads(path.read_text())
    planned = bench.plan(bench.parse(args))
    assert len(payload["missing_runs"]) >= len(planned) and payload["rows"] == []
    assert not list((tmp_path / "runs").glob("*/metrics.json"))  # nothing was trained
    assert "**Incomplete**" in (tmp_path / "dynammo_pretrained.md").read_text()
    assert not any(t["met"] for t in payload["targets"])
