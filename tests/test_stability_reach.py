"""updates_to_reach on a hand-made curve (the "updates to match vanilla" numbers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medcl.errors import DataError
from medcl.metrics.stability import updates_to_reach

CURVES = pd.DataFrame(
    [
        # experience, update, old, new, all
        (0, 0, np.nan, 0.5, 0.5),
        (0, 10, np.nan, 0.9, 0.9),
        (1, 10, 0.9, 0.0, 0.45),
        (1, 15, 0.6, 0.5, 0.55),
        (1, 20, 0.8, 0.8, 0.80),
        (1, 25, 0.9, 0.9, 0.90),
        (2, 25, 0.9, 0.0, 0.60),
        (2, 30, 0.7, 0.3, 0.58),
    ],
    columns=["experience", "update", "old_acc", "new_acc", "all_acc"],
)


def test_first_evaluation_at_or_above_the_target():
    got = updates_to_reach(CURVES, {1: 0.8, 2: 0.6})
    assert got == {1: 10.0, 2: 0.0}  # 20 - 10; experience 2 already there at offset 0
    assert updates_to_reach(CURVES, {1: 0.95}) == {1: float("inf")}
    assert updates_to_reach(CURVES, {1: 0.5}, column="new_acc") == {1: 5.0}


def test_errors_name_the_problem():
    with pytest.raises(DataError, match="column must be one of"):
        updates_to_reach(CURVES, {1: 0.5}, column="acc")
    with pytest.raises(DataError, match=r"experience\(s\) \[3\]"):
        updates_to_reach(CURVES, {3: 0.5})


def _bench(name: str):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module(name)


def test_benchmark_targets_are_the_issues_three():
    report = _bench("_stability_report")
    summary = {
        "sgm": {"max_drop": 0.05, "final_acc": 0.795, "updates_to_joint_old": 30.0},
        "vanilla-authors": {"max_drop": 0.2, "final_acc": 0.6},
        "vanilla-tuned": {"max_drop": 0.1, "final_acc": 0.8},
    }
    block = {"summary": summary, "joint_updates": 100.0}
    got = {t["name"].split(": ")[1]: t for t in report.targets("s", block)}
    drop = got["max_drop SGM / authors' vanilla"]
    assert drop["value"] == pytest.approx(0.25) and drop["met"]
    acc = got["final accuracy SGM - tuned vanilla"]
    assert acc["value"] == pytest.approx(-0.005) and acc["met"]  # within 1 point
    reach = got["SGM updates to joint's old-class accuracy / joint's updates"]
    assert reach["value"] == pytest.approx(0.3) and reach["met"]
    worse = {**summary, "sgm": {"max_drop": 0.1, "final_acc": 0.78, "updates_to_joint_old": 50}}
    assert not any(t["met"] for t in report.targets("s", {**block, "summary": worse}))
    empty = report.targets("s", {"summary": {}, "joint_updates": float("nan")})
    assert not any(np.isfinite(t["value"]) or t["met"] for t in empty)


def test_lr_grid_grows_until_the_best_rate_is_inside():
    arms = _bench("_stability_arms")
    acc = {3.33e-4: 0.5, 1e-3: 0.6, 3e-3: 0.7, 9e-3: 0.65}
    ran: dict[float, dict] = {}

    def result_of(lr):
        return ran.get(lr)

    assert arms.lr_search(result_of, [1e-3, 3e-3], extend=2) == ([1e-3, 3e-3], None, False)
    ran |= {lr: {"val_acc": acc[lr]} for lr in (1e-3, 3e-3)}
    # best at the top edge: one more rate at the edge's ratio (3), not chosen until it ran
    assert arms.lr_search(result_of, [1e-3, 3e-3], extend=2) == ([1e-3, 3e-3, 9e-3], None, False)
    ran[9e-3] = {"val_acc": acc[9e-3]}
    assert arms.lr_search(result_of, [1e-3, 3e-3], extend=2) == ([1e-3, 3e-3, 9e-3], 3e-3, True)
    # no room to grow: the edge is chosen and reported as not bracketed
    assert arms.lr_search(result_of, [1e-3, 3e-3], extend=0) == ([1e-3, 3e-3], 3e-3, False)
    ran = {lr: {"val_acc": 0.5} for lr in acc}  # ties go to the smaller rate, so down it grows
    assert arms.lr_search(result_of, [1e-3, 3e-3], extend=1) == (
        [3.33e-4, 1e-3, 3e-3],
        3.33e-4,
        False,
    )


def test_plan_selects_on_an_unreported_seed_and_names_every_arms_optimiser(tmp_path):
    bench = _bench("stability_gap")
    args = bench.parse(["--quick", "--out", str(tmp_path), "--scenarios", "medmnist-cross3"])
    tasks = bench.plan(args, {})
    arms = [t for t in tasks if t["kind"] == "arm"]
    # before any result: only the selection grids, all on the selection seed
    assert arms and {t["seed"] for t in arms} == {args.selection_seed}
    assert all(t["select"] for t in arms)  # validation accuracy only: no curves to report
    assert {t["variant"] for t in arms} == {"vanilla-authors", "vanilla-tuned", "sgm"}
    by = {t["variant"]: t["options"] for t in arms}
    assert by["vanilla-authors"]["optimizer"] == "adamw_constant"
    assert by["vanilla-tuned"]["layer_decay"] == 0.9 and by["sgm"]["layer_decay"] == 1.0
    done = {t["id"]: {"val_acc": t["lr"]} for t in arms}  # the largest rate wins
    later = [t for t in bench.plan(args, done) if t["kind"] == "arm" and t["id"] not in done]
    assert {t["seed"] for t in later} == set(args.seeds) and not any(t["select"] for t in later)
    assert {t["lr"] for t in later} == {max(args.lrs)}
    ablations = [
        t for t in later if t["variant"] not in {"vanilla-authors", "vanilla-tuned", "sgm"}
    ]
    assert ablations and {t["seed"] for t in ablations} == {args.seeds[0]}
    q0 = next(t for t in ablations if t["variant"] == "sgm-init-q0")
    assert q0["options"]["init_quantile"] == 0.0 and q0["strategy"] == "sgm"


def test_benchmark_refuses_to_report_the_selection_seed(capsys):
    bench = _bench("stability_gap")
    with pytest.raises(SystemExit) as e:
        bench.parse(["--selection-seed", "1", "--seeds", "0", "1", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--selection-seed 1 is among --seeds" in err


@pytest.mark.parametrize("flag", ["--eval-every", "--updates", "--eval-samples"])
def test_benchmark_rejects_non_positive_budgets(flag, capsys):
    bench = _bench("stability_gap")
    with pytest.raises(SystemExit) as e:
        bench.parse([flag, "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err
