"""merge_state_dicts: each operator on tensors whose result is known by hand."""

from __future__ import annotations

import pytest
import torch

from medcl.errors import ConfigError
from medcl.models.merging import merge_state_dicts


def _states(*rows: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(r)} for r in rows]


def test_mean_is_uniform_average():
    out = merge_state_dicts(_states([1.0, 2.0], [3.0, -2.0], [5.0, 3.0]), method="mean")
    assert torch.allclose(out["w"], torch.tensor([3.0, 1.0]))


def test_mean_ignores_weights_and_single_state_is_identity():
    s = _states([1.0, 2.0])
    assert torch.equal(merge_state_dicts(s, method="mean")["w"], s[0]["w"])
    out = merge_state_dicts(_states([0.0], [4.0]), method="mean", weights=[1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.0]))


def test_weighted_average_normalises_weights():
    out = merge_state_dicts(_states([0.0, 4.0], [4.0, 0.0]), method="weighted", weights=[1, 3])
    assert torch.allclose(out["w"], torch.tensor([3.0, 1.0]))


def test_ties_trim_elect_disjoint_mean_by_hand():
    # density 0.5 keeps 2 of 4 entries per task vector:
    # t1 -> [0, -2, 0, 3], t2 -> [2, 1.5, 0, 0], t3 -> [-1.2, 0, 0, 4]
    # summed signs [+, -, 0, +]; agreeing entries averaged: [2, -2, 0, (3 + 4) / 2]
    states = _states([1.0, -2.0, 0.5, 3.0], [2.0, 1.5, -0.1, -1.0], [-1.2, 1.0, 0.2, 4.0])
    out = merge_state_dicts(states, method="ties", density=0.5)
    assert torch.allclose(out["w"], torch.tensor([2.0, -2.0, 0.0, 3.5]))


def test_ties_is_relative_to_base_and_scaled():
    base = {"w": torch.tensor([10.0, 10.0])}
    states = _states([11.0, 9.0], [13.0, 9.5])
    out = merge_state_dicts(states, method="ties", density=1.0, base=base, scale=0.5)
    # task vectors [1, -1], [3, -0.5] agree in sign: disjoint mean [2, -0.75], halved, plus base
    assert torch.allclose(out["w"], torch.tensor([11.0, 9.625]))


def test_ties_keeps_at_least_one_entry_per_tensor():
    base = {"alpha": torch.tensor([0.02])}
    out = merge_state_dicts(
        [{"alpha": torch.tensor([0.1])}, {"alpha": torch.tensor([0.3])}],
        method="ties",
        density=0.2,
        base=base,
    )
    assert torch.allclose(out["alpha"], torch.tensor([0.2]))


def test_ties_matches_peft_reference_implementation():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(4, 5, generator=g) for _ in range(3)]
    ours = merge_state_dicts([{"w": t} for t in taus], method="ties", density=0.4)["w"]
    ref = merge_utils.ties(taus, torch.ones(3), density=0.4)  # 0.4 * 20 entries: no rounding gap
    assert torch.allclose(ours, ref, atol=1e-6)


