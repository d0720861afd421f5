"""Networks (layer 1: plain torch). Configs build them by ``_target_`` (``conf/model/*.yaml``).

Every classifier is run behind its data set's normalisation (:func:`normalized`): noise is added to
the raw [0, 1] image, so normalisation must come after it. :func:`load_levine2021` loads the authors'
released CIFAR-10 checkpoints (Levine & Feizi 2021) as such a classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ssn_exp.exceptions import UserError, _first_line

__all__ = [
    "Normalize",
    "normalized",
    "DigitsCNN",
    "WideResNet",
    "DnCNN",
    "Denoised",
    "CheckpointError",
    "read_checkpoint",
    "load_levine2021",
]


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used (unreadable, not a checkpoint, unsafe, wrong weights)."""


class Normalize(nn.Module):
    """(x - mean) / std per channel; the first layer of every classifier."""

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor):
        super().__init__()
        mean = torch.as_tensor(mean if isinstance(mean, torch.Tensor) else list(mean), dtype=torch.float32)
        std = torch.as_tensor(std if isinstance(std, torch.Tensor) else list(std), dtype=torch.float32)
        if mean.numel() != std.numel():
            raise ValueError(f"mean and std need one value per channel each, got {mean.numel()} and {std.numel()}")
        if not bool(torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"std must be positive, got {std.view(-1).tolist()}")
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).clone())

    def forward(self, x):
        return (x - self.mean) / self.std


def normalized(net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """``Normalize(mean, std)`` followed by ``net``: a classifier of raw [0, 1] images."""
    return nn.Sequential(Normalize(mean, std), net)


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
        x = F.avg_pool2d(x, x.shape[-2:]).flatten(1)  # the global mean as the authors compute it (8x8 on CIFAR)
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


def read_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with one-line errors for every way a file can be unusable."""
    import pickle
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        import re

        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(exc), re.IGNORECASE)
        with open(path, "rb") as fh:
            head = fh.read(4)
        if not found and not (head[:1] == b"\x80" or head == b"PK\x03\x04"):  # neither a pickle nor torch's zip
            raise CheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint") from None
        what = f"a pickled Python object ({found.group(1)})" if found else "pickled Python objects"
        raise CheckpointError(
            f"{path} holds {what}, which ssn_exp refuses to load (weights_only=True: unpickling it could run "
            "code); a checkpoint must hold tensors and plain containers only"
        ) from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes torch.load raise
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated or not a torch checkpoint ({_first_line(str(exc))})"
        ) from None


_LEVINE2021_DATASETS = {"cifar10": dict(num_classes=10, in_channels=3)}


def _levine2021_key(key: str) -> str | None:
    """Their ``model.module.*`` names -> ours (``norm.*`` is handled separately); None if unknown."""
    if not key.startswith("model.module."):
        return None
    key = key[len("model.module.") :]
    if key.startswith("conv1."):
        return "conv." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "bn." + key[len("bn1.") :]
    if key.startswith("fc."):
        return key
    parts = key.split(".")  # block{b}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}.{param}
    if len(parts) >= 5 and parts[0].startswith("block") and parts[1] == "layer":
        b, i = int(parts[0][5:]), int(parts[2])
        name = "shortcut" if parts[3] == "convShortcut" else parts[3]
        return ".".join([f"blocks.{(b - 1) * 6 + i}", name, *parts[4:]])
    return None


def load_levine2021(path, dataset: str = "cifar10", map_location="cpu") -> nn.Module:
    """The authors' released WideResNet-40-2 checkpoint (``model_ckpt.torch``) as an eval-mode classifier.

    The file is a plain state dict of their DataParallel wrapper: ``norm.module.mu`` / ``norm.module.log_sig``
    (their first layer, ``(x - mu) / exp(log_sig)`` on raw [0, 1] images) and ``model.module.*`` (the network).
    The returned module maps raw [0, 1] images (N, 3, 32, 32) to the same logits as their model (same float32
    operations). Loaded with ``weights_only=True``: a file holding pickled objects is refused.
    """
    if dataset not in _LEVINE2021_DATASETS:
        raise ValueError(
            f"the authors released CIFAR-10 WideResNet-40-2 checkpoints only; dataset={dataset!r} is not supported"
        )
    state = read_checkpoint(path, map_location=map_location)
    if not isinstance(state, dict) or "norm.module.mu" not in state or "norm.module.log_sig" not in state:
        raise CheckpointError(
            f"{path} is not a checkpoint in the authors' format (a state dict with norm.module.mu, "
            "norm.module.log_sig and model.module.*)"
        )
    net = WideResNet(40, 2, **_LEVINE2021_DATASETS[dataset])
    mapped, unknown = {}, []
    for key, value in state.items():
        if key.startswith("norm.module."):
            continue
        ours = _levine2021_key(key)
        if ours is None:
            unknown.append(key)
        else:
            mapped[ours] = value
    if unknown:
        raise CheckpointError(f"{path}: unexpected weights for a WideResNet-40-2 ({', '.join(unknown[:3])} ...)")
    try:
        net.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[-1].strip()
        raise CheckpointError(f"{path}: the weights do not fit a WideResNet-40-2: {detail}") from None
    norm = Normalize(state["norm.module.mu"].float(), torch.exp(state["norm.module.log_sig"].float()))
    return nn.Sequential(norm, net).eval()
