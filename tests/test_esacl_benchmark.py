"""benchmarks/esacl.py (issue 23): choices on the mean of two selection seeds, and the one-shot
control at EsaCL's lr, without training (the runs are stubbed)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench(module: str = "esacl"):
    sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module(module)


def test_each_choice_is_the_best_mean_over_both_selection_seeds(monkeypatch):
    eb = _bench()
    # (seed, lr, removal share) -> validation accuracy; seed 100 alone would pick lr 0.1 and, at
    # lr 0.1, removal 0.9; the means over both seeds pick lr 0.03 and removal 0.3
    val = {(100, 0.01, 0.3): 50.0, (100, 0.03, 0.3): 56.0, (100, 0.1, 0.3): 57.0,
           (101, 0.01, 0.3): 49.0, (101, 0.03, 0.3): 60.0, (101, 0.1, 0.3): 54.0,
           (100, 0.1, 0.1): 50.0, (100, 0.1, 0.2): 53.0, (100, 0.1, 0.9): 58.0,
           (101, 0.1, 0.1): 50.0, (101, 0.1, 0.2): 53.0, (101, 0.1, 0.9): 52.0}  # fmt: skip
    calls = []

    def one_run(args, method, sparsity, seed, lr, removal=0.3, select=0.5):
        calls.append((method, sparsity, seed, lr, removal, select))
        return {"val_accuracy": val[seed, lr, round(removal, 6)]}

    monkeypatch.setattr(eb, "one_run", one_run)
    args = argparse.Namespace(lr_grid=[0.01, 0.03, 0.1], removal_grid=[0.1, 0.2, 0.3])
    lr = eb.choose_lr(args, "esacl")
    assert lr["chosen"] == 0.03 and not lr["at_edge"]
    assert lr["val_accuracy"][0.1] == pytest.approx(55.5)
    seeds = set(eb.SELECTION_SEEDS)
    assert {c[2] for c in calls} == seeds and len(seeds) == 2
    assert not seeds & set(_bench("_esacl_results").SEEDS)  # never a reported seed
    assert all(c[1] == 0.9 for c in calls)
    del calls[:]
    got = eb.choose_removal(args, 0.1)  # 0.3 is best of 0.1-0.3, at the edge: widened once
    assert got["grid"] == [0.1, 0.2, 0.3, pytest.approx(0.9)]
    assert got["chosen"] == 0.3 and got["val_accuracy"][0.3] == pytest.approx(55.5)
    assert not got["at_edge"]


def test_the_plain_sgd_control_at_esacls_lr_is_dense_and_pruned_once():
    res = _bench("_esacl_results")
    name, opts, memory, family = res.METHODS["replay-esacl-lr"]
    assert (name, opts, memory, family) == ("replay", {}, True, "esacl")
    assert res.is_dense_replay("replay-esacl-lr") and not res.is_dense_replay("esacl-dense")
    assert "replay-esacl-lr" in res.ONE_SHOT
    rows = [{"method": "replay-esacl-lr", "sparsity": 0.0, "seed": s, "average_accuracy": 60.0 + s,
             "one_shot": [{"drop_0.9": 1.0 + s}]} for s in res.SEEDS]  # fmt: skip
    assert res.pick(rows, "replay-esacl-lr", 0.9, "average_accuracy") == [60.0, 61.0, 62.0]
    assert res.drops(rows, "replay-esacl-lr", 0.9) == [1.0, 2.0, 3.0]
    plan = _bench().plan(False)
    assert [s for m, _, s in plan if m == "replay-esacl-lr"] == list(res.SEEDS)


def _quadratic(a_mats: list[torch.Tensor], sizes: list[int], w: torch.Tensor):
    """Batches whose mean losses are ``0.5 wᵀ A_i w``: the set's Hessian is ``Σ n_i A_i / Σ n_i``."""

    def losses():
        for a, n in zip(a_mats, sizes, strict=True):
            yield 0.5 * w @ a @ w, n

    return losses


def test_hessian_top_and_sam_sharpness_match_a_quadratic_in_closed_form():
    fl = _bench("_esacl_flatness")
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    a1 = q @ torch.diag(torch.tensor([4.0, 1.0, 0.5, 0.2, -0.1, 2.0], dtype=torch.float64)) @ q.T
    a2 = q @ torch.diag(torch.tensor([0.0, 3.0, 0.5, 0.2, 0.1, 1.0], dtype=torch.float64)) @ q.T
    h = (1 * a1 + 3 * a2) / 4  # eigenvalues 1, 2.5, 0.5, 0.2, 0.05, 1.25: the top is 2.5
    w = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    losses = _quadratic([a1, a2], [1, 3], w)
    assert fl.hessian_top([w], losses, iters=200) == pytest.approx(2.5, rel=1e-6)
    w0 = w.detach().clone()
    loss, sharp = fl.sam_sharpness([w], losses, rho=0.05)
    g = h @ w0
    eps = 0.05 * g / g.norm()
    assert loss == pytest.approx(float(0.5 * w0 @ h @ w0))
    assert sharp == pytest.approx(float(g @ eps + 0.5 * eps @ h @ eps))
    assert torch.equal(w.detach(), w0)  # the weights are restored


def test_flatness_of_a_model_on_rows_is_deterministic_and_restores_the_mode():
    fl = _bench("_esacl_flatness")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 3))  # fmt: skip
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 3, (40,))
    model.train()
    a = fl.flatness(model, images, labels, rho=0.05)
    assert model.training and a == fl.flatness(model, images, labels, rho=0.05)
    assert a["sam_sharpness"] > 0 and a["hessian_top"] > 0 and a["loss"] > 0
