"""Worker side of ``benchmarks/stability_gap.py``: one task = one training job.

Every task is a plain dict (picklable) and returns a JSON-able dict; tasks run in worker
processes (``--jobs``) or inline. Kinds:

- ``base``: the base model of a (stream, seed): the pretrained backbone's features of experience
  0 (frozen, eval mode, no augmentation: exactly what training the head alone through the trainer
  sees) and a linear head trained on them; learning rate and number of epochs are chosen on
  experience 0's *validation* split. The head is saved for the arms.
- ``arm``: a vanilla arm, SGM or an ablation from that base, experiences 1.. through
  :func:`medcl.engine.trainer.fit_experience`, with old/new/all accuracy every ``k`` updates on
  fixed test subsets, the test accuracy matrix over the experiences seen so far and the
  training FLOPs of one update (``torch.utils.flop_counter``). A learning-rate selection run
  (``select``) is trained the same way but returns only its final validation accuracy: its
  curves would never be reported, and they cost as much as the training.
- ``joint``: the upper bound for experience ``t``: the same network (front frozen, back + head
  trained, same optimiser) trained on the union of experiences ``0..t`` to convergence, the
  epoch kept by validation accuracy; its accuracy on the curves' old/new/all test subsets.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
from _stability_front import back_scores, cached_front, check_shortcut
from torch import nn

from medcl.config import TrainConfig
from medcl.data.experience import Experience
from medcl.data.memory import ReplayMemory
from medcl.data.samples import SampleSet
from medcl.data.transforms import to_model_input
from medcl.engine.evaluate import evaluate, predict_proba
from medcl.engine.trainer import experience_info, fit_experience, seed_everything
from medcl.models.backbones import create_backbone
from medcl.models.plasticity import onecycle
from medcl.strategies import create_strategy
from medcl.strategies.base import Batch, Strategy

BACKBONE, WEIGHTS = "tf_efficientnet_lite0", "efficientnet_lite0"
_SCENARIOS: dict[tuple, Any] = {}
_FEATURES: dict[tuple, torch.Tensor] = {}  # the pretrained network's features: seed-free


def init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use auto or cpu.")
    return torch.device(name)


def scenario(spec: dict) -> Any:
    """The stream (data split of seed 0 for every run), built once per worker process."""
    from medcl.data.scenarios import build_scenario

    key = (spec["scenario"], spec["image_size"], spec["root"])
    if key not in _SCENARIOS:
        _SCENARIOS[key] = build_scenario(
            spec["scenario"], root=spec["root"], seed=0, image_size=spec["image_size"]
        )
    return _SCENARIOS[key]


def make_strategy(spec: dict, sc: Any, name: str, options: dict) -> Strategy:
    seed_everything(spec["seed"])
    bb = create_backbone(
        BACKBONE, in_chans=sc.input_shape[0], small_input=False, pretrained=WEIGHTS
    )
    s = create_strategy(name, bb, scenario_kind=sc.kind, **options)
    return s.to(device_of(spec["device"]))


def train_cfg(spec: dict, lr: float, **kw: Any) -> TrainConfig:
    return TrainConfig(
        epochs=kw.pop("epochs", 100_000),  # the update budget decides; data is cycled
        batch_size=spec["batch_size"],
        optimizer="adamw",
        lr=lr,
        weight_decay=spec["weight_decay"],
        augment="none",  # as the authors'
        amp=False,
        **kw,
    )


class GroupMonitor:
    """Old/new/all accuracy every ``every`` updates on fixed test subsets (<= ``max_samples``
    per experience, the same images for every arm and seed); each subset is predicted once per
    evaluation and the groups are pooled from the per-experience counts. With ``front`` (a
    cache key and ``trainable_stages``) the subsets' front outputs are computed once per
    process and only the back runs (:mod:`_stability_front`; checked against the full
    forward pass at the start of each experience)."""

    def __init__(
        self,
        experiences: list[Experience],
        *,
        every: int,
        max_samples: int,
        front: tuple[tuple, int] | None = None,
    ) -> None:
        self.every, self.rows, self.front, self._checked = every, [], front, set()
        g = torch.Generator().manual_seed(0)
        self.subsets = [
            e.test.subset(torch.randperm(len(e.test), generator=g)[:max_samples])
            for e in experiences
        ]

    def _scores(self, strategy: Strategy, i: int) -> torch.Tensor:
        if self.front is None:
            return predict_proba(strategy, self.subsets[i].images)
        key, stages = self.front
        front = cached_front((*key, i), strategy, self.subsets[i].images, stages)
        return back_scores(strategy, front, stages).cpu()

    def correct(self, strategy: Strategy, ids: list[int]) -> dict[int, tuple[int, int]]:
        out = {}
        for i in ids:
            scores = self._scores(strategy, i)
            out[i] = (int((scores.argmax(1) == self.subsets[i].labels).sum()), len(scores))
        return out

    @staticmethod
    def pooled(counts: dict[int, tuple[int, int]], ids: list[int]) -> float:
        n = sum(counts[i][1] for i in ids)
        return sum(counts[i][0] for i in ids) / n if n else float("nan")

    def record(self, strategy: Strategy, experience: int, update: int, offset: int) -> None:
        if self.front is not None and experience not in self._checked:
            key, stages = self.front
            images = self.subsets[experience].images
            front = cached_front((*key, experience), strategy, images, stages)
            check_shortcut(strategy, images[:16], front[:16], stages)
            self._checked.add(experience)
        counts = self.correct(strategy, list(range(experience + 1)))
        old = list(range(experience))
        self.rows.append(
            {
                "experience": experience,
                "update": update,
                "offset": offset,
                "old_acc": self.pooled(counts, old),
                "new_acc": self.pooled(counts, [experience]),
                "all_acc": self.pooled(counts, [*old, experience]),
            }
        )

    def due(self, offset: int) -> bool:
        return self.every > 0 and offset % self.every == 0


class ValSnapshot:
    """A trainer monitor that keeps the weights with the best validation accuracy."""

    def __init__(self, val: SampleSet, every: int) -> None:
        self.val, self.every, self.rows = val, every, []
        self.best: tuple[float, int, dict] = (-1.0, 0, {})

    def record(self, strategy: nn.Module, experience: int, update: int, offset: int) -> None:
        probs = predict_proba(strategy, self.val.images)
        acc = float((probs.argmax(1) == self.val.labels).float().mean())
        self.rows.append({"update": offset, "val_acc": acc})
        if acc > self.best[0]:
            state = {k: v.detach().clone() for k, v in strategy.state_dict().items()}
            self.best = (acc, offset, state)

    def due(self, offset: int) -> bool:
        return offset % self.every == 0


def run_task(task: dict) -> dict:
    start = time.perf_counter()
    out = {"base": base_task, "arm": arm_task, "joint": joint_task}[task["kind"]](task)
    return out | {"id": task["id"], "seconds": time.perf_counter() - start}


# -- base model ------------------------------------------------------------------------------
@torch.no_grad()
def _features(s: Strategy, images: torch.Tensor) -> torch.Tensor:
    s.eval()
    dev = s.head.weight.device
    return torch.cat(
        [
            s.features(to_model_input(images[i : i + 256].to(dev)))
            for i in range(0, len(images), 256)
        ]
    )  # (N, F) on the device


def base_task(task: dict) -> dict:
    sc = scenario(task)
    exp0 = sc.experiences[0]
    s = make_strategy(task, sc, "rehearsal", task["options"])
    s.grow(experience_info(exp0, sc.num_seen_classes(0)))
    dev = s.head.weight.device
    key = (task["scenario"], task["image_size"], task["root"], str(dev))
    if key not in _FEATURES:  # the frozen pretrained backbone: the same for every seed
        _FEATURES[key] = (_features(s, exp0.train.images), _features(s, exp0.val.images))
    f_tr, f_va = _FEATURES[key]
    y_tr, y_va = exp0.train.labels.to(dev), exp0.val.labels.to(dev)
    init = copy.deepcopy(s.head.state_dict())
    best, trace = (-1.0, 0, 0.0, init), []
    bs, epochs = task["batch_size"], task["base_epochs"]
    steps = math.ceil(len(y_tr) / bs)
    for lr in task["base_lrs"]:
        s.head.load_state_dict(init)
        g = torch.Generator().manual_seed(task["seed"])
        opt = torch.optim.AdamW(s.head.parameters(), lr=lr, weight_decay=task["weight_decay"])
        sched = onecycle(opt, steps * epochs, warmup=0.3)
        for ep in range(1, epochs + 1):
            for idx in torch.randperm(len(y_tr), generator=g).split(bs):
                idx = idx.to(dev)
                loss = nn.functional.cross_entropy(s.head(f_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                acc = float((s.head(f_va).argmax(1) == y_va).float().mean())
            trace.append({"lr": lr, "epoch": ep, "val_acc": acc})
            if acc > best[0]:
                best = (acc, ep, lr, copy.deepcopy(s.head.state_dict()))
    path = Path(task["head_path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.cpu() for k, v in best[3].items()}, tmp)
    tmp.replace(path)
    return {"val_acc": best[0], "epochs": best[1], "lr": best[2], "trace": trace}


# -- continual arms --------------------------------------------------------------------------
def _conv_backward_flop(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, *args, **kw
) -> int:
    """Convolution backward FLOPs: each requested gradient costs what the forward costs.

    PyTorch's own formula counts the weight gradient of a grouped (e.g. depthwise) convolution
    as if it were dense, ``groups`` times too many (torch 2.14: a 64-group 3x3 conv's weight
    gradient is counted as 64x its forward), which would inflate vanilla's FLOPs many-fold.
    """
    from torch.utils.flop_counter import conv_flop_count

    output_mask = args[2]  # (output_padding, groups, output_mask)
    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return fwd * (int(output_mask[0]) + int(output_mask[1]))


def _flops_per_update(s: Strategy, exp: Experience, n_seen: int, memory: ReplayMemory, bs: int):
    """Training FLOPs of one update (forward of all, backward of what trains) on a copy."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(s)
    probe.data_driven_init = False  # set-up cost is not an update
    probe.grow(experience_info(exp, n_seen))
    probe.before_experience(exp, memory)
    probe.train()
    g = torch.Generator().manual_seed(0)
    mx, my, me = memory.sample(bs, g)
    x = torch.cat([exp.train.images[:bs], mx])
    y = torch.cat([exp.train.labels[:bs], my])
    dev = probe.head.weight.device
    e = torch.cat([torch.full((min(bs, len(exp.train)),), exp.index), me]).to(dev)
    batch = Batch(x=to_model_input(x.to(dev)), y=y.to(dev), exp=e, replay=e != exp.index)
    fix = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=fix) as fc:
        probe.loss(probe(batch.x), batch).backward()
    return float(fc.get_total_flops())


