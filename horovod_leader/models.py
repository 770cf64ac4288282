"""Models used by the examples, tests and benchmarks.

``cnn`` is a small convolutional net for the 8x8 digits data set (scikit-learn's bundled
``load_digits``): it trains to > 95% test accuracy in a few hundred steps on a CPU. The
papers' CIFAR-10 models: ``resnet20``, ``vgg16`` (torchvision's, with batch norm) and ``cnn7``.
"""
from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv(16) - conv(32) - maxpool - fc(64) - fc(classes), for 1x8x8 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4) if image_size != 8 else nn.Identity(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block for CIFAR (He et al., 2016, option A shortcuts as 1x1 projections)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """ResNet-(6n+2) for 32x32 images; n=3 is ResNet-20 (0.27M parameters), the papers' model."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, planes_in = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(planes_in, planes, stride if i == 0 else 1))
                planes_in = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = self.layers(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class CNN7(nn.Module):
    """A 7-layer CNN for 32x32 images (5 convolutions with batch norm, 2 fully connected), the
    size class of the LSGD paper's CNN7."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()

        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        self.features = nn.Sequential(*block(in_channels, 64, False), *block(64, 64, True), *block(64, 128, False),
                                      *block(128, 128, True), *block(128, 256, True))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(256 * 4 * 4, 256), nn.ReLU(),
                                        nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg16_bn_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's VGG-16 with batch norm, its classifier sized for 32x32 inputs (512 features)."""
    from torchvision.models import vgg16_bn

    model = vgg16_bn(weights=None)
    model.avgpool = nn.Identity()
    model.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, num_classes))
    return model


MODELS = ("cnn", "resnet20", "vgg16", "cnn7")


def build(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A model by name: ``cnn`` (small digits CNN), ``resnet20``, ``vgg16`` (with BN), ``cnn7``."""
    if name == "cnn":
        return DigitsCNN(num_classes, in_channels, image_size=8 if in_channels == 1 else 32)
    if name == "resnet20":
        return ResNetCIFAR(20, num_classes, in_channels)
    if name == "cnn7":
        return CNN7(num_classes, in_channels)
    if name == "vgg16":
        if in_channels != 3:
            raise ValueError("vgg16 needs 3-channel 32x32 images (cifar10 or synthetic)")
        return vgg16_bn_cifar(num_classes)
    raise ValueError(f"model={name!r} is not one of {list(MODELS)}")
