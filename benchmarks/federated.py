"""Federated vs centralised continual learning, bytes per round, and a killed site (issue 27).

Streams (``configs/federated-pneumonia-sites-replay.yaml``: EfficientNet-Lite0, ImageNet
weights, 64 px, replay, a 200-image memory per hospital):

- **pneumonia-sites as four hospitals, one acquisition site each** (``partition: experience``:
  hospital i holds site i's cohort and joins with it; the others rehearse their own memory);
- **pneumonia-sites as three hospitals, every site shared** (``partition: split``: each
  acquisition site's cohort arrives at all three hospitals, a class-stratified third each);
- **medmnist-cross3 as three hospitals, one dataset each** (pneumonia, breast, retina).

Arms, seeds 0, 1, 2 (every arm uses the config's local lr 0.01, not tuned, the same for all):

- **centralised**: ``medcl run`` of the same config without ``federation``, ``train.epochs =
  rounds x local epochs`` (2), all images in one place, one 200-image memory;
- **federated**: ``federation.rounds = 2`` rounds of FedAvg per experience, one local epoch each,
  on Flower's simulation engine (Ray; a deployment run costs a process per message, measured in
  the kill check below); each hospital keeps its own memory and rehearses it when it has no new
  cohort. Updates are counted and reported for both arms (summed over hospitals).
- **federated-local** (every stream): the federated arm with ``federation.batchnorm: local``
  (SiloBN, Andreux et al. 2020, arXiv:2008.07424): each hospital scores, herds and calibrates
  the global weights with BatchNorm statistics re-estimated on its own rows, which never leave
  it; every batch a hospital trains on comes from that hospital, so averaged statistics match
  none of them (``docs/federated.md``).
- **fedavgm / fedavgm-local** (the two pneumonia-sites streams): FedAvgM's server step (Hsu et
  al. 2019, arXiv:1909.06335; ``federation.server_lr``): the mean of K hospitals' updates moves
  the global model about as far as one hospital's share of the cohort would, so plain FedAvg
  under-trains at equal total updates.
- **fednova-local** (one cohort per hospital: the first and third streams): FedNova (Wang et
  al. 2020, arXiv:2007.07481; ``federation.aggregation: fednova``): the hospital holding the new
  cohort takes an epoch of it, the others an epoch of their memory (about 19 steps against 4),
  and FedNova divides each update by its steps so that the rehearsing hospitals count by their
  images, not less.

Selection, on the validation splits (the final model's mean over the experiences of
``--select-by``'s score, averaged over seeds 100 and 101, never reported), pneumonia-sites only.
``balanced`` (the default: recall averaged over the classes present, scikit-learn's balanced
accuracy; ``pooled_val_balanced``) or ``accuracy``: PneumoniaMNIST's validation split has the
training split's class balance (74.2 % pneumonia), its test split another (62.5 %), so
validation accuracy rewards leaning to the majority class and balanced accuracy does not; nor
is a new cohort's class balance known in deployment. Both scores are kept in
every selection record; the page names the one chosen on.

- the **local learning-rate schedule** (``train.scheduler``): ``cosine`` (the config's: decayed
  to 0 over each fit, i.e. each central experience, each federated round) or ``none`` (constant;
  McMahan et al. 2017's clients). A site's rounds hold few updates (one local epoch over its
  share), so a cosine restarted every round halves the distance its weights travel. The
  centralised run's schedule is chosen on its own validation score;
- per stream, FedAvg's schedule and BatchNorm statistics together (server lr 1, the 2 x 2 grid);
- then the server learning rate at them, from 1 (= FedAvg), 2, 4, widened x3 where the best is
  at an edge (an arm whose chosen rate is 1 is the FedAvg arm itself);
- one site per hospital: FedNova at that schedule and those statistics, against that FedAvg(M)
  (medmnist-cross3 reports FedNova with local statistics, unselected).
  The targets use the selected arm; FedAvg with either statistics stays beside it.

medmnist-cross3 runs every arm at the config's cosine (no selection: its gap is the
class-incremental collapse of the shared head, ``docs/federated.md``).

Reported: the final global model's accuracy on each experience's test rows (pooled over the
hospitals that hold them) and its mean, paired federated - centralised differences over the
seeds with a 95 % t interval, updates, wall time. **Bytes per round**: full-model FedAvg
(replay above) against adapter-only DynaMMo (``configs/pneumonia-sites-dynammo.yaml`` as four
hospitals, seed 0, two updates per round: the tensors that travel do not depend on the seed or
on how long a site trains), both per training round and per site message, at the reference
adapter width (1.0, the target's) and at ``adapter_width`` 0.5 and 0.25, each on its own line
(``benchmarks/_federated_bytes.py``).
**Killed site**: a deployment run (SuperLink + three SuperNodes as processes, tiny synthetic
model) whose SuperNode ``site-1`` is killed (SIGKILL) in its first round and restarted at once
(a new node id); the round completes without it, the run must complete and every site's
accuracy row of the final experience be present.

    MEDCL_DATA_ROOT=../shared/data/medmnist python benchmarks/federated.py [--quiet]
        [--select-by accuracy|balanced] [--out DIR]

Writes benchmarks/results/federated.{json,md}. Runs live in ``--work-dir`` (default
``runs/bench-federated``); finished runs are read back, so an interrupted benchmark continues.
Run alone (2-core CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    SELECTION_SEEDS,
    choose_from_grid,
    data_root,
    paired_difference,
    write_results,
)
from _federated_bytes import bytes_targets, dynammo_bytes, ratios
from _federated_kill import kill_check
from _federated_report import arm_name, render
from _federated_runs import arm_run, central_run, federated_run
from _federated_stats import statistics_ablation

STREAMS = {
    "pneumonia-sites (4 hospitals, one site each)": {},
    "pneumonia-sites (3 hospitals, every site shared)": {
        "federation": {"sites": ["hospital-a", "hospital-b", "hospital-c"], "partition": "split"},
        "name": "pneumonia-sites-split",  # its own federated runs; the central ones are shared
    },
    "medmnist-cross3 (3 hospitals, one dataset each)": {
        "scenario": {"name": "medmnist-cross3", "image_size": 64},
        "federation": {"sites": ["hospital-a", "hospital-b", "hospital-c"]},
    },
}
SEEDS = (0, 1, 2)
SERVER_LR_GRID = [1.0, 2.0, 4.0]  # widened x3 where the best sits at an edge
BATCHNORM = ("mean", "local")  # federation.batchnorm: averaged, or each site's own (SiloBN)
SCHEDULERS = ("cosine", "none")  # train.scheduler: the config's, or a constant local lr
FEDAVGM = ("pneumonia-sites (4 hospitals, one site each)",
           "pneumonia-sites (3 hospitals, every site shared)")  # fmt: skip
FEDNOVA = ("pneumonia-sites (4 hospitals, one site each)",  # sites' local steps differ
           "medmnist-cross3 (3 hospitals, one dataset each)")  # fmt: skip
GAP_GOAL = 2.0


#: selection criterion -> the federated run's pooled validation row, the central run's score
CRITERIA = {"accuracy": ("final_val", "val"), "balanced": ("final_val_balanced", "val_balanced")}


def _val_of(run: dict[str, Any], what: str, by: str, strict: bool = True) -> float:
    """A federated run's mean validation score (``by``: accuracy or balanced accuracy) of the
    final global model (pooled over the hospitals); NaN, unless ``strict``, when the run did not
    record it (a run from before ``pooled_val_balanced``)."""
    val = np.array(run.get(CRITERIA[by][0]) or [], dtype=float)
    if not np.isfinite(val).any():  # a choice among NaNs would be arbitrary
        if not strict:
            return float("nan")
        score = "balanced accuracy" if by == "balanced" else "accuracy"
        raise SystemExit(f"{what}: the run recorded no validation {score}; run it again")
    return float(np.nanmean(val))


def _both(runs: list[dict[str, Any]], what: str, by: str) -> dict[str, float]:
    """Both criteria, each averaged over the selection seeds' runs (only ``by`` must exist)."""
    return {b: float(np.mean([_val_of(r, what, b, b == by) for r in runs])) for b in CRITERIA}


def _select_recipe(extra, root, work, quiet, by) -> dict[str, Any]:
    """``train.scheduler`` and ``federation.batchnorm`` of FedAvg (server lr 1) with the best
    mean validation score (``by``) of the final global model averaged over the selection
    seeds."""
    scores: dict[str, dict[str, float]] = {b: {} for b in CRITERIA}
    seconds = []
    for scheduler in SCHEDULERS:
        for bn in BATCHNORM:
            if not quiet:
                print(f"  selection: scheduler {scheduler}, batchnorm {bn}", flush=True)
            runs = [
                arm_run(extra, 1.0, bn, seed, root, work / "selection", quiet, scheduler)
                for seed in SELECTION_SEEDS
            ]
            for b, v in _both(runs, f"scheduler {scheduler}, batchnorm {bn}", by).items():
                scores[b][f"{scheduler}/{bn}"] = v
            seconds += [r["seconds"] for r in runs]
    best = max(scores[by], key=scores[by].__getitem__)
    scheduler, bn = best.split("/")
    return {"scheduler": scheduler, "batchnorm": bn, "val": scores, "seconds": seconds}


def _select_server_lr(extra, batchnorm: str, scheduler: str, root, work, quiet, by):
    """FedAvgM's server learning rate with the best mean validation score (``by``) of the final
    global model (pooled over hospitals), averaged over the selection seeds (1.0 is plain
    FedAvg), for the chosen ``federation.batchnorm`` and ``train.scheduler``."""
    seconds, both = [], {}

    def score(lr: float) -> float:
        if not quiet:
            print(f"  selection: server_lr {lr:g}, {scheduler}, {batchnorm}", flush=True)
        runs = [
            arm_run(extra, lr, batchnorm, seed, root, work / "selection", quiet, scheduler)
            for seed in SELECTION_SEEDS
        ]
        seconds.extend(r["seconds"] for r in runs)
        both[lr] = _both(runs, f"server_lr {lr:g}", by)
        return both[lr][by]

    got = choose_from_grid(score, SERVER_LR_GRID, key="score")
    val = {b: {lr: both[lr][b] for lr in got["grid"]} for b in CRITERIA}
    return {k: v for k, v in got.items() if k != "score"} | {"val": val, "seconds": seconds}


def _select_fednova(extra, batchnorm: str, scheduler: str, against, root, work, quiet, by):
    """FedNova's mean validation scores at the selection seeds, at the chosen
    ``federation.batchnorm`` and ``train.scheduler``, beside ``against`` (the chosen
    FedAvg(M)'s, per criterion)."""
    if not quiet:
        print(f"  selection: fednova, {scheduler}, {batchnorm}", flush=True)
    runs = [
        arm_run(extra, 1.0, batchnorm, seed, root, work / "selection", quiet, scheduler, True)
        for seed in SELECTION_SEEDS
    ]
    return {"val": _both(runs, "fednova", by), "against": against,
            "seconds": [r["seconds"] for r in runs]}  # fmt: skip


def _select_central(extra, root, work, quiet, by) -> dict[str, Any]:
    """The centralised run's ``train.scheduler``: the best mean validation score (``by``) of its
    final model averaged over the selection seeds."""
    runs = {
        s: [
            central_run(extra, seed, root, work / "selection", quiet, s, val=True)
            for seed in SELECTION_SEEDS
        ]
        for s in SCHEDULERS
    }
    val = {b: {s: float(np.mean([r[CRITERIA[b][1]] for r in rs])) for s, rs in runs.items()}
           for b in CRITERIA}  # fmt: skip
    return {
        "scheduler": max(val[by], key=val[by].__getitem__),
        "val": val,
        "seconds": [r["seconds"] for rs in runs.values() for r in rs],
    }