def _test_accuracies(s: Strategy, exps: list[Experience]) -> list[float]:
    """Test accuracy of each of ``exps`` (the experiences seen so far)."""
    return [r.accuracy for r in evaluate(s, exps, split="test", quiet=True)]


def arm_task(task: dict) -> dict:
    sc = scenario(task)
    exps = list(sc.experiences)
    select = task.get("select", False)
    s = make_strategy(task, sc, task["strategy"], task["options"])
    s.grow(experience_info(exps[0], sc.num_seen_classes(0)))
    s.head.load_state_dict(torch.load(task["head_path"], weights_only=True))
    memory = ReplayMemory(task["memory"], selection="random", seed=task["seed"])
    memory.attach(exps)
    memory.update(exps[0])
    monitor = None
    if not select:
        key = (task["scenario"], task["image_size"], task["root"], task["eval_samples"])
        front = (key, task["options"]["trainable_stages"]) if task.get("front_cache") else None
        monitor = GroupMonitor(
            exps, every=task["eval_every"], max_samples=task["eval_samples"], front=front
        )
        monitor.record(s, 0, 0, 0)  # the deployed base: "pre" level of experience 1
        R = [_test_accuracies(s, exps[:1])]  # row t: the experiences seen after t
        flops = _flops_per_update(s, exps[1], sc.num_seen_classes(1), memory, task["batch_size"])
    cfg = train_cfg(task, task["lr"], max_updates=task["updates"], eval_every=task["eval_every"])
    updates, seconds = 0, []
    for exp in exps[1:]:
        stats = fit_experience(
            s,
            exp,
            past=exps[: exp.index],
            num_seen_classes=sc.num_seen_classes(exp.index),
            memory=memory,
            cfg=cfg,
            monitor=monitor,
            global_update=updates,
            seed=task["seed"] * 1000 + exp.index,
            quiet=True,
        )
        updates += stats.updates
        seconds.append(stats.seconds)
        if not select:
            R.append(_test_accuracies(s, exps[: exp.index + 1]))
    out = {"updates": updates, "train_seconds": sum(seconds)}
    if select:
        val = [r.accuracy for r in evaluate(s, exps, split="val", quiet=True)]
        return out | {"val_acc": sum(val) / len(val)}
    return out | {
        "curves": monitor.rows,
        "accuracy_matrix": R,
        "flops_per_update": flops,
        "init": s.diagnostics().get("init", []),
        "group_sizes": [len(x) for x in monitor.subsets],
    }


