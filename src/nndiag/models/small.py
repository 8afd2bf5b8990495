"""Small networks for the demo, tests and model zoos (digits 8×8, mnist1d, CIFAR)."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for 1×8×8 digit images.

    conv3×3(1→w) → [BN] → ReLU → conv3×3(w→2w) → [BN] → ReLU → maxpool 2 →
    linear(2w·16 → hidden) → ReLU → linear(hidden → classes).
    """

    def __init__(
        self,
        width: int = 16,
        hidden: int = 64,
        num_classes: int = 10,
        in_channels: int = 1,
        batchnorm: bool = False,
        image_size: int = 8,
    ) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            norm(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            norm(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A fully connected ReLU network; flattens its input."""

    def __init__(self, in_features: int = 64, hidden: int | list[int] = 64, num_classes: int = 10,
                 depth: int = 2) -> None:
        super().__init__()
        widths = list(hidden) if isinstance(hidden, list) else [hidden] * depth
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for w in widths:
            layers += [nn.Linear(prev, w), nn.ReLU()]
            prev = w
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def digits_cnn(width: int = 16, hidden: int = 64, num_classes: int = 10,
               batchnorm: bool = False) -> DigitsCNN:
    """The demo CNN for scikit-learn's 8×8 digits."""
    return DigitsCNN(width=width, hidden=hidden, num_classes=num_classes, batchnorm=batchnorm)


def digits_mlp(hidden: int = 64, depth: int = 2, num_classes: int = 10) -> MLP:
    """An MLP for the 64 flattened pixels of scikit-learn's digits."""
    return MLP(64, hidden, num_classes, depth)


def mlp(in_features: int = 64, hidden: int = 64, depth: int = 2, num_classes: int = 10) -> MLP:
    """A generic MLP (e.g. ``in_features=40`` for mnist1d)."""
    return MLP(in_features, hidden, num_classes, depth)
