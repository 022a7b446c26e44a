"""The server of a federated run: rounds, aggregation, and the global model's run directory.

:func:`serve` drives the protocol of :mod:`medcl.federated.site` through a :class:`Link` (Flower's
``Grid`` in :mod:`medcl.federated.apps`; a fake in unit tests). For each experience ``t``:
``federation.rounds`` training rounds aggregated by Flower's ``FedAvg`` or ``FedProx``
(weighted by each site's training images; ``fedavgm`` adds a server step on the parameters,
:class:`~medcl.federated.server_opt.ServerSGD`; ``fednova`` normalises each site's update by its
local steps, :func:`~medcl.federated.server_opt.fednova`), one consolidation round (each
deployable tensor averaged over the sites that changed it, weighted by their images and
memory), one evaluation round. Each message carries only the tensors the server changed since
that site's version, so a site that rejoins receives what it missed and a DynaMMo round moves one
adapter set and head.

``RUN_DIR`` is a medcl run directory of the global model (config, model facts, a checkpoint per
experience: ``medcl export RUN_DIR`` works) plus ``federation.json``: per round the sites that
replied or failed, bytes each way and seconds; per site and pooled, the accuracy matrices (and,
pooled, the validation matrices: ``pooled_val``, accuracy, and ``pooled_val_balanced``, each
site's recall averaged over the classes present, both weighted by the sites' validation rows).
The server's state (with FedAvgM's momentum) is saved after every round (``federated/server``),
so ``--resume`` continues after the last completed one. Every message is audited
(:func:`~medcl.federated.arrays.audit`).
"""

from __future__ import annotations

__all__ = ["FederationError", "Link", "Reply", "Request", "serve"]

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medcl.config import RunConfig, resolved_yaml
from medcl.data.memory import ReplayMemory
from medcl.engine.checkpoint import atomic_write_text, json_dumps, load_checkpoint, save_checkpoint
from medcl.engine.components import initial_strategy
from medcl.engine.layout import RunLayout, checkpoint_name
from medcl.engine.state import RunState
from medcl.engine.trainer import seed_everything
from medcl.errors import MedclError
from medcl.federated.arrays import audit, load_arrays, nbytes, to_numpy
from medcl.federated.server_opt import ServerSGD, fednova
from medcl.models.norm_stats import norm_buffer_keys
from medcl.progress import progress_bar
from medcl.strategies.base import ExperienceInfo, Strategy

#: federation.json's pooled matrices: key -> (the sites' per-experience metric, its row counts)
POOLED = {
    "pooled": ("accuracy", "test-examples"),
    "pooled_val": ("val-accuracy", "val-examples"),
    "pooled_val_balanced": ("val-balanced-accuracy", "val-examples"),
}


class FederationError(MedclError):
    """A round could not be completed (too few sites replied after the retries)."""


@dataclass(frozen=True)
class Request:
    node: int
    kind: str  # "query.describe" | "train" | "train.consolidate" | "evaluate"
    arrays: dict[str, np.ndarray]
    config: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    node: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Link(Protocol):
    """How the server reaches the sites (Flower's Grid behind it)."""

    def nodes(self) -> list[int]: ...

    def exchange(self, requests: Sequence[Request], timeout: float) -> list[Reply]: ...

    def aggregate(self, replies: Sequence[Reply], round_: int) -> dict[str, np.ndarray]: ...


def _build(cfg: RunConfig, describe: dict[str, Any]) -> Strategy:
    """The global strategy, initialised exactly as every site's (same seed, same calls)."""
    facts = describe["model"]["scenario"]
    return initial_strategy(cfg, facts["input_shape"], facts["kind"]).eval()