# -- joint upper bound -----------------------------------------------------------------------
def joint_task(task: dict) -> dict:
    sc = scenario(task)
    exps, t = list(sc.experiences), task["upto"]
    part = exps[: t + 1]
    classes = tuple(sorted({c for e in part for c in e.classes}))
    union = Experience(
        0,
        f"joint<={t}",
        0,
        classes,
        "",
        SampleSet.concat([e.train for e in part]),
        SampleSet.concat([e.val for e in part]),
        SampleSet.concat([e.test for e in part]),
    )
    s = make_strategy(task, sc, "rehearsal", task["options"])
    steps = math.ceil(len(union.train) / task["batch_size"])
    every = min(steps, task["joint_max_updates"] or steps)
    snap = ValSnapshot(union.val, every)
    cfg = train_cfg(
        task, task["lr"], epochs=task["joint_epochs"], max_updates=task["joint_max_updates"]
    )
    stats = fit_experience(
        s,
        union,
        past=[],
        num_seen_classes=sc.num_seen_classes(t),
        memory=ReplayMemory(0),
        cfg=cfg,
        monitor=snap,
        seed=task["seed"] * 1000 + t,
        quiet=True,
    )
    snap.record(s, 0, stats.updates, stats.updates)  # the end of training is a candidate too
    s.load_state_dict(snap.best[2])
    monitor = GroupMonitor(exps, every=0, max_samples=task["eval_samples"])
    counts = monitor.correct(s, list(range(t + 1)))
    old = list(range(t))
    return {
        "upto": t,
        "old": GroupMonitor.pooled(counts, old),
        "new": GroupMonitor.pooled(counts, [t]),
        "all": GroupMonitor.pooled(counts, [*old, t]),
        "val_acc": snap.best[0],
        "updates_kept": snap.best[1],
        "updates_trained": stats.updates,
        "val_trace": snap.rows,
    }
