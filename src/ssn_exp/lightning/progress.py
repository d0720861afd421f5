"""Progress on long work (layer 2): a live bar in a terminal, occasional plain lines elsewhere.

A progress bar redraws itself many times a second; written to a file or a CI log every redraw is kept (a
15-second run made 160 KB of them). Outside a terminal progress is therefore a plain log line at most every
``interval`` seconds, and one when the work is done.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from pytorch_lightning.callbacks import ProgressBar

__all__ = ["interactive", "progress_reporter", "PlainProgressBar", "progress_callbacks"]

log = logging.getLogger("ssn_exp")

#: Seconds between two plain progress lines.
INTERVAL = 30.0


def interactive() -> bool:
    """True when progress goes to a terminal (standard error is a TTY)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _PlainLines:
    """``done/total`` as a log line every ``interval`` seconds (and at the end), with the elapsed time and an ETA."""

    def __init__(self, total: int, initial: int, desc: str, unit: str, interval: float = INTERVAL):
        self.total, self.done, self.desc, self.unit = total, initial, desc, unit
        self.interval = interval
        self.start_done = initial
        self.t0 = self.last = time.monotonic()

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        new = self.done - self.start_done
        rate = new / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_text = _fmt(eta) if eta == eta else "?"
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {_fmt(elapsed)} elapsed, ETA {eta_text}"
        )

    def update(self, k: int, close: bool = False) -> None:
        if close:
            if self.done > self.start_done:
                log.info(self.line())
            return
        self.done += k
        now = time.monotonic()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            log.info(self.line())


def progress_reporter(total: int, initial: int, desc: str, unit: str, enabled: bool = True) -> Callable:
    """``update(k, close=False)``: a tqdm bar in a terminal, plain lines elsewhere, nothing when not ``enabled``."""
    if not enabled:
        return lambda k, close=False: None
    if not interactive():
        return _PlainLines(total, initial, desc, unit).update
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit)

    def update(k: int, close: bool = False):
        if close:
            bar.close()
        elif k:
            bar.update(k)

    return update


class PlainProgressBar(ProgressBar):
    """Lightning's progress outside a terminal: a line per ``interval`` seconds of training, none for validation.

    (The epoch log line with the ETA comes from :class:`ssn_exp.lightning.callbacks.TrainingETA`.)
    """

    def __init__(self, interval: float = INTERVAL):
        super().__init__()
        self.interval = interval
        self._enabled = True
        self._last = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_epoch_start(self, trainer, pl_module):
        self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.monotonic()
        if not self._enabled or trainer.global_rank != 0 or now - self._last < self.interval:
            return
        self._last = now
        total = self.total_train_batches
        of = f"/{total}" if isinstance(total, int) else ""
        log.info("epoch %d/%s: batch %d%s", trainer.current_epoch + 1, trainer.max_epochs, batch_idx + 1, of)


def progress_callbacks(trainer_cfg) -> list:
    """The progress callback a Trainer gets: Lightning's own bar in a terminal, plain lines elsewhere."""
    enabled = bool(trainer_cfg.get("enable_progress_bar", True))
    return [PlainProgressBar()] if enabled and not interactive() else []