class _Server:
    def __init__(
        self, cfg: RunConfig, run_dir: Path, link: Link, say: Callable[[str], None] | None
    ) -> None:
        self.cfg, self.fed, self.link = cfg, cfg.federation, link
        self.say = say or (lambda _line: None)
        self.files = RunLayout(run_dir)
        self.state_dir = run_dir / "federated" / "server"
        self.sites: dict[int, str] = {}  # node id -> site name
        self.gone: set[int] = set()  # nodes that missed a round: not asked again (a restarted
        # SuperNode comes back under a new node id; Flower lists a dead one for a while)
        self.site_version: dict[str, int] = {}
        self.key_version: dict[str, int] = {}
        self.version = 0
        self.record: dict[str, Any] = {"rounds": [], "sites": {}} | {k: [] for k in POOLED}
        # fedavgm's step (the config refuses server_lr / server_momentum with other aggregations)
        self.sgd = ServerSGD(lr=self.fed.server_lr, momentum=self.fed.server_momentum)
        self.describe: dict[str, Any] | None = None
        self.strategy: Strategy | None = None
        self.step = (0, 0)  # (experience, phase) to do next; phase: rounds..., then 2 more

    # -- sites -------------------------------------------------------------------------------------
    def discover(self, wait: float, *, required: bool = True) -> None:
        """Ask every new node which site it is (and what it already holds)."""
        deadline = time.monotonic() + wait
        want = len(self.fed.site_names) if not self.sites else self.fed.min_sites
        while True:
            new = [n for n in self.link.nodes() if n not in self.sites and n not in self.gone]
            if new:
                reqs = [Request(n, "query.describe", {}, {}) for n in new]
                # a first reply starts a process that imports torch and builds the site's data
                timeout = max(self.fed.round_timeout, wait)
                replies = self.link.exchange(reqs, timeout)
                for r in replies:
                    if r.error is None:
                        self._welcome(r)
                if not wait:  # between rounds: a node that did not answer is not asked again
                    self.gone |= set(new) - {r.node for r in replies if r.error is None}
            if len(set(self.sites.values())) >= want or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if required and len(set(self.sites.values())) < self.fed.min_sites:
            raise FederationError(
                f"{len(set(self.sites.values()))} of the sites {self.fed.site_names} joined within "
                f"{wait:.0f} s; federation.min_sites is {self.fed.min_sites}. Start the missing "
                "SuperNodes, or raise federation.join_timeout."
            )

    def _welcome(self, reply: Reply) -> None:
        info = json.loads(reply.config["describe"])
        unknown = set(info) - {"site", "model", "scenario", "infos", "synced_version", "completed"}
        if unknown:
            raise FederationError(f"node {reply.node} described itself with {sorted(unknown)}.")
        name = info["site"]
        if name not in self.fed.site_names:
            raise FederationError(
                f"node {reply.node} says it is site {name!r}, which is not in federation.sites "
                f"{self.fed.site_names}; check the SuperNode's --node-config."
            )
        for node, old in list(self.sites.items()):
            if old == name:
                del self.sites[node]  # a restarted SuperNode: the site's new node replaces it
        self.sites[reply.node] = name
        self.site_version[name] = int(info["synced_version"])
        if self.describe is None:
            self.describe = info
            self._start()

    def _start(self) -> None:
        """The global run directory's records and model (first site's facts; no rows)."""
        assert self.describe is not None
        self.strategy = _build(self.cfg, self.describe)
        if self.state_dir.is_dir():
            self._load()
        files = self.files
        files.root.mkdir(parents=True, exist_ok=True)
        resolved = resolved_yaml(self.cfg)
        for path, text in (
            (files.config, resolved),
            (files.model, json.dumps(self.describe["model"], indent=1)),
            (files.scenario, json.dumps(self.describe["scenario"], indent=1)),
        ):
            if not path.is_file():
                atomic_write_text(path, text)

    # -- state -------------------------------------------------------------------------------------
    def _save(self) -> None:
        assert self.strategy is not None
        state = {
            "step": list(self.step),
            "version": self.version,
            "key_version": self.key_version,
            "site_version": self.site_version,
            "record": self.record,
            "seen": [i.to_dict() for i in self.strategy.seen],
        }
        # the server holds no replay memory: that slot keeps FedAvgM's momentum
        save_checkpoint(
            self.state_dir, strategy=self.strategy.state_dict(), memory=self.sgd.state_dict(),
            state=state,
        )  # fmt: skip

    def _load(self) -> None:
        assert self.strategy is not None
        tensors, momentum, state = load_checkpoint(self.state_dir)
        self.strategy.rebuild([ExperienceInfo.from_dict(d) for d in state["seen"]])
        self.strategy.load_state_dict(tensors)
        self.step = tuple(state["step"])
        self.version, self.key_version = state["version"], state["key_version"]
        self.site_version.update(state["site_version"])
        self.record = {k: [] for k in POOLED} | state["record"]  # saved before a pooled key
        self.sgd.load_state_dict(momentum)

    # -- rounds ------------------------------------------------------------------------------------
    def _since(self, site: str) -> dict[str, np.ndarray]:
        v = self.site_version.get(site, -1)  # -1: a site that holds the initial model
        return to_numpy(self.strategy, [k for k, kv in self.key_version.items() if kv > v])

    def _round(self, t: int, kind: str, index: int, extra: dict[str, Any]) -> list[Reply]:
        """One exchange with every known site; repeated while too few reply (``retries``)."""
        for attempt in range(self.fed.retries + 1):
            self.discover(0.0, required=False)  # a SuperNode that (re)joined since
            start = time.monotonic()
            reqs = [
                Request(n, kind, self._since(s), {"experience": t, "version": self.version} | extra)
                for n, s in self.sites.items()
            ]
            replies = self.link.exchange(reqs, self.fed.round_timeout)
            ok = [r for r in replies if r.error is None]
            for r in ok:
                n_exp = len(self.describe["infos"])
                audit(self.strategy, r.arrays, r.metrics, where=f"site {self.sites.get(r.node)}",
                      num_experiences=n_exp)  # fmt: skip
                self.site_version[self.sites[r.node]] = int(r.metrics.get("synced-version", -1))
            failed = sorted({self.sites[q.node] for q in reqs} - {self.sites[r.node] for r in ok})
            self.record["rounds"].append(
                {
                    "experience": t, "kind": kind, "round": index, "attempt": attempt,
                    "sites": sorted(self.sites[r.node] for r in ok), "failed": failed,
                    "errors": [r.error for r in replies if r.error is not None],
                    "bytes_down": sum(nbytes(q.arrays) for q in reqs),
                    "bytes_up": sum(nbytes(r.arrays) for r in ok),
                    "seconds": round(time.monotonic() - start, 3),
                }
            )  # fmt: skip
            row = self.record["rounds"][-1]
            self.say(
                f"experience {t} {kind} {index}: {len(ok)}/{len(reqs)} sites replied"
                f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}, "
                f"{(row['bytes_down'] + row['bytes_up']) / 1e6:.2f} MB, {row['seconds']:.1f} s"
            )
            for node in [q.node for q in reqs if self.sites[q.node] in failed]:
                self.sites.pop(node, None)  # not asked again under this node id
                self.gone.add(node)
            if len(ok) >= self.fed.min_sites:
                return ok
        raise FederationError(
            f"experience {t} {kind} round {index}: {len(ok)} site(s) replied, federation.min_sites "
            f"is {self.fed.min_sites}, after {self.fed.retries + 1} attempt(s) (failed: {failed}). "
            f"Restart the missing SuperNodes and continue with `medcl federate CONFIG --resume`."
        )

    def _apply(self, arrays: dict[str, np.ndarray]) -> None:
        if not arrays:
            return
        load_arrays(self.strategy, arrays)
        self.version += 1
        self.key_version.update({k: self.version for k in arrays})

    def experience(self, t: int) -> None:
        assert self.strategy is not None
        info = ExperienceInfo.from_dict(self.describe["infos"][t])
        if len(self.strategy.seen) <= t:  # the sites' structural step, seeded as theirs
            seed_everything(self.cfg.seed * 1000 + t)
            self.strategy.grow(info)
        if self.step[1] == 0:
            self.sgd.reset()  # a new experience: new heads, and a new momentum
        rounds = self.fed.rounds
        mu = self.fed.proximal_mu if self.fed.aggregation == "fedprox" else 0.0
        bar = progress_bar(total=rounds + 2, desc=f"exp {t} {info.name}: rounds", unit="round")
        bar.update(self.step[1])
        for r in range(self.step[1], rounds + 2):
            if r < rounds:
                ok = self._round(t, "train", r, {"round": r, "proximal-mu": mu})
                ok = [x for x in ok if x.metrics.get("num-examples", 0) > 0]
                self._apply(self._aggregate_train(ok, r))
            elif r == rounds:
                ok = self._round(t, "train.consolidate", r, {})
                self._apply(_weighted_mean([x for x in ok if x.metrics.get("num-examples", 0)]))
                self._checkpoint(t)
            else:
                self._results(t, self._round(t, "evaluate", r, {"last": t == self._last()}))
                if self.fed.batchnorm == "local":  # sites scored with their own statistics:
                    self._apply(to_numpy(self.strategy, norm_buffer_keys(self.strategy)))  # resend
            self.step = (t, r + 1) if r + 1 < rounds + 2 else (t + 1, 0)
            self._save()
            bar.update(1)
        bar.close()

    def _aggregate_train(self, replies: Sequence[Reply], r: int) -> dict[str, np.ndarray]:
        """Flower's weighted mean of training round ``r``; with ``fedavgm``, FedAvgM's server
        step on the floating-point parameters among its tensors (buffers keep the mean); with
        ``fednova``, FedNova's normalised average on them."""
        if not replies:
            return {}
        mean = self.link.aggregate(replies, r)
        nova = self.fed.aggregation == "fednova"
        if not (self.sgd.active or nova):
            return mean
        named = self.strategy.named_parameters(remove_duplicate=False)
        params = {n for n, p in named if p.is_floating_point()} & set(mean)
        current = to_numpy(self.strategy, sorted(params))
        if nova:
            sites = [(x.arrays, x.metrics["num-examples"], x.metrics["updates"]) for x in replies]
            return fednova(current, mean, sites, params, self.cfg.train.momentum)
        return self.sgd.step(current, mean, params)

    def _last(self) -> int:
        return len(self.describe["infos"]) - 1

    def _checkpoint(self, t: int) -> None:
        """The global model after ``t`` as a medcl checkpoint (``medcl export RUN_DIR``)."""
        state = RunState(completed=t, seen=[i.to_dict() for i in self.strategy.seen])
        save_checkpoint(
            self.files.checkpoint(t), strategy=self.strategy.state_dict(),
            memory=ReplayMemory(0).state_dict(),  # the sites' memories stay at the sites
            state=state.to_json(),
        )  # fmt: skip
        pointer = {"checkpoint": checkpoint_name(t), "completed": t}
        atomic_write_text(self.files.latest, json.dumps(pointer))

    def _results(self, t: int, replies: list[Reply]) -> None:
        for r in replies:
            acc = r.metrics["accuracy"]
            rows = self.record["sites"].setdefault(self.sites[r.node], {})
            rows[str(t)] = [None if a < 0 else float(a) for a in acc]
        n_exp = len(self.describe["infos"])
        for key, (accuracy, examples) in POOLED.items():
            row = _pool([r.metrics for r in replies], accuracy, examples, n_exp)
            done = self.record[key][:t]  # a state saved before pooled_val existed: None rows
            self.record[key] = [*done, *[[None] * n_exp] * (t - len(done)), row]
        self._write_record()

    def _write_record(self) -> None:
        rounds = [r for r in self.record["rounds"] if r["kind"] == "train"]
        summary = {
            "sites": self.fed.site_names,
            "experiences": [i["name"] for i in self.describe["infos"]],
            "accuracy_matrix": self.record["pooled"],  # test-size-weighted over the sites
            "pooled_val": self.record["pooled_val"],  # the same on the validation splits
            "pooled_val_balanced": self.record["pooled_val_balanced"],  # recall, class-averaged
            "site_accuracy": self.record["sites"],
            "bytes_per_train_round": (
                float(np.mean([r["bytes_down"] + r["bytes_up"] for r in rounds])) if rounds else 0.0
            ),
            "rounds": self.record["rounds"],
        }
        atomic_write_text(self.files.root / "federation.json", json_dumps(summary))


