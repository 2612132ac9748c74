"""The NIID-Bench 'simple-cnn' (Li et al., 2022): a LeNet-style net for 1x28x28 input."""

from torch import nn


def simple_cnn(num_classes: int, in_channels: int = 1) -> nn.Sequential:
    # 28 -> conv5 -> 24 -> pool -> 12 -> conv5 -> 8 -> pool -> 4: 16 * 4 * 4 features.
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )
