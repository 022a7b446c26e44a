"""Class labels of file sources: one normalisation rule and the checks for suspicious labels.

The rule (applied to every label of a CSV manifest or class folder, and to class names when
``medcl update`` matches a new cohort to a run):

1. Surrounding whitespace is removed and inner runs of whitespace become one space
   (``" pleural  effusion "`` -> ``"pleural effusion"``).
2. An integer label loses its sign ``+`` and leading zeros (``"01"`` -> ``"1"``).
3. Case is kept: ``"Normal"`` and ``"normal"`` are NOT merged silently. Within one source they
   are an error; ``medcl update`` matches a cohort's class to the run's class of the same name
   ignoring case (``"Normal"`` is the run's ``"normal"``).

When the class list is inferred from the labels, suspicious labels are errors that list the rows
(see :func:`label_problems`): a missing-value marker (``NaN``, ``nan``, ``NA``, ``N/A``, ``null``,
``None``, ``?``, ``-``), integer labels outside the contiguous ids ``0..K-1`` / ``1..K`` that the
others form (``-1``, or ``7`` next to ``0`` and ``1``), names that differ only in case, and classes with fewer than
``min_class_samples`` rows next to classes with more (usually a typo such as ``covid`` next to
``covid-19``). With a declared
``class_names`` list, every other label is an error of its row; integer labels then index the
list when none of them is a declared name (``1`` -> ``class_names[1]``; ``7`` is out of range).
"""

from __future__ import annotations

__all__ = ["MISSING_MARKERS", "label_key", "label_problems", "normalise_label"]

import re
from collections.abc import Sequence

MISSING_MARKERS = frozenset({"nan", "na", "n/a", "#n/a", "<na>", "null", "none", "?", "-"})
_INT = re.compile(r"[+-]?\d+")


def normalise_label(label: str) -> str:
    """Apply the module's rule 1-2: trim and collapse whitespace, canonical integers."""
    text = " ".join(str(label).split())
    return str(int(text)) if _INT.fullmatch(text) else text


def label_key(label: str) -> str:
    """What two labels must share to be the same class ignoring case (for matching)."""
    return normalise_label(label).casefold()


def _rows(lines: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, lines[:limit]))
    return shown + (f" ... ({len(lines)} rows)" if len(lines) > limit else "")


def label_problems(
    labels: Sequence[str],
    lines: Sequence[int],
    *,
    min_class_samples: int,
    row_word: str = "line",
) -> list[str]:
    """Suspicious labels of a source whose class list is inferred from its labels.

    (With a declared ``class_names`` list, every label outside it is an error of its row.)

    Args:
        labels: normalised labels (:func:`normalise_label`), ``""`` for empty ones (reported
            elsewhere, per row).
        lines: the row number shown for each label (file line of a manifest).
        min_class_samples: classes with fewer rows are suspicious when another class has at
            least that many.
        row_word: ``"line"`` (manifests) or ``"file"`` (folders), for the messages.

    Returns:
        One message per problem, naming the rows; empty when the labels look sound.
    """
    by_label: dict[str, list[int]] = {}
    for label, line in zip(labels, lines, strict=True):
        if label != "":
            by_label.setdefault(label, []).append(line)
    out = []
    flagged = set()
    for label, rows in by_label.items():
        if label.casefold() in MISSING_MARKERS:
            flagged.add(label)
            out.append(
                f"label {label!r} looks like a missing value ({row_word}s {_rows(rows)}); give "
                "these rows their class or remove them"
            )
    ints = {k: int(k) for k in by_label if _INT.fullmatch(k)}
    if ints and len(ints) == len(by_label):  # integer class ids: 0..K-1 or 1..K, no strays
        values = set(ints.values())
        start = 0 if 0 in values else 1
        stop = start
        while stop in values:
            stop += 1
        for k, v in sorted(ints.items(), key=lambda kv: kv[1]):
            if not start <= v < stop:
                flagged.add(k)
                span = f"the range {start}..{stop - 1} of the other integer classes"
                out.append(
                    f"label {k} is outside {span if stop > start else 'the ids 0..K-1 / 1..K'} "
                    f"({row_word}s {_rows(by_label[k])}); fix the label, or pass class_names "
                    "to declare every class"
                )
    groups: dict[str, list[str]] = {}
    for label in by_label:
        if label.casefold() not in MISSING_MARKERS:  # already reported
            groups.setdefault(label.casefold(), []).append(label)
    for variants in groups.values():
        if len(variants) > 1:
            flagged.update(variants)
            listed = ", ".join(
                f"{v!r} ({row_word}s {_rows(by_label[v], 4)})"
                for v in sorted(variants, key=lambda v: -len(by_label[v]))
            )
            out.append(f"labels {listed} differ only in case; write each class one way")
    common = any(len(rows) >= min_class_samples for rows in by_label.values())
    for label, rows in by_label.items():  # rare next to common classes: usually a typo
        if common and len(rows) < min_class_samples and label not in flagged:
            out.append(
                f"class {label!r} has only {len(rows)} row(s) ({row_word}s {_rows(rows)}), "
                f"fewer than min_class_samples={min_class_samples}; if it is a typo fix it, "
                "if it is a real class pass class_names (or a lower min_class_samples)"
            )
    return out
