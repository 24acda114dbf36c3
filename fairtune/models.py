"""The three architectures of the paper behind one interface.

Every model returns ``ModelOutput(logits, features, feature_map)``: ``features`` is the layer the
feature-distillation losses (MFD, mmd, FitNet) match, ``feature_map`` the last convolutional map
before pooling that AT and NST use (docs/protocol.md §3).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor  # (B, D)
    feature_map: torch.Tensor  # (B, C, H, W)


class SixConvCNN(nn.Module):
    """The 6-conv CNN of the CIFAR-10S experiments; features = the 256-d FC output after ReLU."""

    def __init__(self, num_classes: int, image_size: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True),
            ]

        self.stage1 = nn.Sequential(*block(3, 32))
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), nn.Dropout(0.25), *block(32, 64))
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), nn.Dropout(0.25), *block(64, 128))
        self.pool = nn.Sequential(nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten())
        side = image_size // 8
        self.fc = nn.Sequential(nn.Linear(128 * side * side, 256), nn.ReLU(inplace=True))
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        feature_map = self.stage3(self.stage2(self.stage1(x)))
        features = self.fc(self.pool(feature_map))
        return ModelOutput(self.head(features), features, feature_map)


class ResNet18(nn.Module):
    """torchvision's resnet18 (random init); features = layer4's output before pooling, flattened."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        from torchvision import models as tv  # here, not at the top: fairtune.data lists MODELS on every CLI start

        self.net = tv.resnet18(weights=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        feature_map = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        logits = n.fc(torch.flatten(n.avgpool(feature_map), 1))
        return ModelOutput(logits, torch.flatten(feature_map, 1), feature_map)


class ShuffleNetV2(nn.Module):
    """torchvision's shufflenet_v2_x1_0 (random init); features = conv5's output before pooling, flattened."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        from torchvision import models as tv

        self.net = tv.shufflenet_v2_x1_0(weights=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        n = self.net
        x = n.maxpool(n.conv1(x))
        feature_map = n.conv5(n.stage4(n.stage3(n.stage2(x))))
        logits = n.fc(feature_map.mean([2, 3]))
        return ModelOutput(logits, torch.flatten(feature_map, 1), feature_map)


MODELS = {"cnn": SixConvCNN, "resnet18": ResNet18, "shufflenet_v2_x1_0": ShuffleNetV2}


def build_model(name: str, num_classes: int, image_size: int = 32) -> nn.Module:
    """``image_size`` only shapes the CNN's FC layer; the torchvision models pool globally."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; valid: {', '.join(MODELS)}")
    if name == "cnn":
        return SixConvCNN(num_classes, image_size)
    return MODELS[name](num_classes)
