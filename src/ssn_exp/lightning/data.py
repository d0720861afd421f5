"""Data modules (layer 2). Images stay in [0, 1] (no normalisation here: it is the model's first layer).

Each data module is built from ``conf/data/*.yaml`` by ``_target_`` and declares the data set's facts
(``name``, ``q``, ``num_classes``, ``shape``, ``mean``, ``std``, ``certify_n``); the built-in ones check
them against the data.

- :class:`DigitsData`: scikit-learn's embedded 8x8 digits (q = 16), a fixed stratified split; offline.
- :class:`CIFAR10Data`: the CIFAR-10 python batches under ``root``, read without running pickled code.
- :class:`ImageFolderData`: ImageFolder ``train``/``val`` roots (ImageNet: every 100th validation image).

Training order and augmentation are functions of (seed, epoch, example) only (:class:`EpochSampler`,
:class:`SeededSet`), so a run resumed from an epoch checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from ssn_exp.exceptions import UserError, list_option

__all__ = [
    "DataMissingError",
    "DataError",
    "ImageData",
    "DigitsData",
    "CIFAR10Data",
    "ImageFolderData",
    "load_image",
    "EpochSampler",
    "SeededSet",
    "dataset_labels",
    "mix_seed",
]


class DataMissingError(UserError, FileNotFoundError):
    """The data set is not where the config says; the message says where to put it."""


class DataError(UserError, ValueError):
    """A data file that cannot be used (unsafe, damaged or of the wrong shape); the message names it.

    Raised in a DataLoader worker, torch re-raises it in the main process with the worker's traceback as its
    message; the message is cut back to the original one line.
    """

    def __init__(self, message: str = ""):
        text = str(message)
        if "Original Traceback" in text:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            last = lines[-1] if lines else text
            text = last.split("DataError: ", 1)[1] if "DataError: " in last else last
        super().__init__(text)


def load_image(path: str):
    """An RGB PIL image from ``path`` (the ImageFolder loader); a file PIL cannot decode is a :class:`DataError`
    naming it, not a traceback in the middle of training or certification."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Image.UnidentifiedImageError):
            text = "not an image file PIL can read"
        else:
            text = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read image {path} ({text}); remove or replace the file") from None


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence), e.g. (run seed, epoch, example)."""
    return (
        int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]) >> 1
    )


class SeededSet(Dataset):
    """Wraps a training set: item ``(epoch, i)`` seeds torch, numpy and ``random`` from (seed, epoch, i), then
    returns ``dataset[i]``; random augmentation therefore depends on nothing else (not on workers, not on resume)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        s = mix_seed(self.seed, 0x5EED, epoch, i)
        # the CPU generator the transforms draw from (torch.manual_seed is 100x slower)
        torch.default_generator.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)
        return self.dataset[i]


