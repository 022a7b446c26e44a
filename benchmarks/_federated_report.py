"""The page of ``benchmarks/federated.py`` (issue 27): tables from its payload."""

from __future__ import annotations

from typing import Any

import numpy as np
from _common import markdown_table
from _federated_bytes import bytes_table
from _federated_stats import statistics_table

ARMS = {
    "central": "centralised: one place, one memory",
    "federated": "FedAvg, averaged BatchNorm statistics",
    "federated-local": "FedAvg, each site's own BatchNorm statistics (SiloBN)",
    "fedavgm": "FedAvgM (server lr chosen), averaged statistics",
    "fedavgm-local": "FedAvgM (server lr chosen), each site's own statistics",
    "fednova-local": "FedNova (one cohort per hospital only), each site's own statistics",
}


def arm_name(lr: float, batchnorm: str, nova: bool = False) -> str:
    """``federated`` (FedAvg), ``fedavgm`` (server lr != 1) or ``fednova``, ``-local`` with
    SiloBN."""
    base = "fednova" if nova else "federated" if lr == 1 else "fedavgm"
    return base + ("" if batchnorm == "mean" else "-local")


def render(
    payload: dict[str, Any],
    streams: dict[str, Any],
    full: dict[str, Any],
    dyn: dict[str, Any],
    kill: dict[str, Any],
) -> str:
    """Accuracy per stream and arm, learned -> kept, the selections, bytes, the killed site,
    targets and the runs' wall time, from the payload as ``main`` builds it (before JSON: the
    server-lr grids' keys are floats)."""
    selection_seeds = " and ".join(str(s) for s in payload["selection_seeds"])
    lines = ["# Federated continual learning (issue 27)", ""]
    lines.append("Accuracy of the final global model on each experience's test rows (pooled over "
                 "the hospitals holding them; with SiloBN each hospital scores its rows with its "
                 "own BatchNorm statistics), mean ± sd over seeds 0-2; difference = arm - "
                 "centralised, paired by seed (95 % t CI). Budget per experience: central 2 epochs; "
                 "federated 2 rounds x 1 local epoch; updates summed over hospitals. Wall s: the "
                 "central run's total, the federated run's rounds (Ray simulation engine). Arms: "
                 + "; ".join(f"`{a}`: {what}" for a, what in ARMS.items()) + ". Local "
                 "learning-rate schedule (`train.scheduler`) of each pneumonia-sites arm as chosen "
                 "on validation below (`cosine`: per experience for the central run, per round "
                 "at a site; `none`: constant); medmnist-cross3 keeps the config's cosine.")  # fmt: skip
    rows = []
    for name, s in streams.items():
        chosen = {arm_name(c["chosen"], bn): c["chosen"] for bn, c in s["server_lr"].items()}
        for arm, runs in s["runs"].items():
            fm = s["final_mean"][arm]
            label = f"{arm} (server lr {chosen[arm]:g})" if arm.startswith("fedavgm") else arm
            label += " [selected]" if arm == s.get("selected_arm") else ""
            rows.append({
                "stream": name, "arm": label,
                "mean accuracy": f"{fm['mean']:.3f} ± {fm['sd']:.3f}",
                "per experience": ", ".join(f"{a:.3f}" for a in s["per_site"][arm]),
                "updates": int(np.mean([r["updates"] for r in runs])),
                "wall s": round(float(np.mean([r["seconds"] for r in runs])), 1),
            })  # fmt: skip
        for arm, d in s["differences"].items():
            rows.append({"stream": name, "arm": f"{arm} - central",
                         "mean accuracy": f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"})  # fmt: skip
    lines += ["", markdown_table(rows, ["stream", "arm", "mean accuracy", "per experience", "updates", "wall s"])]  # fmt: skip
    lines += ["", "CPU kernel path of the reported runs (torch's `cpu_capability` in each run's and "
              "site's `environment.json`; another path gives other trained numbers): "
              + "; ".join(f"{n}: {', '.join(s['cpu'])}" for n, s in streams.items()) + "."]  # fmt: skip
    lines += ["", "Learned, then kept: accuracy on each experience right after learning it -> "
              "after the last one (mean over seeds):", ""]  # fmt: skip
    kept = [{"stream": n, "arm": a, "learned -> final": ", ".join(
                f"{x:.3f} -> {y:.3f}" for x, y in zip(s["per_site_learned"][a], s["per_site"][a], strict=True))}
            for n, s in streams.items() for a in s["runs"]]  # fmt: skip
    lines += [markdown_table(kept, ["stream", "arm", "learned -> final"])]
    central, by = payload["central_scheduler"], payload["select_by"]
    lines += ["", f"Chosen on the validation splits at seeds {selection_seeds} by **{by}"
              f"{' accuracy' if by == 'balanced' else ''}** (`--select-by`: the mean over "
              "experiences of the final model's accuracy, or of its recall averaged over the "
              "classes present, which does not follow a split's class prior; averaged over the "
              "seeds; the other score beside it in brackets), pneumonia-sites: the centralised "
              "run's `train.scheduler` (" + _scores(central["val"], by) + f"; chosen "
              f"{central['scheduler']}); per stream, FedAvg's `train.scheduler` and BatchNorm "
              "statistics together (server lr 1):", ""]  # fmt: skip
    recipe = [{"stream": n, "val (scheduler/batchnorm)": _scores(s["recipe"]["val"], by),
               "chosen": f"{s['recipe']['scheduler']}/{s['recipe']['batchnorm']}"}
              for n, s in streams.items() if s.get("recipe")]  # fmt: skip
    lines += [markdown_table(recipe, ["stream", "val (scheduler/batchnorm)", "chosen"])]
    lines += ["", "`mean`: averaged BatchNorm statistics, `local`: each site's own (Andreux et al. "
              "2020). Then the server learning rate (Hsu et al. 2019; `federation.server_lr`; "
              "1 = FedAvg) at that schedule and those statistics, chosen the same way; the "
              "targets read the selected arm:", ""]  # fmt: skip
    sel = [{"stream": n, "batchnorm": bn, "grid": ", ".join(f"{v:g}" for v in c["grid"]),
            "val": _scores(c["val"], by), "chosen": c["chosen"], "at edge": c["at_edge"]}
           for n, s in streams.items() for bn, c in s["server_lr"].items()]  # fmt: skip
    lines += [markdown_table(sel, ["stream", "batchnorm", "grid", "val", "chosen", "at edge"])]
    nova = [{"stream": n, "fednova (server lr 1)": _pair(s["fednova"]["val"], by),
             "chosen FedAvg(M)": _pair(s["fednova"]["against"], by),
             "selected arm": s["selected_arm"]}
            for n, s in streams.items() if s.get("fednova")]  # fmt: skip
    if nova:
        lines += ["", "Then FedNova (Wang et al. 2020; `aggregation: fednova`: each hospital's "
                  "update divided by its local steps, which differ when one hospital holds the "
                  "new cohort and the others rehearse their memories) at the same schedule and "
                  "statistics, against the chosen FedAvg(M); validation score:", "",
                  markdown_table(nova, ["stream", "fednova (server lr 1)", "chosen FedAvg(M)",
                                        "selected arm"])]  # fmt: skip
    lines += ["", "## The BatchNorm statistics of a hospital without the final cohort", "",
              "`federated-local` runs, final global weights, each such hospital's test rows "
              "(pooled), scored with its statistics as the run kept them (anchored to the cohort "
              "it last held, `federation.batchnorm_anchor`), re-estimated on its memory alone "
              "(the option off), and on every training row it held (a reference: a continual "
              "site keeps only its memory); mean ± sd over hospitals x seeds, paired differences "
              "with 95 % t CIs (`benchmarks/_federated_stats.py`). A stream whose hospitals all "
              "hold rows of the final experience has no row.", ""]  # fmt: skip
    lines += [statistics_table(payload["batchnorm_statistics"])]
    lines += ["", "## Bytes per training round (pneumonia-sites, 4 hospitals, seed 0)", ""]
    lines += [bytes_table(full, dyn), "", "The target is read at the reference adapter width "
              "(1.0: the paper's, no bottleneck); `adapter_width` 0.5 and 0.25 are an option, "
              "their lines are separate and their accuracy is not measured here."]  # fmt: skip
    lines += ["", "## A SuperNode killed mid-run (deployment engine)", "",
              f"status {kill['status']}; {'; '.join(kill['events'])}; rounds with a failed site: "
              f"{len(kill['rounds_with_failures'])}; {kill['seconds']:.0f} s."]  # fmt: skip
    lines += ["", "## Targets", ""]
    lines += [markdown_table(payload["targets"], ["name", "value", "goal", "met"])]
    total = sum(r["seconds"] for s in streams.values() for a in s["runs"].values() for r in a)
    total += sum(sum(c["seconds"]) for s in streams.values() for c in s["server_lr"].values())
    total += sum(sum(s["recipe"]["seconds"]) for s in streams.values() if s.get("recipe"))
    total += sum(sum(s["fednova"]["seconds"]) for s in streams.values() if s.get("fednova"))
    total += sum(central["seconds"])
    dyn_seconds = sum(d["seconds"] for d in dyn.values())
    lines += [
        "",
        f"Runs' own wall time {(total + dyn_seconds + kill['seconds']) / 60:.0f} min "
        f"(this invocation: {payload['wall_seconds'] / 60:.1f} min; finished runs are read "
        "back), on this machine, alone.",
    ]
    return "\n".join(lines)


def _pair(score: dict[str, float], by: str) -> str:
    """``by``'s score, the other criterion's in brackets: ``0.912 (accuracy 0.930)``."""
    other = ", ".join(f"{b} {v:.3f}" if v == v else f"{b} n/a" for b, v in score.items() if b != by)
    return f"{score[by]:.3f} ({other})"


def _scores(val: dict[str, dict[Any, float]], by: str) -> str:
    """Each candidate's :func:`_pair`: ``{criterion: {candidate: score}}`` -> one cell."""
    name = lambda c: f"{c:g}" if isinstance(c, float) else str(c)  # noqa: E731 (a server lr)
    return ", ".join(f"{name(c)}: " + _pair({b: v[c] for b, v in val.items()}, by) for c in val[by])
