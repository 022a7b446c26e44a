"""A hospital's side of a federated run: its images, memory and results never leave its folder.

Each site keeps a medcl run directory of its own (``SITE_DIR``: config, its part of the scenario,
checkpoints of the global model with *its* replay memory, predictions, metrics, calibration and
the clinical report), so every medcl command works on it (``medcl report SITE_DIR``). The server
(:mod:`medcl.federated.server`) sends three kinds of message per experience ``t``:

1. ``train`` (``federation.rounds`` times): the tensors the server changed since the site last
   heard; the site starts the experience on the first one (:func:`~medcl.engine.trainer.
   begin_experience`, seeded as a central run), trains ``train.epochs`` local epochs
   (:func:`~medcl.engine.trainer.train_updates`, FedProx's proximal term when asked) and sends back
   the tensors training changed, weighted by its number of training images;
2. ``train.consolidate``: the final aggregate; the site consolidates
   (:func:`~medcl.engine.trainer.end_experience`: DynaMMo's merge and stage 2, EWC's Fisher, the
   memory update) on its own data and sends back the deployable tensors that changed;
3. ``evaluate``: the consolidated aggregate; the site evaluates, calibrates, checkpoints and
   writes metrics in its run directory (:func:`~medcl.engine.run.finish_experience`) and sends back
   its test and validation accuracy per experience (and, after the last, writes its report).
   With ``federation.batchnorm: local`` the site's BatchNorm statistics, re-estimated on its own
   rows before step 2's consolidation (anchored where it has only its memory:
   :mod:`medcl.federated.local_stats`), serve steps 2 and 3 and stay at the site.

Between messages nothing stays in memory (Flower's deployment engine starts a ClientApp process
per message): the state is the last checkpoint plus a working checkpoint, and a restore repeats
:func:`begin_experience` from the last checkpoint (the same seed: the same structure and the
same non-tensor state, e.g. LwF's teacher) before loading the working tensors.

A site with no training images in an experience (``partition: experience``) trains on its memory
alone if the strategy rehearses (``replay``), else sits the rounds out (weight 0).
"""

from __future__ import annotations

__all__ = ["SUPPORTED", "Site", "check_federated_strategy", "site_dir"]

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from medcl.config import RunConfig, resolved_yaml
from medcl.data.memory import ReplayMemory
from medcl.data.partition import site_part_file, site_scenario
from medcl.engine.artifacts import record_start, untrained_baseline
from medcl.engine.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from medcl.engine.components import build_components
from medcl.engine.distributed import SINGLE
from medcl.engine.evaluate import evaluate as evaluate_split
from medcl.engine.evaluate import num_scored
from medcl.engine.layout import RunLayout
from medcl.engine.resume import restore_checkpoint
from medcl.engine.run import curve_monitor, finish_experience
from medcl.engine.state import RunState
from medcl.engine.timing import PhaseTimer
from medcl.engine.trainer import (
    FitStats,
    begin_experience,
    end_experience,
    train_updates,
    update_memory,
)
from medcl.errors import ConfigError
from medcl.federated.arrays import changed_keys, load_arrays, to_numpy, trainable_keys
from medcl.federated.local_stats import LocalStatistics
from medcl.federated.work import Work, total
from medcl.strategies.base import ExperienceInfo

#: strategies a site can train: name -> (rehearses its memory in an experience without new
#: images, consolidates in an experience without new images)
SUPPORTED: dict[str, tuple[bool, bool]] = {
    "finetune": (False, False),
    "replay": (True, False),
    "ewc": (False, False),
    "lwf": (False, False),
    "acl": (False, True),
    "dynammo": (False, True),
}


#: the site's part of the scenario, kept while the process lives (simulation engine: one Ray
#: actor serves many messages; deployment: a process per message, so always built)
_SCENARIOS: dict[tuple, Any] = {}


def check_federated_strategy(name: str) -> None:
    """Refuse a strategy that sites cannot train (before any process starts)."""
    if name not in SUPPORTED:
        raise ConfigError(
            f"strategy {name!r} cannot be trained federated; federation supports "
            f"{sorted(SUPPORTED)}. Choose one of them in `strategy.name`, or train centrally "
            "with `medcl run`."
        )


