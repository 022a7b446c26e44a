"""Train/val/test assignment of a file cohort: given by a ``split`` column, or seeded by patient.

No patient may have rows in two splits (that would leak patients between training and testing).
"""

from __future__ import annotations

__all__ = ["SPLITS", "assign_splits", "split_by_patient"]

from collections.abc import Sequence

import numpy as np
import pandas as pd

from medcl.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


def split_by_patient(
    groups: Sequence[str],
    labels: Sequence[int],
    *,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> np.ndarray:
    """Seeded train/val/test assignment of whole groups (patients), stratified by label.

    Each patient goes wholly to one split. Patients are stratified by their most frequent label
    and each stratum is cut by ``fractions`` (largest remainder), so small classes reach test.

    Returns:
        ``(N,)`` array of ``"train"``, ``"val"`` or ``"test"``, one entry per sample.
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or abs(f.sum() - 1) > 1e-6 or f[0] <= 0:
        raise ConfigError(
            "split fractions must be 3 non-negative numbers (train, val, test) summing to 1 "
            f"with train > 0; got {list(fractions)}. Example: (0.7, 0.1, 0.2)."
        )
    df = pd.DataFrame({"g": list(groups), "y": list(labels)})
    strata = df.groupby("g")["y"].agg(lambda y: y.value_counts().index[0])
    rng = np.random.default_rng(seed)
    assign: dict[str, str] = {}
    for _, pats in sorted(strata.groupby(strata).groups.items()):
        pats = rng.permutation(sorted(pats))
        raw = f * len(pats)
        n = np.floor(raw).astype(int)
        n[np.argsort(-(raw - n), kind="stable")[: len(pats) - n.sum()]] += 1
        for name, chunk in zip(SPLITS, np.split(pats, np.cumsum(n)[:2]), strict=True):
            assign.update(dict.fromkeys(chunk, name))
    return df["g"].map(assign).to_numpy()


def assign_splits(
    df: pd.DataFrame, labels: list[int], *, where: str, fractions: Sequence[float], seed: int
) -> np.ndarray:
    """The given split column (no patient in two splits) or a seeded patient-level split.

    Args:
        df: the cohort table, with a ``patient_id`` column (``""`` where unknown: each such row
            is its own patient) and optionally a lower-case ``split`` column.
        labels: each row's class id (the automatic split is stratified by it).
        where: the table's name, only to word the message.
        fractions, seed: of the automatic split (:func:`split_by_patient`).

    Raises:
        DataError: a patient has rows in more than one split of the given column.
    """
    patients = df["patient_id"]
    if "split" not in df.columns:
        groups = [p or f"\0row{i}" for i, p in enumerate(patients)]  # no id: each row its own
        return split_by_patient(groups, labels, fractions=fractions, seed=seed)
    known = patients != ""
    per = df["split"][known].groupby(patients[known]).nunique()
    bad = list(per[per > 1].index)
    if bad:
        raise DataError(
            f"{where}: patient_id {bad[:10]}{' ...' if len(bad) > 10 else ''} appear in more "
            "than one split, which leaks patients between training and testing. Put all rows of "
            "a patient in one split, or drop the split column for a seeded patient-level split."
        )
    return df["split"].to_numpy()
