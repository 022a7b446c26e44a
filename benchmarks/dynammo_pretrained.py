"""DynaMMo on a pretrained backbone against ACL, replay, no-adapters, TIES, DER, fine-tune, joint:
issue 22's fair table.

**What it measures.** On ``medmnist-cross3`` (PneumoniaMNIST → BreastMNIST → RetinaMNIST) and
``pneumonia-sites`` (PneumoniaMNIST over 4 simulated sites), every arm runs through
:func:`medcl.engine.run.run` with ``configs/medmnist-cross3-dynammo.yaml``'s recipe: ImageNet
EfficientNet-Lite0 (offline weights), batch 64, SGD (momentum 0.9, wd 5e-4), cosine lr, light
augmentation, memory 200 (herding), DynaMMo's stage-1 head_lr 0.004 and stage 2 as configured.
Adapter methods (DynaMMo mean / TIES, ACL, no-adapters = DynaMMo with ``use_adapters: false``)
freeze the backbone from experience 0 on; replay, DER, fine-tune and joint train all of it.
Per (stream, method): ACC, final accuracy, forgetting, validation accuracy, the epochs each
experience ran and kept, the deployable model's parameters and MACs **measured on the trained
run** (restored from its final checkpoint), the worst stage-1 loss ratio, train and wall seconds;
paired differences over seeds (DynaMMo − ACL, − replay, − no-adapters, 95 % CI) and targets that
can fail (``benchmarks/_dynammo_table.py``).

**Budget rule** (every method): ``train.epochs = --cap`` (8) with
``train.early_stopping_patience = --patience`` (2): an experience stops after that many epochs
without a better mean validation accuracy on the seen experiences and keeps its best epoch; the
cosine schedule spans the cap. Caveat (``medcl/engine/early_stopping.py``): the score is the
prediction before consolidation, so from DynaMMo's second experience on a new adapter set is
judged through its head until it is merged.

**Resolution path**: every dataset is upsampled from its 28-px file to 64 px
(``scenario.native_size: false``). The earlier set-up (BreastMNIST from its native 64-px file,
the others upsampled: the resolution tells the router the dataset) is one labelled extra row,
``dynammo-mean-native64`` (cross3, the reported seeds, the adapters' chosen lr).

**Selection**: on the validation splits only (mean over experiences of the final model's
accuracy), by the selection seed 100, never reported: the adapters' lr by DynaMMo-mean from
``--adapter-grid`` (0.01 0.03 0.1: brackets the paper's 0.01 and the recipe's 0.05,
``benchmarks/results/dynammo_recipe.md``), the full network's by replay from ``--full-grid``
(0.003 0.01 0.03); each grid widens ×3 where the best value sits at an edge (``choose_from_grid``,
at most ``--widenings`` times, 3: on cross3 the adapters' best moved 0.1 → 0.3 → 0.9 and 2.7
bracketed it). A run whose loss becomes non-finite is recorded as diverged (scored -inf).
Caveat: early stopping keeps each experience's best epoch on the same validation splits, so the
score may favour a setting whose epochs scatter more (a larger lr), though it is the final
model's after consolidation, not that maximum itself.

**Cost** (an estimate at the cap, i.e. an upper bound on training; throughputs measured on this
2-core CPU at 2 threads: 64-px EfficientNet-Lite0 trains ~220 img/s with a frozen backbone
(adapters), ~140 img/s in full). cross3 trains on 4708 + 546 + 1080 images, pneumonia-sites on
PneumoniaMNIST's 4708 split over 4 sites (1177 each); adapter arms join the 200 memory images to
each experience after the first, replay and DER add a replay batch to every batch, joint trains
on every earlier experience again. Minutes per seed at the cap, cross3: DynaMMo / TIES / ACL ~4
each, no-adapters ~1.5 (no backward through the backbone), fine-tune ~6, replay ~8, DER ~10, joint
~16: ~53 min; pneumonia-sites: adapters ~3 each, no-adapters ~1, fine-tune ~4.5, replay ~8, DER
~12, joint ~11: ~47 min. Selection (3 DynaMMo + 3 replay runs; ~4-8 min more per widening) ~35
min per stream; the extra row ~12 min. Whole plan ~6.3 h of training at the cap (cross3 ~3.4 h,
pneumonia-sites ~2.9 h), ~10-20 % more for evaluation, stage 2, herding and read-back; early
stopping ends most experiences before the cap. Each row records its wall seconds.

**Splitting it** (resumable: a finished run is read back from ``--work``, default
``runs/dynammo_pretrained``; its directory name carries a hash of its settings, so a changed
setting is a new run, and an interrupted run resumes after its last finished experience). On
this 2-core machine run one process (two share the cores and gain nothing); split over sessions
instead: a stopped call loses at most the experience in progress. Over several machines or GPUs:
processes must not share a run, so run ``--select-only`` per stream first, then split by
``--scenarios`` / ``--methods`` / ``--seeds`` with ``--no-write`` (the same ``--work``, e.g. a
shared folder), and write the table with a last ``--report-only`` call (nothing trained; arms with
fewer seeds than asked are marked). ``--device cuda`` trains on a GPU (``train.device``; bf16
autocast there, so GPU and CPU numbers are not bit-equal: each row records its device); a run
finished on one device is read back on the other (an unfinished one resumes only on its own:
``train.device`` is part of its saved config). ``--threads`` sets every run's torch CPU threads.

    nice python benchmarks/dynammo_pretrained.py [--scenarios ...] [--methods ...] [--seeds 0 1 2]
        [--cap 8] [--patience 2] [--device cpu|cuda] [--threads 2] [--select-only | --report-only]
    python benchmarks/dynammo_pretrained.py --quick [--out DIR]  # smoke: synthetic, test_resnet
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    REPORTED_SEEDS,
    RESULTS,
    SELECTION_SEED,
    SMOKE_SCENARIO,
    choose_from_grid,
    data_root,
    write_results,
)
from _dynammo_table import (
    KEY,
    METHODS,
    NATIVE,
    SELECT_WITH,
    differences,
    report,
    row,
    summarise,
    targets,
)

from medcl.config import RunConfig, read_yaml, validate_config
from medcl.engine.evaluate import evaluate
from medcl.engine.resume import restore_run
from medcl.engine.run import run
from medcl.engine.threads import first_environment
from medcl.metrics.compute import count_macs, count_parameters

RECIPE = REPO / "configs" / "medmnist-cross3-dynammo.yaml"
BACKBONE, SIZE = "tf_efficientnet_lite0", 64
STREAMS = ["medmnist-cross3", "pneumonia-sites"]
SMOKE = "synthetic-ci"
COMMAND = "benchmarks/dynammo_pretrained.py"


class NotRun(Exception):
    """A run the plan needs has not been trained (``--report-only``)."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--scenarios", nargs="+", default=STREAMS, choices=STREAMS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(REPORTED_SEEDS))
    p.add_argument("--cap", type=int, default=8, help="train.epochs: most epochs per experience")
    p.add_argument("--patience", type=int, default=2, help="train.early_stopping_patience")
    p.add_argument("--adapter-grid", nargs="+", type=float, default=[0.01, 0.03, 0.1])
    p.add_argument("--full-grid", nargs="+", type=float, default=[0.003, 0.01, 0.03])
    p.add_argument("--widenings", type=int, default=3, help="x3 widenings of a grid at an edge")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="train.device")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of every run")
    p.add_argument("--root", help="MedMNIST folder (default: $MEDCL_DATA_ROOT)")
    p.add_argument("--work", type=Path, default=None, help="run directories (read back)")
    p.add_argument("--out", type=Path, default=None, help="folder for dynammo_pretrained.*")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--select-only", action="store_true", help="only the lr selection runs")
    what.add_argument("--report-only", action="store_true", help="train nothing; write the table")
    what.add_argument("--no-write", action="store_true", help="train only (parallel parts)")
    p.add_argument("--quick", action="store_true", help="smoke run: synthetic stream, tiny net")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if SELECTION_SEED in args.seeds:
        p.error(f"--seeds must not include the selection seed {SELECTION_SEED} (never reported)")
    if args.cap < 1 or args.patience < 1 or args.threads < 1 or args.widenings < 0:
        p.error("--cap, --patience and --threads must be >= 1 and --widenings >= 0")
    if min(args.adapter_grid + args.full_grid) <= 0:
        p.error("learning rates must be > 0")
    if args.quick:  # two epochs at most, a two-value grid, no widening, one seed, a temp --out
        args.cap, args.patience, args.widenings = 2, 1, 0
        args.adapter_grid = args.full_grid = [0.01, 0.05]
        args.seeds, args.scenarios = args.seeds[:1], [SMOKE]
        args.methods = [m for m in args.methods if m not in NATIVE]
        if args.out is None:
            args.out = Path(tempfile.mkdtemp(prefix="dynammo_pretrained-quick-"))
    args.out = args.out or RESULTS
    args.work = args.work or (
        args.out / "runs" if args.quick else REPO / "runs" / "dynammo_pretrained"
    )
    args.root = str(data_root(args.root))
    return args


def make_config(args, sc: str, label: str, lr: float, seed: int) -> RunConfig:
    """The recipe's config with this arm's strategy, stream, lr, seed and the budget rule."""
    raw = copy.deepcopy(read_yaml(RECIPE))
    name, options, family = METHODS[label]
    if family == "adapters":
        strategy = {**raw["strategy"], "name": name, **options}
        if name == "acl":  # ACL is DynaMMo without the merge
            strategy = {k: v for k, v in strategy.items() if k not in ("merge", "ties_density")}
        if args.quick:  # no pretrained weights: freeze the random backbone as built (smoke only)
            strategy["backbone_init"] = "checkpoint"
    else:
        strategy = {"name": name, **options}
    raw["scenario"] = (
        dict(SMOKE_SCENARIO)
        if args.quick
        else {"name": sc, "image_size": SIZE, "native_size": label in NATIVE}
    )
    if args.quick:
        raw["model"] = {"backbone": "test_resnet", "pretrained": False, "small_input": True}
        raw["memory"] = {"size": 40, "selection": "herding"}
    raw["train"] |= {
        "epochs": args.cap,
        "early_stopping_patience": args.patience,
        "lr": lr,
        "eval_every": 0,  # no curves: they cost evaluations and the table does not use them
        "num_threads": args.threads,
        "device": args.device,
    }
    raw |= {"strategy": strategy, "seed": seed, "output_dir": str(args.work)}
    raw["data"] = {"root": args.root}
    cfg = validate_config(raw, source=f"{COMMAND} ({label})")
    # the directory names the settings: a changed one is a new run; device, threads and paths
    # decide where and how fast it runs, not what it is (rows record the device)
    skip = {"name": True, "output_dir": True, "data": {"root"}, "train": {"num_threads", "device"}}
    digest = hashlib.sha1(cfg.model_dump_json(exclude=skip).encode()).hexdigest()[:8]
    return cfg.model_copy(update={"name": f"{sc}-{label}-lr{lr:g}-s{seed}-{digest}"})


def measure(run_dir: Path, wall: float) -> dict[str, Any]:
    """Read a finished run back: validation accuracy of the final model and its deployable
    model's parameters and MACs (restored from the final checkpoint: the trained model)."""
    start = time.perf_counter()
    _, scenario, strategy, _, _ = restore_run(run_dir, command=COMMAND)
    strategy.eval()
    val = [e.accuracy for e in evaluate(strategy, scenario.experiences, split="val", quiet=True)]
    model = strategy.deployable_model()
    shape = tuple(scenario.input_shape)
    return {
        "val_accuracy": val,
        "deployable": {"parameters": count_parameters(model), "macs": count_macs(model, shape)},
        "device": str(next(strategy.parameters()).device.type),
        "threads": (first_environment(run_dir) or {}).get("threads"),
        "seconds": time.perf_counter() - start,
        "run_seconds": wall,
    }


def obtain(args, sc: str, label: str, lr: float, seed: int) -> dict[str, Any]:
    """The row of one run: read back when finished, else trained (``NotRun`` with
    ``--report-only``). A run whose loss became non-finite is kept as diverged."""
    cfg = make_config(args, sc, label, lr, seed)
    run_dir = args.work / cfg.run_name
    bench = run_dir / "bench.json"
    meta = {"scenario": sc, "method": label, "seed": seed, "lr": lr}
    if not bench.is_file():
        if args.report_only:
            raise NotRun(cfg.run_name)
        start = time.perf_counter()
        try:
            run(cfg, resume=True, quiet=args.quiet)
            record = measure(run_dir, time.perf_counter() - start)
        except FloatingPointError as e:  # deterministic: retrying would diverge again
            record = {"diverged": str(e), "device": args.device, "seconds": 0.0}
        bench.write_text(json.dumps(record))
    out = row(run_dir, **meta)
    if not args.quiet:
        print(f"== {cfg.run_name}: ACC {out['average_accuracy']:.1f}, val "
              f"{out['val_accuracy']:.1f}, epochs {out['epochs']}", flush=True)  # fmt: skip
    return out