def site_dir(cfg: RunConfig, name: str) -> Path:
    """Default folder of site ``name``: ``RUN_DIR/sites/NAME`` (on the site's machine)."""
    return Path(cfg.output_dir) / cfg.run_name / "sites" / name


class Site:
    """One hospital: its part of the scenario, its strategy and memory, its run directory.

    Args:
        cfg: the federated run's config (its ``federation`` section names the sites).
        name: this site's name (one of ``federation.sites``).
        folder: the site's run directory (default :func:`site_dir`).
        quiet: no progress bars.
    """

    def __init__(
        self, cfg: RunConfig, name: str, folder: Path | None = None, *, quiet: bool = True
    ) -> None:
        fed = cfg.federation
        if fed is None:
            raise ConfigError("the config has no `federation` section; see docs/federated.md.")
        names = fed.site_names
        if name not in names:
            raise ConfigError(f"site {name!r} is not in federation.sites {names}; check its name.")
        self.cfg, self.name, self.quiet = cfg, name, quiet
        self.dir = Path(folder) if folder is not None else site_dir(cfg, name)
        self.files = RunLayout(self.dir)
        # the site's part depends on every site (how many share a cohort), not on its name only
        key = (cfg.scenario.model_dump_json(), str(cfg.data.root), cfg.seed, name, tuple(names),
               fed.partition)  # fmt: skip
        scenario = _SCENARIOS.get(key)
        scenario, self.strategy, self.memory = build_components(cfg, scenario)
        index = names.index(name)
        if key not in _SCENARIOS:
            scenario = site_scenario(scenario, index, len(names), fed.partition, cfg.seed)
            _SCENARIOS.clear()  # one site's images per process
            _SCENARIOS[key] = scenario
        self.scenario = scenario
        self.memory.attach(self.scenario.experiences)
        self.rehearses, self.consolidates_empty = SUPPORTED[cfg.strategy.name]
        self.norms = LocalStatistics(cfg, self.strategy, self.memory, self.dir / "federated")
        self.state, self.work = RunState(), Work()
        self._restore()

    # -- state ---------------------------------------------------------------------------------
    @property
    def _work_dir(self) -> Path:
        return self.dir / "federated" / "work"

    def _seed(self, t: int) -> int:
        return self.cfg.seed * 1000 + t  # a central run's experience seed: the same grow

    def _begin(self, t: int) -> None:
        exp = self.scenario[t]
        num_seen = self.scenario.num_seen_classes(t)
        begin_experience(
            self.strategy, exp, num_seen_classes=num_seen, memory=self.memory, seed=self._seed(t)
        )

    def _restore(self) -> None:
        """The last checkpoint, then the working state of the experience in progress."""
        if self.files.latest.is_file():
            self.state = restore_checkpoint(self.dir, self.strategy, self.memory)
        else:
            self._start()
        work = self._work_dir / "work.json"
        if not work.is_file():
            return
        self.work = Work(**json.loads(work.read_text()))
        if self.work.begun > self.state.completed:
            tensors, mem, _ = load_checkpoint(self._work_dir)
            self._catch_up(self.work.begun)
            self._begin(self.work.begun)
            self.strategy.load_state_dict(tensors)
            self.memory.load_state_dict(mem)

    def _start(self) -> None:
        """A new site: its run directory's records and the untrained baseline (kept on disk
        until the first checkpoint holds it: every message starts from what is on disk)."""
        baseline = self.dir / "federated" / "baseline.json"
        if baseline.is_file():
            self.state.baseline = json.loads(baseline.read_text())
            return
        resolved = resolved_yaml(self.cfg)
        record_start(self.cfg, self.dir, resolved, self.scenario, self.strategy, SINGLE, False, -1)
        fed, part = self.cfg.federation, site_part_file(self.dir)
        part.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(part, json.dumps({
            "site": self.name, "index": fed.site_names.index(self.name),
            "num_sites": len(fed.site_names), "partition": fed.partition, "seed": self.cfg.seed,
        }))  # fmt: skip
        bs = self.cfg.eval.batch_size
        self.state.baseline = untrained_baseline(self.strategy, self.scenario, batch_size=bs)
        baseline.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(baseline, json.dumps(self.state.baseline))

    def _save_work(self, *, tensors: bool = True) -> None:
        if tensors:
            save_checkpoint(
                self._work_dir,
                strategy=self.strategy.state_dict(),
                memory=self.memory.state_dict(),
                state={"seen": [i.to_dict() for i in self.strategy.seen]},
            )
        atomic_write_text(self._work_dir / "work.json", json.dumps(dataclasses.asdict(self.work)))

    def _catch_up(self, t: int) -> None:
        """Experiences before ``t`` the site did not finish (offline): structure and memory.

        Their model tensors arrive with the next message (everything changed since the site's
        version); the site's own images of a missed experience still enter its memory; its
        accuracy rows for them are NaN (it did not see those models) and no checkpoint is
        written for them. Local consolidation state of a missed experience (e.g. EWC's Fisher)
        is not recomputed.
        """
        n = len(self.scenario)
        for k in range(self.state.completed + 1, t):
            if k >= len(self.strategy.seen):
                self._begin(k)
            if self.work.consolidated < k:
                self._remember(k)
                self.work.consolidated = k
            self.state.accuracy.append([float("nan")] * n)
            self.state.task_accuracy.append([float("nan")] * n)
            self.state.fit.append({"experience": k, "updates": 0, "missed": True})
            self.state.completed = k

    # -- messages --------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What the server needs to build the model: the scenario's structure, no rows."""
        return {
            "site": self.name,
            "model": json.loads(self.files.model.read_text()),
            "scenario": json.loads(self.files.scenario.read_text()),
            "infos": [
                ExperienceInfo(
                    e.index,
                    e.name,
                    e.task_id,
                    tuple(e.classes),
                    self.scenario.num_seen_classes(e.index),
                ).to_dict()
                for e in self.scenario
            ],
            "synced_version": self.work.synced_version,
            "completed": self.state.completed,
        }

    def train(
        self, t: int, arrays: dict[str, np.ndarray], version: int, mu: float, round_: int
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """One round of experience ``t``: returns the trained tensors and the metrics."""
        self._enter(t, arrays, version)
        exp = self.scenario[t]
        memory = self.memory
        if len(exp.train) == 0 and self.rehearses and len(self.memory):
            exp = dataclasses.replace(exp, train=self.memory.as_sampleset())
            memory = ReplayMemory(0)  # the memory is the training set: no replay on top
        keys = trainable_keys(self.strategy)
        # stored as received: what the site holds on disk is always the server's version
        # `synced_version`, so a repeated round (after a crash) starts from the same tensors
        self._save_work()
        if len(exp.train) == 0:  # nothing to learn from here: sit the round out
            return {}, {"num-examples": 0, "updates": 0, "synced-version": version}
        penalty = self._proximal(keys, mu) if mu > 0 else None
        stats = train_updates(
            self.strategy,
            exp,
            past=self.scenario.experiences[:t],
            memory=memory,
            cfg=self.cfg.train,
            replay_batch_size=self.cfg.memory.replay_batch_size,
            seed=self._seed(t) if round_ == 0 else self._seed(t) * 100 + round_,
            quiet=self.quiet,
            penalty=penalty,
        )
        self.work.fit[str(round_)] = dataclasses.asdict(stats)
        self._save_work(tensors=False)
        metrics = {
            "num-examples": len(exp.train),
            "updates": stats.updates,
            "seconds": stats.seconds,
            "loss-first": stats.loss_first,
            "loss-max": stats.loss_max,
            "loss-last": stats.loss_last,
            "synced-version": version,
        }
        return to_numpy(self.strategy, keys), metrics

    def consolidate(
        self, t: int, arrays: dict[str, np.ndarray], version: int
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Experience ``t``'s consolidation and memory update on this site's data."""
        self._enter(t, arrays, version)
        exp = self.scenario[t]
        if self.work.consolidated < t:
            self.norms.estimate(t, exp.train.images)  # before the snapshot: they are not sent
            before = {k: v.clone() for k, v in self.strategy.state_dict().items()}
            if len(exp.train) or self.consolidates_empty:
                end_experience(
                    self.strategy,
                    exp,
                    memory=self.memory,
                    channels_last=self.cfg.train.channels_last,
                )
                self.norms.record(exp.train.images)
            else:  # nothing to consolidate on: the memory only (it has no rows of `t` to add)
                self.strategy.eval()
            self.work.consolidated = t
            self.work.consolidated_keys = changed_keys(before, self.strategy)
            self._save_work()
        keys = self.work.consolidated_keys  # the same reply if the round is repeated
        weight = len(exp.train) + len(self.memory)
        metrics = {"num-examples": weight if keys else 0, "synced-version": version}
        return to_numpy(self.strategy, keys), metrics

    def evaluate(self, t: int, arrays: dict[str, np.ndarray], version: int) -> dict[str, Any]:
        """Experience ``t``'s evaluation, calibration, checkpoint and metrics.

        Returns:
            The metrics: ``accuracy`` / ``test-examples`` and ``val-accuracy`` /
            ``val-balanced-accuracy`` / ``val-examples``, one number per experience of the
            scenario (the accuracy of the consolidated global model on the site's test /
            validation rows, and its recall averaged over the classes present there; ``-1``
            where the site has none or did not score it: ``eval.future``), ``completed`` and
            ``synced-version``.
        """
        if self.state.completed < t:
            self._enter(t, arrays, version)
            if self.work.consolidated < t:  # restarted after consolidating: memory only
                self.norms.estimate(t, self.scenario[t].train.images)
                self._remember(t)
                self.norms.record(self.scenario[t].train.images)
                self.work.consolidated = t
            stats = total([FitStats(**r) for _, r in sorted(self.work.fit.items())])
            self.state.global_update += stats.updates
            self.state.completed = t
            monitor = curve_monitor(self.cfg, self.scenario, self.state)
            finish_experience(
                self.dir, self.cfg, self.scenario, self.strategy, self.memory, self.state,
                monitor, self.scenario[t], stats, PhaseTimer(), curves_before=len(monitor.rows),
                quiet=True,
            )  # fmt: skip
            self.work = Work(begun=t, consolidated=t, synced_version=self.work.synced_version)
            self._save_work(tensors=False)
        row = self.state.accuracy[-1] if self.state.accuracy else []
        # the validation splits of the experiences the test splits were scored on; those of the
        # seen ones come from the strategy's feature cache when calibration computed them in
        # this process under these weights; else one pass
        n = num_scored(self.state.completed, len(self.scenario), self.cfg.eval.future)
        val = evaluate_split(self.strategy, self.scenario.experiences[:n], split="val", quiet=True)
        pad = [float("nan")] * (len(self.scenario) - n)
        val_acc, val_bal = [e.accuracy for e in val] + pad, [e.balanced_accuracy for e in val] + pad
        return {
            "accuracy": [(-1.0 if np.isnan(a) else float(a)) for a in row],
            "test-examples": [len(e.test) for e in self.scenario],
            "val-accuracy": [(-1.0 if np.isnan(a) else float(a)) for a in val_acc],
            "val-balanced-accuracy": [(-1.0 if np.isnan(a) else float(a)) for a in val_bal],
            "val-examples": [len(e.val) for e in self.scenario],
            "completed": self.state.completed,
            "synced-version": version,
        }

    # -- helpers ---------------------------------------------------------------------------------
    def _enter(self, t: int, arrays: dict[str, np.ndarray], version: int) -> None:
        """Reach experience ``t`` (catching up a missed one), then load the server's tensors."""
        if t >= len(self.scenario):
            raise ConfigError(
                f"site {self.name!r}: the server asked for experience {t}; the "
                f"scenario has {len(self.scenario)}. Are both on the same config?"
            )
        self._catch_up(t)
        if self.work.begun < t:
            self._begin(t)
            self.work = dataclasses.replace(self.work, begun=t, fit={})
        load_arrays(self.strategy, arrays)
        self.work.synced_version = version

    def _remember(self, t: int) -> None:
        """Experience ``t``'s own rows into the memory (herding on the current model)."""
        if len(self.scenario[t].train):
            update_memory(self.strategy, self.scenario[t], self.memory)

    def _proximal(self, keys: list[str], mu: float):
        """FedProx's ``mu/2 ||w - w_global||^2`` over the trained parameters (Li et al., 2020)."""
        params = dict(self.strategy.named_parameters())
        anchor = {k: params[k].detach().clone() for k in keys if k in params}
        return lambda: 0.5 * mu * sum(((params[k] - a) ** 2).sum() for k, a in anchor.items())

    def write_report(self) -> Path:
        from medcl.reports import write_report  # heavy (matplotlib, jinja2): only at the end

        return write_report(self.dir)
