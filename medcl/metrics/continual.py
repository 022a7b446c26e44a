"""Continual-learning metrics from the accuracy matrix ``R``.

``R`` is a ``(T, T)`` array with ``R[i, j]`` the accuracy on experience ``j``'s test set after
training experience ``i`` (0-based). Entries that were not evaluated (typically the upper
triangle in class-incremental runs, where future classes cannot be scored) are NaN.

Every metric is a pure function of ``R`` (and of the baseline vector ``b`` for FWT). A term whose
entries are NaN is left out of the mean with an :class:`~sklearn.exceptions.UndefinedMetricWarning`
naming it; a metric with no defined term is NaN with a warning that says why, never a crash and
never a silent 0.

References:
    - Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017
      (ACC, BWT, FWT).
    - Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018 (forgetting).
    - Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017
      (average incremental accuracy).
"""

from __future__ import annotations

__all__ = [
    "average_accuracy",
    "average_incremental_accuracy",
    "bwt",
    "check_accuracy_matrix",
    "final_accuracy",
    "forgetting",
    "forgetting_per_experience",
    "fwt",
    "matrix_to_frame",
    "summarize",
]

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from sklearn.exceptions import UndefinedMetricWarning

from medcl.errors import DataError

_FRAME_COLUMNS = (
    "after_experience",
    "eval_experience",
    "after_name",
    "eval_name",
    "metric",
    "value",
)


def check_accuracy_matrix(R: ArrayLike, *, name: str = "R") -> NDArray[np.float64]:
    """Validate an accuracy matrix and return it as a float64 array.

    Args:
        R: ``(T, T)`` accuracies, ``R[i, j]`` on experience ``j`` after training experience ``i``;
            NaN marks an entry that was not evaluated.
        name: argument name, used only to word the error message.

    Returns:
        ``(T, T)`` float64 copy of ``R``.

    Raises:
        DataError: ``R`` is not a non-empty square 2-D numeric array, or holds an infinite value.
    """
    try:
        arr = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{name} must be a (T, T) numeric accuracy matrix; could not convert it to float "
            f"({exc}). Pass a numpy array or nested lists of numbers (NaN for not evaluated)."
        ) from exc
    if arr.ndim != 2:
        raise DataError(
            f"{name} must be a 2-D (T, T) accuracy matrix; got {arr.ndim}-D shape {arr.shape}. "
            "Stack one row per trained experience."
        )
    if arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise DataError(
            f"{name} must be square and non-empty (T rows = T columns, one per experience); got "
            f"shape {arr.shape}. Evaluate every experience after each one, using NaN for pairs "
            "that were not evaluated."
        )
    if np.isinf(arr).any():
        i, j = np.argwhere(np.isinf(arr))[0]
        raise DataError(
            f"{name} must hold finite accuracies or NaN; got {arr[i, j]} at [{i}, {j}]. "
            "Use NaN for entries that were not evaluated."
        )
    return arr


def _nanmean_terms(terms: NDArray[np.float64], labels: Sequence[str], metric: str) -> float:
    """Mean of the defined terms; warn about NaN terms, NaN (with a warning) if none is defined."""
    if terms.size == 0:
        return float("nan")
    undefined = np.isnan(terms)
    if undefined.all():
        warnings.warn(
            f"{metric} is undefined: every term ({', '.join(labels)}) uses an entry that was not "
            "evaluated (NaN); returning NaN.",
            UndefinedMetricWarning,
            stacklevel=3,
        )
        return float("nan")
    if undefined.any():
        skipped = [lab for lab, u in zip(labels, undefined, strict=True) if u]
        warnings.warn(
            f"{metric}: left out {', '.join(skipped)} (not evaluated, NaN); averaging the "
            f"{int((~undefined).sum())} defined term(s).",
            UndefinedMetricWarning,
            stacklevel=3,
        )
    return float(np.nanmean(terms))


def _warn_single(metric: str, T: int) -> float:
    warnings.warn(
        f"{metric} is undefined for a stream of T={T} experience: it compares experiences "
        "learned earlier with later ones and needs T >= 2; returning NaN.",
        UndefinedMetricWarning,
        stacklevel=3,
    )
    return float("nan")


def average_accuracy(R: ArrayLike) -> float:
    """Average accuracy ACC of the final model over all experiences (Lopez-Paz & Ranzato 2017).

    ``ACC = 1/T * sum_{j=0}^{T-1} R[T-1, j]``: every experience counts equally whatever the size of
    its test set. Compare :func:`final_accuracy` (optionally sample-weighted) and
    :func:`average_incremental_accuracy` (averages over every step, not only the last).

    Args:
        R: ``(T, T)`` accuracy matrix.

    Returns:
        ACC in the unit of ``R``.
    """
    arr = check_accuracy_matrix(R)
    T = arr.shape[0]
    return _nanmean_terms(arr[-1], [f"R[{T - 1}, {j}]" for j in range(T)], "average_accuracy")


