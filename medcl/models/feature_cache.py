"""Model outputs on sample sets, computed once per model state: :class:`FeatureCache`.

Several consumers ask for the same forward passes: DynaMMo's stage 2 herds the new classes on
the merged-adapter features, then the replay memory herds the same experience on the same
features; the every-k curves score old, new and all test subsets at one instant. They ask the
one cache of the strategy (:attr:`medcl.strategies.base.Strategy.feature_cache`) instead of
running the model themselves.

The invalidation rule (no hook has to remember to call anything): an entry holds the outputs of
one named function of one model on rows of one images tensor, and is valid while

1. the inputs are the same tensor (the entry holds it, so its identity cannot be reused);
2. the model has the same parameters and buffers, as objects (growing a head, adding an adapter
   set or replacing a network changes them);
3. every parameter and buffer of every module that ran to produce the outputs is at the
   version it had then. torch increments a tensor's version on every in-place write (optimizer
   steps, ``load_state_dict``, merges, masks); BatchNorm's running statistics are covered by
   its ``num_batches_tracked``, which every training-mode pass increments.

So a change that touches only modules the outputs do not depend on (stage 2 re-tuning the
heads) keeps the features, and any other change drops them. Outputs are computed with every
module in eval mode (the modes are restored after), without gradients. What the rule cannot
see, code that changes such state calls :meth:`FeatureCache.clear`: a write through
``tensor.data`` (torch does not count it; DDP's broadcast does this) or a Python attribute that
changes what a forward computes without changing any tensor. The trainer clears the cache when
an experience starts and after synchronising ranks.
"""

from __future__ import annotations

__all__ = ["DEFAULT_BATCH_SIZE", "FeatureCache"]

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from medcl.data.transforms import to_model_input
from medcl.models.folding import folded_batchnorm
from medcl.progress import progress_bar

#: Images per forward pass when scoring, unless set (the run sets ``eval.batch_size``;
#: benchmarks/end_to_end.py measures scoring throughput per batch size).
DEFAULT_BATCH_SIZE = 64


def _tensors(module: nn.Module, *, recurse: bool) -> list[Tensor]:
    return [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]


def _batch_statistics(model: nn.Module) -> bool:
    """Whether a BatchNorm of ``model`` normalises with each batch's statistics in eval mode
    (``track_running_stats=False``, e.g. MC-SGD's networks)."""
    norms = (nn.modules.batchnorm._NormBase,)
    return any(isinstance(m, norms) and not m.track_running_stats for m in model.modules())


@dataclass
class _Entry:
    images: Tensor  # (N, C, ...) the inputs; held, so the identity check is sound
    tree: list[Tensor]  # every parameter and buffer of the model when computed
    watched: list[Tensor] = field(default_factory=list)  # what produced the outputs
    versions: list[int] = field(default_factory=list)
    values: Tensor | None = None  # (N, ...) float32 outputs on the CPU
    done: Tensor | None = None  # (N,) bool: rows computed

    def valid(self, images: Tensor, tree: list[Tensor]) -> bool:
        return (
            self.images is images
            and len(self.tree) == len(tree)
            and all(a is b for a, b in zip(self.tree, tree, strict=True))
            and all(t._version == v for t, v in zip(self.watched, self.versions, strict=True))
        )

    def watch(self, ran: list[Tensor]) -> None:
        """Record the tensors that ran (all of the model's when some ran outside it)."""
        inside = {id(t) for t in self.tree}
        if not all(id(t) in inside for t in ran):  # e.g. a copy made inside the function
            ran = self.tree
        known = {id(t) for t in self.watched}
        for t in ran:
            if id(t) not in known:
                known.add(id(t))
                self.watched.append(t)
        self.versions = [t._version for t in self.watched]


