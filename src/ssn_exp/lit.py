"""The LightningModule: a base classifier trained under a smoothing method's noise.

Everything needed to rebuild the model and its noise (architecture, method, sigma, q, seed, data
shape) is saved as hyper-parameters inside every checkpoint; see :func:`load_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from ssn_exp.models import Denoised, DnCNN, build_model
from ssn_exp.smoothing import Smoothing, make_smoothing

__all__ = ["SmoothedTraining", "load_checkpoint", "CheckpointMismatch", "TRAININGS"]

TRAININGS = ("standard", "stability")
DENOISERS = ("none", "stability", "mse", "mse_retrain")


class CheckpointMismatch(ValueError):
    """A checkpoint that does not belong to the requested method / sigma / seed / data."""


class SmoothedTraining(pl.LightningModule):
    """Train ``model`` on noisy samples of ``method`` at ``sigma`` (SPEC section 5).

    - ``training="standard"``: cross-entropy on one noisy sample per example;
    - ``training="stability"``: CE(f(x1), y) + stability_weight * KL(softmax f(x1) || softmax f(x2)).
    Noise is drawn on the batch's device, fresh per example.
    """

    def __init__(
        self,
        *,
        arch: str,
        arch_options: dict | None = None,
        dataset: str,
        num_classes: int,
        shape: list[int],
        mean: list[float],
        std: list[float],
        q: int,
        method: str,
        sigma: float,
        noise_seed: int = 0,
        training: str = "standard",
        stability_weight: float = 6.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
        denoiser: str = "none",
        dncnn: dict | None = None,
    ):
        super().__init__()
        if training not in TRAININGS:
            raise ValueError(f"unknown training {training!r}; choose one of {list(TRAININGS)}")
        self.save_hyperparameters()
        if denoiser not in DENOISERS:
            raise ValueError(f"unknown denoiser {denoiser!r}; choose one of {list(DENOISERS)}")
        c, h, w = shape
        self.model = build_model(
            arch, num_classes=num_classes, in_channels=c, image_size=h, mean=mean, std=std, **(arch_options or {})
        )
        if denoiser != "none":  # F o D (appendix D): the smoothed classifier sees the denoised sample
            self.model = Denoised(DnCNN(in_channels=c, **(dncnn or {})), self.model)
        self.smoothing: Smoothing = make_smoothing(method, sigma, q=q, dim=c * h * w, seed=noise_seed)

    # -- training ------------------------------------------------------------------------
    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.hparams.training == "standard":
            logits = self(self.smoothing.sample(x))
            loss = F.cross_entropy(logits, y)
        else:
            both = self(self.smoothing.sample(torch.cat([x, x])))
            logits, logits2 = both.chunk(2)
            kl = F.kl_div(F.log_softmax(logits2, 1), F.log_softmax(logits, 1), reduction="batchmean", log_target=True)
            loss = F.cross_entropy(logits, y) + self.hparams.stability_weight * kl
            self.log("train/kl", kl, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(
            "train/acc_noisy", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True, sync_dist=True
        )
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(self.smoothing.sample(x))
        self.log("val/loss_noisy", F.cross_entropy(logits, y), prog_bar=False, sync_dist=True)
        self.log("val/acc_noisy", (logits.argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
        )
        epochs = max(1, int(self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # -- identity ------------------------------------------------------------------------
    def identity(self) -> dict:
        hp = self.hparams
        return {
            "method": hp.method,
            "sigma": float(hp.sigma),
            "q": int(hp.q),
            "seed": int(hp.noise_seed),
            "dataset": hp.dataset,
            "training": hp.training,
            "denoiser": hp.denoiser,
            "arch": hp.arch,
        }


def load_checkpoint(path: str | Path, expect: dict | None = None, map_location="cpu") -> SmoothedTraining:
    """Rebuild a trained module from a checkpoint (``weights_only=True``).

    ``expect``: identity fields (method, sigma, q, seed, dataset, ...) the caller requires; any
    disagreement raises :class:`CheckpointMismatch` naming the fields.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointMismatch(f"{path} is not an ssn_exp checkpoint (no hyper-parameters / state_dict)")
    module = SmoothedTraining(**ckpt["hyper_parameters"])
    if expect:
        have = module.identity()
        diff = []
        for key, want in expect.items():
            if want is None or key not in have:
                continue
            got = have[key]
            same = abs(float(got) - float(want)) < 1e-9 if isinstance(got, float) else str(got) == str(want)
            if not same:
                diff.append(f"{key}: checkpoint has {got!r}, requested {want!r}")
        if diff:
            raise CheckpointMismatch(f"checkpoint {path} does not match the request ({'; '.join(diff)})")
    module.load_state_dict(ckpt["state_dict"])
    return module


class TrainingETA(pl.Callback):
    """Logs one line per epoch with elapsed time and the estimated time to the end of training."""

    def __init__(self):
        self._t0 = None
        self._start_epoch = 0

    def on_train_start(self, trainer, pl_module):
        import time

        self._t0 = time.monotonic()
        self._start_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        import datetime
        import logging
        import time

        if trainer.global_rank != 0 or self._t0 is None:
            return
        done = trainer.current_epoch + 1 - self._start_epoch
        total = (trainer.max_epochs or 0) - self._start_epoch
        elapsed = time.monotonic() - self._t0
        eta = elapsed / max(done, 1) * max(total - done, 0)
        fmt = lambda s: str(datetime.timedelta(seconds=int(s)))  # noqa: E731
        logging.getLogger("ssn_exp").info(
            "epoch %d/%d done, %s elapsed, ETA %s",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            fmt(elapsed),
            fmt(eta),
        )


def epoch_checkpoint(dirpath) -> pl.Callback:
    """Saves every epoch (``epochNNN.ckpt``, the newest only) with ``last.ckpt`` linking to it: what resume reads."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    return ModelCheckpoint(
        dirpath=dirpath,
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        save_last="link",
        save_top_k=1,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
    )
