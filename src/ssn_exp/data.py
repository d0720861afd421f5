"""Data modules. Images stay in [0, 1] (no normalisation here: it is the model's first layer).

- ``digits``: scikit-learn's embedded 8x8 digits (q = 16), a fixed stratified split; works offline.
- ``cifar10``: torchvision CIFAR-10 (the python pickle batches) under ``root``.
- ``imagenet``: ImageFolder ``train``/``val`` roots; certification on every 100th validation image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ["DataMissingError", "DigitsData", "CIFAR10Data", "ImageNetData", "DATASETS", "build_datamodule"]


class DataMissingError(FileNotFoundError):
    """The data set is not where the config says; the message says where to put it."""


class ImageData(pl.LightningDataModule):
    """Common interface: ``num_classes``, ``q``, ``shape`` (C, H, W), ``mean``, ``std``, and the test split."""

    name: str = ""
    q: int = 255
    num_classes: int = 10
    shape: tuple[int, int, int] = (3, 32, 32)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(self, batch_size: int = 64, num_workers: int = 0, eval_batch_size: int | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def dim(self) -> int:
        c, h, w = self.shape
        return c * h * w

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "q": self.q,
            "num_classes": self.num_classes,
            "shape": list(self.shape),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def _loader(self, ds, shuffle, batch_size):
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self):
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self):
        return self._loader(self.test_set, False, self.eval_batch_size)

    def certify_set(self) -> Dataset:
        """The test split, unaugmented, as certified."""
        if self.test_set is None:
            self.setup("test")
        return self.test_set


class DigitsData(ImageData):
    """scikit-learn ``load_digits`` (1797 images, 8x8, values 0..16 -> q = 16), stratified 80/20 split."""

    name = "digits"
    q = 16
    num_classes = 10
    shape = (1, 8, 8)
    mean = (0.3053,)
    std = (0.3760,)

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0, **kw):
        super().__init__(**kw)
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
        y = torch.from_numpy(d.target.astype(np.int64))
        idx = np.arange(len(y))
        tr, te = train_test_split(idx, test_size=self.test_fraction, stratify=d.target, random_state=self.split_seed)
        self.train_set = TensorDataset(x[tr], y[tr])
        self.test_set = TensorDataset(x[np.sort(te)], y[np.sort(te)])


def _cifar10_class():
    from torchvision.datasets import CIFAR10

    class _CIFAR10(CIFAR10):
        """torchvision's CIFAR10, accepting any folder with every batch file present.

        (torchvision also compares md5 sums, which rejects re-packed or subset copies.)
        """

        train_list = [(name, None) for name, _ in CIFAR10.train_list]
        test_list = [(name, None) for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return _CIFAR10


class CIFAR10Data(ImageData):
    name = "cifar10"
    q = 255
    num_classes = 10
    shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(self, root: str = "data/cifar10", download: bool = False, augment: bool = True, **kw):
        super().__init__(**kw)
        self.root = str(root)
        self.download = download
        self.augment = augment

    def prepare_data(self):
        if self.download:
            _cifar10_class()(self.root, train=True, download=True)
            _cifar10_class()(self.root, train=False, download=True)

    def _check(self):
        folder = Path(self.root) / "cifar-10-batches-py"
        if not self.download and not folder.is_dir():
            raise DataMissingError(
                f"CIFAR-10 not found: expected the python batches in {folder.resolve()}. "
                f"Download and unpack cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into "
                f"{Path(self.root).resolve()}, set data.root=DIR, or run once online with data.download=true"
            )

    def setup(self, stage=None):
        if self.test_set is not None:
            return
        from torchvision import transforms as T

        self._check()
        self.prepare_data()
        cls = _cifar10_class()
        train_tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        self.train_set = cls(self.root, train=True, transform=T.Compose([*train_tf, T.ToTensor()]))
        self.test_set = cls(self.root, train=False, transform=T.ToTensor())


class ImageNetData(ImageData):
    name = "imagenet"
    q = 255
    num_classes = 1000
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        train_root: str = "data/imagenet/train",
        val_root: str = "data/imagenet/val",
        test_every: int = 100,
        image_size: int = 224,
        resize: int = 256,
        num_classes: int = 1000,
        **kw,
    ):
        super().__init__(**kw)
        self.train_root, self.val_root = str(train_root), str(val_root)
        self.test_every = test_every
        self.image_size, self.resize = image_size, resize
        self.num_classes = num_classes
        self.shape = (3, image_size, image_size)

    def _check(self, root, what):
        if not Path(root).is_dir():
            raise DataMissingError(
                f"ImageNet {what} images not found at {Path(root).resolve()}: it must be an ImageFolder "
                f"(one sub-folder per class, e.g. n01440764/*.JPEG). Get ILSVRC2012 from https://image-net.org, "
                f"unpack it there (valprep.sh sorts the validation images) or set data.{what}_root=DIR"
            )

    def setup(self, stage=None):
        if self.test_set is not None:
            return
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder

        self._check(self.val_root, "val")
        test_tf = T.Compose([T.Resize(self.resize), T.CenterCrop(self.image_size), T.ToTensor()])
        val = ImageFolder(self.val_root, transform=test_tf)
        if len(val.classes) != self.num_classes:
            raise ValueError(f"{self.val_root} has {len(val.classes)} classes but data.num_classes={self.num_classes}")
        self.test_set = Subset(val, list(range(0, len(val), self.test_every)))
        if stage in (None, "fit"):
            self._check(self.train_root, "train")
            train_tf = T.Compose([T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip(), T.ToTensor()])
            self.train_set = ImageFolder(self.train_root, transform=train_tf)


DATASETS = {"digits": DigitsData, "cifar10": CIFAR10Data, "imagenet": ImageNetData}


def build_datamodule(name: str, **kwargs) -> ImageData:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
