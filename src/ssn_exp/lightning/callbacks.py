"""Training callbacks (layer 2): the epoch log, the epoch checkpoint resume reads, and an ETA line."""

from __future__ import annotations

import datetime
import logging
import time

import pytorch_lightning as pl

__all__ = ["EpochLog", "TrainingETA", "epoch_checkpoint"]

log = logging.getLogger("ssn_exp")


class EpochLog(pl.Callback):
    """One log row per epoch: epoch, step, learning rate, the ``train/*`` metrics and the ``val/*`` metrics of
    this epoch's validation (if it ran), written to every logger before the epoch's checkpoint is saved.

    On resume the rows of the epochs being redone are dropped from loggers that can (``truncate_from_epoch``),
    so a killed and resumed run has the same log as an uninterrupted one.
    """

    def __init__(self):
        self._validated_epoch: int | None = None
        self._lr = float("nan")

    def on_train_epoch_start(self, trainer, pl_module):
        # the learning rate this epoch trains with (the scheduler steps before on_train_epoch_end returns)
        self._lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else float("nan")

    def on_train_start(self, trainer, pl_module):
        for logger in trainer.loggers:
            if hasattr(logger, "truncate_from_epoch"):
                logger.truncate_from_epoch(trainer.current_epoch)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        validated = self._validated_epoch == trainer.current_epoch
        row = {
            k: float(v)
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith("train/") or (validated and k.startswith("val/"))
        }
        row["lr"] = self._lr
        row["epoch"] = trainer.current_epoch
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.global_step)


class TrainingETA(pl.Callback):
    """Logs one line per epoch with elapsed time and the estimated time to the end of training."""

    def __init__(self):
        self._t0: float | None = None
        self._start_epoch = 0

    def on_train_start(self, trainer, pl_module):
        self._t0 = time.monotonic()
        self._start_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_rank != 0 or self._t0 is None:
            return
        done = trainer.current_epoch + 1 - self._start_epoch
        total = (trainer.max_epochs or 0) - self._start_epoch
        elapsed = time.monotonic() - self._t0
        eta = elapsed / max(done, 1) * max(total - done, 0)

        def fmt(s):
            return str(datetime.timedelta(seconds=int(s)))

        log.info(
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
