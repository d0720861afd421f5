"""Training callbacks (layer 2): the epoch log, the epoch checkpoint resume reads (and what a resume restores from
it, :class:`RunCheckpoint`), and an ETA line."""

from __future__ import annotations

import datetime
import logging
import math
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from ssn_exp.models import CheckpointError

__all__ = ["EpochLog", "QuietRanks", "RunCheckpoint", "TrainingETA", "epoch_checkpoint"]

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


class QuietRanks(pl.Callback):
    """Installs ssn_exp's filters of library chatter (:func:`ssn_exp.lightning.quiet.quiet_known_warnings`) in every
    process of the Trainer: a rank started by ddp_spawn unpickles its callbacks first, before it warns of anything,
    and inherits no filters from the parent."""

    def __reduce__(self):
        return _quiet_ranks, ()


def _quiet_ranks() -> QuietRanks:
    from ssn_exp.lightning.quiet import quiet_known_warnings

    quiet_known_warnings()
    return QuietRanks()


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
    return RunCheckpoint(
        dirpath=dirpath,
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        save_last="link",
        save_top_k=1,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
    )


#: What a resume takes from a checkpoint: the weights (a run's are checked by load_checkpoint first; Lightning loads them
#: strictly into the run's own module) and the training state rebuilt below; anything else in the file (another
#: callback's or a data module's state) is dropped.
_RESTORED = {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "hyper_parameters", "hparams_name",
             "loops", "callbacks", "optimizer_states", "lr_schedulers"}  # fmt: skip
#: Bound on every counter of the loops' state (and on a scheduler's steps recomputed on resume).
_MAX_COUNT, _MAX_STEPS = 2**53, 2**20


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for a run's (or a stage's) own folder, whose resume trusts nothing in the file.

    A resumed ``fit`` restores what the checkpoint holds: callback state with paths that Lightning later removes
    (``best_model_path``, ``last_model_path``, ``kth_best_model_path``, ``best_k_models``: a forged
    ``best_model_path`` of ``<dir>/../../victim`` made it delete ``victim``, recursively), loop counters, optimizer and
    scheduler state. Before any of it is restored (:meth:`on_load_checkpoint` runs before callbacks, loops, optimizers
    and schedulers are loaded), the checkpoint is rebuilt in place by :func:`restorable_state`: this callback's state
    from its folder's own layout (:meth:`layout_state`, no path from the file), other callbacks' dropped, the counters
    bounded, the optimizer's settings and the schedulers recomputed from the run's own config, and the per-parameter
    optimizer state kept only where it fits the parameters. A file that does not fit is refused with a
    :class:`CheckpointError` (one line).
    """

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        restorable_state(checkpoint, trainer, pl_module, self)

    def layout_state(self) -> dict:
        """This callback's state rebuilt from its folder, with no value from the file: ``last.ckpt`` and the epoch
        checkpoint it links to (the newest, the one ``save_top_k=1`` removes after the next epoch) when the link
        resolves to a file directly in the folder; nothing else is tracked (no monitor, no top-k scores)."""
        folder = Path(self.dirpath)
        last = folder / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        real = last.resolve()
        inside = real.parent == folder.resolve() and real.is_file()
        return {
            "monitor": None,
            "dirpath": self.dirpath,
            "best_model_path": str(folder / real.name) if inside and real.name != last.name else "",
            "last_model_path": str(last) if inside else "",
            "kth_best_model_path": "",
            "best_k_models": {},
            "best_model_score": None,
            "current_score": None,
            "kth_value": torch.tensor(math.inf),
        }


def _count(value, high: int = _MAX_COUNT) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


def _plain(tree, depth: int = 0) -> bool:
    """Nested dicts (string keys) of bounded counters and booleans: the loops' progress state."""
    if isinstance(tree, dict):
        return (
            depth < 8 and len(tree) < 64 and all(isinstance(k, str) and _plain(v, depth + 1) for k, v in tree.items())
        )
    return isinstance(tree, bool) or _count(tree)


def _numbers(tree) -> bool:
    """A flat dict of finite numbers (a precision plugin's scaler state)."""
    return (
        isinstance(tree, dict)
        and len(tree) < 64
        and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in tree.items()
        )
    )


def restorable_state(checkpoint: dict, trainer, pl_module, callback: RunCheckpoint) -> None:
    """Rebuild ``checkpoint`` in place so that a resume restores only a state the run could have saved (see
    :class:`RunCheckpoint`); raises :class:`CheckpointError` naming what does not fit."""
    where = f"cannot resume from {trainer.ckpt_path}"
    precision = type(trainer.precision_plugin).__qualname__
    for key in list(checkpoint):
        if key not in _RESTORED and not (key == precision and _numbers(checkpoint[key])):
            del checkpoint[key]
    max_epochs = trainer.max_epochs if isinstance(trainer.max_epochs, int) and trainer.max_epochs >= 0 else 2**31
    epoch, step, loops = checkpoint.get("epoch"), checkpoint.get("global_step"), checkpoint.get("loops")
    if not _count(epoch, max_epochs) or not _count(step):
        raise CheckpointError(f"{where}: its epoch / global_step ({epoch!r}, {step!r}) are not counters of this run")
    fit = loops.get("fit_loop") if isinstance(loops, dict) else None
    try:
        progress = fit["epoch_progress"]
        steps = fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]["total"]["completed"]
    except (KeyError, TypeError):
        progress = steps = None
    epochs_ok = isinstance(progress, dict) and all(
        _count(n, max_epochs) and n <= epoch + 1 for part in progress.values() if isinstance(part, dict)
        for n in part.values()
    )  # fmt: skip
    if not _plain(loops) or not epochs_ok or (pl_module.automatic_optimization and steps != step):
        raise CheckpointError(f"{where}: its loop state is not one this run could have saved (epoch {epoch})")
    checkpoint["callbacks"] = {callback.state_key: callback.layout_state()}  # no path is read from the file
    _rebuild_optimization(checkpoint, pl_module, where, min(_MAX_STEPS, max(step, max_epochs) + 1))


def _rebuild_optimization(checkpoint: dict, pl_module, where: str, max_steps: int) -> None:
    """The optimizers' settings and the schedulers' state, recomputed from the module's own ``configure_optimizers``
    (the run's config) and the number of scheduler steps stored; of the file only the per-parameter state is kept
    (momentum buffers and the like: tensors of the parameter's shape, or scalars, all finite)."""
    from pytorch_lightning.core.optimizer import _init_optimizers_and_lr_schedulers

    optimizers, configs = _init_optimizers_and_lr_schedulers(pl_module)
    stored_opts, stored_scheds = checkpoint.get("optimizer_states"), checkpoint.get("lr_schedulers")
    if not isinstance(stored_opts, list) or len(stored_opts) != len(optimizers):
        raise CheckpointError(f"{where}: it holds no optimizer state for this run's {len(optimizers)} optimizer(s)")
    if not isinstance(stored_scheds, list) or len(stored_scheds) != len(configs):
        raise CheckpointError(f"{where}: it holds no scheduler state for this run's {len(configs)} scheduler(s)")
    for i, (config, stored) in enumerate(zip(configs, stored_scheds)):
        sched = config.scheduler
        if not isinstance(sched, torch.optim.lr_scheduler.LRScheduler):  # ReduceLROnPlateau: depends on metrics
            if not isinstance(stored, dict) or set(stored) != set(sched.state_dict()):
                raise CheckpointError(f"{where}: its scheduler state does not fit this run's scheduler")
            continue
        steps = stored.get("last_epoch") if isinstance(stored, dict) else None
        if not _count(steps, max_steps) or steps < sched.last_epoch:
            raise CheckpointError(f"{where}: its scheduler has made {steps!r} steps, not a count this run could make")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(steps - sched.last_epoch):
                sched.step()
        stored_scheds[i] = sched.state_dict()
    for i, (opt, stored) in enumerate(zip(optimizers, stored_opts)):
        fresh = opt.state_dict()
        shapes = {}
        for group, live in zip(fresh["param_groups"], opt.param_groups):
            shapes.update({idx: p.shape for idx, p in zip(group["params"], live["params"])})
        per_param = stored.get("state") if isinstance(stored, dict) else None
        if not isinstance(per_param, dict) or not all(
            idx in shapes and _param_state(value, shapes[idx]) for idx, value in per_param.items()
        ):
            raise CheckpointError(f"{where}: its optimizer state does not fit this run's parameters")
        stored_opts[i] = {"state": per_param, "param_groups": fresh["param_groups"]}


def _param_state(state, shape) -> bool:
    """One parameter's optimizer state: named finite tensors of its shape or scalars, or finite numbers."""
    if not isinstance(state, dict) or len(state) > 16:
        return False
    for key, value in state.items():
        if not isinstance(key, str):
            return False
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 and value.shape != shape or not bool(torch.isfinite(value).all()):
                return False
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
    return True
