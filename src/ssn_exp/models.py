"""Model zoo (plain torch). Every classifier starts with its data set's normalisation layer:
noise is added to the raw [0, 1] image, so normalisation must come after it (SPEC section 1).

Build by name through :func:`build_model`; unknown names fail loudly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Normalize", "DigitsCNN", "WideResNet", "DnCNN", "MODELS", "build_model", "Denoised"]


class Normalize(nn.Module):
    """(x - mean) / std per channel; the first layer of every classifier."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 scikit-learn digits (or any small image)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, image_size: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 2) ** 2, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


class _WideBasic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.drop = drop
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.drop > 0:
            y = F.dropout(y, p=self.drop, training=self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WideResNet-depth-widen (Zagoruyko & Komodakis), as used by Yang et al. 2020 on CIFAR-10."""

    def __init__(self, depth: int = 40, widen: int = 2, num_classes: int = 10, in_channels: int = 3, drop: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers, cin = [], widths[0]
        for i, stride in enumerate((1, 2, 2)):
            for j in range(n):
                layers.append(_WideBasic(cin, widths[i + 1], stride if j == 0 else 1, drop))
                cin = widths[i + 1]
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.blocks(self.conv(x))
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class DnCNN(nn.Module):
    """DnCNN denoiser (Zhang et al. 2017; Salman et al. 2020): output x - net(x)."""

    def __init__(self, in_channels: int = 3, depth: int = 17, width: int = 64):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, in_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return x - self.net(x)


class Denoised(nn.Module):
    """F o D: a denoiser in front of a classifier (both see raw [0, 1] inputs; F normalises itself)."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier

    def forward(self, x):
        return self.classifier(self.denoiser(x))


def _digits_cnn(num_classes, in_channels, image_size, width=32):
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, width=width, image_size=image_size)


def _wrn40_2(num_classes, in_channels, image_size, drop=0.0):
    return WideResNet(40, 2, num_classes=num_classes, in_channels=in_channels, drop=drop)


def _resnet50(num_classes, in_channels, image_size):
    from torchvision.models import resnet50

    if in_channels != 3:
        raise ValueError("resnet50 expects 3-channel images")
    return resnet50(weights=None, num_classes=num_classes)


#: name -> builder(num_classes, in_channels, image_size, **options)
MODELS = {"digits_cnn": _digits_cnn, "wrn40_2": _wrn40_2, "resnet50": _resnet50}


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    **options,
) -> nn.Sequential:
    """Normalize(mean, std) followed by the named architecture."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values (one per channel)")
    return nn.Sequential(Normalize(mean, std), MODELS[name](num_classes, in_channels, image_size, **options))
