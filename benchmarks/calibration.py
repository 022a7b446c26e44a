"""Calibration, conformal coverage and saliency sanity of real continual runs (issue 26).

Streams: the README main job (``configs/medmnist-cross3-dynammo.yaml``) and
``configs/pneumonia-sites-dynammo.yaml``, each at seeds 0, 1, 2 exactly as configured (no
hyper-parameter is chosen here: ``alpha = 0.1`` is the issue's, the temperature is fitted by the
run on validation data). For every run the script reads what the run itself wrote:

- the final model's **ECE** on the test split before and after its temperature(s) (15 bins),
  per site and overall, and its accuracy both ways (equal by construction: a check, not a
  target); beside it, the ECE a perfectly calibrated model with the same confidences would show
  on as many rows (the estimator's finite-sample bias), the ECE on the held-out validation rows
  of the final calibration record, and whether ``per_experience: auto`` kept one temperature per
  experience's classes;
- after **every** experience, the **per-site empirical coverage** and mean set size of the
  prediction sets (LAC score, per-(site, class) thresholds: the defaults), on each seen site's
  test rows,
  beside what one pooled threshold would give (the record's marginal ``qhat``) and what
  training-conditional thresholds give (``calibration.confidence: 0.9``, refitted here on the
  same seeded validation rows from each experience's checkpoint);
- on the main job's final model, the **saliency sanity check** (Adebayo et al., 2018): mean
  Spearman rank correlation between Grad-CAM maps of the trained model and of three copies with
  every weight re-initialised, on 30 test images (10 per experience).

Runs live in ``--work-dir`` (default ``runs/bench-calibration``) and are resumed, so an
interrupted benchmark continues where it stopped.

    MEDCL_DATA_ROOT=../shared/data/medmnist python benchmarks/calibration.py [--quiet]

Writes benchmarks/results/calibration.{json,md}. Run alone (2-core CPU: ~10 min).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _calibration_report import ALPHA, CONFIDENCE, SEEDS, markdown, mean_sd, pm
from _common import REPO, data_root, write_results

from medcl.config import load_config
from medcl.engine.device import use_layout
from medcl.engine.layout import RunLayout
from medcl.engine.posthoc import PostHoc, fit_posthoc, read_posthoc
from medcl.engine.resume import restore_run
from medcl.engine.run import run
from medcl.engine.rundir import run_progress
from medcl.metrics.calibration import expected_calibration_error
from medcl.metrics.conformal import ConformalSets
from medcl.metrics.coverage import coverage_table

STREAMS = {
    "medmnist-cross3 (main job)": "configs/medmnist-cross3-dynammo.yaml",
    "pneumonia-sites": "configs/pneumonia-sites-dynammo.yaml",
}
DELTA, ECE_GOAL = 0.03, 0.05
SALIENCY_IMAGES, SALIENCY_GOAL = 32, 0.5


def _train(config: str, seed: int, root: Path, work: Path, quiet: bool) -> Path:
    """Run (or resume, or read back) one configured stream at ``seed``."""
    cfg = load_config(
        REPO / config, overrides=[f"seed={seed}", f"output_dir={work}", f"data.root={root}"]
    )
    return run(cfg, resume=True, quiet=quiet)


def _predictions(run_dir: Path, after: int) -> dict[str, np.ndarray]:
    with np.load(RunLayout(run_dir).predictions_after(after)) as z:
        return {k: z[k] for k in ("probs", "labels", "experience")}


def _ece_if_calibrated(probs: np.ndarray, draws: int = 200, seed: int = 0) -> dict[str, float]:
    """ECE that a perfectly calibrated model with these top-label confidences would show on
    this many rows (each row's top label drawn correct with probability equal to its
    confidence): the binned estimator's finite-sample bias (Roelofs et al., AISTATS 2022). Mean
    and 95th percentile over ``draws``: an observed ECE below the percentile is consistent with
    perfect calibration. Not to be subtracted (a miscalibrated model's ECE is biased less)."""
    rng = np.random.default_rng(seed)
    top, conf = probs.argmax(1), probs.max(1)
    other = (top + 1) % probs.shape[1]  # a wrong label: top-label ECE sees only correctness
    eces = [
        expected_calibration_error(np.where(rng.random(len(conf)) < conf, top, other), probs)[0]
        for _ in range(draws)
    ]
    return {"mean": float(np.mean(eces)), "p95": float(np.quantile(eces, 0.95))}


def _conditional(run_dir: Path, after: int) -> PostHoc:
    """The calibration the run would have written with ``calibration.confidence``: the model
    after ``after`` refitted on the same seeded validation parts (the temperature is the run's)."""
    cfg, scenario, strategy, _, _ = restore_run(run_dir, after, command="benchmarks/calibration.py")
    calibration = cfg.calibration.model_copy(update={"confidence": CONFIDENCE})
    seen = scenario.experiences[: after + 1]
    use_layout(strategy, cfg.train.channels_last, seen[0].train.spatial_dims)  # as the run does
    record = fit_posthoc(strategy.eval(), seen, calibration, seed=cfg.seed)
    return PostHoc.from_record(record)


def _measure(run_dir: Path) -> dict[str, Any]:
    """Final-model ECE before/after per site, and coverage after every experience."""
    progress = run_progress(run_dir)
    names = progress.names
    final = progress.completed
    coverage = []
    for after in range(final + 1):
        post = read_posthoc(run_dir, after)
        p = _predictions(run_dir, after)
        seen = p["experience"] <= after
        probs, labels, exp = p["probs"][seen], p["labels"][seen], p["experience"][seen]
        calibrated = post.calibrate(probs)
        site_sets = post.sets(calibrated, exp)
        fitted, k = post.conformal, calibrated.shape[1]
        one_threshold = {"*": (np.full(k, fitted.qhat), np.full(k, fitted.n))}
        pooled = ConformalSets(ALPHA, "none", fitted.score, fitted.n, one_threshold).sets(
            calibrated
        )
        sites = [names[e] for e in exp]
        per_site = coverage_table(site_sets, labels, sites).set_index("group")
        one = coverage_table(pooled, labels, sites).set_index("group")
        cond = _conditional(run_dir, after)
        cond_sets = cond.sets(cond.calibrate(probs), exp)
        conditional = coverage_table(cond_sets, labels, sites).set_index("group")
        for site in dict.fromkeys(sites):
            coverage.append(
                {
                    "after": after,
                    "site": site,
                    "n": int(per_site.loc[site, "n"]),
                    "coverage": float(per_site.loc[site, "coverage"]),
                    "coverage_low": float(per_site.loc[site, "coverage_low"]),
                    "mean_size": float(per_site.loc[site, "mean_size"]),
                    "pooled_coverage": float(one.loc[site, "coverage"]),
                    "pooled_mean_size": float(one.loc[site, "mean_size"]),
                    "conditional_coverage": float(conditional.loc[site, "coverage"]),
                    "conditional_mean_size": float(conditional.loc[site, "mean_size"]),
                }
            )
    post = read_posthoc(run_dir, final)
    p = _predictions(run_dir, final)
    known = p["labels"] < p["probs"].shape[1]
    probs, labels, exp = p["probs"][known], p["labels"][known], p["experience"][known]
    calibrated = post.calibrate(probs)
    ece = []
    for site in [*dict.fromkeys(names[e] for e in exp), "overall"]:
        m = (
            np.ones(len(exp), bool)
            if site == "overall"
            else np.asarray([names[e] == site for e in exp])
        )
        ece.append(
            {
                "site": site,
                "n": int(m.sum()),
                "ece_before": expected_calibration_error(labels[m], probs[m])[0],
                "ece_after": expected_calibration_error(labels[m], calibrated[m])[0],
                "ece_if_calibrated": _ece_if_calibrated(calibrated[m]),
                "accuracy_before": float((probs[m].argmax(1) == labels[m]).mean()),
                "accuracy_after": float((calibrated[m].argmax(1) == labels[m]).mean()),
            }
        )
    metrics = json.loads(RunLayout(run_dir).metrics.read_text())
    return {
        "run": run_dir.name,
        # the README's figure: the final model's accuracy averaged over the experiences' test sets
        "final_accuracy_mean_over_experiences": float(np.mean(metrics["accuracy_matrix"][-1])),
        "max_loss_ratio": max(f["loss"]["max"] / f["loss"]["first"] for f in metrics["fit"]),
        "temperature": post.temperature,
        "temperatures": [read_posthoc(run_dir, k).temperature for k in range(final + 1)],
        "per_experience_temperatures": post.record.get("temperatures"),
        "temperature_choice": post.record.get("temperature_choice"),
        "held_out": post.record.get("held_out"),  # validation rows the temperature never saw
        "ece": ece,
        "coverage": coverage,
    }


def _saliency(run_dir: Path) -> dict[str, Any]:
    """Adebayo et al. (2018) model-randomisation test on the final model's Grad-CAM maps."""
    from medcl.export.loading import load_run_strategy
    from medcl.models.saliency import grad_cam, model_randomization_check

    scenario, strategy = load_run_strategy(run_dir)
    model = strategy.deployable_model().eval()
    per_exp = max(1, SALIENCY_IMAGES // len(scenario.experiences))
    images = torch.cat([e.test.images[:per_exp] for e in scenario.experiences])
    check = model_randomization_check(grad_cam, model, images, threshold=SALIENCY_GOAL)
    return {
        "images": len(images),
        "rank_correlation": check.correlation,
        "per_copy": list(check.per_copy),
        "passed": check.passed,
    }


def _shift(run_dir: Path) -> list[dict[str, Any]]:
    """Per class, validation vs test coverage of the first model on experience 0: does the test
    split look like the validation data the thresholds were calibrated on (exchangeability)?"""
    from medcl.engine.evaluate import predict_proba
    from medcl.engine.resume import restore_run

    _, scenario, strategy, _, _ = restore_run(run_dir, 0)
    post, exp = read_posthoc(run_dir, 0), scenario.experiences[0]
    rows = []
    for split in ("val", "test"):
        data = getattr(exp, split)
        probs = post.calibrate(predict_proba(strategy, data.images).double().numpy())
        y = data.labels.numpy()
        covered = post.sets(probs, [0] * len(y))[np.arange(len(y)), y]
        for c in np.unique(y):
            rows.append(
                {
                    "experience": exp.name,
                    "split": split,
                    "class": int(c),
                    "share": float((y == c).mean()),
                    "accuracy": float((probs.argmax(1) == y)[y == c].mean()),
                    "coverage": float(covered[y == c].mean()),
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None)
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench-calibration"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    root = data_root(args.root)
    t0 = time.perf_counter()
    streams: dict[str, Any] = {}
    targets, checks, rows, cov_rows = [], [], [], []
    for stream, config in STREAMS.items():
        runs = []
        for seed in SEEDS:
            if not args.quiet:
                print(f"{stream}, seed {seed}", flush=True)
            run_dir = _train(config, seed, root, args.work_dir, args.quiet)
            runs.append({"seed": seed} | _measure(run_dir))
            if stream.endswith("(main job)"):
                runs[-1]["saliency"] = _saliency(run_dir)
                runs[-1]["validation_vs_test"] = _shift(run_dir)
        overall = [next(e for e in r["ece"] if e["site"] == "overall") for r in runs]
        before = mean_sd([e["ece_before"] for e in overall])
        after = mean_sd([e["ece_after"] for e in overall])
        streams[stream] = {"config": config, "runs": runs}
        targets.append(
            {
                "name": f"{stream}: final-model test ECE after temperature scaling (mean of 3 seeds)",
                "value": after[0],
                "goal": f"<= {ECE_GOAL}",
                "met": after[0] <= ECE_GOAL,
            }
        )
        same = all(e["accuracy_before"] == e["accuracy_after"] for r in runs for e in r["ece"])
        checks.append({"name": f"{stream}: accuracy unchanged by the temperature", "met": same})
        # per-site coverage after every experience: mean over seeds of each (after, site)
        cells: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for r in runs:
            for c in r["coverage"]:
                cells.setdefault((c["after"], c["site"]), []).append(c)
        worst = min(np.mean([c["coverage"] for c in v]) for v in cells.values())
        worst_single = min(c["coverage"] for v in cells.values() for c in v)
        targets.append(
            {
                "name": f"{stream}: lowest per-site test coverage after any experience "
                "(mean of 3 seeds), alpha 0.1",
                "value": worst,
                "goal": f">= {1 - ALPHA - DELTA:.2f}",
                "met": worst >= 1 - ALPHA - DELTA,
            }
        )
        worst_cond = min(np.mean([c["conditional_coverage"] for c in v]) for v in cells.values())
        targets.append(
            {
                "name": f"{stream}, training-conditional thresholds (calibration.confidence "
                f"{CONFIDENCE}): lowest per-site test coverage after any experience (mean of 3 "
                "seeds), alpha 0.1",
                "value": worst_cond,
                "goal": f">= {1 - ALPHA - DELTA:.2f}",
                "met": worst_cond >= 1 - ALPHA - DELTA,
            }
        )
        for (after_k, site), v in sorted(cells.items()):
            cov_rows.append(
                {
                    "stream": stream,
                    "after": after_k,
                    "site": site,
                    "n (per seed)": v[0]["n"],
                    "coverage": pm([c["coverage"] for c in v]),
                    "set size": pm([c["mean_size"] for c in v], 2),
                    "pooled-threshold coverage": pm([c["pooled_coverage"] for c in v]),
                    f"coverage at confidence {CONFIDENCE}": pm(
                        [c["conditional_coverage"] for c in v]
                    ),
                    f"set size at confidence {CONFIDENCE}": pm(
                        [c["conditional_mean_size"] for c in v], 2
                    ),
                }
            )
        rows.append(
            {
                "stream": stream,
                "common T (final, mean ± sd)": pm([r["temperature"] for r in runs], 2),
                "ECE before": f"{before[0]:.3f} ± {before[1]:.3f}",
                "ECE after": f"{after[0]:.3f} ± {after[1]:.3f}",
                "ECE if calibrated (mean / 95th pct)": pm(
                    [e["ece_if_calibrated"]["mean"] for e in overall]
                )
                + " / "
                + pm([e["ece_if_calibrated"]["p95"] for e in overall]),
                "held-out val ECE before / after": f"{pm([r['held_out']['ece_before'] for r in runs])}"
                f" / {pm([r['held_out']['ece_after'] for r in runs])}",
                "per-experience T (seeds)": sum(
                    bool(r["per_experience_temperatures"]) for r in runs
                ),
                "accuracy (pooled test rows)": pm([e["accuracy_before"] for e in overall]),
                "accuracy (mean over experiences)": pm(
                    [r["final_accuracy_mean_over_experiences"] for r in runs]
                ),
                "max loss / first": f"{max(r['max_loss_ratio'] for r in runs):.2f}",
                "worst site coverage (mean / single run)": f"{worst:.3f} / {worst_single:.3f}",
            }
        )
        if stream.endswith("(main job)"):
            corr = [r["saliency"]["rank_correlation"] for r in runs]
            targets.append(
                {
                    "name": "main job: Grad-CAM rank correlation, trained vs randomised weights "
                    "(highest of 3 seeds; mean over 3 randomised copies each)",
                    "value": max(corr),
                    "goal": f"< {SALIENCY_GOAL}",
                    "met": max(corr) < SALIENCY_GOAL,
                }
            )
    wall = time.perf_counter() - t0
    main_runs = streams["medmnist-cross3 (main job)"]["runs"]
    shift_rows = []
    for i, row in enumerate(main_runs[0]["validation_vs_test"]):
        vals = [r["validation_vs_test"][i] for r in main_runs]
        shift_rows.append(
            {k: row[k] for k in ("split", "class")}
            | {k: pm([v[k] for v in vals]) for k in ("share", "accuracy", "coverage")}
        )
    payload = {
        "alpha": ALPHA,
        "seeds": list(SEEDS),
        "budget": "as configured: 1 epoch per experience (the main job's recipe)",
        "streams": streams,
        "targets": targets,
        "checks": checks,
        "wall_s": wall,
    }
    md = markdown(rows, cov_rows, shift_rows, targets, checks, wall)
    path = write_results("calibration", payload, md)
    if not args.quiet:
        print(json.dumps(targets, indent=1, default=lambda o: o.item()))  # numpy scalars
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
