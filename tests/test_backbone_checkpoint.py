"""Starting weights: a torchvision-shaped ResNet-50 (written here, no torchvision), saved in the torchvision layout
and in the detectron2 `.pkl` layout of detectron2's `convert-torchvision-to-d2.py`, loaded through
`modeling_mask2anomaly.conversion.backbone` into the model's backbone: its stage features must equal the naive
network's forward."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import ResNetBackbone

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation
from modeling_mask2anomaly.configuration_mask2anomaly import resnet_backbone
from modeling_mask2anomaly.conversion import ConversionError
from modeling_mask2anomaly.conversion.backbone import backbone_state_dict, load_backbone_checkpoint, main

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------------------------
# A naive torchvision-shaped ResNet-50 (v1.5: the stride in the 3x3 convolution), with torchvision's module names
# ----------------------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class NaiveResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        for index, (blocks, width, stride) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512], [1, 2, 2, 2])):
            layers = []
            for block in range(blocks):
                layers.append(Bottleneck(in_channels, width, stride if block == 0 else 1))
                in_channels = width * 4
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x) -> list[torch.Tensor]:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 3, stride=2, padding=1)
        features = []
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
            features.append(x)
        return features


def _naive_resnet50(seed: int = 0) -> NaiveResNet50:
    torch.manual_seed(seed)
    net = NaiveResNet50()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-trivial BatchNorm so every entry matters
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return net.eval()


def _detectron2_pkl(state: dict[str, torch.Tensor], path: Path) -> None:
    """What detectron2's `tools/convert-torchvision-to-d2.py` writes for a torchvision state dict."""
    model = {}
    for key, value in state.items():
        name = key if "layer" in key else "stem." + key
        for t in (1, 2, 3, 4):
            name = name.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            name = name.replace(f"bn{t}", f"conv{t}.norm")
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[name] = value.detach().numpy()
    with open(path, "wb") as handle:
        pickle.dump({"model": model, "__author__": "torchvision", "matching_heuristics": True}, handle)


@pytest.fixture(scope="module")
def naive_and_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbones")
    net = _naive_resnet50()
    state = net.state_dict()
    torch.save(state, folder / "resnet50.pth")
    # Barlow Twins' resnet50.pth: torchvision layout without the classifier
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, folder / "barlowtwins_resnet50.pth")
    _detectron2_pkl(state, folder / "R-50.pkl")
    return net, folder


def _check_features(backbone: nn.Module, net: NaiveResNet50) -> None:
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    backbone.eval()
    with torch.no_grad():
        ours = backbone(pixels).feature_maps
        reference = net(pixels)
    assert len(ours) == 4
    for stage, (a, b) in enumerate(zip(ours, reference)):
        assert a.shape == b.shape, f"stage {stage + 1}: {a.shape} vs {b.shape}"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"stage {stage + 1}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50.pth", "barlowtwins_resnet50.pth", "R-50.pkl"])
def test_backbone_features_equal_the_naive_network(name, naive_and_files):
    net, folder = naive_and_files
    model = Mask2AnomalyForUniversalSegmentation(Mask2AnomalyConfig.tiny(backbone_config=resnet_backbone()))
    load_backbone_checkpoint(model, folder / name)
    _check_features(model.model.pixel_level_module.encoder, net)


@pytest.mark.slow
def test_command_writes_transformers_names_that_load_back(naive_and_files, tmp_path, capsys):
    net, folder = naive_and_files
    output = tmp_path / "backbone.safetensors"
    assert main(["--checkpoint", str(folder / "R-50.pkl"), "--output", str(output)]) == 0
    assert "wrote" in capsys.readouterr().out
    backbone = ResNetBackbone(resnet_backbone())
    load_backbone_checkpoint(backbone, output)
    _check_features(backbone, net)
    assert main(["--checkpoint", str(folder / "R-50.pkl"), "--output", str(output)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_frozen_bn_layout_without_counters_loads(naive_and_files, tmp_path):
    net, _ = naive_and_files
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    _detectron2_pkl(state, tmp_path / "frozen.pkl")
    backbone = ResNetBackbone(resnet_backbone())
    load_backbone_checkpoint(backbone, tmp_path / "frozen.pkl")
    _check_features(backbone, net)


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_unknown_and_missing_keys_are_named(naive_and_files, tmp_path, capsys):
    net, _ = naive_and_files
    state = net.state_dict()
    extra = dict(state, **{"projector.0.weight": torch.zeros(8, 2048)})
    torch.save(extra, tmp_path / "extra.pth")
    err = _one_line_error(capsys, ["--checkpoint", str(tmp_path / "extra.pth"), "--output", str(tmp_path / "o.safetensors")])
    assert "projector.0.weight" in err and "not part of a torchvision ResNet" in err

    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.2.")}, tmp_path / "short.pth")
    err = _one_line_error(capsys, ["--checkpoint", str(tmp_path / "short.pth"), "--output", str(tmp_path / "o.safetensors")])
    assert "missing" in err and "encoder.stages.3.layers.2.layer.0.convolution.weight" in err

    # a ResNet-101 checkpoint against the default ResNet-50
    deeper = dict(state, **{"layer3.6.conv1.weight": torch.zeros(256, 1024, 1, 1)})
    torch.save(deeper, tmp_path / "deeper.pth")
    err = _one_line_error(capsys, ["--checkpoint", str(tmp_path / "deeper.pth"), "--output", str(tmp_path / "o.safetensors")])
    assert "encoder.stages.2.layers.6.layer.0.convolution.weight" in err and "no place" in err

    wrong = dict(state, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    err = _one_line_error(capsys, ["--checkpoint", str(tmp_path / "wrong.pth"), "--output", str(tmp_path / "o.safetensors")])
    assert "embedder.embedder.convolution.weight [64, 3, 3, 3] (expected [64, 3, 7, 7])" in err
    assert not (tmp_path / "o.safetensors").exists()


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_checkpoints_with_code_are_refused(suffix, tmp_path):
    marker = tmp_path / "ran"
    payload = {"model": {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "x": _RunsCode(marker)}}
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pth":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)
    with pytest.raises(ConversionError):
        backbone_state_dict(path, ResNetBackbone(resnet_backbone()))
    assert not marker.exists()


def test_not_a_resnet_is_named(tmp_path):
    torch.save({"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}, tmp_path / "swin.pth")
    with pytest.raises(ConversionError, match="not a ResNet backbone checkpoint"):
        backbone_state_dict(tmp_path / "swin.pth", ResNetBackbone(resnet_backbone()))
    with pytest.raises(ConversionError, match="does not exist"):
        backbone_state_dict(tmp_path / "absent.pth", ResNetBackbone(resnet_backbone()))