def _val(selection: dict[str, Any]) -> dict[str, float]:
    """The validation scores (per criterion) of a selection's chosen value."""
    return {b: v[selection["chosen"]] for b, v in selection["val"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench-federated"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--select-by", choices=tuple(CRITERIA), default="balanced",
                        help="validation score every choice is made on (mean over experiences "
                        "of accuracy, or of recall averaged over classes)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="folder for federated.{json,md}")
    args = parser.parse_args()
    by = args.select_by
    root, work = data_root(args.root), Path(args.work_dir)
    begin = time.perf_counter()
    streams: dict[str, Any] = {}
    central = _select_central(STREAMS[FEDAVGM[0]], root, work, args.quiet, by)
    for name, extra in STREAMS.items():
        recipe = _select_recipe(extra, root, work, args.quiet, by) if name in FEDAVGM else None
        sched, c_sched = (recipe["scheduler"], central["scheduler"]) if recipe else ("cosine",) * 2
        chosen = (
            {recipe["batchnorm"]: _select_server_lr(
                extra, recipe["batchnorm"], sched, root, work, args.quiet, by)}
            if recipe
            else {}
        )  # fmt: skip
        best = max(chosen, key=lambda bn: _val(chosen[bn])[by], default=None)
        selected = None if best is None else (chosen[best]["chosen"], best, False)
        nova = None
        if name in FEDNOVA and recipe:
            against = _val(chosen[best])
            nova = _select_fednova(extra, best, sched, against, root, work, args.quiet, by)
            if nova["val"][by] > nova["against"][by]:
                selected = (1.0, best, True)
        # FedAvg, FedAvg + SiloBN, the chosen server lr, FedNova
        configs = dict.fromkeys([(1.0, "mean", False), (1.0, "local", False)])
        configs |= dict.fromkeys((c["chosen"], bn, False) for bn, c in chosen.items())
        configs |= dict.fromkeys([(1.0, best or "local", True)] if name in FEDNOVA else [])
        arms: dict[str, list] = {"central": []} | {arm_name(*c): [] for c in configs}
        for seed in SEEDS:
            if not args.quiet:
                print(f"{name}, seed {seed}: centralised, then {', '.join(arms)}", flush=True)
            arms["central"].append(central_run(extra, seed, root, work, args.quiet, c_sched))
            for lr, bn, fednova in configs:
                run_ = arm_run(extra, lr, bn, seed, root, work, args.quiet, sched, fednova)
                arms[arm_name(lr, bn, fednova)].append(run_)
        mean = {a: [float(np.nanmean(r["final"])) for r in runs] for a, runs in arms.items()}
        streams[name] = {
            "scheduler": {"central": c_sched, "federated": sched},
            "recipe": recipe,
            "runs": arms,
            "final_mean": {
                a: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))}
                for a, v in mean.items()
            },
            "per_site": {
                a: np.mean([r["final"] for r in runs], axis=0).tolist() for a, runs in arms.items()
            },
            "per_site_learned": {
                a: np.mean([r["learned"] for r in runs], axis=0).tolist()
                for a, runs in arms.items()
            },
            "differences": {
                a: paired_difference(mean[a], mean["central"]) for a in arms if a != "central"
            },
            "server_lr": chosen,  # batchnorm -> the selection record
            "fednova": nova,
            "selected_arm": None if selected is None else arm_name(*selected),
            "cpu": sorted({c for runs in arms.values() for r in runs for c in r["cpu"]}),
        }
    ablations = {  # the statistics a hospital without the final cohort scores with
        name: statistics_ablation([r["run_dir"] for r in s["runs"]["federated-local"]])
        for name, s in streams.items()
    }
    pneumonia, shared = list(STREAMS)[:2]
    dyn = dynammo_bytes(federated_run, root, work, args.quiet)  # adapter width -> run
    full = streams[pneumonia]["runs"]["federated"][0]
    ratio = ratios(full, dyn)  # adapter width -> full-model / adapter-only bytes
    kill = kill_check(work, args.quiet)
    picked = {k: streams[k]["selected_arm"] for k in (pneumonia, shared)}
    gaps = {k: streams[k]["differences"][a]["mean"] * 100 for k, a in picked.items()}
    targets = [
        {
            "name": f"federated ({picked[k]}: local lr schedule, BatchNorm statistics, "
            f"server lr and aggregation chosen on validation) - centralised final accuracy (its "
            f"own schedule chosen on validation), {k} (points, mean over 3 seeds)",
            "value": round(g, 2),
            "goal": f"abs(value) <= {GAP_GOAL}",
            "met": abs(g) <= GAP_GOAL,
        }
        for k, g in gaps.items()
    ]
    targets += bytes_targets(full, dyn)  # the reference width, then each narrow width
    targets.append(
        {
            "name": "a SuperNode killed mid-run: run completes, final accuracy rows of every site",
            "value": kill["survived"],
            "goal": True,
            "met": kill["survived"],
        }
    )
    payload = {
        "streams": streams,
        "bytes": {
            "replay_full_model": full,
            "dynammo_adapters": dyn["1"],
            "ratio": ratio["1"],
            "dynammo_adapters_by_width": dyn,
            "ratio_by_width": ratio,
        },
        "kill": kill,
        "batchnorm_statistics": ablations,
        "seeds": list(SEEDS),
        "budget": "per experience: central 2 epochs; federated 2 rounds x 1 local epoch",
        "central_scheduler": central,
        "selection_seeds": list(SELECTION_SEEDS),
        "select_by": by,
        "wall_seconds": time.perf_counter() - begin,
        "targets": targets,
    }
    page = render(payload, streams, full, dyn, kill)
    write_results("federated", payload, page, out=args.out)


if __name__ == "__main__":
    main()