class EpochSampler(DistributedSampler):
    """Shuffles with a permutation that depends only on (seed, epoch) and yields ``(epoch, index)``.

    A :class:`~torch.utils.data.DistributedSampler` (so Lightning keeps it under DDP, each rank taking
    its share) that starts at the epoch it is built in; Lightning calls :meth:`set_epoch` every epoch.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=mix_seed(seed, 0x0DE2))
        self.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


def dataset_labels(dataset: Dataset, indices: Sequence[int]) -> list[int]:
    """The labels of ``dataset[i]`` for ``indices`` without loading images where the data set allows it."""
    indices = list(indices)
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset, [dataset.indices[i] for i in indices])
    if isinstance(dataset, TensorDataset):
        y = dataset.tensors[1]
        return [int(y[i]) for i in indices]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(targets[i]) for i in indices]
    return [int(dataset[i][1]) for i in indices]


class ImageData(pl.LightningDataModule):
    """Common interface: the facts (``name``, ``q``, ``num_classes``, ``shape`` (C, H, W), ``mean``, ``std``,
    ``certify_n``), the training loader (seeded, see :class:`EpochSampler`) and the test split (:meth:`certify_set`).

    Subclasses with fixed facts list them in ``FIXED`` (checked at construction).
    """

    FIXED: dict = {}

    def __init__(
        self,
        *,
        name: str,
        q: int,
        num_classes: int,
        shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        certify_n: int = 100_000,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.name = str(name)
        self.q, self.num_classes = int(q), int(num_classes)
        self.shape = tuple(int(s) for s in list_option(shape, "data.shape", "data.shape=[3,32,32]"))
        self.mean = tuple(float(m) for m in list_option(mean, "data.mean", "data.mean=[0.5,0.5,0.5]"))
        self.std = tuple(float(s) for s in list_option(std, "data.std", "data.std=[0.25,0.25,0.25]"))
        self.certify_n = int(certify_n)
        for key, want in self.FIXED.items():
            got = getattr(self, key)
            if got != want:
                raise ValueError(
                    f"data.{key}={list(got) if isinstance(got, tuple) else got} does not match "
                    f"{type(self).__name__} ({key} is {list(want) if isinstance(want, tuple) else want})"
                )
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"data.shape must be [C, H, W], got {list(self.shape)}")
        if len(self.mean) != self.shape[0] or len(self.std) != self.shape[0]:
            raise ValueError(f"data.mean and data.std need {self.shape[0]} values (one per channel)")
        if self.q < 1 or self.num_classes < 2 or self.certify_n < 1:
            raise ValueError("data.q and data.certify_n must be >= 1 and data.num_classes >= 2")
        if int(batch_size) < 1 or int(eval_batch_size or batch_size) < 1 or int(num_workers) < 0:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1, data.num_workers >= 0")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def dim(self) -> int:
        c, h, w = self.shape
        return c * h * w

    def facts(self) -> dict:
        return {
            "name": self.name,
            "q": self.q,
            "num_classes": self.num_classes,
            "shape": list(self.shape),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def _loader(self, ds, batch_size, sampler=None):
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self):
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(self.train_set, self.seed, epoch=epoch, num_replicas=world, rank=rank)
        return self._loader(SeededSet(self.train_set, self.seed), self.batch_size, sampler)

    def val_dataloader(self):
        return self._loader(self.test_set, self.eval_batch_size)

    def certify_set(self) -> Dataset:
        """The test split, unaugmented, as certified."""
        if self.test_set is None:
            self.setup("test")
        return self.test_set

    def check(self, stage: str = "fit") -> None:
        """Raise :class:`DataMissingError` now if the data of ``stage`` ("fit" or "test") is not where the config says
        (cheap: nothing is loaded), so that a run fails before it starts."""


class DigitsData(ImageData):
    """scikit-learn ``load_digits`` (1797 images, 8x8, values 0..16 -> q = 16), stratified 80/20 split."""

    FIXED = {"q": 16, "num_classes": 10, "shape": (1, 8, 8)}

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0, **kw):
        super().__init__(**kw)
        if not 0 < test_fraction < 1:
            raise ValueError(f"data.test_fraction must lie in (0, 1), got {test_fraction}")
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


class CIFAR10Data(ImageData):
    """CIFAR-10 from the python batches in ``root/cifar-10-batches-py`` (read by :mod:`ssn_exp.lightning.cifar10`)."""

    FIXED = {"q": 255, "num_classes": 10, "shape": (3, 32, 32)}
    URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    MD5 = "c58f30108f718f92721af3b95e74349a"

    def __init__(self, root: str = "data/cifar10", download: bool = False, augment: bool = True, **kw):
        super().__init__(**kw)
        self.root = str(root)
        self.download = bool(download)
        self.augment = bool(augment)

    @property
    def folder(self) -> Path:
        return Path(self.root) / "cifar-10-batches-py"

    def check(self, stage: str = "fit") -> None:
        self._check()

    def prepare_data(self):
        if self.download and not self.folder.is_dir():
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(self.URL, self.root, filename="cifar-10-python.tar.gz", md5=self.MD5)

    def _check(self):
        if not self.download and not self.folder.is_dir():
            raise DataMissingError(
                f"CIFAR-10 not found: expected the python batches in {self.folder.resolve()}. "
                f"Download and unpack cifar-10-python.tar.gz ({self.URL}) into "
                f"{Path(self.root).resolve()}, set data.root=DIR, or run once online with data.download=true"
            )

    def setup(self, stage=None):
        need_train = stage in (None, "fit") and self.train_set is None
        if self.test_set is not None and not need_train:
            return
        from torchvision import transforms as T

        from ssn_exp.lightning.cifar10 import CIFAR10Batches

        self._check()
        self.prepare_data()
        train_tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        try:
            if self.test_set is None:
                self.test_set = CIFAR10Batches(self.root, train=False, transform=T.ToTensor())
            if need_train:
                self.train_set = CIFAR10Batches(self.root, train=True, transform=T.Compose([*train_tf, T.ToTensor()]))
        except FileNotFoundError as exc:
            raise DataMissingError(f"{exc}; {self.folder} must hold all the CIFAR-10 python batches") from None
        except ValueError as exc:  # an unsafe pickle or a damaged batch: nothing was run
            raise DataError(str(exc)) from None


class ImageFolderData(ImageData):
    """ImageFolder data (one sub-folder per class): ImageNet in the paper, or any other such folder.

    Certification uses every ``test_every``-th validation image (100 on ImageNet: the 500 images of Cohen et al.).
    """

    def __init__(
        self,
        train_root: str = "data/imagenet/train",
        val_root: str = "data/imagenet/val",
        test_every: int = 100,
        image_size: int = 224,
        resize: int = 256,
        **kw,
    ):
        super().__init__(**kw)
        if self.shape != (3, int(image_size), int(image_size)):
            raise ValueError(f"data.shape must be [3, image_size, image_size], got {list(self.shape)}")
        if int(test_every) < 1 or int(resize) < int(image_size):
            raise ValueError("data.test_every must be >= 1 and data.resize >= data.image_size")
        self.train_root, self.val_root = str(train_root), str(val_root)
        self.test_every = int(test_every)
        self.image_size, self.resize = int(image_size), int(resize)

    def check(self, stage: str = "fit") -> None:
        self._check(self.val_root, "val")
        if stage == "fit":
            self._check(self.train_root, "train")

    def _check(self, root, what):
        if not Path(root).is_dir():
            raise DataMissingError(
                f"{self.name} {what} images not found at {Path(root).resolve()}: it must be an ImageFolder "
                f"(one sub-folder per class, e.g. n01440764/*.JPEG). ImageNet: get ILSVRC2012 from https://image-net.org, "
                f"unpack it there (valprep.sh sorts the validation images), or set data.{what}_root=DIR"
            )

    def _folder(self, root, what, transform):
        from torchvision.datasets import ImageFolder

        self._check(root, what)
        try:
            folder = ImageFolder(root, transform=transform, loader=load_image)
        except FileNotFoundError as exc:  # no class folders, or no images in them
            raise DataMissingError(f"{self.name} {what} images at {Path(root).resolve()}: {exc}") from None
        except OSError as exc:  # unreadable folders
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise DataError(f"cannot read the {self.name} {what} images at {Path(root).resolve()}: {text}") from None
        if len(folder.classes) != self.num_classes:
            raise DataError(
                f"{Path(root).resolve()} has {len(folder.classes)} class folders but data.num_classes={self.num_classes}"
            )
        return folder

    def setup(self, stage=None):
        need_train = stage in (None, "fit") and self.train_set is None
        if self.test_set is not None and not need_train:
            return
        from torchvision import transforms as T

        if self.test_set is None:
            test_tf = T.Compose([T.Resize(self.resize), T.CenterCrop(self.image_size), T.ToTensor()])
            val = self._folder(self.val_root, "val", test_tf)
            self.test_set = Subset(val, list(range(0, len(val), self.test_every)))
        if need_train:
            train_tf = T.Compose([T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip(), T.ToTensor()])
            train = self._folder(self.train_root, "train", train_tf)
            val_classes = self.test_set.dataset.classes
            if train.classes != val_classes:  # labels are class-folder positions: they must mean the same classes
                differ = sorted(set(train.classes) ^ set(val_classes))[:5]
                raise DataError(
                    f"the class folders of {Path(self.train_root).resolve()} and {Path(self.val_root).resolve()} "
                    f"differ (e.g. {', '.join(differ)}): both need the same class sub-folders"
                )
            self.train_set = train
