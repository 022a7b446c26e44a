"""``adapter_width`` (ACL, DynaMMo): narrower adapters wherever adapter sets are built or read.

1.0 must be the reference bit for bit; 0.5 must halve each adapter and the adapter arrays a
federated site sends, and a half-width run must restore, export and federate with its width.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _federation import LocalLink
from _tiny import tiny_raw
from safetensors.torch import load_file
from torch import nn

from medcl.config import validate_config
from medcl.engine.components import build_components
from medcl.engine.resume import restore_run
from medcl.errors import ConfigError
from medcl.export import ExportModule, export_run, load_safetensors_model
from medcl.federated.arrays import nbytes, to_numpy, trainable_keys
from medcl.federated.server import serve
from medcl.models.adapters import AdapterSet, ConvAdapter
from medcl.models.backbones import create_backbone
from medcl.strategies import ExperienceInfo, create_strategy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

EXP0 = ExperienceInfo(0, "a", 0, (0, 1), 2)


def _backbone():
    torch.manual_seed(0)
    return create_backbone("test_resnet", in_chans=1, small_input=True)


def _grown(name: str = "dynammo", **options):
    s = create_strategy(name, _backbone(), backbone_init="checkpoint", **options)
    s.grow(EXP0)
    return s


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_width_one_is_the_reference_bit_for_bit():
    """Same keys, shapes, initial values and RNG draws as the adapters built before the option."""
    bb = _backbone()
    torch.manual_seed(1)
    before = nn.ModuleDict(  # what AdapterSet built before adapter_width existed
        {
            s.name.replace(".", "_"): ConvAdapter(s.in_channels, spatial_dims=2, alpha_init=0.02)
            for s in bb.stages()
        }
    ).state_dict()
    rng_before = torch.get_rng_state()
    torch.manual_seed(1)
    now = AdapterSet.for_backbone(bb, alpha_init=0.02, width=1.0).adapters.state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert list(now) == list(before)
    assert all(now[k].dtype == before[k].dtype and torch.equal(now[k], before[k]) for k in now)
    # the strategy: the default and an explicit 1.0 give the same state
    torch.manual_seed(2)
    default = _grown().state_dict()
    torch.manual_seed(2)
    explicit = _grown(adapter_width=1.0).state_dict()
    assert list(default) == list(explicit)
    assert all(torch.equal(default[k], explicit[k]) for k in default)


@pytest.mark.parametrize("name", ["dynammo", "acl"])
def test_half_width_halves_each_adapter_and_the_arrays_a_site_sends(name):
    full, half = _grown(name), _grown(name, adapter_width=0.5)
    for key, a in full.adapter_sets[0].adapters.items():
        b = half.adapter_sets[0].adapters[key]
        c = a.conv.in_channels
        assert (a.conv.out_channels, b.conv.out_channels) == (c, max(1, round(c / 2)))
        assert _count(b) / _count(a) == pytest.approx(0.5, abs=0.03), key
    # what a site sends after training: the trainable arrays (adapter set 0 and head 0)
    sent = {k: to_numpy(s, trainable_keys(s)) for k, s in (("full", full), ("half", half))}
    assert sent["full"].keys() == sent["half"].keys()

    def adapter_bytes(arrays):
        return nbytes({k: v for k, v in arrays.items() if k.startswith("adapter_sets.0.")})

    ratio = adapter_bytes(sent["half"]) / adapter_bytes(sent["full"])
    assert ratio == pytest.approx(0.5, abs=0.03)
    assert nbytes(sent["half"]) < 0.55 * nbytes(sent["full"])  # the head is small beside them


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, math.nan])
def test_a_bad_width_is_a_clear_error(value):
    with pytest.raises(ConfigError, match=rf"adapter_width must be in \(0, 1\].*got {value}"):
        create_strategy("dynammo", _backbone(), adapter_width=value)
    with pytest.raises(ConfigError, match="adapter_width"):
        create_strategy("acl", _backbone(), adapter_width="wide")


def test_a_half_width_federated_run_sends_half_restores_and_exports(tmp_path):
    """Two sites, DynaMMo at width 0.5: the adapter arrays that travel are the half-width ones
    (about half the bytes of full width); a site's run restores; the global model exports."""
    strategy = {"name": "dynammo", "backbone_init": "first_experience", "retune_epochs": 2}
    fed = {"sites": 2, "rounds": 1}

    def cfg(width: float):
        raw = tiny_raw(
            strategy=strategy | {"adapter_width": width},
            federation=fed,
            output_dir=str(tmp_path / "fed"),
        )
        raw["logging"] = {"tensorboard": False}
        return validate_config(raw)

    half_cfg = cfg(0.5)
    link = LocalLink(half_cfg, tmp_path / "sites")
    fed_dir = serve(half_cfg, tmp_path / "fed" / half_cfg.run_name, link)

    # a site's checkpoint restores at width 0.5, tensor for tensor
    site = tmp_path / "sites" / "site-0"
    _, _, half, _, _ = restore_run(site)
    assert half.adapter_width == 0.5
    saved = load_file(str(site / "checkpoints" / "exp-001" / "strategy.safetensors"))
    restored = half.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)

    # the arrays that travelled, against the same model at full width
    _, full, _ = build_components(cfg(1.0))
    full.rebuild(half.seen)
    full_state = full.state_dict()
    replies = [
        r.arrays
        for q, r, _ in link.sent
        if r is not None and q.kind == "train" and q.config.get("experience") == 1
    ]
    assert len(replies) == 2  # two sites, one round
    for arrays in replies:
        adapters = {k: v for k, v in arrays.items() if k.startswith("adapter_sets.1.")}
        assert adapters
        assert all(np.shape(v) == tuple(restored[k].shape) for k, v in adapters.items())
        assert any(np.shape(v) != tuple(full_state[k].shape) for k, v in adapters.items())
        at_full = {k: full_state[k].numpy() for k in adapters}
        assert nbytes(adapters) / nbytes(at_full) == pytest.approx(0.5, abs=0.05)

    # the global model exports, and rebuilds from the run's config at width 0.5
    module, _ = load_safetensors_model(
        export_run(fed_dir, "safetensors", tmp_path / "m.safetensors")
    )
    _, _, global_model, _, _ = restore_run(fed_dir)
    reference = ExportModule(global_model.deployable_model()).eval()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        (p, route, _), (p_ref, route_ref, _) = module(x), reference(x)
    assert torch.equal(route, route_ref) and torch.equal(p.argmax(1), p_ref.argmax(1))