def test_integer_buffers_and_dtypes_are_kept():
    a = {"w": torch.ones(2, dtype=torch.float64), "n": torch.tensor(3)}
    b = {"w": torch.zeros(2, dtype=torch.float64), "n": torch.tensor(7)}
    out = merge_state_dicts([a, b], method="mean")
    assert out["w"].dtype == torch.float64 and out["n"].item() == 7
    assert torch.allclose(out["w"], torch.full((2,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "avg"}, "must be 'mean'"),
        ({"method": "weighted"}, "needs `weights`"),
        ({"method": "weighted", "weights": [1.0]}, "2 finite non-negative"),
        ({"method": "weighted", "weights": [1.0, -1.0]}, "non-negative"),
        ({"method": "ties", "density": 0.0}, "density must be in"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        merge_state_dicts(_states([1.0], [2.0]), **kwargs)


def test_mismatched_states_are_clear_errors():
    with pytest.raises(ConfigError, match="keys"):
        merge_state_dicts([{"a": torch.ones(1)}, {"b": torch.ones(1)}])
    with pytest.raises(ConfigError, match="shape"):
        merge_state_dicts([{"a": torch.ones(1)}, {"a": torch.ones(2)}])
    with pytest.raises(ConfigError, match="at least one"):
        merge_state_dicts([])


# -- BatchNorm statistics are averaged, never TIES-merged (issue 22) ---------------------------


def _bn_states(n=3, channels=16, seed=0):
    """The initial state of a ``BatchNorm2d(channels)`` and ``n`` states after different data
    (set ``t`` saw ``t + 1`` batches, so its ``num_batches_tracked`` is ``t + 1``)."""
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(channels)
    init = {k: v.clone() for k, v in bn.state_dict().items()}
    states = []
    for t in range(n):
        bn.load_state_dict(init)
        with torch.no_grad():
            bn.weight.add_(torch.randn(channels, generator=g))
        for _ in range(t + 1):
            scale = torch.rand(channels, 1, 1, generator=g) * 3 + 0.5  # per-channel spread
            bn.train()(torch.randn(8, channels, 4, 4, generator=g) * scale + t)
        states.append({f"bn.{k}": v.clone() for k, v in bn.state_dict().items()})
    return {f"bn.{k}": v for k, v in init.items()}, states


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0]])
def test_ties_averages_batchnorm_statistics(weights):
    base, states = _bn_states()
    out = merge_state_dicts(states, method="ties", density=0.2, base=base, weights=weights)
    w = torch.tensor(weights or [1.0, 1.0, 1.0])
    w = w / w.sum()
    for key in ("bn.running_var", "bn.running_mean"):
        stacked = torch.stack([s[key] for s in states])  # (3, 16)
        want = torch.einsum("t,tc->c", w, stacked)
        torch.testing.assert_close(out[key], want)
        # no channel reset to the initial value (1.0 / 0.0) by trimming
        assert not torch.isclose(out[key], base[key]).any()
    # the learnable affine weight is still TIES-merged: trimmed to 20 %, it differs from the mean
    assert not torch.allclose(
        out["bn.weight"], torch.stack([s["bn.weight"] for s in states]).mean(0)
    )


def test_ties_merges_parameters_and_averages_statistics_by_hand():
    # the hand-worked TIES case above, as a BatchNorm weight, beside a running_var of the same
    # values: the weight is trimmed/elected ([2, -2, 0, 3.5]), the statistic is the plain mean
    rows = ([1.0, -2.0, 0.5, 3.0], [2.0, 1.5, -0.1, -1.0], [-1.2, 1.0, 0.2, 4.0])
    states = [{"bn.weight": torch.tensor(r), "bn.running_var": torch.tensor(r)} for r in rows]
    out = merge_state_dicts(states, method="ties", density=0.5)
    torch.testing.assert_close(out["bn.weight"], torch.tensor([2.0, -2.0, 0.0, 3.5]))
    torch.testing.assert_close(out["bn.running_var"], torch.tensor(rows).mean(0))
    # `statistics` names the averaged keys explicitly (here: none, so both are TIES-merged)
    out = merge_state_dicts(states, method="ties", density=0.5, statistics=())
    torch.testing.assert_close(out["bn.running_var"], torch.tensor([2.0, -2.0, 0.0, 3.5]))
    out = merge_state_dicts(states, method="ties", density=0.5, statistics={"bn.weight"})
    torch.testing.assert_close(out["bn.weight"], torch.tensor(rows).mean(0))


@pytest.mark.parametrize("method", ["mean", "weighted", "ties"])
def test_num_batches_tracked_stays_an_integer_counter(method):
    base, states = _bn_states()
    out = merge_state_dicts(states, method=method, weights=[1.0, 1.0, 2.0], base=base)
    n = out["bn.num_batches_tracked"]
    assert n.dtype == torch.long and n.shape == () and n.item() == 3  # the last state's count
    torch.nn.BatchNorm2d(16).load_state_dict({k[3:]: v for k, v in out.items()})  # loads