def _pool(
    metrics: Sequence[dict[str, Any]], accuracy: str, examples: str, n_exp: int
) -> list[float | None]:
    """One pooled accuracy row: each site's accuracy on experience ``j`` weighted by its rows
    (``examples``); a site's ``-1`` (no rows, or not scored: ``eval.future``) is left out;
    ``None`` where no site has a score."""
    num, den = np.zeros(n_exp), np.zeros(n_exp)
    for m in metrics:
        if accuracy not in m or examples not in m:  # not reported (validation: an older medcl)
            continue
        acc, n = np.array(m[accuracy], dtype=float), np.array(m[examples], dtype=float)
        ok = acc >= 0
        num[ok] += acc[ok] * n[ok]
        den[ok] += n[ok]
    return [float(a) if d else None for a, d in zip(num / np.maximum(den, 1), den, strict=True)]


def _weighted_mean(replies: Sequence[Reply]) -> dict[str, np.ndarray]:
    """Each tensor averaged over the replies that carry it, weighted by ``num-examples``."""
    total: dict[str, np.ndarray] = {}
    weight: dict[str, float] = {}
    for r in replies:
        w = float(r.metrics["num-examples"])
        for k, a in r.arrays.items():
            total[k] = total.get(k, 0.0) + np.asarray(a, dtype=np.float64) * w
            weight[k] = weight.get(k, 0.0) + w
    return {k: (total[k] / weight[k]) for k in total}


def serve(
    cfg: RunConfig, run_dir: Path, link: Link, *, say: Callable[[str], None] | None = None
) -> Path:
    """Run (or, with a saved server state, continue) the federated stream; return ``run_dir``.

    ``say`` receives one line per round (sites that replied, megabytes moved, seconds).
    """
    server = _Server(cfg, Path(run_dir), link, say)
    server.discover(cfg.federation.join_timeout)
    for t in range(server.step[0], len(server.describe["infos"])):
        server.experience(t)
    return Path(run_dir)
