"""The tiny synthetic run most CLI and engine tests start from (seconds on a CPU)."""

from __future__ import annotations

import copy
from typing import Any

TINY: dict[str, Any] = {
    "seed": 0,
    "scenario": {
        "name": "synthetic-ci",
        "num_classes": 4,
        "classes_per_experience": 2,
        "n_train": 32,
        "n_test": 16,
        "image_size": 16,
    },
    "strategy": {"name": "finetune"},
    "model": {"backbone": "test_resnet", "small_input": True},
    # one thread: runs compared for equality must not depend on the machine's load
    "train": {"epochs": 2, "batch_size": 32, "augment": "none", "num_threads": 1},
    "eval": {"curve_subset": 16},
    "memory": {"size": 8},
}


def tiny_raw(**sections: Any) -> dict[str, Any]:
    """A copy of :data:`TINY` with each given section updated (dicts merged, values replaced)."""
    raw = copy.deepcopy(TINY)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return raw
