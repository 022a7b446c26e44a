"""``train.channels_last``: 2D runs train and score in NHWC; checkpoints and exports do not."""

from __future__ import annotations

import numpy as np
import torch
from _tiny import tiny_raw

from medcl.config import validate_config
from medcl.engine.components import build_components
from medcl.engine.device import use_layout
from medcl.engine.evaluate import predict_proba
from medcl.engine.model_record import restore_model
from medcl.engine.run import run
from medcl.models.backbones import create_backbone


def _conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]


def test_use_layout_is_nhwc_for_2d_only():
    net2d = create_backbone("test_resnet", in_chans=1, small_input=True)
    assert use_layout(net2d, True, 2)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(net2d))
    assert not any(
        w.is_contiguous() for w in _conv_weights(net2d) if w.shape[1] > 1 and w.shape[-1] > 1
    )
    assert not use_layout(net2d, False, 2)
    assert all(w.is_contiguous() for w in _conv_weights(net2d))
    net3d = create_backbone("resnet10_3d", in_chans=1, spatial_dims=3)
    assert not use_layout(net3d, True, 3)
    assert all(w.is_contiguous() for w in _conv_weights(net3d))


def test_nhwc_run_checkpoints_what_it_scored(tmp_path):
    """The run scores its test sets in NHWC (the default); the contiguous checkpoint restored
    scores them the same (to float rounding), so reports and exports agree with the run."""
    raw = tiny_raw(output_dir=str(tmp_path))
    cfg = validate_config(raw)
    assert cfg.train.channels_last  # the default
    run_dir = run(cfg, quiet=True)
    saved = np.load(run_dir / "predictions" / "after-001.npz")["probs"]
    restored = restore_model(run_dir, 1)
    assert restored is not None
    _, strategy = restored
    assert all(w.is_contiguous() for w in _conv_weights(strategy))
    scenario, _, _ = build_components(cfg)
    images = torch.cat([exp.test.images for exp in scenario.experiences])
    probs = predict_proba(strategy, images).numpy()
    assert probs.shape == saved.shape
    np.testing.assert_allclose(probs, saved, atol=1e-5)
    use_layout(strategy, True, 2)  # the same weights in NHWC score the same
    strategy.feature_cache.clear()
    np.testing.assert_allclose(predict_proba(strategy, images).numpy(), probs, atol=1e-5)