def final_accuracy(R: ArrayLike, *, weights: ArrayLike | None = None) -> float:
    """Accuracy of the final model on the union of all experiences' test sets.

    ``final = sum_j w_j R[T-1, j] / sum_j w_j`` with ``w_j`` the test-set size of experience ``j``.
    With ``weights=None`` all ``w_j = 1`` and the value equals :func:`average_accuracy` (ACC); the
    two differ when the test sets differ in size: ACC averages experiences, final accuracy
    averages test images (what a single evaluation of the deployed model on all data reports).
    Neither looks at intermediate models, unlike :func:`average_incremental_accuracy`.

    Args:
        R: ``(T, T)`` accuracy matrix.
        weights: ``(T,)`` non-negative test-set sizes (or any weights); ``None`` for equal weights.

    Returns:
        The weighted mean of the last row of ``R`` (NaN entries left out, with a warning).

    Raises:
        DataError: ``weights`` has the wrong shape or a negative / non-finite value.
    """
    arr = check_accuracy_matrix(R)
    T = arr.shape[0]
    last = arr[-1]
    if weights is None:
        return _nanmean_terms(last, [f"R[{T - 1}, {j}]" for j in range(T)], "final_accuracy")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (T,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() == 0:
        raise DataError(
            f"final_accuracy weights must be {T} finite non-negative numbers (one test-set size "
            f"per experience), not all zero; got {w.tolist()}."
        )
    defined = ~np.isnan(last)
    if not defined.all():
        _nanmean_terms(last, [f"R[{T - 1}, {j}]" for j in range(T)], "final_accuracy")
    if not (w[defined] > 0).any():
        return float("nan")
    return float(np.sum(w[defined] * last[defined]) / np.sum(w[defined]))


def average_incremental_accuracy(R: ArrayLike) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017, iCaRL).

    ``AIA = 1/T * sum_{i=0}^{T-1} A_i`` with ``A_i = 1/(i+1) * sum_{j<=i} R[i, j]``, the accuracy
    after step ``i`` on the experiences seen so far. It rewards models that are good all along the
    stream, not only at the end (:func:`average_accuracy` looks at the last row only). iCaRL
    weights ``A_i`` by test images; here every seen experience counts equally.

    Args:
        R: ``(T, T)`` accuracy matrix (only the lower triangle and diagonal are used).

    Returns:
        AIA in the unit of ``R``.
    """
    arr = check_accuracy_matrix(R)
    T = arr.shape[0]
    steps = np.full(T, np.nan)
    for i in range(T):
        row = arr[i, : i + 1]
        if not np.isnan(row).all():
            steps[i] = np.nanmean(row)
    return _nanmean_terms(steps, [f"step {i}" for i in range(T)], "average_incremental_accuracy")


def forgetting_per_experience(R: ArrayLike) -> NDArray[np.float64]:
    """Forgetting of each experience but the last (Chaudhry et al. 2018).

    ``f_j = max_{l in 0..T-2} R[l, j] - R[T-1, j]`` for ``j = 0..T-2``: how far the final model
    falls below the best accuracy ever reached on experience ``j``. NaN entries of ``R`` are
    ignored in the max.

    Args:
        R: ``(T, T)`` accuracy matrix.

    Returns:
        ``(T-1,)`` forgetting per experience (empty for ``T = 1``); NaN where undefined.
    """
    arr = check_accuracy_matrix(R)
    T = arr.shape[0]
    out = np.full(T - 1, np.nan)
    for j in range(T - 1):
        past = arr[: T - 1, j]
        if not np.isnan(past).all():
            out[j] = np.nanmax(past) - arr[T - 1, j]
    return out


def forgetting(R: ArrayLike) -> float:
    """Average forgetting (Chaudhry et al. 2018): mean of :func:`forgetting_per_experience`.

    ``F = 1/(T-1) * sum_{j=0}^{T-2} (max_{l in 0..T-2} R[l, j] - R[T-1, j])``. Positive means
    forgotten; NaN (with a warning) for ``T = 1``.

    Args:
        R: ``(T, T)`` accuracy matrix.

    Returns:
        Average forgetting in the unit of ``R``.
    """
    per = forgetting_per_experience(R)
    if per.size == 0:
        return _warn_single("forgetting", 1)
    return _nanmean_terms(per, [f"experience {j}" for j in range(per.size)], "forgetting")


def bwt(R: ArrayLike) -> float:
    """Backward transfer BWT (Lopez-Paz & Ranzato 2017).

    ``BWT = 1/(T-1) * sum_{j=0}^{T-2} (R[T-1, j] - R[j, j])``: the change on each experience
    between just after learning it and the end of the stream. Negative means forgetting;
    NaN (with a warning) for ``T = 1``.

    Args:
        R: ``(T, T)`` accuracy matrix.

    Returns:
        BWT in the unit of ``R``.
    """
    arr = check_accuracy_matrix(R)
    T = arr.shape[0]
    if T == 1:
        return _warn_single("bwt", T)
    terms = arr[T - 1, : T - 1] - np.diag(arr)[: T - 1]
    return _nanmean_terms(terms, [f"experience {j}" for j in range(T - 1)], "bwt")


def fwt(R: ArrayLike, b: ArrayLike) -> float:
    """Forward transfer FWT (Lopez-Paz & Ranzato 2017).

    ``FWT = 1/(T-1) * sum_{j=1}^{T-1} (R[j-1, j] - b[j])``: accuracy on experience ``j`` just
    before training on it, relative to the initial (untrained) model's accuracy ``b[j]``. Needs
    the upper diagonal ``R[j-1, j]``; NaN (with a warning) for ``T = 1`` or when it was not
    evaluated.

    Args:
        R: ``(T, T)`` accuracy matrix.
        b: ``(T,)`` accuracy of the initial model on each experience (``b[0]`` is unused).

    Returns:
        FWT in the unit of ``R``.

    Raises:
        DataError: ``b`` is not a vector of ``T`` numbers.
    """
    arr = check_accuracy_matrix(R)
    T = arr.shape[0]
    base = np.asarray(b, dtype=np.float64)
    if base.shape != (T,):
        raise DataError(
            f"fwt baseline b must hold one accuracy per experience, shape ({T},); got shape "
            f"{base.shape}. Evaluate the initial model on every experience's test set."
        )
    if T == 1:
        return _warn_single("fwt", T)
    terms = np.array([arr[j - 1, j] - base[j] for j in range(1, T)])
    return _nanmean_terms(terms, [f"experience {j}" for j in range(1, T)], "fwt")


def summarize(R: ArrayLike, b: ArrayLike | None = None) -> dict[str, float]:
    """All continual metrics of ``R`` in one dict.

    Args:
        R: ``(T, T)`` accuracy matrix.
        b: ``(T,)`` initial-model accuracies for FWT; without it ``"fwt"`` is NaN (no warning,
            since it was not asked for).

    Returns:
        ``{"average_accuracy", "average_incremental_accuracy", "final_accuracy", "forgetting",
        "bwt", "fwt", "num_experiences"}``. For ``T = 1`` forgetting, BWT and FWT are NaN and an
        :class:`~sklearn.exceptions.UndefinedMetricWarning` explains why.
    """
    arr = check_accuracy_matrix(R)
    return {
        "average_accuracy": average_accuracy(arr),
        "average_incremental_accuracy": average_incremental_accuracy(arr),
        "final_accuracy": final_accuracy(arr),
        "forgetting": forgetting(arr),
        "bwt": bwt(arr),
        "fwt": float("nan") if b is None else fwt(arr, b),
        "num_experiences": float(arr.shape[0]),
    }


def matrix_to_frame(
    R: ArrayLike,
    names: Sequence[str] | None = None,
    *,
    metric: str = "accuracy",
    **labels: object,
) -> pd.DataFrame:
    """Tidy long form of an accuracy matrix: one row per (after, eval) pair.

    Args:
        R: ``(T, T)`` matrix (accuracy or any per-pair metric).
        names: ``T`` experience names; ``None`` uses ``"exp0"``, ``"exp1"``, ...
        metric: value of the ``metric`` column.
        **labels: constant extra columns, e.g. ``setting="task-agnostic"``, ``seed=0``.

    Returns:
        ``T*T`` rows with columns ``after_experience, eval_experience, after_name, eval_name,
        metric, value`` then the label columns. Not-evaluated pairs keep ``value = NaN``
        (use ``.dropna(subset=["value"])`` to drop them).

    Raises:
        DataError: ``names`` has the wrong length or a label collides with a core column.
    """
    arr = check_accuracy_matrix(R)
    T = arr.shape[0]
    if names is None:
        names = [f"exp{i}" for i in range(T)]
    elif isinstance(names, str) or len(names) != T:
        raise DataError(
            f"matrix_to_frame names must list one name per experience ({T}); got {names!r}."
        )
    clash = sorted(set(labels) & set(_FRAME_COLUMNS))
    if clash:
        raise DataError(
            f"matrix_to_frame label(s) {clash} collide with the core columns {list(_FRAME_COLUMNS)}; "
            "rename them."
        )
    after, evaluated = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    names_arr = np.asarray([str(n) for n in names], dtype=object)
    frame = pd.DataFrame(
        {
            "after_experience": after.ravel(),
            "eval_experience": evaluated.ravel(),
            "after_name": names_arr[after.ravel()],
            "eval_name": names_arr[evaluated.ravel()],
            "metric": metric,
            "value": arr.ravel(),
        }
    )
    for key, value in labels.items():
        frame[key] = value
    return frame