def select(args, sc: str, family: str) -> dict[str, Any]:
    """The family's lr on ``sc``: best mean validation accuracy of its picking arm, selection
    seed, grid widened at an edge. ``chosen`` is None when a run is missing (``--report-only``)."""
    grid = args.adapter_grid if family == "adapters" else args.full_grid

    def val(lr: float) -> float:
        r = obtain(args, sc, SELECT_WITH[family], lr, SELECTION_SEED)
        return float("-inf") if r["diverged"] else r["val_accuracy"]

    try:
        return choose_from_grid(val, grid, key="val_accuracy", widenings=args.widenings)
    except NotRun as e:
        print(f"   not run yet: {e} (lr of {sc}/{family} unknown)", flush=True)
        return {"chosen": None, "grid": sorted(grid), "missing": str(e)}


def plan(args) -> list[tuple[str, str, int]]:
    """``(stream, method, seed)`` in run order: the key comparisons on every stream first, then
    the other arms, then the extra row."""
    tiers = [
        [m for m in args.methods if m in KEY],
        [m for m in args.methods if m not in KEY and m not in NATIVE],
        [m for m in args.methods if m in NATIVE],
    ]
    return [
        (sc, m, seed)
        for tier in tiers
        for sc in args.scenarios
        for m in tier
        if NATIVE.get(m, sc) == sc
        for seed in args.seeds
    ]


def main(argv: list[str] | None = None) -> Path | None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    args.work.mkdir(parents=True, exist_ok=True)
    lrs: dict[str, dict[str, Any]] = {}

    def lr_of(sc: str, family: str) -> float | None:
        if f"{sc}/{family}" not in lrs:  # selected the first time a stream's family is needed
            lrs[f"{sc}/{family}"] = select(args, sc, family)
        return lrs[f"{sc}/{family}"]["chosen"]

    if args.select_only:
        for sc in args.scenarios:
            for family in SELECT_WITH:
                lr_of(sc, family)
        return None
    rows, missing = [], []
    for sc, label, seed in plan(args):
        lr = lr_of(sc, METHODS[label][2])
        if lr is None:
            missing.append(f"{sc}-{label}-s{seed} (its lr is not selected yet)")
            continue
        try:
            rows.append(obtain(args, sc, label, lr, seed))
        except NotRun as e:
            missing.append(str(e))
            print(f"   not run yet: {e}", flush=True)
    if args.no_write:
        return None
    for sc in args.scenarios:  # the selection of every family, even without an arm of it
        for family in SELECT_WITH:
            lr_of(sc, family)
    summary = summarise(rows, args.scenarios, args.seeds)
    diffs = differences(rows, args.scenarios)
    tg = targets(rows, diffs, lrs, args.scenarios)
    backbone = "test_resnet" if args.quick else BACKBONE
    missing += [v["missing"] for v in lrs.values() if v.get("missing")]
    md = report(args, summary, diffs, tg, lrs, rows, backbone, 16 if args.quick else SIZE, missing)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"config": config, "learning_rates": lrs, "rows": rows, "summary": summary,
               "paired_differences": diffs, "targets": tg, "missing_runs": missing}  # fmt: skip
    path = write_results("dynammo_pretrained", payload, md, out=args.out)
    if not args.quiet:
        print(md, f"\nwritten: {path}", sep="\n")
    return path


if __name__ == "__main__":
    main()
