"""The one training loop: ``fit_experience`` trains a strategy on one experience.

Read it top to bottom. Batches are slices of in-memory tensors (no DataLoader workers or per-sample
collate: two CPU cores stay on the model), replay samples are concatenated when the strategy
uses the memory, and the strategy's hooks are called by name (see ``medcl.strategies.base``).
"""

from __future__ import annotations

__all__ = [
    "FitStats",
    "LossStep",
    "begin_experience",
    "end_experience",
    "fit_experience",
    "make_optimizer",
    "seed_everything",
    "train_updates",
    "update_memory",
]

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from medcl.config import TrainConfig
from medcl.data.experience import Experience
from medcl.data.memory import ReplayMemory
from medcl.data.transforms import build_batch_augment
from medcl.engine.device import bf16_available, use_layout
from medcl.engine.distributed import SINGLE, DistContext
from medcl.engine.early_stopping import EarlyStopping
from medcl.engine.evaluate import CurveMonitor
from medcl.engine.loggers import ExperimentLogger
from medcl.engine.optim import make_optimizer, make_scheduler
from medcl.engine.timing import PhaseTimer
from medcl.strategies.base import Batch, ExperienceInfo, Strategy


@dataclass(frozen=True)
class FitStats:
    """What one ``fit_experience`` call did.

    ``seconds`` is the update loop's wall time without the curve evaluations inside it (so
    ``images_per_s`` is training throughput); the other phases are in the run's timer.
    """

    updates: int
    images: int
    seconds: float
    #: training loss of the first, highest and last update (this rank's batch; NaN: no update)
    loss_first: float = float("nan")
    loss_max: float = float("nan")
    loss_last: float = float("nan")
    #: epochs run, the one whose weights were kept, and the validation score after each epoch
    #: (early stopping; otherwise the last epoch is kept and nothing is scored)
    epochs: int = 0
    best_epoch: int = 0
    val_scores: tuple[float, ...] = ()

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (model init, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class LossStep(nn.Module):
    """``batch -> (logits, loss + penalty)``: one training step's forward as one module.

    DDP wraps this module, not the strategy, so that every parameter the loss reaches is in the
    graph of the wrapped forward's output. A parameter used only by ``loss``/``penalty`` (DER's
    auxiliary classifier) would otherwise count as unused and be marked ready twice.
    """

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        logits = self.strategy(batch.x)  # (B, num_seen_classes)
        return logits, self.strategy.loss(logits, batch) + self.strategy.penalty(batch, logits)


def experience_info(exp: Experience, num_seen_classes: int) -> ExperienceInfo:
    return ExperienceInfo(exp.index, exp.name, exp.task_id, tuple(exp.classes), num_seen_classes)


def fit_experience(
    strategy: Strategy,
    exp: Experience,
    *,
    past: Sequence[Experience],
    num_seen_classes: int,
    memory: ReplayMemory,
    cfg: TrainConfig,
    replay_batch_size: int | None = None,
    monitor: CurveMonitor | None = None,
    global_update: int = 0,
    seed: int = 0,
    quiet: bool = False,
    dist: DistContext = SINGLE,
    logger: ExperimentLogger | None = None,
    timer: PhaseTimer | None = None,
) -> FitStats:
    """Train ``strategy`` on ``exp``: hooks, optimisation, curve points, memory update.

    Args:
        strategy: the method being trained (modified in place).
        exp: the experience to learn.
        past: experiences learned before, in order.
        num_seen_classes: classes known after this experience (sizes the heads).
        memory: the replay memory (sampled only if ``strategy.uses_memory``; always updated).
        cfg: optimisation settings.
        replay_batch_size: replay samples added to each batch (default ``cfg.batch_size``).
        monitor: records old/new/all accuracy every ``monitor.every`` updates.
        global_update: updates done before this experience (x-axis of the curves).
        seed: seeds this experience's shuffling, replay sampling and augmentation, so that a run
            resumed at this experience repeats it exactly.
        quiet: no progress bar.
        dist: the data-parallel job (:mod:`medcl.engine.distributed`): each rank trains on its
            shard of every global batch (``cfg.batch_size`` is global) through DDP; rank 0's
            model and memory are broadcast at the end. Pass ``monitor`` on rank 0 only.
        logger: logs the training loss (averaged over ranks) and lr every ``logger.every``
            updates; every rank passes one built from the same config.
        timer: receives the wall time of ``train`` (the loop without curve evaluations),
            ``curves``, ``consolidation``, ``memory`` and ``features`` (the forward passes
            consolidation and memory selection made, e.g. for herding).
    """
    timer = timer if timer is not None else PhaseTimer()
    begin_experience(strategy, exp, num_seen_classes=num_seen_classes, memory=memory, seed=seed)
    stats = train_updates(
        strategy, exp, past=past, memory=memory, cfg=cfg, replay_batch_size=replay_batch_size,
        monitor=monitor, global_update=global_update, seed=seed, quiet=quiet, dist=dist,
        logger=logger, timer=timer,
    )  # fmt: skip
    end_experience(
        strategy, exp, memory=memory, timer=timer, dist=dist, channels_last=cfg.channels_last
    )
    return stats


def begin_experience(
    strategy: Strategy, exp: Experience, *, num_seen_classes: int, memory: ReplayMemory, seed: int
) -> None:
    """Step 1 of :func:`fit_experience`: seed, then the strategy's structure and set-up for ``exp``.

    Federated sites (:mod:`medcl.federated`) call the three steps apart: this one in the first
    round of an experience, :func:`train_updates` every round, :func:`end_experience` once.
    """
    strategy.feature_cache.clear()  # a new experience: nothing computed before is reused
    seed_everything(seed)
    strategy.grow(experience_info(exp, num_seen_classes))
    strategy.before_experience(exp, memory)


def train_updates(
    strategy: Strategy,
    exp: Experience,
    *,
    past: Sequence[Experience],
    memory: ReplayMemory,
    cfg: TrainConfig,
    replay_batch_size: int | None = None,
    monitor: CurveMonitor | None = None,
    global_update: int = 0,
    seed: int = 0,
    quiet: bool = False,
    dist: DistContext = SINGLE,
    logger: ExperimentLogger | None = None,
    timer: PhaseTimer | None = None,
    penalty: Callable[[], Tensor] | None = None,
) -> FitStats:
    """Step 2 of :func:`fit_experience`: ``cfg.epochs`` epochs (at most ``cfg.max_updates``).

    ``penalty`` is added to every update's loss (FedProx's proximal term); the other arguments
    are :func:`fit_experience`'s.
    """
    timer = timer if timer is not None else PhaseTimer()
    g = torch.Generator().manual_seed(seed)
    augment = build_batch_augment(exp.train.spatial_dims, cfg.augment, seed=seed)
    data = strategy.training_set(exp, past)
    replay = strategy.uses_memory and len(memory) > 0
    exp_ids = (
        torch.tensor(data.meta["experience"].to_numpy(dtype="int64"))
        if "experience" in data.meta.columns
        else None
    )
    n_replay = replay_batch_size or cfg.batch_size

    # NHWC (train.channels_last, 2D; medcl.engine.device.use_layout) for the loop, contiguous
    # again after it
    channels_last = _nhwc(strategy, cfg.channels_last, exp, dist)

    # 2. optimiser over what the strategy trains, one schedule for the whole experience
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_updates is not None:
        total = min(total, cfg.max_updates)
    params = list(strategy.trainable_parameters())
    # the strategy's own optimiser and schedule if it has one (SGM), else the run's
    own = strategy.configure_optimizers(cfg, params, total) if params else None
    opt, sched = own if own is not None else (None, None)
    if own is None and params:
        opt = make_optimizer(cfg, params, strategy)
        sched = make_scheduler(cfg, opt, total)

    if monitor is not None and monitor.every:
        with timer("curves"):
            monitor.record(strategy, exp.index, global_update, 0)  # the level before any update

    # 3. the loop
    device = next(strategy.parameters()).device
    amp = cfg.amp and bf16_available(device)
    strategy.train()
    # DDP (after `grow`/`before_experience`: the final parameters) around forward + loss
    train_step = dist.wrap(LossStep(strategy))
    if cfg.compile:  # compiled on the first batch of each experience (the modules change)
        train_step = torch.compile(train_step)
    curve_seconds = sum(timer.seconds.get(k, 0.0) for k in ("curves", "validation"))
    start, step, seen, epoch = time.perf_counter(), 0, 0, 0
    losses = (math.nan,) * 3  # first, highest, last
    bar = tqdm(
        total=total,
        desc=f"exp {exp.index} {exp.name}",
        disable=quiet or not params or not dist.is_main,
        leave=False,
        dynamic_ncols=True,
    )
    # early stopping (train.early_stopping_patience): train.epochs is then a cap
    patience = cfg.early_stopping_patience if params else None
    stopper = EarlyStopping([*past, exp], patience) if patience else None
    while step < total and epoch < cfg.epochs and params:
        rows = strategy.epoch_rows(epoch, len(data))  # all rows unless the method drops some
        order = rows[torch.randperm(len(rows), generator=g)]
        epoch += 1
        for i in range(0, len(order), cfg.batch_size):
            if step >= total:
                break
            idx = order[i : i + cfg.batch_size]
            x, y = data.images[idx], data.labels[idx]  # (B, C, H, W[, D]), (B,)
            # a training set that joins other experiences' samples (DynaMMo's stage 1) names
            # each row's experience in an `experience` column; otherwise all rows are `exp`'s
            e = exp_ids[idx] if exp_ids is not None else torch.full_like(y, exp.index)
            rix = idx
            if replay:
                mx, my, me = memory.sample(n_replay, g)
                x, y, e = torch.cat([x, mx]), torch.cat([y, my]), torch.cat([e, me])
                rix = torch.cat([idx, torch.full_like(my, -1)])
            # raw batch to the device first (uint8 is 4x smaller), then augment it there; the
            # whole global batch, so that each row gets the draws it gets in one process
            n = len(y)
            x = augment(x.to(device))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)  # (B, C, H, W) as NHWC
            # DDP: every rank built the same global batch; each keeps rows rank, rank + N, ...
            x, y, e, rix = dist.shard(x, y, e, rix)
            y, e = y.to(device), e.to(device)
            batch = Batch(x=x, y=y, exp=e, replay=e != exp.index, index=rix.to(device))

            # bf16 only on CUDA devices that support it: CPUs here have no fast bf16 (40x slower)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                _logits, loss = train_step(batch)  # (B, num_seen_classes), (); DDP in a job
                if penalty is not None:
                    loss = loss + penalty()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at update {step} of experience {exp.index}; lower "
                    "train.lr or check the strategy's hyper-parameters."
                )
            opt.zero_grad(set_to_none=True)
            weight = dist.loss_weight(len(y), n)  # DDP averages gradients: weight by share
            (loss * weight).backward()
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            seen += n
            strategy.after_update(step)
            if logger is not None and logger.due(step):  # on every rank: the mean is collective
                lr = opt.param_groups[0]["lr"]
                mean_loss = dist.mean(loss.item() * weight)  # = the global batch's mean loss
                logger.log({"train/loss": mean_loss, "train/lr": lr}, global_update + step)
            value = loss.item()
            losses = (value,) * 3 if step == 1 else (losses[0], max(losses[1], value), value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            if monitor is not None and monitor.due(step):
                with timer("curves"):
                    monitor.record(strategy, exp.index, global_update + step, step)
                strategy.train()
        if stopper is not None:
            with timer("validation"):
                stop = stopper.should_stop(strategy)
            if stop:
                break
    bar.close()
    scored = sum(timer.seconds.get(k, 0.0) for k in ("curves", "validation")) - curve_seconds
    seconds = time.perf_counter() - start - scored
    timer.add("train", seconds)
    if stopper is not None:
        stopper.restore_best(strategy)
    use_layout(strategy, False, exp.train.spatial_dims)
    first, high, last = losses
    best, scores = (stopper.best_epoch, tuple(stopper.scores)) if stopper else (epoch, ())
    return FitStats(
        step, seen, seconds, first, high, last, epochs=epoch, best_epoch=best, val_scores=scores
    )


def _nhwc(strategy: Strategy, channels_last: bool, exp: Experience, dist: DistContext) -> bool:
    """Put a 2D strategy in NHWC for a phase (not under DDP: its gradient buckets expect the
    strides 1x1 convolutions lose in NHWC, and it warns on every step)."""
    return channels_last and not dist.enabled and use_layout(strategy, True, exp.train.spatial_dims)


def end_experience(
    strategy: Strategy,
    exp: Experience,
    *,
    memory: ReplayMemory,
    timer: PhaseTimer | None = None,
    dist: DistContext = SINGLE,
    channels_last: bool = False,
) -> None:
    """Step 3 of :func:`fit_experience`: the strategy's consolidation, then the memory update
    (in NHWC with ``channels_last``, as :func:`train_updates`; contiguous after)."""
    timer = timer if timer is not None else PhaseTimer()
    cache = strategy.feature_cache
    _nhwc(strategy, channels_last, exp, dist)

    # 4. consolidation, then the memory (herding uses the consolidated features); under DDP
    # every rank runs both from rank 0's state (BatchNorm statistics are per rank until here)
    dist.sync(strategy)
    cache.clear()  # the broadcast wrote through `.data`, which tensor versions do not count
    # the forward passes of both (features for herding, stage-2 sets) are timed as "features"
    passes = cache.seconds
    with timer("consolidation"):
        strategy.after_experience(exp, memory)
    timer.add("features", cache.seconds - passes)
    timer.add("consolidation", passes - cache.seconds)
    strategy.eval()
    update_memory(strategy, exp, memory, timer=timer)
    dist.sync(strategy, memory)  # every rank continues from exactly rank 0's model and memory
    cache.clear()
    use_layout(strategy, False, exp.train.spatial_dims)


def update_memory(
    strategy: Strategy, exp: Experience, memory: ReplayMemory, *, timer: PhaseTimer | None = None
) -> None:
    """``exp``'s exemplars into ``memory`` (step 4 of :func:`end_experience`), herding's features
    from the strategy's feature cache: a consolidation that herded on the same features
    (DynaMMo's stage 2) already computed them."""
    timer = timer if timer is not None else PhaseTimer()
    cache = strategy.feature_cache

    def features(rows: Tensor | None = None) -> Tensor:
        desc = f"exp {exp.index} {exp.name}: memory features"
        return cache.outputs(
            "features", strategy, strategy.features, exp.train.images, rows, desc=desc
        )

    passes = cache.seconds
    with timer("memory"):
        if memory.needs_features:
            features()  # every row in one pass (one progress line); herding reads them per class
        memory.update(exp, features=features)
    timer.add("features", cache.seconds - passes)
    timer.add("memory", passes - cache.seconds)
