"""Subspace layers, Subspace-Connectivity, MC-SGD and the vanilla ensemble."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from test_baselines import STREAM
from torch import nn
from torch.nn.utils import parametrize

import medcl.strategies.mcsgd as mcsgd_module
import medcl.strategies.subspace as subspace_module
from medcl.config import TrainConfig, validate_config
from medcl.data.experience import Experience
from medcl.data.memory import ReplayMemory
from medcl.data.transforms import to_model_input
from medcl.engine.checkpoint import load_checkpoint, save_checkpoint
from medcl.engine.run import run
from medcl.engine.trainer import fit_experience
from medcl.errors import ConfigError
from medcl.export import export_run, load_safetensors_model
from medcl.metrics.compute import count_macs, count_parameters
from medcl.models.backbones import create_backbone
from medcl.models.heads import ExpandableHead
from medcl.models.subspace import (
    SubspacePoint,
    cosine_penalty,
    endpoint_values,
    fold,
    sample_alpha,
    set_anchor,
    to_subspace,
)
from medcl.strategies import Classifier, create_strategy

CFG = TrainConfig(epochs=3, batch_size=16, lr=0.05, augment="none")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def new_strategy(name: str, **params):
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", in_chans=1, small_input=False)
    return create_strategy(name, backbone, scenario_kind="class", **params)


def fit(strategy, exp: Experience, memory: ReplayMemory, cfg: TrainConfig = CFG) -> None:
    n = STREAM.num_seen_classes(exp.index)
    fit_experience(strategy, exp, past=STREAM.experiences[: exp.index], memory=memory, cfg=cfg,
                   num_seen_classes=n, seed=exp.index, quiet=True)  # fmt: skip


def images_of(exp: Experience, n: int = 32) -> torch.Tensor:
    return to_model_input(exp.test.images[:n])


@pytest.fixture(scope="module")
def trained():
    """``trained(name, epochs=3, **opts) -> (strategy, midpoint after experience 0)``, each
    trained once."""
    cache: dict[tuple, tuple] = {}

    def get(name: str, *, epochs: int = CFG.epochs, **opts) -> tuple:
        key = (name, epochs, *sorted(opts.items()))
        if key not in cache:
            strategy, memory, first = new_strategy(name, **opts), ReplayMemory(16, seed=0), None
            cfg = CFG.model_copy(update={"epochs": epochs})
            for exp in STREAM:
                fit(strategy, exp, memory, cfg)
                if first is None and hasattr(strategy, "midpoint"):
                    first = strategy.midpoint()
            cache[key] = strategy, first
        return cache[key]

    return get


# -- subspace layers -------------------------------------------------------------------------------


def test_alpha_is_uniform_on_the_line_and_the_triangle():
    g = torch.Generator().manual_seed(0)
    line = torch.stack([sample_alpha(2, g) for _ in range(4000)])
    assert torch.allclose(line.sum(1), torch.ones(4000))
    # first coordinate ~ U[0, 1]: each tenth of [0, 1] gets ~400 draws (chi-square, 9 dof)
    counts = torch.histc(line[:, 0], bins=10, min=0, max=1)
    assert float(((counts - 400) ** 2 / 400).sum()) < 27.9  # p = 0.001
    tri = torch.stack([sample_alpha(3, g) for _ in range(6000)])
    assert (tri >= 0).all() and torch.allclose(tri.sum(1), torch.ones(6000))
    # Dirichlet(1, 1, 1) is uniform on the triangle: its 4 half-size sub-triangles (3 corners
    # α_i > 1/2 and the centre) each hold a quarter of the draws
    corners = torch.stack([(tri[:, i] > 0.5).sum() for i in range(3)])
    cells = torch.cat([corners, (6000 - corners.sum()).view(1)]).float()
    assert float(((cells - 1500) ** 2 / 1500).sum()) < 16.3  # chi-square, 3 dof, p = 0.001


def plain_classifier(num_classes: int = 3) -> Classifier:
    torch.manual_seed(0)
    bb = create_backbone("test_resnet", in_chans=1)
    return Classifier(bb, ExpandableHead(bb.num_features, num_classes))


def test_subspace_point_is_the_convex_combination_of_endpoints():
    net = plain_classifier()
    point = SubspacePoint(3)
    to_subspace(net, point, seed=1)
    ends = [endpoint_values(net, i) for i in range(3)]
    assert not torch.equal(ends[0]["head.weight"], ends[1]["head.weight"])
    alpha = torch.tensor([0.2, 0.5, 0.3])
    point.set(alpha)
    for key in ("backbone.net.conv1.0.weight", "backbone.net.bn1.weight", "head.bias"):
        path, _, name = key.rpartition(".")
        want = sum(a * e[key] for a, e in zip(alpha, ends, strict=True))
        torch.testing.assert_close(getattr(net.get_submodule(path), name), want)
    # the folded network is plain: torch's own module classes, one tensor per weight
    folded = fold(net)
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    assert count_parameters(folded) == count_parameters(plain_classifier())
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(folded.eval()(x), net.eval()(x))


def test_cosine_penalty_is_one_for_parallel_endpoints_and_has_a_gradient():
    net = plain_classifier()
    to_subspace(net, SubspacePoint(2))
    with torch.no_grad():
        for m in net.modules():
            if parametrize.is_parametrized(m, "weight"):
                m.parametrizations.weight[0].ends[0].copy_(2 * m.parametrizations.weight.original)
    torch.testing.assert_close(cosine_penalty(net, 0, 1), torch.tensor(1.0))
    with torch.no_grad():
        net.head.parametrizations.weight[0].ends[0].normal_()
    c = cosine_penalty(net, 0, 1)
    c.backward()
    assert c < 1 and net.head.parametrizations.weight[0].ends[0].grad.abs().sum() > 0


def test_straight_through_gives_each_endpoint_the_gradient_at_the_point():
    lin = nn.Linear(3, 2)
    point = SubspacePoint(1)
    to_subspace(lin, point)
    set_anchor(lin, "v", {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)})
    x = torch.randn(5, 3)
    grads = {}
    for st in (False, True):
        point.straight_through = st
        point.set(torch.tensor([0.25, 0.75]), "v")
        lin.parametrizations.weight.original.grad = None
        lin(x).pow(2).sum().backward()
        grads[st] = lin.parametrizations.weight.original.grad.clone()
    torch.testing.assert_close(grads[False], 0.25 * grads[True])  # autograd's factor α_1


# -- Subspace-Connectivity -------------------------------------------------------------------------


@pytest.mark.numerics
def test_endpoints_differ_after_training_and_stream_is_learned(trained):
    # 6 epochs (48 updates per experience): after 3, the accuracy below ranged 0.73-0.89 with
    # the seed (0-2) and the CPU kernel path
    strategy, _ = trained("subspace", epochs=6)
    net = strategy.network()
    e0, e1 = endpoint_values(net, 0), endpoint_values(net, 1)
    diff = sum(float((e0[k] - e1[k]).norm()) for k in e0)
    # measured 1.14-1.22 x the endpoint norm over seeds 0-4 on default and avx2
    assert diff > 0.1 * sum(float(e0[k].norm()) for k in e0)
    with torch.no_grad():
        assert float(cosine_penalty(net, 0, 1)) < 0.1  # far from parallel; measured < 1e-3
    x, y = to_model_input(STREAM[1].test.images), STREAM[1].test.labels  # all 64 test images
    pred = strategy.eval().predict(x).argmax(1)
    # measured 0.86-0.97 over seeds 0-4 on default and avx2; chance 0.5 between the
    # experience's 2 classes (0.25 over all 4)
    assert float((pred == y).float().mean()) > 0.7
    diag = strategy.diagnostics()
    assert diag["connectivity_steps"] > 0 and diag["endpoint_cos2"]["0-1"] < 0.1


@pytest.mark.numerics
def test_batch_statistics_option_keeps_no_running_buffers():
    strategy, memory = new_strategy("subspace", bn="batch"), ReplayMemory(16, seed=0)
    fit(strategy, STREAM[0], memory)
    bns = [m for m in strategy.deployable_model().modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.running_mean is None and not m.track_running_stats for m in bns)
    assert not any("running_" in k for k in strategy.state_dict())
    x, y = to_model_input(STREAM[0].test.images), STREAM[0].test.labels  # all 64, one batch
    pred = strategy.eval().predict(x).argmax(1)
    # measured 0.92-1.0 over seeds 0-4 on default and avx2; chance 0.5 (2 classes)
    assert float((pred == y).float().mean()) > 0.75


@pytest.mark.parametrize("opts", [{}, {"n_endpoints": 3}])
def test_deployable_midpoint_is_plain_and_matches_the_subspace(trained, opts):
    strategy, _ = trained("subspace", **opts)
    model = strategy.deployable_model().eval()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    plain = plain_classifier(STREAM.num_classes)
    assert count_parameters(model) == count_parameters(plain)
    assert count_macs(model, (1, 16, 16)) == count_macs(plain, (1, 16, 16))
    x = images_of(STREAM[0])
    strategy.eval()
    strategy.point.set(torch.full((strategy.point.n,), 1 / strategy.point.n))
    torch.testing.assert_close(model(x), strategy.network()(x))  # the subspace at the midpoint
    strategy.point.set(sample_alpha(strategy.point.n))
    torch.testing.assert_close(strategy.predict(x), model(x))  # predict() always at the midpoint


def test_connectivity_stage_uses_the_previous_midpoint_as_vertex(monkeypatch):
    seen = {}
    original = subspace_module.connectivity_stage

    def spy(net, point, **kw):
        seen.update(kw)
        return original(net, point, **kw)

    monkeypatch.setattr(subspace_module, "connectivity_stage", spy)
    strategy, memory = new_strategy("subspace"), ReplayMemory(16, seed=0)
    fit(strategy, STREAM[0], memory)
    assert not seen  # nothing to connect to after the first experience
    previous = strategy.midpoint()
    fit(strategy, STREAM[1], memory)
    assert seen["old_vertex"].keys() == previous.keys()
    for key, value in previous.items():
        got = seen["old_vertex"][key]
        if key.startswith("head."):  # rows of the 2 classes known before; new rows: stage-1's
            got, value = got[:2], value[:2]
            torch.testing.assert_close(seen["old_vertex"][key][2:], seen["new_vertex"][key][2:])
        torch.testing.assert_close(got, value, msg=key)
    assert set(seen["old"].labels.tolist()) == {0, 1}  # the buffer: the earlier experience
    assert set(seen["new"].labels.tolist()) == {2, 3}


def old_task_loss(strategy) -> float:
    strategy.eval()
    x, y = to_model_input(STREAM[0].test.images), STREAM[0].test.labels
    return float(F.cross_entropy(strategy.predict(x), y))


@pytest.mark.slow
@pytest.mark.numerics
def test_connectivity_lowers_old_task_loss_at_the_midpoint(trained):
    """Same seed, same stage 1: only the connectivity stage differs."""
    kw = {"connect_epochs": 5, "connect_lr": 0.02}
    connected, _ = trained("subspace", **kw)
    alone, _ = trained("subspace", connect=False, **kw)
    # ratio measured 0.17-0.37 over seeds 0-4 on default and avx2
    assert old_task_loss(connected) < 0.8 * old_task_loss(alone)


@pytest.mark.parametrize("opts", [{}, {"inference": "sampled", "ensemble_size": 3}])
def test_checkpoint_round_trip(trained, tmp_path, opts):
    strategy, _ = trained("subspace", **opts)
    path = save_checkpoint(tmp_path / "c", strategy=strategy.state_dict(), memory={},
                           state={"seen": [i.to_dict() for i in strategy.seen]})  # fmt: skip
    tensors, _, state = load_checkpoint(path)
    fresh = new_strategy("subspace", seed=5, **opts)  # different init: everything must be loaded
    fresh.rebuild([type(strategy.seen[0]).from_dict(d) for d in state["seen"]])
    fresh.load_state_dict(tensors)
    x = images_of(STREAM[0])
    torch.testing.assert_close(fresh.eval().predict(x), strategy.eval().predict(x))


def test_sampled_ensemble_averages_points_with_their_own_statistics(trained):
    strategy, _ = trained("subspace", inference="sampled", ensemble_size=3)
    model = strategy.deployable_model().eval()
    assert len(model.members) == 3
    plain = plain_classifier(STREAM.num_classes)
    assert count_macs(model, (1, 16, 16)) >= 3 * count_macs(plain, (1, 16, 16))
    means = [m.backbone.net.bn1.running_mean for m in model.members]
    assert not torch.allclose(means[0], means[1])  # recomputed at each point
    x = images_of(STREAM[1])
    probs = torch.stack([torch.softmax(m(x), 1) for m in model.members]).mean(0)
    torch.testing.assert_close(strategy.predict(x).exp(), probs)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="n_endpoints=1"):
        new_strategy("subspace", n_endpoints=1)
    with pytest.raises(ConfigError, match="p=2"):
        new_strategy("mcsgd", p=2.0)
    with pytest.raises(ConfigError, match="sampling"):
        new_strategy("subspace", sampling="random")
    with pytest.raises(ConfigError, match="n_models"):
        new_strategy("ensemble", n_models=0)


# -- MC-SGD and the vanilla ensemble ---------------------------------------------------------------


def test_mcsgd_keeps_the_sequential_chain_and_connects_from_the_previous_solution(monkeypatch):
    seen = {}
    original = subspace_module.connectivity_stage

    def spy(net, point, **kw):
        seen.update(kw)
        return original(net, point, **kw)

    monkeypatch.setattr(mcsgd_module, "connectivity_stage", spy)
    strategy, memory = new_strategy("mcsgd"), ReplayMemory(16, seed=0)
    fit(strategy, STREAM[0], memory)
    w1 = strategy.midpoint()  # w̄_1 = ŵ_1
    fit(strategy, STREAM[1], memory)
    key = "backbone.net.conv1.0.weight"
    torch.testing.assert_close(seen["old_vertex"][key], w1[key])
    assert seen["sampling"] == "grid" and seen["straight_through"]
    # ŵ_2 is kept for the next experience and differs from the deployed w̄_2
    torch.testing.assert_close(seen["new_vertex"][key], strategy.sequential_.get_buffer(
        key.replace(".", "__")))  # fmt: skip
    assert not torch.allclose(strategy.midpoint()[key], seen["new_vertex"][key])
    # the episodic memory of the connectivity step includes the current experience
    assert set(seen["old"].labels.tolist()) == {0, 1, 2, 3}
    model = strategy.deployable_model()
    plain = plain_classifier(STREAM.num_classes)
    assert count_macs(model, (1, 16, 16)) == count_macs(plain, (1, 16, 16))


def test_vanilla_ensemble_has_independent_members_and_n_times_the_macs(trained):
    strategy, _ = trained("ensemble")
    model = strategy.deployable_model().eval()
    plain = plain_classifier(STREAM.num_classes)
    assert count_macs(model, (1, 16, 16)) >= 3 * count_macs(plain, (1, 16, 16))
    w = [m.backbone.net.conv1[0].weight for m in model.members]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])
    x = images_of(STREAM[1])
    probs = torch.stack([torch.softmax(m(x), 1) for m in model.members]).mean(0)
    torch.testing.assert_close(strategy.predict(x).exp(), probs)


# -- through medcl.engine.run: resume and export ---------------------------------------------------


def config(tmp_path, out: str, strategy: dict) -> object:
    return validate_config({
        "scenario": {"name": "synthetic-ci", "num_classes": 4, "classes_per_experience": 2,
                     "n_train": 16, "n_test": 8, "image_size": 16},
        "strategy": strategy,
        "model": {"backbone": "test_resnet", "small_input": False},
        "train": {"epochs": 2, "batch_size": 16, "augment": "none", "num_threads": 1},
        "memory": {"size": 16}, "output_dir": str(tmp_path / out),
    })  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", ["subspace", "mcsgd"])
def test_run_resumed_after_interruption_matches_uninterrupted(name, tmp_path):
    full_dir = run(config(tmp_path, "a", {"name": name}), quiet=True)
    run(config(tmp_path, "b", {"name": name}), quiet=True, stop_after=0)
    resumed_dir = run(config(tmp_path, "b", {"name": name}), resume=True, quiet=True)
    full, resumed = (
        np.load(d / "predictions" / "after-001.npz")["probs"] for d in (full_dir, resumed_dir)
    )
    np.testing.assert_allclose(resumed, full, rtol=0, atol=1e-6)
    if name == "subspace":  # the deployed model costs one network, not two
        m = json.loads((full_dir / "metrics.json").read_text())["compute"]
        assert m["parameters"] == count_parameters(plain_classifier(4))


@pytest.mark.slow
def test_export_onnx_and_safetensors_of_the_midpoint(tmp_path):
    run_dir = run(config(tmp_path, "r", {"name": "subspace", "n_endpoints": 3}), quiet=True)
    path = export_run(run_dir, "onnx")
    graph = onnx.load(str(path)).graph
    assert len(graph.initializer) > 0
    module, _ = load_safetensors_model(export_run(run_dir, "safetensors"))
    x = torch.rand(4, 1, 16, 16)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    want = module(x)[0].detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("name", ["subspace", "mcsgd"])
def test_stage1_replay_mixes_the_memory_into_the_trainers_batches(name, monkeypatch):
    seen: dict[bool, list[bool]] = {}
    for replay in (False, True):
        strategy, memory = new_strategy(name, stage1_replay=replay), ReplayMemory(16, seed=0)
        fit(strategy, STREAM.experiences[0], memory)
        flags: list[bool] = []
        orig = strategy.loss
        monkeypatch.setattr(strategy, "loss", lambda lg, b, o=orig, f=flags: (f.append(bool(b.replay.any())), o(lg, b))[1])  # fmt: skip
        fit(strategy, STREAM.experiences[1], memory)
        seen[replay] = flags
    assert seen[False] and not any(seen[False])  # the paper's stage 1: experience τ alone
    assert all(seen[True])  # every batch carries replay samples
