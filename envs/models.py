"""Teacher zoo: CIFAR-style ResNets, VGG with BatchNorm, a small CNN and a depthwise net.

Every zoo builder takes ``num_classes``, ``in_channels`` and a ``width`` multiplier, so one
architecture serves 8x8 digits on a laptop and full-width CIFAR-10 on a GPU. ResNets reuse
torchvision's ``BasicBlock``; nothing downstream (surgery, descriptors) knows these classes:
any ``torch.fx``-traceable module works as a teacher.

A model is described by a JSON-able *architecture spec*:
``{"arch": "resnet18", "kwargs": {"num_classes": 10, "in_channels": 3, "width": 0.5}}``.
``arch`` is a zoo name (:data:`ZOO`) or an import path ``"package.module:callable"`` for a
user's own network; ``envs.builders`` turns a spec into a network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1


def _ch(base: int, width: float) -> int:
    """Scales a channel count by ``width``, never below 4."""
    return max(4, round(base * width))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem, no max-pool, four stages of basic blocks."""

    def __init__(
        self,
        layers: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        widths = [_ch(w, width) for w in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
}


class VGG(nn.Module):
    """VGG with BatchNorm for small images; pools only while the feature map is > 1 pixel."""

    def __init__(
        self,
        cfg: list[int | str],
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                if size > 1:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = _ch(int(v), width)
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SmallCNN(nn.Module):
    """The demo teacher: four 3x3 conv layers and a hidden fully connected layer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = _ch(32, width), _ch(64, width), _ch(128, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Conv2d(c2, c3, 3, padding=1, bias=False),
            nn.BatchNorm2d(c3),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(c3, c3)
        self.act = nn.ReLU()
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(self.act(self.hidden(x)))


class DepthwiseSeparableNet(nn.Module):
    """A MobileNet-v1-style network: depthwise 3x3 + pointwise 1x1 pairs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1)]
        c = _ch(32, width)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
        ]
        for out, stride in plan:
            out = _ch(out, width)
            layers += [
                nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, out, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def resnet18(**kw: Any) -> CifarResNet:
    return CifarResNet([2, 2, 2, 2], **kw)


def resnet34(**kw: Any) -> CifarResNet:
    return CifarResNet([3, 4, 6, 3], **kw)


def vgg11(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32
) -> VGG:
    return VGG(_VGG_CFGS["vgg11"], num_classes, in_channels, width, image_size)


def vgg16(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32
) -> VGG:
    return VGG(_VGG_CFGS["vgg16"], num_classes, in_channels, width, image_size)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "small_cnn": SmallCNN,
    "dwsep": DepthwiseSeparableNet,
}