class FeatureCache:
    """Outputs of a model on sample sets, computed once per model state (see the module).

    Args:
        batch_size: images per forward pass (the run sets ``eval.batch_size``).
        fold_batchnorm: fold the backbones' BatchNorms into their convolutions for the passes
            (:func:`~medcl.models.folding.folded_batchnorm`; the run sets
            ``eval.fold_batchnorm``).

    Attributes:
        computed: rows computed so far (forward passes, one per row).
        reused: rows served from the cache.
        seconds: wall time spent computing.
    """

    #: False turns the cache off: every call computes (to check that results do not change).
    enabled: ClassVar[bool] = True

    def __init__(
        self, *, batch_size: int = DEFAULT_BATCH_SIZE, fold_batchnorm: bool = True
    ) -> None:
        self.batch_size = batch_size
        self.fold_batchnorm = fold_batchnorm
        self.computed = 0
        self.reused = 0
        self.seconds = 0.0
        self._entries: dict[tuple[str, bool, bool, int], _Entry] = {}

    def __deepcopy__(self, memo: dict) -> FeatureCache:
        """A copy of a model gets an empty cache (entries belong to the original's tensors)."""
        return FeatureCache(batch_size=self.batch_size, fold_batchnorm=self.fold_batchnorm)

    def clear(self) -> None:
        """Drop every entry (see the module for when a caller must)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def outputs(
        self,
        name: str,
        model: nn.Module,
        fn: Callable[[Tensor], Tensor],
        images: Tensor,
        rows: Tensor | None = None,
        *,
        bf16: bool = False,
        batch_size: int | None = None,
        desc: str | None = None,
    ) -> Tensor:
        """``fn(model input)`` for ``images[rows]``, computed only for rows not yet cached.

        Args:
            name: what ``fn`` computes, e.g. ``"features"`` or ``"scores"``; one name, one
                function of ``model``.
            model: the module whose state the outputs depend on (a strategy).
            fn: ``(B, C, H, W[, D])`` model input -> ``(B, ...)`` outputs.
            images: ``(N, C, H, W[, D])`` raw images (uint8 or float in [0, 1]), e.g. a sample
                set's ``images``, on any device (each batch is moved to the model's).
            rows: ``(n,)`` rows of ``images`` (default: all).
            bf16: run under bf16 autocast (the caller checked the device supports it; see
                :func:`medcl.engine.device.bf16_available`); a separate entry.
            batch_size: images per forward pass (default: :attr:`batch_size`).
            desc: progress-bar label while computing (None: no bar).

        Returns:
            ``(n, ...)`` float32 outputs on the CPU, in the order of ``rows``.
        """
        parts = [(images, rows)]
        return self.outputs_many(
            name, model, fn, parts, bf16=bf16, batch_size=batch_size, desc=desc
        )[0]

    def outputs_many(
        self,
        name: str,
        model: nn.Module,
        fn: Callable[[Tensor], Tensor],
        parts: Sequence[tuple[Tensor, Tensor | None]],
        *,
        bf16: bool = False,
        batch_size: int | None = None,
        desc: str | None = None,
    ) -> list[Tensor]:
        """:meth:`outputs` of several ``(images, rows)`` sets in one pass: the rows not yet
        cached, of every set, share full batches (many small test sets, e.g. one per site,
        cost one batch each otherwise). Sets whose images differ in shape, dtype or device are
        batched apart, and so is every set when a BatchNorm of ``model`` normalises with the
        batch's own statistics (no running statistics: a batch mixing two sets would change
        each set's outputs). A tensor given twice is computed once.

        Returns:
            one ``(n_i, ...)`` float32 CPU tensor per part, in the order of its ``rows``.
        """
        tree = _tensors(model, recurse=True)
        entries: dict[tuple, _Entry] = {}
        needs: dict[tuple, Tensor] = {}
        asked: list[tuple[tuple, Tensor]] = []
        for images, rows in parts:
            rows = torch.arange(len(images)) if rows is None else torch.as_tensor(rows).long()
            key = (name, bf16, self.fold_batchnorm, id(images))
            if key not in entries:
                entry = self._entries.get(key)
                entries[key] = (
                    entry if entry and entry.valid(images, tree) else _Entry(images, tree)
                )
                needs[key] = rows[:0]
            done = entries[key].done
            need = rows if done is None else rows[~done[rows]]
            needs[key] = torch.unique(torch.cat([needs[key], need]))
            asked.append((key, rows))
        self.reused += sum(len(r) for _, r in asked) - sum(len(n) for n in needs.values())
        apart = _batch_statistics(model)
        groups: dict[tuple, list[tuple[_Entry, Tensor]]] = {}  # sets that can share batches
        for key, need in needs.items():
            if len(need):
                images = entries[key].images
                kind = key if apart else (tuple(images.shape[1:]), images.dtype, images.device)
                groups.setdefault(kind, []).append((entries[key], need))
        for work in groups.values():
            size = batch_size or self.batch_size
            self._compute(work, model, fn, bf16=bf16, batch_size=size, desc=desc)
        for key, entry in entries.items():
            if self.enabled:
                self._entries[key] = entry
            else:
                self._entries.pop(key, None)
        out = []
        for key, rows in asked:
            entry = entries[key]
            blank = entry.values is None
            out.append(self._blank(model, fn, entry.images) if blank else entry.values[rows])
        return out

    @staticmethod
    def _blank(model: nn.Module, fn: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
        """``(0, ...)`` outputs of a set without rows (a federated site without this cohort),
        shaped by one blank input in eval mode (BatchNorm statistics must not see it)."""
        was_training, device = model.training, next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            blank = torch.zeros((1, *images.shape[1:]), device=device)
            out = fn(to_model_input(blank)).float().cpu()[:0]
        model.train(was_training)
        return out

    def _compute(
        self,
        work: Sequence[tuple[_Entry, Tensor]],
        model: nn.Module,
        fn: Callable[[Tensor], Tensor],
        *,
        bf16: bool,
        batch_size: int,
        desc: str | None,
    ) -> None:
        """Run ``fn`` on the ``(entry, rows)`` of ``work`` in eval mode, in shared batches
        (BatchNorms folded unless :attr:`fold_batchnorm` is off), recording which modules ran
        (the originals of the folded ones)."""
        start = time.perf_counter()
        device = next(model.parameters()).device
        modes = [(m, m.training) for m in model.modules()]
        ran: dict[int, nn.Module] = {}

        def seen(module: nn.Module, args: object) -> None:
            ran[id(module)] = module

        # (entry number, row) of every row to compute, in order, then cut into batches
        which = torch.cat([torch.full((len(r),), i) for i, (_, r) in enumerate(work)])
        flat = torch.cat([r for _, r in work])
        hook = None
        bar = progress_bar(total=len(flat), desc=desc, unit="img", hide=desc is None)
        model.eval()
        try:
            with (
                torch.no_grad(),
                folded_batchnorm(model, enabled=self.fold_batchnorm) as originals,
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
            ):
                # after the fold (its trace calls modules with proxies, not rows)
                hook = nn.modules.module.register_module_forward_pre_hook(seen)
                for sel in torch.arange(len(flat)).split(batch_size):
                    ids = which[sel].unique_consecutive()
                    pieces = [(work[i][0], flat[sel][which[sel] == i]) for i in ids.tolist()]
                    raw = torch.cat([e.images[idx] for e, idx in pieces])
                    out = fn(to_model_input(raw.to(device))).float().cpu()  # (B, ...)
                    for (entry, idx), chunk in zip(
                        pieces, out.split([len(idx) for _, idx in pieces]), strict=True
                    ):
                        if entry.values is None:
                            n = len(entry.images)
                            entry.values = out.new_zeros((n, *out.shape[1:]))
                            entry.done = torch.zeros(n, dtype=torch.bool)
                        entry.values[idx] = chunk
                    bar.update(len(sel))
        finally:
            if hook is not None:
                hook.remove()
            bar.close()
            for m, training in modes:
                m.training = training
        ran_as = [o for i, m in ran.items() for o in originals.get(i, [m])]
        tensors = [t for m in ran_as for t in _tensors(m, recurse=False)]
        for entry, rows in work:
            assert entry.done is not None
            entry.done[rows] = True
            entry.watch(tensors)
        self.computed += len(flat)
        self.seconds += time.perf_counter() - start
