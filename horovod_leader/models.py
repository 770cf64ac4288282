"""Models used by the examples, tests and benchmarks.

``cnn`` is a small convolutional net for the 8x8 digits data set (scikit-learn's bundled
``load_digits``): it trains to > 95% test accuracy in a few hundred steps on a CPU.
"""
from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv(16) - conv(32) - maxpool - fc(64) - fc(classes), for 1x8x8 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
