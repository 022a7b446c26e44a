"""Which BatchNorm statistics a hospital scores the final global model with (issue 27's
``benchmarks/federated.py``; ``docs/federated.md``, "BatchNorm statistics").

For every run of a stream's ``federated-local`` arm (FedAvg, ``federation.batchnorm: local``,
seeds 0-2) and every hospital with no rows of the final experience, whose statistics are therefore
anchored (:mod:`medcl.federated.local_stats`), the final global weights are scored on the
hospital's test rows with three sets of statistics, the weights unchanged:

- **anchored**: those the run scored with (``federation.batchnorm_anchor: true``, the default);
- **memory**: re-estimated on its memory's exemplars alone (``batchnorm_anchor: false``);
- **all rows**: re-estimated on every training row the hospital held, a reference that a
  continual site cannot compute (it keeps only its memory).

Scoring only (no training); the anchored score is checked against the run's own record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from _common import markdown_table, paired_difference

from medcl.engine.evaluate import evaluate
from medcl.engine.resume import restore_run
from medcl.models.norm_stats import reestimate_batchnorm

WAYS = ("anchored", "memory", "all rows")


def _pooled(strategy, experiences) -> float:
    """Accuracy over the test rows of ``experiences``, pooled."""
    scored = evaluate(strategy, experiences, split="test", quiet=True)
    n = [len(e.test) for e in experiences]
    return float(np.average([s.accuracy for s in scored], weights=n))


def statistics_ablation(run_dirs: list[Path]) -> dict[str, Any]:
    """``{way: [accuracy per (run, hospital)]}``, the pairs, and anchored - memory / all rows.

    Raises:
        SystemExit: a run's anchored score differs from what the run recorded.
    """
    out: dict[str, list] = {w: [] for w in WAYS} | {"pairs": []}
    for run_dir in run_dirs:
        for site in sorted(p for p in (Path(run_dir) / "sites").iterdir() if p.is_dir()):
            cfg, scenario, strategy, memory, state = restore_run(site)
            if len(scenario[len(scenario) - 1].train):  # scored with its cohort's statistics
                continue
            if not (site / "federated" / "norm_anchor.safetensors").is_file():
                raise SystemExit(f"{site} has no statistics anchor (a run made before "
                                 "federation.batchnorm_anchor?): delete the run and run again")  # fmt: skip
            held = [e for e in scenario if len(e.test)]
            acc = {"anchored": _pooled(strategy, held)}
            recorded = np.average([state.accuracy[-1][e.index] for e in held],
                                  weights=[len(e.test) for e in held])  # fmt: skip
            if abs(acc["anchored"] - recorded) > 1e-6:
                raise SystemExit(f"{site}: scored {acc['anchored']:.4f}, recorded {recorded:.4f}")
            bs = cfg.eval.batch_size
            reestimate_batchnorm(strategy, [memory.exemplars()], batch_size=bs)
            acc["memory"] = _pooled(strategy, held)
            rows = [e.train.images for e in scenario if len(e.train)]
            reestimate_batchnorm(strategy, rows, batch_size=bs)
            acc["all rows"] = _pooled(strategy, held)
            for w in WAYS:
                out[w].append(acc[w])
            out["pairs"].append(f"{Path(run_dir).name}/{site.name}")
    out["anchored - memory"] = paired_difference(out["anchored"], out["memory"])
    out["anchored - all rows"] = paired_difference(out["anchored"], out["all rows"])
    return out


def statistics_table(ablations: dict[str, dict[str, Any]]) -> str:
    """Markdown: per stream, mean ± sd of each way and the paired differences."""
    rows = []
    for stream, a in ablations.items():
        if not a["pairs"]:
            continue
        row = {"stream": stream, "hospitals x seeds": len(a["pairs"])}
        sd = {w: np.std(a[w], ddof=1) if len(a[w]) > 1 else float("nan") for w in WAYS}
        row |= {w: f"{np.mean(a[w]):.3f} ± {sd[w]:.3f}" for w in WAYS}
        for d in ("anchored - memory", "anchored - all rows"):
            ci = a[d]["ci95"] or [float("nan")] * 2  # one pair: no interval
            row[d] = f"{a[d]['mean']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        rows.append(row)
    cols = ["stream", "hospitals x seeds", *WAYS, "anchored - memory", "anchored - all rows"]
    return markdown_table(rows, cols)
