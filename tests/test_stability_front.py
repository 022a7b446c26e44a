"""The stability benchmark's shortcut: cached front outputs + the back give the model's scores.

Every arm of ``benchmarks/stability_gap.py`` keeps the front frozen from experience 1 on, so its
curves score fixed test images through the back only. The shortcut must equal the strategy's
own prediction (vanilla, and SGM with LoRA adapters in the back) and must refuse a stale cache.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from test_sgm import fit, make, start, toy_experience

from medcl.data.memory import ReplayMemory
from medcl.data.transforms import to_model_input

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
front_mod = importlib.import_module("_stability_front")


@pytest.fixture(scope="module")
def stream():
    return [toy_experience(0, [0, 1]), toy_experience(1, [2, 3])]


@pytest.mark.parametrize("name", ["rehearsal", "sgm"])
def test_back_only_scores_equal_predict_after_training(stream, name):
    s, memory = make(name), ReplayMemory(8)
    fit(s, stream, memory, 0)
    fit(s, stream, memory, 1)  # the back (SGM: its LoRA adapters) and the head have moved
    images = stream[1].test.images
    front = front_mod.front_output(s, images, 2)
    assert front.shape[0] == len(images) and front.dim() == 4  # (N, C, h, w): a feature map
    s.eval()
    with torch.no_grad():
        full = s.predict(to_model_input(images))
    torch.testing.assert_close(front_mod.back_scores(s, front, 2), full, rtol=1e-4, atol=1e-4)
    front_mod.check_shortcut(s, images, front, 2)  # passes


def test_a_stale_front_is_refused(stream):
    s, memory = make("rehearsal"), ReplayMemory(8)
    fit(s, stream, memory, 0)
    start(s, stream[1], memory)
    images = stream[1].test.images
    front = front_mod.front_output(s, images, 2)
    with torch.no_grad():
        s.backbone.net.conv_stem.weight.mul_(2.0)  # the front changed after caching
    with pytest.raises(RuntimeError, match="no-front-cache"):
        front_mod.check_shortcut(s, images, front, 2)
